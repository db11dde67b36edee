"""A small synthetic image-classification set, so the whole pipeline runs without downloads.

Each class is a sinusoidal stripe pattern with its own orientation, spatial frequency and
faint colour tint; every image gets a random phase, jittered angle, its own colour, a
class-independent blob and pixel noise. A small convnet separates the classes within a few
hundred steps, while neither the mean colour nor a linear model on pixels does nearly as well.
"""

from __future__ import annotations

import numpy as np

from rvm.data.image_data import ImageData


def make_synthetic(
    num_train: int, num_test: int, seed: int, num_classes: int = 10, image_size: int = 32
) -> ImageData:
    """Train and test splits of uint8 `image_size`x`image_size` RGB images; same seed, same data."""
    if num_train < 1 or num_test < 0 or num_classes < 2:
        raise ValueError(
            f"make_synthetic needs num_train >= 1, num_test >= 0, num_classes >= 2; got "
            f"{num_train}, {num_test}, {num_classes}"
        )
    # Separate streams so the class prototypes and the test set do not change with num_train.
    proto_rng, train_rng, test_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    # Angles span half a turn: stripes at theta and theta + pi look the same.
    prototypes = {
        "angle": np.pi * (np.arange(num_classes) + proto_rng.uniform(0, 0.3)) / num_classes,
        "freq": proto_rng.uniform(2.0, 4.0, num_classes),  # cycles per image width
        "colour": proto_rng.uniform(0.25, 1.0, (num_classes, 3)),
    }
    train = _draw(train_rng, num_train, num_classes, image_size, prototypes)
    test = _draw(test_rng, num_test, num_classes, image_size, prototypes)
    return ImageData("synthetic", num_classes, *train, *test)


def _draw(rng, n, num_classes, size, proto) -> tuple[np.ndarray, np.ndarray]:
    # Balanced classes in random order.
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = proto["angle"][labels] + rng.normal(0, 0.04, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    along = xx * np.cos(angle)[:, None, None] + yy * np.sin(angle)[:, None, None]
    wave = np.sin(2 * np.pi * proto["freq"][labels][:, None, None] * along + phase[:, None, None])
    # Mostly per-image colour with a faint class tint, so colour alone is a weak cue.
    colour = 0.3 * proto["colour"][labels] + 0.7 * rng.uniform(0.2, 1.0, (n, 3))
    images = (0.5 + 0.4 * wave)[..., None] * colour[:, None, None, :]
    # A blob of random colour at a random place: clutter the model must learn to ignore.
    centre = rng.uniform(0, 1, (n, 2))
    dist2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
    blob = np.exp(-dist2 / (2 * 0.08**2))[..., None] * rng.uniform(0, 1, (n, 1, 1, 3))
    images = 0.75 * images + 0.35 * blob + rng.normal(0, 0.06, images.shape)
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8), labels
