#!/usr/bin/env bash
# The where-to-look results in this folder, on the CPU of the machine at hand, at budgets
# far below the configs' own (the 2-core VM is shared with other work, so each run is
# cut to a few hundred steps and a smaller network; the overrides below say how):
#   tracker   Re3-style LSTM tracker against its feed-forward (GOTURN-style) and one-crop
#             ablations on 64-frame test tracks; every run's results.json also holds its
#             scores without state resets (the no_reset variant, same weights)
#   glimpses  RAM (learned policy) against random and centre glimpse locations and a
#             whole-canvas CNN, on cluttered and translated 60x60 canvases
# Each run's config.json, metrics.jsonl, starts.jsonl, results.json and final checkpoint
# are copied here; summary.md and the figures are then written from them
# (experiments/where_to_look.py). Rerunning resumes unfinished runs and skips finished
# ones; RUNS="tracker_lstm" trains only the runs named. Logs: $WORKDIRS/NAME.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WORKDIRS=${WORKDIRS:-workdirs/where_to_look_cpu}
OUT=results/where_to_look_cpu
MACHINE=${MACHINE:-"a 2-core $(lscpu | sed -n 's/^Model name: *//p') VM shared with other work (one XLA device)"}
ALL="tracker_lstm tracker_feedforward cluttered_ram cluttered_random cluttered_cnn"
ALL+=" translated_ram translated_random translated_cnn tracker_one_crop cluttered_center"
RUNS=${RUNS:-$ALL}
mkdir -p "$WORKDIRS"

train() {  # NAME CONFIG VARIANT [--config.FIELD=VALUE ...]
  local name=$1 config=$2 variant=$3 start=$SECONDS
  shift 3
  [[ " $RUNS " == *" $name "* ]] || return 0
  if [[ ! -f "$WORKDIRS/$name/results.json" ]]; then
    python -m experiments.train --config="experiments/configs/$config.py:$variant" "$@" \
      --workdir="$WORKDIRS/$name" >>"$WORKDIRS/$name.log" 2>&1
  fi
  local last
  last=$(ls "$WORKDIRS/$name/checkpoints" | sort -n | tail -1)
  rm -rf "$OUT/$name/checkpoints"
  mkdir -p "$OUT/$name/checkpoints"
  cp "$WORKDIRS/$name"/{config.json,metrics.jsonl,starts.jsonl,results.json} "$OUT/$name/"
  cp -r "$WORKDIRS/$name/checkpoints/$last" "$OUT/$name/checkpoints/"
  echo "$name: $((SECONDS - start)) s"
}

# 248 steps of 16 windows (unroll 2, 4, 8 at steps 0, 60, 120; own boxes 0, 50%, 100%),
# 24x24 glimpses, a 64-unit LSTM: the config's lstm variant trains 620 steps of 32.
TRACKER=(--config.num_epochs=4 --config.batch_size=16 --config.data.num_train=1000
  --config.data.num_val=32 --config.data.num_test=128 --config.model.size=24
  --config.model.features=8 --config.model.hidden=64 --config.train.max_unroll=8
  --config.train.stage_steps=60 --config.eval_batch_size=32)
# 282 steps of 64 canvases, a 128-unit core: the configs train 6,250 steps.
GLIMPSES=(--config.num_epochs=3 --config.data.num_train=6000 --config.data.num_val=1000
  --config.data.num_test=2000 --config.model.hidden=128)

train tracker_lstm tracker lstm "${TRACKER[@]}"
train tracker_feedforward tracker feedforward "${TRACKER[@]}"
train cluttered_ram glimpses cluttered_ram "${GLIMPSES[@]}"
train cluttered_random glimpses cluttered_random "${GLIMPSES[@]}"
train cluttered_cnn glimpses cluttered_cnn "${GLIMPSES[@]}"
train translated_ram glimpses translated_ram "${GLIMPSES[@]}"
train translated_random glimpses translated_random "${GLIMPSES[@]}"
train translated_cnn glimpses translated_cnn "${GLIMPSES[@]}"
train tracker_one_crop tracker one_crop "${TRACKER[@]}"
train cluttered_center glimpses cluttered_center "${GLIMPSES[@]}"

paths=""
for name in $RUNS; do paths+="${paths:+,}$OUT/$name"; done
python -m experiments.where_to_look --out="$OUT" --machine="$MACHINE" \
  --command="results/where_to_look_cpu/run.sh" --runs="$paths"
echo "total: $SECONDS s"
