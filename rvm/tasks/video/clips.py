"""Overlap coherence training (Pang et al. 2019) and its baselines, as loss functions.

A long sequence is cut into clips processed one after another; each starts from
a state handed over by the previous clip and *detached* (`stop_gradient`), so
back-propagation is truncated at clip boundaries. In the overlap scheme clip
k+1 starts strictly inside clip k, and the coherence loss pulls the current
clip's per-frame class probabilities on the overlap towards the previous clip's
(held fixed).

Which state clip k+1 starts from (`handover`):
* "clip_end" (default): the state at the end of clip k, as in the authors' released
  code; the overlapping frames are then read a second time by a state that has
  already seen them, the two predictions differ, and the coherence loss acts.
* "overlap_start": the state clip k had reached at frame s_{k+1}, i.e. after frames
  [s_k, s_{k+1}), before the overlap. Chained from a zero state at frame 0, every
  clip then starts from exactly the state of one uninterrupted pass and only
  gradients are truncated. On the overlap both clips then compute the same function
  of the same state and frames, so with a deterministic forward pass (Temporal
  Dropout and per-frame batch statistics do not change it) the coherence loss is
  identically zero, in value and in gradient: a control, not a training scheme.

Either way a clip starting at frame s runs with time index s (the carry's `t`, which
per-time-step BatchNorm reads), as in an uninterrupted pass and at evaluation; the
state handed over at a clip's end would otherwise carry the index of that end.

Shapes stay static under `jit`: every clip runs on a window of `max_len` frames
with a validity mask (padding frames neither count in the loss nor move the
BatchNorm running averages), and a traced `snapshot_at` selects the handover
state. One schedule is shared by the batch so that per-time-step BatchNorm sees
one time index per step. Clips run in a `lax.scan` whose body is rematerialised
(`jax.checkpoint`) so the backward pass holds one clip's activations at a time,
which is the memory saving that truncation is for.

The model follows `rvm.models.cbm.VideoClassifier`: `initialize_carry(frame_shape)`
and `__call__(frames, *, train, carry, valid, snapshot_at) -> (logits, carry,
snapshot)`. Loss functions have the shared step's signature
`loss_fn(params, batch_stats, batch, rng, train) -> (loss, (batch_stats, metrics))`
with `batch = (frames [B, L, H, W, C], labels [B] or [B, L])`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rvm.models.recurrent import detach
from rvm.train.step import LossFn

Array = jax.Array
HANDOVERS = ("overlap_start", "clip_end")


class Schedule(NamedTuple):
    starts: Array  # [K] int32: first frame of each clip
    lengths: Array  # [K] int32: frames of each clip inside the sequence; 0 = unused clip


def clips_to_cover(seq_len: int, min_len: int, max_overlap: int) -> int:
    """Clips that `sample_overlap_schedule` needs, at worst, to reach the last frame."""
    step = min_len - max_overlap  # the smallest advance of a clip start
    if step < 1:
        raise ValueError("coverage needs max_overlap < min_len")
    return 1 + max(0, -(-(seq_len - min_len) // step))


def sample_overlap_schedule(
    rng: Array,
    seq_len: int,
    num_clips: int,
    min_len: int,
    max_len: int,
    max_overlap: int | None = None,
) -> Schedule:
    """Random clip lengths in [min_len, max_len]; clip k+1 starts strictly inside clip k.

    The first clip starts at frame 0 (a later start would begin from a zero state
    that no uninterrupted pass has). The overlap with the previous clip is uniform
    in [1, min(max_overlap, length - 1)]; `max_overlap` defaults to max_len - 1,
    i.e. a start anywhere inside the previous clip. Clips after the one reaching
    the end of the sequence get length 0; `clips_to_cover` gives a `num_clips`
    that always reaches it.
    """
    if not 2 <= min_len <= max_len:
        raise ValueError("need 2 <= min_len <= max_len")
    max_overlap = max_len - 1 if max_overlap is None else max_overlap
    k_len, k_ovl = jax.random.split(rng)
    lengths = jax.random.randint(k_len, (num_clips,), min_len, max_len + 1)
    hi = jnp.minimum(max_overlap, lengths - 1)
    overlaps = jnp.floor(jax.random.uniform(k_ovl, (num_clips,)) * hi).astype(jnp.int32) + 1
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(lengths - overlaps)[:-1]])
    ends = starts + lengths
    done_before = jnp.concatenate([jnp.zeros(1, bool), jnp.cumsum(ends >= seq_len)[:-1] > 0])
    lengths = jnp.where(done_before, 0, jnp.minimum(ends, seq_len) - starts)
    return Schedule(starts.astype(jnp.int32), lengths.astype(jnp.int32))


def tbptt_schedule(seq_len: int, clip_len: int) -> Schedule:
    """Consecutive non-overlapping clips of `clip_len` frames (the last may be shorter)."""
    starts = jnp.arange(0, seq_len, clip_len, dtype=jnp.int32)
    return Schedule(starts, jnp.minimum(clip_len, seq_len - starts).astype(jnp.int32))


class ClipOutputs(NamedTuple):
    logits: Array  # [K, B, window, C]
    valid: Array  # [K, window] bool
    start_carries: Any  # state each clip started from, stacked over K (if collected)
    batch_stats: Any


def run_clips(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    frames: Array,
    schedule: Schedule,
    window: int,
    *,
    rng: Array,
    train: bool,
    remat: bool = True,
    handover: str = "clip_end",
    collect_carries: bool = False,
) -> ClipOutputs:
    """Run `model` clip after clip, each from the detached state handed over by the last.

    Clip k hands over its state before frame s_{k+1} ("overlap_start", offset
    s_{k+1} - s_k inside the clip) or after its last frame ("clip_end", offset
    = its length), and clip k starts at time index s_k. `collect_carries` also returns
    the state each clip started from.
    """
    if handover not in HANDOVERS:
        raise ValueError(f"handover must be one of {HANDOVERS}, got {handover!r}")
    steps = frames.shape[1]
    num = schedule.starts.shape[0]
    # room for a window starting at any frame; a single clip always starts at 0
    pad = window if num > 1 else max(0, window - steps)
    frames = jnp.pad(frames, [(0, 0), (0, pad)] + [(0, 0)] * (frames.ndim - 2))
    carry0 = model.initialize_carry((frames.shape[0], *frames.shape[2:]))
    if handover == "overlap_start":
        at = jnp.append(schedule.starts[1:] - schedule.starts[:-1], window)
    else:
        at = schedule.lengths
    keys = jax.random.split(rng, num)
    mutable = ["batch_stats"] if train else False

    def clip(state: tuple, xs: tuple) -> tuple[tuple, tuple]:
        carry, stats = state
        start, length, at, key = xs
        carry = at_time(carry, start)
        # unused clips may start past the end; dynamic_slice clamps them (they are masked)
        x = jax.lax.dynamic_slice_in_dim(frames, start, window, axis=1)
        valid = jnp.arange(window) < length
        out = model.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=train,
            carry=carry,
            valid=valid,
            snapshot_at=at,
            rngs={"dropout": key},
            mutable=mutable,
        )
        if train:
            out, updates = out
            stats = updates["batch_stats"]
        kept = carry if collect_carries else None
        return (detach(out.snapshot), stats), (out.logits, valid, kept)

    body = jax.checkpoint(clip) if remat else clip
    xs = (schedule.starts, schedule.lengths, at, keys)
    (_, stats), (logits, valid, carries) = jax.lax.scan(body, (carry0, batch_stats), xs)
    return ClipOutputs(logits, valid, carries, stats)


def at_time(carry: Any, t: Array) -> Any:
    """The carry with its step counters (every carry's leading `t`, an integer scalar;
    `rvm.models.recurrent`) set to `t`."""
    is_counter = lambda v: jnp.ndim(v) == 0 and jnp.issubdtype(jnp.result_type(v), jnp.integer)
    return jax.tree.map(lambda v: jnp.asarray(t, jnp.result_type(v)) if is_counter(v) else v, carry)


def coherence_terms(curr_probs: Array, prev_probs: Array, mask: Array) -> tuple[Array, Array]:
    """(sum, count) of squared probability differences over masked frames; prev side fixed."""
    sq = jnp.square(curr_probs - jax.lax.stop_gradient(prev_probs))
    mask = jnp.broadcast_to(mask[..., None], sq.shape)
    return jnp.sum(jnp.where(mask, sq, 0.0)), jnp.sum(mask)


def coherence_loss(
    curr_probs: Array, prev_probs_on_overlap: Array, mask: Array | None = None
) -> Array:
    """Mean squared difference of per-frame class probabilities on the overlap.

    Inputs [..., frames, classes] aligned frame by frame; `mask` [..., frames]
    selects overlapping frames. The previous clip's side is under stop_gradient:
    it is the reference the current clip is pulled towards.
    """
    if mask is None:
        mask = jnp.ones(curr_probs.shape[:-1], bool)
    total, count = coherence_terms(curr_probs, prev_probs_on_overlap, mask)
    return total / jnp.maximum(count, 1)


def _overlap_coherence(probs: Array, valid: Array, schedule: Schedule) -> tuple[Array, Array]:
    """Coherence (sum, count) between each clip and the one before it, on their overlap."""
    window = probs.shape[2]
    shifts = schedule.starts[1:] - schedule.starts[:-1]
    padded = jnp.pad(probs[:-1], [(0, 0), (0, 0), (0, window), (0, 0)])

    def pair(prev: Array, prev_valid: Array, curr: Array, curr_valid: Array, shift: Array):
        # frame s_k + j of the current clip is frame (s_k - s_{k-1}) + j of the previous one
        aligned = jax.lax.dynamic_slice_in_dim(prev, shift, window, axis=1)
        prev_ok = jnp.arange(window) + shift < jnp.sum(prev_valid)
        mask = jnp.broadcast_to(curr_valid & prev_ok, curr.shape[:2])
        return coherence_terms(curr, aligned, mask)

    sums, counts = jax.vmap(pair)(padded, valid[:-1], probs[1:], valid[1:], shifts)
    return jnp.sum(sums), jnp.sum(counts)


def _frame_labels(labels: Array, schedule: Schedule, window: int) -> Array:
    """Labels [K, B, window] for every clip frame, from [B] or per-frame [B, L] labels."""
    if labels.ndim == 1:
        return jnp.broadcast_to(
            labels[None, :, None], (schedule.starts.shape[0], labels.shape[0], window)
        )
    padded = jnp.pad(labels, [(0, 0), (0, window)])
    take = lambda s: jax.lax.dynamic_slice_in_dim(padded, s, window, axis=1)
    return jax.vmap(take)(schedule.starts)


def frames_to_float(frames: Array) -> Array:
    """uint8 frames to [0, 1] float32 (the models' input range); float frames unchanged."""
    if jnp.issubdtype(frames.dtype, jnp.integer):
        return frames.astype(jnp.float32) / 255.0
    return frames


def clip_losses(
    out: ClipOutputs, labels: Array, schedule: Schedule, steps: int
) -> tuple[Array, Array, dict[str, Array]]:
    """(task loss, coherence loss, metrics): per-frame cross-entropy over valid clip frames."""
    window = out.logits.shape[2]
    frame_labels = _frame_labels(labels, schedule, window)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, frame_labels)
    mask = jnp.broadcast_to(out.valid[:, None, :], ce.shape)
    count = jnp.maximum(jnp.sum(mask), 1)
    task = jnp.sum(jnp.where(mask, ce, 0.0)) / count
    correct = jnp.argmax(out.logits, -1) == frame_labels
    coh_sum, coh_count = _overlap_coherence(jax.nn.softmax(out.logits), out.valid, schedule)
    coherence = coh_sum / jnp.maximum(coh_count, 1)
    covered = jnp.max(jnp.where(schedule.lengths > 0, schedule.starts + schedule.lengths, 0))
    metrics = {
        "task_loss": task,
        "coherence": coherence,
        "frame_accuracy": jnp.sum(jnp.where(mask, correct, False)) / count,
        "overlap_frames": coh_count / (labels.shape[0] * out.logits.shape[-1]),
        "covered_fraction": covered / steps,
    }
    return task, coherence, metrics


