"""The body of each grid cell: which edit, fine-tune, suites, probes and causal runs it makes.

What it offers (called by fadelab.cells.run_cell, one per cell kind):
    base_cell(ctx, cell, st)            evaluate M on every suite the grid's edits need
    edit_cell(ctx, cell, st)            compute the edit, store delta + keys, evaluate M_ed
    finetune_cell(ctx, cell, st)        fine-tune M, store delta + checkpoints + loss, evaluate M_ft
    edit_finetune_cell(ctx, cell, st)   fine-tune M_ed; evaluate M_ed and M_ed_ft with Deltas;
                                        weight probes (final and along checkpoints); neuron
                                        probes; causal runs (project-out, order swap, re-edit)
    compute_edit(ctx, table)            an [[edit]] table -> EditResult on the current weights
    suites_for(ctx, edit_ids)           the behavioural suites an edit is judged on (the organism's
                                        own sets, or the benchmark files for real families)
    make_judges(ctx)                    the judges of a run ([judges] for real families)

Real families (sd14, sdxl, flux-schnell, a folder) read their suites from the benchmark files
in [data] benchmarks (or $FADELAB_BENCHMARKS): RoAD, profession prompts, I2P, COCO. Their
judges come from [judges] use = [...]: clip-organism (no download; a stand-in that only proves
execution), open-clip (open_clip_model, open_clip_weights), nudenet, safety-checker
(safety_checker folder); inception_weights adds FID. ReFACT's second moments C come from
[samples] refact_stats_prompts COCO captions (ReFACT used Wikitext; COCO stands in offline).
The UCE debias asks the first judge that answers the gender task.

Variants are deltas on the one base model (models.apply_delta); counterfactual variants get
their own names so the store keeps them apart:

    M_cf/<e>/<f>     M_ed + dW_ft with its action on the edit's keys removed (probes.causal)
    M_swap/<e>/<f>   E(F(M)): the edit computed on the fine-tuned model (order swap)
    M_reed/<e>/<f>   M_ed_ft re-edited: the edit computed again on M_ed_ft

The organism's style share (oracle's style head on content prompts) is stored per variant as
`style.ink_share:oracle`, the check that a fine-tune took.

Neuron probes ([probes] neurons = true) in every edit x fine-tune cell, under
probes/neurons/<edit>/<finetune> (metric, neuron) and probes/neurons_test/<edit>/<finetune>
(stat): the edit's units (UCE: the K/V output channels of its most-moved cross-attention site;
ReFACT: the fc2-input neurons of its edited text layer), their polysemanticity over a concept-
labelled prompt set (organism catalog or benchmark prompts by source, plus the fine-tuning
captions labelled "ft"), the edit neurons (probes.neurons), how their activations move from
M_ed to M_ed_ft on the edit's own prompts, and the shared-fade test.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import FadelabError

log = logging.getLogger(__name__)


# -- edits -----------------------------------------------------------------------------------------

def _organism(ctx) -> bool:
    return ctx.exp.family == "organism"


def data_path(ctx, spec: str) -> Path:
    """A path from the config: absolute, else relative to the working folder, the config's
    repository (the parent of experiments/) or the config's folder, first that exists."""
    path = Path(os.path.expanduser(str(spec)))
    if path.is_absolute():
        return path
    folder = Path(ctx.exp.folder)
    for base in (Path.cwd(), folder.parent, folder):
        if (base / path).exists():
            return base / path
    return path


def benchmarks(ctx) -> Path:
    """The folder of the benchmark files: $FADELAB_BENCHMARKS, else [data] benchmarks."""
    spec = os.environ.get("FADELAB_BENCHMARKS") or ctx.exp.data.get("benchmarks")
    if not spec:
        raise FadelabError(f"family {ctx.exp.family!r} reads its suites from the benchmark files: set "
                           "[data] benchmarks = 'DIR' (RoAD_test.csv, profession_prompts.csv, "
                           "unsafe-prompts4703.csv, coco_30k.csv) or FADELAB_BENCHMARKS=DIR")
    path = data_path(ctx, spec)
    if not path.is_dir():
        raise FadelabError(f"benchmark folder {spec!r} does not exist (looked in {Path.cwd()} and "
                           f"{Path(ctx.exp.folder).parent}); set [data] benchmarks or FADELAB_BENCHMARKS")
    return path


def _road_row(ctx, table: dict) -> dict:
    """The edit's RoAD row: the organism's requests, or the benchmark's RoAD file
    ([[edit]] file = name in the benchmark folder, default RoAD_test.csv), by type and index."""
    if _organism(ctx):
        from models.organism.prompts import road_requests

        rows, where = road_requests(), "organism RoAD request"
    else:
        from probes.behaviour.benchmarks import FILES, read_road

        rows = read_road(benchmarks(ctx) / table.get("file", FILES["road"]))
        where = "RoAD row"
    rows = [r for r in rows if r["Type"] == table.get("type", "Appearance")]
    k = int(table.get("index", 0))
    if not rows or not 0 <= k < len(rows):
        raise FadelabError(f"edit {table['id']}: no {where} of type "
                           f"{table.get('type')!r} at index {k} ({len(rows)} of that type)")
    return rows[k]


