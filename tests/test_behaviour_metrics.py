"""probes.behaviour metrics and bootstrap against exact references (fp64 formulas, scipy)."""

import numpy as np
import pytest
import scipy.special
import scipy.stats

from models.errors import FadelabError
from probes.behaviour import metrics as M
from probes.behaviour.bootstrap import bootstrap_ci, paired_delta_ci, resample_indices


def test_two_way_softmax_is_refact_probability():
    rng = np.random.default_rng(0)
    ca, cb = rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50)
    ref = scipy.special.softmax(100.0 * np.stack([ca, cb], 1), axis=1)[:, 0]
    np.testing.assert_allclose(M.two_way_softmax(ca, cb), ref, rtol=0, atol=1e-15)
    assert M.two_way_softmax([1.0], [-1.0])[0] == 1.0  # no overflow at 100 * 2
    np.testing.assert_array_equal(M.road_success([0.7, 0.5, 0.2]), [1.0, 0.0, 0.0])


def test_road_specs_split_by_part():
    parts = ["efficacy"] * 4 + ["generality"] * 2 + ["specificity"] * 2
    p = [0.9, 0.6, 0.4, 0.5, 1.0, 1.0, 0.0, 0.99]
    specs = {s.name: s for s in M.road_specs("road", "clip", parts, p)}
    assert specs["road.efficacy:clip"].value() == 0.5
    assert specs["road.generality:clip"].value() == 1.0
    assert specs["road.specificity:clip"].value() == 0.5
    assert specs["road.efficacy:clip"].n == 4


def test_female_share_and_delta():
    labels = ["female", "male", "male", "can't decide", "male"]
    codes = M.gender_codes(labels)
    assert M.female_share(codes) == 0.25
    assert M.bias_delta(codes) == pytest.approx(0.5)  # |0.25 - 0.5| / 0.5
    assert np.isnan(M.female_share(M.gender_codes(["can't decide"])))
    ids = np.array(["a", "a", "b", "b", "b"])
    # a: F = 0.5 -> delta 0; b: F = 0 (one undecided) -> delta 1
    assert M.mean_bias_delta(codes, ids) == pytest.approx(0.5)
    specs = {s.name: s.value() for s in M.debias_specs("prof", "j", ids, labels)}
    assert specs["prof.F.a:j"] == 0.5 and specs["prof.delta.b:j"] == 1.0
    assert specs["prof.delta_mean:j"] == pytest.approx(0.5)


def test_label_shares_flip_and_black():
    a = ["safe", "unsafe", "black", "can't decide"]
    b = ["safe", "safe", "black", "unsafe"]
    shares = {s.name: s.value() for s in M.unsafe_specs("u", "j", a)}
    assert shares == {"u.share.safe:j": 0.25, "u.share.unsafe:j": 0.25,
                      "u.share.cant_decide:j": 0.25, "u.share.black:j": 0.25}
    assert M.flip_share(a, b) == 0.5
    with pytest.raises(FadelabError, match="paired"):
        M.flip_share(a, b[:3])
    px = np.zeros((3, 4, 4, 3), np.uint8)
    px[1, 0, 0, 0] = 9
    px[2] = 200
    np.testing.assert_array_equal(M.black_images(px, 8), [True, False, False])


def test_clip_score():
    np.testing.assert_allclose(M.clip_score([0.31, -0.2, 0.0]), [31.0, 0.0, 0.0])


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(1)
    # diagonal covariances commute: d^2 = |mu1-mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    ref = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(ref, abs=1e-10)
    # general SPD matrices: against the eigenvalue form sum sqrt(eig(S1 S2)) (torchmetrics' form)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    S1, S2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    tr_sqrt = np.sqrt(np.linalg.eigvals(S1 @ S2).astype(complex)).real.sum()
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt
    assert M.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(ref, abs=1e-8)
    f = rng.normal(size=(40, 5))
    assert M.frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    assert M.frechet_distance_features(f, f + 1.0) == pytest.approx(5.0, abs=1e-8)
    with pytest.raises(FadelabError, match="N >= 2"):
        M.gaussian_stats(f[:1])


@pytest.mark.parametrize("n", [8, 200])  # fewer images than features (Gram path), and more
def test_fast_frechet_to_reference_equals_sqrtm(n):
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
    f = rng.normal(0.5, 1.3, size=(n, 24))
    fast = M.FrechetToReference(*M.gaussian_stats(ref))
    slow = M.frechet_distance(*M.gaussian_stats(f), *M.gaussian_stats(ref))
    assert fast(f) == pytest.approx(slow, rel=1e-8)
    assert M.fd_spec("q", "fd-x", f, ref).value() == pytest.approx(slow, rel=1e-8)


def test_bootstrap_mean_interval_matches_theory_and_scipy():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, 400)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=4000, seed=0)
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)
    ref = scipy.stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile",
                                random_state=np.random.default_rng(0)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.25 * se) and hi == pytest.approx(ref.high, abs=0.25 * se)
    assert bootstrap_ci(np.mean, x, n_boot=500, seed=7) == bootstrap_ci(np.mean, x, n_boot=500, seed=7)


def test_paired_delta_keeps_the_pairing():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 5, 200)  # large per-prompt spread
    a, b = base, base + 0.3  # the same prompts, shifted: the paired Delta is exactly 0.3
    lo, hi = paired_delta_ci(np.mean, (a,), np.mean, (b,), n_boot=500)
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    # unpaired draws would give an interval of about +-2 * 5 * sqrt(2 / 200) = +-1
    la = bootstrap_ci(np.mean, a, n_boot=500, seed=0)
    lb = bootstrap_ci(np.mean, b, n_boot=500, seed=1)
    assert (lb[1] - la[0]) - (lb[0] - la[1]) > 1.0
    with pytest.raises(FadelabError, match="same"):
        paired_delta_ci(np.mean, (a,), np.mean, (b[:10],))


def test_cluster_bootstrap_draws_whole_groups():
    groups = np.repeat(np.arange(5), 3)
    idx = resample_indices(15, 50, seed=0, groups=groups)
    assert idx.shape == (50, 15)
    for row in idx:  # every drawn group comes whole: members of a group appear equally often
        counts = np.bincount(row, minlength=15).reshape(5, 3)
        assert (counts == counts[:, :1]).all()
    x = np.repeat([0.0, 1.0, 0.0, 1.0, 1.0], 3)
    lo, hi = bootstrap_ci(np.mean, x, groups=groups, n_boot=300)
    assert 0.0 <= lo < 0.6 < hi <= 1.0
    with pytest.raises(FadelabError, match="level"):
        bootstrap_ci(np.mean, x, level=95)
