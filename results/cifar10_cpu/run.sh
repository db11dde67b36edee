#!/usr/bin/env bash
# The (3,4,4) all-levels runs of Table 3 (non-shared, relaxed, raw, minimal) on real
# CIFAR-10 at CPU scale: 10 epochs each (the paper's schedule compressed: learning-rate
# drops at epochs 5 and 7.5, relaxation pull 1e-4 -> 1e-1 over the 10 epochs). Needs
# CIFAR-10 in the official binary layout under data/cifar10 (see README). Rerunning
# resumes from the checkpoints; VARIANTS="all3_raw" trains only the runs named.
set -euo pipefail
cd "$(dirname "$0")/../.."
# One XLA device: on this 2-core VM, two host devices deadlocked in an all-reduce when
# other processes competed for the cores (XLA:CPU gives up a collective after 40 s).
EPOCHS=${EPOCHS:-10}
ALL="all3_nonshared all3_relaxed all3_raw all3_minimal"
for variant in ${VARIANTS:-$ALL}; do
  python -m experiments.train \
    --config=experiments/configs/cifar10.py:$variant \
    --config.num_epochs="$EPOCHS" --config.data.source=binary \
    --workdir="workdirs/cpu_$variant" --alsologtostderr
  mkdir -p "results/cifar10_cpu/$variant"
  cp workdirs/cpu_$variant/{config.json,metrics.jsonl,results.json} "results/cifar10_cpu/$variant/"
  # The final checkpoint (~3 MB) too, so the report can be rebuilt from the repository alone.
  last=$(ls workdirs/cpu_$variant/checkpoints | sort -n | tail -1)
  rm -rf "results/cifar10_cpu/$variant/checkpoints"
  mkdir -p "results/cifar10_cpu/$variant/checkpoints"
  cp -r "workdirs/cpu_$variant/checkpoints/$last" "results/cifar10_cpu/$variant/checkpoints/"
done
# Tables, curves, ablations, trajectories and angles of every run, from the committed files.
python -m experiments.report --runs $(printf 'results/cifar10_cpu/%s ' $ALL) \
  --out results/cifar10_cpu/report
