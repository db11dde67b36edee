"""Convolutional recurrent cells against NumPy transcriptions of their equations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables

from rvm.models import recurrent as rec


def np_conv(x, k, stride=1):
    """'SAME' NHWC convolution with XLA's padding split (extra pixel at the end)."""
    b, h, w, _ = x.shape
    kh, kw, _, cout = k.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, [(0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)])
    out = np.zeros((b, oh, ow, cout))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
            out += patch @ k[i, j]
    return out


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_bn(z, scale, bias, eps=1e-5):
    mean, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
    return (z - mean) / np.sqrt(var + eps) * scale + bias


def inputs(shape=(2, 6, 6, 3), features=4, stride=1, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    hs = (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), features)
    return x, rng.normal(size=hs).astype(np.float32), rng.normal(size=hs).astype(np.float32)


def p(v, *path):
    out = v["params"]
    for key in path:
        out = out[key]
    return np.asarray(out, np.float64)


@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2)])
def test_elman_matches_numpy(kernel, stride):
    cell = rec.ConvElmanCell(features=4, kernel_size=kernel, strides=stride)
    x, h, _ = inputs(stride=stride)
    carry = rec.HiddenCarry(jnp.array(3), jnp.asarray(h))
    v = random_variables(cell, carry, x, train=False)
    new, y = cell.apply(v, carry, x, train=False)
    want = np.tanh(
        np_conv(x, p(v, "ih", "kernel"), stride) + np_conv(h, p(v, "hh", "kernel")) + p(v, "bias")
    )
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new.h, want, rtol=1e-4, atol=1e-5)
    assert int(new.t) == 4


