"""Tracking one digit among distractors with a Re3-style tracker (`rvm.models.tracker`).

`config.task="tracker"`. The videos are `rvm.data.target_videos` (bouncing digits in
a random depth order, so distractors occlude the target). The tracked box is the
target digit's whole square (amodal: it exists while the digit is hidden, so a
tracker must carry it through occlusions), (x0, y0, x1, y1) in pixels; a frame counts
as occluded when less than `eval.occluded_below` of the target's shape shows.

Training (Re3's curriculum): each example is a window of `train.max_unroll` + 1
frames cut at random from a training video. The unroll starts at 2 and doubles every
`train.stage_steps` steps up to `train.max_unroll`; the window is cut into segments
of unroll + 1 frames, each restarting from its true first box with a fresh state.
Within a segment, each crop is centred on the tracker's own previous box with
probability p, which grows linearly from 0 (first stage) to `train.own_final` (last
stage), else on the true previous box. The loss is the L1 distance of the boxes in
crop coordinates over all but the segments' first frames. One compiled step serves
every stage: the schedule only changes masks.

Evaluation tracks whole test videos from the true first box alone, with the LSTM state
reset every `eval.reset_every` frames (0: never) to the state after the first frame,
and reports `rvm.analysis.measures.tracking_scores`; results.json also holds the scores
without resets, per-frame IoU of the `eval.num_shown` tracks with the most occluded
frames (for the figure)
and track steps per second at each batch size of `eval.speed_batches`.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from rvm.analysis.measures import tracking_scores
from rvm.data import pipeline
from rvm.data.target_videos import check_arguments, make_target_videos
from rvm.errors import ConfigError
from rvm.models.glimpse import box_to_crop, iou
from rvm.models.tracker import Re3, track
from rvm.train import sharding, xla
from rvm.train.fields import positive, positive_int
from rvm.train.state import TrainState
from rvm.train.task import Task


class Split(NamedTuple):
    frames: np.ndarray  # [N, T, H, W, 1] uint8
    boxes: np.ndarray  # [N, T, 4] float32 (x0, y0, x1, y1), the target's whole square
    occluded: np.ndarray  # [N, T] bool


class TrackData(NamedTuple):
    train: Split
    validation: Split
    test: Split


@struct.dataclass
class DeviceSplit:
    frames: jax.Array
    boxes: jax.Array


def _split(config, split: str, num: int, frames: int) -> Split:
    d = config.data
    videos = make_target_videos(
        d.seed,
        num,
        frames,
        split=split,
        canvas=d.canvas,
        digit_size=d.digit_size,
        distractors=tuple(d.distractors),
    )
    corner = np.rint(videos.positions[:, :, 0]).astype(np.float32)  # how the frames were drawn
    boxes = np.concatenate([corner, corner + d.digit_size], -1)
    occluded = videos.visible_fraction < config.eval.occluded_below
    return Split(videos.frames, boxes, occluded)


def load_data(config: ml_collections.ConfigDict) -> TrackData:
    d = config.data
    return TrackData(
        _split(config, "train", d.num_train, d.train_frames),
        _split(config, "validation", d.num_val, d.test_frames),
        _split(config, "test", d.num_test, d.test_frames),
    )


def build_model(config: ml_collections.ConfigDict) -> Re3:
    m = config.model
    return Re3(m.size, m.scales, m.context, m.min_width, m.features, m.hidden, m.recurrent)


# --- The curriculum ---------------------------------------------------------------------


def curriculum(step, train: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(unroll, p_own) at `step` (traceable): unroll 2, 4, ... `max_unroll`, doubling
    every `stage_steps` steps; p_own from 0 to `own_final` over the stages."""
    stages = int(math.log2(train.max_unroll))  # unrolls 2 .. max_unroll
    stage = jnp.minimum(jnp.asarray(step) // train.stage_steps, stages - 1)
    p_own = train.own_final * stage / max(stages - 1, 1)
    return 2 ** (stage + 1), p_own


def make_get_batch(config: ml_collections.ConfigDict, mesh):
    t, batch_sharding = config.train, sharding.batch(mesh)
    window = t.max_unroll + 1

    def get_batch(data: DeviceSplit, step, rng, seed):
        n, length = data.frames.shape[:2]
        idx = pipeline.batch_indices(seed, step, n, config.batch_size)
        start_key, own_key = jax.random.split(rng)
        first = jax.random.randint(start_key, (config.batch_size,), 0, length - window + 1)
        cut = lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, window, 0)
        frames = jax.vmap(cut)(data.frames[idx], first).astype(jnp.float32) / 255.0
        boxes = jax.vmap(cut)(data.boxes[idx], first)
        unroll, p_own = curriculum(step, t)
        starts = jnp.arange(window) % (unroll + 1) == 0
        own = jax.random.bernoulli(own_key, p_own, (window, config.batch_size))
        frames = jax.lax.with_sharding_constraint(frames, batch_sharding)
        boxes = jax.lax.with_sharding_constraint(boxes, batch_sharding)
        return frames, boxes, starts, own, unroll, p_own

    return get_batch


