"""WeightDelta algebra and apply/restore, against hand-written references on tiny modules, plus one
integration check on a width-scaled random SD1.4."""

import pytest
import torch
from torch import nn

from models import FadelabError, WeightDelta, apply_delta, delta_between, merge_delta, snapshot


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(6, 4)
        self.emb = nn.Embedding(10, 6)
        self.low = nn.Linear(6, 4).to(torch.bfloat16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def _factors(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dense_and_low_rank_agree():
    b, a = _factors(4, 6, 2, seed=1)
    low, dense = WeightDelta({"fc": (b, a)}), WeightDelta({"fc": b @ a})
    assert torch.equal(low.dense("fc"), dense.dense("fc"))
    m1, m2 = Tiny(), Tiny()
    with apply_delta(m1, low, alpha=0.5), apply_delta(m2, dense, alpha=0.5):
        assert torch.allclose(m1.fc.weight, m2.fc.weight)
    assert low.norm("fc") == pytest.approx(dense.norm("fc"), rel=1e-5)
    assert low.norm("fc") == pytest.approx(float(torch.linalg.matrix_norm(b @ a)), rel=1e-5)


def test_apply_matches_reference_and_restores_bit_for_bit():
    m = Tiny()
    before = _state(m)
    param = m.low.weight
    dw = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)) * 1e-3
    delta = WeightDelta({"low": dw, "emb": torch.ones(10, 6)})
    with apply_delta(m, delta, alpha=3.0) as same:
        assert same is m
        expected = (before["low.weight"].float() + 3.0 * dw).to(torch.bfloat16)  # fp32 sum, cast back
        assert torch.equal(m.low.weight, expected)
        assert torch.equal(m.emb.weight, before["emb.weight"] + 3.0)
        assert m.low.weight is param  # in place: the same Parameter
    assert _same(_state(m), before)


def test_restores_when_the_body_raises():
    m = Tiny()
    before = _state(m)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_delta(m, WeightDelta({"fc": torch.ones(4, 6)})):
            raise RuntimeError("boom")
    assert _same(_state(m), before)


def test_nested_blocks_restore_in_turn():
    m = Tiny()
    before = _state(m)
    d1, d2 = WeightDelta({"fc": torch.ones(4, 6)}), WeightDelta({"fc": 2 * torch.ones(4, 6), "low": torch.ones(4, 6)})
    with apply_delta(m, d1):
        after_outer = _state(m)
        with apply_delta(m, d2):
            assert torch.allclose(m.fc.weight, before["fc.weight"] + 3)
        assert _same(_state(m), after_outer)
    assert _same(_state(m), before)


def test_bad_site_or_shape_raises_before_any_change():
    m = Tiny()
    before = _state(m)
    with pytest.raises(FadelabError, match="'nope'"):
        with apply_delta(m, WeightDelta({"fc": torch.ones(4, 6), "nope": torch.ones(1)})):
            pass
    with pytest.raises(FadelabError, match=r"'fc'.*\(4, 6\)"):
        with apply_delta(m, WeightDelta({"emb": torch.ones(10, 6), "fc": torch.ones(6, 4)})):
            pass
    with pytest.raises(FadelabError, match=r"'fc'.*\(4, 6\)"):
        merge_delta(m, WeightDelta({"fc": _factors(4, 5, 1, seed=0)}))
    assert _same(_state(m), before)


def test_bad_factors_are_refused():
    with pytest.raises(FadelabError, match="'fc'"):
        WeightDelta({"fc": (torch.ones(4, 2), torch.ones(3, 6))})
    with pytest.raises(FadelabError, match="'fc'"):
        WeightDelta({"fc": [torch.ones(4, 6)]})


def test_arrays_from_the_store_are_accepted():
    b, a = _factors(4, 6, 2, seed=8)
    d = WeightDelta({"fc": [b.numpy(), a.numpy()], "emb": torch.ones(10, 6).numpy()})
    assert d.is_low_rank("fc") and torch.equal(d.dense("fc"), b @ a)
    assert isinstance(d.dense("emb"), torch.Tensor)


def test_composition_concatenates_low_rank_factors():
    (b1, a1), (b2, a2) = _factors(4, 6, 2, seed=3), _factors(4, 6, 3, seed=4)
    dense = torch.randn(10, 6, generator=torch.Generator().manual_seed(5))
    d1 = WeightDelta({"fc": (b1, a1)}, {"method": "uce"})
    d2 = WeightDelta({"fc": (b2, a2), "emb": dense}, {"method": "lora"})
    total = d1 + d2
    b, a = total.deltas["fc"]
    assert b.shape == (4, 5) and a.shape == (5, 6)  # rank r1 + r2
    assert torch.allclose(total.dense("fc"), b1 @ a1 + b2 @ a2, atol=1e-6)
    assert torch.equal(total.dense("emb"), dense)
    assert total.provenance["parents"] == [{"method": "uce"}, {"method": "lora"}]
    mixed = d1 + WeightDelta({"fc": torch.ones(4, 6)})
    assert not mixed.is_low_rank("fc")
    assert torch.allclose(mixed.dense("fc"), b1 @ a1 + 1)
    assert torch.allclose(sum([d1, d1]).dense("fc"), 2 * (b1 @ a1))
    assert torch.allclose((d2 - d2).dense("fc"), torch.zeros(4, 6), atol=1e-6)


