"""What differs between families in the training step: the text conditioning and the loss.

Offers
    Objective                 the protocol the loop drives (tokenize, encode, draw, per_sample)
    EpsilonObjective          SD1.x-style pipelines (one CLIP text encoder, a UNet): DDPM noising,
                              epsilon or v prediction, min-SNR weighting optional
    SDXLObjective             SDXL: two CLIP towers, pooled embedding and time ids, DDPM noising
    FlowObjective             FLUX: rectified flow matching on packed latents, a transformer
    make_objective(model, hp, resolution, device) -> Objective
    family_kind(pipe) -> "sd" | "sdxl" | "flux"    (FadelabError for any other pipeline)
    denoiser_name(pipe), text_encoder_names(pipe)  the components the methods train

The loop (finetuning/loop.py) is the same for every family: it draws dataset indices, latent
samples and the objective's noise from one seeded generator per micro-batch, takes the cached (or
live) text conditioning, and asks the objective for the per-sample loss.

SD1.x (Rombach et al. 2022, eq. 2), as diffusers' train_text_to_image.py:

    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,  t ~ U{0, .., T-1},  target = eps (or v)
    L = w(t) || target - eps_theta(z_t, t, c) ||^2,   c = CLIP's last hidden state

SDXL (Podell et al. 2023), as train_text_to_image_sdxl.py / train_text_to_image_lora_sdxl.py: the
same DDPM objective; c = concat(CLIP-L penultimate hidden state, CLIP-bigG penultimate hidden
state) on the feature axis, pooled = CLIP-bigG's projected text_embeds, and time ids
(original size, crop top-left, target size) = (R, R, 0, 0, R, R) for training resolution R (images
are centre-cropped squares of side R), passed as added_cond_kwargs {"text_embeds", "time_ids"}.

FLUX (Esser et al. 2024, rectified flow), as train_dreambooth_lora_flux.py / train_dreambooth_flux.py:

    u ~ U[0, 1) (the recipes' weighting_scheme "none", their default), i = floor(u T),
    sigma = scheduler.sigmas[i] (schnell: shift 1, so sigma = 1 - i/T),
    z_t = (1 - sigma) z0 + sigma eps,  target = eps - z0,
    L = || target - v_theta(pack(z_t), sigma, T5(c), CLIP_pooled(c)) ||^2   (loss weight 1),

with z0 = (x_vae - shift_factor) * scaling_factor (finetuning/cache.py), latents packed into 2x2
patches by the pipeline's _pack_latents (the target packed the same way: a per-sample mean is
unchanged by the permutation), image ids from _prepare_latent_image_ids, text ids zeros, and the
transformer's timestep = sigma (the pipeline passes its scheduler timestep / 1000 = sigma; the
transformer multiplies by 1000 inside). Guidance-distilled transformers (guidance_embeds, FLUX.1
dev) get the recipes' guidance 3.5; schnell has none. T5 reads hp.max_sequence_length tokens
(None: 256 for schnell, 512 otherwise, the pipelines' model-card defaults).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.errors import FadelabError

#: the recipes' --guidance_scale for guidance-distilled FLUX transformers (FLUX.1 dev)
FLUX_TRAIN_GUIDANCE = 3.5

ACCEPTED = ("SD1.x-style (one CLIP text encoder and a UNet: organism, sd14, SD1.x folders), "
            "SDXL (two CLIP text encoders and a UNet) and FLUX (CLIP + T5 and a transformer)")


def family_kind(pipe: Any) -> str:
    """"sd", "sdxl" or "flux" for a pipeline's components; FadelabError for anything else."""
    has = {c for c in ("unet", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                       "vae", "scheduler") if getattr(pipe, c, None) is not None}
    common = {"text_encoder", "tokenizer", "vae", "scheduler"}
    if common <= has and "unet" in has and "text_encoder_2" not in has:
        return "sd"
    if common <= has and {"unet", "text_encoder_2", "tokenizer_2"} <= has:
        return "sdxl"
    if common <= has and {"transformer", "text_encoder_2", "tokenizer_2"} <= has \
            and type(pipe).__name__.startswith("Flux"):
        return "flux"
    raise FadelabError(f"fine-tuning supports {ACCEPTED}; a {type(pipe).__name__} with components "
                       f"{', '.join(sorted(has)) or 'none'} is none of them")


def denoiser_name(pipe: Any) -> str:
    """The pipeline component that denoises: "unet", or "transformer" for FLUX."""
    return "transformer" if family_kind(pipe) == "flux" else "unet"


def text_encoder_names(pipe: Any) -> tuple[str, ...]:
    """The text encoders a method may train: SD1.x's one, both of SDXL's CLIP towers (as
    train_dreambooth_lora_sdxl.py's --train_text_encoder), FLUX's CLIP only (as
    train_dreambooth_lora_flux.py: T5 stays frozen)."""
    return {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
            "flux": ("text_encoder",)}[family_kind(pipe)]


