#!/usr/bin/env bash
# The where-to-look results in this folder, on the CPU of the machine at hand (a 2-core VM
# shared with other work; one run at a time, the whole script in about an hour):
#   tracker   Re3-style LSTM tracker against its feed-forward (GOTURN-style) and one-crop
#             ablations on 64-frame test tracks; every run's results.json also holds its
#             scores without state resets (the no_reset variant, same weights)
#   glimpses  RAM (learned policy) against random and centre glimpse locations and a
#             whole-canvas CNN, on cluttered and translated 60x60 canvases
# The overrides below say where a run departs from its config and why (the configs' own
# budgets need several hours on this VM). Each run's config.json, metrics.jsonl,
# starts.jsonl and results.json are copied here, with the final checkpoint of the tracker
# runs (a glimpse run's, 10 MB with its optimiser state, stays in $WORKDIRS); summary.md and the
# figures are then written from them (experiments/where_to_look.py). Rerunning resumes
# unfinished runs and skips finished ones; RUNS="tracker_lstm" trains only the runs
# named (the summary still covers every run recorded here). Logs: $WORKDIRS/NAME.log.
# --evaluate: each tracker run's committed checkpoint is evaluated again once (evaluated.json,
# the same scores with 95% intervals over test tracks).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WORKDIRS=${WORKDIRS:-workdirs/where_to_look_cpu_v2}
OUT=results/where_to_look_cpu
MACHINE=${MACHINE:-"a 2-core $(lscpu | sed -n 's/^Model name: *//p') VM shared with other work (one XLA device)"}
ALL="tracker_lstm tracker_feedforward cluttered_ram cluttered_random cluttered_cnn"
ALL+=" translated_ram translated_random translated_cnn tracker_one_crop cluttered_center"
ALL+=" tracker_lstm_own tracker_feedforward_own tracker_lstm_long tracker_feedforward_long"
ALL+=" translated_ram_own cluttered_ram_own translated_random_own cluttered_random_own"
RUNS=${RUNS:-$ALL}
mkdir -p "$WORKDIRS"

train() {  # NAME CONFIG VARIANT [--config.FIELD=VALUE ...]
  local name=$1 config=$2 variant=$3 start=$SECONDS
  shift 3
  [[ " $RUNS " == *" $name "* ]] || return 0
  if [[ ! -f "$WORKDIRS/$name/results.json" ]]; then
    nice -n 5 python -m experiments.train --config="experiments/configs/$config.py:$variant" "$@" \
      --workdir="$WORKDIRS/$name" >>"$WORKDIRS/$name.log" 2>&1
  fi
  local last
  last=$(ls "$WORKDIRS/$name/checkpoints" | sort -n | tail -1)
  rm -rf "$OUT/$name/checkpoints"
  mkdir -p "$OUT/$name"
  cp "$WORKDIRS/$name"/{config.json,metrics.jsonl,starts.jsonl,results.json} "$OUT/$name/"
  if [[ $config == tracker ]]; then
    mkdir -p "$OUT/$name/checkpoints"
    cp -r "$WORKDIRS/$name/checkpoints/$last" "$OUT/$name/checkpoints/"
  fi
  echo "$name: $((SECONDS - start)) s"
}

# The tracker variants' own budget and curriculum: 620 steps of 32 windows (10 epochs of
# the 2,000 training videos), unroll 2, 4, 8, 16 at steps 0, 150, 300, 450, own boxes 0,
# 1/3, 2/3, 1. The network is smaller (24x24 glimpses, 8 features, a 64-unit LSTM; the
# variants: 32x32, 16, 128 units), which trains about 9x faster here (about 60 against
# 7 windows/s): the config's network would need about 45 minutes a run.
TRACKER=(--config.model.size=24 --config.model.features=8 --config.model.hidden=64)
# The glimpse variants' own models and data (20,000 training canvases, 2,000 validation,
# 5,000 test), for fewer epochs: RAM 5 epochs (1,560 steps of 64; the variants: 20
# epochs, 6,240 steps), at about 480 images/s here; the CNN, at about 150 images/s,
# 2 epochs (624 steps).
RAM=(--config.num_epochs=5)
CNN=(--config.num_epochs=2)

train tracker_lstm tracker lstm "${TRACKER[@]}"
train tracker_feedforward tracker feedforward "${TRACKER[@]}"
train cluttered_ram glimpses cluttered_ram "${RAM[@]}"
train cluttered_random glimpses cluttered_random "${RAM[@]}"
train cluttered_cnn glimpses cluttered_cnn "${CNN[@]}"
train translated_ram glimpses translated_ram "${RAM[@]}"
train translated_random glimpses translated_random "${RAM[@]}"
train translated_cnn glimpses translated_cnn "${CNN[@]}"
train tracker_one_crop tracker one_crop "${TRACKER[@]}"
train cluttered_center glimpses cluttered_center "${RAM[@]}"
# The tracker variants as configured, network included (32x32 glimpses, 16 features, a
# 128-unit LSTM): about an hour a run on one core of this VM.
train tracker_lstm_own tracker lstm
train tracker_feedforward_own tracker feedforward
# tracker_lstm_own's validation IoU rose from 0.66 to 0.80 in the three epochs in which the
# curriculum reached the 16-frame unroll and its own boxes (steps 372-496), and then the
# learning rate dropped (80% of the steps): the same with twice the epochs, so that the full
# curriculum trains about 540 steps before the drop instead of 124.
train tracker_lstm_long tracker lstm --config.num_epochs=20
# Its feed-forward ablation at the same budget.
train tracker_feedforward_long tracker feedforward --config.num_epochs=20
# RAM and its random-location baseline at the glimpse variants' own budget (20 epochs,
# 6,240 steps of 64; README.md says how long they took).
train translated_ram_own glimpses translated_ram
train cluttered_ram_own glimpses cluttered_ram
train translated_random_own glimpses translated_random
train cluttered_random_own glimpses cluttered_random

paths=""  # every run with records here, trained now or before
for name in $ALL; do
  [[ -f "$OUT/$name/results.json" ]] && paths+="${paths:+,}$OUT/$name"
done
python -m experiments.where_to_look --evaluate --out="$OUT" --machine="$MACHINE" \
  --command="results/where_to_look_cpu/run.sh" --runs="$paths"
echo "total: $SECONDS s"
