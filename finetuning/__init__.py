"""fadelab.finetuning: F in M_ft = F(M, D): full, LoRA, DoRA, DreamBooth and textual inversion in one loop.

    train(model, data, hparams, *, base_delta=None, device=None, seed=0, checkpoint_every=0,
          checkpoint_sites=None, state_dir=None, adapter_dir=None, grad_hook=None,
          callback=None, progress=True) -> FineTuneResult
    FineTuneResult         delta (dW_ft only), checkpoints [(step, WeightDelta)], loss, adapter, info
    NonFiniteLoss          FadelabError raised when the loss stops being finite (.result, .step)
    hparams                FullHParams, LoraHParams, DoraHParams, DreamBoothHParams,
                           TextualInversionHParams; defaults(method, family); load(path)
    ImageFolder, ImageTensors   imagefolder + metadata.jsonl data; images in memory
    placeholder(model, token, embeds)   context manager: a model that knows a textual-inversion token
    process_device()       the device of this process under `accelerate launch`
    METHODS                method names

See docs/finetuning.md. Imports only models/ (and its organism sampler for DreamBooth's class
images). Names are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "finetuning.loop",
    "process_device": "finetuning.loop",
    "FineTuneResult": "finetuning.result",
    "NonFiniteLoss": "finetuning.result",
    "ImageFolder": "finetuning.data",
    "ImageTensors": "finetuning.data",
    "placeholder": "finetuning.textual_inversion",
    "METHODS": "finetuning.hparams",
    "FullHParams": "finetuning.hparams",
    "LoraHParams": "finetuning.hparams",
    "DoraHParams": "finetuning.hparams",
    "DreamBoothHParams": "finetuning.hparams",
    "TextualInversionHParams": "finetuning.hparams",
    "defaults": "finetuning.hparams",
    "load_hparams": "finetuning.hparams",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = getattr(module, "load" if name == "load_hparams" else name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'finetuning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
