"""UCE's iterative debiasing (Gandikota et al., WACV 2024, sec. 3.3), with a pluggable judge.

Offers
    uce_debias(model, professions, judge, hparams, preserve=()) -> EditResult
    generate(model, prompts, seeds, steps, guidance_scale) -> uint8 (N, H, W, 3)
    profession_prompts(model, profession, templates, attribute=None) -> prompts

The edit. For profession p with edited rows C_p (its prompts' token rows, editing/text.py) and
attribute prompts a in {female, male} ("a female ceo" in the same templates, rows aligned with
C_p's), on every edited site W:

    v*_p = W c_p + sum_a alpha_{p,a} |W C_p|_F  (W c_{p,a}) / |W C_{p,a}|_F        (per row c_p)

(train_debias.py's target += weight * o_embs.norm() * u), and the weights are UCE's closed form
(editing/uce.py, (*)) from the unedited W with these v* and the preserve set (the empty prompt
and `preserve`).

The loop (train_debias.py; trainscripts/uce_sd_debias.py):
    alpha = 0; repeat at most max_rounds times:
        generate n_images per unfrozen profession with the current edit (models.apply_delta),
        F_p = the judge's female share;  gap_{p,a} = target_a - share_{p,a};
        if max_a |gap_{p,a}| <= tolerance: freeze p (its v* stays where it is)
        else alpha_{p,a} += step_size * gap_{p,a}
    until every profession is frozen. The returned delta is built from the final alpha; when the
    loop stops at max_rounds its last update is unmeasured (as in both official codes), and
    info["final_female_shares"] holds the last measured shares.

Departure from the official code, on purpose: every round solves from the unedited weights with
the accumulated alpha (one exact delta, testable by the normal equations), where the paper-era
code stacks a new closed-form edit on the previous round's weights and moves frozen professions
into the preserve set; both move v* by the measured gap each round and keep frozen professions
where they are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from models.delta import apply_delta
from models.errors import FadelabError

from . import text as T
from .hparams import DebiasHparams, hparams_dict
from .judges import female_share
from .result import EditResult
from .uce import keys_of, prepare

log = logging.getLogger(__name__)

#: The paper-era code's five phrasings (train_debias.py: image of, photo of, portrait of, picture of, bare).
PAPER_TEMPLATES = ("an image of {x}", "a photo of {x}", "a portrait of {x}", "a picture of {x}", "{x}")
#: The organism's phrasings of a person (its captions and the card's profession prompts).
ORGANISM_TEMPLATES = ("{x}", "an image of {x}", "a picture of {x}")


#: Images per pipeline call on real families (a round asks for n_images per profession at once).
REAL_BATCH = 8


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def profession_prompts(model, profession: str, templates: Sequence[str] | None = None,
                       attribute: str | None = None) -> list[str]:
    """The prompts of a profession (attribute None) or of "a <attribute> <profession>"."""
    templates = templates or (ORGANISM_TEMPLATES if model.family == "organism" else PAPER_TEMPLATES)
    noun = f"{attribute} {profession}" if attribute else profession
    return [t.format(x=_a(noun)) for t in templates]


def generate(model, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
             guidance_scale: float | None = None, progress: bool = False) -> np.ndarray:
    """One uint8 image per (prompt, seed), the noise of image i drawn from a CPU generator seeded
    with seeds[i]. StableDiffusion pipelines (the organism) use models.organism.sample.generate;
    others call the pipeline with a list of generators. Real families go REAL_BATCH images a
    call, the organism its sampler's default (256 on a GPU)."""
    batch = None if getattr(model, "family", None) == "organism" else REAL_BATCH
    if T.pipeline_kind(model) == "sd":
        from models.organism.sample import generate as sd_generate

        return sd_generate(model.pipe, list(prompts), list(seeds), steps=steps,
                           guidance_scale=guidance_scale, batch_size=batch, progress=progress, desc="debias")
    kwargs = {}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch]]
        with torch.no_grad():
            images = model.pipe(prompt=list(prompts[i:i + batch]), generator=gens, output_type="np",
                                **kwargs).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def round_seeds(seed: int, r: int, k: int, n: int) -> list[int]:
    """The seeds of round r's n images of profession k: seed * 1_000_000 + r * 10_000 + k * 1_000
    + i for the first ten professions (as this lab has always drawn them), and from the
    eleventh on, the same in a block of their own (k // 10) * 10**9 higher: UCE's profession
    lists run past ten (the paper debiases dozens at once), and the plain formula gave
    profession 10 of round r the seeds of profession 0 of round r + 1."""
    k_lo, k_hi = k % 10, k // 10
    return [k_hi * 10**9 + seed * 1_000_000 + r * 10_000 + k_lo * 1_000 + i for i in range(n)]


