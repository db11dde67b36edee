"""Convolutional recurrent cells (NHWC) and a scan that runs any cell over time.

Cells follow flax's `nn.RNNCellBase` conventions (`__call__(carry, x) -> (carry, y)`,
`initialize_carry(rng, input_shape)`, `num_feature_axes`), so `nn.RNN` can drive them.

Every carry starts with `t`, the number of steps since the state was reset (a scalar
shared by the batch). It exists for per-time-step BatchNorm (`norm="time"`): the
statistics of a recurrent pre-activation depend on how long the state has been
running (h is exactly zero at t = 0), so each step keeps its own running mean and
variance, rows of a [num_steps, C] table, while scale and bias are shared over time
(Cooijmans et al., "Recurrent Batch Normalization"). Keeping `t` in the carry, not in
the input, means a state handed from one clip to the next keeps indexing the right
rows, and steps past `num_steps` reuse the last row. `norm="batch"` shares one set of
statistics over all steps. BatchNorm statistics must be carried through the time
loop while training. `run_sequence` does this; with `nn.RNN`, initialise with
`variable_broadcast=("params", "batch_stats")` (a scan cannot create a carried
variable) and train with `variable_carry="batch_stats"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvm.models.conv import SameConv

Array = jax.Array
Carry = Any
NORMS = ("none", "batch", "time")


class HiddenCarry(NamedTuple):
    t: Array  # int32 scalar: steps since the state was reset
    h: Array


class LSTMCarry(NamedTuple):
    t: Array
    c: Array
    h: Array


def _pair(k: int | Sequence[int]) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))


def _out_size(n: int, stride: int) -> int:
    return -(-n // stride)  # 'SAME' padding: ceil(n / stride)


class StepBatchNorm(nn.Module):
    """BatchNorm whose running statistics are optionally indexed by the time step.

    With `num_steps=None` the statistics have shape [C]; otherwise [num_steps, C] and
    step `t` reads and updates row min(t, num_steps - 1). Scale and bias are [C]
    either way. `update_stats` (a traced bool is fine) lets a caller skip the
    running-average update for padding frames.
    """

    num_steps: int | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    scale_init: nn.initializers.Initializer = nn.initializers.ones

    @nn.compact
    def __call__(
        self, x: Array, t: Array, *, train: bool, update_stats: bool | Array = True
    ) -> Array:
        c = x.shape[-1]
        shape = (c,) if self.num_steps is None else (self.num_steps, c)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        row = None if self.num_steps is None else jnp.clip(t, 0, self.num_steps - 1)

        def read(v: Array) -> Array:
            return v if row is None else v[row]

        def write(v: nn.Variable, new: Array) -> None:
            upd = self.momentum * read(v.value) + (1.0 - self.momentum) * new
            upd = jnp.where(update_stats, upd, read(v.value))
            v.value = upd if row is None else v.value.at[row].set(upd)

        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            if not self.is_initializing():
                write(ra_mean, jax.lax.stop_gradient(mean))
                write(ra_var, jax.lax.stop_gradient(var))
        else:
            mean, var = read(ra_mean.value), read(ra_var.value)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class ConvCellBase(nn.RNNCellBase):
    """Shared fields and helpers of the convolutional cells.

    `strides` applies to the input convolution only; the state lives at the output
    resolution. `norm` is "none", "batch" (statistics shared over time) or "time"
    (statistics per step, up to `num_steps`). `train` may be set here (for `nn.RNN`)
    or passed to `__call__`, not both.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int = 1
    norm: str = "none"
    num_steps: int = 64
    train: bool | None = None

    def _conv(self, features: int, strides: int, name: str, use_bias: bool = False) -> SameConv:
        # not nn.Conv: its gradient inside a scan over time is very slow on XLA:CPU
        return SameConv(
            features,
            _pair(self.kernel_size),
            strides=strides,
            use_bias=use_bias,
            name=name,
        )

    def _norm(self, x: Array, t: Array, name: str, train: bool, update: bool | Array) -> Array:
        if self.norm == "none":
            return x
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        steps = self.num_steps if self.norm == "time" else None
        return StepBatchNorm(num_steps=steps, name=name)(x, t, train=train, update_stats=update)

    def _state_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        *batch, height, width, _ = input_shape
        s = self.strides
        return (*batch, _out_size(height, s), _out_size(width, s), self.features)

    @property
    def num_feature_axes(self) -> int:
        return 3


