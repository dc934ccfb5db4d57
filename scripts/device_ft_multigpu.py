"""Data-parallel fine-tuning (issue 8): N GPUs through `accelerate launch` against one, same call.

    # one GPU, per-process batch B, then 2B (the 2-process run's global batch, for equality)
    CUDA_VISIBLE_DEVICES=0 python3 scripts/device_ft_multigpu.py --out DIR/one --batch 8
    CUDA_VISIBLE_DEVICES=0 python3 scripts/device_ft_multigpu.py --out DIR/one2x --batch 16
    # two GPUs, batch B per process
    python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --mixed_precision no \\
        --dynamo_backend no scripts/device_ft_multigpu.py --out DIR/two --batch 8
    # rows for `fadelab bench --rows`
    python3 scripts/device_ft_multigpu.py --compare DIR --json $OUT/bench_ftmultigpu.json

Each run trains UNet LoRA (rank 4, cached latents/text) and full fine-tuning on SD1.4's
architecture (random weights, 512 px, bf16 autocast) with finetuning.train, the loop every method
uses, and writes DIR/<method>.json (step seconds, losses, processes) and DIR/<method>.pt (the
delta, on local disk). Throughput is images per second: processes x batch / step seconds
(finetuning.train's step time, the first steps excluded). Scaling = two-GPU throughput / one-GPU
throughput at the same per-process batch. Equality: the two-process run against one process with
the global batch (the loop draws the same batches, noise and timesteps for both); losses and
deltas are compared (float reduction order differs, so not bit for bit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("lora", "full")


def run(out: Path, batch: int, steps: int, scale: float, resolution: int, methods=METHODS) -> None:
    import models
    from finetuning.bench import synthetic_images
    from finetuning.hparams import FullHParams, LoraHParams
    from finetuning.loop import process_device, train

    device = process_device()
    model = models.load("sd14", "random", scale=scale, device=str(device), seed=0)
    data = synthetic_images(64, resolution, seed=0)
    hps = {"lora": LoraHParams(target="unet", rank=4, steps=steps, batch_size=batch, resolution=resolution,
                               lr=1e-4, lr_scheduler="constant", warmup_steps=0),
           "full": FullHParams(steps=steps, batch_size=batch, grad_accum=1, resolution=resolution,
                               lr=1e-5, lr_scheduler="constant", warmup_steps=0)}
    out.mkdir(parents=True, exist_ok=True)
    for method in methods:
        r = train(model, data, hps[method], seed=0, progress=False)
        main = torch.distributed.get_rank() == 0 if torch.distributed.is_initialized() else True
        if main:
            (out / f"{method}.json").write_text(json.dumps({
                "method": method, "batch_per_process": batch, "processes": r.info["processes"],
                "steps": steps, "step_seconds": r.info["step_seconds"], "seconds": r.info["seconds"],
                "peak_memory_gib": r.info.get("peak_memory_gib"), "loss": [float(x) for x in r.loss],
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "scale": scale, "resolution": resolution}, indent=1))
            torch.save({s: r.delta.dense(s).float().cpu() for s in r.delta.sites()}, out / f"{method}.pt")
        del r
        if device.type == "cuda":
            torch.cuda.empty_cache()


def compare(root: Path, methods=METHODS) -> list[dict]:
    rows = []
    for method in methods:
        one, one2x, two = (json.loads((root / d / f"{method}.json").read_text()) for d in ("one", "one2x", "two"))
        t1 = one["batch_per_process"] / one["step_seconds"]
        t2 = two["processes"] * two["batch_per_process"] / two["step_seconds"]
        a, b = torch.load(root / "two" / f"{method}.pt"), torch.load(root / "one2x" / f"{method}.pt")
        rel = max(float((a[s] - b[s]).norm() / b[s].norm().clamp_min(1e-12)) for s in b)
        loss_gap = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(two["loss"], one2x["loss"]))
        rows.append({
            "benchmark": f"data-parallel fine-tuning: SD1.4 UNet {method}, {one['resolution']} px, batch {one['batch_per_process']} "
                         f"per GPU, {two['processes']} processes",
            "device": f"{two['processes']} x {two['gpu']}", "date": time.strftime("%Y-%m-%d"),
            "fadelab": t2, "baseline": t1, "unit": "images/s", "ratio": t2 / t1,
            "notes": (f"finetuning.train under accelerate launch ({two['processes']} processes, DDP) against one "
                      f"process on one GPU in the same call, same per-process batch; step times "
                      f"{two['step_seconds']:.3f} s vs {one['step_seconds']:.3f} s; scaling target >= 1.8; "
                      f"against one process with the global batch {one2x['batch_per_process']}: max relative "
                      f"loss gap {loss_gap:.1e}, max relative delta difference {rel:.1e} over "
                      f"{len(b)} sites (bf16 autocast, reduction order differs)"),
            "peak_mem": int(two["peak_memory_gib"] * 2**30) if two.get("peak_memory_gib") else None,
            "extra": {"one": {k: v for k, v in one.items() if k != "loss"},
                      "two": {k: v for k, v in two.items() if k != "loss"},
                      "one_global_batch": {k: v for k, v in one2x.items() if k != "loss"},
                      "max_rel_loss_gap": loss_gap, "max_rel_delta_diff": rel}})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--compare", type=Path, default=None, help="the folder holding one/, one2x/ and two/")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    a = p.parse_args()
    methods = tuple(m for m in a.methods.split(",") if m)
    if bad := [m for m in methods if m not in METHODS]:
        p.error(f"--methods {a.methods!r}: unknown {bad}; accepted: {', '.join(METHODS)}")
    if a.compare:
        rows = compare(a.compare, methods)
        text = json.dumps({"rows": rows}, indent=1)
        if a.json:
            a.json.write_text(text)
        for r in rows:
            print(f"{r['benchmark']}: {r['fadelab']:.2f} vs {r['baseline']:.2f} images/s = {r['ratio']:.2f}x; {r['notes']}")
        return 0
    run(a.out, a.batch, a.steps, a.scale, a.resolution, methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
