"""The benchmarks of issue 8 on a GPU machine, in parts that fit one device call each.

    python3 scripts/device_bench.py --parts gen,train --out $OUT            one GPU
    python3 -m accelerate.commands.launch --num_processes 2 scripts/device_bench.py \\
        --parts multigpu --out $OUT                                         two GPUs

Parts (each writes its rows to $OUT/bench_<parts>.json and $OUT/benchmarks.md, and prints the
table last):
    gen          SD1.4 512 px, 25 steps, batch 8, CFG 7.5: models.fastgen vs a stock
                 StableDiffusionPipeline call (images/s, MFU, compile time)          ~3 min
    gen-options  the same, one row per fastgen option set (--options picks some)   ~1.5 min each
    sdxl         SDXL 1024 px, 25 steps, batch 4 (two copies, interleaved)          ~4 min
    flux         FLUX-schnell 1024 px, 4 steps, batch 4 (one copy: stock first)     ~4 min
    train        reference UNet training steps (full; UNet frozen) at batch 8       ~1 min
    record       store recorder vs the disk (1,000 prompts, writes ~5 GiB)          ~1 min
    hooks        editing / finetuning / probes benchmark modules, if they exist
    ft-families  one fine-tuning step (full, LoRA) of SDXL (1024 px) and FLUX-schnell, peak memory
    fam-edit-record  SDXL and FLUX-schnell: one UCE erase, one ReFACT (SDXL), one recording pass
                 (100 prompts' text-encoder fc2 inputs into a store), peak memory
    estimate     GPU-hours of the study's grid from the rates of this call and --rows
    multigpu     data-parallel generation, N processes vs the main one alone (accelerate launch)

Parts after the time budget (--budget-s, default 450 s of this process) are skipped with a
line saying so. The inductor cache starts empty (compile times are cold) unless --warm-cache.
Merge the JSON files into docs/benchmarks.md here with
    fadelab bench --rows bench_gen.json bench_train.json ... [--only gpu-hours]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTS = ("gen", "gen-options", "sdxl", "flux", "train", "record", "hooks", "ft-families", "fam-edit-record",
         "estimate", "multigpu")


def options() -> dict:
    """The fastgen option sets the gen-options part compares (in this order)."""
    from models.fastgen import FastGenConfig as C

    return {
        "eager-nchw": C(channels_last=False, cudnn_benchmark=False),
        "eager": C(),
        "regional": C(compile="regional"),
        "full": C(compile="full"),
        "full+vae": C(compile="full", compile_vae=True),
        "full+vae-cudagraphs": C(compile="full", compile_vae=True, compile_mode="reduce-overhead"),
        "full+vae-1x1mm": C(compile="full", compile_vae=True, conv_1x1_as_mm=True),
        "full+vae-autotune": C(compile="full", compile_vae=True, compile_mode="max-autotune-no-cudagraphs"),
        "full+vae-autotune-gemm": C(compile="full", compile_vae=True, compile_mode="max-autotune-no-cudagraphs",
                                    autotune_convs=False),
        "full+vae-1x1mm-cudagraphs": C(compile="full", compile_vae=True, conv_1x1_as_mm=True,
                                       compile_mode="reduce-overhead"),
        "full+vae-cdt": C(compile="full", compile_vae=True, coordinate_descent=True),
        "full+vae-1x1mm-cdt": C(compile="full", compile_vae=True, conv_1x1_as_mm=True, coordinate_descent=True),
    }


DEFAULT_CONV_BACKENDS = None  # inductor's max_autotune_conv_backends, read at the first reset


def reset_compiler() -> None:
    """Forget compiled graphs and the process-wide inductor flag between measurements (dynamo's
    cache limit would otherwise let a later model run eagerly)."""
    import torch
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    global DEFAULT_CONV_BACKENDS
    inductor_config.conv_1x1_as_mm = False
    inductor_config.coordinate_descent_tuning = False
    if DEFAULT_CONV_BACKENDS is None:
        DEFAULT_CONV_BACKENDS = inductor_config.max_autotune_conv_backends
    inductor_config.max_autotune_conv_backends = DEFAULT_CONV_BACKENDS
    torch.cuda.empty_cache()


def gen_options(args, bench, device: str, keep=lambda rows: None) -> list:
    setting = gen_setting(args, bench, "generation")
    chosen = options()
    names = args.options.split(",") if args.options else list(chosen)
    unknown = [n for n in names if n not in chosen]
    if unknown:
        raise SystemExit(f"unknown option sets {unknown}; known: {list(chosen)}")
    rows, stock, flops, t_start = [], None, None, time.time()
    for name in names:
        if time.time() - T0 > args.budget_s:
            print(f"skipped option set {name}: time budget of {args.budget_s} s spent", flush=True)
            continue
        reset_compiler()
        m = bench.measure_generation(setting, device, chosen[name], stock=stock, flops=flops)
        stock, flops = m["stock"], m["flops"]
        r = bench.generation_rows(setting, device, chosen[name], name="generation options", measured=m)
        r[0].benchmark += f": {name}"
        r[0].extra.pop("rates")  # the estimate prices the headline configuration only
        r[2].benchmark += f": {name}"
        rows += [r[0], r[2]]
        keep(rows)
        print(f"{name}: {r[0].fadelab:.3f} vs stock {r[0].baseline:.3f} images/s, first batch {r[2].fadelab:.1f} s"
              f" ({time.time() - t_start:.0f} s so far)", flush=True)
        del m
    return rows


def gen_setting(args, bench, name: str):
    """bench.SETTINGS[name], CPU-sized with --quick, with --batches timed batches per side."""
    setting = bench.SETTINGS[name].quick() if args.quick else bench.SETTINGS[name]
    return replace(setting, batches=args.batches) if args.batches else setting


def config_for(args, part: str):
    from fadelab import bench
    from models.fastgen import FastGenConfig

    if args.config:
        return FastGenConfig.from_file(args.config)
    cfg = bench.default_fastgen()
    if part == "flux":  # regional compilation: the 57 transformer blocks compile as two graphs
        cfg = replace(cfg, compile="regional")
    return replace(cfg, compile=args.compile) if args.compile else cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", required=True, help=f"comma-separated: {','.join(PARTS)}")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--quick", action="store_true", help="narrow models, tiny sizes (checks the script)")
    p.add_argument("--device", default=None, help="default: cuda if visible, else cpu")
    p.add_argument("--config", default=None, help="FastGenConfig TOML/JSON for gen, sdxl, flux, multigpu")
    p.add_argument("--compile", default=None, choices=("none", "regional", "full"), help="override compile")
    p.add_argument("--options", default=None, help="gen-options: comma-separated option sets")
    p.add_argument("--batches", type=int, default=None,
                   help="gen, gen-options, sdxl, flux: timed batches per side (default: the setting's)")
    p.add_argument("--hooks", default=None, help="hooks: comma-separated subset of edit,finetune,probe")
    p.add_argument("--rows", nargs="*", default=[], help="JSON rows from earlier calls (for estimate)")
    p.add_argument("--images-per-process", type=int, default=48, help="multigpu: images per process")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip parts that would start after this")
    p.add_argument("--warm-cache", action="store_true", help="keep the inductor cache between calls")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"unknown parts {bad}; known: {', '.join(PARTS)}")
    if args.batches is not None and args.batches < 1:
        p.error(f"--batches {args.batches}: give at least 1 timed batch per side")
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import logging

    import torch

    from fadelab import bench

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = [r for path in args.rows for r in bench.read_rows_json(path)]
    rows, main_process, log = [], True, []
    hooks = [h for h in (args.hooks or ",".join(bench.HOOKS)).split(",") if h]
    if unknown := [h for h in hooks if h not in bench.HOOKS]:
        p.error(f"--hooks: unknown {unknown}; known: {', '.join(bench.HOOKS)}")
    tag = "_".join(parts).replace("-", "")

    def save(rows: list, log: list) -> None:
        """Write the rows so far (after every part: a call cut off at its limit keeps them)."""
        if not main_process:
            return
        for path, text in ((out / f"bench_{tag}.json", json.dumps(
                {"rows": bench.rows_to_json(rows), "parts": parts, "log": log, "quick": args.quick,
                 "torch": torch.__version__, "seconds": time.time() - T0}, indent=1, default=str)),
                           (out / f"benchmarks_{tag}.md", bench.render(rows))):
            path.with_suffix(".tmp").write_text(text)
            os.replace(path.with_suffix(".tmp"), path)  # a kill mid-write leaves the last whole file

    if device == "cuda":
        print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for part in parts:
        if time.time() - T0 > args.budget_s:
            log.append(f"{part}: skipped, time budget of {args.budget_s} s spent")
            print(log[-1], flush=True)
            continue
        t = time.time()
        if device == "cuda":
            reset_compiler()
        if part in ("gen", "sdxl", "flux"):
            name = {"gen": "generation"}.get(part, part)
            setting = gen_setting(args, bench, name)
            rows += bench.generation_rows(setting, device, config_for(args, part), name="generation")
        elif part == "gen-options":
            rows += gen_options(args, bench, device, keep=lambda new: save(rows + new, log))
        elif part == "train":
            rows += bench.train_step_rows(device, args.quick)
        elif part == "record":
            scratch = ROOT / "scratch"
            scratch.mkdir(exist_ok=True)
            rows += bench.record_rows(device, args.quick, directory=scratch)
        elif part == "hooks":
            for hook in hooks:
                rows += bench.hook_rows(hook, device, args.quick)
                save(rows, log + [f"hooks {hook}: done"])
        elif part == "ft-families":
            rows += bench.BENCHMARKS["finetune-families"](device, args.quick)
        elif part == "fam-edit-record":
            scratch = ROOT / "scratch"
            scratch.mkdir(exist_ok=True)
            rows += bench.family_edit_record_rows(device, args.quick, directory=scratch)
        elif part == "estimate":
            rows += bench.gpu_hours_rows(prior + rows)
        elif part == "multigpu":
            from accelerate import PartialState

            state = PartialState(cpu=device == "cpu")
            main_process = state.is_main_process
            setting = gen_setting(args, bench, "generation")
            rows += bench.data_parallel_rows(setting, config_for(args, part), state=state,
                                             images_per_process=args.images_per_process)
        log.append(f"{part}: {time.time() - t:.0f} s")
        print(log[-1], flush=True)
        save(rows, log)
    if main_process:
        print(bench.render(rows), flush=True)
    return 0


T0 = time.time()

if __name__ == "__main__":
    sys.exit(main())
