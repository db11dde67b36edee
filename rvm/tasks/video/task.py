"""Video tasks on moving digits for the training loop: motion recognition, frame prediction.

The sequence analogue of `rvm.tasks.image`. The training videos sit on every device as
uint8 [N, T, H, W, 1]; a step gathers its batch by index (a pure function of
(seed, step), so a resumed run sees the same batches) and constrains it to be
sharded over the `data` mesh axis. There is no augmentation: a flip or a shift
in time would change the motion class.

* `task="motion"`: a `VideoClassifier` over a CBM or ConvRNN stack, trained with
  per-frame cross-entropy by full back-propagation through the sequence,
  truncated back-propagation over consecutive clips, or overlap coherence
  training (`config.train.scheme`; see `rvm.tasks.video.clips`). Evaluation reads the
  class at the last frame (whole-sequence error) and at the last of the first
  25% of the frames (anticipation error). The network is causal, so the logits
  at frame k of one pass over the whole sequence are those of a pass over the
  first k + 1 frames alone: one pass gives both.
* `task="prediction"`: a `FramePredictor` sees `data.num_input` frames and
  predicts the rest, trained with per-pixel binary cross-entropy; evaluation
  reports MSE, PSNR and SSIM (`image_quality`), each computed per predicted
  frame and averaged over frames and sequences (also kept per frame ahead).

Both evaluate on the whole test split in batches of one compiled size, the last
one padded and masked (`pipeline.eval_batches`).
"""

from __future__ import annotations

import functools
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from rvm.data import pipeline
from rvm.data.moving_digits import (
    MOTION_CLASSES,
    MovingDigits,
    make_motion_digits,
    make_moving_digits,
)
from rvm.errors import ConfigError
from rvm.models import cbm
from rvm.models.recurrent import NORMS
from rvm.tasks.video import clips, image_quality
from rvm.train import sharding, xla
from rvm.train.fields import boolean, choice, nonnegative, pair, positive_int
from rvm.train.state import TrainState
from rvm.train.step import LossFn
from rvm.train.task import Task, sum_over_split

SCHEMES = ("full", "tbptt", "overlap")
ANTICIPATION_FRACTION = 0.25


class VideoData(NamedTuple):
    """Host-side train and test splits (test videos use digits no training video shows)."""

    train: MovingDigits
    test: MovingDigits


@struct.dataclass
class DeviceVideos:
    frames: jax.Array  # [N, T, H, W, 1] uint8
    labels: jax.Array | None  # [N] int32 motion classes; None for prediction


def load_data(config: ml_collections.ConfigDict) -> VideoData:
    """Generates both splits from `config.data.seed` (independent streams per split)."""
    d = config.data
    train_seed, test_seed = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence(d.seed).spawn(2)
    )
    shape = {"canvas": d.canvas, "digit_size": d.digit_size, "speed": tuple(d.speed)}
    if config.task == "motion":
        make = partial(make_motion_digits, num_frames=d.num_frames, radius=tuple(d.radius), **shape)
    else:
        make = partial(
            make_moving_digits, num_frames=d.num_frames, num_digits=d.num_digits, **shape
        )
    return VideoData(
        make(train_seed, d.num_train, split="train"), make(test_seed, d.num_test, split="test")
    )


@functools.lru_cache(maxsize=32)
def _matched_width(kind: str, depth: int, base_width: int, stack_kwargs: tuple) -> int:
    kwargs = dict(stack_kwargs)
    cbm_only = {k: kwargs.pop(k) for k in ("merge", "td_rate")}
    frame = (32, 32, 1)  # parameter counts do not depend on the frame size
    target = cbm.stack_param_count(
        cbm.make_stack("cbm", depth, base_width, **kwargs, **cbm_only), frame
    )
    return cbm.match_width(target, kind, depth, frame, **kwargs)


