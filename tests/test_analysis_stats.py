"""analysis.stats against hand references: exact permutation p-values by enumeration, Spearman
with ties by hand, Benjamini-Hochberg by hand, Fisher-z intervals by formula, and the coverage
of bootstrap intervals on simulated data."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from analysis import stats


def test_permutation_test_exact_p_by_enumeration():
    x, y = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0, 2.5])
    res = stats.permutation_test(x, y, alternative="greater")
    pooled = np.concatenate([x, y])
    obs = x.mean() - y.mean()
    diffs = []
    for idx in itertools.combinations(range(7), 3):
        m = np.zeros(7, bool)
        m[list(idx)] = True
        diffs.append(pooled[m].mean() - pooled[~m].mean())
    diffs = np.array(diffs)
    assert res.estimate == pytest.approx(obs)
    assert res.p_value == pytest.approx((diffs >= obs - 1e-12).mean())  # 1/35
    two = stats.permutation_test(x, y, alternative="two-sided")
    assert two.p_value == pytest.approx(2 / 35)  # the null distribution is symmetric here
    # paired: the 2^4 sign flips of the differences
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 1.0, 2.5, 3.0])
    d = a - b
    flips = [np.mean(d * np.array(s)) for s in itertools.product([1, -1], repeat=4)]
    res = stats.permutation_test(a, b, paired=True, alternative="greater")
    assert res.p_value == pytest.approx(np.mean(np.array(flips) >= d.mean() - 1e-12))
    assert res.n == 4


def test_spearman_with_ties_by_hand_and_monotone_invariance():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 9.0])
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 4, 3, 5])  # average ranks
    ref = np.corrcoef(rx, ry)[0, 1]
    res = stats.spearman(x, y, n_resamples=999)
    assert res.estimate == pytest.approx(ref, rel=1e-12)
    assert res.p_value == pytest.approx(sps.spearmanr(x, y).pvalue)
    assert stats.spearman(np.exp(x), y ** 3, n_resamples=999).estimate == pytest.approx(ref, rel=1e-12)
    # the vectorised statistic used for the bootstrap equals scipy on every row
    g = np.random.default_rng(0)
    xs, ys = g.integers(0, 4, (50, 12)).astype(float), g.standard_normal((50, 12))
    got = stats._spearman_stat(xs, ys)
    want = [sps.spearmanr(a, b).statistic if a.std() > 0 else np.nan for a, b in zip(xs, ys)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # NaN pairs are dropped; too few pairs give NaN
    res = stats.spearman([1, 2, np.nan, 4, 5], [2, 1, 3, np.nan, 5], n_resamples=99)
    assert res.n == 3
    assert math.isnan(stats.spearman([1, 2], [2, 1]).estimate)


def test_spearman_fisher_interval_by_formula_and_bootstrap_holds_rho():
    g = np.random.default_rng(1)
    x = g.standard_normal(40)
    y = x + g.standard_normal(40)
    rho = sps.spearmanr(x, y).statistic
    res = stats.spearman(x, y, ci="fisher")
    z, se = math.atanh(rho), math.sqrt((1 + rho**2 / 2) / 37)
    assert res.ci_low == pytest.approx(math.tanh(z - 1.959963984540054 * se), rel=1e-9)
    assert res.ci_high == pytest.approx(math.tanh(z + 1.959963984540054 * se), rel=1e-9)
    for method in ("BCa", "percentile", "basic"):
        b = stats.spearman(x, y, method=method, n_resamples=2000)
        assert b.ci_low < rho < b.ci_high and b.ci_high - b.ci_low < 0.6, method


def test_fdr_is_benjamini_hochberg_by_hand():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.2])
    # sorted finite p: 0.01, 0.03, 0.04, 0.2 with m = 4: p * m / rank, then a running minimum from the top
    # raw 0.04, 0.06, 0.0533, 0.2 -> 0.04, 0.0533, 0.0533, 0.2
    want = {0.01: 0.04, 0.03: 0.04 * 4 / 3, 0.04: 0.04 * 4 / 3, 0.2: 0.2}
    got = stats.fdr(p)
    assert math.isnan(got[3])
    for i in (0, 1, 2, 4):
        assert got[i] == pytest.approx(want[p[i]])


def test_bootstrap_intervals_cover_the_mean_about_95_percent():
    g = np.random.default_rng(2)
    for method in ("BCa", "percentile"):
        hits = 0
        for i in range(200):
            sample = g.exponential(1.0, size=40)  # skewed: BCa's case
            ci = stats.bootstrap_ci(sample, method=method, n_resamples=1000, seed=i)
            hits += ci.ci_low <= 1.0 <= ci.ci_high
        # 200 intervals at 95%: binomial sd 1.5 points; bootstrap intervals of a skewed mean at
        # n = 40 under-cover a little (about 92-93%)
        assert 0.88 <= hits / 200 <= 0.99, (method, hits)


def test_degenerate_inputs_and_bad_arguments():
    const = stats.bootstrap_ci(np.full(6, 2.5))
    assert const.estimate == const.ci_low == const.ci_high == 2.5
    one = stats.bootstrap_ci([1.0, np.nan])
    assert one.n == 1 and math.isnan(one.ci_low)
    assert math.isnan(stats.spearman([1, 1, 1, 1], [1, 2, 3, 4]).estimate)
    assert math.isnan(stats.permutation_test([1.0], [2.0, 3.0]).p_value)
    with pytest.raises(stats.StatsError, match="method"):
        stats.bootstrap_ci([1, 2, 3], method="bca")
    with pytest.raises(stats.StatsError, match="equal lengths"):
        stats.spearman([1, 2, 3], [1, 2])
    with pytest.raises(stats.StatsError, match="confidence"):
        stats.permutation_test([1, 2], [3, 4], confidence=95)
