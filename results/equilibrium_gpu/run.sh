#!/usr/bin/env bash
# The equilibrium ResNet at multiscale-DEQ size on one GPU: experiments/configs/
# equilibrium.py:all3_wide (every level of the (3,4,4) ResNet one block solved to its fixed
# point by Anderson acceleration and trained by implicit differentiation, 64-128-256
# filters, 2.7M parameters, GroupNorm, flips and pad-4 crops), real CIFAR-10 with 5,000
# training images held out for validation, for EPOCHS epochs (learning-rate drops at half
# and three quarters), float32. The target: at least 90% test accuracy (Bai et al.'s
# multiscale DEQ: 93.6% at 10M parameters). Needs CIFAR-10 in the official binary layout
# under DATA (README). Writes config.json, metrics.jsonl, starts.jsonl (the commit, devices
# and versions of each start), results.json and train.log into OUT; rerunning resumes from
# WORKDIR's checkpoints. EXTRA holds further --config.* overrides; XLA_FLAGS passes through.
set -uo pipefail
cd "$(dirname "$0")/../.."
EPOCHS=${EPOCHS:-100}
DATA=${DATA:-data/cifar10}
OUT=${OUT:-results/equilibrium_gpu/all3_wide_e$EPOCHS}
WORKDIR=${WORKDIR:-workdirs/gpu_eq_all3_wide_e$EPOCHS}
mkdir -p "$OUT"
# rvm's XLA:GPU flags (rvm.train.xla.GPU_FLAGS) first, so the caller's XLA_FLAGS win.
XLA_FLAGS=$(python3 -c "from rvm.train import xla; import sys; print(xla.gpu_xla_flags(sys.argv[1]))" "${XLA_FLAGS:-}")
export XLA_FLAGS
# shellcheck disable=SC2086  # EXTRA is a list of flags
python3 -m experiments.train --config=experiments/configs/equilibrium.py:all3_wide \
  --config.num_epochs="$EPOCHS" --config.data.source=binary --config.data.binary_dir="$DATA" \
  --config.data.holdout=5000 ${EXTRA:-} --workdir="$WORKDIR" --alsologtostderr \
  > "$OUT/train.log" 2>&1 &
# A SIGTERM (a time limit's) reaches the run, which saves a checkpoint and exits 75.
trap 'kill -TERM $!' TERM
wait $!
status=$?
if [ $status -gt 128 ]; then wait $!; status=$?; fi  # woken by the trap: wait for the run
for f in config.json metrics.jsonl starts.jsonl results.json; do
  [ -f "$WORKDIR/$f" ] && cp "$WORKDIR/$f" "$OUT/"
done
exit $status
