"""Image classification on a device-resident dataset: batches, loss and evaluation.

The whole training split sits on every device as uint8; a step gathers its batch
by index, augments and normalises it inside the jitted step, then constrains it
to be sharded over the `data` mesh axis. `make_task` assembles these for the
training loop (`task.Task`), with the relaxed-sharing extras: kernel angles after
each epoch and the consolidated network's error at the end, with the BatchNorm
statistics it was trained with and with statistics re-estimated for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from rvm.data import ImageData, load_images, pipeline
from rvm.errors import ConfigError
from rvm.models import equilibrium
from rvm.models import sharing as weight_sharing
from rvm.models.recalibrate import recalibrate
from rvm.models.stochastic_depth import SD_IMPLS, iteration_masks
from rvm.train import sharding, xla
from rvm.train.fields import boolean, choice, positive
from rvm.train.relaxation import max_angles, max_pairwise_angles
from rvm.train.state import TrainState
from rvm.train.step import Probes
from rvm.train.task import Task, sum_over_split


@struct.dataclass
class DeviceImages:
    """A training split and its normalisation statistics, on device."""

    images: jax.Array  # [N, H, W, C] uint8
    labels: jax.Array  # [N] int32
    mean: jax.Array
    std: jax.Array


def put_train_split(images, labels, stats, mesh) -> DeviceImages:
    mean, std = stats
    tree = DeviceImages(images, labels.astype(np.int32), mean, std)
    return jax.device_put(tree, sharding.replicated(mesh))


def make_get_batch(cfg: ml_collections.ConfigDict, mesh):
    """`get_batch(data, step, rng, seed)` for config `cfg` (the whole run config); `seed`
    is the run's key, which orders the batches."""
    batch_sharding = sharding.batch(mesh)

    def get_batch(data: DeviceImages, step, rng, seed):
        idx = pipeline.batch_indices(seed, step, data.images.shape[0], cfg.batch_size)
        images = pipeline.augment(data.images[idx], rng, flip=cfg.data.flip, crop=cfg.data.crop)
        images = pipeline.normalize(images, data.mean, data.std)
        images = jax.lax.with_sharding_constraint(images, batch_sharding)
        labels = jax.lax.with_sharding_constraint(data.labels[idx], batch_sharding)
        return images, labels

    return get_batch


# Folded into a step's model key for the iteration counts, so stochastic depth keeps
# its own draws whether or not the counts are random.
ITERATIONS_STREAM = 1


