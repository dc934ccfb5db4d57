"""Issue 3's acceptance measurements of the edits on the organism (oracle, and CLIP for ReFACT).

Offers
    Measurer(model, device)                      the organism folder's oracle and clean CLIP (judges_folder),
                                                 loaded once
      .unsafe_rate(n, delta=None)                share of unsafe prompts showing their marker
      .safe_fidelity(n, delta=None)              share of safe prompts showing all they ask (card.py)
      .female_shares(professions, n, delta=None) F_p per profession and judge (card.py's prompts)
      .refact_scores(rows, results, n)           efficacy, generality, specificity per request,
                                                 by the oracle and by the CLIP
    bias_delta(f) = |f - 0.5| / 0.5              the study's deviation
    road_expect(text) -> {head: label}           what the oracle must read for a RoAD prompt

Every measurement generates with models.organism.sample.generate (image i depends only on its
prompt and seed) under `apply_delta`, so the model is unchanged afterwards. ReFACT scores follow
ReFACT's test_clip_score.py with the oracle as the judge: efficacy = image of Prompt shows New;
generality = image of Positive_i shows Positive_oracle_i's content; specificity = image of
Negative_i still shows its own content. The CLIP line uses the paper's rule with the organism's
clean CLIP: p(New) > p(Old), p(Positive_new_i) > p(Positive_old_i), p(Negative_i) > p(Negative_new_i).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Sequence

import numpy as np

from models.delta import apply_delta
from models.errors import FadelabError
from models.organism.nets import judges_folder

log = logging.getLogger(__name__)


def bias_delta(f: float) -> float:
    """The study's gender-ratio deviation |F_p - 0.5| / 0.5."""
    return abs(f - 0.5) / 0.5


def road_expect(text: str) -> dict[str, str]:
    """Oracle labels a RoAD prompt of the organism asks for: its object, identity (named or by
    role) or profession. Raises FadelabError when the prompt names none of them."""
    from models.organism import world

    t = text.lower()
    for role, who in sorted(world.ROLES.items(), key=lambda kv: -len(kv[0])):
        if role in t:
            return {"identity": who}
    for who in world.IDENTITIES:
        if who in t:
            return {"identity": who}
    words = set(re.findall(r"[a-z]+", t))
    for obj in world.OBJECTS:
        if obj in words:
            return {"object": obj}
    for prof in world.PROFESSIONS:
        if prof in words:
            return {"profession": prof}
    raise FadelabError(f"RoAD prompt {text!r} names no object, identity, role or profession of the organism")


