"""Neuron probes: polysemanticity of units, the neurons an edit writes through, and whether the
edit neurons that fine-tuning features share fade more.

Units are columns of an activation matrix X (n_prompts, n_neurons): text-encoder MLP neurons
(fc1 outputs after the activation = fc2 inputs, ReFACT's key space) or cross-attention K/V
channels, one row per prompt (a token position or a pooled value; probes/neurons_collect.py
records them). Each prompt carries any number of concept labels ("object:apple", "ft", ...).

Offers
    NeuronProbeConfig                 frozen hparams (z threshold and method, L1 probe settings)
    concept_matrix(labels)            multi-label lists -> boolean Y (n_prompts, n_concepts)
    concept_means(X, Y)               mu[j, c]: mean activation of neuron j over prompts with c
    concept_zscores(X, Y, method)     z[j, c] = (mu[j, c] - centre_j) / scale_j
    selectivity_index(mu)             (mu_max - mean of the others) / (mu_max + mean of the others)
    effective_concepts(mu)            exp(entropy) of the positive concept means
    sparse_probes(X, Y, ...)          one L1 logistic probe per concept (scikit-learn)
    polysemanticity(X, labels, cfg)   all of the above as an xarray Dataset (neuron, concept)
    polysemanticity_table(ds)         one row per neuron (pandas DataFrame)
    selective_neurons(ds, concept)    neurons that respond to one concept
    key_channels(directions, top)     input channels carrying most of an edit's key directions
    delta_channels(dW, keys, top)     output channels (K/V channels) an edit moves most
    refact_edit_neurons(keys, top)    largest |components| of u = C^-1 k (ReFACT)
    uce_edit_neurons(keys, top)       text-embedding channels of the UCE keys c_e
    activation_shift(A, B, ref)       how each neuron moves from variant A to B (M_ed -> M_ed_ft)
    shared_fade_test(fade, edit, feature)  the study's hypothesis: shared edit neurons fade more
    graded_fade_test(fade, edit, ft_score) the same without a threshold: Spearman rho of each edit
                                           neuron's fine-tuning response against its fade

Definitions
    z-score: "robust" (default) centres on the median over prompts and scales by 1.4826 MAD
        (Iglewicz & Hoaglin 1993), so a neuron that responds to several concepts does not inflate
        its own scale and hide them; "std" uses the mean and standard deviation over prompts.
        A neuron responds to concept c when z[j, c] >= z_threshold.
    selectivity index (Morcos et al. 2018, "On the importance of single directions for
        generalization", Sec. 2.4), on concept means clipped at 0 (GELU outputs dip below 0):
        SI = (mu_max - mu_rest) / (mu_max + mu_rest), mu_rest the mean of the other concepts;
        1 = fires for one concept only, 0 = the same for all.
    effective number of concepts: p_c = max(mu_c, 0) / sum_c' max(mu_c', 0),
        N_eff = exp(-sum_c p_c log p_c); 1 for a monosemantic neuron, C for a uniform one.
        A neuron that rests above 0 gets a large N_eff from its resting level alone, so
        `n_eff_rel` repeats it on mu_c - centre_j (the z-score's centre): the spread of its
        responses above rest.
    sparse probes: per concept, L1-penalised logistic regression (liblinear, l1_ratio = 1) on
        activations standardised per neuron, fitted on a stratified split; a neuron belongs to
        the probe of every concept whose coefficient on it is non-zero.
    fade of a neuron from A (M_ed) to B (M_ed_ft) with reference R (M, or 0): over prompts,
        retention = <b - r, a - r> / |a - r|^2, fade = 1 - retention, the same convention as the
        weight probes' retention = 1 - kappa.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats
from tqdm.auto import tqdm

from models.errors import FadelabError

log = logging.getLogger(__name__)

_MAD_TO_SD = 1.4826  # 1 / Phi^-1(3/4): MAD of a normal sample -> its standard deviation


@dataclass(frozen=True)
class NeuronProbeConfig:
    """Hyper-parameters of the neuron probes.

    Attributes:
        z_threshold: a neuron responds to a concept when its z-score reaches this.
        z_method: "robust" (median / 1.4826 MAD) or "std" (mean / standard deviation).
        probe_c: inverse L1 strength C of the sparse probes (smaller = sparser).
        probe_max_iter: solver iterations per probe.
        probe_test_size: share of prompts held out to score each probe (balanced accuracy).
        probe_min_prompts: concepts with fewer positive or negative prompts get no probe (NaN).
        probes: fit the sparse probes at all (they dominate the cost).
        seed: the split of prompts for the probes.
        progress: show a bar over the sparse probes (`fadelab run --quiet` turns it off).
    """

    z_threshold: float = 3.0
    z_method: str = "robust"
    probe_c: float = 0.1
    probe_max_iter: int = 2000
    probe_test_size: float = 0.25
    probe_min_prompts: int = 4
    probes: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.z_method not in ("robust", "std"):
            raise FadelabError(f"z_method={self.z_method!r}: accepted are 'robust', 'std'")
        if self.probe_c <= 0:
            raise FadelabError(f"probe_c={self.probe_c}: must be > 0")
        if not 0.0 < self.probe_test_size < 1.0:
            raise FadelabError(f"probe_test_size={self.probe_test_size}: accepted is 0 < x < 1")

    @classmethod
    def from_file(cls, path: str | Path) -> NeuronProbeConfig:
        """Load from a .toml or .json file (a table/object of the fields above)."""
        from models.configfile import config_from, read_config

        return config_from(cls, read_config(path), "neuron-probe")


# -- inputs --------------------------------------------------------------------------------------


def _matrix(x: Any, name: str = "activations") -> np.ndarray:
    """A float64 (n_prompts, n_neurons) array from a tensor, array or DataArray."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(getattr(x, "values", x), dtype=np.float64)
    if x.ndim != 2:
        raise FadelabError(f"{name} must be 2-D (prompt, neuron); got shape {x.shape} (pool tokens first)")
    if not np.isfinite(x).all():
        raise FadelabError(f"{name} contain NaN or inf values")
    return x


