"""Context Bridge Module: equations, Temporal Dropout, deep stacks, heads, parameter matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables

from rvm.models import cbm
from rvm.tasks.video import clips


def np_conv(x, k, b=0.0, stride=1):
    """'SAME' NHWC convolution with XLA's padding split."""
    n, h, w, _ = x.shape
    kh, kw, _, cout = k.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, [(0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)])
    out = np.zeros((n, oh, ow, cout)) + b
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i : i + stride * oh : stride, j : j + stride * ow : stride] @ k[i, j]
    return out


def np_maxpool3s2(x):
    n, h, w, c = x.shape
    xp = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=-np.inf)
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return np.stack(
        [xp[:, i : i + 2 * oh : 2, j : j + 2 * ow : 2] for i in range(3) for j in range(3)]
    ).max(0)


def np_bn(z, scale, bias):
    return (z - z.mean((0, 1, 2))) / np.sqrt(z.var((0, 1, 2)) + 1e-5) * scale + bias


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def cell_inputs(features=4, cin=3, size=6, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
    c = jnp.asarray(rng.uniform(size=(2, size, size, features)), jnp.float32)
    return x, cbm.CBMCarry(jnp.array(0), c)


@pytest.mark.parametrize(
    "merge,stride,kernel,norm",
    [
        ("product", 1, 3, "none"),
        ("add", 1, 1, "none"),
        ("concat", 1, 3, "none"),
        ("product", 2, 3, "batch"),
        ("concat", 2, 1, "batch"),
    ],
)
def test_cbm_cell_matches_numpy(merge, stride, kernel, norm):
    cell = cbm.CBMCell(features=4, kernel_size=kernel, strides=stride, merge=merge, norm=norm)
    x, carry = cell_inputs()
    v = random_variables(cell, carry, x, train=False, scale=0.3)
    (new, y), _ = cell.apply(v, carry, x, train=True, mutable=["batch_stats"])
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    xn, cn = np.asarray(x, np.float64), np.asarray(carry.c, np.float64)
    if norm == "none":
        r = np_conv(xn, P["r_conv"]["kernel"], P["r_conv"]["bias"], stride)
        t = np_conv(np.concatenate([xn, cn], -1), P["t_conv"]["kernel"], P["t_conv"]["bias"])
    else:
        r = np_bn(np_conv(xn, P["r_conv"]["kernel"], 0.0, stride), **P["r_bn"])
        t = np_bn(np_conv(np.concatenate([xn, cn], -1), P["t_conv"]["kernel"]), **P["t_bn"])
    r, t = np.maximum(r, 0.0), sigmoid(t)
    tp = np_maxpool3s2(t) if stride == 2 else t
    if merge == "product":
        want = r * tp
    elif merge == "add":
        want = r + tp
    else:
        m = P["merge"]
        want = np_conv(np.concatenate([r, tp], -1), m["kernel"], m["bias"])
    np.testing.assert_allclose(new.c, t, rtol=1e-4, atol=1e-5)  # carried state c = T
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert y.shape == (2, 6 // stride, 6 // stride, 4) and int(new.t) == 1


def test_representation_unit_ignores_the_temporal_state():
    cell = cbm.CBMCell(features=4, merge="add", norm="none")
    x, carry = cell_inputs()
    v = random_variables(cell, carry, x, train=False, scale=0.3)
    other = carry._replace(c=carry.c + 1.0)
    (n1, y1), (n2, y2) = (cell.apply(v, c, x, train=False) for c in (carry, other))
    assert not np.allclose(n1.c, n2.c)  # T sees the state ...
    np.testing.assert_allclose(y1 - n1.c, y2 - n2.c, rtol=1e-5, atol=1e-6)  # ... R does not


def test_temporal_dropout_cuts_only_the_representation_input_of_t():
    x, carry = cell_inputs()
    v = random_variables(cbm.CBMCell(features=4), carry, x, train=False, scale=0.3)

    def run(rate, x, params=None, key=0, train=True):
        cell = cbm.CBMCell(features=4, td_rate=rate)
        variables = {**v, "params": v["params"] if params is None else params}
        out, _ = cell.apply(
            variables,
            carry,
            x,
            train=train,
            rngs={"dropout": jax.random.key(key)},
            mutable=["batch_stats"],
        )
        return out

    # forward pass unchanged
    (c0, y0), (c1, y1) = run(0.0, x), run(1.0, x)
    np.testing.assert_array_equal(c0.c, c1.c)
    np.testing.assert_array_equal(y0, y1)

    grad_t = lambda rate, **kw: jax.grad(lambda x: jnp.sum(run(rate, x, **kw)[0].c ** 2))(x)
    open_path = grad_t(0.0)
    assert np.abs(open_path).max() > 1e-3  # without dropout T back-propagates into x_below
    np.testing.assert_array_equal(grad_t(1.0), 0.0)  # dropped: nothing flows through T
    # not training: no dropout, the path is open
    eval_path = grad_t(0.0, train=False)
    assert np.abs(eval_path).max() > 1e-3
    np.testing.assert_array_equal(grad_t(1.0, train=False), eval_path)

    # the representation path and T's own weights still learn
    assert np.abs(jax.grad(lambda x: jnp.sum(run(1.0, x)[1]))(x)).max() > 1e-3
    g = jax.grad(lambda p: jnp.sum(run(1.0, x, params=p)[0].c ** 2))(v["params"])
    assert np.abs(g["t_conv"]["kernel"]).max() > 1e-4

    # one coin per cell and step: each draw either keeps or cuts the whole path
    cut = []
    for key in range(6):
        g = np.asarray(grad_t(0.5, key=key))
        assert np.allclose(g, 0.0) or np.allclose(g, open_path, rtol=1e-4, atol=1e-7)
        cut.append(np.allclose(g, 0.0))
    assert 0 < sum(cut) < len(cut)


def test_width_schedule():
    widths, strides = cbm.width_schedule(16, 4, num_stages=3)
    assert widths == (4,) * 6 + (8,) * 5 + (16,) * 5
    assert strides == (1,) * 6 + (2,) + (1,) * 4 + (2,) + (1,) * 4
    assert cbm.width_schedule(2, 8, num_stages=3) == ((8, 16), (1, 2))


def step_stack(stack, frames, train, **kwargs):
    """Run a stack cell frame by frame (no scan: eager steps of a deep cell are cheap on CPU,
    compiling a deep scan is not)."""
    carry = stack.initialize_carry(None, frames[:, 0].shape)
    v = random_variables(stack, carry, frames[:, 0], scale=0.3)
    stats = v.get("batch_stats", {})
    for t in range(frames.shape[1]):
        variables = {"params": v["params"], "batch_stats": stats}
        (carry, y), upd = stack.apply(
            variables, carry, frames[:, t], train=train, mutable=["batch_stats"], **kwargs
        )
        stats = upd.get("batch_stats", {})
    return v, carry, y, stats


@pytest.mark.parametrize("merge", ["product", "add", "concat"])
def test_cbm_stack_runs_deep(merge):
    frames = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 2, 8, 8, 1)), jnp.float32)
    for depth in (2, 4, 16):
        stack = cbm.make_stack("cbm", depth, 4, merge=merge, norm="time", num_steps=4)
        steps = 1 if depth == 16 else 2  # eager steps of a 16-layer cell are the slow part
        v, carry, y, stats = step_stack(stack, frames[:, :steps], True)
        top = 1 if depth >= 3 else 2  # 8x8 -> stem /2 -> one stride 2 per later stage
        assert y.shape == (2, top, top, stack.widths[-1]) and np.all(np.isfinite(y))
        assert len(carry) == depth and all(int(c.t) == steps for c in carry)
        moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), v["batch_stats"], stats)
        assert all(jax.tree.leaves(moved))  # every BatchNorm saw both steps


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman"])
def test_conv_rnn_stack_runs_at_odd_depth(cell):
    stack = cbm.make_stack(cell, 3, 4)
    frames = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 2, 8, 8, 1)), jnp.float32)
    v, carry, y, _ = step_stack(stack, frames, False)
    assert y.shape == (2, 1, 1, 16) and np.all(np.isfinite(y)) and len(carry) == 3
    assert "shortcut_1" in v["params"]  # the stride-2 pair gets a projection
    assert "shortcut_2" not in v["params"]  # the odd last layer has no shortcut


