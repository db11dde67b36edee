"""Sharing modes of the CIFAR ResNet: from a config to a model, and consolidation.

The four modes differ only in which network is built and trained:
  nonshared  every block owns its kernels;
  raw        the levels in scope broadcast one conv1 and one conv2 kernel;
  relaxed    trained as `nonshared` with a pull of each in-scope kernel towards
             its set's mean (`rvm.train.relaxation`), then `consolidate`d into
             the `raw` network;
  minimal    the levels in scope keep their padding block and one block;
  equilibrium  the levels in scope keep their padding block and one block run to its
             fixed point (`rvm.models.equilibrium_resnet`; config section
             `model.equilibrium`, experiments/configs/equilibrium.py).
A *set* is the stacked conv1 (or conv2) kernels of one level's scanned blocks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from rvm.models.conv import CONV_IMPLS
from rvm.models.equilibrium import spec_from_config
from rvm.models.resnet import ResNet

# The four ways of the paper (the configs' `all3_*` and `*18_*` variants), and a level solved
# to its fixed point (`rvm.models.equilibrium_resnet`).
PAPER_MODES = ("nonshared", "raw", "relaxed", "minimal")
SHARING_MODES = (*PAPER_MODES, "equilibrium")
SCOPES = ("middle", "all")
NUM_LEVELS = 3
WIDTHS = (16, 32, 64)  # the paper's filters per level; `model.widths` may change them
KERNELS = ("conv1", "conv2")


def _choice(cfg: ml_collections.ConfigDict, field: str, allowed: tuple[str, ...]) -> str:
    value = cfg[field]
    if value not in allowed:
        raise ValueError(f"model.{field}={value!r} is not one of {', '.join(allowed)}")
    return value


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks the `model` section; errors name the field, the value and what is allowed."""
    _choice(cfg, "sharing", SHARING_MODES)
    _choice(cfg, "scope", SCOPES)
    blocks = tuple(cfg.blocks_per_level)
    if len(blocks) != NUM_LEVELS or not all(isinstance(b, int) for b in blocks):
        raise ValueError(
            f"model.blocks_per_level={blocks!r} must be {NUM_LEVELS} integers, one per level"
        )
    minimum = (1, 2, 2)  # level 1 needs a block; levels 2-3 a padding block and one more
    if any(b < m for b, m in zip(blocks, minimum)):
        raise ValueError(
            f"model.blocks_per_level={blocks!r}: each level needs at least {minimum} blocks "
            "(the padding block of levels 2 and 3 included)"
        )
    widths = tuple(cfg.get("widths", WIDTHS))
    if len(widths) != NUM_LEVELS or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ValueError(
            f"model.widths={widths!r} must be {NUM_LEVELS} positive integers, one per level"
        )
    rate = cfg.final_death_rate
    if not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
        raise ValueError(f"model.final_death_rate={rate!r} must be a number in [0, 1)")
    if not isinstance(cfg.unroll, bool):
        raise ValueError(f"model.unroll={cfg.unroll!r} must be True or False")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype={cfg.dtype!r} is not one of float32, bfloat16")
    if cfg.sharing == "equilibrium":
        if "equilibrium" not in cfg:
            raise ValueError("model.sharing='equilibrium' needs a model.equilibrium section")
        spec_from_config(cfg.equilibrium, "model.equilibrium")
    if cfg.get("conv_impl", "xla") not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={cfg.conv_impl!r} is not one of {', '.join(CONV_IMPLS)}")


def levels_in_scope(scope: str) -> tuple[bool, ...]:
    """Which of the three levels `scope` ("middle" or "all") shares."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {', '.join(SCOPES)}")
    return (False, True, False) if scope == "middle" else (True,) * NUM_LEVELS


def trained_blocks(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Blocks per level of the network that is trained (`minimal` shrinks the scope)."""
    blocks = tuple(cfg.blocks_per_level)
    if cfg.sharing != "minimal":
        return blocks
    scope = levels_in_scope(cfg.scope)
    return tuple(1 + int(i > 0) if s else b for i, (b, s) in enumerate(zip(blocks, scope)))


def build_model(
    cfg: ml_collections.ConfigDict,
    num_classes: int,
    *,
    consolidated: bool = False,
    keep_activations: bool = False,
) -> ResNet:
    """The network a `model` config trains, or (`consolidated`) the one it is evaluated as."""
    validate(cfg)
    raw = cfg.sharing == "raw" or (cfg.sharing == "relaxed" and consolidated)
    shared = levels_in_scope(cfg.scope) if raw else (False,) * NUM_LEVELS
    solved = cfg.sharing == "equilibrium"
    return ResNet(
        equilibrium_levels=levels_in_scope(cfg.scope) if solved else (False,) * NUM_LEVELS,
        equilibrium=spec_from_config(cfg.equilibrium, "model.equilibrium") if solved else None,
        blocks_per_level=trained_blocks(cfg),
        widths=tuple(cfg.get("widths", WIDTHS)),
        shared_levels=shared,
        num_classes=num_classes,
        final_death_rate=cfg.final_death_rate if cfg.stochastic_depth else 0.0,
        keep_activations=keep_activations,
        unroll=cfg.unroll,
        dtype=jnp.dtype(cfg.dtype),
        sd_impl=cfg.get("sd_impl", "auto"),
        conv_impl=cfg.get("conv_impl", "xla"),
    )


def set_mask(params: Any, scope: str) -> Any:
    """A pytree of bools over `params`: True at each kernel stack that forms a set."""
    in_scope = levels_in_scope(scope)

    def is_set(path, _):
        names = [getattr(k, "key", None) for k in path]
        level = names[0]
        return (
            level in {f"level{i + 1}" for i, s in enumerate(in_scope) if s}
            and "blocks" in names
            and names[-1] == "kernel"
            and names[-2] in KERNELS
        )

    return jax.tree_util.tree_map_with_path(is_set, params)


def consolidate(params: Any, scope: str) -> Any:
    """Relaxed parameters -> raw parameters: every in-scope kernel replaced by its set's mean.

    The result is the parameter tree of `build_model(cfg, ..., consolidated=True)`:
    the mean kernels move to the level (`levelN/conv1_kernel`); biases and
    BatchNorm variables stay per block.
    """
    params = _as_dict(params)  # fresh dicts, so the caller's tree is left as it was
    for i, s in enumerate(levels_in_scope(scope)):
        if not s:
            continue
        level = params[f"level{i + 1}"]
        residual = level["blocks"]["block"]["residual"]
        for name in KERNELS:
            level[f"{name}_kernel"] = jnp.mean(residual[name].pop("kernel"), axis=0)
    return params


def _as_dict(tree: Any) -> Any:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def count_params(params: Any) -> int:
    """Trainable parameters; a shared kernel is one array and so counts once."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
