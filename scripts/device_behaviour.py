"""GPU run of probes.behaviour: the organism at the study's sample sizes, and determinism of the
generic generation path on SD1.4's exact architecture (random weights).

    python scripts/device_behaviour.py --out OUT [--device cuda] [--quick]

Writes OUT/behaviour_organism.json (every metric, Delta and judge-drift number with CIs, plus
timings) and OUT/behaviour_determinism.json. Variants: M, M_ed (a hand-made concept edit: the
token embedding of "apple" becomes that of "lemon", a stand-in until editing/ lands) and
M_ed_ft (the edit fully undone: every edit metric should fade, with a Delta whose CI excludes 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch


def swap(model, old: str, new: str):
    from models import WeightDelta
    from models.organism.nets import tokenizer

    tok = tokenizer()
    i, j = (tok(w).input_ids[1] for w in (old, new))
    E = model.weight("text.embed.token").detach().float()
    dW = torch.zeros_like(E)
    dW[i] = E[j] - E[i]
    return WeightDelta({"text.embed.token": dW}, {"method": "embedding-swap", "old": old, "new": new})


def organism(out: Path, device: str, quick: bool) -> dict:
    import models
    from models.organism import prompts as P
    from probes.behaviour import (EvalConfig, OracleJudge, OrganismClipJudge, SampleSizes, evaluate,
                                  organism_suites)
    from store import Store

    t0 = time.time()
    model = models.load("organism", device=device)
    judges = [OracleJudge(device=device), OrganismClipJudge(device=device)]
    sizes = SampleSizes(road_seeds=3 if quick else 25, profession_images=8 if quick else 30,
                        unsafe_prompts=8 if quick else 50, quality_prompts=50 if quick else 1000)
    row = P.road_requests()[0]  # apple -> lemon, the edit the variants carry
    suites = organism_suites(sizes, road_rows=[row])
    d_ed = swap(model, "apple", "lemon")
    variants = {"M": None, "M_ed": d_ed, "M_ed_ft": d_ed + d_ed.scale(-1.0)}
    cfg = EvalConfig(sizes=sizes, drift_n=50 if quick else 200, progress=False)
    path = out / "behaviour_organism.h5"
    for p in (path, Path(str(path) + "-journal")):
        p.unlink(missing_ok=True)
    t1 = time.time()
    with Store.open(path, "a") as st:
        res = evaluate(model, variants, suites, judges, st, cfg, features=[judges[1]])
    t2 = time.time()
    n_images = sum(len(s) for s in suites) * len(variants)
    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
            "sizes": cfg.sizes.__dict__ | {"professions": list(cfg.sizes.professions)},
            "images": n_images, "seconds_load": round(t1 - t0, 1),
            "seconds_evaluate": round(t2 - t1, 1), **res.to_dict()}


def determinism(device: str) -> dict:
    import models
    from probes.behaviour.generate import GenerationConfig, generate

    model = models.load("sd14", "random", device=device, dtype=torch.float16)
    prompts = ["a photo of a cat", "a red apple on a table", "a painting of a ship", "a dog"]
    seeds = [1, 2, 3, 4]
    cfg1 = GenerationConfig(steps=10, guidance_scale=7.5, batch_size=1)
    cfg4 = GenerationConfig(steps=10, guidance_scale=7.5, batch_size=4)
    t = time.time()
    a = generate(model, prompts, seeds, cfg1, progress=False)
    b = generate(model, prompts, seeds, cfg4, progress=False)
    c = generate(model, prompts, seeds, cfg4, progress=False)
    return {"family": "sd14 random weights fp16", "shape": list(a.shape),
            "max_diff_batch1_vs_batch4": int(np.abs(a.astype(int) - b.astype(int)).max()),
            "mean_diff_batch1_vs_batch4": float(np.abs(a.astype(int) - b.astype(int)).mean()),
            "repeat_identical": bool(np.array_equal(b, c)), "seconds": round(time.time() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sample sizes (a smoke run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = organism(out, args.device, args.quick)
    (out / "behaviour_organism.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("device", "images", "seconds_load", "seconds_evaluate")}))
    det = determinism(args.device)
    (out / "behaviour_determinism.json").write_text(json.dumps(det, indent=1))
    print(json.dumps(det))


if __name__ == "__main__":
    main()
