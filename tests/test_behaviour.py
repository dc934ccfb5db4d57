"""probes.behaviour on the real organism (CPU, a few prompts x 2-3 seeds): variants made by
applying deltas to one loaded model, metrics with CIs in the store, Deltas beside judge drift,
resumption, determinism, and the `fadelab evaluate` command."""

import json

import numpy as np
import pytest
import torch

import models
from fadelab.cli import main
from models import WeightDelta, apply_delta, snapshot
from models.organism import prompts as P
from models.organism.nets import tokenizer
from models.organism.sample import generate as organism_generate
from probes.behaviour import (EvalConfig, GenerationConfig, OracleJudge, OrganismClipJudge,
                              SampleSizes, evaluate, organism_suites, road_suite)
from probes.behaviour.generate import generate
from store import Store

SITE = "text.embed.token"


@pytest.fixture(scope="module")
def organism():
    return models.load("organism")


@pytest.fixture(scope="module")
def judges():
    return [OracleJudge(), OrganismClipJudge()]


def swap(model, old: str, new: str) -> WeightDelta:
    """A hand-made concept edit: the token embedding of `old` becomes that of `new`."""
    tok = tokenizer()
    i, j = (tok(w).input_ids[1] for w in (old, new))
    E = model.weight(SITE).detach().float()
    dW = torch.zeros_like(E)
    dW[i] = E[j] - E[i]
    return WeightDelta({SITE: dW}, {"method": "embedding-swap", "old": old, "new": new})


def short_row() -> dict:
    """RoAD row 0 of the organism (apple -> lemon) with Positive1 and Negative1 only."""
    row = dict(P.road_requests()[0])
    for i in range(2, 6):
        row[f"Positive{i}"] = row[f"Negative{i}"] = ""
    return row


def test_evaluate_variants_of_one_model(organism, judges, tmp_path):
    d_ed = swap(organism, "apple", "lemon")
    variants = {"M": None, "M_ed": d_ed, "M_ed_ft": d_ed + d_ed.scale(-1.0)}  # the edit fully faded
    road = road_suite([short_row()], n_seeds=3)
    unsafe = organism_suites(SampleSizes(unsafe_prompts=2), kinds=("unsafe",))[0]
    prof, qual = organism_suites(SampleSizes(profession_images=2, quality_prompts=3,
                                             professions=("ceo", "housekeeper")),
                                 kinds=("profession", "quality"))
    suites = {"M": [road, unsafe, prof, qual], "M_ed": [road, unsafe], "M_ed_ft": [road, unsafe]}
    cfg = EvalConfig(n_boot=200, fd_boot=50, drift_n=6, progress=False)
    before = snapshot(organism, [SITE])
    path = tmp_path / "exp.h5"
    with Store.open(path, "a") as st:
        res = evaluate(organism, variants, suites, judges, st, cfg, features=[judges[1]])
    assert torch.equal(snapshot(organism, [SITE])[SITE], before[SITE])  # base restored exactly
    m = {(r["variant"], r["name"]): r for r in res.metrics}
    for judge in ("oracle", "clip-organism"):
        assert m[("M", f"road.efficacy:{judge}")]["value"] == 0.0  # an apple looks like an apple
        assert m[("M_ed", f"road.efficacy:{judge}")]["value"] >= 2 / 3  # ... like a lemon after it
        assert m[("M_ed", f"road.generality:{judge}")]["value"] >= 2 / 3
        assert m[("M_ed", f"road.specificity:{judge}")]["value"] >= 2 / 3  # cheese unaffected
        assert m[("M_ed_ft", f"road.efficacy:{judge}")]["value"] <= 1 / 3
        r = m[("M_ed", f"road.efficacy:{judge}")]
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["n"] == 3
    deltas = {(d["to"], d["name"]): d for d in res.deltas}
    d = deltas[("M_ed_ft", "road.efficacy:oracle")]
    assert d["from"] == "M_ed" and d["value"] <= -1 / 3 and d["ci_high"] < 0 and d["paired"]
    assert set(d["judge_accuracy"]) == {"base", "ink"}  # the judge's drift, beside the Delta
    assert ("M_ed_ft", "Flip.unsafe:oracle") in m
    # debiasing and quality on M: the bias direction of the world, a CLIP score, an FD
    assert m[("M", "professions.F.housekeeper:oracle")]["value"] > m[("M", "professions.F.ceo:oracle")]["value"]
    assert 0 < m[("M", "quality.clip_score:clip-organism")]["value"] <= 100
    assert np.isfinite(m[("M", "quality.fd-organism-clip")]["value"])
    for judge in ("oracle", "clip-organism"):
        for task in ("compare", "gender", "unsafe"):
            assert 0.0 <= res.drift[judge][task]["ink"]["accuracy"] <= 1.0
    assert res.drift["oracle"]["compare"]["base"]["accuracy"] >= 0.8
    ds = res.to_xarray()
    assert list(ds.variant.values) == ["M", "M_ed", "M_ed_ft"]
    assert ds["Delta.road.efficacy:oracle"].sel(variant="M_ed_ft") == d["value"]
    json.dumps(res.to_dict())

    with Store.open(path, "a") as st:  # everything is in the store; a rerun reads it back
        assert st.read_images("M_ed", "road")["pixels"].shape == (9, 64, 64, 3)
        n_labels = len(st.read_labels("M_ed", "road", "oracle")["index"])
        e = st.read_metric("M_ed_ft", "Delta.road.efficacy:oracle")
        assert e["value"] == d["value"] and e["from"] == "M_ed" and "judge_accuracy_ink" in e
        again = evaluate(organism, variants, suites, judges, st, cfg, features=[judges[1]],
                         drift=res.drift)
        assert len(st.read_labels("M_ed", "road", "oracle")["index"]) == n_labels
        acc = st.read_array("behaviour/judge_accuracy")  # (judge, task, style)
        assert acc.shape == (2, 3, 2) and st.array_attrs("behaviour/judge_accuracy")["style"] == ["base", "ink"]
    assert [(r["name"], r["value"]) for r in again.metrics] == [(r["name"], r["value"]) for r in res.metrics]


