"""fadelab: the CLI, the experiment runner and the notebook API.

`import fadelab as fl` gives the public API of fadelab.api (fl.load, fl.erase, fl.finetune,
fl.evaluate, ...; docs/api.md), imported on first use (PEP 562) so the CLI stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = ("load", "erase", "debias", "refact", "style_data", "finetune", "record", "probe", "suites",
        "evaluate", "values", "open_store", "add_edit", "add_finetune", "add_probes", "report",
        "edit_of", "sites_of", "spearman", "bootstrap_ci")


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module("fadelab.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fadelab' has no attribute {name!r}")
