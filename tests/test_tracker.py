"""The Re3-style tracker: its curriculum, state resets, measures and input checks; the
glimpse task's checks; both tasks' packs of seeds through the loop, stopped and resumed."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import assert_pack_resumes_to_each_seed_alone, random_variables, set_field

from experiments.configs import glimpses as glimpses_config
from experiments.configs import tracker as tracker_config
from rvm.analysis.measures import recovery, tracking_scores, wilson
from rvm.analysis.where_to_look import evaluate_tracker, read
from rvm.errors import ConfigError
from rvm.models.glimpse import crop_to_box
from rvm.models.tracker import Re3, track
from rvm.tasks import tracker as tracker_task
from rvm.train.config_check import validate
from rvm.train.metrics import read_jsonl
from rvm.train.sharding import data_mesh

MODEL = Re3(size=8, scales=2, features=2, hidden=6)
B, T, H = 2, 5, 20


@pytest.fixture(scope="module")
def video():
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.uniform(0, 1, (B, T, H, H, 1)), jnp.float32)
    boxes = jnp.asarray(np.tile([[4.0, 5.0, 12.0, 13.0]], (B, T, 1)), jnp.float32)
    params = random_variables(MODEL, (frames[:, :2], boxes[:, 0]), scale=0.3)["params"]
    return frames, boxes, params


def _track(video, resets):
    frames, boxes, params = video
    starts = jnp.arange(T) == 0
    return _jit_track(params, frames, boxes, starts, jnp.ones((T, B), bool), resets)


_jit_track = jax.jit(lambda *a: track(MODEL, *a))


def test_reset_every_frame_is_one_step_from_the_state_after_the_first_frame(video):
    frames, boxes, params = video
    every = _track(video, jnp.arange(T) > 0)
    never = _track(video, jnp.zeros(T, bool))
    # the state matters: without resets the boxes differ
    assert np.max(np.abs(np.asarray(every["boxes"][2:] - never["boxes"][2:]))) > 1e-4
    # the same frames one step at a time, each from the state after frame 0 (no carry)
    step = jax.jit(lambda *a: MODEL.apply({"params": params}, *a, method=Re3.step))
    first, _, _, _ = step(MODEL.initial_state(B), frames[:, 0], frames[:, 0], boxes[:, 0])
    box = boxes[:, 0]
    for t in range(1, T):
        _, crop_box, center, width = step(first, frames[:, t - 1], frames[:, t], box)
        box = crop_to_box(crop_box, center, width)
        np.testing.assert_allclose(np.asarray(every["boxes"][t]), np.asarray(box), atol=1e-4)


def test_feedforward_tracker_ignores_resets(video):
    frames, boxes, _ = video
    model = Re3(size=8, scales=2, features=2, hidden=6, recurrent=False)
    params = random_variables(model, (frames[:, :2], boxes[:, 0]), scale=0.3)["params"]
    run = jax.jit(
        lambda resets: track(
            model, params, frames, boxes, jnp.arange(T) == 0, jnp.ones((T, B), bool), resets
        )["boxes"]
    )
    assert np.max(np.abs(np.asarray(run(jnp.zeros(T, bool))[1:] - boxes[:, 0]))) > 1e-3
    np.testing.assert_allclose(run(jnp.arange(T) > 0), run(jnp.zeros(T, bool)), atol=1e-6)


def test_curriculum_switches_as_configured():
    train = ml_collections.ConfigDict({"max_unroll": 8, "stage_steps": 10, "own_final": 0.8})
    got = [tracker_task.curriculum(s, train) for s in (0, 9, 10, 19, 20, 500)]
    unrolls = [int(u) for u, _ in got]
    owns = [float(p) for _, p in got]
    assert unrolls == [2, 2, 4, 4, 8, 8]
    np.testing.assert_allclose(owns, [0, 0, 0.4, 0.4, 0.8, 0.8], atol=1e-6)


def test_training_windows_restart_at_each_segment():
    config = tracker_config.get_config("smoke")
    config.train.stage_steps = 3
    data = tracker_task.DeviceSplit(
        jnp.zeros((16, 9, 8, 8, 1), jnp.uint8), jnp.zeros((16, 9, 4), jnp.float32)
    )
    get_batch = jax.jit(tracker_task.make_get_batch(config, data_mesh()), static_argnums=3)
    for step, segment in ((0, 3), (3, 5), (6, 9)):
        _, _, starts, own, unroll, _ = get_batch(data, step, jax.random.key(0), 0)
        assert int(unroll) + 1 == segment
        assert np.flatnonzero(np.asarray(starts)).tolist() == list(range(0, 9, segment))
    assert not np.asarray(get_batch(data, 0, jax.random.key(0), 0)[3]).any()  # p_own 0


def test_tracking_measures_on_known_tracks():
    ious = np.array([[1.0, 0.9, 0.0, 0.0, 0.6, 0.7], [1.0, 0.05, 0.3, 0.2, 0.2, 0.2]])
    visible = np.array([[1, 1, 0, 0, 1, 1], [1, 0, 1, 1, 1, 1]], bool)
    assert recovery(ious, visible, window=1) == (0.5, 2)  # row 0 recovers at once, row 1 not
    scores = tracking_scores(ious, visible, window=1)
    after = ious[:, 1:]
    assert scores["mean_iou"] == pytest.approx(after.mean())
    assert scores["success_rate"] == pytest.approx(3 / 10)
    assert scores["failure_rate"] == pytest.approx(3 / 10)
    assert scores["failure_rate_occluded"] == pytest.approx(1.0)  # frames 2-3 of row 0, 1 of row 1
    low, high = wilson(5, 100)
    assert low < 5 < high and high - low < 10


def test_tracking_intervals_resample_tracks_not_frames():
    """Ten tracks followed throughout and ten lost throughout: the frames say little about
    the next track, the tracks do (a frame bootstrap would give about +-0.04 here)."""
    ious = np.repeat([[1.0], [0.0]], 10, axis=0) * np.ones((20, 65))
    visible = np.ones_like(ious, bool)
    visible[:, 3] = False  # one occlusion per track, recovered by the followed ones only
    scores = tracking_scores(ious, visible, window=2)
    for name in ("mean_iou", "success_rate", "recovery"):
        low, high = scores["intervals"][name]
        assert low < scores[name] == 0.5 < high and high - low > 0.3, name
    low, high = scores["intervals"]["failure_rate"]
    assert low < 0.5 < high and high - low > 0.3
    assert tracking_scores(ious, np.ones_like(visible), 2)["intervals"]["recovery"] is None


def test_follow_refuses_a_first_box_outside_the_frame(video):
    frames, _, params = video
    with pytest.raises(ConfigError, match="leaves the 20x20 frame"):
        tracker_task.follow(MODEL, params, np.zeros((1, T, H, H, 1), np.uint8), [[15, 2, 25, 8]])


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.size", 0, "model.size=0 must be a positive integer"),
        ("model.scales", -1, "model.scales=-1 must be a positive integer"),
        ("train.max_unroll", 6, "must be a power of 2"),
        ("data.digit_size", 80, "digit_size must be in"),
    ],
)
def test_tracker_config_errors(field, value, message):
    config = tracker_config.get_config("smoke")
    set_field(config, field, value)
    with pytest.raises(ConfigError, match=message):
        validate(config)  # what train_and_evaluate calls first


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.size", 0, "model.size=0 must be a positive integer"),
        ("model.glimpses", 0, "model.glimpses=0 must be a positive integer"),
        ("model.width", -2.0, "model.width=-2.0 must be a positive number"),
        ("data.canvas", 20, "data.canvas=20 is smaller than a digit"),
        ("model.policy", "greedy", "model.policy='greedy' is not one of"),
    ],
)
def test_glimpse_config_errors(field, value, message):
    config = glimpses_config.get_config("smoke")
    set_field(config, field, value)
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_tracker_pack_resumes_exactly_through_the_curriculum(tmp_path):
    config = tracker_config.get_config("smoke")
    config.data.update(canvas=24, digit_size=12, num_train=32, num_val=8, num_test=8)
    config.data.update(train_frames=9, test_frames=10)
    config.model.update(size=8, features=2, hidden=4)
    config.train.update(max_unroll=8, stage_steps=1)
    config.update(batch_size=16, eval_batch_size=8, num_epochs=2, log_every_steps=2)
    config.eval.update(reset_every=4, num_shown=1, speed_batches=())

    # stopped after the first step, inside the curriculum's first stage
    straight = assert_pack_resumes_to_each_seed_alone(config, tmp_path, stop_at=1)
    assert straight["finished"] and straight["step"] == 4
    records = read_jsonl(tmp_path / "alone/metrics.jsonl")
    # unroll 2 then 4 in epoch 1, 8 from step 2 on: the epoch means show the switch
    assert [r["train_unroll"] for r in records] == [3.0, 8.0]
    assert [r["train_p_own"] for r in records] == pytest.approx([0.25, 1.0])
    assert 0 <= straight["test"]["mean_iou"] <= 1

    # The final checkpoint evaluated again: the run's scores and intervals, which the
    # summary takes only while they agree with results.json.
    evaluated = evaluate_tracker(tmp_path / "alone")
    assert evaluated["step"] == 4
    assert evaluated["test"] == straight["test"]
    assert evaluated["test_no_reset"] == straight["test_no_reset"]
    assert read(tmp_path / "alone")["results"]["test"]["intervals"] == straight["test"]["intervals"]
    evaluated["test"]["mean_iou"] += 0.01
    (tmp_path / "alone/evaluated.json").write_text(json.dumps(evaluated))
    differs = r"differs from results.json \(step 4\) in test \['mean_iou'\]"
    with pytest.raises(ValueError, match=differs):
        read(tmp_path / "alone")


def test_glimpses_pack_resumes_to_each_seed_trained_alone(tmp_path):
    config = glimpses_config.get_config("smoke")  # RAM with the learned policy, clutter
    config.data.update(num_train=32, num_val=16, num_test=16)
    config.model.update(glimpses=2, hidden=8)
    config.update(batch_size=16, eval_batch_size=16)
    config.eval.update(compute_canvases=(), num_shown=2)
    straight = assert_pack_resumes_to_each_seed_alone(config, tmp_path, stop_at=3)
    assert straight["finished"] and straight["step"] == 4
