#!/usr/bin/env bash
# The (3,4,4) all-levels runs of Table 3 (non-shared, relaxed, raw, minimal) on real
# CIFAR-10 at CPU scale, seeds 0 and 1: 10 epochs each (the paper's schedule compressed:
# learning-rate drops at epochs 5 and 7.5, relaxation pull 1e-4 -> 1e-1 over the 10
# epochs); then all3_raw_randiter (raw, random iteration counts per mini-batch), seed 0.
# Needs CIFAR-10 in the official binary layout under data/cifar10 (see
# README). The seeds of a variant train as one pack (`config.seeds`, one process and
# one compilation; on the CPU each run is bit for bit the run of its seed trained
# alone), in workdirs/cpu_<variant>/seed_<s>. Rerunning resumes from the checkpoints;
# VARIANTS="all3_raw" trains only the variants named, SEEDS="1" only those seeds (a
# pack's seed list is fixed: another list needs another workdir, here its own name).
# --config.rng_streams=shared: the random keys these runs were recorded with (their
# config.json predates the field; rvm.train.step says how the streams differ).
set -euo pipefail
cd "$(dirname "$0")/../.."
# One XLA device: on this 2-core VM, two host devices deadlocked in an all-reduce when
# other processes competed for the cores (XLA:CPU gives up a collective after 40 s).
EPOCHS=${EPOCHS:-10}
ALL="all3_nonshared all3_relaxed all3_raw all3_minimal"
ALL_SEEDS="0 1"
RANDITER="all3_raw_randiter" # compared with all3_raw in thinking_longer.md
SEEDS=${SEEDS:-$ALL_SEEDS}
name() { if [ "$2" = 0 ]; then echo "$1"; else echo "$1_seed$2"; fi; }
# Trains the seeds $2 ("0 1") of variant $1 as one pack, then copies each run's records
# and final checkpoint (~1.5 MB, so the report can be rebuilt from the repository alone).
train() {
  local pack="($(echo $2 | tr ' ' ','),)"  # "0 1" -> (0,1,)
  local suffix=$([ "$2" = "$ALL_SEEDS" ] && echo "" || echo "_seeds$(echo $2 | tr ' ' '_')")
  local workdir="workdirs/cpu_$1$suffix"
  python -m experiments.train \
    --config=experiments/configs/cifar10.py:$1 --config.seeds="$pack" \
    --config.num_epochs="$EPOCHS" --config.data.source=binary \
    --config.rng_streams=shared --workdir="$workdir" --alsologtostderr
  for seed in $2; do
    run=$(name "$1" "$seed")
    mkdir -p "results/cifar10_cpu/$run"
    cp $workdir/seed_$seed/{config.json,metrics.jsonl,starts.jsonl,results.json} "results/cifar10_cpu/$run/"
    last=$(ls $workdir/seed_$seed/checkpoints | sort -n | tail -1)
    rm -rf "results/cifar10_cpu/$run/checkpoints"
    mkdir -p "results/cifar10_cpu/$run/checkpoints"
    cp -r "$workdir/seed_$seed/checkpoints/$last" "results/cifar10_cpu/$run/checkpoints/"
  done
}
for variant in ${VARIANTS:-$ALL}; do
  train "$variant" "$SEEDS"
done
[ -n "${VARIANTS:-}" ] || [ "$SEEDS" != "$ALL_SEEDS" ] || train "$RANDITER" 0
# Tables (mean and spread over the seeds), curves, ablations, trajectories and angles of
# every run, from the committed files.
runs=$(for seed in $ALL_SEEDS; do for v in $ALL; do echo "results/cifar10_cpu/$(name "$v" "$seed")"; done; done)
python -m experiments.report --runs $runs --out results/cifar10_cpu/report
# Error against readout time up to 2x the trained depth of the middle level, BatchNorm
# recalibrated: fixed-depth (paper-style) training against random iteration counts. About
# 7 minutes per level and run on this VM when shared; `--levels 0,1,2` reads out every level.
python -m experiments.thinking_longer --runs results/cifar10_cpu/all3_raw \
  results/cifar10_cpu/$RANDITER --levels 1 --out results/cifar10_cpu/thinking_longer
