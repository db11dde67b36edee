"""Guards on a run's workdir: one run at a time, room to write checkpoints, and a failed
start leaves it as it found it."""

from __future__ import annotations

import contextlib
import dataclasses
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
    process dies however it dies: a killed run never blocks its own restart. The file
    names the holder's pid while it holds it; a run that fails (a refused start) puts
    back what the file held, and its times, before letting go.
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
        before, stat = f.read(), os.fstat(f.fileno())
        _rewrite(f, f"pid {os.getpid()}\n")
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):  # the failure is what the caller must hear of
                _rewrite(f, before)
                os.utime(f.fileno(), ns=(stat.st_atime_ns, stat.st_mtime_ns))
            raise
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rewrite(f, text: str) -> None:
    f.seek(0)
    f.truncate()
    f.write(text)
    f.flush()


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


# What a start creates in a workdir (a pack: its runs' `seed_<s>` directories too): a
# start that fails before its first checkpoint removes those of them that were not there.
_START_FILES = (
    ".lock",
    "checkpoints",
    "config.json",
    "metrics.jsonl",
    "starts.jsonl",
    "tensorboard",
)


def _start_files(workdir: Path) -> set[str]:
    return {p.name for p in workdir.glob("seed_*")} | {
        name for name in _START_FILES if (workdir / name).exists()
    }


@dataclasses.dataclass
class _Start:
    owner: bool = False  # holds the workdir's lock: whatever it finds new is its own


@contextlib.contextmanager
def undone_if_failed(workdir: Path) -> Iterator[_Start]:
    """Leaves the workdir as it was when the start fails (missing data, a refused resume,
    a non-finite loss, a signal) before writing a checkpoint: removes what it created,
    the workdir itself included, and nothing that was there before."""
    new_root = workdir.absolute()  # the top-most directory this start will create
    if new_root.exists():
        new_root = None
    else:
        while not new_root.parent.exists():
            new_root = new_root.parent
    found = _start_files(workdir)
    steps = _checkpoint_dirs(workdir)
    start = _Start()
    try:
        yield start
    except BaseException:
        if start.owner and _checkpoint_dirs(workdir) == steps:
            made = [new_root] if new_root else [workdir / n for n in _start_files(workdir) - found]
            for path in made:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def _checkpoint_dirs(workdir: Path) -> set[Path]:
    """The complete checkpoints' directories (orbax renames a step's when it is written),
    of the run or of the pack's runs."""
    return {
        p
        for p in (*workdir.glob("checkpoints/*"), *workdir.glob("seed_*/checkpoints/*"))
        if p.name.isdigit()
    }
