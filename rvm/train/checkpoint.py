"""Orbax checkpoints of the train state in `WORKDIR/checkpoints`.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-write never sees a partial checkpoint as the latest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int = 3):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, force: bool = True) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
        self.manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores into the structure, dtypes and shardings of `target` (arrays or shapes)."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()
