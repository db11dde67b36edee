r"""Following one target digit through a video from its first-frame mask: per-frame, recurrent,
dual-stack and predictive-corrective systems, in accuracy and compute per frame.

Command (any variant below after the colon):

  python -m experiments.train \
      --config=experiments/configs/video_objects.py:dual --workdir=workdirs/vo_dual

Variants (`rvm.models.video_objects` describes each system):
  frame           the big network (ResNet trunk, widths 12-24-48, fully convolutional,
                  upsampling head) on every frame with frame 0 and its mask.
  stale           `frame`'s training; evaluation reuses the key frame's mask (K = 8).
  resrec_elman, resrec_gru
                  `frame` with a ConvElman / ConvGRU on the trunk's top features
                  (`frame` is the same network without it).
  dual, dual_carry
                  the big network every K = 8 frames writes the memory of a small
                  recurrent network (ConvGRU, 7 channels at 1/4 resolution); the memory
                  is written only by the big network (`dual`) or updated by the small one
                  every frame (`dual_carry`). `--config.model.key_every=1`: every frame big.
                  The small network's step costs at most 10% of the big network's FLOPs
                  per frame at these sizes (XLA's cost analysis at 64x64, `small_over_big`
                  in a run's results.json; tests/test_video_objects.py checks it); the
                  smoke variant's tiny big network does not keep that ratio.
  small           the small network alone after frame 0.
  pc, pc_stacked  predictive-corrective block over the whole trunk (re-initialised every
                  K = 8 frames), or stacked blocks over two segments of it; the update
                  network starts as a copy of the init network. Adaptive schedules with
                  `--config.model.ignore_threshold=...` and
                  `--config.model.reinit_threshold=...` (mean absolute pixel change); they
                  act in training and in evaluation alike (one path computes both).
  propagate       the big network frame by frame, also given the mask it predicted for
                  the previous frame (mask propagation), trained through its own
                  predictions; the FLOPs of `frame` per frame.
  smoke           a tiny `dual` run (32x32 canvas, 6 frames) that trains in about a minute.
`--config.model.match=True` on any of them: the big network's head also sees, at each
site, the similarity of its features to frame 0's target (and background).

Data: `rvm.data.target_videos` (64x64, 24 frames, 1-3 distractors of 24-pixel digits,
half of them of the target's class; train / validation / test from disjoint digits).

Hardware, time and result: results/video_objects_cpu/run.sh on the 2-core CPU VM (see
results/video_objects_cpu/summary.md for the machine, wall times and every number).
"""

from __future__ import annotations

import ml_collections

SYSTEM_VARIANTS = {
    "frame": dict(system="frame"),
    "stale": dict(system="stale"),
    "resrec_elman": dict(system="resrec", cell="elman"),
    "resrec_gru": dict(system="resrec", cell="gru"),
    "dual": dict(system="dual", memory="big_only"),
    "dual_carry": dict(system="dual", memory="every_frame"),
    "small": dict(system="small"),
    "pc": dict(system="pc", pc_layers=(3,)),
    "pc_stacked": dict(system="pc", pc_layers=(2, 3)),
    "propagate": dict(system="propagate"),
}


def variants() -> list[str]:
    return [*SYSTEM_VARIANTS, "smoke"]


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "video_objects"
    config.seed = 0
    config.batch_size = 8
    config.eval_batch_size = 32
    config.num_epochs = 3
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 2
    config.log_every_steps = 20
    config.skip_nonfinite = False
    config.rng_streams = "tagged"  # the step's and the data order's keys apart (rvm.train.step)
    config.measure_fps_batches = (1, 32)

    config.data = ml_collections.ConfigDict()
    config.data.seed = 0
    config.data.num_train = 512
    config.data.num_val = 64
    config.data.num_test = 128
    config.data.num_frames = 24
    config.data.canvas = 64
    config.data.digit_size = 24
    config.data.distractors = (1, 3)

    config.model = ml_collections.ConfigDict()
    config.model.system = "frame"
    config.model.widths = (12, 24, 48)
    config.model.blocks = (1, 2, 2)
    config.model.cell = "none"  # resrec: "elman", "gru"
    config.model.key_every = 8
    config.model.memory = "big_only"  # dual: "every_frame"
    config.model.small_features = 7  # small step <= 10% of the big net's FLOPs
    config.model.pc_layers = (3,)
    config.model.reinit_threshold = 0.0
    config.model.ignore_threshold = 0.0
    # the big network's head also sees each site's similarity to frame 0's target
    # (rvm.models.video_objects): any system; the committed results were trained without
    config.model.match = False

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 2e-3
    config.optim.lr_boundaries = (0.8,)
    config.optim.lr_decay = 0.1
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 0.0

    if variant is None:
        return config
    if variant in SYSTEM_VARIANTS:
        config.model.update(SYSTEM_VARIANTS[variant])
    elif variant == "smoke":
        config.model.system = "dual"
        config.model.key_every = 3
        config.model.widths = (4, 8, 8)
        config.model.small_features = 4
        config.data.num_train = 32
        config.data.num_val = 8
        config.data.num_test = 8
        config.data.num_frames = 6
        config.data.canvas = 32
        config.data.digit_size = 12
        config.data.distractors = (1, 2)
        config.batch_size = 8
        config.eval_batch_size = 8
        config.num_epochs = 1
        config.log_every_steps = 2
        config.measure_fps_batches = (1,)
    else:
        raise ValueError(
            f"unknown video_objects config variant {variant!r}; known: {', '.join(variants())}"
        )
    return config
