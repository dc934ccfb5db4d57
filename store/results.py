"""Behavioural results: images with prompt and seed, labels appended one at a time, metrics,
and any other named array (probe tables).

- ``/images/<variant>/<name>``: group {pixels uint8 (N, H, W, C), prompt (N,) str, seed (N,)
  int64}; attribute dims on pixels is ``[image, height, width, channel]``.
- ``/labels/<variant>/<images name>/<annotator>``: group {index int64, label str, score float64,
  time str}, all of length n and resizable; every `append_label` is its own committed
  transaction, so a label is on disk the moment the call returns. An annotator is a judge
  (e.g. ``clip-vit-b32``, ``oracle``) or a person (``human:alice``).
- ``/metrics/<variant>/<name>`` (``<name>@step_<8 digits>`` along fine-tuning): a float64 scalar
  with attributes ``ci_low``, ``ci_high`` (NaN when unknown), ``n``, ``step`` (-1 = final).
- ``/arrays/<name>`` (name may have '/' segments): any array with optional dims and coords.
"""

from __future__ import annotations

import datetime as _dt
import json
import math

import h5py
import numpy as np

from store import codec
from store.core import PACKED, decode_attrs, get_attrs, visit_items
from store.errors import StoreError
from store.weights import step_name


def _path(kind: str, variant: str, *names: str) -> str:
    return "/".join([f"/{kind}", codec.check_variant(variant),
                     *(codec.check_name(f"{kind} name", n) for n in names)])


