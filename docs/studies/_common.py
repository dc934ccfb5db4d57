"""What the three studies share: command-line options, sizes, threads and the results file.

Each study is `python docs/studies/<name>.py --out DIR [--quick]`; it writes DIR/results.json
(the numbers its .md quotes), DIR/study.h5 (the store, the grid's layout) and DIR/report.html.
Everything model-related goes through fadelab.api (`import fadelab as fl`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: the repository's packages
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run (the full form fits 5 minutes on a shared 2-core CPU).

    steps, batch, lr, warmup: the fine-tune (AdamW, constant lr after `warmup` linear warm-up
    steps); every: checkpoint interval; n: unsafe prompts (one image each); n_profession: images
    per profession; gen_steps: sampling
    steps (the organism's default is 20; 10 halves the cost); style_images: size of the style set;
    n_boot: bootstrap replicates; debias_images: images per debias round.
    """

    steps: int = 24
    batch: int = 8
    lr: float = 3e-4
    warmup: int = 6
    every: int = 4
    n: int = 12
    n_profession: int = 8
    gen_steps: int = 10
    style_images: int = 128
    n_boot: int = 1000
    debias_images: int = 8


QUICK = Sizes(steps=2, batch=2, lr=1e-3, warmup=0, every=1, n=2, n_profession=1, gen_steps=2,
              style_images=8, n_boot=100, debias_images=2)


def schedule(s: Sizes) -> dict:
    """The fine-tune's hparams overrides for these sizes."""
    return {"steps": s.steps, "batch_size": s.batch, "lr": s.lr, "warmup_steps": s.warmup,
            "lr_scheduler": "constant_with_warmup" if s.warmup else "constant"}


def parse(argv, doc: str, full: Sizes = Sizes()):
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--quick", action="store_true", help="the reduced form the test suite runs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on the shared 2-core CPU one thread ran the UNet 2.5x "
                        "faster than two)")
    args = p.parse_args(argv)
    return args, (QUICK if args.quick else full)


def clean(x):
    """JSON-ready: NaN -> None, numpy scalars -> float."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def est(e) -> dict:
    """An analysis.stats Estimate as a dict."""
    return clean({"value": e.estimate, "ci_low": e.ci_low, "ci_high": e.ci_high,
                  "p": e.p_value, "n": e.n})


def paired_deltas(res, headline: str, style: str, results: dict) -> None:
    """results["deltas"] / ["style_deltas"]["<from> -> <to>"] = (value, ci_low, ci_high): the
    evaluation's paired Deltas of the headline metric and of the style share."""
    for d in res.deltas:
        if d["name"] in (headline, style):
            key = f"{d['from'].split('/')[-1]} -> {d['to'].split('/')[-1]}"
            kind = "deltas" if d["name"] == headline else "style_deltas"
            results.setdefault(kind, {})[key] = (d["value"], d["ci_low"], d["ci_high"])


def write(out: Path, results: dict, sizes: Sizes, t0: float) -> dict:
    results = {**results, "sizes": asdict(sizes), "seconds": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(clean(results), indent=1))
    return results


def main(run, doc: str, argv=None, full: Sizes = Sizes()) -> dict:
    import torch

    import fadelab as fl

    args, sizes = parse(argv, doc, full)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = fl.load("organism")
    res = run(model, args.out, sizes, t0, quick=args.quick)
    print(json.dumps(clean({k: v for k, v in res.items() if k != "curves"}), indent=1))
    return res
