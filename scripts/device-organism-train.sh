#!/usr/bin/env bash
# Train the organism on a lent GPU in the background and wait for it (the device tool limits one
# command to 10 minutes; training takes longer, so a second call of `wait` collects it).
#   start: installs the carried wheels, runs a 3-step smoke of every stage, then starts
#          `fadelab organism train` detached (setsid) and waits up to $WAIT seconds.
#   wait:  waits up to $WAIT seconds more, then packs the weights folder into $OUT.
set -u
mode=${1:-start}; WAIT=${WAIT:-540}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
run=/tmp/organism-run
if [ "$mode" = start ]; then
  python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  rm -rf /tmp/smoke "$run"
  [ "${SMOKE:-1}" = 1 ] && { python3 -m fadelab.cli organism train --out /tmp/smoke --smoke || exit 1; }
  # resume from stage outputs carried in scratch/organism-run (an earlier call's results)
  [ -d scratch/organism-run ] && mkdir -p "$run" && cp -r scratch/organism-run/. "$run/"
  setsid nohup python3 -m fadelab.cli organism train --out "$run" --device cuda > /tmp/organism-train.log 2>&1 < /dev/null &
fi
t=0
while [ $t -lt "$WAIT" ] && ! [ -f "$run/card.json" ]; do
  sleep 10; t=$((t+10))
  if ! pgrep -f "organism train --out $run" >/dev/null; then echo "training process ended"; break; fi
done
tr '\r' '\n' < /tmp/organism-train.log | grep -v -i warn | grep -E "INFO|Error|error|Traceback|done" | tail -40
if [ -f "$run/card.json" ]; then
  cat "$run/card.json"; cat "$run/organism.json"
  (cd "$run" && tar cf /tmp/weights.tar .) && split -b 15M /tmp/weights.tar "$OUT/weights.tar.part-"
  cp /tmp/organism-train.log "$OUT/train.log"
fi
ls -la "$OUT"