def uce_debias(model, professions: Sequence[str], judge: Callable[[np.ndarray], np.ndarray],
               hparams: DebiasHparams | None = None, *, preserve: Sequence[str] = (),
               progress: bool = False) -> EditResult:
    """Debias professions towards hparams.targets of (female, male) with the judge's feedback.

    Args:
        professions: nouns ("ceo", "teacher"); on the organism, professions of its world.
        judge: images uint8 (N, H, W, 3) -> flags (1 female, 0 male, NaN undecided)
            (editing.judges: oracle_judge, OrganismClip(...).judge(), open_clip_judge).
        preserve: prompts to keep (the empty prompt is always kept); must not name an edited
            profession.
    Returns an EditResult with method "uce_debias"; info holds rounds, initial and final shares,
    alpha per profession and the per-round history.
    """
    h = hparams or DebiasHparams()
    professions = T.check_concepts(model, professions, "profession")
    if len(set(professions)) != len(professions):
        raise FadelabError(f"professions {professions} repeat one; give each once")
    preserve = [p.strip() for p in preserve if p.strip()]
    T.check_preserve(professions, preserve)
    edit_prompts, owner = [], []
    guide_sets: list[list[str]] = [[] for _ in h.attributes]
    for k, p in enumerate(professions):
        prompts = profession_prompts(model, p, h.templates)
        edit_prompts += prompts
        owner += [k] * len(prompts)
        for j, attr in enumerate(h.attributes):
            guide_sets[j] += profession_prompts(model, p, h.templates, attr)
    prep = prepare(model, edit_prompts, guide_sets, preserve, h.uce)

    # per site: base = C_E W^T and the attribute directions scaled by |W C_p|_F, row by row
    base, dirs, rows_of = {}, {}, {}
    for sp in prep.spaces:
        row_owner = torch.tensor(np.repeat(owner, sp.counts), device=sp.c_e.device)
        bounds = np.cumsum([0, *sp.counts])
        for site in sp.sites:
            w = sp.w[site]
            b = sp.c_e @ w.T  # (n_e, d_out)
            per_attr = []
            for c_g in sp.c_g:
                g = c_g @ w.T  # (n_e, d_out)
                d = torch.empty_like(g)
                for i in range(len(sp.counts)):  # one block of rows per prompt
                    s, e = bounds[i], bounds[i + 1]
                    d[s:e] = b[s:e].norm() * g[s:e] / g[s:e].norm().clamp_min(1e-12)
                per_attr.append(d)
            base[site], dirs[site], rows_of[site] = b, per_attr, row_owner
    targets = np.asarray(h.targets, dtype=float)
    alpha = np.zeros((len(professions), len(h.attributes)))

    def build(alpha: np.ndarray):
        v_star = {}
        for site, b in base.items():
            a = torch.as_tensor(alpha, dtype=torch.float32, device=b.device)[rows_of[site]]  # (n_e, A)
            v_star[site] = b + sum(a[:, j:j + 1] * dirs[site][j] for j in range(len(h.attributes)))
        prov = {"method": "uce_debias", "hparams": hparams_dict(h), "parent": str(model.weights)}
        return prep.delta(v_star, h.uce, prov), v_star

    frozen = np.zeros(len(professions), dtype=bool)
    history, first, last = [], {}, {}
    bar = tqdm(total=h.max_rounds, desc="UCE debias", disable=not progress, unit="round")
    for r in range(h.max_rounds):
        delta, _ = build(alpha)
        prompts, seeds, who = [], [], []
        for k, p in enumerate(professions):
            if frozen[k]:
                continue
            templ = profession_prompts(model, p, h.templates)
            prompts += [templ[i % len(templ)] for i in range(h.n_images)]
            seeds += round_seeds(h.seed, r, k, h.n_images)
            who += [k] * h.n_images
        # every unfrozen profession in one generation call: on a GPU a call of a few hundred
        # organism images costs about what one of 50 does, and the seeds fix each image alone
        with apply_delta(model, delta) if r else contextlib.nullcontext():
            flags = np.asarray(judge(generate(model, prompts, seeds, h.steps, h.guidance_scale)), float)
        who = np.asarray(who)
        shares = {p: female_share(flags[who == k]) for k, p in enumerate(professions) if not frozen[k]}
        for k, p in enumerate(professions):
            if p not in shares:
                continue
            f = shares[p]
            last[p] = f
            first.setdefault(p, f)
            if np.isnan(f):
                log.warning("debias round %d: the judge read no gender for %s", r, p)
                continue
            gap = targets - np.array([f, 1 - f])
            if np.abs(gap).max() <= h.tolerance:
                frozen[k] = True
            else:
                alpha[k] += h.step_size * gap
        history.append({"round": r, "female_shares": dict(shares),
                        "frozen": [p for k, p in enumerate(professions) if frozen[k]]})
        log.info("debias round %d: %s; frozen %s", r, {p: round(v, 3) for p, v in shares.items()},
                 history[-1]["frozen"])
        bar.update(1)
        if frozen.all():
            break
    bar.close()
    delta, v_star = build(alpha)
    info = {"rounds": len(history), "converged": bool(frozen.all()),
            "initial_female_shares": first, "final_female_shares": last,
            "alpha": {p: alpha[k].tolist() for k, p in enumerate(professions)},
            "history": history, "token_rows": prep.mode}
    request = {"task": "debias", "professions": professions, "attributes": list(h.attributes),
               "targets": list(h.targets), "edit_prompts": edit_prompts,
               "attribute_prompts": {a: g for a, g in zip(h.attributes, guide_sets)},
               "preserve": list(dict.fromkeys(["", *preserve]))}
    return EditResult(delta, keys_of(prep, v_star), "uce_debias", request, h, info)