@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 2)])
def test_gru_matches_numpy(kernel, stride):
    cell = rec.ConvGRUCell(features=4, kernel_size=kernel, strides=stride)
    x, h, _ = inputs(stride=stride)
    carry = rec.HiddenCarry(jnp.array(0), jnp.asarray(h))
    v = random_variables(cell, carry, x, train=False)
    _, y = cell.apply(v, carry, x, train=False)
    wx, b = np_conv(x, p(v, "ih", "kernel"), stride), p(v, "bias")
    wh = np_conv(h, p(v, "hh", "kernel"))
    r = sigmoid(wx[..., :4] + wh[..., :4] + b[:4])
    z = sigmoid(wx[..., 4:8] + wh[..., 4:] + b[4:8])
    n = np.tanh(wx[..., 8:] + np_conv(r * h, p(v, "hn", "kernel")) + b[8:])
    np.testing.assert_allclose(y, (1 - z) * h + z * n, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,peephole", [(1, 1, False), (3, 1, True), (3, 2, False)])
def test_lstm_matches_numpy(kernel, stride, peephole):
    cell = rec.ConvLSTMCell(features=4, kernel_size=kernel, strides=stride, peephole=peephole)
    x, h, c = inputs(stride=stride)
    carry = rec.LSTMCarry(jnp.array(0), jnp.asarray(c), jnp.asarray(h))
    v = random_variables(cell, carry, x, train=False)
    new, y = cell.apply(v, carry, x, train=False)
    z = np_conv(x, p(v, "ih", "kernel"), stride) + np_conv(h, p(v, "hh", "kernel")) + p(v, "bias")
    i, f, g, o = np.split(z, 4, axis=-1)
    if peephole:
        w = p(v, "peephole")
        i, f = i + w[0] * c, f + w[1] * c
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    if peephole:
        o = o + w[2] * c_new
    np.testing.assert_allclose(new.c, c_new, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y, sigmoid(o) * np.tanh(c_new), rtol=1e-4, atol=1e-5)


def test_lstm_forget_bias_starts_at_one():
    bias = rec._lstm_bias_init(jax.random.key(0), (16,))
    np.testing.assert_array_equal(bias, np.repeat([0.0, 1.0, 0.0, 0.0], 4))


def test_time_batchnorm_uses_and_updates_only_its_step():
    cell = rec.ConvElmanCell(features=4, norm="time", num_steps=3)
    x, h, _ = inputs()
    t = 1
    carry = rec.HiddenCarry(jnp.array(t), jnp.asarray(h))
    v = random_variables(cell, carry, x, train=False)
    assert v["batch_stats"]["bn_x"]["mean"].shape == (3, 4)  # statistics per step
    assert v["params"]["bn_x"]["scale"].shape == (4,)  # affine shared over steps
    (_, y), upd = cell.apply(v, carry, x, train=True, mutable=["batch_stats"])
    wx, wh = np_conv(x, p(v, "ih", "kernel")), np_conv(h, p(v, "hh", "kernel"))
    bn = lambda z, name: np_bn(z, p(v, name, "scale"), p(v, name, "bias"))
    want = np.tanh(bn(wx, "bn_x") + bn(wh, "bn_h") + p(v, "bias"))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    old, new = v["batch_stats"]["bn_x"]["mean"], upd["batch_stats"]["bn_x"]["mean"]
    np.testing.assert_allclose(
        new[t], 0.9 * old[t] + 0.1 * wx.mean((0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(np.delete(new, t, 0), np.delete(old, t, 0))

    # update_stats=False (padding frames) leaves the statistics alone
    _, frozen = cell.apply(v, carry, x, train=True, update_stats=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(frozen["batch_stats"]["bn_x"]["mean"], old)

    # evaluation reads row t; steps past the table reuse its last row
    def eval_out(step):
        c = rec.HiddenCarry(jnp.array(step), jnp.asarray(h))
        return np.asarray(cell.apply(v, c, x, train=False)[1])

    stats = v["batch_stats"]
    ra = lambda name, row: (
        np.asarray(stats[name]["mean"][row], np.float64),
        np.asarray(stats[name]["var"][row], np.float64),
    )

    def bn_eval(z, name, row):
        m, var = ra(name, row)
        return (z - m) / np.sqrt(var + 1e-5) * p(v, name, "scale") + p(v, name, "bias")

    want2 = np.tanh(bn_eval(wx, "bn_x", 2) + bn_eval(wh, "bn_h", 2) + p(v, "bias"))
    np.testing.assert_allclose(eval_out(2), want2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eval_out(10), want2, rtol=1e-4, atol=1e-4)
    assert not np.allclose(eval_out(0), want2)


def test_cells_run_under_nn_rnn_with_carried_batch_stats():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 6, 6, 2)), jnp.float32)
    cell = rec.ConvElmanCell(features=3, norm="time", num_steps=5, train=True)
    v = random_variables(nn.RNN(cell, variable_broadcast=("params", "batch_stats")), x)
    rnn = nn.RNN(cell, variable_carry="batch_stats")
    ys, upd = jax.jit(lambda v, x: rnn.apply(v, x, mutable=["batch_stats"]))(v, x)
    assert ys.shape == (2, 3, 6, 6, 3)
    old, new = v["batch_stats"]["cell"]["bn_x"]["mean"], upd["batch_stats"]["cell"]["bn_x"]["mean"]
    changed = np.any(np.asarray(old) != np.asarray(new), axis=1)
    np.testing.assert_array_equal(changed, [True, True, True, False, False])  # 3 frames, 3 rows


def test_run_sequence_snapshot_and_outputs_match_a_python_loop():
    cell = rec.ConvElmanCell(features=3)

    class Runner(nn.Module):
        @nn.compact
        def __call__(self, xs, at):
            c = rec.ConvElmanCell(features=3, name="cell")
            carry = c.initialize_carry(None, (xs.shape[0], *xs.shape[2:]))
            return rec.run_sequence(c, carry, xs, train=False, snapshot_at=at)

    xs = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 5, 5, 2)), jnp.float32)
    runner = Runner()
    v = random_variables(runner, xs, 0)
    cv = {k: v[k]["cell"] for k in v}
    carry = cell.initialize_carry(None, (2, 5, 5, 2))
    states, outs = [carry], []
    for t in range(4):
        carry, y = cell.apply(cv, carry, xs[:, t], train=False)
        states.append(carry)
        outs.append(y)
    run = jax.jit(runner.apply)  # one compilation, snapshot index traced
    for at in (0, 2, 4):
        final, snap, ys = run(v, xs, jnp.array(at))
        np.testing.assert_allclose(snap.h, states[at].h, rtol=1e-5, atol=1e-6)
        assert int(snap.t) == at
    np.testing.assert_allclose(final.h, states[4].h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys, jnp.stack(outs, 1), rtol=1e-5, atol=1e-6)


def test_detach_cuts_gradients():
    f = lambda a: jnp.sum(rec.detach({"x": a})["x"] * a)
    np.testing.assert_allclose(jax.grad(f)(jnp.array([2.0, 3.0])), [2.0, 3.0])
