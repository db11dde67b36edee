"""Config validation before anything is compiled, and the resume-compatibility check.

Every error names the field, the value and what is allowed, so a wrong value on
the command line never surfaces as a traceback from deep inside jit.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from rvm import tasks
from rvm.errors import ConfigError
from rvm.train.fields import boolean, choice, finite, nonnegative, positive, positive_int
from rvm.train.optim import OPTIMIZERS
from rvm.train.pack import STRATEGIES
from rvm.train.step import RNG_STREAMS

# Readers of the real CIFAR-10, in the official files' order (`rvm.data.cifar10`).
CIFAR10_SOURCES = frozenset({"tfds", "binary", "auto"})

# Fields that may change between a run and its resumption: they alter neither the
# model, nor the optimisation, nor the order of the data. `data.source` may change
# among CIFAR10_SOURCES alone.
RESUME_SAFE = frozenset(
    {
        "eval_batch_size",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "log_every_steps",
        "skip_nonfinite",
        "data.binary_dir",
        "data.tfds_data_dir",
        "model.unroll",
        "pack_strategy",
        "model.sd_impl",
        "model.conv_impl",
    }
)


# Fields added after runs were saved, with the value that reproduces those runs: a saved
# config without one compares, and is loaded, as if it held this value. Those of one task
# (`TASK_ADDED_FIELDS`) apply to its configs only.
ADDED_FIELDS = {
    "rng_streams": "shared",  # the step's and the data order's keys (`rvm.train.step`)
}
TASK_ADDED_FIELDS = {
    # the CIFAR-10 ResNet's options added since its first runs
    "image": {
        "model.unroll": False,
        "model.conv_impl": "xla",
        "model.random_iterations": False,
        "model.iterations_mean": 2.0,
        "model.iterations_sigma": 0.5,
        "model.widths": [16, 32, 64],  # as config.json holds a tuple
    },
    # thinking runs recorded before their validation split and the reference count draw
    "thinking": {"data.num_val": 0, "data.eval_stream": 0, "train.draw": "fixed_k"},
    "video_objects": {"model.match": False},  # runs recorded before the head could match
}


def added_fields(task: str) -> dict:
    """The fields added since runs of `task` were saved, with the values of those runs."""
    return {**ADDED_FIELDS, **TASK_ADDED_FIELDS.get(task, {})}


def with_added_fields(saved: dict) -> dict:
    """A saved config (nested, as config.json holds it) with the fields added since
    (`added_fields`) filled in where it lacks them, so older runs read as the runs they
    were; a saved value always wins."""
    filled = json.loads(json.dumps(saved))  # a deep copy
    for field, value in added_fields(saved.get("task", "image")).items():
        *sections, name = field.split(".")
        node = filled
        for section in sections:
            node = node.setdefault(section, {})
        node.setdefault(name, value)
    return filled


def task_of(config: ml_collections.ConfigDict) -> str:
    """The config's task; a config without the field (the CIFAR-10 family) is an image run."""
    return config.get("task", "image")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a training config; raises ConfigError (a ValueError) naming the first bad field."""
    finite(config.to_dict())
    task = task_of(config)
    if task not in tasks.MODULES:
        raise ConfigError(f"task={task!r} is not one of {', '.join(tasks.MODULES)}")
    for field in (
        "batch_size",
        "eval_batch_size",
        "num_epochs",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "log_every_steps",
    ):
        positive_int(config, field)
    boolean(config, "skip_nonfinite")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool):
        raise ConfigError(f"seed={config.seed!r} must be an integer")
    _seeds(config)
    if "rng_streams" in config:
        choice(config, "rng_streams", RNG_STREAMS)
    opt = config.optim
    name = opt.get("name", "sgd")  # the CIFAR-10 family has no `name`: SGD
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    positive(config, "optim.learning_rate")
    for field in ("weight_decay", "momentum", "lr_decay"):
        nonnegative(config, f"optim.{field}")
    if opt.get("momentum", 0) >= 1:
        raise ConfigError(f"optim.momentum={opt.momentum!r} must be below 1")
    if "nesterov" in opt:
        boolean(config, "optim.nesterov")
    bounds = tuple(opt.lr_boundaries)
    if any(not 0 < b < 1 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(
            f"optim.lr_boundaries={bounds!r} must be strictly increasing fractions of training "
            "in (0, 1)"
        )
    tasks.MODULES[task].validate(config)


def _seeds(config: ml_collections.ConfigDict) -> None:
    """`seeds` (runs trained together as one pack, `rvm.train.pack`) and how they are packed."""
    if "pack_strategy" in config:
        choice(config, "pack_strategy", ("auto", *STRATEGIES))
    seeds = config.get("seeds")
    if seeds is None:  # one run, of `seed`
        return
    if not isinstance(seeds, (tuple, list)) or not seeds:
        raise ConfigError(f"seeds={seeds!r} must be a non-empty tuple of integers")
    seeds = tuple(seeds)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError(f"seeds={seeds!r}: {s!r} is not an integer")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"seeds={seeds!r} repeats {repeated}: each seed is one run")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, tuples as lists (as JSON reads them back)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume(
    config: ml_collections.ConfigDict, workdir: str | Path, saved: dict | None = None
) -> None:
    """Refuses to resume a run whose saved config (`saved`, else the workdir's
    config.json) differs in a field that matters."""
    if saved is None:
        path = Path(workdir) / "config.json"
        if not path.exists():
            return
        saved = json.loads(path.read_text())
    saved = flatten(with_added_fields(saved))
    current = flatten(with_added_fields(json.loads(config.to_json())))
    same_images = {saved.get("data.source"), current.get("data.source")} <= CIFAR10_SOURCES
    differing = sorted(
        k
        for k in saved.keys() | current.keys()
        if k not in RESUME_SAFE
        and saved.get(k) != current.get(k)
        and not (k == "data.source" and same_images)
    )
    if differing:
        fields = "; ".join(
            f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differing
        )
        raise ConfigError(
            f"{workdir} holds a run with a different config ({fields}); resume it with the "
            "saved config, or pick another --workdir"
        )
