#!/usr/bin/env bash
# The GPU measurements still open after session 4 (2026-11-28), as two device calls on a 2-GPU
# machine (kind nvidia-h100-x2), each under 10 minutes. Carry .whl (../shared/tools/device-wheels).
#
#   bash scripts/device_remaining.sh 1    issue 8: SDXL/FLUX edit + recording pass; fastgen default vs
#                                         full+vae-1x1mm in one run; issues 4/11: every fine-tuning method
#                                         on the organism at its current defaults (n = 200)
#   bash scripts/device_remaining.sh 2    issue 8: probe rows (hooks); issue 10: the 9-cell
#                                         experiments/throughput.toml on one GPU, then on two (--jobs 2)
#
# Logs go to $OUT/<name>.log and results to $OUT/<name>/; everything is also packed into
# $OUT/results.tgz, since a call brings back only a few files.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L; date -u
t() {  # t NAME SECONDS cmd...: run with a time limit, log to $OUT/NAME.log, one line to $OUT/lanes.txt
  local name=$1 lim=$2; shift 2; local s; s=$(date +%s)
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "[$name] rc=$rc wall=$(( $(date +%s) - s ))s" | tee -a "$OUT/lanes.txt"
}
case "${1:-}" in
1)
  ( export CUDA_VISIBLE_DEVICES=0
    t fam-edit-record 260 python3 scripts/device_bench.py --parts fam-edit-record --out "$OUT/famedit" --budget-s 240
    t gen-options 280 python3 scripts/device_bench.py --parts gen-options --options full+vae,full+vae-1x1mm \
        --out "$OUT/genopt" --budget-s 260 ) &
  ( export CUDA_VISIBLE_DEVICES=1  # every method at the organism defaults, n = 200 (issues 4, 11)
    t ft-organism 540 python3 scripts/device_finetuning.py --out "$OUT/ft" --parts organism --n 200 ) &
  wait ;;
2)
  ( CUDA_VISIBLE_DEVICES=1 t hooks 250 python3 scripts/device_bench.py --parts hooks --out "$OUT/hooks" \
      --budget-s 230 ) &
  t grid-1gpu 280 env CUDA_VISIBLE_DEVICES=0 python3 -m fadelab.cli run experiments/throughput.toml \
      --device cuda --out fadelab-out/grid1 --no-report
  wait
  t grid-2gpu 280 python3 -m fadelab.cli run experiments/throughput.toml --device cuda --jobs 2 \
      --out fadelab-out/grid2 --no-report
  for d in grid1 grid2; do ls -la --time-style=+%T "fadelab-out/$d/cells" > "$OUT/$d-cells.txt" 2>&1; done ;;
*) echo "usage: $0 1|2" >&2; exit 2 ;;
esac
date -u; cat "$OUT/lanes.txt"
tar -czf /tmp/results.tgz -C "$OUT" --exclude='*.h5' . && mv /tmp/results.tgz "$OUT/results.tgz"
