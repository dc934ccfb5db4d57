"""The lab's fast batched generation: one loaded base pipeline, variants as deltas, any family.

Offers
    FastGenConfig          the options (steps, guidance, size, batch, compile, channels_last, ...),
                           a frozen dataclass loadable from a TOML or JSON file
    FastGenerator(model, config)
        .prepare()         channels_last, SDPA, torch.compile of the denoiser and the VAE decoder
        .warmup()          one padded batch, timed (compilation happens here): seconds
        .generate(prompts, seeds, delta=None) -> uint8 (N, H, W, 3)
        .variants({name: delta or None}, prompts, seeds) -> {name: uint8 images}
    initial_noise(pipe, seeds, height, width, dtype) -> (latents, generators)
    generate_data_parallel(gen, prompts, seeds, state=None) -> uint8 images on every process
    family_defaults(model) -> (steps, guidance_scale)
    stock_images(pipe, prompts, seeds, batch_size=8, **call_kwargs) -> uint8 (N, H, W, 3)
                           the plain loop: stock pipeline calls in batches, one CPU generator
                           per image (what the behaviour suites and DreamBooth's class images use
                           off the organism)

How it stays the stock pipeline's function. Each batch is one call of the model's own diffusers
pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `FluxPipeline`, ...), so the
scheduler, the number of denoiser calls, classifier-free guidance and the VAE decode are the
stock code. What changes is around it:

- noise: image i gets its own CPU `torch.Generator` seeded with seeds[i]; its initial latents
  are drawn exactly as the stock pipeline draws them from a list of generators (one
  `torch.randn((1, ...), dtype=<pipeline dtype>)` per image, packed for FLUX), and the same
  generators go to the pipeline for any later draw (stochastic schedulers). So at fp32 on the
  CPU the images equal `pipe(prompts, generator=[Generator().manual_seed(s) for s in seeds])`,
  and image i depends on (prompts[i], seeds[i]) only, never on its batch neighbours' noise.
- variants: `models.apply_delta` adds a WeightDelta in place for the duration of a call and
  restores the weights bit for bit; parameters keep their storage, so compiled graphs (and CUDA
  graphs, which read parameters by address) stay valid across M, M_ed, M_ft and M_ed_ft.
- speed (CUDA): channels_last weights (cuDNN's NHWC convolutions), PyTorch SDPA attention,
  torch.compile of the denoiser (whole or "regional": only its repeated blocks) and of the VAE
  decoder, cuDNN autotuning, the last batch padded to full size so a compiled graph is reused,
  and the uint8 conversion on the device. No step skipping, caching or lower precision: the
  scheduler, steps, resolution, guidance and dtype are the caller's.

Warning: QKV fusion (`fuse_qkv_projections`) and inductor's `freezing` are not offered: both
copy the weights into new tensors, so a delta applied to `unet.xattn.*.to_k` afterwards would
not reach the computation.

Precision is the loaded model's: load in bf16 on CUDA (`models.load(..., dtype=torch.bfloat16)`),
as the benchmarks do; nothing here casts weights.

Warning: `prepare()` changes the loaded modules in place (memory format, compiled call), so a
model prepared for fast generation serves stock calls through the compiled modules too, and
forward hooks added afterwards (activation recorders) make dynamo recompile: record with a
model that was not compiled.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from models.delta import WeightDelta, apply_delta
from models.errors import FadelabError

log = logging.getLogger(__name__)

COMPILE_KINDS = ("none", "regional", "full")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")

# steps and guidance each family is sampled with when the caller gives none: the pipelines'
# own defaults (SD1.4's PNDM at 50 steps and 7.5; SDXL 5.0), FLUX.1-schnell's model card
# (4 steps, no guidance); the organism's are stored with its weights (organism.json).
_FAMILY_DEFAULTS = {"sd14": (50, 7.5), "sdxl": (50, 5.0), "flux-schnell": (4, 0.0)}


@dataclass(frozen=True)
class FastGenConfig:
    """Options of `FastGenerator`.

    Attributes:
        steps: sampling steps; None: the family's default (`family_defaults`).
        guidance_scale: classifier-free guidance; None: the family's default.
        height, width: image size in pixels; None: the pipeline's native size.
        batch_size: images per pipeline call.
        max_sequence_length: T5 tokens for FLUX (None: the pipeline's default, 512);
            ignored by pipelines without that argument.
        compile: "none", "regional" (torch.compile of the denoiser's repeated blocks, as
            diffusers' `compile_repeated_blocks`: short compile, part of the gain) or "full"
            (the whole denoiser). Applied on CUDA only; on the CPU it is skipped with a log line.
        compile_mode: torch.compile mode: "default", "reduce-overhead" (adds CUDA graphs),
            "max-autotune-no-cudagraphs" or "max-autotune" (long compiles: SD1.4's UNet at
            batch 8 had not finished its cold compile after 493 s on an H200, and cuDNN won every
            convolution it autotuned; docs/measured/2026-12-06-h200-gen-autotune.txt).
        compile_vae: also compile the VAE decoder (CUDA only, with compile_mode).
        channels_last: store the denoiser's and the VAE's conv weights in NHWC (CUDA only).
        conv_1x1_as_mm: let inductor lower 1x1 convolutions to matrix products (a process-wide
            inductor setting, set by `prepare` when compiling).
        coordinate_descent: inductor's coordinate-descent tuning of its generated Triton kernels
            (block sizes, warps) at compile time, one of the settings diffusers' inference-speed
            guide lists for SD (a process-wide inductor setting, set by `prepare`; a longer
            compile, no autotuning of matrix products or convolutions).
        autotune_convs: with a max-autotune mode, autotune the convolutions too (inductor's
            default). False keeps aten's convolution (cuDNN) without timing Triton's, so the
            autotuning reaches the matrix products only: on SD1.4 cuDNN won all 8 convolutions
            autotuned, at 7-9 s each (a process-wide inductor setting, set by `prepare`).
        cudnn_benchmark: let cuDNN time its convolution algorithms during generation (the
            global flag is restored after each call).
        pad_batches: pad the last batch to batch_size (extra images are computed and dropped)
            so a compiled graph serves every call; on by default only where it pays, compiling.
    """

    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    max_sequence_length: int | None = None
    compile: str = "none"
    compile_mode: str = "default"
    compile_vae: bool = False
    channels_last: bool = True
    conv_1x1_as_mm: bool = False
    coordinate_descent: bool = False
    autotune_convs: bool = True
    cudnn_benchmark: bool = True
    pad_batches: bool | None = None

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_KINDS:
            raise FadelabError(f"compile={self.compile!r}: accepted are {', '.join(COMPILE_KINDS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise FadelabError(f"compile_mode={self.compile_mode!r}: accepted are {', '.join(COMPILE_MODES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise FadelabError(f"batch_size={self.batch_size!r}: give a positive integer")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise FadelabError(f"steps={self.steps!r}: give a positive integer or None (the family's default)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 8):
                raise FadelabError(f"{name}={value!r}: give a pixel size of at least 8, or None (native)")

    @classmethod
    def from_file(cls, path: str | Path) -> FastGenConfig:
        """Read a config from a .toml or .json file; unknown keys raise FadelabError."""
        path = Path(path)
        if not path.is_file():
            raise FadelabError(f"no generation config at {path}")
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FadelabError(f"{path}: unknown generation options {unknown}; known: {sorted(known)}")
        return cls(**raw)


def family_defaults(model: Any) -> tuple[int, float]:
    """(steps, guidance_scale) a family samples with by default (see _FAMILY_DEFAULTS)."""
    if model.family in _FAMILY_DEFAULTS:
        return _FAMILY_DEFAULTS[model.family]
    if model.family == "organism":
        from models.families import ORGANISM_DIR

        path = ORGANISM_DIR / "organism.json"
        sampling = json.loads(path.read_text()).get("sampling", {}) if path.is_file() else {}
        return int(sampling.get("steps", 20)), float(sampling.get("guidance_scale", 3.0))
    return 50, 7.5


def native_size(pipe: Any) -> int:
    """The pipeline's default image side in pixels (the size its denoiser was trained at)."""
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        size = pipe.unet.config.sample_size
    return int(size) * int(pipe.vae_scale_factor)


def _is_packed(pipe: Any) -> bool:
    """FLUX-style pipelines take latents packed into 2x2 patches."""
    return getattr(pipe, "unet", None) is None and hasattr(pipe, "_pack_latents")


def initial_noise(pipe: Any, seeds: Sequence[int], height: int, width: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial latents for `seeds`, drawn as the stock pipeline draws them, and the generators.

    One CPU generator per image, seeded with seeds[i]; latents_i = randn((1, C, h, w),
    generator_i, dtype) with C, h, w as the pipeline's `prepare_latents` computes them, packed
    into (1, h w / 4, 4 C) for FLUX. Returns (latents on the CPU, generators), the generators
    advanced past the draw, as the pipeline leaves them.
    """
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    f = int(pipe.vae_scale_factor)
    if _is_packed(pipe):
        c = pipe.transformer.config.in_channels // 4
        h, w = 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))
    else:
        c = pipe.unet.config.in_channels
        h, w = int(height) // f, int(width) // f
    if not seeds:
        return torch.zeros((0, c, h, w), dtype=dtype), gens
    latents = torch.cat([torch.randn((1, c, h, w), generator=g, dtype=dtype) for g in gens])  # (N, C, h, w)
    if _is_packed(pipe):
        latents = pipe._pack_latents(latents, len(gens), c, h, w)  # (N, h w / 4, 4 C)
    return latents, gens


@contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3): round(255 clip(x, 0, 1)) in fp32, on the
    tensor's device, so only bytes cross to the host."""
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class FastGenerator:
    """Batched generation from one loaded `models.Model`, its variants made by deltas.

    Attributes:
        model: the loaded model (its pipeline is called for every batch).
        config: the FastGenConfig.
        steps, guidance_scale, height, width: the resolved sampling settings.
        prepared: whether `prepare()` ran.
        applied: what `prepare()` did, e.g. ("channels_last", "compile=full (default)").
    """

    def __init__(self, model: Any, config: FastGenConfig | None = None) -> None:
        self.model = model
        self.config = config or FastGenConfig()
        steps, guidance = family_defaults(model)
        self.steps = self.config.steps or steps
        self.guidance_scale = guidance if self.config.guidance_scale is None else self.config.guidance_scale
        side = native_size(model.pipe)
        self.height = self.config.height or side
        self.width = self.config.width or side
        self.prepared = False
        self.applied: tuple[str, ...] = ()
        model.pipe.set_progress_bar_config(disable=True)

    @property
    def cuda(self) -> bool:
        return torch.device(self.model.device).type == "cuda"

    @property
    def pad(self) -> bool:
        if self.config.pad_batches is not None:
            return self.config.pad_batches
        return self.cuda and self.config.compile != "none"

    # -- preparing -----------------------------------------------------------------------------

    def prepare(self) -> FastGenerator:
        """Apply the config's memory format and compilation to the loaded modules (once).

        On the CPU only SDPA is ensured: channels_last and torch.compile are CUDA options here.
        """
        if self.prepared:
            return self
        pipe, cfg = self.model.pipe, self.config
        denoiser = self.model.denoiser
        applied = ["sdpa"]
        for module in (denoiser, pipe.vae):
            _ensure_sdpa(module)
        if not self.cuda:
            if cfg.compile != "none" or cfg.compile_vae or cfg.channels_last:
                log.info("fastgen: channels_last and torch.compile are CUDA options here; eager on %s",
                         self.model.device)
            self.prepared, self.applied = True, tuple(applied)
            return self
        if cfg.channels_last:
            denoiser.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            applied.append("channels_last")
        if cfg.cudnn_benchmark:
            applied.append("cudnn_benchmark")
        if cfg.compile != "none" or cfg.compile_vae:  # inductor's process-wide settings
            import torch._inductor.config as inductor_config

            if cfg.conv_1x1_as_mm:
                inductor_config.conv_1x1_as_mm = True
                applied.append("conv_1x1_as_mm")
            if cfg.coordinate_descent:
                inductor_config.coordinate_descent_tuning = True
                applied.append("coordinate_descent_tuning")
            if "max-autotune" in cfg.compile_mode and not cfg.autotune_convs:
                inductor_config.max_autotune_conv_backends = "ATEN"
                applied.append("convolutions not autotuned")
        if cfg.compile == "regional" and not getattr(denoiser, "_repeated_blocks", None):
            raise FadelabError(
                f"compile='regional': {type(denoiser).__name__} names no repeated blocks; use compile='full'"
            )
        if cfg.compile == "full":
            denoiser.compile(mode=cfg.compile_mode, dynamic=False)
        elif cfg.compile == "regional":
            denoiser.compile_repeated_blocks(mode=cfg.compile_mode, dynamic=False)
        if cfg.compile != "none":
            applied.append(f"compile={cfg.compile} ({cfg.compile_mode})")
        if cfg.compile_vae:
            pipe.vae.decoder.compile(mode=cfg.compile_mode, dynamic=False)
            applied.append(f"compile_vae ({cfg.compile_mode})")
        if self.pad:
            applied.append("pad_batches")
        self.prepared, self.applied = True, tuple(applied)
        log.info("fastgen: prepared %s: %s", self.model.family, ", ".join(applied))
        return self

    def warmup(self) -> float:
        """Prepare, then generate one full batch and return its wall-clock seconds (on CUDA the
        compilation and autotuning happen here, and are what this returns)."""
        self.prepare()
        _sync(self.model.device)
        t0 = time.perf_counter()
        n = self.config.batch_size
        self.generate(["a photo"] * n, list(range(n)), progress=False)
        _sync(self.model.device)
        return time.perf_counter() - t0

    # -- generating ----------------------------------------------------------------------------

    def _call_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                                      height=self.height, width=self.width, output_type="pt", return_dict=False)
        if self.config.max_sequence_length is not None:
            import inspect

            if "max_sequence_length" in inspect.signature(self.model.pipe.__call__).parameters:
                kwargs["max_sequence_length"] = self.config.max_sequence_length
        return kwargs

    @torch.no_grad()
    def _batch(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        n = len(prompts)
        if self.pad and n < self.config.batch_size:  # same shapes every call: one compiled graph
            extra = self.config.batch_size - n
            prompts, seeds = prompts + [prompts[-1]] * extra, seeds + [seeds[-1]] * extra
        pipe = self.model.pipe
        dtype = self.model.text_encoders[0].dtype if self.model.text_encoders else self.model.dtype
        latents, gens = initial_noise(pipe, seeds, self.height, self.width, dtype)
        images = pipe(prompt=prompts, latents=latents.to(self.model.device), generator=gens,
                      **self._call_kwargs())[0]  # (B, 3, H, W) in [0, 1]
        return _to_uint8(images)[:n]

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, delta: WeightDelta | None = None,
                 alpha: float = 1.0, progress: bool = True, desc: str = "generate") -> np.ndarray:
        """One image per (prompts[i], seeds[i]); returns uint8 (N, H, W, 3).

        delta: a WeightDelta added (times alpha) for the duration of this call (a variant of
        the loaded base model); the base weights are restored bit for bit afterwards.
        """
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if len(prompts) != len(seeds):
            raise FadelabError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        self.prepare()
        if not prompts:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        b = self.config.batch_size
        out = []
        bar = tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress)
        with apply_delta(self.model, delta, alpha) if delta is not None else nullcontext(), \
                _cudnn_benchmark(self.config.cudnn_benchmark and self.cuda):
            for i in range(0, len(prompts), b):
                out.append(self._batch(prompts[i:i + b], seeds[i:i + b]))
                bar.update(len(out[-1]))
        bar.close()
        return np.concatenate(out)

    def variants(self, deltas: Mapping[str, WeightDelta | None], prompts: Sequence[str],
                 seeds: Sequence[int], *, progress: bool = True) -> dict[str, np.ndarray]:
        """{name: images} for each variant, e.g. {"M": None, "M_ed": d_ed, "M_ed_ft": d_ed + d_ft};
        None is the base model. Every variant sees the same (prompt, seed) pairs."""
        return {name: self.generate(prompts, seeds, delta=delta, progress=progress, desc=name)
                for name, delta in deltas.items()}


def stock_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, batch_size: int = 8,
                 progress: bool = False, desc: str = "images", **call_kwargs: Any) -> np.ndarray:
    """uint8 (N, H, W, 3): `pipe(prompt=..., generator=[one CPU generator per image seeded with
    seeds[i]], output_type="np", **call_kwargs)` in batches of `batch_size`, under a tqdm bar."""
    from tqdm.auto import tqdm

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    out = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="img")
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        res = pipe(prompt=list(prompts[i:i + batch_size]), generator=gens, output_type="np", **call_kwargs)
        out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
        bar.update(len(gens))
    bar.close()
    return np.concatenate(out)


