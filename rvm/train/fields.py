"""Checks of single config fields, shared by the loop's validation and each task's.

Every error names the field, the value and what is allowed, so a wrong value on
the command line never surfaces as a traceback from deep inside jit.
"""

from __future__ import annotations

import math

from rvm.errors import ConfigError


def positive_int(config, field: str) -> None:
    value = get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r} must be a positive integer")


def nonnegative(config, field: str) -> None:
    value = get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{field}={value!r} must be a non-negative number")


def get(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def finite(values: dict, prefix: str = "") -> None:
    """Every float anywhere in the config is finite: a NaN passes every `<` and `>` check
    below, and would otherwise surface only as a NaN loss after compiling and training."""
    for key, value in values.items():
        field = f"{prefix}{key}"
        if isinstance(value, dict):
            finite(value, field + ".")
            continue
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                shown = field if i is None else f"{field}[{i}]"
                raise ConfigError(f"{shown}={v!r} must be a finite number")


def choice(config, field: str, allowed: tuple) -> None:
    value = get(config, field)
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not one of {', '.join(map(str, allowed))}")


def boolean(config, field: str) -> None:
    if not isinstance(get(config, field), bool):
        raise ConfigError(f"{field}={get(config, field)!r} must be True or False")


def positive(config, field: str) -> None:
    value = get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{field}={value!r} must be a positive number")


def pair(config, field: str) -> None:
    value = tuple(get(config, field))
    if len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"{field}={value!r} must be a (low, high) pair of numbers")
    if not 0 < value[0] <= value[1]:
        raise ConfigError(f"{field}={value!r} needs 0 < low <= high")
