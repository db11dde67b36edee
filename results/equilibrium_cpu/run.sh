#!/usr/bin/env bash
# Equilibrium against raw sharing on real CIFAR-10, (3,4,4), every level, at one short
# CPU budget: EPOCHS epochs each (default 1) with the same schedule (learning-rate drops
# at 50% and 75% of training), seed 0; the equilibrium solves capped at MAX_ITER forward
# and backward iterations (default 8) so that an epoch fits this 2-core VM. Then the
# thinking nets (mazes, prefix sums) solved to equilibrium. Each run's records are copied
# here (config.json, metrics.jsonl, starts.jsonl, results.json); rerunning resumes.
# Needs CIFAR-10 in the official binary layout under data/cifar10 (README); on the
# project's machines: python3 ../shared/data/cifar10/build.py data/cifar10
set -euo pipefail
cd "$(dirname "$0")/../.."
EPOCHS=${EPOCHS:-1}
MAX_ITER=${MAX_ITER:-8}
OUT=results/equilibrium_cpu
copy() {  # workdir -> results/equilibrium_cpu/<name>
  mkdir -p "$OUT/$2"
  cp "$1"/{config.json,metrics.jsonl,starts.jsonl,results.json} "$OUT/$2/"
}
keep_checkpoint() {  # name workdir: its newest checkpoint copied here (committed), if it
  # still exists, for the readings that load it
  local ckpts=workdirs/$2/checkpoints
  [ -d "$ckpts" ] || return 0
  rm -rf "$OUT/$1/checkpoints" && mkdir -p "$OUT/$1/checkpoints"
  cp -r "$ckpts/$(ls "$ckpts" | sort -n | tail -1)" "$OUT/$1/checkpoints/"
}
train() {  # name config workdir flags...
  local name=$1 config=$2 workdir=$3
  shift 3
  python -m experiments.train --config="$config" --workdir="$workdir" "$@"
  copy "$workdir" "$name"
}
# The short mazes and prefix_sums runs were recorded before `rng_streams` existed:
# --config.rng_streams=shared gives them their keys again (rvm.train.step).
THINK_EPOCHS=${THINK_EPOCHS:-1}
THINK_TRAIN=${THINK_TRAIN:-640}  # training examples: 20 steps of 32 (README.md: the budget)
for run in ${RUNS:-mazes prefix_sums mazes_phantom prefix_sums_phantom diagnosis budgets cifar_raw cifar_deq cifar_jac}; do
  case $run in
    cifar_raw)
      train all3_raw_e$EPOCHS experiments/configs/cifar10.py:all3_raw workdirs/eq_all3_raw_e$EPOCHS \
        --config.num_epochs="$EPOCHS" --config.data.source=binary ;;
    cifar_deq)
      train all3_deq_e$EPOCHS experiments/configs/equilibrium.py:all3 workdirs/eq_all3_deq_e$EPOCHS \
        --config.num_epochs="$EPOCHS" --config.data.source=binary \
        --config.model.equilibrium.max_iter="$MAX_ITER" \
        --config.model.equilibrium.backward_max_iter="$MAX_ITER" ;;
    cifar_jac)  # cifar_deq with Jacobian regularisation (weight 0.5, equilibrium.py:all3_jac)
      train all3_jac_e$EPOCHS experiments/configs/equilibrium.py:all3_jac workdirs/eq_all3_jac_e$EPOCHS \
        --config.num_epochs="$EPOCHS" --config.data.source=binary \
        --config.model.equilibrium.max_iter="$MAX_ITER" \
        --config.model.equilibrium.backward_max_iter="$MAX_ITER" ;;
    mazes)  # 9x9 training mazes, tested on 9x9 and 13x13; a short budget (README.md)
      train mazes_deq experiments/configs/equilibrium.py:mazes workdirs/eq_mazes \
        --config.rng_streams=shared --config.num_epochs="$THINK_EPOCHS" --config.data.num_train="$THINK_TRAIN" \
        --config.log_every_steps=5 --config.data.test_sizes="(9,13)" --config.eval.factor=3 ;;
    prefix_sums)  # 32-bit training strings, tested on 32 and 64 bits
      train prefix_sums_deq experiments/configs/equilibrium.py:prefix_sums \
        workdirs/eq_prefix_sums_short --config.rng_streams=shared --config.num_epochs="$THINK_EPOCHS" --config.data.num_train="$THINK_TRAIN" \
        --config.log_every_steps=5 --config.data.test_sizes="(32,64)" --config.eval.factor=3 ;;
    prefix_sums_implicit)  # the same at the progressive net's budget, 5,000 steps
      train prefix_sums_implicit experiments/configs/equilibrium.py:prefix_sums \
        workdirs/eq_prefix_sums --config.num_epochs=50 --config.data.num_train=10000 \
        --config.log_every_steps=5 --config.data.test_sizes="(32,64)" --config.eval.factor=3 ;;
    mazes_phantom)  # the maze net at the progressive net's budget (3,744 steps), phantom
      train mazes_phantom experiments/configs/equilibrium.py:mazes workdirs/eq_mz_phantom \
        --config.equilibrium.backward=phantom \
        --config.equilibrium.phantom_steps=10 --config.equilibrium.phantom_damping=1.0 \
        --config.log_every_steps=25 --config.data.test_sizes="(9,13)" --config.eval.factor=3 ;;
    prefix_sums_phantom)  # the same at the progressive net's budget (5,000 steps), trained
      # with the phantom gradient: 10 undamped steps with autodiff from the fixed point
      train prefix_sums_phantom experiments/configs/equilibrium.py:prefix_sums \
        workdirs/eq_ps_phantom --config.equilibrium.backward=phantom \
        --config.equilibrium.phantom_steps=10 --config.equilibrium.phantom_damping=1.0 \
        --config.log_every_steps=25 --config.data.test_sizes="(32,64)" --config.eval.factor=3 ;;
    diagnosis)  # why the implicit prefix-sum run stayed at chance where the phantom one
      # learned (README.md), read at h* from their newest checkpoints
      keep_checkpoint prefix_sums_implicit eq_prefix_sums
      keep_checkpoint prefix_sums_phantom eq_ps_phantom
      python -m experiments.equilibrium_diagnosis --out="$OUT/diagnosis.json" \
        --runs="$OUT/prefix_sums_implicit,$OUT/prefix_sums_phantom" \
        --command="RUNS=diagnosis bash results/equilibrium_cpu/run.sh" ;;
    budgets)  # whether mazes_phantom misses on 13x13 for want of solver iterations: its
      # validation exact match with the forward solve capped at 1x to 6x the trained 90
      keep_checkpoint mazes_phantom eq_mz_phantom
      python -m experiments.equilibrium_diagnosis --out="$OUT/budgets.json" \
        --runs="$OUT/mazes_phantom" --budgets=90,180,270,540 \
        --command="RUNS=budgets bash results/equilibrium_cpu/run.sh" ;;
  esac
done
