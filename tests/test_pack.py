"""Packs of runs (`config.seeds`): each seed of a pack is the run of that seed trained alone."""

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from helpers import damage, set_field, tiny_config, train

from rvm.analysis import report
from rvm.analysis.paper import PAPER
from rvm.analysis.runs import read_run_info, require_checkpoint
from rvm.data import load_images
from rvm.train import epoch, loop, metrics, pack
from rvm.train import sharding as shd
from rvm.train.checkpoint import CheckpointError, Checkpoints
from rvm.train.config_check import validate

STEPS = 3
SEEDS = (0, 1)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def train_pack(config, data, devices, seeds, strategy, steps=STEPS):
    """`steps` steps of the loop's step for a pack of `seeds` on `devices`: each run's
    state and epoch means."""
    config.seeds, config.pack_strategy = tuple(seeds), strategy
    runs = loop.build_pack(config, data, devices)
    states, sums = runs.states, runs.sums
    for _ in range(steps):
        states, sums = runs.epoch_step(states, sums, runs.run.train_data)
    means = [epoch.means(s) for s in runs.runs(jax.device_get(sums))]
    return [jax.device_get(s) for s in runs.runs(states)], means


@pytest.fixture(scope="module")
def data():
    return load_images(tiny_config().data)


@pytest.fixture(scope="module")
def alone(data):
    """Each seed trained alone on one device with the loop's step: state, epoch means."""
    out = []
    for seed in SEEDS:
        config = tiny_config()
        config.seed = seed
        run = loop.build_run(config, data, shd.data_mesh(jax.devices()[:1]))
        state, sums = run.state, run.epoch_sums
        for _ in range(STEPS):
            state, sums = run.epoch_step(state, sums, run.train_data)
        out.append((jax.device_get(state), epoch.means(jax.device_get(sums))))
    return out


def test_the_seeds_of_a_pack_really_differ(alone):
    (a, ma), (b, mb) = alone
    assert all(not np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(b.params)))
    assert ma["loss"] != mb["loss"] and ma["error"] != mb["error"]


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
# Running means near 0 (4e-5) move by rounding alone (1e-8) when the convolutions' sums are
# reordered ("gemm"): relative error there means nothing.
STATS_RTOL, STATS_ATOL = 1e-4, 1e-7
# Where the arithmetic itself is reordered (a run's batch sums spread over devices, or
# its convolutions computed as matrix products), more: on parameters after 3 steps, up
# to 1.2e-5 over 8 devices on an AMD EPYC, 2.4e-5 as matrix products.
REORDERED_PARAMS_ATOL = 1e-4


@pytest.mark.parametrize(
    "strategy, conv_impl",
    [("vmap", "xla"), ("vmap", "gemm"), ("vmap", "kernel_gemm"), ("map", "xla")],
)
def test_a_pack_compiled_as_one_program_matches_each_run_alone(alone, data, strategy, conv_impl):
    config = tiny_config()
    config.model.conv_impl = conv_impl  # "*gemm": (batched) matrix products, not grouped convs
    runs, metrics = train_pack(config, data, jax.devices()[:1], SEEDS, strategy)
    atol = PARAMS_ATOL if conv_impl == "xla" else REORDERED_PARAMS_ATOL
    for (state, m), got, got_m in zip(alone, runs, metrics, strict=True):
        assert int(got.step) == STEPS
        for x, y in zip(leaves(state.params), leaves(got.params), strict=True):
            np.testing.assert_allclose(y, x, rtol=PARAMS_RTOL, atol=atol)
        for x, y in zip(leaves(state.batch_stats), leaves(got.batch_stats), strict=True):
            np.testing.assert_allclose(y, x, rtol=STATS_RTOL, atol=STATS_ATOL)
        assert got_m.keys() == m.keys()
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
            np.testing.assert_allclose(y, x, rtol=PARAMS_RTOL, atol=REORDERED_PARAMS_ATOL)
        assert got_m.keys() == m.keys()
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


# --- The loop: a pack of two tiny runs against the two trained alone ---------------------

TIMING = ("eval_sec", "images_per_sec")


def e2e_config(**fields):
    config = tiny_config()
    config.num_epochs = 2  # 16 steps
    config.pack_strategy = "loop"
    for k, v in fields.items():
        config[k] = v
    return config


def train_e2e(config, workdir, **kwargs) -> dict:
    """`train` on one device; a vmapped pack on two, a group of one device for each run,
    so that its runs' states are saved from and restored to devices of their own."""
    return train(config, workdir, devices=2 if config.pack_strategy == "vmap" else 1, **kwargs)


