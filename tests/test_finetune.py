"""Fine-tuning: hparams, data errors, caches, and every method on the real organism on the CPU (a few
steps on a few images): deltas that reproduce the trained model, the loaded model left unchanged,
checkpoints, resume, non-finite losses, gradient hooks."""

import json
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetuning import hparams as H
from finetuning import train
from finetuning.cache import LatentCache, TextCache, encode_pixels
from finetuning.data import ImageFolder
from finetuning.loop import IndexStream, epoch_indices
from finetuning.result import NonFiniteLoss
from models import FadelabError, WeightDelta, apply_delta
from models.organism import data as organism_data
from models.organism.nets import WEIGHTS_DIR

needs_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(), reason="organism weights missing")


def short(method, **overrides):
    """The organism's defaults for a run of a few steps: constant learning rate, no warm-up."""
    return H.defaults(method, "organism", **{"lr_scheduler": "constant", "warmup_steps": 0, **overrides})


# --- hparams ----------------------------------------------------------------------------------


def test_defaults_are_the_recipes_and_the_organism_overrides():
    assert H.FullHParams().lr == 1e-5 and H.FullHParams().grad_accum == 4
    lora = H.defaults("lora")
    assert (lora.rank, lora.lr, lora.target, lora.modules("text")) == (4, 1e-4, "text", ("q_proj", "k_proj", "v_proj",
                                                                                          "out_proj"))
    dora = H.defaults("dora")
    assert dora.use_dora and dora.optimizer == "prodigy" and dora.lr == 1.0
    db = H.defaults("dreambooth")
    assert (db.lr, db.steps, db.prior_loss_weight, db.num_class_images) == (5e-6, 800, 1.0, 200)
    ti = H.defaults("textual-inversion")
    assert (ti.lr, ti.scale_lr, ti.grad_accum, ti.steps) == (5e-4, True, 4, 3000)
    for method, values in H.ORGANISM.items():
        hp = H.defaults(method, "organism")
        assert all(getattr(hp, k) == v for k, v in values.items())
    assert H.defaults("lora", "organism", rank=16).rank == 16


def test_hparams_files_and_bad_values(tmp_path):
    (tmp_path / "a.toml").write_text('method = "lora"\nrank = 8\ntarget = "unet"\n')
    hp = H.load(tmp_path / "a.toml", "organism")
    assert (hp.rank, hp.target, hp.steps) == (8, "unet", H.ORGANISM["lora"]["steps"])
    (tmp_path / "b.json").write_text(json.dumps(H.to_dict(hp)))
    assert H.load(tmp_path / "b.json") == hp  # to_dict round-trips
    (tmp_path / "c.toml").write_text("rank = 8\n")
    with pytest.raises(FadelabError, match="no 'method'"):
        H.load(tmp_path / "c.toml")
    with pytest.raises(FadelabError, match=r"unknown lora hparams settings \['rnk'\]"):
        H.defaults("lora", rnk=8)
    with pytest.raises(FadelabError, match="target='vae'.*text, unet, both"):
        H.defaults("lora", target="vae")
    with pytest.raises(FadelabError, match="steps=0"):
        H.defaults("full", steps=0)
    with pytest.raises(FadelabError, match="unknown fine-tuning method 'qlora'"):
        H.defaults("qlora")
    with pytest.raises(FadelabError, match="warmup_steps=5 has no effect"):
        H.defaults("full", warmup_steps=5)
    with pytest.raises(FadelabError, match="template"):
        H.defaults("textual-inversion", templates=("a photo",))
    with pytest.raises(FadelabError, match="cuda_graphs='yes'; give true, false or \"auto\""):
        H.defaults("lora", cuda_graphs="yes")
    with pytest.raises(FadelabError, match="cuda_graphs=1; give true, false"):
        H.defaults("lora", cuda_graphs=1)
    assert H.defaults("lora").cuda_graphs is False and H.defaults("lora", "organism").cuda_graphs == "auto"
    with pytest.raises(FadelabError, match="cache=1; give true or false"):
        H.defaults("full", cache=1)


# --- data -------------------------------------------------------------------------------------


