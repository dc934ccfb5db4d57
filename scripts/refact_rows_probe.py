"""Where does a ReFACT edit at the subject's token land in the text encoder's output rows?

Issue 3 (docs/organism.md, v4). For each of the organism's 22 requests: ReFACT at the subject's
last token of layer LAYER, then the share of the way each output row of the request's prompt moved
from its unedited value towards the new prompt's row (1 = reached it, 0 = unmoved, < 0 = away):
the subject's row, <eos>, and the padding rows taken together (position by position, so only a
rough reading where the two prompts differ in length). Each is then ranked against the per-request
oracle efficacy that scripts/device_editing.py measured on the same folder.

    python scripts/refact_rows_probe.py FOLDER LAYER EDITING_JSON OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.hparams import ReFACTHparams  # noqa: E402
from editing.refact import lookup_index, refact  # noqa: E402
from editing.refact_stats import organism_corpus, second_moment  # noqa: E402
from models.delta import apply_delta  # noqa: E402
from models.families import load  # noqa: E402
from models.organism import prompts  # noqa: E402


def moved(edited, before, target) -> float:
    """The share of the way from `before` to `target` that `edited` went (1: all of it)."""
    return float(1 - (edited - target).norm() / (before - target).norm())


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__)
        return 2
    folder, layer, editing_json, out_json = argv[0], int(argv[1]), argv[2], argv[3]
    m = load("organism", folder)
    enc, tok = m.text_encoders[0], m.tokenizers[0]
    stats = second_moment(m, f"text.mlp.{layer}.fc2", organism_corpus(5000, 0))
    eff = {r["prompt"]: r["efficacy"] for r in json.loads(Path(editing_json).read_text())["refact"]["per_request"]}

    def hidden(texts):
        ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return enc(input_ids=ids).last_hidden_state, ids

    out = []
    for row in prompts.road_requests():
        r = refact(m, row, ReFACTHparams(layer=layer, fact_token="subject_last"), stats=stats)
        p, new = row["Prompt"], row["New"]
        h0, ids = hidden([p, new])
        with apply_delta(m, r.delta):
            h1, _ = hidden([p])
        eos_p = int((ids[0] == tok.eos_token_id).nonzero()[0])
        eos_n = int((ids[1] == tok.eos_token_id).nonzero()[0])
        sub = lookup_index(tok, p, p, "subject_last")
        rec = {"prompt": p, "new": new, "p_new": r.info["p_new"], "efficacy": eff.get(p),
               "subject_row": moved(h1[0, sub], h0[0, sub], h0[1, eos_n - 1]),
               "eos_row": moved(h1[0, eos_p], h0[0, eos_p], h0[1, eos_n]),
               "pads": moved(h1[0, eos_p + 1:], h0[0, eos_p + 1:], h0[1, eos_p + 1:])}
        out.append(rec)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
    e = [o["efficacy"] for o in out]
    ranks = {k: spearmanr([o[k] for o in out], e) for k in ("p_new", "subject_row", "eos_row", "pads")}
    for k, res in ranks.items():
        print(f"{k}: Spearman rho with efficacy {res.statistic:.2f} (p {res.pvalue:.4f})")
    Path(out_json).write_text(json.dumps({"folder": folder, "layer": layer, "requests": out,
                                          "spearman": {k: [float(r.statistic), float(r.pvalue)]
                                                       for k, r in ranks.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
