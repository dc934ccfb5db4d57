"""What one grid cell does: edit, fine-tune, evaluate, probe, and write it all to its store.

What it offers:
    Context(exp, out, device, code_version)   one loaded base model per process, shared by cells
    ctx.stage(name)                           time a block as one of the running cell's stages
    run_cell(ctx, cell)                       run one cell into out/cells/<id>.h5, mark it done
    save_delta(st, variant, delta, step) / load_delta(st, variant, step)   WeightDelta <-> store
    finished_edit_cell(ctx, edit_id)          the edit's cell when it is done (its store is readable)

Every cell works on the one base model in `ctx.model`; variants are deltas applied in place with
`models.apply_delta`, which restores the base weights bit for bit when the block ends, also on
an exception. Entries are written with the store's `require_*` (idempotent), so a cell that was
killed half-way redoes only what it had not written; the done mark is written last.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fadelab.grid import Cell, Experiment, cell_done, cell_path, cells, done_mark
from models.errors import FadelabError

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Per-process state: the experiment, the output folder, the device and the loaded model."""

    exp: Experiment
    out: Path
    device: str = "cpu"
    code_version: str = "unknown"
    progress: bool = True
    _model: Any = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    _stages: dict = field(default_factory=dict, repr=False)
    #: seconds the lazy model load took in this process (None until it ran)
    model_load_s: float | None = field(default=None, repr=False)

    @property
    def model(self):
        if self._model is None:
            t0 = time.perf_counter()
            from models import load

            weights = self.exp.weights
            if weights == "default":
                weights = "hub"
            kw = {"scale": self.exp.scale} if weights == "random" else {}
            if self.exp.dtype != "float32":
                import torch

                kw["dtype"] = getattr(torch, self.exp.dtype)
            self._model = load(self.exp.family, weights, device=self.device, seed=self.exp.seed, **kw)
            if self.exp.image_size:
                set_image_size(self._model, self.exp.image_size)
            self.model_load_s = time.perf_counter() - t0
        return self._model

    @contextmanager
    def stage(self, name: str):
        """Add the block's wall seconds to the running cell's stage `name` (run_cell keeps them
        with the cell's done mark; `fadelab status --stages` shows them). On a GPU the block
        ends with a synchronize, so queued kernels count where they were launched."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device != "cpu":
                import torch

                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
            self._stages[name] = self._stages.get(name, 0.0) + time.perf_counter() - t0

    def cache(self, key: str, make):
        """A per-process memo (judges, datasets, statistics) keyed by name."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def set_image_size(model, pixels: int) -> None:
    """Make `pixels` the default image size of every pipeline call on `model` (generation,
    UCE debias rounds, DreamBooth class images, the fine-tuning resolution): the UNet's
    sample_size in latents, and the pipeline's default_sample_size where it keeps one (SDXL,
    FLUX)."""
    pipe = model.pipe
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    if getattr(pipe, "unet", None) is not None:
        pipe.unet.register_to_config(sample_size=max(1, pixels // factor))
    if hasattr(pipe, "default_sample_size"):
        # FLUX packs 2 x 2 latent patches: height = default_sample_size * vae_scale_factor
        pipe.default_sample_size = max(2, pixels // factor)


# -- deltas in the store ---------------------------------------------------------------------------

def save_delta(st, variant: str, delta, step: int | None = None, dtype: str | None = None) -> None:
    """Write every site of a WeightDelta under `variant` (and `step`), keeping its provenance;
    the sites commit together (`Store.batch`). `dtype` ("bfloat16", "float32") casts every
    tensor (factors of a low-rank delta each) before it is written; None keeps the delta's."""
    import torch

    from models.delta import map_update

    attrs = {"provenance": json.dumps(delta.provenance, default=str, sort_keys=True)}
    cast = getattr(torch, dtype) if dtype else None

    def out(t):
        t = t.detach()
        return (t.to(cast) if cast is not None else t).cpu()

    with st.batch():
        for site in delta.sites():
            update = delta.deltas[site]
            value = map_update(update, out)
            st.require_delta(variant, site, value, step=step, attrs=attrs)


def save_edit(st, edit_id: str, variant: str, result) -> None:
    """Write an EditResult: its delta under `variant`, its keys and edit_info/<edit_id>."""
    save_delta(st, variant, result.delta)
    for name, site, value in result.key_entries():
        st.require_edit_key(edit_id, name, value.detach().cpu(), site=site)
    info = json.dumps({"method": result.method, "request": result.request,
                       "hparams": result.hparams_dict(), "info": result.info}, default=str)
    st.require_array(f"edit_info/{edit_id}", np.array(info))


def save_finetune(st, variant: str, delta, checkpoints, loss, loss_key: str,
                  dtype: str | None = None) -> None:
    """Write a fine-tune: the final delta and every (step, delta) checkpoint under `variant` (in
    `dtype`, see save_delta), and the loss curve under /loss/<loss_key>."""
    save_delta(st, variant, delta, dtype=dtype)
    for step, d in checkpoints:
        save_delta(st, variant, d, step=int(step), dtype=dtype)
    loss = np.asarray(loss, np.float64)
    if loss.size and not st.is_complete(f"/loss/{loss_key}"):
        st.create_loss(loss_key, np.arange(1, loss.size + 1), {"loss": loss})


def load_delta(st, variant: str, step: int | None = None):
    """The WeightDelta stored under `variant` (and `step`)."""
    from models import WeightDelta

    sites = st.sites(variant, step)
    if not sites:
        raise FadelabError(f"no delta for variant {variant!r} (step {step}) in {st.path}")
    deltas = {s: st.read_delta(variant, s, step) for s in sites}
    attrs = st.delta_attrs(variant, sites[0], step)
    provenance = json.loads(attrs.get("provenance", "{}")) if isinstance(attrs.get("provenance"), str) else {}
    return WeightDelta(deltas, provenance)


def _open_cell(ctx: Context, cell: Cell):
    from store import Store

    path = cell_path(ctx.out, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Store.open(path, "a", config=ctx.exp.text, code_version=ctx.code_version,
                      seeds={"experiment": ctx.exp.seed},
                      description=f"fadelab cell {cell.id}: {cell.variant}")


def finished_edit_cell(ctx: Context, edit_id: str) -> Cell | None:
    """The grid's cell for edit `edit_id` when it is done (its store can be read), else None."""
    owner = next(c for c in cells(ctx.exp) if c.kind == "edit" and c.edit == edit_id)
    return owner if cell_done(cell_path(ctx.out, owner), owner) else None


def edit_of(ctx: Context, edit_id: str):
    """The edit's EditResult-like pair (delta, keys): from the finished edit cell's store when it
    exists, else recomputed here (edits are deterministic for a given seed)."""
    key = f"edit:{edit_id}"
    if key in ctx._cache:
        return ctx._cache[key]
    from store import Store

    owner = finished_edit_cell(ctx, edit_id)
    if owner is not None:
        with Store.open(cell_path(ctx.out, owner), "r") as st:
            delta = load_delta(st, owner.variant)
            keys = st.edit_keys(edit_id)  # shared keys; per-site ones in EditResult's layout:
            for site in delta.sites():
                keys.update({f"{name}:{site}": v for name, v in st.edit_keys(edit_id, site).items()})
        ctx._cache[key] = (delta, keys)
    else:
        result = _compute_edit(ctx, ctx.exp.edit(edit_id))
        ctx._cache[key] = (result.delta, result.keys)
    return ctx._cache[key]


def _compute_edit(ctx: Context, table: dict):
    from fadelab import plan

    return plan.compute_edit(ctx, table)


def run_cell(ctx: Context, cell: Cell) -> None:
    """Run one cell into its store and write its done mark last."""
    from fadelab import plan
    from fadelab.runner import mps_client

    t0 = time.time()
    ctx._stages = {}
    with _open_cell(ctx, cell) as st:
        {"base": plan.base_cell, "edit": plan.edit_cell, "finetune": plan.finetune_cell,
         "edit_finetune": plan.edit_finetune_cell}[cell.kind](ctx, cell, st)
        stages = [[k, round(v, 2)] for k, v in ctx._stages.items()]  # pairs: the order they ran
        st.require_array(done_mark(cell), np.array([time.time() - t0]),
                         attrs={"variant": cell.variant, "device": ctx.device,
                                "stages": stages, "mps": mps_client(ctx.device)})
    log.info("cell %s done in %.1f s", cell.id, time.time() - t0)