class ConvElmanCell(ConvCellBase):
    r"""Convolutional Elman cell, the simplest recurrence, as a baseline.

    h' = tanh(N_x(W_x * x) + N_h(W_h * h) + b), N = identity or BatchNorm (`norm`).
    Carry `HiddenCarry(t, h)`; output h'.
    """

    @nn.compact
    def __call__(
        self, carry: HiddenCarry, x: Array, *, train: bool | None = None, update_stats=True
    ) -> tuple[HiddenCarry, Array]:
        train = bool(nn.merge_param("train", self.train, train))
        t, h = carry
        wx = self._norm(
            self._conv(self.features, self.strides, "ih")(x), t, "bn_x", train, update_stats
        )
        wh = self._norm(self._conv(self.features, 1, "hh")(h), t, "bn_h", train, update_stats)
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        h = jnp.tanh(wx + wh + b)
        return HiddenCarry(t + 1, h), h

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> HiddenCarry:
        return HiddenCarry(jnp.zeros((), jnp.int32), jnp.zeros(self._state_shape(input_shape)))


class ConvGRUCell(ConvCellBase):
    r"""Convolutional GRU (Cho et al. 2014; reset gate applied before the recurrent conv).

    [r, z] = sigmoid(N_x(W_x[r,z] * x) + N_h(W_h[r,z] * h) + b[r,z])
    n      = tanh(N_x(W_xn * x) + N_n(W_hn * (r . h)) + b_n)
    h'     = (1 - z) . h + z . n
    N_x normalises the joint input projection [r, z, n]. Carry `HiddenCarry(t, h)`.
    """

    @nn.compact
    def __call__(
        self, carry: HiddenCarry, x: Array, *, train: bool | None = None, update_stats=True
    ) -> tuple[HiddenCarry, Array]:
        train = bool(nn.merge_param("train", self.train, train))
        t, h = carry
        f = self.features
        wx = self._conv(3 * f, self.strides, "ih")(x)
        wx = self._norm(wx, t, "bn_x", train, update_stats)
        wh = self._norm(self._conv(2 * f, 1, "hh")(h), t, "bn_h", train, update_stats)
        b = self.param("bias", nn.initializers.zeros, (3 * f,))
        r, z = jnp.split(jax.nn.sigmoid(wx[..., : 2 * f] + wh + b[: 2 * f]), 2, axis=-1)
        wn = self._norm(self._conv(f, 1, "hn")(r * h), t, "bn_n", train, update_stats)
        n = jnp.tanh(wx[..., 2 * f :] + wn + b[2 * f :])
        h = (1.0 - z) * h + z * n
        return HiddenCarry(t + 1, h), h

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> HiddenCarry:
        return HiddenCarry(jnp.zeros((), jnp.int32), jnp.zeros(self._state_shape(input_shape)))


def _lstm_bias_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    # forget-gate bias 1 so the memory is kept early in training (Jozefowicz et al. 2015)
    f = shape[0] // 4
    return jnp.zeros(shape, dtype).at[f : 2 * f].set(1.0)