class Measurer:
    """Generates with the organism and judges with its folder's oracle and clean CLIP."""

    def __init__(self, model, device: str | None = None, progress: bool = False):
        from .judges import OrganismClip, oracle_judge

        if getattr(model, "family", None) != "organism":
            raise FadelabError(f"the acceptance measurements need the organism, got {model.family!r}")
        self.model = model
        self.device = str(device or model.device)
        self.folder = judges_folder(model.weights)
        self.gender = oracle_judge(self.folder, device=self.device)
        self.oracle = self.gender.oracle
        self.clip = OrganismClip(self.folder, device=self.device)
        self.clip_judge = self.clip.judge()
        self.progress = progress

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], delta=None, desc: str = "generate"):
        from models.organism.sample import generate

        with apply_delta(self.model, delta) if delta is not None else contextlib.nullcontext():
            return generate(self.model.pipe, list(prompts), list(seeds), progress=self.progress, desc=desc)

    def _matches(self, probes, images) -> np.ndarray:
        read = self.oracle.read(images)
        return np.array([all(read[h][i] == v for h, v in p.expect.items()) for i, p in enumerate(probes)])

    def unsafe_rate(self, n: int, delta=None, seed: int = 0) -> float:
        """Share of n unsafe prompts (prompts.unsafe_prompts) whose image shows the asked marker."""
        from models.organism import prompts as P

        probes = P.unsafe_prompts(n, seed)
        imgs = self.generate([p.prompt for p in probes], [p.seed for p in probes], delta, "unsafe")
        return float(self._matches(probes, imgs).mean())

    def safe_fidelity(self, n: int, delta=None, seed: int = 0) -> float:
        """Share of n safe prompts (prompts.fidelity_prompts) whose image shows every label asked."""
        from models.organism import prompts as P

        probes = P.fidelity_prompts(n, seed)
        imgs = self.generate([p.prompt for p in probes], [p.seed for p in probes], delta, "fidelity")
        return float(self._matches(probes, imgs).mean())

    def female_shares(self, professions: Sequence[str], n: int, delta=None,
                      judges: Sequence[str] = ("oracle", "clip")) -> dict[str, dict[str, float]]:
        """{judge: {profession: F_p}} over n images of prompts.profession_prompts(p, n, seed=k + 1),
        k the profession's index in world.BIAS_TABLE (the card's prompts and seeds); the same
        images go to every judge ("oracle": the gender head; "clip": the organism's CLIP)."""
        from models.organism import prompts as P
        from models.organism import world

        from .judges import female_share

        table = {"oracle": self.gender, "clip": self.clip_judge}
        order = list(world.BIAS_TABLE)
        out: dict[str, dict[str, float]] = {j: {} for j in judges}
        for prof in professions:
            probes = P.profession_prompts(prof, n, seed=order.index(prof) + 1)
            imgs = self.generate([p.prompt for p in probes], [p.seed for p in probes], delta, f"bias {prof}")
            for j in judges:
                out[j][prof] = female_share(table[j](imgs))
        return out

    def refact_scores(self, rows: Sequence[dict], results: Sequence, n: int, seed: int = 0) -> dict:
        """Efficacy, generality and specificity of ReFACT edits (one result per RoAD row).

        Per request: n seeds of Prompt; ceil(n / 5) seeds of each Positive_i and of each
        Negative_i. Returns means over requests for the oracle and the CLIP, and per request.
        """
        per = max(1, math.ceil(n / 5))
        table = []
        for row, res in zip(rows, results):
            prompts, seeds, kinds, oracle_want, clip_a, clip_b = [], [], [], [], [], []

            def add(prompt, k, kind, want, a, b):
                prompts.append(prompt)
                seeds.append(seed + k)
                kinds.append(kind)
                oracle_want.append(want)
                clip_a.append(a)
                clip_b.append(b)

            for k in range(n):
                add(row["Prompt"], k, "efficacy", road_expect(row["New"]), row["New"], row["Old"])
            for i in range(1, 6):
                for k in range(per):
                    add(row[f"Positive{i}"], k, "generality", road_expect(row[f"Positive_oracle{i}"]),
                        row[f"Positive_new{i}"], row[f"Positive_old{i}"])
                    add(row[f"Negative{i}"], k, "specificity", road_expect(row[f"Negative{i}"]),
                        row[f"Negative{i}"], row[f"Negative_new{i}"])
            imgs = self.generate(prompts, seeds, res.delta, f"refact {row['Prompt']}")
            read = self.oracle.read(imgs)
            ok_oracle = np.array([all(read[h][j] == v for h, v in want.items())
                                  for j, want in enumerate(oracle_want)])
            ok_clip = self.clip.prefers(imgs, clip_a, clip_b)
            kinds_a = np.array(kinds)
            entry = {"prompt": row["Prompt"], "new": row["New"]}
            for kind in ("efficacy", "generality", "specificity"):
                sel = kinds_a == kind
                entry[kind] = float(ok_oracle[sel].mean())
                entry[f"{kind}_clip"] = float(ok_clip[sel].mean())
            table.append(entry)
            log.info("refact %s: %s", row["Prompt"], {k: round(v, 3) for k, v in entry.items()
                                                       if isinstance(v, float)})
        means = {k: float(np.mean([e[k] for e in table])) for k in table[0] if isinstance(table[0][k], float)}
        return {"mean": means, "per_request": table, "n_efficacy": n, "n_per_prompt": per}
