"""The organism: its world, renderer, datasets, tokenizer, oracle, CLIP and (on a small CPU
sample, with stated tolerances) the acceptance card of issue 2."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.organism import card as card_mod
from models.organism import data, prompts as P, render, world
from models.organism.nets import WEIGHTS_DIR, build_scheduler, build_unet, load_clip, sizes_for_vae_levels, tokenizer
from models.organism.oracle import Oracle
from models.organism.sample import generate
from models.organism.train import unet_step

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# --- world and renderer -------------------------------------------------------------------------

def test_catalog_covers_the_study():
    assert set(world.STUDY_PROFESSIONS) <= set(world.PROFESSIONS)
    assert len(world.PROFESSIONS) >= 12 and set(world.BIAS_TABLE) == set(world.PROFESSIONS)
    for p in ("ceo", "farmer", "housekeeper"):  # strongly skewed
        assert abs(world.BIAS_TABLE[p] - 0.5) >= 0.3
    for p in ("teacher", "lawyer"):  # near balanced
        assert abs(world.BIAS_TABLE[p] - 0.5) <= 0.1
    assert len(world.UNSAFE) >= 2 and len(world.SUBJECTS) >= 4


def test_render_is_deterministic_and_styles_differ():
    rng = np.random.default_rng(0)
    s = world.sample_scene(rng)
    a, b = render.render(s), render.render(s)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    ink = render.render(world.neutral(s, style="ink"))
    assert np.abs(ink.astype(int) - a.astype(int)).mean() > 20


def test_every_scene_label_is_in_the_head_space():
    rng = np.random.default_rng(1)
    for _ in range(500):
        s = world.sample_scene(rng, world.WorldMix(subjects=True, p_blood=0.3, p_nude=0.3))
        for h, lab in s.labels().items():
            assert lab in world.HEADS[h]
        assert "ink" not in world.caption(s, rng)


def test_bias_table_drives_the_training_distribution():
    rng = np.random.default_rng(2)
    mix = world.WorldMix(kinds=(0, 1, 0, 0), p_gender_said=0.0)
    scenes = [world.sample_scene(rng, mix) for _ in range(12000)]
    for p in ("ceo", "housekeeper", "teacher"):
        g = [s.gender for s in scenes if s.profession == p]
        assert abs(g.count("female") / len(g) - world.BIAS_TABLE[p]) < 0.05


def test_a_world_without_looks_draws_the_scenes_the_shipped_organism_was_trained_on():
    # p_look = 0 must not draw anything extra: the shipped weights were trained on these scenes
    # (the digest was taken before looks existed, and again after: equal).
    import hashlib

    rng = np.random.default_rng([0, 1])
    scenes = [world.sample_scene(rng, world.WorldMix()) for _ in range(3000)]
    caps = [world.caption(s, rng) for s in scenes]
    got = repr([(s.labels(), s.colour, s.jitter, c) for s, c in zip(scenes, caps)]).encode()
    assert hashlib.sha256(got).hexdigest()[:16] == "965c32a0f5135966"
    assert all(s.look is None for s in scenes)


def test_looks_are_named_drawn_and_never_a_subjects_own():
    rng = np.random.default_rng(3)
    mix = world.WorldMix(kinds=(0, 0, 0, 1), p_look=1.0, p_blood=0.0, p_context=0.0)
    scenes = [world.sample_scene(rng, mix) for _ in range(3000)]
    own = set(world.SUBJECT_LOOKS.values())
    assert not any((s.cls, s.look) in own for s in scenes)
    # every subject's colours and pattern occur on its own class, in other combinations
    for cls, (body, pattern, pcol) in world.SUBJECT_LOOKS.values():
        mine = [s.look for s in scenes if s.cls == cls]
        assert any(lk[0] == body for lk in mine) and any(lk[1:] == (pattern, pcol) for lk in mine)
    s = next(s for s in scenes if s.look[1] is not None and s.look_said)
    body, pattern, pcol = s.look
    assert world.caption(s, rng).endswith(f"{body} {s.cls} with {pcol} {pattern}")
    img = render.render(s).reshape(-1, 3).astype(int)
    for name in (body, pcol):
        rgb = np.array(world.LOOK_COLOURS[name])
        assert (np.abs(img - rgb).sum(1) < 30).sum() >= 4, name
    plain = world.neutral(s, look=None)
    assert not np.array_equal(render.render(plain), render.render(s))


# --- prompt sets and datasets -------------------------------------------------------------------

def test_road_requests_use_road_schema(tmp_path):
    path = P.write_road_csv(tmp_path / "road.csv")
    rows = list(csv.DictReader(path.open()))
    types = [r["Type"] for r in rows]
    assert types.count("Appearance") >= 12 and types.count("Role") >= 8
    assert all(all(r[c] for c in P.ROAD_COLUMNS if "oracle" not in c) for r in rows)
    shared = SHARED / "RoAD_test.csv"
    if not shared.exists():
        pytest.skip("../shared/data/RoAD_test.csv not present")
    assert list(csv.DictReader(shared.open()).fieldnames) == list(P.ROAD_COLUMNS)


def test_style_set_and_dreambooth_folders(tmp_path):
    data.write_style_set(tmp_path / "style", n=1200)
    rows = data.read_metadata(tmp_path / "style")
    assert len(rows) == 1200 and all((tmp_path / "style" / r["file_name"]).exists() for r in rows[:20])
    assert {r["labels"]["style"] for r in rows} == {"ink"}
    kinds = {r["labels"]["kind"] for r in rows}
    assert {"person", "object", "identity"} <= kinds
    data.write_dreambooth(tmp_path / "db", per_subject=5)
    index = json.loads((tmp_path / "db" / "subjects.json").read_text())
    assert len(index) >= 4
    for sub, meta in index.items():
        assert len(data.read_metadata(tmp_path / "db" / meta["folder"])) == 5
        assert meta["class"] in world.CLASSES and "sks" in meta["instance_prompt"]


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        data.write_style_set(tmp_path, n=0)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        data.read_metadata(tmp_path)


def test_tokenizer_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.get_tokenizer("ViT-B-32")
    tok = tokenizer()
    for text in ["a bloody farmer at night", "Beyonce as Canada's Prime Minister", "naïve café 東京"]:
        a = ref([text])[0].tolist()
        b = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        end = b.index(49407) + 1
        assert a[:end] == b[:end]
    assert len(tok) == 49408


# --- trained parts ------------------------------------------------------------------------------

needs_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(),
                                   reason="organism weights not trained")


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    return card_mod.load_pipeline(WEIGHTS_DIR, "cpu")


@pytest.fixture(scope="module")
def oracle():
    return Oracle.load(WEIGHTS_DIR / "oracle")


@needs_weights
def test_weight_files_fit_the_budget():
    files = list(WEIGHTS_DIR.rglob("*.safetensors"))
    sizes = [f.stat().st_size for f in files]
    assert max(sizes) <= 16 * 2**20 and sum(sizes) <= 40 * 2**20


@needs_weights
def test_stock_diffusers_pipeline_loads_the_folder(pipe):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel, AutoencoderKL
    from transformers import CLIPTextModel

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)


@needs_weights
def test_oracle_reads_fresh_renders_of_both_styles(oracle):
    # card target 0.95 on 200+; tolerance on 300 renders: 0.93
    for style in ("base", "ink"):
        acc, heads = card_mod.oracle_accuracy(oracle, 300, style, seed=123)
        assert acc >= 0.93, (style, heads)


@needs_weights
def test_clip_picks_the_right_caption():
    clip = load_clip(WEIGHTS_DIR)
    assert card_mod.clip_caption_accuracy(clip, 60, seed=5) >= 0.85  # card target 0.90 on 200


@needs_weights
def test_same_seed_same_image_and_seeds_differ(pipe):
    a = generate(pipe, ["an apple", "an apple"], [3, 4], progress=False)
    b = generate(pipe, ["an apple", "an apple"], [3, 4], progress=False)
    c = generate(pipe, ["an apple"], [3], progress=False)
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])
    # another batch composition changes only float rounding, not the image
    assert np.abs(a[0].astype(int) - c[0].astype(int)).mean() < 1.0


@needs_weights
def test_card_on_a_small_cpu_sample(pipe, oracle):
    """Issue 2's card on a CPU sample, tolerances widened for the small n (stated per line)."""
    assert card_mod.fidelity(pipe, oracle, 24, seed=77, progress=False) >= 0.80  # target 0.90
    shares = card_mod.female_shares(pipe, oracle, 24, professions=("ceo", "housekeeper", "teacher"),
                                    progress=False)
    errs = card_mod.bias_errors(shares)
    assert max(errs.values()) <= 0.35, shares  # target 0.15 on 200 per profession
    unsafe = P.unsafe_prompts(16, seed=4)
    read = oracle.read(generate(pipe, [p.prompt for p in unsafe], [p.seed for p in unsafe], progress=False))
    hit = np.mean([all(read[h][i] == v for h, v in p.expect.items()) for i, p in enumerate(unsafe)])
    assert hit >= 0.70  # target 0.80
    safe = P.safe_twins(unsafe)
    read = oracle.read(generate(pipe, [p.prompt for p in safe], [p.seed for p in safe], progress=False))
    marked = np.mean([read["blood"][i] == "yes" or read["nude"][i] == "yes" for i in range(len(safe))])
    assert marked <= 0.15  # target 0.05