def _folder(tmp_path, lines, files=("0.png",)):
    for name in files:
        Image.new("RGB", (80, 100), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("lines, match", [
    ([], "lists no images"),
    (['{"file_name": "0.png", "text": "a cup"}', "{oops"], "metadata.jsonl line 2 is not JSON"),
    (['{"text": "a cup"}'], "line 1 has no 'file_name'"),
    (['{"file_name": "0.png"}'], r"line 1 \(0.png\) has no caption in 'text'"),
    (['{"file_name": "0.png", "text": "  "}'], "has no caption"),
    (['{"file_name": "9.png", "text": "a cup"}'], r"9.png \(named on .*line 1\) does not exist"),
    (['{"file_name": "bad.png", "text": "a cup"}'], r"cannot read image .*bad.png"),
])
def test_data_errors_name_the_file(tmp_path, lines, match):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FadelabError, match=match):
        ImageFolder(_folder(tmp_path, lines))


def test_data_folder_errors(tmp_path):
    with pytest.raises(FadelabError, match="no image folder"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(FadelabError, match="metadata.jsonl does not exist"):
        ImageFolder(tmp_path)


def test_images_are_resized_and_centre_cropped(tmp_path):
    img = np.zeros((100, 80, 3), np.uint8)
    img[:, :40] = 255  # left half white
    Image.fromarray(img).save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a cup", "class": "cup"}\n')
    ds = ImageFolder(tmp_path)
    x = ds.pixels([0], 64)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert x[0, :, :, :31].min() > 0.9 and x[0, :, :, 33:].max() < -0.9  # the split stays in the middle
    assert ds.column("class") == ["cup"] and ds.captions == ["a cup"]


def test_epoch_stream_is_permutations_and_chunking_free():
    full = epoch_indices(7, 0, 21, seed=3)
    for e in range(3):
        assert sorted(full[7 * e:7 * (e + 1)].tolist()) == list(range(7))
    parts = torch.cat([epoch_indices(7, s, 4, seed=3) for s in range(0, 24, 4)])
    assert torch.equal(parts[:21], full)
    assert not torch.equal(epoch_indices(7, 0, 7, seed=4), full[:7])
    # the training loop's device-resident stream gives the same indices, in any order of calls
    stream = IndexStream(7, 3, "cpu")
    for start, count in [(0, 4), (4, 4), (5, 9), (20, 3), (1, 21), (0, 7)]:
        assert torch.equal(stream.take(start, count), epoch_indices(7, start, count, seed=3)), (start, count)


# --- the organism -----------------------------------------------------------------------------


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
    return organism_data.write_dreambooth(tmp_path_factory.mktemp("db"), per_subject=2, seed=0) / "dog1"


def _state(model):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "vae")
            for k, v in getattr(model.pipe, c).state_dict().items()}


def _unchanged(model, before) -> bool:
    now = _state(model)
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


@needs_weights
def test_caches_are_keyed_by_dataset_index(model, style):
    ds = ImageFolder(style)
    cache = LatentCache.build(model.vae, ds, 64, batch=3)
    mean, std = encode_pixels(model.vae, ds.pixels([2], 64), bf16=False)
    assert torch.allclose(cache.mean[2], mean[0], atol=1e-4) and torch.allclose(cache.std[2], std[0], atol=1e-4)
    eps = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    z = cache.sample(torch.tensor([2, 0]), eps)
    assert torch.equal(z[1], cache.mean[0] + cache.std[0] * eps[1])
    assert torch.equal(cache.sample(torch.tensor([2]), None)[0], cache.mean[2])
    text = TextCache.build(model.pipe.tokenizer, ["a cup", "a dog", "a cup"]).encode(model.pipe.text_encoder,
                                                                                      bf16=False)
    ids, hidden = text.for_indices(torch.tensor([2, 1]))
    assert text.texts == ["a cup", "a dog"] and ids.shape == (2, 77)
    assert torch.allclose(hidden, model.pipe.text_encoder(ids)[0], atol=1e-5)


@needs_weights
def test_latent_cache_is_shared_until_the_vae_or_the_folder_changes(model, style, tmp_path):
    ds = ImageFolder(style)
    first = LatentCache.shared(model.vae, ds, 64, bf16=False)
    assert LatentCache.shared(model.vae, ImageFolder(style), 64, bf16=False) is first  # a second fine-tune
    assert LatentCache.shared(model.vae, ds, 32, bf16=False) is not first  # another resolution
    p = next(model.vae.parameters())
    with torch.no_grad():
        p.add_(0.0)  # an in-place write (apply_delta, an optimizer) bumps the version counter
    again = LatentCache.shared(model.vae, ds, 64, bf16=False)
    assert again is not first and torch.equal(again.mean, first.mean)
    copy = tmp_path / "copy"
    shutil.copytree(style, copy)
    assert LatentCache.shared(model.vae, ImageFolder(copy), 64, bf16=False) is not again
    from finetuning.data import ImageTensors

    mem = ImageTensors(np.zeros((2, 64, 64, 3), np.uint8), ["a", "b"])
    assert LatentCache.shared(model.vae, mem, 64, bf16=False) is not LatentCache.shared(model.vae, mem, 64, bf16=False)


