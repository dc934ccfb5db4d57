"""Issue 3 on the GPU: the organism's acceptance numbers for UCE and ReFACT, the ReFACT layer
sweep, and the benchmark on SD1.4's architecture with random weights.

    python scripts/device_editing.py --out DIR [--n 100] [--device cuda]
                                     [--parts erase,debias,refact,sd14] [--sd14-scale 1]
                                     [--debias-images 100] [--smoke]
    python scripts/device_editing.py --out DIR2 --parts sweep [--sweep-n 10]
    (either: [--weights FOLDER] another trained organism; [--refact-loss target_text] ReFACT's
    loss departure, editing/refact.py, with [--refact-tolerance 0.05] its stop; [--refact-at
    TOKEN/LAYER|best] where refact edits)

(a) the organism, n images per line, judged by the oracle (and by the organism's CLIP):
    erase   UCE erase of its unsafe words (preserving 50 safe captions): unsafe-marker rate and
            safe-prompt fidelity, before and after
    debias  UCE debias of the six study professions (oracle judge in the loop): F_p and the
            mean delta = |F_p - 0.5| / 0.5 before and after, oracle and CLIP
    refact  ReFACT with the organism's defaults on all 22 RoAD-schema requests: efficacy,
            generality, specificity (n images per line and request), oracle and CLIP
    sweep   ReFACT at every layer x fact token (sweep-n images per line and request); not in
            the default parts (it alone took about 4.5 minutes on an H200)
(b) sd14    UCE with 1 concept + 100 preserve prompts and one ReFACT edit on models.load("sd14",
            "random"): seconds and torch.cuda.max_memory_allocated (C's statistic timed apart;
            UCE also as the official code's plain per-site loop, editing/bench.py).

Writes DIR/editing.json (every number, the targets and whether each passed) and prints a summary.
Target: under 4 minutes on one H100 with the default parts; the sweep is a second call.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from editing import (DebiasHparams, ReFACTHparams, UCEHparams, organism_corpus,  # noqa: E402
                     organism_profession_preserve, organism_road_requests, organism_safe_prompts,
                     refact, second_moment, uce_debias, uce_erase)
from editing.bench import sd14_edit_timings  # noqa: E402
from editing.evaluate import Measurer, bias_delta  # noqa: E402
from editing.presets import ORGANISM_UNSAFE  # noqa: E402
from editing.refact import default_fact_token, default_layer  # noqa: E402
from models.errors import FadelabError  # noqa: E402
from models.organism import world  # noqa: E402

log = logging.getLogger("device_editing")

TARGETS = {
    "erase_unsafe_relative_cut": (">=", 0.80),
    "erase_fidelity_drop": ("<=", 0.05),
    "debias_mean_delta_after": ("<=", 0.20),
    "refact_efficacy": (">=", 0.90),
    "refact_generality": (">=", 0.70),
    "refact_specificity": (">=", 0.90),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def part_erase(m, meas: Measurer, n: int) -> dict:
    preserve = organism_safe_prompts(50)
    t = time.perf_counter()
    r = uce_erase(m, list(ORGANISM_UNSAFE), UCEHparams(), preserve=preserve)
    edit_s = time.perf_counter() - t
    out = {"concepts": list(ORGANISM_UNSAFE), "n_preserve": len(preserve), "edit_seconds": edit_s,
           "unsafe_before": meas.unsafe_rate(n), "unsafe_after": meas.unsafe_rate(n, r.delta),
           "fidelity_before": meas.safe_fidelity(n), "fidelity_after": meas.safe_fidelity(n, r.delta),
           "info": r.info}
    out["unsafe_relative_cut"] = 1 - out["unsafe_after"] / max(out["unsafe_before"], 1e-9)
    out["fidelity_drop"] = out["fidelity_before"] - out["fidelity_after"]
    return out


def part_debias(m, meas: Measurer, n: int, h: DebiasHparams) -> dict:
    profs = list(world.STUDY_PROFESSIONS)
    t = time.perf_counter()
    r = uce_debias(m, profs, meas.gender, h, preserve=organism_profession_preserve(profs))
    edit_s = time.perf_counter() - t
    before = meas.female_shares(profs, n)
    after = meas.female_shares(profs, n, r.delta)
    out = {"professions": profs, "edit_seconds": edit_s, "rounds": r.info["rounds"],
           "converged": r.info["converged"], "loop_female_shares": r.info["final_female_shares"],
           "history": r.info["history"], "hparams": r.hparams_dict()}
    for judge in before:
        out[f"female_before_{judge}"] = before[judge]
        out[f"female_after_{judge}"] = after[judge]
        out[f"mean_delta_before_{judge}"] = float(np.mean([bias_delta(f) for f in before[judge].values()]))
        out[f"mean_delta_after_{judge}"] = float(np.mean([bias_delta(f) for f in after[judge].values()]))
    return out


def _refact_all(m, meas, rows, n, h: ReFACTHparams, corpus) -> dict:
    site = f"text.mlp.{h.layer if h.layer is not None else default_layer(m)}.fc2"
    stats = second_moment(m, site, corpus)
    t = time.perf_counter()
    results = [refact(m, row, h, stats=stats) for row in rows]
    edit_s = time.perf_counter() - t
    scores = meas.refact_scores(rows, results, n)
    scores.update(edit_seconds=edit_s, steps=[r.info["steps"] for r in results],
                  p_new=[r.info["p_new"] for r in results], site=site)
    return scores


def best_of_sweep(table: dict, min_specificity: float = 0.9) -> str:
    """The sweep's "token/layer" with the highest efficacy (then generality) among those with
    specificity >= min_specificity (all of them when none has it): how the organism's default
    was chosen (docs/editing.md)."""
    ok = [k for k, v in table.items() if v["specificity"] >= min_specificity] or list(table)
    return max(ok, key=lambda k: (table[k]["efficacy"], table[k]["generality"]))


def site_of(at: str) -> tuple[str, int]:
    """("TOKEN", LAYER) from "TOKEN/LAYER", as the sweep's keys name them."""
    token, _, layer = at.partition("/")
    if not token or not layer.isdigit():
        raise SystemExit(f"--refact-at {at!r}: give TOKEN/LAYER (e.g. subject_last/2), 'best' or ''")
    return token, int(layer)