def make_loss_fn(model: Re3):
    def loss_fn(params, batch_stats, batch, rng, train: bool):
        del rng, train
        frames, boxes, starts, own, unroll, p_own = batch
        out = track(model, params, frames, boxes, starts, own, jnp.zeros_like(starts))
        target = box_to_crop(jnp.moveaxis(boxes, 1, 0), out["centers"], out["widths"])
        weight = jnp.broadcast_to((~starts)[:, None, None], target.shape)
        l1 = jnp.sum(jnp.abs(out["crop_boxes"] - target) * weight) / jnp.sum(weight)
        overlap = iou(out["boxes"], jnp.moveaxis(boxes, 1, 0))
        mean_iou = jnp.sum(overlap * weight[..., 0]) / jnp.sum(weight[..., 0])
        metrics = {"iou": mean_iou, "unroll": unroll.astype(jnp.float32), "p_own": p_own}
        return l1, (batch_stats, metrics)

    return loss_fn


# --- Evaluation ---------------------------------------------------------------------------


@xla.jit(static_argnames=("model", "reset_every"))
def _track_boxes(model, params, frames_u8, first_box, reset_every: int):
    """Boxes [B, T, 4] tracked from the first box [B, 4] alone."""
    steps, batch = frames_u8.shape[1], frames_u8.shape[0]
    given = jnp.zeros((batch, steps, 4)).at[:, 0].set(first_box)  # no later box can leak in
    t = jnp.arange(steps)
    starts = t == 0
    resets = (t > 0) & (t % reset_every == 0) if reset_every else jnp.zeros_like(starts)
    own = jnp.ones((steps, batch), bool)
    out = track(model, params, frames_u8 / 255.0, given, starts, own, resets)
    return jnp.moveaxis(out["boxes"], 0, 1)


def _track_ious(model, params, frames_u8, boxes, reset_every: int):
    """Per-frame IoU [B, T] tracking from the first box alone."""
    return iou(_track_boxes(model, params, frames_u8, boxes[:, 0], reset_every), boxes)


def follow(
    model: Re3, params: Any, frames_u8: np.ndarray, first_box: np.ndarray, reset_every: int = 32
) -> np.ndarray:
    """Boxes [N, T, 4] (x0, y0, x1, y1) of the targets whose boxes in frame 0 are
    `first_box` [N, 4], through videos [N, T, H, W, C] uint8; a box that is empty or
    leaves the frame is refused before anything compiles."""
    first_box = np.asarray(first_box, np.float32)
    height, width = frames_u8.shape[2:4]
    inside = (
        (first_box[:, 0] >= 0)
        & (first_box[:, 1] >= 0)
        & (first_box[:, 2] <= width)
        & (first_box[:, 3] <= height)
        & (first_box[:, 2] > first_box[:, 0])
        & (first_box[:, 3] > first_box[:, 1])
    )
    if not inside.all():
        bad = int(np.flatnonzero(~inside)[0])
        raise ConfigError(
            f"first box {first_box[bad].tolist()} of track {bad} is empty or leaves the "
            f"{width}x{height} frame; boxes are (x0, y0, x1, y1) pixels inside it"
        )
    return np.asarray(_track_boxes(model, params, jnp.asarray(frames_u8), first_box, reset_every))


def split_ious(model, params, split: Split, batch_size: int, reset_every: int, mesh=None):
    """Per-frame IoU [N, T] of every track of `split`."""
    placement = sharding.batch(mesh) if mesh is not None else None
    index = np.arange(len(split.frames))
    parts = []
    for frames, idx, _ in pipeline.eval_batches(split.frames, index, batch_size):
        boxes = split.boxes[idx]
        if placement is not None:
            frames, boxes = jax.device_put((frames, boxes), placement)
        parts.append(_track_ious(model, params, frames, boxes, reset_every))
    return np.concatenate(jax.device_get(parts))[: len(index)]


def test_scores(config, model, params, test: Split, mesh=None, ious=None) -> tuple[dict, dict]:
    """`tracking_scores` of `test` with the state reset every `eval.reset_every` frames
    (its per-frame `ious` where already computed) and never reset."""
    e, visible = config.eval, ~test.occluded
    if ious is None:
        ious = split_ious(model, params, test, config.eval_batch_size, e.reset_every, mesh)
    no_reset = ious  # without resets configured, these tracks are never reset
    if e.reset_every:
        no_reset = split_ious(model, params, test, config.eval_batch_size, 0, mesh)
    return (
        tracking_scores(ious, visible, e.recovery_window),
        tracking_scores(no_reset, visible, e.recovery_window),
    )


