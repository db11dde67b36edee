"""Networks that follow one object through a video from its first-frame mask.

Every system sees a video [B, T, H, W, 2]: channel 0 the frames in [0, 1], channel 1
the target's mask in frame 0 and zeros in every later frame, so nothing else about
the target reaches it. Each returns mask logits [B, T, H, W].

* `frame`: the big network on every frame, given the frame, frame 0 and its mask: the
  project's ResNet trunk (`rvm.models.resnet.Level`) made fully convolutional (stem of
  stride 2, no pooling head) with an upsampling head that also sees the frame at full
  resolution, so the mask can follow the strokes.
* `stale`: trained as `frame`; at evaluation the key frame's mask is reused until the
  next key frame (clockwork's reuse of the full output).
* `resrec`: `frame` with a convolutional recurrent cell (rvm's Elman or GRU) on the
  trunk's top features, added to them before the head, as in the research notes.
* `dual`: the big network at key frames (t % K == 0) writes the memory of a small
  recurrent network (a two-conv encoder, a ConvGRU, a 1x1 head) that produces the masks
  between key frames. The memory is the GRU state and the last mask; policy
  `big_only` keeps the key frame's memory until the next one (Looking Fast and Slow),
  `every_frame` lets the small network update it every frame. The small network is
  meant to cost at most 10% of the big one's FLOPs per frame (`small_features`).
* `small`: `dual` with only frame 0 as key frame.
* `propagate`: the big network frame by frame, its trunk also given the mask it
  predicted for the previous frame (frame 0's given mask for frame 0), as in mask
  propagation (MaskTrack, Perazzi et al. 2017; RGMP, Oh et al. 2018): frame 0 and its
  mask say what the target looks like, the previous prediction where it just was. The
  fed mask is the sigmoid of the previous logits without gradient; training runs the
  same scan over time as evaluation, so the network learns from its own predictions.
* `pc`: predictive-corrective blocks (Dave et al. 2017) over segments of the trunk
  (`pc_layers`, segment ends): a block re-initialises y_t = init(x_t) and otherwise
  corrects y_t = y_ref + update(x_t - x_ref), x_ref the last frame it processed;
  frames whose change is below the ignore threshold reuse everything (`pc_schedule`).
  The update net has its own weights, initialised as a copy of the init net's, as in
  Dave et al.: `model.init` builds both trunks, then overwrites every parameter (and
  batch statistic) of `update_trunk` with the one at the same path in `big/trunk`
  where the shapes agree (they always do here: the update net runs the same segments
  on inputs of the same shape). Training then moves the two apart.
  The thresholds (`reinit_threshold`, `ignore_threshold`) enter `pc_schedule`, which is
  computed from the input frames on the one path used for training and evaluation, so
  a non-zero threshold acts in training as well as in evaluation: the network is
  trained under the schedule it is measured with. With both at 0 (the configs'
  default) the schedule is the fixed one, a re-initialisation every K frames.

With `match` (every system), the big network's head also sees, at each site, the cosine
similarity of its top features to frame 0's mean feature inside the target's mask and
outside it (`prototypes`, `similarity`): the frames reach the trunk only as channels
stacked with frame 0, so without it the network can compare the target with what it
sees only within its receptive field, not wherever the target has moved.

The training path is vectorised over time (key frames picked statically; `propagate`
scans, each frame needing the last one's mask); evaluation runs the same path, so what
is trained is what is measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvm.models.conv import Conv3x3, SameConv
from rvm.models.norm import BatchNorm
from rvm.models.recurrent import ConvElmanCell, ConvGRUCell, run_sequence
from rvm.models.resnet import Level

Array = jax.Array
SYSTEMS = ("frame", "stale", "resrec", "dual", "small", "pc", "propagate")
CELLS = {"none": None, "elman": ConvElmanCell, "gru": ConvGRUCell}
MEMORY = ("big_only", "every_frame")
REINIT, UPDATE, IGNORE = 0, 1, 2  # what a pc schedule does at a frame


def fold(f: Callable[[Array], Array], x: Array):
    """f over [B, T, ...] applied as one batch of B*T frames (f may return a tuple)."""
    return fold2(f, x)


def key_frames(num_frames: int, every: int) -> np.ndarray:
    """The key frames 0, K, 2K, ... and, for every frame, the index of its key frame."""
    return np.arange(num_frames) // every


class Stem(nn.Module):
    """The ResNet's stem conv-BN-ReLU, here of stride 2: the levels run at half size."""

    features: int

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = Conv3x3(self.features, 2, name="conv")(x)
        return BatchNorm(not train, momentum=0.9, relu=True, name="bn")(x)


