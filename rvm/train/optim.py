"""The optimiser of Huang et al.: SGD with Nesterov momentum, step-decayed learning rate,
L2 weight decay, and (for relaxed sharing) the relaxation pull, all before momentum.

`optim.name="adam"` replaces the SGD stage by Adam (same schedule; L2 decay added to the
gradient before it). The moving-digits configs use it: at their CPU budget (150 steps),
SGD (learning rate 0.05, Nesterov momentum 0.9) trained the CBM stacks to 26-28% test
error but left parameter-matched ConvLSTM stacks at 67-86% (chance: 83%) at depths 2-8,
which would have turned the depth comparison into an optimiser comparison. A config without
`name` (the CIFAR-10 family) uses SGD.

Two optional fields serve the deep weight-tied nets of the thinking-longer configs, whose
gradients pass through tens of iterations of one block: `optim.warmup_steps` ramps the
learning rate linearly from 0 over the first steps, and `optim.clip_norm` (> 0) clips the
gradient's global norm before anything else sees it. Both are off when absent.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

from rvm.errors import ConfigError
from rvm.train.relaxation import exponential_pull, relaxation

OPTIMIZERS = ("sgd", "adam")  # `optim.name`; a config without it uses SGD


def learning_rate(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """`cfg.learning_rate`, multiplied by `cfg.lr_decay` at each fraction in `cfg.lr_boundaries`."""
    steps = [int(round(f * total_steps)) for f in cfg.lr_boundaries]
    if len(set(steps)) != len(steps):
        raise ConfigError(
            f"optim.lr_boundaries={tuple(cfg.lr_boundaries)!r} fall on the same steps {steps} "
            f"of {total_steps}: a decay would be lost"
        )
    boundaries = {step: cfg.lr_decay for step in steps}
    schedule = optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
    warmup = cfg.get("warmup_steps", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"optim.warmup_steps={warmup!r} must be a non-negative integer")
    if warmup == 0:
        return schedule
    return lambda step: schedule(step) * jnp.minimum(1.0, (step + 1) / warmup)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, relax_mask: Any | None = None
) -> optax.GradientTransformation:
    """The chain for config section `optim`; `relax_mask` marks the kernel sets to relax."""
    clip = cfg.get("clip_norm", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"optim.clip_norm={clip!r} must be a non-negative number (0: off)")
    chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    chain.append(optax.add_decayed_weights(cfg.weight_decay))
    if relax_mask is not None:
        pull = exponential_pull(cfg.pull_start, cfg.pull_end, total_steps)
        chain.append(relaxation(pull, relax_mask))
    schedule = learning_rate(cfg, total_steps)
    name = cfg.get("name", "sgd")
    if name == "adam":
        chain.append(optax.adam(schedule))
    elif name == "sgd":
        chain.append(optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
    else:
        raise ConfigError(f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    return optax.chain(*chain)


def relaxation_state(opt_state: Any):
    """The relaxation transformation's state inside `make_optimizer`'s chain, or None."""
    return next((s for s in opt_state if hasattr(s, "penalty")), None)
