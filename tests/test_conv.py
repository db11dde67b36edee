"""`conv3x3` / `Conv3x3` and `conv2d` / `SameConv`: same values and gradients as the plain
conv, in every transform."""

import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from rvm.models import conv as conv_module
from rvm.models.conv import Conv3x3, SameConv, conv2d, conv3x3, gemm3x3
from rvm.train import xla

DIMS = ("NHWC", "HWIO", "NHWC")
# (batch, height, width, C_in): even and odd sizes, non-square; C_out = 5 != C_in.
SHAPES = [(2, 8, 8, 3), (2, 7, 9, 3), (1, 5, 6, 3)]
COUT = 5
PAD = ((1, 1), (1, 1))  # Huang et al.'s (Torch) padding; 'SAME' differs for stride 2


def plain(x, kernel, strides=1):
    return lax.conv_general_dilated(x, kernel, (strides, strides), PAD, dimension_numbers=DIMS)


def inputs(shape, seed=0, dtype=jnp.float32):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape, dtype)
    kernel = jax.random.normal(kk, (3, 3, shape[-1], COUT), dtype)
    return x, kernel


def weighted(f, weights):
    """A scalar whose cotangent w.r.t. f's output is cos(y) * weights: neither constant nor 1."""
    return lambda *args: jnp.sum(jnp.sin(f(*args)) * weights)


def params_of(x, strides):
    params = Conv3x3(COUT, strides).init(jax.random.key(1), x)["params"]
    # A non-zero bias, so a dropped or misplaced bias shows.
    return {**params, "bias": jnp.arange(COUT, dtype=jnp.float32) / COUT}


def assert_close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def assert_nontrivial(tree):
    for leaf in jax.tree.leaves(tree):
        assert float(jnp.max(jnp.abs(leaf))) > 1e-3


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_lax_and_nn_conv(shape, strides):
    x, kernel = inputs(shape)
    y = conv3x3(x, kernel, strides)
    expected = plain(x, kernel, strides)
    assert (
        y.shape
        == expected.shape
        == (shape[0], -(-shape[1] // strides), -(-shape[2] // strides), COUT)
    )
    assert_nontrivial(y)
    assert_close(y, expected)

    params = params_of(x, strides)
    reference = nn.Conv(COUT, (3, 3), strides, padding=PAD)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, reference.init(jax.random.key(0), x)["params"]
    )
    assert_close(
        Conv3x3(COUT, strides).apply({"params": params}, x),
        reference.apply({"params": params}, x),
    )


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_autodiff_of_nn_conv(shape, strides):
    x, _ = inputs(shape)
    params = params_of(x, strides)
    ours = lambda p, x: Conv3x3(COUT, strides).apply({"params": p}, x)
    theirs = lambda p, x: nn.Conv(COUT, (3, 3), strides, padding=PAD).apply({"params": p}, x)
    weights = jax.random.normal(jax.random.key(7), ours(params, x).shape)

    got = jax.grad(weighted(ours, weights), argnums=(0, 1))(params, x)
    want = jax.grad(weighted(theirs, weights), argnums=(0, 1))(params, x)
    assert_nontrivial(want)
    jax.tree.map(assert_close, got, want)


def test_bfloat16_keeps_dtypes_and_matches_float32():
    x, kernel = inputs(SHAPES[0], dtype=jnp.bfloat16)
    weights = jax.random.normal(jax.random.key(7), (*SHAPES[0][:3], COUT))
    y = conv3x3(x, kernel)
    dx, dk = jax.grad(weighted(conv3x3, weights), argnums=(0, 1))(x, kernel)
    assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16

    f32 = lambda a: a.astype(jnp.float32)
    want = jax.grad(weighted(plain, weights), argnums=(0, 1))(f32(x), f32(kernel))
    assert_nontrivial(want)
    assert_close(f32(y), plain(f32(x), f32(kernel)), tol=5e-2)
    # bf16 keeps ~3 significant digits; relative to each gradient's scale.
    for g, w in zip((dx, dk), want):
        assert float(jnp.max(jnp.abs(f32(g) - w))) < 2e-2 * float(jnp.max(jnp.abs(w)))


def test_module_defaults():
    x = jnp.ones((1, 4, 4, 64))
    assert set(Conv3x3(8, use_bias=False).init(jax.random.key(0), x)["params"]) == {"kernel"}
    # He-normal with fan-out: std sqrt(2 / (9 * C_out)), whatever C_in is.
    kernel = Conv3x3(32).init(jax.random.key(0), x)["params"]["kernel"]
    assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(2 / (9 * 32)), rel=0.05)
    ones = Conv3x3(8, kernel_init=nn.initializers.ones).init(jax.random.key(0), x)["params"]
    assert float(jnp.min(ones["kernel"])) == 1.0
    y = Conv3x3(8, dtype=jnp.bfloat16).apply({"params": ones}, x)
    assert y.dtype == jnp.bfloat16


