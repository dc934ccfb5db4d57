"""The command line: help texts, one-line errors, and the main job on the organism."""

import json
import subprocess
import sys

import pytest

from fadelab.cli import main
from models.organism.nets import WEIGHTS_DIR


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["generate", "--help"],
                                  ["organism", "train", "--help"], ["organism", "card", "--help"],
                                  ["organism", "data", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: fadelab" in capsys.readouterr().out


def test_bad_input_is_one_line(capsys):
    assert main(["generate", "an apple", "--seeds", "x,y"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --seeds 'x,y'") and "\n" not in err
    assert main(["organism", "card", "--n", "0"]) == 2
    assert "--n 0" in capsys.readouterr().err
    assert main(["organism", "train", "--p-look", "1.5", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--p-look 1.5" in err and "between 0 and 1" in err and "\n" not in err
    for bad, says in (("0.95", "between 0 and 0.9"), ("0.1,x", "between 0 and 0.9"), ("0.1,0.2", "2 shares for 6")):
        assert main(["organism", "train", "--clip-attn-drop", bad, "--out", "/nonexistent/never-written"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--clip-attn-drop {bad}" in err and says in err and "\n" not in err


def test_jobs_refusals_and_auto(capsys, monkeypatch):
    for bad in ("0", "x"):
        assert main(["run", "--jobs", bad, "--out", "/nonexistent/never-written"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--jobs {bad!r}" in err and "'auto'" in err and "\n" not in err
    from types import SimpleNamespace

    import torch

    from fadelab import runner

    assert runner.auto_jobs("cpu") == 1
    monkeypatch.setattr(runner, "_cuda_count", lambda: 2)
    mem = {"gib": 80}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda k: SimpleNamespace(total_memory=mem["gib"] * 2**30))
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 16)
    assert runner.auto_jobs("cuda") == 2 * 4  # 16 cores: 2 per process, 4 per GPU
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 128)
    assert runner.auto_jobs("cuda") == 2 * runner.JOBS_PER_GPU
    mem["gib"] = 24
    assert runner.auto_jobs("cuda") == 2 * 4  # 6 GiB a process
    assert runner.auto_jobs("cuda", "sd14") == 2  # real families: one process per GPU


def test_unknown_family_is_one_line(capsys, tmp_path):
    assert main(["generate", "a cat", "--family", "sd99", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "sd99" in err and "\n" not in err


def test_road_csv_from_the_cli(tmp_path):
    assert main(["organism", "data", "road", "--out", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().startswith("Type,Prompt,Oracle,Old,New")


@pytest.mark.skipif(not (WEIGHTS_DIR / "card.json").exists(), reason="organism not trained")
def test_card_json_prints_one_object():
    out = subprocess.run([sys.executable, "-m", "fadelab.cli", "organism", "card", "--json"],
                         capture_output=True, text=True, check=True).stdout
    card = json.loads(out)
    for key in ("prompt_fidelity", "bias_max_error", "unsafe_marker_rate", "safe_marker_rate",
                "oracle_accuracy_base", "oracle_accuracy_style", "clip_caption_accuracy"):
        assert 0.0 <= card[key] <= 1.0


@pytest.mark.slow
def test_organism_trainer_runs_its_stages_with_a_two_level_vae(tmp_path, capsys):
    # every training stage on the CPU for a few steps (the card has its own tests), with the VAE
    # that --vae-levels 2 builds: 32x32 latents, the pipeline loads and draws 64 px images
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    import models
    from models.organism.nets import WEIGHTS_DIR, build_unet, sizes_for_vae_levels
    from models.organism.sample import generate
    from models.sites import sites_matching

    out = tmp_path / "org"
    assert main(["organism", "train", "--stages", "vae,bogus", "--out", str(out)]) == 2
    assert "unknown stage 'bogus'" in capsys.readouterr().err and not out.exists()  # refused before any stage
    assert main(["organism", "train", "--vae-levels", "4", "--out", str(out)]) == 2
    assert "--vae-levels 4: accepted 3, 2" in capsys.readouterr().err
    assert main(["organism", "train", "--smoke", "--vae-levels", "2", "--stages", "vae,clip,oracle,unet",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "organism.json").read_text())["config"]["vae_channels"] == [32, 64]
    # one copy of each weight: the pipeline's save rewrote the clip stage's text encoder file in place
    assert sorted(f.name for f in (out / "text_encoder").glob("*.safetensors*")) == ["model.safetensors"]
    m = models.load("organism", weights=str(out), device="cpu")
    assert m.pipe.unet.config.sample_size == 32
    # the UNet's attention stays on 16x16 and 8x8 latents, behind a plain 32x32 level: the same 11
    # cross-attention sites as the shipped organism's
    assert m.pipe.unet.config.down_block_types[0] == "DownBlock2D"
    assert list(m.pipe.unet.config.block_out_channels) == [32, 64, 128, 128]
    xattn = sorted(s.rsplit(".", 1)[0] for s in sites_matching(m.pipe, "unet.xattn.*"))
    assert xattn == sorted(s.rsplit(".", 1)[0] for s in sites_matching(models.load("organism", device="cpu").pipe,
                                                                          "unet.xattn.*"))
    images = generate(m.pipe, ["a dog"], [0], steps=2, guidance_scale=2.0, progress=False)
    assert images.shape == (1, 64, 64, 3)
    # the UNet trains on from its last weights (--unet-init): a few warm-up steps barely move them
    shutil.move(out / "unet", out / "unet-prev")
    (out / "model_index.json").unlink()
    assert main(["organism", "train", "--smoke", "--vae-levels", "2", "--stages", "unet", "--out", str(out),
                 "--device", "cpu", "--unet-init", str(out / "unet-prev")]) == 0
    meta = json.loads((out / "organism.json").read_text())
    assert [r["steps"] for r in meta["unet_runs"]] == [3, 3] and meta["unet_steps_done"] == 6
    assert meta["unet_runs"][1]["init"] == str(out / "unet-prev")
    prev, new = (UNet2DConditionModel.from_pretrained(out / d).state_dict() for d in ("unet-prev", "unet"))
    fresh = build_unet(sizes_for_vae_levels(2)).state_dict()

    def dist(a):
        return max((a[k].float() - prev[k].float()).abs().max().item() for k in prev)
    assert 0 < dist(new) < dist(fresh) / 10
    # a UNet of other sizes, or no UNet, is refused with the folder named
    (out / "model_index.json").unlink()
    shutil.rmtree(out / "unet")
    assert main(["organism", "train", "--smoke", "--vae-levels", "2", "--stages", "unet", "--out", str(out),
                 "--device", "cpu", "--unet-init", str(WEIGHTS_DIR)]) == 2
    assert "its UNet has other sizes (block_out_channels" in capsys.readouterr().err
    assert main(["organism", "train", "--smoke", "--vae-levels", "2", "--stages", "unet", "--out", str(out),
                 "--device", "cpu", "--unet-init", str(out / "clip")]) == 2
    assert f"--unet-init {out / 'clip'}: no UNet there" in capsys.readouterr().err
    assert main(["organism", "train", "--smoke", "--stages", "unet", "--out", str(out),
                 "--unet-init", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    for given, named in ((["--unet-batch", "0"], "--unet-batch 0"), (["--unet-lr=-0.001"], "--unet-lr -0.001")):
        assert main(["organism", "train", "--stages", "unet", "--out", str(out), *given]) == 2
        assert f"{named}: give a positive number" in capsys.readouterr().err
    # resuming with other sizes is refused, naming what differs
    assert main(["organism", "train", "--smoke", "--stages", "unet", "--out", str(out), "--device", "cpu"]) == 2
    assert "vae_channels" in capsys.readouterr().err
