"""The store's file: open, lock, describe itself, and write entries atomically.

`StoreCore` is the base of `store.Store`. It owns one HDF5 file written through a
`store.journal.JournaledFile`, so that every entry is one transaction: after a SIGKILL at any
moment the file reopens at the state of the last completed entry. It offers the generic entry
mechanics the typed mixins (`store.weights`, `store.activations`, `store.results`) build on:

- `_put(path, members, mode=...)`: write an entry (one dataset, or a group of datasets), mark it
  ``complete = 1`` and commit; ``mode="create"`` refuses an existing complete entry,
  ``mode="require"`` keeps one whose members match in shape and dtype and raises otherwise.
  A half-written entry (no ``complete`` attribute) is deleted and redone in both modes.
- `_get(path)`: read an entry's members back exactly; an incomplete entry raises `StoreError`.
- `is_complete(path)`, `commit()`, and `batch()`: a block whose entries commit together at its
  end (one flush and journal commit for many entries, e.g. the hundreds of sites of a delta).

Root attributes (the self-description, see docs/store.md): ``fadelab_store``,
``schema_version``, ``fadelab_version``, ``created_utc``, ``code_version``, ``config_text``,
``config_format``, ``seeds`` (JSON), ``layout`` (a text map of the groups), ``bfloat16``
(the raw-bits convention), ``sessions`` (JSON list of every writer session).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator

import h5py
import numpy as np

from store import codec
from store.errors import StoreError
from store.journal import JournaledFile

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMAT_NAME = "fadelab experiment store"
# The oldest HDF5 file format (superblock v0) has no "file open for write" flag, so a file that a
# killed writer left behind opens after rollback without h5clear; 'v110' caps the object formats
# so that HDF5 >= 1.10 reads every file.
LIBVER = ("earliest", "v110")
LAYOUT = """\
/deltas/<variant>/final|step_<8 digits>/<site>   dense dW dataset, or group {B, A} (dW = B @ A)
/edit_keys/<edit_id>/<name>                     C_E, C_P, k_star, u, v_star, ... (any name)
/edit_keys/<edit_id>/sites/<site>/<name>        per-site keys
/loss/<ft_id>                                   group {step, <curve names>}
/activations/<variant>/<site>[@<tag>]           group {data, coords/<name>}; attrs dims, rows_done
/images/<variant>/<name>                        group {pixels uint8 NHWC, prompt, seed}
/labels/<variant>/<images name>/<annotator>     group {index, label, score, time}, appendable
/metrics/<variant>/<name>[@step_<8 digits>]     scalar float64; attrs ci_low, ci_high, n
/arrays/<name...>                               any other array (probe tables), attrs dims
every entry carries complete=1 once fully written; entries without it are ignored and redone"""
BF16_NOTE = ("bfloat16 arrays are stored as uint16 raw bits with dataset attribute "
             "dtype='bfloat16'; float32 = (raw.astype(uint32) << 16).view(float32)")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fadelab_version() -> str:
    try:
        from importlib.metadata import version
        return version("fadelab")
    except Exception:  # noqa: BLE001 - not installed as a package: the version is unknown
        return "unknown"


#: an entry's whole reading as one JSON attribute, beside its attributes (metrics: value and
#: attributes), so an index over thousands of entries reads two attributes of each, not a dozen
PACKED = "_entry"


def _set_attrs(obj, attrs: dict[str, Any] | None) -> None:
    """Write user attributes: scalars and strings natively, dicts and lists as JSON text."""
    json_names = []
    for key, val in (attrs or {}).items():
        if key in ("complete", "dims", "dtype", "_json", PACKED):
            raise StoreError(f"attribute name {key!r} is reserved by the store")
        if isinstance(val, (dict, list, tuple)) or val is None:
            obj.attrs[key] = json.dumps(val, sort_keys=True)
            json_names.append(key)
        elif isinstance(val, (str, bool, int, float, np.generic)):
            obj.attrs[key] = val
        else:
            raise StoreError(f"attribute {key!r} has type {type(val).__name__}: accepted are "
                             "str, int, float, bool, None, dict, list (JSON-able)")
    if json_names:
        obj.attrs["_json"] = json.dumps(json_names)


def visit_items(group: h5py.Group, fn, prefix: str = "") -> None:
    """Call fn(relative_name, obj) for every object under `group`, following external links.

    h5py's own ``visititems`` stops at external links, and a merged grid store (`fadelab merge`)
    is made of them.
    """
    for name, obj in group.items():
        rel = f"{prefix}{name}"
        fn(rel, obj)
        if isinstance(obj, h5py.Group):
            visit_items(obj, fn, rel + "/")


def get_attrs(obj) -> dict[str, Any]:
    """User attributes of an entry (JSON ones decoded, store bookkeeping dropped)."""
    return decode_attrs(dict(obj.attrs.items()))


def decode_attrs(raw: dict[str, Any]) -> dict[str, Any]:
    """`get_attrs` of an entry whose attributes were read already (`dict(obj.attrs.items())`):
    h5py reads attributes one call at a time, and a report reads thousands of metrics."""
    json_names = set(json.loads(raw.get("_json", "[]")))
    out = {}
    for key, val in raw.items():
        if key in ("complete", "_json", "dtype", PACKED):
            continue
        if isinstance(val, bytes):
            val = val.decode()
        out[key] = json.loads(val) if key in json_names or key == "dims" else val
    return out


class StoreCore:
    """An open experiment store; use `Store.open(path, mode)` as a context manager."""

    def __init__(self, h5: h5py.File, jf: JournaledFile, path: str, mode: str):
        self.h5 = h5
        self._jf = jf
        self.path = path
        self.mode = mode
        self._batch_depth = 0  # > 0 inside `batch()`: commits wait for its end
        self._batch_dirty = False

    # -- opening and closing ----------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "a", *, config: str | None = None,
             config_format: str = "toml", code_version: str | None = None,
             seeds: dict | list | None = None, description: str = "", fsync: bool = False):
        """Open (mode 'a': create or resume; mode 'r': read) the store at `path`.

        `config` (TOML or JSON text), `code_version` (a git commit, passed by the caller) and
        `seeds` are recorded on creation; reopening with a different `config` raises, since the
        file belongs to another experiment. `fsync=True` also survives power loss (slower).
        Raises StoreError when another process writes the file, or on another schema version.
        """
        path = os.fspath(path)
        if mode not in ("a", "r"):
            raise StoreError(f"bad mode {mode!r}: accepted are 'a' (create or resume) and 'r'")
        if mode == "r" and not os.path.exists(path):
            raise StoreError(f"no store at {path}: open it with mode='a' to create one")
        if mode == "a" and os.path.exists(path) and os.path.getsize(path) > 0:
            cls._check_hdf5(path)
        jf = JournaledFile(path, writable=(mode == "a"), fsync=fsync)
        try:
            new = mode == "a" and os.fstat(jf._fd).st_size == 0
            # A reader holds the shared lock through `jf` and reads through HDF5's own driver,
            # so that external links (`fadelab merge` joins cell files with them) resolve.
            h5 = (h5py.File(jf, "a", libver=LIBVER, locking=False) if mode == "a"
                  else h5py.File(path, "r", locking=False))
        except BaseException as e:
            jf.close(clean=False)
            if isinstance(e, OSError):
                raise StoreError(f"{path} is not a readable HDF5 file: {e}") from e
            raise
        self = cls(h5, jf, path, mode)
        try:
            if new:
                self._describe(config, config_format, code_version, seeds, description)
            else:
                self._check_version()
                if mode == "a":
                    self._check_config(config, code_version)
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _check_hdf5(path: str) -> None:
        with open(path, "rb") as fh:
            sig = fh.read(8)
        if sig != b"\x89HDF\r\n\x1a\n":
            raise StoreError(f"{path} exists and is not an HDF5 file; refusing to write into it")

    def _describe(self, config, config_format, code_version, seeds, description) -> None:
        a = self.h5.attrs
        a["fadelab_store"] = FORMAT_NAME
        a["schema_version"] = SCHEMA_VERSION
        a["fadelab_version"] = _fadelab_version()
        a["created_utc"] = _now()
        a["description"] = description or "fadelab experiment: deltas, keys, activations, results"
        a["code_version"] = code_version or "unknown"
        a["config_text"] = config or ""
        a["config_format"] = config_format
        a["seeds"] = json.dumps(seeds)
        a["layout"] = LAYOUT
        a["bfloat16"] = BF16_NOTE
        a["hdf5_version"] = h5py.version.hdf5_version
        a["sessions"] = json.dumps([self._session(code_version)])
        self.commit()

    def _session(self, code_version) -> dict:
        return {"opened_utc": _now(), "pid": os.getpid(), "host": socket.gethostname(),
                "code_version": code_version or "unknown"}

    def _check_version(self) -> None:
        a = self.h5.attrs
        if a.get("fadelab_store") != FORMAT_NAME:
            raise StoreError(f"{self.path} is an HDF5 file but not a fadelab store "
                             f"(no root attribute fadelab_store={FORMAT_NAME!r})")
        found = int(a.get("schema_version", -1))
        if found != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema_version {found}; this code reads "
                             f"schema_version {SCHEMA_VERSION} (use the matching fadelab version)")

    def _check_config(self, config, code_version) -> None:
        old = self.h5.attrs.get("config_text", "")
        if config is not None and old and config != old:
            raise StoreError(f"{self.path} was created with another config; open it with the "
                             "same config text to resume, or choose a new file")
        sessions = json.loads(self.h5.attrs.get("sessions", "[]"))
        sessions.append(self._session(code_version))
        self.h5.attrs["sessions"] = json.dumps(sessions)
        self.commit()

    def close(self) -> None:
        """Commit and close; safe to call twice."""
        if self.h5 is None:
            return
        clean = True
        try:
            self.h5.close()
        except Exception:  # noqa: BLE001 - leave the journal so the next open rolls back
            clean = False
            log.exception("closing %s failed; the next open rolls back to the last entry",
                          self.path)
        finally:
            self._jf.close(clean=clean)
            self.h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- description -----------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """The root attributes (seeds and sessions decoded from JSON)."""
        out = dict(self.h5.attrs)
        for key in ("seeds", "sessions"):
            out[key] = json.loads(out.get(key, "null"))
        return out

    # -- transactions and generic entries --------------------------------------------------
    def _writable(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.path} is open read-only (mode='r'); open with mode='a'")

    def commit(self) -> None:
        """Flush HDF5 and make the file's bytes the state a crash rolls back to (inside
        `batch()`, at the end of the outermost block)."""
        if self._batch_depth:
            self._batch_dirty = True
            return
        self.h5.flush()
        self._jf.commit()

    @contextmanager
    def batch(self) -> Iterator["StoreCore"]:
        """Entries written within the block commit together when it ends, normally or by an
        exception (entries completed by then are whole; one cut off is redone by the next write
        of its path, as always). A SIGKILL inside the block rolls the file back to before it.

        Each commit flushes HDF5 and rewrites the journal's header: storing half of SD1.4's
        UNet delta (343 sites, 3.25 GB, uncompressed) took 2.92 s entry by entry and 2.19 s in
        one block on the lab's 2-core CPU (2026-12-05). Blocks nest; only the outermost commits.
        """
        self._writable()
        self._batch_depth += 1
        try:
            yield self
        finally:
            self._batch_depth -= 1
            if not self._batch_depth and self._batch_dirty and self.h5 is not None:
                self._batch_dirty = False
                self.commit()

    def is_complete(self, path: str) -> bool:
        """Whether the entry at `path` exists and was fully written."""
        obj = self.h5.get(path)
        return obj is not None and int(obj.attrs.get("complete", 0)) == 1

    def _drop_incomplete(self, path: str) -> bool:
        """Delete a half-written entry; return whether a complete one exists."""
        obj = self.h5.get(path)
        if obj is None:
            return False
        if int(obj.attrs.get("complete", 0)) == 1:
            return True
        log.warning("redoing half-written entry %s", path)
        del self.h5[path]
        return False

    def _put(self, path: str, members: dict[str | None, Any], *, mode: str,
             attrs: dict | None = None, dims: dict | None = None,
             compression: str | None = None, member_attrs: dict | None = None,
             packed: str | None = None) -> bool:
        """Write an entry atomically. members: {None: value} for a dataset, else {name: value}.
        packed: JSON text stored as attribute PACKED, before the entry is marked complete.

        Returns True when written, False when `mode="require"` kept a matching entry.
        """
        self._writable()
        if mode not in ("create", "require"):
            raise StoreError(f"bad mode {mode!r}: accepted are 'create' and 'require'")
        if compression not in (None, "gzip", "lzf"):
            raise StoreError(f"bad compression {compression!r}: accepted are None, 'gzip', 'lzf'")
        encoded = {name: _encode_member(v) for name, v in members.items()}
        if self._drop_incomplete(path):
            if mode == "create":
                raise StoreError(f"entry {path} exists; create_* never overwrites (use require_* "
                                 "to keep it, or write under another name)")
            self._check_same(path, encoded)
            return False
        if None in encoded:
            obj = self._write_ds(self.h5, path, *encoded[None], compression, (dims or {}).get(None))
        else:
            obj = self.h5.create_group(path)
            for name, (arr, dname) in encoded.items():
                self._write_ds(obj, name, arr, dname, compression, (dims or {}).get(name))
        for name, extra in (member_attrs or {}).items():
            obj[name].attrs.update(extra)
        _set_attrs(obj, attrs)
        if packed is not None:
            obj.attrs[PACKED] = packed
        obj.attrs["complete"] = 1
        self.commit()
        return True

    @staticmethod
    def _write_ds(parent, name, arr, dname, compression, dims):
        if dname == "str":
            ds = parent.create_dataset(name, data=arr, dtype=h5py.string_dtype())
        else:
            chunks = codec.chunks_for(arr.shape, arr.dtype.itemsize)
            comp = compression if chunks else None
            ds = parent.create_dataset(name, data=arr, chunks=chunks, compression=comp,
                                       shuffle=bool(comp) and arr.dtype.itemsize > 1)
        ds.attrs["dtype"] = dname
        if dims is not None:
            if len(dims) != arr.ndim:
                raise StoreError(f"dims {list(dims)} for {ds.name} do not match its "
                                 f"{arr.ndim} axes of shape {arr.shape}")
            ds.attrs["dims"] = json.dumps(list(dims))
        return ds

    def _check_same(self, path: str, encoded: dict) -> None:
        obj = self.h5[path]
        for name, (arr, dname) in encoded.items():
            ds = obj if name is None else obj.get(name)
            where = path if name is None else f"{path}/{name}"
            if ds is None or not isinstance(ds, h5py.Dataset):
                raise StoreError(f"entry {path} exists without member {name!r}; asked to require it")
            old = ds.attrs.get("dtype", ds.dtype.name)
            if ds.shape != arr.shape or old != dname:
                raise StoreError(f"entry {where} exists with shape {ds.shape} dtype {old}; "
                                 f"asked for shape {arr.shape} dtype {dname}")

    def _get(self, path: str, as_torch: bool = False):
        """Read an entry: a value for a dataset, {name: value} for a group."""
        obj = self.h5.get(path)
        if obj is None:
            raise StoreError(f"no entry {path} in {self.path}")
        if int(obj.attrs.get("complete", 0)) != 1:
            raise StoreError(f"entry {path} is half-written (a run stopped while writing it); "
                             "rerun the step that writes it")
        if isinstance(obj, h5py.Dataset):
            return read_ds(obj, as_torch)
        return {name: read_ds(ds, as_torch) for name, ds in obj.items()
                if isinstance(ds, h5py.Dataset)}

    def _complete_children(self, path: str) -> list[str]:
        """Names under group `path` whose entries are complete (sorted)."""
        grp = self.h5.get(path)
        if grp is None:
            return []
        return sorted(k for k, v in grp.items() if int(v.attrs.get("complete", 0)) == 1)


def _encode_member(value) -> tuple[np.ndarray, str]:
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value) and value:
        return np.array(value, dtype=object), "str"
    if isinstance(value, str):
        return np.array(value, dtype=object), "str"
    if isinstance(value, np.ndarray) and value.dtype.kind in "OU":
        return value.astype(object), "str"
    return codec.encode(value)


def read_ds(ds: h5py.Dataset, as_torch: bool = False, sel=None):
    """Read a dataset (or a selection of it) back exactly, undoing the bfloat16 convention."""
    dname = ds.attrs.get("dtype", ds.dtype.name)
    if dname == "str":
        raw = ds.asstr()[()] if sel is None else ds.asstr()[sel]
        return raw.tolist() if isinstance(raw, np.ndarray) else raw
    raw = ds[()] if sel is None else ds[sel]
    return codec.decode(np.asarray(raw), dname, as_torch)
