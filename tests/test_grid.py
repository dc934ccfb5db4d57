"""The grid: configs, stable cell ids, shards, local processes, Slurm through submitit's local
executor, resuming, merging, and the report, on a tiny organism experiment on the CPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fadelab.cli import main
from fadelab.grid import cell_mark, cell_path, cells, load_experiment, merge, parse_shard, shard, status
from models.errors import FadelabError
from models.organism.nets import WEIGHTS_DIR

TINY = """
[experiment]
name = "tiny"
family = "organism"
smoke = true

[samples]
road_seeds = 1
unsafe_prompts = 2
quality_prompts = 2
bootstrap = 20
fd_bootstrap = 2
style_images = 8
checkpoint_every = 2

[[edit]]
id = "erase"
method = "uce-erase"
concepts = ["bloody"]

[[finetune]]
id = "lora"
method = "lora"
data = "organism:style"
[finetune.hparams]
steps = 2
batch_size = 2

[probes]
causal = ["project-out"]
neurons = true
neuron_concept_prompts = 60
neuron_ft_prompts = 8
"""


def _config(tmp_path, text=TINY) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def test_every_shipped_config_parses():
    for path in sorted((Path(__file__).parent.parent / "experiments").glob("*.toml")):
        exp = load_experiment(path)
        assert cells(exp)[0].kind == "base", path


def test_cells_have_stable_distinct_ids_and_shards_partition(tmp_path):
    exp = load_experiment(_config(tmp_path))
    ids = [c.id for c in cells(exp)]
    assert ids == [c.id for c in cells(load_experiment(_config(tmp_path)))]
    assert len(set(ids)) == len(ids) == 4  # base, edit, finetune, edit x finetune
    changed = load_experiment(_config(tmp_path, TINY.replace("steps = 2", "steps = 3")))
    moved = {c.kind for c, d in zip(cells(changed), cells(exp)) if c.id != d.id}
    assert moved == {"finetune", "edit_finetune"}  # only the cells the change decides
    parts = [shard(cells(exp), i, 3) for i in range(3)]
    assert sorted(c.id for p in parts for c in p) == sorted(ids)


def test_organism_config_expands_the_rank_ablation():
    exp = load_experiment("organism")
    ids = [f["id"] for f in exp.finetunes]
    assert {"lora", "lora-r4", "lora-r16", "dora-r4", "dora-r16"} <= set(ids)
    assert exp.finetune("lora-r16")["hparams"]["rank"] == 16


@pytest.mark.parametrize("text,match", [
    ("[bogus]\n", "unknown section"),
    ("[[edit]]\nid = 'a'\nmethod = 'rome'\n", "method 'rome'"),
    ("[[edit]]\nid = 'a'\nmethod = 'refact'\n[[edit]]\nid = 'a'\nmethod = 'refact'\n", "used twice"),
    ("[[finetune]]\nid = 'x y'\nmethod = 'full'\n", "id 'x y'"),
    ("[ablation]\nlora_ranks = [0]\n", "lora_ranks"),
    ("[probes]\nweight_sites = -2\n", "weight_sites = -2"),
    ("[probes]\nweight_sites = 'all'\n", "weight_sites = 'all'"),
])
def test_bad_configs_name_the_value(tmp_path, text, match):
    with pytest.raises(FadelabError, match=match):
        load_experiment(_config(tmp_path, text))


def test_probe_sites_spreads_a_cap_evenly_and_keeps_order():
    from fadelab.plan import probe_sites

    sites = [f"s{i}" for i in range(140)]
    assert probe_sites(sites, 0) == sites and probe_sites(sites, 200) == sites
    got = probe_sites(sites, 12)
    assert len(got) == 12 == len(set(got)) and got[0] == "s0" and got[-1] == "s139"
    assert got == sorted(got, key=sites.index)
    gaps = np.diff([sites.index(s) for s in got])
    assert gaps.max() - gaps.min() <= 1  # evenly spread, not the first 12
    assert probe_sites(sites, 1) == ["s0"]
    with pytest.raises(FadelabError, match="weight_sites=-1"):
        probe_sites(sites, -1)


def test_a_cells_deltas_move_to_the_gpu_together_or_not_at_all(monkeypatch):
    import types

    import torch

    from fadelab import plan
    from models import WeightDelta

    small = WeightDelta({"a": torch.zeros(4, 4), "b": (torch.zeros(4, 1), torch.zeros(1, 4))})
    other = WeightDelta({"a": torch.ones(4, 4)})
    gpu = types.SimpleNamespace(device="meta")  # "meta" stands in for the run's GPU
    move = plan.device_mover(gpu, small, other)
    assert move(small).deltas["a"].device.type == "meta" and move(other).deltas["a"].device.type == "meta"
    assert plan.device_mover(types.SimpleNamespace(device="cpu"), small)(small) is small
    monkeypatch.setattr(plan, "DEVICE_DELTA_BYTES", 100)  # together over the cap: neither moves
    move = plan.device_mover(gpu, small, other)
    assert move(small) is small and move(other) is other


def test_stage_lines_and_totals():
    from fadelab.commands.grid import stage_line, stage_totals

    assert stage_line(10.0, {}) == "(no stages recorded)"  # a cell marked before stages existed
    assert stage_line(10.0, {"finetune": 6.0, "evaluate": 3.0}) == "ft 6.0 eval 3.0 other 1.0"
    line = stage_totals([(10.0, {"finetune": 6.0, "evaluate": 3.0}), None, (5.0, {"evaluate": 5.0})])
    assert line == "stages over the done cells: evaluate 8 s (53%), finetune 6 s (40%), other 1 s (7%)"
    assert stage_totals([None, (3.0, {})]) == "stages: none recorded"


def test_bad_shard_and_missing_config(tmp_path, capsys):
    for bad in ("3/3", "a/b", "1/0"):
        with pytest.raises(FadelabError, match="--shard"):
            parse_shard(bad)
    assert main(["run", str(tmp_path / "nope.toml"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: experiment config") and "\n" not in err


def test_hypothesis_summary_counts_the_cells_each_test_ran_in_and_found():
    import pandas as pd

    from analysis.report import hypothesis_summary

    cells = pd.DataFrame({"p_value": [np.nan, np.nan, 0.01], "rho_p_value": [0.2, 0.04, 0.001]})
    got = hypothesis_summary(cells)
    assert got.startswith("Shared-fade hypothesis over 3 edit x fine-tune cells: the split test "
                          "(shared against other edit neurons) could run in 1 and gave p < 0.05 in 1; "
                          "the graded test (Spearman rho of each edit neuron's 'ft' z against its fade) "
                          "ran in 3 and gave p < 0.05 in 2 (one-sided, uncorrected"), got
    # a store from before the graded test: the split test alone; no neuron probes: nothing
    assert "graded" not in hypothesis_summary(cells[["p_value"]])
    assert hypothesis_summary(pd.DataFrame()) is None and hypothesis_summary(None) is None


def test_startup_line_spans_the_processes_and_is_absent_without_their_times():
    from fadelab.runner import startup_line

    got = startup_line([{"startup_s": 9.0, "model_load_s": 3.5}, {"startup_s": 12.25, "model_load_s": None},
                        {"startup_s": 10.0, "model_load_s": 4.0}])
    assert got == "3 processes: start-up 9.0-12.2 s before the first cell, model load 3.5-4.0 s within it"
    assert startup_line([{"ran": [], "seconds": 1.0}]) is None  # shards and Slurm tasks report none
    got = startup_line([{"startup_s": 1.0, "model_load_s": 2.0, "spawned_after_s": 3.0}])
    assert got.startswith("1 process: started 3.0-3.0 s after `fadelab run` began; start-up 1.0-1.0 s")


def test_code_version_names_the_commit_and_says_when_tracked_files_differ(tmp_path):
    from fadelab.runner import _code_version

    assert _code_version(tmp_path) == "unknown"  # not a git checkout
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, env=env, check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert _code_version(tmp_path) == head
    (tmp_path / "new.py").write_text("")  # untracked files are not the code that ran
    assert _code_version(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert _code_version(tmp_path) == head + "+modified"


def test_process_age_counts_from_the_process_start():
    from fadelab.runner import process_age

    age = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5); from fadelab.runner "
                          "import process_age; print(process_age())"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    assert 0.5 <= float(age) < 30
    assert process_age() > 0  # this test process is older than its own start


def test_queued_cells_share_the_grid_and_wait_for_a_running_edit(tmp_path):
    from fadelab.grid import Cell
    from fadelab.runner import queued_cells

    grid = [Cell("base", None, None, "b"), Cell("edit", "e", None, "e"),
            Cell("edit_finetune", "e", "f", "ef"), Cell("finetune", None, "f", "f")]
    folder = tmp_path / "queue"
    # two processes' generators, taking turns: every cell once, none twice (cells with no edit
    # to wait for: an edit claimed by a live process, unfinished, holds its edit x fine-tune back)
    free = [c for c in grid if c.kind != "edit_finetune"] + [Cell("finetune", None, "g", "g")]
    one, two = queued_cells(free, tmp_path, folder), queued_cells(free, tmp_path, folder)
    taken = [next(one).id, next(two).id, next(one).id, next(two).id]
    assert sorted(taken) == ["b", "e", "f", "g"] and next(one, None) is None and next(two, None) is None
    # the edit cell claimed by a live process (this one) and not done: its edit x fine-tune cell
    # waits behind the cells after it, and runs once that process is gone
    folder = tmp_path / "queue2"
    folder.mkdir()
    (folder / "e").write_text(str(os.getpid()))
    gen = queued_cells(grid, tmp_path, folder, poll_s=0.01)
    assert [next(gen).id, next(gen).id] == ["b", "f"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / "e").write_text(str(dead.pid))
    assert next(gen).id == "ef" and next(gen, None) is None
    # a finished edit (its .done mark) frees its edit x fine-tune cell at once; cells that were
    # done before the processes started carry run_local_jobs' "done" claim and are never taken
    folder = tmp_path / "queue3"
    folder.mkdir()
    (folder / "e").write_text(str(os.getpid()))
    (folder / "e.done").touch()
    (folder / "b").write_text("done")
    assert [c.id for c in queued_cells(grid, tmp_path, folder)] == ["ef", "f"]


@pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(), reason="organism not trained")
def test_grid_runs_in_two_processes_resumes_merges_and_reports(tmp_path, capsys):
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--device", "cpu", "--jobs", "2", "--quiet"]) == 0
    cap = capsys.readouterr()
    printed = cap.out
    assert "report:" in printed and (out / "report.html").exists()
    # what the processes spent before their cells' work, measured in each child
    assert re.search(r"^2 processes: started \d+\.\d-\d+\.\d s after `fadelab run` began; "
                     r"start-up \d+\.\d-\d+\.\d s before the first cell, "
                     r"model load \d+\.\d-\d+\.\d s within it$", cap.err, re.M), cap.err
    assert not list((out / "cells").glob(".queue-*"))  # the processes' shared queue is cleaned up
    exp = load_experiment(cfg)
    assert all(state == "done" for _, state in status(exp, out))
    assert main(["status", str(cfg), "--out", str(out)]) == 0  # each cell's wall time, from its mark
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{exp.name}: 4/4 cells done") and "s of cell time" in lines[0]
    assert re.search(r"cell stores \d+\.\d\d GB, \d+\.\d GB free\)$", lines[0]), lines[0]
    assert all(re.match(r"\s+done\s+\d+\.\d s\s+\d+\.\d\d GB ", line) for line in lines[1:]), lines
    sizes = sum(float(line.split(" s ")[1].split("GB")[0]) for line in lines[1:])
    assert sizes == pytest.approx(sum(p.stat().st_size for p in (out / "cells").glob("*.h5")) / 1e9, abs=0.02)
    # --stages: where each cell's time went, in the order the stages ran, within its wall time
    assert main(["status", str(cfg), "--out", str(out), "--stages"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("stages over the done cells: ") and "finetune " in lines[1], lines[1]
    assert lines[2] == "cells run as CUDA MPS clients: 0 of 4 done (0 not recorded)", lines[2]  # the CPU
    ef = next(c for c in cells(exp) if c.kind == "edit_finetune")
    mark = cell_mark(cell_path(out, ef), ef)
    assert mark["mps"] is False
    wall, stages = mark["seconds"], mark["stages"]
    assert list(stages) == ["edit", "finetune", "write", "project_out", "evaluate", "weight_probes",
                            "neuron_probes"]
    # each stage is stored rounded to 0.01 s (cells.run_cell), so their sum may pass the wall by
    # half of that per stage (session 20: 9.76 against 9.7597)
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= wall + 0.005 * len(stages)
    line = next(x for x in lines if ef.id in x)
    assert re.search(r"  edit \d+\.\d ft \d+\.\d write \d+\.\d cf \d+\.\d eval \d+\.\d "
                     r"wprobe \d+\.\d nprobe \d+\.\d other \d+\.\d$", line), line
    # the merged store reads like one store, through links into the cell files
    from store import Store

    with Store.open(out / "experiment.h5", "r") as st:
        # the report names the commit the cells were computed with (was "unknown")
        with h5py.File(cell_path(out, ef), "r") as f:
            assert st.h5.attrs["code_version"] == f.attrs["code_version"]
        variants = {m["variant"] for m in st.metric_entries()}
        assert {"M", "M_ed/erase", "M_ft/lora", "M_ed_ft/erase/lora", "M_cf/erase/lora"} <= variants
        assert st.read_metric("M_ed_ft/erase/lora", "Delta.unsafe.share.unsafe:oracle")["n"] == 2
        assert "M_ed/erase" in st.variants()
        for name in ("probes/neurons/erase/lora", "probes/neurons_test/erase/lora",
                     "probes/neurons_concepts/erase/lora"):
            assert st.is_complete(f"/arrays/{name}"), name
        # the graded shared-fade test over every edit neuron, beside the split one
        test = dict(zip(st.array_attrs("probes/neurons_test/erase/lora")["stat"],
                        st.read_array("probes/neurons_test/erase/lora")))
        assert 0 < test["rho_n"] <= test["n_edit"], test
        assert np.isnan(test["rho_ft_fade"]) or -1 <= test["rho_ft_fade"] <= 1
        assert "z_ft" in st.array_attrs("probes/neurons/erase/lora")["metric"]
    with h5py.File(out / "experiment.h5", "r") as f:
        assert isinstance(f.get("/deltas/M_ft", getlink=True), h5py.ExternalLink)
    html = (out / "report.html").read_text()
    assert "table3_unsafe" in html and "data:image/png;base64" in html
    assert "neurons_shared_fade" in html
    assert "Shared-fade hypothesis over 1 edit x fine-tune cell: the split test" in html
    # with every cell done, --jobs starts no process (each would load the model for nothing)
    from fadelab import runner

    def no_process(*a, **kw):
        raise AssertionError("a process was started for a grid with every cell done")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", no_process)
        assert runner.run_local_jobs(str(cfg), out, 2, "cpu", progress=False) == []
    # a rerun recomputes nothing; a lost cell is redone alone
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.h5")}
    edit_cell = next(c for c in cells(exp) if c.kind == "edit")
    os.remove(cell_path(out, edit_cell))
    res = subprocess.run([sys.executable, "-m", "fadelab.cli", "run", str(cfg), "--out", str(out),
                          "--device", "cpu", "--shard", "0/1", "--quiet"],
                         capture_output=True, text=True, check=True)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["ran"] == [edit_cell.id] and len(summary["skipped"]) == 3
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.h5")}
    assert {k: v for k, v in after.items() if k != cell_path(out, edit_cell).name} == \
        {k: v for k, v in before.items() if k != cell_path(out, edit_cell).name}
    merge(exp, out)


def test_merged_code_version_names_the_cells_commits(tmp_path):
    from fadelab.grid import _cells_code_version

    files = []
    for i, version in enumerate(["abc", "abc", "def", None]):
        files.append(h5py.File(tmp_path / f"{i}.h5", "w"))
        if version:
            files[-1].attrs["code_version"] = version
    assert _cells_code_version(files[:2]) == "abc"
    assert _cells_code_version(files[:3]) == "mixed: abc, def"
    assert _cells_code_version(files[3:]) == "unknown"
    for f in files:
        f.close()


@pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(), reason="organism not trained")
def test_slurm_path_through_submitits_local_executor(tmp_path):
    pytest.importorskip("submitit")
    from fadelab.runner import run_slurm

    cfg = _config(tmp_path, TINY.replace("[[finetune]]", "[[unused]]").split("[[unused]]")[0])
    out = tmp_path / "out"
    results = run_slurm(str(cfg), out, 2, "cpu", cluster="local")
    ran = sorted(c for r in results for c in r["ran"])
    assert ran == sorted(c.id for c in cells(load_experiment(cfg)))  # base and edit, once each
    assert {r["shard"] for r in results} == {"0/2", "1/2"}


def _slow_writer(tmp):
    import time as _t
    tmp.mkdir(parents=True)
    with (tmp / "metadata.jsonl").open("w") as f:
        for i in range(20):
            f.write(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n")
            f.flush()
            _t.sleep(0.01)


def _race(folder, barrier):
    from fadelab.plan import _write_once
    barrier.wait()
    _write_once(folder, _slow_writer)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    sys.exit(0 if len(lines) == 20 and (folder / ".done").exists() else 3)


def test_shard_processes_writing_one_dataset_at_once_all_see_it_whole(tmp_path):
    # CI once failed here: two shards wrote out/data/style at the same moment, and one read a
    # metadata.jsonl the other had just truncated ("lists no images").
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    folder = tmp_path / "data" / "style"
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_race, args=(folder, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["style"]


def test_the_api_style_set_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import fadelab as fl
    from models.errors import FadelabError
    from models.organism import data as D

    real = D.write_style_set

    def dies_half_way(folder, n, seed):
        real(folder, n=2, seed=seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "write_style_set", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        fl.style_data(tmp_path / "style", n=4)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary copy
    monkeypatch.setattr(D, "write_style_set", real)
    folder = fl.style_data(tmp_path / "style", n=4)
    assert len(D.read_metadata(folder)) == 4 and len(list(folder.glob("*.png"))) == 4
    assert fl.style_data(folder, n=4) == folder  # written once: the second call reads it
    with pytest.raises(FadelabError, match="4 images, not 5"):
        fl.style_data(folder, n=5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FadelabError, match="not empty"):
        fl.style_data(tmp_path / "mine", n=4)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_local_processes_take_the_gpus_the_parent_was_given():
    from fadelab.runner import child_gpu

    assert [child_gpu(i, 2, None) for i in range(4)] == ["0", "1", "0", "1"]
    assert [child_gpu(i, 1, "1") for i in range(3)] == ["1", "1", "1"]  # one GPU, named 1
    assert [child_gpu(i, 2, "2, 3") for i in range(3)] == ["2", "3", "2"]
    assert [child_gpu(i, 2, "GPU-a,GPU-b") for i in range(2)] == ["GPU-a", "GPU-b"]  # UUIDs too


@pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(), reason="organism not trained")
def test_checkpoint_deltas_keep_the_edit_sites_the_probes_read(tmp_path):
    from fadelab.cells import Context
    from fadelab.plan import _finetune, checkpoint_sites, compute_edit, edit_site_names

    text = TINY.replace('method = "lora"', 'method = "full"') + """
