"""The notebook API (fadelab.api) and the three worked studies (docs/studies/) in their reduced
(--quick) form on the real organism on the CPU: constraints that do what they say (frozen sites
bit for bit unchanged, only-trainable sites, L2 reduces the drift, projected gradients), and
each study's result file, store and metrics. The numbers of a quick run mean nothing; the tests
check shapes, ranges and the store layout, never the scientific direction."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fadelab as fl
from models.organism.nets import WEIGHTS_DIR

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(),
                                reason="organism weights missing")

STUDIES = Path(__file__).resolve().parents[1] / "docs" / "studies"


def _study(name: str):
    spec = importlib.util.spec_from_file_location(f"study_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the studies run on the shared 2-core CPU
    try:
        yield fl.load("organism")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fl.style_data(tmp_path_factory.mktemp("style"), n=8)


@pytest.fixture(scope="module")
def edit(model):
    return fl.erase(model)


def _short(**kw):
    return {"steps": 3, "batch_size": 2, "lr": 1e-2, "lr_scheduler": "constant", "warmup_steps": 0, **kw}


def _drift(delta, sites):
    return math.sqrt(sum(float(delta.norm(s)) ** 2 for s in sites))


# -- the API's constraints ---------------------------------------------------------------------

def test_freeze_leaves_the_edited_sites_bit_for_bit(model, data, edit):
    sites = fl.sites_of(edit)
    before = {s: model.module(s).weight.detach().clone() for s in sites}
    ft = fl.finetune(model, data, "full", edit=edit, freeze=sites, **_short())  # weight decay 1e-2 on
    for s in sites:
        assert torch.count_nonzero(ft.delta.dense(s)) == 0, s
    others = [s for s in ft.delta.sites() if s not in set(sites)]
    assert _drift(ft.delta, others) > 0
    for s, w in before.items():  # the loaded model is left as it was
        assert torch.equal(model.module(s).weight, w)


def test_only_trains_the_given_sites(model, data, edit):
    sites = fl.sites_of(edit)
    ft = fl.finetune(model, data, "full", edit=edit, only=sites, **_short())
    others = [s for s in ft.delta.sites() if s not in set(sites)]
    assert others and all(torch.count_nonzero(ft.delta.dense(s)) == 0 for s in others)
    assert _drift(ft.delta, sites) > 0


def test_l2_towards_the_edited_weights_reduces_drift(model, data, edit):
    sites = fl.sites_of(edit)
    free = fl.finetune(model, data, "full", edit=edit, only=sites, **_short(steps=4))
    tied = fl.finetune(model, data, "full", edit=edit, only=sites, l2=1e3, l2_sites=sites, **_short(steps=4))
    assert _drift(tied.delta, sites) < 0.8 * _drift(free.delta, sites)


def test_projection_hook_removes_the_subspace():
    q, _ = torch.linalg.qr(torch.randn(16, 3, dtype=torch.float64))
    from fadelab.api import constraint_hook

    hook = constraint_hook(projector={"unet.xattn.0.to_k": q})
    g = torch.randn(8, 16)
    out = hook("unet.xattn.0.to_k", g, torch.zeros(8, 16))
    assert torch.allclose(out @ q.float(), torch.zeros(8, 3), atol=1e-5)
    assert torch.equal(hook("unet.xattn.1.to_k", g, torch.zeros(8, 16)), g)
    assert constraint_hook() is None


def test_callback_every_k_steps(model, data):
    seen = []
    fl.finetune(model, data, "full", every=2, callback=lambda step, work: seen.append(step), **_short(steps=4))
    assert seen == [2, 4]


def test_record_on_a_variant_into_the_store(model, edit, tmp_path):
    with fl.open_store(tmp_path / "acts.h5") as st:
        acts = fl.record(model, ["a nurse", "a bloody apple"], ["text.mlp.3.fc2", "unet.xattn.0.to_k"],
                         delta=edit, store=st, variant="M_ed/erase")
        assert st.has_activations("M_ed/erase", "text.mlp.3.fc2")
    base = fl.record(model, ["a nurse", "a bloody apple"], ["unet.xattn.0.to_k"])
    assert acts["text.mlp.3.fc2"].shape[0] == 2 and torch.isfinite(acts["text.mlp.3.fc2"]).all()
    assert not torch.equal(acts["unet.xattn.0.to_k"], base["unet.xattn.0.to_k"])  # the edit is applied


# -- the studies, reduced ----------------------------------------------------------------------

def _in_unit(v):
    return v is not None and 0.0 <= v <= 1.0


def _check_store(path: Path, variants: list[str], metrics: list[str]):
    """Every variant holds every metric (and M_ed/erase its unsafe and style shares)."""
    from analysis.report import joined
    from store import Store

    with Store.open(path, "r") as st:
        have = {(m["variant"], m["name"]) for m in st.metric_entries()}
        for v in variants:
            for m in metrics:
                assert (v, m) in have, (v, m)
        assert ("M_ed/erase", "unsafe.share.unsafe:oracle") in have
        assert ("M_ed/erase", "style.ink_share:oracle") in have
        ds = joined(st)  # the report reads the study's store as a grid cell's
        assert "erase" in list(ds["edit"].values)


def test_study_fading_over_steps(model, tmp_path):
    study = _study("fading_over_steps")
    res = study.run(model, tmp_path, study.C.QUICK, 0.0, quick=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["edits"]) == {"erase", "debias"} and saved["pooled_within_edit_ranks"]
    for e, head in study.HEADLINE.items():
        curve = res["curves"][e]
        assert curve["steps"] == [0, 1, 2]
        assert all(_in_unit(v[0]) for v in curve["metrics"][head])
        assert all(_in_unit(v[0]) for v in curve["metrics"]["style.ink_share:oracle"])
        assert all(math.isfinite(k) for k in curve["kappa"])
        assert all(_in_unit(p) for p in curve["proj_in"][1:])
    _check_store(tmp_path / "study.h5", ["M_ed_ft/erase/full.step001", "M_ed_ft/erase/full.step002"],
                 ["unsafe.share.unsafe:oracle", "Delta.unsafe.share.unsafe:oracle",
                  "style.ink_share:oracle"])


def test_study_which_layers(model, tmp_path):
    study = _study("which_layers")
    res = study.run(model, tmp_path, study.C.QUICK, 0.0, quick=True)
    assert set(res["arms"]) == {"all", "frozen-edit", "only-edit"}
    assert res["arms"]["frozen-edit"]["drift_max_abs_edited"] == 0.0
    assert res["arms"]["only-edit"]["drift_other_sites"] == 0.0
    assert res["arms"]["all"]["drift_edited_sites"] > 0
    for arm in res["arms"].values():
        assert _in_unit(arm["unsafe"][0]) and _in_unit(arm["style"][0])
    assert {"erase -> all", "all -> frozen-edit", "all -> only-edit"} <= set(res["deltas"])
    for v, lo, hi in res["deltas"].values():
        assert -1 <= lo <= v <= hi <= 1
    _check_store(tmp_path / "study.h5", [f"M_ed_ft/erase/{a}" for a in res["arms"]],
                 ["Delta.unsafe.share.unsafe:oracle", "style.ink_share:oracle"])


def test_study_modular_lora(model, tmp_path):
    study = _study("modular_lora")
    res = study.run(model, tmp_path, study.C.QUICK, 0.0, quick=True)
    assert set(res["arms"]) == {"direct", "merged"}
    assert {"erase -> lora-direct", "erase -> lora-merged", "lora-direct -> lora-merged"} <= set(res["deltas"])
    assert set(res["style_deltas"]) == set(res["deltas"])
    for v, lo, hi in list(res["deltas"].values()) + list(res["style_deltas"].values()):
        assert -1 <= lo <= v <= hi <= 1
    assert np.isfinite(res["rel_difference_direct_vs_clean_lora"])
    _check_store(tmp_path / "study.h5", ["M_ed_ft/erase/lora-direct", "M_ed_ft/erase/lora-merged"],
                 ["Delta.unsafe.share.unsafe:oracle", "Delta.style.ink_share:oracle"])
