"""A rollback-journalled, locked file object that h5py writes through (its ``fileobj`` driver).

Why: HDF5 updates its metadata (B-trees, heaps, object headers, the superblock) in place and in
several separate writes, both when it flushes and whenever its metadata cache evicts a dirty
entry. A process killed between two of those writes leaves a file whose metadata disagree, and
such a file can fail to open at all, losing every entry it held (see docs/store.md for what the
SIGKILL trials showed). SWMR does not help a store that keeps creating new datasets, because
SWMR forbids creating objects while it is on.

What this module offers, in the way SQLite protects its database:

- `JournaledFile`: a binary file object (read/readinto/write/seek/tell/truncate/flush) for
  ``h5py.File(fileobj, ...)``. Between two commits it copies, before every write that would
  overwrite bytes of the last committed state, the old bytes to ``<path>-journal`` (a record of
  offset, length, CRC-32 and data). Writes past the committed size are appended without copy, so
  raw data written to new space (the bulk of a store) costs nothing extra.
- `JournaledFile.commit()`: called right after ``h5py.File.flush()``; it makes the current bytes
  the new committed state (empty the journal, then write a header with the new committed size).
- `recover(path)`: if a writer died, restores the old bytes in reverse order and truncates to the
  committed size, so the file is exactly what it was at the last commit, then empties the journal.
- Locking: a writer holds an exclusive ``flock`` on the HDF5 file itself (the lock HDF5 itself
  takes), a reader a shared one; a second writer, or a reader during a write, gets `StoreError`.

Journal layout (little-endian): header ``b"FADEJRN1", committed_size:u64, pid:u64, salt:u64,
inode:u64`` (the main file's inode: a journal left beside a deleted and recreated file is stale),
then records ``offset:u64, length:u64, salt:u64, crc32(data):u32, data``. A record cut short or
with a bad CRC ends the journal: its write to the main file had not started yet, because a
record is complete before the write it protects begins. An empty or headerless journal means the
main file is consistent.

Guarantee: against the death of the process (SIGKILL, OOM killer, crash) at any moment. Against
power loss or a kernel crash only with ``fsync=True`` (each record and each commit is fsynced).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import zlib

from store.errors import StoreError

log = logging.getLogger(__name__)

MAGIC = b"FADEJRN1"
_HEADER = struct.Struct("<8sQQQQ")
_RECORD = struct.Struct("<QQQI")


def journal_path(path: str) -> str:
    """The journal that belongs to the HDF5 file at `path`."""
    return path + "-journal"


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Read up to `n` bytes at `offset` (fewer only at end of file)."""
    chunks, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` at `offset`."""
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _read_journal(jpath: str) -> tuple[int, int, list[tuple[int, bytes]]] | None:
    """Parse a journal: (committed_size, pid, records) or None when it holds no valid header
    or belongs to another file (inode differs, or the main file is gone or empty)."""
    try:
        with open(jpath, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    if len(raw) < _HEADER.size:
        return None
    magic, committed, pid, salt, inode = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        return None
    try:
        st = os.stat(jpath[: -len("-journal")])
    except FileNotFoundError:
        return None
    if st.st_ino != inode or st.st_size == 0:
        log.warning("ignoring stale journal %s: it belongs to an earlier file of that name", jpath)
        return None
    records, pos = [], _HEADER.size
    while pos + _RECORD.size <= len(raw):
        offset, length, rsalt, crc = _RECORD.unpack_from(raw, pos)
        data = raw[pos + _RECORD.size: pos + _RECORD.size + length]
        if rsalt != salt or len(data) != length or zlib.crc32(data) != crc:
            break
        records.append((offset, data))
        pos += _RECORD.size + length
    return committed, pid, records


def journal_pid(path: str) -> int | None:
    """The pid recorded by the last writer of `path`, if its journal says."""
    parsed = _read_journal(journal_path(path))
    return None if parsed is None else parsed[1]


def is_hot(path: str) -> bool:
    """Whether `path` has a journal that a dead (or live) writer left with a valid header."""
    return _read_journal(journal_path(path)) is not None


def recover(path: str, fd: int | None = None) -> bool:
    """Roll the file back to its last commit if a journal says a writer died mid-transaction.

    The caller must hold the exclusive lock (or pass its locked read-write `fd`). Returns True
    when a rollback happened. Idempotent: a crash during recovery is repaired by recovering again,
    because the journal is removed only after the main file is restored and synced.
    """
    jpath = journal_path(path)
    parsed = _read_journal(jpath)
    if parsed is None:
        if os.path.exists(jpath):
            os.remove(jpath)
        return False
    committed, pid, records = parsed
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDWR)
    try:
        for offset, data in reversed(records):  # undo newest first: ends at the committed bytes
            _pwrite_all(fd, data, offset)
        os.ftruncate(fd, committed)
        os.fsync(fd)
    finally:
        if own:
            os.close(fd)
    os.remove(jpath)
    log.warning("recovered %s: rolled back %d journal records of writer pid %d to %d bytes",
                path, len(records), pid, committed)
    return True


def _lock(fd: int, exclusive: bool, path: str) -> None:
    """Take a non-blocking flock or raise a StoreError naming the writer."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        pid = journal_pid(path)
        who = (f"a writer (pid {pid} per {journal_path(path)})" if pid and is_hot(path)
               else "another open handle (fadelab or h5py, maybe in this process)")
        want = "write" if exclusive else "read"
        raise StoreError(
            f"cannot open {path} to {want}: it is locked by {who}; one writer at a time, and "
            f"readers only while no writer is open (wait for the writer to close the store)"
        ) from None


class JournaledFile:
    """Binary file object with a rollback journal, for ``h5py.File(JournaledFile(...))``.

    Warning: only the owner of this object may write the file; the exclusive lock enforces it
    across processes, and HDF5 inside this process must not open the same path a second time.
    """

    def __init__(self, path: str, writable: bool, fsync: bool = False):
        self.path = path
        self.writable = writable
        self.fsync = fsync
        self._pos = 0
        self._jfd = -1
        self._salt = 0
        if writable:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock(self._fd, True, path)
                recover(path, self._fd)
                self._jfd = os.open(journal_path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self.commit()
            except BaseException:
                os.close(self._fd)
                raise
        else:
            self._fd = os.open(path, os.O_RDONLY)
            try:
                _lock(self._fd, False, path)
                if is_hot(path):
                    # a writer died: roll back under the exclusive lock, then read
                    os.close(self._fd)
                    fd = os.open(path, os.O_RDWR)
                    try:
                        _lock(fd, True, path)
                        recover(path, fd)
                    finally:
                        os.close(fd)
                    self._fd = os.open(path, os.O_RDONLY)
                    _lock(self._fd, False, path)
            except BaseException:
                os.close(self._fd)
                raise
        self._committed = os.fstat(self._fd).st_size

    # -- transactions -----------------------------------------------------------------------
    def commit(self) -> None:
        """Make the file's current bytes the committed state (call after h5py's flush)."""
        if self.fsync:
            os.fsync(self._fd)
        os.ftruncate(self._jfd, 0)  # empty journal: the main file is consistent right now
        self._committed = os.fstat(self._fd).st_size
        self._salt += 1
        _pwrite_all(self._jfd, _HEADER.pack(MAGIC, self._committed, os.getpid(), self._salt,
                                               os.fstat(self._fd).st_ino), 0)
        self._jend = _HEADER.size
        if self.fsync:
            os.fsync(self._jfd)

    def _save_old(self, offset: int, end: int) -> None:
        """Journal the committed bytes in [offset, end) before they are overwritten."""
        end = min(end, self._committed)
        if offset >= end:
            return
        old = _pread_exact(self._fd, end - offset, offset)
        rec = _RECORD.pack(offset, len(old), self._salt, zlib.crc32(old)) + old
        _pwrite_all(self._jfd, rec, self._jend)
        self._jend += len(rec)
        if self.fsync:
            os.fsync(self._jfd)

    # -- the file-object protocol h5py's fileobj driver uses ---------------------------------
    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = os.fstat(self._fd).st_size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        mv = memoryview(buf).cast("B")
        got = 0
        while got < len(mv):
            n = os.preadv(self._fd, [mv[got:]], self._pos + got)
            if n == 0:
                break
            got += n
        self._pos += got
        return got

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = max(0, os.fstat(self._fd).st_size - self._pos)
        b = _pread_exact(self._fd, n, self._pos)
        self._pos += len(b)
        return b

    def write(self, data) -> int:
        if not self.writable:
            raise StoreError(f"{self.path} is open read-only; open it with mode='a' to write")
        n = memoryview(data).nbytes
        if self._pos < self._committed:
            self._save_old(self._pos, self._pos + n)
        _pwrite_all(self._fd, data, self._pos)
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if size < self._committed:
            self._save_old(size, self._committed)
        os.ftruncate(self._fd, size)
        return size

    def flush(self) -> None:
        """Nothing to do: every write went straight to the OS (pwrite)."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self, clean: bool = True) -> None:
        """Release the lock; after a clean final commit the journal is removed."""
        if self._fd < 0:
            return
        if self.writable:
            if clean:
                self.commit()
                if self.fsync:
                    os.fsync(self._fd)
                os.close(self._jfd)
                os.remove(journal_path(self.path))
            else:
                os.close(self._jfd)  # leave the journal: the next open rolls back
        os.close(self._fd)
        self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0