def final_state(workdir):
    restored = Checkpoints(workdir).restore(
        loop.state_shapes(e2e_config(), load_images(e2e_config().data))
    )
    return leaves(restored)


def untimed(workdir):
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in metrics.read_jsonl(workdir / "metrics.jsonl")
    ]


def assert_same_runs(got, want) -> None:
    """Each seed of the pack in `got` is bit for bit the one in `want`: records and state."""
    for seed in SEEDS:
        run, other = got / f"seed_{seed}", want / f"seed_{seed}"
        assert untimed(run) == untimed(other)
        for x, y in zip(final_state(run), final_state(other), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each seed trained alone, and (when first asked for) the uninterrupted pack of seeds
    0 and 1 of each strategy, in `root/<strategy>`."""
    root = tmp_path_factory.mktemp("e2e")
    for seed in SEEDS:
        train_e2e(e2e_config(seed=seed), root / f"alone_{seed}")
    packs = {}

    def uninterrupted(strategy):
        if strategy not in packs:
            config = e2e_config(seeds=SEEDS, pack_strategy=strategy)
            packs[strategy] = train_e2e(config, root / strategy)
        return root / strategy, packs[strategy]

    return root, uninterrupted


def test_each_seed_of_a_pack_is_its_run_trained_alone(trained):
    root, uninterrupted = trained
    pack_dir, packed = uninterrupted("loop")
    assert packed["finished"] and sorted(packed["runs"]) == list(SEEDS)
    assert untimed(pack_dir / "seed_0") != untimed(pack_dir / "seed_1")
    for seed in SEEDS:
        run, alone = pack_dir / f"seed_{seed}", root / f"alone_{seed}"
        assert json.loads((run / "config.json").read_text()) == json.loads(
            (alone / "config.json").read_text()
        )
        assert untimed(run) == untimed(alone) and len(untimed(run)) == 2
        assert json.loads((run / "results.json").read_text()) == json.loads(
            (alone / "results.json").read_text()
        )
        assert packed["runs"][seed] == json.loads((alone / "results.json").read_text())
        assert read_run_info(run).seed == seed  # a run for experiments.report
        require_checkpoint(run)
        for x, y in zip(final_state(run), final_state(alone), strict=True):
            np.testing.assert_array_equal(x, y)
    assert json.loads((pack_dir / "config.json").read_text())["seeds"] == list(SEEDS)


def test_a_vmapped_pack_writes_each_seed_as_a_run_of_its_own(trained):
    """The GPU default through the loop: one vectorised program over 2 groups of devices.
    Each seed's records are those of its run alone up to the drift of reordered sums over
    16 steps (1% in train loss measured on XLA:CPU against a run data-parallel over 8)."""
    root, uninterrupted = trained
    pack_dir, packed = uninterrupted("vmap")
    assert packed["finished"] and sorted(packed["runs"]) == list(SEEDS)
    for seed in SEEDS:
        got, want = untimed(pack_dir / f"seed_{seed}"), untimed(root / f"alone_{seed}")
        assert [r["step"] for r in got] == [r["step"] for r in want] == [8, 16]
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            np.testing.assert_allclose(g["train_loss"], w["train_loss"], rtol=3e-2)
        run = pack_dir / f"seed_{seed}"
        assert packed["runs"][seed] == json.loads((run / "results.json").read_text())
        assert read_run_info(run).seed == seed
    assert untimed(pack_dir / "seed_0") != untimed(pack_dir / "seed_1")


def test_the_report_reads_a_packs_workdir_as_its_runs(trained, tmp_path):
    pack_dir, _ = trained[1]("loop")
    options = report.Options(analyses=False)
    report.write_report([pack_dir, pack_dir / "seed_1"], tmp_path, PAPER, options)
    md = (tmp_path / "report.md").read_text()
    assert "Runs: 2." in md
    assert sorted(re.findall(r", seed (\d+) \(`", md)) == ["0", "1"]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_an_interrupted_pack_resumes_to_the_uninterrupted_one(trained, tmp_path, strategy):
    """Stopped mid-epoch, then its newest checkpoint damaged in one run only (as a kill
    while the runs save one after another leaves it): the damaged checkpoint is set
    aside, the other runs' newer step moved aside (not deleted), and the pack ends as the
    uninterrupted one."""
    pack_dir, _ = trained[1](strategy)
    config = e2e_config(seeds=SEEDS, pack_strategy=strategy)
    assert train_e2e(config, tmp_path, max_steps=12) == {
        "step": 12,
        "finished": False,
    }
    assert Checkpoints(tmp_path / "seed_1").all_steps() == [8, 12]
    damage(tmp_path / "seed_1/checkpoints/12")
    train_e2e(config, tmp_path)
    assert (tmp_path / "seed_1/damaged_checkpoints/12").is_dir()
    assert (tmp_path / "seed_0/unpaired_checkpoints/12").is_dir()  # seed 0's step 12, kept
    assert Checkpoints(tmp_path / "seed_0").all_steps()[-1] == 16
    assert_same_runs(tmp_path, pack_dir)
    for seed in SEEDS:
        # each run records both starts, the second from the step all its runs held
        run = tmp_path / f"seed_{seed}"
        assert [r["step"] for r in metrics.read_jsonl(run / "starts.jsonl")] == [0, 8]
    assert not (tmp_path / "starts.jsonl").exists()  # a pack's records are its runs'


@pytest.mark.parametrize("lost", ["missing", "damaged"])
def test_a_pack_with_a_run_that_lost_its_checkpoints_is_refused_and_deletes_nothing(tmp_path, lost):
    """A run without any usable checkpoint beside runs with some: starting the pack over
    would overwrite their training, so it is refused naming the run; nothing is deleted."""
    config = e2e_config(seeds=SEEDS)
    train_e2e(config, tmp_path, max_steps=8)
    seed_1 = tmp_path / "seed_1/checkpoints"
    if lost == "missing":
        shutil.rmtree(seed_1)
        message = f"{tmp_path}/seed_1 of this pack has no usable checkpoint while the others"
    else:
        damage(seed_1 / "8")
        message = f"no usable checkpoint in {tmp_path}/seed_1"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        train_e2e(config, tmp_path)
    assert Checkpoints(tmp_path / "seed_0").all_steps() == [8]
    assert not (tmp_path / "seed_0/unpaired_checkpoints").exists()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_sigterm_saves_every_run_of_the_pack_and_resumes(trained, tmp_path, monkeypatch, strategy):
    pack_dir, _ = trained[1](strategy)
    build = pack.build

    def build_stopping(*args):  # SIGTERM during step 5 of the pack
        runs = build(*args)
        calls = itertools.count()

        def epoch_step(*step_args):
            if next(calls) == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return runs.epoch_step(*step_args)

        return dataclasses.replace(runs, epoch_step=epoch_step)

    monkeypatch.setattr(pack, "build", build_stopping)
    config = e2e_config(seeds=SEEDS, pack_strategy=strategy)
    with pytest.raises(loop.Preempted, match="SIGTERM at step 6"):
        train_e2e(config, tmp_path)
    monkeypatch.undo()
    assert all(Checkpoints(tmp_path / f"seed_{s}").all_steps() == [6] for s in SEEDS)
    train_e2e(config, tmp_path)
    assert_same_runs(tmp_path, pack_dir)


def test_another_seed_list_is_refused_naming_the_difference(trained):
    pack_dir, _ = trained[1]("loop")
    before = sorted(p.name for p in pack_dir.iterdir())
    with pytest.raises(
        ValueError, match=r"seeds=\(0, 1\); refusing seeds=\(0, 1, 2\) \(added \[2\], dropped \[\]"
    ):
        train_e2e(e2e_config(seeds=(0, 1, 2)), pack_dir)
    with pytest.raises(ValueError, match=r"added \[\], dropped \[1\]"):
        train_e2e(e2e_config(seeds=(0,)), pack_dir)
    assert sorted(p.name for p in (pack_dir).iterdir()) == before  # no seed_2 left behind
    with pytest.raises(ValueError, match="num_epochs: saved 2, now 3"):  # each run's config
        train_e2e(e2e_config(seeds=SEEDS, num_epochs=3), pack_dir)


def test_a_non_finite_run_stops_the_pack_and_the_others_lose_nothing(tmp_path):
    """The pack stops naming the seed; every run keeps its newest checkpoint and records,
    and the pack finishes with non-finite steps skipped (a change allowed on resume)."""
    config = e2e_config(seeds=SEEDS)
    # A learning rate that explodes after step 10 of 16: the first epoch trains cleanly.
    config.optim.lr_boundaries = (0.6,)
    config.optim.lr_decay = 1e30
    with pytest.raises(loop.NonFiniteError, match=r"at step 1\d in the run of seed 0;"):
        train_e2e(config, tmp_path)
    for seed in SEEDS:
        assert Checkpoints(tmp_path / f"seed_{seed}").all_steps() == [8]
        assert [r["step"] for r in untimed(tmp_path / f"seed_{seed}")] == [8]
    config.skip_nonfinite = True
    assert train_e2e(config, tmp_path)["finished"]
