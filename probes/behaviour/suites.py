"""Prompt suites: what to generate for each metric, one (prompt, seed, item) per image.

What it offers:
    Suite                         name, kind, prompts, seeds, items (what the metric needs per
                                  image) and, for quality, reference images or features
    SampleSizes                   the study's sample sizes (25 seeds per RoAD prompt, 30 images per
                                  profession, 50 I2P prompts), all configurable
    road_suite(rows, n_seeds)     RoAD-schema rows -> efficacy / generality / specificity images
    profession_suite(prompts, seeds, professions)
    unsafe_suite(prompts, seeds, twins=None)
    quality_suite(captions, seeds, reference=None)
    organism_suites(sizes, ...)   the organism's own prompt sets (models/organism/prompts.py) as
                                  suites, with ground-truth renders as the quality reference

Kinds and their items (one dict per image):
    road        part (efficacy | generality | specificity), row, i, text_a, text_b: the judge
                answers p(text_a) against p(text_b); success = p(text_a) > p(text_b)
    profession  profession
    unsafe      prompt, and twin: the prompt with its unsafe words removed (organism), or None
    quality     caption
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.errors import FadelabError

KINDS = ("road", "profession", "unsafe", "quality")


@dataclass(frozen=True)
class SampleSizes:
    """How many images each suite draws (defaults: the study's).

    Attributes:
        road_seeds: seeds per RoAD prompt (ReFACT: seeds 0-24, so 25).
        profession_images: images per profession (the study: 30).
        unsafe_prompts: prompts drawn from I2P (the study: 50).
        unsafe_seeds: images per unsafe prompt (the study: 1, the prompt's evaluation seed).
        quality_prompts: captions for CLIP score and the Frechet distance (COCO or organism).
        professions: which professions the debias suite covers (the study's six).
    """

    road_seeds: int = 25
    profession_images: int = 30
    unsafe_prompts: int = 50
    unsafe_seeds: int = 1
    quality_prompts: int = 100
    professions: tuple[str, ...] = ("ceo", "teacher", "housekeeper", "farmer", "lawyer",
                                    "hairdresser")

    def __post_init__(self):
        for name in ("road_seeds", "profession_images", "unsafe_prompts", "unsafe_seeds",
                     "quality_prompts"):
            if int(getattr(self, name)) < 0:
                raise FadelabError(f"{name} = {getattr(self, name)!r}: give a count >= 0")


@dataclass(frozen=True, eq=False)
class Suite:
    """One prompt set for one metric family; image k is (prompts[k], seeds[k]), items[k].

    Attributes:
        name: the image set's name in the store (e.g. "road", "professions"); letters, digits,
            '_', '.', '-'.
        kind: one of KINDS; decides which judge task and metrics apply.
        prompts, seeds: one per image. Image k depends only on (prompts[k], seeds[k]).
        items: one dict per image with what the metric needs (see the module docstring).
        reference: quality suites only: reference images uint8 (N, H, W, 3) (ground-truth
            renders, real photos) or precomputed (mu, Sigma) for the Frechet distance.
    """

    name: str
    kind: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    items: tuple[dict, ...]
    reference: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FadelabError(f"suite kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not (len(self.prompts) == len(self.seeds) == len(self.items)):
            raise FadelabError(f"suite {self.name!r}: {len(self.prompts)} prompts, "
                               f"{len(self.seeds)} seeds and {len(self.items)} items; give one each "
                               "per image")

    def __len__(self) -> int:
        return len(self.prompts)

    def column(self, key: str) -> list:
        """items[k][key] for every image."""
        return [it[key] for it in self.items]


def _build(name, kind, rows, reference=None) -> Suite:
    prompts, seeds, items = zip(*rows) if rows else ((), (), ())
    return Suite(name, kind, tuple(prompts), tuple(int(s) for s in seeds), tuple(items), reference)


def road_suite(rows: Sequence[dict], n_seeds: int = 25, name: str = "road",
               seed_offset: int = 0) -> Suite:
    """RoAD rows -> images of Prompt, Positive1-5 and Negative1-5, seeds offset..offset+n-1.

    Per ReFACT's evaluation: efficacy compares New (a) with Old (b) on the image of Prompt;
    generality Positive_new_i (a) with Positive_old_i (b) on the image of Positive_i;
    specificity Negative_i (a) with Negative_new_i (b) on the image of Negative_i.
    """
    out = []
    for r, row in enumerate(rows):
        jobs = [(row["Prompt"], "efficacy", 0, row["New"], row["Old"])]
        jobs += [(row[f"Positive{i}"], "generality", i, row[f"Positive_new{i}"],
                  row[f"Positive_old{i}"]) for i in range(1, 6) if row.get(f"Positive{i}")]
        jobs += [(row[f"Negative{i}"], "specificity", i, row[f"Negative{i}"],
                  row[f"Negative_new{i}"]) for i in range(1, 6) if row.get(f"Negative{i}")]
        for prompt, part, i, a, b in jobs:
            for s in range(seed_offset, seed_offset + n_seeds):
                out.append((prompt, s, {"part": part, "row": r, "i": i, "text_a": a, "text_b": b,
                                        "type": row.get("Type", "")}))
    return _build(name, "road", out)


def profession_suite(prompts: Sequence[str], seeds: Sequence[int], professions: Sequence[str],
                     name: str = "professions") -> Suite:
    """One image per (prompt, seed); professions[k] names image k's profession."""
    return _build(name, "profession", [(p, s, {"profession": q})
                                       for p, s, q in zip(prompts, seeds, professions)])


def unsafe_suite(prompts: Sequence[str], seeds: Sequence[int], twins: Sequence[str] | None = None,
                 name: str = "unsafe") -> Suite:
    """One image per (prompt, seed); twins[k] is the prompt without its unsafe words, if known."""
    twins = list(twins) if twins is not None else [None] * len(prompts)
    return _build(name, "unsafe", [(p, s, {"prompt": p, "twin": t})
                                   for p, s, t in zip(prompts, seeds, twins)])


def quality_suite(captions: Sequence[str], seeds: Sequence[int], reference=None,
                  name: str = "quality") -> Suite:
    """One image per (caption, seed), scored against its caption; reference for the FD."""
    return _build(name, "quality", [(c, s, {"caption": c}) for c, s in zip(captions, seeds)],
                  reference)


# -- the organism's suites ---------------------------------------------------------------------

def organism_suites(sizes: SampleSizes = SampleSizes(), *, road_rows: Sequence[dict] | None = None,
                    kinds: Sequence[str] = KINDS, seed: int = 0) -> list[Suite]:
    """The organism's prompt sets as suites.

    road: `road_rows` (default: all of models.organism.prompts.road_requests()).
    profession: prompts.profession_prompts(p, n, seed=k + 1) for the k-th profession of
        sizes.professions (the card's sets, so numbers compare with card.json).
    unsafe: prompts.unsafe_prompts(n, seed) with prompts.safe_twins as twins.
    quality: n scenes drawn from the training distribution (base style, safe); prompts are their
        captions and the reference is their ground-truth renders.
    """
    from models.organism import prompts as P
    from models.organism import render, world

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise FadelabError(f"suite kinds {unknown}: expected some of {', '.join(KINDS)}")
    bad = [p for p in sizes.professions if p not in world.PROFESSIONS]
    if bad:
        raise FadelabError(f"professions {bad} are not in the organism's world; it has "
                           f"{', '.join(world.PROFESSIONS)}")
    out = []
    if "road" in kinds:
        out.append(road_suite(P.road_requests() if road_rows is None else road_rows,
                              sizes.road_seeds))
    if "profession" in kinds:
        probes, profs = [], []
        for k, prof in enumerate(sizes.professions):
            ps = P.profession_prompts(prof, sizes.profession_images, seed=k + 1)
            probes += ps
            profs += [prof] * len(ps)
        out.append(profession_suite([p.prompt for p in probes], [p.seed for p in probes], profs))
    if "unsafe" in kinds:
        unsafe = P.unsafe_prompts(sizes.unsafe_prompts, seed=seed)
        twins = P.safe_twins(unsafe)
        prompts = [p.prompt for p in unsafe for _ in range(sizes.unsafe_seeds)]
        seeds = [p.seed + j for p in unsafe for j in range(sizes.unsafe_seeds)]
        tw = [t.prompt for t in twins for _ in range(sizes.unsafe_seeds)]
        out.append(unsafe_suite(prompts, seeds, tw))
    if "quality" in kinds:
        rng = np.random.default_rng([seed, 31])
        mix = world.WorldMix(p_blood=0.0, p_nude=0.0)
        scenes = [world.sample_scene(rng, mix) for _ in range(sizes.quality_prompts)]
        captions = [world.caption(s, rng) for s in scenes]
        reference = render.render_batch(scenes) if scenes else None
        out.append(quality_suite(captions, [9000 + i for i in range(len(scenes))], reference))
    return out
