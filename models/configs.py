"""Architectures as data: the real component configs of each family, and width-scaled variants.

The configs below are facts about the released checkpoints, written as the keyword arguments
of the diffusers / transformers classes that build them. Sources, read with the search tool:
the hub repos' config.json files as quoted in public code (CompVis/stable-diffusion-v1-4,
stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-schnell, google/t5-v1_1-xxl).
Checks in tests: SD1.4's UNet has 859,520,964 parameters.

`scaled(family, scale)` shrinks widths and keeps structure, so a CPU test sees every block,
layer, attention module and site name of the real model:

    width'  = max(32, 32 * round(width * scale / 32))          conv channels (GroupNorm(32, .))
    heads'  = max(1, round(heads * scale))                      then cut to a divisor of width'
    d_head' = max(8, 8 * round(hidden * scale / heads' / 8))    transformer towers
    hidden' = heads' * d_head'

Layer and block counts, vocabularies, latent channels and patching never change; widths that
must agree across components (cross_attention_dim, joint_attention_dim, pooled_projection_dim,
projection_class_embeddings_input_dim) are derived from the scaled text encoders, as in the
real model. scale = 1 returns the real configs unchanged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from models.errors import FadelabError


@dataclass(frozen=True)
class Component:
    """One buildable part of a pipeline.

    Attributes:
        library: "diffusers" or "transformers".
        cls: the class name in that library (e.g. "UNet2DConditionModel").
        config: constructor keyword arguments (diffusers) or config fields (transformers).
    """

    library: str
    cls: str
    config: Mapping[str, Any]


@dataclass(frozen=True)
class Arch:
    """A family's architecture.

    Attributes:
        pipeline: the diffusers pipeline class name.
        components: component name -> Component (models and scheduler).
        tokenizers: tokenizer component name -> tokenizer kind: "clip" (the shipped CLIP BPE),
            "clip-bigG" (same BPE, pad token "!" as OpenCLIP bigG), or "t5-standin" (see
            models.build.t5_standin_tokenizer).
    """

    pipeline: str
    components: Mapping[str, Component]
    tokenizers: Mapping[str, str]


def _frozen(d: dict) -> Mapping[str, Any]:
    return MappingProxyType(d)


# -- shared parts --------------------------------------------------------------------------------

# openai/clip-vit-large-patch14 text tower, as in SD1.4's text_encoder/config.json; SDXL's text_encoder
# is the same tower (confirmed: quick_gelu, 768, 12 x 12, 3072, projection 768). FLUX.1's text_encoder
# is also CLIP-L; its config.json could not be read here, so the special-token ids below are SD1.4's.
# eos_token_id 2 is the legacy value these checkpoints ship; transformers then pools at
# argmax(input_ids), the <|endoftext|> token.
CLIP_L = _frozen(
    dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
)

# laion/CLIP-ViT-bigG-14 text tower with projection: SDXL's text_encoder_2/config.json (widths, depth,
# gelu and projection confirmed; special-token ids assumed equal to CLIP-L's).
CLIP_BIGG = _frozen(
    {**CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
     "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu"}
)

# google/t5-v1_1-xxl encoder: FLUX.1's text_encoder_2/config.json.
T5_XXL = _frozen(
    dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        initializer_factor=1.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
)

_VAE_BLOCKS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
)

# SD1.4 vae/config.json; scaling_factor is diffusers' default there (0.18215). sample_size 512 as in
# the SD v1 VAE configs (not confirmed for the v1-4 repo itself; it does not change any weight).
VAE_SD = _frozen({**_VAE_BLOCKS, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215})
VAE_SDXL = _frozen(
    {**_VAE_BLOCKS, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
)
VAE_FLUX = _frozen(
    {**_VAE_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
     "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
     "mid_block_add_attention": True, "force_upcast": True}
)

_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# -- the families --------------------------------------------------------------------------------

UNET_SD14 = _frozen(
    dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,
        attention_head_dim=8,  # diffusers' legacy name: 8 heads per block (head width = channels / 8)
    )
)

UNET_SDXL = _frozen(
    dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=2048,  # 768 (CLIP-L) + 1280 (bigG) hidden states, concatenated
        attention_head_dim=(5, 10, 20),  # heads per block; 64 channels per head
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        addition_embed_type_num_heads=64,
        projection_class_embeddings_input_dim=2816,  # 6 * 256 (size/crop/target ids) + 1280 (pooled bigG)
    )
)

FLUX_SCHNELL_TRANSFORMER = _frozen(
    dict(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2 x 2 packed patch
        out_channels=None,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,  # T5-XXL d_model
        pooled_projection_dim=768,  # CLIP-L pooled output
        guidance_embeds=False,  # schnell is guidance-distilled without a guidance embedding (dev: True)
        axes_dims_rope=(16, 56, 56),  # sums to attention_head_dim
    )
)

ARCHS: Mapping[str, Arch] = _frozen(
    {
        "sd14": Arch(
            pipeline="StableDiffusionPipeline",
            components=_frozen(
                {
                    "unet": Component("diffusers", "UNet2DConditionModel", UNET_SD14),
                    "text_encoder": Component("transformers", "CLIPTextModel", CLIP_L),
                    "vae": Component("diffusers", "AutoencoderKL", VAE_SD),
                    # scheduler/scheduler_config.json of CompVis/stable-diffusion-v1-4
                    "scheduler": Component(
                        "diffusers",
                        "PNDMScheduler",
                        _frozen({**_BETAS, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}),
                    ),
                }
            ),
            tokenizers=_frozen({"tokenizer": "clip"}),
        ),
        "sdxl": Arch(
            pipeline="StableDiffusionXLPipeline",
            components=_frozen(
                {
                    "unet": Component("diffusers", "UNet2DConditionModel", UNET_SDXL),
                    "text_encoder": Component("transformers", "CLIPTextModel", CLIP_L),
                    "text_encoder_2": Component("transformers", "CLIPTextModelWithProjection", CLIP_BIGG),
                    "vae": Component("diffusers", "AutoencoderKL", VAE_SDXL),
                    "scheduler": Component(
                        "diffusers",
                        "EulerDiscreteScheduler",
                        _frozen(
                            {**_BETAS, "prediction_type": "epsilon", "interpolation_type": "linear",
                             "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": False}
                        ),
                    ),
                }
            ),
            tokenizers=_frozen({"tokenizer": "clip", "tokenizer_2": "clip-bigG"}),
        ),
        "flux-schnell": Arch(
            pipeline="FluxPipeline",
            components=_frozen(
                {
                    "transformer": Component("diffusers", "FluxTransformer2DModel", FLUX_SCHNELL_TRANSFORMER),
                    "text_encoder": Component("transformers", "CLIPTextModel", CLIP_L),
                    "text_encoder_2": Component("transformers", "T5EncoderModel", T5_XXL),
                    "vae": Component("diffusers", "AutoencoderKL", VAE_FLUX),
                    "scheduler": Component(
                        "diffusers",
                        "FlowMatchEulerDiscreteScheduler",
                        # shift 1.0 and use_dynamic_shifting False confirmed for schnell; the
                        # base/max shift and sequence lengths are diffusers' defaults (unused then)
                        _frozen(
                            dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                                 base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
                        ),
                    ),
                }
            ),
            tokenizers=_frozen({"tokenizer": "clip", "tokenizer_2": "t5-standin"}),
        ),
    }
)


# -- scaling ---------------------------------------------------------------------------------------


def _round(x: float, multiple: int) -> int:
    """multiple * round(x / multiple), at least `multiple` (half rounds up)."""
    return max(multiple, multiple * int(x / multiple + 0.5))


def _heads(heads: int, scale: float, width: int | None = None) -> int:
    """max(1, round(heads * scale)), cut to the largest divisor of `width` when given."""
    h = max(1, int(heads * scale + 0.5))
    if width is not None:
        while width % h:
            h -= 1
    return h


def _clip(cfg: Mapping[str, Any], s: float) -> dict:
    heads = _heads(cfg["num_attention_heads"], s)
    d_head = _round(cfg["hidden_size"] * s / heads, 8)
    hidden = heads * d_head
    ratio = hidden / cfg["hidden_size"]
    return {
        **cfg,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": _round(cfg["intermediate_size"] * ratio, 8),
        "projection_dim": _round(cfg["projection_dim"] * ratio, 8),
    }


def _t5(cfg: Mapping[str, Any], s: float) -> dict:
    heads = _heads(cfg["num_heads"], s)
    d_model = _round(cfg["d_model"] * s, 8)
    return {**cfg, "d_model": d_model, "num_heads": heads, "d_kv": _round(d_model / heads, 8),
            "d_ff": _round(cfg["d_ff"] * s, 8)}


def _vae(cfg: Mapping[str, Any], s: float) -> dict:
    return {**cfg, "block_out_channels": tuple(_round(c * s, 32) for c in cfg["block_out_channels"])}


def _unet(cfg: Mapping[str, Any], s: float, cross_dim: int, pooled_dim: int | None) -> dict:
    channels = tuple(_round(c * s, 32) for c in cfg["block_out_channels"])
    head_spec = cfg["attention_head_dim"]
    per_block = head_spec if isinstance(head_spec, tuple) else (head_spec,) * len(channels)
    heads = tuple(_heads(h, s, c) for h, c in zip(per_block, channels))
    out = {**cfg, "block_out_channels": channels, "cross_attention_dim": cross_dim,
           "attention_head_dim": heads if isinstance(head_spec, tuple) or len(set(heads)) > 1 else heads[0]}
    if cfg.get("addition_embed_type") == "text_time":
        time_dim = _round(cfg["addition_time_embed_dim"] * s, 8)
        out["addition_time_embed_dim"] = time_dim
        out["projection_class_embeddings_input_dim"] = 6 * time_dim + pooled_dim
    return out


def _flux(cfg: Mapping[str, Any], s: float, joint_dim: int, pooled_dim: int) -> dict:
    heads = _heads(cfg["num_attention_heads"], s)
    d_head = _round(cfg["attention_head_dim"] * cfg["num_attention_heads"] * s / heads, 8)
    axes = [2 * max(1, int(a * d_head / cfg["attention_head_dim"] / 2 + 0.5)) for a in cfg["axes_dims_rope"]]
    axes[-1] += d_head - sum(axes)  # RoPE axes must sum to the head width
    return {**cfg, "num_attention_heads": heads, "attention_head_dim": d_head, "axes_dims_rope": tuple(axes),
            "joint_attention_dim": joint_dim, "pooled_projection_dim": pooled_dim}


def check_scale(scale: Any) -> float:
    """Return `scale` as a float, or raise FadelabError unless 0 < scale <= 1."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale <= 1) or math.isnan(scale):
        raise FadelabError(f"scale must be a number with 0 < scale <= 1 (1 is the real model), got {scale!r}")
    return float(scale)


