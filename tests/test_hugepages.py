"""glibc's malloc on huge pages: the environment, the launcher's restart, and its effect."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rvm.train import hugepages

REPO = Path(__file__).resolve().parents[1]
needs_support = pytest.mark.skipif(
    not hugepages.supported(), reason="needs Linux, glibc >= 2.35 and transparent huge pages"
)


def test_environ_appends_the_tunable_and_keeps_the_others():
    assert hugepages.environ({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = hugepages.environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1", "HOME": "/h"})
    assert env == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1",
        "HOME": "/h",
    }


def test_environ_leaves_an_explicit_choice_alone():
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}
    assert hugepages.environ(env) == env
    assert not hugepages.is_set({"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=1"})


def _run(script: str, env: dict, *args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *(args or ("arg1",))],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


REEXEC = """
    import os, sys
    from rvm.train import hugepages
    print("start", os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[-1], flush=True)
    hugepages.reexec()
    print("end", os.environ.get("GLIBC_TUNABLES", "-"))
"""


@needs_support
def test_reexec_restarts_once_with_the_tunable_and_the_same_arguments():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    tunable = "glibc.malloc.hugetlb=1"
    assert _run(REEXEC, env) == ["start", "-", "arg1", "start", tunable, "arg1", "end", tunable]


@needs_support
def test_reexec_respects_a_tunable_already_set():
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    tunable = "glibc.malloc.hugetlb=0"
    assert _run(REEXEC, env) == ["start", tunable, "arg1", "end", tunable]


LAUNCHER = """
    import os, sys
    from absl import flags
    from experiments import launcher
    flags.FLAGS(sys.argv)
    print("start", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
    launcher.start()
    print("end", os.environ.get("GLIBC_TUNABLES", "-"))
"""


@needs_support
@pytest.mark.parametrize("flag, restarts", [("--hugepages", True), ("--nohugepages", False)])
def test_launchers_restart_on_huge_pages_unless_told_not_to(flag, restarts):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    tunable = "glibc.malloc.hugetlb=1"
    restarted = ["start", "-", "start", tunable, "end", tunable]
    assert _run(LAUNCHER, env, flag) == (restarted if restarts else ["start", "-", "end", "-"])


# Touches a 64 MiB malloc'd block and reports how much of the process sits on huge pages.
TOUCH = """
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20
    ptr = libc.malloc(size)
    ctypes.memset(ptr, 1, size)
    rollup = open("/proc/self/smaps_rollup").read()
    print(int(rollup.split("AnonHugePages:")[1].split()[0]) // 1024)
"""


@needs_support
def test_the_tunable_puts_large_malloc_blocks_on_huge_pages():
    env = hugepages.environ({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    (huge_mib,) = _run(TOUCH, env)
    assert int(huge_mib) >= 32
