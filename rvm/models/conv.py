"""A 3x3 convolution (zero padding 1) whose backward pass stays fast inside `nn.scan` on XLA:CPU.

Under a while loop XLA:CPU leaves the transposed convolutions that autodiff emits
for a conv's backward pass in non-canonical layouts, and they fall onto the
generic convolution path: a scanned ResNet trained 20-40x slower than the same
network unrolled. The custom VJP here emits only canonical NHWC/HWIO convolutions,
which XLA:CPU lowers well anywhere: the input gradient is a forward convolution of
the output gradient with the flipped, transposed kernel, and the kernel gradient
the convolution autodiff would emit, with explicit transposes that pin its layout.

Why not the kernel gradient as one im2col matrix product ([N*H*W, 9*C_in]^T @ g)?
Measured on the 2-core XLA:CPU (ResNet-like scanned stack, 16 channels, 32x32,
batch 128, one SGD step): building the nine shifted copies costs more than the
product. CPU seconds per step: this convolution 1.2-1.5, im2col 1.6, im2col laid
out C_in-major (so the product maps to the fast GEMM) 1.4-1.5, im2col through
`lax.conv_general_dilated_patches` 2.9; plain autodiff ~47 (bench/conv_scan.py
times this one against nn.Conv).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_DIMS = ("NHWC", "HWIO", "NHWC")


def _pads(size: int, strides: int) -> tuple[int, int]:
    """One zero row/column on each side, as Torch's `padding=1` in Huang et al.'s network.

    For stride 1 this is 'SAME'; for stride 2 on an even size lax's 'SAME' would pad
    only at the end and sample a grid shifted by one pixel from Huang et al.'s.
    """
    del size, strides
    return 1, 1


def _conv(x: Array, kernel: Array, strides: int) -> Array:
    pads = [_pads(x.shape[1], strides), _pads(x.shape[2], strides)]
    return lax.conv_general_dilated(x, kernel, (strides, strides), pads, dimension_numbers=_DIMS)


# Stride 2 takes the same VJP rather than plain autodiff: outside a scan both compile
# to the same ops (44 vs 47 CPU ms for forward + backward, 128x32x32x16 -> 32 channels),
# and inside one only this VJP avoids the slow path.
@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x: Array, kernel: Array, strides: int) -> Array:
    return _conv(x, kernel, strides)


def _fwd(x: Array, kernel: Array, strides: int) -> tuple[Array, tuple[Array, Array]]:
    return _conv(x, kernel, strides), (x, kernel)


def _bwd(strides: int, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = res
    h, w = x.shape[1:3]
    ho, wo = g.shape[1:3]
    (hlo, _), (wlo, _) = _pads(h, strides), _pads(w, strides)

    # Input gradient: correlate the (stride-dilated) output gradient with the flipped
    # kernel, its in/out axes swapped. The padding (possibly negative) crops the
    # result back from the padded input's extent to the input's.
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    pads = [
        (2 - hlo, h + hlo - strides * (ho - 1) - 1),
        (2 - wlo, w + wlo - strides * (wo - 1) - 1),
    ]
    dx = lax.conv_general_dilated(
        g, flipped, (1, 1), pads, lhs_dilation=(strides, strides), dimension_numbers=_DIMS
    )

    # Kernel gradient: also a convolution, with N as the contracted feature axis, C_in
    # as the batch and g as a (stride-dilated) H x W window. The transposes make that
    # the canonical NHWC/HWIO form that XLA:CPU hands to its fast library; autodiff
    # emits the same conv with permuted dimension labels, which a while loop keeps.
    dk = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),
        g.transpose(1, 2, 0, 3),
        (1, 1),
        # High pads trimmed to the rows/columns the strided windows reach (a 3x3 result).
        [(hlo, strides * (ho - 1) + 3 - h - hlo), (wlo, strides * (wo - 1) + 3 - w - wlo)],
        rhs_dilation=(strides, strides),
        dimension_numbers=_DIMS,
        preferred_element_type=jnp.float32,
    ).transpose(1, 2, 0, 3)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv3x3.defvjp(_fwd, _bwd)


def conv3x3(x: Array, kernel: Array, strides: int = 1) -> Array:
    """3x3 convolution (zero padding 1) of NHWC `x` with an HWIO `kernel`, with a fast VJP.

    Numerically the same as `nn.Conv(features, (3, 3), strides, padding=1)` without
    bias. `kernel` can be any array, e.g. one shared kernel broadcast into every
    iteration of an `nn.scan`; its gradient is summed over iterations by the scan's
    transpose as usual.
    """
    if kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel {kernel.shape} is not (3, 3, {x.shape[-1]}, Cout)")
    return _conv3x3(x, kernel, int(strides))


class Conv3x3(nn.Module):
    """Drop-in for `nn.Conv(features, (3, 3), strides, padding=1)` built on `conv3x3`.

    Its params are named `kernel` (3, 3, Cin, Cout) and `bias` (Cout,) as in
    `nn.Conv`. A caller may pass the kernel instead (one kernel shared by every
    iteration of a scan); the module then owns only its bias.
    """

    features: int
    strides: int = 1
    use_bias: bool = True
    # He initialisation with fan-out, as in Huang et al.'s Torch code.
    kernel_init: Callable[..., Array] = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    bias_init: Callable[..., Array] = nn.initializers.zeros
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, kernel: Array | None = None) -> Array:
        if kernel is None:
            kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv3x3(x, kernel, self.strides)
        return y if bias is None else y + bias
