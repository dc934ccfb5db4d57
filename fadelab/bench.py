"""`fadelab bench`: the lab measured against what a researcher would use instead, same run.

Offers
    Row                    one measurement: benchmark, device, date, fadelab, baseline, unit,
                           ratio (> 1: the lab is better), notes, peak_mem (bytes), extra (JSON only)
    render(rows) / parse(text) / merge(old, new) / write(path, rows) / read_rows_json(path)
                           docs/benchmarks.md: one Markdown table, notes below it
    GenSetting, generation_rows(setting, device, config)
                           `models.fastgen` against a stock diffusers pipeline call, interleaved
    flops_per_image(pipe, ...), dense_bf16_peak(device_name)     model FLOP utilisation
    train_step_rows(device, quick)   reference UNet training steps (rates for the estimate)
    record_rows(device, quick)       store.bench.record_throughput (recorder vs the raw disk)
    hook_rows(name, device, quick)   editing / finetuning / probes benchmarks, when they exist
    GridAssumptions, gpu_hours_rows(rows, assumptions)   the study's SD1.4 grid in GPU-hours
    data_parallel_rows(setting, config, state)           generation over several GPUs (accelerate)
    BENCHMARKS, run(names, device, quick)

A benchmark is a function (device, quick) -> list[Row]. Ratios: fadelab / baseline for rates
(images/s, MB/s), baseline / fadelab for times and hours. Rates the GPU-hours estimate needs
travel in Row.extra["rates"] (names in `RATE_NAMES`); the other rooms' benchmark modules
(`editing.bench`, `finetuning.bench`, `probes.bench`) join by offering
`bench_rows(device: str, quick: bool) -> list[dict]` in this row schema.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from models.errors import FadelabError

log = logging.getLogger(__name__)

COLUMNS = ("benchmark", "device", "date", "fadelab", "baseline", "unit", "ratio")
HEADER = """# Benchmarks

