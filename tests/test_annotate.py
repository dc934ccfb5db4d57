"""Human annotation: the page in real headless Chromium (keyboard labels, escaping, several
annotators, labels in the store at once), the same server over plain HTTP, and agreement."""

import base64
import html
import json
import os
import select
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from probes.behaviour import agreement
from probes.behaviour.annotate import AnnotationServer, annotator_id, image_sets, serve
from store import Store

NASTY = "<script>window.__pwned = 1</script><b id='inj'>bold</b> & \"quotes\" 'x' </p>"


@pytest.fixture()
def store_path(tmp_path):
    """A store with 3 images in each of two variants; image 0 of M has a hostile prompt."""
    path = tmp_path / "ann.h5"
    rng = np.random.default_rng(0)
    with Store.open(path, "a") as st:
        for v in ("M_ed", "M_ed_ft"):
            px = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
            st.create_images(v, "unsafe", px, [NASTY, "a bloody apple", "a naked ceo"], [0, 1, 2])
    return path


def _labels(st, who):
    out = {}
    for v, n in image_sets(st, "unsafe"):
        if who in st.annotators(v, n):
            out[v] = agreement.latest_labels(st, v, n, who)
    return out


# --- over plain HTTP ----------------------------------------------------------------------------

def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def _post(url, data):
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # follows the 303 to the next page
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_server_over_http_writes_each_label_at_once(store_path):
    server = serve(store_path, port=0).start()
    try:
        base = server.url
        code, page = _get(base + "annotate?name=alice")
        assert code == 200 and "<span id='pos'>1</span> of 6" in page
        first = server.items[0]
        prompt = server.prompts[(first[0], first[1])][first[2]]
        assert f"<p id='prompt'>{html.escape(prompt)}</p>" in page
        assert "<script>window.__pwned" not in page
        for i, lab in enumerate(["unsafe", "safe", "can't decide"]):
            code, page = _post(base + "label", {"name": "alice", "item": i, "label": lab})
            assert code == 200 and f"<span id='pos'>{i + 2}</span> of 6" in page
            with server.lock:  # in the store the moment the reply came
                got = _labels(server.store, "human:alice")
            assert sum(len(d) for d in got.values()) == i + 1
            v, n, k = server.items[i]
            assert got[v][k] == lab
        assert _post(base + "label", {"name": "alice", "item": 0, "label": "maybe"})[0] == 400
        assert _post(base + "label", {"name": "a b<", "item": 0, "label": "safe"})[0] == 400
        assert _post(base + "label", {"name": "alice", "item": 99, "label": "safe"})[0] == 400
        for i in range(3, 6):
            code, page = _post(base + "label", {"name": "alice", "item": i, "label": "safe"})
        assert "All 6 images labelled, alice" in page
        code, page = _get(base)
        assert "alice</a>: 6 of 6" in page
    finally:
        server.shutdown()
    with Store.open(store_path, "r") as st:  # the file is closed cleanly and holds every label
        got = _labels(st, "human:alice")
        assert sorted(len(d) for d in got.values()) == [3, 3]


def test_bad_inputs_raise_clear_errors(store_path, tmp_path):
    from models.errors import FadelabError

    with pytest.raises(FadelabError, match="annotator name"):
        annotator_id("alice smith")
    with pytest.raises(FadelabError, match="no image set named 'road'"):
        serve(store_path, images="road")
    with pytest.raises(FadelabError, match="does not exist"):
        serve(tmp_path / "missing.h5")
    with Store.open(store_path, "r") as st:
        with pytest.raises(FadelabError, match="no image sets"):
            AnnotationServer(st, [])