def _stack_kwargs(config: ml_collections.ConfigDict) -> dict:
    m = config.model
    kwargs = {
        "kernel_size": m.kernel_size,
        "num_stages": m.num_stages,
        "norm": m.norm,
        "num_steps": config.data.num_frames,
    }
    if m.kind == "cbm":
        kwargs.update(merge=m.merge, td_rate=m.td_rate)
    return kwargs


def stack_width(config: ml_collections.ConfigDict) -> int:
    """The base width of the recurrent stack: `model.base_width`, or for a non-CBM stack
    with `model.match_params` the width whose parameter count is closest to that of the
    CBM stack of `model.base_width` with the same depth, kernel, stages and norm."""
    m = config.model
    if not m.match_params:
        return m.base_width
    cbm_kwargs = {**_stack_kwargs(config), "merge": m.merge, "td_rate": 0.0}
    return _matched_width(m.kind, m.depth, m.base_width, tuple(sorted(cbm_kwargs.items())))


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The network of a motion or prediction config."""
    m, d = config.model, config.data
    width, kwargs = stack_width(config), _stack_kwargs(config)
    if config.task == "motion":
        stack = cbm.make_stack(m.kind, m.depth, width, **kwargs)
        return cbm.VideoClassifier(stack, num_classes=len(MOTION_CLASSES))
    return cbm.frame_predictor(
        m.kind, m.depth, width, num_future=d.num_frames - d.num_input, **kwargs
    )


def init_input(config: ml_collections.ConfigDict) -> jax.Array:
    """A batch of one input video for `model.init` (the observed frames for prediction)."""
    d = config.data
    frames = d.num_frames if config.task == "motion" else d.num_input
    return jnp.zeros((1, frames, d.canvas, d.canvas, 1), jnp.float32)


def make_get_batch(config: ml_collections.ConfigDict, mesh):
    """`get_batch(data, step, rng, seed)`: frames [B, T, H, W, 1] uint8 (and labels [B]
    for motion), in the order of the run's key `seed`."""
    batch_sharding = sharding.batch(mesh)

    def get_batch(data: DeviceVideos, step, rng, seed):
        del rng  # nothing random beyond the batch order
        idx = pipeline.batch_indices(seed, step, data.frames.shape[0], config.batch_size)
        frames = jax.lax.with_sharding_constraint(data.frames[idx], batch_sharding)
        if data.labels is None:
            return frames
        return frames, jax.lax.with_sharding_constraint(data.labels[idx], batch_sharding)

    return get_batch


def make_loss_fn(config: ml_collections.ConfigDict, model: nn.Module) -> LossFn:
    """The loss of `config.task`; for motion, of the training scheme `config.train.scheme`."""
    if config.task == "prediction":
        return clips.make_prediction_loss_fn(model, num_input=config.data.num_input)
    t = config.train
    if t.scheme == "full":
        return clips.make_full_bptt_loss_fn(model)
    if t.scheme == "tbptt":
        return clips.make_tbptt_loss_fn(model, clip_len=t.clip_len)
    return clips.make_overlap_loss_fn(
        model,
        num_clips=clips.clips_to_cover(config.data.num_frames, t.min_clip, t.max_overlap),
        min_len=t.min_clip,
        max_len=t.max_clip,
        max_overlap=t.max_overlap,
        coherence_weight=t.coherence_weight,
        handover=t.handover,
    )


def anticipation_frames(num_frames: int) -> int:
    """Frames seen for the anticipation error: the first 25%, at least one."""
    return max(1, int(ANTICIPATION_FRACTION * num_frames))


@xla.jit(static_argnames=("model", "early"))
def _motion_batch(model, variables, frames, labels, weight, early):
    logits = model.apply(variables, clips.frames_to_float(frames), train=False).logits
    last, first = logits[:, -1], logits[:, early - 1]
    wrong = lambda z: jnp.sum((jnp.argmax(z, -1) != labels) * weight)
    loss = optax.softmax_cross_entropy_with_integer_labels(last, labels)
    return wrong(last), wrong(first), jnp.sum(loss * weight)


