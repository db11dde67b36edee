"""Faults inside a run and bad input: damaged checkpoints, non-finite losses, shared and
full workdirs, changed or bad configs, torn records."""

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from helpers import (
    REPO,
    damage,
    set_field,
    tiny_config,
    train,
)
from orbax.checkpoint._src.serialization import serialization

from rvm.data import load_images
from rvm.train import epoch, loop, metrics, optim
from rvm.train import sharding as shd
from rvm.train import workdir as guard
from rvm.train.checkpoint import CheckpointError, Checkpoints
from rvm.train.config_check import check_resume, validate, with_added_fields


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    config = tiny_config()
    train(config, tmp_path, max_steps=16)
    ckpts = Checkpoints(tmp_path)
    assert ckpts.all_steps() == [8, 16]
    damage(tmp_path / "checkpoints" / "16")
    with caplog.at_level("WARNING"):
        result = train(config, tmp_path, max_steps=17)
    assert result["step"] == 17
    assert f"{tmp_path}/checkpoints/16 is unusable" in caplog.text
    assert (tmp_path / "damaged_checkpoints" / "16").is_dir()  # kept for a post-mortem
    assert Checkpoints(tmp_path).all_steps() == [8, 16, 17]  # 16 written anew

    for step in Checkpoints(tmp_path).all_steps():
        damage(tmp_path / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {tmp_path}"):
        train(config, tmp_path)
    # All of them are aside now; starting again must not start the run over either.
    with pytest.raises(CheckpointError, match="has only damaged checkpoints"):
        train(config, tmp_path)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_checkpoint_of_another_state_is_refused_and_left_in_place(tmp_path):
    """A changed parameter tree (new code) is not damage: nothing is moved aside."""
    ckpts = Checkpoints(tmp_path)
    sums, records = {"loss": jnp.ones(())}, {"config": {}, "records": []}
    ckpts.save(1, {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}, sums, records)
    other = {"w": jnp.ones((3, 4)), "b": jnp.zeros(2), "extra": jnp.zeros(1)}
    with pytest.raises(CheckpointError, match=r"2 arrays differ[\s\S]*w: saved \(\(3, 2\)"):
        ckpts.restore_latest_usable(other, sums)
    assert ckpts.all_steps() == [1] and not (tmp_path / "damaged_checkpoints").exists()
    restored = ckpts.restore_latest_usable({"w": jnp.zeros((3, 2)), "b": jnp.ones(2)}, sums)
    np.testing.assert_array_equal(restored.state["w"], np.ones((3, 2)))
    assert restored.records == records


def test_a_checkpoint_of_code_with_other_step_metrics_resumes_its_epoch(tmp_path, caplog):
    """Code that adds a step metric (or drops one) still resumes a run stopped mid-epoch:
    the epoch's other sums go on, the added metric's mean reads NaN until the epoch ends."""
    state = {"w": jnp.ones(3)}
    step_metrics = lambda *names: {k: jnp.float32(i + 1) for i, k in enumerate(names)}
    old = step_metrics("loss", "error", "dropped", "learning_rate")
    saved = epoch.add(epoch.zeros(old), old, jnp.int32(0), 10)
    Checkpoints(tmp_path).save(1, state, saved, {"config": {}, "records": []})
    new = step_metrics("loss", "error", "added", "learning_rate")
    with caplog.at_level("WARNING"):
        restored = Checkpoints(tmp_path).restore_latest_usable(state, epoch.zeros(new))
    assert "without the step metrics added" in caplog.text
    assert set(restored.epoch.sums) == set(restored.epoch.carry) == {"loss", "error", "added"}
    sums = epoch.add(restored.epoch, new, jnp.int32(1), 10)
    means = epoch.means(jax.device_get(sums))
    assert (means["loss"], means["error"], means["learning_rate"]) == (1.0, 2.0, 4.0)
    assert np.isnan(means["added"]) and int(sums.steps) == 2
    fresh = epoch.means(jax.device_get(epoch.add(sums, new, jnp.int32(10), 10)))
    assert fresh["added"] == 3.0  # the next epoch records it


def test_a_checkpoint_without_the_epoch_and_records_is_analysed_not_resumed(tmp_path):
    """Checkpoints of the train state alone (older rvm) still restore their state."""
    state = {"w": jnp.ones((3, 2))}
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(4, args=ocp.args.StandardSave(state))
    ckpts = Checkpoints(tmp_path)
    np.testing.assert_array_equal(ckpts.restore(state, 4)["w"], np.ones((3, 2)))
    with pytest.raises(CheckpointError, match="lacks the epoch, records of a resumable run"):
        ckpts.restore_latest_usable(state, {"loss": jnp.ones(())})
    assert ckpts.all_steps() == [4] and not (tmp_path / "damaged_checkpoints").exists()


def _two_checkpoints(workdir: Path, state, sums) -> Checkpoints:
    ckpts = Checkpoints(workdir)
    for step in (1, 2):
        ckpts.save(step, state, sums, {"config": {}, "records": []})
    return ckpts


def _empty(directory: Path) -> None:
    for path in directory.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_empty, "{newest} is empty"),
        (lambda d: shutil.rmtree(d / "epoch"), "{newest}/epoch is missing"),
    ],
    ids=["emptied", "epoch deleted"],
)
def test_a_newest_checkpoint_emptied_or_lacking_an_item_is_moved_aside(
    tmp_path, caplog, damage, reason
):
    """Damage, not an older rvm's checkpoint: the run goes on from the one before, and
    rvm's warning, saying what is wrong, is the only line (orbax's own are not shown)."""
    state, sums = {"w": jnp.arange(6.0)}, {"loss": jnp.ones(())}
    _two_checkpoints(tmp_path, state, sums)
    newest = tmp_path / "checkpoints" / "2"
    damage(newest)
    with caplog.at_level("WARNING"):
        restored = Checkpoints(tmp_path).restore_latest_usable(state, sums)
    assert restored.step == 1 and (tmp_path / "damaged_checkpoints" / "2").is_dir()
    aside = tmp_path / "damaged_checkpoints" / "2"
    assert caplog.messages == [
        f"checkpoint {newest} is unusable ({reason.format(newest=newest)}); moved to {aside}, "
        "trying the one before"
    ]