# --- in real headless Chromium -----------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4), stdlib only."""

    def __init__(self, exe: str, profile: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "--window-size=900,900", "about:blank"]
        script = 'exec "$@" 3<&{0} 4>&{1}'.format(cmd_r, res_w)
        self.proc = subprocess.Popen(["bash", "-c", script, "chromium", *args],
                                     pass_fds=(cmd_r, res_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self._buf, self._id, self.events = b"", 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)

    def _read(self, timeout: float) -> dict:
        end = time.time() + timeout
        while b"\0" not in self._buf:
            left = end - time.time()
            if left <= 0 or not select.select([self._res_r], [], [], left)[0]:
                raise TimeoutError("no message from Chromium")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: bool = False,
             timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            got = self._read(timeout)
            if got.get("id") == self._id:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                return got.get("result", {})
            self.events.append(got)

    def wait_load(self, timeout: float = 30) -> None:
        end = time.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == "Page.loadEventFired":
                    del self.events[: i + 1]
                    return
            self.events.append(self._read(max(0.1, end - time.time())))

    def navigate(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_load()

    def js(self, expr: str):
        return self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True},
                         session=True)["result"].get("value")

    def press(self, key: str) -> None:
        """A real key press (keyDown with text, then keyUp), as a person's keyboard sends it."""
        code = {"key": key, "code": f"Key{key.upper()}", "windowsVirtualKeyCode": ord(key.upper())}
        self.events.clear()
        self.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": key, **code}, session=True)
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **code}, session=True)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._res_r)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get "
                                                "install chromium)")
def test_page_in_headless_chromium(store_path, tmp_path):
    server = serve(store_path, port=0).start()
    browser = Chromium(_chromium(), tmp_path / "profile")
    try:
        browser.navigate(server.url)
        assert browser.js("document.title") == "fadelab annotation"
        browser.navigate(server.url + "annotate?name=alice")
        # the hostile prompt is text, not markup: no script ran, no element was injected
        nasty = next(i for i, (v, n, k) in enumerate(server.items) if k == 0)
        for _ in range(nasty):  # reach the hostile prompt by labelling what comes before it
            browser.press("s")
            browser.wait_load()
        assert browser.js("document.getElementById('prompt').textContent") == NASTY
        assert browser.js("window.__pwned === undefined && !document.getElementById('inj')")
        browser.screenshot(tmp_path / "annotate.png")
        done = nasty
        for key, label in (("u", "unsafe"), ("c", "can't decide"), ("s", "safe")):
            item = int(browser.js("document.getElementById('item').value"))
            browser.press(key)
            browser.wait_load()
            done += 1
            with server.lock:  # written before the next page was served
                got = _labels(server.store, "human:alice")
            v, n, k = server.items[item]
            assert got[v][k] == label
            assert sum(len(d) for d in got.values()) == done
            assert browser.js("document.getElementById('pos').textContent") == str(done + 1)
        # a second annotator by name starts from the first image, with their own labels
        browser.navigate(server.url + "annotate?name=bob")
        assert browser.js("document.getElementById('who').textContent") == "bob"
        assert browser.js("document.getElementById('item').value") == "0"
        browser.press("u")
        browser.wait_load()
        # closing the tab loses nothing: the browser goes away before the store is read
    finally:
        browser.close()
        server.shutdown()
    with Store.open(store_path, "r") as st:
        alice, bob = _labels(st, "human:alice"), _labels(st, "human:bob")
    assert sum(len(d) for d in alice.values()) == nasty + 3
    v, n, k = server.items[0]
    assert bob == {v: {k: "unsafe"}}


# --- agreement ----------------------------------------------------------------------------------

def _fleiss_by_hand(counts: np.ndarray) -> float:
    """Fleiss (1971) eq. 1-8 in fp64, written out."""
    counts = counts.astype(np.float64)
    n_items, _ = counts.shape
    n = counts.sum(1)[0]
    p_j = counts.sum(0) / (n_items * n)
    p_i = (np.square(counts).sum(1) - n) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), np.square(p_j).sum()
    return (p_bar - p_e) / (1 - p_e)


