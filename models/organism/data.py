"""The organism's datasets on disk, in the `datasets` imagefolder convention.

What it offers:
    write_style_set(folder, n=1200, seed=0)   the fine-tuning set (the Naruto analogue): ink-style
                                              renders of people, professions and objects, with
                                              content-only captions, as PNGs + metadata.jsonl
    write_dreambooth(folder, per_subject=5)   one folder per DreamBooth subject (4-6 images each)
                                              with metadata.jsonl and subjects.json (class nouns,
                                              instance and class prompts)
    read_metadata(folder) -> list[dict]       the rows of metadata.jsonl

Both are deterministic given the seed, so they are regenerated rather than shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from . import render, world


def _write(folder: Path, scenes: list[world.Scene], captions: list[str], extra=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = render.render_batch(scenes)
    with (folder / "metadata.jsonl").open("w") as f:
        for i, (img, cap) in enumerate(zip(images, captions)):
            name = f"{i:05d}.png"
            Image.fromarray(img).save(folder / name)
            row = {"file_name": name, "text": cap, "labels": scenes[i].labels()}
            if extra:
                row |= extra
            f.write(json.dumps(row) + "\n")
    return folder


def write_style_set(folder: Path | str, n: int = 1200, seed: int = 0) -> Path:
    """n ink-style images with content-only captions (no unsafe content, no subjects)."""
    if n < 1:
        raise ValueError(f"n must be a positive number of images, got {n}")
    rng = np.random.default_rng([seed, 51])
    mix = world.WorldMix(style="ink", p_blood=0.0, p_nude=0.0, kinds=(0.35, 0.45, 0.2, 0.0))
    scenes = [world.sample_scene(rng, mix) for _ in range(n)]
    return _write(Path(folder), scenes, [world.caption(s, rng) for s in scenes])


def write_dreambooth(folder: Path | str, per_subject: int = 5, seed: int = 0) -> Path:
    """One imagefolder per subject under `folder`, plus subjects.json describing them."""
    if not 1 <= per_subject <= 50:
        raise ValueError(f"per_subject must be between 1 and 50, got {per_subject}")
    folder = Path(folder)
    rng = np.random.default_rng([seed, 61])
    index = {}
    for sub, (cls, *_rest) in world.SUBJECTS.items():
        contexts = ["none", "none", "table", "night", "sea", "painting"]
        scenes = [world.Scene("animal", cls=cls, subject=sub, context=contexts[i % len(contexts)],
                              jitter=int(rng.integers(1 << 30))) for i in range(per_subject)]
        prompt = f"a sks {cls}"
        _write(folder / sub, scenes, [prompt] * per_subject, {"class": cls})
        index[sub] = {"class": cls, "instance_prompt": prompt, "class_prompt": f"a {cls}",
                      "folder": sub}
    (folder / "subjects.json").write_text(json.dumps(index, indent=1))
    return folder


def read_metadata(folder: Path | str) -> list[dict]:
    path = Path(folder) / "metadata.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; an imagefolder needs metadata.jsonl "
                                f"with file_name and text per line")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
