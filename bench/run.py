"""rvm's benchmark suite: every measurement in its own process, one report per invocation.

    python bench/run.py                       # everything (about 25 min on an idle 2-core VM)
    python bench/run.py --quick               # tiny step counts: a smoke check of the real models
    python bench/run.py --only train,compile  # a subset; see MEASUREMENTS
    python bench/run.py --platform gpu        # the GPU plan (GPU_MEASUREMENTS), bfloat16 included

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
import importlib.metadata
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
from collections.abc import Callable
from pathlib import Path

from rvm.train import hugepages  # the standard library only: no JAX in this process

REPO = Path(__file__).resolve().parents[1]
WIDTHS = (16, 32, 64)
NUM_CLASSES = 10
MEASUREMENTS = (
    "ceiling",  # float32 GFLOP/s of a large matmul (numpy, torch and XLA)
    "train",  # training throughput, rvm against the PyTorch twin
    "compile",  # (18,18,18) compile and init time, nn.scan against unrolled blocks
    "relaxed",  # relaxed against raw sharing, step time
    "stochastic_depth",  # stochastic depth on against off, rvm and torch
    "eval",  # evaluation throughput
    "memory",  # peak RSS of a training process
    "data_parallel",  # rvm over the host's cores as separate XLA devices
    "xla_cpu",  # rvm's step under XLA:CPU's default options against rvm's
    "convs",  # one 3x3 conv per level: rvm under both option sets, and PyTorch
    "malloc",  # rvm and PyTorch steps under glibc's default malloc against huge pages
)
# On a GPU: what its targets need, in the order run (a run cut short keeps the targets).
GPU_MEASUREMENTS = ("ceiling", "stochastic_depth", "eval", "train")
LEVELS = ((32, 16), (16, 32), (8, 64))  # (size, channels) of the three levels' convs
# A conv's passes: the forward convolution, either gradient alone, or all three.
CONV_PASSES = ("forward", "input_grad", "kernel_grad", "train")
CONV_IMPLS = {
    "rvm (Eigen convs)": {"kind": "jax_conv", "xla": "rvm"},
    "XLA default (YNNPACK convs)": {"kind": "jax_conv", "xla": "default"},
    "torch channels_last": {"kind": "torch_conv"},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    platform: str = "cpu"  # or "gpu": where the models run, and which plan
    small: tuple[int, ...] = (3, 4, 4)
    large: tuple[int, ...] = (18, 18, 18)
    batch: int = 128
    eval_batch: int = 1000
    steps: int = 4  # per timed window
    windows: int = 5  # the median window is reported
    warmup: int = 2  # untimed calls, the first (compiling) one included
    rounds: int = 1  # passes over the whole plan; each measurement's fastest pass counts
    matmul_n: int = 4096
    timeout: float = 1800.0  # seconds per child process


# A GPU step takes tens of milliseconds: longer windows, a larger matmul.
GPU_SETTINGS = {"steps": 20, "warmup": 3, "matmul_n": 8192, "timeout": 300.0}
EPOCHS, TRAIN_IMAGES, TEST_IMAGES = 500, 50_000, 10_000  # the paper's CIFAR-10 run


# --- FLOPs -------------------------------------------------------------------------------


def forward_macs(blocks: tuple[int, ...], size: int = 32, channels: int = 3) -> int:
    """Multiply-accumulates of one image's forward pass: every 3x3 conv and the dense head.

    A 3x3 conv producing an HxWxC_out map from C_in channels costs H*W*C_out*C_in*9;
    a padding block's first conv works at the halved size. BatchNorm, ReLU, biases,
    pooling and the optimiser are left out (elementwise, a few percent at most).
    """
    macs = size * size * WIDTHS[0] * channels * 9  # stem
    cin = WIDTHS[0]
    for level, (num, width) in enumerate(zip(blocks, WIDTHS)):
        size //= 2 if level > 0 else 1
        for _ in range(num):
            macs += size * size * width * 9 * (cin + width)  # conv1 (cin -> width), conv2
            cin = width
    return macs + WIDTHS[-1] * NUM_CLASSES


def train_flops(blocks: tuple[int, ...]) -> int:
    """Training FLOPs per image: 3 x forward (backward = input and kernel gradients) x 2 per MAC."""
    return 3 * 2 * forward_macs(blocks)


# --- Specs: what each section measures ---------------------------------------------------


def _timing(s: Settings) -> dict:
    return {"steps": s.steps, "windows": s.windows, "warmup": s.warmup}


def rvm(s: Settings, blocks, sharing="nonshared", sd=False, **extra) -> dict:
    return {
        "kind": "rvm_train",
        "platform": s.platform,
        "dtype": "float32",
        "blocks": list(blocks),
        "sharing": sharing,
        "scope": "all",
        "stochastic_depth": sd,
        "devices": 1,
        "unroll": False,
        "batch": s.batch,
        **_timing(s),
        **extra,
    }


def twin(s: Settings, blocks, sharing="nonshared", layout="channels_last", **extra) -> dict:
    return {
        "kind": "torch_train",
        "platform": s.platform,
        "dtype": "float32",
        "blocks": list(blocks),
        "sharing": sharing,
        "scope": "all",
        "stochastic_depth": False,
        "layout": layout,
        "compile": False,
        "batch": s.batch,
        **_timing(s),
        **extra,
    }


BF16 = {"dtype": "bfloat16"}
IMPLS = {
    "rvm": lambda s, b, sh: rvm(s, b, sh),
    "torch eager NCHW": lambda s, b, sh: twin(s, b, sh, layout="nchw"),
    "torch eager channels_last": lambda s, b, sh: twin(s, b, sh),
    "torch.compile channels_last": lambda s, b, sh: twin(s, b, sh, compile=True),
}
# The GPU's targets are in bfloat16 (PyTorch under autocast); float32 and torch.compile
# for the large model only, to fit a GPU session's few minutes.
GPU_IMPLS = {
    "rvm bfloat16": lambda s, b, sh: rvm(s, b, sh, **BF16),
    "torch eager channels_last bfloat16 autocast": lambda s, b, sh: twin(s, b, sh, **BF16),
    "rvm float32": lambda s, b, sh: rvm(s, b, sh),
    "torch eager channels_last float32": lambda s, b, sh: twin(s, b, sh),
    "torch.compile channels_last bfloat16 autocast": lambda s, b, sh: twin(
        s, b, sh, compile=True, **BF16
    ),
}
GPU_SMALL_IMPLS = tuple(GPU_IMPLS)[:2]
SHARINGS = {"nonshared": "nonshared", "raw": "all-levels raw"}


def model_label(blocks, sharing: str) -> str:
    return f"{tuple(blocks)} {SHARINGS.get(sharing, sharing)}"


def impls(s: Settings, blocks) -> dict[str, Callable[..., dict]]:
    """Implementation label -> spec maker, for one model size on the settings' platform."""
    if s.platform == "cpu":
        return IMPLS
    keep = GPU_IMPLS if tuple(blocks) == tuple(s.large) else GPU_SMALL_IMPLS
    return {label: GPU_IMPLS[label] for label in keep}


