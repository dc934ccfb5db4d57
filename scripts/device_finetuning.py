"""Fine-tuning acceptance (issues 4 and 11) on one GPU: every method on the organism, judged by the
oracle, and the SD1.4-architecture step benchmark. Writes OUT/finetuning.json, prints a summary.

    python3 scripts/device_finetuning.py --out $OUT [--n 200]            one H100/H200, under 6 minutes
    python3 scripts/device_finetuning.py --out $OUT --parts sd14,sweep   the benchmark and the sweep alone
    python3 scripts/device_finetuning.py --out /tmp/ft --quick --device cpu   the same code, tiny sizes
    python3 scripts/device_finetuning.py --out $OUT --parts organism --methods textual_inversion,full
                         only these organism runs: the style runs first, then the subject runs in the
                         order given (each saved to finetuning.json as it lands)

Organism part (the defaults of finetuning.hparams.ORGANISM):
    base                 style share of n content prompts on the base model (the floor)
    full, lora-unet      style share ("ink", read by the oracle) of n content prompts (target >= 0.5),
                         with content fidelity and the style share at half and all of the steps
    lora-text, dora-text style share reached by text-encoder-only adapters (reported, no target)
    dreambooth           per subject: subject share of "a sks <class>" (target >= 0.8) and class
                         share of "a <class>" (target >= 0.9), n images each over the subjects
    textual_inversion    per subject: subject share of "a <sks> <class>" (target >= 0.7); for the
                         first subject, whether n prompts without the token give bit-identical images
SD1.4 part (finetuning.bench.step_benchmark): 512 px, batch 8, bf16 autocast; lab UNet LoRA step
vs the recipe-style step (VAE + text encoder every step), interleaved in the same run (target
ratio >= 1.2); full fine-tuning step time and peak memory.
Sweep part, while --budget-s allows: full at lr 3e-5 and 3e-4, UNet LoRA at 3e-4 and 3e-3, so a
default that misses its target comes with the setting to change it to.

Organism steps are launch-bound on a GPU (about 0.1 s per step at batch 32 on an H200, as at
batch 1,024), so the organism runs use few steps and large batches.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {"full": 0.5, "lora-unet": 0.5, "dreambooth_subject": 0.8, "dreambooth_class": 0.9,
           "textual_inversion_subject": 0.7, "sd14_lora_speedup": 1.2}
QUICK = {"steps": 3, "batch_size": 4, "lr_scheduler": "constant", "warmup_steps": 0}


def content_share(model, oracle, n: int, seed: int, **gen) -> tuple[dict, np.ndarray]:
    """Style share ("ink") and content fidelity of n organism content prompts, and the images."""
    from models.organism import prompts as P
    from models.organism.sample import generate

    probes = P.fidelity_prompts(n, seed)
    images = generate(model.pipe, [p.prompt for p in probes], [p.seed for p in probes], progress=False, **gen)
    read = oracle.read(images)
    ink = float(np.mean([s == "ink" for s in read["style"]]))
    content = [all(read[h][i] == v for h, v in p.expect.items() if h != "style") for i, p in enumerate(probes)]
    return {"style_share": ink, "content_fidelity": float(np.mean(content)), "n": n}, images


def subject_shares(model, oracle, subject: str, cls: str, n: int, token: str, seed: int, **gen) -> dict:
    from models.organism.sample import generate

    subj = generate(model.pipe, [f"a {token} {cls}"] * n, list(range(seed, seed + n)), progress=False, **gen)
    plain = generate(model.pipe, [f"a {cls}"] * n, list(range(seed + 50_000, seed + 50_000 + n)), progress=False,
                     **gen)
    rs, rp = oracle.read(subj), oracle.read(plain)
    return {"subject_share": float(np.mean([s == subject for s in rs["subject"]])),
            "class_share_on_plain": float(np.mean([c == cls for c in rp["cls"]])),
            "subject_share_on_plain": float(np.mean([s == subject for s in rp["subject"]])), "n": n}


def subject_run(model, oracle, folder, subject: str, cls: str, hp, n: int, adapter_dir, gen: dict,
                also=None) -> dict:
    """Train DreamBooth (token "sks", weights) or textual inversion (a new token) on one subject's
    folder; subject and class shares of n images each (subject_shares) and the training seconds.
    also(): more entries measured while the textual-inversion token is loaded."""
    from finetuning import placeholder, train
    from finetuning.lora_io import load_textual_inversion
    from models import apply_delta

    ti = hp.method == "textual-inversion"
    r = train(model, folder, hp, seed=0, progress=False, adapter_dir=adapter_dir if ti else None)
    if not ti:
        with apply_delta(model, r.delta):
            shares = subject_shares(model, oracle, subject, cls, n, "sks", seed=7000, **gen)
    else:
        token, embeds = load_textual_inversion(r.adapter)
        with placeholder(model, token, embeds):
            shares = subject_shares(model, oracle, subject, cls, n, token, seed=7000, **gen)
            if also is not None:
                shares.update(also())
    shares["train_seconds"] = r.info["seconds"]
    return shares


def style_run(model, oracle, style, hp, n: int, gen: dict, adapter_dir) -> dict:
    """Fine-tune on the style set; style share and content fidelity of n content prompts, and the
    style share at the half-way checkpoint (n / 4 prompts)."""
    from finetuning import hparams as H
    from finetuning import train
    from models import apply_delta

    r = train(model, style, hp, seed=0, checkpoint_every=max(1, hp.steps // 2), progress=False,
              adapter_dir=adapter_dir)
    with apply_delta(model, r.delta):
        share, _ = content_share(model, oracle, n, seed=100, **gen)
    curve = {}
    for step, d in r.checkpoints[:-1]:  # the fading-curve machinery, on the fine-tune itself
        with apply_delta(model, d):
            curve[step] = content_share(model, oracle, max(8, n // 4), seed=300, **gen)[0]["style_share"]
    return {**share, "steps": hp.steps, "batch_size": hp.batch_size, "lr": hp.lr,
            "train_seconds": r.info["seconds"], "step_seconds": r.info["step_seconds"],
            "loss_first": float(r.loss[0]), "loss_last": float(r.loss[-20:].mean()),
            "style_share_by_checkpoint": curve, "hparams": H.to_dict(hp)}


def _load(device: str, weights: str = "hub"):
    """The organism from `weights` ("hub": the shipped one, or a retrained folder) and the oracle
    that judges it: the folder's own when it has one (models.organism.nets.oracle_dir)."""
    import models
    from models.families import ORGANISM_DIR
    from models.organism.nets import oracle_dir
    from models.organism.oracle import Oracle

    return (models.load("organism", weights, device=device),
            Oracle.load(oracle_dir(weights) or ORGANISM_DIR / "oracle", device))


