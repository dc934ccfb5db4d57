"""Human annotation, as the study did it: a local web page, one image at a time, keyboard labels.

What it offers:
    KEYS                         key -> label: s safe, u unsafe, c can't decide, b black image
    AnnotationServer(store, image_sets, host, port, seed)
                                 a ThreadingHTTPServer over an open, writable store;
                                 .url, .start() (background thread), .serve_forever(), .shutdown()
    serve(path, images="unsafe", variants=None, host, port, seed) -> AnnotationServer
                                 opens the store and collects the image sets to label
    annotator_id(name) -> "human:<name>"

The page: `/` lists known annotators with their progress and asks for a name; `/annotate?name=N`
shows the next image N has not labelled, its prompt, and the keys. A key press (or a click)
posts the label; the server appends it to /labels/<variant>/<images>/human:<name> with
`Store.append_label`, which commits before the reply, so closing the tab loses nothing. The
next image follows. Several annotators work by name, each with their own labels.

Blind order: images of all variants are shown in one order shuffled with `seed`, and the page
never shows the variant, so an annotator cannot tell M_ed from M_ed_ft. Prompts are shown
HTML-escaped (I2P prompts contain arbitrary text).

Only for the local machine: the server binds 127.0.0.1 by default and has no authentication.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from models.errors import FadelabError

log = logging.getLogger(__name__)

KEYS = {"s": "safe", "u": "unsafe", "c": "can't decide", "b": "black"}
LABELS = tuple(KEYS.values())
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,40}$")


def annotator_id(name: str) -> str:
    """The store's annotator name for a person: 'human:<name>'."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise FadelabError(f"annotator name {name!r}: use 1-40 letters, digits, '_', '.', '-'")
    return f"human:{name}"


_STYLE = """body{font-family:sans-serif;max-width:44em;margin:2em auto;color:#222}
img{width:384px;height:384px;image-rendering:pixelated;border:1px solid #999}
kbd{border:1px solid #999;border-radius:3px;padding:0 .3em;background:#f4f4f4}
#prompt{font-size:1.1em;background:#f8f8f8;padding:.5em;white-space:pre-wrap}
button{font-size:1em;margin-right:.5em}"""


def _page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>").encode()


class AnnotationServer(ThreadingHTTPServer):
    """Serves the labelling page for `image_sets` [(variant, images name)] of an open store."""

    daemon_threads = True

    def __init__(self, store, image_sets: Sequence[tuple[str, str]], host: str = "127.0.0.1",
                 port: int = 0, seed: int = 0, close_store: bool = False):
        if not image_sets:
            raise FadelabError("no image sets to annotate: the store has none of the requested "
                               "name (generate them with `fadelab evaluate` first)")
        self.store, self.close_store = store, close_store
        self.lock = threading.Lock()
        self.pixels, self.prompts, items = {}, {}, []
        for variant, name in image_sets:
            got = store.read_images(variant, name)
            self.pixels[(variant, name)] = got["pixels"]
            self.prompts[(variant, name)] = list(got["prompt"])
            items += [(variant, name, k) for k in range(len(got["seed"]))]
        order = np.random.default_rng(seed).permutation(len(items))
        self.items = [items[i] for i in order]
        self.image_sets = list(image_sets)
        self._done: dict[str, set[int]] = {}
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    # -- state -----------------------------------------------------------------------------------
    def done(self, who: str) -> set[int]:
        """Item numbers `who` (an annotator id) has labelled; read from the store once."""
        if who not in self._done:
            pos = {it: i for i, it in enumerate(self.items)}
            done = set()
            for variant, name in self.image_sets:
                if who in self.store.annotators(variant, name):
                    for k in self.store.read_labels(variant, name, who)["index"]:
                        done.add(pos[(variant, name, int(k))])
            self._done[who] = done
        return self._done[who]

    def annotators(self) -> list[str]:
        names = set()
        for variant, name in self.image_sets:
            names |= {a for a in self.store.annotators(variant, name) if a.startswith("human:")}
        return sorted(names)

    def label(self, who: str, item: int, label: str) -> None:
        """Append one label to the store (committed on return)."""
        variant, name, k = self.items[item]
        self.store.append_label(variant, name, who, k, label)
        self.done(who).add(item)

    # -- running ---------------------------------------------------------------------------------
    def start(self) -> AnnotationServer:
        """Serve from a background thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True,
                                        name="fadelab-annotate")
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving, close the socket and (if serve() opened it) the store."""
        if self._thread is not None:
            super().shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        if self.close_store:
            with self.lock:
                self.store.close()


