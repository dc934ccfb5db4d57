"""Fine-tuning speed on Stable Diffusion 1.4's architecture (random weights): the lab's loop against the
diffusers recipe's way, measured in the same run.

Offers
    synthetic_images(n, resolution, seed) -> ImageTensors   smooth random images with captions
    step_benchmark(device, ...) -> dict   seconds per step of UNet LoRA with the lab's caches
                                          against the same loop with caching off (the recipe's
                                          step: VAE and text encoder run every step), their
                                          ratio, and full fine-tuning's step time and peak memory
    bench_rows(device, quick) -> list[dict]   the same as rows for `fadelab bench`
    family_step_benchmark(family, device, ...) -> dict   one fine-tuning step (full and UNet /
                                          transformer LoRA) of SDXL or FLUX.1-schnell with random
                                          weights at the family's native resolution (1024 px):
                                          seconds per step and peak memory (issue 8)
    family_rows(device, families, quick) -> list[dict]   the same as rows for `fadelab bench`

What the ratio isolates: both sides run the same loop (SDPA attention, bf16 autocast, AdamW,
images already in memory), so it is the cost of the per-step VAE encode and text encode that
train_text_to_image_lora.py pays and a cached run does not. Step times exclude the first three
steps (CUDA kernel selection) and the one-time cache build; the two LoRA kinds alternate, and the
fastest run of each counts, so a slow moment of a shared machine does not decide the ratio.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_WORDS = ("red", "blue", "green", "small", "old", "shiny")
_NOUNS = ("cup", "dog", "house", "car", "tree", "chair", "lamp", "boat")


def synthetic_images(n: int, resolution: int, seed: int = 0):
    """n smooth random RGB images (upsampled 8x8 noise) with captions like "a photo of a red cup"."""
    from .data import ImageTensors

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bicubic", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(seed)
    captions = [f"a photo of a {rng.choice(_WORDS)} {rng.choice(_NOUNS)}" for _ in range(n)]
    return ImageTensors(np.ascontiguousarray(images), captions)


def step_benchmark(device: str = "cuda", *, steps: int = 12, batch: int = 8, resolution: int = 512,
                   scale: float = 1.0, n_images: int = 32, seed: int = 0, repeats: int = 2,
                   progress: bool = False) -> dict[str, Any]:
    """Step times of the lab's UNet LoRA (cached), the recipe-style LoRA step (no cache) and full
    fine-tuning on models.load("sd14", "random", scale) at `resolution`, batch `batch`, bf16
    autocast on CUDA. The two LoRA kinds run `repeats` times, interleaved; each reports the
    fastest run (step_seconds) and every run (step_seconds_runs). Returns seconds per step, the
    ratio recipe / lab, and peak memory."""
    import models

    from .hparams import FullHParams, LoraHParams
    from .loop import train

    t0 = time.perf_counter()
    model = models.load("sd14", "random", scale=scale, device=device, seed=seed)
    load_s = time.perf_counter() - t0
    data = synthetic_images(n_images, resolution, seed)
    lora = LoraHParams(target="unet", steps=steps, batch_size=batch, resolution=resolution)
    out: dict[str, Any] = {"device": str(device), "scale": scale, "resolution": resolution, "batch": batch,
                           "steps": steps, "load_seconds": round(load_s, 1)}
    runs = {"recipe_lora": replace(lora, cache=False), "lab_lora": lora,
            "full": FullHParams(steps=steps, batch_size=batch, grad_accum=1, resolution=resolution)}
    order = ["recipe_lora", "lab_lora"] * repeats + ["full"]  # interleaved: a slow moment hits both
    for name in order:
        r = train(model, data, runs[name], seed=seed, progress=progress)
        entry = out.setdefault(name, {"step_seconds_runs": []})
        entry["step_seconds_runs"].append(r.info["step_seconds"])
        entry.update(step_seconds=min((x for x in entry["step_seconds_runs"] if x is not None), default=None),
                     seconds=r.info["seconds"], peak_memory_gib=r.info.get("peak_memory_gib"),
                     attention=r.info["attention"], bf16_autocast=r.info["bf16_autocast"],
                     loss_last=float(r.loss[-1]))
        log.info("%s: %.4f s/step", name, r.info["step_seconds"] or float("nan"))
        del r
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    lab, recipe = out["lab_lora"]["step_seconds"], out["recipe_lora"]["step_seconds"]
    out["lora_speedup"] = recipe / lab if lab and recipe else None
    return out


def bench_rows(device: str = "cuda", quick: bool = False) -> list[dict[str, Any]]:
    """`fadelab bench` rows: LoRA step (lab vs recipe) and full fine-tuning step with peak memory."""
    kw = dict(steps=6, scale=0.25, resolution=256) if quick else {}
    m = step_benchmark(device, **kw)
    date = time.strftime("%Y-%m-%d")
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    setting = f"SD1.4 random weights (scale {m['scale']:g}), {m['resolution']} px, batch {m['batch']}, bf16 autocast"
    full_peak = m["full"]["peak_memory_gib"]
    return [
        {"benchmark": "finetune: UNet LoRA step, cached latents/text vs recipe step", "device": name, "date": date,
         "fadelab": m["lab_lora"]["step_seconds"], "baseline": m["recipe_lora"]["step_seconds"], "unit": "s/step",
         "ratio": m["lora_speedup"], "notes": setting + "; baseline = same loop with VAE and text encoder every step",
         "peak_mem": int(m["lab_lora"]["peak_memory_gib"] * 2**30) if m["lab_lora"]["peak_memory_gib"] else None,
         "extra": m},
        {"benchmark": "finetune: full UNet step", "device": name, "date": date,
         "fadelab": m["full"]["step_seconds"], "baseline": None, "unit": "s/step", "ratio": None,
         "notes": setting + "; AdamW fp32 master weights; no baseline measured",
         "peak_mem": int(full_peak * 2**30) if full_peak else None, "extra": {}},
    ]


#: family -> (native resolution in pixels, T5 tokens): SDXL 1024 px (unet sample_size 128 x 8);
#: FLUX.1-schnell 1024 px (the pipeline's default_sample_size 128 x 8) and 256 T5 tokens (its card)
FAMILY_NATIVE = {"sdxl": (1024, None), "flux-schnell": (1024, 256)}


def family_step_benchmark(family: str, device: str = "cuda", *, methods: tuple[str, ...] = ("lora", "full"),
                          steps: int = 8, batch: int = 1, resolution: int | None = None, scale: float = 1.0,
                          n_images: int = 8, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """One fine-tuning step of `family` ("sdxl" or "flux-schnell") with random weights
    (models.load(family, "random", scale)): step time (steps after the first three) and peak
    memory of each method (full: every denoiser parameter, AdamW fp32 master weights; lora: the
    denoiser's to_q/k/v/out at rank 4), cached latents and text, bf16 autocast on CUDA, at the
    family's native resolution unless `resolution` is given. The full-size models are large (SDXL
    UNet 2.6 B, FLUX transformer 11.9 B parameters: full fine-tuning of FLUX in fp32 with AdamW
    needs about 190 GB and does not fit one GPU); a method that runs out of memory is reported as
    {"error": "out of memory"} and the others still run."""
    import models

    from .hparams import defaults
    from .loop import train

    native, t5 = FAMILY_NATIVE[family]
    resolution = resolution or native
    t0 = time.perf_counter()
    # FLUX in fp32 (16.9 B parameters with T5, 75 GiB) does not fit one 80 GB GPU: load it in bf16,
    # as its reference LoRA recipe does (the adapters still train in fp32)
    dtype = torch.bfloat16 if family == "flux-schnell" and torch.device(device).type == "cuda" else torch.float32
    model = models.load(family, "random", scale=scale, device=device, dtype=dtype, seed=seed)
    out: dict[str, Any] = {"family": family, "device": str(device), "scale": scale, "resolution": resolution,
                           "weights_dtype": str(dtype).replace("torch.", ""),
                           "batch": batch, "steps": steps, "load_seconds": round(time.perf_counter() - t0, 1)}
    data = synthetic_images(n_images, resolution, seed)
    for method in methods:
        extra = {"target": "unet"} if method in ("lora", "dora") else {"grad_accum": 1}
        hp = defaults(method, family, steps=steps, batch_size=batch, resolution=resolution,
                      max_sequence_length=t5, **extra)
        try:
            r = train(model, data, hp, seed=seed, progress=progress)  # SDPA without cuDNN: loop.training_attention
        except torch.OutOfMemoryError:
            out[method] = {"error": "out of memory"}
            gc.collect()
        else:
            out[method] = {"step_seconds": r.info["step_seconds"], "seconds": r.info["seconds"],
                           "peak_memory_gib": r.info.get("peak_memory_gib"), "parameters": r.info.get("parameters"),
                           "attention": r.info["attention"], "bf16_autocast": r.info["bf16_autocast"],
                           "loss_last": float(r.loss[-1])}
            del r
        log.info("%s %s: %s", family, method, out[method])
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    del model, data
    gc.collect()  # the next family needs the whole GPU
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def family_rows(device: str = "cuda", families: tuple[str, ...] = ("sdxl", "flux-schnell"),
                quick: bool = False) -> list[dict[str, Any]]:
    """`fadelab bench` rows: one fine-tuning step (full, UNet/transformer LoRA) per family, with peak
    memory. quick: scale 0.25 at 512 px (a smoke run, not the issue's measurement)."""
    date = time.strftime("%Y-%m-%d")
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    rows = []
    for family in families:
        kw = dict(scale=0.25, resolution=512, steps=5) if quick else {}
        m = family_step_benchmark(family, device, **kw)
        setting = (f"{family} random weights (scale {m['scale']:g}, {m['weights_dtype']}), {m['resolution']} px, "
                   f"batch {m['batch']}, bf16 autocast, cached latents and text")
        for method in ("full", "lora"):
            entry = m.get(method, {})
            peak = entry.get("peak_memory_gib")
            rows.append({"benchmark": f"finetune: {family} {method} step", "device": name, "date": date,
                         "fadelab": entry.get("step_seconds"), "baseline": None, "unit": "s/step", "ratio": None,
                         "notes": setting + ("; " + entry["error"] if "error" in entry else ""),
                         "peak_mem": int(peak * 2**30) if peak else None, "extra": entry})
    return rows
