"""Model families behind one loader: `load(family, weights)` -> `Model`.

Families: "sd14" (CompVis/stable-diffusion-v1-4), "sdxl" (stabilityai/stable-diffusion-xl-base-1.0),
"flux-schnell" (black-forest-labs/FLUX.1-schnell), "organism" (the lab's own trained model,
shipped as a StableDiffusionPipeline folder in models/organism/weights), or the path of any
local diffusers pipeline folder (its family read from model_index.json's _class_name).

weights:
    "hub"     from_pretrained on the family's hub id (for the organism: its shipped folder).
    a path    a local diffusers folder with this family's pipeline.
    "random"  the exact architecture with random weights (models.configs), optionally narrowed
              by `scale` (0 < scale <= 1; 1 is the real thing); for the organism or a folder,
              the folder's own configs.

Every build is checked against free device memory first (models.memory). Nothing here needs
the network except weights="hub" for the three public families.

Offers: FAMILIES, HUB_IDS, ORGANISM_DIR, Model, load, param_count.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from torch import nn

from models import build
from models.configs import ARCHS, Component, check_scale, scaled
from models.errors import FadelabError
from models.folders import PIPELINE_FAMILY, check_folder, read_folder
from models.memory import check_fits
from models.sites import resolve, site_map

log = logging.getLogger(__name__)

HUB_IDS = {
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}
FAMILIES = (*HUB_IDS, "organism")
ORGANISM_DIR = Path(__file__).parent / "organism" / "weights"

_TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass
class Model:
    """A loaded pipeline with its site table.

    Attributes:
        family: "sd14", "sdxl", "flux-schnell" or "organism" (a local folder gets the family of
            its pipeline class).
        pipe: the diffusers pipeline.
        sites: site name -> "component.module.path" (models.sites).
        device, dtype: where and in what precision the weights live.
        weights: where the weights came from: a hub id, a folder, or "random(scale=.., seed=..)".
    """

    family: str
    pipe: Any = field(repr=False)
    sites: dict[str, str] = field(repr=False)
    device: torch.device
    dtype: torch.dtype
    weights: str = ""

    def module(self, site: str) -> nn.Module:
        """The module at `site`."""
        return resolve(self, site)

    def weight(self, site: str) -> nn.Parameter:
        """The weight parameter of the module at `site`."""
        return self.module(site).weight

    @property
    def denoiser(self) -> nn.Module:
        """The UNet (SD, SDXL, organism) or the transformer (FLUX)."""
        unet = getattr(self.pipe, "unet", None)
        return unet if unet is not None else self.pipe.transformer

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [m for name in _TEXT if (m := getattr(self.pipe, name, None)) is not None]

    @property
    def tokenizers(self) -> list[Any]:
        return [t for name in _TOKENIZERS if (t := getattr(self.pipe, name, None)) is not None]

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Model:
        """Move the pipeline in place; returns self."""
        self.pipe.to(device=device, dtype=dtype)
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self


# -- assembling ----------------------------------------------------------------------------------


def _assemble(pipeline: str, parts: dict[str, Any]) -> Any:
    """Instantiate diffusers.<pipeline> from parts; optional components it lacks become None."""
    cls = getattr(diffusers, pipeline)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {name: parts.get(name) for name in params if name != "self" and params[name].default is inspect._empty}
    kwargs.update({k: v for k, v in parts.items() if k in params})
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    if "add_watermarker" in params:
        kwargs["add_watermarker"] = False
    return cls(**kwargs)


def _build_random(components: dict[str, Component], dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Instantiate every component with random weights; component k draws from the k-th seed of
    a generator seeded with `seed`."""
    seeds = torch.randint(2**62, (len(components),), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = {}
    for (name, component), sub_seed in zip(components.items(), seeds):
        obj = build.instantiate(component, seed=sub_seed, device=device)
        if isinstance(obj, nn.Module) and dtype != torch.float32:  # built in fp32
            obj = build.cast(obj, dtype)
        parts[name] = obj
    return parts


def _counts(components: dict[str, Component]) -> dict[str, int]:
    return {name: build.count_params(c) for name, c in components.items()}


def _finish(family: str, pipe: Any, device: torch.device, dtype: torch.dtype, weights: str) -> Model:
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return Model(family=family, pipe=pipe, sites=site_map(pipe), device=device, dtype=dtype, weights=weights)


def _random(family: str, scale: float, device: torch.device, dtype: torch.dtype, seed: int) -> Model:
    arch = ARCHS[family]
    components = scaled(family, scale)
    check_fits(_counts(components), dtype, device, f"{family} at scale {scale:g}")
    parts = _build_random(components, dtype, device, seed)
    parts.update({name: build.tokenizer(kind) for name, kind in arch.tokenizers.items()})
    pipe = _assemble(arch.pipeline, parts)
    return _finish(family, pipe, device, dtype, f"random(scale={scale:g}, seed={seed})")


def _random_from_folder(family: str, folder: Path, device: torch.device, dtype: torch.dtype, seed: int) -> Model:
    pipeline, components, tokenizer_names = read_folder(folder)
    check_fits(_counts(components), dtype, device, f"{family} from {folder}")
    parts = _build_random(components, dtype, device, seed)
    index = check_folder(folder)
    for name in tokenizer_names:
        parts[name] = getattr(transformers, index[name][1]).from_pretrained(str(folder / name))
    pipe = _assemble(pipeline, parts)
    return _finish(family, pipe, device, dtype, f"random(configs={folder}, seed={seed})")


def _from_folder(family: str | None, folder: Path, device: torch.device, dtype: torch.dtype) -> Model:
    index = check_folder(folder)
    pipeline = index.get("_class_name", "?")
    found = PIPELINE_FAMILY.get(pipeline)
    if family not in (None, "organism") and found != family:
        raise FadelabError(f"{folder} holds a {pipeline}, not a {family} pipeline ({ARCHS[family].pipeline})")
    _, components, _ = read_folder(folder)
    check_fits(_counts(components), dtype, device, f"the pipeline in {folder}")
    cls = getattr(diffusers, pipeline, None) or diffusers.DiffusionPipeline
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    try:
        pipe = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FadelabError(f"cannot load the diffusers folder {folder}: {first}") from e
    return _finish(family or found or pipeline, pipe, device, dtype, str(folder))


def _offline_errors() -> tuple[type[BaseException], ...]:
    """Exceptions from_pretrained raises when the hub cannot be reached (all are OSError or httpx's)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:  # huggingface_hub < 1.0 talks through requests, whose errors are OSErrors
        pass
    return tuple(errors)


def _from_hub(family: str, device: torch.device, dtype: torch.dtype) -> Model:
    hub_id = HUB_IDS[family]
    check_fits(_counts(scaled(family, 1.0)), dtype, device, f"{family} ({hub_id})")
    cls = getattr(diffusers, ARCHS[family].pipeline)
    kwargs: dict[str, Any] = {}
    if family == "sd14":
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
    elif family == "sdxl":
        kwargs = {"add_watermarker": False}
    try:
        pipe = cls.from_pretrained(hub_id, dtype=dtype, **kwargs)
    except _offline_errors() as e:
        raise FadelabError(
            f"cannot reach the model hub for {hub_id}: this machine is offline; "
            "pass a local diffusers folder with weights=PATH"
        ) from e
    return _finish(family, pipe, device, dtype, hub_id)


# -- the loader ----------------------------------------------------------------------------------


def _unknown_family(family: Any) -> FadelabError:
    looks_like_path = isinstance(family, Path) or (isinstance(family, str) and ("/" in family or "\\" in family))
    where = f"no folder at {family}; " if looks_like_path else ""
    return FadelabError(
        f"unknown model family {str(family)!r}: {where}accepted are {', '.join(FAMILIES)}, or a local diffusers folder"
    )


def load(
    family: str | Path,
    weights: str | Path = "hub",
    *,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Model:
    """Load a model family (see the module doc for families and weights).

    Args:
        family: "sd14", "sdxl", "flux-schnell", "organism", or a local diffusers folder.
        weights: "hub", "random", or a local diffusers folder.
        scale: width multiplier for weights="random" on the public families (0 < scale <= 1).
        device, dtype: where the weights go and in what precision.
        seed: random weights are a function of (seed, device).

    Raises FadelabError, with one line naming the bad value, for an unknown family, a bad scale,
    a missing or incomplete folder, an unreachable hub, or a model too large for the device.
    """
    scale = check_scale(scale)
    device = torch.device(device)
    kind = weights if isinstance(weights, str) and weights in ("hub", "random") else "path"
    if kind != "random" and scale != 1.0:
        raise FadelabError(f"scale={scale:g} applies to weights='random' only; real weights come at full width")

    if family == "organism":
        folder = ORGANISM_DIR if kind != "path" else Path(weights)
        if not (folder / "model_index.json").is_file():
            raise FadelabError(
                f"the organism weights are missing at {folder} (no model_index.json); `fadelab organism train` makes them"
            )
        if kind == "random":
            return _random_from_folder("organism", folder, device, dtype, seed)
        return _from_folder("organism", folder, device, dtype)

    if isinstance(family, str) and family in HUB_IDS:
        if kind == "random":
            return _random(family, scale, device, dtype, seed)
        if kind == "hub":
            return _from_hub(family, device, dtype)
        return _from_folder(family, Path(weights), device, dtype)

    if isinstance(family, (str, Path)) and Path(family).is_dir():
        folder = Path(family)
        if kind == "path":
            raise FadelabError(f"family {str(folder)!r} is already a folder; leave weights as 'hub' or 'random'")
        found = PIPELINE_FAMILY.get(check_folder(folder).get("_class_name"))
        if kind == "random":
            return _random_from_folder(found or "local", folder, device, dtype, seed)
        return _from_folder(None, folder, device, dtype)
    raise _unknown_family(family)


def param_count(family: str, component: str | None = None, scale: float = 1.0) -> int:
    """Parameters of one component of a family's architecture (None: all components), counted
    on the meta device, so the 859,520,964-parameter SD1.4 UNet counts instantly.

    For "organism" the shipped folder's configs are read (scale must be 1).
    """
    if family == "organism":
        check_scale(scale)
        if scale != 1.0:
            raise FadelabError("scale applies to the public families; the organism is counted at scale 1")
        if not (ORGANISM_DIR / "model_index.json").is_file():
            raise FadelabError(
                f"the organism weights are missing at {ORGANISM_DIR}; `fadelab organism train` makes them"
            )
        components = read_folder(ORGANISM_DIR)[1]
    elif family in HUB_IDS:
        components = scaled(family, scale)
    else:
        raise _unknown_family(family)
    if component is None:
        return sum(_counts(components).values())
    if component not in components:
        raise FadelabError(f"{family} has no component {component!r}; it has {', '.join(components)}")
    return build.count_params(components[component])
