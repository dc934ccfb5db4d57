"""Textual inversion (Gal et al. 2022): a new token whose embedding is the only trained parameter.

Offers
    TextualInversion     the Method: a copied tokenizer with the placeholder token(s) added, a
                         copied text encoder whose token embedding grows by one row per vector,
                         the new rows initialised from a class word and trained, every other row
                         restored after each step (so only the new rows ever move)
    add_tokens(tokenizer, token, n) -> list[int]     the placeholder ids ("<sks>", "<sks>_1", ...)
    placeholder(model, token, embeds)                context manager: `model` understands the
                                                     token within the block (a copied tokenizer
                                                     and a grown embedding are swapped in); both
                                                     originals are back on exit, also on error

The objective (Gal et al., eq. 2) is the LDM loss with every weight frozen except the new
embedding v:

    v* = argmin_v  E_{z, y, eps, t} || eps - eps_theta(z_t, t, c_theta(y; v)) ||^2 .

The delta is "the token embedding row": site `text.embed.token` of a model that has the
placeholder (vocabulary V + n), as low-rank factors

    dW = B A,  B = [e_V, ..., e_{V+n-1}]  (one-hot columns, (V + n, n)),  A = v* - v_0  ((n, d)),

with v_0 the initial (class-word) embedding. The base model has no row for the token, so the
delta applies inside `placeholder(model, token, v_0)`; `placeholder(model, token, v*)` is the
fine-tuned model directly. Prompts without the token give the same images bit for bit, since no
other weight moves.
"""

from __future__ import annotations

import copy
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from models.errors import FadelabError

from .hparams import TextualInversionHParams
from .methods import Method, SiteNamer, _one_class, selected, working_copy

log = logging.getLogger(__name__)

SITE = "text.embed.token"


