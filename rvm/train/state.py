"""The train state: everything a resumed run needs, and nothing that is not an array."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # a raw uint32 key, so checkpoints store it as plain data

    @classmethod
    def create(cls, variables: dict, tx, rng: jax.Array) -> TrainState:
        params = variables["params"]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=rng,
        )

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}