def sharings(s: Settings) -> tuple[str, ...]:
    """Sharing modes of section `train`: on a GPU non-shared only (raw does the same FLOPs)."""
    return tuple(SHARINGS) if s.platform == "cpu" else ("nonshared",)


def measurements(s: Settings) -> tuple[str, ...]:
    return MEASUREMENTS if s.platform == "cpu" else GPU_MEASUREMENTS


def plan(s: Settings) -> dict[str, dict[str, dict]]:
    """Section -> label -> spec. Stochastic depth is off unless the section is about it."""
    if s.platform == "gpu":
        return gpu_plan(s)
    eval_timing = {**_timing(s), "steps": 1}  # one window = one eval batch
    two = {"devices": 2, "timeout": min(s.timeout, 900)}  # a hung all-reduce must not hold us
    sections = {
        "ceiling": {
            f"{lib} {s.matmul_n}x{s.matmul_n}": {
                "kind": "matmul",
                "library": lib,
                "n": s.matmul_n,
                **_timing(s),
            }
            for lib in ("numpy", "torch", "jax")
        },
        "train": train_plan(s),
        # The paper's configuration (stochastic depth on); same seed, same dropped blocks.
        "compile": {
            "nn.scan": rvm(s, s.large, sd=True, stages=True),
            "unrolled": rvm(s, s.large, sd=True, unroll=True, stages=True),
        },
        "relaxed": {
            "relaxed": rvm(s, s.large, "relaxed"),
            "raw": rvm(s, s.large, "raw"),
        },
        "stochastic_depth": {
            "rvm on": rvm(s, s.large, sd=True),
            "rvm off": rvm(s, s.large),
            "torch eager channels_last on": twin(s, s.large, stochastic_depth=True),
            "torch eager channels_last off": twin(s, s.large),
        },
        "eval": {
            "rvm evaluate": {
                **rvm(s, s.large, sd=True, kind="rvm_eval", eval_batch=s.eval_batch),
                **eval_timing,
            },
            "torch eager channels_last no_grad": {
                **twin(s, s.large, kind="torch_eval", stochastic_depth=True),
                "eval_batch": s.eval_batch,
                **eval_timing,
            },
        },
        # The training processes of section `train`, read for their peak RSS.
        "memory": {"rvm": rvm(s, s.large), "torch eager channels_last": twin(s, s.large)},
        "data_parallel": {
            f"{tuple(b)} nonshared / {d} device{'s' * (d > 1)}": rvm(s, b, **(two if d > 1 else {}))
            for b in (s.small, s.large)
            for d in (1, 2)
        },
        "xla_cpu": {
            f"{tuple(b)} nonshared / {label}": rvm(s, b, **extra)
            for b in (s.small, s.large)
            for label, extra in (
                ("rvm", {}),
                ("XLA default options (YNNPACK convs)", {"xla": "default"}),
                ("rvm, 2 devices", two),
            )
        },
        "convs": {
            f"{size}x{size}x{c} {kind} / {impl}": {
                **spec,
                "size": size,
                "channels": c,
                "pass": kind,
                "batch": s.batch,
                **_timing(s),
                "steps": 5 * s.steps,  # one conv is ~100x shorter than a step
            }
            for size, c in LEVELS
            for kind in CONV_PASSES
            for impl, spec in CONV_IMPLS.items()
        },
        "malloc": {
            f"{tuple(b)} nonshared {impl} / {malloc}": make(s, b, **extra)
            for b in (s.small, s.large)
            for impl, make in (("rvm", rvm), ("torch eager channels_last", twin))
            for malloc, extra in (("huge pages", {}), ("glibc default", {"malloc": "default"}))
        },
    }
    assert set(sections) == set(MEASUREMENTS)
    return sections


