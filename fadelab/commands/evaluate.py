"""`fadelab evaluate`, `fadelab annotate`, `fadelab agreement`: behavioural evaluation commands.

    fadelab evaluate STORE [--variants M,M_ed/e1,...] [--suites road,profession,unsafe,quality]
                           [--judges oracle,clip-organism,open-clip,nudenet,safety-checker]
    fadelab annotate STORE [--images unsafe] [--port 8765]
    fadelab agreement STORE [--images unsafe] [--write] [--json]

Variants other than M take their delta from the store (/deltas/<variant>/final, every site),
read as the variant's full offset from the base weights M. The handlers parse arguments and
call probes.behaviour; everything else lives there.
"""

from __future__ import annotations

import json
from pathlib import Path

JUDGES = ("oracle", "clip-organism", "open-clip", "nudenet", "safety-checker")


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _variant_deltas(st, names):
    from models import WeightDelta
    from models.errors import FadelabError

    out = {}
    for name in names:
        if name == "M":
            out[name] = None
            continue
        sites = st.sites(name)
        if not sites:
            raise FadelabError(f"variant {name!r} has no delta in the store; it has "
                               f"{', '.join(st.variants()) or 'none'} (and M)")
        delta = WeightDelta({s: st.read_delta(name, s) for s in sites},
                            {"variant": name, "store": str(st.path)})
        parts = name.split("/")
        if parts[0] == "M_ed_ft" and len(parts) == 3:
            # the grid stores M_ed_ft's own update dW_ft; its weights are M + dW_ed + dW_ft
            edit = f"M_ed/{parts[1]}"
            if st.sites(edit):
                delta = WeightDelta({s: st.read_delta(edit, s) for s in st.sites(edit)}) + delta
        out[name] = delta
    return out


def _judges(names, args, organism: bool, device: str):
    from models.errors import FadelabError
    from models.organism.nets import judges_folder, oracle_dir
    from probes.behaviour import judges as J

    own = args.weights if organism else None  # a retrained organism folder's own oracle and CLIP

    out = []
    for name in names:
        if name == "oracle":
            if not organism:
                raise FadelabError("--judges oracle: the oracle only reads the organism's images")
            out.append(J.OracleJudge(oracle_dir(own), device=device))
        elif name == "clip-organism":
            out.append(J.OrganismClipJudge(judges_folder(own), device=device))
        elif name == "open-clip":
            out.append(J.OpenClipJudge(args.open_clip_model, args.open_clip_weights, device=device,
                                       option="--open-clip-weights"))
        elif name == "nudenet":
            out.append(J.NudeNetJudge())
        elif name == "safety-checker":
            out.append(J.SafetyCheckerJudge(args.safety_checker, device=device,
                                            option="--safety-checker"))
        else:
            raise FadelabError(f"--judges {name!r}: expected some of {', '.join(JUDGES)}")
    return out


def _reference(path: str | None):
    """FID reference: a .npz with mu and sigma, or a folder of images (resized to 299 px)."""
    if path is None:
        return None
    import numpy as np
    from PIL import Image

    from models.errors import FadelabError

    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        data = np.load(p)
        return (data["mu"], data["sigma"])
    files = sorted(f for f in p.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise FadelabError(f"--reference {path}: give a .npz with mu and sigma or a folder of images")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((299, 299), Image.BICUBIC))
                     for f in files])


