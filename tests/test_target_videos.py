"""Target videos: masks are the target's visible pixels, determinism per seed, splits, errors."""

import numpy as np
import pytest

from rvm.data import target_videos as tv


@pytest.fixture(scope="module")
def videos():
    return tv.make_target_videos(seed=5, num_videos=24, num_frames=12, split="validation")


def test_shapes_and_determinism_per_seed(videos):
    again = tv.make_target_videos(seed=5, num_videos=24, num_frames=12, split="validation")
    other = tv.make_target_videos(seed=6, num_videos=24, num_frames=12, split="validation")
    assert videos.frames.shape == (24, 12, 64, 64, 1) and videos.frames.dtype == np.uint8
    assert videos.masks.shape == (24, 12, 64, 64) and videos.boxes.shape == (24, 12, 4)
    for field in ("frames", "masks", "boxes", "positions", "depth", "classes"):
        np.testing.assert_array_equal(getattr(videos, field), getattr(again, field))
    assert not np.array_equal(videos.frames, other.frames)
    assert not np.array_equal(videos.masks, other.masks)


def test_masks_are_the_visible_pixels_of_the_target(videos):
    """Rebuilt independently: the target's shape where no digit in front covers it."""
    pool, _ = tv.digit_pool("validation", 24)
    n, steps = videos.masks.shape[:2]
    occluded_somewhere = False
    for v in range(n):
        shapes = []
        for slot in range(videos.num_distractors[v] + 1):
            x, y = np.rint(videos.positions[v, :, slot]).astype(int).T
            shapes.append((slot, x, y))
        target = _shape_images(videos, pool, v)
        for t in range(steps):
            full = np.zeros((64, 64), bool)
            cover = np.zeros((64, 64), bool)
            for slot, x, y in shapes:
                canvas = np.zeros((64, 64), bool)
                canvas[y[t] : y[t] + 24, x[t] : x[t] + 24] = target[slot]
                if slot == 0:
                    full = canvas
                elif videos.depth[v, slot] > videos.depth[v, 0]:
                    cover |= canvas
            want = full & ~cover
            np.testing.assert_array_equal(videos.masks[v, t], want)
            occluded_somewhere |= bool((full & cover).any())
    assert occluded_somewhere, "no occlusion in the sample: the test would prove nothing"
    assert (videos.visible_fraction < 1).any() and (videos.visible_fraction[:, 0] == 1).all()


def _shape_images(videos, pool, v):
    """The digit shapes of video v's slots, found back from the frames of frame 0."""
    shapes = {}
    for slot in range(videos.num_distractors[v] + 1):
        x, y = np.rint(videos.positions[v, 0, slot]).astype(int)
        crop = videos.frames[v, 0, y : y + 24, x : x + 24, 0]
        shapes[slot] = crop >= tv.SHAPE_THRESHOLD  # frame 0 has no overlaps
        assert shapes[slot].any()
    return shapes


def test_boxes_are_half_open_extents_of_the_masks(videos):
    for v, t in [(0, 0), (3, 7), (11, 11)]:
        y0, x0, y1, x1 = videos.boxes[v, t]
        ys, xs = np.nonzero(videos.masks[v, t])
        assert (y0, x0, y1, x1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    empty = tv.boxes_from_masks(np.zeros((2, 8, 8), bool))
    np.testing.assert_array_equal(empty, 0)


def test_splits_draw_disjoint_digits_and_some_distractors_share_the_class():
    train, _ = tv.digit_pool("train", 24)
    val, _ = tv.digit_pool("validation", 24)
    test, _ = tv.digit_pool("test", 24)
    assert len(train) + len(val) + len(test) == 1797
    a = tv.make_target_videos(seed=0, num_videos=64, num_frames=2, split="train")
    b = tv.make_target_videos(seed=0, num_videos=64, num_frames=2, split="test")
    assert not np.array_equal(a.frames, b.frames)
    distractor = a.classes[:, 1:]
    same = (distractor == a.classes[:, :1]) & (distractor >= 0)
    assert 0.2 < same.sum() / (distractor >= 0).sum() < 0.9
    assert set(np.unique(a.num_distractors)) == {1, 2, 3}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=1), "num_frames must be >= 2"),
        (dict(distractors=(1, 4)), "4 distractors and the target need 5 cells"),
        (dict(canvas=40, distractors=(1, 1)), "holds 1 digits"),
        (dict(distractors=(2, 1)), "min <= max"),
        (dict(split="dev"), "split must be one of"),
        (dict(same_class=1.5), "same_class"),
    ],
)
def test_bad_arguments_give_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        tv.make_target_videos(seed=0, num_videos=2, **kwargs)
    assert "\n" not in str(err.value)


def test_a_target_hidden_in_frame_0_is_refused():
    digit = np.zeros((8, 8), np.uint8)
    digit[2:6, 2:6] = 255
    digits = np.stack([digit, np.full((8, 8), 255, np.uint8)])[None]  # [1, 2, 8, 8]
    positions = np.zeros((1, 3, 2, 2), np.float32)  # both at the origin: the square covers
    with pytest.raises(ValueError, match="target shows no pixel in frame 0"):
        tv.render_target_videos(digits, positions, np.array([[0, 1]]), canvas=16)
    frames, masks = tv.render_target_videos(digits, positions, np.array([[1, 0]]), canvas=16)
    assert masks[0, 0].sum() == 16 and frames[0, 0, 0, 0, 0] == 255
