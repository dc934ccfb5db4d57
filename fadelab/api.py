"""fadelab.api: the lab as a dozen lines of Python, for notebooks and scripts (docs/api.md).

What it offers (thin wrappers over the rooms; every function documents the room it calls):
    load(family, weights)                      models.load
    erase / debias / refact(model, ...)        editing.uce_erase / uce_debias / refact -> EditResult
    style_data(folder, n)                      the organism's fine-tuning style set, written once
    finetune(model, data, method, *, edit, freeze, only, l2, project, every, callback, **hp)
                                               finetuning.train with custom constraints -> FineTuneResult
    record(model, prompts, sites, *, delta)    activations (probes.neurons_collect / store.Recorder)
    probe(model, edit, ft)                     probes.weights at the end and along the checkpoints
    suites(*kinds, n)                          the organism's behavioural suites at small sizes
    evaluate(model, variants, suites, ...)     probes.behaviour.evaluate + the oracle's style share
    values(results)                            {variant: {metric: (value, ci_low, ci_high)}}
    spearman(x, y), bootstrap_ci(data)         analysis.stats, with 95% intervals
    open_store(path); add_edit, add_finetune, add_probes   the grid's store layout
    report(store_path, out)                    analysis.report.write_report

Variants are deltas on the one loaded base model: M_ed = edit.delta, M_ed_ft = edit.delta +
ft.delta (models.apply_delta adds them in place and restores the weights bit for bit). Names in
the store follow the grid (fadelab/plan.py): M_ed/<e>, M_ft/<f>, M_ed_ft/<e>/<f>, deltas under
/deltas, metrics under /metrics, weight probes under probes/weights[_steps]/<e>/<f>, so
analysis.report reads a store written through this module as it reads a grid cell's.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import FadelabError

log = logging.getLogger(__name__)

__all__ = ["load", "erase", "debias", "refact", "style_data", "finetune", "record", "probe",
           "suites", "evaluate", "values", "open_store", "add_edit", "add_finetune", "add_probes",
           "report", "edit_of", "sites_of", "spearman", "bootstrap_ci"]


# -- models and edits ------------------------------------------------------------------------------

def load(family: str = "organism", weights: str = "hub", *, device: str = "cpu", seed: int = 0,
         **kwargs):
    """models.load(family, weights, device=..., seed=...): one base model M, loaded once.

    family: "organism", "sd14", "sdxl", "flux-schnell" or a local diffusers folder; weights:
    "hub", "random" or a path. Extra keyword arguments (dtype, scale) go to models.load.
    """
    from models import load as _load

    return _load(family, weights, device=device, seed=seed, **kwargs)


def edit_of(edit) -> tuple[Any, dict]:
    """(delta, keys) of an EditResult, a (WeightDelta, keys) pair or a bare WeightDelta (keys {})."""
    from models import WeightDelta

    if edit is None:
        return None, {}
    if isinstance(edit, WeightDelta):
        return edit, {}
    if isinstance(edit, tuple) and len(edit) == 2:
        return edit[0], dict(edit[1] or {})
    if hasattr(edit, "delta") and hasattr(edit, "keys"):
        return edit.delta, dict(edit.keys)
    raise FadelabError(f"edit: give an EditResult, a WeightDelta or (delta, keys); got {type(edit).__name__}")


def erase(model, concepts: Sequence[str] | None = None, *, guide: str = "",
          preserve: Sequence[str] | int | None = 50, hparams=None):
    """UCE erase (editing.uce_erase): concepts -> guide; returns the EditResult.

    concepts: default editing.ORGANISM_UNSAFE (the organism's unsafe words). preserve: prompts
    to keep, or an int n for n of the organism's safe captions (editing.organism_safe_prompts,
    what the grid's "organism:safe-50" means); None keeps only the empty prompt.
    """
    import editing

    concepts = list(editing.ORGANISM_UNSAFE if concepts is None else concepts)
    if isinstance(preserve, int):
        preserve = editing.organism_safe_prompts(preserve)
    return editing.uce_erase(model, concepts, hparams or editing.UCEHparams(), guide=guide,
                             preserve=list(preserve or ()))


def oracle_flags(device: str = "cpu", weights="hub") -> Callable[[np.ndarray], np.ndarray]:
    """The organism oracle as a debias judge: images -> female flags (1.0, 0.0, NaN). weights:
    the model's (Model.weights): a retrained folder with its own oracle is judged by it."""
    from editing import oracle_judge
    from models.organism.nets import judges_folder

    return oracle_judge(judges_folder(weights), device=device)


def debias(model, professions: Sequence[str], *, judge: Callable | str = "oracle",
           preserve: Sequence[str] | None = None, hparams=None, progress: bool = False, **fields):
    """UCE debias (editing.uce_debias) with a judge in the loop; returns the EditResult.

    judge: "oracle" (the organism's oracle) or a callable images -> female flags. preserve:
    default editing.organism_profession_preserve(professions) on the organism. hparams: a
    DebiasHparams; or give its fields as keywords (n_images=8, max_rounds=1, steps=10, ...).
    """
    import dataclasses

    import editing

    h = hparams or editing.DebiasHparams()
    if fields:
        h = dataclasses.replace(h, **fields)
    if judge == "oracle":
        judge = oracle_flags(str(model.device), model.weights)
    if preserve is None:
        preserve = editing.organism_profession_preserve(list(professions)) if model.family == "organism" else ()
    return editing.uce_debias(model, list(professions), judge, h, preserve=list(preserve),
                              progress=progress)


def refact(model, request, *, hparams=None, stats=None):
    """ReFACT (editing.refact): request is {"prompt", "new", "old"} or a RoAD row; returns the
    EditResult."""
    import editing
    from editing.refact import request_from_road

    if isinstance(request, Mapping) and "Prompt" in request:
        request = request_from_road(request)
    return editing.refact(model, request, hparams or editing.ReFACTHparams(), stats=stats)


# -- fine-tuning -----------------------------------------------------------------------------------

def style_data(folder: str | Path, n: int = 256, seed: int = 0) -> Path:
    """The organism's fine-tuning style set (ink style, content captions) of n images in
    `folder` (imagefolder + metadata.jsonl), written once and atomically (a write killed half way
    leaves no half set behind: fadelab.plan._write_once). An existing set of another size, or a
    folder that holds other files, is an error; nothing of the user's is deleted."""
    from models.organism import data as D

    from .plan import _write_once

    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if meta.exists():
        have = sum(1 for line in meta.read_text().splitlines() if line.strip())
        if have != n:
            raise FadelabError(f"{folder} holds a style set of {have} images, not {n}; use another folder")
        (folder / ".done").touch()  # a complete set written before sets were marked
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FadelabError(f"{folder} is not empty and holds no style set; pass an empty or new folder")
    if folder.exists():
        folder.rmdir()  # empty: the atomic rename needs the name free
    return _write_once(folder, lambda tmp: D.write_style_set(tmp, n=n, seed=seed))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """name matches a glob, or is a parameter of a matched site ("<site>.bias", "<site>.lora_A")."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def sites_of(edit) -> list[str]:
    """The sites an edit (EditResult, WeightDelta or (delta, keys)) touched: globs for freeze/only."""
    delta, _ = edit_of(edit)
    return list(delta.sites())


def constraint_hook(*, l2: float = 0.0, l2_sites: Sequence[str] | None = None,
                    projector: Mapping[str, Any] | None = None) -> Callable | None:
    """A finetuning grad_hook(name, grad, param) -> grad implementing:

        L2 towards the start:  g <- g + 2 l2 (p - p_0)   (the gradient of l2 |p - p_0|^2), for
            parameters matching l2_sites (None: all); p_0 is the parameter's value at its first
            gradient, i.e. before any update: the weights fine-tuning started from (for an
            edited model, the edited weights W + dW_ed).
        projection:            g <- g (I - Q Q^T) for a parameter named like a key of
            `projector` ({site: Q (n_in, k)}, probes.causal.gradient_projector), after the L2 term.

    Returns None when there is nothing to do.
    """
    from probes.causal import project_grad

    if l2 < 0:
        raise FadelabError(f"l2={l2!r}: give a weight >= 0")
    if not l2 and not projector:
        return None
    start: dict[str, Any] = {}
    projector = dict(projector or {})

    def hook(name, grad, param):
        if l2 and (l2_sites is None or _matches(name, l2_sites)):
            if name not in start:
                start[name] = param.detach().clone()
            grad = grad + (2.0 * l2) * (param.detach() - start[name]).to(grad.dtype)
        q = projector.get(name)
        if q is not None and grad.ndim == 2:
            grad = project_grad(grad, q)
        return grad
    return hook


def finetune(model, data, method: str = "full", *, edit=None, freeze: Sequence[str] = (),
             only: Sequence[str] | None = None, l2: float = 0.0, l2_sites: Sequence[str] | None = None,
             project=None, project_space: str = "keys", every: int = 0,
             callback: Callable[[int, Any], None] | None = None,
             checkpoint_sites: Sequence[str] | None = None, seed: int = 0, progress: bool = False,
             hparams=None, **overrides):
    """Fine-tune M (+ edit) on `data` with finetuning.train, under custom constraints.

    Args:
        data: an imagefolder (style_data(...) for the organism's style set) or any data train takes.
        method: "full", "lora", "dora", "dreambooth", "textual-inversion".
        edit: the edit to start from (EditResult, WeightDelta or (delta, keys)); None: M itself.
        freeze: globs of parameter names (site names: "unet.xattn.*.to_k"; a site's bias and LoRA
            factors follow it) that are not trained: no gradient, no update, no weight decay, so
            their delta is exactly zero. sites_of(edit) freezes the edited sites.
        only: globs; when given, every other parameter is frozen.
        l2: weight of the penalty l2 |W - W_start|^2 on the drift from the weights training
            started from (the edited weights when `edit` is given), on l2_sites (None: all).
        project: an edit (EditResult or (delta, keys)) whose input subspace gradients are
            projected off at its sites, G <- G (I - Q Q^T) (probes.causal.gradient_projector,
            space `project_space`). Warning: AdamW's per-coordinate scaling and weight decay move
            the update partly back into the subspace; for the exact counterfactual, apply
            probes.causal.project_out to the final delta.
        every: checkpoint (and callback) every k steps; 0: none.
        callback: callback(step, work_model) at each checkpoint, work_model the live weights.
        hparams: a finetuning hparams dataclass; else finetuning.hparams.defaults(method,
            model.family, **overrides), e.g. steps=24, batch_size=8, lr=1e-3.
    Returns the FineTuneResult (delta dW_ft relative to M + edit, checkpoints, loss, info).
    """
    import finetuning
    from finetuning import hparams as FH

    hp = hparams or FH.defaults(method, model.family, **overrides)
    if hparams is not None and overrides:
        raise FadelabError(f"give hparams or field overrides {sorted(overrides)}, not both")
    base, _ = edit_of(edit)
    freeze, only = list(freeze or ()), None if only is None else list(only)

    def trainable(name: str) -> bool:
        return not _matches(name, freeze) and (only is None or _matches(name, only))
    projector = None
    if project is not None:
        from probes.causal import gradient_projector

        d, keys = edit_of(project)
        projector = gradient_projector(d, keys, project_space)
    hook = constraint_hook(l2=l2, l2_sites=l2_sites, projector=projector)
    return finetuning.train(model, data, hp, base_delta=base, seed=seed, checkpoint_every=every,
                            checkpoint_sites=list(checkpoint_sites) if checkpoint_sites else None,
                            grad_hook=hook, callback=callback, progress=progress,
                            trainable=trainable if freeze or only is not None else None)


# -- recording and probes --------------------------------------------------------------------------

def record(model, prompts: Sequence[str], sites: Sequence[str], *, delta=None,
           position: str | int = "last", subjects: Sequence[str] | None = None,
           store=None, variant: str | None = None) -> dict:
    """Activations {site: (prompt, unit)} of "text.*" sites (inputs: text.mlp.L.fc2 gives layer
    L's MLP neurons) and "unet.xattn.i.to_k/to_v" K/V channels (probes.neurons_collect), on M +
    `delta`. With a store, each site is also written as /activations/<variant>/<site>."""
    from contextlib import nullcontext

    from models import apply_delta
    from probes.neurons_collect import text_activations

    d, _ = edit_of(delta) if delta is not None else (None, {})
    with apply_delta(model, d) if d is not None else nullcontext():
        acts = text_activations(model, list(prompts), list(sites), position=position,
                                subjects=subjects)
    if store is not None:
        if not variant:
            raise FadelabError("record: writing to a store needs variant=")
        for site, a in acts.items():
            if not store.has_activations(variant, site):
                store.create_activations(variant, site, a.numpy(), dims=["prompt", "neuron"])
    return acts


def probe(model, edit, ft, *, k: int = 8, sites: Sequence[str] | None = None, steps: bool = True):
    """Weight probes (probes.weights) of fine-tune `ft` (a FineTuneResult or WeightDelta) against
    `edit`: (final Dataset over site, Dataset over (step, site) along ft's checkpoints, or None).
    Sites: the edited sites the fine-tune touched (default). kappa: +1 when dW_ft = -dW_ed."""
    from models import snapshot
    from probes.weights import WeightProbeConfig, probe_weights_final_and_steps

    d_ed, keys = edit_of(edit)
    d_ft = getattr(ft, "delta", ft)
    if sites is None:
        touched = set(d_ft.sites())
        sites = [s for s in d_ed.sites() if s in touched] or list(d_ed.sites())
    base = snapshot(model, [s for s in sites if "." in s])
    cfg = WeightProbeConfig(k=k)
    along = getattr(ft, "checkpoints", None) if steps else None
    return probe_weights_final_and_steps(base, d_ed, d_ft, along, keys, cfg, sites=list(sites))


# -- behaviour -------------------------------------------------------------------------------------

def suites(*kinds: str, n: int = 8, professions: Sequence[str] | None = None, seed: int = 0,
           road_rows: Sequence[dict] | None = None) -> list:
    """The organism's suites (probes.behaviour.organism_suites) of the given kinds ("unsafe",
    "profession", "road", "quality"), n images per line: n unsafe prompts, n images per
    profession, n seeds per RoAD prompt, n quality captions."""
    from probes.behaviour import SampleSizes, organism_suites

    kw = {"professions": tuple(professions)} if professions else {}
    sizes = SampleSizes(road_seeds=n, profession_images=n, unsafe_prompts=n, quality_prompts=n, **kw)
    return organism_suites(sizes, road_rows=road_rows, kinds=list(kinds or ("unsafe",)), seed=seed)


_JUDGES: dict[tuple, Any] = {}


def _oracle(device: str, weights="hub"):
    """The organism's oracle judge for a model loaded from `weights` (its folder's own oracle
    when it has one: models.organism.nets.oracle_dir), one per device and folder."""
    from models.organism.nets import oracle_dir

    key = (device, oracle_dir(weights))
    if key not in _JUDGES:
        from probes.behaviour import OracleJudge

        _JUDGES[key] = OracleJudge(key[1], device=device)
    return _JUDGES[key]


def evaluate(model, variants: Mapping[str, Any], suite_list, *, store=None, judges=None,
             pairs: Sequence[tuple[str, str]] | None = None, n_boot: int = 1000, steps: int | None = None,
             style: bool = True, seed: int = 0, progress: bool = False):
    """probes.behaviour.evaluate of variants {name: delta | EditResult | None} on the suites.

    judges: default the organism's oracle. steps: sampling steps (None: the family's, organism
    20). pairs: (from, to) for Delta (default M_ed -> M_ed_ft by name). style: also the oracle's
    ink share over each variant's images of these suites, stored as style.ink_share:oracle with
    a bootstrap CI. Returns probes.behaviour.Results (values(res) gives a plain table).
    """
    from probes.behaviour import EvalConfig, GenerationConfig, SampleSizes, default_pairs
    from probes.behaviour import evaluate as _evaluate

    if store is None and style:  # the style share reads the images back: keep them in a scratch store
        import tempfile

        with tempfile.TemporaryDirectory() as tmp, open_store(Path(tmp) / "eval.h5") as st:
            return evaluate(model, variants, suite_list, store=st, judges=judges, pairs=pairs,
                            n_boot=n_boot, steps=steps, style=style, seed=seed, progress=progress)
    deltas = {v: edit_of(d)[0] for v, d in variants.items()}
    judges = list(judges) if judges is not None else [_oracle(str(model.device), model.weights)]
    cfg = EvalConfig(sizes=SampleSizes(), generation=GenerationConfig(steps=steps), n_boot=n_boot,
                     seed=seed, drift_n=0, progress=progress)
    res = _evaluate(model, deltas, suite_list, judges, store, cfg, pairs=pairs, drift={})
    if style:
        _style(model, res, deltas, suite_list, store, cfg, judges,
               default_pairs(list(deltas)) if pairs is None else list(pairs))
    return res


def _style(model, res, deltas, suite_list, store, cfg, judges, pairs) -> None:
    """style.ink_share:oracle per variant over its images of these suites, and its paired
    Delta for every pair (both sides hold the same prompts and seeds)."""
    from probes.behaviour.bootstrap import bootstrap_ci, paired_delta_ci
    from probes.behaviour.generate import variant_images

    n_boot, seed = cfg.n_boot, cfg.seed
    oracle = next((j for j in judges if j.name == "oracle"), None) or _oracle(str(model.device), model.weights)
    flags = {}
    for v in deltas:
        images = np.concatenate([variant_images(model, {v: deltas[v]}, s, store, cfg.generation,
                                                progress=False)[v] for s in suite_list])
        ink = np.array([s == "ink" for s in oracle.read(images)["style"]], np.float64)
        flags[v] = ink
        lo, hi = bootstrap_ci(np.mean, ink, n_boot=n_boot, seed=seed)
        row = {"variant": v, "name": "style.ink_share:oracle", "value": float(ink.mean()),
               "ci_low": lo, "ci_high": hi, "n": len(ink), "kind": "style", "judge": "oracle",
               "suite": ",".join(s.name for s in suite_list)}
        res.metrics.append(row)
        if store is not None:
            store.require_metric(v, row["name"], row["value"], ci=(lo, hi), n=len(ink),
                                 attrs={"kind": "style", "judge": "oracle", "suite": row["suite"]})
    for a, b in pairs:
        value = float(flags[b].mean() - flags[a].mean())
        lo, hi = paired_delta_ci(np.mean, (flags[a],), np.mean, (flags[b],), n_boot=n_boot, seed=seed)
        res.deltas.append({"from": a, "to": b, "name": "style.ink_share:oracle", "value": value,
                           "ci_low": lo, "ci_high": hi, "n": len(flags[b]), "paired": True,
                           "judge": "oracle", "judge_accuracy": {}})
        if store is not None:
            store.require_metric(b, "Delta.style.ink_share:oracle", value, ci=(lo, hi),
                                 n=len(flags[b]), attrs={"kind": "style", "judge": "oracle",
                                                         "from": a, "to": b, "paired": True})


def spearman(x, y, **kwargs):
    """analysis.stats.spearman: rho of paired x, y with a bootstrap (BCa) 95% interval and
    scipy's p-value; an Estimate (estimate, ci_low, ci_high, p_value, n)."""
    from analysis.stats import spearman as _spearman

    return _spearman(x, y, **kwargs)


def bootstrap_ci(data, statistic=np.mean, **kwargs):
    """analysis.stats.bootstrap_ci: an Estimate of statistic(data) with a 95% interval."""
    from analysis.stats import bootstrap_ci as _bootstrap_ci

    return _bootstrap_ci(data, statistic, **kwargs)


def values(results) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{variant: {metric: (value, ci_low, ci_high)}} with Deltas as "Delta.<metric>" on their
    `to` variant."""
    out: dict[str, dict] = {}
    for r in results.metrics:
        out.setdefault(r["variant"], {})[r["name"]] = (float(r["value"]), float(r["ci_low"]), float(r["ci_high"]))
    for d in results.deltas:
        out.setdefault(d["to"], {})["Delta." + d["name"]] = (float(d["value"]), float(d["ci_low"]),
                                                             float(d["ci_high"]))
    return out


# -- the store and the report ----------------------------------------------------------------------

def open_store(path: str | Path, *, description: str = "fadelab.api", seed: int = 0):
    """store.Store.open(path, "a") (create or resume); use as a context manager."""
    from store import Store

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Store.open(path, "a", seeds={"experiment": seed}, description=description)


def add_edit(st, edit_id: str, result, *, variant: str | None = None) -> str:
    """Write an EditResult as the grid does: delta under M_ed/<edit_id>, its keys, edit_info.
    Returns the variant name."""
    from fadelab.cells import save_edit

    variant = variant or f"M_ed/{edit_id}"
    save_edit(st, edit_id, variant, result)
    return variant


def add_finetune(st, variant: str, result, *, loss_key: str | None = None,
                 sites: Sequence[str] | None = None) -> None:
    """Write a FineTuneResult as the grid does: the final delta and every checkpoint under
    `variant` (M_ft/<f> or M_ed_ft/<e>/<f>), and the loss curve under /loss/<loss_key>
    (default: the variant with '/' as '.'). sites: globs restricting which sites are written
    (None: all; a full UNet delta is about 380 entries per checkpoint, each a journaled write)."""
    from fadelab.cells import save_finetune
    from models import WeightDelta

    def keep(d):
        if sites is None:
            return d
        return WeightDelta({k: v for k, v in d.deltas.items() if _matches(k, sites)}, d.provenance)

    save_finetune(st, variant, keep(result.delta), [(step, keep(d)) for step, d in result.checkpoints],
                  result.loss, loss_key or variant.replace("/", "."))


def add_probes(st, edit_id: str, ft_id: str, final, steps=None) -> None:
    """Write probe() results as the grid does: probes/weights/<e>/<f> (metric, site) and
    probes/weights_steps/<e>/<f> (step, metric, site), the scalar metrics of probes.weights."""
    from probes.weights import SCALARS

    names = [m for m in SCALARS if m in final]
    table = np.stack([final[m].values for m in names]).astype(np.float64)  # (metric, site)
    st.require_array(f"probes/weights/{edit_id}/{ft_id}", table, dims=["metric", "site"],
                     attrs={"metric": names, "site": [str(s) for s in final["site"].values]})
    if steps is not None:
        like = steps["kappa"].transpose("step", "site")
        arr = np.stack([steps[m].broadcast_like(like).transpose("step", "site").values
                        for m in names], axis=1).astype(np.float64)  # (step, metric, site)
        st.require_array(f"probes/weights_steps/{edit_id}/{ft_id}", arr, dims=["step", "metric", "site"],
                         attrs={"step": [int(s) for s in steps["step"].values], "metric": names,
                                "site": [str(s) for s in steps["site"].values]})


def report(store_path: str | Path, out: str | Path) -> Path:
    """analysis.report.write_report: out/report.html, tables and figures from the store."""
    from analysis.report import write_report

    return write_report(store_path, out)
