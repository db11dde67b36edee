"""Run records in the workdir: `metrics.jsonl` (one line per epoch), `config.json`,
`results.json`, TensorBoard summaries (`WORKDIR/tensorboard`), and the run's progress
and per-epoch lines on the console (`rvm.train.console`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from rvm.train import console


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and np.ndim(value) == 0:
        return value.item()
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (a write cut short) is dropped."""
    return _read_jsonl(path)[0]


def _read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """The records and the count of non-blank lines (one more when the last was torn)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            _warn_torn(path, line)
    return records, len(lines)


def _replace(path: str | Path, text: str) -> None:
    """Writes `text` to `path` in one rename, so a kill leaves the old file or the new one."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _line(record: dict) -> str:
    """One record as a line of a JSON-lines file, as every writer here writes it."""
    return json.dumps(plain(record), sort_keys=True) + "\n"


def restore_jsonl(path: str | Path, records: list[dict]) -> int:
    """Makes `path` hold exactly `records`, those of the checkpoint a run resumes from:
    drops what a killed run logged after it and writes again lines that were lost.
    Returns how many of `records` the file lacked; a torn last line it drops (a write cut
    short) gets the warning `read_jsonl` gives, unless it is one of those lost lines, whose
    count the caller tells."""
    path = Path(path)
    text = "".join(map(_line, records))
    old = path.read_text() if path.exists() else ""
    if old == text:
        return 0
    _replace(path, text)
    lost = len(set(text.splitlines()) - set(old.splitlines()))
    last = ([line for line in old.splitlines() if line.strip()] or [""])[-1]
    if last and not lost and not _parses(last):
        _warn_torn(path, last)
    return lost


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _warn_torn(path: Path, line: str) -> None:
    logging.warning("%s: dropping its torn last line %r", path, line[:80])


def append_jsonl(path: str | Path, record: dict) -> None:
    """Adds `record` as the last line of `path` in one rename, dropping a torn last line."""
    _replace(path, "".join(map(_line, [*read_jsonl(path), record])))


def write_json(path: str | Path, value: Any) -> None:
    _replace(path, json.dumps(plain(value), indent=2, sort_keys=True) + "\n")


def summary(results: dict, workdir: str | Path) -> list[str]:
    """The lines a launcher prints after a run: its final numbers and where its records are."""
    workdir = Path(workdir)
    if not results.get("finished"):
        return [f"stopped at step {results['step']}; run the same command again to resume"]
    numbers = [
        label.format(results[key])
        for key, label in (
            ("test_error", "test error {:.2f}%"),
            ("consolidated_test_error", "after consolidation {:.2f}%"),
            ("test_mse", "test MSE {:.4f}"),
            ("test_psnr", "PSNR {:.2f}"),
            ("test_ssim", "SSIM {:.3f}"),
        )
        if key in results
    ]
    numbers.append(f"{results['params']:,} parameters")
    if "params_consolidated" in results:
        numbers[-1] += f" ({results['params_consolidated']:,} consolidated)"
    return [
        "done: " + ", ".join(numbers),
        f"  results      {workdir / 'results.json'}",
        f"  per epoch    {workdir / 'metrics.jsonl'}",
        f"  checkpoints  {workdir / 'checkpoints'}",
        f"  tensorboard  tensorboard --logdir {workdir / 'tensorboard'}",
    ]


# The epoch line's numbers, in this order, as (record key, label, format).
_EPOCH_FIELDS = (
    ("train_loss", "train loss", "{:.3f}"),
    ("train_error", "error", "{:.1f}%"),
    ("val_error", "val error", "{:.1f}%"),
    ("test_error", "test error", "{:.1f}%"),
    ("test_mse", "test mse", "{:.4f}"),
    ("test_psnr", "psnr", "{:.1f}"),
)


