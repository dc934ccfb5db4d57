"""Adapters in stock diffusers pipelines: a saved LoRA/DoRA loads with `load_lora_weights` and a saved
textual inversion with `load_textual_inversion`, on the organism folder, and give the lab's
in-memory images; plus the `fadelab finetune` command with a store."""

import json

import numpy as np
import pytest
import torch

from fadelab.cli import main
from finetuning import hparams as H
from finetuning import placeholder, train
from finetuning.lora_io import load_textual_inversion
from models import WeightDelta, apply_delta
from models.organism import data as organism_data
from models.organism.nets import WEIGHTS_DIR
from models.organism.sample import generate

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(), reason="organism weights missing")


def short(method, **overrides):
    """The organism's defaults for a run of a few steps: constant learning rate, no warm-up."""
    return H.defaults(method, "organism", **{"lr_scheduler": "constant", "warmup_steps": 0, **overrides})

PROMPTS, SEEDS, STEPS = ["a red cup on a table", "a chef at night"], [11, 12], 3


@pytest.fixture(scope="module")
def model():
    import models

    torch.set_num_threads(2)
    return models.load("organism")


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    return organism_data.write_style_set(tmp_path_factory.mktemp("style"), n=4, seed=0)


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return organism_data.write_dreambooth(tmp_path_factory.mktemp("db"), per_subject=2, seed=0) / "cat1"


def stock():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS_DIR), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, prompts=PROMPTS, seeds=SEEDS):
    return generate(pipe, prompts, seeds, steps=STEPS, progress=False).astype(int)


def test_saved_lora_gives_the_in_memory_images_in_a_stock_pipeline(model, style, tmp_path):
    """LoRA on both components with alpha / r = 2: unfused within one grey level of the merged
    in-memory variant, fused bit for bit."""
    hp = short("lora", steps=2, batch_size=1, target="both", alpha=8.0, lr=1e-2)
    r = train(model, style, hp, adapter_dir=tmp_path, progress=False)
    assert r.adapter == tmp_path / "pytorch_lora_weights.safetensors" and r.adapter.is_file()
    base = images(model.pipe)
    with apply_delta(model, r.delta):
        ours = images(model.pipe)
    assert np.abs(ours - base).max() > 20  # the LoRA changes the images
    pipe = stock()
    pipe.load_lora_weights(str(tmp_path))
    assert np.abs(images(pipe) - ours).max() <= 1
    pipe.fuse_lora()
    assert np.array_equal(images(pipe), ours)