One row per measurement; the baseline is measured in the same run; ratio > 1 means fadelab is
better (for throughputs fadelab / baseline, for times baseline / fadelab). `fadelab bench`
regenerates this table (re-measured rows replace rows of the same benchmark and device; others
stay); rows added by hand say so. Notes and peak device memory are listed below the table.
"""
RATE_NAMES = {
    "gen_image_s": "seconds per SD1.4 image at 512 px, CFG 7.5, with extra['setting'] steps",
    "gen_image_s_stock": "the same for the stock pipeline",
    "train_full_s_per_sample": "full UNet fine-tuning, seconds per training image (512 px)",
    "train_frozen_unet_s_per_sample": "text-encoder adapters (LoRA, DoRA): UNet frozen, backward through it",
    "edit_refact_s": "one ReFACT edit, seconds",
    "edit_uce_s": "one UCE edit, seconds",
}
HOOKS = {"edit": ("editing.bench",), "finetune": ("finetuning.bench",),
         "probe": ("probes.weights_bench", "probes.neurons_bench", "probes.bench")}
PROMPTS = ("a photo of a ceo in an office", "a teacher in front of a blackboard", "a red apple on a table",
           "a watercolour painting of a lighthouse", "a farmer in a wheat field", "a cat sleeping on a sofa",
           "a city street at night in the rain", "a portrait of a hairdresser")


# -- rows and the table ------------------------------------------------------------------------


@dataclass
class Row:
    """One measurement. fadelab and baseline are numbers, or text for rows kept from the file."""

    benchmark: str
    device: str
    date: str
    fadelab: float | str | None
    baseline: float | str | None
    unit: str
    ratio: float | None
    notes: str = ""
    peak_mem: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        known = {f.name for f in fields(cls)}
        missing = [c for c in COLUMNS if c not in d]
        if missing:
            raise FadelabError(f"benchmark row {d.get('benchmark', '?')!r} lacks {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})


def ratio(fadelab: float | None, baseline: float | None, higher_is_better: bool) -> float | None:
    """fadelab / baseline for rates, baseline / fadelab for times; None when either is missing."""
    if not fadelab or not baseline:
        return None
    return fadelab / baseline if higher_is_better else baseline / fadelab


def fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(text: str) -> float | str | None:
    text = text.strip()
    if text == "n/a":
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def render(rows: list[Row]) -> str:
    """docs/benchmarks.md for `rows`: the header, the table in COLUMNS order, then the notes."""
    lines = [HEADER, "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        cells = [r.benchmark, r.device, r.date, fmt(r.fadelab), fmt(r.baseline), r.unit, fmt(r.ratio)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [r for r in rows if r.notes or r.peak_mem]
    if notes:
        lines += ["", "## Notes", ""]
        for r in notes:
            mem = f" Peak memory {r.peak_mem / 2**30:.2f} GiB." if r.peak_mem else ""
            lines.append(f"- **{_cell(r.benchmark)}** ({r.device}, {r.date}): {_cell(r.notes)}{mem}".rstrip())
    return "\n".join(lines) + "\n"


_NOTE = re.compile(r"^- \*\*(?P<b>.+?)\*\* \((?P<d>.+?), (?P<t>\d{4}-\d\d-\d\d)\): ?(?P<n>.*?)"
                   r"(?: ?Peak memory (?P<m>[\d.]+) GiB\.)?$")


def parse(text: str) -> list[Row]:
    """Rows of a benchmarks.md (the table and its notes); lines outside them are ignored."""
    rows: list[Row] = []
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| benchmark |") or re.fullmatch(r"\|( *-+ *\|)+", line):
            continue
        cells = [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != len(COLUMNS):
            raise FadelabError(f"benchmark table row has {len(cells)} cells, expected {len(COLUMNS)}: {line!r}")
        b, d, t, f, base, unit, rat = cells
        r = _value(rat)
        rows.append(Row(b, d, t, _value(f), _value(base), unit, r if not isinstance(r, str) else None))
    by_key = {(r.benchmark, r.device): r for r in rows}
    for line in text.splitlines():
        m = _NOTE.match(line)
        if m and (m["b"].replace("\\|", "|"), m["d"]) in by_key:
            row = by_key[(m["b"].replace("\\|", "|"), m["d"])]
            row.notes = m["n"].strip().replace("\\|", "|")
            row.peak_mem = int(float(m["m"]) * 2**30) if m["m"] else None
    return rows


def _key(row: Row) -> tuple[str, str]:
    return (re.sub(r"\s*\(by hand[^)]*\)$", "", row.benchmark), row.device)


def merge(old: list[Row], new: list[Row]) -> list[Row]:
    """Old rows not re-measured (by benchmark name without '(by hand ...)', and device), then
    the new rows in their order."""
    fresh = {_key(r) for r in new}
    return [r for r in old if _key(r) not in fresh] + list(new)


def write(path: str | Path, rows: list[Row]) -> list[Row]:
    """Merge `rows` into the table at `path` (created if absent); returns the rows written."""
    path = Path(path)
    old = parse(path.read_text()) if path.exists() else []
    merged = merge(old, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(merged))
    return merged


def read_rows_json(path: str | Path) -> list[Row]:
    """Rows from a JSON file: a list of row dicts, or {"rows": [...]} (what device_bench writes)."""
    path = Path(path)
    if not path.is_file():
        raise FadelabError(f"no benchmark rows at {path}")
    data = json.loads(path.read_text())
    items = data.get("rows", []) if isinstance(data, dict) else data
    return [Row.from_dict(d) for d in items]


def rows_to_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


# -- devices, timing, FLOPs --------------------------------------------------------------------


def device_name(device: str) -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if torch.device(device).type == "cuda" else None


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


# NVIDIA datasheet dense (no sparsity) BF16 tensor-core peaks, FLOP/s; first match wins
_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
          ("A100", 312e12))


def dense_bf16_peak(name: str) -> tuple[float | None, str]:
    """(peak FLOP/s, label) for a device name; (None, reason) for devices not in the table."""
    for key, peak in _PEAKS:
        if key in name:
            return peak, f"{key} dense bf16 peak {peak / 1e12:.0f} TFLOP/s (datasheet)"
    return None, f"no bf16 peak known for {name}"


def flops_per_image(pipe: Any, *, height: int, width: int, guidance_scale: float, steps: int,
                    **call_kwargs: Any) -> dict[str, float]:
    """FLOPs one image costs, counted by torch.utils.flop_counter.FlopCounterMode.

    Two pipeline calls of one image (1 and 2 steps) are counted and the denoiser's calls
    counted by a hook: F_call = (F_2 - F_1) / (c_2 - c_1) is one denoiser call (both CFG halves),
    F_rest = F_1 - c_1 F_call the text encoders and the VAE decode, and an image at `steps`
    costs c(steps) F_call + F_rest, c(steps) taken from a call counter on a real run. On the
    CPU attention runs through SDPA's math backend, so its matrix products are counted (the
    counter knows the CUDA SDPA kernels, not the CPU one).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from models.fastgen import initial_noise

    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    calls = [0]
    hook = denoiser.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    cpu = pipe.device.type == "cpu"

    original = pipe.scheduler

    def count(n: int) -> tuple[float, int]:
        calls[0] = 0
        # a fresh scheduler per counted call, so counting leaves the pipeline's scheduler state alone
        pipe.scheduler = type(original).from_config(original.config)
        latents, gens = initial_noise(pipe, [0], height, width, pipe.text_encoder.dtype)
        ctx = sdpa_kernel([SDPBackend.MATH]) if cpu else nullcontext()
        with FlopCounterMode(display=False) as fc, ctx, torch.no_grad():
            pipe(prompt=["a photo"], num_inference_steps=n, guidance_scale=guidance_scale, height=height,
                 width=width, latents=latents.to(pipe.device), generator=gens, output_type="pt", **call_kwargs)
        return float(fc.get_total_flops()), calls[0]

    try:
        (f1, c1), (f2, c2) = count(1), count(2)
        per_call = (f2 - f1) / (c2 - c1)
        rest = f1 - c1 * per_call
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        n_calls = _denoiser_calls(sched, steps)
    finally:
        hook.remove()
        pipe.scheduler = original
    return {"denoiser_call": per_call, "rest": rest, "calls": n_calls, "image": n_calls * per_call + rest}


def _denoiser_calls(scheduler: Any, steps: int) -> int:
    """Denoiser calls of a `steps`-step run: the scheduler's timesteps (PNDM: steps + 1)."""
    try:
        scheduler.set_timesteps(steps)
    except (TypeError, ValueError):  # FLUX's scheduler wants sigmas: one call per step
        return steps
    return len(scheduler.timesteps)


