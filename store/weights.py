"""Weight-space entries: deltas per variant, site and step; edit keys; fine-tuning loss curves.

A delta is either dense, ``dW`` with the weight's shape (out, in), or low rank, ``(B, A)`` with
``dW = B @ A`` (peft's lora_B @ lora_A, any scale already folded in). Deltas live at
``/deltas/<variant>/final/<site>`` and, for checkpoints along fine-tuning, at
``/deltas/<variant>/step_<8 digits>/<site>``. Variants are names such as ``M``,
``M_ed/<edit_id>``, ``M_ft/<ft_id>``, ``M_ed_ft/<edit_id>/<ft_id>``.

Edit keys (UCE: C_E, C_P, v_star; ReFACT: k_star, u, v_star) live at
``/edit_keys/<edit_id>/<name>``, or ``/edit_keys/<edit_id>/sites/<site>/<name>`` for keys that
belong to one site. Loss curves live at ``/loss/<ft_id>`` as a group {step, loss, ...}.
"""

from __future__ import annotations

import h5py
import numpy as np

from store import codec
from store.core import get_attrs
from store.errors import StoreError


def step_name(step: int | None) -> str:
    """'final' for None, 'step_00000500' for 500."""
    if step is None:
        return "final"
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise StoreError(f"bad step {step!r}: expected a non-negative int, or None for final")
    return f"step_{int(step):08d}"


def fro_norm(delta) -> float:
    """|dW|_F of a delta: a dense tensor (accumulated in float32), or a pair (B, A), whose norm
    comes from the r x r Gram matrices in float64, |BA|_F^2 = sum((B^T B) * (A A^T)), without
    forming BA. Torch tensors (on any device) or numpy arrays."""
    import torch

    with torch.no_grad():
        if isinstance(delta, (tuple, list)):
            b, a = (torch.as_tensor(x).double() for x in delta)
            return float(torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0.0)))
        return float(torch.linalg.vector_norm(torch.as_tensor(delta).float()))


def _parse_step(name: str) -> int | None:
    return None if name == "final" else int(name[len("step_"):])


