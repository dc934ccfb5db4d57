"""The experiment grid: a TOML config becomes independent cells with stable ids and own stores.

What it offers:
    Experiment, load_experiment(path, smoke=None)   the parsed config (frozen); bad input ->
                                         FadelabError; smoke=True applies the config's [smoke]
                                         table (random weights, tiny sizes: proves the grid runs)
    Cell, cells(exp)                     every unit of work, ordered so dependencies come first
    parse_shard("i/n"), shard(cells, i, n)   one slice of the grid for one process or array task
    cell_path(out, cell), cell_done(path)     where a cell writes, and whether it finished
    status(exp, out)                     done / partial / missing per cell
    cell_mark(path, cell)                a done cell's wall seconds, seconds per stage and MPS flag
    merge(exp, out)                      DIR/experiment.h5: one store joining every cell file by
                                         HDF5 external links (no array is copied)

The cells of a grid, with the variant each one produces (docs/store.md names variants):

    base                    M                the unedited model, evaluated once
    edit.<e>                M_ed/<e>         an edit (UCE, ReFACT) and its behaviour
    finetune.<f>            M_ft/<f>         a fine-tune of the base model
    edit_finetune.<e>.<f>   M_ed_ft/<e>/<f>  the fine-tune on top of the edit, probes, causal tests

A cell's id is ``<kind>.<edit>.<finetune>.<hash>``, the hash over the canonical JSON of
everything that decides its result (model, seed, samples, the edit's and the fine-tune's
sections), so renaming nothing and changing a hyperparameter gives a new id, and a cell that
finished is never recomputed. Each cell writes its own store file (HDF5 has one writer per
file), so any number of processes, GPUs or Slurm array tasks can run cells side by side.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import FadelabError

log = logging.getLogger(__name__)

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
EDIT_METHODS = ("uce-erase", "uce-moderate", "uce-replace", "uce-debias", "refact")
FINETUNE_METHODS = ("full", "lora", "dora", "dreambooth", "textual-inversion")
SECTIONS = ("experiment", "samples", "generation", "judges", "data", "edit", "finetune", "ablation",
            "probes", "report", "smoke")
#: what a [smoke] table may hold: [experiment] keys, tables merged into their sections, and
#: [smoke.hparams.<method>] merged into the hparams of every edit / fine-tune of that method
SMOKE_HEAD = ("weights", "scale", "image_size", "dtype")
#: [smoke] edits = [ids], finetunes = [ids]: run only these (after the rank ablation's expansion);
#: finetunes = [] leaves base and edit cells (families the fine-tuning loop does not train yet)
SMOKE_SELECT = ("edits", "finetunes")
SMOKE_TABLES = ("samples", "generation", "judges", "data", "probes", "ablation", "hparams")


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment config.

    Attributes:
        name: short name of the experiment (letters, digits, - and _).
        family: organism, sd14, sdxl, flux-schnell, or a local diffusers folder.
        weights: "default" (the organism's shipped weights; the hub for real families),
            "hub", "random" (the exact architecture, random weights) or a local folder.
        scale: width scale for random builds (1.0 = the real sizes).
        seed: the experiment's seed; every cell derives its generators from it.
        smoke: a tiny run that proves the grid executes (few steps, few images).
        samples: sample sizes of the behavioural evaluation ([samples]).
        edits: the [[edit]] tables (id, method, request fields, [edit.hparams]).
        finetunes: the [[finetune]] tables after the rank ablation is expanded.
        probes, report: their sections, passed to the probes and the report as they are.
        text: the config's text, recorded in every store.
        generation: [generation] sampling settings of the evaluation (steps, guidance_scale,
            batch_size, height, width; probes.behaviour.GenerationConfig).
        judges: [judges] which judges label images on real families (fadelab.plan.make_judges).
        data: [data] named data folders: benchmarks (RoAD, profession prompts, I2P, COCO) and
            the fine-tuning sets that [[finetune]] tables name in `data`.
        image_size: pixels of every image the pipeline makes by default (None: the family's);
            smoke runs set it small.
        dtype: "float32" (default) or "bfloat16"/"float16" for the loaded model.
        folder: the config file's folder (relative data paths also resolve against its parent).
    """

    name: str
    family: str
    weights: str
    scale: float
    seed: int
    smoke: bool
    samples: dict
    edits: tuple[dict, ...]
    finetunes: tuple[dict, ...]
    probes: dict
    report: dict
    text: str
    generation: dict = field(default_factory=dict)
    judges: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    image_size: int | None = None
    dtype: str = "float32"
    folder: str = "."

    def edit(self, edit_id: str) -> dict:
        return _by_id(self.edits, edit_id, "edit")

    def finetune(self, ft_id: str) -> dict:
        return _by_id(self.finetunes, ft_id, "finetune")


