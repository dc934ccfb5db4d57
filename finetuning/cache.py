"""Caches that take the frozen VAE and text encoder out of the training step.

Offers
    LatentCache.build(vae, dataset, resolution, ...)   VAE posterior (mean, std) of every image,
                                                       scaled by the VAE's scaling factor, held
                                                       by dataset index
    LatentCache.sample(indices, eps)                   z = mean + std * eps (or the mean)
    LatentCache.shared(vae, dataset, resolution, ...)  build, or reuse the cache of an earlier
                                                       fine-tune in this process when the VAE's
                                                       weights and the image folder are unchanged
    TextCache.build(tokenizer(s), captions)            token ids per unique caption (one set per
                                                       tokenizer), and the caption row of every
                                                       dataset index
    TextCache.encode(text_encoder or fn, ...)          the frozen text encoders' outputs per
                                                       unique caption (SD1.x: hidden states;
                                                       SDXL: hidden + pooled; FLUX: T5 hidden +
                                                       CLIP pooled; see finetuning/objectives.py)
    encode_prompt(text_encoder, ids)                   SD's conditioning: the last hidden state

Keys are dataset indices, never loader positions: the loop draws indices, and a reshuffled epoch
reads the same entry for the same image. The stable-diffusion latent is

    z = s * (x_vae - shift),   x_vae ~ N(mean, std^2) = the VAE encoder's posterior,

with s = vae.config.scaling_factor (0.18215 for SD1.4) and shift = vae.config.shift_factor (0 when
absent), so caching the posterior and sampling per step is exactly the recipes' per-step
`vae.encode(x).latent_dist.sample() * s`.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _autocast(device: torch.device, bf16: bool, cache: bool = True):
    """bfloat16 autocast on CUDA when asked; nothing elsewhere (CPU bf16 autocast is very slow).
    `cache=False` re-casts weights at each use, as CUDA graph capture requires."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return nullcontext()