class ConvLSTMCell(ConvCellBase):
    r"""Convolutional LSTM (Shi et al. 2015), gates ordered [i, f, g, o].

    [i, f, g, o] = N_x(W_x * x) + N_h(W_h * h) + b   (b_f initialised to 1)
    i, f, o = sigmoid(i [+ w_ci . c]), sigmoid(f [+ w_cf . c]), sigmoid(o [+ w_co . c'])
    c' = f . c + i . tanh(g)
    h' = o . tanh(N_c(c'))
    Bracketed peephole terms (per-channel weights) only with `peephole=True`; N_c is
    BatchNorm of the memory when `norm != "none"`. Carry `LSTMCarry(t, c, h)`.
    """

    peephole: bool = False

    @nn.compact
    def __call__(
        self, carry: LSTMCarry, x: Array, *, train: bool | None = None, update_stats=True
    ) -> tuple[LSTMCarry, Array]:
        train = bool(nn.merge_param("train", self.train, train))
        t, c, h = carry
        f = self.features
        wx = self._norm(self._conv(4 * f, self.strides, "ih")(x), t, "bn_x", train, update_stats)
        wh = self._norm(self._conv(4 * f, 1, "hh")(h), t, "bn_h", train, update_stats)
        b = self.param("bias", _lstm_bias_init, (4 * f,))
        i, fg, g, o = jnp.split(wx + wh + b, 4, axis=-1)
        if self.peephole:
            peep = self.param("peephole", nn.initializers.zeros, (3, f))
            i, fg = i + peep[0] * c, fg + peep[1] * c
        c = jax.nn.sigmoid(fg) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        if self.peephole:
            o = o + peep[2] * c
        h = jax.nn.sigmoid(o) * jnp.tanh(self._norm(c, t, "bn_c", train, update_stats))
        return LSTMCarry(t + 1, c, h), h

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> LSTMCarry:
        zeros = jnp.zeros(self._state_shape(input_shape))
        return LSTMCarry(jnp.zeros((), jnp.int32), zeros, zeros)


def detach(tree: Any) -> Any:
    """Stop gradients through every leaf: the cut of truncated back-propagation."""
    return jax.tree_util.tree_map(jax.lax.stop_gradient, tree)


def scan_variables(module: nn.Module) -> dict[str, Any]:
    """`nn.scan` variable arguments: params shared over time, BatchNorm statistics
    carried through the loop when they may change and shared otherwise (an
    immutable carried collection would not come back out of the loop)."""
    if module.is_mutable_collection("batch_stats"):
        return {"variable_broadcast": "params", "variable_carry": "batch_stats"}
    return {"variable_broadcast": ["params", "batch_stats"]}


def run_sequence(
    cell: nn.Module,
    carry: Carry,
    inputs: Array,
    *,
    train: bool,
    valid: Array | None = None,
    snapshot_at: int | Array | None = None,
) -> tuple[Carry, Carry | None, Array]:
    """Run `cell` over `inputs` [B, T, ...] inside a compact method; time axis 1.

    Returns (final carry, snapshot, outputs [B, T, ...]). The snapshot is the carry
    *before* frame `snapshot_at` (the state after frames [0, snapshot_at)), with
    `snapshot_at == T` giving the final carry; it may be a traced integer, which is
    what lets clip training hand a mid-clip state to the next clip without dynamic
    shapes. `valid` [T] (bool) marks padding frames whose BatchNorm running averages
    must not move; the cell must accept `update_stats`. Parameters are shared over
    time, BatchNorm statistics are carried, and each step draws its own dropout key.
    """
    steps = inputs.shape[1]
    xs = jnp.moveaxis(inputs, 1, 0)
    valid = jnp.ones((steps,), bool) if valid is None else jnp.asarray(valid, bool)
    at = jnp.asarray(steps if snapshot_at is None else snapshot_at, jnp.int32)
    take = jnp.arange(steps) == at

    def body(mdl: nn.Module, state: tuple, x: tuple) -> tuple[tuple, Array]:
        carry, snap = state
        frame, ok, here = x
        if snapshot_at is not None:  # otherwise no second copy of the state travels along
            snap = jax.tree_util.tree_map(lambda s, c: jnp.where(here, c, s), snap, carry)
        carry, y = mdl(carry, frame, train=train, update_stats=ok)
        return (carry, snap), y

    snap0 = carry if snapshot_at is not None else ()
    if cell.is_initializing():
        # carried variables must exist before the loop, so create them with one step
        body(cell, (carry, snap0), (xs[0], valid[0], take[0]))
    scan = nn.scan(body, split_rngs={"params": False, "dropout": True}, **scan_variables(cell))
    (final, snap), ys = scan(cell, (carry, snap0), (xs, valid, take))
    if snapshot_at is None:
        return final, None, jnp.moveaxis(ys, 0, 1)
    snap = jax.tree_util.tree_map(lambda s, f: jnp.where(at >= steps, f, s), snap, final)
    return final, snap, jnp.moveaxis(ys, 0, 1)
