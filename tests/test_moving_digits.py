"""Moving-digit videos: determinism, rendering, motion labels, no single-frame leak."""

import importlib.util

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from rvm.data import moving_digits as md


def test_digits_are_real_upscaled_scans():
    train, test = md.load_digit_images(28, "train"), md.load_digit_images(28, "test")
    assert train.shape == (md.NUM_TRAIN_DIGITS, 28, 28) and train.dtype == np.uint8
    assert len(train) + len(test) == 1797
    assert train.max() == 255 and (train > 0).mean() > 0.2
    # bilinear upscaling preserves the image: sampling pixel centres gives back the scan
    from sklearn.datasets import load_digits

    small = load_digits().images[0] / 16.0
    up = md.load_digit_images(32, "all")[0] / 255.0
    np.testing.assert_allclose(up[1::4, 1::4], small, atol=0.2)
    assert np.abs(up[1::4, 1::4] - small).mean() < 0.06


def test_prediction_videos_are_deterministic_per_seed():
    a = md.make_moving_digits(seed=3, num_sequences=4, num_frames=20, num_digits=2)
    b = md.make_moving_digits(seed=3, num_sequences=4, num_frames=20, num_digits=2)
    c = md.make_moving_digits(seed=4, num_sequences=4, num_frames=20, num_digits=2)
    assert a.frames.shape == (4, 20, 64, 64, 1) and a.frames.dtype == np.uint8
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.array_equal(a.frames, c.frames)
    inputs, targets = md.split_frames(a.frames, 10)
    assert inputs.shape[1] == 10 and targets.shape[1] == 10


def test_bouncing_digits_stay_inside_and_keep_their_speed():
    d = md.make_moving_digits(seed=0, num_sequences=64, num_frames=30, num_digits=1)
    pos = d.positions[:, :, 0]
    assert pos.min() >= 0 and pos.max() <= 64 - 28
    # between bounces the velocity is constant; a bounce flips one component's sign
    step = np.diff(pos, axis=1)
    speed = np.abs(step).max(axis=1)  # [N, 2] the free speed along each axis
    free = np.abs(np.abs(step) - speed[:, None]) < 1e-4
    assert free.mean() > 0.8
    assert np.all(np.linalg.norm(speed, axis=-1) <= 4.0 + 1e-4)
    assert np.any(np.sign(step[:, 1:]) != np.sign(step[:, :-1]))  # there are bounces


def test_frames_show_the_digit_at_its_position():
    d = md.make_moving_digits(seed=1, num_sequences=3, num_frames=5, num_digits=1)
    digits = md.load_digit_images(28, "train")[d.digit_index[:, 0]]
    for n in range(3):
        for t in range(5):
            x, y = np.rint(d.positions[n, t, 0]).astype(int)
            want = np.zeros((64, 64), np.uint8)
            want[y : y + 28, x : x + 28] = digits[n]
            np.testing.assert_array_equal(d.frames[n, t, ..., 0], want)
    # two digits: each drawn where it is, the brighter pixel wins where they overlap
    two = md.make_moving_digits(seed=1, num_sequences=3, num_frames=5, num_digits=2)
    pair = md.load_digit_images(28, "train")[two.digit_index]
    each = [md.render(pair[:, i : i + 1], two.positions[:, :, i : i + 1]) for i in range(2)]
    np.testing.assert_array_equal(two.frames, np.maximum(*each))
    assert not np.array_equal(two.frames, each[0])


@pytest.fixture(scope="module")
def motion():
    return md.make_motion_digits(seed=0, num_sequences=600, num_frames=24)


def test_motion_labels_follow_from_the_trajectory(motion):
    assert np.array_equal(np.unique(motion.labels), np.arange(6))
    np.testing.assert_array_equal(md.motion_labels_from_trajectory(motion.positions), motion.labels)
    again = md.make_motion_digits(seed=0, num_sequences=600, num_frames=24)
    np.testing.assert_array_equal(again.frames, motion.frames)


def displacements(frames):
    """Integer shift between consecutive frames from the peak of their circular correlation."""
    f = np.fft.rfft2(frames[..., 0].astype(np.float32))
    corr = np.fft.irfft2(np.conj(f[:, :-1]) * f[:, 1:], s=frames.shape[2:4])
    flat = corr.reshape(*corr.shape[:2], -1).argmax(-1)
    dy, dx = np.unravel_index(flat, frames.shape[2:4])
    wrap = lambda d: (d + 32) % 64 - 32
    return np.stack([wrap(dx), wrap(dy)], -1)


def test_motion_labels_are_readable_from_the_frames(motion):
    # the frames are exact circular shifts of one digit: read the trajectory back from them
    clip = motion.frames[:200, :12]
    path = np.cumsum(displacements(clip), axis=1)
    recovered = md.motion_labels_from_trajectory(path.astype(np.float32), tol=0.5)
    assert np.mean(recovered == motion.labels[:200]) > 0.97


def test_one_frame_carries_no_label_information(motion):
    # coupled draws: the same seed with every label forced gives the same first frame
    firsts = [md.make_motion_digits(seed=5, num_sequences=50, labels=k).frames for k in range(6)]
    for other in firsts[1:]:
        np.testing.assert_array_equal(other[:, 0], firsts[0][:, 0])
        assert not np.array_equal(other[:, 5], firsts[0][:, 5])

    # any later frame: a classifier does no better than chance on one frame ...
    def pooled(frames):
        return frames[..., 0].reshape(len(frames), 8, 8, 8, 8).mean((2, 4)) / 255.0

    t = 11
    x = pooled(motion.frames[:, t]).reshape(600, -1)
    clf = LogisticRegression(C=1.0, max_iter=300).fit(x[:400], motion.labels[:400])
    assert clf.score(x[400:], motion.labels[400:]) < 0.3  # chance is 1/6
    # ... while the same classifier on frame-to-frame shifts (two or three frames) succeeds
    shifts = displacements(motion.frames[:, t : t + 3]).reshape(600, -1).astype(float)
    turn = shifts[:, 0] * shifts[:, 3] - shifts[:, 1] * shifts[:, 2]
    feats = np.concatenate([shifts, turn[:, None], np.abs(shifts)], 1)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(feats[:400], motion.labels[:400])
    assert clf.score(feats[400:], motion.labels[400:]) > 0.9


def test_motion_positions_are_uniform_at_every_time():
    d = md.make_motion_digits(seed=2, num_sequences=3000, num_frames=3)
    for k in range(6):
        wrapped = np.mod(d.positions[d.labels == k, 2, 0], 64)  # frame 2's corners
        hist = np.histogram(wrapped[:, 0], bins=4, range=(0, 64))[0] / len(wrapped)
        assert np.all(np.abs(hist - 0.25) < 0.07)


def test_long_sequences_for_overlap_training():
    d = md.make_motion_digits(seed=0, num_sequences=8, num_frames=48)
    assert d.frames.shape == (8, 48, 64, 64, 1)
    np.testing.assert_array_equal(md.motion_labels_from_trajectory(d.positions), d.labels)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="tf installed")
def test_moving_mnist_loader_says_what_is_missing():
    with pytest.raises(RuntimeError, match="tensorflow"):
        md.load_moving_mnist()
