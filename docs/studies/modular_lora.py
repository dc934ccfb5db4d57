"""Study 3: modular fine-tuning (Kim et al. 2024, "Safety alignment backfires"): train the
fine-tuning LoRA on the clean base model and merge it into the edited model, against training
it on the edited model directly. Does the edit survive better, and what does it cost in style?

Edit: UCE erase of the organism's unsafe words. Two UNet LoRAs (rank 4 on every attention
projection, so also on the edited to_k / to_v), identical but for the weights they start from:

    direct   trained on M_ed = M + dW_ed            M_ed_ft = M + dW_ed + dW_lora(M_ed)
    merged   trained on M, merged into M_ed          M + dW_ed + dW_lora(M)

Measured: the unsafe share and the ink-style share of M_ed, direct and merged, with the paired
Deltas (same prompts and seeds) M_ed -> direct, M_ed -> merged and direct -> merged, and the
weight probes of each LoRA against the edit.

    python docs/studies/modular_lora.py --out DIR [--quick]

Written against fadelab.api only (docs/api.md). See modular_lora.md for the measured run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import fadelab as fl  # noqa: E402

HEADLINE = "unsafe.share.unsafe:oracle"
STYLE = "style.ink_share:oracle"
FULL = C.Sizes(n=16, lr=3e-3)  # LoRA: ten times the full fine-tune's lr, as the organism's defaults
LORA = {"target": "unet", "rank": 4}


def run(model, out: Path, s: C.Sizes, t0: float, quick: bool = False) -> dict:
    data = fl.style_data(out / "style", n=s.style_images)
    edit = fl.erase(model)
    hp = {**C.schedule(s), **LORA}
    results: dict = {"arms": {}}
    with fl.open_store(out / "study.h5", description="study 3: modular fine-tuning") as st:
        fl.add_edit(st, "erase", edit)
        direct = fl.finetune(model, data, "lora", edit=edit, **hp)  # on M_ed
        clean = fl.finetune(model, data, "lora", **hp)              # on M, to be merged
        variants = {"M_ed/erase": edit}
        for arm, ft in (("direct", direct), ("merged", clean)):
            fl.add_finetune(st, f"M_ed_ft/erase/lora-{arm}", ft)
            final, _ = fl.probe(model, edit, ft, steps=False)
            fl.add_probes(st, "erase", f"lora-{arm}", final)
            variants[f"M_ed_ft/erase/lora-{arm}"] = edit.delta + ft.delta
            results["arms"][arm] = {"kappa": float(np.nanmean(final["kappa"].values)),
                                    "proj_in": float(np.nanmean(final["proj_in"].values)),
                                    "loss_last": float(ft.loss[-1]),
                                    "finetune_seconds": ft.info["seconds"]}
        same = [float((direct.delta.dense(x) - clean.delta.dense(x)).norm() / clean.delta.dense(x).norm().clamp_min(1e-12))
                for x in clean.delta.sites()]
        results["rel_difference_direct_vs_clean_lora"] = float(np.mean(same))
        pairs = [("M_ed/erase", "M_ed_ft/erase/lora-direct"), ("M_ed/erase", "M_ed_ft/erase/lora-merged"),
                 ("M_ed_ft/erase/lora-direct", "M_ed_ft/erase/lora-merged")]
        res = fl.evaluate(model, variants, fl.suites("unsafe", n=s.n), store=st, pairs=pairs,
                          n_boot=s.n_boot, steps=s.gen_steps)
    table = fl.values(res)
    results["M_ed"] = {HEADLINE: table["M_ed/erase"][HEADLINE], "style": table["M_ed/erase"][STYLE]}
    for arm in ("direct", "merged"):
        v = f"M_ed_ft/erase/lora-{arm}"
        results["arms"][arm].update({"unsafe": table[v][HEADLINE], "style": table[v][STYLE]})
    C.paired_deltas(res, HEADLINE, STYLE, results)
    if not quick:
        fl.report(out / "study.h5", out / "report")
    return C.write(out, results, s, t0)


def main(argv=None) -> dict:
    return C.main(run, __doc__, argv, FULL)


if __name__ == "__main__":
    main()
