"""Local diffusers pipeline folders: checking one, and reading its architecture without weights.

A diffusers folder holds model_index.json ({"_class_name": "<Pipeline>", "<component>":
["<library>", "<Class>"], ...}) and one subfolder per component. `check_folder` turns every way
that can be wrong into one FadelabError naming the folder and what is missing; `read_folder`
returns the components as `models.configs.Component`s, so they can be counted on the meta device
or built with random weights exactly like the built-in families.

Offers: PIPELINE_FAMILY, check_folder, read_folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.configs import Component
from models.errors import FadelabError

# pipeline class in model_index.json -> the built-in family with that pipeline
PIPELINE_FAMILY = {
    "StableDiffusionPipeline": "sd14",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux-schnell",
}

_MODEL_LIBRARIES = {"diffusers", "transformers"}


def check_folder(folder: Path) -> dict:
    """Read and return model_index.json of `folder`, checking every listed component subfolder.

    Raises FadelabError when the folder, model_index.json, or a component subfolder is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FadelabError(f"no diffusers folder at {folder}: the folder does not exist")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FadelabError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise FadelabError(f"{index_path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    for name, spec in _listed(index).items():
        if not (folder / name).is_dir():
            raise FadelabError(
                f"the diffusers folder {folder} lacks the component {name!r} ({spec[1]}) that model_index.json lists"
            )
    return index


def _listed(index: dict) -> dict[str, list]:
    """Components model_index.json lists with a class (skips [null, null] and settings)."""
    return {
        name: spec
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1] is not None
    }


def read_folder(folder: Path) -> tuple[str, dict[str, Component], list[str]]:
    """(pipeline class name, model and scheduler Components, tokenizer component names) of `folder`.

    Configs are read from each component's config.json (models) or scheduler_config.json.
    """
    folder = Path(folder)
    index = check_folder(folder)
    components: dict[str, Component] = {}
    tokenizers: list[str] = []
    for name, (library, cls) in _listed(index).items():
        if library not in _MODEL_LIBRARIES:
            continue
        if "Tokenizer" in cls:
            tokenizers.append(name)
            continue
        config_file = next(
            (folder / name / f for f in ("config.json", "scheduler_config.json") if (folder / name / f).is_file()),
            None,
        )
        if config_file is None:
            # feature extractors, image processors and the like carry no weights to count or build
            continue
        config = json.loads(config_file.read_text())
        if library == "transformers":
            config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
        components[name] = Component(library, cls, config)
    return index.get("_class_name", "?"), components, tokenizers
