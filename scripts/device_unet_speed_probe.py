"""How fast the organism's UNet trains on one GPU, by batch size, per-step sync and torch.compile.

The v3 UNet (--vae-levels 2: 32x32 latents) trained at 5.9 steps/s at batch 1,024 on an H200
(docs/organism.md), and the organism's fine-tuning steps were seen to take about the same time at
batch 32 as at 1,024, which suggested a launch-bound step. This times
models.organism.train.unet_step, the trainer's own step, under the trainer's CUDA settings, on
random latents and conditioning of the real shapes, so the retrain can pick its batch and options
from numbers rather than guesses. On 2026-12-05 (H200) it was not launch-bound: 6,048 samples/s
at batch 1,024, 7,283 at 4,096 (docs/measured/2026-12-05-h200-unet-speed.json).

    python3 scripts/device_unet_speed_probe.py --out $OUT/unet-speed.json [--vae-levels 2]
    python3 scripts/device_unet_speed_probe.py --out /tmp/p.json --device cpu --quick

Each setting: warm-up steps (compilation included, timed apart), then timed steps between two
device syncs; "sync" settings read the loss every step as the trainer did before 2026-12-05.
Rows are written to --out after every setting (a temporary file, then a rename).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = [  # (batch, sync every step, torch.compile)
    (1024, True, False), (1024, False, False), (2048, False, False), (4096, False, False),
    (2048, False, True), (4096, False, True),
]


def time_setting(ocfg, batch: int, sync: bool, compiled: bool, device, warmup: int, steps: int) -> dict:
    from models.organism.nets import build_scheduler, build_unet
    from models.organism.train import unet_step

    torch.manual_seed(0)
    unet = build_unet(ocfg).to(device).train().to(memory_format=torch.channels_last)
    ema = [p.detach().clone().float() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)
    run = torch.compile(unet) if compiled else unet
    alphas = build_scheduler()[0].alphas_cumprod.to(device)
    g = torch.Generator(device).manual_seed(0)
    side = ocfg.latent_size
    z0 = torch.randn(batch, 4, side, side, device=device)
    cond = torch.randn(batch, 77, ocfg.text_width, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def go(n):
        for _ in range(n):
            loss = unet_step(run, opt, ema, z0, cond, alphas, g, lr=1e-4, ema_d=0.999)
            if sync:
                bool(torch.isfinite(loss))
        if device.type == "cuda":
            torch.cuda.synchronize()

    s = time.perf_counter(); go(warmup); w = time.perf_counter() - s
    s = time.perf_counter(); go(steps); dt = time.perf_counter() - s
    row = {"batch": batch, "sync_every_step": sync, "compile": compiled, "warmup_s": round(w, 2),
           "steps": steps, "steps_per_s": round(steps / dt, 2), "samples_per_s": round(steps * batch / dt)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vae-levels", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 + 2 steps, no compile (checks the script)")
    p.add_argument("--budget-s", type=float, default=150.0, help="skip the settings left after this many seconds")
    args = p.parse_args(argv)
    from models.organism.nets import sizes_for_vae_levels
    from models.organism.train import cuda_settings

    device = torch.device(args.device)
    cuda_settings(device)  # the trainer's; the 2026-12-05 rows also had cudnn.benchmark on, which it has not
    ocfg = sizes_for_vae_levels(args.vae_levels)
    settings = [(8, True, False), (8, False, False)] if args.quick else SETTINGS
    warmup, steps = (2, 2) if args.quick else (10, 40)
    out = Path(args.out)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "vae_levels": args.vae_levels,
           "unet_channels": list(ocfg.unet_channels), "latent": ocfg.latent_size, "rows": []}
    t0 = time.time()
    for batch, sync, compiled in settings:
        if time.time() - t0 > args.budget_s:
            res["rows"].append({"batch": batch, "sync_every_step": sync, "compile": compiled,
                                "skipped": f"past --budget-s {args.budget_s}"})
            continue
        try:
            row = time_setting(ocfg, batch, sync, compiled, device, warmup, steps)
        except Exception as e:  # one failing setting (a compile error) must not lose the others
            row = {"batch": batch, "sync_every_step": sync, "compile": compiled, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
