"""Several seeds of one variant trained as one pack: K independent runs, one jitted step.

Tables 1-3 with their spread are 30 runs of small networks, and one ResNet-110 run at
batch 128 leaves most of a large GPU idle. A pack stacks the K runs' train states
along a leading axis and advances them all in every step. Each run keeps everything
of its own: its initialisation, data order, augmentation and stochastic-depth draws
(all from its `state.rng`, the `PRNGKey(seed)` a run trained alone starts from),
BatchNorm statistics over its own batch, optimiser and relaxation state.

How the K steps become one program (`STRATEGIES`):

  "vmap"  vectorised over the runs. A convolution with K kernels becomes one grouped
          convolution, which some backends run far slower than K plain ones (XLA
          issues: ten small CNNs 4.92 ms under vmap, 1.71 ms under `lax.map`; grouped
          backward convolutions as slow as dense ones). On several devices the runs
          are split over gcd(K, devices) groups of devices (mesh axis "pack"), and
          each run's batch over the devices of its group (axis "data").
  "map"   `lax.map`: the K steps one after another inside one program, each
          data-parallel over every device.
  "loop"  the runs' own compiled step, called for each run in turn (dispatch is
          asynchronous, so the host does not wait between them): one compilation,
          one copy of the data, and each run bit for bit the run trained alone on the
          same devices.

`config.pack_strategy="auto"` takes the platform's entry of `AUTO`, chosen by the
benchmark's `packed` section (`bench/README.md`). A single run is a pack of one: its
step is the plain train step, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rvm.train import optim, xla
from rvm.train import sharding as shd
from rvm.train.state import TrainState
from rvm.train.step import train_step
from rvm.train.task import Task

PACK = "pack"  # the mesh axis the runs of a pack are spread over
STRATEGIES = ("vmap", "map", "loop")
# Measured by `python bench/run.py --only packed` (bench/results/); see bench/README.md.
AUTO = {"cpu": "loop", "gpu": "vmap"}


def seeds_of(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The seeds `config` trains: `config.seeds`, or `(config.seed,)` without it."""
    seeds = config.get("seeds")
    return (config.seed,) if seeds is None else tuple(seeds)


def strategy_of(config: ml_collections.ConfigDict, platform: str) -> str:
    """`config.pack_strategy`, with "auto" (or no field) resolved for `platform`."""
    strategy = config.get("pack_strategy", "auto")
    return AUTO.get(platform, "vmap") if strategy == "auto" else strategy


# --- Stacked states ----------------------------------------------------------------------


def stack(trees: Sequence[Any]) -> Any:
    """K trees of equal structure -> one tree of arrays with a leading axis of K."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def take(stacked: Any, i: int) -> Any:
    """Run `i` of a stacked tree."""
    return jax.tree.map(lambda x: x[i], stacked)


def unstack(stacked: Any) -> list[Any]:
    """The K trees of a stacked tree."""
    k = jax.tree.leaves(stacked)[0].shape[0]
    return [take(stacked, i) for i in range(k)]


# --- Devices -----------------------------------------------------------------------------


def pack_mesh(k: int, strategy: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("pack", "data") mesh of K runs: gcd(K, devices) groups under "vmap", one
    otherwise, each run's batch split over its group's devices."""
    if strategy not in STRATEGIES:
        raise ValueError(f"pack_strategy={strategy!r} is not one of auto, {', '.join(STRATEGIES)}")
    devices = np.asarray(jax.devices() if devices is None else devices)
    groups = math.gcd(k, devices.size) if strategy == "vmap" else 1
    return Mesh(devices.reshape(groups, -1), (PACK, "data"))


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """Stacked states and metrics: the run axis over "pack" (replicated on a 1-D mesh)."""
    return NamedSharding(mesh, PartitionSpec(PACK if PACK in mesh.axis_names else None))


# --- The packed step ---------------------------------------------------------------------


def seeded_train_step(state: TrainState, data: Any, *, get_batch: Callable, **kwargs) -> tuple:
    """`train_step` drawing the data order from the run's own key: `state.rng` is
    `PRNGKey(seed)`, the key `get_batch` makes of `config.seed`, so alone or in a pack
    a run sees the same batches."""
    seed = jax.random.wrap_key_data(state.rng)
    return train_step(state, data, get_batch=partial(get_batch, seed=seed), **kwargs)


@dataclasses.dataclass(frozen=True)
class Packed:
    """The step of K runs and how their states are held: stacked along a leading axis
    ("vmap", "map") or as a tuple of K states ("loop", and a single run)."""

    step: Callable  # (states, data) -> (states, metrics stacked over the runs)
    k: int
    stacked: bool
    mesh: Mesh

    def runs(self, states: Any) -> list[TrainState]:
        """Each run's state."""
        return unstack(states) if self.stacked else list(states)

    def join(self, runs: Sequence[TrainState]) -> Any:
        """The pack's states from each run's (fresh or restored) state."""
        if not self.stacked:
            return tuple(runs)
        return jax.device_put(stack(runs), stacked_sharding(self.mesh))

    def run_shapes(self, states: Any) -> TrainState:
        """Shapes, dtypes and (replicated) shardings of one run's state, to restore into."""
        replicated = shd.replicated(self.mesh)
        one = lambda x: jax.ShapeDtypeStruct(x.shape[self.stacked :], x.dtype, sharding=replicated)
        return jax.tree.map(one, states if self.stacked else states[0])


def packed(
    config: ml_collections.ConfigDict,
    task: Task,
    tx: optax.GradientTransformation,
    total_steps: int,
    mesh: Mesh,
    k: int,
    strategy: str,
) -> Packed:
    """The jitted, donated step of K runs of `config` on `mesh` (`pack_mesh`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"pack_strategy={strategy!r} is not one of auto, {', '.join(STRATEGIES)}")
    step = partial(
        seeded_train_step,
        get_batch=task.get_batch,
        loss_fn=task.loss_fn,
        tx=tx,
        lr_schedule=optim.learning_rate(config.optim, total_steps),
        skip_nonfinite=config.skip_nonfinite,
    )
    replicated = shd.replicated(mesh)
    options = xla.compiler_options(mesh.devices.flat[0].platform)
    if k == 1 or strategy == "loop":
        one = jax.jit(
            step,
            in_shardings=(replicated, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
            compiler_options=options,
        )

        def each(states, data):
            out = [one(state, data) for state in states]
            return tuple(s for s, _ in out), stack([m for _, m in out])

        return Packed(each, k, False, mesh)
    if strategy == "vmap":
        many = jax.vmap(step, in_axes=(0, None), spmd_axis_name=PACK)
    else:
        many = lambda states, data: jax.lax.map(lambda state: step(state, data), states)
    stacked = stacked_sharding(mesh)
    jitted = jax.jit(
        many,
        in_shardings=(stacked, replicated),
        out_shardings=(stacked, stacked),
        donate_argnums=0,
        compiler_options=options,
    )
    return Packed(jitted, k, True, mesh)
