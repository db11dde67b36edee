"""Overlap coherence training: schedules, state handover, truncation, losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from helpers import random_variables

from rvm.models import cbm
from rvm.tasks.video import clips

WINDOW = 5
clip_losses = jax.jit(clips.clip_losses, static_argnums=3)


@functools.lru_cache(maxsize=1)
def setup():
    """A small CBM classifier with per-time-step BatchNorm, and a batch of sequences."""
    # small graphs compile fast; Temporal Dropout exercises per-step keys inside the scans
    stack = cbm.make_stack("cbm", 1, 3, norm="time", num_steps=12, td_rate=0.5)
    model = cbm.VideoClassifier(stack, num_classes=4)
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.uniform(size=(2, 10, 4, 4, 1)), jnp.float32)
    labels = jnp.asarray([1, 3])
    return model, random_variables(model, frames[:, :2], scale=1.0), frames, labels


@functools.cache
def probe(train: bool, handover: str):
    """run_clips over 4 clips of a 5-frame window, jitted once per mode (compiling on CPU is
    the slow part of these tests; schedules are data)."""
    model, v, frames, _ = setup()

    def run(frames, schedule):
        return clips.run_clips(
            model, v["params"], v["batch_stats"], frames, schedule, WINDOW,
            rng=jax.random.key(0), train=train, handover=handover, collect_carries=True,
        )  # fmt: skip

    return jax.jit(run)


def reference_states(train: bool):
    """The stack's state after each prefix of the sequence, stepping its cell frame by frame."""
    model, v, frames, _ = setup()
    variables = {"params": v["params"]["stack"], "batch_stats": v["batch_stats"]["stack"]}
    carry = model.stack.initialize_carry(None, frames[:, 0].shape)
    states = [carry]
    for t in range(frames.shape[1]):
        (carry, _), _ = model.stack.apply(
            variables,
            carry,
            frames[:, t],
            train=train,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(t)},  # dropout never changes the forward pass
        )
        states.append(carry)
    return states


def test_overlap_schedule_overlaps_and_covers():
    seq_len, min_len, max_len = 40, 6, 10
    num = clips.clips_to_cover(seq_len, min_len, max_overlap=4)
    sample = jax.jit(
        jax.vmap(lambda k: clips.sample_overlap_schedule(k, seq_len, num, min_len, max_len, 4))
    )
    starts, lengths = map(np.asarray, sample(jax.random.split(jax.random.key(0), 200)))
    for s, n in zip(starts, lengths):
        active = n > 0
        k = int(active.sum())
        assert s[0] == 0 and np.all(active[:k]) and not np.any(active[k:])
        ends = s[:k] + n[:k]
        assert ends[-1] == seq_len  # the last clip reaches the end of the sequence
        assert np.all(n[: k - 1] >= min_len) and np.all(n[:k] <= max_len)
        # every clip starts strictly inside the previous one
        assert np.all(s[:k][1:] > s[:k][:-1]) and np.all(s[:k][1:] < ends[:-1])
    overlaps = (starts[:, :-1] + lengths[:, :-1] - starts[:, 1:])[lengths[:, 1:] > 0]
    assert overlaps.min() >= 1 and overlaps.max() <= 4 and len(np.unique(overlaps)) == 4


def test_tbptt_schedule_tiles_the_sequence():
    s, n = map(np.asarray, clips.tbptt_schedule(10, 4))
    np.testing.assert_array_equal(s, [0, 4, 8])
    np.testing.assert_array_equal(n, [4, 4, 2])


def test_each_clip_starts_from_the_state_of_the_frames_before_it():
    _, v, frames, _ = setup()
    schedule = clips.Schedule(jnp.array([0, 3, 5, 8]), jnp.array([5, 4, 5, 2]))
    out = probe(True, "overlap_start")(frames, schedule)
    states = reference_states(train=True)
    for k, start in enumerate([0, 3, 5, 8]):
        got = jax.tree.map(lambda a, k=k: a[k], out.start_carries)
        (ref,), (layer,) = states[start], got
        assert int(layer.t) == start  # per-step BatchNorm keeps counting
        np.testing.assert_allclose(layer.c, ref.c, rtol=1e-5, atol=1e-6)
    # padding frames past a clip's end leave the running statistics alone
    rows = np.asarray(out.batch_stats["stack"]["layer_0"]["r_bn"]["mean"])
    before = np.asarray(v["batch_stats"]["stack"]["layer_0"]["r_bn"]["mean"])
    np.testing.assert_array_equal(rows[10:], before[10:])
    assert np.all(rows[:10] != before[:10])


