"""Config validation before anything is compiled, and the resume-compatibility check.

Every error names the field, the value and what is allowed, so a wrong value on
the command line never surfaces as a traceback from deep inside jit.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from rvm.models import sharing

# Fields that may change between a run and its resumption: they alter neither the
# model, nor the optimisation, nor the order of the data.
RESUME_SAFE = frozenset(
    {
        "eval_batch_size",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "log_every_steps",
        "skip_nonfinite",
        "data.binary_dir",
        "data.tfds_data_dir",
        "data.source",
        "model.unroll",
    }
)


def _positive_int(config, field: str) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}={value!r} must be a positive integer")


def _nonnegative(config, field: str) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{field}={value!r} must be a non-negative number")


def _get(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a training config; raises ValueError naming the first bad field."""
    sharing.validate(config.model)
    for field in (
        "batch_size",
        "eval_batch_size",
        "num_epochs",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "log_every_steps",
    ):
        _positive_int(config, field)
    for field in ("skip_nonfinite", "data.flip", "data.crop", "model.stochastic_depth"):
        if not isinstance(_get(config, field), bool):
            raise ValueError(f"{field}={_get(config, field)!r} must be True or False")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool):
        raise ValueError(f"seed={config.seed!r} must be an integer")
    opt = config.optim
    for field in ("learning_rate", "pull_start", "pull_end"):
        if not isinstance(opt[field], (int, float)) or opt[field] <= 0:
            raise ValueError(f"optim.{field}={opt[field]!r} must be a positive number")
    for field in ("weight_decay", "momentum", "lr_decay"):
        _nonnegative(config, f"optim.{field}")
    bounds = tuple(opt.lr_boundaries)
    if any(not 0 < b < 1 for b in bounds) or list(bounds) != sorted(bounds):
        raise ValueError(
            f"optim.lr_boundaries={bounds!r} must be increasing fractions of training in (0, 1)"
        )
    data = config.data
    if data.normalization not in ("feature", "channel"):
        raise ValueError(
            f"data.normalization={data.normalization!r} is not one of feature, channel"
        )
    holdout = config.data.holdout
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise ValueError(f"data.holdout={holdout!r} must be a non-negative integer")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Refuses to resume a run whose saved config differs in a field that matters."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        return
    saved = _flatten(json.loads(path.read_text()))
    current = _flatten(json.loads(config.to_json()))
    differing = sorted(
        k
        for k in saved.keys() | current.keys()
        if k not in RESUME_SAFE and saved.get(k) != current.get(k)
    )
    if differing:
        lines = [f"  {k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differing]
        raise ValueError(
            f"{workdir} holds a run with a different config; refusing to resume. "
            "Differing fields:\n" + "\n".join(lines)
        )