def test_scale_and_to():
    b, a = _factors(4, 6, 2, seed=6)
    d = WeightDelta({"fc": (b, a), "emb": torch.ones(10, 6)})
    s = d.scale(-0.5)
    assert torch.allclose(s.dense("fc"), -0.5 * (b @ a))
    assert torch.equal(s.dense("emb"), torch.full((10, 6), -0.5))
    assert s.provenance["alpha"] == -0.5
    h = d.to(dtype=torch.float16)
    assert h.deltas["fc"][0].dtype == torch.float16 and h.dense("emb").dtype == torch.float16
    assert d.sites() == ["fc", "emb"]
    with pytest.raises(FadelabError, match="'nope'"):
        d.dense("nope")
    # to another device the tensors travel packed (one buffer per dtype); shapes, dtypes, the
    # factor layout and the site order are kept ("meta" stands in for a GPU here)
    mixed = WeightDelta({"fc": (b, a), "emb": torch.ones(10, 6, dtype=torch.bfloat16), "z": torch.zeros(0, 3)})
    m = mixed.to("meta")
    assert m.sites() == ["fc", "emb", "z"] and m.is_low_rank("fc") and not m.is_low_rank("emb")
    assert [t.device.type for t in (*m.deltas["fc"], m.deltas["emb"], m.deltas["z"])] == ["meta"] * 4
    assert m.deltas["fc"][1].shape == (2, 6) and m.deltas["emb"].dtype == torch.bfloat16
    assert m.to("meta", torch.float32).deltas["emb"].dtype == torch.float32


def test_pack_to_returns_exact_views_of_one_buffer():
    from models.delta import pack_to

    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(4, 6, generator=g), torch.randn(3, generator=g), torch.randn(2, 5, generator=g).T]
    out = pack_to(ts, "cpu", torch.float64)
    assert all(torch.equal(o, t.double()) for o, t in zip(out, ts))
    assert len({o.untyped_storage().data_ptr() for o in out}) == 1  # one buffer
    assert pack_to([], "cpu", torch.float32) == []


def test_merge_is_permanent_and_delta_between_recovers_it():
    m = Tiny()
    before = snapshot(m, ["fc", "emb"])
    dw = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    merge_delta(m, WeightDelta({"fc": dw}), alpha=2.0)
    after = snapshot(m, ["fc", "emb"])
    recovered = delta_between(before, after)
    assert torch.allclose(recovered.dense("fc"), 2.0 * dw, atol=1e-5)
    assert torch.equal(recovered.dense("emb"), torch.zeros(10, 6))
    assert snapshot(m, "f*").keys() == {"fc"}  # a glob over the bare module's paths
    with pytest.raises(FadelabError, match="different sites"):
        delta_between(before, {"fc": after["fc"]})


@pytest.fixture(scope="module")
def sd14():
    from models import load

    return load("sd14", "random", scale=0.125, seed=0)


def test_apply_on_a_pipeline_changes_output_and_restores_it(sd14):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, sd14.denoiser.config.cross_attention_dim, generator=g)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return sd14.denoiser(x, 10, encoder_hidden_states=ctx).sample

    base = run()
    w = sd14.weight("unet.xattn.0.to_v")
    delta = WeightDelta({"unet.xattn.0.to_v": torch.randn(w.shape, generator=g), "text.mlp.3.fc2": torch.zeros(
        sd14.weight("text.mlp.3.fc2").shape)})
    with apply_delta(sd14, delta):
        assert not torch.equal(run(), base)
    assert torch.equal(run(), base)


def test_a_site_may_name_a_parameter_of_a_module():
    m = Tiny()
    before = _state(m)
    db = torch.arange(4.0)
    delta = WeightDelta({"fc.bias": db, "fc": torch.ones(4, 6)})
    with apply_delta(m, delta, alpha=2.0):
        assert torch.equal(m.fc.bias, before["fc.bias"] + 2 * db)
        assert torch.equal(m.fc.weight, before["fc.weight"] + 2)
    assert _same(_state(m), before)
    snap = snapshot(m, ["fc.bias", "fc.weight", "fc"])
    assert torch.equal(snap["fc.bias"], before["fc.bias"]) and torch.equal(snap["fc.weight"], snap["fc"])
    with pytest.raises(FadelabError, match=r"'fc.bias'.*\(4,\)"):
        merge_delta(m, WeightDelta({"fc.bias": torch.ones(5)}))
    with pytest.raises(FadelabError, match="'fc.nope'"):
        merge_delta(m, WeightDelta({"fc.nope": torch.ones(4)}))
    assert _same(_state(m), before)


def test_parameter_sites_on_a_pipeline(sd14):
    site = "unet.xattn.0.to_out.bias"  # the table's module site plus a parameter name
    bias = sd14.module("unet.xattn.0.to_out").bias
    before = bias.detach().clone()
    with apply_delta(sd14, WeightDelta({site: torch.ones_like(bias), "unet.conv_in.bias": torch.ones(
            sd14.pipe.unet.conv_in.bias.shape)})):
        assert torch.equal(bias, before + 1)
    assert torch.equal(bias, before)
