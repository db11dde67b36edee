"""Run records in the workdir: `metrics.jsonl` (one line per epoch), `config.json`,
`results.json`, TensorBoard summaries when `tensorboardX` is installed, and a
progress line with an ETA on the log."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging


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
            logging.warning("%s: dropping its torn last line %r", path, line[:80])
    return records, len(lines)


def _replace(path: str | Path, text: str) -> None:
    """Writes `text` to `path` in one rename, so a kill leaves the old file or the new one."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def restore_jsonl(path: str | Path, records: list[dict]) -> int:
    """Makes `path` hold exactly `records`, those of the checkpoint a run resumes from:
    drops what a killed run logged after it (and a torn last line) and writes again
    lines that were lost. Returns how many of `records` the file lacked."""
    path = Path(path)
    text = "".join(json.dumps(plain(r), sort_keys=True) + "\n" for r in records)
    old = path.read_text() if path.exists() else ""
    if old == text:
        return 0
    _replace(path, text)
    return len(set(text.splitlines()) - set(old.splitlines()))


def write_json(path: str | Path, value: Any) -> None:
    _replace(path, json.dumps(plain(value), indent=2, sort_keys=True) + "\n")


def _duration(seconds: float) -> str:
    return (
        time.strftime("%H:%M:%S", time.gmtime(seconds))
        if seconds < 86400
        else (f"{seconds / 3600:.0f}h")
    )


class MetricWriter:
    """Appends epoch records and logs progress; with `enabled=False` (a process other
    than the first of a multi-process run) it does nothing."""

    def __init__(self, workdir: str | Path, total_steps: int, enabled: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.enabled = enabled
        self.start = time.time()
        self.tb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        except ImportError:
            pass

    def progress(self, step: int, first_step: int, step_metrics: dict[str, Any]) -> None:
        """A log line between epochs: where the run is and when it should end."""
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(step - first_step, 1) * (self.total_steps - step)
        logging.info(
            "step %d/%d loss=%.4g | %.2f steps/s | ETA %s",
            step,
            self.total_steps,
            float(step_metrics["loss"]),
            (step - first_step) / max(elapsed, 1e-9),
            _duration(eta),
        )

    def write(self, step: int, first_step: int, record: dict[str, Any]) -> None:
        """Appends one record and logs progress; `first_step` is where this process began."""
        if not self.enabled:
            return
        record = plain(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for k, v in value.items():
                        self.tb.add_scalar(f"{key}/{k}", v, step)
            self.tb.flush()
        elapsed = time.time() - self.start
        done = max(step - first_step, 1)
        eta = elapsed / done * (self.total_steps - step)
        shown = {k: v for k, v in record.items() if isinstance(v, float)}
        logging.info(
            "step %d/%d (%.1f%%) %s | ETA %s",
            step,
            self.total_steps,
            100.0 * step / self.total_steps,
            " ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())),
            _duration(eta),
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