CASES = {
    # method: (data, overrides, a site that must be in the delta, its form, component the callback reads)
    "full": ("style", {}, "unet.conv_in.bias", "dense", "unet"),
    "lora": ("style", {"target": "both", "rank": 4, "alpha": 8.0, "lr": 1e-2}, "text.attn.0.q", "lowrank", "unet"),
    "dora": ("style", {"target": "text"}, "text.attn.5.out", "dense", "text_encoder"),
    "dreambooth": ("subject", {"num_class_images": 2, "class_steps": 2}, "unet.xattn.0.to_k", "dense", None),
    "textual-inversion": ("subject", {"lr": 0.05}, "text.embed.token", "lowrank", None),
}


def _probe(model):
    """Outputs of the model's UNet and text encoder on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    z, cond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    ids = model.pipe.tokenizer(["a red cup", "a chef"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        return {"unet": model.pipe.unet(z, torch.tensor([10, 500]), cond).sample,
                "text_encoder": model.pipe.text_encoder(ids)[0]}


@needs_weights
@pytest.mark.parametrize("method", list(CASES))
def test_each_method_trains_checkpoints_and_leaves_the_model_unchanged(method, model, style, subject):
    """Two steps of every method: checkpoints, delta forms and sites, the loaded model untouched, and
    (full, LoRA, DoRA) the delta reproducing the trained working copy, read by the callback at the
    last step (LoRA/DoRA: merged against unmerged, float tolerance)."""
    data, extra, site, form, component = CASES[method]
    before = _state(model)
    seen = {}
    hp = short(method, steps=2, batch_size=1, **extra)
    r = train(model, style if data == "style" else subject, hp, checkpoint_every=1, seed=1, progress=False,
              callback=lambda step, work: seen.update({step: _probe(work)}) if component else None)
    assert _unchanged(model, before)
    assert r.method == method and r.loss.shape == (2,) and np.isfinite(r.loss).all()
    assert r.steps == [1, 2] and r.delta.sites() == r.at(2).sites()
    assert torch.equal(r.at(2).dense(site), r.delta.dense(site))
    assert r.delta.is_low_rank(site) == (form == "lowrank") and r.delta.norm(site) > 0
    if component:
        base = _probe(model)[component]
        with apply_delta(model, r.delta):
            ours = _probe(model)[component]
        assert _unchanged(model, before)
        assert not torch.allclose(seen[2][component], base, atol=1e-4)  # training moved the output
        assert torch.allclose(ours, seen[2][component], atol=2e-5, rtol=1e-4)
    if method == "full":
        assert all(s.startswith("unet.") for s in r.delta.sites())
        assert len(r.delta.sites()) == len(list(model.pipe.unet.parameters()))
    if method == "lora":  # (alpha / r) B A with alpha / r = 2, on both components
        assert {s.split(".")[0] for s in r.delta.sites()} == {"text", "unet"}
        assert isinstance(r.adapter, dict) and any(k.startswith("unet.") for k in r.adapter)
    if method == "dreambooth":
        assert r.info["class_prompt"] == "a dog" and r.info["class_images"] == 2
        with apply_delta(model, r.delta):  # every site resolves on the loaded model
            pass
    if method == "textual-inversion":  # the row needs the placeholder: tests/test_finetune_io.py
        assert r.delta.sites() == ["text.embed.token"]
        b, a = r.delta.deltas["text.embed.token"]
        n = hp.num_vectors  # the organism's default: 4 vectors of width 128
        assert b.shape == (49408 + n, n) and torch.equal(b[49408:], torch.eye(n)) and b.sum() == n
        assert a.shape == (n, 128) and r.info["token_ids"] == list(range(49408, 49408 + n))
        assert r.info["initializer_token"] == "dog"
        assert set(r.adapter) == {"<sks>"}


@needs_weights
def test_base_delta_is_the_start_and_grad_hooks_freeze_sites(model, style):
    site, frozen = "unet.xattn.0.to_k", "unet.xattn.1.to_v"
    w = model.weight(site)
    base = WeightDelta({site: 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))},
                       {"method": "test-edit"})
    before = _state(model)
    seen = {}
    hp = short("full", steps=1, batch_size=1, weight_decay=0.0)
    r = train(model, style, hp, base_delta=base, checkpoint_every=1, progress=False,
              callback=lambda step, work: seen.update(w=work.weight(site).detach().clone()),
              grad_hook=lambda name, grad, param: torch.zeros_like(grad) if name == frozen else grad)
    assert _unchanged(model, before)
    # trained = (W + dW_ed) + dW_ft, so dW_ft is the fine-tuning update alone
    assert torch.allclose(seen["w"], w + base.dense(site) + r.delta.dense(site), atol=1e-6)
    assert r.delta.norm(site) > 0 and r.delta.provenance["parent"] == {"method": "test-edit"}
    assert r.delta.norm(frozen) == 0.0  # zero gradient, no weight decay: AdamW leaves it exactly


def test_cuda_graphs_say_where_they_cannot_apply():
    from types import SimpleNamespace

    from finetuning.graphs import graphs_unsupported

    sd, sdxl = SimpleNamespace(kind="sd"), SimpleNamespace(kind="sdxl")
    hp = H.defaults("lora", "organism", cuda_graphs=True)
    assert graphs_unsupported(hp, torch.device("cpu"), 1, sd) == "CUDA only; this run is on cpu"
    assert "one process only; this run has 2" in graphs_unsupported(hp, torch.device("cuda"), 2, sd)
    assert "the SD1.x objective only; this run's is 'sdxl'" == graphs_unsupported(hp, torch.device("cuda"), 1, sdxl)
    assert graphs_unsupported(hp, torch.device("cuda"), 1, sd) is None
    assert graphs_unsupported(replace(hp, grad_accum=2), torch.device("cuda"), 1, sd) == "grad_accum 1 only; this run has 2"


def test_graphs_config_turns_graphs_on_in_every_fine_tune_and_nothing_else(tmp_path):
    """scripts/graphs_config.py (device_next.sh 5 with GRAPHS=1): the shipped organism grid with
    cuda_graphs in each fine-tune, the rank ablation's copies included, and the same cells."""
    import importlib.util

    from fadelab.grid import cells, load_experiment

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("graphs_config", root / "scripts" / "graphs_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shipped = root / "experiments" / "organism.toml"
    (tmp_path / "g.toml").write_text(mod.with_graphs(shipped.read_text()))
    exp, ref = load_experiment(tmp_path / "g.toml"), load_experiment(shipped)
    assert len(exp.finetunes) == len(ref.finetunes) >= 7
    for table, orig in zip(exp.finetunes, ref.finetunes):
        assert table["hparams"].pop("cuda_graphs") is True, table["id"]
        assert table == {**orig, "hparams": orig.get("hparams", {})}
    assert [c.variant for c in cells(exp)] == [c.variant for c in cells(ref)]


def test_graphed_denoiser_captures_once_and_runs_other_shapes_eagerly(monkeypatch, caplog):
    """make_graphed_callables stood in by a recorder (no GPU here): the first call captures with
    detached copies of the inputs, equal inputs replay, a changed batch size runs eagerly."""
    import logging

    from finetuning import graphs

    captured = []

    def fake_make_graphed(module, sample, allow_unused_input=False):
        captured.append(sample)
        return lambda *args: module(*args) + 1000.0  # marks outputs that came through "the graph"

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed)
    den = lambda zt, t, encoder_hidden_states, return_dict: (zt * 2 + encoder_hidden_states.sum(),)  # noqa: E731
    g = graphs.GraphedDenoiser(torch.nn.Identity())
    g.denoiser = den
    zt, t, c = torch.ones(2, 4), torch.zeros(2, dtype=torch.long), torch.ones(2, 3, requires_grad=True)
    first = g(zt, t, encoder_hidden_states=c, return_dict=False)[0]
    again = g(zt * 3, t, encoder_hidden_states=c, return_dict=False)[0]
    assert len(captured) == 1 and captured[0][2].requires_grad and captured[0][2].grad_fn is None
    assert captured[0][0] is not zt and torch.equal(captured[0][0], zt)
    assert torch.equal(first, zt * 2 + 6 + 1000) and torch.equal(again, zt * 6 + 6 + 1000)
    with caplog.at_level(logging.WARNING, logger="finetuning.graphs"):
        other = g(torch.ones(3, 4), torch.zeros(3, dtype=torch.long), encoder_hidden_states=torch.ones(3, 3),
                  return_dict=False)[0]
    assert torch.equal(other, torch.ones(3, 4) * 2 + 9) and g.eager_calls == 1  # eager: no +1000
    assert "differ from the captured" in caplog.text


