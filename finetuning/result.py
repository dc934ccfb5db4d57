"""FineTuneResult: what a fine-tuning run hands to the store, the probes and the report.

Offers
    FineTuneResult    delta (the update only), checkpoints along the way, loss curve, adapter, info
    NonFiniteLoss     the FadelabError a run raises when its loss stops being finite; carries the
                      partial result up to the last good checkpoint

The delta is relative to the weights training started from (the loaded model with the base delta
applied), so for an edited model M_ed = M + dW_ed the fine-tuned model is

    M_ed_ft = M + dW_ed + dW_ft,      apply_delta(model, base_delta + result.delta),

and dW_ft can be set against dW_ed site by site. LoRA deltas are low-rank factors (exact), DoRA
and full fine-tuning dense, textual inversion a one-hot row update (see
finetuning.textual_inversion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.delta import WeightDelta
from models.errors import FadelabError


@dataclass
class FineTuneResult:
    """One fine-tuning run.

    Attributes:
        method: "full", "lora", "dora", "dreambooth" or "textual-inversion".
        delta: the final update dW_ft as a models.WeightDelta.
        checkpoints: (step, WeightDelta) every `checkpoint_every` steps, in step order (each
            relative to the start, restricted to `checkpoint_sites` when given).
        loss: (steps,) float32, the training loss of every optimizer step (mean over micro-batches
            and processes).
        adapter: a path (LoRA: the folder's pytorch_lora_weights.safetensors; textual inversion:
            learned_embeds.safetensors), or the adapter's state dict when no folder was given, or
            None (full, DreamBooth).
        info: hparams, seed, steps, timings, device, processes, data, method details (for textual
            inversion: token, token_ids, vocab, initializer_token, initial_embeds).
    """

    method: str
    delta: WeightDelta
    checkpoints: list[tuple[int, WeightDelta]] = field(default_factory=list)
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    adapter: Path | dict | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        """The checkpoint steps."""
        return [s for s, _ in self.checkpoints]

    def at(self, step: int) -> WeightDelta:
        """The checkpoint delta of `step`."""
        for s, d in self.checkpoints:
            if s == step:
                return d
        raise FadelabError(f"no checkpoint at step {step}; checkpoints are at {self.steps or 'none'}")

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest: method, steps, final loss, delta norms per site, timings."""
        tail = self.loss[-min(len(self.loss), 20):]
        return {
            "method": self.method,
            "steps": int(len(self.loss)),
            "loss_first": float(self.loss[0]) if len(self.loss) else None,
            "loss_last20": float(tail.mean()) if len(tail) else None,
            "checkpoints": self.steps,
            "delta_sites": len(self.delta.sites()),
            "delta_norm": float(np.sqrt(sum(self.delta.norm(s) ** 2 for s in self.delta.sites()))),
            "adapter": str(self.adapter) if isinstance(self.adapter, Path) else None,
            **{k: self.info[k] for k in ("seconds", "step_seconds", "device", "processes") if k in self.info},
        }


class NonFiniteLoss(FadelabError):
    """The loss (or a trained weight) stopped being finite.

    Attributes:
        step: the first optimizer step whose loss or weights were not finite.
        result: a FineTuneResult up to the last good checkpoint (delta = that checkpoint, or an
            empty delta when there was none); the resume state on disk, if any, is that
            checkpoint's.
    """

    def __init__(self, message: str, step: int, result: FineTuneResult) -> None:
        super().__init__(message)
        self.step = step
        self.result = result