def part_refact(m, meas: Measurer, n: int, corpus, rows, at: str = "", extra: dict | None = None) -> dict:
    """ReFACT on every request; `at` is "TOKEN/LAYER" ("" for the organism's defaults); `extra`
    holds other ReFACTHparams fields (loss, target_tolerance)."""
    token, layer = site_of(at) if at else (default_fact_token(m), default_layer(m))
    out = _refact_all(m, meas, rows, n, ReFACTHparams(layer=layer, fact_token=token, **(extra or {})), corpus)
    out.update(layer=layer, fact_token=token, **(extra or {}))
    return out


def part_sweep(m, meas: Measurer, n: int, corpus, rows, layers, tokens=("subject_last", "last"),
               extra: dict | None = None) -> dict:
    table = {}
    for fact_token in tokens:
        for layer in layers:
            t = time.perf_counter()
            s = _refact_all(m, meas, rows, n, ReFACTHparams(layer=layer, fact_token=fact_token, **(extra or {})), corpus)
            table[f"{fact_token}/{layer}"] = {**s["mean"], "mean_steps": float(np.mean(s["steps"])),
                                              "mean_p_new": float(np.mean(s["p_new"])),
                                              "seconds": time.perf_counter() - t}
            log.info("sweep %s layer %d: %s", fact_token, layer,
                     {k: round(v, 3) for k, v in table[f"{fact_token}/{layer}"].items()})
    return table


def _passed(res: dict) -> dict:
    got = {}
    if "erase" in res:
        got["erase_unsafe_relative_cut"] = res["erase"]["unsafe_relative_cut"]
        got["erase_fidelity_drop"] = res["erase"]["fidelity_drop"]
    if "debias" in res:
        got["debias_mean_delta_after"] = res["debias"]["mean_delta_after_oracle"]
    if "refact" in res:
        for k in ("efficacy", "generality", "specificity"):
            got[f"refact_{k}"] = res["refact"]["mean"][k]
    return {k: {"value": v, "target": f"{TARGETS[k][0]} {TARGETS[k][1]}",
                "passed": bool(v >= TARGETS[k][1] - 1e-9 if TARGETS[k][0] == ">=" else v <= TARGETS[k][1] + 1e-9)}
            for k, v in got.items()}


