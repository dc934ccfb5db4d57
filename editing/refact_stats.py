"""ReFACT's statistic: C, the uncentred second moment of an MLP fc2's inputs over a text corpus.

Offers
    SecondMoment                 running sum of k k^T (float64) with add / moment / state_dict /
                                 load_state_dict (baukit's runningstats protocol)
    second_moment(model, site, texts, batch_size) -> SecondMoment
    organism_corpus(n, seed)     n captions of the organism's training distribution
    save_stats(stats, path, site, corpus) / load_stats(path) -> (SecondMoment, metadata)
    text_encoder_of(model, site) -> (encoder, tokenizer)

C = (1 / N) sum_tokens k k^T over every real token (attention mask 1, <bos> and <eos> included) of
every text, k the input of the fc2 at `site` (ReFACT's layer_stats "mom2", as in ROME). ReFACT's
own statistics use 100,000 Wikitext samples; on the organism its own captions stand in (its CLIP
never saw other text), for real models pass any corpus or a statistics file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from models.errors import FadelabError
from models.sites import resolve

log = logging.getLogger(__name__)


class SecondMoment:
    """Running uncentred second moment: sum_i k_i k_i^T and the count, in float64."""

    def __init__(self, state: dict | None = None):
        self.sum: Tensor | None = None
        self.count = 0
        if state is not None:
            self.load_state_dict(state)

    def add(self, k: Tensor) -> None:
        """Add rows k (N, d)."""
        k = k.detach().to(torch.float64)
        s = k.T @ k  # (d, d)
        self.sum = s if self.sum is None else self.sum + s.to(self.sum.device)
        self.count += k.shape[0]

    def moment(self) -> Tensor:
        """C = sum / count, (d, d) float64."""
        if self.sum is None or self.count == 0:
            raise FadelabError("the second moment is empty: add at least one text")
        return self.sum / self.count

    def state_dict(self) -> dict:
        return {"sum": self.sum.cpu(), "count": torch.tensor(self.count, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.sum = state["sum"].to(torch.float64)
        self.count = int(state["count"])


def text_encoder_of(model, site: str):
    """(encoder, tokenizer) that own `site` ("text.*" -> the first, "text2.*" -> the second)."""
    m = re.fullmatch(r"(text2?)\.mlp\.(\d+)\.fc2", site)
    if not m:
        raise FadelabError(f"ReFACT site {site!r}: expected text.mlp.<layer>.fc2 or text2.mlp.<layer>.fc2")
    i = 0 if m.group(1) == "text" else 1
    encoders, tokenizers = model.text_encoders, model.tokenizers
    if i >= len(encoders):
        raise FadelabError(f"{model.family} has no second text encoder (site {site!r})")
    return encoders[i], tokenizers[i]


@torch.no_grad()
def second_moment(model, site: str, texts: Sequence[str], batch_size: int = 256,
                  progress: bool = False) -> SecondMoment:
    """C of the fc2 inputs at `site` over `texts` (real tokens only; texts longer than the
    tokenizer's limit are truncated, as the pipeline would)."""
    encoder, tok = text_encoder_of(model, site)
    module = resolve(model, site)
    if not texts:
        raise FadelabError("no texts for the second moment: give a non-empty corpus")
    stats = SecondMoment()
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    dev = next(encoder.parameters()).device
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=f"C at {site}", disable=not progress):
            batch = tok(list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=tok.model_max_length, return_tensors="pt")
            captured.clear()
            encoder(input_ids=batch.input_ids.to(dev))
            k = captured[0]  # (B, T, d_in)
            mask = batch.attention_mask.to(k.device).bool()
            stats.add(k[mask])
    finally:
        handle.remove()
    return stats


def organism_corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """n captions of scenes from the organism's training mix (world.sample_scene + caption)."""
    from models.organism import world

    rng = np.random.default_rng([seed, 31])
    mix = world.WorldMix()
    return [world.caption(world.sample_scene(rng, mix), rng) for _ in range(n)]


def vocabulary_corpus(tokenizer, n: int = 2000, words: int = 24, seed: int = 0) -> list[str]:
    """n texts of `words` whole words drawn uniformly from the tokenizer's vocabulary.

    For random-weight builds, whose benchmark needs a C of full rank: the organism's captions use a
    few hundred words, so their fc2 inputs span too few directions to invert a 3,072-wide C (SD1.4
    at layer 7: 14,074 caption tokens left C singular and u^T k* near 0). Not a substitute for a
    real text corpus when editing real weights.
    """
    vocab = [w[:-4] for w in tokenizer.get_vocab() if w.endswith("</w>") and w[:-4].isalpha()]
    if not vocab:
        raise ValueError("the tokenizer has no whole-word entries (ending in </w>)")
    vocab.sort()
    rng = np.random.default_rng([seed, 37])
    return [" ".join(rng.choice(vocab, size=words)) for _ in range(n)]


def save_stats(stats: SecondMoment, path: Path | str, site: str, corpus: str = "") -> Path:
    """Write the statistic as safetensors (sum float64, count) with site and corpus metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = stats.state_dict()
    save_file({"sum": state["sum"].contiguous(), "count": state["count"].reshape(1)}, str(path),
              metadata={"fadelab": "refact second moment", "site": site, "corpus": corpus,
                        "count": str(stats.count)})
    return path


def load_stats(path: Path | str) -> tuple[SecondMoment, dict]:
    """(SecondMoment, metadata) from a file written by save_stats."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FadelabError(f"ReFACT statistics file {path} does not exist (fadelab edit refact-stats writes one)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {"sum": f.get_tensor("sum"), "count": f.get_tensor("count")[0]}
    except (OSError, SafetensorError, KeyError) as e:
        raise FadelabError(f"{path} is not a ReFACT statistics file: {e}") from e
    if meta.get("fadelab") != "refact second moment":
        raise FadelabError(f"{path} is not a ReFACT statistics file (no fadelab metadata)")
    return SecondMoment(state), meta
