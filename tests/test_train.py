"""The training pipeline on synthetic data: golden step, exact resume, data parallelism."""

import json

import jax
import numpy as np
import pytest
from helpers import assert_moved_alike, tiny_config, train, untimed_records

from experiments.configs import cifar10
from rvm.data import load_images
from rvm.models import sharing
from rvm.train import epoch, loop, metrics, provenance, xla
from rvm.train import sharding as shd
from rvm.train.checkpoint import Checkpoints
from rvm.train.step import stream_keys
from rvm.train.task import sum_over_split


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# Recorded from this code on XLA:CPU; a change means the step computes something else.
# "shared" keys are those of runs recorded before `rng_streams` (their values from then):
# they must never change, or those runs would resume on other batches.
GOLDEN = {
    "tagged": ({"loss": 2.455127, "error": 0.90625, "penalty": 65.20194}, 9661.854),
    "shared": ({"loss": 2.490976, "error": 0.875, "penalty": 65.20194}, 9661.955),
}


@pytest.mark.parametrize("streams", GOLDEN)
def test_one_step_matches_golden_values(streams):
    config = tiny_config("relaxed", num_epochs=1, rng_streams=streams)
    config.model.blocks_per_level = (2, 2, 2)  # sets of two kernels: a non-zero penalty
    config.optim.pull_start, config.optim.pull_end = 1e-4, 1e-1  # the paper's, not smoke's
    run = loop.build_run(config, load_images(config.data), shd.data_mesh(jax.devices()[:1]))
    state, metrics = run.step_fn(run.state, run.train_data)
    metrics = jax.device_get(metrics)
    golden, golden_sum = GOLDEN[streams]
    for key, value in {**golden, "learning_rate": 0.1, "pull": 1e-4}.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, err_msg=key)
    abs_sum = sum(np.abs(x).sum() for x in leaves(state.params))
    np.testing.assert_allclose(abs_sum, golden_sum, rtol=3e-6)
    assert int(state.step) == 1


def test_state_init_compiled_once_agrees_with_an_optimised_compile(monkeypatch):
    """The one-off init skips LLVM's optimisations (`xla.ONCE_OPTIONS`); same values."""
    config = tiny_config("raw", num_epochs=1)
    data, mesh = load_images(config.data), shd.data_mesh(jax.devices()[:1])
    options = xla.compiler_options
    asked = []

    def record(platform=None, *, once=False):
        asked.append(once)
        return options(platform, once=once)

    monkeypatch.setattr(xla, "compiler_options", record)
    fast_compile = leaves(loop.build_run(config, data, mesh).state)
    assert asked == [True, False]  # the init, then the step

    def optimise_all(platform=None, *, once=False):
        return options(platform)

    monkeypatch.setattr(xla, "compiler_options", optimise_all)
    optimised = leaves(loop.build_run(config, data, mesh).state)
    for x, y in zip(fast_compile, optimised, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    assert sum(np.abs(x).sum() for x in optimised) > 100  # kernels drawn, not all zero


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    config = tiny_config("relaxed", num_epochs=1)  # 8 steps per epoch
    straight = train(config, tmp_path / "straight", max_steps=4)
    assert straight == {"step": 4, "finished": False}
    train(config, tmp_path / "split", max_steps=2)
    assert Checkpoints(tmp_path / "split").latest_step() == 2
    train(config, tmp_path / "split", max_steps=4)

    def restored(name):
        ckpts = Checkpoints(tmp_path / name)
        run = loop.build_run(config, load_images(config.data), shd.data_mesh())
        return ckpts.restore(run.state, 4)

    a, b = restored("straight"), restored("split")
    assert int(a.step) == int(b.step) == 4
    fresh = loop.build_run(config, load_images(config.data), shd.data_mesh()).state
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(fresh.params)))
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    starts = metrics.read_jsonl(tmp_path / "split/starts.jsonl")
    assert [r["step"] for r in starts] == [0, 2]
    assert starts[1]["devices"] == {
        "platform": "cpu",
        "kind": jax.devices()[0].device_kind,
        "count": 1,  # the devices it trained on, of the 8 there are
        "processes": 1,
    }
    assert starts[1]["versions"]["jax"] == jax.__version__
    assert starts[0]["commit"] == provenance.commit()  # None outside a git checkout