def test_rejects_a_kernel_of_the_wrong_shape():
    x, kernel = inputs(SHAPES[0])
    with pytest.raises(ValueError, match="kernel"):
        conv3x3(x, kernel[:2])
    with pytest.raises(ValueError, match="kernel"):
        conv3x3(x[..., :2], kernel)


def test_jit_and_vmap():
    x, kernel = inputs(SHAPES[1])
    xs = jnp.stack([x, 2 * x, -x])
    kernels = jnp.stack([kernel, kernel[::-1], 0.5 * kernel])
    weights = jax.random.normal(jax.random.key(7), (*SHAPES[1][:3], COUT))

    def grads(f):
        per_example = jax.grad(weighted(f, weights), argnums=(0, 1))
        return jax.jit(jax.vmap(per_example))(xs, kernels)

    got, want = grads(conv3x3), grads(plain)
    assert_nontrivial(want)
    assert not np.allclose(want[1][0], want[1][1])  # the mapped axis really differs
    jax.tree.map(assert_close, got, want)


def test_lax_scan_with_a_broadcast_kernel_and_checkpoint():
    """A shared kernel used at every step (its gradient sums over steps), rematerialised."""
    x, _ = inputs((2, 6, 6, 4))
    kernel = 0.3 * jax.random.normal(jax.random.key(3), (3, 3, 4, 4))

    def loss(conv):
        def run(x, kernel):
            step = jax.checkpoint(lambda h, _: (jnp.tanh(conv(h, kernel)), None))
            h, _ = lax.scan(step, x, None, length=3)
            return jnp.sum(jnp.sin(h) * x)

        return run

    got = jax.jit(jax.grad(loss(conv3x3), argnums=(0, 1)))(x, kernel)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, kernel)
    assert_nontrivial(want)
    jax.tree.map(assert_close, got, want)


def test_checkpoint_with_the_kernel_used_twice():
    x, kernel = inputs((2, 6, 6, 5))

    def loss(conv):
        @jax.checkpoint
        def block(x, k):
            return conv(jax.nn.relu(conv(x, k)), k)

        return lambda x, k: jnp.sum(jnp.sin(block(x, k)))

    got = jax.grad(loss(conv3x3), argnums=(0, 1))(x, kernel)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, kernel)
    assert_nontrivial(want)
    jax.tree.map(assert_close, got, want)


class _Step(nn.Module):
    conv: type

    @nn.compact
    def __call__(self, h, _):
        if self.conv is nn.Conv:
            y = nn.Conv(h.shape[-1], (3, 3), padding=PAD, name="conv")(h)
        else:
            y = Conv3x3(h.shape[-1], name="conv")(h)
        return jnp.tanh(y), None


def test_nn_scan_matches_nn_conv():
    x, _ = inputs((2, 6, 6, 4))

    def model(conv):
        return nn.scan(_Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            conv
        )

    params = model(Conv3x3).init(jax.random.key(0), x, None)["params"]

    def loss(conv):
        return lambda p, x: jnp.sum(jnp.sin(model(conv).apply({"params": p}, x, None)[0]) * x)

    got = jax.jit(jax.grad(loss(Conv3x3), argnums=(0, 1)))(params, x)
    want = jax.grad(loss(nn.Conv), argnums=(0, 1))(params, x)
    assert_nontrivial(want)
    assert not np.allclose(want[0]["conv"]["kernel"][0], want[0]["conv"]["kernel"][1])
    jax.tree.map(assert_close, got, want)


class _SharedStep(nn.Module):
    @nn.compact
    def __call__(self, h, kernel):
        return jnp.tanh(Conv3x3(h.shape[-1], name="conv")(h, kernel)), None


