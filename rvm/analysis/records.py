"""A run directory's records, read in one place for every analysis.

A run directory (a run trained alone, or each `seed_<s>/` of a pack) holds config.json
(the config it trained with), metrics.jsonl (one record per epoch), results.json (once
it finished) and starts.jsonl (one line per start, `rvm.train.provenance`). The image
tables (`rvm.analysis.runs`), the thinking report (`rvm.analysis.thinking`) and the
moving-digits summary (`rvm.analysis.sequences`) all read them through `read_records`,
so a record's format is known to one module besides the writers in `rvm.train`. Reading
imports no JAX (the reports run beside trainings that own the devices).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rvm.errors import UserError
from rvm.train import metrics


class NotARunError(UserError, FileNotFoundError):
    """The directory is not a run directory, or it holds no checkpoint to analyse."""


@dataclasses.dataclass(frozen=True)
class Records:
    """The JSON records of one run directory, as written."""

    workdir: Path
    config: dict  # config.json as saved (`config_check.with_added_fields` fills later fields)
    metrics: list[dict]  # metrics.jsonl; a torn last line dropped
    results: dict | None  # None while the run is unfinished
    starts: list[dict]  # starts.jsonl; empty for runs recorded before it existed

    @property
    def name(self) -> str:
        return self.workdir.name


def read_records(workdir: str | Path) -> Records:
    """The records of the run directory `workdir`; NotARunError where it has no config.json."""
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise NotARunError(
            f"{workdir} is not a run directory: it has no config.json "
            "(run directories are written by `python -m experiments.train --workdir=DIR`)"
        )
    results = workdir / "results.json"
    return Records(
        workdir,
        json.loads(path.read_text()),
        metrics.read_jsonl(workdir / "metrics.jsonl"),
        json.loads(results.read_text()) if results.is_file() else None,
        metrics.read_jsonl(workdir / "starts.jsonl"),
    )


def runs_in(path: str | Path) -> list[Path]:
    """The run directories `path` stands for: the directory itself, or for a pack's
    workdir (its config.json lists `seeds`) each seed's `seed_<s>/`."""
    path = Path(path)
    try:
        seeds = json.loads((path / "config.json").read_text()).get("seeds")
    except (OSError, json.JSONDecodeError):
        seeds = None  # `read_records` says what is wrong with it
    return [path] if seeds is None else [path / f"seed_{s}" for s in seeds]