def _by_id(tables: tuple[dict, ...], wanted: str, kind: str) -> dict:
    for table in tables:
        if table["id"] == wanted:
            return table
    raise FadelabError(f"no {kind} with id {wanted!r}; ids are {[t['id'] for t in tables]}")


def _check_id(value: Any, where: str) -> str:
    ok = isinstance(value, str) and value and all(c.isalnum() or c in "-_" for c in value)
    if not ok:
        raise FadelabError(f"{where}: id {value!r} must be a non-empty string of letters, digits, - and _")
    return value


def _tables(raw: dict, section: str, methods: tuple[str, ...], source: str) -> list[dict]:
    tables = raw.get(section, [])
    if isinstance(tables, dict):
        tables = [tables]
    seen: set[str] = set()
    out = []
    for i, table in enumerate(tables):
        where = f"{source}: [[{section}]] #{i + 1}"
        ident = _check_id(table.get("id"), where)
        if ident in seen:
            raise FadelabError(f"{where}: id {ident!r} is used twice")
        seen.add(ident)
        if table.get("method") not in methods:
            raise FadelabError(f"{where} ({ident}): method {table.get('method')!r} is not one of "
                               f"{', '.join(methods)}")
        out.append(copy.deepcopy(table))
    return out


def _expand_ranks(finetunes: list[dict], ablation: dict, source: str) -> list[dict]:
    """[ablation] lora_ranks = [4, 8, 16] adds, per LoRA/DoRA fine-tune, one copy per other rank
    with id <id>-r<rank>; the listed fine-tune keeps its own rank."""
    ranks = ablation.get("lora_ranks", [])
    if not isinstance(ranks, list) or not all(isinstance(r, int) and r > 0 for r in ranks):
        raise FadelabError(f"{source}: [ablation] lora_ranks = {ranks!r} must be a list of positive integers")
    out = []
    for ft in finetunes:
        out.append(ft)
        if ft["method"] not in ("lora", "dora"):
            continue
        own = ft.get("hparams", {}).get("rank")
        for r in ranks:
            if r == own:
                continue
            extra = copy.deepcopy(ft)
            extra["id"] = f"{ft['id']}-r{r}"
            extra.setdefault("hparams", {})["rank"] = r
            extra["ablation_of"] = ft["id"]
            out.append(extra)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _apply_smoke(raw: dict, source: str) -> dict:
    """The config with its [smoke] table applied (see SMOKE_HEAD, SMOKE_TABLES)."""
    smoke = raw.get("smoke", {})
    accepted = SMOKE_HEAD + SMOKE_SELECT + SMOKE_TABLES
    unknown = sorted(set(smoke) - set(accepted))
    if unknown:
        raise FadelabError(f"{source}: [smoke] key(s) {unknown}; accepted: {list(accepted)}")
    raw = copy.deepcopy(raw)
    head = raw.setdefault("experiment", {})
    head["smoke"] = True
    for key in SMOKE_HEAD:
        if key in smoke:
            head[key] = smoke[key]
    for key in ("samples", "generation", "judges", "data", "probes", "ablation"):
        if key in smoke:
            raw[key] = _merge(raw.get(key, {}), smoke[key])
    by_method = smoke.get("hparams", {})
    for section in ("edit", "finetune"):
        tables = raw.get(section, [])
        for table in tables if isinstance(tables, list) else [tables]:
            if table.get("method") in by_method:
                table["hparams"] = _merge(table.get("hparams", {}), by_method[table["method"]])
    return raw


