"""Resumable training state on disk (one folder per run).

Offers
    save(folder, step, params, optimizer, scheduler, loss, meta)   state.pt, written atomically
    save_checkpoint(folder, step, deltas)                           checkpoint_<step>.pt
    load(folder, meta) -> dict | None                               the saved state, after checking
                                                                    it belongs to this run
    checkpoints(folder, up_to) -> [(step, {site: dW | (B, A)})]

Layout of `folder`:
    state.pt                    {"step", "params", "optimizer", "scheduler", "loss", "meta"}: the
                                last checkpoint's trained parameters (by name), optimizer and
                                learning-rate schedule, the loss curve up to it, and a JSON
                                description of the run (method, hparams, seed, data, processes)
    checkpoint_<8 digits>.pt    the checkpoint deltas ({"step", "deltas"})

Every file is written to a temporary name and renamed, so a killed run leaves the previous state
whole. The index and noise streams of the loop are functions of (seed, step), so a resumed run
draws exactly the batches and noise an uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from models.errors import FadelabError

STATE = "state.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(folder: Path, step: int, params: dict, optimizer: dict, scheduler: dict, loss: list[float],
         meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save({"step": step, "params": params, "optimizer": optimizer, "scheduler": scheduler,
                  "loss": torch.tensor(loss, dtype=torch.float32), "meta": json.dumps(meta, sort_keys=True)},
                 folder / STATE)


def save_checkpoint(folder: Path, step: int, deltas: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save({"step": step, "deltas": deltas}, folder / f"checkpoint_{step:08d}.pt")


def _differences(saved: dict, meta: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(meta)):
        a, b = saved.get(key), meta.get(key)
        if key == "hparams" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                    if k != "steps" and a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} then, {b!r} now")
    return out


def load(folder: Path, meta: dict) -> dict | None:
    """The state saved in `folder`, or None when there is none. Raises FadelabError when it was
    saved by a run with another method, hparams (the step count may grow), seed, data or number
    of processes."""
    path = folder / STATE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["meta"])
    diff = _differences(saved, json.loads(json.dumps(meta, sort_keys=True)))
    if diff:
        raise FadelabError(f"the state in {folder} belongs to another run ({diff[0]}); "
                           "give another state_dir or delete this one")
    return state


def checkpoints(folder: Path, up_to: int) -> list[tuple[int, dict]]:
    """The saved checkpoint deltas with step <= up_to, in step order."""
    out = []
    for path in sorted(folder.glob("checkpoint_*.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["step"] <= up_to:
            out.append((int(ckpt["step"]), ckpt["deltas"]))
    return out