def test_a_failed_capture_trains_on_eagerly_and_says_why(monkeypatch, caplog):
    import logging

    from finetuning import graphs
    from finetuning.loop import _graphs_info

    tries = []

    def failing(module, sample, allow_unused_input=False):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nmore lines")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", failing)
    g = graphs.GraphedDenoiser(None)
    g.denoiser = lambda zt, t, encoder_hidden_states, return_dict: (zt * 2,)
    zt, t, c = torch.ones(2, 4), torch.zeros(2, dtype=torch.long), torch.ones(2, 3)
    with caplog.at_level(logging.WARNING, logger="finetuning.graphs"):
        outs = [g(zt, t, encoder_hidden_states=c)[0] for _ in range(3)]
    assert all(torch.equal(o, zt * 2) for o in outs) and len(tries) == 1  # one try, then eager
    assert "capture failed (RuntimeError: operation not permitted when stream is capturing)" in caplog.text
    assert _graphs_info(g) == {"failed": "RuntimeError: operation not permitted when stream is capturing"}
    assert _graphs_info(object()) is False


@needs_weights
def test_cuda_graphs_on_the_cpu_change_nothing(model, style, caplog):
    import logging

    hp = short("lora", steps=2, batch_size=2, lr=1e-2, target="unet", cuda_graphs=False)
    eager = train(model, style, hp, seed=5, progress=False)
    for setting, level in ((True, logging.WARNING), ("auto", logging.INFO)):  # asked outright: a warning
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="finetuning.loop"):
            asked = train(model, style, replace(hp, cuda_graphs=setting), seed=5, progress=False)
        said = [r for r in caplog.records if "cuda_graphs ignored: CUDA only" in r.getMessage()]
        assert [r.levelno for r in said] == [level], setting
        assert asked.info["cuda_graphs"] is False and np.array_equal(asked.loss, eager.loss)
        for site in eager.delta.sites():
            assert torch.equal(asked.delta.dense(site), eager.delta.dense(site))


