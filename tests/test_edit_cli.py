"""`fadelab edit`: help, edits written into the HDF5 store and read back exactly, one-line errors."""

import json

import pytest
import torch

from fadelab.cli import main
from store import Store


@pytest.mark.parametrize("cmd", ["uce-erase", "uce-moderate", "uce-replace", "uce-debias", "refact", "refact-stats"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", cmd, "--help"])
    assert e.value.code == 0 and "usage: fadelab edit" in capsys.readouterr().out


def test_uce_erase_into_the_store(tmp_path, capsys):
    out = tmp_path / "exp.h5"
    argv = ["edit", "uce-erase", "a cat", "--preserve", "a dog", "--family", "sd14", "--weights", "random",
            "--scale", "0.125", "--device", "cpu", "--out", str(out), "--edit-id", "erase-cat"]
    assert main(argv) == 0
    assert "uce: 32 sites" in capsys.readouterr().out
    with Store.open(out, "r") as st:
        assert st.variants() == ["M_ed/erase-cat"] and len(st.sites("M_ed/erase-cat")) == 32
        keys = st.edit_keys("erase-cat")
        site = "unet.xattn.0.to_k"
        v_star = st.edit_keys("erase-cat", site=site)["v_star"]
        attrs = st.delta_attrs("M_ed/erase-cat", site)
        dw = st.read_delta("M_ed/erase-cat", site)
    assert keys["c_e"].shape == (75, 96) and keys["c_p"].shape == (2 * 77, 96) and v_star.shape == (75, 32)
    assert attrs["method"] == "uce" and attrs["request"]["concepts"] == ["a cat"]
    # the same edit again gives the stored delta bit for bit (a pure, deterministic function)
    import models
    from editing import uce_erase

    m = models.load("sd14", "random", scale=0.125)
    assert torch.equal(uce_erase(m, ["a cat"], preserve=["a dog"]).delta.dense(site), dw)
    assert main(argv) == 2  # never overwrites
    assert "error:" in capsys.readouterr().err


def test_refact_stats_then_refact_into_the_store(tmp_path, capsys):
    stats = tmp_path / "c2.safetensors"
    assert main(["edit", "refact-stats", "--site", "text.mlp.2.fc2", "--corpus", "organism", "--n", "1500",
                 "--stats-out", str(stats), "--device", "cpu"]) == 0
    assert "C at text.mlp.2.fc2" in capsys.readouterr().out
    out = tmp_path / "exp.h5"
    assert main(["edit", "refact", "--prompt", "the mayor", "--new", "tess lark", "--old", "mira holt",
                 "--layer", "2", "--stats", str(stats), "--device", "cpu", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "refact" and info["variant"] == "M_ed/refact"
    with Store.open(out, "r") as st:
        b, a = st.read_delta("M_ed/refact", "text.mlp.2.fc2")
        keys = st.edit_keys("refact", site="text.mlp.2.fc2")
    assert b.shape == (128, 1) and a.shape == (1, 512) and set(keys) == {"k_star", "k_bar", "u", "v_star"}
    assert torch.equal(a[0], keys["u"])


@pytest.mark.parametrize("argv, match", [
    (["edit", "uce-erase", " ", "--device", "cpu"], "is empty"),
    (["edit", "uce-erase", "zebra", "--device", "cpu"], "unknown concept 'zebra'"),
    (["edit", "uce-replace", "apple", "--device", "cpu"], "CONCEPT=GUIDE"),
    (["edit", "uce-debias", "ceo", "--judge", "magic", "--device", "cpu"], "--judge 'magic'"),
    (["edit", "uce-debias", "ceo", "--judge", "open_clip:/nope.bin", "--device", "cpu"], "do not exist"),
    (["edit", "refact", "--prompt", "the mayor", "--new", "tess lark", "--old", "mira holt", "--layer", "9",
      "--device", "cpu"], "layer=9"),
    (["edit", "uce-erase", "a cat", "--hparams", "/nope.toml", "--device", "cpu"], "does not exist"),
])
def test_bad_input_is_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any model-loading progress bars
    assert err.startswith("error:") and match in err
