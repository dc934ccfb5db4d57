"""Weight probes: how a fine-tuning update dW_ft meets an edit dW_ed, site by site.

For a variant pair (M_ed -> M_ed_ft, or M -> M_ft with an edit's delta for comparison), every
site gets numbers that say whether fine-tuning moved the weights along the edit, against it, or
past it; `probe_weights_steps` repeats them along fine-tuning checkpoints (dim `step`).

Offers
    WeightProbeConfig        frozen hparams (k, tolerances, intruder threshold, dtype, device)
    cosine(ed, ft)           <dW_ed, dW_ft> / (|dW_ed| |dW_ft|)
    cancellation(ed, ft)     kappa = -<dW_ft, dW_ed> / |dW_ed|^2
    retention(ed, ft)        1 - kappa
    key_cancellation(ed, ft, K)      kappa on the edit's own keys (what the edit does to them)
    projection_ratio(ft, P, Q)       |P^T dW_ft Q|_F / |dW_ft|_F with baseline sqrt(k/d)
    subspace_angles(x, y, k, side)   principal angles (degrees) of top-k singular subspaces
    effective_rank(S), stable_rank(S)
    intruder_dimensions(W_pre, W_post, k, eps)
    edit_input_keys(keys, site)      the rows that span the edit's input subspace
    probe_weights(base_weights, d_ed, d_ft, keys, config) -> xarray.Dataset (site)
    probe_weights_steps(base_weights, d_ed, {step: d_ft}, keys, config) -> Dataset (step, site)
    probe_weights_final_and_steps(base_weights, d_ed, d_ft, checkpoints, keys, config)
                                     -> (the first, the second or None), the edit's SVDs done once

Sign conventions (stated once, used everywhere): kappa = -<dW_ft, dW_ed>/|dW_ed|^2, so
dW_ft = -dW_ed (fine-tuning undoes the edit exactly) gives kappa = 1 and retention 0;
dW_ft = dW_ed gives kappa = -1 (reinforced, retention 2); dW_ft orthogonal to dW_ed gives
kappa = 0, retention 1. Retention is the coefficient of dW_ed in the least-squares fit of the
combined update dW_ed + dW_ft by a multiple of dW_ed: <dW_ed + dW_ft, dW_ed>/|dW_ed|^2.

Subspaces of an edit (issue 3's keys; rows are vectors):
    UCE (Gandikota et al. 2024, Eq. 3 and its closed form): with M = lam I + s_e C_E^T C_E +
        s_p C_P^T C_P, dW_ed = s_e (V* - W C_E^T) C_E M^-1 when C_E holds the keys as rows. Its
        column space is spanned by the residuals v*_i - W c_i (the edit's output subspace) and
        its row space by M^-1 c_i, not by the c_i themselves once preserve keys take part.
    ReFACT (Arad et al. 2024, Eq. 4 as in ROME): dW_ed = (v* - W k*) u^T / (u^T k*), u = C^-1 k:
        column space span(v* - W k*), row space span(u), key k*.
So every site reports three projections of dW_ft: onto the keys' span (input side, "proj_in"),
onto the row space of dW_ed ("proj_row"), and onto the column space of dW_ed ("proj_out",
equal to the span of the residuals v* - W k in exact arithmetic); plus the two-sided one.
A random k-dimensional subspace of R^d captures E|X Q|_F^2 = (k/d)|X|_F^2, hence the
baselines sqrt(k/d) and sqrt(k_out k_in / (m n)).

Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228, Sec. 3): a singular vector y_j of the fine-tuned weight is an
intruder iff max_i |cos(y_j, x_i)| < eps over all singular vectors x_i of the weight before
fine-tuning. The paper examines the highest-ranking singular vectors and counts intruders over a
range of eps; its public analysis script compares left singular vectors, checks the top k = 10
and defaults to eps = 0.5 (a reproduction used eps = 0.6). Those are the defaults here.

Effective rank (Roy & Vetterli 2007, Eq. 2-3): p_i = sigma_i / sum_j sigma_j,
erank = exp(-sum_i p_i log p_i). Stable rank: |W|_F^2 / |W|_2^2 = sum sigma_i^2 / sigma_1^2.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor
from tqdm.auto import tqdm

from models.delta import tensors_of
from models.errors import FadelabError
from probes import weights_linalg as la
from probes.weights_linalg import Update

log = logging.getLogger(__name__)

#: Names of the keys that span an edit's input subspace, in order of preference.
INPUT_KEY_NAMES = ("c_e", "k_star")

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class WeightProbeConfig:
    """Hyper-parameters of the weight probes.

    Attributes:
        k: singular vectors per side for the principal angles between dW_ed and dW_ft (each side
            truncated to its numerical rank, so a rank-1 ReFACT update gives one angle).
        rank_rtol: singular values below rank_rtol * sigma_1 count as zero (numerical rank of
            deltas and key matrices; 1e-4 sits well above fp32 round-off, ~1e-7 sqrt(n)).
        intruder_k: top singular vectors of the fine-tuned weight checked for intrusion.
        intruder_eps: similarity threshold eps; max |cos| below it makes an intruder.
        intruder_side: "left" (output space, as the reference script) or "right".
        intruders: compute intruder dimensions (two full SVDs per site; needs base weights).
        progress: show a bar over the sites (`fadelab run --quiet` turns it off).
        dtype: "float64" (default; exact references) or "float32" (faster on a GPU).
        device: where the linear algebra runs, e.g. "cuda"; None: where the base weights are (the
            model's device), else where the first delta is, except that a site of at most
            CPU_MAX_NUMEL weights is probed on the CPU (see there).
    """

    k: int = 8
    rank_rtol: float = 1e-4
    intruder_k: int = 10
    intruder_eps: float = 0.5
    intruder_side: str = "left"
    intruders: bool = True
    dtype: str = "float64"
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.k < 1 or self.intruder_k < 1:
            raise FadelabError(f"k={self.k}, intruder_k={self.intruder_k}: both must be >= 1")
        if not 0.0 < self.rank_rtol < 1.0:
            raise FadelabError(f"rank_rtol={self.rank_rtol}: accepted is 0 < rank_rtol < 1")
        if not 0.0 < self.intruder_eps <= 1.0:
            raise FadelabError(f"intruder_eps={self.intruder_eps}: accepted is 0 < eps <= 1")
        if self.intruder_side not in ("left", "right"):
            raise FadelabError(f"intruder_side={self.intruder_side!r}: accepted are 'left', 'right'")
        if self.dtype not in _DTYPES:
            raise FadelabError(f"dtype={self.dtype!r}: accepted are {', '.join(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @classmethod
    def from_file(cls, path: str | Path) -> WeightProbeConfig:
        """Load from a .toml or .json file (a table/object of the fields above)."""
        from models.configfile import config_from, read_config

        return config_from(cls, read_config(path), "weight-probe")


# -- single metrics ------------------------------------------------------------------------------


def cosine(ed: Update, ft: Update) -> float:
    """<dW_ed, dW_ft>_F / (|dW_ed|_F |dW_ft|_F); NaN if either is zero."""
    den = float(la.norm(ed) * la.norm(ft))
    return float(la.inner(ed, ft)) / den if den > 0 else math.nan


def cancellation(ed: Update, ft: Update) -> float:
    """kappa = -<dW_ft, dW_ed>_F / |dW_ed|_F^2 (ft = -ed gives 1, ft = ed gives -1)."""
    den = float(la.inner(ed, ed))
    return -float(la.inner(ft, ed)) / den if den > 0 else math.nan


def retention(ed: Update, ft: Update) -> float:
    """1 - kappa = <dW_ed + dW_ft, dW_ed> / |dW_ed|^2: the share of the edit left along its direction."""
    return 1.0 - cancellation(ed, ft)


def key_cancellation(ed: Update, ft: Update, keys: Tensor) -> tuple[float, float]:
    """(kappa_key, drift_key) on the edit's keys K (k, n), rows = key vectors.

    E = dW_ed K^T and F = dW_ft K^T are how each update moves the outputs of the edited keys;
    kappa_key = -<F, E>_F / |E|_F^2 (same sign convention as `cancellation`), and
    drift_key = |F|_F / |E|_F, how far fine-tuning moves those outputs relative to the edit.
    For ReFACT (one key k*) 1 - kappa_key is the share of v* - W k* still delivered.
    """
    e = la.right(ed, keys.T)  # (m, k)
    f = la.right(ft, keys.T)  # (m, k)
    e2 = float((e * e).sum())
    if e2 <= 0:
        return math.nan, math.nan
    return -float((f * e).sum()) / e2, float(torch.linalg.matrix_norm(f)) / math.sqrt(e2)


def projection_ratio(ft: Update, p: Tensor | None = None, q: Tensor | None = None) -> tuple[float, float]:
    """(ratio, baseline) for |P^T dW_ft Q|_F / |dW_ft|_F.

    P (m, k_out) and Q (n, k_in) have orthonormal columns; None means the identity on that side.
    The baseline is the root of the expected ratio^2 for uniformly random subspaces of the same
    dimensions: sqrt(k_out/m) * sqrt(k_in/n).
    """
    m, n = la.shape(ft)
    tot = float(la.norm(ft))
    if tot <= 0 or (p is not None and p.shape[1] == 0) or (q is not None and q.shape[1] == 0):
        return math.nan, math.nan
    if q is not None:
        x = la.right(ft, q)  # (m, k_in)
        x = x if p is None else p.T @ x  # (k_out, k_in)
    else:
        x = la.left(p, ft) if p is not None else la.dense(ft)
    base = math.sqrt((p.shape[1] / m if p is not None else 1.0) * (q.shape[1] / n if q is not None else 1.0))
    return float(torch.linalg.matrix_norm(x)) / tot, base


def effective_rank(s: Tensor) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of p_i = sigma_i / sum sigma (NaN if all 0)."""
    total = float(s.sum())
    if total <= 0:
        return math.nan
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: Tensor) -> float:
    """|W|_F^2 / |W|_2^2 = sum sigma_i^2 / sigma_1^2 (NaN for a zero matrix)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return math.nan
    return float((s**2).sum() / s[0] ** 2)


def top_subspace(x: Update, k: int, side: str, rtol: float) -> Tensor:
    """Orthonormal (d, k') basis of the top-k left ("left") or right ("right") singular vectors,
    k' = min(k, numerical rank)."""
    u, s, vh = la.thin_svd(x)
    kk = min(k, la.numerical_rank(s, rtol))
    return u[:, :kk] if side == "left" else vh[:kk].T


def subspace_angles(x: Update, y: Update, k: int, side: str = "right", rtol: float = 1e-4) -> np.ndarray:
    """Principal angles in degrees (descending) between the top-k singular subspaces of X and Y on
    `side` ("left": output space, "right": input space); min of the two numerical ranks many."""
    qx, qy = top_subspace(x, k, side, rtol), top_subspace(y, k, side, rtol)
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        return np.zeros(0)
    return np.degrees(la.principal_angles(qx, qy).cpu().numpy())


def intruder_similarity(u_pre: Tensor, u_post: Tensor, k: int) -> Tensor:
    """max_i |cos(y_j, x_i)| for the top-k singular vectors y_j (columns of U_post) against all
    columns x_i of U_pre: (k,). Both have unit columns, so cos is the dot product."""
    return (u_post[:, :k].T @ u_pre).abs().amax(dim=1)


def intruder_dimensions(w_pre: Tensor, w_post: Tensor, k: int = 10, eps: float = 0.5,
                        side: str = "left") -> tuple[int, Tensor]:
    """(count, similarities): singular vectors among the top k of W_post whose largest |cos|
    with every singular vector of W_pre is below eps (Shuttleworth et al. 2024, Sec. 3)."""
    u_pre = _singular_vectors(w_pre, side)
    sim = intruder_similarity(u_pre, _singular_vectors(w_post, side), k)
    return int((sim < eps).sum()), sim


def _singular_vectors(w: Tensor, side: str) -> Tensor:
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u if side == "left" else vh.T


# -- edit subspaces -------------------------------------------------------------------------------


def _as_tensor(x: Any) -> Tensor | None:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return x if isinstance(x, Tensor) else None


def site_keys(keys: Mapping[str, Any] | None, site: str) -> dict[str, Tensor]:
    """The keys that belong to `site`, {name: tensor}. Accepts the three layouts in use:
    shared entries {"c_e": T}; EditResult.keys' flat "<name>:<site>" entries ({"u:text.mlp.3.fc2": T},
    only those of `site` kept); and nested {site: {name: T}} (the store's /edit_keys/<id>/sites/).
    Site-specific entries override shared ones."""
    if not keys:
        return {}
    out: dict[str, Tensor] = {}
    own: dict[str, Tensor] = {}
    for full, v in keys.items():
        t = _as_tensor(v)
        if t is None:
            continue
        name, _, owner = full.partition(":")
        if not owner:
            out[name] = t
        elif owner == site:
            own[name] = t
    per_site = keys.get(site)
    if isinstance(per_site, Mapping):
        own.update({name: t for name, v in per_site.items() if (t := _as_tensor(v)) is not None})
    return {**out, **own}


def edit_input_keys(keys: Mapping[str, Any] | None, site: str, n_in: int) -> Tensor | None:
    """The key rows (k, n_in) spanning the edit's input subspace at `site`: c_e (UCE), else
    k_star (ReFACT); None without keys. Raises FadelabError when their width is not n_in."""
    found = site_keys(keys, site)
    for name in INPUT_KEY_NAMES:
        if name in found:
            k = found[name]
            k = k[None] if k.ndim == 1 else k.reshape(-1, k.shape[-1])
            if k.shape[-1] != n_in:
                raise FadelabError(
                    f"edit key {name!r} at site {site!r} has width {k.shape[-1]}; the weight there takes "
                    f"inputs of width {n_in}"
                )
            return k
    return None


@dataclass
class _EditSite:
    """Everything about one site that does not depend on dW_ft (computed once per site)."""

    ed: Update | None = None
    norm_ed: float = math.nan
    keys: Tensor | None = None  # (k, n) key rows
    q_keys: Tensor | None = None  # (n, k_in) orthonormal basis of the keys' span
    q_row: Tensor | None = None  # (n, r) row space of dW_ed
    p_col: Tensor | None = None  # (m, r) column space of dW_ed
    q_top: Tensor | None = None  # top-k right singular vectors of dW_ed
    p_top: Tensor | None = None  # top-k left singular vectors of dW_ed
    erank_ed: float = math.nan
    srank_ed: float = math.nan
    w_pre: Tensor | None = None  # W_base + dW_ed
    u_pre: Tensor | None = None  # its singular vectors (intruders)
    intruders_ed: float = math.nan


def _edit_site(site: str, w: Tensor | None, ed: Update | None, keys: Mapping | None,
               cfg: WeightProbeConfig, dev, dt, bases: la.BasisCache | None = None) -> _EditSite:
    e = _EditSite(ed=ed)
    if ed is not None:
        u, s, vh = la.thin_svd(ed)
        r = la.numerical_rank(s, cfg.rank_rtol)
        e.norm_ed = float(la.norm(ed))
        e.q_row, e.p_col = vh[:r].T, u[:, :r]
        e.q_top, e.p_top = vh[: min(r, cfg.k)].T, u[:, : min(r, cfg.k)]
        e.erank_ed, e.srank_ed = effective_rank(s), stable_rank(s)
        k = edit_input_keys(keys, site, la.shape(ed)[1])
        if k is not None:
            e.keys = k.to(device=dev, dtype=dt)
            e.q_keys = (bases if bases is not None else la.BasisCache())(k, cfg.rank_rtol, dev, dt)
    if cfg.intruders and w is not None:
        w0 = w.detach().to(device=dev, dtype=dt)
        e.w_pre = w0 if ed is None else w0 + la.dense(ed)
        e.u_pre = _singular_vectors(e.w_pre, cfg.intruder_side)
        if ed is not None:
            u_base = _singular_vectors(w0, cfg.intruder_side)
            sim_ed = intruder_similarity(u_base, e.u_pre, cfg.intruder_k)
            e.intruders_ed = float((sim_ed < cfg.intruder_eps).sum())
    return e


# -- per-site probe -------------------------------------------------------------------------------

#: Scalar metrics per site, in the order of the Dataset's variables.
SCALARS = (
    "norm_ed", "norm_ft", "rel_norm_ft", "cosine", "kappa", "retention", "kappa_key", "retention_key",
    "drift_key", "proj_in", "proj_in_base", "proj_row", "proj_row_base", "proj_out", "proj_out_base",
    "proj_both", "proj_both_base", "angle_in_min", "angle_in_mean", "angle_out_min", "angle_out_mean",
    "erank_ed", "srank_ed", "erank_ft", "srank_ft", "intruders_ed", "intruders_ft", "intruder_sim_min_ft",
)

_DOC = {
    "norm_ed": "|dW_ed|_F", "norm_ft": "|dW_ft|_F", "rel_norm_ft": "|dW_ft|_F / |W_base|_F",
    "cosine": "<dW_ed, dW_ft> / (|dW_ed| |dW_ft|)",
    "kappa": "cancellation -<dW_ft, dW_ed>/|dW_ed|^2 (1: undone, 0: orthogonal, -1: doubled)",
    "retention": "1 - kappa", "kappa_key": "cancellation of the edit's effect on its keys",
    "retention_key": "1 - kappa_key", "drift_key": "|dW_ft K^T| / |dW_ed K^T|",
    "proj_in": "|dW_ft Q_keys| / |dW_ft|", "proj_row": "|dW_ft Q_row(dW_ed)| / |dW_ft|",
    "proj_out": "|P_col(dW_ed)^T dW_ft| / |dW_ft|", "proj_both": "|P_col^T dW_ft Q_keys| / |dW_ft|",
    "angle_in_min": "smallest principal angle (deg) between top-k right singular subspaces",
    "angle_out_min": "smallest principal angle (deg) between top-k left singular subspaces",
    "erank_ed": "effective rank (Roy & Vetterli) of dW_ed", "srank_ed": "stable rank of dW_ed",
    "intruders_ed": "intruder dimensions of W+dW_ed against W",
    "intruders_ft": "intruder dimensions of W+dW_ed+dW_ft against W+dW_ed",
    "intruder_sim_min_ft": "smallest max-|cos| among the top intruder_k singular vectors",
}


def _site_metrics(e: _EditSite, ft: Update | None, w_norm: float, cfg: WeightProbeConfig) -> dict:
    nan = math.nan
    out = dict.fromkeys(SCALARS, nan)
    out.update(norm_ed=e.norm_ed, erank_ed=e.erank_ed, srank_ed=e.srank_ed, intruders_ed=e.intruders_ed)
    angles = {"in": np.full(cfg.k, nan), "out": np.full(cfg.k, nan)}
    isim = np.full(cfg.intruder_k, nan)
    if ft is None:
        return {**out, "angles": angles, "isim": isim}
    u, s, vh = la.thin_svd(ft)
    r = la.numerical_rank(s, cfg.rank_rtol)
    out.update(norm_ft=float(la.norm(ft)), erank_ft=effective_rank(s), srank_ft=stable_rank(s))
    out["rel_norm_ft"] = out["norm_ft"] / w_norm if w_norm > 0 else nan
    if e.ed is not None:
        out["cosine"], out["kappa"] = cosine(e.ed, ft), cancellation(e.ed, ft)
        out["retention"] = 1.0 - out["kappa"]
        if e.keys is not None:
            out["kappa_key"], out["drift_key"] = key_cancellation(e.ed, ft, e.keys)
            out["retention_key"] = 1.0 - out["kappa_key"]
            out["proj_in"], out["proj_in_base"] = projection_ratio(ft, q=e.q_keys)
            out["proj_both"], out["proj_both_base"] = projection_ratio(ft, p=e.p_col, q=e.q_keys)
        out["proj_row"], out["proj_row_base"] = projection_ratio(ft, q=e.q_row)
        out["proj_out"], out["proj_out_base"] = projection_ratio(ft, p=e.p_col)
        kk = min(cfg.k, r)
        for side, q_ed, q_ft in (("in", e.q_top, vh[:kk].T), ("out", e.p_top, u[:, :kk])):
            if q_ed.shape[1] and q_ft.shape[1]:
                a = np.degrees(la.principal_angles(q_ed, q_ft).cpu().numpy())
                angles[side][: a.size] = a
                out[f"angle_{side}_min"], out[f"angle_{side}_mean"] = float(a.min()), float(a.mean())
    if e.u_pre is not None:
        u_post = _singular_vectors(e.w_pre + la.dense(ft), cfg.intruder_side)
        sim = intruder_similarity(e.u_pre, u_post, cfg.intruder_k).cpu().numpy()
        isim[: sim.size] = sim
        out["intruders_ft"] = float((sim < cfg.intruder_eps).sum())
        out["intruder_sim_min_ft"] = float(sim.min())
    return {**out, "angles": angles, "isim": isim}


def _delta_update(delta: Any, site: str, dev, dt) -> Update | None:
    if delta is None or site not in delta.deltas:
        return None
    return la.as_update(delta.deltas[site], dev, dt, what=f"delta at site {site!r}")


def _sites(base_weights, d_ed, deltas_ft: Iterable, sites) -> list[str]:
    if sites is not None:
        return list(sites)
    order: dict[str, None] = {}
    for d in (d_ed, *deltas_ft):
        if d is not None:
            order.update(dict.fromkeys(d.sites()))
    if not order:
        raise FadelabError("no sites to probe: both d_ed and d_ft are empty")
    if base_weights is not None:
        missing = [s for s in order if s not in base_weights]
        if missing:
            raise FadelabError(f"base_weights lack sites {missing[:4]}; pass every site the deltas touch, or None")
    return list(order)


#: With `device` None, a site of at most this many weights (a 256 x 512 matrix) is probed on the
#: CPU whatever device the model is on. The organism's sites (64 x 128 UCE keys and values, its
#: 128 x 512 ReFACT layer) took 2.6 s per site on one H100 shared by the main job's 8 processes,
#: in the cells with dense fine-tuning deltas (60-68 s of weight probes each, 2026-12-06), and
#: 0.03 s on one core of this CPU: every small SVD and scalar read waits its turn on the busy
#: GPU. Real families' sites are all larger (SD1.4's smallest, 320 x 768, has 245,760) and stay
#: on the model's device, where SDXL's are faster than on the CPU.
CPU_MAX_NUMEL = 1 << 17


def _site_device(cfg: WeightProbeConfig, dev: torch.device, w, d_ed, d_fts, site: str) -> torch.device:
    """`dev`, or the CPU for a small site when the config names no device (CPU_MAX_NUMEL)."""
    if cfg.device is not None or dev.type == "cpu":
        return dev
    shape = tuple(w.shape) if w is not None else None
    for d in (d_ed, *d_fts):
        if shape is None and d is not None and site in d.deltas:
            parts = tensors_of(d.deltas[site])  # (m, n) of dW or of B @ A; a 1-D entry stays 1-D
            shape = (*parts[0].shape[:1], *parts[-1].shape[1:])
    if shape is not None and len(shape) == 2 and shape[0] * shape[1] <= CPU_MAX_NUMEL:
        return torch.device("cpu")
    return dev


def _device(cfg: WeightProbeConfig, base_weights, d_ed, d_fts) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    # the model's device first: UCE keeps its delta on the CPU, and an edit read back from a
    # store is there too (SDXL's 140 sites took 2-4 s each on the CPU beside an idle H100)
    for w in (base_weights or {}).values():
        if isinstance(w, torch.Tensor):
            return w.device
    for d in (d_ed, *d_fts):
        if d is not None and d.deltas:
            return tensors_of(next(iter(d.deltas.values())))[0].device
    return torch.device("cpu")


def _dataset(rows: list[dict], sites: list[str], cfg: WeightProbeConfig) -> xr.Dataset:
    data = {m: ("site", np.array([r[m] for r in rows], dtype=np.float64)) for m in SCALARS}
    data["angles_in"] = (("site", "component"), np.stack([r["angles"]["in"] for r in rows]))
    data["angles_out"] = (("site", "component"), np.stack([r["angles"]["out"] for r in rows]))
    data["intruder_sim_ft"] = (("site", "intruder_rank"), np.stack([r["isim"] for r in rows]))
    ds = xr.Dataset(data, coords={"site": sites, "component": np.arange(cfg.k),
                                  "intruder_rank": np.arange(cfg.intruder_k)})
    for name, doc in _DOC.items():
        ds[name].attrs["description"] = doc
    ds.attrs["config"] = json.dumps({k: v for k, v in asdict(cfg).items() if k != "progress"})  # results only
    ds.attrs["sign_convention"] = "kappa = -<dW_ft, dW_ed>/|dW_ed|^2: ft = -ed gives +1, ft = ed gives -1"
    return ds


def probe_weights(base_weights: Mapping[str, Tensor] | None, d_ed: Any, d_ft: Any,
                  keys: Mapping[str, Any] | None = None, config: WeightProbeConfig = WeightProbeConfig(),
                  sites: Iterable[str] | None = None) -> xr.Dataset:
    """Every weight probe at every site of d_ed and d_ft: an xarray Dataset over dim `site`.

    Args:
        base_weights: {site: W} of the model the edit was applied to (models.snapshot), for the
            relative norm and intruder dimensions; None skips both (NaN).
        d_ed: the edit's models.WeightDelta (dense or (B, A) per site), or None.
        d_ft: the fine-tune's WeightDelta, measured from the model it was trained on
            (M_ed_ft - M_ed for the pair M_ed -> M_ed_ft).
        keys: the edit's keys, {name: tensor} for all sites and/or {site: {name: tensor}}:
            UCE c_e (rows = token keys), ReFACT k_star; other names (c_p, v_star, u) are ignored
            here. None: keys-based metrics are NaN.
        config: WeightProbeConfig.
        sites: probe these sites (default: the union of both deltas' sites, in order).

    Returns a Dataset with one float variable per metric in SCALARS (dim site), `angles_in` and
    `angles_out` (site, component; degrees, descending, NaN-padded) and `intruder_sim_ft`
    (site, intruder_rank). Metrics that do not apply at a site (no edit there, no keys) are NaN.
    `ds[list(SCALARS)].to_array("metric")` gives the (metric, site) table.
    """
    return probe_weights_steps(base_weights, d_ed, {-1: d_ft}, keys, config, sites).isel(step=0, drop=True)


def probe_weights_final_and_steps(base_weights: Mapping[str, Tensor] | None, d_ed: Any, d_ft: Any,
                                  checkpoints: Iterable[tuple[int, Any]] | None,
                                  keys: Mapping[str, Any] | None = None,
                                  config: WeightProbeConfig = WeightProbeConfig(),
                                  sites: Iterable[str] | None = None) -> tuple[xr.Dataset, xr.Dataset | None]:
    """(`probe_weights` of the final d_ft, `probe_weights_steps` along `checkpoints` or None when
    there are none) in one pass: the edit's SVDs and subspaces are computed once per site for
    both, not once for each (they were half of the probe time of a full fine-tune's cell)."""
    along = [(int(s), d) for s, d in (checkpoints or [])]
    ds = probe_weights_steps(base_weights, d_ed, [(-1, d_ft), *along], keys, config, sites)
    final = ds.isel(step=0, drop=True)
    return final, (ds.isel(step=slice(1, None)) if along else None)


def probe_weights_steps(base_weights: Mapping[str, Tensor] | None, d_ed: Any,
                        d_ft_steps: Mapping[int, Any] | Iterable[tuple[int, Any]],
                        keys: Mapping[str, Any] | None = None,
                        config: WeightProbeConfig = WeightProbeConfig(),
                        sites: Iterable[str] | None = None) -> xr.Dataset:
    """`probe_weights` along fine-tuning checkpoints: {step: WeightDelta} -> Dataset (step, site).

    Everything that depends only on the edit and the base weights (the edit's SVD and subspaces,
    the SVD of W + dW_ed for intruders) is computed once per site, not once per step.
    """
    steps = list(d_ft_steps.items() if isinstance(d_ft_steps, Mapping) else d_ft_steps)
    if not steps:
        raise FadelabError("d_ft_steps is empty: pass {step: WeightDelta} with at least one checkpoint")
    names = _sites(base_weights, d_ed, [d for _, d in steps], sites)
    dev, dt = _device(config, base_weights, d_ed, [d for _, d in steps]), config.torch_dtype
    model_dev = dev
    rows: list[list[dict]] = [[] for _ in steps]
    bases = la.BasisCache()  # shared keys (UCE's c_e) are factored once, not once per site
    with torch.no_grad():
        for site in tqdm(names, desc="weight probes", unit="site", leave=False, disable=not config.progress):
            w = None if base_weights is None else _as_tensor(base_weights[site])
            dev = _site_device(config, model_dev, w, d_ed, [d for _, d in steps], site)
            ed = _delta_update(d_ed, site, dev, dt)
            if w is not None and ed is not None and tuple(w.shape) != la.shape(ed):
                raise FadelabError(f"site {site!r}: dW_ed has shape {la.shape(ed)}, the base weight {tuple(w.shape)}")
            e = _edit_site(site, w, ed, keys, config, dev, dt, bases)
            w_norm = math.nan if w is None else float(torch.linalg.matrix_norm(w.to(device=dev, dtype=dt)))
            for i, (_, d_ft) in enumerate(steps):
                ft = _delta_update(d_ft, site, dev, dt)
                want = la.shape(ed) if ed is not None else None if w is None else tuple(w.shape)
                if ft is not None and want is not None and la.shape(ft) != want:
                    raise FadelabError(f"site {site!r}: dW_ft has shape {la.shape(ft)}, expected {want}")
                rows[i].append(_site_metrics(e, ft, w_norm, config))
    per_step = [_dataset(r, names, config) for r in rows]
    ds = xr.concat(per_step, dim="step", data_vars="all", coords="minimal", compat="override",
                   join="outer", combine_attrs="override")
    ds = ds.assign_coords(step=[int(s) for s, _ in steps])
    for m in ("norm_ed", "erank_ed", "srank_ed", "intruders_ed"):  # the same at every step
        ds[m] = ds[m].isel(step=0, drop=True)
    log.info("weight probes: %d sites x %d steps", len(names), len(steps))
    return ds
