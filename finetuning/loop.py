"""The one training loop for every fine-tuning method, on accelerate.

Offers
    train(model, data, hparams, ...) -> FineTuneResult
    process_device(cpu=False)        the device this process trains on (cuda:LOCAL_RANK under
                                     `accelerate launch`), to load the model onto before train

The objective depends on the family and lives in finetuning/objectives.py (chosen by the pipeline's
components): for SD1.x-style pipelines and SDXL the latent-diffusion loss (Rombach et al. 2022,
eq. 2) with the scheduler's parameterisation,

    L = E_{z0, c, eps, t} w(t) || target - eps_theta(z_t, t, tau(c)) ||^2,
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,     target = eps  (or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0),

w(t) = 1, or min(SNR(t), gamma) / SNR(t) with min-SNR weighting (Hang et al. 2023, eq. 9; divided
by SNR + 1 for v), SDXL's conditioning adding the pooled embedding and time ids; for FLUX
rectified flow matching, z_t = (1 - sigma) z0 + sigma eps with target eps - z0. DreamBooth adds
prior_loss_weight times the same loss on class images (Ruiz et al. 2023, eq. 2).

How a run goes:
  1. The base delta (an edit) is applied to the loaded model with models.apply_delta for the whole
     run and restored bit for bit at the end, also on error; the model is never left changed.
  2. The method makes float32 working copies of what it trains (and DreamBooth generates its class
     images with the edited model); frozen parts are the loaded model's own modules.
  3. With hp.cache, VAE latents (posterior mean and std) and, when the text encoders are frozen,
     the family's text conditioning (SD1.x: hidden states; SDXL: hidden + pooled; FLUX: T5
     hidden + CLIP pooled) are computed once and looked up by dataset index each step.
  4. Each micro-batch draws dataset indices from a permutation per epoch seeded by (seed, epoch)
     and its noise from a generator seeded by (seed, micro-batch, process), so a resumed run is
     the uninterrupted one.
  5. Accelerate places the trained modules, wraps them for data parallelism under `accelerate
     launch` and prepares the optimizer. Precision is explicit bfloat16 autocast on CUDA (never on
     the CPU, where bf16 autocast is very slow), not accelerate's mixed_precision, because
     accelerate fixes that once per process and a lab process trains many methods.
  6. Every `checkpoint_every` steps: the losses so far are checked (a non-finite loss or weight
     raises NonFiniteLoss, keeping the last good checkpoint), the delta is recorded (restricted to
     `checkpoint_sites`), the resume state is written to `state_dir`, and `callback(step, work)`
     runs with the working model.
Attention runs through PyTorch SDPA: diffusers' AttnProcessor2_0 and transformers' "sdpa", the
defaults of both; the processors in use are listed in result.info["attention"]. On CUDA each
micro-batch runs without SDPA's cuDNN backend (training_attention).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from models.delta import WeightDelta, apply_delta, map_update, tensors_of
from models.errors import FadelabError

from . import state as state_io
from .cache import LatentCache, TextCache, encode_pixels
from .data import as_dataset
from .hparams import TrainHParams, to_dict
from .methods import Method, make_method
from .objectives import Objective, default_resolution, family_kind, make_objective
from .result import FineTuneResult, NonFiniteLoss

log = logging.getLogger(__name__)

GradHook = Callable[[str, Tensor, Tensor], Tensor]
LOSS_CHECK_EVERY = 25  # steps between host syncs of the loss buffer


def process_device(cpu: bool = False) -> torch.device:
    """The device accelerate gives this process (cuda:LOCAL_RANK under `accelerate launch`)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu).device


def _check_model(model: Any) -> None:
    pipe = getattr(model, "pipe", None)
    if pipe is None or not isinstance(getattr(model, "sites", None), dict):
        raise FadelabError(f"train needs a models.Model (models.load(...)), got {type(model).__name__}")
    try:
        family_kind(pipe)
    except FadelabError as e:
        raise FadelabError(f"{getattr(model, 'family', '?')}: {e}") from None


def _check_method(model: Any, hp: TrainHParams, kind: str) -> None:
    """Refuse what a family cannot train, in one line naming the family and what it accepts."""
    if kind != "sd" and hp.method == "textual-inversion":
        raise FadelabError(f"textual-inversion trains SD1.x-style families only (one CLIP text encoder: organism, "
                           f"sd14, SD1.x folders); {model.family} ({kind}) accepts full, lora, dora and dreambooth")


