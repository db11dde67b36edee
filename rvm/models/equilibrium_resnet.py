"""A ResNet level whose weight-tied block runs to its fixed point (`rvm.models.equilibrium`).

A raw-shared level iterates one pair of conv kernels `n` times; an equilibrium level
iterates its one block until the output stops changing. The level keeps its padding
block (a plain ResNet block with BatchNorm, run once); its input x after that block is
injected at every iteration of the cell

    f(z, x) = relu(norm3(z + norm2(conv2(relu(norm1(conv1(z))))) + x)),   z_0 = x,

whose norms (GroupNorm, LayerNorm or none) mean the same at every iteration. The final
norm bounds f's output, which keeps the iteration from running away. Its parameters are
two 3x3 kernels and biases plus three norms' scales and offsets, against the raw-shared
level's two kernels plus per-block biases and BatchNorm (`experiments.describe` prints
both counts). Stochastic depth does not apply inside the fixed point, nor to the padding
block of an equilibrium level (its drop would have to be scaled at evaluation).

The level sows its solver `Stats` (and the Jacobian penalty when training with it) into
the `solver` collection, which the image task reads into the step's metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvm.models.conv import Conv3x3
from rvm.models.equilibrium import Equilibrium, Spec, normalization
from rvm.models.resnet import Block

Array = jax.Array


class Cell(nn.Module):
    """f(z, x) of an equilibrium level (module docstring)."""

    features: int
    norm: str = "group"
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, z: Array, x: Array) -> Array:
        y = Conv3x3(self.features, impl=self.conv_impl, name="conv1")(z)
        y = nn.relu(normalization(self.norm, self.features, "norm1")(y))
        y = Conv3x3(self.features, impl=self.conv_impl, name="conv2")(y)
        y = normalization(self.norm, self.features, "norm2")(y)
        return nn.relu(normalization(self.norm, self.features, "norm3")(z + y + x))


class EquilibriumLevel(nn.Module):
    """A padding block (if `downsample`), then one cell solved to its fixed point.

    `iterations` (evaluation): run exactly that many solver iterations (error against
    solver iterations, the readout-time ablation of an equilibrium level).
    Returns (x, (level input, outputs)) like `rvm.models.resnet.Level`; with
    `keep_activations` the outputs are the path of the recurrence towards its fixed point,
    the plain iterates f(z, x), ..., f^T(z, x) from z = x (T the solver's maximum or
    `iterations`), then the solver's answer [T + 1, B, H, W, C]; otherwise None.
    """

    features: int
    downsample: bool
    spec: Spec
    dtype: Any = jnp.float32
    conv_impl: str = "xla"
    keep_activations: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool, iterations: int | None = None):
        if self.downsample:
            x = Block(self.features, 2, self.dtype, self.conv_impl, name="pad")(x, train)
        inputs = x
        solver = self.spec.solver
        if iterations is not None:  # exactly `iterations` f-evaluations
            solver = dataclasses.replace(solver, max_iter=int(iterations), tol=1e-30)
        key = None
        if train and self.spec.jacobian_weight > 0 and not self.is_initializing():
            key = self.make_rng("dropout")
        cell = Cell(self.features, self.spec.norm, self.conv_impl, name="cell")
        layer = Equilibrium(
            cell, self.spec.solver, self.spec.backward, self.spec.jacobian_samples, name="deq"
        )
        x32 = x.astype(jnp.float32)
        z, stats, penalty = layer(x32, x32, key, solver)
        path = None
        if not self.is_initializing():
            self.sow("solver", "stats", stats)
            if penalty is not None:
                self.sow("solver", "jacobian", penalty)
            if self.keep_activations:
                module, variables = cell.unbind()
                f = lambda z, _: (module.apply(variables, z, x32),) * 2
                iterates = jax.lax.scan(f, x32, None, length=solver.max_iter)[1]
                path = jnp.concatenate([iterates, z[None]]).astype(self.dtype)
        return z.astype(self.dtype), (inputs, path)
