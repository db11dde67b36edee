"""Config validation before anything is compiled, and the resume-compatibility check.

Every error names the field, the value and what is allowed, so a wrong value on
the command line never surfaces as a traceback from deep inside jit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_collections

from rvm.errors import ConfigError
from rvm.models import cbm, sharing
from rvm.models.recurrent import NORMS
from rvm.models.stochastic_depth import SD_IMPLS
from rvm.train import image_quality, thinking_task
from rvm.train.clips import HANDOVERS
from rvm.train.optim import OPTIMIZERS
from rvm.train.pack import STRATEGIES
from rvm.train.video_task import SCHEMES

TASKS = ("image", "motion", "prediction", "thinking")
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
# config without one compares, and is loaded, as if it held this value.
ADDED_FIELDS = {
    "model.unroll": False,
    "model.conv_impl": "xla",
    "model.random_iterations": False,
    "model.iterations_mean": 2.0,
    "model.iterations_sigma": 0.5,
}


def with_added_fields(flat: dict) -> dict:
    """A flattened config with `ADDED_FIELDS` filled in where it predates them."""
    return {**ADDED_FIELDS, **flat}


def _positive_int(config, field: str) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r} must be a positive integer")


def _nonnegative(config, field: str) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{field}={value!r} must be a non-negative number")


def _get(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def _finite(values: dict, prefix: str = "") -> None:
    """Every float anywhere in the config is finite: a NaN passes every `<` and `>` check
    below, and would otherwise surface only as a NaN loss after compiling and training."""
    for key, value in values.items():
        field = f"{prefix}{key}"
        if isinstance(value, dict):
            _finite(value, field + ".")
            continue
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                shown = field if i is None else f"{field}[{i}]"
                raise ConfigError(f"{shown}={v!r} must be a finite number")


def task_of(config: ml_collections.ConfigDict) -> str:
    """The config's task; a config without the field (the CIFAR-10 family) is an image run."""
    return config.get("task", "image")


def _choice(config, field: str, allowed: tuple) -> None:
    value = _get(config, field)
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not one of {', '.join(map(str, allowed))}")


def _bool(config, field: str) -> None:
    if not isinstance(_get(config, field), bool):
        raise ConfigError(f"{field}={_get(config, field)!r} must be True or False")


def _positive(config, field: str) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{field}={value!r} must be a positive number")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a training config; raises ConfigError (a ValueError) naming the first bad field."""
    _finite(config.to_dict())
    task = task_of(config)
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not one of {', '.join(TASKS)}")
    for field in (
        "batch_size",
        "eval_batch_size",
        "num_epochs",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "log_every_steps",
    ):
        _positive_int(config, field)
    _bool(config, "skip_nonfinite")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool):
        raise ConfigError(f"seed={config.seed!r} must be an integer")
    _seeds(config)
    opt = config.optim
    name = opt.get("name", "sgd")  # the CIFAR-10 family has no `name`: SGD
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    _positive(config, "optim.learning_rate")
    for field in ("weight_decay", "momentum", "lr_decay"):
        _nonnegative(config, f"optim.{field}")
    if opt.get("momentum", 0) >= 1:
        raise ConfigError(f"optim.momentum={opt.momentum!r} must be below 1")
    if "nesterov" in opt:
        _bool(config, "optim.nesterov")
    bounds = tuple(opt.lr_boundaries)
    if any(not 0 < b < 1 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(
            f"optim.lr_boundaries={bounds!r} must be strictly increasing fractions of training "
            "in (0, 1)"
        )
    if task == "image":
        _validate_image(config)
    elif task == "thinking":
        thinking_task.validate(config)
    else:
        _validate_video(config)


def _seeds(config: ml_collections.ConfigDict) -> None:
    """`seeds` (runs trained together as one pack, `rvm.train.pack`) and how they are packed."""
    if "pack_strategy" in config:
        _choice(config, "pack_strategy", ("auto", *STRATEGIES))
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


def _validate_image(config: ml_collections.ConfigDict) -> None:
    try:
        sharing.validate(config.model)
    except ValueError as e:  # the model's own checks, which name the field already
        raise ConfigError(str(e)) from e
    for field in ("data.flip", "data.crop", "model.stochastic_depth"):
        _bool(config, field)
    if "sd_impl" in config.model:  # configs written before the field run "auto"
        _choice(config, "model.sd_impl", SD_IMPLS)
    if config.model.get("random_iterations", False):
        if config.model.sharing not in ("raw", "relaxed"):
            raise ConfigError("model.random_iterations=True needs model.sharing raw or relaxed")
        if not config.model.iterations_mean >= 1 or not config.model.iterations_sigma >= 0:
            raise ConfigError("model.iterations_mean must be >= 1, model.iterations_sigma >= 0")
    for field in ("pull_start", "pull_end"):
        _positive(config, f"optim.{field}")
    _choice(config, "data.normalization", ("feature", "channel"))
    holdout = config.data.holdout
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise ConfigError(f"data.holdout={holdout!r} must be a non-negative integer")


def _pair(config, field: str) -> None:
    value = tuple(_get(config, field))
    if len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"{field}={value!r} must be a (low, high) pair of numbers")
    if not 0 < value[0] <= value[1]:
        raise ConfigError(f"{field}={value!r} needs 0 < low <= high")


