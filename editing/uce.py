"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024) as one closed-form weight delta.

Offers
    uce_solve(w, c_e, v_star, c_p, lam, erase_scale, preserve_scale) -> dW    one site, the math
    uce_edit(model, concepts, guides, hparams, preserve=(), task="replace") -> EditResult
    uce_erase(model, concepts, hparams, guide="", preserve=())     concepts -> a guide (default "")
    uce_moderate(model, concepts, hparams)                          unsafe concepts -> the empty prompt
    uce_replace(model, concepts, guides, hparams, preserve=())      concept i -> guide i
    Prepared, prepare(model, ...)                                    rows and gains, for debias.py

The edit (paper eq. 7; both official codes build exactly these two matrices):

    W_new = (lam W + s_e sum_E v* c^T + s_p sum_P W c c^T) (lam I + s_e sum_E c c^T + s_p sum_P c c^T)^-1

for every edited site W (d_out, d_in): each cross-attention to_k and to_v (SD1.x, SDXL, organism)
or FLUX's context_embedder and text_embedder.linear_1. With rows stacked as matrices C_E (n_e,
d_in), V* (n_e, d_out), C_P (n_p, d_in) and M = lam I + s_e C_E^T C_E + s_p C_P^T C_P, the
preserve terms cancel from the update (W M = lam W + s_e W C_E^T C_E + s_p W C_P^T C_P):

    dW = W_new - W = s_e (V* - C_E W^T)^T C_E M^-1                                         (*)