def evaluate_motion(
    model: nn.Module,
    variables: dict,
    frames: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    mesh=None,
) -> dict[str, float]:
    """Error (%) at the last frame, anticipation error (%) and mean loss at the last frame."""
    early = anticipation_frames(frames.shape[1])
    batch_sums = lambda x, y, w: _motion_batch(model, variables, x, y, w, early)
    wrong, wrong_early, loss = sum_over_split(batch_sums, frames, labels, batch_size, mesh)
    n = len(labels)
    return {
        "error": 100.0 * float(wrong) / n,
        "anticipation_error": 100.0 * float(wrong_early) / n,
        "loss": float(loss) / n,
    }


@xla.jit(static_argnames=("model", "num_input"))
def _prediction_batch(model, variables, frames, weight, num_input):
    x = clips.frames_to_float(frames)
    pred = model.apply(variables, x[:, :num_input], train=False).frames
    target = x[:, num_input:]
    per_frame = {  # each [B, num_future]
        "mse": jnp.mean(jnp.square(pred - target), axis=(-3, -2, -1)),
        "psnr": image_quality.psnr(pred, target),
        "ssim": image_quality.ssim(pred, target),
    }
    return {k: jnp.sum(v * weight[:, None], axis=0) for k, v in per_frame.items()}


def evaluate_prediction(
    model: nn.Module,
    variables: dict,
    frames: np.ndarray,
    num_input: int,
    batch_size: int,
    mesh=None,
) -> dict[str, float | list[float]]:
    """MSE, PSNR (dB) and SSIM of the predicted frames: means, and `*_per_frame` lists
    (one entry per frame ahead)."""
    no_labels = np.zeros(len(frames), np.int32)
    batch_sums = lambda x, _, w: _prediction_batch(model, variables, x, w, num_input)
    totals = sum_over_split(batch_sums, frames, no_labels, batch_size, mesh)
    out: dict[str, float | list[float]] = {}
    for k, v in totals.items():
        per_frame = v / len(frames)
        out[k] = float(per_frame.mean())
        out[f"{k}_per_frame"] = [float(p) for p in per_frame]
    return out


def make_task(config: ml_collections.ConfigDict, data: VideoData, mesh) -> Task:
    """The motion-recognition or frame-prediction task of a moving-digits config."""
    model = build_model(config)
    test = data.test
    if config.task == "motion":
        labels = data.train.labels

        def final_results(state: TrainState) -> dict:
            scores = evaluate_motion(
                model, state.variables, test.frames, test.labels, config.eval_batch_size, mesh
            )
            return {f"test_{k}": v for k, v in scores.items()}

        epoch_metrics = final_results
        scheme = config.train.scheme
    else:
        labels = None

        def final_results(state: TrainState) -> dict:
            scores = evaluate_prediction(
                model,
                state.variables,
                test.frames,
                config.data.num_input,
                config.eval_batch_size,
                mesh,
            )
            return {f"test_{k}": v for k, v in scores.items()}

        def epoch_metrics(state: TrainState) -> dict:
            return {k: v for k, v in final_results(state).items() if not k.endswith("_per_frame")}

        scheme = "prediction"
    frames = data.train.frames
    train_data = jax.device_put(DeviceVideos(frames, labels), sharding.replicated(mesh))
    m = config.model
    return Task(
        model=model,
        train_data=train_data,
        num_train=len(frames),
        init_input=init_input(config),
        get_batch=make_get_batch(config, mesh),
        loss_fn=make_loss_fn(config, model),
        epoch_metrics=epoch_metrics,
        final_results=final_results,
        unit="sequences",
        summary=f"{m.kind} stack of depth {m.depth}, base width {stack_width(config)}, {scheme}",
    )


