#!/usr/bin/env bash
# The lab's GPU work as calls of under 10 minutes, the done ones kept for reruns. Owed after
# session 22 (2026-12-08; its device time went to the organism's v4 retrain and call 11), in
# this order: `OLD=oldcode bash scripts/device_next.sh 5 300 60` with oldcode/ made from c41d203
# as for call 7 (session 21's run of it ran this tree in its baseline lane, since fixed: the main
# job's merge and report against c41d203's on the same cells, and the parents' start-up line),
# then 11 again for its GPU tests (session 22: 2 passed, the AccumulateGrad check among them;
# test_compiled_generation_follows_deltas_in_place failed in its own setup, fixed, not rerun),
# then 12 twice on one warm machine, then 4. Calls 1-3
# and 5-10 need one GPU (kind nvidia-h200); call 4 needs two (nvidia-h200-x2 or nvidia-h100-x2, withheld in
# sessions 6 and 7). Carry .whl and .bench-data (a copy of ../shared/data:
#   rm -rf .bench-data && cp -r ../shared/data .bench-data   -- ignored by .gitignore).
# Chain calls back to back only where a call resumes the last one's ignored outputs (the smoke
# runs in fadelab-out/): the machine goes back after 30 s idle, and a fresh one starts bare.
#
#   1: issue 8: the probe rows alone (hooks --hooks probe). Done in session 8 (2026-12-04, 336 s):
#      every row with its peak memory, docs/measured/2026-12-04-h200-s8-hooks-probe.*
#   2: issue 7: sd14.toml --smoke at full size. Done in session 11 with `2 3` (2026-12-05, H200):
#      40 of 40 cells and the report in 310 s (docs/measured/2026-12-05-h200-smoke-sd14-jobs3.txt)
#   3: issue 7: sdxl.toml --smoke at full size. Done in session 17 (2026-12-06, one H100, one
#      process, SMOKE_S=470): all 15 cells and the report in 303 s (docs/measured/
#      2026-12-06-h100-smoke-sdxl-s17.txt); session 15: the same in 397 s, after BasisCache (earlier: 5 of
#      15 in 195 s, 2026-12-04; 7 of 15 in 330 s, GPU memory peak 79 GB: one process on an H100,
#      2 on an H200). flux-schnell.toml --smoke ran all 6 cells on 2026-12-04 (`3 flux-schnell`)
#   4 (2 GPUs): issue 10: the 9-cell experiments/throughput.toml on one GPU and on one GPU with 3
#      processes side by side, then on two GPUs (--jobs 2)
#   5 [SECONDS [REPORT_SECONDS]]: issue 7: the main job (fadelab run, --jobs auto: 8 processes on an H100/H200)
#      from an empty folder, for SECONDS (default 560); repeat while warm until status shows 50
#      done; then the merge and report as `fadelab run` does them, in their own process, and
#      scripts/report_timing.py's seconds per stage (each lane at most REPORT_SECONDS, default
#      240). OLD=oldcode: an older tree's merge and report first, on the same cells (the same-call
#      baseline; make oldcode/ as for call 7). GRAPHS=1: with cuda_graphs = true in every
#      fine-tune (scripts/graphs_config.py), into fadelab-out/main-graphs.
#      Session 21 (2026-12-07, H100, code 1d0bd13): all 50 cells in 283 s, each process 6-7 s of start-up
#      and 11-15 s of model load before its first cell's work, then the merge and report 21 s
#      (docs/measured/2026-12-07-h100-mainjob-s21.txt); its OLD lane ran this tree (fixed since)
#      Session 20 (2026-12-07, H100, code c41d203, the shipped defaults): all 50 cells in 262 s,
#      then the merge and report 54 s under cProfile (docs/measured/2026-12-07-h100-mainjob-auto.txt)
#      Session 19 (2026-12-07, H100, code de33057, GRAPHS=1, under MPS): all 50 cells in about
#      260 s, the merge and report unfinished at 300 s (docs/measured/2026-12-07-h100-mainjob-graphs-mps.txt)
#      Session 10 (2026-12-05, H100, before DeviceProdigy and the batched label writes): 41 of 50
#      in 540 s; 46 in 690 s on a second machine (docs/measured/2026-12-05-h100-mainjob-jobs8.txt).
#      Session 13 (2026-12-06, H100): 46 of 50 in 500 s (docs/measured/2026-12-06-h100-mainjob-jobs8.txt)
#      Session 17 (2026-12-06, H100, code a6e4aea): all 50 cells in about 476 s, merge and report 42 s
#      in a second call; status --stages (docs/measured/2026-12-06-h100-mainjob-jobs8-stages.txt).
#      Not yet measured: the main job after c3cd8e5 (small weight-probe sites on the CPU), the
#      packed device copies of a cell's deltas, and under CUDA MPS (--mps auto, the default since
#      session 18); call 7 measured them on the throughput slice (docs/measured/2026-12-07-h100-ab-mps.txt)
#   6: issue 7: the throughput slice with --jobs 1 and with --jobs auto in the same call (the
#      same-call baseline that session 10 had no device time for)
#   7 [CONFIG [JOBS [SECONDS [OLD]]]]: A/B of a speed change under one load: CONFIG (default
#      throughput) from this tree and from an older tree in OLD (default oldcode/, made with
#      `mkdir oldcode && git archive COMMIT | tar -x -C oldcode && rm -rf oldcode/{docs,tests}
#      oldcode/models/organism/weights`; untracked, so it travels), side by side with
#      JOBS processes each (default 4) on the one GPU; `status --stages` of both.
#      Session 18 (2026-12-07, H100): new 122 s, a6e4aea 131 s (341 against 403 s of cell time);
#      the new tree's side starts a CUDA MPS daemon by default (--mps auto) and a tree older than
#      session 18 has none, so pass MPS=off to compare code under one load (as session 18 did)
#   8 [TAG [SECONDS]]: issue 8: SD1.4 generation with inductor's max-autotune on the matrix
#      products only (option set full+vae-autotune-gemm: convolutions stay cuDNN's), then the
#      default full+vae, 10 timed batches each against one stock baseline. Session 12
#      (2026-12-06, H200) ran full+vae-autotune for 527 s and its cold compile was still
#      autotuning the UNet at the end, with cuDNN winning all 8 convolutions it timed
#      (docs/measured/2026-12-06-h200-gen-autotune.txt). The inductor cache stays in /tmp
#      (--warm-cache) and keeps each autotuned product as it is timed, so a second call on the
#      same warm machine (TAG 2) goes on where the first stopped. Session 18 (2026-12-07, H100):
#      530 s and 480 s, 33 products timed, the UNet's compile still unfinished; not measured
#      (docs/measured/2026-12-07-h100-gen-autotune-gemm.txt)
#   9 [STEPS]: METHODS (default full,lora,dora,dreambooth; textual-inversion too) issue 7: organism fine-tuning steps with and without CUDA graphs of the denoiser's
#      forward and backward (TrainHParams.cuda_graphs, new in session 18, never run on a GPU):
#      scripts/device_graphs_probe.py, full, LoRA, DoRA and DreamBooth at STEPS steps (default 60),
#      eager and graphed alternating twice; seconds per step and the graphed delta's distance from
#      the eager one. Done in session 19 within call 10 (2026-12-07, H100): 2.8-5.1x faster steps,
#      deltas equal bit for bit (docs/measured/2026-12-07-h100-graphs.txt)
#  10 [STEPS [PROBE_S [JOBS [SECONDS]]]]: issue 7: call 9 for at most PROBE_S s (default 220), then
#      the throughput slice with cuda_graphs on and off side by side, JOBS processes each (default
#      4), all under one CUDA MPS daemon, for at most SECONDS (default 180): the graphs under the
#      main job's kind of load, in one machine start. Session 19 (2026-12-07, H100): the slice in
#      67 s with graphs against 106 s without (docs/measured/2026-12-07-h100-graphs.txt)
#
# Session 7 ran the SDXL/FLUX edit and recording rows (device_bench --parts fam-edit-record), the
# generation rows with --batches 10 and the CUDA-graph option sets (--parts gen-options --options
# full+vae-cudagraphs,full+vae-1x1mm-cudagraphs): docs/measured/2026-12-04-h200-s7-*.
# Also 11: the GPU-only tests (pytest -m gpu) and call 9 for textual inversion (METHODS).
# 12 [SECONDS [BUDGET_S]]: issue 8: SD1.4 generation with inductor's coordinate-descent tuning
#      (full+vae-cdt, new in session 21), the default full+vae, then full+vae-1x1mm-cdt, 10 timed
#      batches each against one stock baseline; option sets that would start after BUDGET_S
#      (default 330) are skipped. Session 21 (2026-12-07, H100): full+vae-cdt 1.48x (7.80 against
#      5.26 images/s), its cold compile 457 s, so the default beside it was skipped
#      (docs/measured/2026-12-07-h100-gen-cdt.json). The inductor cache stays in /tmp (--warm-cache):
#      run it twice on one warm machine, and the second call, its tuned kernels cached, measures
#      full+vae-cdt and the default side by side.
# Logs go to $OUT/<name>.log, results to $OUT/<name>/, all packed into $OUT/results.tgz (a call
# brings back only 8 files). The organism retrain: scripts/device_organism_retrain.sh.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# byte-compile as a user's pip install does (--no-compile left it to the first import: session 21's
# main job had 8 processes compiling diffusers at once in their 11-15 s model load)
python3 -m compileall -q -j 0 /tmp/site > /dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false FADELAB_BENCHMARKS=$PWD/.bench-data
nvidia-smi -L; date -u
t() {  # t NAME SECONDS cmd...: run with a time limit, log to $OUT/NAME.log, one line to $OUT/lanes.txt
  local name=$1 lim=$2; shift 2; local s; s=$(date +%s)
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "[$name] rc=$rc wall=$(( $(date +%s) - s ))s" | tee -a "$OUT/lanes.txt"
}
smoke() {  # smoke FAMILY SECONDS [JOBS]: the family's grid at full size on random weights, JOBS
           # processes on the one GPU (default 1; SD1.4's full fine-tuning cell peaks near 25 GiB)
  [ -f .bench-data/RoAD_test.csv ] || { echo "[smoke-$1] skipped: carry .bench-data" | tee -a "$OUT/lanes.txt"; return; }
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 5 > "$OUT/smoke-$1-gpumem.txt" 2>&1 & local mon=$!
  if [ -n "${PROFILE:-}" ] && [ "${3:-1}" = 1 ]; then  # one process, in this one: cProfile to $OUT/smoke-$1.prof;
    # SIGINT at the limit, so the profile is written (cProfile dumps in a finally)
    t "smoke-$1" "$(( $2 + 20 ))" timeout -s INT -k 15 "$2" python3 -m cProfile -o "$OUT/smoke-$1.prof" \
        -m fadelab.cli run "experiments/$1.toml" --smoke --device cuda --quiet --jobs 1 --out "fadelab-out/smoke-$1"
    python3 -c "import pstats,sys; p=pstats.Stats(sys.argv[1]); p.sort_stats('cumulative').print_stats(70); p.sort_stats('tottime').print_stats(40)" \
        "$OUT/smoke-$1.prof" > "$OUT/smoke-$1-profile.txt" 2>&1
  else
    t "smoke-$1" "$2" python3 -m fadelab.cli run "experiments/$1.toml" --smoke --device cuda --quiet \
        --jobs "${3:-1}" --out "fadelab-out/smoke-$1"
  fi
  kill $mon 2>/dev/null
  python3 -m fadelab.cli status "experiments/$1.toml" --smoke --stages --out "fadelab-out/smoke-$1" > "$OUT/smoke-$1-status.txt" 2>&1
  df -h . >> "$OUT/smoke-$1-status.txt"; du -sh "fadelab-out/smoke-$1" >> "$OUT/smoke-$1-status.txt"
}
case "${1:-}" in
1) t hooks-probe 450 python3 scripts/device_bench.py --parts hooks --hooks probe --out "$OUT/hooksprobe" \
       --budget-s 430 ;;
