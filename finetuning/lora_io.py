"""Adapters on disk, in the formats stock diffusers pipelines read.

Offers
    lora_state_dicts(components)             {component: peft state dict} of LoRA/DoRA working copies
    save_lora(folder, pipeline_cls, states, configs) -> Path
                                             pytorch_lora_weights.safetensors in diffusers' LoRA
                                             format (keys "unet.*" / "transformer.*" /
                                             "text_encoder.*" / "text_encoder_2.*", with the
                                             LoraConfig as adapter metadata), read by
                                             `pipe.load_lora_weights(folder)`
    save_textual_inversion(folder, token, embeds) -> Path
                                             learned_embeds.safetensors = {token: (n, d)}, read
                                             by `pipe.load_textual_inversion(path)`
    load_textual_inversion(path) -> (token, embeds)

The LoRA keys are peft's state dict passed through diffusers' own
`convert_state_dict_to_diffusers` and saved by the pipeline class's own `save_lora_weights`, as
the diffusers training scripts do; the one change is DoRA's magnitude vector, which peft 0.21
names "...lora_magnitude_vector" and transformers' adapter loader expects as
"...lora_magnitude_vector.weight" (without it the magnitude silently keeps its initial value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.errors import FadelabError

LORA_FILE = "pytorch_lora_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"


def lora_state_dicts(components: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
    """{component: diffusers-format LoRA state dict} for peft-injected working copies."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out = {}
    for component, module in components.items():
        state = get_peft_model_state_dict(module, adapter_name="default")
        state = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v.detach().float().cpu().contiguous()
                 for k, v in state.items()}
        out[component] = convert_state_dict_to_diffusers(state)
    return out


def _metadata(config: Any) -> dict[str, Any]:
    """The LoraConfig fields diffusers needs to rebuild the adapter (rank, alpha, modules, DoRA)."""
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "use_dora": bool(config.use_dora), "init_lora_weights": config.init_lora_weights}


def save_lora(folder: Path | str, pipeline_cls: Any, states: dict[str, dict[str, Tensor]],
              configs: dict[str, Any]) -> Path:
    """Write folder/pytorch_lora_weights.safetensors with the pipeline class's save_lora_weights."""
    import inspect

    accepted = inspect.signature(pipeline_cls.save_lora_weights).parameters
    unknown = sorted(c for c in states if f"{c}_lora_layers" not in accepted)
    if unknown:
        known = [k.removesuffix("_lora_layers") for k in accepted if k.endswith("_lora_layers")]
        raise FadelabError(f"cannot save a LoRA for component {unknown[0]!r}; {pipeline_cls.__name__}'s LoRA format "
                           f"holds {', '.join(known)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    for component, state in states.items():  # unet / transformer / text_encoder / text_encoder_2
        kwargs[f"{component}_lora_layers"] = state
        if f"{component}_lora_adapter_metadata" in accepted:
            kwargs[f"{component}_lora_adapter_metadata"] = _metadata(configs[component])
    pipeline_cls.save_lora_weights(str(folder), safe_serialization=True, **kwargs)
    return folder / LORA_FILE


def save_textual_inversion(folder: Path | str, token: str, embeds: Tensor) -> Path:
    """Write {token: embeds (n, d)} to folder/learned_embeds.safetensors (diffusers' format)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TI_FILE
    save_file({token: embeds.detach().float().cpu().contiguous()}, str(path))
    return path


def load_textual_inversion(path: Path | str) -> tuple[str, Tensor]:
    """(token, embeds (n, d)) from a file written by save_textual_inversion."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / TI_FILE
    if not path.is_file():
        raise FadelabError(f"no textual-inversion file at {path}")
    state = load_file(str(path))
    if len(state) != 1:
        raise FadelabError(f"{path} holds {len(state)} tensors; a diffusers textual inversion holds one (the token's)")
    token, embeds = next(iter(state.items()))
    return token, torch.atleast_2d(embeds)