# --- Validation (called by rvm.train.config_check before anything compiles) ------------


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the motion and prediction configs of `experiments/configs/moving_digits.py`
    (called by `rvm.train.config_check` before anything compiles)."""
    m, d = config.model, config.data
    choice(config, "model.kind", ("cbm", *cbm.RNN_CELLS))
    for field in ("depth", "base_width", "kernel_size", "num_stages"):
        positive_int(config, f"model.{field}")
    choice(config, "model.norm", NORMS)
    choice(config, "model.merge", cbm.MERGES)
    rate = m.td_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"model.td_rate={rate!r} must be a number in [0, 1)")
    if rate and m.kind != "cbm":
        raise ConfigError(
            f"model.td_rate={rate!r} needs model.kind='cbm' (Temporal Dropout acts on a CBM's "
            f"temporal unit), not {m.kind!r}"
        )
    boolean(config, "model.match_params")
    if m.match_params and m.kind == "cbm":
        raise ConfigError(
            "model.match_params=True sizes a ConvRNN stack to the CBM's parameter count; "
            "it needs model.kind in " + ", ".join(cbm.RNN_CELLS)
        )
    for field in ("num_train", "num_test", "num_frames", "canvas", "digit_size"):
        positive_int(config, f"data.{field}")
    nonnegative(config, "data.seed")
    if d.digit_size > d.canvas:
        raise ConfigError(f"data.digit_size={d.digit_size} must be at most data.canvas={d.canvas}")
    pair(config, "data.speed")
    choice(config, "train.scheme", SCHEMES)
    if config.task == "motion":
        pair(config, "data.radius")
        if d.num_frames < 3:
            raise ConfigError(f"data.num_frames={d.num_frames} must be >= 3 to tell motions apart")
        _validate_scheme(config)
    else:
        _validate_prediction(config)


def _validate_scheme(config: ml_collections.ConfigDict) -> None:
    t, frames = config.train, config.data.num_frames
    if t.scheme == "tbptt":
        positive_int(config, "train.clip_len")
    elif t.scheme == "overlap":
        for field in ("min_clip", "max_clip", "max_overlap"):
            positive_int(config, f"train.{field}")
        if not 2 <= t.min_clip <= t.max_clip <= frames:
            raise ConfigError(
                f"train.min_clip={t.min_clip}, train.max_clip={t.max_clip} need "
                f"2 <= min_clip <= max_clip <= data.num_frames={frames}"
            )
        if t.max_overlap >= t.min_clip:
            raise ConfigError(
                f"train.max_overlap={t.max_overlap} must be below train.min_clip={t.min_clip} "
                "so that every clip advances"
            )
        nonnegative(config, "train.coherence_weight")
        choice(config, "train.handover", clips.HANDOVERS)


def _validate_prediction(config: ml_collections.ConfigDict) -> None:
    m, d = config.model, config.data
    if config.train.scheme != "full":
        raise ConfigError(
            f"train.scheme={config.train.scheme!r}: frame prediction trains end to end, "
            "so only 'full' is allowed"
        )
    positive_int(config, "data.num_digits")
    positive_int(config, "data.num_input")
    if d.canvas < image_quality.SSIM_WINDOW:
        raise ConfigError(
            f"data.canvas={d.canvas} is below the {image_quality.SSIM_WINDOW}-pixel SSIM window"
        )
    if d.num_input >= d.num_frames:
        raise ConfigError(
            f"data.num_input={d.num_input} must be below data.num_frames={d.num_frames} "
            "(the rest are predicted)"
        )
    # The decoder doubles the top feature map (stem stride 2, then the stages' strides).
    top = -(-d.canvas // 2)
    for s in cbm.width_schedule(m.depth, 1, m.num_stages)[1]:
        top = -(-top // s)
    size = top
    while size < d.canvas:
        size *= 2
    if size != d.canvas:
        raise ConfigError(
            f"data.canvas={d.canvas} cannot be decoded by doubling the {top}x{top} top feature "
            f"map (use a canvas of {top} times a power of two)"
        )