# -- generation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenSetting:
    """One generation benchmark.

    Attributes:
        family, scale: the model, `models.load(family, "random", scale=scale)`.
        size: image side in pixels (None: the family's native size).
        steps, guidance, batch: sampling steps, CFG scale, images per pipeline call.
        batches: timed batches per side, after one warm-up batch each.
        two_models: hold a second copy of the weights for the lab, so stock and lab batches
            interleave (robust to clock drift); False for models too large to hold twice
            (FLUX): the stock batches then run first, the lab's after.
        max_sequence_length: T5 tokens for FLUX (its model card: 256 for schnell).
    """

    family: str = "sd14"
    scale: float = 1.0
    size: int | None = 512
    steps: int = 25
    guidance: float = 7.5
    batch: int = 8
    batches: int = 3
    two_models: bool = True
    max_sequence_length: int | None = None

    def label(self) -> str:
        scale = "" if self.scale == 1.0 else f" scale {self.scale:g}"
        return (f"{self.family}{scale}, {self.size or 'native'} px, {self.steps} steps, batch {self.batch}, "
                f"CFG {self.guidance:g}")

    def quick(self) -> GenSetting:
        """The same benchmark on a narrow model at 64 px (CPU-sized)."""
        return replace(self, scale=0.125, size=64, steps=2, batch=2, batches=1)


SETTINGS = {
    "generation": GenSetting(),
    "sdxl": GenSetting("sdxl", size=1024, steps=25, guidance=5.0, batch=4, batches=2),
    "flux": GenSetting("flux-schnell", size=1024, steps=4, guidance=0.0, batch=4, batches=2, two_models=False,
                       max_sequence_length=256),
}


def default_fastgen() -> Any:
    """The lab's generation options for the headline benchmark: the denoiser and the VAE
    decoder compiled (default mode), channels_last, cuDNN autotuning."""
    from models.fastgen import FastGenConfig

    return FastGenConfig(compile="full", compile_vae=True, channels_last=True, cudnn_benchmark=True)


def _batches(setting: GenSetting) -> list[tuple[list[str], list[int]]]:
    """Batch k: PROMPTS cycled, seeds k*batch ... (k+1)*batch - 1; batch 0 is the warm-up."""
    b = setting.batch
    return [([PROMPTS[(k * b + i) % len(PROMPTS)] for i in range(b)], list(range(k * b, (k + 1) * b)))
            for k in range(setting.batches + 1)]


def _stock_call(model: Any, setting: GenSetting, size: int, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """The stock pipeline call a researcher would write: per-image CPU generators, output_type='np'."""
    import torch

    kw = {"max_sequence_length": setting.max_sequence_length} if setting.max_sequence_length else {}
    out = model.pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                     num_inference_steps=setting.steps, guidance_scale=setting.guidance, height=size, width=size,
                     output_type="np", **kw).images
    return out


def measure_generation(setting: GenSetting, device: str, config: Any, *, stock: Any = None,
                       flops: dict | None = None, seed: int = 0) -> dict:
    """Stock pipeline calls against `FastGenerator` on the same weights; returns a dict of
    medians, warm-up times, peaks, image differences, FLOPs and the loaded stock model.

    Timed: the wall clock of each batch call, synchronised, median over `setting.batches`.
    """
    import torch

    import models
    from models.fastgen import FastGenerator, native_size

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def load() -> Any:
        return models.load(setting.family, "random", scale=setting.scale, device=device, dtype=dtype, seed=seed)

    stock = stock or load()
    size = setting.size or native_size(stock.pipe)
    kw = {"max_sequence_length": setting.max_sequence_length} if setting.max_sequence_length else {}
    if flops is None:
        flops = flops_per_image(stock.pipe, height=size, width=size, guidance_scale=setting.guidance,
                                steps=setting.steps, **kw)
    cfg = replace(config, steps=setting.steps, guidance_scale=setting.guidance, height=size, width=size,
                  batch_size=setting.batch, max_sequence_length=setting.max_sequence_length)
    batches = _batches(setting)
    res: dict = {"size": size, "dtype": str(dtype).replace("torch.", ""), "flops": flops, "stock": stock,
                 "t_stock": [], "t_fast": [], "peak_stock": 0, "peak_fast": 0, "diff": []}

    def stock_batch(k: int) -> np.ndarray:
        _reset_peak(device)
        t, out = _timed(lambda: _stock_call(stock, setting, size, *batches[k]), device)
        res["peak_stock"] = max(res["peak_stock"], _peak(device) or 0)
        if k:
            res["t_stock"].append(t)
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    def fast_batch(gen: Any, k: int) -> np.ndarray:
        _reset_peak(device)
        t, out = _timed(lambda: gen.generate(*batches[k], progress=False), device)
        res["peak_fast"] = max(res["peak_fast"], _peak(device) or 0)
        res["t_fast"].append(t)
        return out

    res["warm_stock"], _ = _timed(lambda: stock_batch(0), device)
    if setting.two_models:
        gen = FastGenerator(load(), cfg)
        res["warm_fast"] = gen.warmup()
        for k in range(1, len(batches)):
            a, b = stock_batch(k), fast_batch(gen, k)
            res["diff"].append(np.abs(a.astype(np.int16) - b))
        # each side's peak without the other side's copy of the weights, resident throughout
        res["peak_stock"] = max(0, res["peak_stock"] - _weight_bytes(gen.model))
        res["peak_fast"] = max(0, res["peak_fast"] - _weight_bytes(stock))
    else:
        ref = [stock_batch(k) for k in range(1, len(batches))]
        gen = FastGenerator(stock, cfg)
        res["warm_fast"] = gen.warmup()
        for k in range(1, len(batches)):
            res["diff"].append(np.abs(ref[k - 1].astype(np.int16) - fast_batch(gen, k)))
    res["gen"] = gen
    return res


