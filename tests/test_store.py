"""Unit tests of store.Store: exact round trips, h5py's manners, self-description, locking, views."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from store import SCHEMA_VERSION, Store, StoreError
from store import codec

SITE = "text.mlp.7.fc2"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "exp.h5")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.uint8, torch.int64])
def test_delta_round_trip_is_bit_exact(path, dtype):
    g = torch.Generator().manual_seed(0)
    dw = (torch.randn(33, 17, generator=g) * 100).to(dtype)
    with Store.open(path) as st:
        st.create_delta("M_ed/e1", SITE, dw)
    with Store.open(path, "r") as st:
        back = st.read_delta("M_ed/e1", SITE)
    assert back.dtype == dtype and back.shape == dw.shape
    assert torch.equal(back.view(torch.uint8) if dtype.is_floating_point else back,
                       dw.view(torch.uint8) if dtype.is_floating_point else dw)


def test_special_float_values_survive(path):
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40], dtype=torch.float32)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        with Store.open(path) as st:
            st.create_edit_key("e1", f"x_{str(dt)[6:]}", x.to(dt))
        with Store.open(path, "r") as st:
            back = st.read_edit_key("e1", f"x_{str(dt)[6:]}")
        assert torch.equal(back.view(torch.int16 if dt != torch.float32 else torch.int32),
                           x.to(dt).view(torch.int16 if dt != torch.float32 else torch.int32))


def test_lowrank_delta_steps_and_attrs(path):
    b, a = torch.randn(8, 2), torch.randn(2, 5)
    with Store.open(path) as st:
        for step in (100, 200):
            st.create_delta("M_ft/f1", "unet.xattn.3.to_k", (b * step, a), step=step)
        st.create_delta("M_ft/f1", "unet.xattn.3.to_k", (b, a),
                        attrs={"method": "lora", "hparams": {"rank": 2, "lr": 1e-4}})
    with Store.open(path, "r") as st:
        assert st.steps("M_ft/f1") == [100, 200]
        assert st.variants() == ["M_ft/f1"]
        got_b, got_a = st.read_delta("M_ft/f1", "unet.xattn.3.to_k")
        assert torch.equal(got_b, b) and torch.equal(got_a, a)
        assert torch.equal(st.read_delta("M_ft/f1", "unet.xattn.3.to_k", 200, dense=True),
                           (b * 200) @ a)
        attrs = st.delta_attrs("M_ft/f1", "unet.xattn.3.to_k")
        assert attrs["hparams"] == {"rank": 2, "lr": 1e-4} and attrs["form"] == "lowrank"
        da = st.deltas_xr("unet.xattn.3.to_k", steps=True)
        assert da.dims == ("variant", "step", "out", "in") and list(da.step) == [100, 200]
        np.testing.assert_array_equal(da.sel(variant="M_ft/f1", step=100).values,
                                      ((b * 100) @ a).numpy())


def test_delta_norm_is_written_with_the_delta_and_read_without_it(path):
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(40, 24, generator=g).to(torch.bfloat16)
    b, a = torch.randn(40, 3, generator=g), torch.randn(3, 24, generator=g)
    with Store.open(path) as st:
        st.create_delta("M_ft/f1", "unet.a", dense)
        st.create_delta("M_ft/f1", "unet.b", (b, a))
    expect = {"unet.a": float(torch.linalg.vector_norm(dense.double())),
              "unet.b": float(torch.linalg.vector_norm((b.double() @ a.double())))}
    with Store.open(path, "r") as st:
        for site, want in expect.items():
            assert st.delta_norm("M_ft/f1", site) == pytest.approx(want, rel=1e-6)
        # all of a variant's in one pass: the same numbers; none for a variant without deltas
        assert st.delta_norms("M_ft/f1") == {s: st.delta_norm("M_ft/f1", s) for s in expect}
        assert st.delta_norms("M_ft/none") == {}
    with h5py.File(path, "a") as f:  # an older store: no attribute, so computed from the values
        for site in expect:
            del f[f"/deltas/M_ft/f1/final/{site}"].attrs["fro"]
    with Store.open(path, "r") as st:
        for site, want in expect.items():
            assert st.delta_norm("M_ft/f1", site) == pytest.approx(want, rel=1e-6)
        assert st.delta_norms("M_ft/f1") == pytest.approx(expect, rel=1e-6)
        with pytest.raises(StoreError):
            st.delta_norm("M_ft/f1", "unet.c")


def test_create_refuses_overwrite_and_require_checks(path):
    dw = torch.randn(4, 4)
    with Store.open(path) as st:
        st.create_delta("M_ed/e1", SITE, dw)
        with pytest.raises(StoreError, match=r"/deltas/M_ed/e1/final/text.mlp.7.fc2 exists"):
            st.create_delta("M_ed/e1", SITE, dw)
        assert st.require_delta("M_ed/e1", SITE, torch.zeros(4, 4)) is False  # kept
        assert torch.equal(st.read_delta("M_ed/e1", SITE), dw)
        with pytest.raises(StoreError, match=r"shape \(4, 4\) dtype float32; asked for shape \(4, 5\)"):
            st.require_delta("M_ed/e1", SITE, torch.zeros(4, 5))
        with pytest.raises(StoreError, match="dtype float16"):
            st.require_delta("M_ed/e1", SITE, torch.zeros(4, 4, dtype=torch.float16))
        assert st.require_delta("M_ed/e2", SITE, dw) is True
        with pytest.raises(StoreError, match="bad variant"):
            st.create_delta("M ed", SITE, dw)
        with pytest.raises(StoreError, match="bad site"):
            st.create_delta("M", "a/b", dw)
        with pytest.raises(StoreError, match="cannot store dtype complex64"):
            st.create_delta("M", SITE, torch.zeros(2, dtype=torch.complex64))


def test_half_written_entry_is_detected_and_redone(path):
    with Store.open(path) as st:
        st.create_delta("M", SITE, torch.ones(3))
        # simulate an entry without the complete mark (as a writer outside the store could leave)
        st.h5.create_dataset("/deltas/M/final/text.mlp.8.fc2", data=np.zeros(3, np.float32))
        st.commit()
        assert not st.has_delta("M", "text.mlp.8.fc2")
        with pytest.raises(StoreError, match="half-written"):
            st.read_delta("M", "text.mlp.8.fc2")
        assert st.sites("M") == [SITE]
        st.create_delta("M", "text.mlp.8.fc2", torch.full((3,), 2.0))  # redone, not refused
        assert torch.equal(st.read_delta("M", "text.mlp.8.fc2"), torch.full((3,), 2.0))


def test_file_describes_itself_in_plain_h5py(path):
    with Store.open(path, config='lr = 1e-4\n', code_version="abc123", seeds={"global": 7}) as st:
        st.create_delta("M_ed/e1", SITE, torch.randn(3, 2, dtype=torch.bfloat16))
        st.create_activations("M", SITE, np.arange(24, dtype=np.float16).reshape(2, 3, 4),
                              ("prompt", "token", "neuron"),
                              coords={"prompt": ["a cat", "a dog"], "concept": ("prompt", ["cat", "dog"])})
        want = st.read_delta("M_ed/e1", SITE).float().numpy()
    code = f"""
