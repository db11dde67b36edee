"""Guards on a run's workdir: one run at a time, and room to write checkpoints."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from rvm.errors import UserError, WorkdirError


class WorkdirBusyError(UserError, RuntimeError):
    """Another live process trains in this workdir."""


def create(workdir: Path) -> None:
    """Makes the workdir (and its parents) or says in one line why it cannot be made."""
    for path in (workdir, *workdir.absolute().parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == workdir else f"is under {path}, which is a file"
            raise WorkdirError(f"workdir {workdir} {where}; pick another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f"workdir {workdir} cannot be created: {e.strerror or e}; pick another --workdir"
        ) from e


@contextlib.contextmanager
def exclusive(workdir: Path) -> Iterator[None]:
    """Holds an exclusive lock on `workdir/.lock` while the run lives.

    `flock` locks belong to the open file, so the kernel drops them when the
    process dies however it dies: a killed run never blocks its own restart.
    """
    path = workdir / ".lock"
    try:
        f = path.open("a+")
    except OSError as e:
        raise WorkdirError(
            f"workdir {workdir} is not writable: {e.strerror or e}; pick another --workdir"
        ) from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise WorkdirBusyError(
                f"{workdir} is in use by {owner}; two runs must not share a workdir "
                "(wait for it to finish, or pick another --workdir)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_writable(workdir: Path, needed_bytes: int) -> None:
    """Fails early, naming the workdir, if it cannot hold a few more checkpoints."""
    probe = workdir / ".write_probe"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(
            f"workdir {workdir} is not writable: {e.strerror or e}; pick another --workdir"
        ) from e
    free = shutil.disk_usage(workdir).free
    if free < needed_bytes:
        raise WorkdirError(
            f"workdir {workdir} has {free / 2**20:.1f} MiB free; checkpoints need about "
            f"{needed_bytes / 2**20:.1f} MiB (free some space or pick another --workdir)"
        )
