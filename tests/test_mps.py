"""CUDA MPS for local processes that share a GPU (fadelab.runner.use_mps, mps_daemon and the
children's environment), with a stand-in nvidia-cuda-mps-control on PATH: no GPU needed."""

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from fadelab import runner
from fadelab.cli import main
from models.errors import FadelabError

FAKE = """#!/bin/sh
# stand-in for nvidia-cuda-mps-control: -d starts "the daemon", stdin "quit" stops it
if [ "$1" = "-d" ]; then
  [ -n "$FAKE_MPS_FAIL" ] && { echo "An instance of this daemon is already running" >&2; exit 1; }
  echo "start $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY" >> "$FAKE_MPS_LOG"
else
  read cmd; echo "$cmd $CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_MPS_LOG"
fi
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-cuda-mps-control"
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_LOG", str(tmp_path / "calls.txt"))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    return tmp_path / "calls.txt"


def test_use_mps_decides_by_mode_and_sharing(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(runner, "DEFAULT_MPS_PIPE", tmp_path / "nvidia-mps")  # no system daemon
    assert runner.use_mps("auto", jobs=8, gpus=1)
    assert not runner.use_mps("auto", jobs=2, gpus=2)  # one process per GPU: nothing shares
    assert not runner.use_mps("auto", jobs=8, gpus=0)  # the CPU
    assert not runner.use_mps("off", jobs=8, gpus=1)
    assert runner.use_mps("on", jobs=1, gpus=1)
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/somewhere/theirs")
    assert not runner.use_mps("auto", jobs=8, gpus=1)  # the user's own daemon numbers the GPUs
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    (tmp_path / "nvidia-mps").mkdir()
    (tmp_path / "nvidia-mps" / "control").touch()
    assert not runner.use_mps("auto", jobs=8, gpus=1)  # so does a system-wide one
    assert runner.use_mps("on", jobs=8, gpus=1)
    with pytest.raises(FadelabError, match=r"--mps 'sometimes': accepted are auto, on, off"):
        runner.use_mps("sometimes", jobs=8, gpus=1)
    with pytest.raises(FadelabError, match="--mps on: CUDA MPS needs --device cuda"):
        runner.use_mps("on", jobs=8, gpus=0)


def test_daemon_starts_with_private_pipes_and_quits(fake_mps):
    with runner.mps_daemon() as env:
        pipe = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
        assert pipe.is_dir() and env["CUDA_MPS_LOG_DIRECTORY"] == str(pipe / "log")
        assert fake_mps.read_text().split() == ["start", str(pipe), str(pipe / "log")]
    assert fake_mps.read_text().splitlines()[-1] == f"quit {pipe}"
    assert not pipe.exists()


def test_daemon_quits_when_the_block_raises(fake_mps):
    with pytest.raises(RuntimeError, match="cell failed"):
        with runner.mps_daemon() as env:
            raise RuntimeError("cell failed")
    assert fake_mps.read_text().splitlines()[-1] == f"quit {env['CUDA_MPS_PIPE_DIRECTORY']}"


def test_daemon_that_fails_or_is_missing(fake_mps, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    with caplog.at_level(logging.WARNING, logger="fadelab.runner"):
        with runner.mps_daemon() as env:
            assert env is None
    assert "did not start (exit 1: An instance of this daemon is already running)" in caplog.text
    with pytest.raises(FadelabError, match="did not start"):
        with runner.mps_daemon(required=True):
            pass
    monkeypatch.setenv("PATH", "/nonexistent")
    with runner.mps_daemon() as env:
        assert env is None
    with pytest.raises(FadelabError, match="--mps on: nvidia-cuda-mps-control is not on PATH"):
        with runner.mps_daemon(required=True):
            pass


def test_children_are_clients_numbered_from_zero(fake_mps, monkeypatch, tmp_path):
    """Under a daemon started with CUDA_VISIBLE_DEVICES=2,3 the clients see GPUs 0 and 1."""
    seen, real_popen = [], subprocess.Popen

    class Child:
        returncode = 0

        def __init__(self, cmd, env, **kw):
            seen.append(env)

        def poll(self):
            return 0

        def communicate(self):
            return '{"done": 0}\n', None

    monkeypatch.setattr(runner, "_cuda_count", lambda: 2)
    monkeypatch.setattr(subprocess, "Popen",  # the daemon's own commands run for real
                        lambda cmd, **kw: Child(cmd, **kw) if "fadelab.cli" in cmd else real_popen(cmd, **kw))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    runner.run_local_jobs(None, tmp_path / "out", 4, "cuda", smoke=True, progress=False, mps="on")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in seen] == ["0", "1", "0", "1"]
    assert len({e["CUDA_MPS_PIPE_DIRECTORY"] for e in seen}) == 1
    seen.clear()
    runner.run_local_jobs(None, tmp_path / "out", 4, "cuda", smoke=True, progress=False, mps="off")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in seen] == ["2", "3", "2", "3"]
    assert not any("CUDA_MPS_PIPE_DIRECTORY" in e for e in seen)
    # the children run --quiet, and their probes' and libraries' bars obey only tqdm's variable
    assert all(e["TQDM_DISABLE"] == "1" for e in seen)


def test_mps_client_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "DEFAULT_MPS_PIPE", tmp_path / "nvidia-mps")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    assert not runner.mps_client("cuda")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert runner.mps_client("cuda") and not runner.mps_client("cpu")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    (tmp_path / "nvidia-mps").mkdir()
    (tmp_path / "nvidia-mps" / "control").touch()
    assert runner.mps_client("cuda:0")


def test_cli_refuses_an_unknown_mps_mode(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--mps", "sometimes", "--out", "/nonexistent/never-written"])
    assert "--mps" in capsys.readouterr().err


def test_a_daemon_left_by_a_killed_run_is_quit_by_the_next(fake_mps, tmp_path, monkeypatch):
    """SIGKILL of `fadelab run` leaves its daemon running; the next mps_daemon quits it. A daemon
    whose owner lives, and a folder without an owner file, are left alone."""
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan, live, other = (tmp_path / f"fadelab-mps-{n}" for n in ("orphan", "live", "other"))
    for d in (orphan, live, other):
        d.mkdir()
    (orphan / "owner").write_text(dead.stdout.strip())  # an exited process: its pid is gone
    (live / "owner").write_text(str(os.getpid()))
    with runner.mps_daemon() as env:
        assert (Path(env["CUDA_MPS_PIPE_DIRECTORY"]) / "owner").read_text() == str(os.getpid())
    calls = fake_mps.read_text().splitlines()
    assert calls[0] == f"quit {orphan}" and not orphan.exists()
    assert live.is_dir() and other.is_dir()
    assert not any(str(live) in c or str(other) in c for c in calls)
