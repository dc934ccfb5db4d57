"""`fadelab status` and `fadelab merge`: where a grid stands, and its cells joined into one store."""

from __future__ import annotations

import shutil
from pathlib import Path


#: short names of the stages in `fadelab status --stages` (fadelab.cells.Context.stage)
STAGE_ABBREV = {"edit": "edit", "finetune": "ft", "write": "write", "evaluate": "eval",
                "project_out": "cf", "order_swap": "swap", "re_edit": "reedit",
                "weight_probes": "wprobe", "neuron_probes": "nprobe"}


def cmd_status(args) -> int:
    from fadelab.grid import cell_mark, cell_path, load_experiment, status

    exp = load_experiment(args.config, smoke=True if args.smoke else None)
    rows = status(exp, Path(args.out))
    marks = [cell_mark(cell_path(args.out, c), c) if s == "done" else None for c, s in rows]
    timing = [(m["seconds"], m["stages"]) if m is not None else None for m in marks]
    seconds = [t[0] if t is not None else None for t in timing]
    done = sum(s == "done" for _, s in rows)
    total = sum(x for x in seconds if x is not None)
    sizes = [cell_path(args.out, c).stat().st_size if s != "missing" else None for c, s in rows]
    on_disk = sum(x for x in sizes if x is not None)
    out = Path(args.out)
    free = shutil.disk_usage(out if out.exists() else Path(".")).free
    print(f"{exp.name}: {done}/{len(rows)} cells done in {args.out} ({total:,.0f} s of cell time; "
          f"cell stores {on_disk / 1e9:.2f} GB, {free / 1e9:.1f} GB free)")
    if args.stages:
        print(stage_totals(timing))
        mps = [m["mps"] for m in marks if m is not None]
        if any(m is not None for m in mps):
            print(f"cells run as CUDA MPS clients: {sum(m is True for m in mps)} of {len(mps)} done "
                  f"({sum(m is None for m in mps)} not recorded)")
    for (cell, state), t, size in zip(rows, timing, sizes):
        took = f"{t[0]:8.1f} s" if t is not None else " " * 10
        gb = f"{size / 1e9:7.2f} GB" if size is not None else " " * 10
        line = f"  {state:8s} {took} {gb} {cell.variant:40s} {cell.id}"
        if args.stages and t is not None:
            line += "  " + stage_line(*t)
        print(line)
    return 0


def stage_line(wall: float, stages: dict[str, float]) -> str:
    """"ft 60.1 eval 12.0 ... other 3.2" for one cell: its stages in the order they ran, and the
    wall time they leave out (set-up, bookkeeping); "(no stages recorded)" for older cells."""
    if not stages:
        return "(no stages recorded)"
    parts = [f"{STAGE_ABBREV.get(k, k)} {v:.1f}" for k, v in stages.items()]
    return " ".join(parts + [f"other {max(0.0, wall - sum(stages.values())):.1f}"])


def stage_totals(timing) -> str:
    """One line: each stage's seconds summed over the done cells, largest first, with its share
    of their wall time."""
    done = [t for t in timing if t is not None]
    wall = sum(t[0] for t in done)
    sums: dict[str, float] = {}
    for w, stages in done:
        for k, v in stages.items():
            sums[k] = sums.get(k, 0.0) + v
        if stages:
            sums["other"] = sums.get("other", 0.0) + max(0.0, w - sum(stages.values()))
    if not sums:
        return "stages: none recorded"
    parts = [f"{k} {v:,.0f} s ({v / wall:.0%})" for k, v in sorted(sums.items(), key=lambda kv: -kv[1])]
    return "stages over the done cells: " + ", ".join(parts)


def cmd_merge(args) -> int:
    from fadelab.grid import load_experiment, merge

    path = merge(load_experiment(args.config, smoke=True if args.smoke else None), Path(args.out), allow_partial=args.partial)
    print(f"merged store: {path}")
    return 0


def register(sub) -> None:
    """Add `status` and `merge` to the `fadelab` parser."""
    s = sub.add_parser("status", help="which cells of a grid are done",
                       description="List every cell of the experiment with done / partial / missing, its "
                                   "wall time and the size of its store, and the disk left; with "
                                   "--stages, where each cell's time went.")
    s.add_argument("config", nargs="?", default=None,
                   help="experiment TOML or a shipped name (default: organism)")
    s.add_argument("--out", default="fadelab-out", help="the run's output folder")
    s.add_argument("--smoke", action="store_true", help="the config's smoke grid (as fadelab run --smoke)")
    s.add_argument("--stages", action="store_true",
                   help="also each done cell's seconds per stage (edit, ft, write, eval, cf, swap, "
                        "reedit, wprobe, nprobe, other) and their totals over the grid")
    s.set_defaults(func=cmd_status)

    m = sub.add_parser("merge", help="join the cell stores into DIR/experiment.h5",
                       description="Write DIR/experiment.h5, one store that links every cell's "
                                   "store (HDF5 external links: no array is copied).")
    m.add_argument("config", nargs="?", default=None,
                   help="experiment TOML or a shipped name (default: organism)")
    m.add_argument("--out", default="fadelab-out", help="the run's output folder")
    m.add_argument("--partial", action="store_true", help="join the finished cells only")
    m.add_argument("--smoke", action="store_true", help="the config's smoke grid (as fadelab run --smoke)")
    m.set_defaults(func=cmd_merge)
