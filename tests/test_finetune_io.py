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
    hp = H.defaults("lora", "organism", steps=2, batch_size=1, target="both", alpha=8.0, lr=1e-2)
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

    method = Lora(H.defaults("dora", "organism", target="text"))
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
    hp = H.defaults("textual-inversion", "organism", steps=2, batch_size=1, lr=0.5)
    r = train(model, subject, hp, adapter_dir=tmp_path, progress=False)
    assert r.adapter == tmp_path / "learned_embeds.safetensors"
    token, embeds = load_textual_inversion(r.adapter)
    assert token == "<sks>" and embeds.shape == (1, 128)
    prompts, seeds = ["a <sks> cat", *PROMPTS, "a sks cat"], [5, *SEEDS, 5]
    base = images(model.pipe, prompts, seeds)[1:]  # the same batch (a batch's make-up moves float rounding)
    with placeholder(model, token, embeds):
        ours = images(model.pipe, prompts, seeds)
        assert model.pipe.tokenizer.tokenize("a <sks> cat") == ["a</w>", "<sks>", "cat</w>"]
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
