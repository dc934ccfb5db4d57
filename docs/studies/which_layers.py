"""Study 2: which layers carry the fade? Fine-tune with the edited sites frozen, with only the
edited sites trainable, and with everything trainable (Cheng et al. 2025 report for language
models that tuning only the non-edited layers damaged edits more than full fine-tuning).

Edit: UCE erase of the organism's unsafe words (edited sites: every unet.xattn.*.to_k / to_v).
Three full fine-tunes of M_ed on the ink-style set, identical but for which parameters train:

    all           every UNet parameter
    frozen-edit   every UNet parameter but the edited sites (fl.finetune(freeze=sites))
    only-edit     only the edited sites (fl.finetune(only=sites))

Measured: Delta of the unsafe share (M_ed -> each), with paired bootstrap 95% intervals, the
paired differences between the arms (same prompts and seeds), the ink-style share, and the
weight probes at the edited sites.

    python docs/studies/which_layers.py --out DIR [--quick]

Written against fadelab.api only (docs/api.md). See which_layers.md for the measured run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import fadelab as fl  # noqa: E402

HEADLINE = "unsafe.share.unsafe:oracle"
FULL = C.Sizes(n=16)


def run(model, out: Path, s: C.Sizes, t0: float, quick: bool = False) -> dict:
    data = fl.style_data(out / "style", n=s.style_images)
    edit = fl.erase(model)
    sites = fl.sites_of(edit)
    arms = {"all": {}, "frozen-edit": {"freeze": sites}, "only-edit": {"only": sites}}
    results: dict = {"arms": {}, "edited_sites": len(sites)}
    with fl.open_store(out / "study.h5", description="study 2: which layers carry the fade") as st:
        fl.add_edit(st, "erase", edit)
        variants = {"M_ed/erase": edit}
        for arm, constraint in arms.items():
            ft = fl.finetune(model, data, "full", edit=edit, **C.schedule(s), **constraint)
            fl.add_finetune(st, f"M_ed_ft/erase/{arm}", ft, sites=sites)
            final, _ = fl.probe(model, edit, ft, sites=sites, steps=False)
            fl.add_probes(st, "erase", arm, final)
            at_edit = [float(ft.delta.norm(x)) for x in sites]
            elsewhere = [float(ft.delta.norm(x)) for x in ft.delta.sites() if x not in set(sites)]
            results["arms"][arm] = {
                "drift_edited_sites": float(np.sqrt(np.sum(np.square(at_edit)))),
                "drift_max_abs_edited": max(float(ft.delta.dense(x).abs().max()) for x in sites),
                "drift_other_sites": float(np.sqrt(np.sum(np.square(elsewhere)))),
                "kappa": float(np.nanmean(final["kappa"].values)),
                "proj_in": float(np.nanmean(final["proj_in"].values)),
                "loss_last": float(ft.loss[-1]), "finetune_seconds": ft.info["seconds"],
            }
            variants[f"M_ed_ft/erase/{arm}"] = edit.delta + ft.delta
        names = list(variants)
        pairs = [("M_ed/erase", v) for v in names[1:]]
        pairs += [("M_ed_ft/erase/all", "M_ed_ft/erase/frozen-edit"),
                  ("M_ed_ft/erase/all", "M_ed_ft/erase/only-edit")]
        res = fl.evaluate(model, variants, fl.suites("unsafe", n=s.n), store=st, pairs=pairs,
                          n_boot=s.n_boot, steps=s.gen_steps)
    table = fl.values(res)
    results["M_ed"] = {HEADLINE: table["M_ed/erase"][HEADLINE],
                       "style": table["M_ed/erase"]["style.ink_share:oracle"]}
    for arm in arms:
        v = f"M_ed_ft/erase/{arm}"
        results["arms"][arm].update({"unsafe": table[v][HEADLINE],
                                     "style": table[v]["style.ink_share:oracle"]})
    C.paired_deltas(res, HEADLINE, "style.ink_share:oracle", results)
    if not quick:
        fl.report(out / "study.h5", out / "report")
    return C.write(out, results, s, t0)


def main(argv=None) -> dict:
    return C.main(run, __doc__, argv, FULL)


if __name__ == "__main__":
    main()
