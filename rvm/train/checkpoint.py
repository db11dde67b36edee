"""Orbax checkpoints of a run in `WORKDIR/checkpoints`: its train state, the sums of the
epoch in progress (`rvm.train.epoch`) and its records (config and `metrics.jsonl` lines),
so that a stop anywhere resumes exactly and the workdir's records can be rebuilt.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-write never sees a partial checkpoint as the latest. A newest
checkpoint that cannot be restored, whatever is wrong with it (a truncated or
zero-filled file, a deleted item or manifest, an emptied directory), is moved to
`WORKDIR/damaged_checkpoints` with a warning naming the file and what is wrong with it,
in favour of the one before it. A checkpoint of another state (the code or config
changed its parameters or optimiser) is an error, not damage: nothing is moved; so is
a complete checkpoint of the train state alone, as rvm wrote before the epoch sums and
records travelled with it (it can be analysed, not resumed).

A read or write that fails leaves orbax's other reads and writes of that checkpoint
abandoned on an event loop it has closed; when they finish or are collected, Python
and asyncio would print their tracebacks long after rvm said what failed. Once one
has failed, those go to the debug log instead (`--verbosity=1` shows them).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging as std_logging
import re
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from rvm.errors import UserError
from rvm.train import epoch as epoch_sums

# Status codes of tensorstore's I/O errors, which orbax raises as ValueError: a full or
# read-only disk, a vanished directory. Other ValueErrors are bugs and propagate.
_IO_STATUS = re.compile(r"^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|NOT_FOUND|UNAVAILABLE|DATA_LOSS):")


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint, or one could not be written."""


class _OrbaxErrors(std_logging.Filter):
    """Orbax's writer threads log the error that the save then raises; the exception
    alone tells it (its cause keeps orbax's message)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno < std_logging.ERROR or "/orbax/" not in record.pathname


@contextlib.contextmanager
def _orbax_errors_raised_not_logged():
    logger = std_logging.getLogger("absl")  # orbax logs through absl
    quiet = _OrbaxErrors()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _orbax(record: std_logging.LogRecord) -> bool:
    return "/orbax/" in record.pathname


class _Held(std_logging.Filter):
    """Holds back orbax's warnings while rvm reads a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[std_logging.LogRecord] = []

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING and _orbax(record):
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _orbax_warnings_told_by_rvm(always: bool = False) -> Iterator[None]:
    """Orbax's warnings while rvm reads a checkpoint: shown as they were if the read
    succeeds; if it fails, rvm's own warning says what was wrong, and they go to the debug
    log (`--verbosity=1`). `always`: to the debug log in any case (orbax's look at each
    step when the manager opens, whose damage the restore tells)."""
    logger = std_logging.getLogger("absl")  # orbax logs through absl
    held = _Held()
    logger.addFilter(held)
    failed = always
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        logger.removeFilter(held)
        for record in held.records:
            if failed:
                record.levelno, record.levelname = std_logging.DEBUG, "DEBUG"
                if not logger.isEnabledFor(std_logging.DEBUG):
                    continue
            logger.handle(record)


# What asyncio says about work left unfinished on a closed event loop.
_ABANDONED = (
    "Future exception was never retrieved",
    "Task exception was never retrieved",
    "Task was destroyed but it is pending",
)


def _orbax_leftover(unraisable) -> bool:
    """Whether an exception Python could not raise comes from orbax's abandoned work: one of
    its coroutines collected unfinished, or a callback to the event loop it closed."""
    obj = unraisable.object
    coro = obj.get_coro() if hasattr(obj, "get_coro") else obj  # a task: its coroutine
    if inspect.iscoroutine(coro) and "/orbax/" in coro.cr_code.co_filename:
        return True
    return (
        obj is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    )


