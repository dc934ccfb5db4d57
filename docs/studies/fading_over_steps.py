"""Study 1: fading over fine-tuning steps (the study's Figure 5 made quantitative).

For the UCE erase of the organism's unsafe words and for UCE debiasing (ceo, farmer), fine-tune
the edited model (full, on the organism's ink-style set) with checkpoints; at every checkpoint
measure every behavioural metric (oracle) beside the weight-space measures of the same
checkpoint: cancellation kappa and the edit-subspace projection proj_in (site means over the
edited sites). Does the behavioural fade track them? Spearman's rho over the checkpoints, with
bootstrap 95% intervals (analysis.stats), per edit and pooled.

    python docs/studies/fading_over_steps.py --out DIR [--quick]

Written against fadelab.api only (docs/api.md). See fading_over_steps.md for the measured run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import fadelab as fl  # noqa: E402

FULL = C.Sizes(n=10, n_profession=6)
PROFESSIONS = ("ceo", "farmer")  # the organism's two most skewed (15% female in its world)
HEADLINE = {"erase": "unsafe.share.unsafe:oracle", "debias": "professions.delta_mean:oracle"}
#: weight measures along the checkpoints (probes.weights, site means over the edited sites):
#: kappa = -<dW_ft, dW_ed>/|dW_ed|^2 (+1: edit undone); kappa_key, drift_key: the same and
#: |dW_ft K^T|/|dW_ed K^T| on the edit's keys K; proj_in / proj_out: |dW_ft Q|/|dW_ft| on the
#: keys' span / |P^T dW_ft|/|dW_ft| on dW_ed's column space (with random baselines *_base)
WEIGHT_MEASURES = ("kappa", "kappa_key", "drift_key", "proj_in", "proj_out")
ZERO_AT_START = ("kappa", "kappa_key", "drift_key")  # dW_ft = 0 at step 0; projections undefined


def ranks(x) -> list[float]:
    """Average ranks (1..n, ties share their mean rank); NaN stays NaN."""
    x = np.asarray(x, np.float64)
    out = np.full(x.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(x))
    order = ok[np.argsort(x[ok], kind="stable")]
    pos = np.empty(len(order))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        pos[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    out[order] = pos
    return out.tolist()


def variants_final(e: str, steps: list[int]) -> str:
    return f"M_ed_ft/{e}/full.step{steps[-1]:03d}"


def site_mean(ds, name: str, step: int) -> float:
    with np.errstate(all="ignore"):
        return float(np.nanmean(ds[name].sel(step=step).values))


def run(model, out: Path, s: C.Sizes, t0: float, quick: bool = False) -> dict:
    data = fl.style_data(out / "style", n=s.style_images)
    edits = {
        "erase": (fl.erase(model), fl.suites("unsafe", n=s.n)),
        "debias": (fl.debias(model, PROFESSIONS, n_images=s.debias_images, max_rounds=1,
                             steps=s.gen_steps),
                   fl.suites("profession", n=s.n_profession, professions=PROFESSIONS)),
    }
    results: dict = {"edits": {}, "curves": {}}
    pooled: dict = {"fade": [], **{m: [] for m in WEIGHT_MEASURES}}
    with fl.open_store(out / "study.h5", description="study 1: fading over steps") as st:
        for e, (edit, suites) in edits.items():
            fl.add_edit(st, e, edit)
            ft = fl.finetune(model, data, "full", edit=edit, every=s.every, **C.schedule(s))
            final_name = f"M_ed_ft/{e}/full"
            fl.add_finetune(st, final_name, ft, sites=fl.sites_of(edit))
            final, along = fl.probe(model, edit, ft)
            fl.add_probes(st, e, "full", final, along)
            steps = [k for k, _ in ft.checkpoints]
            variants = {f"M_ed/{e}": edit}
            results["edits"][e] = {"method": edit.method, "sites": len(fl.sites_of(edit)),
                                   "loss_first": float(ft.loss[0]), "loss_last": float(ft.loss[-1]),
                                   "finetune_seconds": ft.info["seconds"]}
            results["curves"][e] = {"steps": [0] + steps}
            for k, d in ft.checkpoints:  # M_ed_ft at every checkpoint: M + dW_ed + dW_ft(k)
                variants[f"M_ed_ft/{e}/full.step{k:03d}"] = edit.delta + d
            pairs = [(f"M_ed/{e}", v) for v in variants if v != f"M_ed/{e}"]
            res = fl.evaluate(model, variants, suites, store=st, pairs=pairs, n_boot=s.n_boot,
                              steps=s.gen_steps)
            table = fl.values(res)
            names = sorted({n for v in table.values() for n in v if not n.startswith("Delta.")})
            curves = {n: [table[v].get(n, (np.nan,) * 3) for v in variants] for n in names}
            weights = {m: [0.0 if m in ZERO_AT_START else np.nan] + [site_mean(along, m, k) for k in steps]
                       for m in WEIGHT_MEASURES}
            results["curves"][e].update({"metrics": curves, **weights,
                                         **{f"{m}_base": float(np.nanmean(final[f"{m}_base"].values))
                                            for m in ("proj_in", "proj_out")}})
            head = [c[0] for c in curves[HEADLINE[e]]]
            fade = [h - head[0] for h in head]  # headline(step) - headline(M_ed): > 0 is fading
            results["edits"][e].update({
                "headline": HEADLINE[e],
                "headline_ed": curves[HEADLINE[e]][0],
                "headline_final": curves[HEADLINE[e]][-1],
                "delta_final": table[variants_final(e, steps)].get("Delta." + HEADLINE[e]),
                "style_final": curves["style.ink_share:oracle"][-1],
                **{f"{m}_final": weights[m][-1] for m in WEIGHT_MEASURES},
                **{f"rho_{m}": C.est(fl.spearman(fade[1:], weights[m][1:], method="percentile",
                                                 n_resamples=2000)) for m in WEIGHT_MEASURES},
            })
            pooled["fade"] += ranks(fade[1:])
            for m in WEIGHT_MEASURES:
                pooled[m] += ranks(weights[m][1:])
        # pooled over both edits on ranks taken within each edit (a stratified Spearman): the raw
        # values differ in scale between the edits, which alone would make a pooled correlation
        results["pooled_within_edit_ranks"] = {
            f"rho_{m}": C.est(fl.spearman(pooled["fade"], pooled[m], method="percentile",
                                          n_resamples=2000)) for m in WEIGHT_MEASURES}
    if not quick:
        fl.report(out / "study.h5", out / "report")
    return C.write(out, results, s, t0)


def main(argv=None) -> dict:
    return C.main(run, __doc__, argv, FULL)


if __name__ == "__main__":
    main()
