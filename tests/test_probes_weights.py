"""Weight probes against exact references: orthogonal subspaces give 90 degrees, scipy's
subspace angles, the random-subspace baseline sqrt(k/d), the sign of kappa, dense and low-rank
inputs giving the same numbers, ranks and intruder dimensions by their definitions (fp64)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from models import FadelabError, WeightDelta
from probes import weights as pw
from probes import weights_linalg as la


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: one intra-op thread avoids OpenMP waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orth(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=_g(seed), dtype=torch.float64))
    return q


def _rank_r(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _g(seed)
    return (torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64))


CFG = pw.WeightProbeConfig(k=4, intruder_k=5)


def test_orthogonal_subspaces_give_90_degrees_and_no_overlap():
    m, n = 20, 30
    basis_out, basis_in = _orth(m, m, 1), _orth(n, n, 2)
    # dW_ed lives on input coordinates 0..2 and outputs 0..2, dW_ft on inputs 3..6 and outputs 3..6
    ed = basis_out[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ basis_in[:, :3].T
    ft = basis_out[:, 3:7] @ basis_in[:, 3:7].T
    assert np.allclose(pw.subspace_angles(ed, ft, k=4, side="right"), 90.0, atol=1e-9)
    assert np.allclose(pw.subspace_angles(ed, ft, k=4, side="left"), 90.0, atol=1e-9)
    keys = {"c_e": basis_in[:, :3].T * 5.0}  # key rows spanning the edit's input subspace
    ds = pw.probe_weights({"s": torch.zeros(m, n, dtype=torch.float64)}, WeightDelta({"s": ed}),
                          WeightDelta({"s": ft}), keys, pw.WeightProbeConfig(k=4, intruders=False))
    r = ds.sel(site="s")
    for name in ("cosine", "kappa", "kappa_key", "proj_in", "proj_row", "proj_out", "proj_both"):
        assert abs(float(r[name])) < 1e-12, name
    assert float(r["retention"]) == pytest.approx(1.0, abs=1e-12)
    assert float(r["angle_in_min"]) == pytest.approx(90.0, abs=1e-9)
    assert float(r["angle_out_min"]) == pytest.approx(90.0, abs=1e-9)
    assert float(r["proj_in_base"]) == pytest.approx(math.sqrt(3 / n))
    assert float(r["proj_out_base"]) == pytest.approx(math.sqrt(3 / m))
    assert np.isnan(r["angles_in"].values[3])  # min(3, 4) angles, NaN-padded to k


@pytest.mark.parametrize("d,p,q,seed", [(40, 5, 5, 0), (40, 3, 7, 1), (12, 6, 2, 2)])
def test_principal_angles_agree_with_scipy(d, p, q, seed):
    q1, q2 = _orth(d, p, seed), _orth(d, q, seed + 10)
    ref = scipy.linalg.subspace_angles(q1.numpy(), q2.numpy())
    np.testing.assert_allclose(la.principal_angles(q1, q2).numpy(), ref, atol=1e-12)
    # nearly identical subspaces: the sine branch keeps angles of ~1e-7 rad accurate
    q3, _ = torch.linalg.qr(q1 + 1e-7 * torch.randn(d, p, generator=_g(seed + 20), dtype=torch.float64))
    ref = scipy.linalg.subspace_angles(q1.numpy(), q3.numpy())
    got = la.principal_angles(q1, q3).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-15)
    assert got.max() > 1e-9  # not rounded to zero


def test_top_k_singular_subspace_angles_agree_with_scipy_on_numpy_svd():
    x, y = torch.randn(30, 50, generator=_g(3), dtype=torch.float64), torch.randn(30, 50, generator=_g(4), dtype=torch.float64)
    ux, _, vxh = np.linalg.svd(x.numpy(), full_matrices=False)
    uy, _, vyh = np.linalg.svd(y.numpy(), full_matrices=False)
    k = 6
    ref_in = np.degrees(scipy.linalg.subspace_angles(vxh[:k].T, vyh[:k].T))
    ref_out = np.degrees(scipy.linalg.subspace_angles(ux[:, :k], uy[:, :k]))
    np.testing.assert_allclose(pw.subspace_angles(x, y, k, "right"), ref_in, atol=1e-9)
    np.testing.assert_allclose(pw.subspace_angles(x, y, k, "left"), ref_out, atol=1e-9)
    ds = pw.probe_weights(None, WeightDelta({"s": x}), WeightDelta({"s": y}), None, pw.WeightProbeConfig(k=k))
    np.testing.assert_allclose(ds["angles_in"].sel(site="s").values, ref_in, atol=1e-9)
    np.testing.assert_allclose(ds["angles_out"].sel(site="s").values, ref_out, atol=1e-9)


def test_random_pair_projection_ratio_is_about_sqrt_k_over_d():
    # |X Q|^2 / |X|^2 for Gaussian X is Beta(m k / 2, m (n - k) / 2): mean k/n, relative sd
    # sqrt(2 / (m k)) = 5% per draw here; the mean of 20 draws is within 2% of sqrt(k/n)
    m, n, k = 48, 256, 8
    ratios_in, ratios_out = [], []
    for seed in range(20):
        ed = _rank_r(m, n, 2, 100 + seed)
        keys = torch.randn(k, n, generator=_g(200 + seed), dtype=torch.float64)
        ft = torch.randn(m, n, generator=_g(300 + seed), dtype=torch.float64)
        r_in, base_in = pw.projection_ratio(ft, q=la.row_basis(keys, 1e-10))
        r_out, base_out = pw.projection_ratio(ft, p=la.thin_svd(ed)[0][:, :2])
        ratios_in.append(r_in)
        ratios_out.append(r_out)
    assert base_in == pytest.approx(math.sqrt(k / n)) and base_out == pytest.approx(math.sqrt(2 / m))
    assert np.mean(ratios_in) == pytest.approx(math.sqrt(k / n), rel=0.02)
    assert np.mean(ratios_out) == pytest.approx(math.sqrt(2 / m), rel=0.05)  # k m = 512 -> 4.4% sd / 4.5
    # and the edit's own row space captures all of an update inside it
    b, a = _rank_r(m, n, 3, 7)
    assert pw.projection_ratio((torch.randn(m, 3, dtype=torch.float64), a), q=la.row_basis(a, 1e-10))[0] == \
        pytest.approx(1.0, abs=1e-12)


def test_kappa_sign_convention_and_refact_key_retention():
    m, n = 16, 24
    g = _g(5)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    k_star = torch.randn(n, generator=g, dtype=torch.float64)
    c = torch.eye(n, dtype=torch.float64) + 0.1 * torch.ones(n, n, dtype=torch.float64)
    u = torch.linalg.solve(c, k_star)
    u = u / u.norm()
    v_star = torch.randn(m, generator=g, dtype=torch.float64)
    ed = torch.outer(v_star - w @ k_star, u) / (u @ k_star)  # ReFACT / ROME rank-one update
    torch.testing.assert_close((w + ed) @ k_star, v_star, rtol=0, atol=1e-12)
    other = torch.randn(m, n, generator=g, dtype=torch.float64)
    other -= (other * ed).sum() / (ed * ed).sum() * ed  # orthogonal to dW_ed
    # EditResult's flat layout: "<name>:<site>"; another site's key (of another width) is ignored
    keys = {"k_star:fc2": k_star, "u:fc2": u, "v_star:fc2": v_star, "k_star:text.mlp.1.fc2": torch.ones(3)}
    cases = {"undone": (-ed, 1.0), "doubled": (ed, -1.0), "orthogonal": (other, 0.0), "mixed": (-0.3 * ed + other, 0.3)}
    ds = pw.probe_weights_steps({"fc2": w}, WeightDelta({"fc2": ed}),
                                [(i, WeightDelta({"fc2": ft})) for i, (ft, _) in enumerate(cases.values())], keys,
                                pw.WeightProbeConfig(intruders=False))
    for i, (name, (ft, kappa)) in enumerate(cases.items()):
        r = ds.sel(site="fc2", step=i)
        assert float(r["kappa"]) == pytest.approx(kappa, abs=1e-12), name
        assert float(r["retention"]) == pytest.approx(1 - kappa, abs=1e-12), name
        # on the key: the share of v* - W k* that M_ed_ft still delivers
        delivered = ((w + ed + ft) @ k_star - w @ k_star) @ (v_star - w @ k_star) / (v_star - w @ k_star).norm() ** 2
        assert float(r["retention_key"]) == pytest.approx(float(delivered), abs=1e-12), name
    assert float(ds["cosine"].sel(site="fc2", step=0)) == pytest.approx(-1.0, abs=1e-12)
    assert float(ds["proj_row"].sel(site="fc2", step=0)) == pytest.approx(1.0, abs=1e-12)  # row space of ed is u
    assert float(ds["proj_in"].sel(site="fc2", step=2)) == pytest.approx(
        float((other @ k_star).norm() / k_star.norm() / other.norm()), abs=1e-12)


def test_low_rank_and_dense_inputs_give_the_same_numbers():
    m, n = 24, 40
    sites = ["a", "b"]
    base = {s: torch.randn(m, n, generator=_g(i), dtype=torch.float64) for i, s in enumerate(sites)}
    ed_f = {s: _rank_r(m, n, 3, 10 + i) for i, s in enumerate(sites)}
    ft_f = {s: _rank_r(m, n, 5, 20 + i) for i, s in enumerate(sites)}
    keys = {"c_e": torch.randn(4, n, generator=_g(30), dtype=torch.float64)}
    low = pw.probe_weights(base, WeightDelta(ed_f), WeightDelta(ft_f), keys, CFG)
    dense = pw.probe_weights(base, WeightDelta({s: b @ a for s, (b, a) in ed_f.items()}),
                             WeightDelta({s: b @ a for s, (b, a) in ft_f.items()}), keys, CFG)
    mixed = pw.probe_weights(base, WeightDelta(ed_f), WeightDelta({s: b @ a for s, (b, a) in ft_f.items()}), keys, CFG)
    for name in low.data_vars:
        np.testing.assert_allclose(low[name].values, dense[name].values, rtol=1e-9, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(low[name].values, mixed[name].values, rtol=1e-9, atol=1e-7, err_msg=name)
    assert np.isfinite(low[list(pw.SCALARS)].to_array().values).all()
    assert float(low["erank_ed"].sel(site="a")) <= 3.0 + 1e-9  # rank 3: at most 3
    # the factor norm and inner product equal the dense ones
    b, a = ft_f["a"]
    assert float(la.norm((b, a))) == pytest.approx(float(torch.linalg.matrix_norm(b @ a)), rel=1e-12)
    assert float(la.inner(ed_f["a"], (b, a))) == pytest.approx(float(((ed_f["a"][0] @ ed_f["a"][1]) * (b @ a)).sum()), rel=1e-10)


def test_effective_and_stable_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    p = np.array([3, 2, 1]) / 6
    assert pw.effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert pw.stable_rank(s) == pytest.approx(14 / 9, rel=1e-12)
    w = _orth(6, 4, 1) @ torch.diag(s) @ _orth(5, 4, 2).T
    _, sv, _ = la.thin_svd(w)
    assert pw.effective_rank(sv) == pytest.approx(pw.effective_rank(s), rel=1e-9)
    assert pw.effective_rank(torch.ones(7, dtype=torch.float64)) == pytest.approx(7.0)
    assert math.isnan(pw.stable_rank(torch.zeros(3, dtype=torch.float64)))


def test_intruder_dimensions_follow_the_definition():
    m, n = 32, 48
    u, v = _orth(m, m, 1), _orth(n, m, 2)
    w = u @ torch.diag(torch.linspace(10, 1, m, dtype=torch.float64)) @ v.T
    y = torch.randn(m, generator=_g(3), dtype=torch.float64)
    y /= y.norm()
    z = v[:, 0]
    intruded = w + 20.0 * torch.outer(y, z)  # a new top singular direction y (LoRA-like)
    nudged = w + 1e-3 * torch.randn(m, n, generator=_g(4), dtype=torch.float64)  # a small full update
    # the definition, by brute force in numpy
    up, _, _ = np.linalg.svd(w.numpy(), full_matrices=False)
    ut, _, _ = np.linalg.svd(intruded.numpy(), full_matrices=False)
    sims = np.array([max(abs(float(ut[:, j] @ up[:, i])) for i in range(up.shape[1])) for j in range(10)])
    count, sim = pw.intruder_dimensions(w, intruded, k=10, eps=0.5)
    np.testing.assert_allclose(sim.numpy(), sims, atol=1e-9)
    assert count == int((sims < 0.5).sum()) >= 1
    assert float(sim[0]) < 0.5  # the planted direction is the top one and an intruder
    assert pw.intruder_dimensions(w, nudged, k=10, eps=0.5)[0] == 0
    # through the probe: intruders of W + dW_ed + dW_ft against W + dW_ed
    ed = _rank_r(m, n, 1, 5)
    ds = pw.probe_weights({"s": w}, WeightDelta({"s": ed}), WeightDelta({"s": 20.0 * torch.outer(y, z)}), None,
                          pw.WeightProbeConfig(intruder_k=10))
    _, sim_ref = pw.intruder_dimensions(w + ed[0] @ ed[1], intruded + ed[0] @ ed[1], k=10)
    np.testing.assert_allclose(ds["intruder_sim_ft"].sel(site="s").values, sim_ref.numpy(), atol=1e-12)
    assert float(ds["intruders_ft"].sel(site="s")) == float((sim_ref < 0.5).sum())


def test_steps_match_single_probes_and_share_edit_quantities():
    m, n = 16, 20
    base = {"s": torch.randn(m, n, generator=_g(0), dtype=torch.float64)}
    ed = WeightDelta({"s": _rank_r(m, n, 2, 1)})
    steps = {s: WeightDelta({"s": _rank_r(m, n, 4, 10 + s)}) for s in (0, 50, 100)}
    ds = pw.probe_weights_steps(base, ed, steps, None, CFG)
    assert list(ds["step"].values) == [0, 50, 100] and ds["kappa"].dims == ("step", "site")
    assert ds["norm_ed"].dims == ("site",)
    for s, d in steps.items():
        one = pw.probe_weights(base, ed, d, None, CFG)
        for name in ("kappa", "cosine", "proj_out", "intruders_ft", "erank_ft"):
            np.testing.assert_allclose(ds[name].sel(step=s).values, one[name].values, rtol=1e-12, err_msg=name)
    # the runner's one pass: the final delta and the checkpoints give what the two calls give
    final_d = WeightDelta({"s": _rank_r(m, n, 4, 99)})
    final, along = pw.probe_weights_final_and_steps(base, ed, final_d, list(steps.items()), None, CFG)
    alone = pw.probe_weights(base, ed, final_d, None, CFG)
    assert list(along["step"].values) == [0, 50, 100] and "step" not in final.dims
    for name in pw.SCALARS:
        np.testing.assert_allclose(final[name].values, alone[name].values, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(along[name].values, ds[name].values, rtol=1e-12, err_msg=name)
    assert pw.probe_weights_final_and_steps(base, ed, final_d, [], None, CFG)[1] is None


def test_sites_without_an_edit_get_nan_overlap_and_real_ranks():
    base = {"a": torch.randn(8, 10, dtype=torch.float64), "b": torch.randn(8, 10, dtype=torch.float64)}
    ds = pw.probe_weights(base, WeightDelta({"a": _rank_r(8, 10, 1, 0)}),
                          WeightDelta({"a": _rank_r(8, 10, 2, 1), "b": _rank_r(8, 10, 2, 2)}), None, CFG)
    assert list(ds["site"].values) == ["a", "b"]
    assert np.isnan(float(ds["kappa"].sel(site="b"))) and np.isfinite(float(ds["erank_ft"].sel(site="b")))
    assert np.isnan(float(ds["proj_in"].sel(site="a")))  # no keys given


def test_key_layouts_shared_flat_and_nested_agree():
    c_e, c_site = torch.randn(3, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    assert torch.equal(pw.edit_input_keys({"c_e": c_e}, "s", 6), c_e)
    assert torch.equal(pw.edit_input_keys({"c_e": c_e, "c_e:s": c_site}, "s", 6), c_site)  # own overrides shared
    assert torch.equal(pw.edit_input_keys({"c_e": c_e, "s": {"c_e": c_site}}, "s", 6), c_site)
    assert torch.equal(pw.edit_input_keys({"c_e": c_e, "c_e:t": c_site}, "s", 6), c_e)
    assert pw.edit_input_keys({"v_star": c_e}, "s", 6) is None


def test_bad_inputs_raise_clear_errors(tmp_path):
    ed = WeightDelta({"s": torch.randn(4, 6)})
    with pytest.raises(FadelabError, match="width 5"):
        pw.probe_weights(None, ed, ed, {"c_e": torch.randn(2, 5)})
    with pytest.raises(FadelabError, match="base_weights lack"):
        pw.probe_weights({"t": torch.randn(4, 6)}, ed, ed)
    with pytest.raises(FadelabError, match="dW_ft has shape"):
        pw.probe_weights(None, ed, WeightDelta({"s": torch.randn(4, 7)}))
    with pytest.raises(FadelabError, match="intruder_side"):
        pw.WeightProbeConfig(intruder_side="up")
    path = tmp_path / "w.toml"
    path.write_text("k = 3\nintruder_eps = 0.6\n")
    assert pw.WeightProbeConfig.from_file(path) == pw.WeightProbeConfig(k=3, intruder_eps=0.6)
    path.write_text("kk = 3\n")
    with pytest.raises(FadelabError, match="unknown weight-probe settings"):
        pw.WeightProbeConfig.from_file(path)


def test_probes_run_where_the_base_weights_are():
    # UCE keeps its delta on the CPU and an edit read back from a store is there too; the probes
    # must run on the model's device (the base weights') all the same, unless told otherwise
    _device, WeightProbeConfig = pw._device, pw.WeightProbeConfig
    on_cpu = WeightDelta({"s": torch.zeros(3, 2)})
    base = {"s": torch.empty(3, 2, device="meta")}  # a device other than the deltas'
    assert _device(WeightProbeConfig(), base, on_cpu, [on_cpu]) == torch.device("meta")
    assert _device(WeightProbeConfig(device="cpu"), base, on_cpu, [on_cpu]) == torch.device("cpu")
    assert _device(WeightProbeConfig(), None, None, [WeightDelta({"s": base["s"]})]) == torch.device("meta")
    assert _device(WeightProbeConfig(), None, None, []) == torch.device("cpu")


def test_small_sites_are_probed_on_the_cpu_unless_a_device_is_named():
    # a busy GPU makes every small SVD wait its turn (the organism's 64 x 128 sites: 2.6 s each on
    # an H100 shared by 8 processes, 0.03 s on one CPU core); large sites stay on the model's device
    site_device, WeightProbeConfig, cap = pw._site_device, pw.WeightProbeConfig, pw.CPU_MAX_NUMEL
    meta = torch.device("meta")
    small, large = torch.empty(64, 128, device="meta"), torch.empty(cap // 64 + 1, 64, device="meta")
    assert site_device(WeightProbeConfig(), meta, small, None, [], "s") == torch.device("cpu")
    assert site_device(WeightProbeConfig(), meta, large, None, [], "s") == meta
    assert site_device(WeightProbeConfig(device="meta"), meta, small, None, [], "s") == meta
    # without base weights the shape comes from the first delta at the site, factors included
    lora = WeightDelta({"s": (torch.zeros(cap // 8 + 8, 2), torch.zeros(2, 8))})
    assert site_device(WeightProbeConfig(), meta, None, None, [lora], "s") == meta
    lora_small = WeightDelta({"s": (torch.zeros(16, 2), torch.zeros(2, 8))})
    assert site_device(WeightProbeConfig(), meta, None, lora_small, [], "s") == torch.device("cpu")
    assert site_device(WeightProbeConfig(), meta, None, None, [], "s") == meta  # unknown shape