class _Leftovers:
    """`sys.unraisablehook` once a checkpoint read or write has failed: orbax's leftovers go
    to the debug log, everything else to the hook it replaced."""

    def __init__(self, previous) -> None:
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if not _orbax_leftover(unraisable):
            self.previous(unraisable)
            return
        exc = unraisable.exc_value
        tb = "".join(traceback.format_exception(type(exc), exc, unraisable.exc_traceback))
        logging.debug("left behind by a failed checkpoint read or write: %s", tb)


class _AsyncioLeftovers(std_logging.Filter):
    """asyncio's complaints about abandoned futures and tasks, as debug records."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING and str(record.msg).startswith(_ABANDONED):
            record.levelno, record.levelname = std_logging.DEBUG, "DEBUG"
            return std_logging.getLogger("absl").isEnabledFor(std_logging.DEBUG)
        return True


def _hush_leftovers() -> None:
    """After a failed read or write: orbax's abandoned work goes to the debug log."""
    if not isinstance(sys.unraisablehook, _Leftovers):
        sys.unraisablehook = _Leftovers(sys.unraisablehook)
    asyncio_logger = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _AsyncioLeftovers) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AsyncioLeftovers())


# The train state is orbax's default item, so that checkpoints from before the epoch
# sums and records travelled with it still restore their state (for analyses).
STATE, EPOCH, RECORDS = "default", "epoch", "records"


