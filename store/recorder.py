"""`Recorder`: forward hooks over named modules that collect activations or stream them to a Store.

    modules = {"text.mlp.7.fc2": text_encoder.text_model.encoder.layers[7].mlp.fc2, ...}
    with Recorder(modules, what="input") as rec:             # fc2 input: ReFACT's key space
        text_encoder(ids)
    keys = rec.result("text.mlp.7.fc2")                      # (prompt, token, neuron)

The caller resolves sites to modules (the store knows no model). The hooks are registered on
``__enter__`` and always removed in ``finally`` on exit, also when the block raises.

UNet sites (diffusion sampling). Tell the recorder the timestep before each UNet call with
`set_timestep(t)`; only timesteps in ``timesteps`` are recorded, and `end_batch()` after the
sampling loop stacks them into ``(prompt, timestep, ...)`` in the order of ``timesteps``. With
``cfg=True`` the batch is taken as diffusers builds it for classifier-free guidance,
``torch.cat([uncond, cond])``: the first half of the batch is the unconditional branch, the
second the conditional one, and each call becomes ``(prompt, cfg_branch=[uncond, cond], ...)``.
So a pooled UNet site gives dims ``(prompt, timestep, cfg_branch, neuron)``.

Reduction: ``reduce=None`` keeps the full tensor; ``"mean_spatial"`` averages over space, i.e.
over (H, W) for (B, C, H, W) tensors and over the sequence axis for (B, HW, C) tensors as the
attention blocks of a UNet see them (not meant for text-encoder sites, whose axis 1 is tokens);
a callable ``f(tensor) -> tensor`` maps a batch-first tensor to a batch-first tensor.

Streaming. With ``store=`` the recorder writes each batch's rows (axis 0 = prompt) to
``store.open_activations(variant, site, (n_prompts, ...))`` instead of keeping them, one
committed transaction per write, so 1,000 prompts x 12 layers x 77 tokens x 3072 never sit in
RAM. On a rerun, `start_row` is the first prompt not yet committed for every site: feed the
prompts from there.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from store.errors import StoreError

log = logging.getLogger(__name__)

CFG_BRANCHES = ("uncond", "cond")


def _mean_spatial(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:  # (B, C, H, W) -> (B, C)
        return x.mean(dim=(2, 3))
    if x.dim() == 3:  # (B, HW, C) -> (B, C)
        return x.mean(dim=1)
    raise StoreError(f"mean_spatial needs a (B, C, H, W) or (B, HW, C) tensor; got shape "
                     f"{tuple(x.shape)}")


class Recorder:
    """Record the input or output of each module in `modules` ({site: nn.Module}).

    Args:
        modules: {site name: module}, resolved by the caller.
        what: "input" (first positional input) or "output" (first output if a tuple).
        reduce: None, "mean_spatial", or a callable applied to each batch-first tensor.
        to_cpu: move each recorded tensor to the CPU.
        dtype: cast recorded tensors (e.g. torch.float16); None keeps the module's dtype.
        cfg: split each batch into [uncond, cond] halves (see module docstring).
        timesteps: record only these timesteps (UNet mode; call `set_timestep` and `end_batch`).
        store, variant, n_prompts, dims, coords, tag, compression: stream to this Store
            (see `store.Store.open_activations`); `dims` defaults from the shape.
    """

    def __init__(self, modules: dict, what: str = "input", reduce: None | str | Callable = None,
                 to_cpu: bool = True, dtype: torch.dtype | None = None, cfg: bool = False,
                 timesteps=None, store=None, variant: str | None = None,
                 n_prompts: int | None = None, dims=None, coords: dict | None = None,
                 tag: str | None = None, compression: str | None = None):
        if what not in ("input", "output"):
            raise StoreError(f"bad what {what!r}: accepted are 'input' and 'output'")
        if not (reduce is None or reduce == "mean_spatial" or callable(reduce)):
            raise StoreError(f"bad reduce {reduce!r}: accepted are None, 'mean_spatial', a callable")
        if not modules:
            raise StoreError("modules is empty: pass {site: nn.Module} for at least one site")
        if store is not None and (variant is None or n_prompts is None):
            raise StoreError("streaming to a store needs variant= and n_prompts=")
        self.modules = dict(modules)
        self.what, self.to_cpu, self.dtype, self.cfg = what, to_cpu, dtype, cfg
        self.reduce = _mean_spatial if reduce == "mean_spatial" else reduce
        self.timesteps = None if timesteps is None else [int(t) for t in timesteps]
        self.store, self.variant, self.n_prompts = store, variant, n_prompts
        self.dims, self.coords, self.tag, self.compression = dims, dict(coords or {}), tag, compression
        self._handles: list = []
        self._t: int | None = None
        self._pending: dict[str, dict[int, torch.Tensor]] = {s: {} for s in self.modules}
        self._calls: dict[str, list[torch.Tensor]] = {s: [] for s in self.modules}
        self._writers: dict = {}
        self._row: dict[str, int] = {}
        self.start_row = self._resume_row()

    # -- resuming ------------------------------------------------------------------------------
    def _resume_row(self) -> int:
        """First prompt not committed for every site (0 without a store)."""
        if self.store is None:
            return 0
        from store.activations import activation_path
        rows = []
        for site in self.modules:
            grp = self.store.h5.get(activation_path(self.variant, site, self.tag))
            rows.append(0 if grp is None else int(grp.attrs.get("rows_done", 0)))
        return min(rows)

    # -- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        try:
            for site, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(site)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None and self.store is not None:
                for w in self._writers.values():
                    if w.rows_done == w.n_rows:
                        w.finish()
        finally:
            self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, site: str):
        def hook(module, inputs, output):
            x = inputs[0] if self.what == "input" else output
            if isinstance(x, (tuple, list)):
                x = x[0]
            self._record(site, x)
        return hook

    def set_timestep(self, t) -> None:
        """Tell the recorder the timestep of the next UNet call(s)."""
        self._t = int(t.item() if isinstance(t, torch.Tensor) else t)

    # -- per call ------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.reduce is not None:
            x = self.reduce(x)
        if self.dtype is not None:
            x = x.to(self.dtype)
        if self.to_cpu:
            x = x.to("cpu")
        if self.cfg:
            if x.shape[0] % 2:
                raise StoreError(f"cfg=True needs an even batch [uncond, cond]; got {x.shape[0]}")
            b = x.shape[0] // 2
            x = x.reshape(2, b, *x.shape[1:]).transpose(0, 1)  # (2B, ...) -> (B, 2, ...)
        return x

    def _record(self, site: str, x: torch.Tensor) -> None:
        if self.timesteps is not None:
            if self._t is None:
                raise StoreError("timesteps= was given: call set_timestep(t) before each UNet call")
            if self._t in self.timesteps:
                self._pending[site][self._t] = self._prepare(x)
            return
        self._emit(site, self._prepare(x))

    def end_batch(self) -> None:
        """UNet mode: stack this batch's recorded timesteps into (prompt, timestep, ...)."""
        for site, per_t in self._pending.items():
            missing = [t for t in self.timesteps if t not in per_t]
            if missing:
                raise StoreError(f"site {site}: timesteps {missing} were never seen in this batch; "
                                 f"seen {sorted(per_t)} (check set_timestep and timesteps=)")
            self._emit(site, torch.stack([per_t[t] for t in self.timesteps], dim=1))
            per_t.clear()
        self._t = None

    def _emit(self, site: str, x: torch.Tensor) -> None:
        if self.store is None:
            self._calls[site].append(x)
            return
        w = self._writers.get(site) or self._open_writer(site, x)
        row = self._row[site]
        if row + x.shape[0] > w.n_rows:
            raise StoreError(f"site {site}: {row + x.shape[0]} prompts recorded, n_prompts is "
                             f"{w.n_rows}")
        if not w.complete:  # a site finished by an earlier run is not rewritten
            w.write(x, start=row)
        self._row[site] = row + x.shape[0]

    def _default_dims(self, row_shape) -> tuple[str, ...]:
        lead = ("prompt",) + (("timestep",) if self.timesteps is not None else ()) + \
            (("cfg_branch",) if self.cfg else ())
        rest = len(row_shape) - (len(lead) - 1)
        tail = {0: (), 1: ("neuron",), 2: ("token", "neuron"),
                3: ("channel", "height", "width")}.get(rest)
        if self.timesteps is not None and rest == 2:
            tail = ("position", "neuron")  # (HW, C) of an unpooled attention block
        if tail is None:
            return lead + tuple(f"dim_{i}" for i in range(rest))
        return lead + tail

    def _open_writer(self, site: str, x: torch.Tensor):
        dims = tuple(self.dims) if self.dims is not None else self._default_dims(x.shape[1:])
        coords = dict(self.coords)
        if self.timesteps is not None:
            coords.setdefault("timestep", self.timesteps)
        if self.cfg:
            coords.setdefault("cfg_branch", list(CFG_BRANCHES))
        w = self.store.open_activations(
            self.variant, site, (self.n_prompts, *x.shape[1:]), str(x.dtype).replace("torch.", ""),
            dims, coords=coords, tag=self.tag, compression=self.compression)
        self._writers[site] = w
        self._row[site] = self.start_row
        return w

    # -- results -------------------------------------------------------------------------------
    def calls(self, site: str) -> list[torch.Tensor]:
        """The tensors recorded for `site`, one per call (per batch in UNet mode)."""
        if site not in self._calls:
            raise StoreError(f"unknown site {site!r}: recorded sites are {list(self._calls)}")
        return list(self._calls[site])

    def result(self, site: str) -> torch.Tensor:
        """All calls for `site` concatenated along the prompt axis."""
        calls = self.calls(site)
        if not calls:
            raise StoreError(f"nothing recorded for {site!r} (streamed to the store, or no call)")
        return torch.cat(calls, dim=0)