def test_a_failed_restore_names_the_file_and_leaves_no_library_tracebacks(
    tmp_path, caplog, monkeypatch
):
    """Orbax reads a checkpoint's arrays concurrently; when one read fails it closes its
    event loop with the others still running, and they complain when they finish or are
    collected. Here the first read of the damaged checkpoint fails on a zero-filled file
    while the others wait until after the fallback; nothing of theirs reaches the hook
    that prints exceptions Python ignores, or the log."""
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    state = {f"w{i}": jnp.asarray(np.random.default_rng(i).normal(size=(64, 64))) for i in range(4)}
    sums = {"loss": jnp.ones(())}
    _two_checkpoints(tmp_path, state, sums)
    for data in (tmp_path / "checkpoints/2/default/ocdbt.process_0/d").iterdir():
        data.write_bytes(bytes(data.stat().st_size))
    read, reads, waiting = serialization._read_shard, [], []

    async def the_first_read_of_step_2_alone(**kwargs):
        if "/checkpoints/2/" in str(kwargs["t"].spec()):
            reads.append(1)
            if len(reads) > 1:
                promise, future = ts.Promise.new()
                waiting.append(promise)
                await future
        return await read(**kwargs)

    monkeypatch.setattr(serialization, "_read_shard", the_first_read_of_step_2_alone)
    with caplog.at_level("WARNING"):
        assert Checkpoints(tmp_path).restore_latest_usable(state, sums).step == 1
        assert len(waiting) == 3
        for promise in waiting:  # the abandoned reads finish, on the closed event loop
            promise.set_result(None)
        gc.collect()  # and are collected
    assert ignored == []
    (message,) = caplog.messages
    assert re.match(
        rf"checkpoint {tmp_path}/checkpoints/2 is unusable \({tmp_path}/checkpoints/2/default/"
        r"ocdbt.process_0/d/\w+ holds only zero bytes\)",
        message,
    ), message


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config()
    # A learning rate that explodes after step 10 of 24: the first epoch trains cleanly.
    config.optim.lr_boundaries = (0.4,)
    config.optim.lr_decay = 1e30
    with pytest.raises(FloatingPointError, match=r"metric 'loss' is (nan|inf) at step 1\d"):
        train(config, tmp_path / "stops")
    assert Checkpoints(tmp_path / "stops").all_steps() == [8]

    config.skip_nonfinite = True
    result = train(config, tmp_path / "skips")
    assert result["finished"]
    lines = (tmp_path / "skips" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert records[0]["skipped"] == 0 and records[-1]["skipped"] > 0
    # Means over the steps taken, so a skipped step's non-finite loss does not spread.
    assert all(np.isfinite(r["train_loss"]) for r in records if r["skipped"] < r["train_steps"])
    # Skipped steps still count for the schedules: every step count of the optimiser
    # (learning rate, pull) is the run's.
    shapes = loop.state_shapes(config, loop.load_data(config))
    state = Checkpoints(tmp_path / "skips").restore(shapes)
    counts = [
        int(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if getattr(path[-1], "name", None) == "count"
    ]
    assert counts and counts == [int(state.step)] * len(counts) and int(state.step) == 24


def test_second_run_on_a_workdir_refuses_and_a_dead_owner_holds_nothing(tmp_path):
    with guard.exclusive(tmp_path):
        with pytest.raises(
            guard.WorkdirBusyError, match=f"{tmp_path} is in use by pid {os.getpid()}"
        ):
            train(tiny_config(), tmp_path, max_steps=1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from rvm.train import workdir as g\n"
            f"with g.exclusive(Path({str(tmp_path)!r})):\n"
            "    print('held', flush=True); time.sleep(600)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(guard.WorkdirBusyError):
        with guard.exclusive(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with guard.exclusive(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_full_or_unwritable_workdir_fails_at_start_naming_it(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1024))
    with pytest.raises(OSError, match=f"workdir {tmp_path} has 0.0 MiB free"):
        train(tiny_config(), tmp_path)
    monkeypatch.undo()

    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(OSError, match=f"workdir {tmp_path} is not writable: Permission denied"):
        train(tiny_config(), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_resume_allows_safe_changes(tmp_path):
    config = tiny_config()
    train(config, tmp_path, max_steps=8)
    config.log_every_steps = 1
    config.eval_batch_size = 32
    assert train(config, tmp_path, max_steps=9)["step"] == 9
    # Synthetic images are other data: the run's schedules would follow another dataset.
    config.data.source = "binary"
    with pytest.raises(ValueError, match="data.source: saved 'synthetic', now 'binary'"):
        train(config, tmp_path, max_steps=10)


def test_resume_may_switch_between_readers_of_the_real_cifar10(tmp_path):
    config = tiny_config()
    (tmp_path / "run").mkdir()
    saved = {**config.to_dict(), "data": {**config.data.to_dict(), "source": "tfds"}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    for source in ("binary", "auto", "tfds"):
        config.data.source = source
        check_resume(config, tmp_path / "run")
    config.data.source = "synthetic"
    with pytest.raises(ValueError, match="data.source: saved 'tfds', now 'synthetic'"):
        check_resume(config, tmp_path / "run")


def test_fields_added_since_a_run_was_saved_are_filled_for_its_task_only():
    """A CIFAR-10 run saved before the ResNet's later options reads as one with their old
    values; another task's config gains none of them, only the loop's own."""
    image = {"model": {"sharing": "raw"}}  # no task field: an image run
    filled = with_added_fields(image)
    assert filled["model"] == {
        "sharing": "raw",
        "unroll": False,
        "conv_impl": "xla",
        "random_iterations": False,
        "iterations_mean": 2.0,
        "iterations_sigma": 0.5,
        "widths": [16, 32, 64],
    }
    assert filled["rng_streams"] == "shared" and image == {"model": {"sharing": "raw"}}
    tracker = with_added_fields({"task": "tracker", "model": {"size": 32}})
    assert tracker == {"task": "tracker", "model": {"size": 32}, "rng_streams": "shared"}
    saved = with_added_fields({"model": {"conv_impl": "gemm"}, "rng_streams": "tagged"})
    assert saved["model"]["conv_impl"] == "gemm" and saved["rng_streams"] == "tagged"


def test_learning_rate_decays_that_fall_on_one_step_are_refused():
    config = tiny_config()
    config.optim.lr_boundaries = (0.5, 0.504)
    with pytest.raises(ValueError, match=r"fall on the same steps \[50, 50\] of 100"):
        optim.learning_rate(config.optim, 100)
    schedule = optim.learning_rate(config.optim, 1000)
    lr = config.optim.learning_rate
    assert float(schedule(999)) == pytest.approx(lr * config.optim.lr_decay**2)
    config.optim.name = "rmsprop"
    with pytest.raises(ValueError, match="optim.name='rmsprop' is not one of sgd, adam"):
        optim.make_optimizer(config.optim, 1000)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "batch_size=0 must be a positive integer"),
        ("batch_size", 12.5, "batch_size=12.5 must be a positive integer"),
        ("num_epochs", -1, "num_epochs=-1 must be a positive integer"),
        ("model.sharing", "shared", "model.sharing='shared' is not one of"),
        ("model.scope", "lower", "model.scope='lower' is not one of middle, all"),
        ("model.final_death_rate", 1.5, "model.final_death_rate=1.5 must be a number in [0, 1)"),
        ("model.final_death_rate", -0.1, "must be a number in [0, 1)"),
        ("model.blocks_per_level", (3, 4), "must be 3 integers"),
        ("optim.pull_start", 0.0, "optim.pull_start=0.0 must be a positive number"),
        ("optim.pull_end", -1.0, "optim.pull_end=-1.0 must be a positive number"),
        ("optim.lr_boundaries", (0.75, 0.5), "must be strictly increasing fractions"),
        ("optim.lr_boundaries", (0.5, 0.5), "must be strictly increasing fractions"),
        ("optim.momentum", 1.0, "optim.momentum=1.0 must be below 1"),
        ("optim.nesterov", 1, "optim.nesterov=1 must be True or False"),
        ("data.normalization", "pixel", "data.normalization='pixel' is not one of feature"),
        ("data.flip", "yes", "data.flip='yes' must be True or False"),
        ("seed", "0", "seed='0' must be an integer"),
    ],
)
def test_bad_config_values_are_named_before_compiling(field, value, message):
    config = tiny_config()
    set_field(config, field, value)
    with pytest.raises(ValueError) as err:
        validate(config)
    assert message in str(err.value)


def test_batch_not_divisible_by_devices_is_named(tmp_path):
    config = tiny_config()
    config.batch_size = 30
    data = load_images(config.data)
    with pytest.raises(ValueError, match="batch_size=30 is not divisible by the 8 devices"):
        loop.build_run(config, data, shd.data_mesh())


def test_a_torn_last_record_is_dropped_and_a_damaged_one_before_it_is_not(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')  # killed while appending
    assert metrics.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"ste\n{"step": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        metrics.read_jsonl(path)


def test_records_are_rebuilt_from_the_checkpoints(tmp_path, caplog):
    """A torn config.json or a torn last line of metrics.jsonl, as a kill mid-write (or a
    hand edit) leaves them, is rewritten from the newest checkpoint's copy."""
    config = tiny_config()
    train(config, tmp_path, max_steps=16)
    config_text = (tmp_path / "config.json").read_text()
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert len(lines.splitlines()) == 2
    (tmp_path / "config.json").write_text(config_text[: len(config_text) // 2])
    changed = tiny_config()
    changed.model.sharing = "nonshared"
    # Resuming is still checked against the run's config: the checkpoint's.
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="model.sharing: saved"):
        train(changed, tmp_path)
    assert f"{tmp_path}/config.json is missing or not JSON; rebuilt from checkpoint 16" in (
        caplog.text
    )
    assert (tmp_path / "config.json").read_text() == config_text

    (tmp_path / "metrics.jsonl").write_text(lines[: -len(lines.splitlines()[-1]) // 2])
    assert len(metrics.read_jsonl(tmp_path / "metrics.jsonl")) == 1
    with caplog.at_level("WARNING"):
        train(config, tmp_path, max_steps=17)
    assert f"{tmp_path}/metrics.jsonl: 1 lost record(s) rewritten from checkpoint 16" in (
        caplog.text
    )
    assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_a_failed_start_leaves_the_workdir_as_it_found_it(tmp_path):
    config = tiny_config()
    config.data.source = "binary"
    config.data.binary_dir = str(tmp_path / "no_data")
    with pytest.raises(FileNotFoundError):
        train(config, tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError):
        train(config, tmp_path / "old")
    assert os.listdir(tmp_path / "old") == ["notes.txt"]
    # A loss non-finite from the first steps, before any checkpoint.
    config = tiny_config()
    config.optim.learning_rate = 1e30
    with pytest.raises(loop.NonFiniteError, match="at step [1-8];"):
        train(config, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def _files(workdir: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


def test_a_start_refused_for_a_changed_config_changes_nothing(one_epoch, tmp_path):
    run = shutil.copytree(one_epoch, tmp_path / "run")
    (run / ".lock").write_text("pid 1\n")  # the last run's
    before = _files(run)
    changed = tiny_config()
    changed.model.sharing = "nonshared"
    with pytest.raises(ValueError, match="model.sharing: saved"):
        train(changed, run)
    assert _files(run) == before


def test_a_partial_line_appended_to_the_records_is_dropped_with_a_warning(
    one_epoch, tmp_path, caplog
):
    """A kill while an epoch's line was appended, before its checkpoint."""
    run = shutil.copytree(one_epoch, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "eval_sec": 0.5, "ima')
    with caplog.at_level("WARNING"):
        train(tiny_config(), run, max_steps=9)
    assert caplog.messages == [
        f"{run / 'metrics.jsonl'}: dropping its torn last line "
        """'{"epoch": 2, "eval_sec": 0.5, "ima'"""
    ]
    assert (run / "metrics.jsonl").read_text() == lines
