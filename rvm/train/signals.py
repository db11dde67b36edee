"""Stopping a run cleanly: SIGTERM (a scheduler's preemption) and Ctrl-C become a flag
the training loop checks between steps, so it saves the step it stopped at and exits
with a code that asks to be requeued."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: schedulers read it as "requeue me"


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint of the step it stopped at is in the workdir."""


class StopSignals:
    """Turns SIGTERM and a first SIGINT (Ctrl-C) into a flag the loop checks between steps;
    a second SIGINT stops at once (KeyboardInterrupt, nothing saved). Main thread only.
    A signal ignored when the run starts stays ignored: a shell starts its background
    jobs (`cmd &`) with SIGINT ignored, so that a Ctrl-C meant for it spares them.

    In a multi-process run the processes must stop at one step, since saving is
    collective: there JAX's preemption service (started by `jax.distributed`) takes
    SIGTERM, tells every process, and they agree on the step to stop at; a first SIGINT
    is handed to it as a SIGTERM.
    """

    def __init__(self):
        self.received: str | None = None
        self.previous: dict[int, Any] = {}
        self.multiprocess = jax.process_count() > 1

    def __enter__(self) -> StopSignals:
        # The preemption service's own SIGTERM handler stays in a multi-process run.
        signums = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
        for signum in signums:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook kernels)
                break
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if self.multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_at(self, step: int) -> bool:
        """Whether to stop (and save) at `step`; every process calls it before every step."""
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            # None: the previous handler was not installed from Python; SIG_DFL replaces it.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