def test_fleiss_kappa_and_confusion_tables(store_path):
    people = {  # final labels; ann first gave image 0 another label, replaced later
        "human:ann": ["can't decide", "safe", "safe", "unsafe", "unsafe", "safe"],
        "human:ben": ["unsafe", "safe", "unsafe", "unsafe", "unsafe", "safe"],
        "human:cat": ["unsafe", "can't decide", "safe", "unsafe", "safe", "unsafe"],
    }
    judge = ["unsafe", "safe", "safe", "safe", "black", "safe"]
    with Store.open(store_path, "a") as st:
        sets = image_sets(st, "unsafe")
        assert sets == [("M_ed", "unsafe"), ("M_ed_ft", "unsafe")]
        items = [(v, n, k) for v, n in sets for k in range(3)]
        st.append_label("M_ed", "unsafe", "human:ann", 0, "safe")  # replaced below
        for who, labels in {**people, "oracle": judge}.items():
            for (v, n, k), lab in zip(items, labels):
                st.append_label(v, n, who, k, lab)
        res = agreement.fleiss(st, sets)
        cats = res["categories"]
        counts = np.zeros((6, len(cats)), int)
        for labels in people.values():
            for i, lab in enumerate(labels):
                counts[i, cats.index(lab)] += 1
        assert res["n_items"] == 6 and res["n_raters"] == 3
        assert res["kappa"] == pytest.approx(_fleiss_by_hand(counts), abs=1e-12)
        conf = agreement.confusion(st, sets, "oracle")
        maj = agreement.majority(people)
        assert maj == ["unsafe", "safe", "safe", "unsafe", "unsafe", "safe"]
        table = np.array(conf["table"])
        labs = conf["labels"]
        assert table.sum() == 6 and table[labs.index("black"), labs.index("unsafe")] == 1
        assert table[labs.index("safe"), labs.index("unsafe")] == 1
        assert conf["agreement"] == pytest.approx(4 / 6)
        rows = agreement.human_metrics(st, sets, [("M_ed", "M_ed_ft")], n_boot=200)
        by = {(r["variant"], r["name"]): r for r in rows}
        assert by[("M_ed", "unsafe.share.unsafe:humans")]["value"] == pytest.approx(1 / 3)
        assert by[("M_ed_ft", "unsafe.share.unsafe:humans")]["value"] == pytest.approx(2 / 3)
        assert by[("M_ed_ft", "Delta.unsafe.share.unsafe:humans")]["value"] == pytest.approx(1 / 3)
        flip = by[("M_ed_ft", "Flip.unsafe:humans")]
        assert flip["value"] == pytest.approx(1 / 3)  # image 1: safe -> unsafe
        assert 0.0 <= flip["ci_low"] <= flip["value"] <= flip["ci_high"] <= 1.0


def test_annotate_and_agreement_commands(store_path, capsys):
    import signal
    import sys

    from fadelab.cli import main

    # SIGINT restored to its default in the child: a shell without job control starts background
    # jobs with SIGINT ignored, the child inherits that, and then Python never raises
    # KeyboardInterrupt (a clean-clone CI run started with `(bash .ci/run &)` hung here)
    proc = subprocess.Popen([sys.executable, "-m", "fadelab.cli", "annotate", str(store_path),
                             "--port", "0"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert "annotating 6 images of 'unsafe' at http://127.0.0.1:" in line
        url = line.split(" at ")[1].split(" ")[0]
        assert _post(url + "label", {"name": "ann", "item": 0, "label": "unsafe"})[0] == 200
        assert _post(url + "label", {"name": "ben", "item": 0, "label": "safe"})[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the command closes the store and exits
        assert proc.wait(timeout=30) == 130
    assert main(["agreement", str(store_path), "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "people: ann, ben" in out and "Fleiss' kappa" in out
    assert main(["agreement", str(store_path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["fleiss"]["n_items"] == 1 and got["humans"] == ["human:ann", "human:ben"]
    assert main(["annotate", str(store_path), "--images", "road"]) == 2
    assert "no image set named 'road'" in capsys.readouterr().err
