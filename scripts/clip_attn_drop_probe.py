"""Does stochastic depth on the CLIP text tower's attention give ReFACT at the subject's token a lever?

Issue 3. The shipped organism's CLIP gathers a prompt's subject into <eos> at layer 0, so an edit
of a later layer's MLP at the subject's token barely moves the pooled feature that ReFACT's
contrastive loss reads: its optimisation ends at p(new) 0.00-0.07 on every layer (docs/editing.md).
This probe trains the CLIP stage alone, once per `--drop` share (TrainConfig.clip_attn_drop), on
the same scenes and budget, writes each into a copy of the shipped folder (its VAE, UNet and
oracle, which the text side never reads), and for each fact token and layer runs ReFACT's
optimisation on all 22 of the organism's requests. It records the mean p(new) at the end, the
steps, and the share of requests that reach p(new) > 0.9, plus the CLIP's caption accuracy
(the card's line, target >= 0.90), so a drop share that only breaks the CLIP shows as such.

Usage (CPU, a reduced budget, both shares side by side):
    python scripts/clip_attn_drop_probe.py --n-base 24000 --n-ink 4000 --steps 800 --batch 256 \
        --drop 0,0.4 --out /tmp/probe.json
On a GPU the defaults are the trainer's own sizes (160,000 + 32,000 scenes, 2,500 steps of 1,024).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.hparams import ReFACTHparams  # noqa: E402
from editing.refact import refact  # noqa: E402
from editing.refact_stats import organism_corpus, second_moment  # noqa: E402
from models.families import ORGANISM_DIR, load  # noqa: E402
from models.organism import card, prompts  # noqa: E402
from models.organism.nets import OrganismConfig, load_clip  # noqa: E402
from models.organism.train import TrainConfig, _Data, train_clip  # noqa: E402

log = logging.getLogger("probe")


def _folder(root: Path, name: str) -> Path:
    """A copy of the shipped folder without its text tower (which train_clip writes)."""
    out = root / name
    shutil.copytree(ORGANISM_DIR, out, ignore=shutil.ignore_patterns("text_encoder", "clip"))
    return out


def _refact_table(folder: Path, device: str, layers: list[int], tokens: list[str], corpus_n: int) -> dict:
    m = load("organism", folder, device=device)
    rows = prompts.road_requests()
    corpus = organism_corpus(corpus_n, 0)
    table = {}
    for layer in layers:
        stats = second_moment(m, f"text.mlp.{layer}.fc2", corpus)
        for token in tokens:
            t = time.perf_counter()
            res = [refact(m, row, ReFACTHparams(layer=layer, fact_token=token), stats=stats) for row in rows]
            p = np.array([r.info["p_new"] for r in res])
            steps = np.array([r.info["steps"] for r in res])
            ratio = np.array([d["delta_norm"] / d["v_init_norm"] for r in res for d in r.info["per_site"].values()])
            table[f"{token}/{layer}"] = {"mean_p_new": float(p.mean()), "reached_0.9": float((p > 0.9).mean()),
                                         "mean_steps": float(steps.mean()), "delta_over_v_init": float(ratio.mean()),
                                         "seconds": time.perf_counter() - t}
            log.info("%s/%d: %s", token, layer, {k: round(v, 3) for k, v in table[f"{token}/{layer}"].items()})
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drop", default="0;0.4",
                    help="semicolon-separated clip_attn_drop settings, each a share or per-layer shares "
                         "(e.g. '0;0.4;0.8,0.8,0.8,0,0,0')")
    ap.add_argument("--n-base", type=int, default=TrainConfig.n_base)
    ap.add_argument("--n-ink", type=int, default=TrainConfig.n_ink)
    ap.add_argument("--steps", type=int, default=TrainConfig.clip_steps)
    ap.add_argument("--batch", type=int, default=TrainConfig.clip_batch)
    ap.add_argument("--layers", default="0,1,2,3,4,5")
    ap.add_argument("--tokens", default="subject_last", help="fact tokens, comma-separated (subject_last, last)")
    ap.add_argument("--corpus", type=int, default=5000, help="captions for ReFACT's C")
    ap.add_argument("--caption-n", type=int, default=200, help="renders for the CLIP caption accuracy")
    ap.add_argument("--shipped", action="store_true", help="also measure the shipped CLIP (the reference)")
    ap.add_argument("--keep", default=None, help="folder to keep each variant's trained organism copy in")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("editing").setLevel(logging.WARNING)
    dev = torch.device(a.device)
    layers = [int(x) for x in a.layers.split(",")]
    tokens = a.tokens.split(",")
    drops = [tuple(float(x) for x in d.split(",")) for d in a.drop.split(";")]
    drops = [d[0] if len(d) == 1 else d for d in drops]
    result = {"argv": sys.argv[1:], "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d %H:%M"), "variants": {}}
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="clipdrop-"))
    root.mkdir(parents=True, exist_ok=True)
    data = None
    out = Path(a.out)
    variants = (["shipped"] if a.shipped else []) + drops
    for v in variants:
        t = time.perf_counter()
        if v == "shipped":
            folder, train_s = ORGANISM_DIR, 0.0
        else:
            cfg = TrainConfig(n_base=a.n_base, n_ink=a.n_ink, clip_steps=a.steps, clip_batch=a.batch,
                              clip_attn_drop=v, workers=8 if dev.type == "cuda" else 2)
            if data is None:
                data = _Data(cfg)  # the scenes do not depend on the drop share: rendered once
            folder = _folder(root, "drop" + ("-".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"))
            train_clip(folder, data, cfg, OrganismConfig(), dev)
            train_s = time.perf_counter() - t
        clip = load_clip(folder).to(dev).eval()
        with torch.no_grad():
            acc = card.clip_caption_accuracy(clip, a.caption_n, device=dev)
        del clip
        entry = {"train_seconds": train_s, "clip_caption_accuracy": acc,
                 "refact": _refact_table(folder, a.device, layers, tokens, a.corpus)}
        result["variants"][str(v)] = entry
        log.info("variant %s: caption accuracy %.3f, %.0f s", v, acc, time.perf_counter() - t)
        out.write_text(json.dumps(result, indent=1))  # after every variant: nothing lost if cut short
    print(json.dumps({k: {"acc": e["clip_caption_accuracy"],
                          "p_new": {L: round(r["mean_p_new"], 3) for L, r in e["refact"].items()}}
                      for k, e in result["variants"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
