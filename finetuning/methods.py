"""The fine-tuning methods: what each one trains and how its update becomes a WeightDelta.

Offers
    Method            the small protocol the loop drives (prepare, parameters, after_step, delta,
                      adapter, state); every method trains working copies of components, never
                      the loaded model
    Full              every parameter of the denoiser (the UNet; FLUX's transformer) and
                      optionally of the text encoder(s); dense deltas at every parameter site,
                      EMA optional
    Lora              LoRA or DoRA through peft on the text encoder(s), the denoiser or both;
                      deltas as low-rank factors (LoRA, exact) or dense (DoRA)
    DreamBooth        Full plus prior preservation on class images the model generates itself
    make_method(hp)   the Method for a hparams dataclass (textual inversion: finetuning.textual_inversion)
    SiteNamer         parameter -> site name ("unet.xattn.0.to_k", "unet.conv_in.bias")

Deltas are the fine-tuning update only, relative to the weights training started from (the
loaded model with the base delta applied), in float32:

    full, DreamBooth:  dW_p = p_trained - p_start                                for every parameter p
    LoRA:              dW = (alpha / r) B A          -> factors ((alpha / r) B, A)   (Hu et al. 2021, eq. 3)
    DoRA:              dW = m * (W + (alpha/r) B A) / ||W + (alpha/r) B A||_c - W      (Liu et al. 2024, eq. 5)

where ||.||_c is the norm of each output row (peft's DoRA: the norm over dim 1 of the (out, in)
weight), m the trained magnitude vector and W the start weight.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.build import cast
from models.errors import FadelabError

from .hparams import DreamBoothHParams, FullHParams, LoraHParams, TrainHParams

log = logging.getLogger(__name__)

#: pipeline components the methods can train (which ones a family has: finetuning.objectives)
TRAINABLE = ("unet", "transformer", "text_encoder", "text_encoder_2")


class SiteNamer:
    """Site names for the parameters of a component, through the model's site table.

    A parameter `weight` of the module at path P is the site of P (the table's name where there is
    one, e.g. "unet.xattn.0.to_k", else the raw "component.P"); any other parameter is
    "<that site>.<name>" ("unet.conv_in.bias"), which models.delta resolves to the parameter.
    """

    def __init__(self, sites: dict[str, str]) -> None:
        self.inverse = {path: site for site, path in sites.items()}

    def module(self, component: str, path: str) -> str:
        full = f"{component}.{path}" if path else component
        return self.inverse.get(full, full)

    def parameter(self, component: str, qualified: str) -> str:
        path, _, name = qualified.rpartition(".")
        site = self.module(component, path)
        return site if name == "weight" else f"{site}.{name}"


def selected(site: str, patterns: list[str] | None) -> bool:
    """True when `patterns` is None or `site` matches one of its shell-style globs."""
    return patterns is None or any(fnmatch.fnmatchcase(site, p) for p in patterns)


def working_copy(module: nn.Module, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A deep copy in `dtype` (None: the module's own), every parameter frozen (methods unfreeze
    what they train)."""
    out = copy.deepcopy(module)
    tensors = [*out.parameters(), *out.buffers()]
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        out = cast(out, dtype)
    out.requires_grad_(False)
    return out


