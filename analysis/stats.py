"""Statistics for the analysis: bootstrap intervals, Spearman correlation with an interval, a
permutation test and false-discovery control. Small wrappers over scipy.stats with one result
type, explicit seeds and the degenerate cases (constant data, n too small) handled.

Offers
    Estimate                       estimate, ci_low, ci_high, p_value, n, method, confidence
    bootstrap_ci(data, statistic)  percentile / basic / BCa interval (scipy.stats.bootstrap)
    spearman(x, y)                 rho, its p-value (scipy.stats.spearmanr) and a bootstrap CI
                                   over pairs (or the Fisher-z interval of Bonett & Wright 2000)
    permutation_test(x, y)         difference of means (or any statistic) between two samples,
                                   independent or paired, with a permutation p-value
    fdr(p_values)                  Benjamini-Hochberg adjusted p-values

Conventions: NaN values are dropped (pairwise for paired data) and the n used is reported;
too few values give NaN estimates, never an exception; randomness comes from
numpy.random.default_rng(seed). analysis/ imports numpy, scipy and store only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

METHODS = ("BCa", "percentile", "basic")


class StatsError(ValueError):
    """A bad argument (unknown method, confidence outside (0, 1), mismatched lengths)."""


@dataclass(frozen=True)
class Estimate:
    """A statistic with its interval and, where a test was run, its p-value.

    Attributes:
        estimate: the statistic on the data.
        ci_low, ci_high: the interval at `confidence` (NaN when it cannot be computed).
        p_value: the test's p-value (NaN where no test applies).
        n: observations used (pairs for paired statistics; the smaller group for two samples).
        method: how the interval was computed ("BCa", "percentile", "basic", "fisher", ...).
        confidence: the interval's confidence level.
    """

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    method: str
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


def _check(method: str, confidence: float, n_resamples: int) -> None:
    if method not in METHODS:
        raise StatsError(f"method={method!r}: accepted are {', '.join(METHODS)}")
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence={confidence}: accepted is 0 < confidence < 1")
    if n_resamples < 1:
        raise StatsError(f"n_resamples={n_resamples}: must be >= 1")


def _finite(x: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise StatsError(f"paired data need equal lengths; got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _interval(data: tuple, statistic: Callable, paired: bool, confidence: float, method: str,
              n_resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """scipy.stats.bootstrap's interval; a constant statistic over resamples gives (est, est)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        with np.errstate(invalid="ignore", divide="ignore"):
            res = stats.bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=n_resamples,
                                  confidence_level=confidence, method=method, rng=rng)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        dist = res.bootstrap_distribution
        if np.all(dist == dist.reshape(-1)[0]):  # degenerate: every resample gives the same value
            v = float(dist.reshape(-1)[0])
            return v, v
    return lo, hi


def bootstrap_ci(data: Sequence[float] | np.ndarray, statistic: Callable = np.mean, *,
                 confidence: float = 0.95, method: str = "BCa", n_resamples: int = 9999,
                 seed: int = 0) -> Estimate:
    """Bootstrap interval of `statistic` over one sample (NaNs dropped).

    statistic(sample, axis=-1) must reduce along `axis` (np.mean, np.median, ...). method:
    "BCa" (bias-corrected and accelerated, Efron 1987; scipy's default), "percentile" or
    "basic". Fewer than 2 values give a NaN interval; a constant sample gives a zero-width one.
    """
    _check(method, confidence, n_resamples)
    a = _finite(data)
    if a.size == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, 0, method, confidence)
    est = float(statistic(a, axis=-1))
    if a.size < 2:
        return Estimate(est, math.nan, math.nan, math.nan, int(a.size), method, confidence)
    lo, hi = _interval((a,), statistic, False, confidence, method, n_resamples, np.random.default_rng(seed))
    return Estimate(est, lo, hi, math.nan, int(a.size), method, confidence)


