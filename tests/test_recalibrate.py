"""BatchNorm recalibration: exact statistics, readout past the trained depth, consolidation."""

import jax
import numpy as np
from helpers import tiny_config, train

from rvm.models.conv import Conv3x3
from rvm.models.norm import _stats
from rvm.models.recalibrate import recalibrate
from rvm.models.resnet import ResNet


def small_resnet(**kw):
    kw = {"blocks_per_level": (2, 3, 3), "widths": (4, 8, 8), "final_death_rate": 0.0, **kw}
    return ResNet(**kw)


def images(n=16, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, 8, 8, 3)) * 2.0 + 0.5


def test_statistics_are_the_exact_moments_of_the_layer_inputs():
    model, x = small_resnet(), images()
    variables = model.init(jax.random.key(1), x[:1])
    fresh = recalibrate(model, variables, [x[:8], x[8:]])  # two batches pooled
    # The stem's BatchNorm sees the stem convolution of every image.
    conv = Conv3x3(4).apply({"params": variables["params"]["stem_conv"]}, x)
    mean, var = _stats(conv)
    old = variables["batch_stats"]["stem_bn"]
    assert not np.allclose(old["mean"], mean, atol=1e-3)
    assert not np.allclose(old["var"], var, atol=1e-3)
    got = fresh["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], var, rtol=1e-5)


def test_recalibrated_evaluation_on_its_batch_is_training_mode():
    """On the one batch it was estimated from, every layer's statistics are that batch's,
    so the evaluation network computes what training mode (batch statistics) does."""
    model, x = small_resnet(), images()
    variables = model.init(jax.random.key(1), x[:1])
    train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    stale = model.apply(variables, x)
    assert np.abs(stale - train_logits).max() > 1e-2
    fresh = recalibrate(model, variables, [x])
    np.testing.assert_allclose(model.apply(fresh, x), train_logits, rtol=1e-4, atol=1e-4)


def test_iterations_past_the_trained_depth_get_statistics_of_their_own():
    """A shared level read out for 5 iterations after training 2 (the middle level of
    (2,3,3)) with recalibrated statistics computes what a network trained with 5 blocks
    of the same weights computes in training mode."""
    model, x = small_resnet(shared_levels=(True, True, True)), images()
    variables = model.init(jax.random.key(1), x[:1])
    longer = small_resnet(shared_levels=(True, True, True), blocks_per_level=(2, 6, 3))
    index = np.minimum(np.arange(5), 1)
    params = dict(variables["params"])
    params["level2"] = {
        **params["level2"],
        "blocks": jax.tree.map(lambda v: v[index], params["level2"]["blocks"]),
    }
    target, _ = longer.apply(
        {"params": params, "batch_stats": longer.init(jax.random.key(0), x[:1])["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    iterations = (None, 5, None)
    fresh = recalibrate(model, variables, [x], iterations=iterations)
    stacked = fresh["batch_stats"]["level2"]["blocks"]["block"]["residual"]["bn1"]["var"]
    assert stacked.shape == (5, 8)
    # The extra iterations' statistics differ from the last trained block's ...
    assert not np.allclose(stacked[2:], stacked[1], rtol=1e-2)
    clamped = recalibrate(model, variables, [x])  # the trained depth's statistics, repeated
    reused = model.apply(clamped, x, iterations=iterations)
    assert np.abs(reused - target).max() > 1e-3
    # ... and are those of the longer network's blocks.
    np.testing.assert_allclose(model.apply(fresh, x, iterations=iterations), target, atol=2e-4)


def test_masked_blocks_keep_their_statistics():
    model, x = small_resnet(), images()
    variables = model.init(jax.random.key(1), x[:1])
    fresh = recalibrate(model, variables, [x], masks=[None, np.array([0.0, 1.0]), None])
    level = lambda v: v["batch_stats"]["level2"]["blocks"]["block"]["residual"]["bn1"]["var"]
    np.testing.assert_array_equal(level(fresh)[0], level(variables)[0])
    assert not np.allclose(level(fresh)[1], level(variables)[1], rtol=1e-2)


def test_recalibration_recovers_error_lost_to_stale_statistics_after_consolidation(tmp_path):
    """A barely pulled relaxed run: its members still differ, so consolidation changes every
    block's activations and the trained statistics no longer fit them."""
    config = tiny_config("relaxed", num_epochs=3)
    config.model.blocks_per_level = (3, 3, 3)
    config.model.stochastic_depth = False
    config.optim.pull_start = config.optim.pull_end = 1e-6
    results = train(config, tmp_path)
    stale = results["consolidated_test_error"]
    fresh = results["consolidated_recalibrated_test_error"]
    assert stale > results["test_error"] + 5  # staleness hurts here
    assert fresh < stale
