"""Weight deltas: the one currency of edits, fine-tunes and variants.

A variant of a base model is the base weights plus a `WeightDelta`,

    W_site' = W_site + alpha * dW_site        for every site in the delta,

so one loaded base model serves M, M_ed, M_ft and M_ed_ft by applying and removing deltas in
place, and the store keeps deltas, not model copies.

Offers
    WeightDelta      {site: dW} with dW dense (shape of the weight) or low-rank (B, A), dW = B @ A;
                     composition (+), scaling, device/dtype moves, Frobenius norms.
    apply_delta      context manager: add alpha * dW in place, restore the originals bit for bit
                     on exit (also when the body raises). Nests.
    merge_delta      add alpha * dW permanently. With `apply_delta`, the only functions here that
                     mutate a model.
    snapshot         cloned weights at some sites.
    delta_between    dW = after - before, as a WeightDelta.

"model" below is anything `models.sites.resolve` understands: a `models.Model`, a diffusers
pipeline, or a bare `nn.Module` (then a site is a `named_modules()` path).

A site names a module's `.weight` ("unet.xattn.0.to_k", "unet.conv_in"), or one parameter of a
module as "<module site>.<parameter name>" ("unet.conv_in.bias", "text.mlp.3.fc2.bias"), for
updates such as full fine-tuning that also change biases and norm parameters. A name that
resolves to a module always means that module's weight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from models.errors import FadelabError
from models.sites import _raw, resolve_many, site_map, sites_matching

log = logging.getLogger(__name__)

Factors = tuple[Tensor, Tensor]
Update = Union[Tensor, Factors]


def tensors_of(update: Update) -> tuple[Tensor, ...]:
    """The tensors of one update: (dW,) when dense, (B, A) when low-rank."""
    return update if isinstance(update, tuple) else (update,)


def map_update(update: Update, fn) -> Update:
    """`fn` applied to each tensor of `update`, its form (dense or factors) kept."""
    return tuple(fn(t) for t in update) if isinstance(update, tuple) else fn(update)


def _as_update(site: str, update: Any) -> Update:
    """`update` as a tensor or a (B, A) tuple of tensors with B: (m, r), A: (r, n).

    numpy arrays become tensors and a [B, A] list a tuple (the store hands back arrays);
    anything else raises FadelabError naming the site.
    """
    if isinstance(update, np.ndarray):
        update = torch.from_numpy(update)
    if isinstance(update, Tensor):
        return update
    if isinstance(update, (tuple, list)) and len(update) == 2:
        b, a = (torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in update)
        if isinstance(b, Tensor) and isinstance(a, Tensor):
            if b.ndim == 2 and a.ndim == 2 and b.shape[1] == a.shape[0]:
                return (b, a)
            raise FadelabError(
                f"low-rank delta at site {site!r} needs B of shape (m, r) and A of shape (r, n); "
                f"got B {tuple(b.shape)} and A {tuple(a.shape)}"
            )
    raise FadelabError(
        f"delta at site {site!r} must be a tensor or a (B, A) pair of tensors, got {type(update).__name__}"
    )


@dataclass
class WeightDelta:
    """A weight update per site: dense dW, or low-rank factors (B, A) with dW = B @ A.

    Attributes:
        deltas: site name -> dW (a tensor with the weight's shape) or (B, A) with B: (m, r),
            A: (r, n) and dW = B @ A of shape (m, n). Low-rank factors are for 2-D weights
            (linear layers, embeddings). numpy arrays and [B, A] lists are converted on creation.
        provenance: where the delta came from, e.g. {"method": "uce", "hparams": {...},
            "parent": "<id of the base or of the delta it was computed on>"}.
    """

    deltas: dict[str, Update]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for site, update in list(self.deltas.items()):
            if not isinstance(site, str):
                raise FadelabError(f"site names are strings, got {site!r}")
            self.deltas[site] = _as_update(site, update)

    # -- reading -------------------------------------------------------------------------------

    def sites(self) -> list[str]:
        """The sites this delta touches, in insertion order."""
        return list(self.deltas)

    def is_low_rank(self, site: str) -> bool:
        """True when the delta at `site` is stored as factors (B, A)."""
        return isinstance(self._get(site), tuple)

    def dense(self, site: str) -> Tensor:
        """dW at `site` as one tensor: the stored tensor, or B @ A for factors (B, A)."""
        update = self._get(site)
        if isinstance(update, tuple):
            b, a = update
            return b @ a  # (m, r) @ (r, n) -> (m, n)
        return update

    def norm(self, site: str) -> float:
        """Frobenius norm ||dW||_F at `site`, in fp32.

        For factors the dense matrix is never formed:
            ||B A||_F^2 = tr(A^T B^T B A) = sum_ij (B^T B)_ij (A A^T)_ij.
        """
        update = self._get(site)
        if isinstance(update, tuple):
            b, a = (t.float() for t in update)
            gram = (b.T @ b) * (a @ a.T)  # (r, r) elementwise product
            return float(gram.sum().clamp_min(0.0).sqrt())
        return float(torch.linalg.vector_norm(update.float()))

    def _get(self, site: str) -> Update:
        try:
            return self.deltas[site]
        except KeyError:
            raise FadelabError(
                f"this delta has no site {site!r}; it has {', '.join(self.sites()[:6]) or 'none'}"
            ) from None

    # -- algebra -------------------------------------------------------------------------------

    def __add__(self, other: WeightDelta) -> WeightDelta:
        """Composition: (d1 + d2)[s] = dW1[s] + dW2[s] over the union of sites.

        Two low-rank updates at one site stay low-rank by concatenating factors,
            B1 A1 + B2 A2 = [B1 B2] @ [A1; A2]   (rank r1 + r2);
        any other pair is summed densely.
        """
        if not isinstance(other, WeightDelta):
            return NotImplemented
        out: dict[str, Update] = dict(self.deltas)
        for site, update in other.deltas.items():
            if site not in out:
                out[site] = update
            elif isinstance(out[site], tuple) and isinstance(update, tuple):
                (b1, a1), (b2, a2) = out[site], update
                out[site] = (torch.cat([b1, b2], dim=1), torch.cat([a1, a2], dim=0))
            else:
                out[site] = self.dense(site) + other.dense(site)
        return WeightDelta(out, {"method": "sum", "parents": [self.provenance, other.provenance]})

    def __radd__(self, other: Any) -> WeightDelta:
        """Lets `sum(deltas)` start from 0."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: WeightDelta) -> WeightDelta:
        """d1 - d2 = d1 + (-1) * d2."""
        if not isinstance(other, WeightDelta):
            return NotImplemented
        return self + other.scale(-1.0)

    def scale(self, alpha: float) -> WeightDelta:
        """alpha * dW at every site; for factors only B is scaled: alpha B A = (alpha B) A."""
        out: dict[str, Update] = {}
        for site, update in self.deltas.items():
            out[site] = (alpha * update[0], update[1]) if isinstance(update, tuple) else alpha * update
        return WeightDelta(out, {"method": "scale", "alpha": float(alpha), "parent": self.provenance})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WeightDelta:
        """A copy on `device` and/or in `dtype` (None keeps each tensor's own).

        Tensors that change device travel packed: those of one dtype and one source device are
        joined into one flat buffer that crosses in a single copy and is split into views there
        (disjoint slices of one storage). A full organism UNet delta is 494 tensors; copied one
        by one from the CPU each is a blocking transfer, and on a GPU shared by several
        processes each waits its turn."""
        flat: list[tuple[str, int, Tensor]] = []  # (site, factor index or -1, tensor)
        for site, update in self.deltas.items():
            flat += [(site, i if isinstance(update, tuple) else -1, t) for i, t in enumerate(tensors_of(update))]
        # the device as tensors report it ("cuda" -> "cuda:0"), so that equality means the same place
        target = torch.empty(0, device=device).device if device is not None else None
        moved: dict[tuple[str, int], Tensor] = {}
        groups: dict[tuple, list[tuple[str, int, Tensor]]] = {}
        for site, i, t in flat:
            want = dtype or t.dtype
            if target is None or t.device == target:
                moved[(site, i)] = t.to(device=target or t.device, dtype=want)
            else:
                groups.setdefault((t.device, t.dtype, want), []).append((site, i, t))
        for (_, _, want), members in groups.items():
            for (site, i, _), piece in zip(members, pack_to([t for _, _, t in members], target, want)):
                moved[(site, i)] = piece
        out: dict[str, Update] = {}
        for site, update in self.deltas.items():
            out[site] = (moved[(site, 0)], moved[(site, 1)]) if isinstance(update, tuple) else moved[(site, -1)]
        return WeightDelta(out, dict(self.provenance))


def pack_to(tensors: list[Tensor], device: torch.device | str, dtype: torch.dtype) -> list[Tensor]:
    """`tensors` (one source device) on `device` in `dtype` through one flat buffer: one copy
    across devices instead of one per tensor. Returns views of that buffer, shapes kept."""
    if not tensors:
        return []
    buffer = torch.cat([t.reshape(-1).to(dtype) for t in tensors]).to(device=device)
    return [piece.view(t.shape) for t, piece in zip(tensors, buffer.split([t.numel() for t in tensors]))]


# -- applying ----------------------------------------------------------------------------------


def _parameters(model: Any, sites: list[str]) -> dict[str, Tensor]:
    """site -> the tensor it names: the module's `.weight`, or, for "<module site>.<name>" that is
    not itself a module, the module's own parameter `name`.

    The site table is read once; only a site that names nothing pays for the error message (a
    full fine-tune's delta has over a thousand bias and norm sites, and looking each one up as a
    module first cost a failed lookup with its close-match search apiece: 0.9 s per apply on SDXL).
    Raises FadelabError for a site that names neither (the message of the module lookup), or a
    module without a weight.
    """
    table = site_map(model)

    def module_at(site: str) -> nn.Module | None:
        path = table.get(site)
        module = _raw(model, path) if path is not None else None
        return module if module is not None else _raw(model, site)

    out: dict[str, Tensor] = {}
    for site in sites:
        module, name = module_at(site), "weight"
        if module is None:
            owner, _, name = site.rpartition(".")
            module = module_at(owner) if owner else None
            if module is None or name not in dict(module.named_parameters(recurse=False)):
                resolve_many(model, [site])  # raises, naming close sites
        tensor = getattr(module, name, None)
        if not isinstance(tensor, Tensor):
            what = "a weight" if name == "weight" else f"a parameter {name!r}"
            raise FadelabError(f"site {site!r} resolves to a {type(module).__name__} without {what}")
        out[site] = tensor
    return out


def _target_weights(model: Any, delta: WeightDelta) -> list[tuple[str, nn.Parameter]]:
    """Resolve every site of `delta` to its tensor and check shapes, before anything mutates."""
    targets = []
    for site, weight in _parameters(model, delta.sites()).items():
        shape = tuple(delta.dense(site).shape) if not delta.is_low_rank(site) else _factor_shape(delta, site)
        if shape != tuple(weight.shape):
            raise FadelabError(
                f"delta for site {site!r} has shape {shape}; the weight there has shape {tuple(weight.shape)}"
            )
        targets.append((site, weight))
    return targets


def _factor_shape(delta: WeightDelta, site: str) -> tuple[int, ...]:
    b, a = delta.deltas[site]
    return (b.shape[0], a.shape[1])


def _add_in_place(weight: Tensor, dw: Tensor, alpha: float) -> None:
    """W <- cast(float32(W) + alpha * float32(dW)) to W's dtype, under no_grad."""
    with torch.no_grad():
        update = dw.to(device=weight.device, dtype=torch.float32)
        weight.copy_((weight.float() + alpha * update).to(weight.dtype))


@contextmanager
def apply_delta(model: Any, delta: WeightDelta, alpha: float = 1.0) -> Iterator[Any]:
    """Within the block, W_site <- W_site + alpha * dW_site for every site of `delta`.

    Each sum is computed in fp32 and cast to the weight's dtype. On exit, normal or by an
    exception, every touched weight is restored bit for bit from a copy taken on entry (not by
    subtracting, which would not round-trip in low precision). Blocks nest: the inner block
    restores what the outer block had applied.

    Warning: a copy of every touched weight is held for the duration of the block.

    Yields the model. Raises FadelabError, before changing anything, for an unknown site or a
    shape mismatch.
    """
    targets = _target_weights(model, delta)
    originals: list[tuple[Tensor, Tensor]] = []
    try:
        for site, weight in targets:
            originals.append((weight, weight.detach().clone()))
            _add_in_place(weight, delta.dense(site), alpha)
        yield model
    finally:
        with torch.no_grad():
            # reversed: if two sites share one tensor, the first copy taken is the true original
            for weight, original in reversed(originals):
                weight.copy_(original)


def merge_delta(model: Any, delta: WeightDelta, alpha: float = 1.0) -> Any:
    """Permanently W_site <- W_site + alpha * dW_site (fp32 sum, cast back). Returns the model.

    The only mutating function here besides `apply_delta`; there is no undo, so prefer
    `apply_delta` unless the merged model is what you want to keep.
    """
    for site, weight in _target_weights(model, delta):
        _add_in_place(weight, delta.dense(site), alpha)
    return model


def snapshot(model: Any, sites: Iterable[str] | str) -> dict[str, Tensor]:
    """Detached clones of the weights (or named parameters) at `sites` (a list of names, or one
    glob such as "unet.xattn.*.to_k")."""
    names = sites_matching(model, sites) if isinstance(sites, str) else list(sites)
    return {site: tensor.detach().clone() for site, tensor in _parameters(model, names).items()}


def delta_between(
    before: dict[str, Tensor], after: dict[str, Tensor], provenance: dict | None = None
) -> WeightDelta:
    """dW_site = float32(after_site) - float32(before_site), for snapshots taken at the same sites.

    Raises FadelabError when the two snapshots cover different sites or shapes differ.
    """
    if set(before) != set(after):
        only_before = sorted(set(before) - set(after))[:4]
        only_after = sorted(set(after) - set(before))[:4]
        raise FadelabError(
            f"snapshots cover different sites: only before {only_before}, only after {only_after}"
        )
    deltas: dict[str, Update] = {}
    for site, w0 in before.items():
        w1 = after[site]
        if w0.shape != w1.shape:
            raise FadelabError(
                f"site {site!r} has shape {tuple(w0.shape)} before and {tuple(w1.shape)} after"
            )
        deltas[site] = w1.detach().float() - w0.detach().to(device=w1.device).float()
    return WeightDelta(deltas, dict(provenance or {"method": "difference"}))