def _style_set(out: Path, quick: bool) -> Path:
    from models.organism import data as D

    folder = out / "data" / "style"
    if not (folder / "metadata.jsonl").is_file():
        D.write_style_set(folder, n=48 if quick else 1200, seed=0)
    return folder


#: the organism part's style runs: name -> (method, extra hyperparameters)
STYLE_RUNS = {"full": ("full", {}), "lora-unet": ("lora", {"target": "unet"}),
              "lora-text": ("lora", {"target": "text"}), "dora-text": ("dora", {"target": "text"})}
SUBJECT_RUNS = ("dreambooth", "textual_inversion")
#: all of the organism part's runs, in their default order
ORGANISM_RUNS = (*STYLE_RUNS, *SUBJECT_RUNS)


def organism_part(out: Path, n: int, device: str, quick: bool, subjects: list[str], log,
                  methods: list[str] | None = None, save=lambda res: None, weights: str = "hub") -> dict:
    from finetuning import hparams as H
    from models.organism import data as D

    res: dict = {}
    t0 = time.perf_counter()
    style = _style_set(out, quick)
    db = D.write_dreambooth(out / "data" / "dreambooth", per_subject=5, seed=0)
    res["data_seconds"] = round(time.perf_counter() - t0, 1)
    model, oracle = _load(device, weights)
    gen = {"steps": 4} if quick else {}
    tiny = QUICK if quick else {}
    res["base"], base_images = content_share(model, oracle, n, seed=100, **gen)
    log(f"base: {res['base']}")

    order = methods or list(ORGANISM_RUNS)
    for name, (method, extra) in STYLE_RUNS.items():
        if name not in order:
            continue
        res[name] = style_run(model, oracle, style, H.defaults(method, "organism", **extra, **tiny), n, gen,
                              out / "adapters" / name if method != "full" else None)
        log(f"{name}: style {res[name]['style_share']:.3f} content {res[name]['content_fidelity']:.3f} "
            f"({res[name]['train_seconds']:.0f}s train)")
        save(res)

    per = max(1, -(-n // len(subjects)))
    index = json.loads((db / "subjects.json").read_text())
    for name in [m for m in order if m in SUBJECT_RUNS]:
        method = name.replace("_", "-")
        res[name] = {}
        for sub in subjects:
            cls = index[sub]["class"]
            extra = {"num_class_images": 4, "class_steps": 4} if quick and method == "dreambooth" else {}
            hp = H.defaults(method, "organism", **tiny, **extra)
            # n token-free prompts against the base images, once (textual inversion only)
            also = (lambda: {"other_prompts_bit_identical": _images_equal(model, base_images, n, gen)}) \
                if sub == subjects[0] else None
            shares = subject_run(model, oracle, db / sub, sub, cls, hp, per, out / "adapters" / f"{name}-{sub}",
                                 gen, also)
            shares.update(steps=hp.steps, lr=hp.lr)
            res[name][sub] = shares
            log(f"{name} {sub}: subject {shares['subject_share']:.3f} class-on-plain "
                f"{shares['class_share_on_plain']:.3f} ({shares['train_seconds']:.0f}s train)")
        res[name]["mean_subject_share"] = float(np.mean([res[name][s]["subject_share"] for s in subjects]))
        res[name]["mean_class_share_on_plain"] = float(np.mean([res[name][s]["class_share_on_plain"]
                                                                for s in subjects]))
        save(res)
    res["base_repeat_bit_identical"] = _images_equal(model, base_images, n, gen)
    res["classes"] = {s: index[s]["class"] for s in subjects}
    return res


def sweep_part(out: Path, n: int, device: str, quick: bool, log, stop_at: float, weights: str = "hub") -> dict:
    """Style share at settings other than the defaults, while time is left: what to set if a
    default misses its target."""
    from finetuning import hparams as H

    style = _style_set(out, quick)
    model, oracle = _load(device, weights)
    gen = {"steps": 4} if quick else {}
    res = {}
    for name, method, extra, lr in (("lora-unet", "lora", {"target": "unet"}, 3e-3),
                                    ("lora-unet", "lora", {"target": "unet"}, 3e-4),
                                    ("full", "full", {}, 3e-5), ("full", "full", {}, 3e-4)):
        key = f"{name}@{lr:g}"
        if time.perf_counter() > stop_at:
            res[key] = "skipped: out of time"
            continue
        hp = H.defaults(method, "organism", **{**extra, **(QUICK if quick else {}), "lr": lr})
        r = style_run(model, oracle, style, hp, n, gen, None)
        res[key] = {k: r[k] for k in ("style_share", "content_fidelity", "style_share_by_checkpoint", "train_seconds")}
        log(f"sweep {key}: style {r['style_share']:.3f} content {r['content_fidelity']:.3f}")
    return res


def runs_part(out: Path, spec: list[dict], n: int, device: str, log, stop_at: float,
              weights: str = "hub") -> dict:
    """Settings given as data (--runs FILE.json): each entry {"name", "method", "hparams": {...}}
    plus "subjects": [...] for dreambooth / textual-inversion (subject and class shares) or none
    for the style methods (style share, content fidelity). Entries after --budget-s are skipped."""
    from finetuning import hparams as H
    from models.organism import data as D

    style = _style_set(out, False)
    db = out / "data" / "dreambooth"
    if not (db / "subjects.json").is_file():
        D.write_dreambooth(db, per_subject=5, seed=0)
    index = json.loads((db / "subjects.json").read_text())
    model, oracle = _load(device, weights)
    res = {}
    for entry in spec:
        name, method = entry["name"], entry["method"]
        if time.perf_counter() > stop_at:
            res[name] = "skipped: out of time"
            continue
        hp = H.defaults(method, "organism", **entry.get("hparams", {}))
        if not entry.get("subjects"):
            r = style_run(model, oracle, style, hp, n, {}, None)
            res[name] = {k: r[k] for k in ("style_share", "content_fidelity", "style_share_by_checkpoint",
                                           "train_seconds", "step_seconds", "hparams")}
            log(f"run {name}: style {r['style_share']:.3f} content {r['content_fidelity']:.3f} "
                f"({r['train_seconds']:.1f}s)")
            continue
        per = max(1, -(-n // len(entry["subjects"])))
        res[name] = {"hparams": H.to_dict(hp)}
        for sub in entry["subjects"]:
            cls = index[sub]["class"]
            res[name][sub] = subject_run(model, oracle, db / sub, sub, cls, hp, per,
                                         out / "adapters" / f"{name}-{sub}", {})
        subs = entry["subjects"]
        res[name]["mean_subject_share"] = float(np.mean([res[name][s]["subject_share"] for s in subs]))
        res[name]["mean_class_share_on_plain"] = float(np.mean([res[name][s]["class_share_on_plain"] for s in subs]))
        each = ", ".join(f"{s} {res[name][s]['subject_share']:.2f}" for s in subs)
        log(f"run {name}: subject {res[name]['mean_subject_share']:.3f} class "
            f"{res[name]['mean_class_share_on_plain']:.3f} ({each})")
    return res


def _images_equal(model, reference: np.ndarray, n: int, gen: dict) -> bool:
    from models.organism import prompts as P
    from models.organism.sample import generate

    probes = P.fidelity_prompts(n, 100)
    again = generate(model.pipe, [p.prompt for p in probes], [p.seed for p in probes], progress=False, **gen)
    return bool(np.array_equal(again, reference))


def verdicts(res: dict) -> dict:
    org, sd = res.get("organism", {}), res.get("sd14", {})
    got = {
        "full": org.get("full", {}).get("style_share"),
        "lora-unet": org.get("lora-unet", {}).get("style_share"),
        "dreambooth_subject": org.get("dreambooth", {}).get("mean_subject_share"),
        "dreambooth_class": org.get("dreambooth", {}).get("mean_class_share_on_plain"),
        "textual_inversion_subject": org.get("textual_inversion", {}).get("mean_subject_share"),
        "sd14_lora_speedup": sd.get("lora_speedup"),
    }
    return {k: {"value": v, "target": TARGETS[k], "pass": None if v is None else v >= TARGETS[k]}
            for k, v in got.items()}


def summary(res: dict) -> str:
    lines = ["fine-tuning acceptance" + (" (QUICK: sizes too small to mean anything)" if res["quick"] else "")]
    for k, v in res["verdicts"].items():
        val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
        mark = "ok" if v["pass"] else ("NOT REACHED" if v["pass"] is False else "")
        lines.append(f"  {k:28s} {val:>7s}  target >= {v['target']:<4}  {mark}")
    org = res.get("organism", {})
    for name in ("full", "lora-unet", "lora-text", "dora-text"):
        if name in org:
            lines.append(f"  {name:12s} style {org[name]['style_share']:.3f}  content fidelity "
                         f"{org[name]['content_fidelity']:.3f}  (base content {org['base']['content_fidelity']:.3f})")
    if "textual_inversion" in org:
        same = [v["other_prompts_bit_identical"] for v in org["textual_inversion"].values()
                if isinstance(v, dict) and "other_prompts_bit_identical" in v]
        lines.append(f"  textual inversion, prompts without the token bit-identical: {same} (base repeated: "
                     f"{org.get('base_repeat_bit_identical')})")
    if "sd14" in res:
        sd = res["sd14"]
        lines.append(f"  sd14 lab LoRA {sd['lab_lora']['step_seconds']:.4f} s/step, recipe "
                     f"{sd['recipe_lora']['step_seconds']:.4f} s/step, full {sd['full']['step_seconds']:.4f} s/step, "
                     f"full peak {sd['full']['peak_memory_gib']} GiB")
    for key, v in res.get("sweep", {}).items():
        lines.append(f"  sweep {key}: {v if isinstance(v, str) else {k: v[k] for k in ('style_share', 'content_fidelity')}}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=200, help="images per measurement (default 200)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", default="organism,sd14,sweep")
    p.add_argument("--subjects", default="dog1,cat1,cup1,robot1")
    p.add_argument("--methods", default=None,
                   help="organism part: only these comma-separated runs; style runs first, then subject runs in "
                        "the order given (default full,lora-unet,lora-text,dora-text,dreambooth,textual_inversion)")
    p.add_argument("--budget-s", type=float, default=320, help="no sweep run starts after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check that everything runs)")
    p.add_argument("--runs", default=None, help="JSON file of settings for the runs part (see runs_part)")
    p.add_argument("--weights", default="hub",
                   help="the organism's folder for the organism, runs and sweep parts (default: the shipped one; "
                        "a retrained folder is judged by its own oracle when it has one)")
    args = p.parse_args(argv)
    if args.weights != "hub" and not (Path(args.weights) / "model_index.json").is_file():
        p.error(f"--weights {args.weights}: no organism folder there (no model_index.json)")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    res: dict = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                 "n": args.n, "quick": args.quick, "date": time.strftime("%Y-%m-%d"), "weights": args.weights}
    parts = args.parts.split(",")
    methods = args.methods.split(",") if args.methods else None
    for name in methods or ():
        if name not in ORGANISM_RUNS:
            p.error(f"unknown --methods entry {name!r}; accepted: {', '.join(ORGANISM_RUNS)}")

    def save() -> None:
        res["verdicts"] = verdicts(res)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "finetuning.json").write_text(json.dumps(res, indent=1, default=str))

    if "organism" in parts:
        def keep(org: dict) -> None:  # each run saved as it lands: a call killed at its limit keeps them
            res["organism"] = org
            save()

        res["organism"] = organism_part(out, args.n, args.device, args.quick, args.subjects.split(","), log,
                                        methods, keep, args.weights)
        save()  # a later part that runs out of time keeps this one
    if "sd14" in parts:
        from finetuning.bench import step_benchmark

        kw = dict(steps=5, scale=0.125, resolution=64, batch=2, n_images=4, repeats=1) if args.quick else {}
        res["sd14"] = step_benchmark(args.device, **kw)
        log(f"sd14: {json.dumps({k: v for k, v in res['sd14'].items() if k != 'device'})}")
        save()
    if "runs" in parts:
        res["runs"] = runs_part(out, json.loads(Path(args.runs).read_text()), args.n, args.device, log,
                                t0 + args.budget_s, args.weights)
        save()
    if "sweep" in parts:
        res["sweep"] = sweep_part(out, args.n, args.device, args.quick, log, t0 + args.budget_s, args.weights)
    save()
    print("\n" + summary(res))
    print(f"wrote {out / 'finetuning.json'} in {res['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
