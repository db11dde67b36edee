"""The CIFAR ResNet of Huang et al. with optional weight sharing between blocks.

A level is a padding block (levels 2 and 3: stride 2, shortcut = 2x2 average
pooling + zero channels) followed by `n` non-padding blocks that run under
`nn.scan`, so the compiled graph holds one block body per level whatever the
depth. Per-block variables (conv biases, BatchNorm scale/bias/statistics, and the
conv kernels unless shared) are stacked along the scan axis. In a raw-shared
level the two conv kernels are parameters of the level and are broadcast to
every iteration, which makes the level a recurrent network with readout time `n`.

Stochastic depth draws one keep/drop per block per mini-batch; at evaluation
the residual is scaled by its survival probability. How training executes the
draws (`nn.cond` per block, masked, or the survivors compacted) is `sd_impl`,
`rvm.models.stochastic_depth`.
Without stochastic depth or a mask the blocks run unconditionally: a cond costs
even when nothing is skipped (for the backward pass XLA keeps, zero-filled, the
residuals of both branches, stacked over the scan).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvm.models.conv import Conv3x3
from rvm.models.norm import BatchNorm
from rvm.models.stochastic_depth import gathered, keep_stats, sd_buckets, sd_impl_for

Array = jax.Array


def death_rates(blocks_per_level: Sequence[int], final_rate: float) -> list[np.ndarray]:
    """Per-level death rates: 0 at the network's first residual block, linear to `final_rate`."""
    total = sum(blocks_per_level)
    rates = final_rate * np.arange(total) / max(total - 1, 1)
    bounds = np.cumsum([0, *blocks_per_level])
    return [rates[a:b].astype(np.float32) for a, b in zip(bounds[:-1], bounds[1:])]


class Residual(nn.Module):
    """The residual branch conv-BN-ReLU-conv-BN; the first BatchNorm carries the ReLU."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv_impl: str = "xla"  # rvm.models.conv.CONV_IMPLS

    @nn.compact
    def __call__(self, x: Array, train: bool, kernels: tuple[Array, Array] | None) -> Array:
        k1, k2 = kernels if kernels is not None else (None, None)
        norm = lambda name, relu=False: BatchNorm(
            not train, momentum=0.9, epsilon=1e-5, relu=relu, dtype=self.dtype, name=name
        )
        y = Conv3x3(
            self.features, self.strides, impl=self.conv_impl, dtype=self.dtype, name="conv1"
        )(x, k1)
        y = norm("bn1", relu=True)(y)
        y = Conv3x3(self.features, impl=self.conv_impl, dtype=self.dtype, name="conv2")(y, k2)
        return norm("bn2")(y)


def shortcut(x: Array, features: int, strides: int) -> Array:
    """Identity, or 2x2 average pooling and zero channels appended (Huang et al.)."""
    if strides == 1 and x.shape[-1] == features:
        return x
    x = nn.avg_pool(x, (strides, strides), (strides, strides))
    return jnp.pad(x, [(0, 0)] * 3 + [(0, features - x.shape[-1])])


class Block(nn.Module):
    """A residual block that runs only where `run` holds; otherwise it is the shortcut.

    `scale` multiplies the residual (the survival probability at evaluation).
    When `run` is traced the block sits under `nn.cond`, so a skipped block does
    no work; with `masked` it always runs and its residual is multiplied by `run`.
    Its output is ReLU(shortcut + scale * residual); inputs are ReLU outputs, so a
    masked block equals the shortcut where it is dropped.
    """

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv_impl: str = "xla"

    def setup(self):
        self.residual = Residual(self.features, self.strides, self.dtype, self.conv_impl)

    def _run(self, x, train, kernels, scale):
        s = shortcut(x, self.features, self.strides)
        r = self.residual(x, train, kernels)
        # A traced scale (survival probabilities are float32) must not promote bfloat16.
        return nn.relu(s + jnp.asarray(scale, r.dtype) * r).astype(self.dtype)

    def _skip(self, x):
        return shortcut(x, self.features, self.strides).astype(self.dtype)

    def __call__(self, x, train: bool, kernels=None, run=True, scale=1.0, masked=False) -> Array:
        if self.is_initializing() or run is True:
            return self._run(x, train, kernels, scale)
        if run is False:
            return self._skip(x)
        if masked:  # the caller keeps a dropped block's statistics (`keep_stats`)
            return self._run(x, train, kernels, jnp.where(run, scale, 0.0))
        return nn.cond(
            run,
            lambda mdl, x, k, s: mdl._run(x, train, k, s),
            lambda mdl, x, k, s: mdl._skip(x),
            self,
            x.astype(self.dtype),
            kernels,
            scale,
        )


class ScanStep(nn.Module):
    """One iteration of a level's scan: the carry is the representation."""

    features: int
    train: bool
    keep_activations: bool
    dtype: Any = jnp.float32
    masked: bool = False
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, step, kernels):
        run, scale = step  # None: every block runs, residual unscaled (static, no cond)
        run = True if run is None else run
        scale = 1.0 if scale is None else scale
        block = keep_stats(Block, run) if self.masked else Block
        x = block(self.features, 1, self.dtype, self.conv_impl, name="block")(
            x, self.train, kernels, run, scale, self.masked
        )
        return x, (x if self.keep_activations else None)