def _scheduled_loss_fn(
    model: nn.Module,
    make_schedule: Callable[[Array, int], Schedule],
    window: Callable[[int], int],
    coherence_weight: float,
    remat: bool,
    handover: str = "clip_end",
) -> LossFn:
    def loss_fn(params, batch_stats, batch, rng, train: bool):
        frames, labels = batch
        frames = frames_to_float(frames)
        steps = frames.shape[1]
        sched_rng, model_rng = jax.random.split(rng)
        schedule = make_schedule(sched_rng, steps)
        out = run_clips(
            model,
            params,
            batch_stats,
            frames,
            schedule,
            window(steps),
            rng=model_rng,
            train=train,
            remat=remat,
            handover=handover,
        )
        task, coherence, metrics = clip_losses(out, labels, schedule, steps)
        return task + coherence_weight * coherence, (out.batch_stats, metrics)

    return loss_fn


def make_overlap_loss_fn(
    model: nn.Module,
    *,
    num_clips: int,
    min_len: int,
    max_len: int,
    max_overlap: int | None = None,
    coherence_weight: float = 1.0,
    handover: str = "clip_end",
    remat: bool = True,
) -> LossFn:
    """(i) Overlap coherence training: task loss + coherence_weight * coherence loss.

    See the module docstring for `handover`: "clip_end" is the authors' code; with
    "overlap_start" and a deterministic model the coherence term is zero.
    """

    def schedule(rng: Array, steps: int) -> Schedule:
        return sample_overlap_schedule(rng, steps, num_clips, min_len, max_len, max_overlap)

    return _scheduled_loss_fn(model, schedule, lambda _: max_len, coherence_weight, remat, handover)