class Restored(NamedTuple):
    step: int
    state: Any
    epoch: Any  # the sums of the epoch in progress
    records: dict[str, Any]  # {"config": the run's config, "records": its metrics.jsonl lines}


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int = 3):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        with _orbax_warnings_told_by_rvm(always=True):
            self.manager = ocp.CheckpointManager(
                self.directory,
                item_handlers={
                    STATE: ocp.StandardCheckpointHandler(),
                    EPOCH: ocp.StandardCheckpointHandler(),
                    RECORDS: ocp.JsonCheckpointHandler(),
                },
                # Created by the first save, so that a start that fails before it leaves none.
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, create=False, enable_async_checkpointing=False
                ),
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, epoch: Any, records: dict[str, Any]) -> None:
        """Writes the checkpoint of `step`: the train state, the epoch's sums and the run's
        records (JSON: its config and metrics.jsonl lines up to `step`). A write that fails
        (full disk, say) leaves no partial directory behind and raises CheckpointError, the
        earlier checkpoints intact."""
        items = {
            STATE: ocp.args.StandardSave(state),
            EPOCH: ocp.args.StandardSave(epoch),
            RECORDS: ocp.args.JsonSave(records),
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with _orbax_errors_raised_not_logged():
                self.manager.save(step, args=ocp.args.Composite(**items), force=True)
                self.manager.wait_until_finished()
        except (OSError, ValueError) as e:
            _hush_leftovers()
            if isinstance(e, ValueError) and not _IO_STATUS.match(str(e)):
                raise
            if jax.process_index() == 0:
                for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(partial, ignore_errors=True)
            reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            if "No space left on device" in str(e):
                reason = "no space left on device (free some space there"
            else:
                reason += " (fix that"
            raise CheckpointError(
                f"could not write the checkpoint of step {step} in workdir {self.workdir}: "
                f"{reason}, then run the same command to resume); earlier checkpoints are "
                "untouched"
            ) from e

    def restore(self, target: Any, step: int | None = None) -> Any:
        """The train state, restored into the structure, dtypes and shardings of `target`
        (arrays or shapes)."""
        step = self.latest_step() if step is None else step
        return self._restore(step, {STATE: _abstract(target)})[STATE]

    def _restore(self, step: int, items: dict[str, Any]) -> Any:
        """The `items` of checkpoint `step`: JSON ones given as None, others as shapes."""
        args = {
            k: ocp.args.JsonRestore() if v is None else ocp.args.StandardRestore(v)
            for k, v in items.items()
        }
        return self.manager.restore(step, args=ocp.args.Composite(**args))

    def newest_records(self) -> tuple[int, dict[str, Any]] | None:
        """The step and records of the newest checkpoint whose records read, if any."""
        for step in reversed(self.all_steps()):
            try:
                with _orbax_warnings_told_by_rvm():
                    return step, self._restore(step, {RECORDS: None})[RECORDS]
            except Exception:  # damage is for `restore_latest_usable` to deal with
                _hush_leftovers()
                continue
        return None

    def _metadata(self, step: int) -> Any:
        """Checkpoint `step`'s description of its items, None where it cannot be read
        (damage is for the restore to find)."""
        try:
            return self.manager.item_metadata(step)
        except Exception:  # orbax/tensorstore raise many kinds for damaged files
            return None

    @staticmethod
    def _saved_epoch(metadata: Any) -> dict | None:
        """The tree of a checkpoint's epoch sums from its `_metadata`, None where absent."""
        try:
            saved = metadata[EPOCH].tree
        except Exception:  # orbax/tensorstore raise many kinds for damaged files
            return None
        fields = epoch_sums.METRIC_FIELDS
        ok = isinstance(saved, dict) and all(isinstance(saved.get(f), dict) for f in fields)
        return saved if ok else None

    def _check_matches(self, target: dict[str, Any], step: int, metadata: Any) -> None:
        """Raises CheckpointError if checkpoint `step` (its `_metadata`) holds another tree
        of arrays than `target` (items by name), or is a complete checkpoint of an older
        rvm's format; `_Unreadable` if it lacks items it was written with (damage).

        An unreadable tree description is left to `restore` (damage)."""
        try:
            present = set(metadata.keys())
            saved = {k: metadata[k].tree for k in target if k in present}
        except Exception:  # orbax/tensorstore raise many kinds for damaged files
            return
        missing = {*target, RECORDS} - present
        if missing and _train_state_alone(self.directory / str(step)):
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} lacks the "
                f"{', '.join(sorted(missing))} of a resumable run "
                "(written by an older rvm: it can be analysed, not resumed)"
            )
        if missing:
            paths = [str(self.directory / str(step) / k) for k in sorted(missing)]
            raise _Unreadable(f"{', '.join(paths)} {'is' if len(paths) == 1 else 'are'} missing")
        saved, wanted = _arrays(saved), _arrays(target)
        if saved != wanted:
            differing = sorted(
                k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)
            )
            shown = "; ".join(
                f"{k}: saved {saved.get(k)}, expected {wanted.get(k)}" for k in differing[:3]
            )
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} holds another state than this run "
                f"builds ({len(differing)} arrays differ, e.g. {shown}): the code or config "
                "changed its parameters or optimiser; pick another --workdir"
            )

    def restore_latest_usable(self, state: Any, epoch: Any) -> Restored | None:
        """The newest checkpoint that restores into the trees of `state` and `epoch`; None
        if there are none at all. One that cannot be restored, whatever is wrong with it, is
        moved to `damaged_checkpoints/` with a warning saying what, and the one before it is
        tried.

        Refuses (CheckpointError) when the workdir has damaged checkpoints and no other,
        or when a checkpoint holds another state than `state` or is of an older rvm.
        """
        steps = self.all_steps()
        if not steps and any((self.workdir / "damaged_checkpoints").glob("*")):
            raise CheckpointError(
                f"{self.workdir} has only damaged checkpoints (damaged_checkpoints/); refusing "
                "to start over on top of an existing run (remove the workdir to start anew)"
            )
        for step in reversed(steps):
            try:
                with _orbax_warnings_told_by_rvm():
                    # the epoch's sums as saved: code since may add or drop a step metric
                    metadata = self._metadata(step)
                    saved = self._saved_epoch(metadata)
                    adapt = saved is not None and isinstance(epoch, epoch_sums.EpochSums)
                    as_saved = epoch_sums.as_saved(epoch, saved) if adapt else epoch
                    target = {STATE: _abstract(state), EPOCH: _abstract(as_saved)}
                    self._check_matches(target, step, metadata)
                    items = self._restore(step, {**target, RECORDS: None})
                sums, lacking = items[EPOCH], []
                if adapt:
                    sums, lacking = epoch_sums.conform(sums, epoch)
                if lacking:
                    logging.warning(
                        "checkpoint %s was written by code without the step metrics %s: "
                        "their means for the epoch in progress will read NaN",
                        self.directory / str(step),
                        ", ".join(lacking),
                    )
                return Restored(step, items[STATE], sums, items[RECORDS])
            except CheckpointError:
                raise
            except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
                _hush_leftovers()
                aside = self.workdir / "damaged_checkpoints" / str(step)
                logging.warning(
                    "checkpoint %s is unusable (%s); moved to %s, trying the one before",
                    self.directory / str(step),
                    _what_is_wrong(self.directory / str(step), e),
                    aside,
                )
                # Out of the way, so the step can be written again, yet kept for a post-mortem
                # (by the first process of a multi-process run; all go on to the one before).
                if jax.process_index() == 0:
                    aside.parent.mkdir(exist_ok=True)
                    shutil.rmtree(aside, ignore_errors=True)
                    (self.directory / str(step)).rename(aside)
                with _orbax_warnings_told_by_rvm(always=True):
                    self.manager.reload()
        if steps:
            raise CheckpointError(
                f"no usable checkpoint in {self.workdir} (steps {steps} all failed to restore, "
                "now in damaged_checkpoints/); refusing to start over on top of an existing run"
            )
        return None

    def close(self) -> None:
        self.manager.close()