def concept_matrix(labels: Sequence[Iterable[str]] | np.ndarray,
                   concepts: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Y (n_prompts, n_concepts) bool and the concept names.

    `labels` is one iterable of concept names per prompt (a prompt may carry several), or a
    boolean array already, in which case `concepts` names its columns. Concepts default to the
    sorted union of the labels.
    """
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        if concepts is None or len(concepts) != labels.shape[1]:
            raise FadelabError(f"a label matrix of shape {labels.shape} needs {labels.shape[1]} concept names")
        return labels.astype(bool), list(concepts)
    sets = [{labels_i} if isinstance(labels_i, str) else set(labels_i) for labels_i in labels]
    names = sorted(set().union(*sets)) if concepts is None else list(concepts)
    if not names:
        raise FadelabError("no concept labels: give each prompt at least one concept name")
    index = {c: i for i, c in enumerate(names)}
    y = np.zeros((len(sets), len(names)), dtype=bool)
    for i, s in enumerate(sets):
        for c in s:
            if c in index:
                y[i, index[c]] = True
    return y, names


# -- per-neuron statistics ------------------------------------------------------------------------


def concept_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """mu (n_neurons, n_concepts): mean activation of each neuron over the prompts of each concept
    (NaN for a concept without prompts)."""
    counts = y.sum(axis=0).astype(np.float64)  # (C,)
    sums = x.T @ y.astype(np.float64)  # (N, P) @ (P, C) -> (N, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _centre_scale(x: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    if method == "std":
        return x.mean(axis=0), x.std(axis=0)
    med = np.median(x, axis=0)
    scale = _MAD_TO_SD * np.median(np.abs(x - med), axis=0)
    return med, np.where(scale > 0, scale, x.std(axis=0))  # MAD = 0 (over half identical): sd


def concept_zscores(x: np.ndarray, y: np.ndarray, method: str = "robust") -> np.ndarray:
    """z (n_neurons, n_concepts) = (mu[j, c] - centre_j) / scale_j (0 for a constant neuron)."""
    centre, scale = _centre_scale(x, method)
    mu = concept_means(x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (mu - centre[:, None]) / scale[:, None]
    return np.where(scale[:, None] > 0, z, 0.0)


def selectivity_index(mu: np.ndarray) -> np.ndarray:
    """(mu_max - mu_rest) / (mu_max + mu_rest) per neuron on concept means clipped at 0, mu_rest
    the mean over the other concepts (Morcos et al. 2018); NaN when all means are <= 0."""
    m = np.clip(np.nan_to_num(mu, nan=0.0), 0.0, None)
    if m.shape[1] < 2:
        return np.full(m.shape[0], np.nan)
    top = m.max(axis=1)
    rest = (m.sum(axis=1) - top) / (m.shape[1] - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top + rest > 0, (top - rest) / (top + rest), np.nan)


def effective_concepts(mu: np.ndarray) -> np.ndarray:
    """exp(H(p)), p_c = max(mu_c, 0) / sum max(mu_c', 0), per neuron; NaN when no mean is positive."""
    m = np.clip(np.nan_to_num(mu, nan=0.0), 0.0, None)
    total = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(total > 0, m / total, 0.0)
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
    return np.where(total[:, 0] > 0, np.exp(h), np.nan)


def sparse_probes(x: np.ndarray, y: np.ndarray, cfg: NeuronProbeConfig = NeuronProbeConfig(),
                  concepts: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """L1 logistic probes, one per concept: (coef (n_concepts, n_neurons), held-out balanced accuracy
    (n_concepts,)). Activations are standardised per neuron (so the penalty treats neurons alike);
    coefficients are in those units. Concepts with too few positives or negatives give NaN."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split

    sd = x.std(axis=0)
    xs = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    coef = np.full((y.shape[1], x.shape[1]), np.nan)
    acc = np.full(y.shape[1], np.nan)
    names = concepts or [str(c) for c in range(y.shape[1])]
    for c in tqdm(range(y.shape[1]), desc="sparse probes", unit="concept", leave=False,
                  disable=not cfg.progress):
        t = y[:, c]
        if min(t.sum(), (~t).sum()) < cfg.probe_min_prompts:
            log.info("no probe for %r: %d positive, %d negative prompts", names[c], t.sum(), (~t).sum())
            continue
        tr, te = train_test_split(np.arange(len(t)), test_size=cfg.probe_test_size, stratify=t,
                                  random_state=cfg.seed)
        clf = LogisticRegression(C=cfg.probe_c, l1_ratio=1.0, solver="liblinear",
                                 max_iter=cfg.probe_max_iter, random_state=cfg.seed)
        clf.fit(xs[tr], t[tr])
        coef[c] = clf.coef_[0]
        acc[c] = balanced_accuracy_score(t[te], clf.predict(xs[te]))
    return coef, acc


def polysemanticity(x: Any, labels: Sequence[Iterable[str]] | np.ndarray,
                    cfg: NeuronProbeConfig = NeuronProbeConfig(), concepts: Sequence[str] | None = None,
                    neurons: Sequence[int] | None = None) -> xr.Dataset:
    """Every polysemanticity measure of every neuron, as a Dataset over (neuron, concept).

    Args:
        x: activations (n_prompts, n_neurons): tensor, array or DataArray.
        labels: concept names per prompt (several allowed), or a boolean (prompt, concept) matrix.
        cfg: NeuronProbeConfig.
        concepts: concept names (default: the sorted union of the labels).
        neurons: coordinate values of the neuron dim (default 0..n-1).

    Variables: mean, z, responds (neuron, concept); n_concepts (number of concepts with
    z >= threshold), top_concept, selectivity, n_eff, n_eff_rel (N_eff of the means above the
    neuron's centre, i.e. of its responses over its resting level) (neuron); probe_coef (concept, neuron),
    probe_accuracy (concept), n_probe_concepts (neuron); n_prompts (concept).
    """
    x = _matrix(x)
    y, names = concept_matrix(labels, concepts)
    if y.shape[0] != x.shape[0]:
        raise FadelabError(f"{x.shape[0]} activation rows but {y.shape[0]} label rows; give one label set per prompt")
    mu = concept_means(x, y)
    z = concept_zscores(x, y, cfg.z_method)
    centre, _ = _centre_scale(x, cfg.z_method)
    responds = np.nan_to_num(z, nan=-np.inf) >= cfg.z_threshold
    top = np.array(names, dtype=object)[np.nanargmax(np.where(np.isnan(mu), -np.inf, mu), axis=1)]
    ds = xr.Dataset(
        {
            "mean": (("neuron", "concept"), mu),
            "z": (("neuron", "concept"), z),
            "responds": (("neuron", "concept"), responds),
            "n_concepts": ("neuron", responds.sum(axis=1)),
            "top_concept": ("neuron", top.astype(str)),
            "selectivity": ("neuron", selectivity_index(mu)),
            "n_eff": ("neuron", effective_concepts(mu)),
            "n_eff_rel": ("neuron", effective_concepts(mu - centre[:, None])),
            "n_prompts": ("concept", y.sum(axis=0)),
        },
        coords={"neuron": np.arange(x.shape[1]) if neurons is None else np.asarray(neurons), "concept": names},
    )
    if cfg.probes:
        coef, acc = sparse_probes(x, y, cfg, names)
        ds["probe_coef"] = (("concept", "neuron"), coef)
        ds["probe_accuracy"] = ("concept", acc)
        ds["n_probe_concepts"] = ("neuron", (np.nan_to_num(coef) != 0).sum(axis=0))
    ds.attrs["config"] = json.dumps({k: v for k, v in asdict(cfg).items() if k != "progress"})  # results only
    return ds


def polysemanticity_table(ds: xr.Dataset, max_concepts: int = 8) -> pd.DataFrame:
    """One row per neuron: top concept, concepts above threshold (highest z first, at most
    `max_concepts` named), their count, selectivity, N_eff and the sparse-probe count."""
    rows = []
    z = ds["z"].values
    names = ds["concept"].values
    for j, neuron in enumerate(ds["neuron"].values):
        hit = np.flatnonzero(ds["responds"].values[j])
        hit = hit[np.argsort(-z[j, hit])]
        row = {
            "neuron": neuron,
            "top_concept": str(ds["top_concept"].values[j]),
            "n_concepts": int(ds["n_concepts"].values[j]),
            "concepts": ", ".join(str(names[i]) for i in hit[:max_concepts]),
            "selectivity": float(ds["selectivity"].values[j]),
            "n_eff": float(ds["n_eff"].values[j]),
            "n_eff_rel": float(ds["n_eff_rel"].values[j]),
        }
        if "probe_coef" in ds:
            used = np.flatnonzero(np.nan_to_num(ds["probe_coef"].values[:, j]) != 0)
            row["n_probe_concepts"] = len(used)
            row["probe_concepts"] = ", ".join(str(names[i]) for i in used[:max_concepts])
        rows.append(row)
    return pd.DataFrame(rows).set_index("neuron")


def selective_neurons(ds: xr.Dataset, concept: str, by: str = "z") -> np.ndarray:
    """Neuron coordinates that respond to `concept`: by "z" (z >= threshold), "probe" (non-zero
    sparse-probe coefficient) or "top" (their largest concept mean is this concept)."""
    if concept not in ds["concept"].values:
        raise FadelabError(f"unknown concept {concept!r}; known are {list(ds['concept'].values)[:10]} ...")
    if by == "z":
        mask = ds["responds"].sel(concept=concept).values
    elif by == "probe":
        if "probe_coef" not in ds:
            raise FadelabError("by='probe' needs sparse probes; run polysemanticity with probes=True")
        mask = np.nan_to_num(ds["probe_coef"].sel(concept=concept).values) != 0
    elif by == "top":
        mask = ds["top_concept"].values == concept
    else:
        raise FadelabError(f"by={by!r}: accepted are 'z', 'probe', 'top'")
    return ds["neuron"].values[mask]


# -- edit neurons ---------------------------------------------------------------------------------


def _top(scores: np.ndarray, top: int | None, mass: float | None) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    if mass is not None:
        if not 0 < mass <= 1:
            raise FadelabError(f"mass={mass}: accepted is 0 < mass <= 1")
        cum = np.cumsum(scores[order]) / scores.sum()
        top = int(np.searchsorted(cum, mass - 1e-12) + 1)
    top = len(scores) if top is None else top
    if top < 1:
        raise FadelabError(f"top={top}: must be >= 1")
    return order[:top], scores[order[:top]]


def key_channels(directions: Any, top: int | None = 32, mass: float | None = None,
                 weighting: str = "energy") -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the input channels that carry most of the edit's key directions.

    directions: (k, n) rows or one (n,) vector. weighting "energy": s_j = sum_i d_ij^2 / sum d^2
    (the weight of channel j in the keys; for one vector, u_j^2 / |u|^2, i.e. the order of
    |u_j|); "leverage": s_j = |row j of Q|^2 / rank for Q an orthonormal basis of the keys' span
    (basis-free; no single key or outlier channel dominates). Scores sum to 1 over all channels.
    Pick `top` channels, or the fewest whose scores reach `mass`.
    """
    d = _matrix(np.atleast_2d(_np(directions)), "directions")
    if weighting == "energy":
        s = (d**2).sum(axis=0)
    elif weighting == "leverage":
        u, sv, vh = np.linalg.svd(d, full_matrices=False)
        r = int((sv > 1e-10 * sv[0]).sum()) if sv.size and sv[0] > 0 else 0
        s = (vh[:r] ** 2).sum(axis=0)
    else:
        raise FadelabError(f"weighting={weighting!r}: accepted are 'energy', 'leverage'")
    if s.sum() <= 0:
        raise FadelabError("the key directions are all zero")
    return _top(s / s.sum(), top, mass)


def delta_channels(dw: Any, keys: Any = None, top: int | None = 32,
                   mass: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the output channels of a weight update (e.g. the K/V channels of a UCE
    edit at unet.xattn.i.to_k): s_j = |row j of dW K^T|^2, how much channel j's response to the
    edit keys K (rows) changed, or |row j of dW|^2 without keys; normalised to sum 1.

    dw: (m, n) tensor/array or (B, A) factors (never multiplied out)."""
    if isinstance(dw, (tuple, list)):
        b, a = _matrix(dw[0], "B"), _matrix(dw[1], "A")
        if keys is None:
            s = ((b @ (a @ a.T)) * b).sum(axis=1)  # diag(B A A^T B^T)
        else:
            s = ((b @ (a @ _matrix(np.atleast_2d(_np(keys)), "keys").T)) ** 2).sum(axis=1)
    else:
        w = _matrix(dw, "dW")
        s = (w**2).sum(axis=1) if keys is None else ((w @ _matrix(np.atleast_2d(_np(keys)), "keys").T) ** 2).sum(axis=1)
    if s.sum() <= 0:
        raise FadelabError("the update does not move any channel (it is zero, or zero on the keys)")
    return _top(s / s.sum(), top, mass)


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _key(keys: Mapping[str, Any], name: str) -> Any | None:
    """keys[name], or the one "<name>:<site>" entry (EditResult.keys names per-site keys so)."""
    if name in keys:
        return keys[name]
    found = [v for k, v in keys.items() if k.partition(":")[0] == name and k.partition(":")[2]]
    if len(found) > 1:
        raise FadelabError(f"keys hold {len(found)} per-site {name!r} entries; pass EditResult.keys_for(site)")
    return found[0] if found else None


def refact_edit_neurons(keys: Mapping[str, Any], top: int | None = 32,
                        mass: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ReFACT's edit neurons: the fc2-input neurons with the largest |components| of
    u = C^-1 k (Arad et al. 2024, Eq. 4; the direction along which W changes). Uses keys["u"],
    else solves keys["C"] u = keys["k_star"] ("<name>:<site>" entries accepted)."""
    u, c, k_star = _key(keys, "u"), _key(keys, "C"), _key(keys, "k_star")
    if u is not None:
        u = _np(u).astype(np.float64).reshape(-1)
    elif c is not None and k_star is not None:
        u = np.linalg.solve(_np(c).astype(np.float64), _np(k_star).astype(np.float64).reshape(-1))
    else:
        raise FadelabError(f"ReFACT keys need 'u', or 'C' and 'k_star'; got {sorted(keys)}")
    return key_channels(u, top, mass, weighting="energy")


def uce_edit_neurons(keys: Mapping[str, Any], top: int | None = 32, mass: float | None = None,
                     weighting: str = "energy") -> tuple[np.ndarray, np.ndarray]:
    """UCE's edit channels on the input side: the text-embedding channels (inputs of every edited
    to_k / to_v) with the largest weight in the erased/edited keys c_e (rows). For the K/V
    output channels use `delta_channels(dW_ed, keys['c_e'])` per site."""
    c_e = _key(keys, "c_e")
    if c_e is None:
        raise FadelabError(f"UCE keys need 'c_e'; got {sorted(keys)}")
    return key_channels(c_e, top, mass, weighting=weighting)


# -- movement between variants --------------------------------------------------------------------


def activation_shift(a: Any, b: Any, ref: Any = None, neurons: Sequence[int] | None = None) -> xr.Dataset:
    """How each neuron moves from variant A (e.g. M_ed) to B (M_ed_ft) over the same prompts.

    a, b (and ref, e.g. M's activations; default 0): (n_prompts, n_neurons). Per neuron:
    mean_a, mean_b, shift = mean_b - mean_a, cohen_d = shift / pooled sd, rel_change =
    |b - a| / |a - r|, retention = <b - r, a - r> / |a - r|^2 and fade = 1 - retention (NaN for
    a neuron with a = r on every prompt). With ref = M, retention is the share of the edit-induced
    activation change that survives fine-tuning.
    """
    xa, xb = _matrix(a, "a"), _matrix(b, "b")
    if xa.shape != xb.shape:
        raise FadelabError(f"a and b must hold the same prompts and neurons: {xa.shape} vs {xb.shape}")
    xr_ = np.zeros_like(xa) if ref is None else _matrix(ref, "ref")
    if xr_.shape != xa.shape:
        raise FadelabError(f"ref has shape {xr_.shape}; a and b have {xa.shape}")
    da, db = xa - xr_, xb - xr_
    den = (da * da).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ret = np.where(den > 0, (db * da).sum(axis=0) / den, np.nan)
        rel = np.where(den > 0, np.linalg.norm(xb - xa, axis=0) / np.sqrt(den), np.nan)
        pooled = np.sqrt((xa.var(axis=0, ddof=1) + xb.var(axis=0, ddof=1)) / 2) if len(xa) > 1 \
            else np.full(xa.shape[1], np.nan)
        shift = xb.mean(axis=0) - xa.mean(axis=0)
        d = np.where(pooled > 0, shift / pooled, np.nan)
    return xr.Dataset(
        {"mean_a": ("neuron", xa.mean(axis=0)), "mean_b": ("neuron", xb.mean(axis=0)), "shift": ("neuron", shift),
         "cohen_d": ("neuron", d), "rel_change": ("neuron", rel), "retention": ("neuron", ret),
         "fade": ("neuron", 1.0 - ret)},
        coords={"neuron": np.arange(xa.shape[1]) if neurons is None else np.asarray(neurons)},
    )


@dataclass(frozen=True)
class FadeTest:
    """Result of `shared_fade_test`: effect = mean fade of shared minus not-shared edit neurons."""

    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    cohen_d: float
    n_shared: int
    n_other: int
    mean_shared: float
    mean_other: float
    alternative: str
    confidence: float
    n_resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _edit_fades(fade: Any, edit_neurons: Iterable[int], neurons: Sequence[int] | None,
                alternative: str) -> tuple[np.ndarray, dict, list]:
    """What both fade tests start from: the fade as a flat float64 array, {neuron coordinate:
    row}, and the edit neurons as coordinates; `neurons` defaults to the DataArray's coordinates
    or 0..n-1. Raises on an unknown alternative or an edit neuron that fade lacks."""
    if alternative not in ("greater", "less", "two-sided"):
        raise FadelabError(f"alternative={alternative!r}: accepted are 'greater', 'less', 'two-sided'")
    if neurons is None and hasattr(fade, "coords") and "neuron" in getattr(fade, "coords", {}):
        neurons = fade["neuron"].values
    f = np.asarray(getattr(fade, "values", fade), dtype=np.float64).reshape(-1)
    coords = np.arange(len(f)) if neurons is None else np.asarray(neurons)
    where = {c: i for i, c in enumerate(coords.tolist())}
    edit = [int(n) if isinstance(n, np.integer) else n for n in edit_neurons]
    unknown = [n for n in edit if n not in where]
    if unknown:
        raise FadelabError(f"edit neurons {unknown[:5]} are not among the {len(f)} neurons of fade")
    return f, where, edit


def shared_fade_test(fade: Any, edit_neurons: Iterable[int], feature_neurons: Iterable[int],
                     neurons: Sequence[int] | None = None, *, alternative: str = "greater",
                     n_resamples: int = 9999, confidence: float = 0.95, ci_method: str = "BCa",
                     seed: int = 0) -> FadeTest:
    """The study's hypothesis: edit neurons shared with fine-tuning features fade more.

    fade: per-neuron fade (array over all neurons, or the `fade` DataArray of
    `activation_shift`); edit_neurons / feature_neurons: neuron coordinates (e.g. from
    `refact_edit_neurons` and `selective_neurons(ds, "ft")`); neurons: the coordinates of `fade`
    (default 0..n-1, or the DataArray's). Edit neurons split into shared (also feature neurons)
    and other. Effect = mean(fade | shared) - mean(fade | other); p-value of a permutation test
    of the group labels (scipy.stats.permutation_test, one-sided "greater" by default); CI by
    bootstrap of each group independently (scipy.stats.bootstrap, BCa by default); Cohen's d
    with the pooled sd. With fewer than 2 neurons in a group, everything but the counts is NaN.
    """
    f, where, edit = _edit_fades(fade, edit_neurons, neurons, alternative)
    feature = set(np.asarray(list(feature_neurons)).tolist())
    shared = np.array([f[where[n]] for n in edit if n in feature])
    other = np.array([f[where[n]] for n in edit if n not in feature])
    shared, other = shared[np.isfinite(shared)], other[np.isfinite(other)]
    nan = math.nan
    if len(shared) < 2 or len(other) < 2:
        # info, not a warning: the GPU main job logged it in all 36 of its cells; the report's
        # header counts the cells where the test could run, beside the graded test
        log.info("shared_fade_test: %d shared and %d other edit neurons; need >= 2 each", len(shared), len(other))
        return FadeTest(nan, nan, nan, nan, nan, len(shared), len(other),
                        float(shared.mean()) if len(shared) else nan, float(other.mean()) if len(other) else nan,
                        alternative, confidence, n_resamples)

    def diff(s, o, axis=-1):
        return np.mean(s, axis=axis) - np.mean(o, axis=axis)

    rng = np.random.default_rng(seed)
    perm = stats.permutation_test((shared, other), diff, permutation_type="independent", vectorized=True,
                                  n_resamples=n_resamples, alternative=alternative, rng=rng)
    boot = stats.bootstrap((shared, other), diff, vectorized=True, paired=False, n_resamples=n_resamples,
                           confidence_level=confidence, method=ci_method, rng=rng)
    pooled = math.sqrt(((len(shared) - 1) * shared.var(ddof=1) + (len(other) - 1) * other.var(ddof=1))
                       / (len(shared) + len(other) - 2))
    effect = float(diff(shared, other))
    return FadeTest(effect, float(boot.confidence_interval.low), float(boot.confidence_interval.high),
                    float(perm.pvalue), effect / pooled if pooled > 0 else nan, len(shared), len(other),
                    float(shared.mean()), float(other.mean()), alternative, confidence, n_resamples)


@dataclass(frozen=True)
class GradedFadeTest:
    """Result of `graded_fade_test`: Spearman rho of each edit neuron's fine-tuning-feature score
    against its fade, with a permutation p-value."""

    rho: float
    p_value: float
    n: int
    alternative: str
    n_resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def graded_fade_test(fade: Any, edit_neurons: Iterable[int], ft_score: Any,
                     neurons: Sequence[int] | None = None, *, alternative: str = "greater",
                     n_resamples: int = 9999, seed: int = 0) -> GradedFadeTest:
    """The study's hypothesis without a threshold: over the edit neurons, do those that respond
    more to the fine-tuning data fade more? Spearman's rho of `ft_score` (per neuron, e.g. the z
    of concept "ft" from `polysemanticity`) against `fade`, and the p-value of a permutation test
    of the pairing (scipy.stats.permutation_test, one-sided "greater" by default).

    `shared_fade_test` splits the edit neurons at a z threshold, and on the organism's main job
    (2026-12-07, one H100) every one of its 36 edit x fine-tune cells had fewer than 2 edit neurons
    above it (29 had none), so the split test had nothing to compare; the graded test uses every edit neuron.
    With fewer than 3 edit neurons where both values are finite, or no spread in either, rho and
    p are NaN."""
    f, where, edit = _edit_fades(fade, edit_neurons, neurons, alternative)
    score = np.asarray(getattr(ft_score, "values", ft_score), dtype=np.float64).reshape(-1)
    if score.shape != f.shape:
        raise FadelabError(f"ft_score has {score.size} values and fade {f.size}; give one per neuron")
    rows = np.array([where[n] for n in edit], dtype=int)
    x, y = score[rows], f[rows]
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    nan = math.nan
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return GradedFadeTest(nan, nan, int(len(x)), alternative, n_resamples)
    rx, ry = stats.rankdata(x), stats.rankdata(y)

    def rho(a, axis=-1):  # Pearson of the ranks, the permuted copies of ry along axis
        a = a - a.mean(axis=axis, keepdims=True)
        b = rx - rx.mean()
        return (a * b).sum(axis=axis) / np.sqrt((a * a).sum(axis=axis) * (b * b).sum())

    perm = stats.permutation_test((ry,), rho, permutation_type="pairings", vectorized=True,
                                  n_resamples=n_resamples, alternative=alternative,
                                  rng=np.random.default_rng(seed))
    return GradedFadeTest(float(rho(ry)), float(perm.pvalue), int(len(x)), alternative, n_resamples)
