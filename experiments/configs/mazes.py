r"""Mazes: a weight-tied recurrent CNN trained on 9x9 mazes, tested on larger ones.

Command (any variant below after the colon):

  python -m experiments.train \
      --config=experiments/configs/mazes.py:recall_prog --workdir=workdirs/mazes_recall_prog

Variants:
  recall_prog  recall (the maze concatenated to the state at every iteration) and the
               progressive loss of Bansal et al. 2022 (n ~ U{0..m-k} iterations without
               gradient, then k with)
  plain        the same network without recall, trained at m iterations (full BPTT)
  smoke        a tiny run that trains in under a minute on a CPU
Mazes are rendered one pixel per cell and per wall (rvm/data/mazes.py): 9x9 cells are
19x19 pixels, 21x21 cells 43x43. The test sizes are evaluated at 1 .. 10 m iterations
(eval.factor) in one compiled program per size; `python -m experiments.think_eval`
writes the figure and summary.

Hardware, time and result (results/thinking_cpu/run.sh; summary.md and README.md there):
on the 2-core CPU VM shared with another run, recall_prog took 32 min (3,744 steps) and
solved 100% of 9x9 and 13x13 mazes and 85% of 21x21 ones (at 149 iterations; 60% at the
trained 30), 82% still at 300; plain (`--config.num_epochs=5`, 23 min) solved 24% of 9x9
mazes at best, 7% of 13x13, and lost ground past its best count.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("recall_prog", "plain", "smoke")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "thinking"
    config.seed = 0
    config.batch_size = 32
    config.eval_batch_size = 50
    config.num_epochs = 12
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 2
    config.log_every_steps = 100
    config.skip_nonfinite = False
    # Keys of the step and of the data order, each from its own tag (rvm.train.step);
    # runs recorded before the field used "shared" (rvm.train.config_check.ADDED_FIELDS).
    config.rng_streams = "tagged"

    config.data = ml_collections.ConfigDict()
    config.data.kind = "mazes"
    config.data.seed = 0
    config.data.train_size = 9  # cells per side
    config.data.test_sizes = (9, 13, 21)
    config.data.num_train = 10000
    config.data.num_test = 100  # per size

    config.model = ml_collections.ConfigDict()
    config.model.width = 32
    config.model.blocks = 1  # residual blocks per iteration
    config.model.recall = True
    config.model.norm = "layer"  # without it the state blew up in the first 100 steps
    config.model.head_kernel = 1  # 1: read each answer from its own position's state

    config.train = ml_collections.ConfigDict()
    config.train.iterations = 30  # m, the trained count
    config.train.grad_iterations = 10  # k
    config.train.progressive_weight = 1.0  # a; 0 is the plain loss at m
    config.train.counts = "uniform"  # or "poisson"
    config.train.sigma = 0.5  # log-normal spread of the Poisson rate

    config.eval = ml_collections.ConfigDict()
    config.eval.factor = 10  # test up to factor * m iterations
    config.eval.halt_patience = 1

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.lr_boundaries = (0.75,)
    config.optim.lr_decay = 0.1
    config.optim.momentum = 0.9  # sgd only
    config.optim.nesterov = True  # sgd only
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = 100  # linear learning-rate ramp
    config.optim.clip_norm = 1.0  # global gradient-norm clip; 0 is off

    if variant in (None, "recall_prog"):
        return config
    if variant == "plain":
        config.model.recall = False
        config.train.progressive_weight = 0.0
    elif variant == "smoke":
        config.data.train_size = 3
        config.data.test_sizes = (3, 4)
        config.data.num_train = 128
        config.data.num_test = 32
        config.eval_batch_size = 32
        config.num_epochs = 2
        config.log_every_steps = 2
        config.model.width = 8
        config.train.iterations = 4
        config.train.grad_iterations = 2
        config.train.progressive_weight = 0.5
        config.eval.factor = 2
        config.optim.warmup_steps = 0
    else:
        raise ValueError(f"unknown mazes config variant {variant!r}; known: {', '.join(VARIANTS)}")
    return config
