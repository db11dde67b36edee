"""Convolutions whose backward pass stays fast inside `nn.scan` on XLA:CPU.

Under a while loop XLA:CPU leaves the transposed convolutions that autodiff emits
for a conv's backward pass in non-canonical layouts, and they fall onto the
generic convolution path: a scanned ResNet trained 20-40x slower than the same
network unrolled. The custom VJP here emits only canonical NHWC/HWIO convolutions,
which XLA:CPU lowers well anywhere: the input gradient is a forward convolution of
the output gradient with the flipped, transposed kernel, and the kernel gradient
the convolution autodiff would emit, with explicit transposes that pin its layout.
Only XLA:CPU gets that form (`lax.platform_dependent`, resolved when the function
is lowered): on a GPU or TPU the backward pass is JAX's own, the form their
compilers turn into their libraries' backward convolutions (cuDNN's on a GPU).

Why not the kernel gradient as one im2col matrix product ([N*H*W, 9*C_in]^T @ g)?
Measured on the 2-core XLA:CPU (ResNet-like scanned stack, 16 channels, 32x32,
batch 128, one SGD step): building the nine shifted copies costs more than the
product. CPU seconds per step: this convolution 1.2-1.5, im2col 1.6, im2col laid
out C_in-major (so the product maps to the fast GEMM) 1.4-1.5, im2col through
`lax.conv_general_dilated_patches` 2.9; plain autodiff ~47 (bench/conv_scan.py
times this one against nn.Conv).

Which library runs the convolutions is XLA:CPU's choice; `rvm.train.xla` compiles
rvm's jits so that it picks its own (Eigen) path over YNNPACK, faster for these shapes.

`gemm3x3` computes the same 3x3 convolution as one matrix product of the nine shifted
copies of the input (im2col) with the kernel, differentiated by plain autodiff. It is
for packed runs (`rvm.train.pack`) on a GPU: vmapped over K kernels, XLA's convolution
becomes one grouped convolution, which GPU libraries run slowly, while the product
becomes one batched matrix product (the GPU plan's `vmap gemm` packs measure it). On
the CPU it loses: two vmapped (3,4,4) runs trained at 0.54x one run's
images/s with it, 0.69x with grouped convolutions (`bench/results/cpu_packed.md`).
`kernel_gemm` keeps XLA's convolutions for the forward pass and the input gradient
and computes only the kernel gradient as a product (patches^T @ output gradient): the
backward convolution a vmap turns into its slowest form (a batch-grouped one) is then a
batched matrix product, and no patches are kept from the forward pass.
`Conv3x3(impl=...)` picks one of `CONV_IMPLS`.

`Conv3x3` (zero padding 1, as Torch's `padding=1`) serves the ResNets; `SameConv`,
any kernel size with 'SAME' padding, serves the recurrent cells, which run inside
a scan over time (a 4-layer CBM step on 20 frames: ~27 s with `nn.Conv`).
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
Pads = tuple[tuple[int, int], tuple[int, int]]
TORCH_PADS: Pads = ((1, 1), (1, 1))  # one zero row/column on each side, as Huang et al.
# How Conv3x3 computes: conv3x3; gemm3x3; conv3x3 with the kernel gradient as a product.
CONV_IMPLS = ("xla", "gemm", "kernel_gemm")


def same_pads(size: tuple[int, int], kernel: tuple[int, int], strides: int) -> Pads:
    """XLA's 'SAME' padding: ceil(size / strides) outputs, any odd extra row at the end.

    For a 3x3 kernel at stride 2 on an even size it pads only at the end, sampling a
    grid shifted by one pixel from TORCH_PADS'.
    """

    def one(n: int, k: int) -> tuple[int, int]:
        total = max((-(-n // strides) - 1) * strides + k - n, 0)
        return total // 2, total - total // 2

    return one(size[0], kernel[0]), one(size[1], kernel[1])


def _conv(x: Array, kernel: Array, strides: int, pads: Pads) -> Array:
    return lax.conv_general_dilated(x, kernel, (strides, strides), pads, dimension_numbers=_DIMS)


# Stride 2 takes the same VJP rather than plain autodiff: outside a scan both compile
# to the same ops (44 vs 47 CPU ms for forward + backward, 128x32x32x16 -> 32 channels),
# and inside one only this VJP avoids the slow path.
# `kernel_grad` "gemm" computes the kernel gradient as a matrix product (`kernel_gemm`).
@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x: Array, kernel: Array, strides: int, pads: Pads, kernel_grad: str) -> Array:
    return _conv(x, kernel, strides, pads)


def _fwd(
    x: Array, kernel: Array, strides: int, pads: Pads, kernel_grad: str
) -> tuple[Array, tuple[Array, Array]]:
    return _conv(x, kernel, strides, pads), (x, kernel)


def _bwd(
    strides: int, pads: Pads, kernel_grad: str, res: tuple[Array, Array], g: Array
) -> tuple[Array, Array]:
    dx, dk = lax.platform_dependent(
        *res,
        g,
        cpu=partial(_canonical_bwd, strides, pads),
        default=partial(_autodiff_bwd, strides, pads),
    )
    if kernel_grad == "gemm":  # the convolution's dk above has no use left: XLA drops it
        x, kernel = res
        patches = _patches(x, kernel.shape[:2], strides, pads)
        dk = jnp.einsum(
            "nhwp,nhwo->po",
            patches,
            g,
            preferred_element_type=jnp.promote_types(x.dtype, jnp.float32),
        )
        dk = dk.reshape(kernel.shape).astype(kernel.dtype)
    return dx, dk


def _autodiff_bwd(
    strides: int, pads: Pads, x: Array, kernel: Array, g: Array
) -> tuple[Array, Array]:
    return jax.vjp(lambda x, kernel: _conv(x, kernel, strides, pads), x, kernel)[1](g)


def _canonical_bwd(
    strides: int, pads: Pads, x: Array, kernel: Array, g: Array
) -> tuple[Array, Array]:
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    ho, wo = g.shape[1:3]
    (hlo, _), (wlo, _) = pads

    # Input gradient: correlate the (stride-dilated) output gradient with the flipped
    # kernel, its in/out axes swapped. The padding (possibly negative) crops the
    # result back from the padded input's extent to the input's.
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    dx_pads = [
        (kh - 1 - hlo, h + hlo - strides * (ho - 1) - 1),
        (kw - 1 - wlo, w + wlo - strides * (wo - 1) - 1),
    ]
    dx = lax.conv_general_dilated(
        g, flipped, (1, 1), dx_pads, lhs_dilation=(strides, strides), dimension_numbers=_DIMS
    )

    # Kernel gradient: also a convolution, with N as the contracted feature axis, C_in
    # as the batch and g as a (stride-dilated) H x W window. The transposes make that
    # the canonical NHWC/HWIO form that XLA:CPU hands to its fast library; autodiff
    # emits the same conv with permuted dimension labels, which a while loop keeps.
    dk = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),
        g.transpose(1, 2, 0, 3),
        (1, 1),
        # High pads trimmed to the rows/columns the strided windows reach (a kh x kw result).
        [(hlo, strides * (ho - 1) + kh - h - hlo), (wlo, strides * (wo - 1) + kw - w - wlo)],
        rhs_dilation=(strides, strides),
        dimension_numbers=_DIMS,
        preferred_element_type=jnp.promote_types(x.dtype, jnp.float32),
    ).transpose(1, 2, 0, 3)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv2d.defvjp(_fwd, _bwd)


def conv2d(x: Array, kernel: Array, strides: int = 1, pads: Pads | None = None) -> Array:
    """Convolution of NHWC `x` with an HWIO `kernel` (any size), with a fast VJP.

    `pads` ((top, bottom), (left, right)) defaults to 'SAME' (`same_pads`).
    """
    if kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel {kernel.shape} does not take {x.shape[-1]} input channels")
    if pads is None:
        pads = same_pads(x.shape[1:3], kernel.shape[:2], int(strides))
    pads = tuple(tuple(int(p) for p in pair) for pair in pads)
    return _conv2d(x, kernel, int(strides), pads, "conv")


def _check_3x3(x: Array, kernel: Array) -> None:
    if kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel {kernel.shape} is not (3, 3, {x.shape[-1]}, Cout)")


def conv3x3(x: Array, kernel: Array, strides: int = 1, kernel_grad: str = "conv") -> Array:
    """3x3 convolution (zero padding 1) of NHWC `x` with an HWIO `kernel`, with a fast VJP.

    Numerically the same as `nn.Conv(features, (3, 3), strides, padding=1)` without
    bias. `kernel` can be any array, e.g. one shared kernel broadcast into every
    iteration of an `nn.scan`; its gradient is summed over iterations by the scan's
    transpose as usual. `kernel_grad="gemm"` computes that gradient as a matrix product.
    """
    _check_3x3(x, kernel)
    return _conv2d(x, kernel, int(strides), TORCH_PADS, kernel_grad)


def _patches(x: Array, kernel_size: tuple[int, int], strides: int, pads: Pads) -> Array:
    """[N, Ho, Wo, kh*kw*C_in]: the kernel's shifted (strided) views of the padded input,
    concatenated in the kernel's HWI order, so an HWIO kernel reshapes into the matrix."""
    kh, kw = kernel_size
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho = (padded.shape[1] - kh) // strides + 1
    wo = (padded.shape[2] - kw) // strides + 1
    rows, cols = strides * (ho - 1) + 1, strides * (wo - 1) + 1  # a view's strided extent
    views = [
        padded[:, i : i + rows : strides, j : j + cols : strides]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(views, axis=-1)


def gemm3x3(x: Array, kernel: Array, strides: int = 1) -> Array:
    """`conv3x3` as one matrix product: [N*Ho*Wo, 9*C_in] patches times [9*C_in, C_out]."""
    _check_3x3(x, kernel)
    patches = _patches(x, (3, 3), int(strides), TORCH_PADS)
    return jnp.einsum("nhwp,po->nhwo", patches, kernel.reshape(-1, kernel.shape[-1]))


class Conv3x3(nn.Module):
    """Drop-in for `nn.Conv(features, (3, 3), strides, padding=1)` built on `conv3x3`.

    Its params are named `kernel` (3, 3, Cin, Cout) and `bias` (Cout,) as in
    `nn.Conv`. A caller may pass the kernel instead (one kernel shared by every
    iteration of a scan); the module then owns only its bias. `impl` (`CONV_IMPLS`)
    computes it with `conv3x3`, `gemm3x3`, or `conv3x3` with its kernel gradient as a
    matrix product (the last two for packs vmapped on a GPU).
    """

    features: int
    strides: int = 1
    use_bias: bool = True
    impl: str = "xla"
    # He initialisation with fan-out (fb.resnet.torch's); Huang et al.'s code scales by fan-in
    # (nninit.kaiming), which differs only where C_in != C_out: the stem and padding blocks.
    kernel_init: Callable[..., Array] = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    bias_init: Callable[..., Array] = nn.initializers.zeros
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, kernel: Array | None = None) -> Array:
        if kernel is None:
            kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"conv impl {self.impl!r} is not one of {', '.join(CONV_IMPLS)}")
        if self.impl == "gemm":
            y = gemm3x3(x, kernel, self.strides)
        else:
            y = conv3x3(x, kernel, self.strides, "gemm" if self.impl == "kernel_gemm" else "conv")
        return y if bias is None else y + bias


class SameConv(nn.Module):
    """Drop-in for `nn.Conv(features, kernel_size, strides, padding="SAME")` built on `conv2d`.

    Same parameter names, shapes and default initialisers as `nn.Conv`, so a model
    switching to it initialises to the same values. A one-element `kernel_size`
    convolves sequences [B, L, C] (run as images one row high).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    use_bias: bool = True
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Array] = nn.initializers.zeros
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if len(self.kernel_size) not in (1, 2):
            raise ValueError(f"kernel_size={self.kernel_size!r} must have 1 or 2 dimensions")
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if len(self.kernel_size) == 1:
            y = conv2d(x[:, None], kernel[None], self.strides)[:, 0]
        else:
            y = conv2d(x, kernel, self.strides)
        return y if bias is None else y + bias
