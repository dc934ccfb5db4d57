"""Causal probes: remove the place where fine-tuning meets the edit, and see if the fade stops.

The weight probes (probes/weights.py) say how much of dW_ft lies in the edit's subspace; these
functions build the counterfactual models that test whether that part is what undoes the edit.

Offers
    edit_basis(d_ed, keys, site, space)   orthonormal basis Q (n_in, k) of the edit's input
                                          subspace at a site: the span of its keys (UCE c_e,
                                          ReFACT k*) or the row space of dW_ed
    project_out(d_ft, d_ed, keys, space)  dW_ft' = dW_ft (I - Q Q^T) at every edited site: the
                                          fine-tune with its action on the edit's inputs removed
    gradient_projector(d_ed, keys, space) {site: Q} for fine-tuning with gradients projected
                                          orthogonal to the edit subspace, G <- G (I - Q Q^T)
    project_grad(grad, q)                 that projection for one weight's gradient

Why the input side: the edit is defined by what the edited weights do to its keys, W_ed c = v*
(UCE, ReFACT). If dW_ft Q = 0 for a basis Q of span(c), then (W_ed + dW_ft') c = W_ed c exactly
at that site, so any fade that remains comes from other sites (e.g. the text encoder moving the
keys themselves, or UNet layers after cross-attention). `space="row"` uses the row space of
dW_ed instead (for UCE: span(M^-1 c_i), the directions the closed form actually wrote).

The orchestration (re-measure Delta with the projected fine-tune; order swap E(F(M)) against
F(E(M)); re-editing after fine-tuning and its cost) needs the editing and fine-tuning rooms and
lives in fadelab/plan.py; this module is pure linear algebra on deltas and keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from models.delta import WeightDelta
from models.errors import FadelabError
from probes.weights import edit_input_keys
from probes.weights_linalg import BasisCache, row_basis

log = logging.getLogger(__name__)

SPACES = ("keys", "row")


def edit_basis(d_ed: WeightDelta, keys: Mapping[str, Any] | None, site: str, space: str = "keys",
               rtol: float = 1e-6, bases: BasisCache | None = None) -> Tensor:
    """Q (n_in, k), float64, orthonormal columns spanning the edit's input subspace at `site`.

    space "keys": span of the edit's key rows there (UCE c_e, ReFACT k*; probes.weights reads
    every key layout); falls back to the row space of dW_ed when the edit stored no keys for the
    site. space "row": the row space of dW_ed. Raises FadelabError for another space or a site
    the edit did not touch.
    """
    if space not in SPACES:
        raise FadelabError(f"space {space!r}: accepted are {', '.join(SPACES)}")
    if site not in d_ed.deltas:
        raise FadelabError(f"site {site!r} is not part of the edit (its sites: {d_ed.sites()[:4]} ...)")
    dw = d_ed.dense(site)  # float64 only where its row space is the basis: keys need its width alone
    if dw.ndim != 2:
        raise FadelabError(f"site {site!r}: the edit subspace needs a 2-D weight, got shape {tuple(dw.shape)}")
    rows = edit_input_keys(keys, site, dw.shape[1]) if space == "keys" else None
    if rows is None:
        return row_basis(dw.double(), rtol).contiguous()
    return (bases if bases is not None else BasisCache())(rows, rtol, dtype=torch.float64).contiguous()


def project_grad(grad: Tensor, q: Tensor) -> Tensor:
    """G (I - Q Q^T) for a gradient G (n_out, n_in) and Q (n_in, k), in G's dtype."""
    qq = q.to(device=grad.device, dtype=torch.float32)
    g = grad.float()
    return (g - (g @ qq) @ qq.T).to(grad.dtype)


def project_out(d_ft: WeightDelta, d_ed: WeightDelta, keys: Mapping[str, Any] | None = None,
                space: str = "keys") -> WeightDelta:
    """dW_ft' with dW_ft' Q = 0 at every site both deltas touch; other sites unchanged.

    A low-rank (B, A) update stays low-rank: (B, A (I - Q Q^T)). Provenance records the
    projection. The result is float32.
    """
    out: dict[str, Any] = {}
    bases = BasisCache()
    for site in d_ft.sites():
        update = d_ft.deltas[site]
        if site not in d_ed.deltas:
            out[site] = update
            continue
        q = edit_basis(d_ed, keys, site, space, bases=bases)
        if isinstance(update, tuple):
            b, a = update
            out[site] = (b.float(), project_grad(a.float(), q))
        else:
            out[site] = project_grad(update.float(), q)
    prov = {**d_ft.provenance, "projected_out": {"space": space, "edit": d_ed.provenance.get("method")}}
    return WeightDelta(out, prov)


def gradient_projector(d_ed: WeightDelta, keys: Mapping[str, Any] | None = None,
                       space: str = "keys") -> dict[str, Tensor]:
    """{site: Q} for every 2-D site of the edit; a fine-tuning loop applies
    `project_grad(weight.grad, Q)` after backward, so the update never enters the subspace."""
    bases = BasisCache()
    return {site: edit_basis(d_ed, keys, site, space, bases=bases) for site in d_ed.sites()
            if d_ed.dense(site).ndim == 2}
