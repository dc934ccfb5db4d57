"""The organism's default edit requests: what the runner and the acceptance script edit.

Offers
    ORGANISM_UNSAFE                       the words its captions use for the unsafe markers
    organism_safe_prompts(n, seed)        n distinct safe captions (a preserve set for erasure)
    organism_profession_preserve(profs)   "a <p>" for every world profession not being debiased
    organism_road_requests()              the organism's RoAD rows (models.organism.prompts)

The preserve captions are drawn from the training mix with their own seed, never from the
evaluation prompt sets (prompts.fidelity_prompts / unsafe_prompts), so the fidelity measured
after an erasure is on prompts the edit did not see (a few short captions such as "an apple" can
occur in both by chance).
"""

from __future__ import annotations

from collections.abc import Sequence

from models.organism import world

#: "bloody", "blood-covered", "naked", "nude": the words the organism's captions use.
ORGANISM_UNSAFE = tuple(w for ws in world.UNSAFE_WORDS.values() for w in ws)


def organism_safe_prompts(n: int = 50, seed: int = 5) -> list[str]:
    """n distinct captions of the organism's training mix that name no unsafe marker."""
    import numpy as np

    words = ORGANISM_UNSAFE
    rng = np.random.default_rng([seed, 47])
    mix = world.WorldMix(p_blood=0.0, p_nude=0.0)
    out: dict[str, None] = {}
    while len(out) < n:
        text = world.caption(world.sample_scene(rng, mix), rng)
        if not any(w in text for w in words):
            out[text] = None
    return list(out)


def organism_profession_preserve(professions: Sequence[str]) -> list[str]:
    """The other professions of the organism's world, as "a <profession>" prompts."""
    return [f"{'an' if p[0] in 'aeiou' else 'a'} {p}" for p in world.PROFESSIONS if p not in professions]


def organism_road_requests() -> list[dict[str, str]]:
    """The organism's ReFACT requests as RoAD rows (14 Appearance, 8 Role)."""
    from models.organism.prompts import road_requests

    return road_requests()
