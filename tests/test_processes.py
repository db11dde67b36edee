"""Runs stopped from outside, and what a process sees: SIGKILL anywhere and an exact
resume, SIGTERM and Ctrl-C saving the step they stop at, signals in the launcher's first
seconds, two processes of one run stopped together, a launch refused at start."""

import dataclasses
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
import numpy as np
import pytest
from helpers import (
    REPO,
    child_env,
    launcher_args,
    tiny_config,
    train,
    untimed_records,
)

from rvm.data import load_images
from rvm.train import hugepages, loop, metrics
from rvm.train import sharding as shd
from rvm.train.checkpoint import Checkpoints
from rvm.train.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, StopSignals


def launch(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *launcher_args(workdir)],
        cwd=REPO,
        env=child_env(),
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
    train(config, tmp_path, max_steps=11)
    assert reads == [3, 6, 8, 9, 11]


@pytest.mark.parametrize("sigint", [signal.default_int_handler], indirect=True)
def test_a_signal_at_start_up_stops_cleanly_and_a_second_ctrl_c_stops_at_once(
    tmp_path, monkeypatch, sigint
):
    config = tiny_config()
    run = tmp_path / "run"
    train(config, run, max_steps=12)
    before = Checkpoints(run).all_steps(), (run / "metrics.jsonl").read_text()
    load_data = loop.load_data

    def load_after_sigterm(config):
        os.kill(os.getpid(), signal.SIGTERM)  # while the data loads
        return load_data(config)

    monkeypatch.setattr(loop, "load_data", load_after_sigterm)
    with pytest.raises(loop.Preempted, match="SIGTERM at step 12"):
        train(config, run)
    assert (Checkpoints(run).all_steps(), (run / "metrics.jsonl").read_text()) == before
    monkeypatch.undo()

    def ctrl_c_twice(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    _stepping_with(monkeypatch, ctrl_c_twice)
    with pytest.raises(KeyboardInterrupt):
        train(config, run)
    assert (Checkpoints(run).all_steps(), (run / "metrics.jsonl").read_text()) == before
    with pytest.raises(KeyboardInterrupt):  # before a first checkpoint: nothing left behind
        train(config, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert signal.getsignal(signal.SIGINT) is sigint  # handlers restored


@pytest.mark.parametrize("sigint", [signal.default_int_handler], indirect=True)
def test_a_signal_after_the_last_step_was_queued_is_answered_in_one_line(
    one_epoch, tmp_path, monkeypatch, caplog, sigint
):
    """The steps already queued on the device cannot be called back: the run ends as it
    would have without the signal, and says so."""
    run = shutil.copytree(one_epoch, tmp_path / "run")
    _stepping_with(monkeypatch, lambda i: i == 1 and os.kill(os.getpid(), signal.SIGINT))
    with caplog.at_level("WARNING"):
        result = train(tiny_config(), run, max_steps=10)  # steps 8 and 9
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
    args = launcher_args(workdir)
    env = child_env()
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
        env=child_env(devices),
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


def test_a_start_refused_for_disk_space_leaves_no_workdir(tmp_path):
    proc = _launch_at(tmp_path / "new" / "run", "full")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"error: workdir {tmp_path / 'new' / 'run'} has 0.0 MiB free" in proc.stdout
    assert not (tmp_path / "new").exists()