def _select(tables: list[dict], ids, what: str, source: str) -> list[dict]:
    if ids is None:
        return tables
    known = [t["id"] for t in tables]
    if not isinstance(ids, list) or any(i not in known for i in ids):
        raise FadelabError(f"{source}: [smoke] {what} = {ids!r}: give a list of ids among {known}")
    return [t for t in tables if t["id"] in ids]


def load_experiment(path: str | os.PathLike | None = None, smoke: bool | None = None) -> Experiment:
    """Parse an experiment config (default experiments/organism.toml).

    A bare name such as "sd14" means experiments/sd14.toml. smoke=True (or `smoke = true` in
    [experiment]) applies the config's [smoke] table: [experiment] keys (weights, scale,
    image_size, dtype), tables merged into [samples], [generation], [judges], [data], [probes],
    [ablation], [smoke.hparams.<method>] merged into every edit's and fine-tune's hparams of
    that method, and edits / finetunes = [ids] keeping only those tables. Raises FadelabError naming the file and the bad value for unknown sections,
    methods, duplicate ids or a wrong type.
    """
    if path is None:
        path = EXPERIMENTS_DIR / "organism.toml"
    path = Path(path)
    if not path.suffix and not path.exists():
        path = EXPERIMENTS_DIR / f"{path}.toml"
    if not path.exists():
        known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))
        raise FadelabError(f"experiment config {str(path)!r} does not exist; shipped configs: {known}")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FadelabError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise FadelabError(f"{path}: unknown section(s) {unknown}; accepted: {list(SECTIONS)}")
    if smoke or (smoke is None and bool(raw.get("experiment", {}).get("smoke", False))):
        raw = _apply_smoke(raw, str(path))
    head = raw.get("experiment", {})
    try:
        scale = float(head.get("scale", 1.0))
        seed = int(head.get("seed", 0))
        image_size = None if head.get("image_size") is None else int(head["image_size"])
    except (TypeError, ValueError):
        raise FadelabError(f"{path}: [experiment] scale, seed and image_size must be numbers") from None
    dtype = str(head.get("dtype", "float32"))
    if dtype not in ("float32", "bfloat16", "float16"):
        raise FadelabError(f"{path}: [experiment] dtype = {dtype!r}; accepted: float32, bfloat16, float16")
    ws = raw.get("probes", {}).get("weight_sites", 0)
    if isinstance(ws, bool) or not isinstance(ws, int) or ws < 0:
        raise FadelabError(f"{path}: [probes] weight_sites = {ws!r}; give 0 (every site) or a positive integer")
    edits = _tables(raw, "edit", EDIT_METHODS, str(path))
    finetunes = _expand_ranks(_tables(raw, "finetune", FINETUNE_METHODS, str(path)),
                              raw.get("ablation", {}), str(path))
    if head.get("smoke"):
        edits = _select(edits, raw.get("smoke", {}).get("edits"), "edits", str(path))
        finetunes = _select(finetunes, raw.get("smoke", {}).get("finetunes"), "finetunes", str(path))
    return Experiment(
        name=_check_id(head.get("name", path.stem), f"{path}: [experiment] name"),
        family=str(head.get("family", "organism")), weights=str(head.get("weights", "default")),
        scale=scale, seed=seed, smoke=bool(head.get("smoke", False)),
        samples=dict(raw.get("samples", {})), edits=tuple(edits), finetunes=tuple(finetunes),
        probes=dict(raw.get("probes", {})), report=dict(raw.get("report", {})), text=text,
        generation=dict(raw.get("generation", {})), judges=dict(raw.get("judges", {})),
        data=dict(raw.get("data", {})), image_size=image_size, dtype=dtype,
        folder=str(path.resolve().parent))


@dataclass(frozen=True)
class Cell:
    """One unit of work: kind in {base, edit, finetune, edit_finetune}, with its edit and
    fine-tune ids (None where the kind has none) and a stable id."""

    kind: str
    edit: str | None
    finetune: str | None
    id: str

    @property
    def variant(self) -> str:
        return {"base": "M", "edit": f"M_ed/{self.edit}", "finetune": f"M_ft/{self.finetune}",
                "edit_finetune": f"M_ed_ft/{self.edit}/{self.finetune}"}[self.kind]

    @property
    def needs(self) -> tuple[str, ...]:
        """Kinds of cells whose results this one reuses when they are done (else recomputes)."""
        return ("edit",) if self.kind == "edit_finetune" else ()


