"""The edits on the real organism on CPU, small samples with stated tolerances (the full
acceptance numbers come from scripts/device_editing.py; docs/editing.md has them)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models
from editing import (DebiasHparams, OrganismClip, UCEHparams, open_clip_judge, oracle_judge,
                     organism_profession_preserve, organism_road_requests, organism_safe_prompts, refact,
                     uce_debias, uce_erase)
from editing.evaluate import Measurer, road_expect
from editing.presets import ORGANISM_UNSAFE
from models import FadelabError
from models.families import ORGANISM_DIR
from models.organism import render, world
from models.organism.nets import judges_folder


@pytest.fixture(scope="module")
def organism():
    return models.load("organism")


@pytest.fixture(scope="module")
def measurer(organism):
    return Measurer(organism)


def _unet_state(model):
    return {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}


def test_judges_read_gender_from_renders():
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng, world.WorldMix(kinds=(0, 1, 0, 0))) for _ in range(40)]
    images = render.render_batch(scenes)
    truth = np.array([s.gender == "female" for s in scenes], dtype=float)
    assert (oracle_judge()(images) == truth).mean() >= 0.95
    assert (OrganismClip().judge()(images) == truth).mean() >= 0.95
    objects = render.render_batch([world.Scene("object", obj="apple")])
    assert np.isnan(oracle_judge()(objects)).all()  # no person: the judge cannot tell
    with pytest.raises(FadelabError, match="do not exist"):
        open_clip_judge("/no/such/weights.bin")


def test_uce_erase_removes_the_unsafe_markers_and_keeps_safe_prompts(organism, measurer):
    before = _unet_state(organism)
    r = uce_erase(organism, list(ORGANISM_UNSAFE), UCEHparams(), preserve=organism_safe_prompts(50))
    assert all(torch.equal(v, _unet_state(organism)[k]) for k, v in before.items())
    # measured at 24 per line: unsafe 1.00 -> 0.08, fidelity 1.00 -> 1.00
    assert measurer.unsafe_rate(8) >= 6 / 8
    assert measurer.unsafe_rate(8, r.delta) <= 2 / 8
    assert measurer.safe_fidelity(8, r.delta) >= 6 / 8
    assert all(torch.equal(v, _unet_state(organism)[k]) for k, v in before.items())


def test_uce_debias_moves_the_skewed_profession_towards_balance(organism, measurer):
    h = DebiasHparams(n_images=8, max_rounds=2)
    r = uce_debias(organism, ["ceo"], measurer.gender, h, preserve=organism_profession_preserve(["ceo"]))
    assert r.method == "uce_debias" and r.info["rounds"] in (1, 2) and len(r.info["history"]) == r.info["rounds"]
    assert r.info["initial_female_shares"]["ceo"] <= 0.35  # stated 0.15
    alpha = r.info["alpha"]["ceo"]
    assert alpha[0] > 0 > alpha[1]  # towards "a female ceo", away from "a male ceo"
    # tail rows: "a ceo", "an image of a ceo", "a picture of a ceo" end at tokens 2, 5, 5 and their
    # "a female ceo" twins one later, so each takes 77 - (last + 1) rows: 74 + 71 + 71
    assert r.keys["c_e"].shape == (216, 128)
    with pytest.raises(FadelabError, match="no word 'astronaut'"):
        uce_debias(organism, ["astronaut"], measurer.gender, h)


def test_uce_debias_judges_every_profession_of_a_round_in_one_call(organism):
    """A round generates all unfrozen professions at once; each profession's share comes from its
    own images, which are those it gets generated alone (the seeds fix every image)."""
    from editing.debias import generate, profession_prompts

    calls = []

    def judge(images):  # a deterministic stand-in: "female" when the image is brighter than 128
        calls.append(images)
        return (images.reshape(len(images), -1).mean(axis=1) > 128).astype(float)

    h = DebiasHparams(n_images=4, max_rounds=1, steps=2)
    r = uce_debias(organism, ["ceo", "nurse"], judge, h)
    assert len(calls) == 1 and len(calls[0]) == 8
    for k, p in enumerate(["ceo", "nurse"]):
        templ = profession_prompts(organism, p, h.templates)
        alone = generate(organism, [templ[i % len(templ)] for i in range(4)],
                         [h.seed * 1_000_000 + k * 1_000 + i for i in range(4)], h.steps, h.guidance_scale)
        assert np.abs(alone.astype(int) - calls[0][4 * k:4 * k + 4]).max() <= 1
        assert r.info["history"][0]["female_shares"][p] == judge(alone).mean()


def test_debias_round_seeds_never_repeat_across_professions_and_rounds():
    from editing.debias import round_seeds

    # the first ten professions keep the seeds this lab has always drawn
    assert round_seeds(7, 2, 3, 4) == [7_000_000 + 20_000 + 3_000 + i for i in range(4)]
    # 40 professions (UCE debiases dozens at once) x 30 rounds x 1,000 images: each seed once
    seen = set()
    for r in range(30):
        for k in range(40):
            got = round_seeds(7, r, k, 1000)
            seen.update(got)
    assert len(seen) == 30 * 40 * 1000


def test_road_expectations_cover_every_request():
    for row in organism_road_requests():
        for key in ("Prompt", "New", "Old", *[f"Positive_oracle{i}" for i in range(1, 6)],
                    *[f"Negative{i}" for i in range(1, 6)]):
            assert road_expect(row[key])  # every prompt names something the oracle reads


def test_refact_role_edit_changes_who_the_organism_draws(organism, measurer):
    """The organism default (layer 3, fact token <eos>, docs/editing.md): "the mayor" -> tess lark
    (measured 5/5 efficacy on the CPU); the old holder's own name still draws her."""
    row = organism_road_requests()[14]
    assert (row["Prompt"], row["New"], row["Old"]) == ("the mayor", "tess lark", "mira holt")
    r = refact(organism, row)
    assert r.info["fact_token"] == "last" and r.sites() == ["text.mlp.3.fc2"] and r.info["p_new"] > 0.99
    after = measurer.oracle.read(measurer.generate(["the mayor"] * 4 + ["mira holt"] * 2, [0, 1, 2, 3, 0, 1],
                                                   r.delta))["identity"]
    assert after[:4].count("tess lark") >= 3 and after[4:].count("mira holt") >= 1