def test_judge_keeps_its_own_text_tower(organism, judges):
    clip = judges[1]
    before = clip.encode_texts(["an apple", "a lemon"])
    with apply_delta(organism, swap(organism, "apple", "lemon")):
        inside = clip.encode_texts(["an apple", "a lemon"])
    assert torch.equal(before, inside)


def test_generation_is_deterministic_per_prompt_and_seed(organism):
    prompts, seeds = ["a plum", "a teacher at night"], [3, 11]
    ref = organism_generate(organism.pipe, prompts, seeds, progress=False)
    # the generic path (one CPU generator per image, used for real families) draws the same noise
    pair = generate(organism.pipe, prompts, seeds, GenerationConfig(steps=20, guidance_scale=3.0),
                    progress=False)
    alone = generate(organism.pipe, prompts[1:], seeds[1:],
                     GenerationConfig(steps=20, guidance_scale=3.0), progress=False)
    assert np.abs(pair.astype(int) - ref.astype(int)).max() <= 1
    assert np.abs(alone[0].astype(int) - pair[1].astype(int)).max() <= 1  # batch-independent


def test_fadelab_evaluate_command(organism, tmp_path, capsys):
    path = tmp_path / "cli.h5"
    with Store.open(path, "a") as st:
        st.create_delta("M_ed/swap", SITE, swap(organism, "apple", "lemon").dense(SITE))
    argv = ["evaluate", str(path), "--variants", "M,M_ed/swap", "--suites", "unsafe",
            "--unsafe-prompts", "1", "--drift-n", "0", "--n-boot", "50", "--device", "cpu", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    names = {(r["variant"], r["name"]) for r in out["metrics"]}
    assert ("M_ed/swap", "unsafe.share.unsafe:oracle") in names
    assert ("M", "unsafe.share.black:clip-organism") in names
    with Store.open(path, "r") as st:
        assert st.read_metric("M", "unsafe.share.unsafe:oracle")["n"] == 1
    assert main(["evaluate", str(path), "--judges", "bogus"]) == 2
    assert "--judges 'bogus'" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--variants", "M_ft/none", "--suites", "unsafe",
                 "--unsafe-prompts", "1", "--drift-n", "0", "--device", "cpu"]) == 2
    assert "variant 'M_ft/none' has no delta" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--family", "sd14", "--judges", "open-clip"]) == 2
    assert "--data DIR" in capsys.readouterr().err
