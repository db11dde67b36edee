#!/usr/bin/env bash
# The paper's (18,18,18) run on one GPU: all levels relaxed (VARIANT), stochastic depth
# on, bfloat16, real CIFAR-10, the 10,000 test images evaluated after every epoch, for
# EPOCHS epochs (the paper's schedule compressed into them: learning-rate drops at half
# and three quarters, the relaxation pull over all of them). Needs CIFAR-10 in the
# official binary layout under DATA (see README). Writes config.json, metrics.jsonl,
# starts.jsonl (the commit, devices and versions of each start), results.json and
# train.log into OUT. EXTRA holds further --config.* overrides (such as
# --config.model.sd_impl=compact); XLA_FLAGS passes through. CONFIG (another config file of
# the CIFAR-10 family) and DTYPE let other GPU runs share this script
# (results/equilibrium_gpu/run.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-experiments/configs/cifar10.py}
VARIANT=${VARIANT:-all18_relaxed}
DTYPE=${DTYPE:-bfloat16}
EPOCHS=${EPOCHS:-15}
DATA=${DATA:-data/cifar10}
OUT=${OUT:-results/cifar10_gpu/$VARIANT}
WORKDIR=${WORKDIR:-workdirs/gpu_$VARIANT}
mkdir -p "$OUT"
# rvm's XLA:GPU flags (rvm.train.xla.GPU_FLAGS) first, so the caller's XLA_FLAGS win.
XLA_FLAGS=$(python3 -c "from rvm.train import xla; import sys; print(xla.gpu_xla_flags(sys.argv[1]))" "${XLA_FLAGS:-}")
export XLA_FLAGS
# shellcheck disable=SC2086  # EXTRA is a list of flags
python3 -m experiments.train --config="$CONFIG:$VARIANT" \
  --config.model.dtype="$DTYPE" --config.num_epochs="$EPOCHS" --config.data.source=binary \
  --config.data.binary_dir="$DATA" ${EXTRA:-} --workdir="$WORKDIR" --alsologtostderr \
  > "$OUT/train.log" 2>&1 &
# A SIGTERM (a time limit's) reaches the run, which saves a checkpoint and exits 75.
trap 'kill -TERM $!' TERM
wait $!
status=$?
if [ $status -gt 128 ]; then wait $!; status=$?; fi  # woken by the trap: wait for the run
# What the run wrote, also when it was stopped early (SIGTERM: a checkpoint, exit 75).
for f in config.json metrics.jsonl starts.jsonl results.json; do
  if [ -f "$WORKDIR/$f" ]; then cp "$WORKDIR/$f" "$OUT/"; fi
done
exit $status
