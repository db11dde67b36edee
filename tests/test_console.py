"""What a user sees: a short console without the libraries' chatter, one-line errors with
exit status 2 for what the user can fix, finite config values, a full disk mid-checkpoint."""

import asyncio
import math
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from absl import logging
from helpers import REPO, child_env, launcher_args, set_field

from experiments.configs import cifar10
from rvm.errors import USER_ERROR_EXIT_CODE, ConfigError, UserError
from rvm.train import metrics
from rvm.train import workdir as guard
from rvm.train.checkpoint import CheckpointError, Checkpoints
from rvm.train.config_check import check_resume, validate

# 128 images / batch 32 = 4 steps an epoch, 2 epochs, a progress line every 2 steps.
TINY = {
    "model.blocks_per_level": "(1,2,2)",
    "data.synthetic_train": "128",
    "data.synthetic_test": "64",
    "batch_size": "32",
    "eval_batch_size": "64",
    "num_epochs": "2",
    "log_every_steps": "2",
}


def train(workdir, *extra: str) -> subprocess.CompletedProcess:
    """The smoke launcher on the tiny overrides, its stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *launcher_args(workdir, TINY), *extra],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def test_smoke_run_prints_a_short_console_and_names_its_files(tmp_path):
    workdir = tmp_path / "run"
    proc = train(workdir)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(lines) <= 40, proc.stdout
    assert not [line for line in lines if "orbax" in line or "future.py" in line], proc.stdout
    epochs = [line for line in lines if line.startswith("epoch 2/2  train loss")]
    assert len(epochs) == 1 and len(epochs[0]) <= 120, proc.stdout
    assert "test error" in epochs[0] and "max angle" in epochs[0]
    # Plain progress lines (not a terminal): epoch, step, loss, speed and ETA.
    assert any(
        line.startswith("epoch 1/2 step 2/8  loss ") and "images/s  ETA " in line for line in lines
    ), proc.stdout
    for name in ("results.json", "metrics.jsonl", "checkpoints"):
        assert f"{workdir / name}" in proc.stdout and (workdir / name).exists(), name
    assert f"tensorboard --logdir {workdir / 'tensorboard'}" in proc.stdout
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == USER_ERROR_EXIT_CODE, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stdout
    return errors[0]


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    line = _one_error_line(train(path))
    assert line == f"error: workdir {path} is a file; pick another --workdir"


def test_a_workdir_under_a_file_is_one_line(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    line = _one_error_line(train(path / "run"))
    assert f"is under {path}, which is a file" in line


@pytest.mark.parametrize(
    "override, named",
    [
        ("--config.batch_size=0", "batch_size=0 must be a positive integer"),
        ("--config.optim.learning_rate=nan", "optim.learning_rate=nan must be a finite number"),
    ],
)
def test_a_bad_config_value_is_one_line_before_anything_is_made(tmp_path, override, named):
    workdir = tmp_path / "run"
    line = _one_error_line(train(workdir, override))
    assert named in line
    assert not workdir.exists()


def test_missing_data_is_one_line_naming_where_it_looked(tmp_path):
    missing = tmp_path / "no_cifar"
    line = _one_error_line(
        train(
            tmp_path / "run",
            "--config.data.source=auto",
            f"--config.data.binary_dir={missing}",
            f"--config.data.tfds_data_dir={tmp_path / 'no_tfds'}",
        )
    )
    assert line.startswith("error: data.source='auto' found no CIFAR-10.")
    assert f"{missing}: does not exist" in line


def test_traceback_flag_shows_the_traceback(tmp_path):
    proc = train(tmp_path / "run", "--config.optim.learning_rate=nan", "--traceback")
    assert proc.returncode not in (0, USER_ERROR_EXIT_CODE)
    assert "Traceback" in proc.stdout and "ConfigError: optim.learning_rate=nan" in proc.stdout


@pytest.mark.parametrize(
    "field, value",
    [
        ("optim.learning_rate", math.nan),
        ("optim.pull_end", math.inf),
        ("model.final_death_rate", -math.inf),
        ("optim.lr_boundaries", (0.5, math.nan)),
    ],
)
def test_every_float_of_the_config_is_checked_finite(field, value):
    config = cifar10.get_config("smoke")
    set_field(config, field, value)
    shown = f"{field}[1]" if isinstance(value, tuple) else field
    with pytest.raises(ConfigError, match=rf"^{re.escape(shown)}=.* must be a finite number$"):
        validate(config)


# A checkpoint's epoch sums and records, which these tests do not look at.
EXTRAS = ({"n": jnp.zeros(())}, {"config": {}, "records": []})


def _fail_after_writing(message: str):
    """A handler save that leaves a partial file in orbax's temporary directory, then fails."""

    def async_save(self, directory, *args, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "partial").write_bytes(b"half")
        raise ValueError(message)

    return async_save


