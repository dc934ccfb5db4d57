"""Seconds of each stage of `fadelab run`'s last part (merge, then the report) on a grid whose
cells are all done, in one process:

    python3 scripts/report_timing.py CONFIG OUT [--smoke]

Prints one line per stage: imports, merge, metric index, joined, tables, figures, then
write_report end to end (which repeats index, joined, tables and figures and writes the page),
so a slow report can be pinned to a stage. scripts/device_next.sh 5 runs it after the main job.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(config: str, out: str, smoke: bool = False) -> None:
    t0 = time.perf_counter()
    marks: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        marks.append((name, now - t0))
        print(f"{name:<14} {now - t0:7.2f} s", flush=True)
        t0 = now

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 -- a fresh machine builds its font cache here

    from analysis import report
    from fadelab.grid import load_experiment, merge
    from store import Store
    mark("imports")
    store = merge(load_experiment(config, smoke=smoke or None), Path(out))
    mark("merge")
    with Store.open(store, "r") as st:
        index = report._metric_index(st)
        mark("metric index")
        ds = report.joined(st, index)
        mark("joined")
        report.tables(st, ds, index)
        mark("tables")
        report.figures(st, ds)
        mark("figures")
    report.write_report(store, Path(out) / "report-timing")
    mark("write_report")
    print(f"{'total':<14} {sum(s for _, s in marks):7.2f} s ({len(index)} metrics)")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--smoke"]
    if len(args) != 2:
        sys.exit(__doc__)
    main(args[0], args[1], smoke="--smoke" in sys.argv)