class MetricWriter:
    """Appends epoch records (`metrics.jsonl`, TensorBoard) and shows progress on the
    console: a live bar on a terminal, short lines elsewhere. With `enabled=False` (a
    process other than the first of a multi-process run) it does nothing.

    `steps_per_epoch`, `batch_size` and `unit` (all optional) let the progress line show
    the epoch and the examples per second; `label` names the run in its epoch lines.
    """

    def __init__(
        self,
        workdir: str | Path,
        total_steps: int,
        enabled: bool = True,
        *,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
        unit: str = "examples",
        label: str = "",
    ):
        self.path = Path(workdir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.enabled = enabled
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.unit = unit
        self.label = label  # opens the epoch line: which run of a pack it is
        self.start = self.last_time = self.epoch_time = time.time()
        self.last_step: int | None = None
        self.tb = None
        if enabled:
            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def _epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)

    def _where(self, step: int) -> str:
        if not self.steps_per_epoch:
            return f"step {step}/{self.total_steps}"
        epoch = (step - 1) // self.steps_per_epoch + 1
        return f"epoch {epoch}/{self._epochs()} step {step}/{self.total_steps}"

    def _eta(self, step: int, first_step: int) -> str:
        elapsed = time.time() - self.start
        return console.duration(elapsed / max(step - first_step, 1) * (self.total_steps - step))

    def progress(self, step: int, first_step: int, step_metrics: dict[str, Any]) -> None:
        """The status line between epochs: where the run is, its loss, speed and ETA."""
        if not self.enabled:
            return
        now = time.time()
        since = first_step if self.last_step is None else self.last_step
        parts = [self._where(step), f"loss {float(step_metrics['loss']):.4g}"]
        if self.batch_size and step > since:
            rate = (step - since) * self.batch_size / max(now - self.last_time, 1e-9)
            parts.append(f"{rate:.0f} {self.unit}/s")
        parts.append(f"ETA {self._eta(step, first_step)}")
        self.last_step, self.last_time = step, now
        text = "  ".join(parts)
        console.status(f"{console.bar(step / self.total_steps)} {text}" if console.live() else text)

    def write(self, step: int, first_step: int, record: dict[str, Any]) -> None:
        """Appends one epoch's record and prints its short line; `first_step` is where this
        process began."""
        if not self.enabled:
            return
        record = plain(record)
        with self.path.open("a") as f:
            f.write(_line(record))
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for k, v in value.items():
                        self.tb.add_scalar(f"{key}/{k}", v, step)
            self.tb.flush()
        now = time.time()
        line = self._epoch_line(step, first_step, record, seconds=now - self.epoch_time)
        line = f"{self.label}  {line}" if self.label else line
        # The next speed is the training's alone, without this evaluation and checkpoint.
        self.epoch_time = self.last_time = now
        self.last_step = step
        console.clear_status()
        logging.info("%s", line)

    def _epoch_line(self, step: int, first_step: int, record: dict, seconds: float) -> str:
        """`epoch 2/3  train loss 1.135  error 44.2%  test error 48.4%  ...  8.5 s  ETA 0:17`"""
        epoch = record.get("epoch")
        if epoch is None:
            parts = [f"step {step}/{self.total_steps}"]
        else:
            parts = [
                f"epoch {epoch}/{self._epochs()}" if self.steps_per_epoch else f"epoch {epoch}"
            ]
        parts += [
            f"{label} {fmt.format(record[key])}"
            for key, label, fmt in _EPOCH_FIELDS
            if isinstance(record.get(key), (int, float))
        ]
        angles = record.get("max_angle")  # relaxed runs: per kernel set
        if isinstance(angles, dict) and angles:
            parts.append(f"max angle {max(angles.values()):.1f} deg")
        parts.append(f"{seconds:.1f} s")
        if step < self.total_steps:
            parts.append(f"ETA {self._eta(step, first_step)}")
        return "  ".join(parts)

    def close(self) -> None:
        console.clear_status()
        if self.tb is not None:
            self.tb.close()
