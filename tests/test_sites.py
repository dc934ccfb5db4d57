"""Site names: documented names on every family, the same table at any width (the real
architectures are walked on the meta device), resolution, globbing and errors."""

import pytest
import torch
from torch import nn

from models import FadelabError, load, resolve, site_map, sites_matching
from models.build import _make, tokenizer
from models.configs import ARCHS, scaled
from models.families import _assemble

SMALL = {"sd14": 0.125, "sdxl": 0.0625, "flux-schnell": 0.03125}


@pytest.fixture(scope="module", params=list(SMALL))
def model(request):
    return load(request.param, "random", scale=SMALL[request.param])


def _meta_pipeline(family: str):
    """The real-width pipeline with its weights on the meta device (nothing allocated)."""
    parts = {}
    for name, c in scaled(family, 1.0).items():
        with torch.device("meta" if name != "scheduler" else "cpu"):
            parts[name] = _make(c)
    parts.update({name: tokenizer(kind) for name, kind in ARCHS[family].tokenizers.items()})
    return _assemble(ARCHS[family].pipeline, parts)


def test_site_table_is_the_same_at_real_width(model):
    real = site_map(_meta_pipeline(model.family))
    assert model.sites == real


def _names(prefix, n, parts):
    return {f"{prefix}.{i}.{p}" for i in range(n) for p in parts}


def test_documented_names(model):
    sites = set(model.sites)
    clip = _names("text.mlp", 12, ["fc1", "fc2"]) | _names("text.attn", 12, ["q", "k", "v", "out"])
    assert clip | {"text.embed.token"} <= sites
    assert model.sites["text.embed.token"].endswith("embeddings.token_embedding")
    assert model.sites["text.mlp.7.fc2"].endswith("encoder.layers.7.mlp.fc2")
    assert model.sites["text.attn.0.out"].endswith("encoder.layers.0.self_attn.out_proj")
    if model.family == "sd14":
        assert sites - clip - {"text.embed.token"} == _names("unet.xattn", 16, ["to_q", "to_k", "to_v", "to_out"]) | _names(
            "unet.sattn", 16, ["to_q", "to_k", "to_v", "to_out"]
        )
        assert model.sites["unet.xattn.0.to_k"] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        assert model.sites["unet.xattn.15.to_out"] == "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
        assert model.sites["unet.sattn.6.to_q"] == "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    if model.family == "sdxl":
        bigg = _names("text2.mlp", 32, ["fc1", "fc2"]) | _names("text2.attn", 32, ["q", "k", "v", "out"])
        assert bigg <= sites and model.sites["text2.mlp.31.fc1"].startswith("text_encoder_2.")
        assert len(sites_matching(model, "unet.xattn.*.to_k")) == 70  # 1*2*2 + 2*2*10 down, 3*10 + 3*2 up, 10 mid
    if model.family == "flux-schnell":
        t5 = _names("text2.mlp", 24, ["wi0", "wi1", "wo"]) | _names("text2.attn", 24, ["q", "k", "v", "o"])
        assert t5 | {"text2.embed.token"} <= sites
        assert model.sites["text2.mlp.3.wi1"] == "text_encoder_2.encoder.block.3.layer.1.DenseReluDense.wi_1"
        assert model.sites["flux.context_embedder"] == "transformer.context_embedder"
        assert model.sites["flux.text_embedder"] == "transformer.time_text_embed.text_embedder.linear_1"
        double = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out", "to_add_out"]
        assert _names("dit.attn", 19, double) | _names("dit.attn", 57, ["to_q", "to_k", "to_v"]) == {
            s for s in sites if s.startswith("dit.")
        }
        assert model.sites["dit.attn.19.to_q"] == "transformer.single_transformer_blocks.0.attn.to_q"


def test_resolve_returns_the_mapped_module(model):
    for site in sites_matching(model, "*.1*.*"):
        component, _, path = model.sites[site].partition(".")
        assert resolve(model, site) is getattr(model.pipe, component).get_submodule(path)
    assert resolve(model.pipe, "text.mlp.0.fc1") is model.module("text.mlp.0.fc1")
    assert isinstance(model.weight("text.embed.token"), nn.Parameter)


def test_raw_paths_are_sites_too():
    m = load("sd14", "random", scale=0.125)
    assert resolve(m, "unet.conv_in") is m.pipe.unet.conv_in
    bare = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert resolve(bare, "2") is bare[2]
    assert sites_matching(bare, "*") == ["0", "2"]  # modules that carry a weight


def test_globs_keep_table_order():
    m = load("sd14", "random", scale=0.125)
    assert sites_matching(m, "unet.xattn.*.to_k") == [f"unet.xattn.{i}.to_k" for i in range(16)]
    with pytest.raises(FadelabError, match="'unet.crossattn.\\*'"):
        sites_matching(m, "unet.crossattn.*")


def test_unknown_site_is_one_clear_line():
    m = load("sd14", "random", scale=0.125)
    with pytest.raises(FadelabError) as err:
        resolve(m, "unet.xattn.99.to_k")
    message = str(err.value)
    assert "'unet.xattn.99.to_k'" in message and "unet.xattn." in message and "\n" not in message
    with pytest.raises(FadelabError, match="cannot find sites"):
        site_map(object())
