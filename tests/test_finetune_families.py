"""Fine-tuning SDXL and FLUX.1-schnell (random weights at the smallest scale that builds, on the CPU):
full and UNet/transformer LoRA train two steps with a finite loss, their deltas name the family's
sites and reproduce the trained working copy, the loaded model is left unchanged, what a family
cannot train is refused in one line; FLUX LoRA on CLIP + transformer and SDXL LoRA on both CLIP
towers round-trip through the stock pipeline's load_lora_weights, and DreamBooth draws its class
images with the family's pipeline."""

import numpy as np
import pytest
import torch

import models
from finetuning import hparams as H
from finetuning import train
from finetuning.bench import synthetic_images
from models import FadelabError, apply_delta

# family: (scale, resolution in pixels); the smallest builds of tests/test_families.py shrunk
# further where they still build (SDXL needs 64 px: its UNet halves 8x8 latents twice)
FAMILIES = {"sdxl": (0.03125, 64), "flux-schnell": (0.03125, 32)}


@pytest.fixture(scope="module", autouse=True)
def _cpu():
    """One thread with denormals flushed: the random-weight builds' gradients and Adam moments fall
    into the denormal range, where the CPU is several times slower, and set_flush_denormal reaches
    the calling thread only (measured on the 2-core machine: the file took 195 s with two threads
    against 30 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


_MODELS = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = models.load(family, "random", scale=FAMILIES[family][0], seed=0)
    return _MODELS[family]


def _hp(method, family, **overrides):
    return H.defaults(method, family, **{"steps": 2, "batch_size": 1, "grad_accum": 1,
                                         "resolution": FAMILIES[family][1], "max_sequence_length": 8,
                                         **overrides})


def _state(model):
    return {f"{c}.{k}": v.clone() for c, m in model.pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


def _unchanged(model, before) -> bool:
    now = _state(model)
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


def _probe(model):
    """The denoiser's output on fixed inputs (SDXL: UNet with pooled and time ids; FLUX: transformer)."""
    g = torch.Generator().manual_seed(0)
    pipe = model.pipe
    with torch.no_grad():
        if model.family == "sdxl":
            unet = pipe.unet
            z = torch.randn(2, 4, 8, 8, generator=g)
            hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
            pooled = torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=g)
            ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(2, 1)
            return unet(z, torch.tensor([10, 500]), encoder_hidden_states=hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        tr = pipe.transformer
        z = pipe._pack_latents(torch.randn(2, 16, 4, 4, generator=g), 2, 16, 4, 4)
        hidden = torch.randn(2, 8, tr.config.joint_attention_dim, generator=g)
        pooled = torch.randn(2, tr.config.pooled_projection_dim, generator=g)
        return tr(hidden_states=z, timestep=torch.tensor([0.3, 0.9]), pooled_projections=pooled,
                  encoder_hidden_states=hidden, txt_ids=torch.zeros(8, 3),
                  img_ids=pipe._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32), return_dict=False)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["full", "lora"])
