"""Helpers shared by the test modules (pytest puts this folder on `sys.path`): one tiny
config, fake variables, record comparisons. No test module imports another."""

import ast
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import cifar10
from rvm.train import loop, metrics
from rvm.train.checkpoint import Checkpoints

REPO = Path(__file__).resolve().parents[1]

# The smoke CIFAR-10 config shrunk to seconds: 256 images / batch 32 = 8 steps an epoch, a
# checkpoint every epoch, 3 epochs. As command-line overrides, for launched processes.
TINY = {
    "model.blocks_per_level": "(1,2,2)",
    "data.synthetic_train": "256",
    "data.synthetic_test": "64",
    "batch_size": "32",
    "eval_batch_size": "64",
    "num_epochs": "3",
    "log_every_steps": "4",
}


def launcher_args(workdir, overrides: dict[str, str] = TINY) -> list[str]:
    """`experiments.train`'s flags for the smoke config with `overrides`, in `workdir`."""
    args = ["--config=experiments/configs/cifar10.py:smoke", f"--workdir={workdir}"]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def child_env(devices: int = 1) -> dict[str, str]:
    """The environment of a process a test starts: this one's, with `devices` simulated CPU
    devices instead of the suite's 8 (a tiny run is fastest on one)."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def tiny_config(sharing: str = "relaxed", **fields):
    """The config of `TINY` with `model.sharing` and top-level `fields` set: the one tiny
    run every training test starts from."""
    config = cifar10.get_config("smoke")
    for field, value in TINY.items():
        set_field(config, field, ast.literal_eval(value))
    config.model.sharing = sharing
    for field, value in fields.items():
        config[field] = value
    return config


def train(config, workdir, *, devices: int = 1, **kwargs) -> dict:
    """`loop.train_and_evaluate` on the first `devices` of the simulated devices: a tiny
    pack of two seeds through the loop took 24 s over all 8 and 9.5 s on one (2-core VM,
    compilation cache warm)."""
    return loop.train_and_evaluate(config, workdir, devices=jax.devices()[:devices], **kwargs)


def damage(step_dir: Path) -> Path:
    """Truncates the largest file of a checkpoint step to a third; returns it."""
    victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    return victim


def random_variables(module, *args, seed=0, scale=0.5, **kwargs):
    """Variables of `module` filled with random numbers: normal with std `scale`, and
    BatchNorm variances in [0.5, 1.5]. Shapes come from an abstract init: on CPU,
    compiling the real initialisers costs seconds per test."""
    shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
        return jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def set_field(config, field: str, value) -> None:
    """`config.<field> = value` for a dotted field, whatever the value's type (bad values
    are what the validation tests feed in)."""
    *sections, name = field.split(".")
    node = config
    for section in sections:
        node = node[section]
    with node.ignore_type():
        node[name] = value


def untimed_records(workdir) -> list[dict]:
    """A run's `metrics.jsonl` without its timing fields (`*_per_sec`, `eval_sec`), which
    two runs of the same steps never share."""
    timing = lambda k: k.endswith("_per_sec") or k == "eval_sec"
    records = metrics.read_jsonl(Path(workdir) / "metrics.jsonl")
    return [{k: v for k, v in r.items() if not timing(k)} for r in records]


def assert_moved_alike(got, want, start, ratio: float, floor: float = 1e-6) -> None:
    """Each leaf of `got` is `want` up to `ratio` of how far training moved `want` from
    `start` (in norm), plus `floor` for leaves training leaves where they were (a conv bias
    before BatchNorm, whose gradient is rounding noise)."""
    paths = jax.tree_util.tree_leaves_with_path(jax.device_get(want))
    for (path, w), g, s in zip(paths, jax.tree.leaves(got), jax.tree.leaves(start), strict=True):
        w, g, s = (np.asarray(x, np.float64) for x in (w, g, s))
        off, moved = np.linalg.norm(g - w), np.linalg.norm(w - s)
        assert off <= ratio * moved + floor, (
            f"{jax.tree_util.keystr(path)}: {off:.3g} from the expected value, "
            f"{ratio:g} of the {moved:.3g} training moved it allows {ratio * moved + floor:.3g}"
        )


def assert_pack_resumes_to_each_seed_alone(config, tmp_path, stop_at: int) -> dict:
    """Seed 1 trained alone, and a pack of seeds (0, 1) stopped after `stop_at` steps and
    resumed, end alike for seed 1 (records, results, parameters); the alone run's result."""
    config.seed = 1
    alone, pack_dir = tmp_path / "alone", tmp_path / "pack"
    straight = train(config, alone)
    packed_config = config.copy_and_resolve_references()
    packed_config.seeds, packed_config.pack_strategy = (0, 1), "loop"
    assert train(packed_config, pack_dir, max_steps=stop_at)["step"] == stop_at
    packed = train(packed_config, pack_dir)
    run = pack_dir / "seed_1"
    assert packed["finished"] and sorted(packed["runs"]) == [0, 1]
    results = lambda workdir: json.loads((workdir / "results.json").read_text())
    assert results(run) == results(alone)
    assert untimed_records(run) == untimed_records(alone)
    assert untimed_records(run) != untimed_records(pack_dir / "seed_0")
    assert Checkpoints(run).latest_step() == Checkpoints(alone).latest_step() == straight["step"]
    shapes = loop.state_shapes(config, loop.load_data(config))
    got, want = (Checkpoints(w).restore(shapes) for w in (run, alone))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    return straight
