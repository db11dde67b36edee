"""`norm.BatchNorm`: the values, gradients, statistics and variables of `nn.BatchNorm`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvm.models.norm import BatchNorm

SHAPE = (6, 5, 4, 3)  # NHWC; statistics over 120 positions per channel


def setup(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = 2.0 * jax.random.normal(keys[0], SHAPE) + 0.5  # away from (0, 1), so stats matter
    variables = nn.BatchNorm(use_running_average=False).init(keys[1], x)
    # Scale and bias away from their (1, 0) initialisation, running stats away from (0, 1).
    variables = jax.tree.map(
        lambda v: v + jax.random.uniform(keys[2], v.shape, minval=0.5, maxval=1.5), variables
    )
    weights = jax.random.normal(keys[3], SHAPE)
    return x, variables, weights


def reference(train, relu):
    """`nn.BatchNorm` (then `nn.relu`) as the project's ResNets used it before."""

    class Ref(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.BatchNorm(not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
            return nn.relu(y) if relu else y

    return Ref()


def apply_both(train, relu, x, variables):
    ours = BatchNorm(not train, momentum=0.9, epsilon=1e-5, relu=relu)
    ref = reference(train, relu)
    out = ours.apply(variables, x, mutable=["batch_stats"])
    out_ref = ref.apply({k: {"bn": v} for k, v in variables.items()}, x, mutable=["batch_stats"])
    return out, (out_ref[0], {"batch_stats": out_ref[1]["batch_stats"]["bn"]})


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_values_and_running_statistics_match_flax(train, relu):
    x, variables, _ = setup()
    (y, stats), (y_ref, stats_ref) = apply_both(train, relu, x, variables)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    if relu:
        assert float(jnp.min(y)) == 0.0 and float(jnp.max(y)) > 0.0
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            stats["batch_stats"][name], stats_ref["batch_stats"][name], rtol=1e-6
        )
    moved = not np.allclose(stats["batch_stats"]["mean"], variables["batch_stats"]["mean"])
    assert moved == train  # running averages move only in training mode


@pytest.mark.parametrize("relu", [False, True])
def test_training_gradients_match_autodiff_of_flax(relu):
    x, variables, weights = setup(1)

    def loss(module, wrap):
        def f(params, x):
            v = wrap({"params": params, "batch_stats": variables["batch_stats"]})
            y, _ = module.apply(v, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * weights)  # cotangent neither constant nor 1

        return jax.grad(f, argnums=(0, 1))

    ours = loss(BatchNorm(momentum=0.9, relu=relu), lambda v: v)
    ref = loss(reference(True, relu), lambda v: {k: {"bn": w} for k, w in v.items()})
    (g_params, g_x) = ours(variables["params"], x)
    (g_params_ref, g_x_ref) = ref(variables["params"], x)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-6)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(g_params[name], g_params_ref[name], rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(g_x))) > 1e-3


def test_gradients_through_the_batch_statistics_are_exact():
    """The returned statistics are differentiable outputs too (they feed the running averages)."""
    x, variables, _ = setup(2)

    def ours(x):
        _, new = BatchNorm(momentum=0.0).apply(variables, x, mutable=["batch_stats"])
        return new["batch_stats"]["mean"], new["batch_stats"]["var"]

    def by_hand(x):
        return jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))

    weights = jnp.array([2.0, -3.0, 0.5])
    grad = lambda f: jax.grad(lambda x: jnp.sum((f(x)[0] - 4.0 * f(x)[1]) * weights))(x)
    np.testing.assert_allclose(grad(ours), grad(by_hand), rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(grad(ours)))) > 1e-3


def test_variables_and_dtypes_are_those_of_flax():
    x, _, _ = setup()
    ours = BatchNorm().init(jax.random.key(0), x)
    ref = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    shapes = lambda v: jax.tree.map(lambda a: (a.shape, a.dtype), v)
    assert shapes(ours) == shapes(ref)
    y, _ = BatchNorm(dtype=jnp.bfloat16).apply(ours, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    _, new = BatchNorm().apply(ours, x.astype(jnp.bfloat16), mutable=["batch_stats"])
    assert new["batch_stats"]["mean"].dtype == jnp.float32  # statistics stay float32