def _cell_id(exp: Experiment, kind: str, edit: str | None, ft: str | None) -> str:
    decisive = {"family": exp.family, "weights": exp.weights, "scale": exp.scale, "seed": exp.seed,
                "smoke": exp.smoke, "samples": exp.samples, "probes": exp.probes,
                "edit": exp.edit(edit) if edit else None, "finetune": exp.finetune(ft) if ft else None,
                "kind": kind}
    for key in ("generation", "judges", "data"):  # only when set: organism ids stay as they were
        if getattr(exp, key):
            decisive[key] = getattr(exp, key)
    for key, default in (("image_size", None), ("dtype", "float32")):
        if getattr(exp, key) != default:
            decisive[key] = getattr(exp, key)
    digest = hashlib.sha1(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:8]
    return f"{kind}.{edit or '-'}.{ft or '-'}.{digest}"


def cells(exp: Experiment) -> list[Cell]:
    """Every cell of the grid: base, edits, fine-tunes, then edit x fine-tune."""
    out = [Cell("base", None, None, _cell_id(exp, "base", None, None))]
    out += [Cell("edit", e["id"], None, _cell_id(exp, "edit", e["id"], None)) for e in exp.edits]
    out += [Cell("finetune", None, f["id"], _cell_id(exp, "finetune", None, f["id"]))
            for f in exp.finetunes]
    out += [Cell("edit_finetune", e["id"], f["id"], _cell_id(exp, "edit_finetune", e["id"], f["id"]))
            for e in exp.edits for f in exp.finetunes]
    return out


