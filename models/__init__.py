"""fadelab.models: model families, stable site names, weight deltas, and the organism.

    load(family, weights="hub", *, scale=1.0, device="cpu", dtype=torch.float32, seed=0) -> Model
    Model                  family, pipe, sites, device, dtype; module(site), weight(site), denoiser, ...
    FAMILIES               ("sd14", "sdxl", "flux-schnell", "organism")
    param_count(family, component=None, scale=1.0) -> int
    site_map(obj) / resolve(obj, site) / sites_matching(obj, glob)
    WeightDelta, apply_delta, merge_delta, delta_between, snapshot
    FadelabError

Names are imported on first use (PEP 562), so `import models.errors` stays light and does not
pull in diffusers. models.organism is never imported from here.
"""

from __future__ import annotations

import importlib
from typing import Any

from models.errors import FadelabError

_EXPORTS = {
    "load": "models.families",
    "Model": "models.families",
    "FAMILIES": "models.families",
    "param_count": "models.families",
    "WeightDelta": "models.delta",
    "apply_delta": "models.delta",
    "merge_delta": "models.delta",
    "delta_between": "models.delta",
    "snapshot": "models.delta",
    "site_map": "models.sites",
    "resolve": "models.sites",
    "sites_matching": "models.sites",
}

__all__ = [*_EXPORTS, "FadelabError"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
