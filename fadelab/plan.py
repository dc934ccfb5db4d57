"""The body of each grid cell: which edit, fine-tune, suites, probes and causal runs it makes.

What it offers (called by fadelab.cells.run_cell, one per cell kind):
    base_cell(ctx, cell, st)            evaluate M on every suite the grid's edits need
    edit_cell(ctx, cell, st)            compute the edit, store delta + keys, evaluate M_ed
    finetune_cell(ctx, cell, st)        fine-tune M, store delta + checkpoints + loss, evaluate M_ft
    edit_finetune_cell(ctx, cell, st)   fine-tune M_ed; evaluate M_ed and M_ed_ft with Deltas;
                                        weight probes (final and along checkpoints); neuron
                                        probes; causal runs (project-out, order swap, re-edit)
    compute_edit(ctx, table)            an [[edit]] table -> EditResult on the current weights
    suites_for(ctx, edit_ids)           the behavioural suites an edit is judged on

Variants are deltas on the one base model (models.apply_delta); counterfactual variants get
their own names so the store keeps them apart:

    M_cf/<e>/<f>     M_ed + dW_ft with its action on the edit's keys removed (probes.causal)
    M_swap/<e>/<f>   E(F(M)): the edit computed on the fine-tuned model (order swap)
    M_reed/<e>/<f>   M_ed_ft re-edited: the edit computed again on M_ed_ft

The organism's style share (oracle's style head on content prompts) is stored per variant as
`style.ink_share:oracle`, the check that a fine-tune took.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from models.errors import FadelabError

log = logging.getLogger(__name__)


# -- edits -----------------------------------------------------------------------------------------

def _road_row(table: dict) -> dict:
    from models.organism.prompts import road_requests

    rows = [r for r in road_requests() if r["Type"] == table.get("type", "Appearance")]
    k = int(table.get("index", 0))
    if not rows or not 0 <= k < len(rows):
        raise FadelabError(f"edit {table['id']}: no organism RoAD request of type "
                           f"{table.get('type')!r} at index {k} ({len(rows)} of that type)")
    return rows[k]


def _judge_flags(ctx):
    """The debias judge: images -> female flags (1, 0, NaN), from the oracle."""
    def make():
        from probes.behaviour.judges import OracleJudge

        oracle = OracleJudge(device=ctx.device)

        def judge(images: np.ndarray) -> np.ndarray:
            genders = oracle.read(images)["gender"]
            return np.array([{"female": 1.0, "male": 0.0}.get(g, np.nan) for g in genders])
        return judge
    return ctx.cache("judge:debias", make)


def compute_edit(ctx, table: dict):
    """Run the [[edit]] table's method on ctx.model's current weights; returns an EditResult."""
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
        if ctx.exp.family == "organism" and not preserve:
            preserve = editing.organism_profession_preserve(professions)
        return editing.uce_debias(model, professions, _judge_flags(ctx), h, preserve=preserve,
                                  progress=ctx.progress)
    if method == "refact":
        from editing.refact import request_from_road

        h = H.load_hparams(H.ReFACTHparams, hp)
        return editing.refact(model, request_from_road(_road_row(table)), h)
    raise FadelabError(f"edit {table['id']}: method {method!r} has no runner")


def _write_edit(st, edit_id: str, variant: str, result) -> None:
    from fadelab.cells import save_delta

    save_delta(st, variant, result.delta)
    for name, site, value in result.key_entries():
        st.require_edit_key(edit_id, name, value.detach().cpu(), site=site)
    info = json.dumps({"method": result.method, "request": result.request,
                       "hparams": result.hparams_dict(), "info": result.info}, default=str)
    st.require_array(f"edit_info/{edit_id}", np.array(info))


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
    ReFACT: its request's RoAD rows), plus the quality suite (CLIP score, Frechet distance, style)."""
    from probes.behaviour import organism_suites

    if ctx.exp.family != "organism":
        raise FadelabError(f"family {ctx.exp.family!r}: the grid's suites are built for the organism "
                           "here; real families run their smoke configs (fadelab run sd14 --smoke)")
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
            rows.append(_road_row(t))
    if professions:
        from dataclasses import replace

        sizes = replace(sizes, professions=tuple(dict.fromkeys(professions)))
    if quality:
        kinds.append("quality")
    kinds = list(dict.fromkeys(kinds))
    return organism_suites(sizes, road_rows=rows or None, kinds=kinds, seed=ctx.exp.seed)


def _judges(ctx) -> list:
    def make():
        from probes.behaviour import OracleJudge, OrganismClipJudge

        return [OracleJudge(device=ctx.device), OrganismClipJudge(device=ctx.device)]
    return ctx.cache("judges", make)