2) smoke sd14 540 "${2:-1}" ;;
3) # JOBS default: 2 on a card of more than 100 GB (an H200), else 1 (SDXL peaked at 79 GB on an H100);
   # SMOKE_S (default 540) is the run's limit in seconds; PROFILE=1 runs one process under cProfile
   mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
   smoke "${2:-sdxl}" "${SMOKE_S:-540}" "${3:-$([ "${mem:-0}" -gt 100000 ] && echo 2 || echo 1)}" ;;
4) t grid-1gpu 200 env CUDA_VISIBLE_DEVICES=0 python3 -m fadelab.cli run experiments/throughput.toml --jobs 1 \
       --device cuda --out fadelab-out/grid1 --no-report &
   t grid-1gpu-3proc 200 env CUDA_VISIBLE_DEVICES=1 python3 -m fadelab.cli run experiments/throughput.toml \
       --device cuda --jobs 3 --out fadelab-out/grid1x3 --no-report &
   wait
   t grid-2gpu 200 python3 -m fadelab.cli run experiments/throughput.toml --device cuda --jobs 2 \
       --out fadelab-out/grid2 --no-report
   for d in grid1 grid1x3 grid2; do
     python3 -m fadelab.cli status experiments/throughput.toml --out "fadelab-out/$d" > "$OUT/$d-status.txt" 2>&1
   done ;;
