"""Glimpse recognition: RAM (or a whole-canvas CNN) on translated / cluttered digit canvases.

`config.task="glimpses"`. The canvases (`rvm.data.cluttered_digits`) are made once
from `data.seed` with train, validation and test splits that share no digit scan.
`model.kind` is "ram" (`model.policy`: learned, random, center) or "cnn".

The loss is the classification cross-entropy; with the learned policy, RAM adds
`train.reinforce_weight` x the REINFORCE term and the baseline's squared error
(`rvm.models.ram.reinforce_terms`). After each epoch the validation and test errors
are recorded (the loop reports the test error at the best validation epoch); at the
end results.json holds the test error with its Wilson 95% interval, XLA's count of
floating-point operations per image at each of `eval.compute_canvases`, and the
glimpse locations on the first test canvases (for the figure).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from rvm.analysis.measures import wilson
from rvm.data import pipeline
from rvm.data.cluttered_digits import make_canvases
from rvm.errors import ConfigError
from rvm.models.ram import POLICIES, RAM, CanvasCNN, reinforce_terms
from rvm.train import sharding, xla
from rvm.train.fields import choice, nonnegative, positive, positive_int
from rvm.train.state import TrainState
from rvm.train.task import Task, sum_over_split

KINDS = ("ram", "cnn")
EVAL_KEY = 0  # random glimpse locations at evaluation come from this key, the same each time


class Split(NamedTuple):
    images: np.ndarray  # [N, canvas, canvas, 1] uint8
    labels: np.ndarray  # [N] int32


class GlimpseData(NamedTuple):
    train: Split
    validation: Split
    test: Split


@struct.dataclass
class DeviceSplit:
    images: jax.Array
    labels: jax.Array


def load_data(config: ml_collections.ConfigDict) -> GlimpseData:
    d = config.data
    make = lambda split, num: make_canvases(
        d.seed, num, split, canvas=d.canvas, digit_size=d.digit_size, clutter=d.clutter
    )
    splits = [make(s, n) for s, n in (("train", d.num_train), ("validation", d.num_val))]
    splits.append(make("test", d.num_test))
    return GlimpseData(*(Split(c.images, c.labels) for c in splits))


def build_model(config: ml_collections.ConfigDict):
    m = config.model
    if m.kind == "cnn":
        return CanvasCNN(m.features)
    return RAM(
        size=m.size,
        scales=m.scales,
        width=float(m.width),
        glimpses=m.glimpses,
        hidden=m.hidden,
        features=m.features,
        policy=m.policy,
        std=m.std,
    )


def make_loss_fn(model, reinforce_weight: float):
    learned = isinstance(model, RAM) and model.policy == "learned"

    def loss_fn(params, batch_stats, batch, rng, train: bool):
        images, labels = batch
        out = model.apply({"params": params}, images, train=train, key=rng)
        ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()
        error = jnp.mean(jnp.argmax(out["logits"], -1) != labels)
        metrics = {"error": error, "ce": ce}
        loss = ce
        if learned:
            policy, baseline = reinforce_terms(out, labels)
            loss = ce + reinforce_weight * policy + baseline
            metrics.update(policy_loss=policy, baseline_loss=baseline)
        return loss, (batch_stats, metrics)

    return loss_fn


@xla.jit(static_argnames="model")
def _wrong(model, variables, images, labels, weight):
    x = images.astype(jnp.float32) / 255.0
    logits = model.apply(variables, x, key=jax.random.key(EVAL_KEY))["logits"]
    return jnp.sum((jnp.argmax(logits, -1) != labels) * weight)


def error(model, variables, split: Split, batch_size: int, mesh=None) -> float:
    """Test error (%) over the whole split."""
    wrong = sum_over_split(
        lambda x, y, w: _wrong(model, variables, x, y, w),
        split.images,
        split.labels,
        batch_size,
        mesh,
    )
    return 100.0 * float(wrong) / len(split.labels)


def flops_per_image(model, variables: dict, canvas: int) -> float:
    """XLA's count of floating-point operations to classify one `canvas`-sized image."""
    f = lambda v, x: model.apply(v, x, key=jax.random.key(EVAL_KEY))["logits"]
    image = jax.ShapeDtypeStruct((1, canvas, canvas, 1), jnp.float32)
    cost = jax.jit(f).lower(variables, image).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def make_task(config: ml_collections.ConfigDict, data: GlimpseData, mesh) -> Task:
    model = build_model(config)
    batch_sharding = sharding.batch(mesh)

    def get_batch(train: DeviceSplit, step, rng, seed):
        del rng
        idx = pipeline.batch_indices(seed, step, train.images.shape[0], config.batch_size)
        x = jax.lax.with_sharding_constraint(train.images[idx] / 255.0, batch_sharding)
        y = jax.lax.with_sharding_constraint(train.labels[idx], batch_sharding)
        return x, y

    score = lambda state, split: error(model, state.variables, split, config.eval_batch_size, mesh)

    def epoch_metrics(state: TrainState) -> dict:
        return {"val_error": score(state, data.validation), "test_error": score(state, data.test)}

    def final_results(state: TrainState) -> dict[str, Any]:
        n = len(data.test.labels)
        test = score(state, data.test)
        shown = data.test.images[: config.eval.num_shown]
        out = model.apply(state.variables, shown / 255.0, key=jax.random.key(EVAL_KEY))
        return {
            "test_error": test,
            "test_error_interval": wilson(test / 100.0 * n, n),
            "num_test": n,
            "val_error": score(state, data.validation),
            "flops_per_image": {
                str(c): flops_per_image(model, state.variables, c)
                for c in config.eval.compute_canvases
            },
            "shown_locations": np.asarray(out.get("locations", np.zeros(0))).tolist(),
            "shown_predictions": np.asarray(jnp.argmax(out["logits"], -1)).tolist(),
        }

    m = config.model
    summary = (
        f"CNN on the whole {config.data.canvas}px canvas"
        if m.kind == "cnn"
        else f"RAM, {m.glimpses} glimpses of {m.scales}x{m.size}px from {m.width}px, {m.policy}"
    )
    return Task(
        model=model,
        train_data=jax.device_put(
            DeviceSplit(data.train.images, data.train.labels), sharding.replicated(mesh)
        ),
        num_train=len(data.train.labels),
        init_input=jnp.zeros((1, *data.train.images.shape[1:]), jnp.float32),
        get_batch=get_batch,
        loss_fn=make_loss_fn(model, config.train.reinforce_weight),
        epoch_metrics=epoch_metrics,
        final_results=final_results,
        unit="images",
        summary=summary + f", clutter {config.data.clutter}",
    )


