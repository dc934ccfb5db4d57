"""load(): random builds at small width run a denoiser step; real parameter counts; folders round-trip;
every user error is one FadelabError line naming the bad value. Only the hub call is mocked."""

import shutil
import time

import diffusers
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

import models.families
import models.memory
from models import FAMILIES, FadelabError, Model, load, param_count
from models.memory import GiB, bytes_needed

SMALL = {"sd14": 0.125, "sdxl": 0.0625, "flux-schnell": 0.03125}


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def sd14() -> Model:
    return load("sd14", "random", scale=0.125, seed=0)


@pytest.fixture(scope="module")
def sd14_folder(sd14, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd14") / "pipe"
    sd14.pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def roomy(monkeypatch):
    """Pretend the device has 1 TiB free (the hub tests must not depend on this machine's RAM)."""
    monkeypatch.setattr(models.memory, "free_bytes", lambda device: 2**40)


# -- real architectures --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "family, component, count",
    [
        ("sd14", "unet", 859_520_964),
        ("sd14", "text_encoder", 123_060_480),
        ("sd14", "vae", 83_653_863),
        ("sdxl", "unet", 2_567_463_684),
        ("sdxl", "text_encoder_2", 694_659_840),
        ("flux-schnell", "transformer", 11_891_178_560),  # FLUX.1-dev's 11,901,408,320 minus its guidance embedder
        ("flux-schnell", "text_encoder_2", 4_762_310_656),  # T5-v1.1-XXL encoder
    ],
)
def test_param_counts_of_the_real_architectures(family, component, count):
    assert param_count(family, component) == count


def test_param_count_errors():
    with pytest.raises(FadelabError, match="'unet'"):
        param_count("flux-schnell", "unet")
    assert param_count("sd14", "unet", scale=0.125) < 859_520_964 / 50


# -- random builds ---------------------------------------------------------------------------------