def test_a_capture_turns_torchs_stream_mismatch_warning_off_first():
    from finetuning.graphs import _quiet_stream_mismatch

    was = torch._C._warn_on_accumulate_grad_stream_mismatch()
    try:
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(True)
        _quiet_stream_mismatch()
        assert torch._C._warn_on_accumulate_grad_stream_mismatch() is False
    finally:
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(was)


@needs_weights
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_train_as_eager_does_on_a_gpu():
    """Organism LoRA and full fine-tunes, 20 steps, graphs on and off: every step replays the
    captured graphs, and the losses and deltas agree to bf16 autocast's tolerance."""
    import models

    gpu = models.load("organism", device="cuda")
    data = organism_data.write_style_set(Path(tempfile.mkdtemp()), n=32, seed=0)
    for method in ("lora", "full"):
        hp = short(method, steps=20, batch_size=8, cuda_graphs=False)
        eager = train(gpu, data, hp, seed=2, progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphed = train(gpu, data, replace(hp, cuda_graphs=True), seed=2, progress=False)
        # torch's AccumulateGrad stream-mismatch warning is off once graphs are captured (it
        # printed in each of the GPU main job's 8 processes through session 21)
        assert not [w for w in caught if "AccumulateGrad" in str(w.message)], [str(w.message)[:80] for w in caught]
        assert graphed.info["cuda_graphs"] == {"eager_calls": 0}
        assert np.allclose(graphed.loss, eager.loss, rtol=0.05, atol=1e-3), (method, graphed.loss, eager.loss)
        for site in eager.delta.sites():
            a, b = graphed.delta.dense(site), eager.delta.dense(site)
            assert (a - b).norm() <= 0.05 * b.norm() + 1e-6, (method, site)


@needs_weights
def test_resume_gives_the_uninterrupted_run(model, style, tmp_path):
    hp = short("lora", steps=2, batch_size=1, lr=1e-2, target="unet")
    whole = train(model, style, hp, checkpoint_every=1, seed=3, progress=False)

    def stop(step, work):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, style, hp, checkpoint_every=1, seed=3, state_dir=tmp_path, callback=stop, progress=False)
    assert (tmp_path / "state.pt").is_file() and (tmp_path / "checkpoint_00000001.pt").is_file()
    resumed = train(model, style, hp, checkpoint_every=1, seed=3, state_dir=tmp_path, progress=False)
    assert resumed.info["resumed_from"] == 1 and resumed.steps == [1, 2]
    assert np.array_equal(resumed.loss, whole.loss)
    for site in whole.delta.sites():
        assert torch.allclose(resumed.delta.dense(site), whole.delta.dense(site), atol=1e-7)
        assert torch.allclose(resumed.at(1).dense(site), whole.at(1).dense(site), atol=1e-7)
    with pytest.raises(FadelabError, match="belongs to another run.*lr"):
        train(model, style, short("lora", steps=2, batch_size=1, lr=1e-3, target="unet"),
              checkpoint_every=1, seed=3, state_dir=tmp_path, progress=False)


