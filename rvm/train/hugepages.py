"""XLA:CPU's working memory on transparent huge pages, through glibc's malloc.

XLA:CPU allocates a step's scratch buffers (hundreds of MiB for the (18,18,18)
ResNet at batch 128) with `posix_memalign` at every execution. glibc serves
blocks that large with fresh `mmap`s of 4 KiB pages, so each step faults its
scratch memory in again, page by page, and walks it through a TLB that covers
little of it: the kernel-gradient transposes read with large strides. glibc's
tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc advise the kernel
to back its mappings with 2 MiB transparent huge pages (`MADV_HUGEPAGE`), which
the kernel honours unless transparent huge pages are switched off. On the
project's 2-core VM, without it rvm's CPU training step ran at 0.86-0.93x of
its speed with it (`bench/results/cpu.md`, section `malloc`).

glibc reads tunables once, when a process starts, so a launcher that wants them
re-executes itself (`reexec`) before doing any work; `environ` gives the
environment for a child process. A tunable already present in `GLIBC_TUNABLES`
(say `glibc.malloc.hugetlb=0`) is left as it is.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def supported() -> bool:
    """Linux with glibc >= 2.35, and transparent huge pages not switched off."""
    if sys.platform != "linux":
        return False
    lib, version = platform.libc_ver()
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
        mode = THP_MODE.read_text()
    except (ValueError, OSError):
        return False
    return lib == "glibc" and major_minor >= (2, 35) and "[never]" not in mode


def is_set(env: Mapping[str, str]) -> bool:
    """Whether `env`'s GLIBC_TUNABLES already says anything about `TUNABLE`."""
    return any(t.split("=")[0] == TUNABLE for t in env.get("GLIBC_TUNABLES", "").split(":"))


def environ(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default `os.environ`) with `glibc.malloc.hugetlb=1` added to its GLIBC_TUNABLES."""
    env = dict(os.environ if env is None else env)
    if not is_set(env):
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join([*tunables, f"{TUNABLE}=1"])
    return env


def reexec() -> None:
    """Restarts this process with `environ()`, unless it is set already or unsupported.

    Returns only when nothing was to be done. Call it first thing in a launcher's
    `main`: everything the process did before is lost.
    """
    if supported() and not is_set(os.environ):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ())
