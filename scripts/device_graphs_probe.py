"""Organism fine-tuning steps with and without CUDA graphs (TrainHParams.cuda_graphs), one GPU.

    python3 scripts/device_graphs_probe.py --out $OUT/graphs [--steps 60] [--methods full,lora,dora,dreambooth]
                                                   (textual-inversion too, on the subject like DreamBooth)

For each method, the organism's defaults with `steps` steps, trained eagerly and with graphs,
twice each, alternating (eager first): seconds per step after the first three (the capture is in
those), the whole run's seconds, the last loss, and how far the graphed delta is from the eager
one (|d_graphs - d_eager| / |d_eager| over all sites). Writes graphs_probe.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _distance(a, b) -> float:
    """|a - b| over all sites of two deltas of one fine-tune, from the dense difference: `(a - b)`
    with WeightDelta.norm would keep LoRA factors and cancel inside a Gram product, whose rounding
    hides differences below about 1e-4 of the norm."""
    return sum(float((a.dense(s) - b.dense(s)).norm() ** 2) for s in a.sites()) ** 0.5


def compare(method: str, runs: dict, rows: list) -> None:
    """How far the graphed delta is from the eager one, against two eager runs' own distance."""
    e, g, e2 = runs[False][0].delta, runs[True][0].delta, runs[False][1].delta
    den = sum(float(e.dense(s).norm() ** 2) for s in e.sites()) ** 0.5
    rows.append({"method": method, "delta_rel_diff_graphs_vs_eager": _distance(g, e) / den,
                 "delta_rel_diff_eager_vs_eager": _distance(e2, e) / den})
    print(json.dumps(rows[-1]), flush=True)


def write(out: Path, rows: list, device: str) -> None:
    import torch

    (out / "graphs_probe.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
         "torch": torch.__version__, "rows": rows}, indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--methods", default="full,lora,dora,dreambooth")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()

    import torch

    import models
    from finetuning import hparams as H
    from finetuning import train
    from models.organism import data as organism_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = models.load("organism", device=args.device)
    tmp = Path(tempfile.mkdtemp())
    style = organism_data.write_style_set(tmp / "style", n=256, seed=0)
    subject = organism_data.write_dreambooth(tmp / "db", per_subject=5, seed=0) / "dog1"
    rows = []
    for method in args.methods.split(","):
        hp = H.defaults(method, "organism", steps=args.steps)
        data = subject if method in ("dreambooth", "textual-inversion") else style
        runs, failed = {}, False
        for rep in range(2):
            for graphs in (False, True):
                if failed:
                    break
                t = time.perf_counter()
                try:
                    r = train(model, data, replace(hp, cuda_graphs=graphs), seed=1, progress=False)
                except Exception as e:  # a capture that fails: say so and go on to the next method
                    traceback.print_exc()
                    rows.append({"method": method, "cuda_graphs": graphs, "rep": rep,
                                 "error": f"{type(e).__name__}: {e}"[:500]})
                    print(json.dumps(rows[-1]), flush=True)
                    failed = True
                    break
                wall = time.perf_counter() - t
                runs.setdefault(graphs, []).append(r)
                rows.append({"method": method, "cuda_graphs": graphs, "rep": rep, "steps": args.steps,
                             "batch": hp.batch_size, "step_seconds": r.info["step_seconds"],
                             "train_seconds": r.info["seconds"], "wall_seconds": round(wall, 3),
                             "last_loss": float(r.loss[-1]), "graphs_info": r.info["cuda_graphs"]})
                print(json.dumps(rows[-1]), flush=True)
        if not failed:
            compare(method, runs, rows)
        write(out, rows, args.device)
    print("\nmethod      graphs  step_s (rep 0, rep 1)")
    for method in args.methods.split(","):
        for graphs in (False, True):
            s = [r.get("step_seconds") for r in rows if r.get("method") == method and r.get("cuda_graphs") is graphs]
            print(f"{method:11s} {str(graphs):6s}  " + ", ".join(f"{x:.4f}" for x in s if x is not None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