class _Handler(BaseHTTPRequestHandler):
    server: AnnotationServer

    def log_message(self, fmt, *args):  # route http.server's access log to logging
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, body: bytes, ctype: str = "text/html; charset=utf-8",
              headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, text: str) -> None:
        self._send(code, _page("error", f"<p>{html.escape(text)}</p><p><a href='/'>back</a></p>"))

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        try:
            if url.path == "/":
                return self._index()
            if url.path == "/annotate":
                return self._annotate(query.get("name", [""])[0])
            m = re.fullmatch(r"/image/(\d+)\.png", url.path)
            if m:
                return self._image(int(m.group(1)))
        except FadelabError as e:
            return self._error(400, str(e))
        self._error(404, f"no page {url.path}")

    def do_POST(self):  # noqa: N802
        if urllib.parse.urlsplit(self.path).path != "/label":
            return self._error(404, "no such form")
        size = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(size).decode("utf-8", "replace"))
        name, item, label = (form.get(k, [""])[0] for k in ("name", "item", "label"))
        try:
            who = annotator_id(name)
            if not item.isdigit() or int(item) >= len(self.server.items):
                raise FadelabError(f"bad item {item!r}")
            if label not in LABELS:
                raise FadelabError(f"bad label {label!r}: expected one of {', '.join(LABELS)}")
            with self.server.lock:
                self.server.label(who, int(item), label)
        except FadelabError as e:
            return self._error(400, str(e))
        q = urllib.parse.urlencode({"name": name})
        self._send(303, b"", headers={"Location": f"/annotate?{q}"})

    # -- pages -----------------------------------------------------------------------------------
    def _index(self):
        n = len(self.server.items)
        with self.server.lock:
            rows = [(a, len(self.server.done(a))) for a in self.server.annotators()]
        known = "".join(
            f"<li><a href='/annotate?{urllib.parse.urlencode({'name': a[6:]})}'>"
            f"{html.escape(a[6:])}</a>: {k} of {n}</li>" for a, k in rows) or "<li>none yet</li>"
        body = (f"<h1>fadelab annotation</h1><p>{n} images. Annotators:</p><ul>{known}</ul>"
                "<form action='/annotate' method='get'><label>Your name "
                "<input name='name' pattern='[A-Za-z0-9_.\\-]{1,40}' required autofocus></label> "
                "<button>start</button></form>")
        self._send(200, _page("fadelab annotation", body))

    def _annotate(self, name: str):
        who = annotator_id(name)
        n = len(self.server.items)
        with self.server.lock:
            done = self.server.done(who)
            nxt = next((i for i in range(n) if i not in done), None)
        esc = html.escape(name)
        if nxt is None:
            return self._send(200, _page("done", f"<h1>All {n} images labelled, {esc}.</h1>"
                                                 "<p>Thank you. <a href='/'>back</a></p>"))
        variant, iname, k = self.server.items[nxt]
        prompt = self.server.prompts[(variant, iname)][k]
        buttons = "".join(f"<button type='submit' name='label' value='{html.escape(lab, quote=True)}'>"
                          f"<kbd>{key}</kbd> {html.escape(lab)}</button>" for key, lab in KEYS.items())
        body = (f"<p>annotator <b id='who'>{esc}</b>: image <span id='pos'>{len(done) + 1}</span> "
                f"of {n}</p><img id='img' src='/image/{nxt}.png' alt='generated image'>"
                f"<p>prompt:</p><p id='prompt'>{html.escape(prompt)}</p>"
                f"<form id='f' method='post' action='/label'>"
                f"<input type='hidden' name='name' value='{html.escape(name, quote=True)}'>"
                f"<input type='hidden' name='item' id='item' value='{nxt}'>"
                f"<input type='hidden' name='label' id='label' value=''>{buttons}</form>"
                "<p>Keys: <kbd>s</kbd> safe, <kbd>u</kbd> unsafe, <kbd>c</kbd> can't decide, "
                "<kbd>b</kbd> black image. Each label is saved at once.</p>"
                f"<script>const KEYS = {json.dumps(KEYS)}; let sent = false;"
                "document.addEventListener('keydown', e => {"
                " const lab = KEYS[e.key.toLowerCase()];"
                " if (!lab || sent || e.ctrlKey || e.metaKey || e.altKey) return;"
                " sent = true; document.getElementById('label').value = lab;"
                " document.getElementById('f').submit(); });</script>")
        self._send(200, _page(f"annotate: {name}", body))

    def _image(self, item: int):
        from PIL import Image

        if item >= len(self.server.items):
            raise FadelabError(f"no image {item}")
        variant, name, k = self.server.items[item]
        buf = io.BytesIO()
        Image.fromarray(self.server.pixels[(variant, name)][k]).save(buf, format="PNG")
        self._send(200, buf.getvalue(), "image/png")


def image_sets(store, images: str = "unsafe", variants: Sequence[str] | None = None
               ) -> list[tuple[str, str]]:
    """(variant, images) pairs of the store holding an image set called `images`."""
    chosen = variants if variants is not None else _image_variants(store)
    return [(v, images) for v in chosen if store.has_images(v, images)]


def _image_variants(store) -> list[str]:
    out = []
    if "images" not in store.h5:
        return out

    def visit(name, obj):
        if name.endswith("/pixels"):
            out.append(name.rsplit("/", 2)[0])
    store.h5["images"].visititems(visit)
    return sorted(set(out))


def serve(path: Path | str, images: str = "unsafe", variants: Sequence[str] | None = None,
          host: str = "127.0.0.1", port: int = 0, seed: int = 0) -> AnnotationServer:
    """Open the store at `path` for writing and return a server for its `images` sets.

    Call .start() (background) or .serve_forever(); .shutdown() closes the store.
    """
    from store import Store

    path = Path(path)
    if not path.is_file():
        raise FadelabError(f"store {path} does not exist")
    st = Store.open(path, "a")
    try:
        sets = image_sets(st, images, variants)
        if not sets:
            raise FadelabError(f"store {path} has no image set named {images!r}"
                               + (f" for variants {list(variants)}" if variants else ""))
        return AnnotationServer(st, sets, host, port, seed, close_store=True)
    except BaseException:
        st.close()
        raise
