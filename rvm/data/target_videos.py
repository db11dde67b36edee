"""Videos that follow one target digit among distractors, with its visible mask per frame.

The setting of semi-supervised video object segmentation (DAVIS): the target's mask
is given in frame 0 and a model must segment it in every later frame. Each video
shows one target and 1..3 distractor digits (real scans, `moving_digits`), bouncing
off the edges at constant speed, drawn back to front in a random depth order, so a
distractor in front hides part of the target; a share of the distractors is of the
target's own class, so the class alone cannot tell the target apart.

Digits are opaque where their intensity reaches `SHAPE_THRESHOLD` (their shape) and
blend by maximum in the faint rim outside it. The target's mask in a frame is its
shape minus every pixel covered by the shape of a digit in front of it: exactly its
visible pixels. Its box is the mask's extent, `(y0, x0, y1, x1)` in pixels, half-open
(rows y0..y1-1, columns x0..x1-1), all zeros where nothing of the target is visible.

In frame 0 the digits sit in distinct cells of a `canvas // digit_size` grid, so
none overlaps another and the target is whole: a canvas with fewer cells than
digits is refused. Splits draw from their own seed streams and digit pools:
"train" from load_digits samples [0, 1300), "validation" from [1300, 1500) (digits
unseen in training, like the test digits, so choices made on it carry over) and
"test" from the held-out [1500, 1797).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from rvm.data.moving_digits import NUM_TRAIN_DIGITS, _reflect, load_digit_images

SHAPE_THRESHOLD = 100  # uint8 intensity from which a digit pixel is opaque and its own
NUM_FIT_DIGITS = 1300  # training digits for "train"; the rest of the training pool validates
SPLITS = {"train": 0, "validation": 1, "test": 2}  # each split's seed stream


@dataclasses.dataclass(frozen=True)
class TargetVideos:
    frames: np.ndarray  # [N, T, H, W, 1] uint8
    masks: np.ndarray  # [N, T, H, W] bool, the target's visible pixels
    boxes: np.ndarray  # [N, T, 4] int32 (y0, x0, y1, x1) half-open, zeros where not visible
    visible: np.ndarray  # [N, T] bool, any target pixel visible
    visible_fraction: np.ndarray  # [N, T] float32, visible pixels / the target's shape
    positions: np.ndarray  # [N, T, D, 2] float32 (x, y) top-left corners; slot 0 the target
    depth: np.ndarray  # [N, D] int32 drawing rank, 0 at the back; absent slots -1
    classes: np.ndarray  # [N, D] int32 digit class of each slot; absent slots -1
    num_distractors: np.ndarray  # [N] int32


@functools.lru_cache(maxsize=1)
def _digit_classes() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target.astype(np.int32)


def digit_pool(split: str, digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, s, s] uint8, classes [n]) that `split`'s videos draw their digits from."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    images, classes = load_digit_images(digit_size, "all"), _digit_classes()
    part = {
        "train": slice(0, NUM_FIT_DIGITS),
        "validation": slice(NUM_FIT_DIGITS, NUM_TRAIN_DIGITS),
        "test": slice(NUM_TRAIN_DIGITS, None),
    }[split]
    return images[part], classes[part]


def canvas_capacity(canvas: int, digit_size: int) -> int:
    """How many digits fit in frame 0 without overlapping (one per grid cell)."""
    return (canvas // digit_size) ** 2


def check_arguments(
    num_frames: int, canvas: int, digit_size: int, distractors: tuple[int, int]
) -> None:
    """Raises ValueError (one line) for arguments no video can be made from."""
    lo, hi = distractors
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 (frame 0 gives the mask), got {num_frames}")
    if not 0 < digit_size <= canvas:
        raise ValueError(f"digit_size must be in (0, canvas={canvas}], got {digit_size}")
    if not 0 <= lo <= hi:
        raise ValueError(f"distractors must be (min, max) with 0 <= min <= max, got {distractors}")
    cap = canvas_capacity(canvas, digit_size)
    if hi + 1 > cap:
        raise ValueError(
            f"{hi} distractors and the target need {hi + 1} cells but a {canvas}px canvas "
            f"holds {cap} digits of {digit_size}px; use fewer distractors or a larger canvas"
        )


def _place(images: np.ndarray, corners: np.ndarray, canvas: int) -> np.ndarray:
    """[n, canvas, canvas] with images [n, s, s] at integer (x, y) corners [n, 2], else 0."""
    n, size = images.shape[:2]
    out = np.zeros((n, canvas, canvas), np.uint8)
    rows = corners[:, 1, None] + np.arange(size)
    cols = corners[:, 0, None] + np.arange(size)
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = images
    return out


def render_target_videos(
    digits: np.ndarray, positions: np.ndarray, depth: np.ndarray, canvas: int
) -> tuple[np.ndarray, np.ndarray]:
    """(frames [N, T, H, W, 1] uint8, target masks [N, T, H, W] bool) by depth order.

    digits [N, D, s, s] (slot 0 the target; an all-zero image is an absent slot),
    positions [N, T, D, 2] (x, y) top-left corners, depth [N, D] drawing ranks (0 at
    the back). Raises ValueError if the target shows no pixel in frame 0, since its
    first mask is all a tracker is given.
    """
    n, steps, slots = positions.shape[:3]
    corners = np.rint(positions).astype(np.int64)
    order = np.argsort(depth, axis=1, kind="stable")  # back to front
    frames = np.zeros((n, steps, canvas, canvas), np.uint8)
    owner = np.full((n, steps, canvas, canvas), -1, np.int8)  # slot of the front shape
    rows = np.arange(n)
    for t in range(steps):
        for k in range(slots):
            slot = order[:, k]
            layer = _place(digits[rows, slot], corners[rows, t, slot], canvas)
            shape = layer >= SHAPE_THRESHOLD
            frames[:, t] = np.where(shape, layer, np.maximum(frames[:, t], layer))
            owner[:, t] = np.where(shape, slot[:, None, None], owner[:, t])
    masks = owner == 0
    hidden = ~masks[:, 0].any(axis=(1, 2))
    if hidden.any():
        raise ValueError(
            f"the target shows no pixel in frame 0 of video(s) {np.flatnonzero(hidden)[:5]}; "
            "its first-frame mask is what a tracker starts from"
        )
    return frames[..., None], masks


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """[..., 4] int32 (y0, x0, y1, x1) half-open extents of masks [..., H, W]; zeros if empty."""
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)
    h, w = masks.shape[-2:]
    y0 = np.argmax(rows, axis=-1)
    y1 = h - np.argmax(rows[..., ::-1], axis=-1)
    x0 = np.argmax(cols, axis=-1)
    x1 = w - np.argmax(cols[..., ::-1], axis=-1)
    boxes = np.stack([y0, x0, y1, x1], -1).astype(np.int32)
    return np.where(rows.any(axis=-1)[..., None], boxes, 0)


def make_target_videos(
    seed: int,
    num_videos: int,
    num_frames: int = 24,
    *,
    split: str = "train",
    canvas: int = 64,
    digit_size: int = 24,
    distractors: tuple[int, int] = (1, 3),
    same_class: float = 0.5,
    speed: tuple[float, float] = (1.5, 3.5),
) -> TargetVideos:
    """`num_videos` videos of a target and distractors (see the module docstring).

    Each video has a uniform number of distractors in `distractors` (inclusive), each
    of the target's class with probability `same_class`; speeds are uniform in `speed`
    pixels per frame in a uniform direction. The same (seed, split, arguments) give
    the same videos; each split has its own seed stream.
    """
    check_arguments(num_frames, canvas, digit_size, distractors)
    if not 0.0 <= same_class <= 1.0:
        raise ValueError(f"same_class must be a probability in [0, 1], got {same_class}")
    pool, pool_classes = digit_pool(split, digit_size)
    rng = np.random.default_rng([seed, SPLITS[split]])
    slots = distractors[1] + 1
    count = rng.integers(distractors[0], distractors[1] + 1, num_videos)
    present = np.arange(slots)[None, :] <= count[:, None]  # slot 0, the target, always

    # digits: the target, then distractors, some drawn from the target's class
    index = rng.integers(0, len(pool), (num_videos, slots))
    by_class = [np.flatnonzero(pool_classes == c) for c in range(10)]
    own = rng.random((num_videos, slots)) < same_class
    pick = rng.random((num_videos, slots))
    for v in range(num_videos):
        members = by_class[pool_classes[index[v, 0]]]
        for d in range(1, slots):
            if own[v, d]:
                index[v, d] = members[int(pick[v, d] * len(members))]
    digits = np.where(present[..., None, None], pool[index], 0).astype(np.uint8)
    classes = np.where(present, pool_classes[index], -1).astype(np.int32)

    # frame 0: one digit per grid cell, jittered within its cell; then constant velocity
    cells_per_side = canvas // digit_size
    cell = canvas / cells_per_side
    cell_order = np.argsort(rng.random((num_videos, cells_per_side**2)), axis=1)[:, :slots]
    origin = np.stack([cell_order % cells_per_side, cell_order // cells_per_side], -1) * cell
    start = origin + rng.uniform(0, cell - digit_size, (num_videos, slots, 2))
    angle = rng.uniform(0, 2 * np.pi, (num_videos, slots))
    velocity = rng.uniform(*speed, (num_videos, slots))[..., None] * np.stack(
        [np.cos(angle), np.sin(angle)], -1
    )
    t = np.arange(num_frames)[None, :, None, None]
    limit = canvas - digit_size
    positions = _reflect(start[:, None] + velocity[:, None] * t, limit).astype(np.float32)

    ranks = np.argsort(rng.random((num_videos, slots)) + ~present, axis=1)
    depth = np.empty_like(ranks)
    np.put_along_axis(depth, ranks, np.arange(slots)[None, :], axis=1)
    frames, masks = render_target_videos(digits, positions, depth, canvas)
    depth = np.where(present, depth, -1).astype(np.int32)

    shape_area = (digits[:, 0] >= SHAPE_THRESHOLD).sum(axis=(1, 2))
    area = masks.sum(axis=(2, 3))
    return TargetVideos(
        frames=frames,
        masks=masks,
        boxes=boxes_from_masks(masks),
        visible=area > 0,
        visible_fraction=(area / shape_area[:, None]).astype(np.float32),
        positions=positions,
        depth=depth,
        classes=classes,
        num_distractors=count.astype(np.int32),
    )