class _Unreadable(Exception):
    """A checkpoint lacks something it was written with."""


def _train_state_alone(step_dir: Path) -> bool:
    """Whether `step_dir` is a complete checkpoint of the train state alone, as rvm wrote
    before the epoch sums and records travelled with it: orbax's record of the items it
    wrote names that one only, and it is there."""
    try:
        handlers = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(handlers, dict) and set(handlers) == {STATE} and (step_dir / STATE).is_dir()


# The JSON files of orbax's checkpoint layout, by name (and those under array_metadatas/).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def _zero_bytes(path: Path) -> bool:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
    return True


def _what_is_wrong(step_dir: Path, error: BaseException) -> str:
    """Why checkpoint `step_dir` could not be restored, naming the file: what a look at its
    files finds (an empty or zero-filled file, one that is not JSON, a missing manifest or
    item), else the innermost error that orbax or tensorstore raised."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    if not files:
        return f"{step_dir} is empty"
    for path in files:
        if path.stat().st_size == 0:
            return f"{path} is empty"
        if _zero_bytes(path):
            return f"{path} holds only zero bytes"
        if path.name in _JSON_FILES or path.parent.name == "array_metadatas":
            try:
                json.loads(path.read_bytes())
            except ValueError as e:
                return f"{path} is not JSON ({str(e).splitlines()[0][:100]})"
    for item in sorted(p for p in step_dir.iterdir() if p.is_dir()):
        if any(item.glob("ocdbt.process_*")) and not (item / "manifest.ocdbt").exists():
            return f"{item / 'manifest.ocdbt'} is missing"
    if isinstance(error, _Unreadable):
        return str(error)
    return _innermost(error)


def _innermost(error: BaseException) -> str:
    """The first line of the innermost error with a message (tensorstore's name the file or
    the array, and what is wrong), without the spec tensorstore appends."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if str(error) and not isinstance(error, StopIteration):
            chain.append(error)
        error = error.__cause__ or error.__context__
    if not chain:
        return "unreadable"
    inner = chain[-1]
    text = str(inner).splitlines()[0].split(" [tensorstore_spec")[0]
    return f"{type(inner).__name__}: {text[:300]}"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _arrays(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array leaf, by its path written alike for the saved tree
    (nested dicts) and the state (dataclasses, lists)."""

    def name(key) -> str:
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

    return {
        "/".join(map(name, path)): (tuple(leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