def _work_model(model: Any, components: dict[str, Any]) -> Any:
    """A models.Model sharing the loaded components, with the method's working copies swapped in."""
    from models import Model

    pipe = model.pipe
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {k: v for k, v in pipe.components.items() if k in params}
    kwargs.update(components)
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    work = type(pipe)(**kwargs)
    work.set_progress_bar_config(disable=True)
    return Model(family=model.family, pipe=work, sites=model.sites, device=model.device, dtype=model.dtype,
                 weights=f"{model.weights} (fine-tuning working copy)")


def _optimizer(hp: TrainHParams, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if hp.optimizer == "prodigy":  # prodigyopt's algorithm without its per-tensor .item() calls
        from finetuning.prodigy import DeviceProdigy as Prodigy

        return Prodigy(params, lr=lr, betas=(hp.adam_beta1, hp.adam_beta2), beta3=hp.prodigy_beta3,
                       eps=hp.adam_eps, weight_decay=hp.weight_decay, decouple=hp.prodigy_decouple,
                       use_bias_correction=hp.prodigy_bias_correction,
                       safeguard_warmup=hp.prodigy_safeguard_warmup)
    return torch.optim.AdamW(params, lr=lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps,
                             weight_decay=hp.weight_decay)


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """Epoch `epoch`'s order of n items, drawn on the CPU from (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def epoch_indices(n: int, start: int, count: int, seed: int) -> Tensor:
    """Positions [start, start + count) of an endless stream of epochs over n items, each epoch a
    permutation drawn from (seed, epoch)."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(count - len(out), n - offset)
        out += perm[offset:offset + take].tolist()
        pos += take
    return torch.tensor(out, dtype=torch.long)


class IndexStream:
    """`epoch_indices(n, start, count, seed)` as slices of device-resident epochs: each epoch's
    permutation (the same randperm) crosses to `device` once, not one copy per step. A blocking
    copy of a CPU tensor to a GPU waits for every kernel queued before it, so a copy per step
    kept the CPU from queueing the next step ahead of the GPU (three copies per step before:
    the indices and the batch's share of them twice)."""

    def __init__(self, n: int, seed: int, device: torch.device | str) -> None:
        self.n, self.seed, self.device = n, seed, torch.device(device)
        self._epochs: dict[int, Tensor] = {}

    def _epoch(self, epoch: int) -> Tensor:
        if epoch not in self._epochs:
            for old in [e for e in self._epochs if e < epoch - 1]:  # a step spans two at most
                del self._epochs[old]
            self._epochs[epoch] = epoch_permutation(self.n, self.seed, epoch).to(self.device)
        return self._epochs[epoch]

    def take(self, start: int, count: int) -> Tensor:
        parts, pos, left = [], start, count
        while left > 0:
            epoch, offset = divmod(pos, self.n)
            k = min(left, self.n - offset)
            parts.append(self._epoch(epoch)[offset:offset + k])
            pos, left = pos + k, left - k
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def training_attention(device: torch.device):
    """SDPA without its cuDNN backend on CUDA (flash, memory-efficient and math remain): cuDNN
    attention's backward failed to execute on FLUX at 1024 px near an H100's memory limit
    (2026-11-28), and FLUX's LoRA smoke cell at 128 px on an H200 died in the backward with
    CUBLAS_STATUS_EXECUTION_FAILED (2026-12-04)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _Source:
    """One image set (the data, or DreamBooth's class images) with its caches."""

    def __init__(self, dataset, captions: list[str], model: Any, work: Any, objective: Objective, hp: TrainHParams,
                 resolution: int, frozen_text: bool, device: torch.device, progress: bool) -> None:
        self.dataset, self.resolution, self.hp = dataset, resolution, hp
        bf16 = hp.mixed_precision == "bf16"
        self.latents = LatentCache.shared(model.vae, dataset, resolution, bf16=bf16, device=device,
                                          progress=progress) if hp.cache else None
        tokenizers, lengths = objective.tokenizers(work.pipe)
        self.text = TextCache.build(tokenizers, captions, device=device, max_length=lengths)
        if hp.cache and frozen_text:
            encoders = [getattr(work.pipe, c) for c in objective.text_components]
            self.text.encode(lambda ids: objective.encode(encoders, ids), bf16=bf16, device=device)
        self.vae = model.vae

    def __len__(self) -> int:
        return len(self.dataset)

    def latents_for(self, idx: Tensor, eps: Tensor) -> Tensor:
        """z0 for dataset `idx`: posterior mean + std * eps (or the mean), from the cache or, without
        it, from a VAE pass over the images as the recipes do every step."""
        eps = eps if self.hp.sample_latents else None
        if self.latents is not None:
            return self.latents.sample(idx, eps)
        mean, std = encode_pixels(self.vae, self.dataset.pixels(idx.tolist(), self.resolution),
                                  self.hp.mixed_precision == "bf16")
        return mean if eps is None else mean + std * eps


class _Run:
    """One train() call's training state: the prepared modules, optimizer and schedule; `step(k)`
    runs optimizer step k."""

    def __init__(self, model, work, method: Method, objective: Objective, hp: TrainHParams, acc, sources,
                 seed: int) -> None:
        from diffusers.optimization import get_scheduler

        self.method, self.hp, self.acc, self.seed, self.sources = method, hp, acc, seed, sources
        self.objective = objective
        self.device = acc.device
        trained = {n: m for n, m in method.components.items() if isinstance(m, nn.Module)}
        # unwrapped, for configs and dtypes
        self.denoiser = trained.get(objective.denoiser, getattr(model.pipe, objective.denoiser))
        self.text_trained = any(c in trained for c in objective.text_components)
        self.named = method.named_parameters()
        self.lr = hp.lr * (hp.batch_size * hp.grad_accum * acc.num_processes if hp.scale_lr else 1)
        optimizer = _optimizer(hp, [p for _, p in self.named], self.lr)
        # every step's indices and its share of the batch, without a copy to the device per step
        self.streams = [IndexStream(len(source), seed + 7919 * k, self.device) for k, source in enumerate(sources)]
        # the global batch (every process's share) and this process's slice of it
        self.total = hp.batch_size * acc.num_processes
        self.mine = slice(acc.process_index * hp.batch_size, (acc.process_index + 1) * hp.batch_size)
        self.take = torch.cat([torch.arange(k * self.total, (k + 1) * self.total)[self.mine]
                               for k in range(len(sources))]).to(self.device)
        self.scheduler = get_scheduler(hp.lr_scheduler, optimizer, num_warmup_steps=hp.warmup_steps,
                                       num_training_steps=hp.steps)
        prepared = acc.prepare(*trained.values(), optimizer)  # device placement, DDP wrapping
        self.wrapped = dict(zip(trained, prepared[:-1]))
        self.optimizer = prepared[-1]
        self.denoiser_call = self.wrapped.get(objective.denoiser, self.denoiser)
        if hp.cuda_graphs:
            from finetuning.graphs import GraphedDenoiser, graphs_unsupported

            why = graphs_unsupported(hp, self.device, acc.num_processes, objective)
            if why:  # said aloud only where the user asked for graphs outright
                log.log(logging.WARNING if hp.cuda_graphs is True else logging.INFO, "cuda_graphs ignored: %s", why)
            else:
                self.denoiser_call = GraphedDenoiser(self.denoiser_call)
                objective.autocast_cache = False  # capture needs autocast without its cast cache
        self.text_calls = [self.wrapped.get(c, getattr(work.pipe, c)) for c in objective.text_components]

    def step(self, step: int) -> Tensor:
        """Optimizer step `step` (1-based): grad_accum micro-batches (DDP gradient sync on the last
        only), clipping, the update, the schedule, the method's after_step. Returns the step's loss
        averaged over micro-batches and processes (a 0-d tensor on the device, not synced)."""
        hp, acc = self.hp, self.acc
        total = torch.zeros((), device=self.device)
        for k in range(hp.grad_accum):
            with contextlib.ExitStack() as ctx:
                ctx.enter_context(training_attention(self.device))
                if k < hp.grad_accum - 1 and acc.num_processes > 1:
                    for m in self.wrapped.values():
                        ctx.enter_context(acc.no_sync(m))
                loss = self.micro_loss((step - 1) * hp.grad_accum + k)
                acc.backward(loss / hp.grad_accum)
            total = total + loss.detach() / hp.grad_accum
        if hp.max_grad_norm > 0:
            acc.clip_grad_norm_([p for _, p in self.named], hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step()
        return acc.gather(total[None]).mean()

    def _condition(self, source: _Source, idx: Tensor) -> tuple[Tensor, ...]:
        ids, hidden = source.text.for_indices(idx.to(source.text.row.device))
        if hidden is not None:
            return hidden if isinstance(hidden, tuple) else (hidden,)
        if self.text_trained:
            return self.objective.encode(self.text_calls, ids)
        with torch.no_grad():
            return self.objective.encode(self.text_calls, ids)

    def micro_loss(self, micro: int) -> Tensor:
        """The loss of micro-batch number `micro` on this process.

        Indices, latent samples, noise and timesteps are drawn for the global batch (every
        process's share) from one generator seeded by (seed, micro), and each process takes its
        slice: N processes with batch b compute exactly the batches of one process with batch N b.
        The family's objective (finetuning/objectives.py) draws the noise and timesteps and
        computes the per-sample loss.
        """
        g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + micro)
        total, mine = self.total, self.mine
        shape = self.objective.latent_shape
        zs, conds, sizes = [], [], []
        for k, source in enumerate(self.sources):
            idx = self.streams[k].take(micro * total, total)[mine]
            eps = torch.randn((total, *shape), generator=g, device=self.device)[mine]
            zs.append(source.latents_for(idx, eps))
            conds.append(self._condition(source, idx))
            sizes.append(len(idx))
        z0 = torch.cat(zs).float()
        cond = tuple(torch.cat(parts) for parts in zip(*conds))
        n = len(self.sources) * total
        eps, t = self.objective.draw(g, n)
        eps, t = eps[self.take], t[self.take]
        dtype = next(self.denoiser.parameters()).dtype
        per = self.objective.per_sample(self.denoiser_call, z0, eps, t, cond, dtype)  # (B,)
        parts = per.split(sizes)
        loss = parts[0].mean()
        if len(parts) > 1:  # DreamBooth: instance loss + w * prior loss
            loss = loss + self.hp.prior_loss_weight * parts[1].mean()
        return loss


def _check(values: np.ndarray, first_step: int) -> int | None:
    """The step of the first non-finite value, or None."""
    bad = np.flatnonzero(~np.isfinite(values))
    return None if len(bad) == 0 else first_step + int(bad[0])


def _finite(delta: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for u in delta.values() for t in tensors_of(u))


def _to_cpu(delta: dict) -> dict:
    return {s: map_update(u, lambda t: t.detach().cpu()) for s, u in delta.items()}


def _graphs_info(call) -> dict | bool:
    """info["cuda_graphs"]: {"eager_calls": n} where the denoiser was captured and replayed (n
    calls of other shapes ran eagerly), {"failed": why} where its capture failed, False where
    graphs were off or could not apply."""
    if getattr(call, "graphed", None) is not None:
        return {"eager_calls": call.eager_calls}
    if getattr(call, "failed", None):
        return {"failed": call.failed}
    return False


def train(
    model: Any,
    data: Any,
    hparams: TrainHParams,
    *,
    base_delta: WeightDelta | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    checkpoint_every: int = 0,
    checkpoint_sites: list[str] | None = None,
    state_dir: Path | str | None = None,
    adapter_dir: Path | str | None = None,
    grad_hook: GradHook | None = None,
    trainable: Callable[[str], bool] | None = None,
    callback: Callable[[int, Any], None] | None = None,
    progress: bool = True,
) -> FineTuneResult:
    """Fine-tune `model` (+ `base_delta`) on `data` with the method `hparams` names.

    Args:
        model: a models.Model of an SD1.x-style family (sd14, organism, a local SD1.x folder),
            SDXL or FLUX (textual inversion: SD1.x only), on the device that trains (under
            `accelerate launch`: `process_device()`).
        data: an imagefolder path (metadata.jsonl with file_name + text), an ImageFolder or
            ImageTensors. DreamBooth and textual inversion read the class word from a "class"
            column when their hparams do not give it.
        hparams: a finetuning.hparams dataclass (FullHParams, LoraHParams, DoraHParams,
            DreamBoothHParams, TextualInversionHParams); `hparams.defaults(method, family)`.
        base_delta: the edit to fine-tune on top of (applied for the run, restored after).
        device: checked against the model's device (default: the model's).
        seed: seeds indices, noise, LoRA initialisation and DreamBooth's class images.
        checkpoint_every: record a checkpoint delta every k steps (0: none).
        checkpoint_sites: globs restricting checkpoint deltas (None: every trained site); the
            final delta always covers every site.
        state_dir: folder for the resume state (written at every checkpoint); a run that finds a
            state there from the same run (method, hparams but steps, seed, data) resumes it.
        adapter_dir: save the adapter there (LoRA/DoRA: diffusers' LoRA format; textual
            inversion: learned_embeds.safetensors); None keeps it in memory.
        grad_hook: grad_hook(name, grad, param) -> grad, called on every trained parameter's
            gradient (names: site names; LoRA "<site>.lora_A|lora_B|lora_magnitude"; textual
            inversion "text.embed.token"), before any all-reduce, e.g. to freeze sites or
            project gradients off a subspace.
        trainable: trainable(name) -> bool on the same names; parameters it rejects are frozen
            (requires_grad off: no gradient, no optimizer update, no weight decay), so their
            delta is exactly zero. None trains every parameter of the method.
        callback: callback(step, work_model) at every checkpoint step; work_model is a
            models.Model whose trained components are the live working copies.
        progress: show tqdm bars.

    Returns a FineTuneResult with every delta on the CPU in float32. Raises FadelabError for bad
    input and NonFiniteLoss (a FadelabError) when the loss or the weights stop being finite.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    _check_model(model)
    hp = hparams
    if not isinstance(hp, TrainHParams):
        raise FadelabError(f"hparams must be a finetuning.hparams dataclass, got {type(hp).__name__}")
    if checkpoint_every < 0:
        raise FadelabError(f"checkpoint_every={checkpoint_every}; give 0 (none) or a positive step count")
    dataset = as_dataset(data)
    want = torch.device(device) if device is not None else torch.device(model.device)
    acc = Accelerator(cpu=want.type == "cpu")
    if acc.device.type != torch.device(model.device).type or (
            model.device.index is not None and acc.device.index not in (None, model.device.index)):
        raise FadelabError(f"the model is on {model.device} but this process trains on {acc.device}; "
                           "load it with device=finetuning.process_device()")
    kind = family_kind(model.pipe)
    _check_method(model, hp, kind)
    method = make_method(hp)
    resolution = hp.resolution or default_resolution(model.pipe)
    objective = make_objective(model, hp, resolution, acc.device)
    state_dir = Path(state_dir) if state_dir is not None else None
    hooks: list[Any] = []
    t_start = time.perf_counter()
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    with contextlib.ExitStack() as stack:
        if base_delta is not None:
            stack.enter_context(apply_delta(model, base_delta))
        torch.manual_seed(seed)  # peft draws LoRA's A from the global generator
        method.make_prior(model, dataset, seed, progress and acc.is_main_process, resolution)
        work = _work_model(model, method.prepare(model, dataset))
        if trainable is not None:
            _freeze(method, trainable)
        frozen_text = not method.text_trainable
        sources = [_Source(dataset, method.captions(dataset), model, work, objective, hp, resolution, frozen_text,
                           acc.device, progress and acc.is_main_process)]
        if method.prior is not None:
            sources.append(_Source(method.prior, method.prior.captions, model, work, objective, hp, resolution,
                                   frozen_text, acc.device, False))
        run = _Run(model, work, method, objective, hp, acc, sources, seed)
        if grad_hook is not None:
            hooks = [p.register_hook(lambda g, n=n, p=p: grad_hook(n, g, p)) for n, p in run.named
                     if p.requires_grad]
            stack.callback(lambda: [h.remove() for h in hooks])

        # (max_sequence_length left out while unset, so states saved before the field existed resume)
        described = {k: v for k, v in to_dict(hp).items() if not (k == "max_sequence_length" and v is None)}
        meta = {"method": hp.method, "hparams": described, "seed": seed, "images": len(dataset),
                "captions": method.captions(dataset)[:3], "processes": acc.num_processes,
                "base_delta": sorted(base_delta.sites()) if base_delta is not None else []}
        losses: list[float] = []
        checkpoints: list[tuple[int, WeightDelta]] = []
        start = 0
        saved = state_io.load(state_dir, meta) if state_dir is not None else None
        if saved is not None:
            method.load_state_dict(saved["params"])
            run.optimizer.load_state_dict(saved["optimizer"])
            run.scheduler.load_state_dict(saved["scheduler"])
            start = int(saved["step"])
            losses = saved["loss"].tolist()
            checkpoints = [(s, WeightDelta(d, {"method": hp.method, "step": s}))
                           for s, d in state_io.checkpoints(state_dir, start)]
            log.info("resuming %s from step %d in %s", hp.method, start, state_dir)

        def partial(step_bad: int, why: str) -> NonFiniteLoss:
            last = checkpoints[-1] if checkpoints else None
            good = last[1] if last else WeightDelta({}, {"method": hp.method})
            res = FineTuneResult(hp.method, good, list(checkpoints), np.asarray(losses[:step_bad - 1], np.float32),
                                 None, {"failed_step": step_bad})
            where = f"step {last[0]}" if last else "none (no checkpoint was taken)"
            kept = f", its state kept in {state_dir}" if last and state_dir is not None else ""
            return NonFiniteLoss(f"{hp.method}: {why} at step {step_bad} (lr {run.lr:g}); the last good checkpoint is "
                                 f"{where}{kept}; lower the learning rate or check the data", step_bad, res)

        buffer: list[Tensor] = []

        def flush() -> None:
            if not buffer:
                return
            values = torch.stack(buffer).float().cpu().numpy()
            bad = _check(values, len(losses) + 1)
            losses.extend(values.tolist())
            buffer.clear()
            if bad is not None:
                raise partial(bad, f"the loss became {losses[bad - 1]}")

        bar = tqdm(total=hp.steps, initial=start, desc=f"finetune {hp.method}", unit="step",
                   disable=not (progress and acc.is_main_process))
        warm = min(start + 3, hp.steps)
        t_warm = time.perf_counter()
        for step in range(start + 1, hp.steps + 1):
            buffer.append(run.step(step))
            bar.update(1)
            if step == warm:
                _sync(acc.device)
                t_warm = time.perf_counter()
            is_ckpt = checkpoint_every and step % checkpoint_every == 0
            if is_ckpt or len(buffer) >= LOSS_CHECK_EVERY or step == hp.steps:
                flush()
                bar.set_postfix(loss=f"{np.mean(losses[-LOSS_CHECK_EVERY:]):.4f}")
            if is_ckpt:
                delta = method.delta(checkpoint_sites)
                if not _finite(delta):
                    raise partial(step, "a trained weight became non-finite")
                delta = _to_cpu(delta)
                checkpoints.append((step, WeightDelta(delta, {"method": hp.method, "step": step})))
                if state_dir is not None and acc.is_main_process:
                    state_io.save_checkpoint(state_dir, step, delta)
                    state_io.save(state_dir, step, method.state_dict(), run.optimizer.state_dict(),
                                  run.scheduler.state_dict(), losses, meta)
                acc.wait_for_everyone()
                if callback is not None:
                    callback(step, work)
        bar.close()
        _sync(acc.device)
        t_end = time.perf_counter()
        final = method.delta(None)
        if not _finite(final):
            raise partial(hp.steps, "a trained weight became non-finite")
        final = _to_cpu(final)
        adapter = None
        if acc.is_main_process:
            adapter = method.adapter(work, Path(adapter_dir) if adapter_dir is not None else None)
        acc.wait_for_everyone()
        info = {
            "hparams": to_dict(hp), "seed": seed, "steps": hp.steps, "resumed_from": start, "lr": run.lr,
            "device": str(acc.device), "processes": acc.num_processes, "resolution": resolution,
            "data": str(getattr(dataset, "folder", "in memory")), "images": len(dataset),
            "family": model.family, "weights": model.weights, "cache": hp.cache,
            "bf16_autocast": hp.mixed_precision == "bf16" and acc.device.type == "cuda",
            "cuda_graphs": _graphs_info(run.denoiser_call),
            "base_delta": base_delta.provenance if base_delta is not None else None,
            "attention": sorted({type(p).__name__ for p in run.denoiser.attn_processors.values()}),
            **objective.info(),
            "seconds": round(t_end - t_start, 3),
            "step_seconds": (t_end - t_warm) / (hp.steps - warm) if hp.steps > warm else None,
            **method.info(),
        }
        if acc.device.type == "cuda":
            info["peak_memory_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        provenance = {"method": hp.method, "hparams": to_dict(hp), "seed": seed,
                      "parent": base_delta.provenance if base_delta is not None else model.weights}
        result = FineTuneResult(hp.method, WeightDelta(final, provenance), checkpoints,
                                np.asarray(losses, np.float32), adapter, info)
    log.info("%s: %d steps in %.1fs, final loss %.4f", hp.method, hp.steps, info["seconds"],
             float(np.mean(losses[-LOSS_CHECK_EVERY:])) if losses else float("nan"))
    return result


def _freeze(method: Method, trainable: Callable[[str], bool]) -> None:
    """Turn requires_grad off for the method's parameters that `trainable` rejects."""
    named = method.named_parameters()
    for name, p in named:
        if not trainable(name):
            p.requires_grad_(False)
    if not any(p.requires_grad for _, p in named):
        raise FadelabError(f"trainable rejects every parameter of {method.name or 'the method'} "
                           f"(names such as {named[0][0]!r}); nothing would be trained")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