def test_video_classifier_gives_per_frame_logits():
    model = cbm.VideoClassifier(cbm.make_stack("elman", 2, 3, num_stages=2), num_classes=5)
    frames = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 8, 8, 1)), jnp.float32)
    v = random_variables(model, frames, scale=0.3)
    out = jax.jit(model.apply)(v, frames)
    assert out.logits.shape == (2, 4, 5) and len(out.carry) == 2
    # frame t's logits depend on frames up to t only
    later = frames.at[:, 2:].set(0.0)
    out2 = jax.jit(model.apply)(v, later)
    np.testing.assert_allclose(out2.logits[:, :2], out.logits[:, :2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out2.logits[:, 2:], out.logits[:, 2:])


def test_param_counts_match_hand_counts():
    kw = dict(widths=(4, 8), strides=(1, 2), stem_features=None)
    cbm_stack = cbm.CBMStack(**kw)  # 3x3 convs without bias, BatchNorm scale + bias
    layer0 = 9 * 2 * 4 + 9 * (2 + 4) * 4 + 2 * 2 * 4
    layer1 = 9 * 4 * 8 + 9 * (4 + 8) * 8 + 2 * 2 * 8
    shortcut = 2 * 8 + 8  # 1x1 projection of the pair's input, stride 2
    assert cbm.stack_param_count(cbm_stack, (8, 8, 2)) == layer0 + layer1 + shortcut
    lstm = cbm.ConvRNNStack(cell="lstm", **kw)
    lstm0 = 9 * 2 * 16 + 9 * 4 * 16 + 16
    lstm1 = 9 * 4 * 32 + 9 * 8 * 32 + 32
    assert cbm.stack_param_count(lstm, (8, 8, 2)) == lstm0 + lstm1 + shortcut


def test_convlstm_width_matches_cbm_parameter_count():
    frame = (16, 16, 1)
    target = cbm.stack_param_count(cbm.make_stack("cbm", 2, 16), frame)
    width = cbm.match_convlstm_width(2, 16, frame, lstm_kwargs={"max_width": 64})
    count = lambda w: cbm.stack_param_count(cbm.make_stack("lstm", 2, w), frame)
    err = abs(count(width) - target)
    assert width < 16  # a ConvLSTM layer has about twice the weights of a CBM layer
    assert err <= abs(count(width - 1) - target) and err <= abs(count(width + 1) - target)
    assert err / target < 0.1


def test_frame_predictor_ten_in_ten_out():
    model = cbm.frame_predictor("cbm", 2, 4, num_future=10)
    frames = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 20, 64, 64, 1)), jnp.float32)
    v = random_variables(model, frames[:, :10], scale=0.3)
    loss_fn = clips.make_prediction_loss_fn(model, num_input=10)

    @jax.jit
    def run(v, frames):
        out = model.apply(v, frames[:, :10])
        return out, loss_fn(v["params"], v["batch_stats"], frames, jax.random.key(0), False)

    out, (loss, (_, metrics)) = run(v, frames)
    assert out.frames.shape == (1, 10, 64, 64, 1)
    assert float(out.frames.min()) >= 0.0 and float(out.frames.max()) <= 1.0
    np.testing.assert_allclose(out.frames, jax.nn.sigmoid(out.logits), rtol=1e-6)
    expect = np.mean((np.asarray(out.frames) - np.asarray(frames[:, 10:])) ** 2)
    np.testing.assert_allclose(metrics["mse"], expect, rtol=1e-5)
    assert np.isfinite(loss)


def test_shortcuts_fit_sizes_that_the_strides_round_up():
    """36x36 frames: the stem gives 18, the stage strides 9 then 5 (ceil), so the
    shortcut around the 18 -> 5 pair strides by 4, not 18 // 5."""
    stack = cbm.make_stack("cbm", 4, 4)
    frames = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 1, 36, 36, 1)), jnp.float32)
    v, carry, y, _ = step_stack(stack, frames, False)
    assert y.shape == (1, 5, 5, stack.widths[-1]) and np.all(np.isfinite(y))
    assert len(carry) == 4