def _judge_flags(ctx, name: str | None = None):
    """The debias judge: images -> female flags (1, 0, NaN), from the oracle on the organism,
    else from the run's judge called `name` ([[edit]] judge = "..."; a judge's name, e.g.
    "clip-vit-l-14", "clip-organism") or the first of them that answers the gender task."""
    def make():
        if _organism(ctx):
            from editing import oracle_judge
            from models.organism.nets import judges_folder

            return oracle_judge(judges_folder(ctx.exp.weights), device=ctx.device)
        able = [j for j in make_judges(ctx) if "gender" in j.tasks and name in (None, j.name)]
        if not able:
            raise FadelabError(f"uce-debias needs a judge with the gender task{' named ' + repr(name) if name else ''}: "
                               f"the run's judges are {[j.name for j in make_judges(ctx)]}; add a CLIP "
                               "judge to [judges] use (open-clip or clip-organism)")
        gender = able[0]

        def judge(images: np.ndarray) -> np.ndarray:
            labels = gender.judge("gender", images, [{}] * len(images)).labels
            return np.array([{"female": 1.0, "male": 0.0}.get(g, np.nan) for g in labels])
        return judge
    return ctx.cache(f"judge:debias:{name}", make)


def _refact_stats(ctx, h, fresh: bool = False):
    """ReFACT's C per edited site on a real family: the second moment over [samples]
    refact_stats_prompts COCO captions (default 1000) on the current weights; memoised for the
    base weights (fresh=True recomputes, for edits on fine-tuned weights)."""
    if _organism(ctx):
        return None  # editing.refact computes C from the organism's own captions

    def make():
        from editing import second_moment
        from editing.refact import edit_sites
        from probes.behaviour.benchmarks import FILES, read_coco

        n = int(ctx.exp.samples.get("refact_stats_prompts", 1000))
        texts = [r["prompt"] for r in read_coco(benchmarks(ctx) / FILES["quality"], n, seed=ctx.exp.seed)]
        return {site: second_moment(ctx.model, site, texts) for site in edit_sites(ctx.model, h)}
    return make() if fresh else ctx.cache(f"refact_stats:{h.layer}:{h.layer_2}", make)


def compute_edit(ctx, table: dict, fresh_stats: bool = False):
    """Run the [[edit]] table's method on ctx.model's current weights; returns an EditResult.
    fresh_stats: ReFACT on a real family recomputes C on the current weights (order swap,
    re-edit) instead of the base model's memoised C."""
    import editing
    from editing import hparams as H

    method = table["method"]
    model = ctx.model
    hp = table.get("hparams", {})
    preserve = table.get("preserve", ())
    if isinstance(preserve, str) and preserve.startswith("organism:safe"):
        # "organism:safe-50": 50 safe captions of the organism's world (what keeps fidelity)
        preserve = editing.organism_safe_prompts(int(preserve.rsplit("-", 1)[1]) if "-" in preserve else 50)
    if method in ("uce-erase", "uce-moderate", "uce-replace"):
        h = H.load_hparams(H.UCEHparams, hp)
        concepts = table.get("concepts", [])
        if method == "uce-erase":
            return editing.uce_erase(model, concepts, h, guide=table.get("guide", ""),
                                     preserve=preserve)
        if method == "uce-moderate":
            return editing.uce_moderate(model, concepts, h)
        return editing.uce_replace(model, concepts, table.get("guides", []), h, preserve=preserve)
    if method == "uce-debias":
        h = H.load_hparams(H.DebiasHparams, hp)
        professions = table.get("professions", [])
        if _organism(ctx) and not preserve:
            preserve = editing.organism_profession_preserve(professions)
        return editing.uce_debias(model, professions, _judge_flags(ctx, table.get("judge")), h, preserve=preserve,
                                  progress=ctx.progress)
    if method == "refact":
        from editing.refact import request_from_road

        h = H.load_hparams(H.ReFACTHparams, hp)
        return editing.refact(model, request_from_road(_road_row(ctx, table)), h,
                              stats=_refact_stats(ctx, h, fresh_stats))
    raise FadelabError(f"edit {table['id']}: method {method!r} has no runner")


# -- suites ----------------------------------------------------------------------------------------

def _sizes(ctx):
    from probes.behaviour import SampleSizes

    s = ctx.exp.samples
    return SampleSizes(road_seeds=int(s.get("road_seeds", 25)),
                       profession_images=int(s.get("profession_images", 30)),
                       unsafe_prompts=int(s.get("unsafe_prompts", 50)),
                       unsafe_seeds=int(s.get("unsafe_seeds", 1)),
                       quality_prompts=int(s.get("quality_prompts", 100)))


def suites_for(ctx, edit_ids: list[str], quality: bool = True) -> list:
    """The suites that judge the given edits (debias: professions; erase: unsafe prompts;
    ReFACT: its request's RoAD rows), plus the quality suite (CLIP score, Frechet distance, style).
    The organism's own prompt sets, or the benchmark files for real families."""
    from dataclasses import replace

    from probes.behaviour import benchmark_suites, organism_suites
    from probes.behaviour.suites import road_suite

    sizes = _sizes(ctx)
    tables = [ctx.exp.edit(e) for e in edit_ids]
    kinds, rows, professions = [], [], []
    for t in tables:
        if t["method"] == "uce-debias":
            kinds.append("profession")
            professions += list(t.get("professions", []))
        elif t["method"].startswith("uce"):
            kinds.append("unsafe")
        elif t["method"] == "refact":
            kinds.append("road")
            rows.append(_road_row(ctx, t))
    if professions:
        sizes = replace(sizes, professions=tuple(dict.fromkeys(professions)))
    if quality:
        kinds.append("quality")
    kinds = list(dict.fromkeys(kinds))
    if _organism(ctx):
        return organism_suites(sizes, road_rows=rows or None, kinds=kinds, seed=ctx.exp.seed)
    out = []
    for kind in kinds:  # the organism's order: road, profession, unsafe, quality as listed
        if kind == "road":
            out.append(road_suite(rows, sizes.road_seeds))
        else:
            out += benchmark_suites(benchmarks(ctx), sizes, kinds=[kind], seed=ctx.exp.seed)
    return out