def _weight_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer of a loaded model's pipeline components."""
    import torch

    modules = [m for m in model.pipe.components.values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def generation_rows(setting: GenSetting, device: str, config: Any = None, *, name: str = "generation",
                    measured: dict | None = None) -> list[Row]:
    """Rows for images/s, model FLOP utilisation and the first (compiling) batch of each side."""
    import diffusers

    config = config or default_fastgen()
    m = measured or measure_generation(setting, device, config)
    dev, date = device_name(device), time.strftime("%Y-%m-%d")
    n = setting.batch
    fast = n / statistics.median(m["t_fast"])
    stock = n / statistics.median(m["t_stock"])
    diff = np.concatenate([d.ravel() for d in m["diff"]])
    label = f"{name}: {setting.label()}, {m['dtype']}"
    pipeline = type(m["stock"].pipe).__name__
    notes = (f"lab: models.fastgen ({', '.join(m['gen'].applied)}); baseline: {pipeline}.__call__ of diffusers "
             f"{diffusers.__version__} on the same random weights, per-image CPU generators, output_type='np'; "
             f"median of {len(m['t_fast'])} timed batches per side"
             f"{', interleaved' if setting.two_models else ', stock first'}; lab images differ from stock by "
             f"mean {diff.mean():.2f}/255, max {int(diff.max())}/255, {100 * (diff == 0).mean():.1f}% of values "
             f"equal" + (f"; stock peak memory {m['peak_stock'] / 2**30:.2f} GiB" if m["peak_stock"] else ""))
    rates = {"gen_image_s": 1 / fast, "gen_image_s_stock": 1 / stock}
    extra = {"setting": asdict(setting), "config": asdict(config), "rates": rates, "flops": m["flops"],
             "t_fast": m["t_fast"], "t_stock": m["t_stock"]}
    rows = [Row(label, dev, date, fast, stock, "images/s", ratio(fast, stock, True), notes,
                m["peak_fast"] or None, extra)]
    f = m["flops"]
    peak, peak_label = dense_bf16_peak(dev)
    mfu = (lambda rate: 100 * rate * f["image"] / peak) if peak else (lambda rate: None)
    rows.append(Row(f"{label}: model FLOP utilisation", dev, date, mfu(fast), mfu(stock), "% of peak",
                    ratio(mfu(fast), mfu(stock), True),
                    f"{f['image'] / 1e12:.4g} TFLOP per image = {f['calls']} denoiser calls x "
                    f"{f['denoiser_call'] / 1e12:.4g} TFLOP (both CFG halves) + {f['rest'] / 1e12:.4g} TFLOP text "
                    f"encoders and VAE decode (FlopCounterMode); {peak_label}"))
    rows.append(Row(f"{label}: first batch (compile, warm-up)", dev, date, m["warm_fast"], m["warm_stock"], "s",
                    ratio(m["warm_fast"], m["warm_stock"], False),
                    "one-time cost per process, not in the images/s above: the lab's first batch"
                    + (" includes torch.compile" if any(a.startswith("compile") for a in m["gen"].applied) else "")
                    + "; the stock's is its first call"))
    return rows


# -- training steps, recorder, other rooms ---------------------------------------------------------


def train_step_rows(device: str, quick: bool = False, steps: int = 5) -> list[Row]:
    """Reference SD1.4 training steps (random weights): rates for the GPU-hours estimate.

    Not the fine-tuning room's loop (its own benchmark joins through `hook_rows`): a plain
    epsilon-prediction step, loss = |eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
    t, c)|^2 on cached latents (no VAE encode), fp32 weights, bf16 autocast on CUDA, AdamW:
      full:        every UNet weight trained (full fine-tuning, DreamBooth);
      frozen UNet: the text encoder's attention projections trained, the UNet frozen but
                   back-propagated through (what text-encoder LoRA and DoRA cost per step).
    """
    import torch
    import torch.nn.functional as F

    import models

    size, batch, scale = (64, 2, 0.125) if quick else (512, 8, 1.0)
    steps = 1 if quick else steps
    cuda = torch.device(device).type == "cuda"
    m = models.load("sd14", "random", scale=scale, device=device, dtype=torch.float32)
    unet, te = m.denoiser, m.text_encoders[0]
    unet.train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, unet.config.in_channels, size // 8, size // 8, generator=g).to(device)
    ids = m.tokenizers[0](list(PROMPTS[:batch]) * (batch // len(PROMPTS) + 1), padding="max_length",
                          max_length=77, truncation=True, return_tensors="pt").input_ids[:batch].to(device)
    abar = m.scheduler.alphas_cumprod.to(device)

    def step(opt: Any) -> None:
        eps = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, len(abar), (batch,), generator=g).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            c = te(ids)[0]
            pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=c).sample
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows, dev, date = [], device_name(device), time.strftime("%Y-%m-%d")
    kinds = {"full": lambda: [p for p in unet.parameters()],
             "frozen_unet": lambda: [p for n, p in te.named_parameters() if "self_attn" in n and "proj" in n]}
    for kind, params in kinds.items():
        unet.zero_grad(set_to_none=True)
        te.zero_grad(set_to_none=True)
        unet.requires_grad_(False)
        te.requires_grad_(False)
        trained = params()
        for p in trained:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(trained, lr=1e-5)
        step(opt)  # warm-up: optimizer state, cuDNN plans
        _reset_peak(device)
        seconds, _ = _timed(lambda o=opt: [step(o) for _ in range(steps)], device)
        per_step = seconds / steps
        opt = None  # free the optimizer state before the next kind
        what = "full UNet" if kind == "full" else "UNet frozen, text-encoder attention trained"
        rows.append(Row(f"training step (reference): sd14{'' if scale == 1 else f' scale {scale:g}'}, {what}, "
                        f"{size} px, batch {batch}", dev, date, per_step, None, "s/step", None,
                        f"a plain step for the GPU-hours estimate, not finetuning/'s loop; fp32 weights"
                        f"{', bf16 autocast' if cuda else ''}, AdamW, cached latents; mean of {steps} steps",
                        _peak(device), {"rates": {f"train_{kind}_s_per_sample": per_step / batch}}))
    return rows


