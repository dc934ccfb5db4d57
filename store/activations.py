"""Activation entries: whole arrays, or streamed in chunks of rows, with named dims and coords.

An activation entry is the group ``/activations/<variant>/<site>`` (``<site>@<tag>`` when a
tag tells two recordings of one site apart) holding:

- ``data``: the array, axis 0 is always ``prompt`` (the streaming axis), e.g. dims
  ``(prompt, token, neuron)`` for text-encoder sites or ``(prompt, timestep, cfg_branch, neuron)``
  (``..., channel, height, width`` when not pooled) for UNet sites; attribute ``dims`` (JSON).
- ``coords/<name>``: 1-D coordinate arrays, each with attribute ``dim`` naming its axis, e.g.
  ``prompt`` (the prompt texts), ``concept`` (dim prompt), ``timestep``, ``cfg_branch``.
- attributes ``variant``, ``site``, ``rows_done`` (rows committed so far) and ``complete``.

Streaming: `open_activations` preallocates ``data`` chunked by whole rows (so no chunk is ever
rewritten) and returns an `ActivationWriter`; each `write(rows)` is one transaction that commits
the rows and ``rows_done`` together, so after a crash a rerun resumes at ``rows_done``.
"""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np

from store import codec
from store.core import _encode_member, _set_attrs, get_attrs, read_ds, visit_items
from store.errors import StoreError

log = logging.getLogger(__name__)


def activation_path(variant: str, site: str, tag: str | None = None) -> str:
    """The HDF5 path of an activation entry."""
    name = codec.check_name("site", site)
    if tag is not None:
        name += "@" + codec.check_name("tag", tag)
    return f"/activations/{codec.check_variant(variant)}/{name}"


def _norm_coords(coords: dict | None, dims: tuple[str, ...], shape: tuple[int, ...]) -> dict:
    """{name: (dim, values)}; a bare value is the coordinate of the dim of the same name."""
    out = {}
    for name, val in (coords or {}).items():
        codec.check_name("coordinate", name)
        dim, values = val if isinstance(val, tuple) and len(val) == 2 and isinstance(val[0], str) \
            and val[0] in dims and not isinstance(val[1], str) else (name, val)
        if dim not in dims:
            raise StoreError(f"coordinate {name!r} is on dim {dim!r}, which is not one of {dims}; "
                             "pass (dim, values) to put it on another dim")
        n = len(values)
        if n != shape[dims.index(dim)]:
            raise StoreError(f"coordinate {name!r} has {n} values; dim {dim!r} has "
                             f"{shape[dims.index(dim)]}")
        out[name] = (dim, list(values) if not hasattr(values, "shape") else values)
    return out


class ActivationWriter:
    """Streams rows into a preallocated activation entry; one commit per `write`.

    Use `rows_done` to skip the rows a previous run already committed, and `complete` to skip the
    whole entry. Call `finish()` after the last row (writing the last row finishes it too).
    """

    def __init__(self, store, path: str):
        self._store = store
        self.path = path
        self._grp = store.h5[path]
        self._ds = self._grp["data"]
        self._dname = self._ds.attrs["dtype"]

    @property
    def rows_done(self) -> int:
        return int(self._grp.attrs["rows_done"])

    @property
    def n_rows(self) -> int:
        return int(self._ds.shape[0])

    @property
    def complete(self) -> bool:
        return int(self._grp.attrs.get("complete", 0)) == 1

    def write(self, rows, start: int | None = None) -> None:
        """Write `rows` (axis 0 = prompt) at `start` (default: `rows_done`) and commit.

        Rows must be written in order: `start` may not leave a gap after `rows_done`.
        """
        arr, dname = codec.encode(rows)
        start = self.rows_done if start is None else int(start)
        if dname != self._dname or arr.shape[1:] != self._ds.shape[1:]:
            raise StoreError(f"rows of shape {arr.shape} {dname} do not fit {self.path} data "
                             f"of shape {self._ds.shape} {self._dname}")
        if start > self.rows_done or start < 0 or start + len(arr) > self.n_rows:
            raise StoreError(f"cannot write rows [{start}, {start + len(arr)}) of {self.path}: "
                             f"rows_done is {self.rows_done} of {self.n_rows}; write in order")
        self._ds[start:start + len(arr)] = arr
        self._grp.attrs["rows_done"] = max(self.rows_done, start + len(arr))
        if self.rows_done == self.n_rows:
            self._grp.attrs["complete"] = 1
        self._store.commit()

    def finish(self) -> None:
        """Mark the entry complete; raises if rows are missing."""
        if self.rows_done != self.n_rows:
            raise StoreError(f"{self.path} has {self.rows_done} of {self.n_rows} rows; "
                             "write the rest before finish()")
        if not self.complete:
            self._grp.attrs["complete"] = 1
            self._store.commit()


