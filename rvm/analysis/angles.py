"""How close relaxed sharing brings each kernel set to one kernel, and what consolidation costs.

During a relaxed run every epoch record holds, per set (a level's stacked conv1 or
conv2 kernels), the largest angle between a member and the set mean. Once every
angle is well under a degree, replacing the members by the mean (consolidation)
should barely change the test error; the table checks that it did.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from rvm.analysis.readout import save_figure
from rvm.analysis.runs import LEVEL_NAMES, RunInfo

# Log axes cannot show 0; an angle this small is "identical" for any plot.
_FLOOR_DEGREES = 1e-4


def set_label(name: str) -> str:
    """'level2/blocks/block/residual/conv1/kernel' -> 'middle conv1'."""
    level = re.search(r"level(\d)", name)
    conv = re.search(r"(conv\d)", name)
    if not (level and conv):
        return name
    return f"{LEVEL_NAMES[int(level.group(1)) - 1]} {conv.group(1)}"


def angle_history(records: Sequence[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps, {set name: max angle in degrees per record}) from metrics.jsonl records."""
    rows = [r for r in records if "max_angle" in r]
    steps = np.array([r["step"] for r in rows])
    names = sorted({k for r in rows for k in r["max_angle"]})
    return steps, {
        n: np.array([r["max_angle"].get(n, np.nan) for r in rows], np.float64) for n in names
    }


def plot_angles(runs: Sequence[tuple[str, Sequence[dict]]], path: str | Path) -> Path:
    """One panel per relaxed run: each set's max angle to its mean against step, log scale."""
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig = Figure(figsize=(5.5 * cols, 4 * rows))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    cmap = colormaps["tab10"]
    for ax, (label, records) in zip(axes, runs):
        steps, sets = angle_history(records)
        for j, (name, angles) in enumerate(sets.items()):
            ax.plot(
                steps,
                np.maximum(angles, _FLOOR_DEGREES),
                ".-" if len(steps) < 30 else "-",
                color=cmap(j % 10),
                label=set_label(name),
            )
        ax.axhline(1.0, color="k", ls="--", lw=1, label="1 degree")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("max angle to set mean (degrees)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    return save_figure(fig, path)


def consolidation_rows(infos: Sequence[RunInfo]) -> list[dict]:
    """Per relaxed run: test error before and after consolidation, and the final max angle."""
    rows = []
    for info in infos:
        if info.sharing != "relaxed":
            continue
        res = info.results or {}
        _, sets = angle_history(info.metrics)
        final = [float(a[-1]) for a in sets.values() if len(a)]
        rows.append(
            {
                "run": info.name,
                "label": info.label,
                "before": res.get("test_error"),
                "after": res.get("consolidated_test_error"),
                "params": res.get("params"),
                "params_consolidated": res.get("params_consolidated"),
                "final_max_angle": max(final) if final else None,
            }
        )
    return rows


def consolidation_table(infos: Sequence[RunInfo]) -> str:
    """Markdown table of `consolidation_rows`; unfinished runs show '-' after consolidation."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = [
        "| run | label | test error before (%) | after consolidation (%) | change | "
        "params before | params after | final max angle (deg) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in consolidation_rows(infos):
        change = None if None in (r["before"], r["after"]) else r["after"] - r["before"]
        lines.append(
            f"| {r['run']} | {r['label']} | {fmt(r['before'], '.2f')} | {fmt(r['after'], '.2f')} "
            f"| {fmt(change, '+.2f')} | {fmt(r['params'], 'd')} | "
            f"{fmt(r['params_consolidated'], 'd')} | {fmt(r['final_max_angle'], '.3g')} |"
        )
    return "\n".join(lines) + "\n"
