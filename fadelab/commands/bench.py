"""`fadelab bench`: measure the lab against the reference tools and write docs/benchmarks.md.

    fadelab bench [--only NAME,...] [--out docs/benchmarks.md] [--quick] [--device auto]
                  [--rows FILE.json ...] [--json FILE] [--assumptions FILE]

Without --only every benchmark runs (full sizes need CUDA; --quick runs narrow copies on any
device). --rows merges rows measured elsewhere (scripts/device_bench.py writes them); given
alone it measures nothing and only merges, and with --only gpu-hours the estimate is computed
from the rates those rows carry.
"""

from __future__ import annotations

import json
from pathlib import Path


def cmd_bench(args) -> int:
    from fadelab import bench
    from fadelab.cli import _device
    from models.errors import FadelabError

    prior = [row for path in args.rows or [] for row in bench.read_rows_json(path)]
    if args.only is not None:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        if not names:
            raise FadelabError(f"--only {args.only!r}: name at least one of {', '.join(bench.BENCHMARKS)}")
    else:
        names = [] if args.rows else None
    assumptions = bench.GridAssumptions.from_file(args.assumptions) if args.assumptions else None
    device = _device(args.device)
    new = bench.run(names, device, quick=args.quick, prior=prior, assumptions=assumptions) if names != [] else []
    rows = prior + new
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": bench.rows_to_json(rows)}, indent=1, default=str))
    written = bench.write(args.out, rows)
    for r in rows:
        print(f"{r.benchmark} [{r.device}]: {bench.fmt(r.fadelab)} vs {bench.fmt(r.baseline)} {r.unit}, "
              f"ratio {bench.fmt(r.ratio)}")
    print(f"{args.out}: {len(written)} rows ({len(rows)} new or re-measured)")
    return 0


def register(sub) -> None:
    """Add `fadelab bench` to the `fadelab` parser."""
    from fadelab.bench import BENCHMARKS

    b = sub.add_parser(
        "bench", help="benchmarks against the reference tools (writes docs/benchmarks.md)",
        description="Measure the lab against what a researcher would use instead (a stock diffusers "
                    "pipeline, the raw disk, ...), baseline in the same run, and merge the rows into a "
                    "Markdown table. Full sizes need a CUDA device; --quick runs narrow models anywhere.")
    b.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    b.add_argument("--out", default="docs/benchmarks.md", help="the table to update (default docs/benchmarks.md)")
    b.add_argument("--quick", action="store_true", help="narrow models and tiny sizes (a check, not a measurement)")
    b.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    b.add_argument("--rows", nargs="+", default=None, metavar="FILE",
                   help="JSON rows from scripts/device_bench.py to merge (alone: merge only, measure nothing)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    b.add_argument("--assumptions", default=None, metavar="FILE",
                   help="TOML or JSON file changing the GPU-hours estimate's grid (fadelab.bench.GridAssumptions)")
    b.set_defaults(func=cmd_bench)