def test_nn_scan_with_a_broadcast_kernel():
    """Raw sharing: every iteration gets the caller's kernel and owns only its bias."""
    x, _ = inputs((2, 6, 6, 4))
    kernel = 0.3 * jax.random.normal(jax.random.key(3), (3, 3, 4, 4))
    model = nn.scan(
        _SharedStep,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=3,
    )()
    shapes = jax.tree.map(jnp.shape, model.init(jax.random.key(0), x, kernel)["params"])
    assert shapes == {"conv": {"bias": (3, 4)}}
    params = {"conv": {"bias": jnp.arange(12.0).reshape(3, 4) / 12}}

    def loss(p, x, k):
        return jnp.sum(jnp.sin(model.apply({"params": p}, x, k)[0]) * x)

    def unrolled(p, x, k):
        h = x
        for b in p["conv"]["bias"]:
            h = jnp.tanh(plain(h, k) + b)
        return jnp.sum(jnp.sin(h) * x)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, kernel)
    want = jax.grad(unrolled, argnums=(0, 1, 2))(params, x, kernel)
    assert_nontrivial(want)
    jax.tree.map(assert_close, got, want)


def _conv_labels(conv):
    """dim_labels of every convolution XLA:CPU compiles for a scanned conv's gradient."""
    x, kernel = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))

    def loss(x, kernel):
        h, _ = lax.scan(lambda h, _: (jnp.tanh(conv(h, kernel)), None), x, None, length=3)
        return jnp.sum(h)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
    return re.findall(r"dim_labels=([^,\s]+)", text)


def test_backward_convolutions_in_a_scan_are_canonical():
    """The point of the module: no convolution left in a permuted layout inside the loop.

    Tied to XLA:CPU of the pinned jax; if it fails after an upgrade, re-run
    bench/conv_scan.py before deciding whether the custom VJP is still needed.
    """
    canonical = "b01f_01io->b01f"
    assert set(_conv_labels(plain)) - {canonical}  # autodiff of the plain conv is not
    labels = _conv_labels(conv3x3)
    assert len(labels) >= 3 and set(labels) == {canonical}


def test_one_gradient_alone_compiles_to_one_convolution():
    """A caller differentiating only the kernel (or only the input) pays for one
    convolution: XLA drops the custom VJP's other gradient and the forward pass."""
    x, kernel, g = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), jnp.ones((2, 8, 8, 4))
    only = {
        "kernel": lambda x, k, g: jax.vjp(lambda k: conv3x3(x, k), k)[1](g),
        "input": lambda x, k, g: jax.vjp(lambda x: conv3x3(x, k), x)[1](g),
        "both": lambda x, k, g: jax.vjp(conv3x3, x, k)[1](g),
    }
    count = {
        name: len(re.findall(r" convolution\(", jax.jit(f).lower(x, kernel, g).compile().as_text()))
        for name, f in only.items()
    }
    assert count == {"kernel": 1, "input": 1, "both": 2}


def _convolutions(f, args, platform):
    """Each convolution of f's gradient as JAX lowers it for `platform` (its attributes and
    types, without value names or locations); no backend for `platform` is needed."""
    exported = jax.export.export(jax.jit(jax.grad(f, argnums=(0, 1))), platforms=[platform])
    text = exported(*args).mlir_module()
    return sorted(re.findall(r"stablehlo\.convolution\([^)]*\)(.*?)(?: loc\(|$)", text, re.M))


@pytest.mark.parametrize("strides", [1, 2])
def test_backward_pass_is_canonical_on_the_cpu_only(strides):
    """On a GPU or TPU the gradient convolutions are exactly those of autodiff."""
    args = inputs((2, 8, 8, 3))
    ours = weighted(lambda x, k: conv3x3(x, k, strides), 1.0)
    theirs = weighted(lambda x, k: plain(x, k, strides), 1.0)
    for platform in ("cuda", "rocm", "tpu"):
        want = _convolutions(theirs, args, platform)
        assert len(want) == 3  # forward, input gradient, kernel gradient
        assert _convolutions(ours, args, platform) == want
    assert len(_convolutions(ours, args, "cpu")) == 3
    assert _convolutions(ours, args, "cpu") != _convolutions(theirs, args, "cpu")


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 3)])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_backward_passes_agree(shape, strides, kernel_size):
    """The CPU's canonical convolutions and JAX's own (every other platform's) compute the
    same gradients, at any padding the module takes."""
    x, _ = inputs(shape)
    kernel = jax.random.normal(jax.random.key(3), (*kernel_size, shape[-1], COUT))
    for pads in (conv_module.same_pads(shape[1:3], kernel_size, strides), ((2, 0), (1, 1))):
        g = jax.random.normal(jax.random.key(4), conv2d(x, kernel, strides, pads).shape)
        want = conv_module._autodiff_bwd(strides, pads, x, kernel, g)
        assert_nontrivial(want)
        jax.tree.map(assert_close, conv_module._canonical_bwd(strides, pads, x, kernel, g), want)


