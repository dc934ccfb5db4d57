"""fadelab.editing: UCE and ReFACT as exact, reversible weight deltas (docs/editing.md).

    EditResult                      delta (models.WeightDelta), keys, method, request, hparams, info
    UCEHparams, DebiasHparams, ReFACTHparams, load_hparams(cls, file_or_dict)
    uce_erase(model, concepts, hparams, guide="", preserve=())
    uce_moderate(model, concepts, hparams)
    uce_replace(model, concepts, guides, hparams, preserve=())
    uce_edit(model, concepts, guides, hparams, preserve=(), task=...)
    uce_solve(w, c_e, v_star, c_p, lam, erase_scale, preserve_scale)   one site's dW (the math)
    uce_debias(model, professions, judge, hparams, preserve=())
    refact(model, request, hparams, stats=None); request_from_road(row)
    second_moment(model, site, texts), organism_corpus(n), save_stats, load_stats, SecondMoment
    oracle_judge(), OrganismClip(), open_clip_judge(path, arch), female_share(flags)
    ORGANISM_UNSAFE, organism_safe_prompts(n), organism_profession_preserve(p), organism_road_requests()

Every edit is pure: (model, request, hparams) -> EditResult, the model unchanged afterwards.
editing imports only models. Names load on first use (PEP 562), except `refact`: the function
shares its name with its module (editing/refact.py), so it is bound here at import; otherwise a
later `from editing.refact import ...` would leave `editing.refact` pointing at the module.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EditResult": "editing.result",
    "UCEHparams": "editing.hparams",
    "DebiasHparams": "editing.hparams",
    "ReFACTHparams": "editing.hparams",
    "REFACT_TEMPLATES": "editing.hparams",
    "load_hparams": "editing.hparams",
    "uce_edit": "editing.uce",
    "uce_erase": "editing.uce",
    "uce_moderate": "editing.uce",
    "uce_replace": "editing.uce",
    "uce_solve": "editing.uce",
    "uce_debias": "editing.debias",
    "request_from_road": "editing.refact",
    "second_moment": "editing.refact_stats",
    "organism_corpus": "editing.refact_stats",
    "save_stats": "editing.refact_stats",
    "load_stats": "editing.refact_stats",
    "SecondMoment": "editing.refact_stats",
    "oracle_judge": "editing.judges",
    "OrganismClip": "editing.judges",
    "open_clip_judge": "editing.judges",
    "female_share": "editing.judges",
    "ORGANISM_UNSAFE": "editing.presets",
    "organism_safe_prompts": "editing.presets",
    "organism_profession_preserve": "editing.presets",
    "organism_road_requests": "editing.presets",
}

from editing.refact import refact  # noqa: E402  (the function, not its module; see above)

__all__ = [*_EXPORTS, "refact"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'editing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