class Level(nn.Module):
    """A padding block (if `downsample`) then `num_blocks` scanned non-padding blocks.

    Args of `__call__`:
      rates: death rates of the level's blocks, padding block first (numpy).
      mask: optional keep-mask over the non-padding blocks (1 runs, 0 identity).
      iterations: evaluation only; run this many non-padding iterations instead
        of `num_blocks`. Iterations past the trained count reuse the last block's
        per-block variables (biases, BatchNorm) and survival probability, so the
        shared recurrence continues with its final normalisation; BatchNorm
        statistics already stacked to `iterations` (`rvm.models.recalibrate`) are
        used as they are, one set per iteration.
    """

    features: int
    num_blocks: int
    downsample: bool
    shared: bool
    keep_activations: bool = False
    unroll: bool = False
    dtype: Any = jnp.float32
    sd_impl: str = "auto"
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool, rates: np.ndarray, mask=None, iterations=None):
        stochastic = train and bool(np.any(rates > 0))
        # How a traced keep/drop runs in training; evaluation masks always branch.
        impl = sd_impl_for(self.sd_impl)
        impl = impl if train and not self.is_initializing() else "cond"
        if self.downsample:
            pad_rate, rates = rates[0], rates[1:]
            run = True
            if stochastic and pad_rate > 0:
                run = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - pad_rate)
            scale = 1.0 if train else 1.0 - float(pad_rate)
            masked = impl != "cond" and run is not True
            block = keep_stats(Block, run) if masked else Block
            x = block(self.features, 2, self.dtype, self.conv_impl, name="pad")(
                x, train, None, run, scale, masked
            )
        inputs = x

        length = self.num_blocks if iterations is None else int(iterations)
        index = np.minimum(np.arange(length), self.num_blocks - 1)
        if length > self.num_blocks and not self.shared:
            raise ValueError(
                f"iterations={length} exceeds the trained {self.num_blocks} blocks; running "
                "more iterations than trained needs a raw-shared (or consolidated) level"
            )
        if train and length != self.num_blocks:
            raise ValueError("iterations can differ from the trained count only at evaluation")

        run = None
        if mask is not None:
            run = jnp.asarray(mask).astype(bool)
            if run.shape != (length,):
                raise ValueError(f"mask has shape {run.shape}, expected ({length},)")
        if stochastic:
            alive = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rates[index])
            run = alive if run is None else run & alive
        scale = None if train or not np.any(rates > 0) else jnp.asarray(1.0 - rates[index])

        kernels = None
        if self.shared:
            shape = lambda cin: (3, 3, cin, self.features)
            kernels = (
                self.param("conv1_kernel", Conv3x3.kernel_init, shape(self.features)),
                self.param("conv2_kernel", Conv3x3.kernel_init, shape(self.features)),
            )

        impl = impl if run is not None else "cond"
        if impl == "compact" and not self.keep_activations:  # stacked outputs need every slot
            return self._compact(x, run, kernels, 1.0 - rates[index]), (inputs, None)

        scan = self._scan(length)
        if length != self.num_blocks:
            # Only statistics can already have the readout length (and then be
            # re-estimated in place, hence mutable): params never grow.
            gather = lambda tree: jax.tree.map(
                lambda v: v if v.shape[0] == length else v[index], tree
            )
            scan = nn.map_variables(scan, "params", trans_in_fn=gather)
            scan = nn.map_variables(scan, "batch_stats", trans_in_fn=gather, mutable=True)
        masked = impl != "cond"
        x, acts = scan(
            self.features,
            train,
            self.keep_activations,
            self.dtype,
            masked,
            self.conv_impl,
            name="blocks",
        )(x, (run, scale), kernels)
        return x, (inputs, acts)

    def _scan(self, length: int):
        return nn.scan(
            ScanStep,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},  # stochastic depth draws outside the scan
            in_axes=(0, nn.broadcast),
            length=length,
            unroll=length if self.unroll else 1,
        )

    def _compact(self, x, run, kernels, survival: np.ndarray) -> Array:
        """Training under `compact`: the survivors, in block order, through the shortest
        bucket's scan that holds them; its spare slots hold dropped blocks, masked."""
        lengths = sd_buckets(survival)
        order = jnp.argsort(~run, stable=True)  # survivors first, each group in block order
        survivors = jnp.sum(run)

        def bucket(length: int):
            def run_bucket(level, x, kernels):
                if length == 0:
                    return x
                slots = order[:length]
                live = jnp.arange(length) < survivors
                scan = gathered(level._scan(length), slots)
                blocks = scan(
                    level.features, True, False, level.dtype, True, level.conv_impl, name="blocks"
                )
                return blocks(x, (live, None), kernels)[0]

            return run_bucket

        which = jnp.searchsorted(jnp.asarray(lengths), survivors)  # the shortest that holds
        return nn.switch(which, [bucket(n) for n in lengths], self, x, kernels)


