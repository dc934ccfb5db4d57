"""The `fadelab` command line.

    fadelab run                      the main job on the organism (grows with later issues)
    fadelab generate PROMPT ...      images for prompts x seeds, from any family
    fadelab organism train           train the organism (GPU; resumable stage by stage)
    fadelab organism card            the organism's acceptance card (stored, or measured live)
    fadelab organism data KIND       write the style set, DreamBooth subjects or RoAD requests

Errors a user can cause print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("fadelab")


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from models.errors import FadelabError

        raise FadelabError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return name


def _jobs(args, device: str, family: str) -> int:
    """--jobs N, or "auto" (runner.auto_jobs; 1 for a Slurm array, a --shard or a queue child)."""
    from fadelab import runner
    from models.errors import FadelabError

    if args.jobs == "auto":
        if args.shard is not None or args.queue is not None or args.launcher == "slurm":
            return 1
        return runner.auto_jobs(device, family)
    try:
        jobs = int(args.jobs)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise FadelabError(f"--jobs {args.jobs!r}: give a positive number of processes or 'auto'")
    return jobs


def _parse_seeds(text: str) -> list[int]:
    from models.errors import FadelabError

    try:
        if "-" in text and "," not in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FadelabError(f"--seeds {text!r}: give integers like '0,1,2' or a range like '0-7'") from None


def cmd_run(args) -> int:
    from fadelab import runner
    from fadelab.grid import load_experiment, merge, parse_shard

    out = Path(args.out)
    device = _device(args.device)
    parse_shard(args.shard)
    smoke = True if args.smoke else None
    exp = load_experiment(args.config, smoke=smoke)  # bad configs fail here, before any process starts
    jobs = _jobs(args, device, exp.family)
    if args.launcher == "slurm":
        runner.run_slurm(args.config, out, jobs, device, cluster=args.cluster,
                         slurm={"slurm_partition": args.partition} if args.partition else None,
                         smoke=smoke)
    elif jobs > 1:
        results = runner.run_local_jobs(args.config, out, jobs, device, smoke=smoke, progress=not args.quiet,
                                        mps=args.mps)
        line = runner.startup_line(results)
        if line:
            print(line, file=sys.stderr)
    else:
        summary = runner.run_cells(args.config, out, shard=args.shard, device=device,
                                   progress=not args.quiet, smoke=smoke, queue=args.queue)
        if args.shard is not None or args.queue is not None or args.no_report:
            print(json.dumps(summary))
            return 0
    if args.no_report:
        return 0
    store = merge(load_experiment(args.config, smoke=smoke), out)
    from analysis.report import write_report

    report = write_report(store, out)
    print(f"store:  {store}\nreport: {report}")
    return 0


def cmd_generate(args) -> int:
    from fadelab.runner import generate_images

    seeds = _parse_seeds(args.seeds)
    paths = generate_images(args.prompts, seeds, family=args.family, weights=args.weights,
                            out=Path(args.out), device=_device(args.device), steps=args.steps,
                            guidance=args.guidance, scale=args.scale)
    print(f"wrote {len(paths) - 1} images and a grid to {args.out}")
    return 0


def cmd_organism_train(args) -> int:
    from models.organism.train import STAGES, TrainConfig, train

    for flag, value in (("--p-look", args.p_look), ("--pad-noise", args.pad_noise)):
        if not 0.0 <= value <= 1.0:
            from models.errors import FadelabError

            raise FadelabError(f"{flag} {value}: give a share between 0 and 1")
    try:
        drop = tuple(float(x) for x in args.clip_attn_drop.split(","))
    except ValueError:
        drop = (-1.0,)
    if not all(0.0 <= x <= 0.9 for x in drop):
        from models.errors import FadelabError

        raise FadelabError(f"--clip-attn-drop {args.clip_attn_drop}: give a share between 0 and 0.9, or one "
                           f"per text layer, comma-separated")
    drop = drop[0] if len(drop) == 1 else drop
    for flag, value in (("--unet-batch", args.unet_batch), ("--unet-lr", args.unet_lr)):
        if not value > 0:
            from models.errors import FadelabError

            raise FadelabError(f"{flag} {value}: give a positive number")
    if args.unet_init and not Path(args.unet_init).is_dir():
        from models.errors import FadelabError

        raise FadelabError(f"--unet-init {args.unet_init}: no such folder (give a trained organism folder or its unet/)")
    if args.smoke:  # every stage for a few steps: checks a machine, not a model
        cfg = TrainConfig(seed=args.seed, n_base=2000, n_ink=400, n_oracle=600, vae_steps=3,
                          vae_batch=8, clip_steps=3, clip_batch=64, oracle_steps=3, oracle_batch=64,
                          unet_steps=3, unet_batch=32, card_n=4, workers=2, p_look=args.p_look,
                          unet_init=args.unet_init,
                          pad_noise=args.pad_noise, clip_attn_drop=drop)
    else:
        cfg = TrainConfig(seed=args.seed, unet_steps=args.unet_steps, unet_minutes=args.unet_minutes,
                          unet_init=args.unet_init, unet_batch=args.unet_batch, unet_lr=args.unet_lr,
                          unet_compile=args.unet_compile,
                          workers=args.workers, p_look=args.p_look, pad_noise=args.pad_noise,
                          clip_attn_drop=drop)
    from models.organism.nets import VAE_LEVELS, sizes_for_vae_levels

    if args.vae_levels not in VAE_LEVELS:
        from models.errors import FadelabError

        side = {n: sizes_for_vae_levels(n).latent_size for n in VAE_LEVELS}
        raise FadelabError(f"--vae-levels {args.vae_levels}: accepted {', '.join(map(str, VAE_LEVELS))} "
                           f"({', '.join(f'{n}: {k}x{k} latents' for n, k in side.items())})")
    ocfg = sizes_for_vae_levels(args.vae_levels)
    if isinstance(drop, tuple) and len(drop) != ocfg.text_layers:
        from models.errors import FadelabError

        raise FadelabError(f"--clip-attn-drop {args.clip_attn_drop}: {len(drop)} shares for {ocfg.text_layers} "
                           f"text layers; give one share, or one per layer")
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    meta = train(Path(args.out), cfg, stages=stages, ocfg=ocfg, device=_device(args.device))
    print(json.dumps({k: meta[k] for k in ("seconds", "unet_steps_done") if k in meta}))
    return 0


def cmd_organism_card(args) -> int:
    from models.organism import card as card_mod
    from models.organism.nets import WEIGHTS_DIR

    folder = Path(args.weights) if args.weights else WEIGHTS_DIR
    if args.n is not None:
        if args.n < 1:
            from models.errors import FadelabError

            raise FadelabError(f"--n {args.n}: give a positive number of images per line")
        card = card_mod.measure(folder, n=args.n, device=_device(args.device), progress=not args.json)
    else:
        path = folder / "card.json"
        if not path.exists():
            from models.errors import FadelabError

            raise FadelabError(f"{path} does not exist: train the organism first "
                               f"(fadelab organism train) or pass --n N to measure live")
        card = json.loads(path.read_text())
    if args.json:
        print(json.dumps(card))
        return 0
    print(f"organism card ({card.get('n')} images per line, {card.get('device')}, "
          f"{card.get('measured', '?')})")
    for key, (op, thr) in card_mod.THRESHOLDS.items():
        ok = card["passed"][key] if "passed" in card else None
        print(f"  {key:24s} {card[key]:6.3f}   target {op} {thr:<5}  {'ok' if ok else 'NOT REACHED'}")
    if "bias" in card:
        print("  profession     stated F  generated F  stated delta  generated delta")
        for p, b in card["bias"].items():
            print(f"  {p:14s} {b['stated_female_share']:8.2f}  {b['generated_female_share']:11.2f}"
                  f"  {b['stated_delta']:12.2f}  {b['generated_delta']:15.2f}")
    return 0


def cmd_organism_data(args) -> int:
    from models.organism import data, prompts

    out = Path(args.out)
    if args.kind == "style":
        data.write_style_set(out, n=args.n or 1200, seed=args.seed)
    elif args.kind == "dreambooth":
        data.write_dreambooth(out, per_subject=args.n or 5, seed=args.seed)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_road_csv(out)
    print(f"wrote {args.kind} data to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fadelab", description=(
        "Do edits of text-to-image models survive fine-tuning, and why? "
        "Runs on the lab's own trained model organism by default."))
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="the main job: the study's grid, on the organism by default",
                       description="Run every cell of an experiment (edits x fine-tunes, behaviour, "
                                   "probes, causal tests), join the cell stores into OUT/experiment.h5 "
                                   "and write OUT/report.html. Finished cells are never recomputed, so "
                                   "an interrupted run resumes.")
    r.add_argument("config", nargs="?", default=None,
                   help="experiment TOML, or a shipped name: organism (default), organism-study, "
                        "sd14, sdxl, flux-schnell")
    r.add_argument("--out", default="fadelab-out", help="output folder (default ./fadelab-out)")
    r.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    r.add_argument("--shard", default=None, help="run only slice i/n of the cells (e.g. 0/4)")
    r.add_argument("--jobs", default="auto",
                   help="processes side by side (local: sharing one queue of cells, round robin over the GPUs; "
                        "slurm: array size); auto (default): 1 on the CPU; on GPUs one per GPU, for the organism up to 8 per GPU")
    r.add_argument("--mps", choices=("auto", "on", "off"), default="auto",
                   help="run local processes that share a GPU as clients of a private CUDA MPS daemon, so their "
                        "kernels run side by side; auto (default): when processes share a GPU and "
                        "nvidia-cuda-mps-control is on PATH")
    r.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local processes (default) or a Slurm job array through submitit")
    r.add_argument("--queue", default=None, help=argparse.SUPPRESS)  # run_local_jobs' shared queue folder
    r.add_argument("--cluster", default=None, help=argparse.SUPPRESS)  # submitit executor (tests: local)
    r.add_argument("--partition", default=None, help="Slurm partition for --launcher slurm")
    r.add_argument("--no-report", action="store_true", help="run cells only; no merge, no report")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--smoke", action="store_true",
                   help="apply the config's [smoke] table: random weights, tiny sizes, few steps "
                        "(proves the grid executes; numbers mean nothing)")
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("generate", help="generate images for prompts x seeds",
                       description="Generate one image per prompt and seed and save PNGs plus a grid.")
    g.add_argument("prompts", nargs="+", help="one or more prompts")
    g.add_argument("--seeds", default="0-3", help="seeds: '0,1,2' or '0-7' (default 0-3)")
    g.add_argument("--family", default="organism",
                   help="organism (default), sd14, sdxl, flux-schnell, or a local diffusers folder")
    g.add_argument("--weights", default=None,
                   help="hub, random, or a local folder (default: the family's own)")
    g.add_argument("--scale", type=float, default=1.0, help="width scale for random builds")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (organism default 20)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--out", default="fadelab-out/generate", help="output folder")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    g.set_defaults(func=cmd_generate)

    o = sub.add_parser("organism", help="the lab's trained model organism").add_subparsers(
        dest="organism_command", required=True)
    t = o.add_parser("train", help="train the organism (GPU, about 15 minutes on one H100)",
                     description="Train VAE, CLIP, oracle and UNet, then measure the card. A stage "
                                 "whose output exists in --out is skipped, so an interrupted run resumes.")
    from models.organism.nets import WEIGHTS_DIR

    t.add_argument("--out", default=str(WEIGHTS_DIR), help=f"pipeline folder (default {WEIGHTS_DIR})")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--stages", default=None, help="comma-separated subset of vae,clip,oracle,unet,card")
    t.add_argument("--unet-steps", type=int, default=None,
                   help="fix the UNet's steps (default: train for --unet-minutes)")
    t.add_argument("--unet-minutes", type=float, default=7.0, help="UNet time budget (default 7)")
    t.add_argument("--unet-init", default=None, metavar="FOLDER",
                   help="start the unet stage from this trained UNet (a pipeline folder or its unet/) "
                        "instead of random weights; the learning-rate schedule restarts, so a UNet trains "
                        "on across device calls (scripts/device_organism_retrain.sh U)")
    t.add_argument("--unet-batch", type=int, default=1024, help="UNet batch (default 1024)")
    t.add_argument("--unet-lr", type=float, default=6e-4,
                   help="UNet peak learning rate (default 6e-4; warm-up, then cosine to 10%%)")
    t.add_argument("--unet-compile", action="store_true",
                   help="train the UNet through torch.compile (scripts/device_unet_speed_probe.py measures it)")
    t.add_argument("--workers", type=int, default=8, help="rendering processes")
    t.add_argument("--p-look", type=float, default=0.0,
                   help="share of dog/cat/cup/robot scenes drawn with a named colour and pattern "
                        "(default 0, the shipped organism; at 0.5 the VAE's 16x16 latents still lose the "
                        "patterns, so textual inversion cannot reach the subjects: docs/organism.md)")
    t.add_argument("--pad-noise", type=float, default=0.0,
                   help="share of UNet samples whose padding rows are replaced (clean or another "
                        "caption's), so the UNet reads prompts from their tokens as SD1.x's does "
                        "(default 0, the shipped organism)")
    t.add_argument("--clip-attn-drop", default="0",
                   help="share of samples whose text-tower attention output is dropped, per layer, while "
                        "the CLIP trains (stochastic depth, at most 0.9, or one share per layer comma-separated; "
                        "default 0, the shipped organism), so "
                        "<eos> reads the subject in later layers too and ReFACT at the subject's token has "
                        "something to move")
    t.add_argument("--vae-levels", type=int, default=3,
                   help="VAE levels: 3 gives 16x16 latents (default, the shipped organism), 2 gives 32x32 "
                        "latents, which begin to keep the subjects' 4-pixel patterns that 16x16 loses (a short "
                        "CPU probe, docs/organism.md); the UNet then gains a plain 32x32 level in front of "
                        "its attention levels (a step costs about 1.1 times the shipped one)")
    t.add_argument("--device", default="auto")
    t.add_argument("--smoke", action="store_true", help="a few steps of every stage (checks a machine)")
    t.set_defaults(func=cmd_organism_train)

    c = o.add_parser("card", help="the organism's acceptance card",
                     description="Print the stored card, or with --n N measure it live on N images "
                                 "per line with the oracle.")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--n", type=int, default=None, help="measure live on N images per line")
    c.add_argument("--weights", default=None, help="organism folder (default: the shipped one)")
    c.add_argument("--device", default="auto")
    c.set_defaults(func=cmd_organism_card)

    d = o.add_parser("data", help="write the organism's datasets",
                     description="style: the fine-tuning set (imagefolder + metadata.jsonl, 1,200 "
                                 "images); dreambooth: one folder per subject; road: the organism's "
                                 "RoAD-schema edit requests as CSV.")
    d.add_argument("kind", choices=("style", "dreambooth", "road"))
    d.add_argument("--out", required=True, help="folder (style, dreambooth) or CSV path (road)")
    d.add_argument("--n", type=int, default=None, help="images (style) or images per subject")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_organism_data)

    import importlib

    from fadelab.commands import MODULES

    for name in MODULES:
        importlib.import_module(f"fadelab.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "organism" else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    from models.errors import FadelabError

    errors: tuple[type[BaseException], ...] = (FadelabError, FileNotFoundError)
    from analysis.stats import StatsError
    from store import StoreError

    errors += (StoreError, StatsError)
    try:
        return args.func(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