def _autocast(objective: "Objective"):
    """The training forward's autocast: hp's precision, without the cast cache under CUDA graphs
    (the training loop clears objective.autocast_cache when it captures the denoiser)."""
    from .cache import _autocast as autocast

    return autocast(objective.device, objective.hp.mixed_precision == "bf16", cache=objective.autocast_cache)


class Objective:
    """One family's conditioning and loss.

    Attributes:
        kind: "sd", "sdxl" or "flux".
        denoiser: the denoising component's name.
        text_components: the pipeline's text encoders, in the order `encode` reads them.
        latent_channels: channels of z0 (the VAE latent).
        autocast_cache: whether the training forward's autocast caches casts (True; the loop sets
            False when it captures the denoiser as CUDA graphs).
    """

    kind = ""
    denoiser = "unet"
    text_components: tuple[str, ...] = ("text_encoder",)

    def __init__(self, pipe: Any, hp: Any, resolution: int, device: torch.device, family: str = "") -> None:
        self.hp, self.resolution, self.device, self.family = hp, resolution, device, family
        self.autocast_cache = True
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.latent_size = resolution // self.vae_scale_factor

    # -- text ------------------------------------------------------------------------------------

    def tokenizers(self, pipe: Any) -> tuple[list[Any], list[int | None]]:
        """The tokenizers and their padding lengths (None: model_max_length)."""
        return [pipe.tokenizer], [None]

    def encode(self, encoders: list[nn.Module], ids: Any) -> tuple[Tensor, ...]:
        """The conditioning for token ids (one tensor, or a tuple per tokenizer)."""
        raise NotImplementedError

    # -- noise and loss --------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def draw(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        """Noise (n, C, h, w) and timesteps (n,) from `g` (one draw for the global batch)."""
        raise NotImplementedError

    def per_sample(self, denoiser: nn.Module, z0: Tensor, eps: Tensor, t: Tensor, cond: tuple[Tensor, ...],
                   dtype: torch.dtype) -> Tensor:
        """The loss of each sample (B,)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"objective": self.kind}


class EpsilonObjective(Objective):
    """SD1.x: DDPM noising with the scheduler's parameterisation (epsilon or v), min-SNR optional."""

    kind = "sd"

    def __init__(self, pipe: Any, hp: Any, resolution: int, device: torch.device, family: str = "") -> None:
        from diffusers import DDPMScheduler

        super().__init__(pipe, hp, resolution, device, family)
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
        if self.noise.config.prediction_type not in ("epsilon", "v_prediction"):
            raise FadelabError(f"prediction_type {self.noise.config.prediction_type!r} is not supported; "
                               "epsilon and v_prediction are")
        self.noise.alphas_cumprod = self.noise.alphas_cumprod.to(device)
        self.latent_channels = int(pipe.unet.config.in_channels)

    def encode(self, encoders: list[nn.Module], ids: Any) -> tuple[Tensor, ...]:
        ids = ids[0] if isinstance(ids, tuple) else ids
        return (encoders[0](ids.to(self.device), return_dict=False)[0],)

    def draw(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        eps = torch.randn((n, *self.latent_shape), generator=g, device=self.device)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (n,), generator=g, device=self.device)
        return eps, t

    def predict(self, denoiser: nn.Module, zt: Tensor, t: Tensor, cond: tuple[Tensor, ...]) -> Tensor:
        return denoiser(zt, t, encoder_hidden_states=cond[0], return_dict=False)[0]

    def per_sample(self, denoiser, z0, eps, t, cond, dtype) -> Tensor:
        zt = self.noise.add_noise(z0, eps, t)
        v = self.noise.config.prediction_type == "v_prediction"
        target = self.noise.get_velocity(z0, eps, t) if v else eps
        with _autocast(self):
            pred = self.predict(denoiser, zt.to(dtype), t, tuple(c.to(dtype) for c in cond))
        per = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if self.hp.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise, t)
            w = torch.clamp(snr, max=self.hp.snr_gamma)
            per = per * (w / (snr + 1) if v else w / snr)
        return per

    def info(self) -> dict[str, Any]:
        return {"objective": self.kind, "prediction_type": self.noise.config.prediction_type}


