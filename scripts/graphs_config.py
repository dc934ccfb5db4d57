"""Print an experiment TOML with `cuda_graphs = true` in every [[finetune]]'s hparams.

    python3 scripts/graphs_config.py experiments/organism.toml > experiments/organism-graphs.toml

For scripts/device_next.sh 5 with GRAPHS=1: the main job with the fine-tunes' CUDA graphs on
(TrainHParams.cuda_graphs), everything else as the shipped config. Works on the text, so the
config's comments and order stay; checks the result with tomllib.
"""

from __future__ import annotations

import sys
import tomllib


def with_graphs(text: str) -> str:
    out: list[str] = []
    in_ft = has_hp = False

    def close() -> None:
        if in_ft and not has_hp:  # a fine-tune without its own hparams table gets one
            while out and not out[-1].strip():
                out.pop()
            out.extend(["[finetune.hparams]", "cuda_graphs = true", ""])

    for line in text.splitlines():
        head = line.strip()
        if head.startswith("["):
            if head == "[finetune.hparams]":
                out.append(line)
                out.append("cuda_graphs = true")
                has_hp = True
                continue
            close()
            in_ft, has_hp = head == "[[finetune]]", False
        out.append(line)
    close()
    new = "\n".join(out) + "\n"
    fts = tomllib.loads(new).get("finetune", [])
    if not fts or not all(f.get("hparams", {}).get("cuda_graphs") is True for f in fts):
        raise SystemExit("graphs_config: a fine-tune was left without cuda_graphs = true")
    return new


if __name__ == "__main__":
    sys.stdout.write(with_graphs(open(sys.argv[1]).read()))
