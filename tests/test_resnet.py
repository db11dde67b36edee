"""The shared-ResNet family: parameter counts, sharing, masks, readout time, consolidation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from rvm.models import sharing, stochastic_depth
from rvm.models.resnet import ResNet, death_rates


def model_config(blocks=(3, 4, 4), mode="nonshared", scope="all", sd=True):
    return ml_collections.ConfigDict(
        dict(
            blocks_per_level=blocks,
            sharing=mode,
            scope=scope,
            stochastic_depth=sd,
            final_death_rate=0.5,
            dtype="float32",
            unroll=False,
        )
    )


def init(model, x, seed=0):
    return model.init({"params": jax.random.key(seed), "dropout": jax.random.key(1)}, x)


def randomize_stats(variables, seed=3):
    """BatchNorm statistics away from (0, 1), so evaluation-mode tests see them."""
    leaves, tree = jax.tree.flatten(variables["batch_stats"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        jax.random.uniform(k, v.shape, minval=0.5, maxval=1.5)
        if i % 2
        else 0.1 * jax.random.normal(k, v.shape)
        for i, (k, v) in enumerate(zip(keys, leaves))
    ]
    return {**variables, "batch_stats": jax.tree.unflatten(tree, new)}


X = jax.random.normal(jax.random.key(42), (4, 8, 8, 3))


@pytest.mark.parametrize(
    "blocks, mode, scope, expected",
    [
        ((18, 18, 18), "nonshared", "middle", 1_732_010),
        ((18, 18, 18), "raw", "middle", 1_437_098),
        ((18, 18, 18), "relaxed", "middle", 1_732_010),
        ((18, 18, 18), "minimal", "middle", 1_434_026),
        ((18, 18, 18), "raw", "all", 179_114),
        ((18, 18, 18), "minimal", "all", 168_266),
        ((3, 4, 4), "nonshared", "all", 363_146),
        ((3, 4, 4), "raw", "all", 169_610),
    ],
)
def test_parameter_counts_match_the_paper(blocks, mode, scope, expected):
    model = sharing.build_model(model_config(blocks, mode, scope), 10)
    shapes = jax.eval_shape(lambda: init(model, X))
    assert sharing.count_params(shapes["params"]) == expected


@pytest.mark.parametrize(
    "blocks, scope, expected",
    [
        ((18, 18, 18), "middle", 1_437_098),
        ((18, 18, 18), "all", 179_114),
        ((3, 4, 4), "all", 169_610),
    ],
)
def test_relaxed_count_after_consolidation_equals_raw(blocks, scope, expected):
    cfg = model_config(blocks, "relaxed", scope)
    shapes = jax.eval_shape(lambda: init(sharing.build_model(cfg, 10), X))
    merged = jax.eval_shape(lambda p: sharing.consolidate(p, scope), shapes["params"])
    assert sharing.count_params(merged) == expected
    raw = jax.eval_shape(lambda: init(sharing.build_model(cfg, 10, consolidated=True), X))
    assert jax.tree.structure(merged) == jax.tree.structure(raw["params"])


def test_minimal_shrinks_only_the_levels_in_scope():
    assert sharing.trained_blocks(model_config((18, 18, 18), "minimal", "middle")) == (18, 2, 18)
    assert sharing.trained_blocks(model_config((18, 18, 18), "minimal", "all")) == (1, 2, 2)
    assert sharing.trained_blocks(model_config((5, 7, 9), "raw", "all")) == (5, 7, 9)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("sharing", "tied", "model.sharing='tied' is not one of nonshared, raw, relaxed, minimal"),
        ("scope", "upper", "model.scope='upper' is not one of middle, all"),
        ("blocks_per_level", (3, 4), "model.blocks_per_level=(3, 4) must be 3 integers"),
        ("blocks_per_level", (3, 1, 4), "at least (1, 2, 2)"),
        ("widths", (16, 32), "model.widths=(16, 32) must be 3 positive integers"),
        ("widths", (16, 0, 64), "model.widths=(16, 0, 64) must be 3 positive integers"),
        ("final_death_rate", 1.0, "model.final_death_rate=1.0 must be a number in [0, 1)"),
        ("dtype", "float16", "model.dtype='float16'"),
        ("conv_impl", "cudnn", "model.conv_impl='cudnn' is not one of xla, gemm, kernel_gemm"),
    ],
)
def test_bad_model_config_names_field_and_allowed_values(field, value, words):
    cfg = model_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=None) as err:
        sharing.validate(cfg)
    assert words in str(err.value)


# --- A hand-written reference for a raw-shared level -------------------------------------


def conv(x, kernel, bias, strides=1):
    y = lax.conv_general_dilated(
        x, kernel, (strides, strides), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + bias


def bn(x, params, stats):
    return (x - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]


def residual(x, p, s, k1, k2):
    y = jax.nn.relu(bn(conv(x, k1, p["conv1"]["bias"]), p["bn1"], s["bn1"]))
    return bn(conv(y, k2, p["conv2"]["bias"]), p["bn2"], s["bn2"])


def test_scanned_raw_level_equals_unrolled_loop():
    cfg = model_config((2, 3, 2), "raw", "middle", sd=False)
    model = sharing.build_model(cfg.copy_and_resolve_references(), 10, keep_activations=True)
    variables = randomize_stats(init(model, X))
    _, acts = model.apply(variables, X)
    level_in, level_out = acts[1]
    p, s = variables["params"]["level2"], variables["batch_stats"]["level2"]
    x = level_in
    blocks = p["blocks"]["block"]["residual"]
    stats = s["blocks"]["block"]["residual"]
    assert blocks["bn1"]["scale"].shape[0] == 2  # per-block variables stacked
    expected = []
    for i in range(2):
        pick = lambda t, i=i: jax.tree.map(lambda v: v[i], t)
        x = jax.nn.relu(
            x + residual(x, pick(blocks), pick(stats), p["conv1_kernel"], p["conv2_kernel"])
        )
        expected.append(x)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)
    np.testing.assert_allclose(level_out, jnp.stack(expected), rtol=1e-4, atol=1e-4)


def test_relaxed_with_equal_kernels_consolidates_to_the_same_logits():
    cfg = model_config((2, 3, 3), "relaxed", "all", sd=False)
    relaxed = sharing.build_model(cfg, 10)
    raw = sharing.build_model(cfg, 10, consolidated=True)
    variables = randomize_stats(init(relaxed, X))
    mask = sharing.set_mask(variables["params"], "all")

    def consolidated(v):
        return {**v, "params": sharing.consolidate(v["params"], "all")}

    # Unequal kernels: consolidation changes the function.
    before = relaxed.apply(variables, X)
    assert not np.allclose(before, raw.apply(consolidated(variables), X), atol=1e-3)

    # Kernels set to their mean: consolidation is exact.
    equalize = lambda w, m: jnp.broadcast_to(w.mean(0), w.shape) if m else w
    tied = {**variables, "params": jax.tree.map(equalize, variables["params"], mask)}
    np.testing.assert_allclose(
        relaxed.apply(tied, X), raw.apply(consolidated(tied), X), rtol=1e-5, atol=1e-5
    )


def test_masks_of_ones_equal_the_plain_model_and_zeros_skip_the_level():
    cfg = model_config((3, 4, 4), "nonshared", "all", sd=True)
    model = sharing.build_model(cfg, 10, keep_activations=True)
    variables = randomize_stats(init(model, X))
    plain, _ = model.apply(variables, X)
    ones = [jnp.ones(3), jnp.ones(3), jnp.ones(3)]
    masked, _ = model.apply(variables, X, masks=ones)
    np.testing.assert_allclose(masked, plain, rtol=1e-6, atol=1e-6)

    zeros = [jnp.ones(3), jnp.zeros(3), jnp.ones(3)]
    skipped, acts = model.apply(variables, X, masks=zeros)
    assert not np.allclose(skipped, plain, atol=1e-3)
    level_in, level_out = acts[1]
    np.testing.assert_array_equal(level_out[-1], level_in)


def test_eval_scaling_is_the_survival_probability():
    blocks = (2, 3, 3)
    rates = np.concatenate(death_rates(blocks, 0.5))
    np.testing.assert_allclose(rates, 0.5 * np.arange(8) / 7)
    cfg = model_config(blocks, "nonshared", "all", sd=True)
    model = sharing.build_model(cfg, 10, keep_activations=True)
    variables = randomize_stats(init(model, X))
    _, acts = model.apply(variables, X)
    level_in, level_out = acts[2]
    # The last block of the network has death rate 0.5; its input is the level's penultimate output.
    p = jax.tree.map(lambda v: v[-1], variables["params"]["level3"]["blocks"]["block"]["residual"])
    s = jax.tree.map(
        lambda v: v[-1], variables["batch_stats"]["level3"]["blocks"]["block"]["residual"]
    )
    x = level_out[-2]
    r = residual(x, p, s, p["conv1"]["kernel"], p["conv2"]["kernel"])
    np.testing.assert_allclose(level_out[-1], jax.nn.relu(x + (1 - rates[-1]) * r), atol=1e-4)
    assert not np.allclose(level_out[-1], jax.nn.relu(x + r), atol=1e-3)


def test_stochastic_depth_training_drops_blocks_per_rng():
    cfg = model_config((2, 3, 3), "nonshared", "all", sd=True)
    cfg.final_death_rate = 0.9
    model = sharing.build_model(cfg, 10)
    variables = init(model, X)
    run = lambda seed: model.apply(
        variables, X, train=True, rngs={"dropout": jax.random.key(seed)}, mutable=["batch_stats"]
    )[0]
    outs = [run(s) for s in range(4)]
    np.testing.assert_array_equal(outs[0], run(0))
    assert any(not np.allclose(outs[0], o) for o in outs[1:])

    cfg.stochastic_depth = False
    plain = sharing.build_model(cfg, 10)
    a = plain.apply(
        variables, X, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
    )
    b = plain.apply(
        variables, X, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
    )
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("train", [True, False])
def test_bfloat16_model_with_stochastic_depth_computes_in_bfloat16(train):
    """Blocks under `cond` with float32 survival probabilities keep the scan's carry bfloat16."""
    cfg = model_config((2, 3, 3), "nonshared", "all", sd=True)
    cfg.dtype = "bfloat16"
    model = sharing.build_model(cfg, 10, keep_activations=True)
    variables = init(model, X)
    rngs = {"dropout": jax.random.key(0)}
    (logits, acts), _ = model.apply(variables, X, train=train, rngs=rngs, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(acts))
    cfg.dtype = "float32"
    want, _ = sharing.build_model(cfg, 10).apply(
        variables, X, train=train, rngs=rngs, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(logits, want, rtol=0.1, atol=0.1)


def test_fewer_iterations_equal_masking_the_top_blocks():
    cfg = model_config((2, 5, 2), "raw", "middle", sd=True)
    model = sharing.build_model(cfg, 10)
    variables = randomize_stats(init(model, X))
    fewer = model.apply(variables, X, iterations=[None, 2, None])
    masked = model.apply(variables, X, masks=[None, jnp.array([1, 1, 0, 0.0]), None])
    np.testing.assert_allclose(fewer, masked, rtol=1e-5, atol=1e-5)


def test_more_iterations_continue_with_the_last_blocks_variables():
    cfg = model_config((2, 3, 2), "raw", "middle", sd=False)
    model = sharing.build_model(cfg, 10, keep_activations=True)
    variables = randomize_stats(init(model, X))
    _, trained = model.apply(variables, X)
    _, longer = model.apply(variables, X, iterations=[None, 4, None])
    (_, out2), (_, out4) = trained[1], longer[1]
    assert out4.shape[0] == 4
    np.testing.assert_allclose(out4[:2], out2, rtol=1e-5, atol=1e-5)
    p, s = variables["params"]["level2"], variables["batch_stats"]["level2"]
    last = lambda t: jax.tree.map(lambda v: v[-1], t["blocks"]["block"]["residual"])
    x = out2[-1]
    for i in range(2):
        x = jax.nn.relu(x + residual(x, last(p), last(s), p["conv1_kernel"], p["conv2_kernel"]))
        np.testing.assert_allclose(out4[2 + i], x, rtol=1e-4, atol=1e-4)


def test_more_iterations_than_trained_needs_a_shared_level():
    model = sharing.build_model(model_config((2, 3, 2), "nonshared", "middle"), 10)
    variables = init(model, X)
    with pytest.raises(ValueError, match="raw-shared"):
        model.apply(variables, X, iterations=[None, 4, None])


def test_bad_per_level_arguments_and_sizes_are_named():
    model = sharing.build_model(model_config((2, 3, 2), "raw", "middle"), 10)
    variables = init(model, X)
    with pytest.raises(ValueError, match="masks has 2 entries for 3 levels"):
        model.apply(variables, X, masks=[None, None])
    for bad in (-1, 2.7, True):
        with pytest.raises(ValueError, match="each None or an integer >= 0"):
            model.apply(variables, X, iterations=[None, bad, None])
    assert model.apply(variables, X, iterations=[None, np.int64(2), None]).shape == (4, 10)
    with pytest.raises(ValueError, match="blocks_per_level has 3 entries for 2 levels"):
        init(ResNet(blocks_per_level=(2, 2, 2), widths=(16, 32)), X)
    with pytest.raises(ValueError, match="10x10 images: .* divisible by 4"):
        init(model, jnp.zeros((1, 10, 10, 3)))
    with pytest.raises(ValueError, match="scope='Middle' is not one of middle, all"):
        sharing.levels_in_scope("Middle")


def test_unrolled_blocks_compute_the_same_network():
    model = sharing.build_model(model_config((2, 3, 3), "raw", "all", sd=True), 10)
    variables = randomize_stats(init(model, X))
    unrolled = model.clone(unroll=True)
    np.testing.assert_allclose(
        unrolled.apply(variables, X), model.apply(variables, X), rtol=1e-5, atol=1e-5
    )


def test_blocks_branch_only_under_stochastic_depth_or_a_mask():
    """Without stochastic depth or a mask every block runs: no `cond`, whose untaken
    branch's zero-filled residuals cost a CPU step time; with either, blocks can be skipped."""
    cfg = model_config((2, 2, 2), "nonshared", "all", sd=False)
    model = sharing.build_model(cfg, 10)
    variables = init(model, X)

    def has_cond(model, **kw):
        apply = lambda v: model.apply(
            v, X, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"], **kw
        )
        return "cond[" in str(jax.make_jaxpr(apply)(variables))

    assert not has_cond(model)
    assert has_cond(model, masks=[jnp.ones(2), jnp.ones(1), jnp.ones(1)])
    cfg.stochastic_depth = True
    assert has_cond(sharing.build_model(cfg, 10))


def train_step(model, variables, key=0, **fields):
    """One training pass of `model` with `fields` changed, dropout key `key`, loss
    mean(logits^2): ((loss, (logits, new batch_stats)), gradients w.r.t. the params)."""

    def loss(params):
        logits, new = model.clone(**fields).apply(
            {**variables, "params": params},
            X,
            train=True,
            rngs={"dropout": jax.random.key(key)},
            mutable=["batch_stats"],
        )
        return jnp.mean(logits**2), (logits, new["batch_stats"])

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_sd_strategies_equal_cond_in_outputs_gradients_and_statistics():
    """`masked` and `compact` run the draws `cond` runs: the same logits bit for bit, a
    dropped block's BatchNorm statistics untouched, the other statistics and the
    gradients equal to float32 rounding (XLA fuses the reductions differently under
    each). The draws must drop some blocks and keep others, and leave `compact` a bucket
    with spare slots (dropped blocks run masked): levels of 5 scanned blocks, 4 buckets."""
    blocks = (2, 6, 6)
    cfg = model_config(blocks, "nonshared", "all", sd=True)
    cfg.final_death_rate = 0.9
    model = sharing.build_model(cfg, 10)
    variables = init(model, X)

    step = lambda impl, sd=True: train_step(  # dropout key 2: survivors (2, 1, 3)
        model, variables, key=2, sd_impl=impl, final_death_rate=0.9 * sd
    )

    (_, (logits, stats)), grads = step("cond")
    (_, (all_run, _)), _ = step("cond", sd=False)
    assert not np.allclose(logits, all_run, atol=1e-3)
    # Per scanned block: were its statistics updated (it ran) or kept as they were (dropped)?
    levels = lambda s: [s[f"level{i}"]["blocks"]["block"]["residual"] for i in (1, 2, 3)]
    updated = lambda s: np.concatenate(
        [
            np.any(new["bn1"]["mean"] != old["bn1"]["mean"], axis=1)
            for new, old in zip(levels(s), levels(variables["batch_stats"]))
        ]
    )
    ran = updated(stats)
    assert ran.any() and not ran.all(), ran
    kernel_grads = levels(grads)[2]["conv1"]["kernel"].reshape(5, -1)
    np.testing.assert_array_equal(np.any(kernel_grads != 0, axis=1), ran[-5:])
    # Survivors per level against `compact`'s buckets (levels 2 and 3 start with a pad block).
    survival = [1 - r[i > 0 :] for i, r in enumerate(death_rates(blocks, 0.9))]
    survivors = [int(r.sum()) for r in np.split(ran, [2, 7])]
    buckets = [stochastic_depth.sd_buckets(p) for p in survival]
    spare = [min(n for n in b if n >= k) - k for b, k in zip(buckets, survivors)]
    assert any(spare), (survivors, spare)

    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for impl in ("masked", "compact"):
        (_, (other_logits, other_stats)), other_grads = step(impl)
        np.testing.assert_array_equal(other_logits, logits)
        np.testing.assert_array_equal(updated(other_stats), ran)
        jax.tree.map(close, other_stats, stats)
        jax.tree.map(close, other_grads, grads)


def test_convolutions_as_matrix_products_train_the_same_network():
    """`conv_impl` "gemm" and "kernel_gemm" (every conv, stem and strided ones included,
    shared or not, with stochastic depth branching or masked) give the XLA convolutions'
    logits, statistics and gradients to float32 rounding."""
    cfg = model_config((2, 3, 3), "raw", "middle", sd=True)
    model = sharing.build_model(cfg, 10)
    variables = init(model, X)

    for sd_impl in ("cond", "masked"):
        want = train_step(model, variables, conv_impl="xla", sd_impl=sd_impl)
        for conv_impl in ("gemm", "kernel_gemm"):
            got = train_step(model, variables, conv_impl=conv_impl, sd_impl=sd_impl)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want
            )