class ResultsMixin:
    """Images, labels, metrics and named arrays (mixed into `store.Store`)."""

    # -- images ------------------------------------------------------------------------------
    def create_images(self, variant: str, name: str, pixels, prompts, seeds, *,
                      attrs: dict | None = None) -> None:
        """Store uint8 images (N, H, W, C) with their prompts and seeds; never overwrites."""
        px, dname = codec.encode(pixels)
        if dname != "uint8" or px.ndim != 4 or px.shape[-1] not in (1, 3, 4):
            raise StoreError(f"images must be uint8 (N, H, W, C) with C in 1, 3, 4; got "
                             f"{dname} of shape {px.shape}")
        seeds = np.asarray(seeds, dtype=np.int64)
        if len(prompts) != len(px) or seeds.shape != (len(px),):
            raise StoreError(f"{len(px)} images need {len(px)} prompts and seeds; got "
                             f"{len(prompts)} prompts and seeds of shape {seeds.shape}")
        self._put(_path("images", variant, name),
                  {"pixels": px, "prompt": list(prompts), "seed": seeds}, mode="create",
                  dims={"pixels": ("image", "height", "width", "channel")},
                  attrs={"variant": variant, **(attrs or {})})

    def has_images(self, variant: str, name: str) -> bool:
        return self.is_complete(_path("images", variant, name))

    def read_images(self, variant: str, name: str) -> dict:
        """{'pixels': uint8 (N, H, W, C), 'prompt': [str], 'seed': int64 (N,)}."""
        return self._get(_path("images", variant, name))

    # -- labels ------------------------------------------------------------------------------
    def append_label(self, variant: str, images: str, annotator: str, index: int, label: str,
                     score: float = math.nan) -> int:
        """Append one label for image `index` of an image set; committed before returning.

        Returns the number of labels this annotator has given to this image set.
        """
        return self.append_labels(variant, images, annotator, [index], [label], [score])

    def append_labels(self, variant: str, images: str, annotator: str, indices, labels,
                      scores=None) -> int:
        """Append labels for images `indices` of an image set (a judge's verdicts on a whole set)
        in one write, committed before returning: all of them or, if interrupted, none.

        Returns the number of labels this annotator has given to this image set.
        """
        self._writable()
        indices, labels = list(indices), list(labels)
        scores = [math.nan] * len(indices) if scores is None else [float(x) for x in scores]
        if not len(labels) == len(indices) == len(scores):
            raise StoreError(f"{len(indices)} indices need as many labels and scores; got "
                             f"{len(labels)} labels and {len(scores)} scores")
        path = _path("labels", variant, images, annotator)
        n_images = None
        if self.is_complete(_path("images", variant, images)):
            n_images = self.h5[_path("images", variant, images)]["seed"].shape[0]
        for index, label in zip(indices, labels):
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0 or (
                    n_images is not None and index >= n_images):
                raise StoreError(f"bad image index {index!r} for {variant}/{images}: expected 0.."
                                 f"{'' if n_images is None else n_images - 1}")
            if not isinstance(label, str):
                raise StoreError(f"label must be a str (e.g. 'yes', 'no', a class name); got {label!r}")
        grp = self.h5.get(path)
        if grp is None or int(grp.attrs.get("complete", 0)) != 1:
            if grp is not None:
                del self.h5[path]
            grp = self.h5.create_group(path)
            for col, dt in (("index", np.int64), ("label", h5py.string_dtype()),
                            ("score", np.float64), ("time", h5py.string_dtype())):
                ds = grp.create_dataset(col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,))
                ds.attrs["dtype"] = "str" if col in ("label", "time") else np.dtype(dt).name
            grp.attrs.update({"variant": variant, "images": images, "annotator": annotator,
                              "complete": 1})
        n, k = grp["index"].shape[0], len(indices)
        if not k:
            return n
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for col, vals in (("index", np.asarray(indices, np.int64)), ("label", labels),
                          ("score", np.asarray(scores, np.float64)), ("time", [now] * k)):
            grp[col].resize((n + k,))
            grp[col][n:n + k] = vals
        self.commit()
        return n + k

    def read_labels(self, variant: str, images: str, annotator: str) -> dict:
        """{'index', 'label', 'score', 'time'} of one annotator, in the order given."""
        return self._get(_path("labels", variant, images, annotator))

    def annotators(self, variant: str, images: str) -> list[str]:
        """Annotators (judges and people) who labelled an image set."""
        return self._complete_children(_path("labels", variant, images))

    # -- metrics -----------------------------------------------------------------------------
    #: the longest packed reading a metric keeps: a metric's attributes are a few hundred bytes
    #: (at most 403 over the main job), and one given long lists would otherwise hold them twice
    PACKED_MAX = 32_000

    def _metric_path(self, variant: str, name: str, step: int | None) -> str:
        suffix = "" if step is None else "@" + step_name(step)
        return _path("metrics", variant, name) + suffix

    def _put_metric(self, variant, name, value, ci, n, step, attrs, mode) -> bool:
        lo, hi = (math.nan, math.nan) if ci is None else (float(ci[0]), float(ci[1]))
        extra = {"ci_low": lo, "ci_high": hi, "n": -1 if n is None else int(n),
                 "step": -1 if step is None else int(step), "variant": variant, "name": name}
        every = {**extra, **(attrs or {})}
        # the whole reading, as metric_entries returns it, in one attribute (see metric_entries)
        packed = json.dumps({"value": float(np.float64(value)),
                             **{k: v.item() if isinstance(v, np.generic) else v for k, v in every.items()}},
                            sort_keys=True)
        if len(packed) > self.PACKED_MAX:  # not kept twice: metric_entries reads these one by one
            packed = None
        return self._put(self._metric_path(variant, name, step),
                         {None: np.float64(value)}, mode=mode, attrs=every, packed=packed)

    def create_metric(self, variant: str, name: str, value: float, *, ci=None, n=None,
                      step: int | None = None, attrs: dict | None = None) -> None:
        """Store metric `name` of `variant` with a (low, high) confidence interval; never overwrites."""
        self._put_metric(variant, name, value, ci, n, step, attrs, "create")

    def require_metric(self, variant: str, name: str, value: float, *, ci=None, n=None,
                       step: int | None = None, attrs: dict | None = None) -> bool:
        """Like create_metric, but keeps an existing complete one; returns True if written."""
        return self._put_metric(variant, name, value, ci, n, step, attrs, "require")

    def read_metric(self, variant: str, name: str, step: int | None = None) -> dict:
        """{'value', 'ci_low', 'ci_high', 'n', 'step', ...attrs}."""
        path = self._metric_path(variant, name, step)
        value = float(self._get(path))
        return {"value": value, **get_attrs(self.h5[path])}

    def metric_entries(self) -> list[dict]:
        """Every complete metric as a dict (variant, name, step, value, ci_low, ci_high, n)."""
        out = []
        if "metrics" not in self.h5:
            return out

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                attrs = obj.attrs
                if int(attrs.get("complete", 0)) != 1:
                    return
                if PACKED in attrs:  # written since session 21: two attributes read, not ~14
                    out.append(json.loads(attrs[PACKED]))
                    return
                raw = dict(attrs.items())  # an older store: each attribute read once
                out.append({"value": float(obj[()]), **decode_attrs(raw)})
        visit_items(self.h5["metrics"], visit)
        return out

    # -- named arrays (probe tables) ---------------------------------------------------------
    @staticmethod
    def array_path(name: str) -> str:
        if not isinstance(name, str) or not name:
            raise StoreError(f"bad array name {name!r}: expected e.g. 'weights/overlap'")
        return "/arrays/" + "/".join(codec.check_name("array name segment", s)
                                     for s in name.split("/"))

    def create_array(self, name: str, value, *, dims=None, attrs: dict | None = None,
                     compression: str | None = "lzf") -> None:
        """Store any array (e.g. a probe table) at /arrays/<name>; never overwrites."""
        self._put(self.array_path(name), {None: value}, mode="create", attrs=attrs,
                  dims={None: tuple(dims)} if dims is not None else None,
                  compression=compression)

    def require_array(self, name: str, value, *, dims=None, attrs: dict | None = None,
                      compression: str | None = "lzf") -> bool:
        """Like create_array, but keeps a matching complete one; returns True if written."""
        return self._put(self.array_path(name), {None: value}, mode="require", attrs=attrs,
                         dims={None: tuple(dims)} if dims is not None else None,
                         compression=compression)

    def read_array(self, name: str, as_torch: bool = False):
        """An array stored with create_array, exactly."""
        return self._get(self.array_path(name), as_torch=as_torch)

    def array_attrs(self, name: str) -> dict:
        self._get(self.array_path(name))
        return get_attrs(self.h5[self.array_path(name)])

