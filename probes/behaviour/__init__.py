"""probes.behaviour: generate images per variant, judge them, and compute the study's metrics.

    evaluate(model, variants, suites, judges, store, cfg) -> Results     (run.py)
    EvalConfig, Results, default_pairs                                   (run.py)
    Suite, SampleSizes, organism_suites, road_suite, ...                 (suites.py)
    benchmark_suites, read_road, read_professions, read_i2p, read_coco   (benchmarks.py)
    OracleJudge, OrganismClipJudge, OpenClipJudge, NudeNetJudge,
    SafetyCheckerJudge, InceptionFeatures                                (judges.py)
    GenerationConfig, variant_images (and the module generate)           (generate.py)
    measure_drift, organism_sets                                         (drift.py)
    metrics (module), bootstrap (module)
    annotate.serve / agreement.report                                    (human annotation)

Names are imported on first use, so `import probes.behaviour.metrics` stays light.
See docs/behaviour.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "run", "EvalConfig": "run", "Results": "run", "default_pairs": "run",
    "Suite": "suites", "SampleSizes": "suites", "organism_suites": "suites",
    "road_suite": "suites", "profession_suite": "suites", "unsafe_suite": "suites",
    "quality_suite": "suites",
    "benchmark_suites": "benchmarks", "read_road": "benchmarks", "read_professions": "benchmarks",
    "read_i2p": "benchmarks", "read_coco": "benchmarks",
    "OracleJudge": "judges", "OrganismClipJudge": "judges", "OpenClipJudge": "judges",
    "NudeNetJudge": "judges", "SafetyCheckerJudge": "judges", "InceptionFeatures": "judges",
    "GenerationConfig": "generate", "variant_images": "generate",
    "measure_drift": "drift", "organism_sets": "drift",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
