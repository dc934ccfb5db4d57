"""Readers of the public benchmark files the study evaluates on, from a user-given path.

What it offers:
    read_road(path)                           RoAD rows (ReFACT's benchmark: test or validation)
    read_professions(path, professions, n)    UCE's profession prompts -> n images per profession
    read_i2p(path, n, seed, categories=None)  n prompts sampled from I2P (UCE/ESD's CSV)
    read_coco(path, n, seed=None)             COCO captions with their evaluation seeds
    benchmark_suites(folder, sizes, ...)      the four as suites, from files in one folder
    FILES                                     the file names of ../shared/data (the public copies)

Public origins (../shared/data/README.md): RoAD from technion-cs-nlp/ReFACT (road/RoAD_*.csv);
profession_prompts.csv, unsafe-prompts4703.csv and coco_30k.csv from
rohitgandikota/unified-concept-editing (data/). Nothing here needs that folder: every reader
takes a path. A file whose header lacks a needed column raises FadelabError listing what is
missing.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.errors import FadelabError

from .suites import SampleSizes, Suite, profession_suite, quality_suite, road_suite, unsafe_suite

FILES = {"road": "RoAD_test.csv", "profession": "profession_prompts.csv",
         "unsafe": "unsafe-prompts4703.csv", "quality": "coco_30k.csv"}

#: RoAD columns every row needs (RoAD_validation.csv has no Positive_oracle columns, which the
#: metrics do not use).
ROAD_REQUIRED = (["Type", "Prompt", "Old", "New"]
                 + [f"{c}{i}" for i in range(1, 6)
                    for c in ("Positive", "Positive_old", "Positive_new")]
                 + [f"{c}{i}" for i in range(1, 6) for c in ("Negative", "Negative_new")])
PROFESSION_REQUIRED = ("prompt", "evaluation_seed", "profession")
I2P_REQUIRED = ("prompt", "evaluation_seed")
COCO_REQUIRED = ("prompt", "evaluation_seed")


def _read(path: Path | str, required: Sequence[str], what: str) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FadelabError(f"{what} file {path} does not exist; give the path of the CSV")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise FadelabError(f"{path} is not a {what} CSV: missing columns {', '.join(missing)} "
                               f"(it has {', '.join(header[:8]) or 'no header'}"
                               f"{', ...' if len(header) > 8 else ''})")
        return list(reader)


def read_road(path: Path | str) -> list[dict[str, str]]:
    """Every RoAD row (Type, Prompt, Old, New, Positive*, Negative* ...) as a dict."""
    return _read(path, ROAD_REQUIRED, "RoAD")


def read_professions(path: Path | str, professions: Sequence[str], n: int = 30
                     ) -> tuple[list[str], list[int], list[str]]:
    """n images per profession from UCE's profession prompts: (prompts, seeds, professions).

    Each profession has 10 templates with one evaluation_seed each; image j uses template
    j mod 10 with seed evaluation_seed + j // 10 (so 30 images = 10 templates x 3 seeds).
    Profession names match case-insensitively ("ceo" finds "CEO").
    """
    rows = _read(path, PROFESSION_REQUIRED, "profession prompts")
    by_prof: dict[str, list[dict]] = {}
    for r in rows:
        by_prof.setdefault(r["profession"].strip().lower(), []).append(r)
    prompts, seeds, profs = [], [], []
    for p in professions:
        found = by_prof.get(p.lower())
        if not found:
            raise FadelabError(f"profession {p!r} is not in {path} (it has e.g. "
                               f"{', '.join(sorted(by_prof)[:6])})")
        for j in range(n):
            r = found[j % len(found)]
            prompts.append(r["prompt"])
            seeds.append(int(r["evaluation_seed"]) + j // len(found))
            profs.append(p)
    return prompts, seeds, profs


def read_i2p(path: Path | str, n: int = 50, seed: int = 0, categories: Sequence[str] | None = None
             ) -> list[dict[str, str]]:
    """n I2P rows drawn without replacement (numpy Generator(seed)); optional category filter.

    `categories` keeps rows whose comma-separated `categories` field names any of them
    (e.g. "sexual", "violence").
    """
    required = I2P_REQUIRED + (("categories",) if categories else ())
    rows = _read(path, required, "I2P")
    if categories:
        want = {c.strip().lower() for c in categories}
        rows = [r for r in rows if want & {c.strip().lower() for c in r["categories"].split(",")}]
    if n > len(rows):
        raise FadelabError(f"asked for {n} I2P prompts but {path} has {len(rows)} matching rows")
    pick = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    return [rows[i] for i in sorted(pick.tolist())]


def read_coco(path: Path | str, n: int, seed: int | None = None) -> list[dict[str, str]]:
    """n COCO caption rows: the first n, or n drawn with numpy Generator(seed) if seed is given."""
    rows = _read(path, COCO_REQUIRED, "COCO captions")
    if n > len(rows):
        raise FadelabError(f"asked for {n} captions but {path} has {len(rows)}")
    if seed is None:
        return rows[:n]
    pick = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    return [rows[i] for i in sorted(pick.tolist())]


def benchmark_suites(folder: Path | str, sizes: SampleSizes = SampleSizes(), *,
                     kinds: Sequence[str] = ("road", "profession", "unsafe", "quality"),
                     road_rows: Sequence[int] | None = None, seed: int = 0,
                     files: dict[str, str] | None = None, reference=None) -> list[Suite]:
    """The real benchmarks as suites, read from `folder` (file names: FILES, or `files`).

    road_rows selects RoAD rows by index (one edit per variant, as ReFACT evaluates);
    reference: FID reference for the quality suite (images uint8 (N, H, W, 3) or (mu, Sigma)).
    """
    folder = Path(folder)
    names = {**FILES, **(files or {})}
    out = []
    if "road" in kinds:
        rows = read_road(folder / names["road"])
        if road_rows is not None:
            bad = [i for i in road_rows if not 0 <= i < len(rows)]
            if bad:
                raise FadelabError(f"RoAD rows {bad}: the file has rows 0..{len(rows) - 1}")
            rows = [rows[i] for i in road_rows]
        out.append(road_suite(rows, sizes.road_seeds))
    if "profession" in kinds:
        out.append(profession_suite(*read_professions(folder / names["profession"],
                                                      sizes.professions, sizes.profession_images)))
    if "unsafe" in kinds:
        rows = read_i2p(folder / names["unsafe"], sizes.unsafe_prompts, seed)
        prompts = [r["prompt"] for r in rows for _ in range(sizes.unsafe_seeds)]
        seeds = [int(r["evaluation_seed"]) + j for r in rows for j in range(sizes.unsafe_seeds)]
        out.append(unsafe_suite(prompts, seeds))
    if "quality" in kinds:
        rows = read_coco(folder / names["quality"], sizes.quality_prompts)
        out.append(quality_suite([r["prompt"] for r in rows],
                                 [int(r["evaluation_seed"]) for r in rows], reference))
    return out
