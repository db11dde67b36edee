#!/usr/bin/env bash
# One session on a lent GPU machine (Python 3.12 with jax and CUDA, flax, optax,
# orbax-checkpoint, torch; no ml_collections, tensorboardX or Pillow, no tensorflow-datasets,
# no network), about 520 s, everything into $OUT:
#   1. the preflight, in seconds, before any device time: the carried wheels (.carry/wheels)
#      of what the session imports and this Python lacks are installed, those alone (pip
#      under constraints that pin every package already installed: nothing there, jax
#      least of all, is replaced or upgraded); then every import of the session's files
#      runs (`bench/session.py preflight`), and jax must see the GPU and PyTorch CUDA. A
#      failure stops the session with one line naming what is missing;
#   2. CIFAR-10 in the official binary layout from the carried archive (.carry/build.py);
#   3. the GPU benchmark plan, cut at BENCH_S seconds (default 330): $OUT/gpu.{md,json};
#   4. results/cifar10_gpu/run.sh, the paper's (18,18,18) relaxed run in bfloat16 with
#      stochastic depth on and the test set every epoch, under the fastest stochastic-depth
#      strategy, blocks and XLA flag set that step 3 measured, for as many epochs as its
#      loop rate fits in RUN_S seconds (default 150) with compilation: $OUT/{config.json,
#      metrics.jsonl,starts.jsonl,results.json,train.log}; the choices and timings in
#      $OUT/session.log.
# It exits 1, naming them, when a section it exists for (stochastic_depth, loop and
# xla_gpu; with ONLY those sections), any other section that ran, the CIFAR-10 build or
# the training run measured nothing.
# The .carry folder (git-ignored, about 45 MB) is made on a machine with PyPI, from the
# repository root:
#   mkdir -p .carry/wheels && python3.12 -m pip download -d .carry/wheels -c constraints.txt \
#     --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     ml_collections tensorboardX pillow==13.0.0
#   cp ../shared/data/cifar10/{build.py,cifar10_jpeg.tar.gz} .carry/
#   python3 -c "from rvm.train import provenance; print(provenance.commit())" > .carry/commit
# (the wheels of those three and their dependencies, absl-py, PyYAML, protobuf, packaging
# and numpy, each installed only where missing; the tree travels without its git history:
# the report names the commit from that file). bench/bare_gpu_image.sh does all of it and
# runs this script in a bare Python 3.12 environment on a CPU.
# ONLY=packed BENCH_S=500: steps 1 and 3 alone, step 3 for those sections of the plan
# (comma-separated; a second session for the packed runs, which the plan measures last).
# TINY=1 JAX_PLATFORMS=cpu OUT=/tmp/gpu_out bash bench/gpu_session.sh: a dry run on a CPU
# (tiny models, one epoch at batch 1,000 in float32; no device checked, PyTorch not needed;
# on a 2-core CPU give it BENCH_S=1500 RUN_S=900, as bench/bare_gpu_image.sh does).
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
failed=()
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .carry/commit ]; then
  RVM_COMMIT=$(cat .carry/commit) && export RVM_COMMIT && log "commit $RVM_COMMIT"
fi

log "1. preflight"
missing=$(python3 bench/session.py missing)
if [ -n "$missing" ]; then
  python3 bench/session.py installed | sort > /tmp/rvm_installed.txt
  log "installing from .carry/wheels: $missing (what is installed stays as it is)"
  # shellcheck disable=SC2086  # a list of names
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --no-index --find-links .carry/wheels \
    -c /tmp/rvm_installed.txt $missing >> "$OUT/session.log" 2>&1 || log "pip exit status $?"
  added=$(comm -13 /tmp/rvm_installed.txt <(python3 bench/session.py installed | sort))
  log "pip added: $(echo "$added" | tr '\n' ' ')"
fi
data=$([ -z "$ONLY" ] && echo --data)
device=$([ "${JAX_PLATFORMS:-}" = cpu ] || echo --device)  # a dry run has no device
# shellcheck disable=SC2086
line=$(python3 bench/session.py preflight $data $device 2>> "$OUT/session.log")
status=$?
log "$line"
if [ $status -ne 0 ]; then exit 1; fi

if [ -z "$ONLY" ]; then
  log "2. CIFAR-10 from the carried archive"
  python3 .carry/build.py /tmp/c10 >> "$OUT/session.log" 2>&1 \
    || { log "CIFAR-10 build FAILED"; failed+=("the CIFAR-10 build"); }
fi

log "3. the GPU benchmark, --deadline $BENCH_S${ONLY:+, sections $ONLY}"
tiny=$([ "$TINY" = 1 ] && echo --tiny)
only=${ONLY:+--only $ONLY}
name=gpu${ONLY:+_${ONLY//,/_}}
# shellcheck disable=SC2086
python3 bench/run.py --platform gpu $tiny $only --deadline "$BENCH_S" --out "$OUT/$name" \
  >> "$OUT/session.log" 2>&1 || log "benchmark exit status $?"
# The sections the session exists for: the open questions, or those asked for.
need=${ONLY:-stochastic_depth,loop,xla_gpu}
finish() {  # the sections' (and the run's) measurements, the files, the exit status
  local out status
  out=$(python3 bench/session.py check "$OUT/$name.json" --sections "$need" "$@")
  status=$?
  while IFS= read -r l; do log "  $l"; done <<< "$out"
  if [ $status -ne 0 ]; then failed+=("$(tail -1 <<< "$out" | sed 's/^measured nothing: //')"); fi
  log "done in $(($(date +%s) - start)) s; files: $(ls "$OUT" | tr '\n' ' ')"
  if [ ${#failed[@]} -gt 0 ]; then
    log "FAILED, measured nothing: $(IFS=';'; echo "${failed[*]}" | sed 's/;/; /g')"
    exit 1
  fi
  exit 0
}
if [ -n "$ONLY" ]; then finish; fi

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
if [ "$TINY" = 1 ]; then  # (1,2,2), an epoch of 50 steps, float32 (XLA:CPU emulates bfloat16)
  EXTRA="$EXTRA --config.model.blocks_per_level=(1,2,2) --config.batch_size=1000"
  EXTRA="$EXTRA --config.model.dtype=float32"
fi
XLA_FLAGS="$FLAGS${XLA_FLAGS:+ $XLA_FLAGS}" EXTRA="$EXTRA" EPOCHS=$EPOCHS DATA=/tmp/c10 OUT="$OUT" \
  WORKDIR=/tmp/rvm_gpu_run timeout -k 20 -s TERM $((RUN_S + 30)) results/cifar10_gpu/run.sh \
  || log "run exit status $?"
if [ -f "$OUT/results.json" ]; then log "run finished: $(tr -d '\n ' < "$OUT/results.json")"; fi
finish --run "$OUT"