def scaled(family: str, scale: float = 1.0) -> dict[str, Component]:
    """Component name -> Component for `family` with widths multiplied by `scale` (see module doc).

    scale = 1 gives the real configs. Raises FadelabError for an unknown family or a bad scale.
    """
    if family not in ARCHS:
        raise FadelabError(f"no built-in architecture for {family!r}; known: {', '.join(ARCHS)}")
    s = check_scale(scale)
    comps = {name: Component(c.library, c.cls, copy.deepcopy(dict(c.config)))
             for name, c in ARCHS[family].components.items()}
    if s == 1.0:
        return comps

    def put(name: str, config: dict) -> None:
        comps[name] = Component(comps[name].library, comps[name].cls, config)

    text = _clip(comps["text_encoder"].config, s)
    put("text_encoder", text)
    put("vae", _vae(comps["vae"].config, s))
    if family == "sd14":
        put("unet", _unet(comps["unet"].config, s, cross_dim=text["hidden_size"], pooled_dim=None))
    elif family == "sdxl":
        text2 = _clip(comps["text_encoder_2"].config, s)
        put("text_encoder_2", text2)
        put("unet", _unet(comps["unet"].config, s, cross_dim=text["hidden_size"] + text2["hidden_size"],
                          pooled_dim=text2["projection_dim"]))
    elif family == "flux-schnell":
        t5 = _t5(comps["text_encoder_2"].config, s)
        put("text_encoder_2", t5)
        put("transformer", _flux(comps["transformer"].config, s, joint_dim=t5["d_model"],
                                 pooled_dim=text["hidden_size"]))
    return comps