class WeightsMixin:
    """Deltas, edit keys and loss curves (mixed into `store.Store`)."""

    # -- deltas -----------------------------------------------------------------------------
    @staticmethod
    def delta_path(variant: str, site: str, step: int | None = None) -> str:
        """The HDF5 path of a delta."""
        return (f"/deltas/{codec.check_variant(variant)}/{step_name(step)}/"
                f"{codec.check_name('site', site)}")

    def _put_delta(self, variant, site, delta, step, attrs, compression, mode) -> bool:
        path = self.delta_path(variant, site, step)
        attrs = {"variant": variant, "site": site, "step": -1 if step is None else int(step),
                 **(attrs or {})}
        if isinstance(delta, (tuple, list)):
            if len(delta) != 2:
                raise StoreError(f"low-rank delta for {site} must be a pair (B, A); got "
                                 f"{len(delta)} factors")
            b, a = delta
            if b.shape[-1] != a.shape[0]:
                raise StoreError(f"low-rank delta for {site}: B {tuple(b.shape)} and A "
                                 f"{tuple(a.shape)} do not multiply (B @ A)")
            attrs["form"] = "lowrank"
            members = {"B": b, "A": a}
        else:
            attrs["form"] = "dense"
            members = {None: delta}
        attrs["fro"] = fro_norm(delta)  # read by delta_norm: the report's heatmap opens no delta
        return self._put(path, members, mode=mode, attrs=attrs, compression=compression)

    def create_delta(self, variant: str, site: str, delta, *, step: int | None = None,
                     attrs: dict | None = None, compression: str | None = None) -> None:
        """Store `delta` (a tensor dW, or a pair (B, A)) for `variant` at `site` and `step`.

        Raises StoreError if a complete entry already exists (never overwrites). Uncompressed by
        default: a fine-tune's fp32 delta barely compresses (lzf with shuffle: 0.90 of its size)
        and lzf wrote it 9.5x slower (3.25 GB: 27.8 s against 2.9 s on the lab's CPU,
        2026-12-05); pass compression="lzf" or "gzip" to trade time for those bytes.
        """
        self._put_delta(variant, site, delta, step, attrs, compression, "create")

    def require_delta(self, variant: str, site: str, delta, *, step: int | None = None,
                      attrs: dict | None = None, compression: str | None = None) -> bool:
        """Store `delta` unless a complete one with the same shape and dtype exists.

        Returns True when written. Raises StoreError when the existing one differs in shape or
        dtype (or form, dense vs low rank).
        """
        return self._put_delta(variant, site, delta, step, attrs, compression, "require")

    def has_delta(self, variant: str, site: str, step: int | None = None) -> bool:
        """Whether a complete delta exists (use it to skip recomputation on resume)."""
        return self.is_complete(self.delta_path(variant, site, step))

    def read_delta(self, variant: str, site: str, step: int | None = None, *,
                   dense: bool = False):
        """The stored delta as torch tensors: dW, or (B, A); ``dense=True`` returns B @ A
        (multiplied in float32 when the factors are stored in 16 bits)."""
        path = self.delta_path(variant, site, step)
        got = self._get(path, as_torch=True)
        if isinstance(got, dict):
            b, a = got["B"], got["A"]
            if not dense:
                return b, a
            if b.dtype.itemsize < 4:
                b, a = b.float(), a.float()
            return b @ a
        return got

    def delta_norm(self, variant: str, site: str, step: int | None = None) -> float:
        """|dW|_F of a stored delta: its `fro` attribute, written with it (since 2026-12-07),
        else computed from the stored values (an older store). Reading the attribute alone took
        the report's heatmap norms from 6.2 s to 1.5 s over a 50-cell grid's 5,711 deltas (2-core
        CPU, 2026-12-07)."""
        path = self.delta_path(variant, site, step)
        if self.is_complete(path):
            return self._stored_norm(self.h5[path].attrs, variant, site, step)
        return fro_norm(self.read_delta(variant, site, step))  # raises: missing or half-written

    def delta_norms(self, variant: str, step: int | None = None) -> dict[str, float]:
        """{site: |dW|_F} of every complete delta of `variant` at `step`, as `delta_norm` gives
        each, in one pass over the variant's group: each entry opened once, where `sites` then
        `delta_norm` per site opened it three times (the report's heatmap reads 5,711 deltas
        over the 50-cell main job)."""
        grp = self.h5.get(f"/deltas/{codec.check_variant(variant)}/{step_name(step)}")
        out = {}
        for site, obj in (grp.items() if grp is not None else ()):
            attrs = obj.attrs
            if int(attrs.get("complete", 0)) != 1:
                continue
            out[site] = self._stored_norm(attrs, variant, site, step)
        return dict(sorted(out.items()))

    def _stored_norm(self, attrs, variant: str, site: str, step: int | None) -> float:
        """The norm of a complete delta whose attributes are `attrs`: its `fro`, else computed."""
        return float(attrs["fro"]) if "fro" in attrs else fro_norm(self.read_delta(variant, site, step))

    def delta_attrs(self, variant: str, site: str, step: int | None = None) -> dict:
        """The attributes stored with a delta (provenance: method, hparams, parent, ...)."""
        self._get(self.delta_path(variant, site, step))  # raises if missing or half-written
        return get_attrs(self.h5[self.delta_path(variant, site, step)])

    def variants(self) -> list[str]:
        """Every variant that has at least one complete delta."""
        out = set()

        def walk(group, prefix: str) -> None:  # variant segments only: no delta is opened but
            for name in group:                 # those read to find one complete per checkpoint
                if name == "final" or name.startswith("step_"):
                    if prefix not in out and any(int(v.attrs.get("complete", 0)) == 1
                                                 for v in group[name].values()):
                        out.add(prefix)
                elif isinstance(child := group[name], h5py.Group):
                    walk(child, f"{prefix}/{name}" if prefix else name)
        if "deltas" in self.h5:
            walk(self.h5["deltas"], "")
        return sorted(out)

    def sites(self, variant: str, step: int | None = None) -> list[str]:
        """Sites with a complete delta for `variant` at `step`."""
        return self._complete_children(f"/deltas/{codec.check_variant(variant)}/{step_name(step)}")

    def steps(self, variant: str) -> list[int]:
        """Checkpoint steps stored for `variant` (ascending; the final delta is not a step)."""
        grp = self.h5.get(f"/deltas/{codec.check_variant(variant)}")
        if grp is None:
            return []
        return sorted(_parse_step(k) for k in grp if k.startswith("step_"))

    # -- edit keys ----------------------------------------------------------------------------
    @staticmethod
    def edit_key_path(edit_id: str, name: str, site: str | None = None) -> str:
        eid = codec.check_name("edit_id", edit_id)
        key = codec.check_name("key name", name)
        if key == "sites":
            raise StoreError("key name 'sites' is reserved; choose another name")
        if site is None:
            return f"/edit_keys/{eid}/{key}"
        return f"/edit_keys/{eid}/sites/{codec.check_name('site', site)}/{key}"

    def create_edit_key(self, edit_id: str, name: str, value, *, site: str | None = None,
                        attrs: dict | None = None) -> None:
        """Store one key array of an edit (C_E, C_P, k_star, u, v_star, ...); never overwrites."""
        self._put(self.edit_key_path(edit_id, name, site), {None: value}, mode="create",
                  attrs=attrs, compression="lzf")

    def require_edit_key(self, edit_id: str, name: str, value, *, site: str | None = None,
                         attrs: dict | None = None) -> bool:
        """Like create_edit_key, but keeps a matching complete entry; returns True if written."""
        return self._put(self.edit_key_path(edit_id, name, site), {None: value},
                         mode="require", attrs=attrs, compression="lzf")

    def read_edit_key(self, edit_id: str, name: str, site: str | None = None):
        """One key as a torch tensor, exactly as stored."""
        return self._get(self.edit_key_path(edit_id, name, site), as_torch=True)

    def edit_keys(self, edit_id: str, site: str | None = None) -> dict:
        """All complete keys of an edit (global ones, or those of one site) as tensors."""
        base = f"/edit_keys/{codec.check_name('edit_id', edit_id)}"
        if site is not None:
            base += f"/sites/{codec.check_name('site', site)}"
        return {k: self._get(f"{base}/{k}", as_torch=True)
                for k in self._complete_children(base)}

    # -- loss curves --------------------------------------------------------------------------
    def create_loss(self, ft_id: str, step, curves: dict, *, attrs: dict | None = None) -> None:
        """Store a fine-tune's curves: `step` (n,) ints and {name: (n,) values}, e.g. {'loss': ...}."""
        steps = np.asarray(step, dtype=np.int64)
        members = {"step": steps}
        for name, values in curves.items():
            codec.check_name("curve name", name)
            arr = np.asarray(values)
            if arr.shape != steps.shape:
                raise StoreError(f"curve {name!r} has shape {arr.shape}; steps have {steps.shape}")
            members[name] = arr
        self._put(f"/loss/{codec.check_name('ft_id', ft_id)}", members, mode="create",
                  attrs=attrs)

    def read_loss(self, ft_id: str) -> dict:
        """{'step': ints, <name>: values} for a fine-tune, as numpy arrays."""
        return self._get(f"/loss/{codec.check_name('ft_id', ft_id)}")
