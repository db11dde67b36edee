#!/usr/bin/env bash
# The equilibrium ResNet at multiscale-DEQ size on one GPU: experiments/configs/
# equilibrium.py:all3_wide (every level of the (3,4,4) ResNet one block solved to its fixed
# point by Anderson acceleration and trained by implicit differentiation, 64-128-256
# filters, 2.7M parameters, GroupNorm, flips and pad-4 crops), real CIFAR-10 with 5,000
# training images held out for validation, for EPOCHS epochs (default 100; learning-rate
# drops at half and three quarters), float32. The target: at least 90% test accuracy (Bai
# et al.'s multiscale DEQ: 93.6% at 10M parameters). Trained by results/cifar10_gpu/run.sh,
# which says what goes into OUT, how a SIGTERM saves and how a rerun resumes; DATA, EXTRA
# and XLA_FLAGS as there.
set -uo pipefail
cd "$(dirname "$0")/../.."
EPOCHS=${EPOCHS:-100}
CONFIG=experiments/configs/equilibrium.py VARIANT=all3_wide DTYPE=float32 EPOCHS=$EPOCHS \
  OUT=${OUT:-results/equilibrium_gpu/all3_wide_e$EPOCHS} \
  WORKDIR=${WORKDIR:-workdirs/gpu_eq_all3_wide_e$EPOCHS} \
  EXTRA="--config.data.holdout=5000 ${EXTRA:-}" exec results/cifar10_gpu/run.sh