import h5py, json, numpy as np
f = h5py.File({path!r}, "r")
a = f.attrs
assert a["fadelab_store"] == "fadelab experiment store" and a["schema_version"] == {SCHEMA_VERSION}
assert a["code_version"] == "abc123" and json.loads(a["seeds"]) == {{"global": 7}}
assert "lr" in a["config_text"] and "/deltas/" in a["layout"]
ds = f["deltas/M_ed/e1/final/text.mlp.7.fc2"]
assert ds.attrs["dtype"] == "bfloat16" and ds.attrs["complete"] == 1
print(json.dumps((ds[()].astype(np.uint32) << 16).view(np.float32).tolist()))
g = f["activations/M/text.mlp.7.fc2"]
assert json.loads(g["data"].attrs["dims"]) == ["prompt", "token", "neuron"]
assert list(g["coords/prompt"].asstr()[()]) == ["a cat", "a dog"]
assert g["coords/concept"].attrs["dim"] == "prompt"
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    np.testing.assert_array_equal(np.array(json.loads(out.stdout)), want)


def test_other_schema_version_and_foreign_files_fail_clearly(path, tmp_path):
    with Store.open(path):
        pass
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match=f"schema_version 99; this code reads schema_version {SCHEMA_VERSION}"):
        Store.open(path, "r")
    other = str(tmp_path / "plain.h5")
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a fadelab store"):
        Store.open(other, "r")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        Store.open(str(text), "a")
    with pytest.raises(StoreError, match="bad mode"):
        Store.open(path, "w")


def test_reopen_with_other_config_is_refused(path):
    with Store.open(path, config="a = 1"):
        pass
    with pytest.raises(StoreError, match="another config"):
        Store.open(path, config="a = 2")
    with Store.open(path, config="a = 1", code_version="def") as st:
        assert [s["code_version"] for s in st.info["sessions"]] == ["unknown", "def"]