# --- Validation (called by rvm.train.config_check before anything compiles) ------------


def validate(config: ml_collections.ConfigDict) -> None:
    d, m = config.data, config.model
    for field in ("canvas", "digit_size", "num_train", "num_val", "num_test"):
        positive_int(config, f"data.{field}")
    if d.canvas < d.digit_size:
        raise ConfigError(
            f"data.canvas={d.canvas} is smaller than a digit (data.digit_size={d.digit_size})"
        )
    if isinstance(d.clutter, bool) or not isinstance(d.clutter, int) or d.clutter < 0:
        raise ConfigError(f"data.clutter={d.clutter!r} must be a non-negative integer")
    choice(config, "model.kind", KINDS)
    positive_int(config, "model.features")
    if m.kind == "ram":
        choice(config, "model.policy", POLICIES)
        for field in ("size", "scales", "glimpses", "hidden"):
            positive_int(config, f"model.{field}")
        positive(config, "model.width")
        positive(config, "model.std")
    nonnegative(config, "train.reinforce_weight")
    positive_int(config, "eval.num_shown")
    for i, c in enumerate(config.eval.compute_canvases):
        if isinstance(c, bool) or not isinstance(c, int) or c < d.digit_size:
            raise ConfigError(
                f"eval.compute_canvases[{i}]={c!r} must be an integer canvas of at least "
                f"data.digit_size={d.digit_size}"
            )
