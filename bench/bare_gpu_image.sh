#!/usr/bin/env bash
# The GPU session's dry run in the Python of a lent GPU machine, minus the device.
#   1. a bare Python 3.12 virtualenv (BARE, default /tmp/rvm_bare312, made afresh) holding
#      jax's CPU wheels (JAX_VERSION, default 0.11.2, the lent machine's), flax 0.12.8,
#      optax 0.2.8 and orbax-checkpoint 0.12.8, with what they pull in and nothing else: no
#      ml_collections, tensorboardX, Pillow, tensorflow-datasets or PyTorch, as on that
#      machine (less its PyTorch);
#   2. .carry/ made by the recipe in gpu_session.sh's header (wheels downloaded with PY312's
#      pip, CIFAR-10's archive and build.py from SHARED, the commit);
#   3. TINY=1 JAX_PLATFORMS=cpu bash bench/gpu_session.sh in that environment (first on
#      PATH; no PYTHONPATH, no pip configuration, so pip sees .carry/wheels alone), into OUT
#      (default /tmp/rvm_bare_out), then its session.log, gpu.md and the run's records.
#      The benchmark gets BENCH_S (default 1500) seconds and the run RUN_S (default 900)
#      where a GPU session gives 330 and 150: on a 2-core CPU a tiny measurement spends
#      30-50 s compiling (the session's 330 s would end inside `stochastic_depth`), and the
#      run's one epoch of 50,000 images did not end in 430 s on the shared VM;
#   4. the README's smoke run, python -m experiments.train
#      --config=experiments/configs/cifar10.py:smoke, in the same environment;
#   5. the versions of jax, jaxlib, flax, optax and orbax-checkpoint before and after, which
#      must not have changed.
# Everything it prints also goes to LOG (default bench/results/bare_gpu_image.log, written
# at the end). Exits
# non-zero when the session, the smoke run or that comparison failed.
#   PY312=/path/to/python3.12 bash bench/bare_gpu_image.sh   # PY312 default: python3.12
set -uo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
BARE=${BARE:-/tmp/rvm_bare312}
OUT=${OUT:-/tmp/rvm_bare_out}
SHARED=${SHARED:-../shared/data/cifar10}
JAX_VERSION=${JAX_VERSION:-0.11.2}
LOG=${LOG:-bench/results/bare_gpu_image.log}
BENCH_S=${BENCH_S:-1500}
RUN_S=${RUN_S:-900}
if ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null; then
  echo "PY312=$PY312 is not a Python 3.12; set PY312 to one" >&2
  exit 2
fi
step() { echo; echo "=== [$(date -u +%T)] $*"; }
begin=$(date +%s)
core=(jax jaxlib flax optax orbax-checkpoint)
freeze() { "$BARE/bin/python" -m pip list --format=freeze 2> /dev/null | sort; }
versions() { freeze | grep -iE "^($(IFS='|'; echo "${core[*]}"))=="; }

main() {
  echo "# The GPU session's dry run in a bare Python 3.12 environment"
  echo "command: ${PY312:+PY312=$PY312 }bash bench/bare_gpu_image.sh"
  echo "date: $(date -u +%FT%TZ); commit: $(git rev-parse --short=12 HEAD 2> /dev/null)$(git status --porcelain --untracked-files=no 2> /dev/null | grep -q . && echo -dirty)"
  echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 2^20}' /proc/meminfo), $(uname -sr)"

  step "1. the bare environment: jax $JAX_VERSION (CPU), flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8"
  rm -rf "$BARE" "$OUT" /tmp/rvm_bare_smoke
  "$PY312" -m venv "$BARE" || exit 1
  "$BARE/bin/python" -m pip install -q "jax==$JAX_VERSION" flax==0.12.8 optax==0.2.8 \
    orbax-checkpoint==0.12.8 2>&1 | grep -v "^WARNING: Location" || true
  "$BARE/bin/python" --version
  everything=$(freeze)
  echo "$everything" | tr '\n' ' '
  echo
  before=$(versions)

  step "2. .carry, by gpu_session.sh's recipe"
  rm -rf .carry && mkdir -p .carry/wheels
  "$PY312" -m pip download -q -d .carry/wheels -c constraints.txt \
    --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    ml_collections tensorboardX pillow==13.0.0 2>&1 | grep -v "^WARNING: Location" || true
  cp "$SHARED"/{build.py,cifar10_jpeg.tar.gz} .carry/
  python3 -c "from rvm.train import provenance; print(provenance.commit())" > .carry/commit
  ls .carry/wheels
  echo "$(du -sh .carry | cut -f1) in .carry; commit $(cat .carry/commit)"

  step "3. TINY=1 JAX_PLATFORMS=cpu BENCH_S=$BENCH_S RUN_S=$RUN_S OUT=$OUT bash bench/gpu_session.sh"
  t0=$(date +%s)
  env -u PYTHONPATH -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PATH="$BARE/bin:$PATH" \
    TINY=1 JAX_PLATFORMS=cpu BENCH_S="$BENCH_S" RUN_S="$RUN_S" OUT="$OUT" bash bench/gpu_session.sh
  session=$?
  echo "gpu_session.sh exit status $session after $(($(date +%s) - t0)) s"
  step "3a. its session.log"
  cat "$OUT/session.log"
  step "3b. its gpu.md"
  cat "$OUT/gpu.md"
  step "3c. the run: train.log (tail), results.json"
  tail -n 8 "$OUT/train.log"
  cat "$OUT/results.json"

  step "4. the smoke run in the same environment"
  t0=$(date +%s)
  env -u PYTHONPATH PATH="$BARE/bin:$PATH" python3 -m experiments.train \
    --config=experiments/configs/cifar10.py:smoke --workdir=/tmp/rvm_bare_smoke
  smoke=$?
  echo "smoke run exit status $smoke after $(($(date +%s) - t0)) s"

  step "5. jax, jaxlib, flax, optax, orbax-checkpoint before and after"
  after=$(versions)
  echo "before: $(echo "$before" | tr '\n' ' ')"
  echo "after:  $(echo "$after" | tr '\n' ' ')"
  echo "added: $(comm -13 <(echo "$everything") <(freeze) | tr '\n' ' ')"
  echo "replaced or removed: $(comm -23 <(echo "$everything") <(freeze) | tr '\n' ' ')"
  changed=$([ "$before" = "$after" ] && echo no || echo yes)
  echo "done in $(($(date +%s) - begin)) s: session exit $session, smoke run exit $smoke, changed: $changed"
  [ "$session" = 0 ] && [ "$smoke" = 0 ] && [ "$changed" = no ]
}

# The log goes into the tree once done, so that the commit the session records is clean.
tmp=$(mktemp)
main 2>&1 | tee "$tmp"
status=${PIPESTATUS[0]}
cp "$tmp" "$LOG" && rm -f "$tmp"
exit "$status"
