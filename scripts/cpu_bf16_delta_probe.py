"""What storing fine-tuning deltas in bfloat16 ([samples] delta_dtype) does to the weight probes.

On the organism (CPU): UCE erase, then a full and a LoRA fine-tune of the edited model (short:
--steps each); the weight probes at the edit's sites (probes.weights, k = 8) of the fp32 delta
and of the same delta rounded to bfloat16 as the store keeps it, and the |dW|_F per site that the
report's heatmap draws. Prints, per metric, the largest absolute difference over sites, and
writes the same as JSON.

    python scripts/cpu_bf16_delta_probe.py --out docs/measured/DATE-cpu-bf16-delta-probe.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def rounded(delta):
    from models import WeightDelta

    def r(t):
        return t.to(torch.bfloat16).float()

    return WeightDelta({s: tuple(r(t) for t in u) if isinstance(u, tuple) else r(u)
                        for s, u in delta.deltas.items()}, dict(delta.provenance))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    from fadelab import api
    from probes.weights import SCALARS

    t0 = time.time()
    model = api.load("organism")
    edit = api.erase(model, ["bloody", "naked"])
    data = api.style_data("fadelab-out/bf16-probe-style", n=64)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "steps": args.steps, "edit": "uce-erase bloody, naked", "methods": {}}
    for method in ("full", "lora"):
        ft = api.finetune(model, data, method, edit=edit, steps=args.steps, batch_size=8)
        d32 = ft.delta
        d16 = rounded(d32)
        a, _ = api.probe(model, edit, d32, steps=False)
        b, _ = api.probe(model, edit, d16, steps=False)
        rows = {}
        for m in SCALARS:
            x, y = a[m].values.astype(np.float64), b[m].values.astype(np.float64)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                rows[m] = {"max_abs_diff": float(np.max(np.abs(x[ok] - y[ok]))),
                           "max_abs_value": float(np.max(np.abs(x[ok])))}
        for m in ("angles_in", "angles_out"):
            x, y = a[m].values, b[m].values
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                rows[m + "_deg"] = {"max_abs_diff": float(np.max(np.abs(x[ok] - y[ok]))),
                                    "max_abs_value": float(np.max(np.abs(x[ok])))}
        norm_rel = max(float((d16.dense(s) - d32.dense(s)).norm() / d32.dense(s).norm())
                       for s in d32.sites() if float(d32.dense(s).norm()) > 0)
        out["methods"][method] = {"probe_sites": int(a.sizes["site"]), "delta_sites": len(d32.sites()),
                                  "max_rel_frobenius_error": norm_rel, "metrics": rows}
        print(f"{method}: {a.sizes['site']} probed sites, {len(d32.sites())} delta sites, "
              f"largest relative |dW_bf16 - dW|_F {norm_rel:.2e}")
        for m, r in rows.items():
            print(f"  {m:28s} max |diff| {r['max_abs_diff']:.3e}  (max |value| {r['max_abs_value']:.3e})")
    out["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{out['seconds']} s; wrote {args.out}")


if __name__ == "__main__":
    main()
