#!/usr/bin/env bash
# Issue 11 (and 4): an organism retrained with looks (fadelab organism train --p-look 0.5: generic
# dogs, cats, cups and robots in named colours and patterns, every combination but the DreamBooth
# subjects' own), then textual inversion, DreamBooth and the style fine-tunes measured on it at
# n = 200 against the same measurements on the shipped organism. Three calls on one GPU (kind
# nvidia-h200 or nvidia-h100-x1), each under 10 minutes, chained while the machine is warm (its
# ignored .organism-looks/ survives between calls; the idle release is 30 s). Carry .whl.
#
#   bash scripts/device_organism_looks.sh A   stages vae, clip, oracle (about 5.5 min on an H200)
#   bash scripts/device_organism_looks.sh B   stages unet (6 min of wall time) and card
#   bash scripts/device_organism_looks.sh C   the fine-tuning acceptance on the retrained organism
#                                             (weights swapped in on the device only)
#
# Each call packs .organism-looks/ into $OUT/looks.tgz.00, .01, ... (15 MiB pieces: a call brings
# back at most 8 files of 16 MiB) and logs into $OUT/results.tgz. Here:
#   cat looks.tgz.* | tar -xz -C /tmp    gives /tmp/.organism-looks, a pipeline folder
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L; date -u
W=.organism-looks
t() {  # t NAME SECONDS cmd...: run with a time limit, log to $OUT/NAME.log, one line to $OUT/lanes.txt
  local name=$1 lim=$2; shift 2; local s; s=$(date +%s)
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "[$name] rc=$rc wall=$(( $(date +%s) - s ))s" | tee -a "$OUT/lanes.txt"
}
case "${1:-}" in
A) t train-A 540 python3 -m fadelab.cli organism train --p-look 0.5 --out "$W" --stages vae,clip,oracle \
       --workers 14 --device cuda ;;
B) t train-B 540 python3 -m fadelab.cli organism train --p-look 0.5 --out "$W" --stages unet,card \
       --unet-minutes 6 --workers 14 --device cuda
   cp "$W/card.json" "$W/organism.json" "$OUT/" 2>/dev/null ;;
C) [ -f "$W/card.json" ] || { echo "no trained $W here: run A and B first (or untar it and carry it)" >&2; exit 2; }
   cp -r models/organism/weights /tmp/shipped && rm -rf models/organism/weights && cp -r "$W" models/organism/weights
   t ft-looks 520 python3 scripts/device_finetuning.py --out "$OUT/ft" --parts organism --n 200 ;;
*) echo "usage: $0 A|B|C" >&2; exit 2 ;;
esac
[ -d "$W" ] && tar -czf - "$W" | split -b 15M -d - "$OUT/looks.tgz."
date -u; cat "$OUT/lanes.txt"
tar -czf /tmp/results.tgz -C "$OUT" --exclude='looks.tgz.*' . && mv /tmp/results.tgz "$OUT/results.tgz"
