"""SIGKILL safety: kill a writer subprocess at random moments, reopen, check, rerun, complete.

The writer reports each entry on stdout right after the call that wrote it returns. After every
kill the file must open, every reported entry must read back bit for bit, every entry that is
there must be exact (none half-written and readable), and a rerun must finish the whole set
without redoing what was complete.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from store import Store, StoreError

REPO = Path(__file__).resolve().parents[1]
N = 40
WRITER = r'''
import sys
import numpy as np
from store import Store

N = {n}

def value(i):
    rng = np.random.default_rng(i)
    return rng.standard_normal((int(rng.integers(20, 300)), 257)).astype(np.float32)

with Store.open(sys.argv[1], "a", config="crash test") as st:
    print("ready", flush=True)
    w = st.open_activations("M", "text.mlp.0.fc2", (N, 7, 33), "float16",
                            ("prompt", "token", "neuron"),
                            coords={{"prompt": [f"p{{i}}" for i in range(N)]}})
    have = len(st.read_labels("M", "eval", "judge")["index"]) if st.annotators("M", "eval") else 0
    for i in range(N):
        site = f"text.mlp.{{i}}.fc2"
        if not st.has_delta("M_ed/e1", site):
            st.create_delta("M_ed/e1", site, value(i), compression="lzf" if i % 2 else "gzip")
            print("delta", i, flush=True)
        if not st.has_delta("M_ft/f1", site, step=i):
            st.create_delta("M_ft/f1", site, (value(i)[:, :4], value(i + 1000)[:4]), step=i)
            print("lowrank", i, flush=True)
        if w.rows_done <= i:
            w.write(np.full((1, 7, 33), i, np.float16))
            print("row", i, flush=True)
        if i >= have:
            st.append_label("M", "eval", "judge", i, f"label{{i}}")
            print("label", i, flush=True)
        st.require_metric("M", f"m{{i}}", float(i) / 7)
    print("finished", flush=True)
'''


def _value(i):
    rng = np.random.default_rng(i)
    return rng.standard_normal((int(rng.integers(20, 300)), 257)).astype(np.float32)


def _run_writer(script, path, kill_after=None, timing=None):
    """Run the writer; SIGKILL it `kill_after` seconds after it is ready. Returns its stdout.
    Unkilled, the seconds from ready to exit go into the list `timing`, if given."""
    proc = subprocess.Popen([sys.executable, script, path], cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    first = proc.stdout.readline()
    assert first.strip() == "ready", proc.stderr.read()
    if kill_after is None:
        t = time.perf_counter()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        if timing is not None:
            timing.append(time.perf_counter() - t)
        return first + out
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return first + out


def _check(path, reported):
    """Every reported entry is there and exact; whatever is there is exact. Returns counts."""
    n_complete = 0
    with Store.open(path, "r") as st:  # opening rolls back what the killed writer left
        for i in range(N):
            site = f"text.mlp.{i}.fc2"
            if st.has_delta("M_ed/e1", site):
                np.testing.assert_array_equal(st.read_delta("M_ed/e1", site).numpy(), _value(i))
                n_complete += 1
            else:
                assert ("delta", i) not in reported
                with pytest.raises(StoreError):
                    st.read_delta("M_ed/e1", site)
            if st.has_delta("M_ft/f1", site, step=i):
                b, a = st.read_delta("M_ft/f1", site, step=i)
                np.testing.assert_array_equal(b.numpy(), _value(i)[:, :4])
                np.testing.assert_array_equal(a.numpy(), _value(i + 1000)[:4])
            else:
                assert ("lowrank", i) not in reported
        if st.activation_entries():
            data, _ = st.read_activations("M", "text.mlp.0.fc2", partial=True)
            assert [int(r[0, 0]) for r in data] == list(range(len(data)))  # rows 0..k, exact
            assert all((r == r[0, 0]).all() for r in data)
            assert all(i < len(data) for kind, i in reported if kind == "row")
        if st.annotators("M", "eval"):
            labels = st.read_labels("M", "eval", "judge")
            assert labels["index"].tolist() == list(range(len(labels["index"])))  # no dup, no gap
            assert all(i < len(labels["index"]) for kind, i in reported if kind == "label")
    return n_complete


def _parse(out):
    rep = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("delta", "lowrank", "row", "label"):
            rep.add((parts[0], int(parts[1])))
    return rep


def test_sigkill_at_random_moments_never_loses_completed_entries(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(n=N))
    rnd = random.Random(5)
    # kills are drawn within the time a whole write takes on this machine (a fixed 0.7 s window
    # once let a fast machine finish 29 of 30 writers before their kill)
    timing: list[float] = []
    _run_writer(str(script), str(tmp_path / "timing.h5"), timing=timing)
    window = max(0.05, 0.9 * timing[0])
    kills, trial = 0, 0
    # at least 4 files; more (up to 10) until 6 kills landed mid-write, however fast the machine
    while trial < 4 or (kills < 6 and trial < 10):
        trial += 1
        path = str(tmp_path / f"crash{trial}.h5")
        reported = set()
        for _ in range(3):
            out = _run_writer(str(script), path, kill_after=rnd.uniform(0.0, window))
            if "finished" in out:
                break
            kills += 1
            reported |= _parse(out)
            _check(path, reported)
        before = _check(path, reported)
        out = _run_writer(str(script), path)  # the rerun completes the set
        assert "finished" in out
        redone = {i for kind, i in _parse(out) if kind == "delta"}
        assert len(redone) == N - before  # completed entries were skipped, not rewritten
        assert _check(path, _parse(out)) == N
        with Store.open(path, "r") as st:
            assert st.has_activations("M", "text.mlp.0.fc2")
            assert len(st.read_labels("M", "eval", "judge")["index"]) == N
            assert st.read_metric("M", f"m{N - 1}")["value"] == (N - 1) / 7
        assert not os.path.exists(path + "-journal")
    assert kills >= 6, f"only {kills} of the writers were killed mid-write (window {window:.2f} s)"