def train_plan(s: Settings) -> dict[str, dict]:
    return {
        f"{model_label(b, sh)} / {impl}": make(s, b, sh)
        for b in (s.small, s.large)
        for sh in sharings(s)
        for impl, make in impls(s, b).items()
    }


def gpu_plan(s: Settings) -> dict[str, dict[str, dict]]:
    """The GPU's sections: rvm in bfloat16 against PyTorch under bfloat16 autocast."""
    eval_timing = {**_timing(s), "steps": 1}
    sections = {
        "ceiling": {
            f"{lib} {dtype} {s.matmul_n}x{s.matmul_n}": {
                "kind": "matmul",
                "library": lib,
                "platform": "gpu",
                "dtype": dtype,
                "n": s.matmul_n,
                **_timing(s),
            }
            for dtype in ("float32", "bfloat16")
            for lib in ("torch", "jax")
        },
        "stochastic_depth": {
            "rvm on": rvm(s, s.large, sd=True, **BF16),
            "rvm off": rvm(s, s.large, **BF16),
            "torch eager channels_last on": twin(s, s.large, stochastic_depth=True, **BF16),
            "torch eager channels_last off": twin(s, s.large, **BF16),
        },
        "eval": {
            "rvm evaluate": {
                **rvm(s, s.large, sd=True, kind="rvm_eval", eval_batch=s.eval_batch, **BF16),
                **eval_timing,
            },
            "torch eager channels_last no_grad": {
                **twin(s, s.large, kind="torch_eval", stochastic_depth=True, **BF16),
                "eval_batch": s.eval_batch,
                **eval_timing,
            },
        },
        "train": train_plan(s),
    }
    assert tuple(sections) == GPU_MEASUREMENTS
    return sections


