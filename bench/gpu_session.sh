#!/usr/bin/env bash
# One session on a lent GPU machine (jax with CUDA, flax, optax, orbax, torch; no
# ml_collections, no tensorflow-datasets, no network), about 520 s, everything into $OUT:
#   1. ml_collections from the carried wheel (.carry/wheels) into /tmp/site;
#   2. CIFAR-10 in the official binary layout from the carried archive (.carry/build.py);
#   3. the GPU benchmark plan, cut at BENCH_S seconds (default 330): $OUT/gpu.{md,json};
#   4. results/cifar10_gpu/run.sh, the paper's (18,18,18) relaxed run in bfloat16 with
#      stochastic depth on and the test set every epoch, under the fastest stochastic-depth
#      strategy, blocks and XLA flag set that step 3 measured, for as many epochs as its
#      loop rate fits in RUN_S seconds (default 150) with compilation: $OUT/{config.json,
#      metrics.jsonl,starts.jsonl,results.json,train.log}; the choices and timings in
#      $OUT/session.log.
# The .carry folder (git-ignored) is made with:
#   mkdir -p .carry/wheels && pip download ml_collections==1.1.0 --no-deps -d .carry/wheels
#   cp ../shared/data/cifar10/{build.py,cifar10_jpeg.tar.gz} .carry/
#   python3 -c "from rvm.train import provenance; print(provenance.commit())" > .carry/commit
# (the tree travels without its git history: the report names the commit from that file).
# ONLY=packed BENCH_S=500: steps 1 and 3 alone, step 3 for those sections of the plan
# (comma-separated; a second session for the packed runs, which the plan measures last).
# TINY=1 JAX_PLATFORMS=cpu OUT=/tmp/gpu_out bash bench/gpu_session.sh: a dry run on a CPU
# (tiny models, one epoch at batch 1,000).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?OUT: where the results go}
TINY=${TINY:-0}
ONLY=${ONLY:-}
BENCH_S=${BENCH_S:-330}
RUN_S=${RUN_S:-150}
mkdir -p "$OUT"
log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/session.log"; }
start=$(date +%s)

log "1. ml_collections from the carried wheel"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .carry/commit ]; then
  RVM_COMMIT=$(cat .carry/commit) && export RVM_COMMIT && log "commit $RVM_COMMIT"
fi

if [ -z "$ONLY" ]; then
  log "2. CIFAR-10 from the carried archive"
  python3 .carry/build.py /tmp/c10 >> "$OUT/session.log" 2>&1 || log "CIFAR-10 build FAILED"
fi

log "3. the GPU benchmark, --deadline $BENCH_S${ONLY:+, sections $ONLY}"
tiny=$([ "$TINY" = 1 ] && echo --tiny)
only=${ONLY:+--only $ONLY}
name=gpu${ONLY:+_${ONLY//,/_}}
# shellcheck disable=SC2086
python3 bench/run.py --platform gpu $tiny $only --deadline "$BENCH_S" --out "$OUT/$name" \
  >> "$OUT/session.log" 2>&1 || log "benchmark exit status $?"
if [ -n "$ONLY" ]; then
  log "done in $(($(date +%s) - start)) s; files: $(ls "$OUT" | tr '\n' ' ')"
  exit 0
fi

# The fastest measured stochastic-depth step (strategy, blocks, XLA flags), and the epochs
# that fit in RUN_S at the real loop's rate (defaults where the benchmark measured nothing).
{ read -r SD_IMPL; read -r UNROLL; read -r FLAGS; read -r EPOCHS; } < <(python3 - "$OUT/gpu.json" "$RUN_S" "$TINY" <<'PY'
import json, sys

path, run_s, tiny = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
try:
    res = json.load(open(path))["results"]
except (OSError, ValueError):
    res = {}
runs = [
    r for section in ("stochastic_depth", "xla_gpu") for label, r in res.get(section, {}).items()
    if r.get("ok") and r["spec"].get("kind") == "rvm_train" and r["spec"]["stochastic_depth"]
]
best = min(runs, key=lambda r: r["step_s"])["spec"] if runs else {}
loop = res.get("loop", {}).get("rvm loop", {})
# Compilation, initialisation and the last evaluation take about 45 s; relaxation's
# per-epoch angles about 10% of an epoch on top of the non-shared loop's whole epochs
# (evaluation and checkpoint included) measured.
epoch_step_s = loop.get("epoch_step_s", loop.get("step_s"))
epochs = int((run_s - 45) / (390 * epoch_step_s * 1.1)) if loop.get("ok") else 15
epochs = 1 if tiny else max(2, min(epochs, 60))
print(best.get("sd_impl", "auto"), bool(best.get("unroll")), best.get("xla_flags", ""), epochs, sep="\n")
PY
)
log "fastest step: sd_impl=$SD_IMPL unroll=$UNROLL XLA_FLAGS='$FLAGS'; $EPOCHS epochs"

log "4. the paper's (18,18,18) run, $EPOCHS epochs"
rm -rf /tmp/rvm_gpu_run  # a fresh run, not the resumption of an earlier one
EXTRA="--config.model.sd_impl=$SD_IMPL --config.model.unroll=$UNROLL"
if [ "$TINY" = 1 ]; then  # (1,2,2), an epoch of 50 steps
  EXTRA="$EXTRA --config.model.blocks_per_level=(1,2,2) --config.batch_size=1000"
fi
XLA_FLAGS="$FLAGS${XLA_FLAGS:+ $XLA_FLAGS}" EXTRA="$EXTRA" EPOCHS=$EPOCHS DATA=/tmp/c10 OUT="$OUT" \
  WORKDIR=/tmp/rvm_gpu_run timeout -k 20 -s TERM $((RUN_S + 30)) results/cifar10_gpu/run.sh \
  || log "run exit status $?"
log "done in $(($(date +%s) - start)) s; files: $(ls "$OUT" | tr '\n' ' ')"