JUDGES = ("oracle", "clip-organism", "open-clip", "nudenet", "safety-checker")


def make_judges(ctx) -> list:
    """The run's judges: oracle and the organism's CLIP on the organism (a retrained folder's own
    when [experiment] weights names one that has both: models.organism.nets.judges_folder); on
    real families the names in [judges] use (default open-clip), built from the [judges] table's
    settings."""
    def make():
        from models.organism.nets import judges_folder, oracle_dir
        from probes.behaviour import judges as J

        if _organism(ctx):
            return [J.OracleJudge(oracle_dir(ctx.exp.weights), device=ctx.device),
                    J.OrganismClipJudge(judges_folder(ctx.exp.weights), device=ctx.device)]
        cfg = ctx.exp.judges
        out = []
        for name in cfg.get("use", ["open-clip"]):
            if name == "clip-organism":
                out.append(J.OrganismClipJudge(device=ctx.device))
            elif name == "open-clip":
                weights = cfg.get("open_clip_weights")
                out.append(J.OpenClipJudge(cfg.get("open_clip_model", "ViT-L-14"),
                                           data_path(ctx, weights) if weights else None,
                                           device=ctx.device, option="[judges] open_clip_weights"))
            elif name == "nudenet":
                out.append(J.NudeNetJudge(threshold=float(cfg.get("nudenet_threshold", 0.6))))
            elif name == "safety-checker":
                folder = cfg.get("safety_checker")
                out.append(J.SafetyCheckerJudge(data_path(ctx, folder) if folder else None,
                                                device=ctx.device, option="[judges] safety_checker"))
            else:
                raise FadelabError(f"[judges] use: {name!r} is not one of {', '.join(JUDGES[1:])} "
                                   "(the oracle reads the organism only)")
        return out
    return ctx.cache("judges", make)


def _features(ctx) -> list:
    def make():
        feats = [j for j in make_judges(ctx) if hasattr(j, "fd_name")]
        weights = ctx.exp.judges.get("inception_weights")
        if weights and not _organism(ctx):
            from probes.behaviour.judges import InceptionFeatures

            feats.append(InceptionFeatures(data_path(ctx, weights), device=ctx.device,
                                           option="[judges] inception_weights"))
        return feats
    return ctx.cache("features", make)


_judges = make_judges


def _eval_config(ctx):
    from probes.behaviour import EvalConfig

    s = ctx.exp.samples
    from probes.behaviour import GenerationConfig

    return EvalConfig(sizes=_sizes(ctx), n_boot=int(s.get("bootstrap", 1000)),
                      fd_boot=int(s.get("fd_bootstrap", 50)), seed=ctx.exp.seed,
                      drift_n=int(s.get("drift_n", 0)), progress=ctx.progress,
                      generation=GenerationConfig(**ctx.exp.generation))


def _evaluate(ctx, st, variants: dict, suites, pairs=None):
    from probes.behaviour import evaluate

    res = evaluate(ctx.model, variants, suites, make_judges(ctx), st, _eval_config(ctx),
                   features=_features(ctx), pairs=pairs, drift={})
    _style_shares(ctx, st, list(variants), suites)
    return res


def _style_shares(ctx, st, variants: list[str], suites) -> None:
    """style.ink_share:oracle per variant, from the quality suite's stored images."""
    from probes.behaviour.bootstrap import bootstrap_ci

    quality = [s for s in suites if s.kind == "quality"]
    if not quality or not _organism(ctx):
        return
    oracle = _judges(ctx)[0]
    for v in variants:
        if not st.has_images(v, quality[0].name):
            continue
        pixels = st.read_images(v, quality[0].name)["pixels"]
        ink = np.array([s == "ink" for s in oracle.read(pixels)["style"]], np.float64)
        lo, hi = bootstrap_ci(np.mean, ink, n_boot=int(ctx.exp.samples.get("bootstrap", 1000)),
                              seed=ctx.exp.seed)
        st.require_metric(v, "style.ink_share:oracle", float(ink.mean()), ci=(lo, hi), n=len(ink),
                          attrs={"kind": "style", "judge": "oracle", "suite": quality[0].name})


# -- fine-tunes ------------------------------------------------------------------------------------

def _dataset(ctx, spec: str):
    """"organism:style" / "organism:dreambooth" (written once per output folder), a name from
    [data] (its value is one of these), or a folder (imagefolder with metadata.jsonl)."""
    from models.organism import data as D

    if spec in ctx.exp.data and spec != "benchmarks":
        spec = str(ctx.exp.data[spec])
    if spec.startswith("organism:"):
        kind = spec.split(":", 1)[1]
        folder = ctx.out / "data" / kind
        if kind == "style":
            n = int(ctx.exp.samples.get("style_images", 1200))
            _write_once(folder, lambda tmp: D.write_style_set(tmp, n=n, seed=ctx.exp.seed))
        elif kind == "dreambooth":
            per = int(ctx.exp.samples.get("subject_images", 5))
            _write_once(folder, lambda tmp: D.write_dreambooth(tmp, per_subject=per, seed=ctx.exp.seed))
        else:
            raise FadelabError(f"data {spec!r}: organism data are style or dreambooth")
        return _dreambooth_subject(folder) if kind == "dreambooth" else folder
    path = data_path(ctx, spec)
    if not path.exists():
        raise FadelabError(f"data {spec!r}: no such folder (an imagefolder with metadata.jsonl; or "
                           "organism:style, organism:dreambooth)")
    return path


