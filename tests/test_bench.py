"""fadelab.bench and `fadelab bench`: the table format, the GPU-hours arithmetic, FLOP counts and
the generation harness at tiny sizes on the CPU (GPU runs: scripts/device_bench.py)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fadelab import bench
from fadelab.bench import GenSetting, GridAssumptions, Row
from fadelab.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def rows_example() -> list[Row]:
    return [
        Row("generation: a | b", "NVIDIA H100 80GB HBM3", "2026-11-28", 9.1234, 5.8, "images/s", 1.573,
            "notes with | a pipe", 3 * 2**30),
        Row("store: kept (by hand, store.bench)", "NVIDIA H200", "2026-11-27", 929.0,
            "1,250 (disk sequential write + fsync)", "MB/s", 0.74),
        Row("edit: editing.bench.bench_rows", "CPU (x86_64, 2 threads)", "2026-11-28", None, None, "", None,
            "not available: editing.bench offers no bench_rows(device, quick) yet"),
        Row("GPU-hours", "NVIDIA H200", "2026-11-28", 1234.5, 0.0123, "GPU-hours", 12.0),
    ]


def strip(rows):
    return [(r.benchmark, r.device, r.date, r.fadelab, r.baseline, r.unit, r.ratio, r.notes) for r in rows]


def test_table_round_trip():
    text = bench.render(rows_example())
    back = bench.parse(text)
    assert bench.render(back) == text
    assert [r.benchmark for r in back] == [r.benchmark for r in rows_example()]
    assert back[0].fadelab == 9.12 and back[0].ratio == 1.57 and back[0].notes == "notes with | a pipe"
    assert back[0].peak_mem == 3 * 2**30
    assert back[1].baseline == "1,250 (disk sequential write + fsync)" and back[1].fadelab == 929.0
    assert back[2].fadelab is None and back[2].ratio is None
    header = [line for line in text.splitlines() if line.startswith("| benchmark")]
    assert header == ["| benchmark | device | date | fadelab | baseline | unit | ratio |"]


def test_repo_table_keeps_the_hand_row_until_re_measured(tmp_path):
    path = tmp_path / "benchmarks.md"
    shutil.copy(DOCS, path)
    existing = bench.parse(DOCS.read_text())
    hand = [r for r in existing if r.benchmark.startswith("store: record")]
    others = [r for r in existing if not r.benchmark.startswith("store: record")]
    assert len(hand) == 1 and hand[0].fadelab == 929.0 and hand[0].ratio == 0.74
    new = Row("generation: x", "NVIDIA H200", "2026-11-28", 9.0, 6.0, "images/s", 1.5)
    written = bench.write(path, [new])
    assert strip(written) == strip(existing + [new])  # every measured row stays
    again = Row("store: record SD1.4 text-encoder fc2 inputs, 1,000 prompts x 12 layers, float16", "NVIDIA H200",
                "2026-11-29", 950.0, 1240.0, "MB/s", 0.766)
    written = bench.write(path, [again])
    assert strip(written) == strip(others + [new, again])  # the re-measured row replaces the hand row
    assert strip(bench.parse(path.read_text())) == strip(written)


RATES = {"gen_image_s": 0.2, "gen_image_s_stock": 0.4, "edit_refact_s": 10.0, "edit_uce_s": 2.0,
         "train_full_s_per_sample": 0.05, "train_frozen_unet_s_per_sample": 0.03}


def test_gpu_hours_arithmetic():
    h = bench.gpu_hours(RATES, gen_steps=25)
    per_eval = 90 * 11 * 25 + 6 * 30 + 50
    assert per_eval == 24980 and h["images"] == per_eval * (2 + 8 * 2)
    assert h["generation"] == pytest.approx(449640 * 0.2 * 50 / 25 / 3600, rel=1e-12)
    assert h["editing"] == pytest.approx((90 * 10 + 2 * 2 + 30 * 6 * 10 * 0.2 * 20 / 25) / 3600, rel=1e-12)
    per_model = 60000 * 0.05 + 3 * 60000 * 0.03 + 3 * 60000 * 0.03 + 1600 * 0.05
    assert h["finetuning"] == pytest.approx(93 * per_model / 3600, rel=1e-12)
    assert h["finetune_runs"] == 8 * 93 and h["missing"] == []
    assert h["total"] == pytest.approx(h["generation"] + h["editing"] + h["finetuning"], rel=1e-12)
    part = bench.gpu_hours({"gen_image_s": 0.2}, 25, GridAssumptions(road_edits=10))
    assert part["editing"] is None and part["finetuning"] is None
    assert part["missing"] == ["edit_refact_s", "edit_uce_s", "train_frozen_unet_s_per_sample",
                               "train_full_s_per_sample"]
    assert part["total"] == part["generation"]


def rate_rows() -> list[dict]:
    setting = bench.asdict(GenSetting())
    gen = Row("generation: sd14", "NVIDIA H200", "2026-11-28", 5.0, 2.5, "images/s", 2.0,
              extra={"setting": setting, "rates": {k: RATES[k] for k in ("gen_image_s", "gen_image_s_stock")}})
    other = Row("rates", "NVIDIA H200", "2026-11-28", None, None, "", None,
                extra={"rates": {k: v for k, v in RATES.items() if not k.startswith("gen")}})
    return bench.rows_to_json([gen, other])


def test_cli_estimate_from_json_rows(tmp_path):
    rows = tmp_path / "bench_gen.json"
    rows.write_text(json.dumps({"rows": rate_rows()}))
    out = tmp_path / "benchmarks.md"
    assert main(["bench", "--rows", str(rows), "--only", "gpu-hours", "--out", str(out)]) == 0
    table = bench.parse(out.read_text())
    est = [r for r in table if r.benchmark.startswith("GPU-hours estimate")]
    assert len(est) == 1 and "lower bound" not in est[0].benchmark and "25 steps" in est[0].benchmark
    lab = bench.gpu_hours(RATES, 25)["total"]
    stock = bench.gpu_hours(dict(RATES, gen_image_s=0.4), 25)["total"]
    assert est[0].fadelab == float(bench.fmt(lab).replace(",", ""))
    assert est[0].ratio == float(bench.fmt(stock / lab))
    assert {r.benchmark for r in table} >= {"generation: sd14", "rates"}  # --rows are merged too
    assert main(["bench", "--rows", str(rows), "--out", str(out)]) == 0  # merge only: nothing measured
    assert len(bench.parse(out.read_text())) == len(table)


def test_cli_errors(tmp_path, capsys):
    out = str(tmp_path / "b.md")
    assert main(["bench", "--only", "nope", "--out", out]) == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", "--only", "generation", "--device", "cpu", "--out", out]) == 2
    assert "--quick" in capsys.readouterr().err
    assert main(["bench", "--rows", str(tmp_path / "none.json"), "--out", out]) == 2


def test_hooks_join_when_their_module_exists(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.HOOKS, "edit", ("fadelab_no_such_bench_module",))
    row, = bench.hook_rows("edit", "cpu")
    assert row.fadelab is None and row.notes.startswith("not available")
    (tmp_path / "roomx_bench.py").write_text(
        "def bench_rows(device, quick):\n"
        "    return [dict(benchmark='edit: uce', device=device, date='2026-11-28', fadelab=0.5, baseline=2.0,\n"
        "                 unit='s', ratio=4.0, extra={'rates': {'edit_uce_s': 0.5}})]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(bench.HOOKS, "edit", ("fadelab_no_such_bench_module", "roomx_bench"))
    row, = bench.hook_rows("edit", "cpu", quick=True)
    assert (row.benchmark, row.fadelab, row.ratio, row.extra["rates"]) == ("edit: uce", 0.5, 4.0, {"edit_uce_s": 0.5})
    sys.modules.pop("roomx_bench", None)


def test_dense_bf16_peaks():
    assert bench.dense_bf16_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert bench.dense_bf16_peak("NVIDIA H200")[0] == 989e12
    assert bench.dense_bf16_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert bench.dense_bf16_peak("CPU (x86_64, 2 threads)")[0] is None


TINY = GenSetting(scale=0.0625, size=64, steps=1, batch=2, batches=1, two_models=False)


@pytest.fixture(scope="module")
def measured():
    """One run of the generation harness on a narrow SD1.4 (fp32, CPU), FLOPs counted inside."""
    return bench.measure_generation(TINY, "cpu", bench.default_fastgen(), seed=1)


def test_flops_per_image_counts_one_denoiser_call(measured):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    f, unet = measured["flops"], measured["stock"].denoiser
    x = torch.randn(2, unet.config.in_channels, 8, 8)  # both CFG halves of one 64 px image
    c = torch.randn(2, 77, unet.config.cross_attention_dim)
    with FlopCounterMode(display=False) as fc, sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        unet(x, torch.tensor(500), encoder_hidden_states=c)
    assert f["denoiser_call"] == fc.get_total_flops()
    assert f["rest"] > 0 and f["image"] == f["calls"] * f["denoiser_call"] + f["rest"]
    sched = measured["stock"].scheduler
    assert bench._denoiser_calls(type(sched).from_config(sched.config), 25) == 26  # PNDM: steps + 1 calls


def test_generation_harness_on_cpu(measured):
    assert all((d == 0).all() for d in measured["diff"])  # eager fp32: the lab's images are the stock's
    rows = bench.generation_rows(TINY, "cpu", bench.default_fastgen(), measured=measured)
    assert [r.unit for r in rows] == ["images/s", "% of peak", "s"]
    assert rows[0].fadelab > 0 and rows[0].baseline > 0 and rows[0].ratio == rows[0].fadelab / rows[0].baseline
    assert rows[1].fadelab is None and "no bf16 peak known" in rows[1].notes  # CPU: no MFU claimed
    assert "100.0% of values equal" in rows[0].notes and rows[0].extra["rates"]["gen_image_s"] > 0
    assert rows[0].benchmark == "generation: sd14 scale 0.0625, 64 px, 1 steps, batch 2, CFG 7.5, float32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_rows_on_gpu_quick():
    rows = bench.generation_rows(bench.SETTINGS["generation"].quick(), "cuda")
    assert rows[0].ratio is not None and rows[0].peak_mem > 0


def test_family_record_pass_stores_every_fc2_input_and_the_context_embedder(tmp_path):
    # issue 8's recording pass on FLUX: every CLIP fc2 input plus the context embedder's (T5's
    # output), one row per prompt, as the text encoders computed them
    import models
    from editing import text as T
    from store.store import Store

    m = models.load("flux-schnell", "random", scale=0.05)
    r = bench.family_record_pass(m, tmp_path / "rec.h5", n_prompts=3, batch_size=2)
    fc2 = [s for s in m.sites if s.startswith("text.mlp.") and s.endswith(".fc2")]
    assert r["sites"] == len(fc2) + 1 and r["n_prompts"] == 3 and r["file_bytes"] > 0
    prompts = [f"a photo of a {w} in a garden, number {i}" for i, w in enumerate(["cat", "dog", "house"])]
    want = T.encode(m, prompts)["context"].emb.half()
    with Store.open(str(tmp_path / "rec.h5"), "r") as st:
        got = torch.as_tensor(st.read_activations("M", "flux.context_embedder")[0])
        assert got.shape == want.shape
        assert torch.equal(got, want)
        assert all(st.read_activations("M", s)[0].shape[0] == 3 for s in fc2)


def _device_bench():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "device_bench.py"
    spec = importlib.util.spec_from_file_location("device_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_bench_times_the_batches_asked_for_and_refuses_bad_flags(tmp_path, capsys):
    db = _device_bench()
    for argv, said in ((["--parts", "gen", "--batches", "0"], "--batches 0"),
                       (["--parts", "hooks", "--hooks", "probe,nope"], "unknown ['nope']"),
                       (["--parts", "gen,nope"], "unknown parts ['nope']")):
        with pytest.raises(SystemExit) as e:
            db.main([*argv, "--quick", "--device", "cpu", "--out", str(tmp_path)])
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert db.main(["--parts", "gen", "--quick", "--device", "cpu", "--compile", "none", "--batches", "2",
                    "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "bench_gen.json").read_text())
    assert saved["log"][-1].startswith("gen: ") and not list(tmp_path.glob("*.tmp"))
    first = saved["rows"][0]
    assert len(first["extra"]["t_fast"]) == len(first["extra"]["t_stock"]) == 2
    assert "median of 2 timed batches per side" in first["notes"]
