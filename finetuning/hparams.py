"""Hyperparameters of the five fine-tuning methods: one frozen dataclass per method.

Offers
    TrainHParams             the fields every method shares (the loop reads these)
    FullHParams              full fine-tuning of the UNet (diffusers examples/text_to_image/train_text_to_image.py)
    LoraHParams              LoRA through peft (train_text_to_image_lora.py; text encoder by default, as the study)
    DoraHParams              DoRA (LoRA with use_dora=True) trained with Prodigy at lr 1.0, as the study
    DreamBoothHParams        Ruiz et al.'s DreamBooth with prior preservation (examples/dreambooth/train_dreambooth.py)
    TextualInversionHParams  Gal et al.'s textual inversion (examples/textual_inversion/textual_inversion.py)
    METHODS                  method name -> dataclass ("full", "lora", "dora", "dreambooth", "textual-inversion")
    ORGANISM                 method name -> the organism's overrides of the SD-scale defaults
    defaults(method, family) the defaults for a family: SD scale for real families, ORGANISM for "organism"
    load(path, family=None)  hparams from a TOML or JSON file with a `method` key (missing fields: defaults)
    to_dict(hp)              a JSON-ready dict with the method name

Defaults of every dataclass are the diffusers reference recipes at Stable Diffusion scale (512 px,
batch 1, the README commands of each example). The organism (64 px, 8.75M-parameter UNet) needs
other step counts, batches and learning rates; ORGANISM holds them, with the measurements behind
each in docs/finetuning.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from models.errors import FadelabError

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("adamw", "prodigy")
LORA_TARGETS = ("text", "unet", "both")
#: peft target_modules per component, as the diffusers recipes (UNet: train_text_to_image_lora.py;
#: text encoder: train_dreambooth_lora.py's text-encoder LoRA)
LORA_MODULES = {"unet": ("to_k", "to_q", "to_v", "to_out.0"), "text": ("q_proj", "k_proj", "v_proj", "out_proj")}


@dataclass(frozen=True)
class TrainHParams:
    """Fields every method shares.

    Attributes:
        steps: optimizer steps (diffusers' max_train_steps).
        batch_size: images per process per micro-batch (train_batch_size).
        grad_accum: micro-batches per optimizer step (gradient_accumulation_steps).
        lr: learning rate (for Prodigy the multiplier d_coef scales, 1.0 as recommended).
        scale_lr: multiply lr by batch_size * grad_accum * processes (diffusers' --scale_lr).
        lr_scheduler: constant, constant_with_warmup, linear or cosine (diffusers.optimization).
        warmup_steps: learning-rate warm-up steps.
        optimizer: "adamw" (torch.optim.AdamW) or "prodigy" (prodigyopt.Prodigy).
        adam_beta1, adam_beta2, adam_eps, weight_decay: optimizer settings (AdamW and Prodigy).
        prodigy_beta3, prodigy_decouple, prodigy_bias_correction, prodigy_safeguard_warmup:
            Prodigy's own settings (the diffusers advanced scripts turn on bias correction and
            safeguard warm-up).
        max_grad_norm: gradient clipping norm (0 turns clipping off).
        snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023, eq. 9); None: plain MSE as the
            recipes' default.
        mixed_precision: "bf16" (autocast to bfloat16, on CUDA only; CPU always runs fp32) or "no".
        cuda_graphs: run the denoiser's forward and backward as CUDA graphs captured at the first
            step (finetuning/graphs.py); they apply with one process on CUDA, grad_accum 1 and the
            SD1.x objective. true: on, with a warning where they cannot apply; "auto": on where
            they apply, quietly off elsewhere (the organism's default: 2.8-5.1x faster steps on one
            H100, the same deltas bit for bit, 2026-12-07); false (the default at SD scale, where
            they are not measured): off.
        cache: encode the VAE latents (and the text embeddings when the text encoder is frozen)
            once, by dataset index; False runs VAE and text encoder every step, as the recipes.
        sample_latents: draw z ~ N(mean, std) from the cached VAE posterior each step (the
            recipes' latent_dist.sample()); False uses the posterior mean.
        resolution: training resolution in pixels; None: the model's own (unet sample_size x
            the VAE's scale factor: 512 for SD1.4, 64 for the organism, 1024 for SDXL; FLUX's
            default_sample_size x 8 = 1024; FLUX needs a multiple of 16).
        max_sequence_length: T5 tokens FLUX reads (the recipes' --max_sequence_length); None:
            256 for schnell, 512 otherwise (the pipelines' defaults). Unused by CLIP-only families.
    """

    method: ClassVar[str] = ""

    steps: int = 15000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = True
    prodigy_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    mixed_precision: str = "bf16"
    cuda_graphs: bool | str = False
    cache: bool = True
    sample_latents: bool = True
    resolution: int | None = None
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):  # switches: a TOML "yes" or 1 would otherwise pass as true
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise FadelabError(f"{self.method} hparams: {f.name}={getattr(self, f.name)!r}; give true or false")
        if not (isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "auto"):
            raise FadelabError(f"{self.method} hparams: cuda_graphs={self.cuda_graphs!r}; give true, false or \"auto\"")
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FadelabError(f"{self.method} hparams: {name}={getattr(self, name)!r}; give a positive integer")
        if not self.lr > 0:
            raise FadelabError(f"{self.method} hparams: lr={self.lr!r}; give a positive learning rate")
        _choice(self, "lr_scheduler", LR_SCHEDULERS)
        _choice(self, "optimizer", OPTIMIZERS)
        _choice(self, "mixed_precision", ("bf16", "no"))
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise FadelabError(f"{self.method} hparams: warmup_steps and max_grad_norm must be >= 0")
        if self.warmup_steps and self.lr_scheduler == "constant":
            raise FadelabError(f"{self.method} hparams: warmup_steps={self.warmup_steps} has no effect with "
                               "lr_scheduler='constant'; use 'constant_with_warmup' or warmup_steps=0")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise FadelabError(f"{self.method} hparams: snr_gamma={self.snr_gamma!r}; give a positive number or None")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise FadelabError(f"{self.method} hparams: resolution={self.resolution!r}; give pixels (>= 8) or None")
        n = self.max_sequence_length
        if n is not None and (not isinstance(n, int) or not 1 <= n <= 512):
            raise FadelabError(f"{self.method} hparams: max_sequence_length={n!r}; give 1..512 T5 tokens or None")


def _choice(hp: Any, name: str, accepted: tuple[str, ...]) -> None:
    if getattr(hp, name) not in accepted:
        raise FadelabError(f"{hp.method} hparams: {name}={getattr(hp, name)!r}; accepted are {', '.join(accepted)}")


@dataclass(frozen=True)
class FullHParams(TrainHParams):
    """Full fine-tuning: every UNet parameter (train_text_to_image.py's README command: batch 1,
    gradient accumulation 4, lr 1e-5, constant, max_grad_norm 1).

    Attributes:
        train_text_encoder: also train every text-encoder parameter.
        ema_decay: keep an exponential moving average of the trained weights with this decay
            (diffusers' EMAModel; the README uses --use_ema, decay 0.9999) and report deltas of
            the average; None: no EMA (the script's default).
    """

    method: ClassVar[str] = "full"

    grad_accum: int = 4
    lr: float = 1e-5
    train_text_encoder: bool = False
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise FadelabError(f"full hparams: ema_decay={self.ema_decay!r}; give a number in (0, 1) or None")


@dataclass(frozen=True)
class LoraHParams(TrainHParams):
    """LoRA (Hu et al. 2021): W' = W + (alpha / r) B A on the target modules, through peft.

    Defaults: train_text_to_image_lora.py (rank 4, lr 1e-4, constant, gaussian init of A, B = 0),
    applied to the text encoder's attention projections as the study did.

    Attributes:
        target: "text" (text encoder, the study's choice), "unet", or "both".
        rank: r, the LoRA rank (the study used 4, 8 and 16).
        alpha: lora_alpha; None means alpha = rank (scale 1), as the recipes.
        target_modules: peft target_modules; () takes LORA_MODULES for each targeted component.
        init_lora_weights: A's initialisation: "gaussian" (std 1/r, the recipes') or "default"
            (peft's kaiming-uniform A); B starts at 0 either way.
        use_dora: DoRA instead of LoRA (see DoraHParams).
    """

    method: ClassVar[str] = "lora"

    lr: float = 1e-4
    target: str = "text"
    rank: int = 4
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    init_lora_weights: str = "gaussian"
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice(self, "target", LORA_TARGETS)
        _choice(self, "init_lora_weights", ("gaussian", "default"))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise FadelabError(f"{self.method} hparams: rank={self.rank!r}; give a positive integer (4, 8, 16)")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self) -> float:
        """alpha / r, the factor in W' = W + (alpha / r) B A."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def modules(self, component: str) -> tuple[str, ...]:
        """peft target_modules for "unet" or "text"."""
        return self.target_modules or LORA_MODULES[component]


@dataclass(frozen=True)
class DoraHParams(LoraHParams):
    """DoRA (Liu et al. 2024, eq. 5): W' = m * (W + (alpha/r) B A) / ||W + (alpha/r) B A||_c, with the
    magnitude m (one per output row) trained too; through peft's use_dora. Trained with Prodigy
    (Mishchenko and Defazio 2023) at lr 1.0, as the study; weight decay 1e-4 and the other Prodigy
    settings as diffusers' advanced_diffusion_training scripts."""

    method: ClassVar[str] = "dora"

    lr: float = 1.0
    optimizer: str = "prodigy"
    weight_decay: float = 1e-4
    use_dora: bool = True


@dataclass(frozen=True)
class DreamBoothHParams(TrainHParams):
    """DreamBooth (Ruiz et al. 2023, eq. 2): the UNet fine-tuned on instance images with the
    instance prompt ("a sks dog") plus prior preservation on class images that the model itself
    generates for the class prompt ("a dog"):

        L = E ||eps - eps_theta(z_t, t, c_inst)||^2 + w * E ||eps' - eps_theta(z'_t, t', c_class)||^2

    Defaults: train_dreambooth.py's README command with prior preservation (lr 5e-6, 800 steps,
    200 class images, w = 1).

    Attributes:
        prior_loss_weight: w.
        num_class_images: class images generated before training (with the base delta applied).
        class_prompt: the class prompt; None: "a {class}" from the data's "class" column.
        class_steps, class_guidance: sampling steps and guidance for the class images.
        class_batch: images per generation batch.
        train_text_encoder: also train the text encoder (the recipe's --train_text_encoder).
    """

    method: ClassVar[str] = "dreambooth"

    steps: int = 800
    lr: float = 5e-6
    prior_loss_weight: float = 1.0
    num_class_images: int = 200
    class_prompt: str | None = None
    class_steps: int = 50
    class_guidance: float = 7.5
    class_batch: int = 4
    train_text_encoder: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_class_images < 0 or self.prior_loss_weight < 0:
            raise FadelabError("dreambooth hparams: num_class_images and prior_loss_weight must be >= 0")
        if self.class_steps < 1 or self.class_batch < 1:
            raise FadelabError("dreambooth hparams: class_steps and class_batch must be positive")


@dataclass(frozen=True)
class TextualInversionHParams(TrainHParams):
    """Textual inversion (Gal et al. 2022, eq. 2): v* = argmin_v E ||eps - eps_theta(z_t, t, c(y; v))||^2,
    with v the embedding of a placeholder token added to the tokenizer and every model weight frozen.

    Defaults: textual_inversion.py's README command (lr 5e-4 scaled by batch x accumulation,
    3,000 steps, batch 1, accumulation 4, one vector, the embedding initialised from a word).

    Attributes:
        placeholder_token: the new token (must not be in the vocabulary).
        initializer_token: the word whose embedding initialises v (one token); None: the data's
            "class" column (the class noun of a DreamBooth subject).
        num_vectors: vectors for the placeholder (diffusers: "<tok>", "<tok>_1", ...).
        instance_word: the word of the data's captions replaced by the placeholder ("a sks dog"
            -> "a <sks> dog"), when templates is empty.
        templates: prompt templates with "{}" for the placeholder, as the recipe's "a photo of a
            {}"; () uses the data's captions.
    """

    method: ClassVar[str] = "textual-inversion"

    steps: int = 3000
    grad_accum: int = 4
    lr: float = 5e-4
    scale_lr: bool = True
    placeholder_token: str = "<sks>"
    initializer_token: str | None = None
    num_vectors: int = 1
    instance_word: str = "sks"
    templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.placeholder_token or " " in self.placeholder_token:
            raise FadelabError(f"textual-inversion hparams: placeholder_token={self.placeholder_token!r}; "
                               "give one word such as '<sks>'")
        if self.num_vectors < 1:
            raise FadelabError(f"textual-inversion hparams: num_vectors={self.num_vectors!r}; give >= 1")
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise FadelabError(f"textual-inversion hparams: template {bad[0]!r} has no '{{}}' for the placeholder")


METHODS: dict[str, type[TrainHParams]] = {
    cls.method: cls
    for cls in (FullHParams, LoraHParams, DoraHParams, DreamBoothHParams, TextualInversionHParams)
}

#: The organism's defaults (64 px, 16x16x4 latents, 8.75M-parameter UNet, 7.5M text encoder). On
#: a GPU an organism step is launch-bound (about 0.1 s at batch 32 or 1,024 alike), so runs use
#: few steps and large batches; the measurements behind each value are in docs/finetuning.md.
ORGANISM: dict[str, dict[str, Any]] = {
    "full": {"steps": 200, "batch_size": 64, "grad_accum": 1, "lr": 1e-4, "lr_scheduler": "constant_with_warmup",
             "warmup_steps": 10},
    "lora": {"steps": 300, "batch_size": 64, "lr": 1e-3, "lr_scheduler": "constant_with_warmup",
             "warmup_steps": 10, "rank": 4},
    "dora": {"steps": 200, "batch_size": 64, "rank": 4},
    "dreambooth": {"steps": 150, "batch_size": 8, "lr": 2e-4, "lr_scheduler": "constant_with_warmup",
                   "warmup_steps": 10, "num_class_images": 64, "class_steps": 20, "class_guidance": 3.0,
                   "class_batch": 64},
    "textual-inversion": {"steps": 150, "batch_size": 16, "grad_accum": 1, "lr": 1e-2, "scale_lr": False,
                          "num_vectors": 4},
}
for _table in ORGANISM.values():  # CUDA graphs where they apply (TrainHParams.cuda_graphs)
    _table["cuda_graphs"] = "auto"


def method_class(method: str) -> type[TrainHParams]:
    """The dataclass of a method name."""
    try:
        return METHODS[method]
    except KeyError:
        raise FadelabError(f"unknown fine-tuning method {method!r}; accepted are {', '.join(METHODS)}") from None


def defaults(method: str, family: str | None = None, **overrides: Any) -> TrainHParams:
    """The defaults of `method` for `family` ("organism": ORGANISM; anything else: SD scale),
    with `overrides` on top."""
    cls = method_class(method)
    base = dict(ORGANISM[method]) if family == "organism" else {}
    return _build(cls, {**base, **overrides})


def _build(cls: type[TrainHParams], values: dict[str, Any]) -> TrainHParams:
    from models.configfile import config_from

    return config_from(cls, values, f"{cls.method} hparams")


def load(path: Path | str, family: str | None = None) -> TrainHParams:
    """Hparams from a TOML or JSON file (models.configfile.read_config): `method = "lora"` plus any
    fields; the rest are the family's defaults (see `defaults`)."""
    from models.configfile import read_config

    values = dict(read_config(path))
    method = values.pop("method", None)
    if method is None:
        raise FadelabError(f"hparams file {path} has no 'method' key; accepted are {', '.join(METHODS)}")
    return defaults(method, family, **values)


def to_dict(hp: TrainHParams) -> dict[str, Any]:
    """{"method": name, field: value, ...}, JSON-ready (tuples become lists)."""
    out = {"method": hp.method}
    for key, value in dataclasses.asdict(hp).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