def test_full_and_lora_train_and_their_deltas_reproduce_the_working_copy(family, method):
    model = _model(family)
    before = _state(model)
    extra = {"lr": 1e-3} if method == "full" else {"target": "unet", "lr": 1e-2}
    seen = {}
    r = train(model, synthetic_images(2, FAMILIES[family][1]), _hp(method, family, **extra), checkpoint_every=2,
              seed=1, progress=False, callback=lambda step, work: seen.update({step: _probe(work)}))
    assert _unchanged(model, before)
    assert r.loss.shape == (2,) and np.isfinite(r.loss).all() and r.steps == [2]
    assert r.info["objective"] == {"sdxl": "sdxl", "flux-schnell": "flux"}[family]
    denoiser = model.pipe.unet if family == "sdxl" else model.pipe.transformer
    sites = r.delta.sites()
    if method == "full":
        prefixes = ("unet.",) if family == "sdxl" else ("transformer.", "dit.", "flux.")
        assert all(s.startswith(prefixes) for s in sites) and len(sites) == len(list(denoiser.parameters()))
        assert not any(r.delta.is_low_rank(s) for s in sites)
    else:
        table = ("unet.xattn.", "unet.sattn.") if family == "sdxl" else ("dit.attn.",)
        assert sites and all(s.startswith(table) and r.delta.is_low_rank(s) for s in sites)
        assert isinstance(r.adapter, dict) and r.adapter
    base = _probe(model)
    with apply_delta(model, r.delta):
        ours = _probe(model)
    assert _unchanged(model, before)
    assert not torch.allclose(seen[2], base, atol=1e-4)  # training moved the output
    assert torch.allclose(ours, seen[2], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_what_a_family_cannot_train_is_refused_in_one_line(family):
    model = _model(family)
    data = synthetic_images(1, FAMILIES[family][1])
    with pytest.raises(FadelabError) as e:
        train(model, data, _hp("textual-inversion", family, initializer_token="cup"), progress=False)
    message = str(e.value)
    assert "\n" not in message and family in message and "full, lora, dora and dreambooth" in message
    if family == "flux-schnell":
        with pytest.raises(FadelabError, match="multiple of 16 pixels, got 40"):
            train(model, synthetic_images(1, 40), _hp("lora", family, target="unet", resolution=40), progress=False)
        with pytest.raises(FadelabError, match="snr_gamma=5.0 .*flow matching"):
            train(model, data, _hp("full", family, snr_gamma=5.0), progress=False)


def _delta_matches_stock_lora(model, delta, folder, outputs, before):
    """outputs() with the delta applied in place equal outputs() of the stock pipeline after
    load_lora_weights(folder); the model is left as it was. Returns the delta's outputs."""
    with apply_delta(model, delta):
        ours = outputs()
    model.pipe.load_lora_weights(str(folder))
    try:
        stock = outputs()
    finally:
        model.pipe.unload_lora_weights()
    assert _unchanged(model, before)
    assert all(torch.allclose(a, b, atol=2e-5, rtol=1e-4) for a, b in zip(ours, stock))
    return ours


def test_flux_lora_on_both_targets_loads_in_the_stock_pipeline(tmp_path):
    """LoRA on CLIP (the pooled projection) and the transformer, saved in diffusers' FLUX LoRA format:
    the stock pipeline's load_lora_weights gives the outputs of the delta applied in place."""
    model = _model("flux-schnell")
    before = _state(model)
    r = train(model, synthetic_images(2, 32), _hp("lora", "flux-schnell", target="both", lr=1e-2, steps=1),
              adapter_dir=tmp_path, progress=False)
    assert {s.split(".")[0] for s in r.delta.sites()} == {"text", "dit"}
    assert r.adapter == tmp_path / "pytorch_lora_weights.safetensors" and r.adapter.is_file()
    ids = model.pipe.tokenizer(["a red cup"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs():
        with torch.no_grad():
            return _probe(model), model.pipe.text_encoder(ids).pooler_output

    ours = _delta_matches_stock_lora(model, r.delta, tmp_path, outputs, before)
    assert not torch.allclose(ours[1], outputs()[1], atol=1e-5)  # the text LoRA moved CLIP's pooled output


def test_dreambooth_generates_class_images_with_the_family_pipeline():
    model = _model("flux-schnell")
    data = synthetic_images(2, 32)
    data.rows = [{"class": "cup"}] * 2
    r = train(model, data, _hp("dreambooth", "flux-schnell", steps=1, lr=1e-4, num_class_images=1, class_steps=1,
                               class_batch=1), progress=False)
    assert r.info["class_prompt"] == "a cup" and r.info["class_images"] == 1 and np.isfinite(r.loss).all()
    assert len(r.delta.sites()) == len(list(model.pipe.transformer.parameters()))


def test_sdxl_text_lora_trains_both_towers_and_loads_in_the_stock_pipeline(tmp_path):
    """LoRA on both CLIP towers (train_dreambooth_lora_sdxl.py's --train_text_encoder): sites text.*
    and text2.*, and the stock pipeline's load_lora_weights gives the delta's text outputs."""
    model = _model("sdxl")
    before = _state(model)
    r = train(model, synthetic_images(2, 64), _hp("lora", "sdxl", target="text", lr=1e-2, steps=1),
              adapter_dir=tmp_path, progress=False)
    assert {s.split(".")[0] for s in r.delta.sites()} == {"text", "text2"} and r.adapter.is_file()
    ids = model.pipe.tokenizer(["a red cup"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs():
        with torch.no_grad():
            return (model.pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
                    model.pipe.text_encoder_2(ids, output_hidden_states=True).text_embeds)

    ours = _delta_matches_stock_lora(model, r.delta, tmp_path, outputs, before)
    assert not any(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, outputs()))