class Trunk(nn.Module):
    """Stem (stride 2) and the ResNet's levels; `segment(i)` runs one of them, so a
    predictive-corrective block can cover any run of segments."""

    widths: tuple[int, ...] = (12, 24, 48)
    blocks: tuple[int, ...] = (1, 2, 2)

    def setup(self):
        self.stem = Stem(self.widths[0])
        self.levels = [
            Level(w, n - int(i > 0), i > 0, False, name=f"level{i + 1}")
            for i, (w, n) in enumerate(zip(self.widths, self.blocks))
        ]

    def segment(self, i: int, x: Array, train: bool) -> Array:
        if i == 0:
            x = self.stem(x, train)
        level = self.levels[i]
        return level(x, train, np.zeros(level.num_blocks + int(level.downsample), np.float32))[0]

    def __call__(self, x: Array, train: bool, first: int = 0, last: int | None = None) -> Array:
        for i in range(first, len(self.widths) if last is None else last):
            x = self.segment(i, x, train)
        return x


class Head(nn.Module):
    """Features at low resolution -> mask logits at the frame's: a 1x1 projection,
    bilinear upsampling, then convolutions that also see the frame itself."""

    project: int = 8
    hidden: int = 8
    kernel: int = 3

    @nn.compact
    def __call__(self, features: Array, frame: Array) -> Array:
        y = nn.relu(SameConv(self.project, (1, 1), name="project")(features))
        y = jax.image.resize(y, (*frame.shape[:-1], self.project), "bilinear")
        y = jnp.concatenate([y, frame], -1)
        y = nn.relu(SameConv(self.hidden, (self.kernel,) * 2, name="conv")(y))
        return SameConv(1, (1, 1), name="logits")(y)[..., 0]


def prototypes(features: Array, mask: Array) -> Array:
    """[B, 2, C]: the mean feature of `features` [B, h, w, C] inside the mask [B, H, W, 1]
    and outside it, each site weighted by the share of its H/h x W/w pixels in the mask."""
    (b, h, w, _), (height, width) = features.shape, mask.shape[1:3]
    m = mask.reshape(b, h, height // h, w, width // w, 1).mean((2, 4))
    inside = jnp.sum(features * m, (1, 2)) / (jnp.sum(m, (1, 2)) + 1e-6)
    outside = jnp.sum(features * (1 - m), (1, 2)) / (jnp.sum(1 - m, (1, 2)) + 1e-6)
    return jnp.stack([inside, outside], 1)


def similarity(features: Array, protos: Array) -> Array:
    """[N, h, w, 2]: the cosine similarity of each site of `features` [N, h, w, C] to each
    of `protos` [N, 2, C]."""
    unit = lambda v: v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)
    return jnp.einsum("nhwc,nkc->nhwk", unit(features), unit(protos))


class BigNet(nn.Module):
    """Trunk + head on [frame, frame 0, mask 0] (and the previous frame's mask where one is
    given: `propagate`); also returns the top features. Called on frames alone, `match`
    compares each frame's features with its own prototypes (what it does for frame 0;
    `rvm.analysis.video_objects` counts the FLOPs of that call)."""

    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    match: bool = False

    def setup(self):
        self.trunk = Trunk(self.widths, self.blocks)
        self.head = Head()

    def __call__(
        self, x: Array, x0: Array, m0: Array, train: bool, prev: Array | None = None
    ) -> tuple[Array, Array]:
        stacked = [x, x0, m0] if prev is None else [x, x0, m0, prev]
        features = self.trunk(jnp.concatenate(stacked, -1), train)
        protos = prototypes(features, m0) if self.match else None
        return self.logits(features, x, protos), features

    def logits(self, features: Array, x: Array, protos: Array | None = None) -> Array:
        """The head on `features`, with their similarity to `protos` where matching."""
        if self.match:
            features = jnp.concatenate([features, similarity(features, protos)], -1)
        return self.head(features, x)


