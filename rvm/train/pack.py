"""Several seeds of one variant trained as one pack: K independent runs, one jitted step.

Tables 1-3 with their spread are 30 runs of small networks, and one ResNet-110 run at
batch 128 leaves most of a large GPU idle. A pack stacks the K runs' train states
along a leading axis and advances them all in every step. Each run keeps everything
of its own: its initialisation, data order, augmentation and stochastic-depth draws
(all from its `state.rng`, the `PRNGKey(seed)` a run trained alone starts from),
BatchNorm statistics over its own batch, optimiser and relaxation state.

How the K steps become one program (`STRATEGIES`):

  "vmap"  vectorised over the runs. A convolution with K kernels becomes one grouped
          convolution, which some backends run far slower than K plain ones (JAX
          users measured ten small CNNs at 4.92 ms under vmap, 1.71 ms under
          `lax.map`; grouped backward convolutions as slow as dense ones). On several
          devices the runs are split over gcd(K, devices) groups of devices (mesh axis
          "pack"), and each run's batch over the devices of its group (axis "data").
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
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rvm.errors import ConfigError
from rvm.train import sharding as shd
from rvm.train import xla
from rvm.train.checkpoint import CheckpointError, Checkpoints, Restored

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


def _check(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"pack_strategy={strategy!r} is not one of auto, {', '.join(STRATEGIES)}")


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
    _check(strategy)
    devices = np.asarray(jax.devices() if devices is None else devices)
    groups = math.gcd(k, devices.size) if strategy == "vmap" else 1
    return Mesh(devices.reshape(groups, -1), (PACK, "data"))


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """Stacked states and sums: the run axis over "pack" (replicated on a 1-D mesh)."""
    return NamedSharding(mesh, PartitionSpec(PACK if PACK in mesh.axis_names else None))


# --- The runs of a pack ------------------------------------------------------------------


def run_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of the pack's run of `seed`: `seed` set, `seeds` unset, exactly the
    config of that seed trained alone, so its directory is a run like any other."""
    run = ml_collections.ConfigDict(config.to_dict())
    run.seed = seed
    if "seeds" in run:
        run.seeds = None
    return run


def run_dirs(config: ml_collections.ConfigDict, workdir: Path) -> list[Path]:
    """Where each run writes: the workdir itself for one run (no `seeds`), else
    `WORKDIR/seed_<s>/` per seed."""
    if config.get("seeds") is None:
        return [workdir]
    return [workdir / f"seed_{s}" for s in config.seeds]


