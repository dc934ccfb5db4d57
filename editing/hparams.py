"""Hyper-parameters of the edits, as frozen dataclasses loadable from TOML or JSON.

Offers
    UCEHparams        closed-form UCE (erase, moderate, replace)
    DebiasHparams     UCE's iterative debiasing (a UCEHparams inside, plus the loop's settings)
    ReFACTHparams     ReFACT's rank-one edit of a text-encoder MLP
    load_hparams(cls, path_or_dict) -> cls     from a .toml / .json file or a dict; unknown
                      fields and wrong types raise FadelabError naming them

Defaults follow the official code (file and line of origin in each field's note), except where a
field says it was chosen on the organism by measurement (docs/editing.md has the sweeps).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from models.errors import FadelabError

T = TypeVar("T")

#: The 9 context templates of ReFACT (refact_main.get_context_templates); k_bar averages over them.
REFACT_TEMPLATES = (
    "{} in a realistic style portrait image", "{}, a portrait", "realistic painting of {}",
    "a current image of {}", "{}, news image", "a beautiful photograph of {}",
    "realistic drawing of {}", "{}, realistic portrait", "{} in a photo",
)


@dataclass(frozen=True)
class UCEHparams:
    """Closed-form UCE (Gandikota et al., WACV 2024, eq. 7).

    Attributes:
        lam: lambda, the weight of ||W - W_old||^2 (0.5 in both the paper-era train_erase.py
            call and the 2025 trainscripts/uce_sd_erase.py default).
        erase_scale: s_e, the weight of the edited rows (1 in both codes).
        preserve_scale: s_p, the weight of the preserved rows: 1.0, the 2025 code's default
            (trainscripts/uce_sd_erase.py); the paper-era code passes 0.1. On the organism (tail
            rows, 50 safe captions preserved, 24 images per line) 1.0 kept fidelity at 1.00 with
            the unsafe rate at 0.08, where 0.1 gave 0.96 and 0.04 (docs/editing.md).
        tokens: which token rows of a prompt enter C_E and C_P.
            "tail": the paper-era code: edit rows run from the concept's last token to the end of
            the sequence (eos and padding included), aligned with the guide's rows from its last
            token; a preserved prompt contributes every row of its sequence.
            "last": the 2025 code: one row per prompt, at its last token.
            "auto": "last" on FLUX (the only code for it is the 2025 one), "tail" elsewhere.
        with_to_k: edit every cross-attention to_k as well as to_v (True in both codes).
        sites: explicit sites to edit instead of the family's default set (None: every
            unet.xattn.*.to_k/to_v, or flux.context_embedder and flux.text_embedder).
    """

    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    tokens: str = "auto"
    with_to_k: bool = True
    sites: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.tokens not in ("tail", "last", "auto"):
            raise FadelabError(f"UCE tokens={self.tokens!r}: accepted are 'tail', 'last' and 'auto'")
        if not self.lam > 0:
            raise FadelabError(f"UCE lam={self.lam!r}: give a positive number (it keeps the system invertible)")
        if self.erase_scale < 0 or self.preserve_scale < 0:
            raise FadelabError(f"UCE scales must be >= 0, got erase_scale={self.erase_scale}, "
                               f"preserve_scale={self.preserve_scale}")


@dataclass(frozen=True)
class DebiasHparams:
    """UCE's iterative debiasing (paper sec. 3.3 / train_debias.py, trainscripts/uce_sd_debias.py).

    Each round generates `n_images` per profession with the current edit, asks a judge for the
    attribute, and moves each unfrozen profession's v* by step_size x (target - share) along the
    attribute directions; professions whose every share is within `tolerance` of its target are
    frozen. At most `max_rounds` rounds.

    Attributes:
        uce: the closed-form solve's settings (lam, scales, token rows, sites).
        attributes: the attribute words, in the judge's order ("female" is what judges flag).
        targets: the desired share of each attribute (0.5, 0.5 in both codes).
        tolerance: freeze a profession when max |share - target| <= tolerance (0.05, max_bias_diff).
        max_rounds: at most this many rounds (30 in both codes).
        step_size: how far v* moves per unit of gap, in units of |W c_p|_F (the paper-era code:
            0.1 per round on top of the previous round's weights; the 2025 code adds the gap times
            the raw attribute output, about 1). 0.25 on the organism: 1.0 overshoots (ceo 0.08 ->
            1.00 -> 0.00 in two rounds, docs/editing.md).
        n_images: images per profession per round (50, the paper-era code's 5 seeds x 10; the
            2025 code uses 10). The measured share's noise, about 0.5 / sqrt(n) near a share of
            0.5, is 0.07 at 50: above the 0.05 tolerance, so whether a profession freezes in a
            given round is partly chance, as in both official codes; n_images >= 100 brings it
            to the tolerance (0.05) and fewer wasted rounds.
        steps, guidance_scale: sampling; None takes the family's defaults (organism: 20, 3.0).
        seed: round r, profession k, image i uses seed seed * 1_000_000 + r * 10_000 + k * 1_000
            + i (never the evaluation's seeds; professions past the tenth: editing.debias.round_seeds).
        templates: prompts of each profession, "{x}" is the profession's noun phrase ("a ceo");
            None: the organism's caption phrasings on the organism, else the paper-era code's five.
    """

    uce: UCEHparams = UCEHparams()
    attributes: tuple[str, ...] = ("female", "male")
    targets: tuple[float, ...] = (0.5, 0.5)
    tolerance: float = 0.05
    max_rounds: int = 30
    step_size: float = 0.25
    n_images: int = 50
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 7
    templates: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.attributes != ("female", "male"):
            raise FadelabError(f"debias attributes={self.attributes!r}: the judges answer "
                               "female/male only; accepted is ('female', 'male')")
        if len(self.targets) != len(self.attributes) or abs(sum(self.targets) - 1) > 1e-6:
            raise FadelabError(f"debias targets={self.targets!r}: give one share per attribute, summing to 1")
        if not (1 <= self.max_rounds <= 100 and 1 <= self.n_images <= 1000):
            raise FadelabError(f"debias max_rounds={self.max_rounds}, n_images={self.n_images}: accepted "
                               "1-100 rounds and 1-1000 images (the seed scheme)")


@dataclass(frozen=True)
class ReFACTHparams:
    """ReFACT (Arad et al., NAACL 2024): a rank-one edit of one text-encoder MLP fc2.

    Attributes:
        layer: the edited layer of the (first) text encoder; None: the family default (SD1.x: 7,
            the paper's; the organism: chosen by the sweep in docs/editing.md; SDXL: 7).
        layer_2: the edited layer of SDXL's second encoder; None: 18 (7/12 of its 32 layers).
        lr: Adam's learning rate for delta (0.05).
        max_steps: at most this many Adam steps (100, clip_edit.py's v_max_grad_steps).
        p_threshold: stop when the mean p(new) over the prompts exceeds this (0.99).
        clamp_norm_factor: |delta| <= clamp_norm_factor |v_init| (4, the hparams file).
        weight_decay: the loss adds weight_decay |delta| / |v_init|^2 (0.1).
        similarity: "l2" (scores = -|f_context - f_target|, the paper's contrastive_text loss)
            or "cosine" (logit_scale-free cosine, for comparison).
        loss: "contrastive_text" (the paper's: a softmax over the distances to f(new) and f(old),
            stopping at p_threshold) or "target_text" (a departure from ReFACT, for the organism's
            issue 3 probe in docs/organism.md: the squared distance to f(new) over |f(new) - f(old)|^2,
            stopping once the mean of that distance ratio is below target_tolerance; the
            contrastive one is satisfied a fifth to a half of the way to f(new)).
        target_tolerance: the "target_text" stop: mean |f(P) - f(new)| / |f(new) - f(old)| (0.05).
        fact_token: where k* and k_bar are read and delta is added: "subject_last" (the paper's
            and the hparams file's: the subject's last token) or "last" (the prompt's final token,
            <eos>; ReFACT's code offers it as fact_token "last"); None: the family default
            ("subject_last"; the organism's from the sweep in docs/editing.md).
        templates: the context templates ("{}" is the subject) over which k_bar is averaged and
            the loss is taken (with the bare prompt).
        corpus_size: captions sampled for C on the organism when no statistics are given.
        seed: seed of that caption sample.
    """

    layer: int | None = None
    layer_2: int | None = None
    lr: float = 0.05
    max_steps: int = 100
    p_threshold: float = 0.99
    clamp_norm_factor: float = 4.0
    weight_decay: float = 0.1
    similarity: str = "l2"
    loss: str = "contrastive_text"
    target_tolerance: float = 0.05
    fact_token: str | None = None
    templates: tuple[str, ...] = REFACT_TEMPLATES
    corpus_size: int = 20000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.similarity not in ("l2", "cosine"):
            raise FadelabError(f"ReFACT similarity={self.similarity!r}: accepted are 'l2' and 'cosine'")
        if self.loss not in ("contrastive_text", "target_text"):
            raise FadelabError(f"ReFACT loss={self.loss!r}: accepted are 'contrastive_text' and 'target_text'")
        if not 0 < self.target_tolerance < 1:
            raise FadelabError(f"ReFACT target_tolerance={self.target_tolerance!r}: give a share in (0, 1)")
        if self.fact_token not in (None, "subject_last", "last"):
            raise FadelabError(f"ReFACT fact_token={self.fact_token!r}: accepted are 'subject_last' and 'last'")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise FadelabError(f"ReFACT template {bad[0]!r} must contain '{{}}' exactly once")
        if self.max_steps < 1:
            raise FadelabError(f"ReFACT max_steps={self.max_steps}: give at least 1")


# -- loading -------------------------------------------------------------------------------------


def _coerce(cls_name: str, name: str, value: Any, hint: Any) -> Any:
    """value as the annotated type: lists become tuples, nested dicts nested dataclasses."""
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return load_hparams(hint, value)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(cls_name, name, value, a)
            except FadelabError:
                continue
        raise FadelabError(f"{cls_name}.{name}={value!r}: expected {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FadelabError(f"{cls_name}.{name}={value!r}: expected a list")
        return tuple(value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise FadelabError(f"{cls_name}.{name}={value!r}: expected a number")
    if hint in (int, bool, str) and type(value) is not hint:
        raise FadelabError(f"{cls_name}.{name}={value!r}: expected {hint.__name__}")
    return value


def load_hparams(cls: type[T], source: str | Path | dict | None = None) -> T:
    """An hparams dataclass from a .toml or .json file, or a dict; None gives the defaults.

    Fields left out keep their defaults; a nested dataclass (DebiasHparams.uce) is a table/object.
    Raises FadelabError for a missing file, an unknown field or a wrongly typed value.
    """
    if source is None:
        return cls()
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FadelabError(f"hparams file {path} does not exist")
        text = path.read_text()
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise FadelabError(f"hparams file {path} is not valid {path.suffix[1:] or 'JSON'}: {e}") from None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise FadelabError(f"{cls.__name__} has no field {unknown[0]!r}; fields are {', '.join(names)}")
    kwargs = {k: _coerce(cls.__name__, k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def hparams_dict(h: Any) -> dict:
    """A JSON-ready dict of an hparams dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(h)))


__all__ = ["UCEHparams", "DebiasHparams", "ReFACTHparams", "REFACT_TEMPLATES", "load_hparams",
           "hparams_dict"]