def parse_shard(text: str | None) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise FadelabError(f"--shard {text!r}: give i/n with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise FadelabError(f"--shard {text!r}: needs n >= 1 and 0 <= i < n")
    return i, n


def shard(all_cells: list[Cell], i: int, n: int) -> list[Cell]:
    """Cells i, i + n, i + 2n, ... (every cell lands in exactly one of the n shards)."""
    return all_cells[i::n]


def cell_path(out: str | os.PathLike, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.id}.h5"


def done_mark(cell: Cell) -> str:
    """The store array a cell writes last: /arrays/cell_done/<cell id> (one owner per cell)."""
    return f"cell_done/{cell.id}"


def cell_done(path: str | os.PathLike, cell: Cell) -> bool:
    """Whether the cell store at `path` holds the cell's completion mark (written last)."""
    from store import Store, StoreError

    if not Path(path).exists():
        return False
    try:
        with Store.open(path, "r") as st:
            return st.is_complete(f"/arrays/{done_mark(cell)}")
    except StoreError:
        return False


def cell_mark(path: str | os.PathLike, cell: Cell) -> dict[str, Any] | None:
    """What a done cell's completion mark holds, in one read of its store: "seconds" (wall),
    "stages" ({stage: seconds} in the order they ran: edit, finetune, write, evaluate, order_swap,
    re_edit, project_out, weight_probes, neuron_probes, from `Context.stage`; {} for cells marked
    before they were recorded; the wall time less their sum is set-up and bookkeeping) and "mps"
    (whether it ran as a CUDA MPS client, which changes its timings; None when not recorded).
    None if the cell is not done."""
    from store import Store, StoreError

    if not Path(path).exists():
        return None
    try:
        with Store.open(path, "r") as st:  # one open: the mark's completeness, then its value
            if not st.is_complete(f"/arrays/{done_mark(cell)}"):
                return None
            attrs = st.array_attrs(done_mark(cell))
            mps = attrs.get("mps")
            return {"seconds": float(st.read_array(done_mark(cell))[0]),
                    "stages": {k: float(v) for k, v in attrs.get("stages") or []},
                    "mps": None if mps is None else bool(mps)}
    except (StoreError, KeyError, IndexError):
        return None


def status(exp: Experiment, out: str | os.PathLike) -> list[tuple[Cell, str]]:
    """(cell, "done" | "partial" | "missing") for every cell of the grid."""
    rows = []
    for cell in cells(exp):
        path = cell_path(out, cell)
        rows.append((cell, "done" if cell_done(path, cell) else "partial" if path.exists() else "missing"))
    return rows


def _join(f, cells: list, path: str, owners: list[int], files: list[Path], out: Path) -> None:
    """Fill the group `path` of the grid file `f`, which the open cell files `cells[k]` for k in
    `owners` (grid order) all have: a child that one cell has, or a dataset, becomes an external
    link into the first owner's file; a group several cells share becomes a group (with the first
    owner's attributes) filled the same way. Only shared groups are read, so the walk stays near
    the top of the files (every node of every file was walked before: 1.7 s of the GPU main job's
    merge, 2026-12-07)."""
    import h5py

    kids: dict[str, list[int]] = {}
    group: dict[str, bool] = {}
    for k in owners:
        node = cells[k][path]
        for name in node:
            kids.setdefault(name, []).append(k)
            if name not in group:
                group[name] = node.get(name, getclass=True) is h5py.Group
    for name, own in kids.items():
        child = f"{path.rstrip('/')}/{name}"
        if child in f:  # a group of the grid file's own (its manifest's /arrays)
            if group[name] and isinstance(f[child], h5py.Group):
                _join(f, cells, child, own, files, out)
        elif len(own) == 1 or not group[name]:
            # one owner, or a deterministic copy several cells wrote (an edit x fine-tune cell
            # evaluates its M_ed again to pair the Delta): the first cell in grid order
            f[child] = h5py.ExternalLink(os.path.relpath(files[own[0]], out), child)
        else:
            new = f.create_group(child)
            for key, value in cells[own[0]][child].attrs.items():
                new.attrs[key] = value
            _join(f, cells, child, own, files, out)


def _cells_code_version(cells: list) -> str:
    """The commit the open cell files `cells` were computed with (the report's header names it):
    one, or "mixed:" and each, for a grid resumed across commits; "unknown" where no cell
    recorded it."""
    seen = []
    for f in cells:
        v = f.attrs.get("code_version", "unknown")
        v = v.decode() if isinstance(v, bytes) else str(v)
        if v not in seen:
            seen.append(v)
    return seen[0] if len(seen) == 1 else ("mixed: " + ", ".join(seen) if seen else "unknown")


def merge(exp: Experiment, out: str | os.PathLike, *, allow_partial: bool = False) -> Path:
    """Write DIR/experiment.h5: the grid's cell stores joined by external links.

    Every top-level path that only one cell wrote becomes an external link into that cell's
    file (relative, so the folder can move); paths several cells share (e.g. /metrics/M_ed)
    become groups (with the first owner's attributes) whose children are linked. A dataset
    several cells wrote (an edit x fine-tune cell evaluates M_ed again, on the same images, to
    pair its Delta) is linked to the first of them in grid order. Rebuilt from scratch and renamed into place, so a merge that is
    interrupted leaves the previous one. Raises FadelabError when cells are not done, unless
    `allow_partial` (then only finished cells are joined).
    """
    import h5py

    from store import Store

    out = Path(out)
    rows = status(exp, out)
    missing = [c.id for c, s in rows if s != "done"]
    if missing and not allow_partial:
        raise FadelabError(f"{len(missing)} of {len(rows)} cells are not done (first: {missing[0]}); "
                           "run them first (fadelab run) or pass --partial")
    files = [cell_path(out, c) for c, s in rows if s == "done"]
    target = out / "experiment.h5"
    tmp = out / ".experiment.h5.tmp"
    if tmp.exists():
        tmp.unlink()
    manifest = {"cells": [{"id": c.id, "kind": c.kind, "edit": c.edit, "finetune": c.finetune,
                           "variant": c.variant, "state": s} for c, s in rows]}
    with contextlib.ExitStack() as stack:
        cells_open = [stack.enter_context(h5py.File(p, "r", locking=False)) for p in files]
        with Store.open(tmp, "a", config=exp.text, seeds={"experiment": exp.seed},
                        code_version=_cells_code_version(cells_open),
                        description=f"fadelab grid {exp.name}: cells joined by external links") as st:
            st.create_array("grid_manifest", json.dumps(manifest))
        f = stack.enter_context(h5py.File(tmp, "a", locking=False))
        _join(f, cells_open, "/", list(range(len(files))), files, out)
    os.replace(tmp, target)
    log.info("merged %d cell stores into %s", len(files), target)
    return target