def test_second_writer_and_reader_during_write_are_refused(path):
    with Store.open(path) as st:
        st.create_metric("M", "acc", 0.5)
        code = (f"from store import Store, StoreError\n"
                f"try:\n    Store.open({path!r}, 'a')\nexcept StoreError as e:\n    print(e)\n"
                f"try:\n    Store.open({path!r}, 'r')\nexcept StoreError as e:\n    print(e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
        lines = out.stdout.strip().splitlines()
        assert len(lines) == 2
        assert "cannot open" in lines[0] and "to write" in lines[0] and "pid" in lines[0]
        assert "to read" in lines[1]
        plain = subprocess.run([sys.executable, "-c", f"import h5py; h5py.File({path!r}, 'r')"],
                               capture_output=True, text=True)  # plain h5py: same flock
        assert plain.returncode != 0 and "lock" in plain.stderr
    with Store.open(path, "r") as r1, Store.open(path, "r") as r2:  # readers share
        assert r1.read_metric("M", "acc")["value"] == r2.read_metric("M", "acc")["value"] == 0.5


def test_streamed_activations_resume_and_xarray_view(path):
    prompts = [f"p{i}" for i in range(10)]
    x = np.random.default_rng(0).standard_normal((10, 4, 6)).astype(np.float32)
    with Store.open(path) as st:
        w = st.open_activations("M", SITE, x.shape, "float32", ("prompt", "token", "neuron"),
                                coords={"prompt": prompts, "concept": ("prompt", ["c"] * 10)})
        w.write(x[:3])
        with pytest.raises(StoreError, match="write in order"):
            w.write(x[5:6], start=5)
    with Store.open(path) as st:
        assert not st.has_activations("M", SITE)
        with pytest.raises(StoreError, match="3 of 10 rows"):
            st.read_activations("M", SITE)
        assert st.read_activations("M", SITE, partial=True)[0].shape == (3, 4, 6)
        w = st.open_activations("M", SITE, x.shape, "float32", ("prompt", "token", "neuron"),
                                coords={"prompt": prompts})
        assert w.rows_done == 3
        w.write(x[3:7])
        w.write(x[7:])
        assert w.complete
        with pytest.raises(StoreError, match="exists complete"):
            st.open_activations("M", SITE, (11, 4, 6), "float32", ("prompt", "token", "neuron"))
    with Store.open(path, "r") as st:
        da = st.activations("M", SITE, rows=slice(2, 5))
        assert da.dims == ("prompt", "token", "neuron")
        assert list(da.prompt.values) == ["p2", "p3", "p4"] and da.site == SITE
        np.testing.assert_array_equal(da.values, x[2:5])


def test_metric_index_reads_the_packed_reading_as_the_attributes_give_it(path):
    attrs = {"kind": "edit", "judge": "oracle", "suite": None, "extra": {"a": [1, 2]}, "flag": True,
             "f32": np.float32(0.25), "count": np.int64(7)}
    with Store.open(path) as st:
        st.create_metric("M_ed/e", "road.efficacy:oracle", 0.1 + 0.2, ci=(0.0, 1 / 3), n=40, attrs=attrs)
        st.create_metric("M", "quality.fd", float("nan"))  # NaN value and CI
        st.create_metric("M", "loss", 2.5, step=10)
    with Store.open(path, "r") as st:
        packed = sorted(st.metric_entries(), key=lambda m: (m["variant"], m["name"]))
        assert "_entry" not in st.read_metric("M", "loss", step=10)  # bookkeeping, not an attribute
    with h5py.File(path, "a") as f:  # an older store: the attributes one by one, and the value
        f.visit(lambda name: f[name].attrs.__delitem__("_entry") if "_entry" in f[name].attrs else None)
    with Store.open(path, "r") as st:
        old = sorted(st.metric_entries(), key=lambda m: (m["variant"], m["name"]))
    assert len(packed) == len(old) == 3
    for a, b in zip(packed, old):
        assert a.keys() == b.keys()
        for k in a:
            same = (a[k] == b[k]) or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
            assert same, (k, a[k], b[k])
    assert packed[2]["value"] == 0.1 + 0.2 and packed[2]["extra"] == {"a": [1, 2]}
    # long attributes are not kept twice: written unpacked, and read one by one
    big = {f"list{i}": list(range(4000)) for i in range(3)}  # about 19 KB of JSON each
    with Store.open(path) as st:
        st.create_metric("M", "big", 1.0, attrs=big)
    with h5py.File(path, "r") as f:
        assert "_entry" not in f["/metrics/M/big"].attrs
    with Store.open(path, "r") as st:
        got = next(m for m in st.metric_entries() if m["name"] == "big")
        assert got["value"] == 1.0 and got["list2"] == list(range(4000))


def test_images_labels_metrics_loss_arrays(path):
    px = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    with Store.open(path) as st:
        st.create_images("M_ed/e1", "eval", px, ["a", "b", "c"], [0, 1, 2])
        with pytest.raises(StoreError, match="uint8"):
            st.create_images("M", "bad", px.astype(np.float32), ["a"] * 3, [0, 1, 2])
        assert st.append_label("M_ed/e1", "eval", "oracle", 2, "yes", 0.9) == 1
        assert st.append_label("M_ed/e1", "eval", "human:alice", 0, "no") == 1
        assert st.append_label("M_ed/e1", "eval", "oracle", 0, "no") == 2
        with pytest.raises(StoreError, match="bad image index 3"):
            st.append_label("M_ed/e1", "eval", "oracle", 3, "no")
        # a judge's verdicts on a set in one write: all or none (a bad index refuses the batch)
        with pytest.raises(StoreError, match="bad image index 7"):
            st.append_labels("M_ed/e1", "eval", "clip", [0, 7], ["a", "b"], [0.1, 0.2])
        with pytest.raises(StoreError, match="2 indices need as many labels"):
            st.append_labels("M_ed/e1", "eval", "clip", [0, 1], ["a"])
        assert st.append_labels("M_ed/e1", "eval", "clip", [1, 0, 2], ["b", "a", "c"], [0.5, 0.25, 1.0]) == 3
        st.create_metric("M", "acc", 0.5, ci=(0.4, 0.6), n=100)
        st.create_metric("M_ed/e1", "acc", 0.9, ci=(0.85, 0.95), n=100)
        st.create_metric("M_ed/e1", "acc", 0.7, step=500)
        st.create_loss("f1", [0, 10], {"loss": [1.0, 0.5], "lr": [1e-4, 1e-4]})
        st.create_array("weights/angles", np.linspace(0, 1, 6).reshape(2, 3), dims=("edit", "k"))
    with Store.open(path, "r") as st:
        got = st.read_images("M_ed/e1", "eval")
        np.testing.assert_array_equal(got["pixels"], px)
        assert got["prompt"] == ["a", "b", "c"] and got["seed"].tolist() == [0, 1, 2]
        labels = st.read_labels("M_ed/e1", "eval", "oracle")
        assert labels["index"].tolist() == [2, 0] and labels["label"] == ["yes", "no"]
        clip = st.read_labels("M_ed/e1", "eval", "clip")
        assert clip["index"].tolist() == [1, 0, 2] and clip["label"] == ["b", "a", "c"]
        assert clip["score"].tolist() == [0.5, 0.25, 1.0]
        assert st.annotators("M_ed/e1", "eval") == ["clip", "human:alice", "oracle"]
        ds = st.metrics()
        assert ds["acc"].sel(variant="M_ed/e1") == 0.9 and ds["acc_ci_low"].sel(variant="M") == 0.4
        assert st.metrics(by_step=True)["acc"].sel(variant="M_ed/e1", step=500) == 0.7
        assert st.read_loss("f1")["lr"].tolist() == [1e-4, 1e-4]
        assert st.array_xr("weights/angles").dims == ("edit", "k")


BATCH_WRITER = """
import os, sys, time, torch
from store import Store
st = Store.open(sys.argv[1], "a", config="batch")
st.create_delta("M_ft/f", "a.x", torch.ones(3, 4))
with st.batch():
    st.create_delta("M_ft/f", "b.x", torch.ones(300, 400))
    st.create_delta("M_ft/f", "c.x", (torch.ones(300, 2), torch.ones(2, 400)))
    print("inside", flush=True)
    time.sleep(60)
"""


def test_batch_commits_its_entries_together(path, tmp_path):
    # a kill inside the block: the file opens at the entry before it, none of the block's are there
    script = tmp_path / "batch_writer.py"
    script.write_text(BATCH_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), path], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "inside"
    proc.kill()
    proc.wait()
    with Store.open(path, "a") as st:
        assert st.sites("M_ft/f") == ["a.x"]
        assert not st.is_complete(st.delta_path("M_ft/f", "b.x"))
        # nested blocks commit once, at the outer end; an exception still commits what was whole
        with pytest.raises(RuntimeError, match="stop"):
            with st.batch():
                st.create_delta("M_ft/f", "b.x", torch.full((3, 4), 2.0))
                with st.batch():
                    st.create_delta("M_ft/f", "c.x", torch.full((3, 4), 3.0))
                assert st._batch_dirty  # written, not yet committed
                raise RuntimeError("stop")
        assert not st._batch_depth and not st._batch_dirty
    with Store.open(path, "r") as st:
        assert st.sites("M_ft/f") == ["a.x", "b.x", "c.x"]
        assert st.read_delta("M_ft/f", "c.x").tolist() == [[3.0] * 4] * 3
        with pytest.raises(StoreError, match="read-only"):
            with st.batch():
                pass


def test_chunks_keep_whole_rows():
    assert codec.chunks_for((1000, 77, 3072), 4) == (1, 77, 3072)
    assert codec.chunks_for((1000, 16), 4)[1:] == (16,)
    big = codec.chunks_for((10, 4096, 4096), 4)
    assert big[0] == 1 and np.prod(big) * 4 <= 4 << 20
    assert codec.chunks_for((), 4) is None