def _eval_config(ctx):
    from probes.behaviour import EvalConfig

    s = ctx.exp.samples
    return EvalConfig(sizes=_sizes(ctx), n_boot=int(s.get("bootstrap", 1000)),
                      fd_boot=int(s.get("fd_bootstrap", 50)), seed=ctx.exp.seed,
                      drift_n=int(s.get("drift_n", 0)), progress=ctx.progress)


def _evaluate(ctx, st, variants: dict, suites, pairs=None):
    from probes.behaviour import evaluate

    judges = _judges(ctx)
    features = [j for j in judges if hasattr(j, "fd_name")]
    res = evaluate(ctx.model, variants, suites, judges, st, _eval_config(ctx), features=features,
                   pairs=pairs, drift={})
    _style_shares(ctx, st, list(variants), suites)
    return res


def _style_shares(ctx, st, variants: list[str], suites) -> None:
    """style.ink_share:oracle per variant, from the quality suite's stored images."""
    from probes.behaviour.bootstrap import bootstrap_ci

    quality = [s for s in suites if s.kind == "quality"]
    if not quality:
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
    """"organism:style" / "organism:dreambooth" (written once per output folder) or a folder."""
    from pathlib import Path

    from models.organism import data as D

    if spec.startswith("organism:"):
        kind = spec.split(":", 1)[1]
        folder = ctx.out / "data" / kind
        if not (folder / "metadata.jsonl").exists() and not (folder / ".done").exists():
            n = int(ctx.exp.samples.get("style_images", 1200))
            if kind == "style":
                D.write_style_set(folder, n=n, seed=ctx.exp.seed)
            elif kind == "dreambooth":
                D.write_dreambooth(folder, per_subject=int(ctx.exp.samples.get("subject_images", 5)),
                                   seed=ctx.exp.seed)
            else:
                raise FadelabError(f"data {spec!r}: organism data are style or dreambooth")
            (folder / ".done").write_text("ok")
        return _dreambooth_subject(folder) if kind == "dreambooth" else folder
    path = Path(spec)
    if not path.exists():
        raise FadelabError(f"data {spec!r}: no such folder (or use organism:style, organism:dreambooth)")
    return path