def latent_scale(vae: nn.Module) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a diffusers VAE."""
    cfg = vae.config
    return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_pixels(vae: nn.Module, pixels: Tensor, bf16: bool) -> tuple[Tensor, Tensor]:
    """(mean, std) of the scaled latent posterior for float pixels (B, 3, R, R) in [-1, 1]."""
    s, shift = latent_scale(vae)
    x = pixels.to(device=vae.device, dtype=vae.dtype)
    with _autocast(x.device, bf16):
        post = vae.encode(x).latent_dist
    mean = (post.mean.float() - shift) * s  # (B, C, h, w)
    std = post.std.float() * s
    return mean, std


@dataclass
class LatentCache:
    """Scaled VAE posterior per dataset index: mean, std of shape (N, C, h, w), float32."""

    mean: Tensor
    std: Tensor

    @classmethod
    def build(cls, vae: nn.Module, dataset, resolution: int, *, batch: int = 64, bf16: bool = True,
              device: torch.device | None = None, progress: bool = False) -> LatentCache:
        """Encode every image of `dataset` once (index order)."""
        from tqdm.auto import tqdm

        means, stds = [], []
        bar = tqdm(total=len(dataset), desc="cache latents", unit="img", disable=not progress)
        for i in range(0, len(dataset), batch):
            idx = range(i, min(i + batch, len(dataset)))
            mean, std = encode_pixels(vae, dataset.pixels(idx, resolution), bf16)
            means.append(mean)
            stds.append(std)
            bar.update(len(idx))
        bar.close()
        out = cls(torch.cat(means), torch.cat(stds))
        if device is not None:
            out = cls(out.mean.to(device), out.std.to(device))
        log.info("cached %d latents %s", len(out.mean), tuple(out.mean.shape[1:]))
        return out

    @classmethod
    def shared(cls, vae: nn.Module, dataset, resolution: int, *, bf16: bool = True,
               device: torch.device | None = None, progress: bool = False) -> LatentCache:
        """`build`, remembered for the next fine-tune of this process on the same image folder.

        A grid fine-tunes one data set dozens of times (every edit x method), and the VAE is
        frozen and no edit touches it, so the posterior is the same each time. The key holds the
        folder (path, metadata.jsonl's size and mtime), the resolution, precision and device, and
        the VAE's parameters (identity, storage, shape and in-place version counter, which
        `apply_delta` and optimizers bump), so changed weights or files build anew. In-memory
        data sets (no folder) are never shared. The two most recent caches are kept.
        """
        key = _cache_key(vae, dataset, resolution, bf16, device)
        if key is None:
            return cls.build(vae, dataset, resolution, bf16=bf16, device=device, progress=progress)
        if key in _SHARED:
            _SHARED[key] = _SHARED.pop(key)  # most recent last
            log.info("reusing the cached latents of %s", dataset.folder)
            return _SHARED[key]
        out = cls.build(vae, dataset, resolution, bf16=bf16, device=device, progress=progress)
        _SHARED[key] = out
        while len(_SHARED) > 2:
            _SHARED.pop(next(iter(_SHARED)))
        return out

    def sample(self, indices: Tensor, eps: Tensor | None) -> Tensor:
        """z for `indices`: mean + std * eps (eps: standard normal, (len(indices), C, h, w)), or the
        posterior mean when eps is None."""
        mean = self.mean[indices]
        return mean if eps is None else mean + self.std[indices] * eps


_SHARED: dict[tuple, LatentCache] = {}


def _cache_key(vae: nn.Module, dataset, resolution: int, bf16: bool, device) -> tuple | None:
    folder = getattr(dataset, "folder", None)
    if folder is None:
        return None
    meta = Path(folder) / "metadata.jsonl"
    try:
        st = meta.stat()
    except OSError:
        return None
    params = tuple((id(p), p.data_ptr(), tuple(p.shape), p._version) for p in vae.parameters())
    return (str(Path(folder).resolve()), st.st_size, st.st_mtime_ns, len(dataset), int(resolution), bool(bf16),
            str(device), id(vae), params)


def encode_prompt(text_encoder: nn.Module, ids: Tensor) -> Tensor:
    """Stable Diffusion's conditioning: the text encoder's last hidden state (B, L, D)."""
    return text_encoder(ids, return_dict=False)[0]


@dataclass
class TextCache:
    """Token ids per unique caption, the caption row of every dataset index, and (for frozen text
    encoders) their outputs per unique caption.

    One tokenizer (SD1.x) keeps plain tensors; several (SDXL's two CLIP towers, FLUX's CLIP and
    T5) keep a tuple with one entry per tokenizer, and the encoder's outputs as a tuple too (SDXL:
    hidden states and pooled embedding; FLUX: T5 hidden states and CLIP's pooled output).

    Attributes:
        ids: (U, L) token ids, padded to the tokenizer's model_max_length as SD pipelines do (or
            to the given max_length); a tuple of them for several tokenizers.
        row: (N,) index into `ids` for every dataset index.
        hidden: (U, L, D) float32 hidden states (or a tuple of per-caption outputs), or None while
            a text encoder trains.
        texts: the U unique captions.
    """

    ids: Tensor | tuple[Tensor, ...]
    row: Tensor
    hidden: Tensor | tuple[Tensor, ...] | None
    texts: list[str]

    @classmethod
    def build(cls, tokenizer, captions: list[str], device: torch.device | None = None,
              max_length: int | list[int | None] | None = None) -> TextCache:
        """Tokenize the unique captions with `tokenizer` (or a list of tokenizers, each padded to
        its `max_length` entry, None: its model_max_length)."""
        texts = sorted(set(captions))
        where = {t: i for i, t in enumerate(texts)}
        several = isinstance(tokenizer, (list, tuple))
        tokenizers = list(tokenizer) if several else [tokenizer]
        lengths = list(max_length) if isinstance(max_length, (list, tuple)) else [max_length] * len(tokenizers)
        ids = tuple(tok(texts, padding="max_length", max_length=n or tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device) for tok, n in zip(tokenizers, lengths))
        row = torch.tensor([where[c] for c in captions], dtype=torch.long)
        return cls(ids if several else ids[0], row.to(device), None, texts)

    @torch.no_grad()
    def encode(self, text_encoder: nn.Module | Callable, *, batch: int = 256, bf16: bool = True,
               device: torch.device | None = None) -> TextCache:
        """Fill `hidden` with the (frozen) text encoder's states for every unique caption.

        `text_encoder` is a module (SD1.x: its last hidden state) or a function of the ids (a
        tuple for several tokenizers) returning a tensor or a tuple of tensors, run under bf16
        autocast on `device` (default: the module's)."""
        if isinstance(text_encoder, nn.Module):
            device = device or next(text_encoder.parameters()).device
            module = text_encoder
            text_encoder = lambda ids: encode_prompt(module, ids.to(device))  # noqa: E731
        device = device or torch.device("cpu")
        several = isinstance(self.ids, tuple)
        n = len(self.ids[0] if several else self.ids)
        out: list[Any] = []
        for i in range(0, n, batch):
            ids = tuple(x[i:i + batch] for x in self.ids) if several else self.ids[i:i + batch]
            with _autocast(device, bf16):
                out.append(text_encoder(ids))
        if isinstance(out[0], tuple):
            self.hidden = tuple(torch.cat([o[k] for o in out]).float() for k in range(len(out[0])))
        else:
            self.hidden = torch.cat(out).float()
        return self

    def for_indices(self, indices: Tensor) -> tuple[Any, Any]:
        """(token ids, cached outputs or None) for dataset `indices` (tuples where the cache holds
        tuples)."""
        rows = self.row[indices]

        def take(x):
            return tuple(t[rows] for t in x) if isinstance(x, tuple) else x[rows]

        return take(self.ids), None if self.hidden is None else take(self.hidden)