def test_eight_devices_match_one_device():
    assert jax.device_count() == 8, "tests expect XLA_FLAGS to simulate 8 CPU devices"
    config = tiny_config("raw", num_epochs=1)
    data = load_images(config.data)
    outs = []
    for devices in (jax.devices()[:1], jax.devices()):
        run = loop.build_run(config, data, shd.data_mesh(devices))
        state, metrics = run.state, []
        initial = jax.device_get(state)
        for step in range(2):
            state, m = run.step_fn(state, run.train_data)
            metrics.append(jax.device_get(m))
            if step == 0:
                after_one = jax.device_get(state)
        outs.append((initial, after_one, metrics))
    (initial, s1, m1), (_, s8, m8) = outs
    moved = max(np.abs(x - y).max() for x, y in zip(leaves(s1.params), leaves(initial.params)))
    assert moved > 1e-2  # the step moved them
    # Same global batch, same BatchNorm statistics: equal up to float reduction order.
    # BatchNorm's backward pass amplifies it, and training at learning rate 0.1 more with
    # every step, so the state is compared after one step, against how far the step moved
    # it (measured on an AMD EPYC: at most 0.12%, and 4-6% after three steps), and the
    # losses of two steps (the second, at the parameters compared, within 2e-6).
    assert_moved_alike(s8.params, s1.params, initial.params, ratio=1e-2)
    assert_moved_alike(s8.batch_stats, s1.batch_stats, initial.batch_stats, ratio=1e-2)
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_smoke_run_writes_metrics_results_and_consolidates(tmp_path):
    config = tiny_config("relaxed", num_epochs=2)
    config.model.blocks_per_level = (2, 2, 2)  # sets of two blocks, so consolidation merges
    config.data.holdout = 64  # Huang et al.'s protocol: test error at the best validation epoch
    results = train(config, tmp_path)
    assert results["finished"] and results["step"] == 12  # (256 - 64) // 32 steps an epoch
    assert results["params_consolidated"] < results["params"]
    assert 0.0 <= results["consolidated_test_error"] <= 100.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("train_loss", "train_error", "test_error", "learning_rate", "pull", "penalty"):
        assert key in lines[0], key
    assert set(lines[0]["max_angle"]) == {
        f"level{i}/blocks/block/residual/conv{j}/kernel" for i in (1, 2, 3) for j in (1, 2)
    }
    # Level 1's two members lie on either side of their mean: the pair is further apart
    # than either is from the mean. Levels 2 and 3 scan one block: a set of one.
    for name, angle in lines[0]["max_angle"].items():
        pairwise = lines[0]["max_pairwise_angle"][name]
        assert pairwise > angle > 0.01 if name.startswith("level1") else pairwise == 0.0
    # The final record and the results carry the consolidated errors, stale and recalibrated.
    final = {k: results[k] for k in lines[-1] if k.startswith("consolidated")}
    assert set(final) == {"consolidated_test_error", "consolidated_recalibrated_test_error"}
    assert final == {k: lines[-1][k] for k in final}
    assert "consolidated_test_error" not in lines[0]
    assert all(0.0 <= r["val_error"] <= 100.0 for r in lines)
    epoch_s = lambda r: 6 * config.batch_size / r["images_per_sec"]  # evaluation included
    assert all(0.0 < r["eval_sec"] < epoch_s(r) for r in lines)
    best = min(lines, key=lambda r: r["val_error"])
    assert results["best_val_epoch"] == best["epoch"]
    assert results["test_error_at_best_val"] == best["test_error"]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["sharing"] == "relaxed"
    assert json.loads((tmp_path / "results.json").read_text()) == pytest.approx(results)


@pytest.mark.parametrize("devices", [1, 8])
def test_sum_over_split_counts_every_example_once(devices, monkeypatch):
    """Padded last batch weighted out, batches placed over the mesh, all dispatched before
    one fetch, float64 totals."""
    x = np.arange(1, 11, dtype=np.float32)  # 10 examples, batches of 8: the last padded
    y = np.arange(10, dtype=np.int32) % 3
    mesh = shd.data_mesh(jax.devices()[:devices])
    seen = []

    def batch_sums(xb, yb, weight):
        seen.append(xb.sharding.num_devices)
        return {"n": weight.sum(), "x": (xb * weight).sum(), "y": (yb * weight).sum()}

    device_get, fetched_after = jax.device_get, []

    def fetch(tree):  # the device is given every batch before the host waits for any
        fetched_after.append(len(seen))
        return device_get(tree)

    monkeypatch.setattr(jax, "device_get", fetch)
    totals = sum_over_split(batch_sums, x, y, 8, mesh)
    assert seen == [devices, devices] and fetched_after == [2]
    assert {k: float(v) for k, v in totals.items()} == {"n": 10.0, "x": 55.0, "y": 9.0}
    assert totals["x"].dtype == np.float64


