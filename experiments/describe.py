r"""Prints one JSON line describing the model of a config, without training.

  python -m experiments.describe --config=experiments/configs/cifar10.py:middle18_relaxed \
      [--config.model.blocks_per_level=(5,6,7)] [--config.model.scope=all]
  python -m experiments.describe --config=experiments/configs/moving_digits.py:lstm8
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import launcher
from rvm.models import cbm, sharing
from rvm.tasks.video import task as video_task
from rvm.train import console
from rvm.train.config_check import task_of, validate

config_flags.DEFINE_config_file("config", None, "Config file, with :variant.", lock_config=True)


def describe(config, num_classes: int = 10) -> dict:
    """Parameter counts as trained and after consolidation, from shapes alone."""
    if task_of(config) != "image":
        return describe_video(config)
    cfg = config.model
    x = jnp.zeros((1, 32, 32, 3))

    def count(model):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        return shapes["params"]

    params = count(sharing.build_model(cfg, num_classes))
    merged = (
        jax.eval_shape(lambda p: sharing.consolidate(p, cfg.scope), params)
        if cfg.sharing == "relaxed"
        else params
    )
    return {
        "params": sharing.count_params(params),
        "params_consolidated": sharing.count_params(merged),
        "blocks_per_level": list(cfg.blocks_per_level),
        "trained_blocks_per_level": list(sharing.trained_blocks(cfg)),
        "sharing": cfg.sharing,
        "scope": cfg.scope,
    }


def describe_video(config) -> dict:
    """Parameter count and layer widths of a moving-digits model, from shapes alone."""
    validate(config)
    model = video_task.build_model(config)
    x = video_task.init_input(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    m = config.model
    width = video_task.stack_width(config)
    widths, strides = cbm.width_schedule(m.depth, width, m.num_stages)
    return {
        "params": cbm.count_params(shapes["params"]),
        "task": config.task,
        "kind": m.kind,
        "depth": m.depth,
        "base_width": width,
        "widths": list(widths),
        "strides": list(strides),
        "match_params": m.match_params,
    }


def main(argv):
    del argv
    console.install(verbose=logging.get_verbosity() >= logging.DEBUG)
    with launcher.user_errors():
        validate(flags.FLAGS.config)
        print(json.dumps(describe(flags.FLAGS.config)))


if __name__ == "__main__":
    app.run(main)