@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (5, 3)])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_same_conv_matches_nn_conv_in_values_gradients_and_initial_values(
    shape, strides, kernel_size
):
    x, _ = inputs(shape)
    ours, theirs = SameConv(COUT, kernel_size, strides), nn.Conv(COUT, kernel_size, strides)
    params = theirs.init(jax.random.key(1), x)["params"]
    jax.tree.map(assert_close, ours.init(jax.random.key(1), x)["params"], params)
    params = {**params, "bias": jnp.arange(COUT, dtype=jnp.float32) / COUT}
    y = ours.apply({"params": params}, x)
    assert y.shape == (shape[0], -(-shape[1] // strides), -(-shape[2] // strides), COUT)
    assert_close(y, theirs.apply({"params": params}, x))

    weights = jax.random.normal(jax.random.key(7), y.shape)
    apply = lambda m: lambda p, x: m.apply({"params": p}, x)
    got = jax.grad(weighted(apply(ours), weights), argnums=(0, 1))(params, x)
    want = jax.grad(weighted(apply(theirs), weights), argnums=(0, 1))(params, x)
    assert_nontrivial(want)
    jax.tree.map(assert_close, got, want)


@pytest.mark.parametrize("kernel_size", [(1,), (3,), (5,)])
@pytest.mark.parametrize("strides", [1, 2])
def test_same_conv_on_sequences_matches_nn_conv(strides, kernel_size):
    """One-dimensional kernels serve the prefix-sum nets: sequences [B, L, C]."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 3))
    ours, theirs = SameConv(COUT, kernel_size, strides), nn.Conv(COUT, kernel_size, strides)
    params = theirs.init(jax.random.key(1), x)["params"]
    jax.tree.map(assert_close, ours.init(jax.random.key(1), x)["params"], params)
    params = {**params, "bias": jnp.arange(COUT, dtype=jnp.float32) / COUT}
    y = ours.apply({"params": params}, x)
    assert y.shape == (2, -(-9 // strides), COUT)
    assert_close(y, theirs.apply({"params": params}, x))
    weights = jax.random.normal(jax.random.key(7), y.shape)
    apply = lambda m: lambda p, x: m.apply({"params": p}, x)
    got = jax.grad(weighted(apply(ours), weights), argnums=(0, 1))(params, x)
    want = jax.grad(weighted(apply(theirs), weights), argnums=(0, 1))(params, x)
    assert_nontrivial(want)
    jax.tree.map(assert_close, got, want)


def test_same_conv_refuses_three_dimensional_kernels():
    with pytest.raises(ValueError, match="kernel_size"):
        SameConv(COUT, (3, 3, 3)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 4, 2)))


def test_same_conv_backward_in_a_scan_is_canonical():
    """SameConv serves the recurrent cells, which run inside a scan over time."""
    labels = _conv_labels(lambda h, k: conv2d(h, k, 1))
    assert len(labels) >= 3 and set(labels) == {"b01f_01io->b01f"}


def test_rvm_jit_keeps_convolutions_out_of_ynnpack():
    """`xla.jit` compiles convolutions on XLA:CPU's own path; plain `jax.jit` gives them to
    YNNPACK (which the options exist to avoid). Values agree either way."""
    x, kernel = jnp.ones((8, 16, 16, 32)), jnp.full((3, 3, 32, 32), 0.01)
    ynn_conv = re.compile(r"ynn_fusion[.\d]* = f32\[8,16,16,32\]")
    default = jax.jit(conv3x3).lower(x, kernel).compile().as_text()
    assert ynn_conv.search(default)
    assert not ynn_conv.search(xla.jit(conv3x3).lower(x, kernel).compile().as_text())
    np.testing.assert_allclose(xla.jit(conv3x3)(x, kernel), jax.jit(conv3x3)(x, kernel), 1e-5)
    # Inside another jit the outermost one's options hold (JAX rejects them on inner jits).
    inner = xla.jit(conv3x3)
    outer = lambda x, kernel: inner(x, kernel) + 1
    assert not ynn_conv.search(xla.jit(outer).lower(x, kernel).compile().as_text())
    np.testing.assert_allclose(jax.jit(outer)(x, kernel), inner(x, kernel) + 1, 1e-5)
    assert xla.compiler_options("gpu") is None
    assert xla.compiler_options("cpu") == xla.CPU_OPTIONS
    assert xla.compiler_options("cpu", once=True) == {**xla.CPU_OPTIONS, **xla.ONCE_OPTIONS}
    assert xla.compiler_options("gpu", once=True) is None


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_gemm_forms_match_in_values_and_gradients(shape, strides):
    x, kernel = inputs(shape)
    y = gemm3x3(x, kernel, strides)
    assert y.shape == conv3x3(x, kernel, strides).shape
    assert_close(y, plain(x, kernel, strides))
    weights = jax.random.normal(jax.random.key(7), y.shape)
    want = jax.grad(weighted(lambda *a: plain(*a, strides), weights), argnums=(0, 1))(x, kernel)
    assert_nontrivial(want)
    forms = {
        "gemm": lambda *a: gemm3x3(*a, strides),
        "kernel_gemm": lambda *a: conv3x3(*a, strides, kernel_grad="gemm"),
    }
    for form in forms.values():
        got = jax.grad(weighted(form, weights), argnums=(0, 1))(x, kernel)
        jax.tree.map(assert_close, got, want)

    params = params_of(x, strides)
    for impl in ("gemm", "kernel_gemm"):
        assert_close(
            Conv3x3(COUT, strides, impl=impl).apply({"params": params}, x),
            Conv3x3(COUT, strides).apply({"params": params}, x),
        )
    with pytest.raises(ValueError, match="conv impl 'cudnn' is not one of xla, gemm, kernel_gemm"):
        Conv3x3(COUT, impl="cudnn").apply({"params": params}, x)


def test_vmapped_over_kernels_the_gemm_forms_batch_products_instead_of_grouping_convs():
    """Why packs on a GPU may take them: lowered for a GPU, K kernels make each of XLA's
    three convolutions (forward, input and kernel gradients) a grouped one; `gemm` has
    none left, `kernel_gemm` a batched product for the kernel gradient."""
    x, kernel = inputs(SHAPES[0])
    xs, kernels = jnp.stack([x, -x, 2 * x]), jnp.stack([kernel, 0.5 * kernel, kernel[::-1]])

    def grads(conv):
        return jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), (0, 1))

    def vmapped_grads(conv):
        return jax.jit(jax.vmap(grads(conv)))

    def gpu_ops(conv):
        hlo = vmapped_grads(conv).trace(xs, kernels).lower(lowering_platforms=("cuda",)).as_text()
        batched_products = re.findall(r"dot_general.*batching_dims = \[0\] x \[0\]", hlo)
        return len(re.findall(r"feature_group_count = 3\b", hlo)), len(batched_products)

    kernel_gemm = partial(conv3x3, kernel_grad="gemm")
    assert gpu_ops(conv3x3) == (3, 0)
    assert gpu_ops(kernel_gemm) == (2, 1)
    assert gpu_ops(gemm3x3) == (0, 3)
    # Compiled here, the convolution's own kernel gradient, which `kernel_gemm` replaces,
    # is gone: two convolutions (forward, input gradient) and the product.
    hlo = jax.jit(grads(kernel_gemm)).lower(x, kernel).compile().as_text()
    assert len(re.findall(r"= \S+ convolution\(", hlo)) == 2
    assert len(re.findall(r"= \S+ dot\(", hlo)) == 1

    want = vmapped_grads(conv3x3)(xs, kernels)
    for conv in (gemm3x3, kernel_gemm):
        # sin of outputs up to ~10 amplifies float32 rounding: 3e-5 measured on the CPU.
        jax.tree.map(
            lambda g, w: assert_close(g, w, tol=1e-4), vmapped_grads(conv)(xs, kernels), want
        )
    for i in range(3):
        assert_close(jax.vmap(gemm3x3)(xs, kernels)[i], conv3x3(xs[i], kernels[i]))
