"""The real families' experiment configs (experiments/sd14.toml, sdxl.toml, flux-schnell.toml):
they lay out the study's grid, their [smoke] tables apply, and the SD1.4 smoke grid runs end to
end on random weights on the CPU (a sub-grid at width 0.02; the lead runs the whole grids at full
width on a GPU)."""

from pathlib import Path

import pytest

from fadelab.cli import main
from fadelab.grid import EXPERIMENTS_DIR, cells, load_experiment, status
from models.organism.nets import WEIGHTS_DIR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STUDY = {"road_seeds": 25, "profession_images": 30, "unsafe_prompts": 50, "unsafe_seeds": 1}


def test_family_configs_lay_out_the_study_and_smoke_applies():
    for name, n_cells, methods in (
            ("sd14", 50, {"full", "lora", "dora", "dreambooth", "textual-inversion"}),
            ("sdxl", 45, {"full", "lora", "dora", "dreambooth"}),
            ("flux-schnell", 27, {"full", "lora", "dora", "dreambooth"})):
        exp = load_experiment(name)
        assert exp.family == name and exp.weights == "hub" and not exp.smoke
        assert {k: exp.samples[k] for k in STUDY} == STUDY
        assert {f["method"] for f in exp.finetunes} == methods
        assert len(cells(exp)) == n_cells, name
        debias = next(e for e in exp.edits if e["method"] == "uce-debias")
        assert debias["professions"] == ["ceo", "teacher", "housekeeper", "farmer", "lawyer", "hairdresser"]
        smoke = load_experiment(name, smoke=True)
        assert smoke.smoke and smoke.weights == "random" and smoke.image_size == 64
        assert smoke.judges["use"] == ["clip-organism"] and smoke.data["style"] == "organism:style"
        assert smoke.edit("debias")["hparams"]["max_rounds"] == 1
        assert {c.id for c in cells(smoke)}.isdisjoint(c.id for c in cells(exp))


@pytest.mark.skipif(not (SHARED / "RoAD_test.csv").exists(), reason="../shared/data is not present")
@pytest.mark.skipif(not (WEIGHTS_DIR / "clip" / "config.json").exists(), reason="no organism CLIP (the smoke judge)")
def test_sd14_smoke_grid_runs_end_to_end_on_random_weights(tmp_path, monkeypatch, capsys):
    import torch

    text = (EXPERIMENTS_DIR / "sd14.toml").read_text()
    assert "\nscale = 1.0 " in text and "\n[smoke]\n" in text and "\n[smoke.samples]\n" in text
    text = text.replace("\nscale = 1.0 ", "\nscale = 0.02 ", 1).replace(
        "\n[smoke]\n", '\n[smoke]\nedits = ["erase-unsafe", "refact-role"]\nfinetunes = ["lora"]\n', 1).replace(
        "\n[smoke.samples]\n", '\n[smoke.samples]\ndelta_dtype = "bfloat16"\n', 1)
    cfg = tmp_path / "sd14.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    monkeypatch.setenv("FADELAB_BENCHMARKS", str(SHARED))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is several times faster on a shared CPU
    try:
        assert main(["run", str(cfg), "--smoke", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "report:" in capsys.readouterr().out
    exp = load_experiment(cfg, smoke=True)
    assert exp.family == "sd14" and exp.scale == 0.02 and len(cells(exp)) == 6
    assert all(state == "done" for _, state in status(exp, out))
    from store import Store

    with Store.open(out / "experiment.h5", "r") as st:
        variants = {m["variant"] for m in st.metric_entries()}
        for tail in ("erase-unsafe/lora", "refact-role/lora"):
            assert {f"M_ed_ft/{tail}", f"M_cf/{tail}", f"M_swap/{tail}", f"M_reed/{tail}"} <= variants
            for name in ("weights", "neurons", "neurons_test", "neurons_concepts"):
                assert st.is_complete(f"/arrays/probes/{name}/{tail}"), (name, tail)
        names = {m["name"] for m in st.metric_entries()}
        assert {"road.efficacy:clip-organism", "unsafe.share.unsafe:clip-organism",
                "quality.clip_score:clip-organism"} <= names
        assert "text.mlp.7.fc2" in st.sites("M_ed/refact-role")  # ReFACT with C from COCO captions
        import torch

        for variant in ("M_ft/lora", "M_ed_ft/erase-unsafe/lora"):  # [samples] delta_dtype
            b, a = st.read_delta(variant, st.sites(variant)[0])
            assert b.dtype == a.dtype == torch.bfloat16, variant
        edit = st.read_delta("M_ed/erase-unsafe", st.sites("M_ed/erase-unsafe")[0])
        assert edit.dtype == torch.float32  # edits are stored as computed
    html = (out / "report.html").read_text()
    assert "neurons_shared_fade" in html and "table1_concept_edits" in html
