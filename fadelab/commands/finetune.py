"""`fadelab finetune METHOD --data DIR`: one fine-tuning run from the command line.

    fadelab finetune lora --data style/ --set target=unet --set rank=8 --steps 400 --out ft/
    fadelab finetune textual-inversion --data db/dog1 --store exp.h5 --ft-id ti-dog1
    fadelab finetune full --data style/ --base exp.h5:M_ed/debias     (fine-tune an edited model)

Writes under --out: result.json (summary, info, loss curve), adapter/ (LoRA in diffusers' format,
or learned_embeds.safetensors), state/ (resume state when --checkpoint-every is set; a rerun with
the same arguments resumes), and with --store the final delta (variant M_ft/<ft-id>, or
M_ed_ft/<edit>/<ft-id> with --base), every checkpoint delta and the loss curve.

Also offers save_to_store(result, path, ft_id, variant), used by the command and by scripts.
"""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path

log = logging.getLogger(__name__)


def _value(text: str):
    """A --set value: a TOML literal (8, 1e-4, true, "x", ["a", "b"]), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict:
    from models.errors import FadelabError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FadelabError(f"--set {pair!r}: give KEY=VALUE, e.g. --set rank=8")
        out[key.strip()] = _value(value.strip())
    return out


def _base_delta(spec: str):
    """STORE.h5:VARIANT -> the variant's final WeightDelta read from the store."""
    from models import WeightDelta
    from models.errors import FadelabError
    from store import Store

    path, sep, variant = spec.rpartition(":")
    if not sep or not path:
        raise FadelabError(f"--base {spec!r}: give STORE.h5:VARIANT, e.g. exp.h5:M_ed/debias")
    with Store.open(path, "r") as st:
        sites = st.sites(variant)
        if not sites:
            raise FadelabError(f"--base {spec!r}: the store has no final delta for variant {variant!r}; "
                               f"it has {', '.join(st.variants()) or 'none'}")
        deltas = {s: st.read_delta(variant, s) for s in sites}
    return WeightDelta(deltas, {"method": "store", "store": str(path), "variant": variant}), variant


def save_to_store(result, path: Path | str, ft_id: str, variant: str | None = None) -> str:
    """Write a FineTuneResult into an HDF5 store: the final delta and every checkpoint delta under
    `variant` (default M_ft/<ft_id>), and the loss curve under /loss/<ft_id>. Entries already
    complete are kept (a rerun resumes). Returns the variant."""
    import numpy as np

    from store import Store

    variant = variant or f"M_ft/{ft_id}"
    attrs = {"method": result.method, "hparams": result.info.get("hparams", {}), "seed": result.info.get("seed")}
    with Store.open(path, "a") as st:
        for step, delta in [(None, result.delta), *result.checkpoints]:
            for site in delta.sites():
                st.require_delta(variant, site, delta.deltas[site], step=step, attrs=attrs)
        if not st.is_complete(f"/loss/{ft_id}"):
            st.create_loss(ft_id, np.arange(1, len(result.loss) + 1), {"loss": result.loss},
                           attrs={"variant": variant, **attrs})
    return variant


def cmd_finetune(args) -> int:
    import models
    from fadelab.cli import _device
    from finetuning import hparams as H
    from finetuning import train

    family = args.family
    weights = args.weights or "hub"
    values = _overrides(args.set or [])
    if args.steps is not None:
        values["steps"] = args.steps
    if args.hparams:
        from_file = H.load(args.hparams, family)
        if from_file.method != args.method:
            from models.errors import FadelabError

            raise FadelabError(f"--hparams {args.hparams} is for method {from_file.method!r}, not {args.method!r}")
        values = {**{k: v for k, v in H.to_dict(from_file).items() if k != "method"}, **values}
    hp = H.defaults(args.method, family, **values)
    out = Path(args.out or f"fadelab-out/finetune/{args.method}")
    base, parent = (None, None)
    if args.base:
        base, parent = _base_delta(args.base)
    device = _device(args.device)
    if device.startswith("cuda"):  # under `accelerate launch`: this process's own GPU
        from finetuning import process_device

        device = str(process_device())
    model = models.load(family, weights, scale=args.scale, device=device)
    sites = [s for s in args.checkpoint_sites.split(",") if s] if args.checkpoint_sites else None
    result = train(model, args.data, hp, base_delta=base, seed=args.seed, checkpoint_every=args.checkpoint_every,
                   checkpoint_sites=sites, state_dir=out / "state" if args.checkpoint_every else None,
                   adapter_dir=out / "adapter", progress=not args.quiet)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    summary = result.summary()
    out.mkdir(parents=True, exist_ok=True)
    info = {k: v for k, v in result.info.items() if k != "initial_embeds"}
    (out / "result.json").write_text(json.dumps({"summary": summary, "info": info,
                                                 "loss": result.loss.tolist()}, indent=1, default=str))
    if args.store:
        ft_id = args.ft_id or args.method
        variant = f"M_ed_ft/{parent.split('/', 1)[-1]}/{ft_id}" if parent else None
        variant = save_to_store(result, args.store, ft_id, variant)
        print(f"store:   {args.store} variant {variant}")
    print(f"{args.method}: {summary['steps']} steps, loss {summary['loss_first']:.4f} -> "
          f"{summary['loss_last20']:.4f} (last 20), |dW| {summary['delta_norm']:.4g} over "
          f"{summary['delta_sites']} sites, {summary.get('seconds', 0):.1f}s")
    print(f"results: {out / 'result.json'}")
    if summary["adapter"]:
        print(f"adapter: {summary['adapter']}")
    return 0


def register(sub) -> None:
    """Add `fadelab finetune` to the `fadelab` parser."""
    from finetuning.hparams import METHODS

    f = sub.add_parser(
        "finetune", help="fine-tune a model (full, lora, dora, dreambooth, textual-inversion)",
        description="Fine-tune a model on an imagefolder (metadata.jsonl with file_name and text) with one "
                    "of the lab's five methods; defaults are the diffusers recipes at SD scale and the "
                    "documented organism defaults for the organism (docs/finetuning.md). "
                    "Data-parallel: accelerate launch --num_processes N -m fadelab.cli finetune ...")
    f.add_argument("method", choices=tuple(METHODS))
    f.add_argument("--data", required=True, help="imagefolder with metadata.jsonl (a DreamBooth subject folder "
                                                 "for dreambooth and textual-inversion)")
    f.add_argument("--family", default="organism", help="organism (default), sd14, sdxl, flux-schnell or a local diffusers folder")
    f.add_argument("--weights", default=None, help="hub, random, or a local folder (default: the family's own)")
    f.add_argument("--scale", type=float, default=1.0, help="width scale for --weights random")
    f.add_argument("--hparams", default=None, help="TOML or JSON file with method = ... and any fields")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one hparam (repeatable), "
                                                                       "e.g. --set rank=8 --set target=unet")
    f.add_argument("--steps", type=int, default=None, help="optimizer steps (shortcut for --set steps=N)")
    f.add_argument("--base", default=None, metavar="STORE.h5:VARIANT",
                   help="fine-tune on top of this stored edit (e.g. exp.h5:M_ed/debias)")
    f.add_argument("--out", default=None, help="output folder (default fadelab-out/finetune/<method>)")
    f.add_argument("--store", default=None, help="HDF5 store to write the deltas and the loss curve into")
    f.add_argument("--ft-id", default=None, help="fine-tune id in the store (default: the method)")
    f.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint delta every K steps (0: none)")
    f.add_argument("--checkpoint-sites", default=None, help="comma-separated globs for checkpoint deltas")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_finetune)
