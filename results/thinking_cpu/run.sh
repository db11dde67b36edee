#!/usr/bin/env bash
# The "thinking longer" results in this folder, on the CPU of the machine at hand, at the
# small budgets of experiments/configs/{prefix_sums,mazes}.py:
#   prefix sums trained on 32 bits, tested on 32-512 bits: recall + progressive loss
#   against the plain recurrent net (no recall, loss at the trained count)
#   mazes trained on 9x9 cells, tested on 9x9 to 33x33: the same two networks
# Every test size is evaluated at 1 .. 10x the trained iteration count. Each run's
# config.json, metrics.jsonl, starts.jsonl, results.json and final checkpoint are copied
# here; summary.md, curves.json and the figure are then written from them
# (experiments/think_eval.py). Rerunning resumes unfinished runs and skips finished ones,
# and a run committed here without a workdir is kept as it is (its checkpoint is evaluated
# again); RUNS="ps_plain" takes only the runs named.
# Logs: $WORKDIRS/NAME.log. --config.rng_streams=shared: the random keys these runs were
# recorded with (their config.json predates the field; rvm.train.step says how they differ).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIRS=${WORKDIRS:-workdirs/thinking_cpu}
OUT=results/thinking_cpu
MACHINE=${MACHINE:-"evaluated on a 2-core AMD EPYC CPU VM shared with other work (one XLA device); trained on the project's 2-core CPU VM"}
RUNS=${RUNS:-"ps_recall_prog ps_plain mz_recall_prog mz_plain"}
mkdir -p "$WORKDIRS"

train() {  # NAME CONFIG VARIANT [--config.FIELD=VALUE ...]
  local name=$1 config=$2 variant=$3 start=$SECONDS
  shift 3
  [[ " $RUNS " == *" $name "* ]] || return 0
  if [[ -f "$OUT/$name/results.json" && ! -d "$WORKDIRS/$name" ]]; then
    echo "$name: the committed run"
    return 0
  fi
  if [[ ! -f "$WORKDIRS/$name/results.json" ]]; then
    python -m experiments.train --config="experiments/configs/$config.py:$variant" \
      --config.rng_streams=shared "$@" \
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

train ps_recall_prog prefix_sums recall_prog
train ps_plain prefix_sums plain
train mz_recall_prog mazes recall_prog
# Back-propagating through all 30 iterations makes a plain maze step about 2.3x as costly:
# it was given 5 epochs (the recall net's first 5 epochs reached 2% test error on 9x9).
train mz_plain mazes plain --config.num_epochs=5

# --evaluate: the curves again from the final checkpoints, on longer strings and larger
# mazes than the runs were tested on while they trained, and on validation and test splits
# of stream 1, which nobody had looked at: these runs were tuned while looking at stream
# 0's test split. The count reported per size is chosen on validation; the test split
# gives the numbers, 1,000 examples per size (validation: 1,000 strings, 200 mazes per
# size). Mazes stop at 21x21 (13x13 for the plain net, which solves few of them): 33x33 costs
# about 2.8x all five prefix-sum sizes together, more than the 2-core VM had to spare beside
# other jobs; add 33 to --sizes to evaluate it. A run already in curves.json with the same
# settings is not evaluated again.
EVAL_RUNS=${EVAL_RUNS:-"ps_recall_prog ps_plain mz_recall_prog mz_plain"}
paths=""
for name in $EVAL_RUNS; do paths+="${paths:+,}$OUT/$name"; done
python -m experiments.think_eval --evaluate --out "$OUT" --machine="$MACHINE" \
  --command="results/thinking_cpu/run.sh" --runs="$paths" --eval_stream=1 \
  --num_test=prefix_sums:1000 --num_test=mazes:1000 \
  --num_val=prefix_sums:1000 --num_val=mazes:200 \
  --sizes=prefix_sums:32,64,128,256,512 --sizes=mazes:9,13,21 --sizes=mz_plain:9,13
echo "total: $SECONDS s"
