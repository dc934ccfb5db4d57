"""Hyperparameter files: one reader for every room's frozen config dataclasses.

    read_config(path) -> dict              a .toml or .json file's top-level table
    config_from(cls, data, what) -> cls    the dataclass, refusing unknown fields by name

Raises FadelabError for another suffix, a missing file or unknown fields, naming what is accepted.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from models.errors import FadelabError

T = TypeVar("T")


def read_config(path: str | Path) -> dict[str, Any]:
    """The top-level table of a .toml or .json file."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise FadelabError(f"config file {str(path)!r}: accepted are .toml and .json")
    if not path.is_file():
        raise FadelabError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)


def config_from(cls: type[T], data: dict[str, Any], what: str) -> T:
    """cls(**data), after checking every key names a field of cls."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FadelabError(f"unknown {what} settings {unknown}; accepted are {sorted(known)}")
    return cls(**data)
