"""Stopping a run cleanly: SIGTERM (a scheduler's preemption) and Ctrl-C become a flag
the training loop checks between steps, so it saves the step it stopped at and exits
with a code that asks to be requeued.

A launcher catches them from its first line on (`catch_early`), before its slow imports
and its restart on huge pages: until `release_early` they are held (blocked), so one
that lands meanwhile waits, across the restart too, instead of killing the process or
raising in an import; then a handler records it (`pending`) and `StopSignals` takes it
over. This module imports no JAX, so that a launcher can import it first.
"""

from __future__ import annotations

import os
import signal
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: schedulers read it as "requeue me"
INTERRUPTED_EXIT_CODE = 130  # a second Ctrl-C: 128 + SIGINT, as a shell reports it

_STOPS = {signal.SIGTERM, signal.SIGINT}
_CAN_HOLD = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigpending")  # POSIX
_received: str | None = None  # a signal recorded before StopSignals took over


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint of the step it stopped at is in the workdir."""


def _record(signum, frame) -> None:
    """The launcher's handler outside `StopSignals`: records the signal; a second SIGINT
    stops at once."""
    global _received
    if signum == signal.SIGINT and _received == "SIGINT":
        raise KeyboardInterrupt
    _received = signal.Signals(signum).name


def catch_early() -> None:
    """A launcher's first act: SIGTERM and SIGINT are recorded, not acted on, and held until
    `release_early`. The mask is inherited by the threads the imports start and survives
    `exec`, so a signal that lands before the release is delivered to this handler after
    it, in this process or in the one it restarts as. A signal ignored at start (SIGINT in
    a shell's background job) stays ignored. Main thread only."""
    for signum in _STOPS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _record)
    if _CAN_HOLD:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)


def held() -> bool:
    """Whether a SIGTERM or SIGINT has arrived and is held, waiting for `release_early`."""
    return _CAN_HOLD and bool(signal.sigpending() & _STOPS)


def release_early() -> None:
    """Ends the hold of `catch_early` (if any): a signal held meanwhile is recorded now."""
    if _CAN_HOLD:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # runs the handlers before returning


def pending() -> str | None:
    """The name of the signal recorded since `catch_early` and not taken over, if any."""
    return _received


def too_late(name: str) -> str:
    """What a run says of a signal that landed after its last step was queued: the steps on
    the device cannot be called back, so it ends as it would have without it."""
    return f"{name} after the last step was queued: the run had already finished its steps"


class StopSignals:
    """Turns SIGTERM and a first SIGINT (Ctrl-C) into a flag the loop checks between steps;
    a second SIGINT stops at once (KeyboardInterrupt, nothing saved). Main thread only.
    A signal ignored when the run starts stays ignored: a shell starts its background
    jobs (`cmd &`) with SIGINT ignored, so that a Ctrl-C meant for it spares them. A
    signal the launcher recorded before (`pending`) is taken over, as if it came now.

    In a multi-process run the processes must stop at one step, since saving is
    collective: there JAX's preemption service (started by `jax.distributed`) takes
    SIGTERM, tells every process, and they agree on the step to stop at; a first SIGINT
    is handed to it as a SIGTERM.
    """

    def __init__(self):
        import jax

        self.received: str | None = None
        self.previous: dict[int, Any] = {}
        self.multiprocess = jax.process_count() > 1

    def __enter__(self) -> StopSignals:
        global _received
        # The preemption service's own SIGTERM handler stays in a multi-process run.
        signums = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
        for signum in signums:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook kernels)
                break
        self.received, _received = _received, None
        if self.received and self.multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)
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
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            # None: the previous handler was not installed from Python; SIG_DFL replaces it.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