def test_sd_strategies_branch_as_designed_and_auto_follows_the_platform():
    """`masked` has no conditional; `compact` one switch per level; `auto` is `cond` on a CPU."""
    cfg = model_config((2, 3, 3), "nonshared", "all", sd=True)
    model = sharing.build_model(cfg, 10)
    variables = init(model, X)

    def conds(impl):
        apply = lambda v: model.clone(sd_impl=impl).apply(
            v, X, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
        )
        return str(jax.make_jaxpr(apply)(variables)).count("cond[")

    assert conds("cond") == 2 + 3  # two padding blocks, one scanned body per level
    assert conds("masked") == 0
    assert conds("compact") == 3
    assert conds("auto") == conds("cond")  # the tests run on the CPU
    assert stochastic_depth.sd_impl_for("auto", "cpu") == "cond"
    assert stochastic_depth.sd_impl_for("auto", "gpu") == stochastic_depth.SD_AUTO_DEFAULT
    with pytest.raises(ValueError, match="model.sd_impl='skip' is not one of auto, cond"):
        stochastic_depth.sd_impl_for("skip")


def test_sd_buckets_hold_every_count_and_shorten_the_expected_scan():
    survival = 1.0 - death_rates((18, 18, 18), 0.5)[2][1:]
    lengths = stochastic_depth.sd_buckets(survival)
    assert lengths[-1] == 17 and len(lengths) <= stochastic_depth.SD_BUCKETS
    assert list(lengths) == sorted(set(lengths))
    pmf = np.ones(1)
    for p in survival:
        pmf = np.convolve(pmf, [1 - p, p])
    expected = lambda ls: sum(q * min(n for n in ls if n >= k) for k, q in enumerate(pmf))
    assert expected(lengths) < 0.8 * 17  # the 17 blocks survive 58% on average
    for other in ((17,), (8, 12, 17), (10, 12, 14, 17)):  # no other choice does better
        assert expected(lengths) <= expected(other) + 1e-9
    assert stochastic_depth.sd_buckets(np.ones(5)) == (5,)