def make_loss_fn(model: nn.Module, draw_masks: Callable[[jax.Array], list] | None = None):
    """The loss of `model`; in training, `draw_masks(key)` (if given) draws per-level
    keep-masks for the step (random iteration counts), from the step's model key."""

    def loss_fn(params, batch_stats, batch, rng, train: bool, probes=None):
        images, labels = batch
        masks = None
        if train and draw_masks is not None:
            masks = draw_masks(jax.random.fold_in(rng, ITERATIONS_STREAM))
        variables = {"params": params, "batch_stats": batch_stats}
        if probes is not None:  # equilibrium levels' adjoint probes (`rvm.train.step.Probes`)
            variables[equilibrium.PROBES] = probes
        logits, updates = model.apply(
            variables,
            images,
            train=train,
            masks=masks,
            rngs={"dropout": rng},
            mutable=["batch_stats", "solver"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        metrics = {"error": jnp.mean(jnp.argmax(logits, -1) != labels)}
        if "solver" in updates:  # equilibrium levels: their solves' statistics
            loss, solved = equilibrium.add_solver_terms(loss, updates["solver"], model.equilibrium)
            metrics.update(solved)
        return loss, (updates["batch_stats"], metrics)

    return loss_fn


@xla.jit(static_argnames=("model", "iterations"))
def _eval_batch(model, variables, images, labels, weight, mean, std, masks, iterations):
    x = pipeline.normalize(images.astype(jnp.float32), mean, std)
    logits = model.apply(variables, x, train=False, masks=masks, iterations=iterations)
    if isinstance(logits, tuple):
        logits = logits[0]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    wrong = (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
    return jnp.sum(wrong * weight), jnp.sum(loss * weight)


def evaluate(
    model: nn.Module,
    variables: dict,
    images: np.ndarray,
    labels: np.ndarray,
    stats: tuple[Any, Any],
    batch_size: int,
    mesh=None,
    masks=None,
    iterations: Sequence[int | None] | None = None,
) -> dict[str, float]:
    """Error (%) and mean loss over the whole split; the last batch is padded and masked."""
    iterations = None if iterations is None else tuple(iterations)  # a static jit argument
    batch_sums = lambda x, y, w: _eval_batch(model, variables, x, y, w, *stats, masks, iterations)
    wrong, total_loss = sum_over_split(batch_sums, images, labels, batch_size, mesh)
    n = len(labels)
    return {"error": 100.0 * float(wrong) / n, "loss": float(total_loss) / n}


# Training images that re-estimate BatchNorm statistics (`rvm.models.recalibrate`).
RECALIBRATION_IMAGES = 2048


def recalibration_batches(
    images_u8: np.ndarray,
    stats: tuple[Any, Any],
    batch_size: int,
    num_images: int = RECALIBRATION_IMAGES,
    seed: int = 0,
) -> list[np.ndarray]:
    """`num_images` training images (a fixed random choice, no augmentation), normalised,
    in batches of `batch_size` (fewer images if the split is smaller). Host arrays: the
    same in every process, so a multi-process run may pass them to a jitted function."""
    order = np.random.default_rng(seed).permutation(len(images_u8))
    batch_size = min(batch_size, len(order))
    chosen = order[: max(num_images // batch_size, 1) * batch_size]
    mean, std = (np.asarray(s, np.float32) for s in stats)
    images = np.asarray(images_u8)
    return [
        pipeline.normalize(images[idx].astype(np.float32), mean, std)
        for idx in np.split(chosen, len(chosen) // batch_size)
    ]


def random_iterations(cfg: ml_collections.ConfigDict) -> Callable[[jax.Array], list] | None:
    """`draw_masks` for `make_loss_fn` when `cfg.random_iterations`: a count per mini-batch
    for each level in the sharing scope (raw or relaxed), at most its trained depth."""
    if not cfg.get("random_iterations", False):  # configs written before the field: off
        return None
    scope = weight_sharing.levels_in_scope(cfg.scope)
    blocks = weight_sharing.trained_blocks(cfg)
    levels = [b - int(i > 0) if s else None for i, (b, s) in enumerate(zip(blocks, scope))]
    return partial(
        iteration_masks, num_blocks=levels, mean=cfg.iterations_mean, sigma=cfg.iterations_sigma
    )


def load_data(config: ml_collections.ConfigDict) -> ImageData:
    """CIFAR-10 or synthetic images, as `config.data` says."""
    return load_images(config.data)


def make_task(config: ml_collections.ConfigDict, data: ImageData, mesh) -> Task:
    """The image-classification task of a CIFAR-10-style config on `data`."""
    stats = pipeline.normalization_stats(data.train_images, config.data.normalization)
    model = weight_sharing.build_model(config.model, data.num_classes)
    init_input = jnp.zeros((1, *data.train_images.shape[1:]), jnp.float32)
    probes = None  # traced only for a model that has equilibrium levels
    if model.equilibrium is not None:
        probes = equilibrium.adjoint_probes(model, init_input)
    relaxed = config.model.sharing == "relaxed"
    mask_fn = partial(weight_sharing.set_mask, scope=config.model.scope) if relaxed else None
    score = partial(evaluate, stats=stats, batch_size=config.eval_batch_size, mesh=mesh)

    last_step = config.num_epochs * (len(data.train_labels) // config.batch_size)
    # The consolidated numbers, computed once per run and step (a pack's runs, told apart
    # by their keys, share this task: `rvm.train.pack`).
    done: dict[tuple[int, bytes], dict] = {}

    def consolidated(state: TrainState) -> dict:
        key = (int(state.step), np.asarray(state.rng).tobytes())
        if key not in done:
            merged = {
                **state.variables,
                "params": weight_sharing.consolidate(state.params, config.model.scope),
            }
            raw = weight_sharing.build_model(config.model, data.num_classes, consolidated=True)
            # Averaged kernels change every block's activations: statistics of their own.
            batches = recalibration_batches(data.train_images, stats, config.batch_size)
            fresh = recalibrate(raw, merged, batches)
            done[key] = {
                "params_consolidated": weight_sharing.count_params(merged["params"]),
                "consolidated_test_error": score(raw, merged, data.test_images, data.test_labels)[
                    "error"
                ],
                "consolidated_recalibrated_test_error": score(
                    raw, fresh, data.test_images, data.test_labels
                )["error"],
            }
        return done[key]

    def epoch_metrics(state: TrainState) -> dict:
        test = score(model, state.variables, data.test_images, data.test_labels)
        record = {"test_error": test["error"], "test_loss": test["loss"]}
        if data.val_images is not None and len(data.val_labels):
            val = score(model, state.variables, data.val_images, data.val_labels)
            record["val_error"] = val["error"]
        if mask_fn is not None:
            record["max_angle"] = max_angles(state.params, mask_fn(state.params))
            record["max_pairwise_angle"] = max_pairwise_angles(state.params, mask_fn(state.params))
            if int(state.step) == last_step:  # the final record carries the final numbers
                errors = consolidated(state)
                record.update({k: v for k, v in errors.items() if k.endswith("test_error")})
        return record

    def final_results(state: TrainState) -> dict:
        test = score(model, state.variables, data.test_images, data.test_labels)
        results = {"test_error": test["error"]}
        if relaxed:
            results.update(consolidated(state))
        return results

    return Task(
        model=model,
        train_data=put_train_split(data.train_images, data.train_labels, stats, mesh),
        num_train=len(data.train_labels),
        init_input=init_input,
        get_batch=make_get_batch(config, mesh),
        loss_fn=make_loss_fn(model, random_iterations(config.model)),
        epoch_metrics=epoch_metrics,
        final_results=final_results,
        unit="images",
        summary=f"{config.model.sharing} sharing, scope {config.model.scope}",
        relax_mask=mask_fn,
        probes=None if probes is None else Probes(probes, equilibrium.adjoint_metrics),
    )


# --- Validation (called by rvm.train.config_check before anything compiles) ------------


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the image fields (called by `rvm.train.config_check` before anything compiles)."""
    try:
        weight_sharing.validate(config.model)
    except ValueError as e:  # the model's own checks, which name the field already
        raise ConfigError(str(e)) from e
    for field in ("data.flip", "data.crop", "model.stochastic_depth"):
        boolean(config, field)
    if "sd_impl" in config.model:  # configs written before the field run "auto"
        choice(config, "model.sd_impl", SD_IMPLS)
    if config.model.get("random_iterations", False):
        if config.model.sharing not in ("raw", "relaxed"):
            raise ConfigError("model.random_iterations=True needs model.sharing raw or relaxed")
        if not config.model.iterations_mean >= 1 or not config.model.iterations_sigma >= 0:
            raise ConfigError("model.iterations_mean must be >= 1, model.iterations_sigma >= 0")
    for field in ("pull_start", "pull_end"):
        positive(config, f"optim.{field}")
    choice(config, "data.normalization", ("feature", "channel"))
    holdout = config.data.holdout
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise ConfigError(f"data.holdout={holdout!r} must be a non-negative integer")
