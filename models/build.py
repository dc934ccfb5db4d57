"""Building components from configs: random weights, parameter counts on the meta device, tokenizers.

Offers
    instantiate(component, seed, device)   a model or scheduler with fresh (random) weights
    count_params(component)                parameters, counted without allocating (meta device)
    clip_tokenizer(pad_token)              the real CLIP BPE shipped in models/organism/weights/tokenizer
    t5_standin_tokenizer()                 a T5-class tokenizer over a stand-in vocabulary (see its doc)
    tokenizer(kind)                        one of the above by the kind names in models.configs.Arch
    cast(module, dtype, device)            torch's own Module.to, without diffusers' float32 warning

Randomness: a seed, applied inside `torch.random.fork_rng`, so the caller's global RNG state is
untouched and the same (seed, device) always gives the same weights. Each library's own
initialisation is kept (LayerNorm weights are ones, and so on), so random models have the
activation statistics of freshly initialised real architectures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import torch
import transformers
from torch import nn

from models.configs import Component
from models.errors import FadelabError

log = logging.getLogger(__name__)


def cast(module: nn.Module, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """`module` moved and cast with torch's own nn.Module.to, in place; returns it.

    diffusers' ModelMixin.to warns at every dtype cast that modules "should be kept in float32",
    even when it names none ([]): on the GPU main job once in each process, from random-weight
    builds, the fine-tunes' working copies and the organism trainer.
    """
    return nn.Module.to(module, device=device, dtype=dtype)

TOKENIZER_DIR = Path(__file__).parent / "organism" / "weights" / "tokenizer"

T5_PIECES = 32000  # sentencepiece pieces of t5-v1_1; + 100 <extra_id_*> = 32100 ids < vocab_size 32128
T5_MAX_LENGTH = 512  # model_max_length of FLUX.1's tokenizer_2


def model_class(component: Component) -> type:
    """The diffusers / transformers class a Component names."""
    library = {"diffusers": diffusers, "transformers": transformers}.get(component.library)
    cls = getattr(library, component.cls, None) if library else None
    if cls is None:
        raise FadelabError(f"cannot build {component.library}.{component.cls}: no such class")
    return cls


def _make(component: Component) -> object:
    cls = model_class(component)
    config = dict(component.config)
    if component.library == "transformers":
        return cls(cls.config_class(**config))
    return cls.from_config(config)


def instantiate(component: Component, seed: int = 0, device: torch.device | str = "cpu") -> object:
    """A fresh instance of `component` on `device`, its random init drawn from `seed`.

    Models come back in eval mode (as `from_pretrained` leaves them), in the library's default
    dtype (fp32); the caller casts.
    """
    device = torch.device(device)
    if not issubclass(model_class(component), nn.Module):
        # schedulers keep their tables (alphas_cumprod) on the CPU, as from_pretrained leaves them:
        # built under `with device` they land on the GPU and Euler's set_timesteps fails in numpy
        device = torch.device("cpu")
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        with device:
            obj = _make(component)
    if isinstance(obj, nn.Module):
        obj.eval()
    return obj


def count_params(component: Component) -> int:
    """Number of parameters of `component`, counted on the meta device (nothing is allocated).

    Tied parameters count once (as `nn.Module.parameters()` yields them). Schedulers have 0.
    """
    if not issubclass(model_class(component), nn.Module):
        return 0
    with torch.device("meta"):  # also ties weights, which accelerate.init_empty_weights skips
        module = _make(component)
    return sum(p.numel() for p in module.parameters())


# -- tokenizers ----------------------------------------------------------------------------------


def _require_bpe() -> Path:
    for name in ("vocab.json", "merges.txt"):
        if not (TOKENIZER_DIR / name).is_file():
            raise FadelabError(f"the CLIP BPE file {name} is missing from {TOKENIZER_DIR}")
    return TOKENIZER_DIR


def clip_tokenizer(pad_token: str | None = None) -> transformers.CLIPTokenizer:
    """The real CLIP BPE (49408 ids, model_max_length 77), from the files the lab ships.

    pad_token "!" gives SDXL's tokenizer_2 (OpenCLIP bigG pads with "!"); None keeps
    <|endoftext|>, as SD1.4's and SDXL's tokenizer.
    """
    kwargs = {"model_max_length": 77}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return transformers.CLIPTokenizer.from_pretrained(str(_require_bpe()), **kwargs)


def t5_standin_tokenizer() -> transformers.T5Tokenizer:
    """A T5Tokenizer (Unigram, as T5's sentencepiece model) over a stand-in vocabulary.

    Warning: not T5's vocabulary. The real spiece.model cannot be had offline, so the 32000
    pieces are the distinct pieces of the shipped CLIP BPE vocabulary in sentencepiece form
    ("photo</w>" -> "\u2581photo", "pho" -> "pho"), in merge order, plus the 52 single capital
    letters (CLIP's vocabulary is lowercase), laid out as T5's: <pad>=0, </s>=1, <unk>=2, pieces,
    then 100 <extra_id_*>. Ids stay below 32100 < vocab_size 32128, so it drives a random-weight
    T5 encoder through the FLUX pipeline as the real tokenizer would (mechanics, shapes, memory),
    but its ids mean nothing to real T5 weights: with real weights, load the real folder.
    """
    vocab = json.loads((_require_bpe() / "vocab.json").read_text())
    capitals = [c for upper in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for c in (upper, "\u2581" + upper)]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    seen = {p for p, _ in pieces} | set(capitals)
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if len(pieces) == T5_PIECES - len(capitals):
            break
        piece = "\u2581" + token[:-4] if token.endswith("</w>") else token
        if not token.startswith("<|") and piece not in seen:
            seen.add(piece)
            # scores in (-2, -1]: fewer pieces always win, ties go to earlier (commoner) merges
            pieces.append((piece, -1.0 - len(pieces) / T5_PIECES))
    pieces += [(c, -2.0 + 1e-6) for c in capitals]
    return transformers.T5Tokenizer(vocab=pieces, model_max_length=T5_MAX_LENGTH)


def tokenizer(kind: str) -> object:
    """A tokenizer by kind: "clip", "clip-bigG" or "t5-standin"."""
    if kind == "clip":
        return clip_tokenizer()
    if kind == "clip-bigG":
        return clip_tokenizer(pad_token="!")
    if kind == "t5-standin":
        return t5_standin_tokenizer()
    raise FadelabError(f"unknown tokenizer kind {kind!r}; known: clip, clip-bigG, t5-standin")
