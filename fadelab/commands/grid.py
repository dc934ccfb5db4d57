"""`fadelab status` and `fadelab merge`: where a grid stands, and its cells joined into one store."""

from __future__ import annotations

import shutil
from pathlib import Path


def cmd_status(args) -> int:
    from fadelab.grid import cell_path, cell_seconds, load_experiment, status

    exp = load_experiment(args.config, smoke=True if args.smoke else None)
    rows = status(exp, Path(args.out))
    seconds = [cell_seconds(cell_path(args.out, c), c) if s == "done" else None for c, s in rows]
    done = sum(s == "done" for _, s in rows)
    total = sum(x for x in seconds if x is not None)
    sizes = [cell_path(args.out, c).stat().st_size if s != "missing" else None for c, s in rows]
    on_disk = sum(x for x in sizes if x is not None)
    out = Path(args.out)
    free = shutil.disk_usage(out if out.exists() else Path(".")).free
    print(f"{exp.name}: {done}/{len(rows)} cells done in {args.out} ({total:,.0f} s of cell time; "
          f"cell stores {on_disk / 1e9:.2f} GB, {free / 1e9:.1f} GB free)")
    for (cell, state), sec, size in zip(rows, seconds, sizes):
        took = f"{sec:8.1f} s" if sec is not None else " " * 10
        gb = f"{size / 1e9:7.2f} GB" if size is not None else " " * 10
        print(f"  {state:8s} {took} {gb} {cell.variant:40s} {cell.id}")
    return 0


def cmd_merge(args) -> int:
    from fadelab.grid import load_experiment, merge

    path = merge(load_experiment(args.config, smoke=True if args.smoke else None), Path(args.out), allow_partial=args.partial)
    print(f"merged store: {path}")
    return 0


def register(sub) -> None:
    """Add `status` and `merge` to the `fadelab` parser."""
    s = sub.add_parser("status", help="which cells of a grid are done",
                       description="List every cell of the experiment with done / partial / missing, its "
                                   "wall time and the size of its store, and the disk left.")
    s.add_argument("config", nargs="?", default=None,
                   help="experiment TOML or a shipped name (default: organism)")
    s.add_argument("--out", default="fadelab-out", help="the run's output folder")
    s.add_argument("--smoke", action="store_true", help="the config's smoke grid (as fadelab run --smoke)")
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
