r"""Re3-style tracking of one digit among occluding distractors, and its ablations.

Command (any variant below after the colon):

  python -m experiments.train \
      --config=experiments/configs/tracker.py:lstm --workdir=workdirs/tracker_lstm

Variants:
  lstm         Re3: pyramids of 3 crops (2x, 4x, 8x the box, each resized to 32x32) from
               the previous and current frame, a shared conv encoder with skips, two
               LSTM layers, the box regressed in crop coordinates (L1); unroll 2 -> 16
               doubling every `train.stage_steps` steps, own boxes fed with probability
               rising to 1; at test the state is reset every 32 frames
  feedforward  the same without LSTMs (two dense layers: GOTURN-style)
  one_crop     the LSTM tracker with one crop (2x the box) instead of the pyramid
  no_reset     the LSTM tracker evaluated without state resets (every run's results.json
               also holds its scores without resets, under `test_no_reset`)
  smoke        a tiny run that trains in under a minute on a CPU
Videos: `rvm.data.target_videos`, 64x64 canvases, 24 px digits, 1-3 distractors in a
random depth order; 24 training frames per video, 64-frame validation and test tracks.

Hardware, time and result: results/where_to_look_cpu/run.sh on the 2-core CPU VM
(shared with other runs); its summary.md holds the numbers.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("lstm", "feedforward", "one_crop", "no_reset", "smoke")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "tracker"
    config.seed = 0
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 10
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 2
    config.log_every_steps = 50
    config.skip_nonfinite = False
    config.rng_streams = "tagged"  # the step's and the data order's keys apart (rvm.train.step)

    config.data = ml_collections.ConfigDict()
    config.data.seed = 0
    config.data.canvas = 64
    config.data.digit_size = 24
    config.data.distractors = (1, 3)
    config.data.num_train = 2000
    config.data.num_val = 64
    config.data.num_test = 256
    config.data.train_frames = 24
    config.data.test_frames = 64

    config.model = ml_collections.ConfigDict()
    config.model.size = 32
    config.model.scales = 3
    config.model.context = 2.0
    config.model.min_width = 8.0
    config.model.features = 16
    config.model.hidden = 128
    config.model.recurrent = True

    config.train = ml_collections.ConfigDict()
    config.train.max_unroll = 16
    config.train.stage_steps = 150  # unroll 2, 4, 8, 16
    config.train.own_final = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.reset_every = 32
    config.eval.recovery_window = 5
    config.eval.occluded_below = 0.5  # visible share of the target's shape
    config.eval.num_shown = 4
    config.eval.speed_batches = (1, 32)  # track steps per second measured at these batch sizes

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.lr_boundaries = (0.8,)
    config.optim.lr_decay = 0.1
    config.optim.momentum = 0.9  # sgd only
    config.optim.nesterov = True  # sgd only
    config.optim.weight_decay = 0.0
    config.optim.clip_norm = 1.0

    if variant in (None, "lstm"):
        return config
    if variant == "feedforward":
        config.model.recurrent = False
    elif variant == "one_crop":
        config.model.scales = 1
    elif variant == "no_reset":
        config.eval.reset_every = 0
    elif variant == "smoke":
        config.data.num_train, config.data.num_val, config.data.num_test = 64, 8, 8
        config.data.train_frames, config.data.test_frames = 9, 12
        config.batch_size, config.eval_batch_size = 16, 8
        config.num_epochs = 2
        config.log_every_steps = 2
        config.model.size = 16
        config.model.features = 4
        config.model.hidden = 16
        config.train.max_unroll = 8
        config.train.stage_steps = 2
        config.eval.reset_every = 8
    else:
        raise ValueError(
            f"unknown tracker config variant {variant!r}; known: {', '.join(VARIANTS)}"
        )
    return config