def test_a_full_disk_during_a_checkpoint_is_one_error_and_loses_nothing(tmp_path, monkeypatch):
    ckpts = Checkpoints(tmp_path)
    state = {"w": jnp.arange(6.0)}
    ckpts.save(1, state, *EXTRAS)
    full = "RESOURCE_EXHAUSTED: Failed writing: ... No space left on device [os_error_code='28']"
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", _fail_after_writing(full))
    with pytest.raises(CheckpointError) as err:
        ckpts.save(2, state, *EXTRAS)
    assert isinstance(err.value, UserError)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(
        f"could not write the checkpoint of step 2 in workdir {tmp_path}: no space left on device"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    monkeypatch.undo()
    restored = Checkpoints(tmp_path).restore(state, 1)
    np.testing.assert_array_equal(restored["w"], state["w"])


def test_the_writes_a_full_disk_leaves_running_print_nothing_after_its_error(tmp_path, monkeypatch):
    """A full disk fails one of orbax's concurrent writes; the others, abandoned on the event
    loop orbax closes, finish after rvm's one-line error and must not print tracebacks."""
    ignored, left = [], []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)

    async def async_save(self, directory, *args, **kwargs):
        promise, write = ts.Promise.new()
        left.append((promise, asyncio.ensure_future(write)))  # another write, still running
        raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)
    with pytest.raises(CheckpointError, match="no space left on device"):
        Checkpoints(tmp_path).save(1, {"w": jnp.arange(6.0)}, *EXTRAS)
    for promise, _ in left:
        promise.set_result(None)  # it finishes, on the closed event loop
    assert len(left) == 2 and ignored == []  # the state's write and the epoch's


def test_another_error_during_a_checkpoint_is_not_taken_for_the_users(tmp_path, monkeypatch):
    ckpts = Checkpoints(tmp_path)
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", _fail_after_writing("a bug"))
    with pytest.raises(ValueError, match="a bug") as err:
        ckpts.save(1, {"w": jnp.arange(6.0)}, *EXTRAS)
    assert not isinstance(err.value, UserError)


def test_epoch_lines_are_short_and_progress_names_epoch_speed_and_eta(tmp_path, caplog):
    writer = metrics.MetricWriter(tmp_path, 40, steps_per_epoch=10, batch_size=64, unit="images")
    record = {
        "epoch": 1,
        "step": 10,
        "train_loss": 2.0471234,
        "train_error": 74.0234,
        "val_error": 61.5,
        "test_error": 60.15625,
        "test_loss": 2.7,
        "max_angle": {f"level{i}/conv{j}": 40.0 + i + j for i in (1, 2, 3) for j in (1, 2)},
        "images_per_sec": 86.06,
        "eval_sec": 2.02,
        "learning_rate": 0.1,
        "penalty": 66.76,
        "pull": 0.000866,
    }
    with caplog.at_level(logging.INFO):
        writer.progress(5, 0, {"loss": 2.25})
        writer.write(10, 0, record)
    writer.close()
    progress, epoch = [r.getMessage() for r in caplog.records]
    assert progress.startswith("epoch 1/4 step 5/40  loss 2.25  ") and " images/s  ETA " in progress
    assert epoch.startswith(
        "epoch 1/4  train loss 2.047  error 74.0%  val error 61.5%  test error 60.2%  "
        "max angle 45.0 deg  "
    )
    assert len(epoch) <= 120
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl")[0]["test_error"] == 60.15625


def test_a_busy_workdir_and_a_changed_config_are_one_line_user_errors(tmp_path):
    config = cifar10.get_config("smoke")
    metrics.write_json(tmp_path / "config.json", config.to_dict())
    config.model.sharing = "raw"
    with pytest.raises(UserError) as err:
        check_resume(config, tmp_path)
    assert "\n" not in str(err.value) and "model.sharing: saved 'relaxed', now 'raw'" in str(
        err.value
    )
    with guard.exclusive(tmp_path):
        with pytest.raises(UserError, match="in use by pid"):
            with guard.exclusive(tmp_path):
                pass


def test_the_closing_lines_name_each_tasks_numbers_and_the_records():
    predicted = {"finished": True, "step": 4, "params": 6758, "test_mse": 0.025, "test_psnr": 16.2}
    lines = metrics.summary(predicted, "w")
    assert lines[0] == "done: test MSE 0.0250, PSNR 16.20, 6,758 parameters"
    assert lines[1:] == [
        "  results      w/results.json",
        "  per epoch    w/metrics.jsonl",
        "  checkpoints  w/checkpoints",
        "  tensorboard  tensorboard --logdir w/tensorboard",
    ]
    stopped = metrics.summary({"finished": False, "step": 8}, "w")
    assert stopped == ["stopped at step 8; run the same command again to resume"]


def test_an_unwritable_workdir_is_a_one_line_user_error(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(UserError) as err:
        with guard.exclusive(tmp_path):
            pass
    assert isinstance(err.value, OSError)
    assert str(err.value) == (
        f"workdir {tmp_path} is not writable: Permission denied; pick another --workdir"
    )