# --- Running children --------------------------------------------------------------------


def child_env(spec: dict) -> dict[str, str]:
    """The parent's environment on the spec's platform, uncached, with its XLA host devices.

    On the CPU every child, rvm's or PyTorch's, runs with glibc's malloc on huge
    pages, as `experiments.train` does (`rvm.train.hugepages`), unless the spec
    says `"malloc": "default"`.
    """
    platform, malloc = spec.get("platform", "cpu"), spec.get("malloc", "hugepages")
    if platform not in ("cpu", "gpu"):
        raise ValueError(f"platform={platform!r}: 'cpu' or 'gpu'")
    if malloc not in ("hugepages", "default"):
        raise ValueError(f"malloc={malloc!r}: 'hugepages' or 'default'")
    env = dict(os.environ, JAX_PLATFORMS="cpu" if platform == "cpu" else "cuda")
    env["PYTHONPATH"] = str(REPO)
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
    env["XLA_FLAGS"] = " ".join(flags)
    return env


class Runner:
    """Runs each distinct spec once per round in a subprocess with a timeout.

    A failed run becomes a record with the log's tail. The record returned for a spec
    combines every round run so far (`fastest_round`); a spec already run in round
    `round_` (requested by several sections) is not run again.
    """

    def __init__(self, timeout: float, workdir: Path):
        self.timeout, self.workdir = timeout, workdir
        self.runs: dict[str, list[dict]] = {}

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
        n, timeout = sum(map(len, self.runs.values())), spec.get("timeout", self.timeout)
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
    is kept for the spread, each round's median in `round_steps_s`. A failed round
    makes the record a failure; peak memory is the largest, other figures (first
    call, compile stages) the median over rounds.
    """
    failed = [r for r in runs if not r["ok"]]
    if failed or len(runs) == 1:
        return failed[0] if failed else runs[0]
    best = min(runs, key=lambda r: r["step_s"])
    out = {**best, "rounds": len(runs), "wall_s": sum(r["wall_s"] for r in runs)}
    out["windows_s"] = [w for r in runs for w in r["windows_s"]]
    out["round_steps_s"] = [r["step_s"] for r in runs]
    for key, value in best.items():
        if key in ("windows_s", "step_s", "wall_s", "gflops") or not isinstance(value, float):
            continue
        values = [r[key] for r in runs]
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


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --- Report ------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _step(r: dict | None) -> float | None:
    return r["step_s"] if r and r.get("ok") else None


def _spread(r: dict) -> str:
    w = r["windows_s"]
    return f"{_fmt(r['step_s'])} [{_fmt(min(w))}-{_fmt(max(w))}]"


def _target(name: str, value: float | None, bound: float, at_most: bool, unit: str = "") -> dict:
    """A target with its margin: how far the value sits inside (+) or outside (-) the bound."""
    if value is None:
        return {"target": name, "pass": None, "text": "not measured"}
    ok = value <= bound if at_most else value >= bound
    margin = (bound - value) if at_most else (value - bound)
    verdict = "PASS" if ok else "FAIL"
    text = f"{verdict}: {value:.3g}{unit} vs {bound:.3g}{unit} (margin {margin:+.3g}{unit})"
    return {"target": name, "pass": ok, "value": value, "bound": bound, "text": text}


def _failures(section: dict) -> list[str]:
    lines = []
    for label, r in section.items():
        if not r["ok"]:
            tail = (r["log_tail"] or "(empty log)").replace("\n", "\n    ")
            lines += [f"- **{label}** failed: {r['error']}. Log tail:", "", f"    {tail}", ""]
    return lines


def _dtype(r: dict) -> str:
    return r["spec"].get("dtype", "float32")


def ceilings(res: dict) -> dict[str, float]:
    """dtype -> the fastest matmul's GFLOP/s in it: the ceiling FLOP rates are read against."""
    out: dict[str, float] = {}
    for r in res.values():
        if r["ok"]:
            out[_dtype(r)] = max(out.get(_dtype(r), 0.0), r["gflops"])
    return out


