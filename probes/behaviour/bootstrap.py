"""Bootstrap confidence intervals for behavioural metrics and for their differences.

What it offers:
    resample_indices(n, n_boot, seed, groups=None) -> int (n_boot, n)   resampled image indices
    bootstrap_ci(stat, *arrays, n_boot, level, seed, groups)  -> (low, high)
    paired_delta_ci(stat_a, a, stat_b, b, ...)                -> (low, high) of stat_b(b) - stat_a(a)

Method: the percentile bootstrap (Efron & Tibshirani 1993, ch. 13). For B replicates
r = 1..B, draw n indices i_1..i_n uniformly with replacement from the n units, compute
theta*_r = stat(x[i_1..i_n]); the (1 - level)/2 and (1 + level)/2 empirical quantiles of
theta*_1..theta*_B are the interval.

Paired: variants evaluated on the same (prompt, seed) list have image k of one variant matched
with image k of the other, so a Delta is bootstrapped with one index draw applied to both:
Delta*_r = stat_b(b[i]) - stat_a(a[i]). That keeps the pairing (the same prompts and noise) and
gives the narrower, correct interval for a within-prompt comparison.

Units: by default the unit is one image. `groups` (one id per image) switches to a cluster
bootstrap: whole groups are drawn with replacement (e.g. all seeds of one prompt together).

Randomness comes from one local `numpy.random.Generator(seed)`; the same seed gives the same
interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from models.errors import FadelabError

Stat = Callable[..., float]


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise FadelabError(f"confidence level {level!r}: give a number in (0, 1), e.g. 0.95")


def resample_indices(n: int, n_boot: int, seed: int = 0,
                     groups: Sequence | np.ndarray | None = None) -> np.ndarray:
    """Bootstrap index draws, int64 (n_boot, m).

    Without groups m = n and each row is n draws from 0..n-1. With groups, each row is the
    concatenation of the members of G groups drawn with replacement from the G distinct ids
    (so m varies; rows are returned as a list-like object array only when sizes differ).
    """
    if n_boot < 1:
        raise FadelabError(f"bootstrap replicates {n_boot!r}: give at least 1 (1000 is usual)")
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.integers(0, n, size=(n_boot, n))
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise FadelabError(f"groups has shape {groups.shape}; give one group id per image ({n})")
    ids, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(ids))]
    rows = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(ids), size=len(ids))
        rows.append(np.concatenate([members[g] for g in pick]))
    if len({len(r) for r in rows}) == 1:
        return np.stack(rows)
    out = np.empty(n_boot, dtype=object)
    out[:] = rows
    return out


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def bootstrap_ci(stat: Stat, *arrays: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, groups=None) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(*arrays), resampling axis 0 of every array together.

    Every array must have the same length n along axis 0 (one row per image). Replicates whose
    statistic is NaN (e.g. a female share with no decided image) are dropped; if all are, the
    interval is (nan, nan).
    """
    _check_level(level)
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0]) if arrays else 0
    if any(len(a) != n for a in arrays):
        raise FadelabError(f"arrays to bootstrap have lengths {[len(a) for a in arrays]}; "
                           "give one row per image in each")
    if n == 0:
        return (float("nan"), float("nan"))
    idx = resample_indices(n, n_boot, seed, groups)
    theta = np.array([stat(*(a[i] for a in arrays)) for i in idx], dtype=np.float64)
    return _percentiles(theta, level)


def paired_delta_ci(stat_a: Stat, a: Sequence[np.ndarray], stat_b: Stat, b: Sequence[np.ndarray],
                    *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    groups=None) -> tuple[float, float]:
    """Interval of Delta = stat_b(*b) - stat_a(*a) with one index draw shared by both sides.

    a and b are tuples of per-image arrays of one common length n; image k of a and image k of b
    come from the same (prompt, seed).
    """
    _check_level(level)
    a = tuple(np.asarray(x) for x in a)
    b = tuple(np.asarray(x) for x in b)
    lengths = {len(x) for x in a + b}
    if len(lengths) != 1:
        raise FadelabError(f"paired arrays have lengths {sorted(lengths)}: a paired Delta needs "
                           "both variants evaluated on the same (prompt, seed) list")
    n = lengths.pop()
    if n == 0:
        return (float("nan"), float("nan"))
    idx = resample_indices(n, n_boot, seed, groups)
    theta = np.array([stat_b(*(x[i] for x in b)) - stat_a(*(x[i] for x in a)) for i in idx],
                     dtype=np.float64)
    return _percentiles(theta, level)