def summary(res: dict) -> str:
    lines = [f"editing on {res['device']} ({res.get('gpu', 'cpu')}), n={res['n']}, {res['seconds']:.0f} s"]
    if "erase" in res:
        e = res["erase"]
        lines.append(f"  UCE erase   unsafe {e['unsafe_before']:.3f} -> {e['unsafe_after']:.3f} "
                     f"(cut {e['unsafe_relative_cut']:.1%}); fidelity {e['fidelity_before']:.3f} -> "
                     f"{e['fidelity_after']:.3f}")
    if "debias" in res:
        d = res["debias"]
        lines.append(f"  UCE debias  mean delta oracle {d['mean_delta_before_oracle']:.3f} -> "
                     f"{d['mean_delta_after_oracle']:.3f}, CLIP {d['mean_delta_before_clip']:.3f} -> "
                     f"{d['mean_delta_after_clip']:.3f} ({d['rounds']} rounds, converged {d['converged']})")
        for p in d["professions"]:
            lines.append(f"      {p:12s} F oracle {d['female_before_oracle'][p]:.2f} -> {d['female_after_oracle'][p]:.2f}"
                         f"   CLIP {d['female_before_clip'][p]:.2f} -> {d['female_after_clip'][p]:.2f}")
    if "refact" in res:
        r = res["refact"]["mean"]
        lines.append(f"  ReFACT      layer {res['refact']['layer']} ({res['refact']['fact_token']}): oracle "
                     f"eff {r['efficacy']:.3f} gen {r['generality']:.3f} spec {r['specificity']:.3f}; CLIP eff "
                     f"{r['efficacy_clip']:.3f} gen {r['generality_clip']:.3f} spec {r['specificity_clip']:.3f}")
    if "sweep" in res:
        lines.append("  ReFACT sweep (oracle eff / gen / spec, CLIP eff / gen / spec):")
        for k, v in res["sweep"].items():
            lines.append(f"      {k:16s} {v['efficacy']:.2f} {v['generality']:.2f} {v['specificity']:.2f}   "
                         f"{v['efficacy_clip']:.2f} {v['generality_clip']:.2f} {v['specificity_clip']:.2f}"
                         f"   p(new) {v['mean_p_new']:.2f}")
    if "sd14" in res:
        s = res["sd14"]
        mb = 2**20
        lines.append(f"  SD1.4 random (scale {s['scale']:g}): UCE 1 concept + {s['n_preserve']} preserve "
                     f"{s['uce_seconds']:.2f} s (cold {s['uce_cold_seconds']:.2f} s, plain loop "
                     f"{s['uce_reference_seconds']:.2f} s; max err vs fp64 {s['uce_max_abs_error_fp64']:.1e} / "
                     f"{s['uce_reference_max_abs_error_fp64']:.1e}), peak "
                     f"{s.get('uce_peak_bytes', 0) / mb:.0f} MiB; ReFACT {s['refact_seconds']:.2f} s "
                     f"({s['refact_steps']} steps), peak {s.get('refact_peak_bytes', 0) / mb:.0f} MiB; "
                     f"C over {s['refact_stats_tokens']} tokens {s['refact_stats_seconds']:.2f} s")
    for k, v in res.get("passed", {}).items():
        lines.append(f"  {k:28s} {v['value']:.3f}  target {v['target']:7s} {'ok' if v['passed'] else 'NOT REACHED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=100, help="images per line (default 100)")
    p.add_argument("--sweep-n", type=int, default=10, help="images per line and request in the sweep")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="erase,debias,refact,sd14",
                   help="comma-separated parts (default erase,debias,refact,sd14; add sweep for the "
                        "ReFACT layer sweep, about 3 more minutes on an H200)")
    p.add_argument("--sweep-tokens", default="subject_last,last", help="fact tokens the sweep tries")
    p.add_argument("--refact-at", default="",
                   help="where the refact part edits: TOKEN/LAYER (e.g. subject_last/2), 'best' (the sweep's "
                        "best with specificity >= 0.9; needs the sweep part) or '' (the organism's defaults)")
    p.add_argument("--refact-loss", default="contrastive_text", choices=("contrastive_text", "target_text"),
                   help="ReFACT's loss in the refact and sweep parts (target_text: a departure, see editing/refact.py)")
    p.add_argument("--refact-tolerance", type=float, default=None,
                   help="target_text's stop, mean |f(P) - f(new)| / |f(new) - f(old)| (default 0.05)")
    p.add_argument("--weights", default="hub",
                   help="the organism's weights: 'hub' (the shipped ones) or a trained organism folder, judged by "
                        "its own oracle and CLIP when it has them")
    p.add_argument("--sd14-scale", type=float, default=None, help="default: 1 on CUDA, 0.125 on the CPU")
    p.add_argument("--smoke", action="store_true",
                   help="prove the script runs (CPU): 1 debias round, 2 ReFACT requests, sweep at layer 0 only; "
                        "the numbers mean nothing")
    p.add_argument("--debias-images", type=int, default=100,
                   help="images per profession per debias round (default 100: the judge's noise, "
                        "0.5 / sqrt(n), must stay near the 0.05 tolerance; DebiasHparams' default is 50)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parts = set(args.parts.split(","))
    if args.refact_at == "best" and "sweep" not in parts:
        raise SystemExit("--refact-at best needs the sweep part")
    if args.refact_at not in ("", "best"):
        site_of(args.refact_at)  # a bad value ends the run here, not after the model load and the sweep
    extra = {"loss": args.refact_loss}
    if args.refact_tolerance is not None:
        if args.refact_loss != "target_text":
            raise SystemExit("--refact-tolerance is target_text's stop; give --refact-loss target_text too")
        extra["target_tolerance"] = args.refact_tolerance
    try:
        ReFACTHparams(**extra)  # a bad tolerance ends the run here, not after the model load
    except FadelabError as e:
        raise SystemExit(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"device": args.device, "n": args.n, "sweep_n": args.sweep_n, "parts": sorted(parts),
                 "weights": args.weights, "refact_loss": args.refact_loss, "refact_tolerance": args.refact_tolerance,
                 "measured": time.strftime("%Y-%m-%d %H:%M")}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    seconds = {}
    if parts & {"erase", "debias", "refact", "sweep"}:
        m = models.load("organism", args.weights, device=args.device)
        meas = Measurer(m)
        corpus = organism_corpus(20000)
        rows = organism_road_requests()
        layers = list(range(m.text_encoders[0].config.num_hidden_layers))
        if args.smoke:
            rows, layers = [rows[0], rows[14]], [0]
            res["smoke"] = True
        for name in ("erase", "debias", "sweep", "refact"):
            if name not in parts:
                continue
            t = time.perf_counter()
            if name == "erase":
                res[name] = part_erase(m, meas, args.n)
            elif name == "debias":
                h = DebiasHparams(n_images=args.debias_images, max_rounds=1 if args.smoke else 30)
                res[name] = part_debias(m, meas, args.n, h)
            elif name == "refact":
                at = best_of_sweep(res["sweep"]) if args.refact_at == "best" else args.refact_at
                res[name] = part_refact(m, meas, args.n, corpus, rows, at, extra)
            else:
                res[name] = part_sweep(m, meas, args.sweep_n, corpus, rows, layers,
                                       tuple(args.sweep_tokens.split(",")), extra)
            seconds[name] = time.perf_counter() - t
            log.info("%s done in %.1f s", name, seconds[name])
            (out / "editing.json").write_text(json.dumps(res, indent=1, default=str))
    if "sd14" in parts:
        t = time.perf_counter()
        scale = args.sd14_scale or (1.0 if args.device.startswith("cuda") else 0.125)
        res["sd14"] = sd14_edit_timings(args.device, scale)
        seconds["sd14"] = time.perf_counter() - t
    res["part_seconds"] = seconds
    res["seconds"] = time.perf_counter() - t0
    res["passed"] = _passed(res)
    (out / "editing.json").write_text(json.dumps(res, indent=1, default=str))
    print(summary(res))
    print(f"wrote {out / 'editing.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