def _validate_video(config: ml_collections.ConfigDict) -> None:
    """The motion and prediction configs of `experiments/configs/moving_digits.py`."""
    m, d = config.model, config.data
    _choice(config, "model.kind", ("cbm", *cbm.RNN_CELLS))
    for field in ("depth", "base_width", "kernel_size", "num_stages"):
        _positive_int(config, f"model.{field}")
    _choice(config, "model.norm", NORMS)
    _choice(config, "model.merge", cbm.MERGES)
    rate = m.td_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"model.td_rate={rate!r} must be a number in [0, 1)")
    if rate and m.kind != "cbm":
        raise ConfigError(
            f"model.td_rate={rate!r} needs model.kind='cbm' (Temporal Dropout acts on a CBM's "
            f"temporal unit), not {m.kind!r}"
        )
    _bool(config, "model.match_params")
    if m.match_params and m.kind == "cbm":
        raise ConfigError(
            "model.match_params=True sizes a ConvRNN stack to the CBM's parameter count; "
            "it needs model.kind in " + ", ".join(cbm.RNN_CELLS)
        )
    for field in ("num_train", "num_test", "num_frames", "canvas", "digit_size"):
        _positive_int(config, f"data.{field}")
    _nonnegative(config, "data.seed")
    if d.digit_size > d.canvas:
        raise ConfigError(f"data.digit_size={d.digit_size} must be at most data.canvas={d.canvas}")
    _pair(config, "data.speed")
    _choice(config, "train.scheme", SCHEMES)
    if config.task == "motion":
        _pair(config, "data.radius")
        if d.num_frames < 3:
            raise ConfigError(f"data.num_frames={d.num_frames} must be >= 3 to tell motions apart")
        _validate_scheme(config)
    else:
        _validate_prediction(config)


def _validate_scheme(config: ml_collections.ConfigDict) -> None:
    t, frames = config.train, config.data.num_frames
    if t.scheme == "tbptt":
        _positive_int(config, "train.clip_len")
    elif t.scheme == "overlap":
        for field in ("min_clip", "max_clip", "max_overlap"):
            _positive_int(config, f"train.{field}")
        if not 2 <= t.min_clip <= t.max_clip <= frames:
            raise ConfigError(
                f"train.min_clip={t.min_clip}, train.max_clip={t.max_clip} need "
                f"2 <= min_clip <= max_clip <= data.num_frames={frames}"
            )
        if t.max_overlap >= t.min_clip:
            raise ConfigError(
                f"train.max_overlap={t.max_overlap} must be below train.min_clip={t.min_clip} "
                "so that every clip advances"
            )
        _nonnegative(config, "train.coherence_weight")
        _choice(config, "train.handover", HANDOVERS)


def _validate_prediction(config: ml_collections.ConfigDict) -> None:
    m, d = config.model, config.data
    if config.train.scheme != "full":
        raise ConfigError(
            f"train.scheme={config.train.scheme!r}: frame prediction trains end to end, "
            "so only 'full' is allowed"
        )
    _positive_int(config, "data.num_digits")
    _positive_int(config, "data.num_input")
    if d.canvas < image_quality.SSIM_WINDOW:
        raise ConfigError(
            f"data.canvas={d.canvas} is below the {image_quality.SSIM_WINDOW}-pixel SSIM window"
        )
    if d.num_input >= d.num_frames:
        raise ConfigError(
            f"data.num_input={d.num_input} must be below data.num_frames={d.num_frames} "
            "(the rest are predicted)"
        )
    # The decoder doubles the top feature map (stem stride 2, then the stages' strides).
    top = -(-d.canvas // 2)
    for s in cbm.width_schedule(m.depth, 1, m.num_stages)[1]:
        top = -(-top // s)
    size = top
    while size < d.canvas:
        size *= 2
    if size != d.canvas:
        raise ConfigError(
            f"data.canvas={d.canvas} cannot be decoded by doubling the {top}x{top} top feature "
            f"map (use a canvas of {top} times a power of two)"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
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
    saved = with_added_fields(_flatten(saved))
    current = with_added_fields(_flatten(json.loads(config.to_json())))
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
