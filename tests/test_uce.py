"""UCE against its math: the normal equations in fp64, zero updates, exact round trips, the key
spaces of SD1.4, SDXL and FLUX (random weights at small width), and one-line errors."""

import json

import pytest
import torch

import models
from editing import UCEHparams, load_hparams, uce_erase, uce_moderate, uce_replace, uce_solve
from editing.hparams import DebiasHparams, ReFACTHparams
from models import FadelabError, apply_delta

SMALL = {"sd14": 0.125, "sdxl": 0.0625, "flux-schnell": 0.03125}


@pytest.fixture(scope="module")
def sd14():
    return models.load("sd14", "random", scale=SMALL["sd14"], seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return models.load("sdxl", "random", scale=SMALL["sdxl"], seed=1)


@pytest.fixture(scope="module")
def flux():
    return models.load("flux-schnell", "random", scale=SMALL["flux-schnell"], seed=2)


def _residual(w_new, w, c_e, v_star, c_p, h) -> float:
    """Relative residual of the normal equations in fp64:
    |W_new (lam I + s_e C_E^T C_E + s_p C_P^T C_P) - (lam W + s_e V*^T C_E + s_p W C_P^T C_P)| / |rhs|."""
    w_new, w, c_e, v_star, c_p = (t.double() for t in (w_new, w, c_e, v_star, c_p))
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    m = h.lam * eye + h.erase_scale * c_e.T @ c_e + h.preserve_scale * c_p.T @ c_p
    rhs = h.lam * w + h.erase_scale * v_star.T @ c_e + h.preserve_scale * w @ c_p.T @ c_p
    return float(torch.linalg.matrix_norm(w_new @ m - rhs) / torch.linalg.matrix_norm(rhs))


def _state(model):
    return {k: v.clone() for c in (model.pipe.unet if hasattr(model.pipe, "unet") else model.pipe.transformer,)
            for k, v in c.state_dict().items()}


# -- the closed form -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_e, n_p", [(3, 40), (77, 200), (1, 0)])
def test_solution_satisfies_the_normal_equations(n_e, n_p):
    g = torch.Generator().manual_seed(n_e)
    w = torch.randn(64, 48, generator=g)
    c_e, c_p = torch.randn(n_e, 48, generator=g), torch.randn(n_p, 48, generator=g)
    v_star = torch.randn(n_e, 64, generator=g)
    h = UCEHparams(lam=0.5, erase_scale=1.0, preserve_scale=0.3)
    dw = uce_solve(w, c_e, v_star, c_p, h.lam, h.erase_scale, h.preserve_scale)
    assert dw.dtype == torch.float32 and dw.shape == w.shape
    assert _residual(w + dw, w, c_e, v_star, c_p, h) <= 1e-5
    # the fp64 solution of the paper's eq. 7 itself
    w64, ce, cp, vs = w.double(), c_e.double(), c_p.double(), v_star.double()
    m = h.lam * torch.eye(48, dtype=torch.float64) + ce.T @ ce + h.preserve_scale * cp.T @ cp
    ref = torch.linalg.solve(m, (h.lam * w64 + vs.T @ ce + h.preserve_scale * w64 @ cp.T @ cp).T).T
    assert torch.allclose((w + dw).double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_nothing_to_change_gives_an_exact_zero():
    g = torch.Generator().manual_seed(3)
    w, c_e, c_p = torch.randn(8, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(9, 6, generator=g)
    assert torch.count_nonzero(uce_solve(w, c_e, c_e @ w.T, c_p)) == 0  # v* = W c: W stays
    assert torch.count_nonzero(uce_solve(w, c_e, torch.randn(5, 8, generator=g), c_p, erase_scale=0.0)) == 0


def test_replacing_a_concept_by_itself_changes_no_weight(sd14):
    r = uce_replace(sd14, ["a cat"], ["a cat"], preserve=["a dog"])
    assert len(r.sites()) == 32 and all(torch.count_nonzero(r.delta.dense(s)) == 0 for s in r.sites())


# -- SD1.4: sites, keys, normal equations, round trip -----------------------------------------------


def test_sd14_erase_keys_and_normal_equations(sd14):
    before = _state(sd14)
    h = UCEHparams()
    r = uce_erase(sd14, ["a cat", "a bloody dog"], h, preserve=["a house", "a tree at night"])
    assert _state(sd14).keys() == before.keys() and all(torch.equal(before[k], v) for k, v in _state(sd14).items())
    sites = models.sites_matching(sd14, "unet.xattn.*.to_[kv]")
    assert sorted(r.sites()) == sorted(sites) and len(sites) == 32
    assert r.method == "uce" and r.request["preserve"][0] == "" and r.request["guides"] == ["", ""]
    # tail rows: "a cat" -> rows 2..76 (75), "a bloody dog" -> 3..76 (74): the guide "" aligns from <bos>
    assert r.keys["c_e"].shape == (75 + 74, 96) and r.keys["c_p"].shape == (3 * 77, 96)
    for site in (sites[0], sites[-1]):
        k = r.keys_for(site)
        assert k["v_star"].shape == (149, sd14.weight(site).shape[0])
        w = sd14.weight(site).detach()
        assert _residual(w + r.delta.dense(site), w, k["c_e"], k["v_star"], k["c_p"], h) <= 1e-5


def test_apply_then_remove_is_the_identity(sd14):
    r = uce_moderate(sd14, ["a bloody dog"])
    before = _state(sd14)
    site = r.sites()[3]
    with apply_delta(sd14, r.delta):
        assert not torch.equal(sd14.weight(site), before[sd14.sites[site].split(".", 1)[1] + ".weight"])
    after = _state(sd14)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit


def test_last_token_mode_takes_one_row_per_prompt(sd14):
    r = uce_erase(sd14, ["a cat", "a dog"], UCEHparams(tokens="last", with_to_k=False), preserve=["a house"])
    assert r.keys["c_e"].shape[0] == 2 and r.keys["c_p"].shape[0] == 2  # "" and "a house"
    assert all(s.endswith("to_v") for s in r.sites()) and len(r.sites()) == 16


# -- SDXL and FLUX key spaces ------------------------------------------------------------------------


def test_sdxl_keys_span_both_text_encoders(sdxl):
    h = UCEHparams()
    r = uce_erase(sdxl, ["a cat"], h, preserve=["a dog"])
    width = sum(te.config.hidden_size for te in sdxl.text_encoders)  # 768 + 1280 = 2048 at scale 1
    assert r.keys["c_e"].shape[1] == width == sdxl.weight(r.sites()[0]).shape[1]
    assert len(r.sites()) == len(models.sites_matching(sdxl, "unet.xattn.*.to_[kv]"))
    site = r.sites()[-1]
    k, w = r.keys_for(site), sdxl.weight(site).detach()
    assert _residual(w + r.delta.dense(site), w, k["c_e"], k["v_star"], k["c_p"], h) <= 1e-5


def test_flux_edits_both_embedders_without_counting_the_bias_twice(flux):
    h = UCEHparams()
    r = uce_replace(flux, ["a cat"], ["a dog"], h, preserve=["a house"])
    assert sorted(r.sites()) == ["flux.context_embedder", "flux.text_embedder"]
    assert r.request["preserve"] == ["", "a house"]
    pooled = flux.pipe.encode_prompt(prompt=["a dog"], prompt_2=None, max_sequence_length=256)[1].float()
    for site in r.sites():
        k, mod = r.keys_for(site), flux.module(site)
        w = mod.weight.detach()
        assert mod.bias is not None and k["c_e"].shape == (1, w.shape[1])  # "last": one row per prompt
        assert _residual(w + r.delta.dense(site), w, k["c_e"], k["v_star"], k["c_p"], h) <= 1e-5
    v = r.keys["v_star:flux.text_embedder"]
    w = flux.weight("flux.text_embedder").detach()
    assert torch.allclose(v, pooled @ w.T, atol=1e-6)  # W c_guide, without the layer's bias
    assert not torch.allclose(v, flux.module("flux.text_embedder")(pooled).detach(), atol=1e-3)


# -- hparams and errors ------------------------------------------------------------------------------


def test_hparams_load_from_toml_and_json(tmp_path):
    (tmp_path / "u.toml").write_text("lam = 1\ntokens = 'last'\nsites = ['unet.xattn.0.to_v']\n")
    h = load_hparams(UCEHparams, tmp_path / "u.toml")
    assert h == UCEHparams(lam=1.0, tokens="last", sites=("unet.xattn.0.to_v",))
    (tmp_path / "d.json").write_text(json.dumps({"uce": {"preserve_scale": 0.1}, "max_rounds": 3}))
    d = load_hparams(DebiasHparams, tmp_path / "d.json")
    assert d.uce.preserve_scale == 0.1 and d.max_rounds == 3 and d.tolerance == 0.05
    assert load_hparams(ReFACTHparams, {"layer": 2}).layer == 2
    for bad, word in (({"lamb": 1}, "lamb"), ({"lam": "x"}, "lam"), ({"tokens": "all"}, "tokens")):
        with pytest.raises(FadelabError, match=word):
            load_hparams(UCEHparams, bad)
    with pytest.raises(FadelabError, match="does not exist"):
        load_hparams(UCEHparams, tmp_path / "nope.toml")


@pytest.mark.parametrize("call, match", [
    (lambda m: uce_erase(m, []), "no concept"),
    (lambda m: uce_erase(m, ["a cat", "  "]), "is empty"),
    (lambda m: uce_erase(m, ["word " * 80]), "80 CLIP tokens|tokens; sd14 reads at most 77"),
    (lambda m: uce_erase(m, ["cat"], preserve=["a black cat at night"]), "contains the edited concept 'cat'"),
    (lambda m: uce_replace(m, ["a cat", "a dog"], ["a lion"]), "2 concepts but 1 guides"),
    (lambda m: uce_erase(m, ["a cat"], UCEHparams(sites=("text.mlp.0.fc2",))), "text.mlp.0.fc2"),
])
def test_bad_input_is_one_clear_line(sd14, call, match):
    with pytest.raises(FadelabError, match=match) as e:
        call(sd14)
    assert "\n" not in str(e.value)
