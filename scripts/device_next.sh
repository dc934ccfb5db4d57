#!/usr/bin/env bash
# The GPU work still owed after session 5 (2026-11-28), as three calls of under 10 minutes on a
# 2-GPU machine (kind nvidia-h100-x2), chained while it is warm (idle release 30 s): GPU 0 retrains
# the organism with looks and noisy pads and measures fine-tuning on it
# (scripts/device_organism_retrain.sh A, B, C; issues 11 and 3), GPU 1 takes the rest. Carry .whl and .bench-data (a copy of ../shared/data:
#   rm -rf .bench-data && cp -r ../shared/data .bench-data   -- ignored by .gitignore).
#
#   1: GPU 0 retrain A (vae, clip, oracle) | GPU 1 issue 8: SDXL/FLUX edit + recording pass, then
#      fastgen's default against full+vae-1x1mm in one run
#   2: GPU 0 retrain B (unet, card)        | GPU 1 issue 8: probe rows (hooks); issue 7: sd14.toml
#                                            --smoke at full size on random weights
#   3: the retrained organism swapped in (device copy only), then GPU 0 retrain C (every fine-tuning
#      method on it) | GPU 1 the ReFACT layer x fact-token sweep on it (issue 3)
#   4 (if time is left): issue 7, sdxl.toml and flux-schnell.toml --smoke, one per GPU
#   5 (if time is left): issue 10, the 9-cell experiments/throughput.toml on one GPU and on one GPU
#      with 3 processes side by side, then on two GPUs (--jobs 2)
#
# Logs go to $OUT/<name>.log, results to $OUT/<name>/, all packed into $OUT/results.tgz (a call
# brings back only 8 files); the retrained organism comes back as $OUT/v2/organism-v2.tgz.NN.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false FADELAB_BENCHMARKS=$PWD/.bench-data
nvidia-smi -L; date -u
mkdir -p "$OUT/v2"
t() {  # t NAME SECONDS cmd...: run with a time limit, log to $OUT/NAME.log, one line to $OUT/lanes.txt
  local name=$1 lim=$2; shift 2; local s; s=$(date +%s)
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "[$name] rc=$rc wall=$(( $(date +%s) - s ))s" | tee -a "$OUT/lanes.txt"
}
v2() { CUDA_VISIBLE_DEVICES=0 OUT="$OUT/v2" bash scripts/device_organism_retrain.sh "$1" > "$OUT/v2-$1.log" 2>&1; }
smoke() {  # smoke FAMILY SECONDS: the family's grid at full size on random weights
  [ -f .bench-data/RoAD_test.csv ] || { echo "[smoke-$1] skipped: carry .bench-data" | tee -a "$OUT/lanes.txt"; return; }
  t "smoke-$1" "$2" python3 -m fadelab.cli run "experiments/$1.toml" --smoke --device cuda --quiet \
      --out "fadelab-out/smoke-$1"
  python3 -m fadelab.cli status "experiments/$1.toml" --smoke --out "fadelab-out/smoke-$1" > "$OUT/smoke-$1-status.txt" 2>&1
}
case "${1:-}" in
1) v2 A &
   ( export CUDA_VISIBLE_DEVICES=1
     t fam-edit-record 260 python3 scripts/device_bench.py --parts fam-edit-record --out "$OUT/famedit" --budget-s 240
     t gen-options 280 python3 scripts/device_bench.py --parts gen-options --options full+vae,full+vae-1x1mm \
         --out "$OUT/genopt" --budget-s 260 ) &
   wait ;;
2) v2 B &
   ( export CUDA_VISIBLE_DEVICES=1
     t hooks 250 python3 scripts/device_bench.py --parts hooks --out "$OUT/hooks" --budget-s 230
     smoke sd14 290 ) &
   wait ;;
3) v2 swap
   v2 C &
   ( CUDA_VISIBLE_DEVICES=1 t refact-sweep 520 python3 scripts/device_editing.py --out "$OUT/edit" \
       --parts sweep --sweep-n 10 ) &
   wait ;;
4) ( CUDA_VISIBLE_DEVICES=0 smoke sdxl 280 ) &
   ( CUDA_VISIBLE_DEVICES=1 smoke flux-schnell 280 ) &
   wait ;;
5) t grid-1gpu 200 env CUDA_VISIBLE_DEVICES=0 python3 -m fadelab.cli run experiments/throughput.toml \
       --device cuda --out fadelab-out/grid1 --no-report &
   t grid-1gpu-3proc 200 env CUDA_VISIBLE_DEVICES=1 python3 -m fadelab.cli run experiments/throughput.toml \
       --device cuda --jobs 3 --out fadelab-out/grid1x3 --no-report &
   wait
   t grid-2gpu 200 python3 -m fadelab.cli run experiments/throughput.toml --device cuda --jobs 2 \
       --out fadelab-out/grid2 --no-report
   for d in grid1 grid1x3 grid2; do
     python3 -m fadelab.cli status experiments/throughput.toml --out "fadelab-out/$d" > "$OUT/$d-status.txt" 2>&1
   done ;;
*) echo "usage: $0 1|2|3|4|5" >&2; exit 2 ;;
esac
date -u; cat "$OUT/lanes.txt" "$OUT/v2/lanes.txt" 2>/dev/null
tar -czf /tmp/results.tgz -C "$OUT" --exclude='*.h5' --exclude='organism-v2.tgz.*' . && mv /tmp/results.tgz "$OUT/results.tgz"