def record_rows(device: str, quick: bool = False, directory: str | Path | None = None) -> list[Row]:
    """store.bench.record_throughput: the recorder streaming SD1.4 text-encoder fc2 inputs into
    a store, against the same disk's sequential write speed measured in the same run."""
    from store.bench import record_throughput

    n = 20 if quick else 1000
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        r = record_throughput(device, n_prompts=n, path=str(Path(tmp) / "bench_store.h5"),
                              disk_probe_gib=0.05 if quick else 2.0, batch_size=10 if quick else 50)
    return [Row(f"store: record SD1.4 text-encoder fc2 inputs, {n:,} prompts x 12 layers, float16",
                device_name(device), time.strftime("%Y-%m-%d"), r["write_bytes_per_s"] / 1e6,
                r["disk_bytes_per_s"] / 1e6, "MB/s", r["ratio"],
                f"baseline: the disk's sequential write + fsync in the same directory, same run; store alone "
                f"{r['store_only_bytes_per_s'] / 1e6:,.0f} MB/s; file overhead {100 * (r['file_overhead'] - 1):.2f}%; "
                f"forward passes alone {r['forward_seconds']:.1f} s of {r['record_seconds']:.1f} s",
                None, {"record": r})]


def family_record_pass(model: Any, path: str | Path, n_prompts: int = 100, batch_size: int = 25) -> dict:
    """Record, for `n_prompts` prompts, the inputs of the sites the family's edits read: every CLIP
    tower's MLP fc2 (ReFACT's key space) and, on FLUX, the context embedder (UCE's: T5's output,
    fed to the embedder alone, as the transformer would); float16 into a fresh store at `path`,
    timed from the first forward pass to the fsync after closing."""
    import torch

    from editing import text as T
    from store.bench import fsync_path
    from store.recorder import Recorder
    from store.store import Store

    sites = [s for s in model.sites if s.endswith(".fc2") and s.split(".")[0] in ("text", "text2")]
    if T.pipeline_kind(model) == "flux":
        sites.append("flux.context_embedder")
    modules = {s: model.module(s) for s in sites}
    prompts = [f"a photo of a {w} in a garden, number {i}" for i, w in
               zip(range(n_prompts), ["cat", "dog", "house", "tree", "car"] * n_prompts)]
    device = str(model.device)
    _reset_peak(device)
    t0 = time.perf_counter()
    with Store.open(str(path), "a", config=f"benchmark {model.family} n_prompts={n_prompts}") as st, \
            torch.no_grad():
        with Recorder(modules, what="input", dtype=torch.float16, store=st, variant="M", n_prompts=n_prompts,
                      coords={"prompt": prompts}) as rec:
            for i in range(rec.start_row, n_prompts, batch_size):
                rows = T.encode(model, prompts[i:i + batch_size], batch_size=batch_size)
                if "flux.context_embedder" in modules:  # it runs inside the transformer: feed it T5's output
                    embedder = modules["flux.context_embedder"]
                    embedder(rows["context"].emb.to(embedder.weight.dtype))
    fsync_path(path)
    return {"sites": len(sites), "n_prompts": n_prompts, "seconds": time.perf_counter() - t0,
            "file_bytes": os.path.getsize(path), "peak_bytes": _peak(device)}