so dW is 0 exactly when there is nothing to change (V* = C_E W^T), and M is solved once per key
space (every SD site reads the same rows). We compute (*) in float32 whatever the model's dtype.
v* = W c_guide is the linear map's output without its bias: FLUX's embedders have a bias, which
the layer adds again after the edit (the 2025 code's module(c) would count it twice).

The empty prompt is always in the preserve set (the paper-era code's default set). Token rows
follow UCEHparams.tokens (editing/text.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.delta import WeightDelta
from models.errors import FadelabError
from models.sites import resolve_many

from . import text as T
from .hparams import UCEHparams, hparams_dict
from .result import EditResult

log = logging.getLogger(__name__)


def gain(c_e: Tensor, c_p: Tensor, lam: float, erase_scale: float, preserve_scale: float) -> Tensor:
    """A = C_E M^-1 with M = lam I + s_e C_E^T C_E + s_p C_P^T C_P, in float32: (n_e, d_in).

    M is symmetric positive definite for lam > 0; solved by LU (torch.linalg.solve) on M's device.
    """
    c_e, c_p = c_e.float(), c_p.float()
    d = c_e.shape[1]
    m = lam * torch.eye(d, device=c_e.device) + erase_scale * (c_e.T @ c_e) + preserve_scale * (c_p.T @ c_p)
    return torch.linalg.solve(m, c_e.T).T  # M symmetric: (M^-1 C_E^T)^T = C_E M^-1


def uce_solve(w: Tensor, c_e: Tensor, v_star: Tensor, c_p: Tensor, lam: float = 0.5,
              erase_scale: float = 1.0, preserve_scale: float = 1.0) -> Tensor:
    """dW for one site, float32: s_e (V* - C_E W^T)^T C_E M^-1 (see the module doc, (*)).

    Args:
        w: (d_out, d_in) the site's current weight.
        c_e: (n_e, d_in) edited key rows; v_star: (n_e, d_out) their target outputs.
        c_p: (n_p, d_in) preserved key rows (their targets are W c).
    """
    if c_e.shape[0] != v_star.shape[0]:
        raise FadelabError(f"UCE needs one target per edited row: c_e has {c_e.shape[0]} rows, v_star {v_star.shape[0]}")
    w = w.float()
    a = gain(c_e.to(w.device), c_p.to(w.device), lam, erase_scale, preserve_scale)
    residual = v_star.to(w.device).float() - c_e.to(w.device).float() @ w.T  # (n_e, d_out)
    return erase_scale * residual.T @ a  # (d_out, d_in)


# -- preparing an edit: rows, gains, weights ------------------------------------------------------


@dataclass
class Space:
    """One key space of a prepared edit: rows, the gain A = C_E M^-1, the sites' fp32 weights."""

    name: str
    sites: tuple[str, ...]
    c_e: Tensor                 # (n_e, d_in)
    c_p: Tensor                 # (n_p, d_in)
    c_g: list[Tensor]           # per guide set, (n_e, d_in)
    a: Tensor                   # (n_e, d_in)
    w: dict[str, Tensor]        # site -> (d_out, d_in) float32
    counts: list[int]           # rows taken from each edited prompt, in order


@dataclass
class Prepared:
    """What every UCE task shares: encoded rows per key space and the solve's gains."""

    spaces: list[Space]
    mode: str

    def delta(self, v_star: dict[str, Tensor], h: UCEHparams, provenance: dict) -> WeightDelta:
        """dW per site from targets v_star[site] (n_e, d_out), by (*)."""
        out = {}
        for sp in self.spaces:
            for site in sp.sites:
                residual = v_star[site] - sp.c_e @ sp.w[site].T  # (n_e, d_out)
                out[site] = (h.erase_scale * residual.T @ sp.a).cpu()  # (d_out, d_in)
        return WeightDelta(out, provenance)


def prepare(model, edit_prompts: Sequence[str], guide_sets: Sequence[Sequence[str]],
            preserve: Sequence[str], h: UCEHparams) -> Prepared:
    """Encode edited prompts, guide prompt sets (each aligned with the edited prompts) and the
    preserve set (the empty prompt added first), select rows and solve the gains."""
    preserve = list(dict.fromkeys(["", *preserve]))
    unique = list(dict.fromkeys([*edit_prompts, *(g for gs in guide_sets for g in gs), *preserve]))
    where = {p: i for i, p in enumerate(unique)}
    mode = T.resolve_mode(model, h.tokens)
    spaces_rows = T.encode(model, unique)
    spaces = []
    for ks in T.key_spaces(model, h.sites, h.with_to_k):
        rows = spaces_rows[ks.name]
        edit = T.select(rows, [where[p] for p in edit_prompts])
        guides = [T.select(rows, [where[g] for g in gs]) for gs in guide_sets]
        c_e, c_g = T.edit_rows(edit, guides, mode)
        counts = T.row_counts(edit, guides, mode)
        c_p = T.preserve_rows(T.select(rows, [where[p] for p in preserve]), mode)
        a = gain(c_e, c_p, h.lam, h.erase_scale, h.preserve_scale)
        weights = {s: m.weight.detach().float() for s, m in resolve_many(model, list(ks.sites)).items()}
        spaces.append(Space(ks.name, ks.sites, c_e, c_p, c_g, a, weights, counts))
    return Prepared(spaces, mode)


def keys_of(prep: Prepared, v_star: dict[str, Tensor]) -> dict[str, Tensor]:
    """EditResult keys: c_e, c_p (shared when there is one key space, else per site) and
    v_star per site, float32 on the CPU."""
    keys: dict[str, Tensor] = {}
    shared = len(prep.spaces) == 1
    for sp in prep.spaces:
        for name, value in (("c_e", sp.c_e), ("c_p", sp.c_p)):
            if shared:
                keys[name] = value.cpu()
            else:
                for site in sp.sites:
                    keys[f"{name}:{site}"] = value.cpu()
        for site in sp.sites:
            keys[f"v_star:{site}"] = v_star[site].cpu()
    return keys


# -- the tasks --------------------------------------------------------------------------------------


def uce_edit(model, concepts: Sequence[str], guides: Sequence[str], hparams: UCEHparams | None = None,
             preserve: Sequence[str] = (), task: str = "replace") -> EditResult:
    """Map each concept's rows onto its guide's (v* = W c_guide) while preserving `preserve`.

    Raises FadelabError for an empty or unknown concept, a guide list of another length, a prompt
    too long for the tokenizer, or a preserve prompt that contains an edited concept.
    """
    h = hparams or UCEHparams()
    concepts = T.check_concepts(model, concepts, "concept")
    guides = [guides] if isinstance(guides, str) else list(guides)
    if len(guides) != len(concepts):
        raise FadelabError(f"got {len(concepts)} concepts but {len(guides)} guides: give one guide per concept")
    guides = [g.strip() if isinstance(g, str) else g for g in guides]
    nonempty = [g for g in guides if g]
    if nonempty:
        T.check_concepts(model, nonempty, "guide")
    preserve = [p.strip() for p in preserve]
    T.check_preserve(concepts, [p for p in preserve if p])
    prep = prepare(model, concepts, [guides], preserve, h)
    v_star = {site: sp.c_g[0] @ sp.w[site].T for sp in prep.spaces for site in sp.sites}  # no bias
    request = {"task": task, "concepts": concepts, "guides": guides,
               "preserve": list(dict.fromkeys(["", *preserve]))}
    prov = {"method": "uce", "task": task, "hparams": hparams_dict(h), "parent": str(model.weights)}
    delta = prep.delta(v_star, h, prov)
    info = {"token_rows": prep.mode, "rows_edited": int(prep.spaces[0].c_e.shape[0]),
            "rows_preserved": int(prep.spaces[0].c_p.shape[0]), "n_sites": len(delta.sites())}
    log.info("UCE %s: %d concepts, %d edited and %d preserved rows, %d sites", task, len(concepts),
             info["rows_edited"], info["rows_preserved"], info["n_sites"])
    return EditResult(delta, keys_of(prep, v_star), "uce", request, h, info)


def uce_erase(model, concepts: Sequence[str], hparams: UCEHparams | None = None, *, guide: str = "",
              preserve: Sequence[str] = ()) -> EditResult:
    """Erase concepts: map each onto `guide` ("" = the empty prompt, the paper's "towards uncond";
    "art" is the paper's guide for artists)."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    return uce_edit(model, concepts, [guide] * len(concepts), hparams, preserve, task="erase")


def uce_moderate(model, concepts: Sequence[str], hparams: UCEHparams | None = None) -> EditResult:
    """Moderate unsafe concepts: erase them towards the empty prompt, preserving only the empty
    prompt (the paper-era README's `--concept_type unsafe` run)."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    return uce_edit(model, concepts, [""] * len(concepts), hparams, (), task="moderate")


def uce_replace(model, concepts: Sequence[str], guides: Sequence[str], hparams: UCEHparams | None = None,
                *, preserve: Sequence[str] = ()) -> EditResult:
    """Replace concept i by guide i (e.g. "cat" -> "dog")."""
    return uce_edit(model, concepts, guides, hparams, preserve, task="replace")
