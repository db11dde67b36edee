"""Moving-digit videos made from real handwritten digits, generated offline from a seed.

The digits are the 1,797 8x8 scans shipped with scikit-learn (`load_digits`, no
download), upscaled bilinearly to `digit_size` and pasted into a `canvas`-sized
frame (maximum where digits overlap). Frames are uint8 [N, T, H, W, 1].

Two tasks:
* future-frame prediction (`make_moving_digits`): one or two digits bouncing off
  the frame edges with constant speed, Moving-MNIST style; 10 frames in, 10 out.
* motion recognition (`make_motion_digits`): one digit moving in one of six
  patterns, MOTION_CLASSES. A single frame must carry no label information, so
  the frame is a torus: the digit's top-left corner is u_t = (u_0 + D_t) mod
  canvas, with u_0 uniform on the torus and independent of the class-dependent
  displacement D_t, hence u_t is uniform at every t whatever the class; the digit
  and speed are drawn independently of the class too. Wrapping, not bouncing, is
  what keeps this exact: a reflection at a wall turns a clockwise circle into a
  counter-clockwise one, and a uniform start would then make the classes
  indistinguishable. Telling classes apart needs two frames (direction) or three
  (clockwise vs counter-clockwise, circle vs straight line).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

MOTION_CLASSES = ("right", "left", "down", "up", "clockwise", "counterclockwise")
NUM_TRAIN_DIGITS = 1500  # load_digits samples [0, 1500) for "train", the rest for "test"


@dataclasses.dataclass(frozen=True)
class MovingDigits:
    frames: np.ndarray  # [N, T, H, W, 1] uint8
    positions: np.ndarray | None  # [N, T, D, 2] float32 (x, y) top-left corners, unwrapped
    digit_index: np.ndarray | None  # [N, D] index into load_digits
    labels: np.ndarray | None  # [N] int32 motion class (recognition only)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] interpolation weights, pixel centres aligned (half-pixel convention)."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = x - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return m


@functools.lru_cache(maxsize=4)
def load_digit_images(size: int = 28, split: str = "train") -> np.ndarray:
    """Real handwritten digits [N, size, size] uint8, upscaled from 8x8 (values 0..16)."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # [1797, 8, 8]
    parts = {
        "train": images[:NUM_TRAIN_DIGITS],
        "test": images[NUM_TRAIN_DIGITS:],
        "all": images,
    }
    if split not in parts:
        raise ValueError(f"split must be one of {tuple(parts)}")
    m = _bilinear_matrix(8, size)
    up = np.einsum("ij,njk,lk->nil", m, parts[split] / 16.0, m)
    return np.round(np.clip(up, 0.0, 1.0) * 255).astype(np.uint8)


def _paste(frames: np.ndarray, digits: np.ndarray, corners: np.ndarray, wrap: bool) -> None:
    """frames[n, y+i, x+j] = max(., digits[n, i, j]) for integer corners [n, 2] (x, y)."""
    n, size = digits.shape[0], digits.shape[1]
    canvas = frames.shape[1]
    rows = corners[:, 1, None] + np.arange(size)[None, :]  # [n, size]
    cols = corners[:, 0, None] + np.arange(size)[None, :]
    if wrap:
        rows, cols = rows % canvas, cols % canvas
    idx = (np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :])
    frames[idx] = np.maximum(frames[idx], digits)


def render(
    digits: np.ndarray, positions: np.ndarray, canvas: int = 64, wrap: bool = False
) -> np.ndarray:
    """Frames [N, T, canvas, canvas, 1] uint8 from digits [N, D, s, s] at positions [N, T, D, 2].

    Positions are rounded to whole pixels; with `wrap` they are taken modulo the canvas.
    """
    n, steps, num_digits = positions.shape[:3]
    corners = np.rint(positions).astype(np.int64)
    frames = np.zeros((n, steps, canvas, canvas), np.uint8)
    for t in range(steps):
        for d in range(num_digits):
            _paste(frames[:, t], digits[:, d], corners[:, t, d], wrap)
    return frames[..., None]


def _reflect(u: np.ndarray, limit: float) -> np.ndarray:
    """Triangle wave: position of a point moving freely in unfolded coordinate u in [0, limit]."""
    return limit - np.abs(np.mod(u, 2 * limit) - limit)


def make_moving_digits(
    seed: int,
    num_sequences: int,
    num_frames: int = 20,
    num_digits: int = 2,
    *,
    canvas: int = 64,
    digit_size: int = 28,
    speed: tuple[float, float] = (2.0, 4.0),
    split: str = "train",
) -> MovingDigits:
    """Digits bouncing off the edges at constant speed (pixels per frame), for prediction."""
    rng = np.random.default_rng(seed)
    pool = load_digit_images(digit_size, split)
    limit = canvas - digit_size
    index = rng.integers(0, len(pool), (num_sequences, num_digits))
    start = rng.uniform(0, limit, (num_sequences, num_digits, 2))
    angle = rng.uniform(0, 2 * np.pi, (num_sequences, num_digits))
    v = rng.uniform(*speed, (num_sequences, num_digits))[..., None] * np.stack(
        [np.cos(angle), np.sin(angle)], -1
    )
    t = np.arange(num_frames)[None, :, None, None]
    positions = _reflect(start[:, None] + v[:, None] * t, limit).astype(np.float32)
    frames = render(pool[index], positions, canvas)
    return MovingDigits(frames, positions, index, None)


