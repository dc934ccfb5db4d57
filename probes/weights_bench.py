"""Benchmark: the weight probes at Stable Diffusion scale, against a plain dense numpy/scipy loop.

`bench_rows(device, quick)` times `probes.weights.probe_weights_steps` on the cross-attention
to_k / to_v sites of SD1.4's UNet (32 sites, (320 | 640 | 1280) x 768) and on 32 sites of SDXL's
widest shape (1280 x 2048), with a dense UCE-like edit (rank 8 through 8 key rows) and a
fine-tune along `steps` checkpoints, once as LoRA factors (rank 4) and once dense (full
fine-tuning). The baseline is what one would write without this module: every delta
materialised, numpy's SVD and scipy.linalg.subspace_angles on the CPU, the same metrics. Both
runs compute kappa at every site and step of the timed baseline sites; their largest
difference travels in extra.

Rows follow fadelab.bench's schema (benchmark, device, date, fadelab, baseline, unit, ratio,
notes, peak_mem, extra); ratio = baseline seconds / fadelab seconds. Not a test.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.linalg
import torch

from models import WeightDelta
from probes.weights import WeightProbeConfig, probe_weights_steps

log = logging.getLogger(__name__)

#: SD1.4's UNet cross-attention blocks: output widths of to_k / to_v (down 6, up 9, mid 1).
SD14_XATTN_OUT = (320, 320, 640, 640, 1280, 1280) + (1280,) * 3 + (640,) * 3 + (320,) * 3 + (1280,)


def _setting(shapes: list[tuple[int, int]], steps: int, lora: bool, seed: int):
    """Base weights, a rank-8 dense edit with its keys, and `steps` fine-tuning deltas."""
    g = torch.Generator().manual_seed(seed)
    base, ed, keys_rows = {}, {}, torch.randn(8, shapes[0][1], generator=g)
    fts: dict[int, dict] = {s: {} for s in range(steps)}
    for i, (m, n) in enumerate(shapes):
        site = f"unet.xattn.{i // 2}.{('to_k', 'to_v')[i % 2]}"
        base[site] = torch.randn(m, n, generator=g) / n**0.5
        ed[site] = torch.randn(m, 8, generator=g) @ keys_rows / n  # dense, rank 8, rows in span(keys)
        b, a = torch.randn(m, 4, generator=g) * 1e-2, torch.randn(4, n, generator=g) * 1e-2
        for s in range(steps):
            scale = (s + 1) / steps
            fts[s][site] = (b * scale, a) if lora else (scale * (b @ a) + 1e-4 * torch.randn(m, n, generator=g))
    return base, WeightDelta(ed), {s: WeightDelta(d) for s, d in fts.items()}, {"c_e": keys_rows}


def _baseline(base, d_ed, d_fts, keys, k: int = 8, ik: int = 10) -> tuple[float, dict]:
    """The same metrics, written plainly: dense numpy float64 on the CPU."""
    t0 = time.perf_counter()
    kappas = {}
    c = keys["c_e"].double().numpy()
    for site, w in base.items():
        w = w.double().numpy()
        e = d_ed.dense(site).double().numpy()
        ue, se, vhe = np.linalg.svd(e, full_matrices=False)
        u_pre = np.linalg.svd(w + e, full_matrices=False)[0]
        q_keys = scipy.linalg.orth(c.T)
        for step, d in d_fts.items():
            f = d.dense(site).double().numpy()
            kappas[(step, site)] = -np.vdot(f, e) / np.vdot(e, e)
            _ = np.vdot(f, e) / (np.linalg.norm(f) * np.linalg.norm(e))
            _ = np.linalg.norm(f @ q_keys) / np.linalg.norm(f)
            uf, sf, vhf = np.linalg.svd(f, full_matrices=False)
            _ = scipy.linalg.subspace_angles(vhe[:k].T, vhf[:k].T), scipy.linalg.subspace_angles(ue[:, :k], uf[:, :k])
            p = sf / sf.sum()
            _ = np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), (sf**2).sum() / sf[0] ** 2
            u_post = np.linalg.svd(w + e + f, full_matrices=False)[0]
            _ = np.abs(u_post[:, :ik].T @ u_pre).max(axis=1)
    return time.perf_counter() - t0, kappas


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def bench_rows(device: str = "cuda", quick: bool = False, baseline_sites: int = 4,
               n_sites: int | None = None, only: str | None = None) -> list[dict]:
    """One row per (shape setting, fine-tune form, dtype): seconds for all sites x steps.

    The baseline is timed on the first `baseline_sites` sites and scaled linearly to all of them
    (its cost is the same per site of one shape; the full loop would take most of an hour on a
    CPU at SDXL width). quick: 4 sites x 2 steps instead of 32 x 5; n_sites overrides the count;
    only: run the settings whose name starts with it ("sd14" or "sdxl").
    """
    steps = 2 if quick else 5
    n_sites = n_sites or (4 if quick else 32)
    warm = WeightProbeConfig(dtype="float32", device=device)  # cuSOLVER / MKL initialisation
    probe_weights_steps({"s": torch.randn(8, 8)}, WeightDelta({"s": torch.randn(8, 8)}),
                        {0: WeightDelta({"s": torch.randn(8, 8)})}, None, warm)
    settings = {
        "sd14 xattn to_k/to_v": [(m, 768) for m in SD14_XATTN_OUT for _ in (0, 1)][:n_sites],
        "sdxl-width 1280x2048": [(1280, 2048)] * n_sites,
    }
    rows = []
    for name, shapes in settings.items():
        if only is not None and not name.startswith(only):
            continue
        for lora in (True, False):
            base, d_ed, d_fts, keys = _setting(shapes, steps, lora, seed=0)
            few = list(base)[:baseline_sites]
            t_few, kappa_ref = _baseline({k: base[k] for k in few}, d_ed, d_fts, keys)
            t_base = t_few * len(base) / len(few)
            for dtype in ("float64", "float32"):
                cfg = WeightProbeConfig(k=8, dtype=dtype, device=device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                ds = probe_weights_steps(base, d_ed, d_fts, keys, cfg)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter() - t0
                peak = int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None
                err = max(abs(float(ds["kappa"].sel(step=s, site=site)) - kappa_ref[(s, site)])
                          for (s, site) in kappa_ref)
                form = "LoRA r4" if lora else "dense"
                rows.append({
                    "benchmark": f"probes.weights: {name}, {len(shapes)} sites x {steps} steps, ft {form}, {dtype}",
                    "device": _device_name(device), "date": time.strftime("%Y-%m-%d"),
                    "fadelab": t, "baseline": t_base, "unit": "s", "ratio": t_base / t if t > 0 else None,
                    "notes": (f"baseline: dense numpy + scipy.linalg.subspace_angles on the CPU, same metrics, "
                              f"timed on {len(few)} of {len(base)} sites and scaled"),
                    "peak_mem": peak,
                    "extra": {"max_abs_kappa_diff": err, "sites": len(shapes), "steps": steps,
                              "baseline_sites_timed": len(few), "baseline_s_measured": t_few},
                })
                log.info("%s: %.2f s (baseline %.2f s)", rows[-1]["benchmark"], t, t_base)
    return rows
