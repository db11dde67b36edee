"""What every measurement child shares: timed windows of steps after a warm-up, the
barrier that lines up processes measured together, memory, and the spec's dtype.

Timing: `time.perf_counter` around windows of `steps` steps after warm-up, ended by
the framework's own synchronisation (JAX results blocked on, CUDA synchronised); a
result holds every window's seconds per step and their median.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    """Current resident set size, for the baseline before any model is built."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def spec_dtype(spec: dict) -> str:
    dtype = spec.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: 'float32' or 'bfloat16'")
    return dtype


def synchronous(out: Any) -> Any:
    """Nothing to wait for: the call returned when its work was done (eager CPU, host values)."""
    return out


def barrier(spec: dict) -> None:
    """Waits until the spec's `barrier` (`{"dir": ..., "n": ...}`) has `n` processes at it:
    processes measured together (section `packed`) time the same seconds."""
    barrier = spec.get("barrier")
    if not barrier:
        return
    folder = Path(barrier["dir"])
    (folder / str(os.getpid())).touch()
    deadline = time.time() + 900
    while len(list(folder.iterdir())) < barrier["n"]:
        if time.time() > deadline:
            raise TimeoutError(f"{barrier['n']} processes never met at {folder}")
        time.sleep(0.05)


def time_windows(step: Callable[[], Any], sync: Callable[[Any], Any], spec: dict) -> dict:
    """First call (compilation included), warm-up, then `windows` timed windows of `steps`."""
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    for _ in range(max(spec["warmup"] - 1, 0)):
        sync(step())
    barrier(spec)
    windows = []
    for _ in range(spec["windows"]):
        start = time.perf_counter()
        out = None
        for _ in range(spec["steps"]):
            out = step()
        sync(out)
        windows.append((time.perf_counter() - start) / spec["steps"])
    return {"first_call_s": first, "windows_s": windows, "step_s": statistics.median(windows)}
