"""Agreement between annotators, and between judges and people, on stored labels.

What it offers:
    latest_labels(store, variant, images, annotator) -> {index: label}   (a re-label wins)
    fleiss(store, image_sets, annotators=None)  Fleiss' kappa (statsmodels) over the images every
                                                given annotator labelled (default: all humans)
    majority(labels_by_annotator)               the people's label per image (ties: can't decide)
    confusion(store, image_sets, judge, humans=None)  judge label x human majority label table
    human_metrics(store, image_sets, pairs, ...)      label shares, Delta and Flip of the people's
                                                      majority labels, with bootstrap CIs
    report(store, images="unsafe")              all of it as one JSON-ready dict

Fleiss' kappa (Fleiss 1971, eq. 1-8): with n raters per item and n_ij raters putting item i in
category j, P_i = (sum_j n_ij^2 - n) / (n (n - 1)), P_bar = mean_i P_i, p_j = sum_i n_ij / (N n),
P_e = sum_j p_j^2, kappa = (P_bar - P_e) / (1 - P_e). statsmodels computes it
(statsmodels.stats.inter_rater.fleiss_kappa); this module builds the (item, category) count table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from models.errors import FadelabError

from . import metrics as M
from .annotate import LABELS


def latest_labels(store, variant: str, images: str, annotator: str) -> dict[int, str]:
    """{image index: label} of one annotator; a later label of the same image replaces earlier."""
    got = store.read_labels(variant, images, annotator)
    return {int(i): lab for i, lab in zip(got["index"], got["label"])}


def _humans(store, image_sets) -> list[str]:
    return sorted({a for v, n in image_sets for a in store.annotators(v, n) if a.startswith("human:")})


def _table(store, image_sets, annotators) -> tuple[list[tuple[str, str, int]], dict[str, list[str]]]:
    """Items labelled by every annotator, and each annotator's labels on them."""
    items, labels = [], {a: [] for a in annotators}
    for v, n in image_sets:
        per = {a: latest_labels(store, v, n, a) if a in store.annotators(v, n) else {}
               for a in annotators}
        common = sorted(set.intersection(*(set(d) for d in per.values()))) if per else []
        items += [(v, n, k) for k in common]
        for a in annotators:
            labels[a] += [per[a][k] for k in common]
    return items, labels


def fleiss(store, image_sets: Sequence[tuple[str, str]], annotators: Sequence[str] | None = None,
           categories: Sequence[str] = LABELS) -> dict:
    """Fleiss' kappa of `annotators` (default: every human) on the images all of them labelled."""
    from statsmodels.stats.inter_rater import fleiss_kappa

    annotators = list(annotators) if annotators is not None else _humans(store, image_sets)
    if len(annotators) < 2:
        raise FadelabError(f"Fleiss' kappa needs at least two annotators; found {annotators}")
    items, labels = _table(store, image_sets, annotators)
    cats = list(categories)
    extra = sorted({lab for ls in labels.values() for lab in ls} - set(cats))
    cats += extra
    counts = np.zeros((len(items), len(cats)), np.int64)  # (item, category)
    for ls in labels.values():
        for i, lab in enumerate(ls):
            counts[i, cats.index(lab)] += 1
    kappa = float(fleiss_kappa(counts, method="fleiss")) if len(items) else float("nan")
    return {"kappa": kappa, "n_items": len(items), "n_raters": len(annotators),
            "annotators": annotators, "categories": cats}


def majority(labels_by_annotator: dict[str, Sequence[str]]) -> list[str]:
    """Per image, the label most annotators gave; a tie is "can't decide"."""
    cols = list(labels_by_annotator.values())
    out = []
    for row in zip(*cols):
        top = Counter(row).most_common()
        out.append(top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else "can't decide")
    return out


def confusion(store, image_sets: Sequence[tuple[str, str]], judge: str,
              humans: Sequence[str] | None = None) -> dict:
    """Counts of (judge label, human majority label) over images the judge and all humans labelled.

    Returns {judge, humans, labels, table (rows: judge label, columns: human label), n,
    agreement (share of images where they match)}.
    """
    humans = list(humans) if humans is not None else _humans(store, image_sets)
    if not humans:
        raise FadelabError("no human labels in these image sets: annotate first "
                           "(fadelab annotate STORE)")
    items, labels = _table(store, image_sets, humans + [judge])
    human = majority({h: labels[h] for h in humans})
    mach = labels[judge]
    cats = list(LABELS) + sorted((set(human) | set(mach)) - set(LABELS))
    table = np.zeros((len(cats), len(cats)), np.int64)
    for j, h in zip(mach, human):
        table[cats.index(j), cats.index(h)] += 1
    n = len(items)
    return {"judge": judge, "humans": humans, "labels": cats, "table": table.tolist(), "n": n,
            "agreement": float(np.trace(table) / n) if n else float("nan")}


