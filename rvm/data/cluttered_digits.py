"""Translated and cluttered digit canvases (Mnih et al. 2014), generated offline from a seed.

One digit (the scikit-learn scans of `rvm.data.moving_digits`, upscaled to
`digit_size`) is pasted at a uniformly random position wholly inside a square canvas;
with `clutter` > 0, that many `piece x piece` pieces cut at random from other digits
of the same split are pasted at random positions first (maximum where they overlap),
the "cluttered translated" set of the RAM paper.

Splits never share digit scans: "train" uses scans [0, 1300), "validation" [1300, 1500)
and "test" the 297 scans load_digits keeps after NUM_TRAIN_DIGITS, so the test error
measures recognition of unseen handwriting, not of unseen positions alone.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from rvm.data.moving_digits import NUM_TRAIN_DIGITS, load_digit_images

SPLITS = ("train", "validation", "test")
NUM_FIT_DIGITS = 1300  # scans [0, 1300) train; [1300, NUM_TRAIN_DIGITS) validate


@dataclasses.dataclass(frozen=True)
class Canvases:
    images: np.ndarray  # [N, canvas, canvas, 1] uint8
    labels: np.ndarray  # [N] int32 digit class
    corners: np.ndarray  # [N, 2] int (x, y) top-left corner of the digit


@functools.lru_cache(maxsize=4)
def digit_pool(digit_size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, s, s] uint8, labels [n]) of the scans that belong to `split`."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    targets = load_digits().target.astype(np.int32)
    if split == "test":
        return load_digit_images(digit_size, "test"), targets[NUM_TRAIN_DIGITS:]
    part = slice(0, NUM_FIT_DIGITS) if split == "train" else slice(NUM_FIT_DIGITS, None)
    images = load_digit_images(digit_size, "train")
    return images[part], targets[:NUM_TRAIN_DIGITS][part]


def _paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    h, w = patch.shape
    region = canvas[y : y + h, x : x + w]
    np.maximum(region, patch, out=region)


def make_canvases(
    seed: int,
    num: int,
    split: str,
    *,
    canvas: int = 60,
    digit_size: int = 28,
    clutter: int = 0,
    piece: int = 8,
) -> Canvases:
    """`num` canvases of `split`; the same arguments give the same canvases."""
    if canvas < digit_size:
        raise ValueError(f"a {canvas}-pixel canvas cannot hold a {digit_size}-pixel digit")
    # Each split draws from its own stream, so the splits do not depend on each other's size.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    pool, targets = digit_pool(digit_size, split)
    index = rng.integers(0, len(pool), num)
    corners = rng.integers(0, canvas - digit_size + 1, (num, 2))
    images = np.zeros((num, canvas, canvas), np.uint8)
    for n in range(num):
        for _ in range(clutter):
            source = pool[rng.integers(len(pool))]
            sy, sx = rng.integers(0, digit_size - piece + 1, 2)
            x, y = rng.integers(0, canvas - piece + 1, 2)
            _paste(images[n], source[sy : sy + piece, sx : sx + piece], x, y)
        _paste(images[n], pool[index[n]], *corners[n])
    return Canvases(images[..., None], targets[index], corners)