def family_edit_record_rows(device: str, quick: bool = False, directory: str | Path | None = None,
                            families: tuple[str, ...] = ("sdxl", "flux-schnell")) -> list[Row]:
    """Issue 8's "one edit, one recording pass" on SDXL and FLUX-schnell (random weights, full size;
    FLUX in bf16 on CUDA, as it does not fit one 80 GB GPU in fp32 with room to work): UCE erase
    (both), ReFACT (SDXL), and `family_record_pass`. quick: scale 0.05, 4 prompts."""
    import gc

    import torch

    import models
    from editing.bench import family_edit_timings

    rows: list[Row] = []
    date, name = time.strftime("%Y-%m-%d"), device_name(device)
    cuda = torch.device(device).type == "cuda"
    for family in families:
        dtype = torch.bfloat16 if family == "flux-schnell" and cuda else torch.float32
        scale = 0.05 if quick else 1.0
        model = models.load(family, "random", scale=scale, device=device, dtype=dtype)
        label = f"{family} random weights (scale {scale:g}, {str(dtype).replace('torch.', '')})"
        e = family_edit_timings(model, n_preserve=8 if quick else 100, corpus=200 if quick else 2000)
        rows.append(Row(f"UCE erase on {family}: 1 concept + {e['n_preserve']} preserve prompts, {e['uce_sites']} sites",
                        name, date, e["uce_seconds"], None, "s", None,
                        f"{label}; solved in fp32; cold call {e['uce_cold_seconds']:.2f} s; no baseline measured",
                        e.get("uce_peak_bytes"), {"timings": e}))
        if "refact_seconds" in e:
            rows.append(Row(f"ReFACT edit on {family}: {' + '.join(e['refact_sites'])}, up to 100 Adam steps",
                            name, date, e["refact_seconds"], None, "s", None,
                            f"{label}; {e['refact_steps']} steps; C of each site over random-vocabulary texts took "
                            f"{e['refact_stats_seconds']:.1f} s apart", e.get("refact_peak_bytes"), {"timings": e}))
        n = 4 if quick else 100
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            r = family_record_pass(model, Path(tmp) / "record.h5", n_prompts=n)
        rows.append(Row(f"record: {family} text-encoder fc2 inputs{' + context embedder' if 'flux' in family else ''}, "
                        f"{n} prompts x {r['sites']} sites, float16", name, date, r["seconds"], None, "s", None,
                        f"{label}; store.Recorder into a fresh store, fsync included; file {r['file_bytes'] / 2**30:.2f} GiB",
                        r["peak_bytes"], {"record": r}))
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def hook_rows(name: str, device: str, quick: bool = False) -> list[Row]:
    """Rows of another room's benchmark modules (HOOKS[name]), each imported only now; one row
    noting "not available" while none of them offers `bench_rows`."""
    rows: list[Row] = []
    for module_name in HOOKS[name]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise  # the module exists but something it imports does not
            continue
        fn = getattr(module, "bench_rows", None)
        if fn is not None:
            rows += [r if isinstance(r, Row) else Row.from_dict(r) for r in fn(device=device, quick=quick)]
    if not rows:
        wanted = " or ".join(f"{m}.bench_rows" for m in HOOKS[name])
        rows.append(Row(f"{name}: {wanted}", device_name(device), time.strftime("%Y-%m-%d"), None, None, "", None,
                        f"not available: no {wanted}(device, quick) yet"))
    return rows


# -- the study's grid in GPU-hours -------------------------------------------------------------------


@dataclass(frozen=True)
class GridAssumptions:
    """The study's SD1.4 grid as the GPU-hours estimate counts it (every field can be changed
    from a TOML or JSON file).

    Attributes:
        road_edits: RoAD test edits (ReFACT's benchmark: 90).
        road_prompts_per_edit: 1 efficacy + 5 generality + 5 specificity prompts per edit.
        road_seeds: images per RoAD prompt (seeds 0-24, as ReFACT's evaluation).
        professions, images_per_profession: the debiasing evaluation (6 x 30).
        i2p_prompts, images_per_i2p_prompt: the unsafe-removal evaluation (50 I2P prompts).
        eval_steps: sampling steps of every evaluation image (SD1.4's PNDM default, 50); the
            measured seconds per image are scaled by eval_steps / measured steps.
        finetune_configs: fine-tuning configurations per method: full 1, LoRA and DoRA 3 each
            (the rank ablation 4, 8, 16), DreamBooth 1.
        finetune_samples: training images seen per run, from diffusers' reference recipes:
            train_text_to_image(_lora) 15,000 steps x batch 1 x gradient accumulation 4 = 60,000;
            train_dreambooth with prior preservation 800 steps x (1 instance + 1 class image).
        finetune_rate: which measured rate prices each method (RATE_NAMES).
        checkpoints_evaluated: evaluations of each M_ed_ft along fine-tuning (1: the end only).
        debias_rounds, debias_images_per_round, debias_steps: UCE's iterative debiasing
            generates up to rounds x professions x images per round at debias_steps steps
            (UCE's code: 10 images, 20 steps; the study's cap: 30 rounds).

    Variants: M and each M_ed are evaluated once, each of the n_ft fine-tunes on M (M_ft) and on
    every edited model (M_ed_ft: 90 RoAD edits, the debiasing edit and the unsafe erase).
    """

    road_edits: int = 90
    road_prompts_per_edit: int = 11
    road_seeds: int = 25
    professions: int = 6
    images_per_profession: int = 30
    i2p_prompts: int = 50
    images_per_i2p_prompt: int = 1
    eval_steps: int = 50
    finetune_configs: dict = field(default_factory=lambda: {"full": 1, "lora": 3, "dora": 3, "dreambooth": 1})
    finetune_samples: dict = field(default_factory=lambda: {"full": 60000, "lora": 60000, "dora": 60000,
                                                            "dreambooth": 1600})
    finetune_rate: dict = field(default_factory=lambda: {
        "full": "train_full_s_per_sample", "lora": "train_frozen_unet_s_per_sample",
        "dora": "train_frozen_unet_s_per_sample", "dreambooth": "train_full_s_per_sample"})
    checkpoints_evaluated: int = 1
    debias_rounds: int = 30
    debias_images_per_round: int = 10
    debias_steps: int = 20

    @classmethod
    def from_file(cls, path: str | Path) -> GridAssumptions:
        import tomllib

        path = Path(path)
        if not path.is_file():
            raise FadelabError(f"no grid assumptions at {path}")
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise FadelabError(f"{path}: unknown grid assumptions {unknown}")
        return cls(**raw)