def _motion_displacements(
    labels: np.ndarray, speed: np.ndarray, radius: np.ndarray, phase: np.ndarray, steps: int
) -> np.ndarray:
    """Displacement D_t [N, T, 2] of each class (image coordinates, y pointing down)."""
    t = np.arange(steps)[None, :]
    s = speed[:, None] * t
    zero = np.zeros_like(s)
    linear = {0: (s, zero), 1: (-s, zero), 2: (zero, s), 3: (zero, -s)}
    # with y down, an increasing angle turns clockwise on screen; |velocity| = speed
    spin = np.where(labels == 4, 1.0, -1.0)[:, None]
    theta = phase[:, None] + spin * (speed / radius)[:, None] * t
    cx = radius[:, None] * (np.cos(theta) - np.cos(phase)[:, None])
    cy = radius[:, None] * (np.sin(theta) - np.sin(phase)[:, None])
    dx, dy = np.where(labels[:, None] >= 4, cx, 0.0), np.where(labels[:, None] >= 4, cy, 0.0)
    for k, (lx, ly) in linear.items():
        dx = np.where(labels[:, None] == k, lx, dx)
        dy = np.where(labels[:, None] == k, ly, dy)
    return np.stack([dx, dy], -1)


def make_motion_digits(
    seed: int,
    num_sequences: int,
    num_frames: int = 20,
    *,
    canvas: int = 64,
    digit_size: int = 28,
    speed: tuple[float, float] = (2.0, 4.0),
    radius: tuple[float, float] = (6.0, 12.0),
    labels: np.ndarray | None = None,
    split: str = "train",
) -> MovingDigits:
    """One digit per video moving in one of MOTION_CLASSES on a wrapping canvas.

    `labels` forces the classes; every other random draw is made in the same
    order whatever the labels, so two calls with one seed and different labels
    share digits and start positions (the tests use this coupling).
    """
    if num_frames < 3:
        raise ValueError("motion classes need at least 3 frames to be distinguishable")
    rng = np.random.default_rng(seed)
    pool = load_digit_images(digit_size, split)
    drawn = rng.integers(0, len(MOTION_CLASSES), num_sequences)
    labels = drawn if labels is None else np.broadcast_to(np.asarray(labels), drawn.shape)
    index = rng.integers(0, len(pool), (num_sequences, 1))
    start = rng.uniform(0, canvas, (num_sequences, 2))
    v = rng.uniform(*speed, num_sequences)
    r = rng.uniform(*radius, num_sequences)
    phase = rng.uniform(0, 2 * np.pi, num_sequences)
    d = _motion_displacements(labels, v, r, phase, num_frames)
    positions = (start[:, None] + d)[:, :, None].astype(np.float32)
    frames = render(pool[index], positions, canvas, wrap=True)
    return MovingDigits(frames, positions, index, labels.astype(np.int32))


def motion_labels_from_trajectory(positions: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """Recover the motion class from unwrapped positions [N, T, 2] (or [N, T, 1, 2]).

    Straight motions have a constant displacement along one axis; otherwise the
    sign of the cross product of successive displacements gives the turn.
    """
    p = positions.reshape(positions.shape[0], positions.shape[1], 2).astype(np.float64)
    d = np.diff(p, axis=1)
    dx, dy = d[..., 0], d[..., 1]
    still_y, still_x = np.all(np.abs(dy) < tol, 1), np.all(np.abs(dx) < tol, 1)
    turn = np.mean(dx[:, :-1] * dy[:, 1:] - dy[:, :-1] * dx[:, 1:], axis=1)
    out = np.where(turn > 0, 4, 5)
    out = np.where(still_y & (dx[:, 0] > 0), 0, out)
    out = np.where(still_y & (dx[:, 0] < 0), 1, out)
    out = np.where(still_x & (dy[:, 0] > 0), 2, out)
    out = np.where(still_x & (dy[:, 0] < 0), 3, out)
    return out.astype(np.int32)


def split_frames(frames: np.ndarray, num_input: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): the first `num_input` frames and the rest."""
    return frames[:, :num_input], frames[:, num_input:]


def load_moving_mnist(split: str = "test", *, data_dir: str | None = None) -> MovingDigits:
    """Moving MNIST from tensorflow-datasets, as a `MovingDigits` (no positions, no labels).

    tfds publishes only a "test" split of 10,000 sequences of 20 frames. Needs
    tensorflow, which this project does not depend on.
    """
    try:
        import tensorflow  # noqa: F401
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise RuntimeError(
            "load_moving_mnist needs tensorflow and tensorflow-datasets "
            "(pip install tensorflow tensorflow-datasets); "
            "use make_moving_digits for an offline substitute"
        ) from err
    ds = tfds.load("moving_mnist", split=split, data_dir=data_dir, batch_size=-1)
    frames = np.asarray(tfds.as_numpy(ds)["image_sequence"], np.uint8)
    return MovingDigits(frames, None, None, None)