def cmd_evaluate(args) -> int:
    import dataclasses

    import models
    from fadelab.cli import _device
    from models.errors import FadelabError
    from probes.behaviour import EvalConfig, benchmark_suites, evaluate, organism_suites
    from store import Store

    device = _device(args.device)
    cfg = EvalConfig.from_file(args.config) if args.config else EvalConfig()
    sizes = dataclasses.replace(cfg.sizes, **{k: v for k, v in (
        ("road_seeds", args.road_seeds), ("profession_images", args.profession_images),
        ("unsafe_prompts", args.unsafe_prompts), ("quality_prompts", args.quality_prompts))
        if v is not None})
    gen = dataclasses.replace(cfg.generation, **{k: v for k, v in (
        ("steps", args.steps), ("guidance_scale", args.guidance), ("batch_size", args.batch_size))
        if v is not None})
    cfg = dataclasses.replace(cfg, sizes=sizes, generation=gen, progress=not args.json,
                              **{k: v for k, v in (("n_boot", args.n_boot), ("drift_n", args.drift_n))
                                 if v is not None})
    organism = args.family == "organism"
    kinds = _csv(args.suites) or ["road", "profession", "unsafe", "quality"]
    rows = [int(r) for r in _csv(args.road_rows)] if args.road_rows else None
    if organism:
        from models.organism import prompts as P

        road = P.road_requests()
        suites = organism_suites(sizes, kinds=kinds, seed=cfg.seed,
                                 road_rows=[road[i] for i in rows] if rows else None)
    else:
        if not args.data:
            raise FadelabError("--data DIR: real families read the benchmarks (RoAD, profession "
                               "prompts, I2P, COCO) from a folder, e.g. ../shared/data")
        suites = benchmark_suites(args.data, sizes, kinds=kinds, road_rows=rows, seed=cfg.seed,
                                  reference=_reference(args.reference))
    judge_names = _csv(args.judges) or (["oracle", "clip-organism"] if organism else ["open-clip"])
    judges = _judges(judge_names, args, organism, device)
    features = [j for j in judges if hasattr(j, "fd_name")]
    if args.inception_weights:
        from probes.behaviour.judges import InceptionFeatures

        features.append(InceptionFeatures(args.inception_weights, device=device,
                                          option="--inception-weights"))
    model = models.load(args.family, args.weights or "hub", device=device)
    with Store.open(args.store, "a") as st:
        names = _csv(args.variants) or ["M"] + st.variants()
        variants = _variant_deltas(st, names)
        res = evaluate(model, variants, suites, judges, st, cfg, features=features)
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    print(f"{'variant':24s} {'metric':44s} {'value':>9s}  95% CI")
    for r in res.metrics:
        print(f"{r['variant']:24s} {r['name']:44s} {r['value']:9.3f}  [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    for d in res.deltas:
        acc = ", ".join(f"{s} {a:.2f}" for s, a in d["judge_accuracy"].items())
        print(f"Delta {d['from']} -> {d['to']}: {d['name']} {d['value']:+.3f} "
              f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" + (f"  (judge accuracy {acc})" if acc else ""))
    return 0


def cmd_annotate(args) -> int:
    from probes.behaviour.annotate import serve

    server = serve(args.store, images=args.images, variants=_csv(args.variants), host=args.host,
                   port=args.port, seed=args.seed)
    print(f"annotating {len(server.items)} images of '{args.images}' at {server.url} "
          "(Ctrl-C to stop; every label is saved at once)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    return 0


def cmd_agreement(args) -> int:
    from probes.behaviour.agreement import human_metrics, report
    from probes.behaviour.annotate import image_sets
    from store import Store

    with Store.open(args.store, "a" if args.write else "r") as st:
        out = report(st, args.images, _csv(args.variants), n_boot=args.n_boot)
        if args.write and out["humans"]:
            human_metrics(st, image_sets(st, args.images, _csv(args.variants)),
                          [tuple(p) for p in _pairs(out)], out["humans"], n_boot=args.n_boot,
                          write=True)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"images '{out['images']}' of {', '.join(out['variants'])}; people: "
          f"{', '.join(h[6:] for h in out['humans']) or 'none'}; judges: {', '.join(out['judges']) or 'none'}")
    if out["fleiss"]:
        f = out["fleiss"]
        print(f"Fleiss' kappa {f['kappa']:.3f} over {f['n_items']} images, {f['n_raters']} people")
    else:
        print("Fleiss' kappa: needs at least two people")
    for c in out["confusion"]:
        print(f"\n{c['judge']} (rows) vs people's majority (columns), {c['n']} images, "
              f"agreement {c['agreement']:.3f}")
        print(" " * 14 + "".join(f"{lab[:12]:>13s}" for lab in c["labels"]))
        for lab, row in zip(c["labels"], c["table"]):
            print(f"{lab[:12]:>13s} " + "".join(f"{v:13d}" for v in row))
    for r in out.get("human_metrics", []):
        print(f"{r['variant']:24s} {r['name']:40s} {r['value']:8.3f}  [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    return 0


def _pairs(out: dict):
    from probes.behaviour.run import default_pairs

    return default_pairs(out["variants"])


def register(sub) -> None:
    """Add evaluate, annotate and agreement to the `fadelab` parser."""
    e = sub.add_parser("evaluate", help="behavioural metrics of every variant, with CIs, into a store",
                       description="Generate each variant's images (deltas from the store applied "
                                   "to one base model), judge them, and store RoAD efficacy/"
                                   "generality/specificity, debias F_p and delta, unsafe label "
                                   "shares, CLIP score, Frechet distance, every Delta and Flip "
                                   "with bootstrap 95% CIs, and each judge's accuracy per style.")
    e.add_argument("store", help="experiment store (HDF5); created if missing")
    e.add_argument("--variants", help="comma-separated variants (default: M and every variant "
                                      "with a delta in the store)")
    e.add_argument("--family", default="organism", help="organism (default), sd14, sdxl, "
                                                        "flux-schnell or a local diffusers folder")
    e.add_argument("--weights", default=None, help="hub, random or a folder (default: hub)")
    e.add_argument("--suites", help="comma-separated: road, profession, unsafe, quality (default all)")
    e.add_argument("--data", help="benchmark folder for real families (RoAD_test.csv, "
                                  "profession_prompts.csv, unsafe-prompts4703.csv, coco_30k.csv)")
    e.add_argument("--road-rows", help="RoAD rows to evaluate, e.g. '0,3'")
    e.add_argument("--judges", help=f"comma-separated, of {', '.join(JUDGES)} (default: oracle,"
                                    "clip-organism on the organism, open-clip otherwise)")
    e.add_argument("--open-clip-model", default="ViT-B-32", help="open_clip architecture")
    e.add_argument("--open-clip-weights", help="local open_clip checkpoint file")
    e.add_argument("--safety-checker", help="folder with the SD safety checker's weights")
    e.add_argument("--inception-weights", help="local pt_inception-2015-12-05 file: adds FID")
    e.add_argument("--reference", help="FID reference: folder of images or .npz with mu, sigma")
    e.add_argument("--config", help="TOML or JSON evaluation settings (EvalConfig)")
    for flag, hlp in (("--road-seeds", "seeds per RoAD prompt (study: 25)"),
                      ("--profession-images", "images per profession (study: 30)"),
                      ("--unsafe-prompts", "I2P prompts (study: 50)"),
                      ("--quality-prompts", "captions for CLIP score and FD (default 100)"),
                      ("--steps", "sampling steps"), ("--batch-size", "images per pipeline call"),
                      ("--n-boot", "bootstrap replicates (default 1000)"),
                      ("--drift-n", "organism drift scenes per task (default 200; 0: skip)")):
        e.add_argument(flag, type=int, default=None, help=hlp)
    e.add_argument("--guidance", type=float, default=None, help="guidance scale")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("annotate", help="label stored images by hand in a local web page",
                       description="Serve a page that shows the store's images one at a time; keys "
                                   "s/u/c/b label safe, unsafe, can't decide, black image. Each "
                                   "label is written to the store at once.")
    a.add_argument("store", help="experiment store with images")
    a.add_argument("--images", default="unsafe", help="image set name (default unsafe)")
    a.add_argument("--variants", help="comma-separated variants (default: all with that set)")
    a.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    a.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free)")
    a.add_argument("--seed", type=int, default=0, help="seed of the blind image order")
    a.set_defaults(func=cmd_annotate)

    g = sub.add_parser("agreement", help="Fleiss' kappa and judge-vs-human confusion tables",
                       description="Agreement among people (Fleiss' kappa), each judge against "
                                   "the people's majority label, and the unsafe metrics of the "
                                   "people's labels with bootstrap CIs.")
    g.add_argument("store", help="experiment store with labels")
    g.add_argument("--images", default="unsafe", help="image set name (default unsafe)")
    g.add_argument("--variants", help="comma-separated variants (default: all with that set)")
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates")
    g.add_argument("--write", action="store_true", help="store the people's metrics too")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_agreement)
