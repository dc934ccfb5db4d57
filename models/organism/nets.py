"""The organism's networks: Stable Diffusion's classes at a small size, and its own CLIP.

What it offers:
    OrganismConfig          sizes of every network (a frozen dataclass, documented per field)
    build_text_model(cfg)   transformers CLIPModel (text + vision towers), the organism's CLIP
    build_vae(cfg)          diffusers AutoencoderKL, 64 px -> 16x16x4 latents (factor 4)
    build_unet(cfg)         diffusers UNet2DConditionModel with cross-attention to the text tower
    build_scheduler()       the training noise schedule (SD1.4's betas) and the sampler
    tokenizer()             the real CLIP BPE tokenizer (files derived from open_clip's merges)
    save_clip(model, folder, cfg)  the CLIP's vision tower and projections (folder/clip/)
    load_clip(folder)       the organism's CLIPModel, assembled from text_encoder/ and clip/

Layout of the shipped folder (models/organism/weights), loadable by
`StableDiffusionPipeline.from_pretrained`; unknown subfolders are ignored by diffusers:

    model_index.json  scheduler/  tokenizer/  text_encoder/  vae/  unet/   (diffusers)
    clip/     vision tower with projection, text projection and logit scale (transformers)
    oracle/   the oracle CNN (models/organism/oracle.py)
    card.json the measured acceptance card
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"
TOKENIZER_DIR = WEIGHTS_DIR / "tokenizer"


def judges_folder(weights) -> Path | None:
    """The organism folder whose oracle and CLIP judge a model loaded from `weights` (a Model's
    `.weights`, or the spec given to models.load: "hub", "random", a folder): that folder when it
    holds both an oracle/ and a clip/ (a retrain is judged by its own, as
    scripts/device_organism_retrain.sh's swap judges it), else None, which every judge reads as
    the shipped ones."""
    if weights is None:
        return None
    folder = Path(str(weights))
    return folder if (folder / "oracle").is_dir() and (folder / "clip").is_dir() else None


def oracle_dir(weights) -> Path | None:
    """The oracle/ folder of judges_folder(weights), or None (the shipped oracle)."""
    folder = judges_folder(weights)
    return None if folder is None else folder / "oracle"


@dataclass(frozen=True)
class OrganismConfig:
    """Sizes of the organism's networks.

    Attributes:
        image_size: pixels per side of images (the renderer's output).
        text_width: hidden size of the CLIP text tower (= the UNet's cross_attention_dim).
        text_layers: transformer layers of the text tower (ReFACT edits one layer's MLP fc2).
        text_heads: attention heads of the text tower.
        vision_width, vision_layers, vision_patch: the CLIP image tower (a ViT).
        embed_dim: CLIP's joint embedding size.
        vae_channels: AutoencoderKL block widths; len - 1 downsamplings (3 -> factor 4).
        latent_channels: channels of the latent (4, as Stable Diffusion).
        unet_channels: UNet2DConditionModel block widths: the last three levels are two
            cross-attention levels and one plain, as shipped; any level before them is plain
            (no attention), the full-resolution level a 2-level VAE's 32x32 latents add.
        unet_layers_per_block: ResNet/attention layers per UNet block.
        unet_heads: attention heads per UNet attention layer.
    """

    image_size: int = 64
    text_width: int = 128
    text_layers: int = 6
    text_heads: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_patch: int = 8
    embed_dim: int = 128
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 2
    unet_heads: int = 4

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


#: `fadelab organism train --vae-levels`: VAE block widths by level count (levels - 1 halvings of
#: the 64 px image); 3 is the shipped organism's
VAE_LEVELS = {3: (32, 64, 64), 2: (32, 64)}


def sizes_for_vae_levels(levels: int, latent_channels: int = 4) -> OrganismConfig:
    """The organism's sizes with a `levels`-level VAE (a key of VAE_LEVELS) and `latent_channels`
    latent channels (4 is the shipped organism's; more keep more of a 64 px render at the same
    latent size, as SD3's and FLUX's 16 do, while the UNet changes only in its first and last
    convolutions).

    The UNet keeps its cross-attention on 16x16 and 8x8 latents and gains, in front, one plain
    level of 32 channels for each halving the VAE gives up. On the CPU (batch 32, forward and
    backward, 2026-12-04) a step of that UNet on 32x32 latents costs 1.1x the shipped UNet's on
    16x16, where the shipped UNet itself on 32x32 costs 4.5x, with attention over 1,024 positions;
    on an H200 at batch 1,024 it trained at 5.9 steps/s against 8.1 (1.38x; docs/organism.md, v3).
    """
    shipped = OrganismConfig()
    extra = len(shipped.vae_channels) - levels
    return OrganismConfig(vae_channels=VAE_LEVELS[levels], latent_channels=latent_channels,
                          unet_channels=(32,) * extra + shipped.unet_channels)


def text_core(text_encoder):
    """The module holding embeddings/encoder/final_layer_norm of a CLIPTextModel.

    transformers 4 nests them under `.text_model`; transformers 5 puts them on the model itself.
    """
    return getattr(text_encoder, "text_model", text_encoder)


def tokenizer(folder: Path | str = TOKENIZER_DIR):
    """The real CLIP BPE tokenizer (49,408 entries, 77 positions, pads with <|endoftext|>)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def _text_config(cfg: OrganismConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=cfg.text_width,
                          intermediate_size=4 * cfg.text_width,
                          num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                          max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=cfg.embed_dim, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)


def _vision_config(cfg: OrganismConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=cfg.image_size, patch_size=cfg.vision_patch,
                            hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                            num_hidden_layers=cfg.vision_layers, num_attention_heads=4,
                            projection_dim=cfg.embed_dim, hidden_act="quick_gelu")


def build_text_model(cfg: OrganismConfig = OrganismConfig()):
    """The organism's CLIP: a CLIPModel whose text tower becomes the pipeline's text_encoder."""
    from transformers import CLIPConfig, CLIPModel

    conf = CLIPConfig(text_config=_text_config(cfg).to_dict(),
                      vision_config=_vision_config(cfg).to_dict(), projection_dim=cfg.embed_dim)
    return CLIPModel(conf)


def build_vae(cfg: OrganismConfig = OrganismConfig()):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_channels,
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=32,
                         sample_size=cfg.image_size)


def build_unet(cfg: OrganismConfig = OrganismConfig()):
    from diffusers import UNet2DConditionModel

    plain = len(cfg.unet_channels) - 3  # full-resolution levels without attention (sizes_for_vae_levels)
    if plain < 0:
        raise ValueError(f"unet_channels {cfg.unet_channels}: give at least 3 levels")
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D") + ("UpBlock2D",) * plain,
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.unet_heads, norm_num_groups=32)


def build_scheduler():
    """SD1.4's noise schedule (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon).

    Returns (training scheduler, sampling scheduler). Sampling uses DPM-Solver++ (2M), which
    reaches DDIM-50 quality in about 20 steps.
    """
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
              beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1)
    return DDPMScheduler(**kw, clip_sample=False), DPMSolverMultistepScheduler(**kw)


def save_clip(model, folder: Path, cfg: OrganismConfig, dtype=torch.float16) -> None:
    """Write folder/clip/: the CLIP's vision tower, both projections and the logit scale.

    The text tower is not repeated here: it is the pipeline's text_encoder/ (see load_clip).
    """
    from safetensors.torch import save_file

    clip_dir = Path(folder) / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    vis = {f"vision_model.{k}": v for k, v in model.vision_model.state_dict().items()}
    vis["visual_projection.weight"] = model.visual_projection.weight
    vis["text_projection.weight"] = model.text_projection.weight
    vis["logit_scale"] = model.logit_scale.reshape(1)
    save_file({k: v.detach().to(dtype).cpu().contiguous() for k, v in vis.items()},
              clip_dir / "model.safetensors")
    (clip_dir / "config.json").write_text(json.dumps(
        {"organism": asdict(cfg), "clip": model.config.to_dict()}, indent=1, default=str))


def load_clip(folder: Path | str = WEIGHTS_DIR, device="cpu", dtype=torch.float32, text_encoder=None):
    """The organism's CLIPModel, assembled from text_encoder/ (or a given, possibly edited,
    text encoder) and clip/. Scores follow CLIP: logits = exp(logit_scale) * cos(text, image)."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel

    folder = Path(folder)
    meta = json.loads((folder / "clip" / "config.json").read_text())
    model = CLIPModel(CLIPConfig(**{k: v for k, v in meta["clip"].items()
                                    if k in ("text_config", "vision_config", "projection_dim")}))
    state = load_file(folder / "clip" / "model.safetensors")
    if text_encoder is None:
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    state.update({f"text_model.{k}": v for k, v in text_core(text_encoder).state_dict().items()})
    state["logit_scale"] = state["logit_scale"].reshape(())
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if "position_ids" not in m]
    if missing or unexpected:
        raise RuntimeError(f"organism CLIP weights do not match: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model.to(device=device, dtype=dtype).eval()