def test_clip_end_handover_is_the_state_after_the_whole_clip():
    _, v, frames, labels = setup()
    schedule = clips.Schedule(jnp.array([0, 3, 6, 8]), jnp.array([4, 4, 3, 2]))
    out = probe(False, "clip_end")(frames, schedule)
    states = reference_states(train=False)
    second = jax.tree.map(lambda a: a[1], out.start_carries)
    # the overlap (frame 3) is read again from the state after frame 3, but with the time
    # index of frame 3, the one an uninterrupted pass (and evaluation) gives that frame
    assert int(states[4][0].t) == 4 and int(second[0].t) == 3
    np.testing.assert_allclose(second[0].c, states[4][0].c, rtol=1e-5, atol=1e-6)
    third = jax.tree.map(lambda a: a[2], out.start_carries)
    assert int(third[0].t) == 6
    jax.tree.map(np.testing.assert_array_equal, out.batch_stats, v["batch_stats"])
    # the overlap is read a second time from a state that has seen it: predictions differ,
    # so here (the authors' scheme) the coherence loss has something to act on
    assert float(clip_losses(out, labels, schedule, 10)[1]) > 1e-9


def test_gradients_stop_at_clip_boundaries():
    model, v, frames, _ = setup()
    schedule = clips.Schedule(jnp.array([0, 3, 5, 8]), jnp.array([5, 4, 5, 2]))
    run = probe(False, "overlap_start")

    @jax.jit
    def grad(weights):
        return jax.grad(lambda x: jnp.sum(run(x, schedule).logits[..., 0] * weights[:, None]))(
            frames
        )

    later = np.asarray(grad(jnp.zeros((4, WINDOW)).at[1, :4].set(1.0)))  # clip 1: frames 3..6
    assert np.abs(later[:, 3:7]).max() > 0
    np.testing.assert_array_equal(later[:, :3], 0.0)  # before the clip: truncated
    np.testing.assert_array_equal(later[:, 7:], 0.0)
    # within a clip the gradient does travel back in time, so the zeros above are the cut
    own = np.asarray(grad(jnp.zeros((4, WINDOW)).at[0, 4].set(1.0)))  # clip 0, frame 4
    assert np.abs(own[:, :3]).max() > 0


def test_coherence_loss():
    rng = np.random.default_rng(0)
    p = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32))
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32))
    mask = jnp.array([[True, False, False], [True, False, False]])

    @jax.jit  # one compilation instead of many eager ones
    def values(p, q):
        return (
            clips.coherence_loss(p, p),
            clips.coherence_loss(p, q),
            clips.coherence_loss(p, q, mask),
            jax.grad(lambda b: clips.coherence_loss(p, b))(q),
            jax.grad(lambda a: clips.coherence_loss(a, q))(p),
        )

    same, diff, masked, g_prev, g_curr = values(p, q)
    assert float(same) == 0.0
    np.testing.assert_allclose(diff, np.mean((p - q) ** 2), rtol=1e-6)
    np.testing.assert_allclose(masked, np.mean(np.asarray(p - q)[:, 0] ** 2), rtol=1e-6)
    # the previous clip's side is the fixed reference
    np.testing.assert_array_equal(g_prev, 0.0)
    assert np.abs(g_curr).max() > 0


def test_coherence_compares_the_same_frames_of_consecutive_clips():
    schedule = clips.Schedule(jnp.array([0, 3, 5]), jnp.array([5, 4, 3]))
    window, classes = 5, 3
    frame = np.asarray(schedule.starts)[:, None] + np.arange(window)[None]  # absolute index
    logits = np.sin(frame[:, None, :, None] * np.arange(1, classes + 1))  # a function of frame
    logits = np.broadcast_to(logits, (3, 2, window, classes)).astype(np.float32)
    valid = jnp.asarray(np.arange(window)[None] < np.asarray(schedule.lengths)[:, None])
    labels = jnp.zeros(2, jnp.int32)

    def coherence(logits):
        out = clips.ClipOutputs(jnp.asarray(logits), valid, None, None)
        _, coh, metrics = clip_losses(out, labels, schedule, 8)
        return float(coh), metrics

    coh, metrics = coherence(logits)
    assert coh < 1e-12
    assert float(metrics["overlap_frames"]) == 2 + 2  # frames 3, 4, then 5, 6
    logits[1, :, 1, 0] += 1.0  # clip 1's frame 4: inside its overlap with clip 0
    inside = coherence(logits)[0]
    assert inside > 1e-3
    logits[2, :, 2, 0] += 1.0  # clip 2's frame 7: outside every overlap
    np.testing.assert_allclose(coherence(logits)[0], inside, rtol=1e-6)