class ResNet(nn.Module):
    """Three-level CIFAR ResNet; `shared_levels` marks levels with raw-shared kernels.

    `blocks_per_level` counts every residual block of a level, the padding block that
    opens levels 2 and 3 included: (3, 4, 4) has 3 non-padding blocks per level (the
    paper's Table 3), (18, 18, 18) is ResNet-110.

    `__call__` returns logits, or `(logits, activations)` when `keep_activations`
    is set: per level, the level's input (after its padding block) and the
    stacked outputs of its scanned blocks, for trajectory analysis.
    """

    blocks_per_level: tuple[int, ...] = (18, 18, 18)
    shared_levels: tuple[bool, ...] = (False, False, False)
    widths: tuple[int, ...] = (16, 32, 64)
    num_classes: int = 10
    final_death_rate: float = 0.5
    keep_activations: bool = False
    unroll: bool = False  # inline every block (one body per block), for comparisons
    dtype: Any = jnp.float32
    sd_impl: str = "auto"  # how training executes stochastic depth: SD_IMPLS
    conv_impl: str = "xla"  # how convolutions compute: rvm.models.conv.CONV_IMPLS
    # Levels whose one block is solved to its fixed point (rvm.models.equilibrium_resnet),
    # with `equilibrium`, an `rvm.models.equilibrium.Spec`.
    equilibrium_levels: tuple[bool, ...] = (False, False, False)
    equilibrium: Any = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool = False,
        masks: Sequence[Any] | None = None,
        iterations: Sequence[int | None] | None = None,
    ):
        levels = len(self.widths)
        masks = masks if masks is not None else [None] * levels
        iterations = iterations if iterations is not None else [None] * levels
        given = {
            "blocks_per_level": self.blocks_per_level,
            "shared_levels": self.shared_levels,
            "masks": masks,
            "iterations": iterations,
        }
        for name, value in given.items():
            if len(value) != levels:
                raise ValueError(f"{name} has {len(value)} entries for {levels} levels (widths)")
        for n in iterations:
            counts = isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 0
            if n is not None and not counts:
                raise ValueError(f"iterations {tuple(iterations)}: each None or an integer >= 0")
        factor = 2 ** (levels - 1)  # every level after the first halves the map
        if x.shape[-3] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"{x.shape[-3]}x{x.shape[-2]} images: the shortcuts' 2x2 pooling and the strided "
                f"convolutions agree only on sizes divisible by {factor} (CIFAR's 32x32 are)"
            )
        rates = death_rates(self.blocks_per_level, self.final_death_rate)

        x = Conv3x3(self.widths[0], impl=self.conv_impl, dtype=self.dtype, name="stem_conv")(x)
        x = BatchNorm(not train, momentum=0.9, relu=True, dtype=self.dtype, name="stem_bn")(x)
        activations = []
        for i, features in enumerate(self.widths):
            downsample = i > 0
            if self.equilibrium_levels[i]:
                # imported here: the equilibrium level builds on this module's Block
                from rvm.models.equilibrium_resnet import EquilibriumLevel

                x, acts = EquilibriumLevel(
                    features,
                    downsample,
                    self.equilibrium,
                    self.dtype,
                    self.conv_impl,
                    self.keep_activations,
                    name=f"level{i + 1}",
                )(x, train, iterations[i])
                activations.append(acts)
                continue
            x, acts = Level(
                features,
                self.blocks_per_level[i] - int(downsample),
                downsample,
                self.shared_levels[i],
                self.keep_activations,
                self.unroll,
                self.dtype,
                self.sd_impl,
                self.conv_impl,
                name=f"level{i + 1}",
            )(x, train, rates[i], masks[i], iterations[i])
            activations.append(acts)
        x = jnp.mean(x, axis=(1, 2))
        # The head in float32 whatever the model's dtype: logits to full precision.
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)
        return (logits, activations) if self.keep_activations else logits
