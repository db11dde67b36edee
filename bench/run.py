"""rvm's benchmark suite: every measurement in its own process, one report per invocation.

    python bench/run.py                       # everything (about 25 min on an idle 2-core VM)
    python bench/run.py --quick               # tiny step counts: a smoke check of the real models
    python bench/run.py --only train,compile  # a subset; see bench/plan.py
    python bench/run.py --platform gpu        # the GPU plan, bfloat16 included

Writes `bench/results/<name>.md` and `.json` (rewritten after each measurement, so
an interrupted run keeps what it measured). This process imports neither JAX
nor PyTorch: `bench/measure.py` runs each measurement in a fresh subprocess, so
the frameworks never share threads or memory, XLA flags can differ per
measurement, and a hung or aborted child (a 2-device XLA:CPU all-reduce can
abort after 40 s when other processes load the cores) is reported, not fatal.
Identical measurements requested by several sections run once per invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, `bench` still imports as a package

from bench.plan import GPU_MEASUREMENTS, GPU_SETTINGS, MEASUREMENTS, Settings, measurements, plan
from bench.report import render
from bench.targets import derive
from rvm.train import hugepages, provenance  # no JAX at import: this process has none

# --- Running children --------------------------------------------------------------------


def child_env(spec: dict) -> dict[str, str]:
    """The parent's environment on the spec's platform, uncached, with its XLA host devices
    and the spec's `xla_flags` after the parent's XLA_FLAGS.

    On the CPU every child, rvm's or PyTorch's, runs with glibc's malloc on huge
    pages, as `experiments.train` does (`rvm.train.hugepages`), unless the spec
    says `"malloc": "default"`. On a GPU host it sees one GPU, the first visible one.
    The repository comes first on PYTHONPATH, the caller's path after it (where a
    GPU host may have installed what rvm needs).
    """
    platform, malloc = spec.get("platform", "cpu"), spec.get("malloc", "hugepages")
    if platform not in ("cpu", "gpu"):
        raise ValueError(f"platform={platform!r}: 'cpu' or 'gpu'")
    if malloc not in ("hugepages", "default"):
        raise ValueError(f"malloc={malloc!r}: 'hugepages' or 'default'")
    # A caller's JAX_PLATFORMS=cpu runs the GPU plan's JAX children on the CPU: a dry run.
    dry = os.environ.get("JAX_PLATFORMS") == "cpu"
    env = dict(os.environ, JAX_PLATFORMS="cpu" if platform == "cpu" or dry else "cuda")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if platform == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if platform == "cpu" and malloc == "hugepages":
        env = hugepages.environ(env)
    # No persistent compilation caches: a first call always compiles from scratch.
    env.update(JAX_ENABLE_COMPILATION_CACHE="false", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if spec.get("devices", 1) > 1:
        flags.append(f"--xla_force_host_platform_device_count={spec['devices']}")
    flags += spec.get("xla_flags", "").split()
    env["XLA_FLAGS"] = " ".join(flags)
    return env


class Runner:
    """Runs each distinct spec once per round in a subprocess with a timeout.

    A failed run becomes a record with the log's tail. The record returned for a spec
    combines every round run so far (`fastest_round`); a spec already run in round
    `round_` (requested by several sections) is not run again. With a `deadline`
    (a `time.perf_counter()` value) no process outlives it: one that would start
    within `MIN_RUN_S` of it is not started, and a running one is stopped there.
    """

    MIN_RUN_S = 20.0

    def __init__(self, timeout: float, workdir: Path, deadline: float | None = None):
        self.timeout, self.workdir, self.deadline = timeout, workdir, deadline
        self.runs: dict[str, list[dict]] = {}

    def time_limit(self, spec: dict) -> float | None:
        """Seconds `spec` may run now; None when the deadline leaves too little."""
        limit = spec.get("timeout", self.timeout)
        if self.deadline is None:
            return limit
        left = self.deadline - time.perf_counter()
        return min(limit, left) if left >= self.MIN_RUN_S else None

    def __call__(self, spec: dict, label: str, round_: int = 0) -> dict:
        runs = self.runs.setdefault(json.dumps(spec, sort_keys=True), [])
        if len(runs) > round_:
            print(f"  {label}: measured above", flush=True)
        else:
            print(f"  {label} ...", end=" ", flush=True)
            runs.append(self._run(spec))
            print(_summary(runs[-1]), flush=True)
        return fastest_round(runs)

    def _run(self, spec: dict) -> dict:
        n, timeout = sum(map(len, self.runs.values())), self.time_limit(spec)
        if timeout is None:
            error = "not run: too little time left before --deadline"
            return {"spec": spec, "wall_s": 0.0, "ok": False, "error": error}
        out, log = self.workdir / f"{n}.json", self.workdir / f"{n}.log"
        cmd = [sys.executable, "-m", "bench.measure", json.dumps(spec), str(out)]
        start = time.perf_counter()
        with open(log, "w") as logf:
            # A session of its own, so a timeout also ends torch.compile's worker processes.
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=child_env(spec),
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        wall = time.perf_counter() - start
        record = {"spec": spec, "wall_s": wall}
        if rc == 0 and out.exists():
            return {**record, "ok": True, **json.loads(out.read_text())}
        tail = log.read_text(errors="replace")[-1500:].strip()
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
        return {**record, "ok": False, "error": why, "log_tail": tail}


def fastest_round(runs: list[dict]) -> dict:
    """One record for the rounds of a measurement: the step of its fastest round.

    Other tenants of a shared VM only ever slow a measurement down, sometimes for a
    minute at a stretch, so the round with the lowest median window is the best
    estimate of the code's own speed (as `timeit` takes the minimum); every window
    is kept for the spread, each round's median in `round_steps_s`. Failed rounds
    are left out and counted (`failed_rounds`), the first failure kept when every
    round failed; peak memory is the largest, other figures (first call, compile
    stages) the median over rounds.
    """
    done = [r for r in runs if r["ok"]]
    failed = len(runs) - len(done)
    if not done:
        return runs[0]
    if len(done) == 1:
        return {**done[0], "failed_rounds": failed} if failed else done[0]
    best = min(done, key=lambda r: r["step_s"])
    out = {**best, "rounds": len(done), "wall_s": sum(r["wall_s"] for r in runs)}
    if failed:
        out["failed_rounds"] = failed
    out["windows_s"] = [w for r in done for w in r["windows_s"]]
    out["round_steps_s"] = [r["step_s"] for r in done]
    for key, value in best.items():
        if key in ("windows_s", "step_s", "wall_s", "gflops") or not isinstance(value, float):
            continue
        values = [r[key] for r in done]
        out[key] = max(values) if key == "max_rss_mb" else statistics.median(values)
    return out


def _summary(r: dict) -> str:
    if not r["ok"]:
        return f"FAILED ({r['error']})"
    if "gflops" in r:
        return f"{r['gflops']:.1f} GFLOP/s"
    return (
        f"{r['step_s']:.3g} s/step, first call {r['first_call_s']:.3g} s, wall {r['wall_s']:.0f} s"
    )


# --- Machine -----------------------------------------------------------------------------


def gpus() -> list[str]:
    """`nvidia-smi`'s name, memory and driver of each GPU (this process loads no CUDA)."""
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        cmd = ["nvidia-smi", query, "--format=csv,noheader"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"nvidia-smi failed: {e}"]
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine(platform_: str = "cpu") -> dict:
    """CPU model, cores, memory, selected ISA flags, the load when the run began; the GPUs."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
    model = next((v.strip() for k, v in fields if k.strip() == "model name"), platform.processor())
    flags = next((v.split() for k, v in fields if k.strip() == "flags"), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    meminfo = Path("/proc/meminfo")
    mem_kb = int(meminfo.read_text().split()[1]) if meminfo.exists() else 0
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "isa": [f for f in wanted if f in flags],
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        **({"gpus": gpus()} if platform_ == "gpu" else {}),
    }


# --- Main --------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(platform=args.platform)
    if s.platform == "gpu":
        s = dataclasses.replace(s, **GPU_SETTINGS)
    if args.quick:
        s = dataclasses.replace(s, steps=1, windows=2, warmup=1, eval_batch=250, matmul_n=2048)
    if args.tiny:
        s = dataclasses.replace(
            s,
            small=(1, 2, 2),
            large=(2, 2, 2),
            batch=16,
            eval_batch=32,
            steps=1,
            windows=2,
            warmup=1,
            matmul_n=256,
        )
    names = ("steps", "windows", "warmup", "rounds", "timeout", "batch")
    given = {k: getattr(args, k) for k in names}
    if args.packs:
        given["packs"] = tuple(int(k) for k in args.packs.split(","))
    return dataclasses.replace(s, **{k: x for k, x in given.items() if x is not None})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 step x 2 windows: a smoke check")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and batch: tests the harness only"
    )
    parser.add_argument(
        "--platform", choices=("cpu", "gpu"), default="cpu", help="where the models run"
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated subset of {','.join(MEASUREMENTS)} "
        f"(on a GPU: {','.join(GPU_MEASUREMENTS)})",
    )
    parser.add_argument("--steps", type=int, help="steps per timed window")
    parser.add_argument("--windows", type=int, help="timed windows (the median is reported)")
    parser.add_argument("--warmup", type=int, help="untimed calls, the compiling one included")
    parser.add_argument(
        "--rounds", type=int, help="passes over all measurements, the fastest counts (default 1)"
    )
    parser.add_argument("--batch", type=int, help="training batch size (default 128)")
    parser.add_argument("--timeout", type=float, help="seconds per measurement process")
    parser.add_argument("--packs", help="runs per pack in section packed (default 1,2,4,8)")
    parser.add_argument("--out", help="result path without extension (default bench/results/NAME)")
    parser.add_argument(
        "--deadline",
        type=float,
        help="seconds from the start by which every measurement has ended (the report is "
        "written with what fitted), for a machine lent for a fixed time",
    )
    args = parser.parse_args(argv)

    s = settings_from(args)
    known = measurements(s)
    selected = known if not args.only else tuple(args.only.split(","))
    unknown = set(selected) - set(known)
    if unknown:
        parser.error(
            f"unknown measurement(s) {sorted(unknown)} on {s.platform}; known: {', '.join(known)}"
        )
    if ("train" in selected or "eval" in selected) and "ceiling" not in selected:
        selected = ("ceiling", *selected)  # the FLOP fractions need it
    name = "tiny" if args.tiny else "quick" if args.quick else s.platform
    name = f"{name}_gpu" if s.platform == "gpu" and name != "gpu" else name
    out = Path(args.out) if args.out else REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)

    doc = {
        "name": out.name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "commit": provenance.commit(),
        "machine": machine(s.platform),
        "versions": provenance.versions((*provenance.PACKAGES, "torch")),
        "settings": dataclasses.asdict(s),
        "results": {},
    }
    derive(doc, s)
    specs = plan(s)
    # SIGTERM (a scheduler's or `timeout`'s) unwinds like Ctrl-C, so the running child's
    # session is killed (`Runner._run`) instead of holding the cores or the GPU's memory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rvm_bench_") as tmp:
        deadline = None if args.deadline is None else start + args.deadline
        runner = Runner(s.timeout, Path(tmp), deadline)
        for round_ in range(s.rounds):
            for section in selected:
                rounds = f" round {round_ + 1}/{s.rounds}" if s.rounds > 1 else ""
                print(f"[{section}]{rounds}", flush=True)
                doc["results"].setdefault(section, {})  # a cut-short round keeps the last
                for label, spec in specs[section].items():
                    doc["results"][section][label] = runner(spec, label, round_)
                    doc["wall_s"] = time.perf_counter() - start
                    derive(doc, s)
                    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
                    out.with_suffix(".md").write_text(render(doc, s))
    doc["machine"]["load_average_at_end"] = os.getloadavg()
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(doc, s))
    print(f"wrote {out.with_suffix('.md')} and .json")
    for t in doc["targets"]:
        print(f"  {t['target']}: {t['text']}")


if __name__ == "__main__":
    main()
