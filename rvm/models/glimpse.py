"""Glimpse pyramids: square crops of growing context around one point, all resized to one size.

This is the "pyramid of image precision" of the sequential-attention note and the
retina of the recurrent attention model (Mnih et al. 2014): crop i of a glimpse has
side `width * ratio**i` and every crop is resized to `size x size`, so the glimpse
keeps full detail at its centre and ever coarser context around it, always with the
same number of inputs. The crops are stacked as channels ([B, size, size, scales * C]).

Coordinates: pixel p of a frame covers [p, p + 1) along its axis; points and boxes
are continuous (x, y) in that frame. Resizing is an area average: each output pixel
is the mean of the frame over its square footprint, which is exact for any crop
position and width (no aliasing when a wide crop shrinks, no rounding of the centre),
and linear in the frame, so it is two small matrix products per crop.

Outside the frame the image counts as 0 (black, the background of the digit
canvases): a crop that leaves the frame sees zeros there, and its average counts them.

With `window`, the crops are read from a `window x window` patch cut around the centre
first, so their cost does not grow with the frame (RAM's constant compute per image);
`window` must exceed the widest crop by 2 pixels (`window_for`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _area_weights(start: Array, step: Array, size: int, length: int) -> Array:
    """[size, length]: the share of input pixel p in output pixel j, whose footprint is
    [start + j * step, start + (j + 1) * step) (pixels outside [0, length) are absent,
    hence count as 0)."""
    lo = start + step * jnp.arange(size, dtype=jnp.float32)[:, None]
    p = jnp.arange(length, dtype=jnp.float32)[None, :]
    overlap = jnp.clip(jnp.minimum(lo + step, p + 1.0) - jnp.maximum(lo, p), 0.0, None)
    return overlap / step


def crop(image: Array, center: Array, width: Array, size: int) -> Array:
    """One square crop of side `width` centred at `center` (x, y) of `image` [H, W, C],
    area-resized to [size, size, C]; zeros outside the frame."""
    height, wide = image.shape[:2]
    start = center - width / 2
    step = width / size
    rows = _area_weights(start[1], step, size, height)
    cols = _area_weights(start[0], step, size, wide)
    return jnp.einsum("ih,hwc,jw->ijc", rows, image, cols)


def window_for(width: float, scales: int, ratio: float = 2.0) -> int:
    """The smallest `window` that holds every crop of a pyramid whose first crop is
    `width` wide."""
    return math.ceil(width * ratio ** (scales - 1)) + 2


def _pyramid_one(image, center, width, size, scales, ratio, window):
    if window is not None:
        # A patch of the frame (zero-padded) whose origin is a whole pixel near the centre.
        origin = jnp.floor(center).astype(jnp.int32) - window // 2
        padded = jnp.pad(image, ((window, window), (window, window), (0, 0)))
        image = jax.lax.dynamic_slice(
            padded, (origin[1] + window, origin[0] + window, 0), (window, window, image.shape[2])
        )
        center = center - origin.astype(center.dtype)
    crops = [crop(image, center, width * ratio**i, size) for i in range(scales)]
    return jnp.concatenate(crops, axis=-1)


def pyramid(
    images: Array,
    centers: Array,
    widths: Array,
    *,
    size: int,
    scales: int,
    ratio: float = 2.0,
    window: int | None = None,
) -> Array:
    """Glimpses [B, size, size, scales * C] of `images` [B, H, W, C] at `centers` [B, 2]
    (x, y pixels); crop i is `widths` [B] x `ratio**i` wide. See the module docstring."""
    centers = jnp.asarray(centers, jnp.float32)
    widths = jnp.broadcast_to(jnp.asarray(widths, jnp.float32), centers.shape[:1])

    def one(image, center, width):
        return _pyramid_one(image, center, width, size, scales, ratio, window)

    return jax.vmap(one)(images.astype(jnp.float32), centers, widths)


# --- Boxes: frame coordinates <-> crop coordinates ------------------------------------
# A box is (x0, y0, x1, y1) in frame pixels. In crop coordinates the crop spans [0, 1]
# on both axes: the tracker regresses its box there (Re3), so its output does not depend
# on where the crop lies in the frame or how large it is.


def box_to_crop(box: Array, center: Array, width: Array) -> Array:
    """`box` [..., 4] in the coordinates of the crop centred at `center` [..., 2] with
    side `width` [...]."""
    corner = jnp.concatenate([center - width[..., None] / 2] * 2, -1)
    return (box - corner) / width[..., None]


def crop_to_box(crop_box: Array, center: Array, width: Array) -> Array:
    """The inverse of `box_to_crop`: a box in crop coordinates back in the frame."""
    corner = jnp.concatenate([center - width[..., None] / 2] * 2, -1)
    return crop_box * width[..., None] + corner


def box_crop(box: Array, context: float, min_width: float) -> tuple[Array, Array]:
    """(centre, width) of the square crop around `box` [..., 4]: `context` times its longer
    side (Re3 uses twice the box), at least `min_width` pixels."""
    center = (box[..., :2] + box[..., 2:]) / 2
    side = jnp.maximum(box[..., 2] - box[..., 0], box[..., 3] - box[..., 1])
    return center, jnp.maximum(context * side, min_width)


def iou(a: Array, b: Array) -> Array:
    """Intersection over union of boxes [..., 4]; 0 where a box is empty."""
    inter_w = jnp.clip(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
    inter_h = jnp.clip(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
    area = lambda x: jnp.clip(x[..., 2] - x[..., 0], 0) * jnp.clip(x[..., 3] - x[..., 1], 0)
    inter = inter_w * inter_h
    union = area(a) + area(b) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
