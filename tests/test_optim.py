"""The optional learning-rate warm-up and gradient clipping of `rvm.train.optim`."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rvm.train import optim


def adam_config(**fields) -> ml_collections.ConfigDict:
    cfg = dict(
        name="adam",
        learning_rate=1e-3,
        lr_boundaries=(0.5,),
        lr_decay=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.0,
    )
    return ml_collections.ConfigDict({**cfg, **fields})


def test_warmup_ramps_linearly_then_hands_over_to_the_step_schedule():
    schedule = optim.learning_rate(adam_config(warmup_steps=10), 100)
    lrs = [float(schedule(s)) for s in range(100)]
    np.testing.assert_allclose(lrs[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-6)
    np.testing.assert_allclose(lrs[10:50], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[50:], 1e-4, rtol=1e-6)
    # Without the field (the CIFAR-10 configs), the schedule is the step schedule alone.
    plain = optim.learning_rate(adam_config(), 100)
    assert float(plain(0)) == pytest.approx(1e-3)


def test_clip_norm_bounds_the_update_before_the_optimiser():
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([300.0, 400.0, 0.0, 0.0])}  # global norm 500
    sgd = dict(name="sgd", momentum=0.0, nesterov=False, learning_rate=1.0)
    for clip, norm in ((2.0, 2.0), (0.0, 500.0)):
        tx = optim.make_optimizer(adam_config(clip_norm=clip, **sgd), 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        assert float(optax.tree.norm(updates)) == pytest.approx(norm, rel=1e-6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("warmup_steps", -1, "optim.warmup_steps=-1"),
        ("warmup_steps", 2.5, "optim.warmup_steps=2.5"),
        ("clip_norm", -1.0, "optim.clip_norm=-1.0"),
    ],
)
def test_bad_warmup_or_clip_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(adam_config(**{field: value}), 100)