5) # GPU memory and utilisation every 5 s: is the one GPU saturated by the 8 processes?
   cfg=organism main=main
   if [ "${GRAPHS:-0}" = 1 ]; then  # the organism config with cuda_graphs = true in every fine-tune
     cfg=experiments/organism-graphs.toml main=main-graphs
     python3 scripts/graphs_config.py experiments/organism.toml > "$cfg" || exit 1
   fi
   nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 5 > "$OUT/$main-gpu.txt" 2>&1 & mon=$!
   # the cells first, then the merge and report in a process of their own: session 20's cProfile
   # of them (54 s) lost its stages to threads, so scripts/report_timing.py times each stage; with
   # OLD (a folder holding an older tree, as call 7's) that tree's merge and report run first on
   # the same cells, as the same-call baseline (the font cache built before either)
   t "$main" "${2:-560}" python3 -m fadelab.cli run "$cfg" --device cuda --quiet --no-report --out "fadelab-out/$main"
   kill $mon 2>/dev/null
   python3 -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot"
   if [ -n "${OLD:-}" ]; then  # run from inside OLD: `python3 -c` puts its working folder first on
     # sys.path, ahead of PYTHONPATH, so session 21's lane, run from here, ran this tree instead
     (cd "$OLD" && t "$main-report-old" "${3:-240}" env PYTHONPATH="/tmp/site:$PWD" python3 -c "import sys, analysis
assert analysis.__file__.startswith(sys.argv[3]), analysis.__file__
from fadelab.grid import load_experiment, merge; from analysis.report import write_report
write_report(merge(load_experiment(sys.argv[1]), sys.argv[2]), sys.argv[2] + '/report-old')" \
         "$([ "$cfg" = organism ] && echo organism || echo "../$cfg")" "../fadelab-out/$main" "$PWD")
   fi
   t "$main-report" "${3:-240}" python3 -m fadelab.cli run "$cfg" --device cuda --quiet --out "fadelab-out/$main"
   t "$main-report-stages" "${3:-240}" python3 scripts/report_timing.py "$cfg" "fadelab-out/$main"
   python3 -m fadelab.cli status "$cfg" --stages --out "fadelab-out/$main" > "$OUT/$main-status.txt" 2>&1
   cp "fadelab-out/$main/report.html" "$OUT/" 2>/dev/null ;;
6) for j in 1 auto; do
     t "throughput-jobs-$j" 270 python3 -m fadelab.cli run experiments/throughput.toml --device cuda \
         --jobs "$j" --no-report --quiet --out "fadelab-out/tp-$j"
     python3 -m fadelab.cli status experiments/throughput.toml --out "fadelab-out/tp-$j" > "$OUT/tp-$j-status.txt" 2>&1
   done ;;