def _dreambooth_subject(folder):
    """The first subject's folder (write_dreambooth makes one folder per subject)."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    return subs[0] if subs else folder


def _finetune(ctx, table: dict, base_delta=None, grad_hook=None):
    import finetuning
    from finetuning import hparams as FH

    hp = FH.defaults(table["method"], ctx.exp.family, **table.get("hparams", {}))
    if ctx.exp.smoke:
        from dataclasses import replace

        hp = replace(hp, steps=min(hp.steps, 4), batch_size=min(hp.batch_size, 4))
    every = int(ctx.exp.samples.get("checkpoint_every", 0)) or max(1, hp.steps // 4)
    return finetuning.train(ctx.model, _dataset(ctx, table.get("data", "organism:style")), hp,
                            base_delta=base_delta, seed=ctx.exp.seed, checkpoint_every=every,
                            grad_hook=grad_hook, progress=ctx.progress)


def _write_finetune(st, ft_key: str, variant: str, result) -> None:
    from fadelab.cells import save_delta

    save_delta(st, variant, result.delta)
    for step, d in result.checkpoints:
        save_delta(st, variant, d, step=int(step))
    loss = np.asarray(result.loss, np.float64)
    if loss.size and not st.is_complete(f"/loss/{ft_key}"):
        st.create_loss(ft_key, np.arange(1, loss.size + 1), {"loss": loss})


# -- the four cell kinds ---------------------------------------------------------------------------

def base_cell(ctx, cell, st) -> None:
    suites = suites_for(ctx, [e["id"] for e in ctx.exp.edits])
    _evaluate(ctx, st, {"M": None}, suites, pairs=[])


def edit_cell(ctx, cell, st) -> None:
    t0 = time.time()
    result = compute_edit(ctx, ctx.exp.edit(cell.edit))
    seconds = time.time() - t0
    _write_edit(st, cell.edit, cell.variant, result)
    st.require_metric(cell.variant, "cost.edit_seconds", seconds, attrs={"kind": "cost"})
    ctx._cache[f"edit:{cell.edit}"] = (result.delta, result.keys)
    _evaluate(ctx, st, {cell.variant: result.delta}, suites_for(ctx, [cell.edit]), pairs=[])


def finetune_cell(ctx, cell, st) -> None:
    t0 = time.time()
    result = _finetune(ctx, ctx.exp.finetune(cell.finetune))
    _write_finetune(st, f"M_ft.{cell.finetune}", cell.variant, result)
    st.require_metric(cell.variant, "cost.finetune_seconds", time.time() - t0, attrs={"kind": "cost"})
    suites = suites_for(ctx, [e["id"] for e in ctx.exp.edits])
    _evaluate(ctx, st, {cell.variant: result.delta}, suites, pairs=[])


def edit_finetune_cell(ctx, cell, st) -> None:
    from fadelab.cells import edit_of

    d_ed, keys = edit_of(ctx, cell.edit)
    table = ctx.exp.finetune(cell.finetune)
    t0 = time.time()
    ft = _finetune(ctx, table, base_delta=d_ed)
    _write_finetune(st, f"M_ed_ft.{cell.edit}.{cell.finetune}", cell.variant, ft)
    st.require_metric(cell.variant, "cost.finetune_seconds", time.time() - t0, attrs={"kind": "cost"})
    ed_name = f"M_ed/{cell.edit}"
    variants = {ed_name: d_ed, cell.variant: d_ed + ft.delta}
    pairs = [(ed_name, cell.variant)]
    causal = list(ctx.exp.probes.get("causal", []))
    tail = f"{cell.edit}/{cell.finetune}"
    if "project-out" in causal:
        from probes.causal import project_out

        variants[f"M_cf/{tail}"] = d_ed + project_out(ft.delta, d_ed, keys)
        pairs.append((ed_name, f"M_cf/{tail}"))
    edit_table = ctx.exp.edit(cell.edit)
    if "order-swap" in causal:
        from models import apply_delta

        with apply_delta(ctx.model, ft.delta):
            swapped = compute_edit(ctx, edit_table)
        variants[f"M_swap/{tail}"] = ft.delta + swapped.delta
        pairs.append((ed_name, f"M_swap/{tail}"))
    if "re-edit" in causal:
        from models import apply_delta

        t1 = time.time()
        with apply_delta(ctx.model, d_ed + ft.delta):
            again = compute_edit(ctx, edit_table)
        cost = time.time() - t1
        variants[f"M_reed/{tail}"] = d_ed + ft.delta + again.delta
        pairs.append((ed_name, f"M_reed/{tail}"))
        st.require_metric(f"M_reed/{tail}", "cost.reedit_seconds", cost, attrs={"kind": "cost"})
        st.require_metric(f"M_reed/{tail}", "cost.reedit_rel_norm",
                          _rel_norm(again.delta, d_ed), attrs={"kind": "cost"})
    _evaluate(ctx, st, variants, suites_for(ctx, [cell.edit]), pairs=pairs)
    if ctx.exp.probes.get("weights", True):
        _weight_probes(ctx, st, cell, d_ed, keys, ft)


def _rel_norm(a, b) -> float:
    """|a|_F / |b|_F summed over sites."""
    na = sum(a.norm(s) ** 2 for s in a.sites()) ** 0.5
    nb = sum(b.norm(s) ** 2 for s in b.sites()) ** 0.5
    return float(na / nb) if nb else float("nan")


def _weight_probes(ctx, st, cell, d_ed, keys, ft) -> None:
    """probes.weights at the final delta and along the checkpoints, as (metric, site) and
    (step, metric, site) arrays under probes/weights/<edit>/<finetune>."""
    from models import snapshot
    from probes.weights import SCALARS, WeightProbeConfig, probe_weights, probe_weights_steps

    sites = [s for s in d_ed.sites() if s in set(ft.delta.sites())] or d_ed.sites()
    base = snapshot(ctx.model, [s for s in sites if "." in s])
    cfg = WeightProbeConfig(k=int(ctx.exp.probes.get("subspace_k", 8)))
    final = probe_weights(base, d_ed, ft.delta, keys, cfg, sites=sites)
    names = [m for m in SCALARS if m in final]
    table = np.stack([final[m].values for m in names])  # (metric, site)
    name = f"probes/weights/{cell.edit}/{cell.finetune}"
    st.require_array(name, table.astype(np.float64), dims=["metric", "site"],
                     attrs={"metric": names, "site": list(final["site"].values)})
    if ft.checkpoints:
        steps = probe_weights_steps(base, d_ed, dict(ft.checkpoints), keys, cfg, sites=sites)
        like = steps["kappa"].transpose("step", "site")
        arr = np.stack([steps[m].broadcast_like(like).transpose("step", "site").values
                        for m in names], axis=1)  # (step, metric, site); edit-only ones repeat
        st.require_array(f"probes/weights_steps/{cell.edit}/{cell.finetune}", arr.astype(np.float64), dims=["step", "metric", "site"],
                         attrs={"step": [int(s) for s in steps["step"].values], "metric": names,
                                "site": list(steps["site"].values)})


def describe(ctx) -> dict[str, Any]:
    """What the grid will run, for `fadelab status`."""
    return {"edits": [e["id"] for e in ctx.exp.edits], "finetunes": [f["id"] for f in ctx.exp.finetunes]}