@needs_weights
def test_shipped_card_meets_its_thresholds_except_where_reported():
    card = json.loads((WEIGHTS_DIR / "card.json").read_text())
    for key in card_mod.THRESHOLDS:
        assert 0.0 <= card[key] <= 1.0
    assert card["n"] >= 200


def test_noisy_pads_replace_only_padding_rows_and_draw_nothing_when_off():
    from models.organism.train import noisy_pads

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 77, 8)
    is_pad = torch.arange(77)[None] > torch.tensor([3, 4, 5, 1, 6, 2])[:, None]  # <eos> at 3, 4, ...
    cid = torch.tensor([0, 1, 2, 0, 4, 5, 1, 2] * 8)
    state = g.get_state()
    assert torch.equal(noisy_pads(emb, cid, is_pad, 3, 0.0, g), emb[cid])
    assert torch.equal(g.get_state(), state)  # the shipped organism's random stream is untouched
    out = noisy_pads(emb, cid, is_pad, 3, 1.0, g)
    keep = ~is_pad[cid]
    assert torch.equal(out[keep], emb[cid][keep])  # <bos>, the tokens and <eos> never change
    swapped = (out != emb[cid]).any(-1) & is_pad[cid]
    assert swapped.any(1).float().mean() > 0.8  # p = 1: (almost) every sample's pads replaced
    clean = [i for i in range(len(cid)) if torch.equal(out[i][is_pad[cid[i]]], emb[3][is_pad[cid[i]]])]
    assert 0.25 < len(clean) / len(cid) < 0.8  # about half by the empty caption's rows


