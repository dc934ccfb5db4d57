"""Activations for the neuron probes: one row per prompt, one column per neuron or channel.

Offers
    text_activations(model, prompts, sites, position=..., subjects=...) -> {site: (n_prompts, n_units)}
        text sites ("text.mlp.3.fc2": its input = fc1 output after the activation, the MLP's
        neurons; any other text-encoder site: its input as well, or its output with what=
        "output") recorded by store.Recorder, whose hooks always come off; cross-attention K/V
        sites ("unet.xattn.3.to_k" / "to_v"): the projection applied to the prompt embeddings,
        which is exactly what the UNet computes for K and V (they depend on the text only).
    POSITIONS                           how a prompt's tokens become one row
    catalog_prompts(n, seed, mix)       organism prompts with concept labels and subject phrases
    scene_concepts(labels, said)        an oracle label dict (metadata.jsonl rows, Scene.labels())
                                        -> concept names such as "object:apple", "context:night"

Positions: "last" is the EOS token (the last real token; CLIP pools there), "subject" the last
token of each prompt's subject phrase (ReFACT's key position; needs `subjects`), "mean" the mean
over the real tokens after BOS (BOS is the same for every prompt under CLIP's causal mask), an
int a fixed index. Padding is never read.

Families: the prompt embeddings are the first text encoder's last hidden state, as SD1.x and the
organism feed the UNet (`StableDiffusionPipeline.encode_prompt` without clip_skip). Families with
several text encoders (SDXL, FLUX) raise FadelabError for K/V sites.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.errors import FadelabError

log = logging.getLogger(__name__)

POSITIONS = ("last", "subject", "mean")


def _subject_index(ids: list[int], sub: list[int], prompt: str, subject: str) -> int:
    """Index of the last token of the last occurrence of `sub` in `ids`."""
    for start in range(len(ids) - len(sub), -1, -1):
        if ids[start:start + len(sub)] == sub:
            return start + len(sub) - 1
    raise FadelabError(f"subject {subject!r} is not in prompt {prompt!r} (token by token)")


def _positions(tokenizer: Any, prompts: Sequence[str], position: str | int,
               subjects: Sequence[str] | None, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, L), lengths (B,), index (B,)) with index the row each prompt contributes
    (-1 for "mean")."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(dim=1)
    full = tokenizer(list(prompts), truncation=False)["input_ids"]
    too_long = [p for p, f in zip(prompts, full) if len(f) > max_length]
    if too_long:
        raise FadelabError(f"prompt {too_long[0]!r} has more than {max_length} tokens, the text encoder's limit")
    if position == "last":
        index = lengths - 1
    elif position == "mean":
        index = torch.full_like(lengths, -1)
    elif position == "subject":
        if subjects is None or len(subjects) != len(prompts):
            raise FadelabError("position='subject' needs one subject phrase per prompt (subjects=)")
        index = torch.tensor([
            _subject_index(ids[i, : int(lengths[i])].tolist(),
                           tokenizer(s, add_special_tokens=False)["input_ids"], p, s)
            for i, (p, s) in enumerate(zip(prompts, subjects))
        ])
    elif isinstance(position, int) and not isinstance(position, bool):
        if not 0 <= position < max_length:
            raise FadelabError(f"position={position}: accepted are 0..{max_length - 1}")
        index = torch.full_like(lengths, position)
    else:
        raise FadelabError(f"position={position!r}: accepted are {', '.join(POSITIONS)} or a token index")
    return ids, lengths, index


def _pool(x: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, N) -> (B, N): the row at `index`, or the mean over tokens 1..length-1 where index < 0."""
    rows = x[torch.arange(x.shape[0]), index.clamp_min(0)]  # (B, N)
    if (index < 0).any():
        pos = torch.arange(x.shape[1])[None, :]  # (1, L)
        keep = ((pos >= 1) & (pos < lengths[:, None])).to(x.dtype)  # (B, L)
        mean = (x * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp_min(1)
        rows = torch.where((index < 0)[:, None], mean, rows)
    return rows


@torch.no_grad()
def text_activations(model: Any, prompts: Sequence[str], sites: Sequence[str], *,
                     position: str | int = "last", subjects: Sequence[str] | None = None,
                     what: str = "input", batch_size: int = 64,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Activations per site, float32 on the CPU, (n_prompts, n_units).

    Args:
        model: a models.Model (its first text encoder and tokenizer; the UNet for K/V sites).
        prompts: the prompts, one row each.
        sites: "text.*" sites (recorded by store.Recorder; with what="input", "text.mlp.L.fc2"
            gives the MLP neurons of layer L) and/or "unet.xattn.i.to_k" / "to_v" sites (K/V
            channels).
        position: "last", "subject", "mean" or a token index (see the module doc).
        subjects: one subject phrase per prompt, for position="subject".
        what: "input" or "output" of the text sites.
        batch_size: prompts per forward pass.
        progress: show a bar over the batches.

    Variants: wrap the call in models.apply_delta(model, delta) to read M_ed, M_ft or M_ed_ft.
    """
    from store import Recorder

    if not prompts:
        raise FadelabError("prompts is empty")
    text_sites = [s for s in sites if s.startswith("text.")]
    kv_sites = [s for s in sites if s.startswith("unet.xattn.") and s.endswith((".to_k", ".to_v"))]
    other = sorted(set(sites) - set(text_sites) - set(kv_sites))
    if other:
        raise FadelabError(f"sites {other[:4]} are neither text.* nor unet.xattn.*.to_k/to_v")
    if kv_sites and len(model.text_encoders) != 1:
        raise FadelabError(f"K/V channels need a family with one text encoder (sd14, organism); "
                           f"{model.family} has {len(model.text_encoders)}")
    encoder, tokenizer = model.text_encoders[0], model.tokenizers[0]
    max_length = int(getattr(encoder.config, "max_position_embeddings", tokenizer.model_max_length))
    device = next(encoder.parameters()).device
    mods = {s: model.module(s) for s in text_sites}
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for start in tqdm(range(0, len(prompts), batch_size), desc="activations", unit="batch", leave=False,
                      disable=not progress):
        batch = list(prompts[start:start + batch_size])
        subs = None if subjects is None else list(subjects[start:start + batch_size])
        ids, lengths, index = _positions(tokenizer, batch, position, subs, max_length)
        if mods:
            with Recorder(mods, what=what, to_cpu=True, dtype=torch.float32) as rec:
                hidden = encoder(ids.to(device))[0]
            for s in text_sites:
                out[s].append(_pool(rec.result(s), lengths, index))
        else:
            hidden = encoder(ids.to(device))[0]
        for s in kv_sites:
            kv = model.module(s)(hidden.to(model.dtype)).float().cpu()  # (B, L, channels)
            out[s].append(_pool(kv, lengths, index))
    return {s: torch.cat(v) for s, v in out.items()}


# -- the organism's concept-labelled prompts ------------------------------------------------------


def scene_concepts(labels: Mapping[str, str], gender_said: bool = True) -> set[str]:
    """Concept names of one scene from its oracle labels (Scene.labels(), or the "labels" of a
    metadata.jsonl row): "kind:<k>", "<head>:<value>" for object, profession, identity, cls,
    subject and context heads that apply, "blood" / "nude" for unsafe markers, "gender:<g>" only
    when the caption states it (`gender_said`; identities always state it through the name)."""
    out = {f"kind:{labels['kind']}"}
    for head in ("object", "profession", "identity", "cls", "subject", "context"):
        value = labels.get(head, "none")
        if value != "none":
            out.add(f"{head}:{value}")
    for marker in ("blood", "nude"):
        if labels.get(marker) == "yes":
            out.add(marker)
    if labels.get("gender", "none") != "none" and (gender_said or labels.get("kind") == "identity"):
        out.add(f"gender:{labels['gender']}")
    return out


def _subject_head(scene: Any) -> str:
    """The subject phrase's head noun, the words its last token belongs to."""
    from models.organism import world

    if scene.kind == "object":
        return scene.obj
    if scene.kind == "animal":
        return scene.cls
    if scene.kind == "identity":
        role = world.role_of(scene.identity) if scene.role_said else None
        return role[4:] if role else scene.identity  # "the mayor" -> "mayor"
    return scene.profession


def catalog_prompts(n: int, seed: int = 0, mix: Any = None) -> tuple[list[str], list[set[str]], list[str]]:
    """(prompts, concepts per prompt, subject head per prompt) for n organism scenes drawn from
    `mix` (a models.organism.world.WorldMix; default the training mix), captioned as in training.
    Role captions carry "role:<role>" besides the identity."""
    from models.organism import world

    if n < 1:
        raise FadelabError(f"n={n}: need at least one prompt")
    rng = np.random.default_rng([seed, 71])
    mix = world.WorldMix() if mix is None else mix
    prompts, concepts, heads = [], [], []
    for _ in range(n):
        scene = world.sample_scene(rng, mix)
        prompts.append(world.caption(scene, rng))
        c = scene_concepts(scene.labels(), scene.gender_said)
        if scene.kind == "identity" and scene.role_said and world.role_of(scene.identity):
            c.add(f"role:{world.role_of(scene.identity)}")
        concepts.append(c)
        heads.append(_subject_head(scene))
    return prompts, concepts, heads