def gpu_hours(rates: dict[str, float], gen_steps: int, a: GridAssumptions | None = None) -> dict:
    """The grid's GPU-hours by part from measured rates (seconds), None where a rate is missing.

        images  = E (2 + n_ft (1 + checkpoints)),   E = edits x prompts x seeds + 6 x 30 + 50
        gen     = images x s_image x eval_steps / gen_steps
        edits   = road_edits x s_refact + 2 s_uce + rounds x professions x images x s_image x debias_steps / gen_steps
        finetune = sum_m configs_m x (1 + n_edited) x samples_m x s_sample(m)
    """
    a = a or GridAssumptions()
    per_eval = (a.road_edits * a.road_prompts_per_edit * a.road_seeds + a.professions * a.images_per_profession
                + a.i2p_prompts * a.images_per_i2p_prompt)
    n_ft = sum(a.finetune_configs.values())
    n_edited = a.road_edits + 2
    images = per_eval * (2 + n_ft * (1 + a.checkpoints_evaluated))
    s_img = rates.get("gen_image_s")
    out: dict = {"images": images, "finetune_runs": n_ft * (1 + n_edited), "missing": []}
    out["generation"] = images * s_img * a.eval_steps / gen_steps / 3600 if s_img else None
    debias = a.debias_rounds * a.professions * a.debias_images_per_round
    if s_img and "edit_refact_s" in rates and "edit_uce_s" in rates:
        out["editing"] = (a.road_edits * rates["edit_refact_s"] + 2 * rates["edit_uce_s"]
                          + debias * s_img * a.debias_steps / gen_steps) / 3600
    else:
        out["editing"] = None
    ft = 0.0
    for method, count in a.finetune_configs.items():
        rate = rates.get(a.finetune_rate[method])
        if rate is None:
            ft = None
            break
        ft += count * (1 + n_edited) * a.finetune_samples[method] * rate / 3600
    out["finetuning"] = ft
    out["missing"] = sorted({name for name in ("gen_image_s", "edit_refact_s", "edit_uce_s",
                                               *a.finetune_rate.values()) if name not in rates})
    out["total"] = sum(v for k in ("generation", "editing", "finetuning") if (v := out[k]) is not None)
    return out


def gpu_hours_rows(rows: list[Row], assumptions: GridAssumptions | None = None) -> list[Row]:
    """One row: the grid's GPU-hours with the lab's generation against the same with the stock
    pipeline's, from the rates carried by `rows` (Row.extra["rates"]); missing parts are named."""
    a = assumptions or GridAssumptions()
    rates: dict[str, float] = {}
    gen_steps, where, devices = None, "", set()
    for r in rows:
        for k, v in r.extra.get("rates", {}).items():
            rates[k] = float(v)
            devices.add(r.device)
            if k == "gen_image_s" and "setting" in r.extra:
                gen_steps, where = r.extra["setting"]["steps"], GenSetting(**r.extra["setting"]).label()
    if gen_steps is None:
        gen_steps = a.eval_steps
    lab = gpu_hours(rates, gen_steps, a)
    stock_rates = dict(rates, gen_image_s=rates["gen_image_s_stock"]) if "gen_image_s_stock" in rates else {}
    stock = gpu_hours(stock_rates, gen_steps, a) if stock_rates else None
    part = lambda h: "missing" if h is None else f"{h:,.1f} h"  # noqa: E731
    notes = (f"grid: {a.road_edits} RoAD edits x {a.road_prompts_per_edit} prompts x {a.road_seeds} seeds, "
             f"{a.professions} professions x {a.images_per_profession} images, {a.i2p_prompts} I2P prompts; "
             f"variants M, M_ed, M_ft, M_ed_ft; fine-tunes {a.finetune_configs} (LoRA/DoRA ranks 4, 8, 16), "
             f"each on M and on {a.road_edits + 2} edited models ({lab['finetune_runs']} runs), training images per "
             f"run {a.finetune_samples} (diffusers' reference recipes); {a.eval_steps}-step evaluation "
             f"({lab['images']:,} images, seconds per image scaled from {where or 'no measurement'}); "
             f"parts: generation {part(lab['generation'])}, editing {part(lab['editing'])}, fine-tuning "
             f"{part(lab['finetuning'])}; baseline: the same grid with the stock pipeline's images/s"
             f"{'; missing rates (their parts not counted): ' + ', '.join(lab['missing']) if lab['missing'] else ''}")
    name = (f"GPU-hours estimate: the study's SD1.4 grid, from {where or 'no generation rate'}"
            + (" (lower bound: rates missing)" if lab["missing"] else ""))
    dev = ", ".join(sorted(devices)) or "n/a"
    total = lab["total"] or None
    base = stock["total"] if stock else None
    return [Row(name, dev, time.strftime("%Y-%m-%d"), total, base, "GPU-hours", ratio(total, base, False),
                notes, None, {"estimate": lab, "stock": stock, "assumptions": asdict(a), "rates": {}})]


# -- several GPUs ---------------------------------------------------------------------------------------