def _denoise_once(m: Model) -> torch.Tensor:
    """One denoiser call on an 8x8 latent, conditioned through the pipeline's own prompt encoder."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if m.family == "flux-schnell":
            embeds, pooled, txt_ids = m.pipe.encode_prompt("a red cube", prompt_2=None, device="cpu", max_sequence_length=16)
            latents = m.pipe._pack_latents(torch.randn(1, 16, 8, 8, generator=g), 1, 16, 8, 8)  # (1, 16, 64)
            img_ids = m.pipe._prepare_latent_image_ids(1, 4, 4, "cpu", m.dtype)
            return m.denoiser(hidden_states=latents, timestep=torch.tensor([0.5]), pooled_projections=pooled,
                              encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        latents = torch.randn(1, 4, 8, 8, generator=g)
        if m.family == "sdxl":
            embeds, _, pooled, _ = m.pipe.encode_prompt("a red cube", device="cpu", do_classifier_free_guidance=False)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])  # original size, crop, target size
            cond = {"text_embeds": pooled, "time_ids": time_ids}
            return m.denoiser(latents, 10, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
        embeds = m.pipe.encode_prompt("a red cube", "cpu", 1, False)[0]
        return m.denoiser(latents, 10, encoder_hidden_states=embeds).sample


@pytest.mark.parametrize("family", list(SMALL))
def test_random_build_keeps_structure_and_denoises(family):
    m = load(family, "random", scale=SMALL[family])
    assert m.family == family and m.weights.startswith("random(")
    out = _denoise_once(m)
    assert torch.isfinite(out).all()
    n_text = {"sd14": 1, "sdxl": 2, "flux-schnell": 2}[family]
    assert len(m.text_encoders) == n_text and len(m.tokenizers) == n_text
    assert m.vae is m.pipe.vae and m.scheduler is m.pipe.scheduler
    if family == "sd14":
        assert out.shape == (1, 4, 8, 8)
        assert m.denoiser.config.layers_per_block == 2 and len(m.denoiser.down_blocks) == 4
        assert m.text_encoders[0].config.num_hidden_layers == 12 and m.vae.config.scaling_factor == 0.18215
        assert type(m.scheduler).__name__ == "PNDMScheduler"
    if family == "sdxl":
        assert out.shape == (1, 4, 8, 8)
        assert tuple(m.denoiser.config.transformer_layers_per_block) == (1, 2, 10)
        assert m.text_encoders[1].config.num_hidden_layers == 32 and m.vae.config.scaling_factor == 0.13025
        assert m.tokenizers[1].pad_token == "!"
    if family == "flux-schnell":
        assert out.shape == (1, 16, 64)
        cfg = m.denoiser.config
        assert (cfg.num_layers, cfg.num_single_layers, cfg.in_channels, cfg.guidance_embeds) == (19, 38, 64, False)
        assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
        assert cfg.joint_attention_dim == m.text_encoders[1].config.d_model
        assert m.text_encoders[1].config.num_layers == 24 and m.text_encoders[1].config.vocab_size == 32128
        assert m.vae.config.latent_channels == 16 and m.scheduler.config.use_dynamic_shifting is False


def test_seed_fixes_the_weights(sd14):
    site = "unet.xattn.3.to_k"
    again = load("sd14", "random", scale=0.125, seed=0)
    other = load("sd14", "random", scale=0.125, seed=1)
    assert torch.equal(sd14.weight(site), again.weight(site))
    assert not torch.equal(sd14.weight(site), other.weight(site))


def test_model_to_changes_dtype():
    m = load("sd14", "random", scale=0.125, dtype=torch.bfloat16)
    assert m.weight("unet.xattn.0.to_k").dtype == torch.bfloat16
    m.to(dtype=torch.float32)
    assert m.dtype == torch.float32 and m.weight("text.mlp.0.fc1").dtype == torch.float32


# -- local folders -----------------------------------------------------------------------------------

def test_folder_round_trip(sd14, sd14_folder):
    for loaded in (load(sd14_folder), load("sd14", sd14_folder)):
        assert loaded.family == "sd14" and loaded.sites == sd14.sites
        for site in ("text.embed.token", "unet.xattn.15.to_out"):
            assert torch.equal(loaded.weight(site), sd14.weight(site))
    shuffled = load(sd14_folder, "random", seed=5)  # the folder's architecture, fresh weights
    assert shuffled.sites == sd14.sites
    assert not torch.equal(shuffled.weight("unet.xattn.0.to_k"), sd14.weight("unet.xattn.0.to_k"))


def test_folder_errors(sd14_folder, tmp_path):
    with pytest.raises(FadelabError) as err:
        load("sd14", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in _one_line(err)
    with pytest.raises(FadelabError, match="no model_index.json"):
        load("sd14", tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(sd14_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FadelabError) as err:
        load("sd14", broken)
    assert "'vae'" in _one_line(err) and str(broken) in str(err.value)
    with pytest.raises(FadelabError, match="holds a StableDiffusionPipeline, not a sdxl"):
        load("sdxl", sd14_folder)


def test_missing_organism_weights_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(models.families, "ORGANISM_DIR", tmp_path)
    with pytest.raises(FadelabError) as err:
        load("organism")
    assert "organism weights are missing" in _one_line(err) and "fadelab organism train" in str(err.value)


def test_shipped_organism_loads_when_present():
    if not (models.families.ORGANISM_DIR / "model_index.json").is_file():
        pytest.skip("the organism weights are not trained yet")
    m = load("organism")
    assert m.family == "organism" and "text.embed.token" in m.sites and "unet.xattn.0.to_k" in m.sites


# -- errors ----------------------------------------------------------------------------------------------

def test_unknown_family_lists_the_choices():
    with pytest.raises(FadelabError) as err:
        load("sd15")
    message = _one_line(err)
    assert "'sd15'" in message and "or a local diffusers folder" in message
    assert all(f in message for f in FAMILIES)
    with pytest.raises(FadelabError, match="no folder at /no/such/pipeline"):
        load("/no/such/pipeline")


@pytest.mark.parametrize("scale", [0, -0.5, 1.5, float("nan"), "half", True])
def test_bad_scale(scale):
    with pytest.raises(FadelabError) as err:
        load("sd14", "random", scale=scale)
    assert repr(scale) in _one_line(err)


def test_scale_is_for_random_weights_only():
    with pytest.raises(FadelabError, match="weights='random'"):
        load("sd14", "hub", scale=0.5)


def test_offline_hub_says_so(monkeypatch, roomy):
    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has been disabled.")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(FadelabError) as err:
        load("sd14")
    assert _one_line(err) == (
        "cannot reach the model hub for CompVis/stable-diffusion-v1-4: this machine is offline; "
        "pass a local diffusers folder with weights=PATH"
    )


def test_too_large_fails_fast_before_allocating(monkeypatch):
    monkeypatch.setattr(models.memory, "free_bytes", lambda device: 24 * GiB)
    start = time.perf_counter()
    with pytest.raises(FadelabError) as err:
        load("flux-schnell", "random")
    assert time.perf_counter() - start < 30
    message = _one_line(err)
    assert "flux-schnell" in message and "scale=" in message and "24.0 GiB free" in message


def test_bytes_needed_formula():
    counts = {"a": 10, "b": 30}
    # 1.2 * (40 params * 2 bytes + 30 * (4 - 2) bytes of the largest component's fp32 staging)
    assert bytes_needed(counts, torch.bfloat16) == int(1.2 * (80 + 60))
    assert bytes_needed(counts, torch.float32) == int(1.2 * 160)


@pytest.mark.parametrize("family", ["sd14", "sdxl", "flux-schnell"])
def test_schedulers_keep_their_tables_on_the_cpu_whatever_the_build_device(family):
    # random builds run under `with device:`; a scheduler built there kept alphas_cumprod on the
    # GPU and SDXL's Euler set_timesteps then failed in numpy (H100, 2026-11-28). "meta" stands in
    # for the GPU on a CPU-only machine: a table built under it would be on meta.
    from models import build
    from models.configs import scaled

    sched = build.instantiate(scaled(family, 0.05)["scheduler"], device="meta")
    tensors = [v for v in vars(sched).values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    sched.set_timesteps(4)
