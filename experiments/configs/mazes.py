r"""Mazes: a weight-tied recurrent CNN trained on 9x9 mazes, tested on larger ones.

Command (any variant below after the colon):

  python -m experiments.train \
      --config=experiments/configs/mazes.py:recall_prog --workdir=workdirs/mazes_recall_prog

Variants:
  recall_prog  recall (the maze concatenated to the state at every iteration) and the
               progressive loss of Bansal et al. 2022 with rvm's fixed-k draw
               (`train.draw="fixed_k"`: n ~ U{0..m-k} iterations without gradient, then
               k = 10 with); `--config.train.draw=reference` is the draw of their code
               (n ~ U{0..m-1}, then k ~ U{1..m-n})
  plain        the same network without recall, trained at m iterations (full BPTT)
  smoke        a tiny run that trains in under a minute on a CPU
Mazes are rendered one pixel per cell and per wall (rvm/data/mazes.py): 9x9 cells are
19x19 pixels, 21x21 cells 43x43. The test sizes are evaluated at 1 .. 10 m iterations
(eval.factor) in one compiled program per size. Every choice is made on the validation
split of each size (`data.num_val`): the per-epoch `val_error` and the count reported
per size; the test split (`data.num_test`) is read at the end. `python -m
experiments.think_eval` writes the figure, summary and curves.

Hardware, time and result: results/thinking_cpu/run.sh trained recall_prog (fixed-k
draw, 12 epochs) and plain (`--config.num_epochs=5`) on the 2-core CPU VM in about half
an hour each; their accuracies on fresh validation and test splits, with intervals, are
in results/thinking_cpu/summary.md (curves.json beside it). The runs were recorded
before the validation split existed and were tuned while looking at stream 0's test
split: they were evaluated again on stream 1.
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
    config.data.num_test = 1000  # per size, read at the end only
    # every choice (the count reported, tuning) is made on this split, never on the test one
    config.data.num_val = 200  # per size; 200: the 10m curves of large mazes cost minutes per 100
    config.data.eval_stream = 1  # 0: the val/test splits of the first runs, tuned on its test

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
    # uniform counts: "fixed_k" n ~ U{0..m-k}, k fixed; "reference" Bansal et al.'s code,
    # n ~ U{0..m-1}, k ~ U{1..m-n} (rvm.tasks.thinking.progressive)
    config.train.draw = "fixed_k"
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
        config.data.num_val = 32
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
