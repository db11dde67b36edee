"""Where rvm's CPU train step spends its time, or its compilation its kernels.

    python -m bench.profile                       # (18,18,18) non-shared, SD off
    python -m bench.profile --blocks 3,4,4 --sd   # another model, stochastic depth on
    python -m bench.profile --unroll --compile    # count kernel compilations instead
    python -m bench.profile --compile --once      # ... with the step compiled as a one-off

Like `experiments.train`, it first restarts itself with glibc's malloc on huge pages
(`rvm.train.hugepages`); `--default-malloc` keeps glibc's default.

Step mode traces `--steps` steps of `build_run`'s step with `jax.profiler` (XLA:CPU
per-op trace events on) and prints the thread-milliseconds per step of each kind
of XLA op (fusion names without their numeric suffix), summed over threads, plus
the page faults and system time per step from `getrusage`. Eigen's convolutions
run as asynchronous work that the trace does not attribute to them, so they show
up as the step's wall time that the listed ops do not cover. Compile mode traces
the ahead-of-time compilation of the step and counts the machine-code kernels XLA
generated (one per distinct fusion) and the time spent doing so; `--once` compiles
the step with `rvm.train.xla.ONCE_OPTIONS` added (LLVM level 0), to see how much of
that time is LLVM's optimisation.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax

from bench import measure_rvm
from rvm.train import hugepages


def _events(trace_dir: str):
    """(thread name, event name, duration ns) of every event in the trace."""
    from jax.profiler import ProfileData

    (path,) = Path(trace_dir).rglob("*.xplane.pb")
    for plane in ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            for event in line.events:
                yield line.name, event.name, event.duration_ns


def _build(args):
    from rvm.data import load_images
    from rvm.train import loop
    from rvm.train import sharding as shd

    config = measure_rvm.rvm_config(
        {
            "blocks": args.blocks,
            "sharing": args.sharing,
            "stochastic_depth": args.sd,
            "batch": args.batch,
            "unroll": args.unroll,
        }
    )
    data = load_images(config.data)
    return loop.build_run(config, data, shd.data_mesh(jax.devices()))


def profile_step(run, steps: int) -> None:
    state = run.state
    for _ in range(2):  # compile and warm up
        state, _ = run.step_fn(state, run.train_data)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            state, _ = run.step_fn(state, run.train_data)
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        wall = (time.perf_counter() - start) / steps
        after = resource.getrusage(resource.RUSAGE_SELF)
        kinds = collections.Counter()
        for thread, name, ns in _events(trace_dir):
            if thread.startswith("tf_XLA") and not name.startswith(("ThunkExecutor", "end: ")):
                kinds[re.sub(r"\.\d+$", "", name)] += ns / 1e6 / steps
    faults = (after.ru_minflt - before.ru_minflt) / steps
    print(f"step (traced): {wall * 1e3:.0f} ms wall on {os.cpu_count()} cores")
    print(
        f"page faults: {faults:.0f}/step ({faults * resource.getpagesize() / 2**20:.0f} MiB), "
        f"system time {(after.ru_stime - before.ru_stime) / steps * 1e3:.0f} ms/step"
    )
    print(f"XLA ops, thread-ms per step (total {sum(kinds.values()):.0f}):")
    for name, ms in kinds.most_common(20):
        print(f"  {ms:8.1f}  {name}")


def profile_compile(run, once: bool) -> None:
    from rvm.train import xla

    traced = run.step_fn.trace(run.state, run.train_data)
    lowered = traced.lower()
    options = xla.compiler_options(once=once)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        lowered.compile(options)
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        events = list(_events(trace_dir))
    kernels = [ns for _, name, ns in events if name == "FusionCompiler::Compile"]
    print(f"XLA compile: {wall:.2f} s wall")
    print(f"kernels compiled: {len(kernels)}, {sum(kernels) / 1e9:.2f} thread-s")
    phases = collections.Counter()
    for thread, name, ns in events:  # the compiler's own thread: its passes and phases
        if thread.startswith("tf_PjRtCompiler") and not name.startswith(("PjRt", "CpuCompiler")):
            phases[name] += ns / 1e9
    print("longest phases on the compiling thread, s (nested phases overlap):")
    for name, sec in phases.most_common(8):
        print(f"  {sec:6.2f}  {name}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    blocks = lambda s: [int(b) for b in s.split(",")]
    parser.add_argument("--blocks", type=blocks, default=[18, 18, 18])
    parser.add_argument("--sharing", default="nonshared")
    parser.add_argument("--sd", action="store_true", help="stochastic depth on")
    parser.add_argument("--unroll", action="store_true", help="blocks unrolled, not scanned")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="profile compilation instead")
    parser.add_argument(
        "--once", action="store_true", help="with --compile: add rvm.train.xla.ONCE_OPTIONS"
    )
    parser.add_argument(
        "--default-malloc", action="store_true", help="glibc's default malloc, not huge pages"
    )
    args = parser.parse_args(argv)
    if not args.default_malloc:
        hugepages.reexec()  # as experiments.train and every bench/run.py child run
    # Per-op trace events of XLA:CPU; must be set before the backend starts.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    ).strip()
    run = _build(args)
    profile_compile(run, args.once) if args.compile else profile_step(run, args.steps)


if __name__ == "__main__":
    main(sys.argv[1:])
