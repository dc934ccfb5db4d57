"""`fadelab edit ...`: UCE and ReFACT edits from the command line, saved into an HDF5 store.

    fadelab edit uce-erase bloody naked --preserve "an apple" --out exp.h5 --edit-id erase
    fadelab edit uce-moderate bloody naked --out exp.h5
    fadelab edit uce-replace apple=lemon --out exp.h5
    fadelab edit uce-debias ceo teacher --judge oracle --out exp.h5 --edit-id debias
    fadelab edit refact --prompt "the mayor" --new "tess lark" --old "mira holt" --out exp.h5
    fadelab edit refact-stats --site text.mlp.7.fc2 --corpus captions.txt --stats-out c.safetensors

Every edit command writes the delta (variant M_ed/<edit-id>, one entry per site), the edit's keys
(/edit_keys/<edit-id>/...) and prints one summary line; --json prints the result's info instead.
Common options: --family, --weights, --scale, --device, --hparams FILE (TOML/JSON).

Also offers save_to_store(result, path, edit_id) -> variant, used by the command and by scripts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ID = re.compile(r"[A-Za-z0-9_.+=,:-]+")


def save_to_store(result, path: Path | str, edit_id: str) -> str:
    """Write an EditResult into the store at `path`: the delta under variant M_ed/<edit_id> (dense
    or (B, A) per site; attrs method, request, hparams, info) and every key with
    create_edit_key(edit_id, name, value, site=...). Never overwrites (StoreError if it exists).
    Returns the variant."""
    from store import Store

    variant = f"M_ed/{edit_id}"
    info = {k: v for k, v in result.info.items() if k != "history"}
    attrs = {"method": result.method, "edit_id": edit_id, "request": result.request,
             "hparams": result.hparams_dict(), "info": info}
    with Store.open(path, "a") as st:
        for site in result.sites():
            st.create_delta(variant, site, result.delta.deltas[site], attrs=attrs)
        for name, site, value in result.key_entries():
            st.create_edit_key(edit_id, name, value, site=site, attrs={"method": result.method})
    return variant


def _model(args):
    import models
    from fadelab.cli import _device

    weights = args.weights or ("random" if args.scale != 1.0 else "hub")
    return models.load(args.family, weights, scale=args.scale, device=_device(args.device))


def _lines(values: list[str] | None, file: str | None) -> list[str]:
    out = list(values or [])
    if file:
        from models.errors import FadelabError

        path = Path(file)
        if not path.is_file():
            raise FadelabError(f"--preserve-file {file}: no such file (one prompt per line)")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return out


def _finish(args, result) -> int:
    from models.errors import FadelabError

    edit_id = args.edit_id or result.method
    if not ID.fullmatch(edit_id):
        raise FadelabError(f"--edit-id {edit_id!r}: use letters, digits and _ . + = , : -")
    variant = save_to_store(result, args.out, edit_id) if args.out else None
    if args.json:
        print(json.dumps({"method": result.method, "request": result.request, "info": result.info,
                          "store": args.out, "variant": variant}, default=str))
        return 0
    print(result.summary())
    if variant:
        print(f"store:   {args.out} variant {variant}, keys /edit_keys/{edit_id}")
    return 0


def cmd_uce(args) -> int:
    from editing import UCEHparams, load_hparams, uce_erase, uce_moderate, uce_replace
    from editing.text import check_concepts
    from models.errors import FadelabError

    h = load_hparams(UCEHparams, args.hparams)
    preserve = _lines(args.preserve, args.preserve_file)
    concepts, guides = list(args.concepts), None
    if args.task == "uce-replace":
        pairs = [c.partition("=") for c in args.concepts]
        bad = [c for c, sep, g in pairs if not sep]
        if bad:
            raise FadelabError(f"uce-replace {bad[0]!r}: give CONCEPT=GUIDE pairs, e.g. apple=lemon")
        concepts, guides = [c for c, _, _ in pairs], [g for _, _, g in pairs]
    check_concepts(args.family, concepts)  # before the (slow) model load
    model = _model(args)
    if args.task == "uce-erase":
        result = uce_erase(model, concepts, h, guide=args.guide, preserve=preserve)
    elif args.task == "uce-moderate":
        result = uce_moderate(model, concepts, h)
    else:
        result = uce_replace(model, concepts, guides, h, preserve=preserve)
    return _finish(args, result)


def _judge(spec: str, device: str, weights=None):
    """--judge's judge; the organism's from `weights` (--weights) when that folder has its own
    oracle and CLIP (models.organism.nets.judges_folder), else the shipped ones."""
    from editing import OrganismClip, open_clip_judge, oracle_judge
    from models.errors import FadelabError
    from models.organism.nets import judges_folder

    if spec == "oracle":
        return oracle_judge(judges_folder(weights), device=device)
    if spec == "clip":
        return OrganismClip(judges_folder(weights), device=device).judge()
    if spec.startswith("open_clip:"):
        _, path, *arch = spec.split(":", 2)
        return open_clip_judge(path, arch[0] if arch else "ViT-B-32", device=device)
    raise FadelabError(f"--judge {spec!r}: accepted are oracle, clip (the organism's) and open_clip:PATH[:ARCH]")


def cmd_debias(args) -> int:
    from editing import DebiasHparams, load_hparams, uce_debias

    from editing.text import check_concepts
    from fadelab.cli import _device

    h = load_hparams(DebiasHparams, args.hparams)
    check_concepts(args.family, args.professions, "profession")
    judge = _judge(args.judge, _device(args.device), args.weights)
    model = _model(args)
    result = uce_debias(model, args.professions, judge, h, preserve=_lines(args.preserve, args.preserve_file),
                        progress=not args.json)
    return _finish(args, result)


def cmd_refact(args) -> int:
    from editing import ReFACTHparams, load_hparams, refact

    h = load_hparams(ReFACTHparams, args.hparams)
    if args.layer is not None:
        import dataclasses

        h = dataclasses.replace(h, layer=args.layer)
    model = _model(args)
    request = {"prompt": args.prompt, "subject": args.subject, "new": args.new, "old": args.old}
    result = refact(model, request, h, stats=args.stats)
    return _finish(args, result)


def cmd_refact_stats(args) -> int:
    from editing import organism_corpus, save_stats, second_moment
    from models.errors import FadelabError

    model = _model(args)
    if args.corpus == "organism":
        texts, corpus = organism_corpus(args.n or 20000, args.seed), f"organism captions (n={args.n or 20000})"
    else:
        path = Path(args.corpus)
        if not path.is_file():
            raise FadelabError(f"--corpus {args.corpus}: no such file (one text per line), or 'organism'")
        texts = [t.strip() for t in path.read_text().splitlines() if t.strip()][:args.n or None]
        corpus = f"{path.name} ({len(texts)} texts)"
    stats = second_moment(model, args.site, texts, progress=True)
    out = save_stats(stats, args.stats_out, args.site, corpus)
    print(f"C at {args.site}: {stats.count} tokens from {corpus} -> {out}")
    return 0


def _common(p, store: bool = True) -> None:
    p.add_argument("--family", default="organism", help="organism (default), sd14, sdxl, flux-schnell, or a folder")
    p.add_argument("--weights", default=None, help="hub, random, or a local folder (default: the family's own)")
    p.add_argument("--scale", type=float, default=1.0, help="width scale for --weights random")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    if store:
        p.add_argument("--hparams", default=None, help="TOML or JSON hparams file (docs/editing.md)")
        p.add_argument("--out", default=None, help="HDF5 store to write the delta and keys into")
        p.add_argument("--edit-id", default=None, help="id in the store (default: the method)")
        p.add_argument("--json", action="store_true", help="print the result's info as one JSON object")


def register(sub) -> None:
    """Add `fadelab edit` and its sub-commands to the `fadelab` parser."""
    e = sub.add_parser("edit", help="edit a model: UCE (erase, moderate, replace, debias) or ReFACT",
                       description="Edits are exact weight deltas (docs/editing.md); they are written "
                                   "into an HDF5 store with --out.").add_subparsers(dest="edit_command", required=True)
    for task, text in (("uce-erase", "erase concepts (towards --guide, default the empty prompt)"),
                       ("uce-moderate", "erase unsafe concepts towards the empty prompt"),
                       ("uce-replace", "replace CONCEPT=GUIDE pairs")):
        p = e.add_parser(task, help=text, description=f"UCE: {text}.")
        p.add_argument("concepts", nargs="+", help="concepts (uce-replace: CONCEPT=GUIDE pairs)")
        if task == "uce-erase":
            p.add_argument("--guide", default="", help="the guide concept (default: the empty prompt)")
        if task != "uce-moderate":
            p.add_argument("--preserve", nargs="*", default=[], help="prompts to preserve")
            p.add_argument("--preserve-file", default=None, help="file with one prompt to preserve per line")
        _common(p)
        p.set_defaults(func=cmd_uce, task=task, preserve=None, preserve_file=None)
    d = e.add_parser("uce-debias", help="debias professions (female/male) with a judge",
                     description="UCE's iterative debiasing: generate, judge, move v*, until every "
                                 "profession is within the tolerance (or max_rounds).")
    d.add_argument("professions", nargs="+")
    d.add_argument("--judge", default="oracle", help="oracle (organism), clip (organism) or open_clip:PATH[:ARCH]")
    d.add_argument("--preserve", nargs="*", default=[], help="prompts to preserve")
    d.add_argument("--preserve-file", default=None, help="file with one prompt to preserve per line")
    _common(d)
    d.set_defaults(func=cmd_debias)
    r = e.add_parser("refact", help="ReFACT: make the subject of --prompt mean --new instead of --old")
    r.add_argument("--prompt", required=True)
    r.add_argument("--subject", default=None, help="the edited subject inside --prompt (default: the prompt)")
    r.add_argument("--new", required=True)
    r.add_argument("--old", required=True)
    r.add_argument("--layer", type=int, default=None, help="edited layer (default: the family's)")
    r.add_argument("--stats", default=None, help="statistics file for C (organism: computed when omitted)")
    _common(r)
    r.set_defaults(func=cmd_refact)
    s = e.add_parser("refact-stats", help="compute ReFACT's statistic C for one site",
                     description="C = mean k k^T of the fc2 inputs at --site over a corpus (one text per line).")
    s.add_argument("--site", required=True, help="e.g. text.mlp.7.fc2 (text2.mlp.<L>.fc2 on SDXL)")
    s.add_argument("--corpus", default="organism", help="a text file, or 'organism' (its captions)")
    s.add_argument("--n", type=int, default=None, help="use at most N texts")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stats-out", required=True, help="output .safetensors file")
    _common(s, store=False)
    s.set_defaults(func=cmd_refact_stats)
