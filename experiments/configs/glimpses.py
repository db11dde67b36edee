r"""Glimpse recognition: RAM (REINFORCE location policy) against random / centre glimpses and a CNN.

Command (any variant below after the colon):

  python -m experiments.train \
      --config=experiments/configs/glimpses.py:cluttered_ram --workdir=workdirs/cluttered_ram

Variants: {translated,cluttered}_{ram,random,center,cnn} and smoke.
  translated  one digit at a random place on a 60x60 canvas (Mnih et al. 2014)
  cluttered   the same with 4 pieces (8x8) of other digits pasted first
  ram         RAM: glimpse pyramids (3 crops of 12, 24, 48 px, each resized to 12x12),
              an LSTM core, a Gaussian location policy trained by REINFORCE with a
              learned baseline
  random      the same model, glimpses at uniformly random places (no policy)
  center      the same model, every glimpse at the canvas centre
  cnn         a small CNN on the whole canvas
  smoke       a tiny RAM run that trains in under a minute on a CPU
The digits are scikit-learn's 8x8 scans upscaled to 28 px (`rvm.data.cluttered_digits`);
the splits share no scan. results.json holds the test error with its Wilson interval and
XLA's operations per image at 60x60 and 100x100 canvases.

Hardware, time and result: results/where_to_look_cpu/run.sh on the 2-core CPU VM
(shared with other runs); its summary.md holds the numbers.
"""

from __future__ import annotations

import ml_collections

SETS = ("translated", "cluttered")
MODELS = ("ram", "random", "center", "cnn")
VARIANTS = tuple(f"{s}_{m}" for s in SETS for m in MODELS) + ("smoke",)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "glimpses"
    config.seed = 0
    config.batch_size = 64
    config.eval_batch_size = 256
    config.num_epochs = 20
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 2
    config.log_every_steps = 100
    config.skip_nonfinite = False
    config.rng_streams = "tagged"  # the step's and the data order's keys apart (rvm.train.step)

    config.data = ml_collections.ConfigDict()
    config.data.seed = 0
    config.data.canvas = 60
    config.data.digit_size = 28
    config.data.clutter = 0  # pieces of other digits per canvas
    config.data.num_train = 20000
    config.data.num_val = 2000
    config.data.num_test = 5000

    config.model = ml_collections.ConfigDict()
    config.model.kind = "ram"
    config.model.policy = "learned"
    config.model.glimpses = 6
    config.model.size = 12  # glimpse side after resizing
    config.model.scales = 3
    config.model.width = 12  # first crop, pixels
    config.model.hidden = 256
    config.model.features = 16
    config.model.std = 0.15  # location policy, in [-1, 1] canvas units

    config.train = ml_collections.ConfigDict()
    config.train.reinforce_weight = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.compute_canvases = (60, 100)
    config.eval.num_shown = 16  # test canvases whose glimpse locations results.json keeps

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.lr_boundaries = (0.75,)
    config.optim.lr_decay = 0.1
    config.optim.momentum = 0.9  # sgd only
    config.optim.nesterov = True  # sgd only
    config.optim.weight_decay = 0.0
    config.optim.clip_norm = 1.0

    if variant is None:
        variant = "cluttered_ram"
    if variant == "smoke":
        config.data.num_train, config.data.num_val, config.data.num_test = 256, 64, 64
        config.data.clutter = 2
        config.batch_size, config.eval_batch_size = 64, 64
        config.num_epochs = 2
        config.log_every_steps = 2
        config.model.glimpses = 3
        config.model.hidden = 32
        config.model.features = 4
        config.eval.num_shown = 4
        return config
    dataset, _, model = variant.partition("_")
    if dataset not in SETS or model not in MODELS:
        raise ValueError(
            f"unknown glimpses config variant {variant!r}; known: {', '.join(VARIANTS)}"
        )
    config.data.clutter = 4 if dataset == "cluttered" else 0
    if model == "cnn":
        config.model.kind = "cnn"
    elif model != "ram":
        config.model.policy = model
    return config
