"""The recurrent attention model (RAM, Mnih et al. 2014) and a whole-canvas CNN to compare with.

RAM looks at a canvas through `glimpses` glimpse pyramids (`rvm.models.glimpse`): each
is encoded with its location, an LSTM core integrates them, and after the last one a
classifier reads the core. Where the next glimpse goes is `policy`:

* "learned": a Gaussian policy, mean tanh(W h_t) in [-1, 1]^2 (canvas coordinates),
  fixed std, trained by REINFORCE with a learned baseline (`reinforce_terms`). It
  reads the core through `stop_gradient`, and the sampled locations are constants to
  everything else, so the policy term trains the location network only and the
  classification loss trains everything but it (tests check both).
* "random": uniform locations (GFNet's control: how much of the accuracy is the policy's).
* "center": every glimpse at the canvas centre.

The first glimpse is at the centre for "learned" and "center". Evaluation uses the
policy's mean (no sampling); "random" draws from the key it is given.

Because each glimpse is cut from a fixed window around its centre, RAM's compute per
image does not depend on the canvas; the CNN's grows with its area.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvm.models.glimpse import pyramid, window_for

POLICIES = ("learned", "random", "center")


class GlimpseEncoder(nn.Module):
    """A glimpse pyramid and its location -> one feature vector (the "glimpse network")."""

    features: int = 32
    hidden: int = 256

    @nn.compact
    def __call__(self, glimpse: jax.Array, location: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(self.features, (3, 3))(glimpse))
        x = nn.relu(nn.Conv(2 * self.features, (3, 3), strides=2)(x))
        what = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        where = nn.relu(nn.Dense(self.hidden // 4)(location))
        return nn.relu(nn.Dense(self.hidden)(what) + nn.Dense(self.hidden)(where))


class RAM(nn.Module):
    size: int = 12  # glimpse side after resizing
    scales: int = 3  # crops per glimpse, each `ratio` times wider
    width: float = 12.0  # side of the first crop, pixels
    ratio: float = 2.0
    glimpses: int = 8
    hidden: int = 256
    features: int = 32
    classes: int = 10
    policy: str = "learned"
    std: float = 0.15  # of the location policy, in [-1, 1] canvas units

    def setup(self):
        self.encoder = GlimpseEncoder(self.features, self.hidden)
        self.core = nn.OptimizedLSTMCell(self.hidden)
        self.classifier = nn.Dense(self.classes)
        if self.policy == "learned":
            self.locator = nn.Dense(2)
            self.baseline = nn.Dense(1)

    def _glimpse(self, images: jax.Array, location: jax.Array) -> jax.Array:
        canvas = jnp.array(images.shape[2:0:-1], jnp.float32)  # (W, H)
        centers = (location + 1) / 2 * canvas
        window = window_for(self.width, self.scales, self.ratio)
        return pyramid(
            images,
            centers,
            self.width,
            size=self.size,
            scales=self.scales,
            ratio=self.ratio,
            window=window,
        )

    def __call__(self, images: jax.Array, train: bool = False, key: jax.Array | None = None):
        """{"logits" [B, classes], "locations" [T, B, 2], "log_probs" [T-1, B],
        "baselines" [T-1, B]}; the policy's terms are zero unless it is "learned"."""
        key = jax.random.key(0) if key is None else key
        batch = images.shape[0]
        if self.policy == "random":
            location = jax.random.uniform(key, (batch, 2), minval=-1.0, maxval=1.0)
        else:
            location = jnp.zeros((batch, 2))
        carry = self.core.initialize_carry(key, (batch, self.hidden))
        locations, log_probs, baselines = [], [], []
        for t in range(self.glimpses):
            location = jax.lax.stop_gradient(location)  # a constant to all but the policy
            locations.append(location)
            g = self.encoder(self._glimpse(images, location), location)
            carry, h = self.core(carry, g)
            if t == self.glimpses - 1:
                break
            key, draw = jax.random.split(key)
            if self.policy == "learned":
                mean = jnp.tanh(self.locator(jax.lax.stop_gradient(h)))
                sample = mean + self.std * jax.random.normal(draw, mean.shape) if train else mean
                sample = jax.lax.stop_gradient(sample)
                log_probs.append(gaussian_log_prob(sample, mean, self.std))
                baselines.append(self.baseline(jax.lax.stop_gradient(h))[:, 0])
                location = jnp.clip(sample, -1.0, 1.0)
            elif self.policy == "random":
                location = jax.random.uniform(draw, (batch, 2), minval=-1.0, maxval=1.0)
        zeros = jnp.zeros((max(self.glimpses - 1, 1), batch))
        return {
            "logits": self.classifier(h),
            "locations": jnp.stack(locations),
            "log_probs": jnp.stack(log_probs) if self.policy == "learned" else zeros,
            "baselines": jnp.stack(baselines) if self.policy == "learned" else zeros,
        }


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: float) -> jax.Array:
    """log N(x; mean, std^2 I), summed over the last axis."""
    z = (x - mean) / std
    return jnp.sum(-0.5 * z**2 - math.log(std) - 0.5 * math.log(2 * math.pi), axis=-1)


def reinforce_terms(out: dict, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(policy loss, baseline loss) of RAM's output: reward 1 for a right answer.

    The policy loss is -E[sum_t log pi(l_t) (R - b_t)] with the advantage R - b_t held
    constant (`stop_gradient`), so it moves the location network alone; the baseline
    regresses the reward (squared error) and so lowers the estimator's variance."""
    reward = (jnp.argmax(out["logits"], -1) == labels).astype(jnp.float32)
    advantage = jax.lax.stop_gradient(reward[None] - out["baselines"])
    policy = -jnp.mean(jnp.sum(out["log_probs"] * advantage, axis=0))
    baseline = jnp.mean(jnp.square(out["baselines"] - reward[None]))
    return policy, baseline


class CanvasCNN(nn.Module):
    """A small CNN on the whole canvas: three conv blocks, a global max and a classifier.

    Its compute grows with the canvas area; its parameters do not."""

    features: int = 32
    classes: int = 10

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, key: jax.Array | None = None):
        del train, key
        x = images
        for i in range(3):
            x = nn.relu(nn.Conv(self.features * 2**i, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.max(x, axis=(1, 2))
        return {"logits": nn.Dense(self.classes)(nn.relu(nn.Dense(128)(x)))}