7) # A/B under one load: CONFIG (default throughput) from this tree and from OLD (default oldcode/:
   # an older commit's tree, `git archive COMMIT | tar -x -C oldcode`, untracked so it travels),
   # side by side on the one GPU with JOBS processes each (default 4), for SECONDS (default 200)
   cfg=${2:-throughput}; lim=${4:-200}; old=${5:-oldcode}
   [ -d "$old/fadelab" ] || { echo "[ab] no older tree in $old" | tee -a "$OUT/lanes.txt"; exit 1; }
   # the organism's weights travel once, with this tree (a second copy would pass the 64 MiB limit)
   [ -d "$old/models/organism/weights" ] || cp -r models/organism/weights "$old/models/organism/"
   t "ab-new" "$lim" python3 -m fadelab.cli run "experiments/$cfg.toml" --device cuda --jobs "${3:-4}" \
       --mps "${MPS:-auto}" --quiet --no-report --out fadelab-out/ab-new &
   (cd "$old" && export PYTHONPATH=/tmp/site:$PWD && t "ab-old" "$lim" python3 -m fadelab.cli run "experiments/$cfg.toml" \
       --device cuda --jobs "${3:-4}" --quiet --no-report --out ../fadelab-out/ab-old) &
   wait
   for v in new old; do
     (cd "$([ $v = old ] && echo "$old" || echo .)" && python3 -m fadelab.cli status "experiments/$cfg.toml" --stages \
         --out "$([ $v = old ] && echo ../)fadelab-out/ab-$v") > "$OUT/ab-$v-status.txt" 2>&1
   done ;;
