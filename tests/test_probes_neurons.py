"""Neuron probes on synthetic activations with planted monosemantic and polysemantic neurons
(hand references), edit neurons, fade and the shared-fade test (exact permutation p-values), and
one integration run on the organism's text encoder on CPU."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from models import FadelabError, WeightDelta, apply_delta
from probes import neurons as pn
from probes import neurons_collect as pc

N_CONCEPTS = 10
NAMES = [f"c{i}" for i in range(N_CONCEPTS)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices: one intra-op thread avoids OpenMP waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted():
    """400 prompts, each with one concept and, for a quarter, a second random one. Neurons:
    0 monosemantic (c0), 1 polysemantic (c1, c2, c3), 2 noise only, 3 the same for every concept,
    4..11 noise."""
    rng = np.random.default_rng(0)
    n = 400
    first = np.arange(n) % N_CONCEPTS
    labels = []
    for i in range(n):
        s = {NAMES[first[i]]}
        if i % 4 == 3:  # a random second concept, so no pair always co-occurs
            s.add(NAMES[(first[i] + 1 + rng.integers(N_CONCEPTS - 1)) % N_CONCEPTS])
        labels.append(s)
    y, _ = pn.concept_matrix(labels, NAMES)
    x = 0.05 * rng.standard_normal((n, 12))
    x[:, 0] += 1.0 * y[:, 0]
    x[:, 1] += 1.0 * (y[:, 1] | y[:, 2] | y[:, 3])
    x[:, 3] += 0.8
    return x, labels, y


def test_concept_means_and_zscores_match_a_hand_loop(planted):
    x, labels, y = planted
    mu = pn.concept_means(x, y)
    for j in (0, 1, 5):
        for c, name in enumerate(NAMES):
            rows = [i for i, s in enumerate(labels) if name in s]
            assert mu[j, c] == pytest.approx(x[rows, j].mean(), rel=1e-12)
    z = pn.concept_zscores(x, y, "robust")
    med = np.median(x[:, 1])
    mad = 1.4826 * np.median(np.abs(x[:, 1] - med))
    assert z[1, 2] == pytest.approx((mu[1, 2] - med) / mad, rel=1e-12)
    zs = pn.concept_zscores(x, y, "std")
    assert zs[0, 0] == pytest.approx((mu[0, 0] - x[:, 0].mean()) / x[:, 0].std(), rel=1e-12)


def test_planted_monosemantic_and_polysemantic_neurons(planted):
    x, labels, _ = planted
    ds = pn.polysemanticity(torch.from_numpy(x).float(), labels, pn.NeuronProbeConfig(probe_c=0.3))
    resp = {j: set(ds["concept"].values[ds["responds"].values[j]]) for j in range(4)}
    assert resp[0] == {"c0"} and resp[1] == {"c1", "c2", "c3"} and resp[2] == set() and resp[3] == set()
    # N_eff by its formula, and in the planted order: the entropy also counts the small positive
    # means that second labels and noise leave on other concepts (about 1 nat for neuron 0 here)
    mu = np.clip(ds["mean"].values, 0, None)
    p = mu / mu.sum(axis=1, keepdims=True)
    ref = np.exp(-np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(axis=1))
    np.testing.assert_allclose(ds["n_eff"].values, ref, rtol=1e-12)
    assert float(ds["n_eff"][0]) < float(ds["n_eff"][1]) < float(ds["n_eff"][3])
    assert float(ds["n_eff"][3]) == pytest.approx(N_CONCEPTS, rel=0.01)
    # above rest: an offset of 1 on every prompt leaves n_eff_rel unchanged and inflates n_eff
    plain = pn.polysemanticity(x, labels, pn.NeuronProbeConfig(probes=False))
    shifted = pn.polysemanticity(x + 1.0, labels, pn.NeuronProbeConfig(probes=False))
    np.testing.assert_allclose(shifted["n_eff_rel"].values, plain["n_eff_rel"].values, rtol=1e-9)
    assert float(shifted["n_eff"][0]) > 5 > float(shifted["n_eff_rel"][0])
    # with one concept per prompt nothing else leaks in: about 1 and about 3
    single = [{sorted(s)[0]} if len(s) == 1 else {NAMES[i % N_CONCEPTS]} for i, s in enumerate(labels)]
    y1, _ = pn.concept_matrix(single, NAMES)
    x1 = x.copy()
    x1[:, 0] = x[:, 5] + 1.0 * y1[:, 0]
    x1[:, 1] = x[:, 6] + 1.0 * (y1[:, 1] | y1[:, 2] | y1[:, 3])
    ne = pn.effective_concepts(pn.concept_means(x1, y1))
    assert 1.0 <= ne[0] < 1.5 and 2.9 < ne[1] < 3.6  # noise in the other means adds a little
    assert float(ds["selectivity"][0]) > 0.85 and float(ds["selectivity"][3]) < 0.02
    assert float(ds["selectivity"][0]) > float(ds["selectivity"][1]) > float(ds["selectivity"][3])
    assert str(ds["top_concept"][0].values) == "c0"
    # sparse probes: c0's probe leans on neuron 0 most, c2's on neuron 1, and both are accurate
    coef = ds["probe_coef"]
    assert int(np.nanargmax(np.abs(coef.sel(concept="c0").values))) == 0
    assert int(np.nanargmax(np.abs(coef.sel(concept="c2").values))) == 1
    assert float(ds["probe_accuracy"].sel(concept="c0")) > 0.95
    assert set(pn.selective_neurons(ds, "c2", by="z")) == {1}
    table = pn.polysemanticity_table(ds)
    assert table.loc[1, "n_concepts"] == 3 and table.loc[1, "concepts"].split(", ")[0] in {"c1", "c2", "c3"}
    assert table.loc[0, "concepts"] == "c0"


def test_selectivity_and_effective_concepts_by_hand():
    mu = np.array([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, -1.0], [-1.0, -2.0, -0.5, -0.1]])
    si = pn.selectivity_index(mu)
    assert si[0] == pytest.approx(1.0)
    assert si[1] == pytest.approx((1 - 1 / 3) / (1 + 1 / 3))  # the -1 is clipped to 0
    assert math.isnan(si[2])
    ne = pn.effective_concepts(mu)
    assert ne[0] == pytest.approx(1.0) and ne[1] == pytest.approx(2.0) and math.isnan(ne[2])


def test_edit_neurons_refact_uce_and_channels():
    u = np.zeros(20)
    u[[3, 7, 11]] = [0.5, -2.0, 1.0]
    u[0] = 0.1
    idx, score = pn.refact_edit_neurons({"u": torch.tensor(u)}, top=3)
    assert list(idx) == [7, 11, 3] and score.sum() == pytest.approx((4 + 1 + 0.25) / (4 + 1 + 0.25 + 0.01))
    # from C and k*: u = C^-1 k*
    c = np.diag(np.arange(1.0, 21.0))
    k_star = c @ u
    assert list(pn.refact_edit_neurons({"C": c, "k_star": k_star}, top=3)[0]) == [7, 11, 3]
    assert list(pn.refact_edit_neurons({"u": u}, mass=0.99)[0]) == [7, 11, 3]  # 0.998 of the mass
    # UCE keys: energy ranks channels by weight in the keys, leverage by the span (basis-free)
    c_e = np.zeros((2, 6))
    c_e[0, 0], c_e[0, 1], c_e[1, 2] = 10.0, 1.0, 1.0
    idx, s = pn.uce_edit_neurons({"c_e": c_e}, top=3)
    assert list(idx) == [0, 1, 2] and s[0] == pytest.approx(100 / 102)
    idx, s = pn.uce_edit_neurons({"c_e": c_e}, top=None, weighting="leverage")
    assert list(idx[:3]) == [2, 0, 1] and np.allclose(s[:3], [0.5, 0.5 * 100 / 101, 0.5 / 101])
    # output channels of a delta: dense and low-rank agree; on keys vs overall
    g = np.random.default_rng(1)
    b, a = g.standard_normal((8, 2)), g.standard_normal((2, 6))
    b[5] *= 10
    for keys in (None, c_e):
        i1, s1 = pn.delta_channels((b, a), keys, top=8)
        i2, s2 = pn.delta_channels(b @ a, keys, top=8)
        assert list(i1) == list(i2) and np.allclose(s1, s2) and i1[0] == 5
    assert list(pn.refact_edit_neurons({"u:text.mlp.3.fc2": u, "k_star:text.mlp.3.fc2": u}, top=3)[0]) == [7, 11, 3]
    with pytest.raises(FadelabError, match="need 'u'"):
        pn.refact_edit_neurons({"k_star": u})


def test_activation_shift_fade_convention():
    g = np.random.default_rng(2)
    ref = g.standard_normal((30, 5))
    a = ref + g.standard_normal((30, 5))
    ds = pn.activation_shift(a, a, ref)
    assert np.allclose(ds["fade"], 0.0) and np.allclose(ds["shift"], 0.0)
    assert np.allclose(pn.activation_shift(a, ref, ref)["fade"], 1.0)
    b = ref + 0.4 * (a - ref)
    assert np.allclose(pn.activation_shift(a, b, ref)["fade"], 0.6)
    assert np.allclose(pn.activation_shift(a, 2 * a)["retention"], 2.0)  # no ref: against 0
    with pytest.raises(FadelabError, match="same prompts"):
        pn.activation_shift(a, a[:3])


def _exact_p(shared, other):
    """One-sided p of mean(shared) - mean(other) over every relabelling, by enumeration."""
    pooled = np.concatenate([shared, other])
    obs = shared.mean() - other.mean()
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(shared)):
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        total += 1
        hits += pooled[mask].mean() - pooled[~mask].mean() >= obs - 1e-12
    return hits / total


def test_shared_fade_test_exact_p_and_planted_effect():
    fade = np.array([0.9, 0.8, 0.85, 0.1, 0.3, 0.2, 0.25, 0.0])
    edit, feature = [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 7]  # 7 is a feature neuron but no edit neuron
    res = pn.shared_fade_test(fade, edit, feature, n_resamples=9999)
    assert res.n_shared == 3 and res.n_other == 4
    assert res.effect == pytest.approx(0.85 - 0.2125)
    assert res.p_value == pytest.approx(_exact_p(fade[:3], fade[3:7]))  # 35 relabellings: exact
    assert res.p_value == pytest.approx(1 / 35)
    # a planted effect on more neurons: the CI holds it and excludes 0
    g = np.random.default_rng(3)
    fade = np.concatenate([0.7 + 0.1 * g.standard_normal(20), 0.3 + 0.1 * g.standard_normal(40)])
    res = pn.shared_fade_test(fade, range(60), range(20), n_resamples=2000)
    assert res.p_value < 0.01 and res.ci_low > 0.2 and res.ci_low < 0.4 < res.ci_high
    assert res.cohen_d > 2
    # no difference: not significant; too few shared: NaN with the counts
    null = pn.shared_fade_test(0.5 + 0.1 * g.standard_normal(60), range(60), range(20), n_resamples=2000)
    assert null.p_value > 0.05
    few = pn.shared_fade_test(fade, range(60), [0])
    assert few.n_shared == 1 and math.isnan(few.p_value)


def test_graded_fade_test_matches_spearman_and_finds_a_planted_trend():
    # 5 edit neurons of 7: every pairing enumerated (5! = 120 <= n_resamples), so p is exact
    score = np.array([3.0, 0.1, 2.0, -1.0, 1.0, 9.0, 9.0])
    fade = np.array([0.9, 0.2, 0.7, 0.1, 0.15, 0.0, 0.0])
    res = pn.graded_fade_test(fade, [0, 1, 2, 3, 4], score, n_resamples=9999)
    assert res.n == 5 and res.rho == pytest.approx(stats.spearmanr(score[:5], fade[:5]).statistic)
    assert res.rho == pytest.approx(0.9)  # one swap from a perfect order
    # exact: pairings with rho >= 0.9 are the identity and the four adjacent swaps of 120
    assert res.p_value == pytest.approx(5 / 120)
    g = np.random.default_rng(4)
    z = g.standard_normal(40)
    trend = pn.graded_fade_test(0.5 * z + 0.3 * g.standard_normal(40), range(40), z, n_resamples=2000)
    assert trend.rho > 0.6 and trend.p_value < 0.01
    null = pn.graded_fade_test(g.standard_normal(40), range(40), z, n_resamples=2000)
    assert null.p_value > 0.05
    # the opposite trend: not significant one-sided, significant "less"
    assert pn.graded_fade_test(-0.5 * z, range(40), z, n_resamples=500).p_value > 0.5
    assert pn.graded_fade_test(-0.5 * z, range(40), z, n_resamples=500, alternative="less").p_value < 0.01
    # too few edit neurons, or no spread: NaN with the count
    assert math.isnan(pn.graded_fade_test(fade, [0, 1], score).rho)
    assert math.isnan(pn.graded_fade_test(np.ones(7), [0, 1, 2, 3], score).p_value)
    with pytest.raises(FadelabError, match="one per neuron"):
        pn.graded_fade_test(fade, [0, 1, 2], score[:3])


# -- the organism --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def organism():
    import models

    return models.load("organism")


def test_text_activations_on_the_organism(organism):
    m = organism
    prompts = ["an apple on a table", "a painting of a ceo", "the mayor at night", "a dog"]
    subjects = ["apple", "ceo", "mayor", "dog"]
    sites = ["text.mlp.2.fc2", "unet.xattn.3.to_v"]
    last = pc.text_activations(m, prompts, sites, position="last")
    subj = pc.text_activations(m, prompts, sites, position="subject", subjects=subjects)
    mean = pc.text_activations(m, prompts, ["text.mlp.2.fc2"], position="mean")
    assert last["text.mlp.2.fc2"].shape == (4, 512) and last["unet.xattn.3.to_v"].shape == (4, 128)
    # references: full-token recordings and the pipeline's own prompt embeddings
    from store import Recorder

    tok = m.tokenizers[0](prompts, padding="max_length", max_length=77, return_tensors="pt")
    lengths = tok.attention_mask.sum(1)
    subject_index = [2, 5, 2, 2]  # [BOS] an apple ... / [BOS] a painting of a ceo / [BOS] the mayor / [BOS] a dog
    with torch.no_grad(), Recorder({"s": m.module("text.mlp.2.fc2")}, what="input") as rec:
        m.text_encoders[0](tok.input_ids)
        emb = m.pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        v = m.module("unet.xattn.3.to_v")(emb)
    full = rec.calls("s")[0]  # (4, 77, 512); encode_prompt was the second call
    for i in range(4):
        torch.testing.assert_close(last["text.mlp.2.fc2"][i], full[i, lengths[i] - 1], rtol=0, atol=0)
        torch.testing.assert_close(subj["text.mlp.2.fc2"][i], full[i, subject_index[i]], rtol=0, atol=0)
        torch.testing.assert_close(mean["text.mlp.2.fc2"][i], full[i, 1:lengths[i]].mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(last["unet.xattn.3.to_v"][i], v[i, lengths[i] - 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(subj["unet.xattn.3.to_v"][i], v[i, subject_index[i]], rtol=1e-5, atol=1e-5)
    with pytest.raises(FadelabError, match="not in prompt"):
        pc.text_activations(m, prompts[:1], sites, position="subject", subjects=["pear"])


def test_edit_variant_moves_only_downstream_neurons_and_polysemanticity_runs(organism):
    m = organism
    prompts, concepts, heads = pc.catalog_prompts(160, seed=1)
    assert all(any(c.startswith("kind:") for c in cs) for cs in concepts)
    sites = ["text.mlp.2.fc2", "text.mlp.3.fc2", "text.mlp.4.fc2"]
    before = pc.text_activations(m, prompts, sites, position="subject", subjects=heads)
    # a ReFACT-shaped rank-one edit of text.mlp.3.fc2 along the top edit neurons of a key
    k_star = before["text.mlp.3.fc2"][0]
    g = torch.Generator().manual_seed(0)
    u = k_star / k_star.norm()
    edit = WeightDelta({"text.mlp.3.fc2": (torch.randn(128, 1, generator=g), u[None])})
    with apply_delta(m, edit):
        after = pc.text_activations(m, prompts, sites, position="subject", subjects=heads)
    assert torch.equal(after["text.mlp.2.fc2"], before["text.mlp.2.fc2"])
    assert torch.equal(after["text.mlp.3.fc2"], before["text.mlp.3.fc2"])  # fc2 inputs: upstream of the edit
    shift = pn.activation_shift(before["text.mlp.4.fc2"], after["text.mlp.4.fc2"])
    assert float(np.abs(shift["shift"]).max()) > 1e-3
    assert torch.equal(pc.text_activations(m, prompts[:8], sites[:1], position="subject", subjects=heads[:8])[sites[0]],
                       before[sites[0]][:8])  # restored
    # polysemanticity of real neurons: frequent coarse concepts are linearly readable
    ds = pn.polysemanticity(before["text.mlp.4.fc2"], concepts, pn.NeuronProbeConfig(probe_c=0.3))
    assert ds.sizes["neuron"] == 512
    acc = ds["probe_accuracy"]
    assert float(acc.sel(concept="kind:object")) >= 0.9 and float(acc.sel(concept="kind:person")) >= 0.9
    assert np.isfinite(ds["n_eff"].values).mean() > 0.9


def test_probe_bars_follow_progress(organism, planted, capsys):
    """`fadelab run --quiet` (Context.progress False) reaches the probes' three bars: activations,
    sparse probes and weight probes print nothing then, and their bars show otherwise."""
    from probes import weights as pw

    x, labels, _ = planted
    delta = WeightDelta({"a": torch.ones(4, 6, dtype=torch.float64)})

    def run(progress):
        pc.text_activations(organism, ["a dog", "a cat"], ["text.mlp.2.fc2"], progress=progress)
        pn.polysemanticity(x, labels, pn.NeuronProbeConfig(progress=progress))
        ds = pw.probe_weights(None, delta, delta, None, pw.WeightProbeConfig(progress=progress))
        assert "progress" not in ds.attrs["config"]  # a display choice, not part of the result
        return capsys.readouterr().err

    quiet, shown = run(False), run(True)
    assert quiet == ""
    for bar in ("activations", "sparse probes", "weight probes"):
        assert bar in shown, bar
