"""Semi-supervised video object segmentation on target videos, through the one loop.

The videos (`rvm.data.target_videos`) sit on every device as uint8; a step gathers its
batch by index (`pipeline.batch_indices`, so a resumed run sees the same batches) and
hands the model the frames with the target's mask in frame 0 only. The loss is per-pixel
binary cross-entropy plus one minus the soft IoU, over frames 1..T-1 (frame 0's mask is
given). After each epoch J is measured on the validation split, the split every choice
is made on; the test split is measured once, at the end, with FLOPs per frame, frames
per second at batch 1 and 32, and for `resrec` the recurrent weights' magnitude.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from rvm.analysis import video_objects as measures
from rvm.data import pipeline
from rvm.data.target_videos import TargetVideos, check_arguments, make_target_videos
from rvm.errors import ConfigError
from rvm.models import video_objects as vo
from rvm.train import sharding
from rvm.train.fields import boolean, choice, nonnegative, positive_int
from rvm.train.state import TrainState
from rvm.train.task import Task, sum_over_split


class ObjectData(NamedTuple):
    train: TargetVideos
    validation: TargetVideos
    test: TargetVideos


@struct.dataclass
class DeviceVideos:
    frames: jax.Array  # [N, T, H, W, 1] uint8
    masks: jax.Array  # [N, T, H, W] uint8


def load_data(config: ml_collections.ConfigDict) -> ObjectData:
    """The three splits from `config.data.seed` (each split has its own seed stream)."""
    d = config.data
    make = functools.partial(
        make_target_videos,
        d.seed,
        num_frames=d.num_frames,
        canvas=d.canvas,
        digit_size=d.digit_size,
        distractors=tuple(d.distractors),
    )
    return ObjectData(
        make(d.num_train, split="train"),
        make(d.num_val, split="validation"),
        make(d.num_test, split="test"),
    )


def model_input(frames: jax.Array, masks: jax.Array) -> jax.Array:
    """[B, T, H, W, 2] float: the frames, and the target's mask in frame 0 only."""
    x = frames.astype(jnp.float32) / 255.0
    m0 = jnp.zeros_like(x).at[:, 0, ..., 0].set(masks[:, 0].astype(jnp.float32))
    return jnp.concatenate([x, m0], -1)


def build_model(config: ml_collections.ConfigDict, **overrides) -> vo.VideoObjects:
    m = config.model
    fields = dict(
        system=m.system,
        widths=tuple(m.widths),
        blocks=tuple(m.blocks),
        cell=m.cell,
        key_every=m.key_every,
        memory=m.memory,
        small_features=m.small_features,
        pc_layers=tuple(m.pc_layers),
        reinit_threshold=float(m.reinit_threshold),
        ignore_threshold=float(m.ignore_threshold),
        match=bool(m.match),
    )
    return vo.VideoObjects(**{**fields, **overrides})