8) t "genat-${2:-1}" "${3:-540}" python3 scripts/device_bench.py --parts gen-options --batches 10 --budget-s 2000 \
       --options full+vae-autotune-gemm,full+vae --warm-cache --out "$OUT/genat"
   grep -c "AUTOTUNE" "$OUT/genat-${2:-1}.log"; tail -20 "$OUT/genat-${2:-1}.log"; du -sh /tmp/torchinductor_*
   command -v nvidia-cuda-mps-control || echo "no nvidia-cuda-mps-control on this machine" ;;
9) t graphs-probe 540 python3 scripts/device_graphs_probe.py --out "$OUT/graphs" --steps "${2:-60}" \
       --methods "${METHODS:-full,lora,dora,dreambooth}"
   tail -12 "$OUT/graphs-probe.log" ;;
10) # CUDA graphs in one call: the probe (call 9) for at most PROBE_S seconds, then the throughput
   # slice with graphs on and off side by side, JOBS processes each (default 4), all clients of one
   # CUDA MPS daemon started here (the runner leaves a daemon in CUDA_MPS_PIPE_DIRECTORY alone)
   t graphs-probe "${3:-220}" python3 scripts/device_graphs_probe.py --out "$OUT/graphs" --steps "${2:-60}"
   python3 scripts/graphs_config.py experiments/throughput.toml > experiments/throughput-graphs.toml || exit 1
   export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
   mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
   nvidia-cuda-mps-control -d || { echo "[slices] no MPS daemon" | tee -a "$OUT/lanes.txt"; unset CUDA_MPS_PIPE_DIRECTORY; }
   for c in throughput-graphs throughput; do
     t "slice-$c" "${5:-180}" python3 -m fadelab.cli run "experiments/$c.toml" --device cuda --jobs "${4:-4}" \
         --quiet --no-report --out "fadelab-out/$c" &
   done
   wait
   [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | nvidia-cuda-mps-control
   for c in throughput-graphs throughput; do
     python3 -m fadelab.cli status "experiments/$c.toml" --stages --out "fadelab-out/$c" > "$OUT/slice-$c-status.txt" 2>&1
   done
   grep -h "cuda_graphs" "$OUT/slice-throughput-graphs.log" | sort | uniq -c | head
   tail -12 "$OUT/graphs-probe.log"; cat "$OUT"/slice-*-status.txt | grep -v "^  done" ;;
11) t gpu-tests 240 python3 -m pytest -q -m gpu tests
   t graphs-probe-ti 300 python3 scripts/device_graphs_probe.py --out "$OUT/graphs-ti" --steps "${2:-60}" \
       --methods textual-inversion
   tail -3 "$OUT/gpu-tests.log"; tail -4 "$OUT/graphs-probe-ti.log" ;;
12) t gen-cdt "${2:-560}" python3 scripts/device_bench.py --parts gen-options --batches 10 --budget-s "${3:-330}" \
       --options full+vae-cdt,full+vae,full+vae-1x1mm-cdt --warm-cache --out "$OUT/gencdt"
   grep -E "vs stock|skipped" "$OUT/gen-cdt.log" ;;
*) echo "usage: $0 1|2 [JOBS]|3 [sdxl|flux-schnell [JOBS]]|4|5 [SECONDS [REPORT_SECONDS]]|6|7 [CONFIG [JOBS [SECONDS [OLD]]]]|8 [TAG [SECONDS]]|9 [STEPS]|10 [STEPS [PROBE_S [JOBS [SECONDS]]]]|11 [STEPS]|12 [SECONDS [BUDGET_S]]" >&2; exit 2 ;;
esac
date -u; cat "$OUT/lanes.txt" 2>/dev/null
tar -czf /tmp/results.tgz -C "$OUT" --exclude='*.h5' . && mv /tmp/results.tgz "$OUT/results.tgz"