[[edit]]
id = "fact"
method = "refact"
type = "Appearance"
index = 0
[edit.hparams]
max_steps = 2
"""
    exp = load_experiment(_config(tmp_path, text))
    ctx = Context(exp, tmp_path / "out", progress=False)
    erase = compute_edit(ctx, exp.edit("erase"))
    # the sites are known before the edit runs, and they are the ones it writes
    assert edit_site_names(ctx, exp.edit("erase")) == erase.delta.sites()
    fact_sites = edit_site_names(ctx, exp.edit("fact"))
    assert len(fact_sites) == 1 and re.fullmatch(r"text\.mlp\.\d+\.fc2", fact_sites[0])
    union = checkpoint_sites(ctx)
    assert set(union) == set(erase.delta.sites()) | set(fact_sites)
    ft = _finetune(ctx, exp.finetune("lora"), base_delta=erase.delta)
    assert ft.steps == [2] and ft.checkpoints[0][1].sites() == erase.delta.sites()
    assert len(ft.delta.sites()) > len(erase.delta.sites())  # the final delta keeps every site
    exp.samples["checkpoint_sites"] = "all"
    assert checkpoint_sites(ctx, erase.delta) is None
    exp.samples["checkpoint_sites"] = "some"
    with pytest.raises(FadelabError, match=r"checkpoint_sites = 'some'.*\"edits\" and \"all\""):
        checkpoint_sites(ctx)


def test_finetune_deltas_can_be_stored_in_bfloat16(tmp_path):
    import torch

    from analysis.report import _delta_norms
    from fadelab.cells import Context, load_delta, save_finetune
    from fadelab.plan import delta_dtype
    from models import WeightDelta
    from store import Store

    exp = load_experiment(_config(tmp_path))
    ctx = Context(exp, tmp_path / "out", progress=False)
    assert delta_dtype(ctx) == "float32"  # the default
    exp.samples["delta_dtype"] = "float16"
    with pytest.raises(FadelabError, match=r"delta_dtype = 'float16'.*\"float32\" and \"bfloat16\""):
        delta_dtype(ctx)
    exp.samples["delta_dtype"] = "bfloat16"
    assert delta_dtype(ctx) == "bfloat16"

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 5, generator=g) * 1e-5  # a fine-tune's scale: bfloat16 keeps fp32's range
    b, a = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    final = WeightDelta({"x.dense": dense, "x.lora": (b, a)}, {"method": "full"})
    ckpt = WeightDelta({"x.dense": dense / 2})
    with Store.open(tmp_path / "c.h5", "a") as st:
        save_finetune(st, "M_ft/full", final, [(3, ckpt)], [1.0, 0.5], "M_ft.full", dtype="bfloat16")
    with Store.open(tmp_path / "c.h5", "r") as st:
        got = load_delta(st, "M_ft/full")
        assert got.deltas["x.dense"].dtype == torch.bfloat16
        assert torch.equal(got.deltas["x.dense"], dense.to(torch.bfloat16))
        assert torch.equal(got.deltas["x.lora"][0], b.to(torch.bfloat16))
        rel = (got.deltas["x.dense"].float() - dense).abs().max() / dense.abs().max()
        assert 0 < rel <= 2 ** -8  # rounded, by at most half a bfloat16 ulp
        assert torch.equal(st.read_delta("M_ft/full", "x.dense", 3), (dense / 2).to(torch.bfloat16))
        # low-rank factors stored in 16 bits multiply out in float32
        dense_lora = st.read_delta("M_ft/full", "x.lora", dense=True)
        assert dense_lora.dtype == torch.float32
        assert torch.equal(dense_lora, b.to(torch.bfloat16).float() @ a.to(torch.bfloat16).float())
        variants = st.variants()
        sites, norms = _delta_norms(st, variants)  # the report's heatmap reads them
        assert variants == ["M_ft/full"] and norms.shape == (1, 2)
        assert norms[0, sites.index("x.dense")] == pytest.approx(float(dense.norm()), rel=4e-3)
        # low-rank factors: the norm from their Gram matrices, without forming BA
        assert norms[0, sites.index("x.lora")] == pytest.approx(float(dense_lora.double().norm()), rel=1e-6)


def test_a_finetune_too_large_for_the_disk_stops_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    from types import SimpleNamespace

    import torch

    from fadelab import plan
    from fadelab.cells import Context
    from models import WeightDelta
    from store import Store

    exp = load_experiment(_config(tmp_path))
    ctx = Context(exp, tmp_path / "out", progress=False)
    delta = WeightDelta({"x": torch.ones(1000, 250)})  # 1 MB in float32
    result = SimpleNamespace(delta=delta, checkpoints=[(2, WeightDelta({"x": torch.ones(1000, 250)}))],
                             loss=[1.0])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 0, 1_500_000))
    with Store.open(tmp_path / "c.h5", "a") as st:
        assert plan.delta_bytes(st, "M_ft/a", [(None, delta), (2, delta)], "float32") == 2_000_000
        with pytest.raises(FadelabError, match=r"M_ft/a needs 2\.0 MB on disk and .* has 1\.5 MB free; "
                                               r"free space, or store deltas in bfloat16"):
            plan._write_finetune(ctx, st, "k", "M_ft/a", result)
        assert st.variants() == []  # nothing half-written
        exp.samples["delta_dtype"] = "bfloat16"  # 1 MB in all: it fits
        plan._write_finetune(ctx, st, "k", "M_ft/a", result)
        assert st.variants() == ["M_ft/a"]
        # a resumed cell counts only what is missing
        assert plan.delta_bytes(st, "M_ft/a", [(None, delta), (2, delta)], "bfloat16") == 0


@pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(), reason="organism not trained")
def test_edit_finetune_cells_reuse_the_edit_cells_images(tmp_path):
    from store import Store
    from store.core import get_attrs

    from fadelab.cells import Context, run_cell

    cfg = _config(tmp_path, TINY.replace("neurons = true", "neurons = false"))
    out = tmp_path / "out"
    exp = load_experiment(cfg)
    ctx = Context(exp, out, progress=False)
    edit = next(c for c in cells(exp) if c.kind == "edit")
    both = next(c for c in cells(exp) if c.kind == "edit_finetune")
    run_cell(ctx, edit)
    ctx._cache.clear()  # as in another process: the edit comes back from its cell's store
    run_cell(ctx, both)
    with Store.open(cell_path(out, edit), "r") as src, Store.open(cell_path(out, both), "r") as st:
        names = [n for n in st.h5["images"]["M_ed"]["erase"]]
        assert names and sorted(names) == sorted(src.h5["images"]["M_ed"]["erase"])
        for n in names:
            assert get_attrs(st.h5[f"/images/M_ed/erase/{n}"]).get("copied_from") == edit.id
            a, b = src.read_images("M_ed/erase", n), st.read_images("M_ed/erase", n)
            assert np.array_equal(a["pixels"], b["pixels"]) and list(a["seed"]) == list(b["seed"])
        # the copies were judged here, and the pair's Delta was computed against them
        metrics = st.metric_entries()
        assert any(m["variant"] == "M_ed/erase" for m in metrics)
        assert any(m["variant"] == "M_ed_ft/erase/lora" and m["name"].startswith("Delta.") for m in metrics)