def _spearman_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along the last axis (Pearson correlation of average ranks); NaN where a
    resample is constant."""
    rx = stats.rankdata(np.moveaxis(x, axis, -1), axis=-1)
    ry = stats.rankdata(np.moveaxis(y, axis, -1), axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=-1) / den, np.nan)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *,
             confidence: float = 0.95, ci: str = "bootstrap", method: str = "BCa",
             n_resamples: int = 9999, seed: int = 0) -> Estimate:
    """Spearman's rank correlation of paired x, y (pairs with a NaN dropped).

    p_value: scipy.stats.spearmanr's two-sided test (t approximation). Interval: "bootstrap"
    resamples pairs (method BCa / percentile / basic; resamples with a constant margin have no
    rho and are dropped from the percentile interval), or "fisher", the Fisher-z interval with
    Bonett & Wright's (2000) variance (1 + rho^2 / 2) / (n - 3). Needs n >= 3 (n >= 4 for fisher).
    """
    _check(method, confidence, n_resamples)
    if ci not in ("bootstrap", "fisher"):
        raise StatsError(f"ci={ci!r}: accepted are 'bootstrap', 'fisher'")
    a, b = _pairs(x, y)
    n = int(a.size)
    label = method if ci == "bootstrap" else "fisher"
    if n < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return Estimate(math.nan, math.nan, math.nan, math.nan, n, label, confidence)
    res = stats.spearmanr(a, b)
    rho, p = float(res.statistic), float(res.pvalue)
    if ci == "fisher":
        if n < 4 or abs(rho) >= 1.0:
            return Estimate(rho, rho if abs(rho) >= 1 else math.nan, rho if abs(rho) >= 1 else math.nan, p, n,
                            label, confidence)
        z, se = math.atanh(rho), math.sqrt((1 + rho**2 / 2) / (n - 3))
        q = stats.norm.ppf(0.5 + confidence / 2)
        return Estimate(rho, math.tanh(z - q * se), math.tanh(z + q * se), p, n, label, confidence)
    rng = np.random.default_rng(seed)
    if method == "percentile":  # direct resampling, so constant resamples can be dropped
        idx = rng.integers(0, n, size=(n_resamples, n))
        dist = _spearman_stat(a[idx], b[idx])
        dist = dist[np.isfinite(dist)]
        alpha = (1 - confidence) / 2
        lo, hi = (float(v) for v in np.quantile(dist, [alpha, 1 - alpha])) if dist.size else (math.nan, math.nan)
    else:
        lo, hi = _interval((a, b), _spearman_stat, True, confidence, method, n_resamples, rng)
    return Estimate(rho, lo, hi, p, n, label, confidence)


def mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """mean(x) - mean(y) along `axis` (the default two-sample statistic)."""
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def permutation_test(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *,
                     statistic: Callable = mean_difference, paired: bool = False,
                     alternative: str = "two-sided", n_resamples: int = 9999, seed: int = 0,
                     confidence: float = 0.95, ci_method: str = "BCa") -> Estimate:
    """Permutation test of statistic(x, y) (default mean(x) - mean(y)) with a bootstrap interval.

    Independent samples: group labels are permuted (scipy permutation_type "independent");
    paired (x_i, y_i): the two values are swapped within pairs ("samples"). alternative:
    "two-sided", "greater" (statistic larger than under the null) or "less". scipy runs the
    exact test when the number of distinct permutations is at most n_resamples. The interval
    bootstraps each sample (pairs, when paired). n is the smaller sample (the pairs when paired);
    fewer than 2 in either sample give NaN.
    """
    _check(ci_method, confidence, n_resamples)
    if alternative not in ("two-sided", "greater", "less"):
        raise StatsError(f"alternative={alternative!r}: accepted are 'two-sided', 'greater', 'less'")
    a, b = _pairs(x, y) if paired else (_finite(x), _finite(y))
    n = int(min(a.size, b.size))
    if n < 2:
        est = float(statistic(a, b)) if a.size and b.size else math.nan
        return Estimate(est, math.nan, math.nan, math.nan, n, ci_method, confidence)
    rng = np.random.default_rng(seed)
    res = stats.permutation_test((a, b), statistic, permutation_type="samples" if paired else "independent",
                                 vectorized=True, n_resamples=n_resamples, alternative=alternative, rng=rng)
    lo, hi = _interval((a, b), statistic, paired, confidence, ci_method, n_resamples, rng)
    return Estimate(float(res.statistic), lo, hi, float(res.pvalue), n, ci_method, confidence)


def fdr(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy.stats.false_discovery_control); NaNs stay NaN
    and do not count towards the number of tests."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    keep = np.isfinite(p)
    if keep.any():
        out[keep] = stats.false_discovery_control(p[keep], method="bh")
    return out