class ActivationsMixin:
    """Activation entries (mixed into `store.Store`)."""

    def create_activations(self, variant: str, site: str, array, dims, *, coords=None,
                           tag: str | None = None, attrs: dict | None = None,
                           compression: str | None = None) -> None:
        """Store a whole activation array with named `dims` and `coords`; never overwrites."""
        arr, _ = codec.encode(array)
        dims = tuple(dims)
        coords = _norm_coords(coords, dims, arr.shape)
        path = activation_path(variant, site, tag)
        members = {"data": array}
        member_attrs = {}
        for name, (dim, values) in coords.items():
            members[f"coords/{name}"] = values
            member_attrs[f"coords/{name}"] = {"dim": dim}
        self._put(path, members, mode="create", dims={"data": dims}, compression=compression,
                  member_attrs=member_attrs,
                  attrs={"variant": variant, "site": site, "rows_done": len(arr), **(attrs or {})})

    def _write_coords(self, path: str, coords: dict) -> None:
        grp = self.h5[path].require_group("coords")
        for name, (dim, values) in coords.items():
            ds = self._write_ds(grp, name, *_encode_member(values), None, None)
            ds.attrs["dim"] = dim

    def open_activations(self, variant: str, site: str, shape, dtype, dims, *, coords=None,
                         tag: str | None = None, attrs: dict | None = None,
                         compression: str | None = None) -> ActivationWriter:
        """Create (or resume) a streamed activation entry of `shape` and `dtype` (e.g. 'float16').

        Resuming keeps the committed rows when shape, dtype and dims match; otherwise the old
        half-written entry is deleted and started over. A complete entry is returned as is
        (its writer has ``complete == True``); a complete entry of another shape raises.
        """
        self._writable()
        shape, dims = tuple(int(s) for s in shape), tuple(dims)
        if len(dims) != len(shape):
            raise StoreError(f"dims {dims} do not match shape {shape}")
        sdtype = codec.stored_dtype(str(dtype).replace("torch.", ""))
        dname = str(dtype).replace("torch.", "")
        coords = _norm_coords(coords, dims, shape)
        path = activation_path(variant, site, tag)
        old = self.h5.get(path)
        if old is not None:
            ds = old.get("data")
            same = (ds is not None and ds.shape == shape and ds.attrs.get("dtype") == dname
                    and json.loads(ds.attrs.get("dims", "[]")) == list(dims)
                    and "coords" in old)
            if int(old.attrs.get("complete", 0)) == 1 and not same:
                raise StoreError(f"entry {path} exists complete with shape {ds.shape} "
                                 f"{ds.attrs.get('dtype')}; asked for {shape} {dname}")
            if same:
                if old.attrs.get("rows_done", 0):
                    log.info("resuming %s at row %d of %d", path, old.attrs["rows_done"], shape[0])
                return ActivationWriter(self, path)
            log.warning("redoing half-written entry %s", path)
            del self.h5[path]
        grp = self.h5.create_group(path)
        chunks = codec.chunks_for(shape, sdtype.itemsize)
        ds = grp.create_dataset("data", shape=shape, dtype=sdtype, chunks=chunks,
                                compression=compression if chunks else None)
        ds.attrs["dtype"] = dname
        ds.attrs["dims"] = json.dumps(list(dims))
        _set_attrs(grp, {"variant": variant, "site": site, **(attrs or {})})
        grp.attrs["rows_done"] = 0
        self._write_coords(path, coords)
        self.commit()  # the empty entry and its coords, before any row
        return ActivationWriter(self, path)

    def has_activations(self, variant: str, site: str, tag: str | None = None) -> bool:
        """Whether a complete activation entry exists."""
        return self.is_complete(activation_path(variant, site, tag))

    def read_activations(self, variant: str, site: str, tag: str | None = None, *,
                         rows=slice(None), partial: bool = False) -> tuple[np.ndarray, dict]:
        """(data, info) with data as numpy (bfloat16 widened exactly to float32).

        info holds dims, coords {name: (dim, values)} and attrs. `rows` selects prompts.
        ``partial=True`` reads the committed rows of an unfinished streamed entry.
        """
        path = activation_path(variant, site, tag)
        grp = self.h5.get(path)
        if grp is None:
            raise StoreError(f"no activations at {path} in {self.path}")
        done = int(grp.attrs.get("rows_done", 0))
        if int(grp.attrs.get("complete", 0)) != 1:
            if not partial:
                raise StoreError(f"entry {path} is half-written ({done} of "
                                 f"{grp['data'].shape[0]} rows); rerun, or pass partial=True")
            idx = np.arange(done)[rows]
        else:
            idx = np.arange(grp["data"].shape[0])[rows]
        sel = slice(idx[0], idx[-1] + 1) if len(idx) and np.all(np.diff(idx) == 1) else idx
        ds = grp["data"]
        data = read_ds(ds, sel=sel) if len(idx) else np.zeros((0, *ds.shape[1:]), ds.dtype)
        dims = json.loads(ds.attrs["dims"])
        coords = {}
        for name, c in grp.get("coords", {}).items():
            vals = read_ds(c)
            if c.attrs["dim"] == dims[0]:
                vals = [vals[i] for i in idx] if isinstance(vals, list) else vals[idx]
            coords[name] = (c.attrs["dim"], vals)
        return data, {"dims": dims, "coords": coords, "attrs": get_attrs(grp)}

    def activation_entries(self) -> list[tuple[str, str]]:
        """(variant, site[@tag]) of every activation entry, complete or not."""
        out = []
        if "activations" not in self.h5:
            return out

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "data" in obj and "rows_done" in obj.attrs:
                variant, _, site = name.rpartition("/")
                out.append((variant, site))
        visit_items(self.h5["activations"], visit)
        return sorted(out)
