"""CUDA graphs for the denoiser's forward and backward in training (TrainHParams.cuda_graphs).

Offers
    GraphedDenoiser(denoiser)   a stand-in for `denoiser(zt, t, encoder_hidden_states=c,
                                return_dict=False)` that captures the call's forward and backward
                                as CUDA graphs at its first call and replays them after
    graphs_unsupported(hp, device, processes, objective) -> reason or None

Why. On a GPU an organism fine-tuning step is launch-bound: its UNet's forward and backward are
about 3,700 aten calls at batch 8 (counted on the CPU, 2026-12-07; a full step adds AdamW's
update), each dispatched from Python, and the main job's 8 processes share one GPU and the
machine's cores. `torch.cuda.make_graphed_callables` records the forward and the backward once,
for the run's fixed shapes, and each step then launches two graphs. Inputs are copied into the
graph's static tensors; parameters are read in place, so the optimizer's in-place updates, LoRA,
DoRA and a frozen base all work as in eager mode. Gradients reach the parameters (and a trained
text encoder through the condition) through autograd as before.

Limits: the shapes, dtypes and requires_grad of (zt, t, condition) must stay those of the first
call (a fine-tune's batch is fixed); a call that differs runs eagerly, with a warning, and so does
every call after a capture that fails. Autocast
must not cache casts (`cache_enabled=False`, what objectives.py passes once graphs are captured). One
process only: DDP's gradient hooks are not captured. One micro-batch per step: autograd may keep
the graph's static gradient tensor as a parameter's .grad, and a second micro-batch's replay
would overwrite it before accumulating into it.

Measured on one H100 (2026-12-07, scripts/device_graphs_probe.py, 60 steps, one process): organism
steps 2.8-5.1x faster (full 0.094 -> 0.018 s, LoRA 0.11 -> 0.031 s, DoRA 0.16 -> 0.056 s, DreamBooth
0.115 -> 0.024 s) with the eager runs' losses and deltas bit for bit. The organism's hparams default
to cuda_graphs = "auto"; SD-scale defaults leave them off, not measured there (docs/finetuning.md).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class _Call(nn.Module):
    """denoiser(zt, t, encoder_hidden_states=c) as a module of positional tensors (what
    make_graphed_callables takes), holding the denoiser so its parameters join the graph's inputs."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, zt: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.denoiser(zt, t, encoder_hidden_states=cond, return_dict=False)[0]


def _signature(args: tuple[Tensor, ...]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.requires_grad, a.device) for a in args)


class GraphedDenoiser:
    """Calls the denoiser through CUDA graphs captured at the first call (module docstring)."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self.graphed: Any = None
        self.signature: tuple | None = None
        self.eager_calls = 0
        self.failed: str | None = None  # why the capture failed; the denoiser then runs eagerly

    def __call__(self, zt: Tensor, t: Tensor, encoder_hidden_states: Tensor, return_dict: bool = False) -> tuple:
        args = (zt, t, encoder_hidden_states)
        sig = _signature(args)
        if self.graphed is None and self.failed is None:
            self._capture(args, sig)
        if self.graphed is not None and sig == self.signature:
            return (self.graphed(*args),)  # as return_dict=False, the objectives' call
        if self.graphed is not None:  # captured, but for other inputs
            if not self.eager_calls:
                log.warning("cuda_graphs: inputs %s differ from the captured %s; eager for this call",
                            sig, self.signature)
            self.eager_calls += 1
        return (self.denoiser(zt, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0],)

    def _capture(self, args: tuple[Tensor, ...], sig: tuple) -> None:
        """Record the graphs; a model with an op that cannot be captured (a host sync, a CPU
        tensor) trains on eagerly, with a warning, instead of failing the run. The capture's
        warm-up passes use torch.autograd.grad, so they leave the parameters' .grad alone."""
        # samples with the real inputs' values and requires_grad, detached from their graphs
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        _quiet_stream_mismatch()
        try:
            # unused trainable parameters get no gradient, as in eager mode (instead of an error)
            self.graphed = torch.cuda.make_graphed_callables(_Call(self.denoiser), sample, allow_unused_input=True)
        except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager steps
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.warning("cuda_graphs: capture failed (%s); the denoiser runs eagerly from here", self.failed)
            return
        self.signature = sig
        log.info("cuda_graphs: denoiser forward and backward captured for inputs %s", [tuple(a.shape) for a in args])


def _quiet_stream_mismatch() -> None:
    """Turn off torch's AccumulateGrad stream-mismatch warning for this process, before a capture.

    The capture's warm-up makes the parameters' AccumulateGrad nodes on its side stream, and the
    captured graph keeps them, so torch warns that their stream differs from the step's ("may
    incur unnecessary synchronization"). That is how the steps measured 2.8-5.1x faster and bit
    for bit eager's (module docstring); the warning, 3 lines in each process of the GPU main job,
    tells the user nothing to do. Session 20 filtered it with warnings.filterwarnings after the
    capture, and session 21's main job still printed it in all 8 processes; torch's own switch
    (which the warning names), set before the capture, is what this uses where torch has it."""
    switch = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if switch is not None:
        switch(False)
    else:  # an older torch: the Python filter, before the capture this time
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match",
                                category=UserWarning)


def graphs_unsupported(hp, device: torch.device, processes: int, objective: Any) -> str | None:
    """Why `hp.cuda_graphs` cannot apply to this run, or None when it can."""
    if device.type != "cuda":
        return f"CUDA only; this run is on {device.type}"
    if processes > 1:
        return f"one process only; this run has {processes} (DDP)"
    if hp.grad_accum > 1:  # a parameter's .grad may alias the graph's static gradient, which the
        # next micro-batch's replay overwrites before accumulation adds to it
        return f"grad_accum 1 only; this run has {hp.grad_accum}"
    if getattr(objective, "kind", None) != "sd":
        return f"the SD1.x objective only; this run's is {getattr(objective, 'kind', None)!r}"
    return None