def check_seeds(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Refuses a pack whose seed list differs from the one its workdir was started with
    (`WORKDIR/config.json`), naming the seeds added and dropped. A pack's list is fixed,
    also once it has finished: more seeds are another pack, in another workdir."""
    path = workdir / "config.json"
    if config.get("seeds") is None or not path.exists():
        return
    saved = json.loads(path.read_text()).get("seeds")
    if saved is None or tuple(saved) == tuple(config.seeds):
        return
    added = [s for s in config.seeds if s not in saved]
    dropped = [s for s in saved if s not in config.seeds]
    raise ConfigError(
        f"{workdir} holds the pack of seeds={tuple(saved)}; refusing seeds={tuple(config.seeds)} "
        f"(added {added}, dropped {dropped}, or another order). Train other seeds as a pack "
        "in another workdir (experiments.report takes the seed_<s> directories of both), "
        "or one seed alone on its own WORKDIR/seed_<s>."
    )


def restore(ckpts: Sequence[Checkpoints], state: Any, sums: Any) -> list[Restored | None]:
    """Each run's newest usable checkpoint (None: a fresh start) into one run's `state` and
    `sums`, at the newest step that all the runs hold: a pack killed while saving its runs
    one after another has steps that some runs lack. Those are moved aside to the run's
    `unpaired_checkpoints/`, never deleted. A pack where some runs have no usable checkpoint
    and others do is refused (CheckpointError naming them): starting it over would
    overwrite the others' training."""
    resumed = [ck.restore_latest_usable(state, sums) for ck in ckpts]
    step = lambda r: 0 if r is None else r.step
    while len({step(r) for r in resumed}) > 1:
        fresh = [str(ck.workdir) for ck, r in zip(ckpts, resumed) if r is None]
        if fresh:
            raise CheckpointError(
                f"{', '.join(fresh)} of this pack has no usable checkpoint while the others hold "
                f"steps up to {max(map(step, resumed))}; refusing to start the pack over on top "
                "of their training (put the run's checkpoints back, or train it alone on its "
                "own directory)"
            )
        common = min(map(step, resumed))
        for ck in ckpts:
            for newer in (s for s in ck.all_steps() if s > common):
                _set_aside(ck, newer, common)
        resumed = [ck.restore_latest_usable(state, sums) for ck in ckpts]
    return resumed


def _set_aside(ck: Checkpoints, newer: int, common: int) -> None:
    """Moves step `newer` of `ck` to `unpaired_checkpoints/` (a numbered suffix where an
    earlier one is there), so the step can be trained and saved again."""
    aside = ck.workdir / "unpaired_checkpoints" / str(newer)
    for n in itertools.count(1):
        if not aside.exists():
            break
        aside = aside.with_name(f"{newer}.{n}")
    logging.warning(
        "%s moved to %s: not every run of the pack saved it; resuming from step %d",
        ck.directory / str(newer),
        aside,
        common,
    )
    if jax.process_index() == 0:
        aside.parent.mkdir(exist_ok=True)
        (ck.directory / str(newer)).rename(aside)
    ck.manager.reload()


@dataclasses.dataclass
class Pack:
    """K runs of one config built to train together: the first seed's `Run` (task,
    optimiser, schedules, mesh) and the K runs' states and epoch sums, held stacked along
    a leading axis ("vmap", "map") or as tuples of K ("loop", and a single run)."""

    run: Any  # `rvm.train.loop.Run` of the first seed
    stacked: bool
    states: Any
    sums: Any
    epoch_step: Callable  # (states, sums, data) -> (states, sums), the loop's step

    def runs(self, tree: Any) -> list[Any]:
        """Each run's part of `tree` (states or sums)."""
        return unstack(tree) if self.stacked else list(tree)

    def join(self, trees: Sequence[Any]) -> Any:
        """The pack's tree (states or sums) from each run's."""
        if not self.stacked:
            return tuple(trees)
        return jax.device_put(stack(trees), stacked_sharding(self.run.mesh))

    def run_shapes(self, tree: Any) -> Any:
        """Shapes, dtypes and (replicated) shardings of one run's part of `tree`."""
        replicated = shd.replicated(self.run.mesh)
        one = lambda x: jax.ShapeDtypeStruct(x.shape[self.stacked :], x.dtype, sharding=replicated)
        return jax.tree.map(one, tree if self.stacked else tree[0])


def build(run: Any, seeds: Sequence[int], strategy: str) -> Pack:
    """The pack of `seeds` from the `Run` of its first seed (`rvm.train.loop.build_run`):
    every other run initialised by the same compiled function, from its own key."""
    _check(strategy)
    states = [run.state, *(run.init(jax.random.PRNGKey(s)) for s in seeds[1:])]
    sums = [run.epoch_sums, *(jax.tree.map(jnp.copy, run.epoch_sums) for _ in seeds[1:])]
    if len(seeds) == 1 or strategy == "loop":

        def each(states, sums, data):
            out = [run.epoch_step(state, s, data) for state, s in zip(states, sums)]
            return tuple(state for state, _ in out), tuple(s for _, s in out)

        return Pack(run, False, tuple(states), tuple(sums), each)
    if strategy == "vmap":
        many = jax.vmap(run.epoch_fn, in_axes=(0, 0, None), spmd_axis_name=PACK)
    else:
        many = lambda states, sums, data: jax.lax.map(
            lambda pair: run.epoch_fn(*pair, data), (states, sums)
        )
    stacked = stacked_sharding(run.mesh)
    step = jax.jit(
        many,
        in_shardings=(stacked, stacked, shd.replicated(run.mesh)),
        out_shardings=(stacked, stacked),
        donate_argnums=(0, 1),
        compiler_options=xla.compiler_options(run.mesh.devices.flat[0].platform),
    )
    pack = Pack(run, True, None, None, step)
    return dataclasses.replace(pack, states=pack.join(states), sums=pack.join(sums))
