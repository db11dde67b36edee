"""What code and machine produced a run: a resumed run may have been trained by several.

Each start of a run, fresh or resumed, appends one line to `WORKDIR/starts.jsonl`
(each `seed_<s>/` of a pack): when, from which step, the commit of the code, the
library versions and the devices. A number in `results.json` can then be traced to
the code that trained every part of it. Imports no JAX at module level, so the
benchmark harness (which must not) uses `commit` and `versions` too.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
# What runs: a change here makes a checkout "-dirty"; results and docs written since do not.
# A new file counts as a change (a module not yet committed runs too), unless git ignores it.
CODE = ("rvm", "experiments", "bench", "pyproject.toml")
NOT_CODE = (":(exclude)bench/results",)  # the benchmark's reports, written as it runs


def commit(repo: Path = REPO) -> str | None:
    """The checkout's commit, with "-dirty" when its code (`CODE`, new files included)
    differs from it; where
    the tree travelled without its git directory (a lent GPU machine, an installed
    wheel), $RVM_COMMIT as the sender recorded it; None when neither says."""
    if not (repo / ".git").exists():
        return os.environ.get("RVM_COMMIT") or None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=all", "--", *CODE, *NOT_CODE)
        return git("rev-parse", "--short=12", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's version and each package's, "not installed" where it is missing."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def start_record(step: int, devices: Sequence[Any]) -> dict[str, Any]:
    """One line of starts.jsonl: this process's start of a run at `step` on `devices`
    (those of every process that trains it)."""
    import jax  # the harness imports this module without JAX

    device = devices[0]
    return {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "step": step,
        "commit": commit(),
        "command": shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
        "host": socket.gethostname(),
        "devices": {
            "platform": device.platform,
            "kind": device.device_kind,
            "count": len(devices),
            "processes": jax.process_count(),
        },
        "versions": versions(),
    }
