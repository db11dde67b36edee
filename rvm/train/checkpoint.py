"""Orbax checkpoints of the train state in `WORKDIR/checkpoints`.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-write never sees a partial checkpoint as the latest. A
complete but damaged newest checkpoint (a truncated file) is skipped with a
warning in favour of the one before it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one could not be written."""


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int = 3):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
            self.manager.wait_until_finished()
        except OSError as e:
            raise CheckpointError(
                f"could not write the checkpoint of step {step} to {self.directory}: {e}; "
                "earlier checkpoints are untouched"
            ) from e

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores into the structure, dtypes and shardings of `target` (arrays or shapes)."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_latest_usable(self, target: Any) -> Any | None:
        """The newest checkpoint that restores; None if there are none at all."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return self.restore(target, step)
            except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
                aside = self.workdir / "damaged_checkpoints" / str(step)
                logging.warning(
                    "checkpoint %s is unusable (%s: %s); moved to %s, trying the one before",
                    self.directory / str(step),
                    type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "",
                    aside,
                )
                # Out of the way, so the step can be written again, yet kept for a post-mortem.
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
