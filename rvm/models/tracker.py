"""A Re3-style recurrent tracker (Gordon, Farhadi & Fox 2018): its box at t places the next glimpse.

Per frame, the tracker reads two glimpse pyramids (`rvm.models.glimpse`) centred on its
own previous box with `context` times its longer side: one from the previous frame,
one from the current. A shared convolutional encoder with skip connections (pooled
features of every level, Re3's skips) encodes both; two LSTM layers (the second also
reads the first's input, as in Re3) integrate them over time; a head regresses the
box in the coordinates of the first crop, where the previous box sits at
[1/2 - 1/(2 context), 1/2 + 1/(2 context)] (the head starts there). `recurrent=False`
replaces the LSTMs by two dense layers: the feed-forward, GOTURN-style ablation.

`track` runs a whole track as one `lax.scan`. Three per-frame switches make the same
program serve training and testing:
* `starts`: the track (re)starts here from the given box, with a fresh state
  (training unrolls several short segments in one window, `rvm.tasks.tracker`);
* `own`: the crop is centred on the tracker's own previous box, else on the true one
  (training feeds its own predictions more and more);
* `resets`: the LSTM state is set back to the state after the segment's first frame
  (Re3 does this every 32 frames at test time).
The crop centre is always a constant to the gradient: a box is regressed, not steered.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvm.models.glimpse import box_crop, crop_to_box, pyramid


class SkipEncoder(nn.Module):
    """Three stride-2 conv levels; every level's map, average-pooled to 4x4, feeds the output."""

    features: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skips = []
        for i in range(3):
            x = nn.relu(nn.Conv(self.features * 2**i, (3, 3), strides=2)(x))
            pool = x.shape[1] // 4
            skip = nn.avg_pool(x, (pool, pool), strides=(pool, pool)) if pool > 1 else x
            skips.append(nn.Conv(8, (1, 1))(skip).reshape(x.shape[0], -1))
        return jnp.concatenate(skips, -1)


class Re3(nn.Module):
    size: int = 32  # glimpse side after resizing
    scales: int = 3  # crops per pyramid, each twice as wide; 1 is the one-crop ablation
    context: float = 2.0  # first crop side / the box's longer side
    min_width: float = 8.0  # pixels: a shrinking box cannot close the crop
    features: int = 16
    hidden: int = 128
    recurrent: bool = True

    def setup(self):
        self.encoder = SkipEncoder(self.features)
        self.fuse = nn.Dense(self.hidden)
        if self.recurrent:
            self.lstm1 = nn.OptimizedLSTMCell(self.hidden)
            self.lstm2 = nn.OptimizedLSTMCell(self.hidden)
        else:
            self.dense1 = nn.Dense(self.hidden)
            self.dense2 = nn.Dense(self.hidden)
        self.head = nn.Dense(4, kernel_init=nn.initializers.zeros)

    def initial_state(self, batch: int) -> Any:
        zeros = jnp.zeros((batch, self.hidden))
        return ((zeros, zeros), (zeros, zeros))

    def step(self, state: Any, previous: jax.Array, current: jax.Array, box: jax.Array):
        """(state, box in crop coordinates [B, 4], crop centre [B, 2], crop side [B]) for
        frames [B, H, W, C] in [0, 1] and the previous box [B, 4] (x0, y0, x1, y1)."""
        center, width = box_crop(jax.lax.stop_gradient(box), self.context, self.min_width)
        glimpses = [
            pyramid(frame, center, width, size=self.size, scales=self.scales)
            for frame in (previous, current)
        ]
        f = nn.relu(self.fuse(jnp.concatenate([self.encoder(g) for g in glimpses], -1)))
        if self.recurrent:
            s1, h1 = self.lstm1(state[0], f)
            s2, out = self.lstm2(state[1], jnp.concatenate([f, h1], -1))
            state = (s1, s2)
        else:
            out = nn.relu(self.dense2(nn.relu(self.dense1(f))))
        lo, hi = 0.5 - 0.5 / self.context, 0.5 + 0.5 / self.context
        return state, self.head(out) + jnp.array([lo, lo, hi, hi]), center, width

    def __call__(self, inputs: tuple[jax.Array, jax.Array]) -> jax.Array:
        """The box in crop coordinates after one step from (frames [B, 2, H, W, C], box [B, 4])."""
        frames, box = inputs
        state = self.initial_state(frames.shape[0])
        return self.step(state, frames[:, 0], frames[:, 1], box)[1]


def track(
    model: Re3,
    params: Any,
    frames: jax.Array,
    boxes: jax.Array,
    starts: jax.Array,
    own: jax.Array,
    resets: jax.Array,
) -> dict[str, jax.Array]:
    """Tracks through frames [B, T, H, W, C] (values in [0, 1]) in one scan.

    `boxes` [B, T, 4] are the true boxes: read only at `starts` [T] and, where `own`
    [T, B] is False, to centre the next crop; `resets` [T] as in the module docstring
    (frame 0 must be a start). Returns per frame (time first): "boxes" [T, B, 4] (the
    given box at starts), "crop_boxes" [T, B, 4], "centers" [T, B, 2], "widths" [T, B].
    """
    variables = {"params": params}
    batch = frames.shape[0]
    fresh = model.initial_state(batch)
    select = lambda c, a, b: jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)
    time_first = lambda x: jnp.moveaxis(x, 1, 0)
    xs_frames, xs_boxes = time_first(frames), time_first(boxes)
    previous_frames = jnp.concatenate([xs_frames[:1], xs_frames[:-1]])
    previous_boxes = jnp.concatenate([xs_boxes[:1], xs_boxes[:-1]])

    def body(carry, xs):
        state, first, predicted = carry
        previous, frame, true_previous, true_box, start, own_t, reset = xs
        previous = jnp.where(start, frame, previous)
        box_in = jnp.where(own_t[:, None], predicted, true_previous)
        box_in = jnp.where(start, true_box, box_in)
        state_in = select(start, fresh, select(reset, first, state))
        state, crop_box, center, width = model.apply(
            variables, state_in, previous, frame, box_in, method=Re3.step
        )
        box = jnp.where(start, true_box, crop_to_box(crop_box, center, width))
        first = select(start, state, first)
        return (state, first, box), (box, crop_box, center, width)

    xs = (previous_frames, xs_frames, previous_boxes, xs_boxes, starts, own, resets)
    zeros = jnp.zeros((batch, 4), frames.dtype)
    _, (out_boxes, crop_boxes, centers, widths) = jax.lax.scan(body, (fresh, fresh, zeros), xs)
    return {"boxes": out_boxes, "crop_boxes": crop_boxes, "centers": centers, "widths": widths}
