r"""Trains one run: `python -m experiments.train --config=FILE.py:VARIANT --workdir=DIR`.

Overrides: `--config.model.sharing=raw`, `--config.num_epochs=10`, ... Restarting
the same command on the same workdir resumes from the latest checkpoint.

The console shows rvm's own lines only (`--verbosity=1` adds the libraries' log), a
progress line per log period and a line per epoch, then where the results went. An
error the user can fix prints one line and exits with status 2 (`--traceback` for
the traceback). On Linux the launcher first restarts itself with glibc's malloc on
transparent huge pages (`rvm.train.hugepages`), which speeds up XLA:CPU training;
`--nohugepages` keeps the process as started.

SIGTERM or Ctrl-C, whenever it lands, ends the run with one line: with exit 75 after
saving the step it stopped at, or before anything was written (during start-up); a
second Ctrl-C stops at once, with 130, without saving; one that lands after the last
step was queued lets the run finish (exit 0) and says so.
"""

from __future__ import annotations

from rvm.train import signals

if __name__ == "__main__":  # before the slow imports below, so that no signal is lost in them
    signals.catch_early()

from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import launcher
from rvm.train import metrics
from rvm.train.config_check import validate
from rvm.train.loop import train_and_evaluate
from rvm.train.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted

config_flags.DEFINE_config_file("config", None, "Config file, with :variant.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    with launcher.user_errors():
        validate(FLAGS.config)  # first: a bad value costs no restart and leaves no workdir
        try:
            launcher.start()
            _train()
        except Preempted as e:
            launcher.stop(
                f"{e}; exiting with {PREEMPTED_EXIT_CODE} to be requeued", PREEMPTED_EXIT_CODE
            )
        except KeyboardInterrupt:
            launcher.stop(
                f"a second Ctrl-C: stopped at once, without saving; exiting with "
                f"{INTERRUPTED_EXIT_CODE}",
                INTERRUPTED_EXIT_CODE,
            )


def _train() -> None:
    # A signal during start-up, before anything was written; in a multi-host run the
    # preemption service, started by jax.distributed, hands it to every process.
    if not FLAGS.multihost and signals.pending():
        raise Preempted(f"{signals.pending()} during start-up, before anything was written")
    if FLAGS.multihost:
        jax.distributed.initialize()
    logging.info("devices: %s", ", ".join(map(str, jax.devices())))
    workdir = Path(FLAGS.workdir)
    results = train_and_evaluate(FLAGS.config, workdir)
    if jax.process_index() == 0:
        # A pack's results hold each seed's, in its own directory.
        runs = results.get("runs", {})
        parts = [metrics.summary(r, workdir / f"seed_{s}") for s, r in runs.items()]
        for lines in parts or [metrics.summary(results, workdir)]:
            print("\n".join(lines), flush=True)
    if signals.pending():  # after the run's own handlers were gone
        logging.warning("%s", signals.too_late(signals.pending()))


if __name__ == "__main__":
    app.run(main)