class SDXLObjective(EpsilonObjective):
    """SDXL: both CLIP towers' penultimate hidden states, CLIP-bigG's pooled embedding, time ids."""

    kind = "sdxl"
    text_components = ("text_encoder", "text_encoder_2")

    def tokenizers(self, pipe: Any) -> tuple[list[Any], list[int | None]]:
        return [pipe.tokenizer, pipe.tokenizer_2], [None, None]

    def encode(self, encoders: list[nn.Module], ids: Any) -> tuple[Tensor, ...]:
        hidden, pooled = [], None
        for encoder, x in zip(encoders, ids):
            out = encoder(x.to(self.device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last tower's projected text_embeds, as StableDiffusionXLPipeline
        return torch.cat(hidden, dim=-1), pooled

    def time_ids(self, n: int, dtype: torch.dtype) -> Tensor:
        r = self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=dtype, device=self.device).repeat(n, 1)

    def predict(self, denoiser, zt, t, cond) -> Tensor:
        hidden, pooled = cond
        added = {"text_embeds": pooled, "time_ids": self.time_ids(len(zt), zt.dtype)}
        return denoiser(zt, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


class FlowObjective(Objective):
    """FLUX: rectified flow matching on packed latents (see the module doc)."""

    kind = "flux"
    denoiser = "transformer"
    text_components = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe: Any, hp: Any, resolution: int, device: torch.device, family: str = "") -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipe, hp, resolution, device, family)
        if resolution % (2 * self.vae_scale_factor):
            raise FadelabError(f"FLUX packs 2x2 latent patches: the resolution must be a multiple of "
                               f"{2 * self.vae_scale_factor} pixels, got {resolution}")
        if hp.snr_gamma is not None:
            raise FadelabError(f"snr_gamma={hp.snr_gamma} weights the DDPM loss; FLUX trains by flow matching "
                               "(uniform sigma, weight 1): give snr_gamma=None")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.latent_channels = int(pipe.vae.config.latent_channels)
        self.pack = pipe._pack_latents
        self.image_ids = pipe._prepare_latent_image_ids(1, self.latent_size // 2, self.latent_size // 2,
                                                        device, torch.float32)
        guided = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
        self.guidance = FLUX_TRAIN_GUIDANCE if guided else None
        self.max_sequence_length = hp.max_sequence_length or (256 if "schnell" in family else 512)

    def tokenizers(self, pipe: Any) -> tuple[list[Any], list[int | None]]:
        return [pipe.tokenizer, pipe.tokenizer_2], [None, self.max_sequence_length]

    def encode(self, encoders: list[nn.Module], ids: Any) -> tuple[Tensor, ...]:
        clip_ids, t5_ids = ids
        pooled = encoders[0](clip_ids.to(self.device), output_hidden_states=False, return_dict=True).pooler_output
        hidden = encoders[1](t5_ids.to(self.device), output_hidden_states=False, return_dict=True)[0]
        return hidden, pooled

    def draw(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        eps = torch.randn((n, *self.latent_shape), generator=g, device=self.device)
        u = torch.rand((n,), generator=g, device=self.device)  # weighting_scheme "none"
        i = (u * self.num_train_timesteps).long().clamp(max=len(self.sigmas) - 1)
        return eps, self.sigmas[i]

    def per_sample(self, denoiser, z0, eps, t, cond, dtype) -> Tensor:
        sigma = t.view(-1, 1, 1, 1)
        zt = (1.0 - sigma) * z0 + sigma * eps
        target = eps - z0
        b, c, h, w = zt.shape
        hidden, pooled = (x.to(dtype) for x in cond)
        text_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=dtype)
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=self.device)
        with _autocast(self):
            pred = denoiser(hidden_states=self.pack(zt.to(dtype), b, c, h, w), timestep=t.to(dtype),
                            guidance=guidance, pooled_projections=pooled, encoder_hidden_states=hidden,
                            txt_ids=text_ids, img_ids=self.image_ids.to(dtype), return_dict=False)[0]
        packed = self.pack(target, b, c, h, w)
        return F.mse_loss(pred.float(), packed, reduction="none").mean(dim=(1, 2))  # (B,)

    def info(self) -> dict[str, Any]:
        return {"objective": self.kind, "weighting_scheme": "none (uniform sigma)",
                "max_sequence_length": self.max_sequence_length, "guidance": self.guidance}


OBJECTIVES = {"sd": EpsilonObjective, "sdxl": SDXLObjective, "flux": FlowObjective}


def default_resolution(pipe: Any) -> int:
    """The family's native training resolution: SD1.x/SDXL unet sample_size x VAE factor (512,
    1024, 64 for the organism); FLUX the pipeline's default_sample_size x VAE factor (1024)."""
    if family_kind(pipe) == "flux":
        return int(getattr(pipe, "default_sample_size", 128)) * int(pipe.vae_scale_factor)
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def make_objective(model: Any, hp: Any, resolution: int, device: torch.device) -> Objective:
    """The objective for a models.Model's pipeline."""
    return OBJECTIVES[family_kind(model.pipe)](model.pipe, hp, resolution, device, str(getattr(model, "family", "")))