def test_resume_refuses_a_changed_model(tmp_path):
    config = tiny_config("raw", num_epochs=1)
    train(config, tmp_path, max_steps=1)
    config.model.sharing = "nonshared"
    with pytest.raises(ValueError, match="model.sharing: saved 'raw', now 'nonshared'"):
        train(config, tmp_path, max_steps=2)
    assert Checkpoints(tmp_path).all_steps() == [1]  # the refused resume touched nothing


@pytest.mark.parametrize("variant", cifar10.variants())
def test_every_paper_config_builds(variant):
    config = cifar10.get_config(variant)
    model = sharing.build_model(config.model, 10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((2, 32, 32, 3))))
    assert sharing.count_params(shapes["params"]) > 100_000 or variant == "smoke"


def test_epoch_sums_give_the_means_of_the_steps_taken():
    """On device, over steps crossing an epoch's end: the means `np.mean` gives over the
    steps taken, skipped ones left out and counted, and the optimiser's last values."""
    rng = np.random.default_rng(0)
    steps = [
        {
            "loss": np.float32(rng.uniform(1, 3)),
            "error": np.float32(rng.uniform()),
            "learning_rate": np.float32(0.1 / (i + 1)),
            "skipped": np.float32(i in (5, 6)),
        }
        for i in range(8)
    ]
    steps[5]["loss"] = np.float32(np.nan)  # a skipped step's loss must not spread
    add = jax.jit(epoch.add, static_argnums=3)
    sums = epoch.zeros(steps[0])
    for i, m in enumerate(steps):
        sums = add(sums, m, i, 4)  # epochs of 4 steps: the second holds steps 4..7
    record = epoch.record(jax.device_get(sums), skipping=True)
    taken = [m for m in steps[4:] if not m["skipped"]]
    assert len(taken) == 2 and taken[0]["loss"] != taken[1]["loss"]
    np.testing.assert_allclose(record["train_loss"], np.mean([m["loss"] for m in taken]), 1e-6)
    np.testing.assert_allclose(
        record["train_error"], 100 * np.mean([m["error"] for m in taken]), 1e-6
    )
    assert record["learning_rate"] == pytest.approx(0.1 / 8)
    assert (record["train_steps"], record["skipped"]) == (4, 2)
    assert int(sums.nonfinite_step) == 0  # skipped, so not an error

    steps[5]["skipped"] = np.float32(0)  # not skipping: the first non-finite step is kept
    steps[6]["loss"] = np.float32(np.inf)
    for i, m in enumerate(steps):
        sums = add(sums, m, i, 4)
    assert int(sums.nonfinite_step) == 6 and np.isnan(sums.nonfinite_loss)


def test_a_run_stopped_mid_epoch_writes_the_records_of_an_uninterrupted_one(tmp_path):
    config = tiny_config("relaxed", num_epochs=2)  # 8 steps an epoch
    config.log_every_steps = 2
    straight = train(config, tmp_path / "straight")
    assert train(config, tmp_path / "split", max_steps=11)["step"] == 11
    # The stopped epoch's first three steps travel in the checkpoint; a record over the
    # steps before or after the stop alone would differ from the epoch's.
    run = loop.build_run(config, load_images(config.data), shd.data_mesh())
    stopped = Checkpoints(tmp_path / "split").restore_latest_usable(run.state, run.epoch_sums)
    assert stopped.step == 11 and int(stopped.epoch.steps) == 3
    records = untimed_records(tmp_path / "straight")
    assert float(stopped.epoch.sums["loss"]) / 3 != pytest.approx(records[1]["train_loss"])
    assert train(config, tmp_path / "split") == straight
    assert untimed_records(tmp_path / "split") == records
    assert [r["train_steps"] for r in records] == [8, 8]


def test_tagged_streams_never_share_a_key_and_shared_ones_did():
    rng = jax.random.PRNGKey(0)
    order = lambda k, epoch: np.asarray(jax.random.fold_in(k, epoch))  # as batch_indices
    for streams, coincide in (("shared", True), ("tagged", False)):
        step_key, order_key = (np.asarray(k) for k in stream_keys(rng, 0, streams))
        assert np.array_equal(step_key, order(order_key, 0)) == coincide, streams
    tagged = [np.asarray(k) for s in range(3) for k in stream_keys(rng, s, "tagged")]
    assert len({k.tobytes() for k in tagged}) == 4  # three step keys and one order key


def test_a_run_recorded_before_rng_streams_resumes_only_with_its_shared_keys(tmp_path):
    config = tiny_config("raw", num_epochs=1, rng_streams="shared")
    train(config, tmp_path, max_steps=1)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["rng_streams"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="rng_streams: saved 'shared', now 'tagged'"):
        train(tiny_config("raw", num_epochs=1), tmp_path, max_steps=2)
    assert train(config, tmp_path, max_steps=2)["step"] == 2