def _ensure_sdpa(module: Any) -> None:
    """Replace diffusers' classic AttnProcessor (explicit softmax(QK^T)V) by AttnProcessor2_0
    (torch's scaled_dot_product_attention); other processors already call SDPA or are custom."""
    processors = getattr(module, "attn_processors", None)
    if not processors:
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if any(type(p) is AttnProcessor for p in processors.values()):
        module.set_attn_processor({name: AttnProcessor2_0() if type(p) is AttnProcessor else p
                                   for name, p in processors.items()})


def _sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def generate_data_parallel(gen: FastGenerator, prompts: Sequence[str], seeds: Sequence[int], *,
                           delta: WeightDelta | None = None, state: Any = None) -> np.ndarray:
    """Data-parallel `gen.generate` over the processes of an accelerate launch.

    The pairs are cut into the batches one process would run (batch_size each, in order),
    the batches split into contiguous runs in rank order (`PartialState.split_between_processes`),
    each process generates its run on its own device, and the runs are gathered as uint8
    tensors (`accelerate.utils.gather`, padded to the longest run), so every process returns
    all N images in the input order, each computed in the same batch as on one process.
    Without a launcher this is `gen.generate`.
    """
    from accelerate import PartialState

    state = state or PartialState()
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise FadelabError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    b = gen.config.batch_size
    batches = [list(range(i, min(i + b, len(prompts)))) for i in range(0, len(prompts), b)]
    with state.split_between_processes(batches) as runs:
        mine = [i for batch in runs for i in batch]
        local = gen.generate([prompts[i] for i in mine], [seeds[i] for i in mine], delta=delta,
                             progress=state.is_main_process)
    if state.num_processes == 1:
        return local
    from accelerate.utils import gather

    counts = gather(torch.tensor([len(local)], device=state.device)).tolist()  # images per process
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=torch.uint8, device=state.device)
    padded[:len(local)] = torch.from_numpy(local).to(state.device)
    every = gather(padded).cpu()  # (processes * longest, H, W, 3), rank order
    return torch.cat([every[r * longest:r * longest + c] for r, c in enumerate(counts)]).numpy()
