#!/usr/bin/env bash
# The video-object results in this folder, on the CPU of the machine at hand, at a budget
# far below the config's defaults (the machine was shared by ~6 jobs, load ~15 on 2 cores):
# 128 training videos, 2 epochs of batch 8 (32 Adam steps) per system, J on 32 validation
# and 64 test videos of held-out digits, 64x64 canvas, 24 frames, K = 8.
# Each run's config.json, metrics.jsonl, starts.jsonl and results.json are copied here;
# summary.md is then written from them (rvm.analysis.video_objects.write_summary).
# Rerunning resumes unfinished runs and skips finished ones. Logs: $WORKDIRS/NAME.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIRS=${WORKDIRS:-workdirs/video_objects_cpu}
OUT=results/video_objects_cpu
CONFIG=experiments/configs/video_objects.py
MACHINE=${MACHINE:-"$(lscpu | grep 'Model name' | sed 's/Model name: *//'), 2 cores shared with other work"}
BUDGET=(--config.data.num_train=128 --config.data.num_val=32 --config.data.num_test=64
  --config.num_epochs=2 --config.batch_size=8)
mkdir -p "$WORKDIRS"

train() {  # NAME VARIANT [--config.FIELD=VALUE ...]
  local name=$1 variant=$2 start=$SECONDS
  shift 2
  if [[ ! -f "$WORKDIRS/$name/results.json" ]]; then
    python -m experiments.train --config="$CONFIG:$variant" "${BUDGET[@]}" "$@" \
      --workdir="$WORKDIRS/$name" >>"$WORKDIRS/$name.log" 2>&1
  fi
  mkdir -p "$OUT/$name"
  cp "$WORKDIRS/$name"/{config.json,metrics.jsonl,starts.jsonl,results.json} "$OUT/$name/"
  echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
}

train frame frame
train dual dual
train small small
train stale stale
train pc pc
train resrec_gru resrec_gru
train dual_carry dual_carry
python -c "from rvm.analysis.video_objects import write_summary; write_summary('$OUT', '$MACHINE')"
