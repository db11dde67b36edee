"""BatchNorm with a hand-written backward pass, optionally fused with the ReLU after it.

Autodiff of `nn.BatchNorm` keeps several full-size intermediates (the centred
input, the normalised output, the ReLU mask) and walks them in separate passes;
under `nn.scan` each is written to a buffer stacked over the iterations and read
back in the backward loop. The VJP here keeps only the input and the per-channel
statistics and gets the input gradient in one elementwise pass after two
per-channel reductions (xhat = (x - mean) * rstd, g the output gradient):

    dx = scale * rstd * (g - mean(g) - xhat * mean(g * xhat))

With `relu=True` the ReLU that follows joins that pass, its mask recomputed from
x, so it stores nothing either. Variables (`scale`, `bias`; `mean`, `var`),
defaults and numerics follow `nn.BatchNorm` (statistics in float32, variance
E[x^2] - E[x]^2, biased), so parameters and checkpoints are interchangeable.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _stats(x: Array) -> tuple[Array, Array]:
    """Per-channel mean and biased variance over every axis but the last, in float32."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)


def _affine(x: Array, mean: Array, rstd: Array, scale: Array, bias: Array) -> Array:
    """(x - mean) * rstd * scale + bias, in the statistics' precision (as `nn.BatchNorm`)."""
    return (x.astype(mean.dtype) - mean) * (rstd * scale) + bias


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize_batch(x, scale, bias, epsilon: float, relu: bool):
    """(normalised x [ReLU], batch mean, batch variance) in training mode."""
    return _normalize_batch_fwd(x, scale, bias, epsilon, relu)[0]


def _normalize_batch_fwd(x, scale, bias, epsilon, relu):
    mean, var = _stats(x)
    rstd = lax.rsqrt(var + epsilon)
    y = _affine(x, mean, rstd, scale, bias)
    y = (jnp.maximum(y, 0) if relu else y).astype(x.dtype)
    return (y, mean, var), (x, mean, rstd, scale, bias)


def _normalize_batch_bwd(epsilon, relu, res, cotangents):
    del epsilon
    x, mean, rstd, scale, bias = res
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    g = g.astype(mean.dtype)
    if relu:
        g = jnp.where(_affine(x, mean, rstd, scale, bias) > 0, g, 0)
    centred = x.astype(mean.dtype) - mean
    xhat = centred * rstd
    g_bias = jnp.sum(g, axes)
    g_scale = jnp.sum(g * xhat, axes)
    dx = (scale * rstd) * (g - g_bias / n - xhat * (g_scale / n))
    # The statistics are outputs too (for the running averages); their cotangents
    # are zero in a training step but are honoured for any other use.
    dx = dx + g_mean / n + centred * (2 * g_var / n)
    return dx.astype(x.dtype), g_scale, g_bias


_normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class BatchNorm(nn.Module):
    """Drop-in for `nn.BatchNorm` over the last axis, with `relu` to apply ReLU after it."""

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    relu: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        stats = jnp.promote_types(x.dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stats)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), stats)
        dtype = self.dtype or jnp.result_type(x, scale)
        if self.use_running_average:
            y = _affine(x, ra_mean.value, lax.rsqrt(ra_var.value + self.epsilon), scale, bias)
            return (nn.relu(y) if self.relu else y).astype(dtype)
        y, mean, var = _normalize_batch(x, scale, bias, self.epsilon, self.relu)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(dtype)
