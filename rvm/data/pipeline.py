"""On-device batching, augmentation and normalisation as pure, jittable functions.

The training split lives on device as uint8; a train step picks its batch by index,
augments and normalises it inside jit. Every random choice is a function of explicit
keys and the step number, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rvm.errors import ConfigError

# A feature constant over the training set has std 0 (exactly, for uint8 data summed in
# float32); any genuinely varying uint8 feature has std >= ~1/sqrt(N), far above this.
_MIN_STD = 1e-4


@partial(jax.jit, static_argnames="mode")
def normalization_stats(train_images_u8: jax.Array, mode: str = "feature") -> tuple:
    """float32 (mean, std) of the training images, broadcastable against NHWC batches.

    "feature": one mean and std per input value (H*W*C of them), the paper's per-feature
    normalisation; "channel": one per colour channel. Constant features get std 1.
    """
    x = jnp.asarray(train_images_u8).astype(jnp.float32)
    if mode == "feature":
        axes = (0,)
    elif mode == "channel":
        axes = (0, 1, 2)
    else:
        raise ValueError(f"data.normalization={mode!r} is not one of feature, channel")
    # Two passes, not E[x^2] - E[x]^2, which cancels badly in float32.
    mean = jnp.mean(x, axis=axes, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True))
    std = jnp.where(std < _MIN_STD, 1.0, std)
    return mean[0], std[0]


def normalize(images_f32: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """(images - mean) / std, with stats from `normalization_stats`."""
    return (images_f32 - mean) / std


def batch_indices(seed, step, num_examples: int, batch_size: int) -> jax.Array:
    """Indices of training batch `step`: a pure function of (seed, step), traceable in `step`.

    Each epoch is a fresh permutation (keyed by fold_in(key, epoch)) cut into
    num_examples // batch_size batches; the remainder is dropped, a different one each epoch.
    `seed` is an int or a PRNG key.
    """
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size={batch_size} exceeds the {num_examples} training examples")
    is_typed_key = hasattr(seed, "dtype") and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)
    # A typed key is a scalar too, so only integer scalars count as seeds.
    key = seed if is_typed_key or jnp.ndim(seed) > 0 else jax.random.key(seed)
    epoch, within = jnp.divmod(jnp.asarray(step), steps_per_epoch)
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return jax.lax.dynamic_slice_in_dim(perm, within * batch_size, batch_size)


def augment(
    images_u8: jax.Array, key: jax.Array, *, flip: bool, crop: bool, pad: int = 4
) -> jax.Array:
    """Random horizontal flips (p=0.5) and pad-and-crop per image; returns float32.

    Crops take a window of the input size from the image zero-padded by `pad` pixels
    (black; Huang et al.'s code pads the normalised image, i.e. with the mean pixel),
    so offsets of -pad..pad in each direction are equally likely.
    """
    flip_key, crop_key = jax.random.split(key)
    images = jnp.asarray(images_u8)
    n, h, w, c = images.shape
    if flip:
        chosen = jax.random.bernoulli(flip_key, 0.5, (n,))
        images = jnp.where(chosen[:, None, None, None], images[:, :, ::-1, :], images)
    if crop and pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        corners = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)

        def window(image, corner):
            return jax.lax.dynamic_slice(image, (corner[0], corner[1], 0), (h, w, c))

        images = jax.vmap(window)(padded, corners)
    return images.astype(jnp.float32)


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All of a split in batches of exactly `batch_size` (one compiled shape for evaluation).

    Yields (images, labels, mask); the last batch is zero-padded and its padding has
    mask 0, so weighting by the mask counts every example exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"eval batch_size={batch_size} must be positive")
    images, labels = np.asarray(images), np.asarray(labels)
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        mask = np.ones(batch_size, np.float32)
        missing = batch_size - len(y)
        if missing:
            x = np.concatenate([x, np.zeros((missing, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((missing, *y.shape[1:]), y.dtype)])
            mask[len(mask) - missing :] = 0.0
        yield x, y, mask