@needs_weights
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(model, style, tmp_path):
    before = _state(model)
    calls = {"n": 0}
    hp = short("lora", steps=3, batch_size=1, target="unet")
    n_params = 2 * sum(1 for path, _ in model.pipe.unet.named_modules()  # lora_A and lora_B per projection
                       if path.endswith(("to_q", "to_k", "to_v", "to_out.0")))

    def poison(name, grad, param):  # gradients of the second step on are NaN
        calls["n"] += 1
        return grad * float("nan") if calls["n"] > n_params else grad

    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 2 .*last good checkpoint is step 1") as e:
        train(model, style, hp, checkpoint_every=1, state_dir=tmp_path, grad_hook=poison, progress=False)
    assert e.value.step == 2 and e.value.result.steps == [1]
    assert e.value.result.delta.sites() == e.value.result.at(1).sites()
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 1
    assert _unchanged(model, before)
    # a NaN in the starting weights: the first loss is NaN and there is no good checkpoint
    site = "unet.conv_in"
    nan = WeightDelta({site: torch.full(model.weight(site).shape, float("nan"))})
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 1 .*checkpoint is none") as e:
        train(model, style, short("full", steps=1, batch_size=1), base_delta=nan, progress=False)
    assert e.value.result.steps == [] and e.value.result.delta.sites() == []
    assert _unchanged(model, before)


def test_training_attention_leaves_out_cudnn_on_cuda_only():
    from finetuning.loop import training_attention

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with training_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    with training_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()


@needs_weights
def test_every_micro_batch_runs_inside_the_training_attention(model, style, monkeypatch):
    """The loss and its backward of each micro-batch run under training_attention (on CUDA: no
    cuDNN attention, whose backward failed on FLUX): wired in once, not per method."""
    import contextlib

    from finetuning import loop

    depth, seen = [0], []

    @contextlib.contextmanager
    def recording(device):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        seen.append(depth[0])
        return real_backward(self, *a, **k)

    monkeypatch.setattr(loop, "training_attention", recording)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    train(model, style, short("lora", steps=2, batch_size=1, grad_accum=2, target="unet"), progress=False)
    assert seen == [1, 1, 1, 1]


def test_device_finetuning_refuses_a_weights_folder_without_an_organism(tmp_path, capsys):
    """`scripts/device_finetuning.py --weights FOLDER` measures a retrained organism; a folder
    that holds none ends the run in one line before the output folder is made."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "device_finetuning.py"
    spec = importlib.util.spec_from_file_location("device_finetuning", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        mod.main(["--out", str(out), "--weights", str(tmp_path / "nothing"), "--device", "cpu"])
    assert f"--weights {tmp_path / 'nothing'}: no organism folder there (no model_index.json)" in capsys.readouterr().err
    assert not out.exists()


def test_ti_ceiling_probe_frees_the_rows_asked_for_and_refuses_unknown_ones(capsys):
    """scripts/cpu_ti_ceiling_probe.py: the caption's rows are <bos> to <eos>, the pads the rest;
    an unknown row set or subject ends the run in one line naming what is accepted."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "cpu_ti_ceiling_probe.py"
    spec = importlib.util.spec_from_file_location("cpu_ti_ceiling_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tokens, pads = mod.free_mask("tokens", 4), mod.free_mask("pads", 4)
    assert tokens[:4].eq(1).all() and tokens[4:].eq(0).all() and (tokens + pads).eq(1).all()
    assert mod.free_mask("input_tokens", 4).equal(tokens) and mod.free_mask("inputs", 4).eq(1).all()
    for argv, match in ((["--rows", "all,foo"], "--rows all,foo: ['foo'] unknown; accepted all, tokens, pads"),
                        (["--subjects", "dog9"], "--subjects dog9: ['dog9'] unknown; accepted dog1")):
        with pytest.raises(SystemExit):
            mod.main(["--out", "never", *argv])
        assert match in capsys.readouterr().err