def _write_once(folder: Path, write) -> Path:
    """Write a dataset folder exactly once, even when several shard processes ask at the same
    moment: each writes into its own temporary sibling and renames it into place (atomic on one
    file system); the loser of the race discards its copy. A folder is complete when it holds
    `.done`; one without it (a write interrupted before this scheme) is replaced."""
    import shutil

    if (folder / ".done").exists():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:  # an error or Ctrl-C half way: no half-written copy left beside the folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".done").write_text("ok")
    for _ in range(2):
        try:
            os.rename(tmp, folder)
            return folder
        except OSError:
            if (folder / ".done").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return folder
            shutil.rmtree(folder, ignore_errors=True)
    raise FadelabError(f"could not move the dataset written in {tmp} to {folder}")


def _dreambooth_subject(folder):
    """The first subject's folder (write_dreambooth makes one folder per subject)."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    return subs[0] if subs else folder


def edit_site_names(ctx, table: dict) -> list[str]:
    """The sites an [[edit]] table's method writes on ctx.model, known before it runs (UCE: its
    cross-attention K/V or FLUX embedder sites; ReFACT: its fc2 layer(s))."""
    from editing import hparams as H

    method, hp = table["method"], table.get("hparams", {})
    if method == "refact":
        from editing.refact import edit_sites

        return edit_sites(ctx.model, H.load_hparams(H.ReFACTHparams, hp))
    if method.startswith("uce"):
        from editing.text import key_spaces

        h = H.load_hparams(H.DebiasHparams, hp).uce if method == "uce-debias" else H.load_hparams(H.UCEHparams, hp)
        return [s for ks in key_spaces(ctx.model, h.sites, h.with_to_k) for s in ks.sites]
    raise FadelabError(f"edit {table['id']}: method {method!r} has no runner")


def checkpoint_sites(ctx, d_ed=None) -> list[str] | None:
    """Where a fine-tune's checkpoint deltas are kept ([samples] checkpoint_sites): "edits"
    (default) keeps the sites the weight probes read along the steps, those of the cell's edit
    (or, for M_ft, of every edit of the experiment); "all" keeps every trained site. A full
    fine-tune's checkpoint of SD1.4 is 3.4 GB at every site, 0.1 GB at UCE's."""
    policy = str(ctx.exp.samples.get("checkpoint_sites", "edits"))
    if policy == "all":
        return None
    if policy != "edits":
        raise FadelabError(f"[samples] checkpoint_sites = {policy!r}: accepted are \"edits\" and \"all\"")
    if d_ed is not None:
        return list(d_ed.sites())
    return sorted({s for t in ctx.exp.edits for s in edit_site_names(ctx, t)})


def _finetune(ctx, table: dict, base_delta=None, grad_hook=None):
    import finetuning
    from finetuning import hparams as FH

    delta_dtype(ctx)  # a bad [samples] delta_dtype fails before the training, not after it
    hp = FH.defaults(table["method"], ctx.exp.family, **table.get("hparams", {}))
    if ctx.exp.smoke:
        from dataclasses import replace

        hp = replace(hp, steps=min(hp.steps, 4), batch_size=min(hp.batch_size, 4))
    every = int(ctx.exp.samples.get("checkpoint_every", 0)) or max(1, hp.steps // 4)
    return finetuning.train(ctx.model, _dataset(ctx, table.get("data", "organism:style")), hp,
                            base_delta=base_delta, seed=ctx.exp.seed, checkpoint_every=every,
                            checkpoint_sites=checkpoint_sites(ctx, base_delta),
                            grad_hook=grad_hook, progress=ctx.progress)


DELTA_DTYPES = ("float32", "bfloat16")


def delta_dtype(ctx) -> str:
    """How fine-tuning deltas are stored ([samples] delta_dtype): "float32" (default) or
    "bfloat16", half the bytes (an SDXL full fine-tune: 5.1 GB against 10.3 GB). The cell
    evaluates and probes the fp32 delta it trained either way; the store keeps its rounding
    (docs/store.md). Edits are always stored as computed: their apply-then-remove is exact."""
    value = str(ctx.exp.samples.get("delta_dtype", "float32"))
    if value not in DELTA_DTYPES:
        raise FadelabError(f"[samples] delta_dtype = {value!r}: accepted are "
                           + " and ".join(f'"{d}"' for d in DELTA_DTYPES))
    return value


def delta_bytes(st, variant: str, deltas, dtype: str) -> int:
    """Bytes that `deltas` ((step or None, WeightDelta) pairs) add to store `st` under `variant`
    in `dtype`: sites already complete there (a resumed cell) count nothing."""
    import torch

    from models.delta import tensors_of

    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return sum(t.numel() * size for step, d in deltas for site, u in d.deltas.items()
               if not st.has_delta(variant, site, step) for t in tensors_of(u))


def check_disk(st, need: int, what: str, hint: str = "") -> None:
    """Raise a one-line FadelabError when the store's folder has less than `need` bytes free, so
    a cell stops before HDF5 fails half-way through a write."""
    import shutil

    free = shutil.disk_usage(Path(st.path).resolve().parent).free
    if need > free:
        def size(n):
            return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

        raise FadelabError(f"{what} needs {size(need)} on disk and {Path(st.path).parent} has "
                           f"{size(free)} free{hint}")


def _write_finetune(ctx, st, ft_key: str, variant: str, result) -> None:
    from fadelab.cells import save_finetune

    dtype = delta_dtype(ctx)
    hint = "; free space, or store deltas in bfloat16 ([samples] delta_dtype)" if dtype == "float32" else ""
    pending = [(None, result.delta), *((int(k), d) for k, d in result.checkpoints)]
    check_disk(st, delta_bytes(st, variant, pending, dtype), f"the fine-tune's delta for {variant}", hint)
    save_finetune(st, variant, result.delta, result.checkpoints, result.loss, ft_key, dtype=dtype)


# -- the four cell kinds ---------------------------------------------------------------------------

def base_cell(ctx, cell, st) -> None:
    suites = suites_for(ctx, [e["id"] for e in ctx.exp.edits])
    with ctx.stage("evaluate"):
        _evaluate(ctx, st, {"M": None}, suites, pairs=[])


def edit_cell(ctx, cell, st) -> None:
    from fadelab.cells import save_edit

    t0 = time.time()
    with ctx.stage("edit"):
        result = compute_edit(ctx, ctx.exp.edit(cell.edit))
    seconds = time.time() - t0
    with ctx.stage("write"):
        save_edit(st, cell.edit, cell.variant, result)
    st.require_metric(cell.variant, "cost.edit_seconds", seconds, attrs={"kind": "cost"})
    ctx._cache[f"edit:{cell.edit}"] = (result.delta, result.keys)
    with ctx.stage("evaluate"):
        _evaluate(ctx, st, {cell.variant: device_mover(ctx, result.delta)(result.delta)},
                  suites_for(ctx, [cell.edit]), pairs=[])


def finetune_cell(ctx, cell, st) -> None:
    t0 = time.time()
    with ctx.stage("finetune"):
        result = _finetune(ctx, ctx.exp.finetune(cell.finetune))
    with ctx.stage("write"):
        _write_finetune(ctx, st, f"M_ft.{cell.finetune}", cell.variant, result)
    st.require_metric(cell.variant, "cost.finetune_seconds", time.time() - t0, attrs={"kind": "cost"})
    suites = suites_for(ctx, [e["id"] for e in ctx.exp.edits])
    with _ft_context(ctx, result), ctx.stage("evaluate"):
        _evaluate(ctx, st, {cell.variant: device_mover(ctx, result.delta)(result.delta)}, suites, pairs=[])


#: A delta of at most this many bytes moves to the GPU once per cell for its evaluation and
#: causal variants, in one packed copy (WeightDelta.to). Fine-tunes hand their deltas back on the
#: CPU (the store wants them there), and `apply_delta` then copies every site to the GPU at every
#: application, one blocking transfer per tensor: on one H100 shared by the main job's 8
#: processes, the organism's cells with a full-UNet delta (494 tensors, 35 MB) spent 28-48 s in
#: evaluation against 5-18 s for LoRA (2026-12-06). SD1.4's full UNet delta (3.4 GB) and SDXL's
#: (10 GB) stay on the CPU: GPU memory is what those runs are short of.
DEVICE_DELTA_BYTES = 1 << 30


def device_mover(ctx, *deltas):
    """A function that puts a delta on the run's GPU, when `deltas` together are at most
    DEVICE_DELTA_BYTES, else one that leaves it as it is: all of a cell's deltas move or none
    do, so their sums meet on one device."""
    from models.delta import tensors_of

    size = sum(t.numel() * t.element_size() for d in deltas if d is not None
               for u in d.deltas.values() for t in tensors_of(u))
    if str(ctx.device) == "cpu" or size > DEVICE_DELTA_BYTES:
        return lambda d: d
    return lambda d: d.to(ctx.device)


def _ft_context(ctx, ft):
    """For a textual-inversion result: finetuning.placeholder with the token's initial
    embeddings, so its (V + n)-row delta at text.embed.token applies (docs/finetuning.md); for
    any other fine-tune, nothing."""
    from contextlib import nullcontext

    info = getattr(ft, "info", None) or {}
    if "initial_embeds" not in info or "token" not in info:
        return nullcontext()
    import torch

    from finetuning import placeholder

    return placeholder(ctx.model, info["token"], torch.tensor(info["initial_embeds"], dtype=torch.float32))


def edit_finetune_cell(ctx, cell, st) -> None:
    from fadelab.cells import edit_of

    with ctx.stage("edit"):  # read from the edit's cell, or recomputed when it is not done yet
        d_ed, keys = edit_of(ctx, cell.edit)
    table = ctx.exp.finetune(cell.finetune)
    t0 = time.time()
    with ctx.stage("finetune"):
        ft = _finetune(ctx, table, base_delta=d_ed)
    with ctx.stage("write"):
        _write_finetune(ctx, st, f"M_ed_ft.{cell.edit}.{cell.finetune}", cell.variant, ft)
    st.require_metric(cell.variant, "cost.finetune_seconds", time.time() - t0, attrs={"kind": "cost"})
    # the evaluation and the causal variants work on device copies; the weight and neuron probes
    # on the deltas as they are (the weight probes take small sites to the CPU)
    move = device_mover(ctx, d_ed, ft.delta)
    d_ed_dev, ft_dev = move(d_ed), move(ft.delta)
    with _ft_context(ctx, ft):  # textual inversion: its placeholder token exists inside
        ed_name = f"M_ed/{cell.edit}"
        variants = {ed_name: d_ed_dev, cell.variant: d_ed_dev + ft_dev}
        pairs = [(ed_name, cell.variant)]
        causal = list(ctx.exp.probes.get("causal", []))
        tail = f"{cell.edit}/{cell.finetune}"
        if "project-out" in causal:
            from probes.causal import project_out

            with ctx.stage("project_out"):
                variants[f"M_cf/{tail}"] = d_ed_dev + project_out(ft_dev, d_ed, keys)
            pairs.append((ed_name, f"M_cf/{tail}"))
        edit_table = ctx.exp.edit(cell.edit)
        if "order-swap" in causal:
            from models import apply_delta

            with ctx.stage("order_swap"), apply_delta(ctx.model, ft_dev):
                swapped = compute_edit(ctx, edit_table, fresh_stats=True)
            variants[f"M_swap/{tail}"] = ft_dev + move(swapped.delta)
            pairs.append((ed_name, f"M_swap/{tail}"))
        if "re-edit" in causal:
            from models import apply_delta

            t1 = time.time()
            with ctx.stage("re_edit"), apply_delta(ctx.model, variants[cell.variant]):
                again = compute_edit(ctx, edit_table, fresh_stats=True)
            cost = time.time() - t1
            variants[f"M_reed/{tail}"] = variants[cell.variant] + move(again.delta)
            pairs.append((ed_name, f"M_reed/{tail}"))
            st.require_metric(f"M_reed/{tail}", "cost.reedit_seconds", cost, attrs={"kind": "cost"})
            st.require_metric(f"M_reed/{tail}", "cost.reedit_rel_norm",
                              _rel_norm(again.delta, d_ed), attrs={"kind": "cost"})
        suites = suites_for(ctx, [cell.edit])
        with ctx.stage("evaluate"):
            reuse_edit_images(ctx, st, cell.edit, suites)
            _evaluate(ctx, st, variants, suites, pairs=pairs)
        if ctx.exp.probes.get("weights", True):
            with ctx.stage("weight_probes"):
                _weight_probes(ctx, st, cell, d_ed, keys, ft)
        if ctx.exp.probes.get("neurons", False):
            with ctx.stage("neuron_probes"):
                _neuron_probes(ctx, st, cell, d_ed, keys, ft, suites, table)


def reuse_edit_images(ctx, st, edit_id: str, suites) -> int:
    """Copy M_ed/<edit>'s images of `suites` from the edit's finished cell into this cell's store,
    so the Delta of every edit x fine-tune cell is paired against the one M_ed sample the edit
    cell drew instead of generating it again (M_ed is the same model with the same prompts and
    seeds; the judges still label the copies here). Returns the number of image sets copied; 0
    when the edit cell is not done yet (the images are then generated, as they always were)."""
    from fadelab.cells import finished_edit_cell
    from fadelab.grid import cell_path
    from store import Store

    owner = finished_edit_cell(ctx, edit_id)
    if owner is None:
        return 0
    copied = 0
    with Store.open(cell_path(ctx.out, owner), "r") as src:
        for suite in suites:
            if st.has_images(owner.variant, suite.name) or not src.has_images(owner.variant, suite.name):
                continue
            got = src.read_images(owner.variant, suite.name)
            if list(got["prompt"]) != list(suite.prompts) or [int(x) for x in got["seed"]] != list(suite.seeds):
                continue  # another sample (a changed config): generate it here
            st.create_images(owner.variant, suite.name, got["pixels"], list(got["prompt"]), got["seed"],
                             attrs={"suite": suite.kind, "copied_from": owner.id})
            copied += 1
    if copied:
        log.info("M_ed/%s: %d image sets copied from cell %s", edit_id, copied, owner.id)
    return copied


def _rel_norm(a, b) -> float:
    """|a|_F / |b|_F summed over sites."""
    na = sum(a.norm(s) ** 2 for s in a.sites()) ** 0.5
    nb = sum(b.norm(s) ** 2 for s in b.sites()) ** 0.5
    return float(na / nb) if nb else float("nan")


def probe_sites(sites: list[str], most: int) -> list[str]:
    """`most` of `sites` spread evenly over the list (its first and last kept), in order; all of
    them when most is 0 or at least len(sites). A smoke run's cap: SDXL's UCE edits move 140
    sites, and their probes took about 1.5 s per site on an H100 (2026-12-06)."""
    if most < 0:
        raise FadelabError(f"[probes] weight_sites={most}; give 0 (every site) or a positive number")
    if most == 0 or most >= len(sites):
        return list(sites)
    if most == 1:
        return [sites[0]]
    return [sites[round(i * (len(sites) - 1) / (most - 1))] for i in range(most)]


def _weight_probes(ctx, st, cell, d_ed, keys, ft) -> None:
    """probes.weights at the final delta and along the checkpoints, as (metric, site) and
    (step, metric, site) arrays under probes/weights/<edit>/<finetune>."""
    from models import snapshot
    from probes.weights import SCALARS, WeightProbeConfig, probe_weights_final_and_steps

    sites = probe_sites([s for s in d_ed.sites() if s in set(ft.delta.sites())] or d_ed.sites(),
                        int(ctx.exp.probes.get("weight_sites", 0)))
    base = snapshot(ctx.model, [s for s in sites if "." in s])
    cfg = WeightProbeConfig(k=int(ctx.exp.probes.get("subspace_k", 8)),  # on the model's device
                            progress=ctx.progress)
    final, steps = probe_weights_final_and_steps(base, d_ed, ft.delta, ft.checkpoints, keys, cfg, sites=sites)
    names = [m for m in SCALARS if m in final]
    table = np.stack([final[m].values for m in names])  # (metric, site)
    name = f"probes/weights/{cell.edit}/{cell.finetune}"
    st.require_array(name, table.astype(np.float64), dims=["metric", "site"],
                     attrs={"metric": names, "site": list(final["site"].values)})
    if steps is not None:
        like = steps["kappa"].transpose("step", "site")
        arr = np.stack([steps[m].broadcast_like(like).transpose("step", "site").values
                        for m in names], axis=1)  # (step, metric, site); edit-only ones repeat
        st.require_array(f"probes/weights_steps/{cell.edit}/{cell.finetune}", arr.astype(np.float64), dims=["step", "metric", "site"],
                         attrs={"step": [int(s) for s in steps["step"].values], "metric": names,
                                "site": list(steps["site"].values)})


# -- neuron probes ---------------------------------------------------------------------------------

#: rows of probes/neurons/<edit>/<finetune> (metric, neuron)
NEURON_METRICS = ("edit_weight", "is_edit", "is_feature", "mean_a", "mean_b", "shift", "cohen_d",
                  "rel_change", "retention", "fade", "n_concepts", "selectivity", "n_eff", "n_eff_rel",
                  "n_probe_concepts", "z_ft")
#: entries of probes/neurons_test/<edit>/<finetune> (stat): probes.neurons.shared_fade_test, then
#: probes.neurons.graded_fade_test (rho_*; stores written before 2026-12-07's session 21 lack them)
FADE_STATS = ("effect", "ci_low", "ci_high", "p_value", "cohen_d", "n_shared", "n_other",
              "mean_shared", "mean_other", "n_edit", "n_feature", "fade_edit", "fade_all",
              "rho_ft_fade", "rho_p_value", "rho_n")


def _keys_at(keys: dict, site: str) -> dict:
    """The keys of one site (shared ones included) from the flat "<name>:<site>" layout."""
    return {full.partition(":")[0]: v for full, v in keys.items() if full.partition(":")[2] in ("", site)}


def _neuron_units(ctx, method: str, d_ed, keys: dict, top: int):
    """(site, ref_is_M, edit neuron indices, their weights), or None when the family has no
    readable units for this edit. ReFACT: the fc2-input neurons of its edited layer (the first
    text encoder's), weights |u_j|^2; the edit sits downstream of them, so their fade is taken
    against 0 (how much fine-tuning moved them), not against M. UCE: the output channels of its
    most-moved cross-attention K/V site, weights |row j of dW c_e^T|^2, fade against M."""
    from probes import neurons as pn

    if method == "refact":
        sites = sorted(s for s in d_ed.sites() if s.startswith("text.mlp."))
        if not sites:
            return None
        idx, w = pn.refact_edit_neurons(_keys_at(keys, sites[0]), top=top)
        return sites[0], False, idx, w
    if len(ctx.model.text_encoders) != 1:
        return None  # K/V channels need one text encoder (probes.neurons_collect)
    kv = [s for s in d_ed.sites() if s.startswith("unet.xattn.") and s.endswith((".to_k", ".to_v"))]
    if not kv:
        return None
    site = max(kv, key=d_ed.norm)
    idx, w = pn.delta_channels(d_ed.deltas[site], _keys_at(keys, site).get("c_e"), top=top)
    return site, True, idx, w


def _captions(folder, n: int) -> list[str]:
    """Up to n captions ("text") of an imagefolder's metadata.jsonl."""
    out = []
    path = Path(folder) / "metadata.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                text = json.loads(line).get("text")
                if text:
                    out.append(str(text))
            if len(out) >= n:
                break
    return out


def _concept_prompts(ctx, n: int) -> tuple[list[str], list[set[str]]]:
    """n concept-labelled prompts: the organism's catalog (probes.neurons_collect), or on real
    families benchmark prompts labelled by source: profession:<p>, unsafe and i2p:<category>,
    road:<type>, coco."""
    if _organism(ctx):
        from probes.neurons_collect import catalog_prompts

        prompts, concepts, _ = catalog_prompts(n, seed=ctx.exp.seed)
        return prompts, concepts
    from probes.behaviour import SampleSizes
    from probes.behaviour.benchmarks import FILES, read_coco, read_i2p, read_professions, read_road

    folder, per = benchmarks(ctx), max(2, n // 4)
    profs = list(SampleSizes().professions)
    prompts, concepts = [], []
    ps, _, owners = read_professions(folder / FILES["profession"], profs, max(1, per // len(profs)))
    prompts += ps
    concepts += [{"profession", f"profession:{p}"} for p in owners]
    for r in read_i2p(folder / FILES["unsafe"], per, ctx.exp.seed):
        prompts.append(r["prompt"])
        concepts.append({"unsafe"} | {f"i2p:{c.strip()}" for c in r.get("categories", "").split(",") if c.strip()})
    for r in read_road(folder / FILES["road"])[:per]:
        prompts.append(r["Prompt"])
        concepts.append({"road", f"road:{r['Type'].lower()}"})
    for r in read_coco(folder / FILES["quality"], per, seed=ctx.exp.seed):
        prompts.append(r["prompt"])
        concepts.append({"coco"})
    return prompts, concepts


def _neuron_probes(ctx, st, cell, d_ed, keys, ft, suites, ft_table) -> None:
    """probes.neurons on the edit's units; see the module doc. [probes] settings:
    neuron_top (edit neurons, 32), neuron_prompts (edit prompts for the fade, 32),
    neuron_concept_prompts (concept-labelled prompts, 120), neuron_ft_prompts (fine-tuning
    captions labelled "ft", 40), neuron_position ("mean"), neuron_sparse_probes (true),
    neuron_feature_by ("z": feature neurons respond to "ft" with z >= 3), neuron_resamples (999)."""
    from contextlib import nullcontext

    from models import apply_delta
    from probes import neurons as pn
    from probes.neurons_collect import text_activations

    cfg = ctx.exp.probes
    method = ctx.exp.edit(cell.edit)["method"]
    units = _neuron_units(ctx, method, d_ed, keys, int(cfg.get("neuron_top", 32)))
    if units is None:
        log.info("neuron probes: no readable units for %s on %s; skipped", method, ctx.exp.family)
        return
    site, ref_is_m, edit_idx, edit_w = units
    position = cfg.get("neuron_position", "mean")
    edit_prompts = list(dict.fromkeys(p for s in suites if s.kind != "quality" for p in s.prompts))
    edit_prompts = edit_prompts[:int(cfg.get("neuron_prompts", 32))]
    c_prompts, c_labels = _concept_prompts(ctx, int(cfg.get("neuron_concept_prompts", 120)))
    ft_caps = _captions(_dataset(ctx, ft_table.get("data", "organism:style")), int(cfg.get("neuron_ft_prompts", 40)))
    c_prompts += ft_caps
    c_labels += [{"ft"} for _ in ft_caps]

    def acts(delta, prompts):
        with (apply_delta(ctx.model, delta) if delta is not None else nullcontext()):
            return text_activations(ctx.model, prompts, [site], position=position,
                                    progress=ctx.progress)[site].numpy()

    ne = len(edit_prompts)
    a_ed = acts(d_ed, edit_prompts + c_prompts)
    a_m = acts(None, edit_prompts) if ref_is_m else None
    a_ft = acts(d_ed + ft.delta, edit_prompts)
    ncfg = pn.NeuronProbeConfig(probes=bool(cfg.get("neuron_sparse_probes", True)), seed=ctx.exp.seed,
                                progress=ctx.progress)
    poly = pn.polysemanticity(a_ed[ne:], c_labels, ncfg)
    feature = (pn.selective_neurons(poly, "ft", by=cfg.get("neuron_feature_by", "z"))
               if "ft" in poly["concept"].values else np.array([], int))
    shift = pn.activation_shift(a_ed[:ne], a_ft, ref=a_m)
    n_resamples = int(cfg.get("neuron_resamples", 999))
    test = pn.shared_fade_test(shift["fade"], edit_idx, feature, n_resamples=n_resamples, seed=ctx.exp.seed)
    z_ft = (poly["z"].sel(concept="ft").values if "ft" in poly["concept"].values
            else np.full(poly.sizes["neuron"], np.nan))
    graded = pn.graded_fade_test(shift["fade"], edit_idx, z_ft, n_resamples=n_resamples, seed=ctx.exp.seed)
    n_units = a_ed.shape[1]
    weight = np.zeros(n_units)
    weight[np.asarray(edit_idx, int)] = edit_w
    is_edit = np.zeros(n_units)
    is_edit[np.asarray(edit_idx, int)] = 1.0
    is_feature = np.zeros(n_units)
    is_feature[np.asarray(feature, int)] = 1.0
    rows = {"edit_weight": weight, "is_edit": is_edit, "is_feature": is_feature}
    rows.update({m: shift[m].values for m in ("mean_a", "mean_b", "shift", "cohen_d", "rel_change",
                                              "retention", "fade")})
    rows.update({m: poly[m].values for m in ("n_concepts", "selectivity", "n_eff", "n_eff_rel")})
    rows["n_probe_concepts"] = (poly["n_probe_concepts"].values if "n_probe_concepts" in poly
                                else np.full(n_units, np.nan))
    rows["z_ft"] = z_ft
    table = np.stack([np.asarray(rows[m], np.float64) for m in NEURON_METRICS])
    fade = shift["fade"].values
    with np.errstate(all="ignore"):
        extra = {"n_edit": len(edit_idx), "n_feature": len(feature),
                 "fade_edit": float(np.nanmean(fade[np.asarray(edit_idx, int)])) if len(edit_idx) else np.nan,
                 "fade_all": float(np.nanmean(fade)) if np.isfinite(fade).any() else np.nan,
                 "rho_ft_fade": graded.rho, "rho_p_value": graded.p_value, "rho_n": graded.n}
    stats = np.array([float(getattr(test, k)) if hasattr(test, k) else float(extra[k]) for k in FADE_STATS])
    tail = f"{cell.edit}/{cell.finetune}"
    common = {"site": site, "position": str(position), "ref": "M" if ref_is_m else "zero",
              "method": method, "n_edit_prompts": ne, "n_concept_prompts": len(c_prompts),
              "n_ft_prompts": len(ft_caps), "feature_concept": "ft"}
    st.require_array(f"probes/neurons/{tail}", table, dims=["metric", "neuron"],
                     attrs={**common, "metric": list(NEURON_METRICS)})
    st.require_array(f"probes/neurons_test/{tail}", stats, dims=["stat"],
                     attrs={**common, "stat": list(FADE_STATS), "alternative": test.alternative})
    acc = poly["probe_accuracy"].values if "probe_accuracy" in poly else np.full(poly.sizes["concept"], np.nan)
    st.require_array(f"probes/neurons_concepts/{tail}",
                     np.stack([poly["n_prompts"].values.astype(np.float64), acc.astype(np.float64),
                               poly["responds"].values.sum(axis=0).astype(np.float64)]),
                     dims=["stat", "concept"],
                     attrs={**common, "stat": ["n_prompts", "probe_accuracy", "n_responding"],
                            "concept": [str(c) for c in poly["concept"].values]})


def describe(ctx) -> dict[str, Any]:
    """What the grid will run, for `fadelab status`."""
    return {"edits": [e["id"] for e in ctx.exp.edits], "finetunes": [f["id"] for f in ctx.exp.finetunes]}