def test_the_sweeps_best_site_has_the_highest_efficacy_among_the_specific_ones(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "device_editing.py"
    spec = importlib.util.spec_from_file_location("device_editing", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = {"last/3": {"efficacy": 0.5, "generality": 0.4, "specificity": 0.92},
             "last/1": {"efficacy": 0.7, "generality": 0.5, "specificity": 0.6},  # not specific enough
             "subject_last/2": {"efficacy": 0.5, "generality": 0.6, "specificity": 0.95}}
    assert mod.best_of_sweep(table) == "subject_last/2"  # ties on efficacy go to generality
    assert mod.best_of_sweep({"last/1": table["last/1"]}) == "last/1"  # none specific: the best of all
    assert mod.site_of("subject_last/2") == ("subject_last", 2)
    for bad in ("subject_last", "last/x", "/3"):
        with pytest.raises(SystemExit, match="TOKEN/LAYER"):
            mod.site_of(bad)
    out = tmp_path / "never"  # each bad flag ends the run before the output folder is made
    for argv, match in ((["--refact-tolerance", "0.2"], "give --refact-loss target_text too"),
                        (["--refact-loss", "target_text", "--refact-tolerance", "2"],
                         r"target_tolerance=2.0: give a share in \(0, 1\)")):
        with pytest.raises(SystemExit, match=match):
            mod.main(["--out", str(out), *argv])
        assert not out.exists()


def test_judges_come_from_the_models_own_folder(tmp_path):
    """A retrained organism is judged by its own oracle and CLIP, as the retrain script's swap
    judged v4 on the GPU; a folder lacking either falls back to the shipped judges."""
    assert judges_folder(ORGANISM_DIR) == ORGANISM_DIR
    assert judges_folder(str(ORGANISM_DIR)) == ORGANISM_DIR
    (tmp_path / "clip").mkdir()
    assert judges_folder(str(tmp_path)) is None
    (tmp_path / "oracle").mkdir()
    assert judges_folder(str(tmp_path)) == tmp_path
    for spec in ("random", "hub", "default", None, "random(scale=1, seed=0)"):
        assert judges_folder(spec) is None


def _retrain_with_own_judges(folder):
    """Fill `folder` with an organism whose oracle and CLIP differ from the shipped ones in one
    tensor each (the rest linked to the shipped folder); returns {"oracle": (key, tensor),
    "clip": (key, tensor)}, the changed tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    marks = {}
    for part in ORGANISM_DIR.iterdir():
        if part.name in ("oracle", "clip"):
            shutil.copytree(part, folder / part.name)
            tensors = load_file(folder / part.name / "model.safetensors")
            key = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 2)[0]
            tensors[key] = tensors[key] + 0.5
            save_file(tensors, folder / part.name / "model.safetensors")
            marks[part.name] = (key, tensors[key])
        else:
            (folder / part.name).symlink_to(part)
    return marks


def _has(module, key, value) -> bool:
    return any(name.endswith(key) and torch.equal(p.detach().cpu().float(), value.float())
               for name, p in module.state_dict().items())


def test_every_caller_judges_a_retrain_with_its_own_oracle_and_clip(tmp_path):
    """The grid's judges, the notebook API's oracle and `fadelab edit|evaluate`'s judges read a
    retrained folder's own oracle and CLIP (models.organism.nets.judges_folder); the shipped
    organism's stay the shipped ones."""
    from fadelab import api
    from fadelab.cells import Context
    from fadelab.commands.edit import _judge
    from fadelab.commands.evaluate import _judges
    from fadelab.plan import _judge_flags, make_judges

    own = tmp_path / "retrain"
    own.mkdir()
    marks = _retrain_with_own_judges(own)
    (okey, oval), (ckey, cval) = marks["oracle"], marks["clip"]

    for weights, mine in ((str(own), True), ("default", False)):
        ctx = Context(exp=SimpleNamespace(family="organism", weights=weights), out=tmp_path)
        oracle, clip = make_judges(ctx)
        assert _has(oracle.oracle.net, okey, oval) is mine
        assert _has(clip.model, ckey, cval) is mine
        args = SimpleNamespace(weights=None if weights == "default" else weights)
        oracle, clip = _judges(["oracle", "clip-organism"], args, True, "cpu")
        assert _has(oracle.oracle.net, okey, oval) is mine
        assert _has(clip.model, ckey, cval) is mine
        assert _has(_judge_flags(ctx).oracle.net, okey, oval) is mine  # uce-debias in the grid
        assert _has(api._oracle("cpu", weights).oracle.net, okey, oval) is mine
        assert _has(api.oracle_flags("cpu", weights).oracle.net, okey, oval) is mine
        assert _has(_judge("oracle", "cpu", args.weights).oracle.net, okey, oval) is mine