def test_loss_functions_plug_into_a_generic_step():
    model, v, frames, labels = setup()
    overlap = dict(num_clips=clips.clips_to_cover(10, 4, 2), min_len=4, max_len=5, max_overlap=2)
    batch, key = (frames, labels), jax.random.key(0)
    # remat=False: a smaller graph to compile; the rematerialised path is differentiated in
    # test_gradients_stop_at_clip_boundaries
    loss_fn = clips.make_overlap_loss_fn(model, remat=False, **overlap)
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=4)
    (loss, (stats, metrics)), grads = step(v["params"], v["batch_stats"], batch, key, True)
    assert np.isfinite(loss) and float(metrics["covered_fraction"]) == 1.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.abs(grads["head"]["kernel"]).max() > 0
    assert np.abs(grads["stack"]["layer_0"]["t_conv"]["kernel"]).max() > 0
    moved = jax.tree.map(lambda a, b: np.any(a != b), stats, v["batch_stats"])
    assert all(jax.tree.leaves(moved))
    # every default: the overlap is read again from a state that has seen it, so the
    # coherence term has something to act on
    assert float(metrics["overlap_frames"]) > 0
    assert float(metrics["coherence"]) > 1e-9
    metrics_keys = tuple(metrics)
    # plain truncated and full BPTT have the same interface (traced, not compiled: slow on CPU)
    for fn in (clips.make_tbptt_loss_fn(model, clip_len=4), clips.make_full_bptt_loss_fn(model)):
        loss, (stats, metrics) = jax.eval_shape(
            lambda p, s, fn=fn: fn(p, s, batch, key, True), v["params"], v["batch_stats"]
        )
        assert loss.shape == () and set(metrics) == set(metrics_keys)
        assert jax.tree.structure(stats) == jax.tree.structure(v["batch_stats"])


def test_per_frame_labels_and_accuracy():
    rng = np.random.default_rng(0)
    schedule = clips.tbptt_schedule(15, 5)
    logits = jnp.asarray(rng.normal(size=(3, 2, 5, 3)), jnp.float32)  # [K, B, window, C]
    out = clips.ClipOutputs(logits, jnp.ones((3, 5), bool), None, None)
    labels = jnp.asarray(rng.integers(0, 3, (2, 15)))
    task, _, metrics = clip_losses(out, labels, schedule, 15)
    flat = np.concatenate(list(np.asarray(logits)), axis=1)  # [B, 15, C] in frame order
    logp = flat - np.log(np.exp(flat).sum(-1, keepdims=True))
    want = -np.mean(np.take_along_axis(logp, np.asarray(labels)[..., None], -1))
    np.testing.assert_allclose(task, want, rtol=1e-5)
    acc = np.mean(flat.argmax(-1) == np.asarray(labels))
    np.testing.assert_allclose(metrics["frame_accuracy"], acc, rtol=1e-6)


def test_coherence_gradient_reaches_only_the_later_clip_on_the_overlap():
    """With every default, the coherence term of two clips that overlap on frames 3-4 is
    non-zero, and its gradient reaches the frames the later clip reads up to the end of
    the overlap, nothing before the later clip (the earlier clip is the fixed reference,
    the handed-over state is detached) and nothing after the overlap (it is not compared)."""
    model, v, frames, labels = setup()
    schedule = clips.Schedule(jnp.array([0, 3]), jnp.array([5, 5]))

    @jax.jit
    def coherence(params, frames):
        out = clips.run_clips(
            model, params, v["batch_stats"], frames, schedule, WINDOW,
            rng=jax.random.key(0), train=False,
        )  # fmt: skip
        return clips.clip_losses(out, labels, schedule, frames.shape[1])[1]

    value, (g_params, g_frames) = jax.value_and_grad(coherence, argnums=(0, 1))(v["params"], frames)
    assert float(value) > 1e-9
    assert np.abs(g_params["head"]["kernel"]).max() > 0
    per_frame = np.abs(np.asarray(g_frames)).reshape(frames.shape[:2] + (-1,)).max(axis=(0, 2))
    assert np.all(per_frame[3:5] > 0)
    np.testing.assert_array_equal(per_frame[:3], 0.0)
    np.testing.assert_array_equal(per_frame[5:], 0.0)
