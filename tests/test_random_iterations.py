"""Training with random iteration counts: draws, their masks, and the default left alone."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import cifar10
from rvm.errors import ConfigError
from rvm.models import sharing
from rvm.models.stochastic_depth import iteration_masks
from rvm.tasks.image import make_loss_fn, random_iterations
from rvm.train.config_check import check_resume, validate

X = jax.random.normal(jax.random.key(42), (4, 8, 8, 3))
LABELS = jnp.arange(4) % 10
# Every strategy that runs the masks in training (`auto` is `cond` on a CPU, `masked` on a GPU).
SD_IMPLS = ("cond", "masked", "compact")


def model_config(blocks, sd=True, sd_impl="auto"):
    return ml_collections.ConfigDict(
        dict(
            blocks_per_level=blocks,
            sharing="raw",
            scope="middle",
            stochastic_depth=sd,
            final_death_rate=0.5,
            dtype="float32",
            unroll=False,
            sd_impl=sd_impl,
        )
    )


def init(model):
    return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, X)


def test_draws_are_deterministic_per_key_prefixes_and_within_the_depth():
    draw = jax.jit(lambda k: iteration_masks(k, [None, 4, 2], mean=2.5, sigma=0.5))
    keys = jax.random.split(jax.random.key(0), 300)
    first = [draw(k) for k in keys[:3]]
    again = [draw(k) for k in keys[:3]]
    for a, b in zip(first, again):
        assert a[0] is None and b[0] is None
        np.testing.assert_array_equal(a[1], b[1])
    for level, n in ((1, 4), (2, 2)):
        masks = np.stack([np.asarray(draw(k)[level]) for k in keys])
        counts = masks.sum(1).astype(int)
        # Every count of [1, n] occurs, none outside, and each mask keeps the first r blocks.
        assert set(counts) == set(range(1, n + 1))
        np.testing.assert_array_equal(masks, np.arange(n) < counts[:, None])
    # The levels draw independently: their counts are not one sequence.
    both = np.array([[draw(k)[1].sum(), draw(k)[2].sum()] for k in keys[:60]])
    assert np.any(np.minimum(both[:, 0], 2) != both[:, 1])


@pytest.mark.parametrize("sd_impl", SD_IMPLS)
def test_the_mask_of_r_blocks_is_the_level_run_for_r_iterations(sd_impl):
    model = sharing.build_model(model_config((2, 5, 2), sd_impl=sd_impl), 10)
    variables = init(model)
    full = model.apply(variables, X)
    for r in (1, 3):
        mask = (jnp.arange(4) < r).astype(jnp.float32)
        masked = model.apply(variables, X, masks=[None, mask, None])
        fewer = model.apply(variables, X, iterations=[None, r, None])
        assert not np.allclose(masked, full, atol=1e-3)
        np.testing.assert_allclose(masked, fewer, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sd_impl", SD_IMPLS)
def test_training_under_the_mask_of_r_blocks_is_training_the_r_block_level(sd_impl):
    """Same loss and gradients as the level built with r blocks; the blocks past r keep
    their BatchNorm statistics."""
    long = sharing.build_model(model_config((2, 5, 2), sd=False, sd_impl=sd_impl), 10)
    short = sharing.build_model(model_config((2, 3, 2), sd=False), 10)
    variables = init(long)
    r = 2

    def take(tree):
        blocks = tree["level2"]["blocks"]
        cut = jax.tree.map(lambda v: v[:r], blocks)
        return {**tree, "level2": {**tree["level2"], "blocks": cut}}

    def loss(model, params, stats, masks):
        def f(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats},
                X,
                train=True,
                masks=masks,
                mutable=["batch_stats"],
            )
            ce = -jax.nn.log_softmax(logits)[jnp.arange(4), LABELS].mean()
            return ce, upd["batch_stats"]

        return jax.value_and_grad(f, has_aux=True)(params)

    mask = [None, (jnp.arange(4) < r).astype(jnp.float32), None]
    (l_long, s_long), g_long = loss(long, variables["params"], variables["batch_stats"], mask)
    (l_full, _), _ = loss(long, variables["params"], variables["batch_stats"], None)
    (l_short, s_short), g_short = loss(
        short, take(variables["params"]), take(variables["batch_stats"]), None
    )
    assert abs(float(l_long) - float(l_full)) > 1e-4
    np.testing.assert_allclose(l_long, l_short, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(take(g_long)), jax.tree.leaves(g_short)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(take(s_long)), jax.tree.leaves(s_short)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    past = lambda t: jax.tree.map(lambda v: v[r:], t["level2"]["blocks"])
    for a, b in zip(jax.tree.leaves(past(s_long)), jax.tree.leaves(past(variables["batch_stats"]))):
        np.testing.assert_array_equal(a, b)
    assert not np.asarray(g_long["level2"]["blocks"]["block"]["residual"]["bn1"]["scale"][r:]).any()


@pytest.mark.parametrize("sd_impl", SD_IMPLS)
def test_off_by_default_and_the_draws_leave_stochastic_depth_alone(sd_impl):
    assert random_iterations(cifar10.get_config("all3_raw").model) is None
    old = cifar10.get_config("all3_raw").model.to_dict()
    for field in ("random_iterations", "iterations_mean", "iterations_sigma"):
        del old[field]
    assert random_iterations(ml_collections.ConfigDict(old)) is None  # configs from before

    cfg = model_config((2, 5, 2), sd_impl=sd_impl)
    model = sharing.build_model(cfg, 10)
    variables = init(model)
    args = (variables["params"], variables["batch_stats"], (X, LABELS))
    ones = lambda key: [None, jnp.ones(4), None]
    # Stochastic depth's draws are the same with and without the iteration draw.
    for seed in range(3):
        key = jax.random.key(seed)
        plain, _ = make_loss_fn(model)(*args, key, True)
        with_ones, _ = make_loss_fn(model, ones)(*args, key, True)
        np.testing.assert_array_equal(plain, with_ones)
    cfg.update(random_iterations=True, iterations_mean=1.5, iterations_sigma=0.5, scope="middle")
    drawn = make_loss_fn(model, random_iterations(cfg))
    losses = [drawn(*args, jax.random.key(s), True)[0] for s in range(6)]
    plain = [make_loss_fn(model)(*args, jax.random.key(s), True)[0] for s in range(6)]
    assert not np.allclose(losses, plain)
    # Evaluation runs the whole level whatever the draw.
    np.testing.assert_array_equal(
        drawn(*args, jax.random.key(0), False)[0],
        make_loss_fn(model)(*args, jax.random.key(0), False)[0],
    )


def test_config_checks_and_resuming_runs_saved_before_the_fields(tmp_path):
    config = cifar10.get_config("all3_nonshared")
    config.model.random_iterations = True
    with pytest.raises(ConfigError, match="random_iterations=True needs model.sharing"):
        validate(config)
    config = cifar10.get_config("all3_raw_randiter")
    validate(config)
    config.model.iterations_mean = 0.5
    with pytest.raises(ConfigError, match="iterations_mean must be >= 1"):
        validate(config)

    saved = cifar10.get_config("all3_raw").to_dict()
    for field in ("random_iterations", "iterations_mean", "iterations_sigma"):
        del saved["model"][field]
    check_resume(cifar10.get_config("all3_raw"), tmp_path, saved=saved)
    with pytest.raises(ConfigError, match="model.random_iterations: saved False, now True"):
        check_resume(cifar10.get_config("all3_raw_randiter"), tmp_path, saved=saved)