def token_names(token: str, n: int) -> list[str]:
    """The token strings of an n-vector placeholder, as diffusers names them: tok, tok_1, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_tokens(tokenizer: Any, token: str, n: int = 1) -> list[int]:
    """Add the placeholder's tokens to `tokenizer` (in place); returns their ids.

    Raises FadelabError when a token is already in the vocabulary.
    """
    names = token_names(token, n)
    vocab = tokenizer.get_vocab()
    taken = [t for t in names if t in vocab]
    if taken:
        raise FadelabError(f"placeholder token {taken[0]!r} is already in the tokenizer's vocabulary; "
                           "choose a new string such as '<sks>'")
    tokenizer.add_tokens(names)
    return tokenizer.convert_tokens_to_ids(names)


def _grown_embedding(old: nn.Embedding, rows: Tensor) -> nn.Embedding:
    """A new nn.Embedding holding old's rows followed by `rows` (same device and dtype as old)."""
    v, d = old.weight.shape
    new = nn.Embedding(v + len(rows), d, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[:v] = old.weight
        new.weight[v:] = rows.to(old.weight)
    return new


@contextmanager
def placeholder(model: Any, token: str, embeds: Tensor) -> Iterator[Any]:
    """Within the block, `model` (a models.Model or a pipeline) knows `token` with `embeds` (n, d).

    Swaps in a copy of the tokenizer with the token(s) added and a grown copy of the text
    encoder's token embedding; restores both originals on exit. The loaded weights themselves are
    never written.
    """
    pipe = getattr(model, "pipe", model)
    embeds = torch.atleast_2d(embeds)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    old = text_encoder.get_input_embeddings()
    if embeds.shape[1] != old.weight.shape[1]:
        raise FadelabError(f"embedding for {token!r} has width {embeds.shape[1]}; the text encoder's is {old.weight.shape[1]}")
    grown_tok = copy.deepcopy(tokenizer)
    ids = add_tokens(grown_tok, token, len(embeds))
    if ids[0] != old.weight.shape[0]:
        raise FadelabError(f"the tokenizer has {ids[0]} entries but the embedding {old.weight.shape[0]} rows; "
                           "cannot add a placeholder to this text encoder")
    try:
        pipe.tokenizer = grown_tok
        text_encoder.set_input_embeddings(_grown_embedding(old, embeds))
        yield model
    finally:
        text_encoder.set_input_embeddings(old)
        pipe.tokenizer = tokenizer


class TextualInversion(Method):
    """The placeholder's embedding rows are the only trained parameters."""

    name = "textual-inversion"

    def __init__(self, hp: TextualInversionHParams) -> None:
        super().__init__(hp)
        self.text_trainable = True

    def prepare(self, model: Any, dataset: Any) -> dict[str, Any]:
        hp: TextualInversionHParams = self.hp
        self.namer = SiteNamer(model.sites)
        tokenizer = copy.deepcopy(model.pipe.tokenizer)
        word = hp.initializer_token or _one_class(dataset)
        init_ids = tokenizer.encode(word, add_special_tokens=False)
        if len(init_ids) != 1:
            raise FadelabError(f"initializer_token {word!r} is {len(init_ids)} tokens; give a word that is one token")
        self.ids = add_tokens(tokenizer, hp.placeholder_token, hp.num_vectors)
        self.initializer = word
        text_encoder = working_copy(model.pipe.text_encoder)
        old = text_encoder.get_input_embeddings()
        self.vocab = old.weight.shape[0]
        if self.ids[0] != self.vocab:
            raise FadelabError(f"the tokenizer has {self.ids[0]} entries but the embedding {self.vocab} rows; "
                               "cannot add a placeholder to this text encoder")
        init = old.weight[init_ids[0]].detach().expand(hp.num_vectors, -1)
        emb = _grown_embedding(old, init)
        text_encoder.set_input_embeddings(emb)
        emb.weight.requires_grad_(True)
        self.weight = emb.weight
        self.start = emb.weight.detach().clone()  # the rows to restore after each step, and v_0
        self.components = {"text_encoder": text_encoder, "tokenizer": tokenizer}
        return dict(self.components)

    def captions(self, dataset: Any) -> list[str]:
        hp: TextualInversionHParams = self.hp
        string = " ".join(token_names(hp.placeholder_token, hp.num_vectors))
        if hp.templates:
            return [hp.templates[i % len(hp.templates)].format(string) for i in range(len(dataset))]
        pattern = re.compile(rf"\b{re.escape(hp.instance_word)}\b")
        out = [pattern.sub(string, c) for c in dataset.captions]
        if not any(string in c for c in out):
            raise FadelabError(f"no caption contains the instance word {hp.instance_word!r} to replace with "
                               f"{hp.placeholder_token!r}; set instance_word or templates")
        return out

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(SITE, self.weight)]

    @torch.no_grad()
    def after_step(self) -> None:
        """Every row but the placeholder's back to its start value (weight decay moves them)."""
        self.weight[: self.vocab] = self.start[: self.vocab]

    @property
    def embeds(self) -> Tensor:
        """The placeholder's current embedding rows (n, d)."""
        return self.weight.detach()[self.vocab:].float()

    @torch.no_grad()
    def delta(self, sites: list[str] | None = None) -> dict[str, Any]:
        if not selected(SITE, sites):
            return {}
        n = self.hp.num_vectors
        b = torch.zeros(self.vocab + n, n, device=self.weight.device)
        b[torch.arange(self.vocab, self.vocab + n), torch.arange(n)] = 1.0  # one-hot columns e_V..e_{V+n-1}
        a = self.embeds - self.start[self.vocab:].float()  # (n, d): v - v_0
        return {SITE: (b, a)}

    def adapter(self, model: Any, folder: Path | None) -> Any:
        from .lora_io import save_textual_inversion

        if folder is None:
            return {self.hp.placeholder_token: self.embeds.cpu()}
        return save_textual_inversion(folder, self.hp.placeholder_token, self.embeds)

    def info(self) -> dict[str, Any]:
        return {"token": self.hp.placeholder_token, "token_ids": list(self.ids), "vocab": self.vocab,
                "initializer_token": self.initializer,
                "initial_embeds": self.start[self.vocab:].float().cpu().tolist()}