def test_saved_dora_loads_with_its_magnitude(model, tmp_path):
    """The DoRA adapter as training leaves it (B and the magnitude moved away from their initial
    values), saved by the method and read by a stock pipeline: the text encoder matches the lab's
    dense DoRA delta applied in memory."""
    from finetuning.methods import Lora

    method = Lora(short("dora", target="text"))
    method.prepare(model, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if name.endswith(("lora_B", "lora_magnitude")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    method.adapter(model, tmp_path)
    delta = WeightDelta(method.delta())
    pipe = stock()
    pipe.load_lora_weights(str(tmp_path))
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
        work = method.components["text_encoder"](ids)[0]
        base = model.pipe.text_encoder(ids)[0]
        with apply_delta(model, delta):
            ours = model.pipe.text_encoder(ids)[0]
    assert (ours - base).abs().max() > 1e-3
    assert torch.allclose(work, ours, atol=2e-5) and torch.allclose(theirs, ours, atol=2e-5)


def test_textual_inversion_file_loads_and_other_prompts_are_bit_identical(model, subject, tmp_path):
    hp = short("textual-inversion", steps=2, batch_size=1, lr=0.5)
    r = train(model, subject, hp, adapter_dir=tmp_path, progress=False)
    assert r.adapter == tmp_path / "learned_embeds.safetensors"
    token, embeds = load_textual_inversion(r.adapter)
    assert token == "<sks>" and embeds.shape == (4, 128)  # the organism's 4 vectors
    prompts, seeds = ["a <sks> cat", *PROMPTS, "a sks cat"], [5, *SEEDS, 5]
    base = images(model.pipe, prompts, seeds)[1:]  # the same batch (a batch's make-up moves float rounding)
    with placeholder(model, token, embeds):
        ours = images(model.pipe, prompts, seeds)
        assert model.pipe.tokenizer.tokenize("a <sks> cat") == ["a</w>", "<sks>", "cat</w>"]
        # the pipeline expands "<sks>" to "<sks> <sks>_1 <sks>_2 <sks>_3", as diffusers' loader does
        assert model.pipe.maybe_convert_prompt("a <sks> cat", model.pipe.tokenizer) == "a <sks> <sks>_1 <sks>_2 <sks>_3 cat"
    assert len(model.pipe.tokenizer) == 49408  # restored
    assert np.array_equal(ours[1:], base)  # no other weight moved
    pipe = stock()
    pipe.load_textual_inversion(str(r.adapter))
    theirs = images(pipe, prompts, seeds)
    assert np.array_equal(theirs[1:], base) and np.array_equal(theirs[0], ours[0])
    # the delta form: the placeholder at its initial embedding, plus the one-hot row update
    v0 = torch.tensor(r.info["initial_embeds"])
    with placeholder(model, token, v0), apply_delta(model, r.delta):
        assert np.abs(images(model.pipe, prompts[:1], seeds[:1])[0] - ours[0]).max() <= 2


def test_cli_finetune_writes_results_store_and_resumes(style, tmp_path, capsys):
    from store import Store

    argv = ["finetune", "lora", "--data", str(style), "--steps", "2", "--set", "batch_size=2", "--set",
            "target='unet'", "--checkpoint-every", "1", "--out", str(tmp_path / "out"), "--store",
            str(tmp_path / "exp.h5"), "--ft-id", "lora-unet", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lora: 2 steps" in out and "M_ft/lora-unet" in out
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["info"]["hparams"]["target"] == "unet" and len(res["loss"]) == 2
    assert (tmp_path / "out" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    with Store.open(tmp_path / "exp.h5", "r") as st:
        sites = st.sites("M_ft/lora-unet")
        assert "unet.xattn.0.to_k" in sites and st.steps("M_ft/lora-unet") == [1, 2]
        b, a = st.read_delta("M_ft/lora-unet", "unet.xattn.0.to_k")
        assert b.shape[1] == a.shape[0] == 4
        assert list(st.read_loss("lora-unet")["step"]) == [1, 2]
    assert main(argv) == 0  # the rerun resumes from the saved state and keeps the stored entries
    assert json.loads((tmp_path / "out" / "result.json").read_text())["info"]["resumed_from"] == 2


def test_cli_errors_are_one_line(style, capsys):
    assert main(["finetune", "lora", "--data", str(style), "--set", "rank"]) == 2
    assert capsys.readouterr().err.strip() == "error: --set 'rank': give KEY=VALUE, e.g. --set rank=8"
    assert main(["finetune", "lora", "--data", str(style), "--set", "rank=0", "--device", "cpu"]) == 2
    assert "rank=0" in capsys.readouterr().err
    assert main(["finetune", "full", "--data", str(style) + "-missing", "--device", "cpu"]) == 2
    assert "no image folder" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_two_processes_equal_one_process_with_the_global_batch(style, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU) with batch 1 per process
    trains what one process does with batch 2: the same losses, and deltas equal up to float
    reduction order (amplified a little by Adam's normalisation)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from store import Store

    args = ["finetune", "lora", "--data", str(style), "--set", "target='unet'", "--set", "lr=0.01", "--steps", "2",
            "--set", "lr_scheduler='constant'", "--set", "warmup_steps=0", "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fadelab.cli"]
    done = subprocess.run(launch + args + ["--set", "batch_size=1", "--out", str(tmp_path / "two"), "--store",
                                           str(tmp_path / "two.h5")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(args + ["--set", "batch_size=2", "--out", str(tmp_path / "one"), "--store", str(tmp_path / "one.h5")]) == 0
    two, one = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("two", "one"))
    assert two["info"]["processes"] == 2 and one["info"]["processes"] == 1
    assert np.allclose(two["loss"], one["loss"], rtol=1e-5)
    with Store.open(tmp_path / "two.h5", "r") as a, Store.open(tmp_path / "one.h5", "r") as b:
        for site in b.sites("M_ft/lora"):
            da, db = a.read_delta("M_ft/lora", site, dense=True), b.read_delta("M_ft/lora", site, dense=True)
            assert (da - db).abs().max() <= 1e-2 * db.abs().max() + 1e-7, site