def report_ceiling(res: dict, ctx: dict) -> list[str]:
    lines = ["| matmul | s | GFLOP/s |", "| --- | --- | --- |"]
    for label, r in res.items():
        if r["ok"]:
            lines.append(f"| {label} | {_spread(r)} | {r['gflops']:.1f} |")
    lines.append("")
    used = ", ".join(f"{_fmt(g)} GFLOP/s in {d}" for d, g in ctx["ceilings"].items())
    lines.append(f"Ceiling used below: **{used or 'n/a'}** (the fastest matmul in each dtype).")
    return lines


def _rvm_of(res: dict, model: str, r: dict) -> dict | None:
    """rvm's run of `model` in the dtype of run `r`: what `r` is compared with."""
    for label, other in res.items():
        if label.startswith(f"{model} / rvm") and other["spec"]["kind"] == "rvm_train":
            if _dtype(other) == _dtype(r):
                return other
    return None


def report_train(res: dict, ctx: dict, s: Settings) -> list[str]:
    dtypes = "float32" if s.platform == "cpu" else "float32 or bfloat16 (PyTorch: autocast)"
    lines = [
        f"Batch {s.batch}, {dtypes}, synthetic 32x32 images, stochastic depth off. Training "
        "FLOPs per image = 3 x 2 x forward MACs (3x3 convs + head): "
        + ", ".join(f"{tuple(b)} {train_flops(b) / 1e9:.3f} GFLOP" for b in (s.small, s.large))
        + ". Step = median of the windows [fastest-slowest], of the fastest round when there "
        "are several. `vs rvm` and `of ceiling`: against rvm and the matmul ceiling in the "
        "same dtype.",
        "",
        "| model | implementation | s/step | images/s | vs rvm | GFLOP/s | of ceiling "
        "| first call s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for blocks in (s.small, s.large):
        for sharing in sharings(s):
            model = model_label(blocks, sharing)
            for impl in impls(s, blocks):
                r = res.get(f"{model} / {impl}")
                if not r or not r["ok"]:
                    lines.append(f"| {model} | {impl} | failed | | | | | |")
                    continue
                ips = s.batch / r["step_s"]
                gflops = ips * train_flops(blocks) / 1e9
                base = _step(_rvm_of(res, model, r))
                ratio = _fmt(base / r["step_s"]) + "x" if base else "n/a"
                ceiling = ctx["ceilings"].get(_dtype(r))
                frac = f"{100 * gflops / ceiling:.1f}%" if ceiling else "n/a"
                lines.append(
                    f"| {model} | {impl} | {_spread(r)} | {ips:.1f} | {ratio} | {gflops:.1f} "
                    f"| {frac} | {_fmt(r['first_call_s'])} |"
                )
    return lines


def report_compile(res: dict, ctx: dict, s: Settings) -> list[str]:
    lines = [
        f"{tuple(s.large)} nonshared, stochastic depth on (the paper's run), batch {s.batch}. "
        "`init` = `build_run` (jit of the init, its run, data put on device). The step is "
        "traced, lowered to StableHLO and compiled by XLA ahead of time, each stage timed; "
        "`compile` = their sum, `first run` = the first execution after it.",
        "",
        "| blocks | init s | trace s | lower s | XLA compile s | compile s | first run s "
        "| s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in res.items():
        if r["ok"]:
            lines.append(
                f"| {label} | {_fmt(r['init_s'])} | {_fmt(r['trace_s'])} | {_fmt(r['lower_s'])} "
                f"| {_fmt(r['compile_s'])} | {_fmt(_compile_s(r))} | {_fmt(r['first_call_s'])} "
                f"| {_spread(r)} |"
            )
    return lines


def _compile_s(r: dict) -> float:
    """Trace + lower + XLA compile of the step, measured ahead of time."""
    return r["trace_s"] + r["lower_s"] + r["compile_s"]


def report_steps(res: dict, ctx: dict, s: Settings, note: str) -> list[str]:
    lines = [note, "", "| run | s/step | images/s |", "| --- | --- | --- |"]
    for label, r in res.items():
        if r["ok"]:
            lines.append(f"| {label} | {_spread(r)} | {s.batch / r['step_s']:.1f} |")
    return lines


def report_eval(res: dict, ctx: dict, s: Settings) -> list[str]:
    flops = 2 * forward_macs(s.large)
    lines = [
        f"{tuple(s.large)} nonshared in eval mode, one batch of {s.eval_batch} per window "
        f"({flops / 1e9:.3f} GFLOP per image); rvm through `image_task.evaluate` "
        "(host-to-device copy, jitted forward, error and loss).",
        "",
        "| implementation | s/batch | images/s | of ceiling |",
        "| --- | --- | --- | --- |",
    ]
    for label, r in res.items():
        if r["ok"]:
            ips = s.eval_batch / r["step_s"]
            ceiling = ctx["ceilings"].get(_dtype(r))
            frac = f"{100 * ips * flops / 1e9 / ceiling:.1f}%" if ceiling else "n/a"
            lines.append(f"| {label} | {_spread(r)} | {ips:.1f} | {frac} |")
    return lines


def report_memory(res: dict, ctx: dict, s: Settings) -> list[str]:
    lines = [
        f"Peak RSS (`ru_maxrss`) of the process training {tuple(s.large)} nonshared at batch "
        f"{s.batch} (compilation included); baseline = RSS after imports and data, before "
        "the model.",
        "",
        "| process | peak MiB | baseline MiB | peak - baseline MiB |",
        "| --- | --- | --- | --- |",
    ]
    for label, r in res.items():
        if r["ok"]:
            peak, base = r["max_rss_mb"], r["baseline_rss_mb"]
            lines.append(f"| {label} | {peak:.0f} | {base:.0f} | {peak - base:.0f} |")
    return lines


def _report_against(res: dict, s: Settings, note: str, base: str, column: str) -> list[str]:
    """Step times, each also as a ratio to the run labelled `<same model> / <base>`."""
    lines = [note, "", f"| run | s/step | images/s | {column} |", "| --- | --- | --- | --- |"]
    for label, r in res.items():
        if r["ok"]:
            ref = _step(res.get(label.rsplit("/", 1)[0] + "/ " + base))
            ratio = f"{ref / r['step_s']:.2f}x" if ref else "n/a"
            lines.append(f"| {label} | {_spread(r)} | {s.batch / r['step_s']:.1f} | {ratio} |")
    return lines


# Sections reported as step times against one run of the same model: note, that run's
# label (after the model), and the ratio column's heading.
AGAINST = {
    "data_parallel": (
        "rvm's step over a `(\"data\",)` mesh of the host's cores as separate XLA devices "
        "(`--xla_force_host_platform_device_count`), against one device.",
        "1 device",
        "speed-up",
    ),
    "xla_cpu": (
        "rvm's training step (stochastic depth off) as shipped, compiled with XLA:CPU's "
        "default options (convolutions through YNNPACK, not `rvm.train.xla.CPU_OPTIONS`), "
        "and as shipped over two XLA host devices.",
        "rvm",
        "vs rvm",
    ),
    "malloc": (
        "Training steps (stochastic depth off) with glibc's malloc on transparent huge pages "
        "(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, how every other section runs and how "
        "`experiments.train` restarts itself) against glibc's default malloc.",
        "huge pages",
        "vs huge pages",
    ),
}


def report_convs(res: dict, ctx: dict, s: Settings) -> list[str]:
    lines = [
        f"One 3x3 conv, C -> C channels, same size, batch {s.batch}, float32: `forward`, "
        "`input_grad` or `kernel_grad` alone (the same FLOPs), or `train` = forward + input "
        "gradient + kernel gradient (3x the FLOPs). GFLOP/s (median window); rvm's "
        "`conv3x3` (custom VJP, the kernel gradient's transposes included) under its "
        "options and under XLA's defaults, and `nn.Conv2d` channels_last (a gradient "
        "alone through `torch.nn.grad`).",
        "",
        "| conv | pass | " + " | ".join(CONV_IMPLS) + " |",
        "| --- | --- |" + " --- |" * len(CONV_IMPLS),
    ]
    for size, c in LEVELS:
        for kind in CONV_PASSES:
            cells = []
            for impl in CONV_IMPLS:
                r = res.get(f"{size}x{size}x{c} {kind} / {impl}")
                cells.append(f"{r['gflops']:.0f}" if r and r["ok"] else "n/a")
            lines.append(f"| {size}x{size}x{c} | {kind} | " + " | ".join(cells) + " |")
    return lines


def targets(results: dict, s: Settings) -> list[dict]:
    """The suite's targets, for the sections that ran; each with pass/fail and margin."""
    out = []
    ratio = lambda a, b: a / b if a and b else None
    large = tuple(s.large)
    # CPU: rvm at half PyTorch's speed at least; GPU: as fast in bfloat16.
    mine, theirs, bound = (
        ("rvm", "torch eager channels_last", 0.5)
        if s.platform == "cpu"
        else ("rvm bfloat16", "torch eager channels_last bfloat16 autocast", 1.0)
    )
    if "train" in results:
        train = results["train"]
        for blocks in (s.small, s.large):
            for sharing in sharings(s):
                model = model_label(blocks, sharing)
                a = _step(train.get(f"{model} / {mine}"))
                b = _step(train.get(f"{model} / {theirs}"))
                name = f"{model}: {mine} >= {bound:g}x {theirs} throughput"
                out.append(_target(name, ratio(b, a), bound, at_most=False, unit="x"))
    if "compile" in results:
        scan, unrolled = results["compile"].get("nn.scan"), results["compile"].get("unrolled")
        compile_s = lambda r: _compile_s(r) if r and r["ok"] else None
        name = f"{large} compile time: scan <= 1/3 of unrolled"
        out.append(_target(name, ratio(compile_s(scan), compile_s(unrolled)), 1 / 3, True, "x"))
        name = f"{large} step: scan no slower than unrolled"
        out.append(_target(name, ratio(_step(scan), _step(unrolled)), 1.0, True, "x"))
    if "relaxed" in results:
        rel = results["relaxed"]
        name = f"{large} all levels: relaxed step within 5% of raw"
        out.append(
            _target(name, ratio(_step(rel.get("relaxed")), _step(rel.get("raw"))), 1.05, True, "x")
        )
    if "stochastic_depth" in results:
        sd = results["stochastic_depth"]
        on, off = _step(sd.get("rvm on")), _step(sd.get("rvm off"))
        if s.platform == "cpu":
            name = f"{large} rvm: stochastic depth step no slower than off"
            out.append(_target(name, ratio(on, off), 1.0, True, "x"))
        else:
            name = f"{large} rvm: stochastic depth step at least 15% faster than off (speed-up)"
            out.append(_target(name, ratio(off, on), 1.15, False, "x"))
    return out


def projection(results: dict, s: Settings) -> list[dict]:
    """Projected wall time of the paper's run of the large model: every epoch's training
    steps with stochastic depth on (section `stochastic_depth`) and one evaluation of
    the test set (section `eval`), for rvm and PyTorch; checkpoints and logging left out.
    """
    sd, ev = results.get("stochastic_depth", {}), results.get("eval", {})
    steps = EPOCHS * (TRAIN_IMAGES // s.batch)
    out = []
    torch = "torch eager channels_last"
    for impl, train_label, eval_label in (
        ("rvm", "rvm on", "rvm evaluate"),
        (torch, f"{torch} on", f"{torch} no_grad"),
    ):
        step, eval_batch_s = _step(sd.get(train_label)), _step(ev.get(eval_label))
        if not step or not eval_batch_s:
            continue
        eval_s = EPOCHS * TEST_IMAGES / s.eval_batch * eval_batch_s
        row = {"implementation": impl, "dtype": _dtype(sd[train_label]), "step_s": step}
        row.update(steps=steps, train_h=steps * step / 3600, eval_h=eval_s / 3600)
        row["total_h"] = row["train_h"] + row["eval_h"]
        out.append(row)
    return out


def report_projection(rows: list[dict], s: Settings) -> list[str]:
    lines = [
        f"The paper's run of {tuple(s.large)}: {EPOCHS} epochs of {TRAIN_IMAGES // s.batch} "
        f"steps at batch {s.batch} with stochastic depth on (section `stochastic_depth`), and "
        f"the {TEST_IMAGES} test images evaluated after each epoch (section `eval`); "
        "checkpoints and logging left out.",
        "",
        "| implementation | dtype | s/step | training h | evaluation h | total h |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['implementation']} | {r['dtype']} | {_fmt(r['step_s'])} | {r['train_h']:.1f} "
            f"| {r['eval_h']:.2f} | {r['total_h']:.1f} |"
        )
    return lines


def render(doc: dict, s: Settings) -> str:
    """The markdown report of `doc` (the JSON written beside it)."""
    m, v, res = doc["machine"], doc["versions"], doc["results"]
    ctx = {"ceilings": doc["ceiling_gflops"]}
    lines = [
        f"# rvm benchmark: {doc['name']}",
        "",
        f"- date: {doc['date']} (wall {doc.get('wall_s', 0) / 60:.1f} min)",
        f"- command: `{doc['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB, "
        f"ISA {' '.join(m['isa']) or 'n/a'}; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in m['load_average_at_start'])} (1/5/15 min)"
        + (f"; GPU {'; '.join(m['gpus'])}" if "gpus" in m else ""),
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- settings: {json.dumps(dataclasses.asdict(s))}",
        "",
    ]
    # The suite's own children load the machine, so only the load at the start says
    # whether something else was running.
    load = m["load_average_at_start"][0]
    if load > 0.5 * (m["logical_cores"] or 1):
        lines += [
            f"**Warning: the machine was busy (1-minute load average up to {load:.1f} on "
            f"{m['logical_cores']} cores); multi-threaded timings are unreliable.**",
            "",
        ]
    if doc["targets"]:
        lines += ["## Targets", ""] + [f"- {t['target']}: {t['text']}" for t in doc["targets"]]
        lines.append("")
    against = lambda name: lambda r, c, s: _report_against(r, s, *AGAINST[name])
    sections: dict[str, Callable[..., list[str]]] = {
        "ceiling": lambda r, c, s: report_ceiling(r, c),
        "train": report_train,
        "compile": report_compile,
        "relaxed": lambda r, c, s: report_steps(
            r, c, s, f"{tuple(s.large)}, all levels in scope, stochastic depth off."
        ),
        "stochastic_depth": lambda r, c, s: report_steps(
            r, c, s, f"{tuple(s.large)} nonshared, the paper's death rates (0 to 0.5) or none."
        ),
        "eval": report_eval,
        "memory": report_memory,
        "data_parallel": against("data_parallel"),
        "xla_cpu": against("xla_cpu"),
        "convs": report_convs,
        "malloc": against("malloc"),
    }
    for name, body in sections.items():
        if name in res:
            lines += [f"## {name}", ""] + body(res[name], ctx, s) + [""] + _failures(res[name])
    if doc["projection"]:
        lines += ["## projection", ""] + report_projection(doc["projection"], s) + [""]
    return "\n".join(lines) + "\n"


def derive(doc: dict, s: Settings) -> None:
    """Sets what `doc`'s results imply: the ceilings, the targets' verdicts, the projection."""
    res = doc["results"]
    doc["ceiling_gflops"] = ceilings(res.get("ceiling", {}))
    doc["targets"] = targets(res, s)
    doc["projection"] = projection(res, s)


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
    parser.add_argument("--out", help="result path without extension (default bench/results/NAME)")
    args = parser.parse_args(argv)

    s = settings_from(args)
    known = measurements(s)
    selected = known if not args.only else tuple(args.only.split(","))
    unknown = set(selected) - set(known)
    if unknown:
        parser.error(
            f"unknown measurement(s) {sorted(unknown)} on {s.platform}; known: {', '.join(known)}"
        )
    if "train" in selected or "eval" in selected:
        selected = tuple(dict.fromkeys(("ceiling", *selected)))  # the FLOP fractions need it
    name = "tiny" if args.tiny else "quick" if args.quick else s.platform
    name = f"{name}_gpu" if s.platform == "gpu" and name != "gpu" else name
    out = Path(args.out) if args.out else REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)

    doc = {
        "name": out.name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(s.platform),
        "versions": versions(),
        "settings": dataclasses.asdict(s),
        "results": {},
    }
    derive(doc, s)
    specs = plan(s)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rvm_bench_") as tmp:
        runner = Runner(s.timeout, Path(tmp))
        for round_ in range(s.rounds):
            for section in selected:
                rounds = f" round {round_ + 1}/{s.rounds}" if s.rounds > 1 else ""
                print(f"[{section}]{rounds}", flush=True)
                doc["results"][section] = {}
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