def steps_per_second(model, params, split: Split, batch: int, repeats: int = 3) -> float:
    """Track steps (frames x tracks) per second at `batch`, the best of `repeats` after
    a warm-up call; one device."""
    frames = jnp.asarray(np.resize(split.frames, (batch, *split.frames.shape[1:])))
    boxes = jnp.asarray(np.resize(split.boxes, (batch, *split.boxes.shape[1:])))
    run = partial(_track_ious, model, params, frames, boxes, 0)
    run().block_until_ready()
    best = min(_timed(run) for _ in range(repeats))
    return batch * frames.shape[1] / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn().block_until_ready()
    return time.perf_counter() - start


def make_task(config: ml_collections.ConfigDict, data: TrackData, mesh) -> Task:
    model, e = build_model(config), config.eval
    ious = lambda state, split, reset: split_ious(
        model, state.params, split, config.eval_batch_size, reset, mesh
    )

    def epoch_metrics(state: TrainState) -> dict:
        val = float(np.mean(ious(state, data.validation, e.reset_every)[:, 1:]))
        test = float(np.mean(ious(state, data.test, e.reset_every)[:, 1:]))
        # "error" = 100 - mean IoU in %, so the loop picks the epoch of best validation IoU
        return {"val_error": 100 * (1 - val), "test_error": 100 * (1 - test), "val_iou": val}

    def final_results(state: TrainState) -> dict[str, Any]:
        test = ious(state, data.test, e.reset_every)
        scores, no_reset = test_scores(config, model, state.params, data.test, mesh, test)
        val = tracking_scores(
            ious(state, data.validation, e.reset_every), ~data.validation.occluded
        )
        # the tracks with the most occluded frames: the figure is about occlusions
        shown = np.argsort(-data.test.occluded.sum(1), kind="stable")[: e.num_shown]
        return {
            "test_error": 100 * (1 - scores["mean_iou"]),
            "test": scores,
            "test_no_reset": no_reset,
            "validation": val,
            "num_test": len(data.test.frames),
            "test_frames": int(data.test.frames.shape[1]),
            "shown_tracks": shown.tolist(),
            "shown_ious": test[shown].tolist(),
            "shown_occluded": data.test.occluded[shown].tolist(),
            "steps_per_sec": {
                str(b): steps_per_second(model, state.params, data.test, b) for b in e.speed_batches
            },
            "device": jax.devices()[0].device_kind,
        }

    m = config.model
    kind = "LSTM" if m.recurrent else "feed-forward"
    return Task(
        model=model,
        train_data=jax.device_put(
            DeviceSplit(data.train.frames, data.train.boxes), sharding.replicated(mesh)
        ),
        num_train=len(data.train.frames),
        init_input=(
            jnp.zeros((1, 2, *data.train.frames.shape[2:]), jnp.float32),
            jnp.asarray(data.train.boxes[:1, 0]),
        ),
        get_batch=make_get_batch(config, mesh),
        loss_fn=make_loss_fn(model),
        epoch_metrics=epoch_metrics,
        final_results=final_results,
        unit="windows",
        summary=f"Re3 ({kind}), {m.scales} crop(s) of {m.size}px, reset every {e.reset_every}",
    )


# --- Validation (called by rvm.train.config_check before anything compiles) ------------


def validate(config: ml_collections.ConfigDict) -> None:
    d, m, t, e = config.data, config.model, config.train, config.eval
    for field in ("canvas", "digit_size", "num_train", "num_val", "num_test"):
        positive_int(config, f"data.{field}")
    for field in ("train_frames", "test_frames"):
        positive_int(config, f"data.{field}")
    try:
        check_arguments(d.test_frames, d.canvas, d.digit_size, tuple(d.distractors))
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None
    for field in ("size", "scales", "features", "hidden"):
        positive_int(config, f"model.{field}")
    positive(config, "model.context")
    positive(config, "model.min_width")
    if not isinstance(m.recurrent, bool):
        raise ConfigError(f"model.recurrent={m.recurrent!r} must be True or False")
    positive_int(config, "train.max_unroll")
    positive_int(config, "train.stage_steps")
    if t.max_unroll < 2 or t.max_unroll & (t.max_unroll - 1):
        raise ConfigError(f"train.max_unroll={t.max_unroll!r} must be a power of 2, at least 2")
    if t.max_unroll + 1 > d.train_frames:
        raise ConfigError(
            f"train.max_unroll={t.max_unroll} needs windows of {t.max_unroll + 1} frames; "
            f"data.train_frames={d.train_frames} is shorter"
        )
    if not 0 <= t.own_final <= 1:
        raise ConfigError(f"train.own_final={t.own_final!r} must be a probability in [0, 1]")
    if isinstance(e.reset_every, bool) or not isinstance(e.reset_every, int) or e.reset_every < 0:
        raise ConfigError(f"eval.reset_every={e.reset_every!r} must be a non-negative integer")
    positive_int(config, "eval.recovery_window")
    positive_int(config, "eval.num_shown")
    for i, b in enumerate(e.speed_batches):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"eval.speed_batches[{i}]={b!r} must be a positive integer")
    if not 0 < e.occluded_below <= 1:
        raise ConfigError(f"eval.occluded_below={e.occluded_below!r} must be in (0, 1]")
