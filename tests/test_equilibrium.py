"""Equilibrium layers: implicit and phantom gradients, memory, stopping, Jacobian penalty,
and the config checks (`rvm.models.equilibrium`, `rvm.models.equilibrium_resnet`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import set_field, train, untimed_records

from experiments.configs import equilibrium as eq_configs
from rvm.errors import ConfigError
from rvm.models import sharing
from rvm.models.equilibrium import (
    Backward,
    Equilibrium,
    Solver,
    Spec,
    adjoint_metrics,
    implicit_fixed_point,
    jacobian_penalty,
    phantom_fixed_point,
    solve,
    solver_metrics,
)
from rvm.models.equilibrium_resnet import Cell, EquilibriumLevel
from rvm.train import config_check

D, B = 6, 3


def tanh_block(scale: float):
    """f(params, x, z) = tanh(W z + x): contractive when ||W|| < 1."""
    w = scale * jax.random.normal(jax.random.key(0), (D, D)) / np.sqrt(D)
    f = lambda p, x, z: jnp.tanh(z @ p + x)
    return f, w


X = jax.random.normal(jax.random.key(1), (B, D))
TARGET = jax.random.normal(jax.random.key(2), (B, D))
loss_of = lambda z: jnp.sum((z - TARGET) ** 2)


def unrolled_grad(f, w, steps: int):
    def loss(p, x):
        z = jnp.zeros_like(x)
        for _ in range(steps):
            z = f(p, x, z)
        return loss_of(z)

    return jax.grad(loss, argnums=(0, 1))(w, X)


def rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", ["anderson", "iterate"])
def test_implicit_gradient_matches_unrolled_to_convergence(name):
    f, w = tanh_block(0.8)
    fwd, adj = Solver(name, tol=1e-6, max_iter=200), Solver(name, tol=1e-7, max_iter=200)

    def loss(p, x):
        z, stats = implicit_fixed_point(f, fwd, adj, p, x, jnp.zeros_like(x))
        return loss_of(z), stats

    (_, stats), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, X)
    assert bool(stats.converged)
    want = unrolled_grad(f, w, 100)
    # a block run for too few steps has another gradient: the comparison can fail
    assert rel(unrolled_grad(f, w, 3)[0], want[0]) > 1e-2
    for got, expected in zip(grads, want):
        assert rel(got, expected) < 1e-3


def test_solver_stops_at_tolerance_or_maximum_and_says_which():
    f, w = tanh_block(0.8)
    g = lambda z: f(w, X, z)
    z, stats = solve(g, jnp.zeros_like(X), Solver("iterate", tol=1e-4, max_iter=100))
    assert bool(stats.converged) and 1 < int(stats.iterations) < 100
    assert float(stats.residual) <= 1e-4
    z, stats = solve(g, jnp.zeros_like(X), Solver("anderson", tol=1e-4, max_iter=3))
    assert not bool(stats.converged) and int(stats.iterations) == 3
    assert float(stats.residual) > 1e-4
    m = solver_metrics([stats])
    assert float(m["solver_nonconverged"]) == 1.0 and float(m["solver_iterations"]) == 3


@pytest.mark.parametrize("max_iter, converged", [(200, True), (2, False)])
def test_adjoint_solve_reports_through_the_probe_gradient(max_iter, converged):
    """The probe's gradient is the adjoint solve's Stats, and leaves the others alone."""
    f, w = tanh_block(0.8)
    fwd, adj = Solver("anderson", 1e-6, 100), Solver("anderson", 1e-7, max_iter)

    def loss(p, probe):
        return loss_of(implicit_fixed_point(f, fwd, adj, p, X, jnp.zeros_like(X), probe)[0])

    grad_w, measured = jax.grad(loss, argnums=(0, 1))(w, jnp.zeros(3))
    # the adjoint solve done directly, as the backward pass does it
    z, _ = solve(lambda z: f(w, X, z), jnp.zeros_like(X), fwd)
    _, pull = jax.vjp(lambda z: f(w, X, z), z)
    g = jax.grad(loss_of)(z)
    _, stats = solve(lambda u: pull(u)[0] + g, g, adj)
    m = adjoint_metrics({"level": measured})
    assert bool(stats.converged) == converged
    assert float(m["adjoint_iterations"]) == int(stats.iterations)
    assert float(m["adjoint_residual"]) == pytest.approx(float(stats.residual), rel=1e-5)
    assert float(m["adjoint_nonconverged"]) == float(not converged)
    unprobed = jax.grad(lambda p: loss_of(implicit_fixed_point(f, fwd, adj, p, X, X * 0)[0]))(w)
    np.testing.assert_array_equal(grad_w, unprobed)


def test_adjoint_solve_that_stops_at_its_maximum_is_reported_per_epoch(tmp_path):
    config = eq_configs.get_config("mazes_smoke")
    config.num_epochs = 1
    config.equilibrium.backward_max_iter = 2  # too few for the adjoint's tolerance
    train(config, tmp_path / "run")
    (record,) = untimed_records(tmp_path / "run")
    assert record["train_adjoint_iterations"] == 2.0
    assert record["train_adjoint_nonconverged"] == 1.0
    assert record["train_adjoint_residual"] > config.equilibrium.backward_tol


def test_phantom_gradient_is_the_k_step_unrolled_gradient():
    f, w = tanh_block(0.8)
    fwd, k, lam = Solver("anderson", tol=1e-6, max_iter=100), 3, 0.5

    def phantom(p, x):
        return loss_of(phantom_fixed_point(f, fwd, k, lam, p, x, jnp.zeros_like(x))[0])

    def explicit(p, x):
        z = jnp.zeros_like(x)
        for _ in range(100):  # the same fixed point, reached without gradient
            z = jax.lax.stop_gradient(f(p, x, z))
        for _ in range(k):
            z = (1 - lam) * z + lam * f(p, x, z)
        return loss_of(z)

    got = jax.grad(phantom, argnums=(0, 1))(w, X)
    want = jax.grad(explicit, argnums=(0, 1))(w, X)
    exact = unrolled_grad(f, w, 100)
    assert rel(want[0], exact[0]) > 1e-2  # an inexact gradient: it differs from the true one
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-4


def test_jacobian_penalty_matches_exact_frobenius_norm_in_expectation():
    f, w = tanh_block(1.5)
    z = jax.random.normal(jax.random.key(3), (B, D))
    g = lambda z: f(w, X, z)
    jac = jax.jacobian(g)(z).reshape(B * D, B * D)
    exact = float(jnp.sum(jac**2)) / z.size
    one = [float(jacobian_penalty(g, z, jax.random.key(k), samples=1)) for k in (5, 6)]
    many = float(jacobian_penalty(g, z, jax.random.key(4), samples=4000))
    assert abs(one[0] - one[1]) / exact > 0.02  # one sample is a random estimate
    assert abs(many - exact) / exact < 0.05  # fixed seed; the estimator's std is ~2%


def train_step_memory(max_iter: int, unrolled: bool) -> int:
    cell = Cell(4, "none")
    x = jnp.ones((2, 8, 8, 4))
    layer = Equilibrium(
        cell, Solver("iterate", 1e-30, max_iter), Backward(solver=Solver("iterate"))
    )
    variables = layer.init(jax.random.key(0), x, x)

    def loss(params):
        if unrolled:  # a scan keeps every iteration's residuals for the backward pass
            step = lambda z, _: (cell.apply({"params": params["block"]}, z, x), None)
            z = jax.lax.scan(step, x, None, length=max_iter)[0]
        else:
            z = layer.apply({"params": params}, x, x)[0]
        return jnp.sum(z**2)

    step = lambda p: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p))
    compiled = jax.jit(step).lower(variables["params"]).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_train_step_memory_does_not_grow_with_forward_iterations():
    assert train_step_memory(10, unrolled=False) == train_step_memory(50, unrolled=False)
    assert train_step_memory(50, unrolled=True) > 2 * train_step_memory(10, unrolled=True)


def test_batchnorm_block_is_refused():
    class WithBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return nn.BatchNorm(use_running_average=False)(z) + x

    with pytest.raises(ValueError, match="BatchNorm"):
        Equilibrium(WithBatchNorm()).init(jax.random.key(0), X, X)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.equilibrium.tol", 0.0, "tol"),
        ("model.equilibrium.tol", -1e-3, "tol"),
        ("model.equilibrium.max_iter", 0, "max_iter"),
        ("model.equilibrium.backward_max_iter", -2, "max_iter"),
        ("model.equilibrium.solver", "broyden", "broyden"),
        ("model.equilibrium.norm", "batch", "BatchNorm"),
        ("model.equilibrium.backward", "exact", "exact"),
    ],
)
def test_bad_equilibrium_config_fails_before_compiling(field, value, message):
    config = eq_configs.get_config("smoke")
    config_check.validate(config)  # the variant itself is fine
    set_field(config, field, value)
    with pytest.raises(ConfigError, match=message):
        config_check.validate(config)


def test_bad_thinking_equilibrium_config_fails():
    config = eq_configs.get_config("mazes_smoke")
    config_check.validate(config)
    set_field(config, "equilibrium.max_iter", 0)
    with pytest.raises(ValueError, match="max_iter"):
        config_check.validate(config)


def test_backward_and_solver_objects_check_themselves():
    with pytest.raises(ValueError, match="not one of"):
        Backward(mode="exact")
    with pytest.raises(ValueError, match="damping"):
        Solver(damping=0.0)


@pytest.mark.parametrize("variant", eq_configs.VARIANTS)
def test_every_equilibrium_config_validates(variant):
    config = eq_configs.get_config(variant)
    config_check.validate(config)
    if config.get("task", "image") == "image":
        model = sharing.build_model(config.model, 10)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))
        assert "cell" in shapes["params"]["level2"]  # a level solved to its fixed point
        # model.widths reaches the network: all3_wide is of multiscale-DEQ size
        stem = shapes["params"]["stem_conv"]["kernel"].shape[-1]
        assert stem == config.model.widths[0] == (64 if variant == "all3_wide" else 16)
        if variant == "all3_wide":
            assert 2e6 < sharing.count_params(shapes["params"]) < 5e6


def test_equilibrium_level_runs_a_given_number_of_solver_iterations():
    """Readout-time ablations of an equilibrium level: `iterations` is the solver's count."""
    spec = Spec("none", Solver("iterate", 1e-3, 30))
    level = EquilibriumLevel(4, False, spec)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    variables = level.init(jax.random.key(1), x, False)
    run = jax.jit(
        lambda n: level.apply(variables, x, False, n, mutable=["solver"]), static_argnums=0
    )
    ((two, _), sown2), ((six, _), sown6) = run(2), run(6)
    count = lambda sown: int(sown["solver"]["stats"][0].iterations)
    assert (count(sown2), count(sown6)) == (2, 6)
    assert float(jnp.max(jnp.abs(two - six))) > 1e-6