def make_tbptt_loss_fn(model: nn.Module, *, clip_len: int, remat: bool = True) -> LossFn:
    """(ii) Plain truncated BPTT: consecutive non-overlapping clips, state detached between."""
    return _scheduled_loss_fn(
        model, lambda _, steps: tbptt_schedule(steps, clip_len), lambda _: clip_len, 0.0, remat
    )


def make_full_bptt_loss_fn(model: nn.Module) -> LossFn:
    """(iii) Full BPTT: one clip spanning the whole sequence, nothing detached."""
    return _scheduled_loss_fn(
        model, lambda _, steps: tbptt_schedule(steps, steps), lambda steps: steps, 0.0, False
    )


def make_prediction_loss_fn(model: nn.Module, *, num_input: int = 10) -> LossFn:
    """Future-frame prediction with a `FramePredictor`: batch = frames [B, T, H, W, C].

    The first `num_input` frames are observed; the loss is the per-pixel binary
    cross-entropy of the predicted logits against the rest (targets in [0, 1]).
    """

    def loss_fn(params, batch_stats, batch, rng, train: bool):
        frames = frames_to_float(batch)
        inputs, targets = frames[:, :num_input], frames[:, num_input:]
        variables = {"params": params, "batch_stats": batch_stats}
        kwargs = {"rngs": {"dropout": rng}, "mutable": ["batch_stats"] if train else False}
        out = model.apply(variables, inputs, train=train, **kwargs)
        if train:
            out, updates = out
            batch_stats = updates["batch_stats"]
        if out.logits.shape != targets.shape:
            raise ValueError(f"predicted {out.logits.shape}, targets {targets.shape}")
        loss = jnp.mean(optax.sigmoid_binary_cross_entropy(out.logits, targets))
        mse = jnp.mean(jnp.square(out.frames - targets))
        return loss, (batch_stats, {"bce": loss, "mse": mse})

    return loss_fn
