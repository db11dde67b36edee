"""Orbax checkpoints of a run in `WORKDIR/checkpoints`: its train state, the sums of the
epoch in progress (`rvm.train.epoch`) and its records (config and `metrics.jsonl` lines),
so that a stop anywhere resumes exactly and the workdir's records can be rebuilt.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-write never sees a partial checkpoint as the latest. A newest
checkpoint that cannot be restored, whatever is wrong with it (a truncated file, a
deleted item, an emptied directory), is moved to `WORKDIR/damaged_checkpoints` with a
warning saying what is wrong with it, in favour of the one before it. A checkpoint of
another state (the code or config changed its parameters or optimiser) is an error, not
damage: nothing is moved; so is a complete checkpoint of the train state alone, as rvm
wrote before the epoch sums and records travelled with it (it can be analysed, not
resumed).
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from rvm.errors import UserError

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
                return step, self._restore(step, {RECORDS: None})[RECORDS]
            except Exception:  # damage is for `restore_latest_usable` to deal with
                continue
        return None

    def _check_matches(self, target: dict[str, Any], step: int) -> None:
        """Raises CheckpointError if checkpoint `step` holds another tree of arrays than
        `target` (items by name), or is a complete checkpoint of an older rvm's format;
        `_Unreadable` if it lacks items it was written with (damage).

        An unreadable tree description is left to `restore` (damage)."""
        try:
            metadata = self.manager.item_metadata(step)
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
        target = {STATE: _abstract(state), EPOCH: _abstract(epoch)}
        steps = self.all_steps()
        if not steps and any((self.workdir / "damaged_checkpoints").glob("*")):
            raise CheckpointError(
                f"{self.workdir} has only damaged checkpoints (damaged_checkpoints/); refusing "
                "to start over on top of an existing run (remove the workdir to start anew)"
            )
        for step in reversed(steps):
            try:
                self._check_matches(target, step)
                items = self._restore(step, {**target, RECORDS: None})
                return Restored(step, items[STATE], items[EPOCH], items[RECORDS])
            except CheckpointError:
                raise
            except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
                aside = self.workdir / "damaged_checkpoints" / str(step)
                logging.warning(
                    "checkpoint %s is unusable (%s); moved to %s, trying the one before",
                    self.directory / str(step),
                    _reason(e),
                    aside,
                )
                # Out of the way, so the step can be written again, yet kept for a post-mortem
                # (by the first process of a multi-process run; all go on to the one before).
                if jax.process_index() == 0:
                    aside.parent.mkdir(exist_ok=True)
                    shutil.rmtree(aside, ignore_errors=True)
                    (self.directory / str(step)).rename(aside)
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


def _reason(error: Exception) -> str:
    if isinstance(error, _Unreadable):
        return str(error)
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


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