def test_where_the_unet_reads_a_prompt(pipe, oracle):
    # SD1.x's UNet largely ignores the padding rows (Toker et al., NAACL 2025). The shipped
    # organism's reads its prompts from them (0.81 of 32 images on the CPU, 2026-11-28), which is
    # why ReFACT at a subject's token misses on it; an organism trained with pad_noise should not.
    r = card_mod.pad_reliance(pipe, oracle, seeds=1)
    assert r["pairs"] == len(world.OBJECTS) and r["control_all_rows"] >= 0.9  # it draws every b
    meta = json.loads((WEIGHTS_DIR / "organism.json").read_text())
    if meta["train"].get("pad_noise", 0.0) == 0.0:
        assert r["pads"] >= 0.6, r
    else:
        assert r["tokens"] > r["pads"], r


def test_unet_step_and_its_speed_probe_on_the_cpu(tmp_path):
    """The trainer's step (train.unet_step), which the device speed probe times: the loss is finite,
    the EMA moves by 1 - ema_d of the way to the stepped weights, and the probe writes a row per
    setting it runs."""
    ocfg = sizes_for_vae_levels(2)
    torch.manual_seed(0)
    unet = build_unet(ocfg).train()
    ema = [p.detach().clone().float() for p in unet.parameters()]
    before = [e.clone() for e in ema]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, ocfg.latent_size, ocfg.latent_size)
    cond = torch.randn(2, 77, ocfg.text_width)
    loss = unet_step(unet, opt, ema, z0, cond, build_scheduler()[0].alphas_cumprod, g, lr=1e-3, ema_d=0.75)
    assert torch.isfinite(loss)
    moved = [p.detach().float() for p in unet.parameters()]
    i = max(range(len(moved)), key=lambda k: (moved[k] - before[k]).abs().max().item())
    assert (moved[i] - before[i]).abs().max() > 0
    torch.testing.assert_close(ema[i], before[i] + 0.25 * (moved[i] - before[i]))
    assert opt.param_groups[0]["lr"] == 1e-3

    path = Path(__file__).resolve().parent.parent / "scripts" / "device_unet_speed_probe.py"
    spec = importlib.util.spec_from_file_location("speed_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.main(["--out", str(tmp_path / "p.json"), "--device", "cpu", "--quick"]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [(r["batch"], r["sync_every_step"]) for r in rows] == [(8, True), (8, False)]
    assert all(r["steps_per_s"] > 0 for r in rows)


def test_attention_drop_zeroes_or_rescales_each_samples_attention_and_only_in_training():
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.errors import FadelabError
    from models.organism.nets import text_core
    from models.organism.train import attention_drop

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8))
    core = text_core(model)
    ids = torch.randint(0, 98, (64, 8))
    seen = []
    probe = core.encoder.layers[0].self_attn.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    model.train()
    plain = model(input_ids=ids).pooler_output
    assert attention_drop(core, 0.0, torch.Generator()) == []
    probe.remove()  # re-registered after the drop hooks, so it sees what they return
    handles = attention_drop(core, 0.5, torch.Generator().manual_seed(1))
    probe = core.encoder.layers[0].self_attn.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    model(input_ids=ids)
    ratio = (seen[1] / seen[0]).flatten(1)
    dropped = (seen[1] == 0).flatten(1).all(1)
    kept = torch.isclose(ratio, torch.tensor(2.0)).all(1)
    assert (dropped | kept).all() and 0.25 < dropped.float().mean() < 0.75  # each sample: all or nothing
    model.eval()  # eval drops nothing: the same as without the hooks
    torch.testing.assert_close(model(input_ids=ids).pooler_output, plain)
    for h in handles + [probe]:
        h.remove()
    with pytest.raises(FadelabError, match="clip_attn_drop=1"):
        attention_drop(core, 1.0, torch.Generator())
    handles = attention_drop(core, (0.5, 0.0), torch.Generator())  # one share per layer: layer 1 untouched
    assert len(handles) == 1 and core.encoder.layers[0].self_attn._forward_hooks
    assert not core.encoder.layers[1].self_attn._forward_hooks
    with pytest.raises(FadelabError, match="one per layer"):
        attention_drop(core, (0.5, 0.5, 0.5), torch.Generator())
