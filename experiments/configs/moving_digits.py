r"""Recurrent video models on moving handwritten digits: motion recognition, frame prediction.

Command (any variant below after the colon):

  python -m experiments.train \
      --config=experiments/configs/moving_digits.py:cbm4 --workdir=workdirs/md_cbm4

Variants (all small enough for a CPU):
  cbm{2,4,8,16}   motion recognition (six motions of one digit, 12-frame videos) with a
                  Context Bridge Module stack of that many recurrent layers: base width
                  8, widths doubling over 3 stages, BatchNorm with per-time-step
                  statistics; full back-propagation through the sequence.
  lstm{2,4,8,16}  the same with stacked ConvLSTM layers, **parameter-matched**: the
                  ConvLSTM base width (5) is the one whose stack has the parameter count
                  closest to the CBM stack of that depth (`rvm.models.cbm.match_width`),
                  and no normalisation, as Shi et al.'s ConvLSTM (a pilot with
                  `--config.model.norm=time` fitted its training videos, not the test ones).
                  `--config.model.match_params=False` gives the CBM's widths instead.
  overlap, tbptt, full
                  training schemes of a 4-layer CBM on 24-frame videos: overlap
                  coherence (clips of 8-10 frames overlapping by 1-3, the state handed
                  over at a clip's end as in the authors' code, coherence weight 1),
                  truncated back-propagation over consecutive 8-frame clips, and full
                  back-propagation through all 24 frames.
  predict         future-frame prediction of one bouncing digit (`data.num_digits=2` for
                  two, as in Moving MNIST), 10 frames in, 10 out, a 4-layer CBM
                  encoder-predictor.
  smoke           a tiny motion run (16x16 frames) that trains in under a minute on a CPU.
Temporal Dropout on any CBM variant: `--config.model.td_rate=0.25`. Any other field
can be overridden likewise (`--config.model.kind=gru`, `--config.num_epochs=10`).

Data: the 1,797 real 8x8 digits shipped with scikit-learn, upscaled to 16x16 in
32x32 frames (the first 1,500 digits for training videos, the rest for test videos),
generated from `data.seed`; nothing is downloaded.

Hardware and time: on a 2-core CPU VM shared with other work, one XLA device, 1,200
training videos and 4 epochs of batch 32 (148 Adam steps): cbm4 took 95 s, cbm16 240 s,
predict 231 s, overlap 221 s, and results/moving_digits_cpu/run.sh, which trains all
15 runs of the comparisons, 33 minutes.

Result at that budget (results/moving_digits_cpu/summary.md; test error on 600 videos
of unseen digits, chance 83%): cbm8 15.8%, lstm8 18.0%, lstm16 4.7%; anticipation
(first 3 of 12 frames) 28-32% for every CBM, 33-75% for the ConvLSTMs. Frame
prediction: MSE 0.025 against 0.037 for the mean training frame. The paper (Pang et
al. 2019) reports that CBM stacks keep improving with depth while ConvLSTM stacks
degrade; at this budget the ConvLSTM stacks improved with every doubling of depth.
"""

from __future__ import annotations

import re

import ml_collections

DEPTHS = (2, 4, 8, 16)
SCHEMES = ("overlap", "tbptt", "full")


def variants() -> list[str]:
    """Every named variant."""
    depth = [f"{kind}{d}" for kind in ("cbm", "lstm") for d in DEPTHS]
    return [*depth, *SCHEMES, "predict", "smoke"]


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "motion"  # or "prediction"
    config.seed = 0
    config.batch_size = 32
    config.eval_batch_size = 200
    config.num_epochs = 4
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    config.log_every_steps = 20
    config.skip_nonfinite = False
    # Keys of the step and of the data order, each from its own tag (rvm.train.step);
    # runs recorded before the field used "shared" (rvm.train.config_check.ADDED_FIELDS).
    config.rng_streams = "tagged"

    config.data = ml_collections.ConfigDict()
    config.data.seed = 0
    config.data.num_train = 1200
    config.data.num_test = 600
    config.data.num_frames = 12
    config.data.canvas = 32
    config.data.digit_size = 16
    config.data.speed = (1.0, 2.0)  # pixels per frame
    config.data.radius = (3.0, 6.0)  # of the circular motions (motion task)
    config.data.num_digits = 1  # per video (prediction task; 2 as in Moving MNIST)
    config.data.num_input = 10  # frames observed; the rest are predicted (prediction task)

    config.model = ml_collections.ConfigDict()
    config.model.kind = "cbm"  # "cbm", "lstm", "gru", "elman"
    config.model.depth = 4  # recurrent layers
    config.model.base_width = 8  # stem and first-stage width; doubles per stage
    config.model.match_params = False  # ConvRNN width matched to the CBM's parameter count
    config.model.kernel_size = 3
    config.model.num_stages = 3
    # BatchNorm with statistics per time step ("time"), shared over time ("batch"), or "none".
    # Shared running averages mix the statistics of early and late frames; in a pilot the
    # CBM evaluated with them was much worse, at anticipation above all.
    config.model.norm = "time"
    config.model.merge = "product"  # CBM merge of R and T: "product", "add", "concat"
    config.model.td_rate = 0.0  # Temporal Dropout (CBM only)

    config.train = ml_collections.ConfigDict()
    config.train.scheme = "full"  # "full", "tbptt", "overlap" (motion task)
    config.train.clip_len = 8  # tbptt
    config.train.min_clip = 8  # overlap: clip lengths in [min_clip, max_clip]
    config.train.max_clip = 10
    config.train.max_overlap = 3
    config.train.coherence_weight = 1.0
    config.train.handover = "clip_end"  # see rvm.tasks.video.clips: "overlap_start" makes it zero

    # Adam: at this budget SGD left the ConvLSTM stacks near chance (see rvm.train.optim)
    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"  # or "sgd"
    config.optim.learning_rate = 2e-3
    config.optim.lr_boundaries = (0.75,)
    config.optim.lr_decay = 0.1
    config.optim.momentum = 0.9  # sgd only
    config.optim.nesterov = True  # sgd only
    config.optim.weight_decay = 0.0

    if variant is None:
        return config
    match = re.fullmatch(r"(cbm|lstm)(\d+)", variant)
    if match and variant in variants():
        kind, depth = match.groups()
        config.model.kind = kind
        config.model.depth = int(depth)
        if kind == "lstm":
            config.model.match_params = True
            config.model.norm = "none"
    elif variant in SCHEMES:
        config.data.num_frames = 24
        config.data.num_train = 800
        config.train.scheme = variant
    elif variant == "predict":
        config.task = "prediction"
        config.data.num_frames = 20
    elif variant == "smoke":
        config.data.num_train = 256
        config.data.num_test = 64
        config.data.num_frames = 8
        config.data.canvas = 16
        config.data.digit_size = 8
        config.data.radius = (2.0, 4.0)
        config.model.depth = 2
        config.model.base_width = 8
        config.eval_batch_size = 64
        config.num_epochs = 2
        config.log_every_steps = 4
    else:
        raise ValueError(
            f"unknown moving_digits config variant {variant!r}; known: {', '.join(variants())}"
        )
    return config