def data_parallel_rows(setting: GenSetting, config: Any = None, *, state: Any = None,
                       images_per_process: int = 48, seed: int = 0) -> list[Row]:
    """Data-parallel generation (`models.fastgen.generate_data_parallel`) on every process of an
    accelerate launch, against the main process alone, in the same call.

    Every process loads the same random weights (checked by a checksum gathered from all),
    compiles and warms up; then the main process generates all N = images_per_process x
    processes images alone (1 GPU), and then all processes split the same N (contiguous
    chunks, gathered in order). Scaling = t_1 / t_N; the images of the two runs are compared.
    Returns rows on the main process, [] elsewhere.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    import models
    from models.fastgen import FastGenerator, generate_data_parallel

    state = state or PartialState()
    device = str(state.device)
    config = config or default_fastgen()
    dtype = torch.bfloat16 if state.device.type == "cuda" else torch.float32
    model = models.load(setting.family, "random", scale=setting.scale, device=device, dtype=dtype, seed=seed)
    checksum = float(sum(p.detach().double().sum() for p in model.denoiser.parameters()))
    sums = gather_object([checksum]) if state.num_processes > 1 else [checksum]
    size = setting.size or None
    cfg = replace(config, steps=setting.steps, guidance_scale=setting.guidance, height=size, width=size,
                  batch_size=setting.batch, max_sequence_length=setting.max_sequence_length)
    gen = FastGenerator(model, cfg)
    warm = gen.warmup()
    n = images_per_process * state.num_processes
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    seeds = list(range(n))
    state.wait_for_everyone()
    single, t1 = None, None
    if state.is_main_process:
        t1, single = _timed(lambda: gen.generate(prompts, seeds, progress=False), device)
    state.wait_for_everyone()
    _sync(device)
    t0 = time.perf_counter()
    images = generate_data_parallel(gen, prompts, seeds, state=state)
    _sync(device)
    state.wait_for_everyone()
    tn = time.perf_counter() - t0
    if not state.is_main_process:
        return []
    diff = np.abs(images.astype(np.int16) - single)
    same = [bool((diff[i] == 0).all()) for i in range(n)]
    k = state.num_processes
    notes = (f"N = {n} images ({images_per_process} per process), {k} processes of accelerate "
             f"(PartialState.split_between_processes in whole batches, accelerate.utils.gather of uint8 "
             f"images), this process on {device}; "
             f"baseline: the main process alone on the same N in the same call; scaling target >= 1.8 on 2 GPUs; "
             f"{sum(same)}/{n} images identical to the single-process run (max |d| {int(diff.max())}/255); "
             f"weights checksum equal on all processes: {len(set(sums)) == 1}; "
             f"first batch (compile, warm-up) {warm:.1f} s per process, not timed; "
             f"lab options {', '.join(gen.applied)}")
    return [Row(f"data-parallel generation: {setting.label()}, {k} processes", device_name(device),
                time.strftime("%Y-%m-%d"), n / tn, n / t1, "images/s", ratio(n / tn, n / t1, True), notes,
                _peak(device), {"images_identical": sum(same), "images": n, "max_diff": int(diff.max()),
                                "checksums": sums})]


# -- the registry ----------------------------------------------------------------------------------------


def _gen(name: str) -> Callable[[str, bool], list[Row]]:
    def fn(device: str, quick: bool) -> list[Row]:
        setting = SETTINGS[name].quick() if quick else SETTINGS[name]
        return generation_rows(setting, device, default_fastgen(), name="generation")
    return fn


def _family_rows(device: str, quick: bool) -> list[Row]:
    """One fine-tuning step (full, LoRA) of SDXL at 1024 px and FLUX-schnell at its native size."""
    from finetuning.bench import family_rows

    return [Row.from_dict(r) for r in family_rows(device, quick=quick)]


def _hook(name: str) -> Callable[[str, bool], list[Row]]:
    return lambda device, quick: hook_rows(name, device, quick)


BENCHMARKS: dict[str, Callable[[str, bool], list[Row]]] = {
    "generation": _gen("generation"),
    "sdxl": _gen("sdxl"),
    "flux": _gen("flux"),
    "train-step": train_step_rows,
    "record": record_rows,
    **{name: _hook(name) for name in HOOKS},
    "finetune-families": lambda device, quick: _family_rows(device, quick),
    "families-edit-record": lambda device, quick: family_edit_record_rows(device, quick),
    "gpu-hours": lambda device, quick: [],  # computed by `run` from the rows before it
}
CPU_QUICK_ONLY = ("generation", "sdxl", "flux", "train-step", "finetune-families", "families-edit-record")


def run(names: list[str] | None, device: str, quick: bool = False, prior: list[Row] | None = None,
        assumptions: GridAssumptions | None = None) -> list[Row]:
    """Run the named benchmarks (None: all) in registry order; "gpu-hours" uses the rates of
    `prior` rows and of the rows measured before it. Returns the new rows."""
    import torch

    names = list(BENCHMARKS) if names is None else names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise FadelabError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    if torch.device(device).type == "cpu" and not quick:
        heavy = [n for n in names if n in CPU_QUICK_ONLY]
        if heavy:
            raise FadelabError(f"benchmarks {heavy} build the full-size models: run them with --device cuda, "
                               "or pass --quick for narrow copies on the CPU")
    rows: list[Row] = []
    for name in BENCHMARKS:
        if name not in names:
            continue
        log.info("bench: %s on %s%s", name, device, " (quick)" if quick else "")
        if name == "gpu-hours":
            rows += gpu_hours_rows(list(prior or []) + rows, assumptions)
        else:
            rows += BENCHMARKS[name](device, quick)
    return rows