class Method:
    """What the loop asks of a method. Subclasses set `name` and fill `prepare` and `delta`.

    Attributes:
        hp: the method's hparams.
        text_trainable: the text encoder's output changes during training (no text cache).
        components: component name -> the working copy this method trains (after prepare).
        prior: DreamBooth's class images (ImageTensors) or None.
    """

    name = ""

    def __init__(self, hp: TrainHParams) -> None:
        self.hp = hp
        self.text_trainable = False
        self.components: dict[str, Any] = {}
        self.prior = None
        self.namer: SiteNamer | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def make_prior(self, model: Any, dataset: Any, seed: int, progress: bool, resolution: int | None = None) -> None:
        """Data the method generates with the (base + base delta) model before training (at
        `resolution` pixels where the family's sampler takes a size)."""

    def prepare(self, model: Any, dataset: Any) -> dict[str, Any]:
        """Make the working copies; returns {component name: copy} for the working pipeline."""
        raise NotImplementedError

    def captions(self, dataset: Any) -> list[str]:
        """The caption the loop trains each dataset image with."""
        return list(dataset.captions)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(site-like name, parameter) for every trained parameter, names unique."""
        raise NotImplementedError

    # -- during training ------------------------------------------------------------------------

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to resume (trained parameters by name)."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        if missing:
            raise FadelabError(f"resume state lacks parameter {missing[0]!r}: it was saved by another method or model")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])

    # -- results --------------------------------------------------------------------------------

    def delta(self, sites: list[str] | None = None) -> dict[str, Any]:
        """{site: dW or (B, A)} relative to the start weights; `sites` filters by glob."""
        raise NotImplementedError

    def adapter(self, model: Any, folder: Path | None) -> Any:
        """Save the adapter under `folder` and return its path, or return it in memory; None if
        the method has no adapter."""
        return None

    def info(self) -> dict[str, Any]:
        return {}


class Full(Method):
    """Every parameter of the denoiser (UNet, or FLUX's transformer) and of the text encoder(s)
    when hp.train_text_encoder (SDXL: both CLIP towers; FLUX: CLIP, T5 stays frozen)."""

    name = "full"

    def __init__(self, hp: FullHParams | DreamBoothHParams) -> None:
        super().__init__(hp)
        self.start: dict[str, dict[str, Tensor]] = {}
        self.ema = None

    def prepare(self, model: Any, dataset: Any) -> dict[str, Any]:
        from .objectives import denoiser_name, text_encoder_names

        self.namer = SiteNamer(model.sites)
        names = [denoiser_name(model.pipe)]
        names += list(text_encoder_names(model.pipe)) if self.hp.train_text_encoder else []
        self.text_trainable = self.hp.train_text_encoder
        for name in names:
            original = getattr(model.pipe, name)
            work = working_copy(original).train()
            work.requires_grad_(True)
            self.components[name] = work
            # the reference: the loaded weights (base delta applied) the copy was made from
            self.start[name] = dict(original.named_parameters())
        ema_decay = getattr(self.hp, "ema_decay", None)
        if ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel([p for _, p in self.named_parameters()], decay=ema_decay)
        return dict(self.components)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(self.namer.parameter(c, n), p) for c, m in self.components.items() for n, p in m.named_parameters()]

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.step([p for _, p in self.named_parameters()])

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if self.ema is not None:
            for (name, _), s in zip(self.named_parameters(), self.ema.shadow_params):
                state[f"ema:{name}"] = s.detach().cpu().clone()
            state["ema:optimization_step"] = torch.tensor(self.ema.optimization_step)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        if self.ema is not None:
            with torch.no_grad():
                for (name, _), s in zip(self.named_parameters(), self.ema.shadow_params):
                    s.copy_(state[f"ema:{name}"])
            self.ema.optimization_step = int(state["ema:optimization_step"])

    @torch.no_grad()
    def delta(self, sites: list[str] | None = None) -> dict[str, Any]:
        trained = [p for _, p in self.named_parameters()]
        if self.ema is not None:
            trained = self.ema.shadow_params
        out: dict[str, Any] = {}
        it = iter(trained)
        for component, module in self.components.items():
            start = self.start[component]
            for qualified, _ in module.named_parameters():
                p = next(it)
                site = self.namer.parameter(component, qualified)
                if selected(site, sites):
                    out[site] = p.detach().float() - start[qualified].detach().float().to(p.device)
        return out

    def info(self) -> dict[str, Any]:
        return {"components": list(self.components),
                "parameters": sum(p.numel() for _, p in self.named_parameters())}


class DreamBooth(Full):
    """Full fine-tuning on the instance images plus prior preservation (hp: DreamBoothHParams)."""

    name = "dreambooth"

    def make_prior(self, model: Any, dataset: Any, seed: int, progress: bool, resolution: int | None = None) -> None:
        from .data import ImageTensors

        hp: DreamBoothHParams = self.hp
        self.class_prompt = hp.class_prompt or f"a {_one_class(dataset)}"
        if hp.num_class_images == 0 or hp.prior_loss_weight == 0:
            return
        n = hp.num_class_images
        seeds = [int(s) for s in torch.randint(2**31 - 1, (n,), generator=torch.Generator().manual_seed(seed + 7))]
        images = class_images(model, [self.class_prompt] * n, seeds, steps=hp.class_steps,
                              guidance_scale=hp.class_guidance, batch_size=hp.class_batch, progress=progress,
                              resolution=resolution, max_sequence_length=hp.max_sequence_length)
        self.prior = ImageTensors(images, [self.class_prompt] * n)
        log.info("dreambooth: %d class images for %r", n, self.class_prompt)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "class_prompt": self.class_prompt,
                "class_images": 0 if self.prior is None else len(self.prior)}


def class_images(model: Any, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
                 batch_size: int, progress: bool, resolution: int | None = None,
                 max_sequence_length: int | None = None) -> Any:
    """uint8 (N, H, W, 3) class images from the model's own pipeline, image i from a CPU generator
    seeded with seeds[i]. SD1.x-style pipelines use the organism's sampler (its native size, as
    before); SDXL and FLUX call their pipeline at `resolution` (FLUX with its T5 length)."""
    from .objectives import family_kind

    pipe = model.pipe
    kind = family_kind(pipe)
    if kind == "sd":
        from models.organism.sample import generate

        return generate(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size,
                        progress=progress, desc="class images")
    from models.fastgen import stock_images

    kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
    if resolution is not None:
        kwargs.update(height=resolution, width=resolution)
    if kind == "flux":
        kwargs["max_sequence_length"] = max_sequence_length or (256 if "schnell" in str(model.family) else 512)
    return stock_images(pipe, prompts, seeds, batch_size=batch_size, progress=progress, desc="class images",
                        **kwargs)


def _one_class(dataset: Any) -> str:
    classes = {c for c in dataset.column("class") if c}
    if len(classes) != 1:
        raise FadelabError(f"the data's 'class' column holds {sorted(classes) or 'nothing'}; give the class "
                           "word with class_prompt (dreambooth) or initializer_token (textual-inversion)")
    return classes.pop()


class Lora(Method):
    """LoRA or DoRA adapters through peft on working copies of the targeted components."""

    name = "lora"

    def __init__(self, hp: LoraHParams) -> None:
        super().__init__(hp)
        self.name = hp.method
        self.layers: dict[str, Any] = {}  # site -> peft LoraLayer

    def prepare(self, model: Any, dataset: Any) -> dict[str, Any]:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        from .objectives import denoiser_name, text_encoder_names

        hp: LoraHParams = self.hp
        self.namer = SiteNamer(model.sites)
        text, denoiser = list(text_encoder_names(model.pipe)), [denoiser_name(model.pipe)]
        targets = {"text": text, "unet": denoiser, "both": text + denoiser}[hp.target]
        self.text_trainable = any(c.startswith("text_encoder") for c in targets)
        self.configs = {}
        for component in targets:
            short = "text" if component.startswith("text_encoder") else "unet"
            init = True if hp.init_lora_weights == "default" else hp.init_lora_weights  # peft: True = kaiming A
            config = LoraConfig(r=hp.rank, lora_alpha=hp.rank if hp.alpha is None else hp.alpha,
                                init_lora_weights=init, target_modules=list(hp.modules(short)),
                                use_dora=hp.use_dora)
            # on CUDA (bf16 autocast) the frozen base stays in the loaded dtype: a bf16 FLUX transformer
            # copied to fp32 would not fit beside the original on one 80 GB GPU. Adapters train in fp32.
            base_dtype = None if torch.device(model.device).type == "cuda" else torch.float32
            work = inject_adapter_in_model(config, working_copy(getattr(model.pipe, component), base_dtype),
                                           "default")
            work.train()
            for path, module in work.named_modules():
                if isinstance(module, LoraLayer):
                    self.layers[self.namer.module(component, path)] = module
            for name, p in work.named_parameters():
                p.requires_grad_("lora_" in name)
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
            if not any(p.requires_grad for p in work.parameters()):
                raise FadelabError(f"LoRA target_modules {list(hp.modules(short))} match no module of the {component}")
            self.components[component] = work
            self.configs[component] = config
        return dict(self.components)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for site, layer in self.layers.items():
            out += [(f"{site}.lora_A", layer.lora_A["default"].weight), (f"{site}.lora_B", layer.lora_B["default"].weight)]
            if self.hp.use_dora:
                out.append((f"{site}.lora_magnitude", layer.lora_magnitude_vector["default"].weight))
        return out

    @torch.no_grad()
    def delta(self, sites: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for site, layer in self.layers.items():
            if not selected(site, sites):
                continue
            a = layer.lora_A["default"].weight.float()  # (r, in)
            b = layer.lora_B["default"].weight.float()  # (out, r)
            s = float(layer.scaling["default"])
            if not self.hp.use_dora:
                out[site] = (s * b, a.clone())
                continue
            w = layer.get_base_layer().weight.float()  # (out, in), the start weight
            v = w + (s * b) @ a
            m = layer.lora_magnitude_vector["default"].weight.float()  # (out,)
            out[site] = (m / torch.linalg.norm(v, dim=1))[:, None] * v - w
        return out

    def adapter(self, model: Any, folder: Path | None) -> Any:
        from .lora_io import lora_state_dicts, save_lora

        states = lora_state_dicts(self.components)
        if folder is None:
            return {f"{c}.{k}": v for c, sd in states.items() for k, v in sd.items()}
        return save_lora(folder, type(model.pipe), states, self.configs)

    def info(self) -> dict[str, Any]:
        return {"components": list(self.components), "lora_sites": len(self.layers),
                "parameters": sum(p.numel() for _, p in self.named_parameters())}


def make_method(hp: TrainHParams) -> Method:
    """The Method object for a hparams dataclass."""
    from .hparams import TextualInversionHParams

    if isinstance(hp, DreamBoothHParams):
        return DreamBooth(hp)
    if isinstance(hp, FullHParams):
        return Full(hp)
    if isinstance(hp, LoraHParams):
        return Lora(hp)
    if isinstance(hp, TextualInversionHParams):
        from .textual_inversion import TextualInversion

        return TextualInversion(hp)
    raise FadelabError(f"fine-tuning hparams must be one of finetuning.hparams.METHODS' dataclasses, "
                       f"got {type(hp).__name__}")
