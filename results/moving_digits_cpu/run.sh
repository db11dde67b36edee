#!/usr/bin/env bash
# Every moving-digits result in this folder, on the CPU of the machine at hand, at the
# small budgets of experiments/configs/moving_digits.py (its header gives them):
#   (a) CBM against parameter-matched ConvLSTM stacks at depths 2, 4, 8, 16 (motion recognition)
#   (b) Temporal Dropout rates 0, 0.25, 0.5 on the 4-layer CBM
#   (c) overlap coherence, truncated and full back-propagation on 24-frame videos
#   (d) frame prediction (10 frames in, 10 out)
# Each run's config.json, metrics.jsonl, starts.jsonl and results.json are copied here;
# summary.md and the figures are then written from the run directories
# (experiments/sequence_summary.py).
# Rerunning resumes unfinished runs and skips finished ones. Logs: $WORKDIRS/NAME.log.
# --config.rng_streams=shared: the random keys these runs were recorded with (their
# config.json predates the field; rvm.train.step says how the streams differ).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIRS=${WORKDIRS:-workdirs/moving_digits_cpu}
OUT=results/moving_digits_cpu
CONFIG=experiments/configs/moving_digits.py
MACHINE=${MACHINE:-"2-core CPU VM shared with other work (one XLA device)"}
mkdir -p "$WORKDIRS"

train() {  # NAME VARIANT [--config.FIELD=VALUE ...]
  local name=$1 variant=$2 start=$SECONDS
  shift 2
  if [[ ! -f "$WORKDIRS/$name/results.json" ]]; then
    python -m experiments.train --config="$CONFIG:$variant" --config.rng_streams=shared "$@" \
      --workdir="$WORKDIRS/$name" >>"$WORKDIRS/$name.log" 2>&1
  fi
  mkdir -p "$OUT/$name"
  cp "$WORKDIRS/$name"/{config.json,metrics.jsonl,starts.jsonl,results.json} "$OUT/$name/"
  echo "$name: $((SECONDS - start)) s"
}

train cbm4 cbm4
train cbm4_td0.25 cbm4 --config.model.td_rate=0.25
train cbm4_td0.5 cbm4 --config.model.td_rate=0.5
train predict predict
for run in cbm2 cbm8 lstm2 lstm4 lstm8; do
  train "$run" "$run"
done
for scheme in full tbptt overlap; do
  train "$scheme" "$scheme"
done
for run in cbm16 lstm16; do
  train "$run" "$run"
done
# The optimiser check behind optim.name=adam: the depth runs with SGD. Its records are
# kept in sgd_*/; SGD_CHECK=1 trains them again (about 8 more minutes).
SGD=(cbm2 cbm4 cbm8 lstm2 lstm4 lstm8)
if [[ ${SGD_CHECK:-0} == 1 ]]; then
  for run in "${SGD[@]}"; do
    train "sgd_$run" "$run" --config.optim.name=sgd --config.optim.learning_rate=0.05
  done
fi

W=$WORKDIRS
python -m experiments.sequence_summary --out "$OUT" \
  --machine="$MACHINE" --command="results/moving_digits_cpu/run.sh" \
  --depth="$W/cbm2,$W/cbm4,$W/cbm8,$W/cbm16,$W/lstm2,$W/lstm4,$W/lstm8,$W/lstm16" \
  --dropout="$W/cbm4,$W/cbm4_td0.25,$W/cbm4_td0.5" \
  --schemes="$W/overlap,$W/tbptt,$W/full" \
  --prediction="$W/predict" \
  --sgd="$(printf "$OUT/sgd_%s," "${SGD[@]}" | sed 's/,$//')" 2>"$WORKDIRS/summary.log"
echo "total: $SECONDS s"
