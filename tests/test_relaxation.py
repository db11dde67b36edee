"""The relaxation transformation against autodiff of the explicit penalty."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rvm.train import relaxation as rx


def random_tree(seed):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "a": {
            "kernel": jax.random.normal(k[0], (5, 3, 3, 2, 2)),
            "bias": jax.random.normal(k[1], (5, 2)),
        },
        "b": jax.random.normal(k[2], (3, 7)),
        "c": jax.random.normal(k[3], (4,)),
    }
    mask = {"a": {"kernel": True, "bias": False}, "b": True, "c": False}
    return params, mask


def explicit_penalty(params, mask):
    total = 0.0
    for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
        if m:
            total += jnp.sum((w - jnp.mean(w, axis=0)) ** 2)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_equals_grad_of_explicit_penalty(seed):
    params, mask = random_tree(seed)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed + 10), p.shape), params)
    pull = 0.37
    tx = rx.relaxation(pull, mask)
    updates, state = tx.update(grads, tx.init(params), params)
    penalty_grad = jax.grad(lambda p: pull * explicit_penalty(p, mask))(params)
    assert jnp.abs(penalty_grad["b"]).max() > 0  # the penalty really acts on set leaves
    expected = jax.tree.map(jnp.add, grads, penalty_grad)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.penalty, explicit_penalty(params, mask), rtol=1e-5)
    np.testing.assert_allclose(updates["c"], grads["c"])  # leaves outside the sets untouched


def test_schedule_is_exponential_between_its_ends():
    pull = rx.exponential_pull(1e-4, 1e-1, 1001)
    np.testing.assert_allclose(pull(0), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(pull(1000), 1e-1, rtol=1e-5)
    np.testing.assert_allclose(pull(500), np.sqrt(1e-4 * 1e-1), rtol=1e-5)
    np.testing.assert_allclose(pull(5000), 1e-1, rtol=1e-5)


def test_schedule_counts_steps_inside_a_chain():
    params, mask = random_tree(0)
    tx = optax.chain(rx.relaxation(rx.exponential_pull(1e-4, 1e-1, 10), mask), optax.sgd(0.1))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    pulls = []
    for _ in range(10):
        _, state = tx.update(zeros, state, params)
        pulls.append(float(state[0].pull))
    # A ten-step run's first update uses exactly pull_start, its last exactly pull_end.
    assert pulls[0] != pulls[-1]
    assert pulls[0] == np.float32(1e-4)
    assert pulls[-1] == np.float32(1e-1)
    assert all(a < b for a, b in zip(pulls, pulls[1:]))


def test_bad_pull_schedule_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        rx.exponential_pull(0.0, 1e-1, 100)


def test_angles_are_zero_for_equal_kernels_and_positive_otherwise():
    params, mask = random_tree(0)
    angles = rx.max_angles(params, mask)
    assert set(angles) == {"a/kernel", "b"}
    assert all(a > 1.0 for a in angles.values())
    tied = jax.tree.map(lambda w, m: jnp.broadcast_to(w[0], w.shape) if m else w, params, mask)
    assert all(a < 1e-3 for a in rx.max_angles(tied, mask).values())


def test_angle_matches_a_known_rotation():
    base = jnp.array([1.0, 0.0, 0.0])
    theta = np.radians(0.5)
    members = jnp.stack([base, jnp.array([np.cos(2 * theta), np.sin(2 * theta), 0.0])])
    # The mean bisects the two members: each is 0.5 degrees from it.
    angles = rx.max_angles({"w": members}, {"w": True})
    np.testing.assert_allclose(angles["w"], 0.5, rtol=1e-4)


def test_pairwise_angle_matches_a_known_rotation():
    base = jnp.array([1.0, 0.0, 0.0])
    theta = np.radians(0.5)
    third = jnp.array([np.cos(theta), np.sin(theta), 0.0]) * 3.0  # the norm must not matter
    members = jnp.stack([base, jnp.array([np.cos(2 * theta), np.sin(2 * theta), 0.0]), third])
    pairwise = rx.max_pairwise_angles({"w": members}, {"w": True})["w"]
    to_mean = rx.max_angles({"w": members}, {"w": True})["w"]
    # The outer members are 1 degree apart, each within 0.5 degrees of the mean.
    assert to_mean < 0.75
    np.testing.assert_allclose(pairwise, 1.0, rtol=1e-4)


def test_pairwise_angle_resolves_tiny_angles():
    theta = np.radians(1e-3)
    members = jnp.array([[1.0, 0.0], [np.cos(theta), np.sin(theta)]])
    pairwise = rx.max_pairwise_angles({"w": members}, {"w": True})["w"]
    np.testing.assert_allclose(pairwise, 1e-3, rtol=1e-3)
