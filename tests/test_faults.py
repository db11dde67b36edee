"""Runs that die and bad input: kill anywhere and resume exactly, preemption, damaged
checkpoints, non-finite losses, shared workdirs, full disks, bad configs."""

import dataclasses
import gc
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from helpers import TINY, damage, set_field, tiny_config, untimed_records
from orbax.checkpoint._src.serialization import serialization

from rvm.data import load_images
from rvm.train import hugepages, loop, metrics, optim
from rvm.train import sharding as shd
from rvm.train import workdir as guard
from rvm.train.checkpoint import CheckpointError, Checkpoints
from rvm.train.config_check import check_resume, validate
from rvm.train.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, StopSignals

REPO = Path(__file__).resolve().parents[1]


def launch(workdir: Path) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/cifar10.py:smoke",
    ]
    args += [f"--config.{k}={v}" for k, v in TINY.items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen(
        [*args, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def final_params(workdir: Path):
    config = tiny_config()
    run = loop.build_run(config, load_images(config.data), shd.data_mesh(jax.devices()[:1]))
    ckpts = Checkpoints(workdir)
    state = ckpts.restore(run.state, ckpts.latest_step())
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(workdir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return workdir


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGKILLs `proc` once `ready()` holds; False if it finished first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_parameters(uninterrupted, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"

    def writing():  # orbax is writing a step into a temporary directory
        return ckpt_dir.exists() and any("tmp" in p.name for p in ckpt_dir.iterdir())

    def after(seconds):
        start = time.time()
        return lambda: time.time() - start > seconds

    # First inside a checkpoint write, then at random moments (start-up, steps,
    # evaluation); each restart must pick up only complete checkpoints.
    rng = random.Random(0)
    caught_writing = kill_when(launch(tmp_path), writing)
    for _ in range(2):
        proc = launch(tmp_path)
        kill_when(proc, after(rng.uniform(5, 25)))
    proc = launch(tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert caught_writing, "the run was never caught inside a checkpoint write"
    for a, b in zip(final_params(uninterrupted), final_params(tmp_path), strict=True):
        np.testing.assert_array_equal(a, b)
    epochs = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line]
    assert len(epochs) == 3  # epochs redone after a kill are not logged twice
    assert untimed_records(tmp_path) == untimed_records(uninterrupted)


@pytest.fixture
def sigint(request):
    """SIGINT's handler set to `request.param` for the test, then put back: a suite started
    as a shell's background job inherits SIGINT ignored, one started in a terminal not.
    A handler set from Python is a caught signal, which `exec` resets to the default, so
    the runs the test starts also begin as from a terminal."""
    previous = signal.signal(signal.SIGINT, request.param)
    yield request.param
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sigint", [signal.default_int_handler], indirect=True)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_exits_with_the_requeue_code_and_loses_nothing(
    uninterrupted, tmp_path, signum, sigint
):
    """SIGTERM (a scheduler) or Ctrl-C, wherever it lands: the run saves the step it
    stopped at, exits with 75, and its restart ends as the uninterrupted run did."""
    proc = launch(tmp_path)
    first_epoch_logged = lambda: (tmp_path / "metrics.jsonl").exists()
    deadline = time.time() + 300
    while proc.poll() is None and not first_epoch_logged() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    step = int(re.search(rf"{signum.name} at step (\d+)", err).group(1))
    assert Checkpoints(tmp_path).latest_step() == step
    proc = launch(tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    results = lambda workdir: json.loads((workdir / "results.json").read_text())
    assert results(tmp_path) == results(uninterrupted)
    assert untimed_records(tmp_path) == untimed_records(uninterrupted)
    for a, b in zip(final_params(uninterrupted), final_params(tmp_path), strict=True):
        np.testing.assert_array_equal(a, b)


def _stepping_with(monkeypatch, act) -> None:
    """Makes the loop call `act(i)` before its i-th step (from 0) in this process."""
    build_run = loop.build_run

    def build(*args):
        run = build_run(*args)
        calls = itertools.count()

        def epoch_step(*step_args):
            act(next(calls))
            return run.epoch_step(*step_args)

        return dataclasses.replace(run, epoch_step=epoch_step)

    monkeypatch.setattr(loop, "build_run", build)


def test_the_host_reads_the_device_only_at_log_points_epoch_ends_and_stops(tmp_path, monkeypatch):
    config = tiny_config()
    config.log_every_steps = 3  # epochs of 8 steps
    dispatched, reads = [], []  # the steps queued, and how many were at each read
    _stepping_with(monkeypatch, dispatched.append)
    fetched = loop._fetched

    def fetching(sums):
        reads.append(len(dispatched))
        return fetched(sums)

    monkeypatch.setattr(loop, "_fetched", fetching)
    loop.train_and_evaluate(config, tmp_path, max_steps=11)
    assert reads == [3, 6, 8, 9, 11]


@pytest.mark.parametrize("sigint", [signal.default_int_handler], indirect=True)
def test_a_signal_at_start_up_stops_cleanly_and_a_second_ctrl_c_stops_at_once(
    tmp_path, monkeypatch, sigint
):
    config = tiny_config()
    run = tmp_path / "run"
    loop.train_and_evaluate(config, run, max_steps=12)
    before = Checkpoints(run).all_steps(), (run / "metrics.jsonl").read_text()
    load_data = loop.load_data

    def load_after_sigterm(config):
        os.kill(os.getpid(), signal.SIGTERM)  # while the data loads
        return load_data(config)

    monkeypatch.setattr(loop, "load_data", load_after_sigterm)
    with pytest.raises(loop.Preempted, match="SIGTERM at step 12"):
        loop.train_and_evaluate(config, run)
    assert (Checkpoints(run).all_steps(), (run / "metrics.jsonl").read_text()) == before
    monkeypatch.undo()

    def ctrl_c_twice(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    _stepping_with(monkeypatch, ctrl_c_twice)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, run)
    assert (Checkpoints(run).all_steps(), (run / "metrics.jsonl").read_text()) == before
    with pytest.raises(KeyboardInterrupt):  # before a first checkpoint: nothing left behind
        loop.train_and_evaluate(config, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert signal.getsignal(signal.SIGINT) is sigint  # handlers restored


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """The tiny run stopped after its first epoch (step 8), with its checkpoint: copy it."""
    workdir = tmp_path_factory.mktemp("one_epoch") / "run"
    loop.train_and_evaluate(tiny_config(), workdir, max_steps=8)
    return workdir


def _copy(workdir: Path, to: Path) -> Path:
    shutil.copytree(workdir, to)
    return to


@pytest.mark.parametrize("sigint", [signal.default_int_handler], indirect=True)
def test_a_signal_after_the_last_step_was_queued_is_answered_in_one_line(
    one_epoch, tmp_path, monkeypatch, caplog, sigint
):
    """The steps already queued on the device cannot be called back: the run ends as it
    would have without the signal, and says so."""
    run = _copy(one_epoch, tmp_path / "run")
    _stepping_with(monkeypatch, lambda i: i == 1 and os.kill(os.getpid(), signal.SIGINT))
    with caplog.at_level("WARNING"):
        result = loop.train_and_evaluate(tiny_config(), run, max_steps=10)  # steps 8 and 9
    assert result["step"] == 10 and Checkpoints(run).latest_step() == 10
    assert caplog.messages == [
        "SIGINT after the last step was queued: the run had already finished its steps"
    ]


@pytest.mark.parametrize("sigint", [signal.SIG_IGN], indirect=True)
def test_a_sigint_ignored_at_start_stays_ignored(sigint):
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)  # to this thread: handled before it returns
        assert not stop.stop_at(1) and stop.received is None
        signal.raise_signal(signal.SIGTERM)  # still taken
        assert stop.stop_at(1) and stop.received == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# The launcher on the tiny run (argv: stage, signal name, its flags), with `signal` sent to
# itself at `stage` of its start: `import`, while it imports jax; `restart`, just before it
# restarts itself on huge pages; `started`, twice (a second Ctrl-C), once its start is done;
# `full`, no signal: the disk has 1 KiB free. The restarted process sends nothing.
_LAUNCH_AT = """
import os, runpy, shutil, signal, sys
stage, signum = sys.argv[1], getattr(signal, sys.argv[2])
sys.argv = [sys.argv[0], *sys.argv[3:]]
first = "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "")
if stage == "import" and first:
    class SignalOnJax:
        def find_spec(self, name, path=None, target=None):
            if name == "jax":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signum)
    sys.meta_path.insert(0, SignalOnJax())
if stage == "restart" and first:
    execve = os.execve
    def signal_then_execve(*args):
        os.kill(os.getpid(), signum)
        execve(*args)
    os.execve = signal_then_execve
if stage == "started":
    from experiments import launcher
    start = launcher.start
    def start_then_signal_twice():
        start()
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signum)
    launcher.start = start_then_signal_twice
if stage == "full":
    usage = shutil.disk_usage
    shutil.disk_usage = lambda path: usage(path)._replace(free=1024)
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
"""


def _launch_at(workdir: Path, stage: str, signum: int = signal.SIGTERM):
    args = ["--config=experiments/configs/cifar10.py:smoke", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in TINY.items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop("GLIBC_TUNABLES", None)
    return subprocess.run(
        [sys.executable, "-c", _LAUNCH_AT, stage, signal.Signals(signum).name, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("sigint", [signal.default_int_handler], indirect=True)
@pytest.mark.parametrize(
    "stage, signum, code, line",
    [
        (
            "import",
            signal.SIGINT,
            PREEMPTED_EXIT_CODE,
            "SIGINT during start-up, before anything was written; exiting with 75 to be requeued",
        ),
        (
            "restart",
            signal.SIGTERM,
            PREEMPTED_EXIT_CODE,
            "SIGTERM during start-up, before anything was written; exiting with 75 to be requeued",
        ),
        (
            "started",
            signal.SIGINT,
            INTERRUPTED_EXIT_CODE,
            "a second Ctrl-C: stopped at once, without saving; exiting with 130",
        ),
    ],
    ids=["import", "restart", "started"],
)
def test_a_signal_in_the_launcher_s_first_seconds_is_one_line_and_its_exit_code(
    tmp_path, sigint, stage, signum, code, line
):
    """SIGTERM or Ctrl-C while the launcher imports its libraries, across its restart on
    huge pages, or twice once it has started: it stops with one line and the documented
    code, leaving no workdir, instead of dying by the signal, a traceback or a finished run."""
    if stage == "restart" and not hugepages.supported():
        pytest.skip("no restart on huge pages here")
    proc = _launch_at(tmp_path / "run", stage, signum)
    assert (proc.returncode, proc.stdout.splitlines()) == (code, [f"warning: {line}"])
    assert not (tmp_path / "run").exists()


# The tiny run in a process of its own: alone (argv: workdir, tests dir) or as one of
# two `jax.distributed` processes on this host's CPU, over gloo (also address, index).
_PROCESS = """
import sys
import jax
if len(sys.argv) > 3:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[3], num_processes=2, process_id=int(sys.argv[4]))
sys.path.insert(0, sys.argv[2])
from helpers import tiny_config
from rvm.train import loop, signals
try:
    print("RESULTS", loop.train_and_evaluate(tiny_config(), sys.argv[1]))
except loop.Preempted as e:
    print("PREEMPTED", e)
    sys.exit(signals.PREEMPTED_EXIT_CODE)
"""


def _start(workdir: Path, devices: int, *distributed: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _PROCESS, str(workdir), str(REPO / "tests"), *distributed],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _results(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return next(line for line in out.splitlines() if line.startswith("RESULTS"))


def _pair(workdir: Path) -> list[subprocess.Popen]:
    """The two processes of one `jax.distributed` run, one device each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    return [_start(workdir, 1, address, str(i)) for i in range(2)]


def _stop_pair(workdir: Path, signum: int, to: tuple[int, ...]) -> None:
    """Starts a pair and sends `signum` to the processes `to` after the first epoch (step
    8 of 24): both must stop after one step, with its checkpoint."""
    procs = _pair(workdir)
    deadline = time.time() + 300
    while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.01)
    for i in to:
        procs[i].send_signal(signum)
    stopped = set()
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
        stopped.add(int(re.search(r"(?:SIGTERM|SIGINT) at step (\d+)", out).group(1)))
    assert len(stopped) == 1, stopped
    step = stopped.pop()
    assert step < 24 and step in Checkpoints(workdir).all_steps()


def test_two_processes_train_one_run_together(tmp_path):
    """Two processes of one device each train the run of one process with two devices,
    to the bit, through a preemption: SIGTERM to one of them stops both after the same
    step, with its checkpoint, and the records are those of the run that was not stopped,
    wherever the signal landed. The first process alone writes the run's records."""
    together, alone = tmp_path / "together", tmp_path / "alone"
    _stop_pair(together, signal.SIGTERM, to=(1,))

    results = [_results(p) for p in _pair(together)]
    assert results[0] == results[1] == _results(_start(alone, 2))
    assert "'finished': True" in results[0]
    # The last epochs' checkpoints; the first one kept depends on when SIGTERM landed.
    assert Checkpoints(together).all_steps()[-2:] == [16, 24]
    records = metrics.read_jsonl(together / "metrics.jsonl")
    assert [r["step"] for r in records] == [8, 16, 24]  # written once, not once per process
    assert untimed_records(together) == untimed_records(alone)
    for a, b in zip(final_params(together), final_params(alone), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sigint", [signal.default_int_handler], indirect=True)
@pytest.mark.parametrize("to", [(0,), (0, 1)], ids=["one", "both"])
def test_ctrl_c_stops_every_process_of_a_run_at_one_step(tmp_path, sigint, to):
    """Ctrl-C in a terminal reaches every process of its group (`both`), a kill -INT one
    of them: either way each process hands it on to JAX's preemption service, and all
    stop after one step, saved, instead of one dying inside a collective."""
    _stop_pair(tmp_path, signal.SIGINT, to)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    config = tiny_config()
    loop.train_and_evaluate(config, tmp_path, max_steps=16)
    ckpts = Checkpoints(tmp_path)
    assert ckpts.all_steps() == [8, 16]
    damage(tmp_path / "checkpoints" / "16")
    with caplog.at_level("WARNING"):
        result = loop.train_and_evaluate(config, tmp_path, max_steps=17)
    assert result["step"] == 17
    assert f"{tmp_path}/checkpoints/16 is unusable" in caplog.text
    assert (tmp_path / "damaged_checkpoints" / "16").is_dir()  # kept for a post-mortem
    assert Checkpoints(tmp_path).all_steps() == [8, 16, 17]  # 16 written anew

    for step in Checkpoints(tmp_path).all_steps():
        damage(tmp_path / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {tmp_path}"):
        loop.train_and_evaluate(config, tmp_path)
    # All of them are aside now; starting again must not start the run over either.
    with pytest.raises(CheckpointError, match="has only damaged checkpoints"):
        loop.train_and_evaluate(config, tmp_path)
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
        loop.train_and_evaluate(config, tmp_path / "stops")
    assert Checkpoints(tmp_path / "stops").all_steps() == [8]

    config.skip_nonfinite = True
    result = loop.train_and_evaluate(config, tmp_path / "skips")
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
            loop.train_and_evaluate(tiny_config(), tmp_path, max_steps=1)
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
        loop.train_and_evaluate(tiny_config(), tmp_path)
    monkeypatch.undo()

    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(OSError, match=f"workdir {tmp_path} is not writable: Permission denied"):
        loop.train_and_evaluate(tiny_config(), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_resume_allows_safe_changes(tmp_path):
    config = tiny_config()
    loop.train_and_evaluate(config, tmp_path, max_steps=8)
    config.log_every_steps = 1
    config.eval_batch_size = 32
    assert loop.train_and_evaluate(config, tmp_path, max_steps=9)["step"] == 9
    # Synthetic images are other data: the run's schedules would follow another dataset.
    config.data.source = "binary"
    with pytest.raises(ValueError, match="data.source: saved 'synthetic', now 'binary'"):
        loop.train_and_evaluate(config, tmp_path, max_steps=10)


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
    loop.train_and_evaluate(config, tmp_path, max_steps=16)
    config_text = (tmp_path / "config.json").read_text()
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert len(lines.splitlines()) == 2
    (tmp_path / "config.json").write_text(config_text[: len(config_text) // 2])
    changed = tiny_config()
    changed.model.sharing = "nonshared"
    # Resuming is still checked against the run's config: the checkpoint's.
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="model.sharing: saved"):
        loop.train_and_evaluate(changed, tmp_path)
    assert f"{tmp_path}/config.json is missing or not JSON; rebuilt from checkpoint 16" in (
        caplog.text
    )
    assert (tmp_path / "config.json").read_text() == config_text

    (tmp_path / "metrics.jsonl").write_text(lines[: -len(lines.splitlines()[-1]) // 2])
    assert len(metrics.read_jsonl(tmp_path / "metrics.jsonl")) == 1
    with caplog.at_level("WARNING"):
        loop.train_and_evaluate(config, tmp_path, max_steps=17)
    assert f"{tmp_path}/metrics.jsonl: 1 lost record(s) rewritten from checkpoint 16" in (
        caplog.text
    )
    assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_a_failed_start_leaves_the_workdir_as_it_found_it(tmp_path):
    config = tiny_config()
    config.data.source = "binary"
    config.data.binary_dir = str(tmp_path / "no_data")
    with pytest.raises(FileNotFoundError):
        loop.train_and_evaluate(config, tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError):
        loop.train_and_evaluate(config, tmp_path / "old")
    assert os.listdir(tmp_path / "old") == ["notes.txt"]
    # A loss non-finite from the first steps, before any checkpoint.
    config = tiny_config()
    config.optim.learning_rate = 1e30
    with pytest.raises(loop.NonFiniteError, match="at step [1-8];"):
        loop.train_and_evaluate(config, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_a_start_refused_for_disk_space_leaves_no_workdir(tmp_path):
    proc = _launch_at(tmp_path / "new" / "run", "full")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"error: workdir {tmp_path / 'new' / 'run'} has 0.0 MiB free" in proc.stdout
    assert not (tmp_path / "new").exists()


def _files(workdir: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


def test_a_start_refused_for_a_changed_config_changes_nothing(one_epoch, tmp_path):
    run = _copy(one_epoch, tmp_path / "run")
    (run / ".lock").write_text("pid 1\n")  # the last run's
    before = _files(run)
    changed = tiny_config()
    changed.model.sharing = "nonshared"
    with pytest.raises(ValueError, match="model.sharing: saved"):
        loop.train_and_evaluate(changed, run)
    assert _files(run) == before


def test_a_partial_line_appended_to_the_records_is_dropped_with_a_warning(
    one_epoch, tmp_path, caplog
):
    """A kill while an epoch's line was appended, before its checkpoint."""
    run = _copy(one_epoch, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "eval_sec": 0.5, "ima')
    with caplog.at_level("WARNING"):
        loop.train_and_evaluate(tiny_config(), run, max_steps=9)
    assert caplog.messages == [
        f"{run / 'metrics.jsonl'}: dropping its torn last line "
        """'{"epoch": 2, "eval_sec": 0.5, "ima'"""
    ]
    assert (run / "metrics.jsonl").read_text() == lines
