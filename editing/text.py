"""Prompts in, key rows out: the text side shared by UCE and ReFACT.

Offers
    check_concepts(model, concepts, what)   non-empty strings; on the organism, words of its world
    check_lengths(model, prompts)           every prompt fits its tokenizer(s), else FadelabError
    check_preserve(concepts, preserve)      no preserved prompt contains an edited concept
    organism_vocabulary()                   every word the organism's captions use
    KeySpace, key_spaces(model, ...)        the edited sites grouped by the text rows they read
    encode(model, prompts)                  {space: Rows(emb (B, T, d) fp32, last (B,))}
    edit_rows(edit, guides, mode)           UCE's aligned (c_e, [c_g, ...]) rows, "tail" or "last"
    row_counts(edit, guides, mode)          how many rows each edited prompt gives
    preserve_rows(rows, mode)               UCE's c_p rows
    select(rows, index), resolve_mode(model, tokens), pipeline_kind(model), flux_max_length(model)
    last_index(attention_mask)              the last subject token of each prompt

Key spaces (what a cross-attention or embedder site multiplies):
    SD1.x and the organism: the text encoder's last hidden state, (B, 77, d), one space "text".
    SDXL: the concatenation of both encoders' penultimate states, (B, 77, 768 + 1280 = 2048),
        one space "text" (diffusers' encode_prompt builds it).
    FLUX: "context" = T5's hidden states, (B, L, 4096), read by flux.context_embedder; "pooled"
        = CLIP's pooled output, (B, 1, 768), read by flux.text_embedder (its linear_1), as UCE's
        2025 code (trainscripts/uce_flux_edit.py).

The last subject token of a prompt is index attention_mask.sum() - 2 (CLIP: after <bos>, before
<eos>; T5: before </s>), as both UCE codes compute it; the empty prompt gives 0 (CLIP's <bos>,
T5's </s>).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.errors import FadelabError
from models.sites import sites_matching

_WORD = re.compile(r"[a-z][a-z'-]*")


def pipeline_kind(model) -> str:
    """"sd" (StableDiffusionPipeline, the organism included), "sdxl" or "flux"."""
    name = type(model.pipe).__name__
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion"):
        return "sd"
    raise FadelabError(f"editing supports StableDiffusion, StableDiffusionXL and Flux pipelines, got {name}")


def flux_max_length(model) -> int:
    """T5 tokens FLUX reads: 256 for schnell, 512 otherwise (the pipelines' defaults)."""
    return 256 if "schnell" in str(model.family) else 512


# -- checks --------------------------------------------------------------------------------------


def organism_vocabulary() -> frozenset[str]:
    """Every word of the organism's world: catalog names, caption phrasings, unsafe words."""
    from models.organism import prompts, world

    texts = [*world.OBJECTS, *world.PROFESSIONS, *world.IDENTITIES, *world.ROLES, *world.CLASSES,
             *world.KINDS, "sks", "a", "an", "the", "person", "people"]
    texts += [w for ws in world.UNSAFE_WORDS.values() for w in ws]
    texts += [w for ws in world.GENDER_WORDS.values() for w in ws]
    texts += [p for ps in world.CONTEXT_PHRASES.values() for p in ps]
    texts += [*prompts.OBJECT_TEMPLATES, *prompts.PERSON_TEMPLATES]
    words = {w for t in texts for w in _WORD.findall(t.replace("{x}", "").lower())}
    return frozenset(words | {part for w in words for part in w.split("-") if part})  # blood-covered: blood


def check_concepts(model, concepts: Sequence[str], what: str = "concept") -> list[str]:
    """The concepts, stripped; raise FadelabError for an empty list, an empty or non-string
    concept, or (on the organism) a word its world never uses. `model` may be a family name."""
    if isinstance(concepts, str):
        concepts = [concepts]
    if not concepts:
        raise FadelabError(f"no {what} given: pass at least one non-empty {what}")
    out = []
    for c in concepts:
        if not isinstance(c, str) or not c.strip():
            raise FadelabError(f"{what} {c!r} is empty: give a word or phrase")
        out.append(c.strip())
    if (model if isinstance(model, str) else getattr(model, "family", None)) == "organism":
        vocab = organism_vocabulary()
        for c in out:
            unknown = [w for w in _WORD.findall(c.lower()) if w not in vocab]
            if unknown or not _WORD.findall(c.lower()):
                import difflib

                bad = unknown[0] if unknown else c
                close = difflib.get_close_matches(bad, sorted(vocab), n=3)
                raise FadelabError(f"unknown {what} {c!r}: the organism's world has no word {bad!r}"
                                   + (f" (close: {', '.join(close)})" if close else ""))
    return out


def check_preserve(concepts: Sequence[str], preserve: Sequence[str]) -> None:
    """Raise FadelabError when a preserved prompt contains an edited concept (as whole words)."""
    for c in concepts:
        pattern = re.compile(rf"(?<![\w-]){re.escape(c.lower())}(?![\w-])")
        for p in preserve:
            if pattern.search(p.lower()):
                raise FadelabError(f"preserve prompt {p!r} contains the edited concept {c!r}: "
                                   "a prompt cannot be both edited and preserved; drop it from the preserve set")


def _limits(model) -> list[tuple[object, int, str]]:
    kind = pipeline_kind(model)
    if kind == "flux":
        return [(model.pipe.tokenizer, model.pipe.tokenizer.model_max_length, "CLIP"),
                (model.pipe.tokenizer_2, flux_max_length(model), "T5")]
    return [(tok, tok.model_max_length, "CLIP") for tok in model.tokenizers]


def check_lengths(model, prompts: Sequence[str]) -> None:
    """Raise FadelabError naming the first prompt longer than a tokenizer of `model` allows
    (special tokens included); the pipelines would silently truncate it."""
    for tok, limit, name in _limits(model):
        ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
        for p, row in zip(prompts, ids):
            if len(row) > limit:
                raise FadelabError(f"prompt {p[:60]!r}{'...' if len(p) > 60 else ''} has {len(row)} "
                                   f"{name} tokens; {model.family} reads at most {limit}: shorten it")


# -- key spaces and rows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySpace:
    """Sites that multiply the same text rows: name ("text", "context", "pooled") and sites."""

    name: str
    sites: tuple[str, ...]


def key_spaces(model, sites: Sequence[str] | None = None, with_to_k: bool = True) -> list[KeySpace]:
    """UCE's edited sites, grouped by key space. Default sites: every unet.xattn.*.to_v (and
    to_k when `with_to_k`); on FLUX flux.context_embedder and flux.text_embedder."""
    kind = pipeline_kind(model)
    if kind == "flux":
        table = {"flux.context_embedder": "context", "flux.text_embedder": "pooled"}
        chosen = list(sites) if sites is not None else list(table)
        bad = [s for s in chosen if s not in table]
        if bad:
            raise FadelabError(f"UCE site {bad[0]!r} on FLUX: accepted are {', '.join(table)}")
        return [KeySpace(space, tuple(s for s in chosen if table[s] == space))
                for space in ("context", "pooled") if any(table[s] == space for s in chosen)]
    if sites is None:
        sites = [s for s in sites_matching(model, "unet.xattn.*") if s.endswith(".to_v")
                 or (with_to_k and s.endswith(".to_k"))]
    else:
        ok = set(sites_matching(model, "unet.xattn.*.to_[kv]"))
        bad = [s for s in sites if s not in ok]
        if bad:
            raise FadelabError(f"UCE site {bad[0]!r}: UCE edits cross-attention keys and values "
                               f"(unet.xattn.<i>.to_k / to_v; this model has {len(ok)})")
    return [KeySpace("text", tuple(sites))]


def last_index(attention_mask: Tensor) -> Tensor:
    """(B,) index of each prompt's last subject token: attention_mask.sum(-1) - 2, at least 0."""
    return (attention_mask.sum(-1) - 2).clamp_min(0)


@dataclass
class Rows:
    """Encoded prompts of one key space: emb (B, T, d) float32 and last (B,) int64."""

    emb: Tensor
    last: Tensor


def _mask(tok, prompts: list[str], length: int) -> Tensor:
    return tok(prompts, padding="max_length", max_length=length, truncation=True,
               return_tensors="pt")["attention_mask"]


@torch.no_grad()
def encode(model, prompts: Sequence[str], batch_size: int = 64) -> dict[str, Rows]:
    """Each key space's rows for `prompts`, exactly as the pipeline feeds its denoiser (float32,
    on the model's device; `last` on the CPU).

    Checks lengths first (FadelabError for a prompt that would be truncated).
    """
    prompts = list(prompts)
    check_lengths(model, prompts)
    kind = pipeline_kind(model)
    pipe, dev = model.pipe, model.device
    chunks: dict[str, list[Tensor]] = {}
    for i in range(0, len(prompts), batch_size):
        part = prompts[i:i + batch_size]
        if kind == "sd":
            emb = {"text": pipe.encode_prompt(part, dev, 1, False)[0]}
        elif kind == "sdxl":
            emb = {"text": pipe.encode_prompt(prompt=part, device=dev, do_classifier_free_guidance=False)[0]}
        else:
            ctx, pooled, _ = pipe.encode_prompt(prompt=part, prompt_2=None, device=dev,
                                                max_sequence_length=flux_max_length(model))
            emb = {"context": ctx, "pooled": pooled[:, None, :]}
        for k, v in emb.items():
            chunks.setdefault(k, []).append(v.float())
    out = {}
    for space, parts in chunks.items():
        emb = torch.cat(parts)  # (B, T, d)
        if space == "pooled":
            last = torch.zeros(len(prompts), dtype=torch.long)
        elif space == "context":
            last = last_index(_mask(pipe.tokenizer_2, prompts, emb.shape[1]))
        else:
            last = last_index(_mask(pipe.tokenizer, prompts, emb.shape[1]))
        out[space] = Rows(emb, last)
    return out


def resolve_mode(model, tokens: str) -> str:
    """UCEHparams.tokens with "auto" resolved for this model."""
    if tokens == "auto":
        return "last" if pipeline_kind(model) == "flux" else "tail"
    return tokens


def edit_rows(edit: Rows, guides: Sequence[Rows], mode: str) -> tuple[Tensor, list[Tensor]]:
    """(c_e, [c_g, ...]): the edited prompts' rows and, for each guide set, the rows they align with.

    "last": row last_e of each edited prompt, row last_g of each guide.
    "tail" (paper-era train_erase.py / train_debias.py): with far = max(last_e, last_g, ...) over
    the prompt and all its guides and T the sequence length, edited rows last_e .. T - 1 -
    (far - last_e) and guide rows last_g .. T - 1 - (far - last_g): all T - far rows, the
    concept's last token aligned with each guide's last token.
    """
    c_e: list[Tensor] = []
    c_g: list[list[Tensor]] = [[] for _ in guides]
    for i in range(edit.emb.shape[0]):
        lasts = [int(edit.last[i])] + [int(g.last[i]) for g in guides]
        if mode == "last":
            c_e.append(edit.emb[i, lasts[0]:lasts[0] + 1])
            for j, g in enumerate(guides):
                c_g[j].append(g.emb[i, lasts[j + 1]:lasts[j + 1] + 1])
            continue
        t = edit.emb.shape[1]
        far = max(lasts)
        c_e.append(edit.emb[i, lasts[0]:t - (far - lasts[0])])  # (T - far, d)
        for j, g in enumerate(guides):
            c_g[j].append(g.emb[i, lasts[j + 1]:t - (far - lasts[j + 1])])  # (T - far, d)
    return torch.cat(c_e), [torch.cat(rows) for rows in c_g]


def row_counts(edit: Rows, guides: Sequence[Rows], mode: str) -> list[int]:
    """How many rows `edit_rows` takes from each edited prompt."""
    if mode == "last":
        return [1] * edit.emb.shape[0]
    t = edit.emb.shape[1]
    return [t - max([int(edit.last[i])] + [int(g.last[i]) for g in guides]) for i in range(edit.emb.shape[0])]


def preserve_rows(rows: Rows, mode: str) -> Tensor:
    """c_p: every row of each preserved prompt ("tail", the paper-era code), or its last token."""
    if mode == "last":
        return rows.emb[torch.arange(rows.emb.shape[0]), rows.last]  # (B, d)
    return rows.emb.reshape(-1, rows.emb.shape[-1])  # (B * T, d)


def select(rows: Rows, index: Sequence[int]) -> Rows:
    """The rows of some prompts."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return Rows(rows.emb[idx], rows.last[idx])