class SmallStep(nn.Module):
    """One frame of the small network: encoder on [frame, last mask] at 1/4 resolution,
    a ConvGRU on the memory, and a 1x1 head at full resolution."""

    features: int = 7

    @nn.compact
    def __call__(self, memory: tuple[Array, Array], x: Array) -> tuple[tuple, Array]:
        h, mask = memory
        e = jnp.concatenate([x, jax.nn.sigmoid(mask)[..., None]], -1)
        e = nn.relu(SameConv(self.features, (3, 3), strides=2, name="enc1")(e))
        e = nn.relu(SameConv(self.features, (3, 3), strides=2, name="enc2")(e))
        _, h = ConvGRUCell(self.features, name="gru")((jnp.zeros((), jnp.int32), h), e, train=False)
        logits = Head(4, 4, 1, name="head")(h, x)
        return (h, logits), logits


class SmallLoop(nn.Module):
    """The small network carrying its memory (`every_frame`); key frames overwrite it
    with what the big network wrote, and their mask is the big network's."""

    features: int = 7

    @nn.compact
    def __call__(self, memory, inputs):
        x, is_key, h_key, big_logits = inputs
        memory, logits = SmallStep(self.features, name="step")(memory, x)
        pick = lambda a, b: jnp.where(is_key.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
        memory = jax.tree.map(pick, (h_key, big_logits), memory)
        return memory, pick(big_logits, logits)


def pc_schedule(
    x: Array, every: int, reinit_threshold: float = 0.0, ignore_threshold: float = 0.0
) -> tuple[Array, Array]:
    """(kind [B, T] of REINIT/UPDATE/IGNORE, ref [B, T] the last frame processed before t).

    A frame re-initialises when K frames have passed since the last re-initialisation
    or its mean absolute change from the reference frame exceeds `reinit_threshold`;
    otherwise it is ignored when that change is below `ignore_threshold`; a threshold
    of 0 is off. The reference is the last frame not ignored, so slow drifts add up.
    """
    b = x.shape[0]

    def step(carry, xt_t):
        x_ref, ref, last_reset = carry
        xt, t = xt_t
        change = jnp.mean(jnp.abs(xt - x_ref).reshape(b, -1), axis=1)
        reinit = (t - last_reset >= every) | ((reinit_threshold > 0) & (change > reinit_threshold))
        reinit = reinit | (t == 0)
        ignore = ~reinit & (ignore_threshold > 0) & (change < ignore_threshold)
        kind = jnp.where(reinit, REINIT, jnp.where(ignore, IGNORE, UPDATE))
        keep = ignore.reshape((b,) + (1,) * (xt.ndim - 1))
        carry = (
            jnp.where(keep, x_ref, xt),
            jnp.where(ignore, ref, t),
            jnp.where(reinit, t, last_reset),
        )
        return carry, (kind, ref)

    zeros = jnp.zeros((b,), jnp.int32)
    steps = jnp.arange(x.shape[1], dtype=jnp.int32)
    _, (kind, ref) = jax.lax.scan(step, (x[:, 0], zeros, zeros), (jnp.moveaxis(x, 1, 0), steps))
    return kind.T.astype(jnp.int32), ref.T


def take_frames(y: Array, index: Array) -> Array:
    """y[b, index[b, t]] for y [B, T, ...], index [B, T]."""
    return jax.vmap(lambda v, i: v[i])(y, index)


def predictive_corrective(init: Array, update: Array, kind: Array) -> Array:
    """Outputs [B, T, ...] of a block from init(x_t) and update(x_t - x_ref) at every frame:
    y_t = init_t at REINIT, y_{t-1} + update_t at UPDATE, y_{t-1} at IGNORE."""
    expand = lambda k: k.reshape(k.shape + (1,) * (init.ndim - 2))

    def step(y, inputs):
        i, u, k = inputs
        k = expand(k)
        y = jnp.where(k == REINIT, i, jnp.where(k == UPDATE, y + u, y))
        return y, y

    xs = (jnp.moveaxis(init, 1, 0), jnp.moveaxis(update, 1, 0), kind.T)
    return jnp.moveaxis(jax.lax.scan(step, jnp.zeros_like(init[:, 0]), xs)[1], 0, 1)


def nonzero_sites(d: Array) -> Array:
    """[B, T] fraction of sites of d [B, T, h, w, C] where any channel is non-zero."""
    return jnp.mean(jnp.any(d != 0, axis=-1), axis=(-2, -1))


class VideoObjects(nn.Module):
    """One of `SYSTEMS` (see the module docstring); `__call__(video, train) -> logits`."""

    system: str = "frame"
    widths: tuple[int, ...] = (12, 24, 48)
    blocks: tuple[int, ...] = (1, 2, 2)
    cell: str = "none"  # resrec's recurrent unit: CELLS
    key_every: int = 8  # K: dual, stale and pc
    memory: str = "big_only"  # dual: MEMORY
    small_features: int = 7
    pc_layers: tuple[int, ...] = (3,)  # ends of the trunk segments each pc block covers
    reinit_threshold: float = 0.0  # pc: re-initialise above this mean |change| (0: off)
    ignore_threshold: float = 0.0  # pc: reuse everything below it (0: off)
    match: bool = False  # the head also sees similarities to frame 0's target (docstring)

    def setup(self):
        self.big = BigNet(self.widths, self.blocks, self.match)
        if self.system == "resrec" and CELLS[self.cell] is not None:
            self.rnn = CELLS[self.cell](self.widths[-1], name="rnn")
        if self.system in ("dual", "small"):
            self.write = SameConv(self.small_features, (1, 1), name="write")
            if self.memory == "big_only" or self.system == "small":
                self.small = SmallStep(self.small_features)
            else:
                self.small = nn.scan(
                    SmallLoop,
                    variable_broadcast="params",
                    split_rngs={"params": False},
                    in_axes=1,
                    out_axes=1,
                )(self.small_features)
        if self.system == "pc":
            self.update_trunk = Trunk(self.widths, self.blocks)

    def __call__(self, video: Array, train: bool = False) -> Array:
        x = video[..., :1]
        inputs = jnp.concatenate(
            [x, _repeat(video[:, :1, ..., :1], x), _repeat(video[:, :1, ..., 1:], x)], -1
        )
        big = lambda v: self._big(v, train)
        if self.system == "stale" and not train:
            keys = key_frames(x.shape[1], self.key_every)
            return big(inputs[:, :: self.key_every])[0][:, keys]
        if self.system in ("frame", "stale"):
            return big(inputs)[0]
        if self.system == "resrec":
            feats = fold(lambda v: self.big.trunk(v, train), inputs)
            if self.cell != "none":
                carry = self.rnn.initialize_carry(jax.random.PRNGKey(0), feats[:, 0].shape)
                feats = feats + run_sequence(self.rnn, carry, feats, train=train)[2]
            return self._head(feats, inputs)
        if self.system in ("dual", "small"):
            every = x.shape[1] if self.system == "small" else self.key_every
            return self._dual(inputs, x, every, big)
        if self.system == "propagate":
            return self._propagate(inputs, train)
        return self._pc(inputs, x, train)

    def _big(self, inputs: Array, train: bool) -> tuple[Array, Array]:
        """The big network's logits and top features on frames [B, T', H, W, 3] whose first
        is frame 0."""
        feats = fold(lambda v: self.big.trunk(v, train), inputs)
        return self._head(feats, inputs), feats

    def _head(self, feats: Array, inputs: Array) -> Array:
        """The big network's head on top features [B, T', h, w, C] of frames whose first is
        frame 0, compared with frame 0's target where matching."""
        if not self.match:
            return fold2(self.big.logits, feats, inputs[..., :1])
        protos = prototypes(feats[:, 0], inputs[:, 0, ..., 2:])
        return fold2(self.big.logits, feats, inputs[..., :1], _repeat(protos[:, None], feats))

    def write_memory(self, feats: Array, frame_shape: Sequence[int]) -> Array:
        """The small network's state from the big network's top features (1/4 resolution)."""
        size = (feats.shape[0], frame_shape[0] // 4, frame_shape[1] // 4, feats.shape[-1])
        return self.write(jax.image.resize(feats, size, "bilinear"))

    def _dual(self, inputs, x, every, big):
        keys = key_frames(x.shape[1], every)
        big_logits, feats = big(inputs[:, ::every])
        h_key = fold(lambda f: self.write_memory(f, x.shape[2:4]), feats)
        is_key = np.arange(x.shape[1]) % every == 0
        if self.memory == "big_only" or self.system == "small":
            # each frame starts from the memory the big network wrote at its key frame
            logits = fold2(
                lambda h, m, f: self.small((h, m), f)[1], h_key[:, keys], big_logits[:, keys], x
            )
            return jnp.where(is_key[None, :, None, None], big_logits[:, keys], logits)
        flags = jnp.broadcast_to(jnp.asarray(is_key)[None], x.shape[:2])
        memory = (h_key[:, 0], big_logits[:, 0])
        _, logits = self.small(memory, (x, flags, h_key[:, keys], big_logits[:, keys]))
        return logits

    def _propagate(self, inputs: Array, train: bool) -> Array:
        """The big network over time, each frame given the previous frame's predicted mask."""

        def step(module, prev, frame):
            logits, _ = module.big(frame[..., :1], frame[..., 1:2], frame[..., 2:], train, prev)
            return jax.lax.stop_gradient(jax.nn.sigmoid(logits))[..., None], logits

        first = inputs[:, 0, ..., 2:]
        if self.is_initializing():  # the scan carries batch statistics that must exist
            step(self, first, inputs[:, 0])
        # training updates the running statistics frame after frame; evaluation reads them
        stats = dict(variable_carry="batch_stats") if train else {}
        scan = nn.scan(
            step,
            variable_broadcast=("params",) if train else ("params", "batch_stats"),
            **stats,
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
        )
        return scan(self, first, inputs)[1]

    def _pc(self, inputs, x, train):
        kind, ref = pc_schedule(x, self.key_every, self.reinit_threshold, self.ignore_threshold)
        self.sow("intermediates", "pc_kind", kind)
        y, bounds = inputs, (0, *self.pc_layers)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            diff = y - take_frames(y, ref)
            self.sow("intermediates", f"pc_nonzero{i}", nonzero_sites(diff))
            init = fold(lambda v, a=a, b=b: self.big.trunk(v, train, a, b), y)
            update = fold(lambda v, a=a, b=b: self.update_trunk(v, train, a, b), diff)
            y = predictive_corrective(init, update, kind)
        if bounds[-1] < len(self.widths):
            y = fold(lambda v: self.big.trunk(v, train, bounds[-1]), y)
        logits = self._head(y, inputs)
        if self.is_initializing():
            self._copy_init_to_update()
        # an ignored frame reuses everything, its mask included
        ignored = (kind == IGNORE)[..., None, None]
        return jnp.where(ignored, take_frames(logits, ref), logits)

    def _copy_init_to_update(self) -> None:
        """At initialisation: the update trunk's variables := the init trunk's, leaf by
        leaf at the same path where the shapes agree (the rest keep their own init)."""
        for col, tree in self.variables.items():
            if "update_trunk" not in tree or "trunk" not in tree.get("big", {}):
                continue
            src = dict(jax.tree_util.tree_leaves_with_path(tree["big"]["trunk"]))
            pick = lambda path, v, src=src: (
                src[path] if path in src and src[path].shape == v.shape else v
            )
            copied = jax.tree_util.tree_map_with_path(pick, tree["update_trunk"])
            self.put_variable(col, "update_trunk", copied)


def _repeat(a: Array, like: Array) -> Array:
    return jnp.broadcast_to(a, like.shape[:2] + a.shape[2:])


def fold2(f: Callable[..., Array], *xs: Array) -> Array:
    """f over several [B, T, ...] arguments, applied as one batch of B*T."""
    b, t = xs[0].shape[:2]
    out = f(*(v.reshape(b * t, *v.shape[2:]) for v in xs))
    return jax.tree.map(lambda y: y.reshape(b, t, *y.shape[1:]), out)
