"""Generation with the organism (or any StableDiffusionPipeline): prompts x seeds -> uint8 images.

What it offers:
    DEFAULTS                   the organism's sampling defaults (steps, guidance), read from
                               weights/organism.json where training measured them
    generate(pipe, prompts, seeds, ...) -> np.ndarray (N, H, W, 3) uint8

Determinism: image i depends only on (prompts[i], seeds[i]) and the weights: each image gets its
own torch.Generator seeded with seeds[i] (on the CPU, so CPU and GPU draw the same noise), and
batches never mix noise between images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .nets import WEIGHTS_DIR


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings. guidance_scale is chosen by measurement (card.json, 'guidance_sweep')."""

    steps: int = 20
    guidance_scale: float = 3.0


def defaults(folder: Path | str = WEIGHTS_DIR) -> SamplingDefaults:
    """Sampling defaults stored with the weights (organism.json), else the dataclass defaults."""
    path = Path(folder) / "organism.json"
    if path.exists():
        meta = json.loads(path.read_text())
        s = meta.get("sampling", {})
        return SamplingDefaults(steps=s.get("steps", 20), guidance_scale=s.get("guidance_scale", 3.0))
    return SamplingDefaults()


@torch.no_grad()
def generate(pipe, prompts: list[str] | torch.Tensor, seeds: list[int], *, steps: int | None = None,
             guidance_scale: float | None = None, batch_size: int | None = None,
             progress: bool = True, desc: str = "generate") -> np.ndarray:
    """Generate one image per (prompt, seed) with `pipe`; returns uint8 (N, H, W, 3).

    steps and guidance_scale default to the organism's measured defaults. `prompts` may also be
    text-encoder outputs (N, 77, width), passed as prompt_embeds (the negative stays "").
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    d = defaults()
    steps = d.steps if steps is None else steps
    guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
    batch_size = batch_size or (256 if pipe.device.type == "cuda" else 32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="img")
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        size = pipe.unet.config.sample_size
        shape = (1, pipe.unet.config.in_channels, size, size)
        latents = torch.cat([torch.randn(shape, generator=g) for g in gens])
        latents = latents.to(pipe.device, pipe.unet.dtype)
        chunk = prompts[i:i + batch_size]
        given = {"prompt_embeds": chunk.to(pipe.device, pipe.text_encoder.dtype)} \
            if isinstance(chunk, torch.Tensor) else {"prompt": list(chunk)}
        res = pipe(**given, num_inference_steps=steps,
                   guidance_scale=guidance_scale, latents=latents, output_type="np")
        out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
        bar.update(len(gens))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, 64, 64, 3), np.uint8)
