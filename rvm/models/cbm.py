"""Context Bridge Module (Pang et al., CVPR 2019), deep recurrent stacks and their heads.

A CBM layer splits what flows up the stack from what flows along time:
    R = ReLU(BN(conv(x_below)))                      representation unit, no recurrence
    T = sigmoid(BN(conv([x_below, c_prev])))         temporal unit (channel concat)
    x = merge(R, T),  c = T                          "product" R . T as published
A stride-2 layer computes T at its input resolution (so c_prev concatenates with
x_below) and max-pools T (3x3, stride 2) to R's size before the merge. Temporal Dropout cuts,
per layer and time step with probability `td_rate`, the gradient of x_below as it
enters T (`stop_gradient`; the forward pass is unchanged), so the temporal flow
cannot co-adapt with the representation flow through that path.

`CBMStack` and `ConvRNNStack` are themselves recurrent cells (one time step through
every layer, carry = tuple of layer carries) built from the same width schedule,
with a residual shortcut every two layers in both, so the cell is the only
difference when comparing them at equal depth or equal parameter count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvm.models.conv import SameConv
from rvm.models.recurrent import (
    Carry,
    ConvCellBase,
    ConvElmanCell,
    ConvGRUCell,
    ConvLSTMCell,
    run_sequence,
    scan_variables,
)

Array = jax.Array
MERGES = ("product", "add", "concat")
RNN_CELLS = {"lstm": ConvLSTMCell, "gru": ConvGRUCell, "elman": ConvElmanCell}


class CBMCarry(NamedTuple):
    t: Array  # int32 scalar: steps since the state was reset
    c: Array  # the previous temporal unit, at the layer's input resolution


class CBMCell(ConvCellBase):
    """One Context Bridge Module layer; see the module docstring for the equations.

    `merge`: "product" (R . T), "add" (R + T) or "concat" (1x1 conv of [R, T]).
    `td_rate`: Temporal Dropout probability, active only when training (needs a
    'dropout' rng). Convolutions carry a bias only when `norm == "none"`.
    """

    norm: str = "batch"
    merge: str = "product"
    td_rate: float = 0.0

    @nn.compact
    def __call__(
        self, carry: CBMCarry, x: Array, *, train: bool | None = None, update_stats=True
    ) -> tuple[CBMCarry, Array]:
        train = bool(nn.merge_param("train", self.train, train))
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        t, c = carry
        f, s, bias = self.features, self.strides, self.norm == "none"
        r = self._conv(f, s, "r_conv", use_bias=bias)(x)
        r = nn.relu(self._norm(r, t, "r_bn", train, update_stats))
        x_t = x
        if train and self.td_rate > 0.0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.td_rate)
            x_t = jnp.where(drop, jax.lax.stop_gradient(x), x)
        tu = self._conv(f, 1, "t_conv", use_bias=bias)(jnp.concatenate([x_t, c], axis=-1))
        tu = jax.nn.sigmoid(self._norm(tu, t, "t_bn", train, update_stats))
        if s > 1:
            # the authors' choice: 3x3 max pooling, padding 1 (for stride 2, ceil(H / 2) like R)
            tp = nn.max_pool(tu, (3, 3), (s, s), padding=((1, 1), (1, 1)))
        else:
            tp = tu
        if self.merge == "product":
            y = r * tp
        elif self.merge == "add":
            y = r + tp
        else:
            y = SameConv(f, (1, 1), name="merge")(jnp.concatenate([r, tp], -1))
        return CBMCarry(t + 1, tu), y

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> CBMCarry:
        *batch, height, width, _ = input_shape
        c = jnp.zeros((*batch, height, width, self.features))
        return CBMCarry(jnp.zeros((), jnp.int32), c)


class _ConvStack(nn.RNNCellBase):
    """A per-frame stem conv, then `len(widths)` recurrent layers, one time step per call.

    Residual shortcut around every pair of layers (identity, or a strided 1x1 conv
    when the shape changes); an odd last layer has none.
    """

    widths: Sequence[int]
    strides: Sequence[int] | None = None  # default: all 1
    kernel_size: int = 3
    stem_features: int | None = 16  # None: no stem
    stem_strides: int = 2
    norm: str = "none"
    num_steps: int = 64
    residual: bool = True

    def _cell(self, i: int, **kw: Any) -> nn.RNNCellBase:
        raise NotImplementedError

    def _layer_strides(self) -> tuple[int, ...]:
        strides = tuple(self.strides) if self.strides is not None else (1,) * len(self.widths)
        if len(strides) != len(self.widths):
            raise ValueError("strides and widths must have the same length")
        return strides

    @nn.compact
    def __call__(
        self, carry: tuple, x: Array, *, train: bool = False, update_stats=True
    ) -> tuple[tuple, Array]:
        if self.stem_features is not None:
            s = self.stem_strides
            stem = SameConv(self.stem_features, (3, 3), s, name="stem")
            x = nn.relu(stem(x))
        if len(carry) != len(self.widths):
            raise ValueError(f"a carry of {len(carry)} layers for {len(self.widths)} widths")
        layer_strides = self._layer_strides()
        new_carry, block_in = [], x
        for i, layer_carry in enumerate(carry):
            layer_carry, x = self._cell(i, name=f"layer_{i}")(
                layer_carry, x, train=train, update_stats=update_stats
            )
            new_carry.append(layer_carry)
            if self.residual and i % 2 == 1:
                if block_in.shape != x.shape:
                    # 'SAME' strides round up, twice as once by their product.
                    s = layer_strides[i - 1] * layer_strides[i]
                    proj = SameConv(x.shape[-1], (1, 1), s, name=f"shortcut_{i}")
                    block_in = proj(block_in)
                x = x + block_in
                block_in = x
        return tuple(new_carry), x

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> tuple:
        *batch, height, width, channels = input_shape
        if self.stem_features is not None:
            height, width = -(-height // self.stem_strides), -(-width // self.stem_strides)
            channels = self.stem_features
        carry = []
        for i, s in enumerate(self._layer_strides()):
            carry.append(
                self._cell(i, parent=None).initialize_carry(rng, (*batch, height, width, channels))
            )
            height, width, channels = -(-height // s), -(-width // s), self.widths[i]
        return tuple(carry)

    @property
    def num_feature_axes(self) -> int:
        return 3


class CBMStack(_ConvStack):
    """Stacked CBM layers (norm "batch" by default, as published)."""

    norm: str = "batch"
    merge: str = "product"
    td_rate: float = 0.0

    def _cell(self, i: int, **kw: Any) -> nn.RNNCellBase:
        return CBMCell(
            features=self.widths[i],
            kernel_size=self.kernel_size,
            strides=self._layer_strides()[i],
            norm=self.norm,
            num_steps=self.num_steps,
            merge=self.merge,
            td_rate=self.td_rate,
            **kw,
        )


class ConvRNNStack(_ConvStack):
    """Stacked ConvLSTM / ConvGRU / ConvElman layers (`cell` in RNN_CELLS)."""

    cell: str = "lstm"

    def _cell(self, i: int, **kw: Any) -> nn.RNNCellBase:
        if self.cell not in RNN_CELLS:
            raise ValueError(f"cell must be one of {tuple(RNN_CELLS)}, got {self.cell!r}")
        return RNN_CELLS[self.cell](
            features=self.widths[i],
            kernel_size=self.kernel_size,
            strides=self._layer_strides()[i],
            norm=self.norm,
            num_steps=self.num_steps,
            **kw,
        )


def width_schedule(
    depth: int, base_width: int, num_stages: int = 3
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(widths, strides): `depth` layers in up to `num_stages` stages, width doubling
    and stride 2 at the first layer of every stage after the first."""
    if depth < 1:
        raise ValueError("depth must be >= 1")
    stages = min(num_stages, depth)
    stage = [i * stages // depth for i in range(depth)]
    widths = tuple(base_width * 2**k for k in stage)
    strides = tuple(2 if i > 0 and stage[i] != stage[i - 1] else 1 for i in range(depth))
    return widths, strides


def make_stack(
    kind: str, depth: int, base_width: int, *, num_stages: int = 3, **kwargs: Any
) -> CBMStack | ConvRNNStack:
    """A stack on `width_schedule(depth, base_width, num_stages)`; kind "cbm" or a RNN_CELLS key.

    The stem width follows `base_width` unless `stem_features` is given, so that
    width matching scales the whole network.
    """
    widths, strides = width_schedule(depth, base_width, num_stages)
    kwargs.setdefault("stem_features", base_width)
    if kind == "cbm":
        return CBMStack(widths=widths, strides=strides, **kwargs)
    return ConvRNNStack(widths=widths, strides=strides, cell=kind, **kwargs)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or shape structs)."""
    return int(sum(np.prod(p.shape, dtype=np.int64) for p in jax.tree_util.tree_leaves(params)))


def stack_param_count(stack: nn.RNNCellBase, frame_shape: tuple[int, int, int]) -> int:
    """Parameters of a stack for frames of shape (H, W, C), without running it."""
    x = jnp.zeros((1, *frame_shape))
    carry = stack.initialize_carry(jax.random.key(0), x.shape)
    shapes = jax.eval_shape(lambda: stack.init(jax.random.key(0), carry, x))
    return count_params(shapes["params"])


def match_width(
    target_params: int,
    kind: str,
    depth: int,
    frame_shape: tuple[int, int, int],
    *,
    num_stages: int = 3,
    max_width: int = 1024,
    **kwargs: Any,
) -> int:
    """Base width whose `kind` stack has the parameter count closest to `target_params`.

    The count grows with the width, so a bisection finds the first width at or
    above the target; the answer is it or its predecessor.
    """

    def count(w: int) -> int:
        return stack_param_count(
            make_stack(kind, depth, w, num_stages=num_stages, **kwargs), frame_shape
        )

    lo, hi = 1, max_width
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) < target_params:
            lo = mid + 1
        else:
            hi = mid
    if lo > 1 and abs(count(lo - 1) - target_params) <= abs(count(lo) - target_params):
        return lo - 1
    return lo


def match_convlstm_width(
    depth: int,
    cbm_base_width: int,
    frame_shape: tuple[int, int, int],
    *,
    num_stages: int = 3,
    cbm_kwargs: dict | None = None,
    lstm_kwargs: dict | None = None,
) -> int:
    """ConvLSTM base width giving the parameter count of the CBM stack of that depth."""
    cbm = make_stack("cbm", depth, cbm_base_width, num_stages=num_stages, **(cbm_kwargs or {}))
    target = stack_param_count(cbm, frame_shape)
    return match_width(
        target, "lstm", depth, frame_shape, num_stages=num_stages, **(lstm_kwargs or {})
    )


class SequenceOutput(NamedTuple):
    logits: Array  # [B, T, num_classes]
    carry: Carry  # state after the last frame
    snapshot: Carry | None  # state before frame `snapshot_at`, when asked for


class VideoClassifier(nn.Module):
    """Per-frame class logits from a recurrent stack: global average pool + dense.

    Logits for every frame (not just the last) give the per-frame class
    probabilities that the overlap coherence loss compares.
    """

    stack: nn.RNNCellBase
    num_classes: int

    @nn.nowrap
    def initialize_carry(self, frame_shape: tuple[int, ...]) -> Carry:
        """Zero state for frames of shape (B, H, W, C)."""
        return self.stack.initialize_carry(jax.random.key(0), tuple(frame_shape))

    @nn.compact
    def __call__(
        self,
        frames: Array,
        *,
        train: bool = False,
        carry: Carry | None = None,
        valid: Array | None = None,
        snapshot_at: int | Array | None = None,
    ) -> SequenceOutput:
        if carry is None:
            carry = self.initialize_carry((frames.shape[0], *frames.shape[2:]))
        final, snap, feats = run_sequence(
            self.stack, carry, frames, train=train, valid=valid, snapshot_at=snapshot_at
        )
        logits = nn.Dense(self.num_classes, name="head")(feats.mean(axis=(2, 3)))
        return SequenceOutput(logits, final, snap)


class FrameDecoder(nn.Module):
    """Top feature map -> frame logits: doublings up to (H, W), then a 3x3 conv.

    Each doubling is a resize-convolution (nearest-neighbour x2, 3x3 conv, ReLU;
    Odena et al. 2016, "Deconvolution and checkerboard artifacts") rather than a
    transposed convolution, whose gradient inside the predictor's scan over time
    falls on a very slow path of XLA:CPU (`rvm.models.conv`).
    """

    features: int = 32
    out_channels: int = 1

    @nn.compact
    def __call__(self, y: Array, height: int, width: int) -> Array:
        i = 0
        while y.shape[1] < height:
            y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)
            y = nn.relu(SameConv(self.features, (3, 3), name=f"up_{i}")(y))
            i += 1
        if y.shape[1:3] != (height, width):
            raise ValueError(f"cannot decode {y.shape[1:3]} to {(height, width)} by doubling")
        return SameConv(self.out_channels, (3, 3), name="out")(y)


class PredictionOutput(NamedTuple):
    logits: Array  # [B, num_future, H, W, C] pre-sigmoid, for a stable cross-entropy
    frames: Array  # sigmoid(logits), pixels in [0, 1]


class FramePredictor(nn.Module):
    """Encoder-predictor (Srivastava et al. 2015; Shi et al. 2015) for future frames.

    The encoder reads the input frames; the predictor, a stack of the same shape
    with its own weights, starts from the encoder's final state and receives its
    own previous prediction as input (the last observed frame first), so the
    representation flow of a CBM predictor is never fed zeros. Gradients flow
    through the fed-back predictions.
    """

    encoder: nn.RNNCellBase
    predictor: nn.RNNCellBase
    num_future: int = 10
    decoder_features: int = 32

    def setup(self) -> None:
        self.decoder = FrameDecoder(self.decoder_features)

    def __call__(self, inputs: Array, *, train: bool = False) -> PredictionOutput:
        """inputs: [B, T_in, H, W, C] in [0, 1]."""
        b, _, height, width, channels = inputs.shape
        carry = self.encoder.initialize_carry(jax.random.key(0), (b, height, width, channels))
        carry, _, _ = run_sequence(self.encoder, carry, inputs, train=train)

        def step(mdl: FramePredictor, state: tuple, _: None) -> tuple[tuple, Array]:
            carry, prev = state
            carry, y = mdl.predictor(carry, prev, train=train)
            logits = mdl.decoder(y, height, width)
            return (carry, jax.nn.sigmoid(logits)), logits

        state = (carry, inputs[:, -1])
        if self.is_initializing():
            step(self, state, None)  # carried BatchNorm statistics must exist before the loop
        scan = nn.scan(
            step,
            split_rngs={"params": False, "dropout": True},
            length=self.num_future,
            **scan_variables(self),
        )
        _, logits = scan(self, state, None)
        logits = jnp.moveaxis(logits, 0, 1)
        return PredictionOutput(logits, jax.nn.sigmoid(logits))


def frame_predictor(
    kind: str, depth: int, base_width: int, *, num_future: int = 10, **kwargs: Any
) -> FramePredictor:
    """Encoder and predictor stacks of the same schedule, for `FramePredictor`."""
    return FramePredictor(
        encoder=make_stack(kind, depth, base_width, **kwargs),
        predictor=make_stack(kind, depth, base_width, **kwargs),
        num_future=num_future,
    )