def loss_terms(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Per video [B]: mean BCE plus (1 - soft IoU) over frames 1..T-1."""
    logits, y = logits[:, 1:], masks[:, 1:].astype(jnp.float32)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y), axis=(1, 2, 3))
    p = jax.nn.sigmoid(logits)
    inter, union = jnp.sum(p * y, axis=(2, 3)), jnp.sum(p + y - p * y, axis=(2, 3))
    soft_iou = jnp.mean((inter + 1.0) / (union + 1.0), axis=1)
    return bce + 1.0 - soft_iou


def make_get_batch(config: ml_collections.ConfigDict, mesh):
    batch_sharding = sharding.batch(mesh)

    def get_batch(data: DeviceVideos, step, rng, seed):
        del rng
        idx = pipeline.batch_indices(seed, step, data.frames.shape[0], config.batch_size)
        frames = jax.lax.with_sharding_constraint(data.frames[idx], batch_sharding)
        return frames, jax.lax.with_sharding_constraint(data.masks[idx], batch_sharding)

    return get_batch


def make_loss_fn(model: vo.VideoObjects):
    def loss_fn(params, batch_stats, batch, rng, train):
        del rng
        frames, masks = batch
        logits, updated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            model_input(frames, masks),
            train=train,
            mutable=["batch_stats"],
        )
        loss = jnp.mean(loss_terms(logits, masks))
        j = jnp.mean(measures.mask_iou(logits[:, 1:], masks[:, 1:]))
        return loss, (updated["batch_stats"], {"train_J": 100 * j})

    return loss_fn


@functools.partial(jax.jit, static_argnames=("model",))
def _video_outputs(model, variables, frames, masks):
    logits, inter = model.apply(variables, model_input(frames, masks), mutable=["intermediates"])
    return measures.mask_iou(logits, masks), inter.get("intermediates", {})


def evaluate(model, variables, videos: TargetVideos, batch_size: int, mesh=None) -> dict:
    """J and its companions on a split; for pc also the schedule and non-zero sites."""
    masks = videos.masks.astype(np.uint8)
    outputs = []

    def batch_sums(x, y, w):
        iou, inter = _video_outputs(model, variables, x, y)
        outputs.append((iou, inter, w))
        return jnp.sum(w)

    sum_over_split(batch_sums, videos.frames, masks, batch_size, mesh)
    outputs = jax.device_get(outputs)
    keep = lambda a, w: np.asarray(a)[np.asarray(w) > 0]
    iou = np.concatenate([keep(i, w) for i, _, w in outputs])
    keyless = model.system in ("frame", "propagate")
    out = measures.summarize_j(iou, None if keyless else model.key_every)
    out.update(measures.j_by_distractor_class(iou, videos.classes))
    if model.system == "pc":
        out["pc_kind"] = np.concatenate([keep(i["pc_kind"][0], w) for _, i, w in outputs])
        out["pc_nonzero"] = [
            np.concatenate([keep(i[f"pc_nonzero{b}"][0], w) for _, i, w in outputs])
            for b in range(len(model.pc_layers))
        ]
    return out


def final_measures(config, model, state: TrainState, data: ObjectData, mesh) -> dict:
    """Validation and test J, FLOPs per frame and frames per second."""
    variables = state.variables
    bs = config.eval_batch_size
    results = {}
    val = evaluate(model, variables, data.validation, bs, mesh)
    test = evaluate(model, variables, data.test, bs, mesh)
    results.update({f"val_{k}": v for k, v in val.items() if not k.startswith("pc_")})
    results.update({f"test_{k}": v for k, v in test.items() if not k.startswith("pc_")})
    parts = measures.part_flops(model, variables, data.test.frames.shape[2:4])
    results["part_flops"] = parts
    results.update(
        measures.system_flops(
            model, parts, config.data.num_frames, test.get("pc_kind"), test.get("pc_nonzero")
        )
    )
    if model.system == "resrec":
        results.update(measures.weight_rms(state.params))
    fn = jax.jit(lambda v: model.apply(variables, v))
    for b in config.measure_fps_batches:
        n = min(b, len(data.test.frames))
        video = model_input(jnp.asarray(data.test.frames[:n]), jnp.asarray(data.test.masks[:n]))
        results[f"frames_per_sec_batch{b}"] = measures.frames_per_second(fn, video)
    return results


def make_task(config: ml_collections.ConfigDict, data: ObjectData, mesh) -> Task:
    model = build_model(config)
    # stale and small share their big network's training with frame and dual
    train_data = jax.device_put(
        DeviceVideos(data.train.frames, data.train.masks.astype(np.uint8)),
        sharding.replicated(mesh),
    )
    d = config.data
    init = model_input(
        jnp.zeros((1, d.num_frames, d.canvas, d.canvas, 1), jnp.uint8),
        jnp.zeros((1, d.num_frames, d.canvas, d.canvas), jnp.uint8),
    )

    def epoch_metrics(state: TrainState) -> dict:
        val = evaluate(model, state.variables, data.validation, config.eval_batch_size, mesh)
        return {"val_J": val["J"], "val_J_decay": val["J_decay"]}

    return Task(
        model=model,
        train_data=train_data,
        num_train=len(data.train.frames),
        init_input=init,
        get_batch=make_get_batch(config, mesh),
        loss_fn=make_loss_fn(model),
        epoch_metrics=epoch_metrics,
        final_results=lambda state: final_measures(config, model, state, data, mesh),
        unit="videos",
        summary=f"{config.model.system} on {d.canvas}x{d.canvas} target videos",
    )


# --- Validation (called by rvm.train.config_check before anything compiles) ------------


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the fields of `experiments/configs/video_objects.py`."""
    m, d = config.model, config.data
    choice(config, "model.system", vo.SYSTEMS)
    choice(config, "model.cell", tuple(vo.CELLS))
    choice(config, "model.memory", vo.MEMORY)
    for field in ("key_every", "small_features"):
        positive_int(config, f"model.{field}")
    for field in ("reinit_threshold", "ignore_threshold"):
        nonnegative(config, f"model.{field}")
    boolean(config, "model.match")
    if m.match and m.system == "propagate":
        raise ConfigError("model.match=True is not built for model.system='propagate'")
    if len(m.widths) != len(m.blocks) or not all(int(b) >= 1 for b in m.blocks):
        raise ConfigError(f"model.blocks={m.blocks!r} needs one count >= 1 per width {m.widths!r}")
    if any(int(b) < 2 for b in m.blocks[1:]):
        raise ConfigError(f"model.blocks={m.blocks!r}: levels after the first need >= 2 blocks")
    layers = tuple(m.pc_layers)
    if not layers or list(layers) != sorted(set(layers)) or not 1 <= layers[0]:
        raise ConfigError(f"model.pc_layers={layers!r} must be increasing segment ends >= 1")
    if layers[-1] > len(m.widths):
        raise ConfigError(f"model.pc_layers={layers!r} ends past the {len(m.widths)} segments")
    for field in ("num_train", "num_val", "num_test", "num_frames", "canvas", "digit_size"):
        positive_int(config, f"data.{field}")
    nonnegative(config, "data.seed")
    try:
        check_arguments(d.num_frames, d.canvas, d.digit_size, tuple(d.distractors))
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None
    if d.canvas % 8:
        raise ConfigError(f"data.canvas={d.canvas} must be a multiple of 8 (the trunk's stride)")
