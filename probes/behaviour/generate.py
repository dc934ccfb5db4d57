"""Images of every variant for a suite: one loaded base model, deltas applied in place.

What it offers:
    GenerationConfig                          steps, guidance, batch size, image size
    generate(model, prompts, seeds, cfg)      uint8 (N, H, W, 3), image k from (prompts[k], seeds[k])
    variant_images(model, variants, suite, store=None, cfg)  {variant: images}, stored under
                                              /images/<variant>/<suite.name>; images already in
                                              the store are read back, not regenerated

Variants: a variant is the base model plus a WeightDelta (None = the base, M). The model is
never copied: `models.apply_delta` adds the delta in place for the variant's images and
restores the base weights bit for bit afterwards, also when generation raises.

Determinism: image k depends only on (prompts[k], seeds[k]), the weights and the sampling
settings. Each image gets its own CPU torch.Generator seeded with seeds[k] (so CPU and GPU draw
the same initial noise), and batches never share noise between images. The organism uses its
own sampler (models.organism.sample.generate, its measured defaults); other families pass one
generator per image to the diffusers pipeline. Batch composition can change the float
arithmetic (a different GEMM blocking), which moves a few uint8 pixel values by 1 at most on
the CPU; the same batch size reproduces images exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from models.errors import FadelabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings shared by every variant (so variants differ only in weights).

    Attributes:
        steps: denoising steps; None = the family's default (organism: 20, its measured value;
            diffusers pipelines: their own default).
        guidance_scale: classifier-free guidance; None = the family's default (organism 3.0).
        batch_size: images per pipeline call; None = 256 for the organism on CUDA, 32 on CPU,
            8 for other families.
        height, width: image size; None = the pipeline's default.
    """

    steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise FadelabError(f"steps = {self.steps!r}: give at least 1 denoising step")
        if self.batch_size is not None and self.batch_size < 1:
            raise FadelabError(f"batch_size = {self.batch_size!r}: give at least 1")


def _pipe(model):
    return getattr(model, "pipe", model)


def _family(model) -> str:
    fam = getattr(model, "family", None)
    if fam is None and type(_pipe(model)).__name__ == "StableDiffusionPipeline":
        return "sd"
    return fam or "other"


@torch.no_grad()
def generate(model, prompts: Sequence[str], seeds: Sequence[int],
             cfg: GenerationConfig = GenerationConfig(), *, progress: bool = True,
             desc: str = "generate") -> np.ndarray:
    """One image per (prompt, seed) from the model's current weights; uint8 (N, H, W, 3)."""
    if len(prompts) != len(seeds):
        raise FadelabError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed "
                           "per prompt")
    pipe = _pipe(model)
    if _family(model) == "organism" and cfg.height is None and cfg.width is None:
        from models.organism.sample import generate as organism_generate

        return organism_generate(pipe, list(prompts), [int(s) for s in seeds], steps=cfg.steps,
                                 guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size,
                                 progress=progress, desc=desc)
    if not len(prompts):
        return np.zeros((0, cfg.height or 64, cfg.width or 64, 3), np.uint8)
    from models.fastgen import stock_images

    kwargs = {key: val for key, val in (("num_inference_steps", cfg.steps), ("guidance_scale", cfg.guidance_scale),
                                        ("height", cfg.height), ("width", cfg.width)) if val is not None}
    return stock_images(pipe, prompts, seeds, batch_size=cfg.batch_size or 8, progress=progress, desc=desc,
                        **kwargs)


def _variant_context(model, delta):
    if delta is None:
        return nullcontext(model)
    from models.delta import apply_delta

    return apply_delta(model, delta)


def variant_images(model, variants: Mapping[str, object], suite, store=None,
                   cfg: GenerationConfig = GenerationConfig(), *, progress: bool = True,
                   attrs: dict | None = None) -> dict[str, np.ndarray]:
    """Images of `suite` for every variant (name -> WeightDelta or None), stored as they finish.

    With a store, /images/<variant>/<suite.name> is read back when it exists (its prompts and
    seeds must equal the suite's, else FadelabError) and written when it does not.
    """
    out = {}
    for name, delta in variants.items():
        if store is not None and store.has_images(name, suite.name):
            got = store.read_images(name, suite.name)
            if list(got["prompt"]) != list(suite.prompts) or [int(s) for s in got["seed"]] != list(
                    suite.seeds):
                raise FadelabError(f"the store already holds images {name}/{suite.name} for other "
                                   "prompts or seeds; use another suite name or a new store")
            log.info("images %s/%s: %d read from the store", name, suite.name, len(got["seed"]))
            out[name] = got["pixels"]
            continue
        with _variant_context(model, delta):
            images = generate(model, suite.prompts, suite.seeds, cfg, progress=progress,
                              desc=f"{name} {suite.name}")
        if store is not None:
            store.create_images(name, suite.name, images, list(suite.prompts), list(suite.seeds),
                                attrs={"suite": suite.kind, **(attrs or {})})
        out[name] = images
    return out
