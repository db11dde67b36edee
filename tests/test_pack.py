"""Packs of runs (`config.seeds`): each seed of a pack is the run of that seed trained alone."""

import jax
import numpy as np
import pytest
from helpers import set_field
from test_faults import tiny_config

from rvm.data import load_images
from rvm.train import loop, pack
from rvm.train import sharding as shd
from rvm.train.config_check import validate

STEPS = 3
SEEDS = (0, 1)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def train_pack(config, data, devices, seeds, strategy, steps=STEPS):
    """`steps` steps of a pack of `seeds` on `devices`: each run's state and metrics."""
    mesh = pack.pack_mesh(len(seeds), strategy, devices)
    run = loop.build_run(config, data, mesh)  # the task, optimiser and init of a run alone
    p = pack.packed(config, run.task, run.tx, run.total_steps, mesh, len(seeds), strategy)
    fresh = []
    for seed in seeds:
        config.seed = seed
        fresh.append(loop.build_run(config, data, mesh).state)
    states, history = p.join(fresh), []
    for _ in range(steps):
        states, metrics = p.step(states, run.train_data)
        history.append(jax.device_get(metrics))
    runs = [jax.device_get(s) for s in p.runs(states)]
    per_run = lambda i: {k: [float(m[k][i]) for m in history] for k in history[0]}
    return runs, [per_run(i) for i in range(len(seeds))]


@pytest.fixture(scope="module")
def data():
    return load_images(tiny_config().data)


@pytest.fixture(scope="module")
def alone(data):
    """Each seed trained alone on one device with the run's own step: states, metrics."""
    out = []
    for seed in SEEDS:
        config = tiny_config()
        config.seed = seed
        run = loop.build_run(config, data, shd.data_mesh(jax.devices()[:1]))
        state, history = run.state, []
        for _ in range(STEPS):
            state, metrics = run.step_fn(state, run.train_data)
            history.append(jax.device_get(metrics))
        out.append((jax.device_get(state), {k: [float(m[k]) for m in history] for k in history[0]}))
    return out


def test_the_seeds_of_a_pack_really_differ(alone):
    (a, ma), (b, mb) = alone
    assert all(not np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(b.params)))
    assert ma["loss"] != mb["loss"]


def test_a_looped_pack_is_bitwise_each_run_alone(alone, data):
    runs, metrics = train_pack(tiny_config(), data, jax.devices()[:1], SEEDS, "loop")
    for (state, m), got, got_m in zip(alone, runs, metrics, strict=True):
        for x, y in zip(leaves(state), leaves(got), strict=True):
            np.testing.assert_array_equal(x, y)
        assert got_m == m


# Tolerance of a pack compiled as one program: XLA may round differently (a vmapped
# convolution is a grouped one), and the differences grow with the steps. Measured after
# 3 steps on the CPU: |difference| <= 2e-4 on BatchNorm variances of ~1e2 and below 1e-6
# on parameters; losses and errors agree to 1e-6.
PARAMS_RTOL, PARAMS_ATOL = 1e-4, 1e-5
STATS_RTOL = 1e-4


@pytest.mark.parametrize("strategy", ["vmap", "map"])
def test_a_pack_compiled_as_one_program_matches_each_run_alone(alone, data, strategy):
    runs, metrics = train_pack(tiny_config(), data, jax.devices()[:1], SEEDS, strategy)
    for (state, m), got, got_m in zip(alone, runs, metrics, strict=True):
        assert int(got.step) == STEPS
        for x, y in zip(leaves(state.params), leaves(got.params), strict=True):
            np.testing.assert_allclose(y, x, rtol=PARAMS_RTOL, atol=PARAMS_ATOL)
        for x, y in zip(leaves(state.batch_stats), leaves(got.batch_stats), strict=True):
            np.testing.assert_allclose(y, x, rtol=STATS_RTOL)
        for k in m:
            np.testing.assert_allclose(got_m[k], m[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_pack_on_eight_devices_spreads_its_runs_and_trains_each_as_alone(alone, data):
    """Two runs on 8 devices under vmap: each run on a group of 4, its batch split over them."""
    devices = jax.devices()
    assert len(devices) == 8
    mesh = pack.pack_mesh(2, "vmap", devices)
    assert dict(mesh.shape) == {"pack": 2, "data": 4}
    runs, metrics = train_pack(tiny_config(), data, devices, SEEDS, "vmap")
    for (state, m), got, got_m in zip(alone, runs, metrics, strict=True):
        for x, y in zip(leaves(state.params), leaves(got.params), strict=True):
            np.testing.assert_allclose(y, x, rtol=PARAMS_RTOL, atol=PARAMS_ATOL)
        for k in m:
            np.testing.assert_allclose(got_m[k], m[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_pack_meshes_spread_runs_over_device_groups_only_under_vmap():
    devices = jax.devices()
    assert dict(pack.pack_mesh(8, "vmap", devices).shape) == {"pack": 8, "data": 1}
    assert dict(pack.pack_mesh(3, "vmap", devices).shape) == {"pack": 1, "data": 8}
    assert dict(pack.pack_mesh(4, "map", devices).shape) == {"pack": 1, "data": 8}
    assert dict(pack.pack_mesh(4, "loop", devices).shape) == {"pack": 1, "data": 8}


@pytest.mark.parametrize(
    "value, message",
    [
        ((), "seeds=() must be a non-empty tuple of integers"),
        ((0, 1, 0), "seeds=(0, 1, 0) repeats [0]: each seed is one run"),
        ((0, 1.5), "seeds=(0, 1.5): 1.5 is not an integer"),
        ((0, "1"), "seeds=(0, '1'): '1' is not an integer"),
        ((True,), "seeds=(True,): True is not an integer"),
        (3, "seeds=3 must be a non-empty tuple of integers"),
    ],
)
def test_bad_seed_lists_are_named_before_compiling(value, message):
    config = tiny_config()
    set_field(config, "seeds", value)
    with pytest.raises(ValueError) as err:
        validate(config)
    assert message in str(err.value)


def test_a_config_without_seeds_trains_its_seed():
    config = tiny_config()
    config.seed = 7
    assert pack.seeds_of(config) == (7,)
    del config["seeds"]
    validate(config)
    assert pack.seeds_of(config) == (7,)
    config = tiny_config()
    config.seeds = (3, 4)
    validate(config)
    assert pack.seeds_of(config) == (3, 4)
    set_field(config, "pack_strategy", "pmap")
    with pytest.raises(ValueError, match="pack_strategy='pmap' is not one of auto, vmap"):
        validate(config)
