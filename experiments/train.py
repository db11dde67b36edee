r"""Trains one run: `python -m experiments.train --config=FILE.py:VARIANT --workdir=DIR`.

Overrides: `--config.model.sharing=raw`, `--config.num_epochs=10`, ... Restarting
the same command on the same workdir resumes from the latest checkpoint.

On Linux the launcher first restarts itself with glibc's malloc on transparent
huge pages (`rvm.train.hugepages`), which speeds up XLA:CPU training;
`--nohugepages` keeps the process as started.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import launcher
from rvm.train.loop import PREEMPTED_EXIT_CODE, Preempted, train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Config file, with :variant.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    launcher.start()
    if FLAGS.multihost:
        jax.distributed.initialize()
    logging.info("JAX devices: %s", jax.devices())
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as e:
        logging.warning("%s; exiting with %d so the run can be requeued", e, PREEMPTED_EXIT_CODE)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main)
