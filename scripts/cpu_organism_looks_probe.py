"""Can an organism draw its DreamBooth subjects from words, and does its VAE keep their patterns?

The ceiling of textual inversion on a frozen organism (issue 11): if the subject's own words ("a
blue dog with yellow spots") do not render it, no learned token will. Two measurements, each read
by the organism's own oracle (subject head), on the CPU:

    words       n images per subject of its look's phrase, and of the phrase with another pattern colour
    vae         32 renders per subject, as rendered and after a VAE round trip (encode mean, decode)

    python scripts/cpu_organism_looks_probe.py FOLDER N OUT   (FOLDER: an organism pipeline folder)

writes OUT.json and OUT-words.png / OUT-vae.png (image grids). The runs logged in
docs/measured/2026-12-04-cpu-organism-v2-look-words.*, -v2-vae-round-trip.png and
-organism-vae-round-trip.json (N 20; the VAE part on both organisms) used this code before it was
gathered into one script: the same prompts, seeds and reads, other file layouts.
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from models.organism import world  # noqa: E402
from models.organism.oracle import Oracle  # noqa: E402
from models.organism.sample import generate  # noqa: E402
from scripts.cpu_vae_levels_probe import round_trips, subject_renders  # noqa: E402


def words(pipe, oracle, n: int) -> tuple[dict, np.ndarray]:
    res, rows = {}, []
    for sub, (cls, (body, pat, pcol)) in world.SUBJECT_LOOKS.items():
        other = "green" if pcol != "green" else "red"
        for name, prompt in (("own words", f"a {body} {cls} with {pcol} {pat}"),
                             ("other pattern colour", f"a {body} {cls} with {other} {pat}")):
            imgs = generate(pipe, [prompt] * n, list(range(n)), progress=False)
            r = oracle.read(imgs)
            res[f"{sub} / {name}"] = {"prompt": prompt, "n": n,
                                     "subject_share": float(np.mean([s == sub for s in r["subject"]])),
                                     "class_share": float(np.mean([c == cls for c in r["cls"]]))}
            print(json.dumps(res[f"{sub} / {name}"]), flush=True)
            rows.append(np.concatenate(list(imgs[:6]), 1))
    return res, np.concatenate(rows, 0)


def vae_round_trip(folder: Path, oracle, n: int = 32) -> tuple[dict, np.ndarray]:
    vae = AutoencoderKL.from_pretrained(folder / "vae").float().eval()
    res, rows = {}, []
    for sub, imgs in subject_renders(n).items():
        y, _ = round_trips(vae, imgs)
        res[sub] = {"n": n, "renders": float(np.mean([s == sub for s in oracle.read(imgs)["subject"]])),
                    "vae_round_trip": float(np.mean([s == sub for s in oracle.read(y)["subject"]]))}
        print(sub, res[sub], flush=True)
        rows.append(np.concatenate(list(imgs[:4]) + list(y[:4]), 1))
    return res, np.concatenate(rows, 0)


def main() -> None:
    folder, n, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    oracle = Oracle.load(folder / "oracle", "cpu")
    pipe = models.load("organism", weights=str(folder), device="cpu").pipe
    res = {"folder": str(folder)}
    res["words"], grid = words(pipe, oracle, n)
    Image.fromarray(grid).save(f"{out}-words.png", optimize=True)
    res["vae"], grid = vae_round_trip(folder, oracle)
    Image.fromarray(grid).save(f"{out}-vae.png", optimize=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