def human_metrics(store, image_sets: Sequence[tuple[str, str]], pairs: Sequence[tuple[str, str]] = (),
                  humans: Sequence[str] | None = None, *, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0, write: bool = False) -> list[dict]:
    """Label shares of the people's majority label per variant; Delta of shares and Flip per pair.

    Only images every human labelled count; a pair uses the images labelled in both variants
    (same index = same prompt and seed), so its CIs are paired. With write=True (store open for
    writing) the numbers go to the store as "<images>.share.<label>:humans",
    "Delta.<...>:humans" and "Flip.<images>:humans".
    """
    from .bootstrap import bootstrap_ci, paired_delta_ci

    humans = list(humans) if humans is not None else _humans(store, image_sets)
    if not humans:
        raise FadelabError("no human labels in these image sets: annotate first")
    by_var: dict[str, dict[int, str]] = {}
    name_of = {}
    for v, n in image_sets:
        items, labels = _table(store, [(v, n)], humans)
        by_var[v] = dict(zip([k for _, _, k in items], majority(labels)))
        name_of[v] = n
    rows = []

    def put(variant, name, value, ci, count, attrs):
        rows.append({"variant": variant, "name": name, "value": value, "ci_low": ci[0],
                     "ci_high": ci[1], "n": count, **attrs})
        if write:
            store.require_metric(variant, name, value, ci=ci, n=count, attrs={**attrs, "level": level})

    for v, lab in by_var.items():
        arr = np.array([lab[k] for k in sorted(lab)])
        for spec in M.unsafe_specs(name_of[v], "humans", arr):
            put(v, spec.name, spec.value(), bootstrap_ci(spec.stat, *spec.arrays, n_boot=n_boot,
                                                         level=level, seed=seed), spec.n, spec.attrs)
    for a, b in pairs:
        if a not in by_var or b not in by_var:
            continue
        common = sorted(set(by_var[a]) & set(by_var[b]))
        la = np.array([by_var[a][k] for k in common])
        lb = np.array([by_var[b][k] for k in common])
        for sa, sb in zip(M.unsafe_specs(name_of[a], "humans", la), M.unsafe_specs(name_of[b], "humans", lb)):
            ci = paired_delta_ci(sa.stat, sa.arrays, sb.stat, sb.arrays, n_boot=n_boot, level=level,
                                 seed=seed)
            put(b, "Delta." + sa.name, sb.value() - sa.value(), ci, len(common),
                {**sa.attrs, "from": a, "to": b})
        spec = M.flip_spec(name_of[a], "humans", la, lb)
        put(b, spec.name, spec.value(), bootstrap_ci(spec.stat, *spec.arrays, n_boot=n_boot,
                                                     level=level, seed=seed),
            len(common), {**spec.attrs, "from": a, "to": b})
    return rows


def report(store, images: str = "unsafe", variants: Sequence[str] | None = None,
           pairs: Sequence[tuple[str, str]] | None = None, n_boot: int = 1000) -> dict:
    """Kappa, judge-vs-human confusion tables and human metrics for one image-set name."""
    from .annotate import image_sets as find_sets
    from .run import default_pairs

    sets = find_sets(store, images, variants)
    if not sets:
        raise FadelabError(f"the store has no image set named {images!r}")
    humans = _humans(store, sets)
    judges = sorted({a for v, n in sets for a in store.annotators(v, n)} - set(humans))
    out: dict = {"images": images, "variants": [v for v, _ in sets], "humans": humans,
                 "judges": judges}
    out["fleiss"] = fleiss(store, sets, humans) if len(humans) >= 2 else None
    out["confusion"] = [confusion(store, sets, j, humans) for j in judges] if humans else []
    if humans:
        pairs = default_pairs([v for v, _ in sets]) if pairs is None else pairs
        out["human_metrics"] = human_metrics(store, sets, pairs, humans, n_boot=n_boot)
    return out
