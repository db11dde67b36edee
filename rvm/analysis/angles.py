"""How close relaxed sharing brings each kernel set to one kernel, and what consolidation costs.

During a relaxed run every epoch record holds, per set (a level's stacked conv1 or
conv2 kernels), the largest angle between a member and the set mean (`max_angle`)
and the largest angle between two members (`max_pairwise_angle`, up to twice the
first); "the weight vectors within 1 degree" reads either way, so both are shown.
Once the angles are well under a degree, replacing the members by the mean
(consolidation) should barely change the test error. It is measured twice: with
the BatchNorm statistics the run trained (which describe the unaveraged kernels'
activations) and with statistics re-estimated for the consolidated network.
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
from rvm.analysis.runs import LEVEL_NAMES, LoadedRun, RunInfo
from rvm.models import sharing
from rvm.tasks.image import RECALIBRATION_IMAGES
from rvm.train.relaxation import max_pairwise_angles

# How the consolidation table and the angle plot were obtained, for the report.
CONSOLIDATION_NOTE = (
    "Angles per set: solid, the largest angle between a member and the set mean "
    "(`max_angle`); dotted, the largest angle between two members (`max_pairwise_angle`, "
    "logged by runs trained after it was added; for others the final value is computed "
    "from the checkpoint). Test errors: 'trained stats' evaluates with the BatchNorm "
    "statistics the run trained (for the consolidated network they describe the "
    "unaveraged kernels' activations); 're-estimated' first replaces every BatchNorm's "
    f"statistics by the exact mean and variance of its inputs over {RECALIBRATION_IMAGES} "
    "fixed training images (no augmentation), in the network evaluated "
    "(`rvm.models.recalibrate`). Runs whose results.json predates these numbers get them "
    "from their checkpoint here."
)
# Log axes cannot show 0; an angle this small is "identical" for any plot.
_FLOOR_DEGREES = 1e-4


def set_label(name: str) -> str:
    """'level2/blocks/block/residual/conv1/kernel' -> 'middle conv1'."""
    level = re.search(r"level(\d)", name)
    conv = re.search(r"(conv\d)", name)
    if not (level and conv):
        return name
    return f"{LEVEL_NAMES[int(level.group(1)) - 1]} {conv.group(1)}"


def angle_history(
    records: Sequence[dict], key: str = "max_angle"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps, {set name: angle in degrees per record}) from metrics.jsonl records;
    `key` is `max_angle` (member to mean) or `max_pairwise_angle`."""
    rows = [r for r in records if key in r]
    steps = np.array([r["step"] for r in rows])
    names = sorted({k for r in rows for k in r[key]})
    return steps, {n: np.array([r[key].get(n, np.nan) for r in rows], np.float64) for n in names}


def plot_angles(runs: Sequence[tuple[str, Sequence[dict]]], path: str | Path) -> Path:
    """One panel per relaxed run: each set's max angle to its mean against step, log scale."""
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig = Figure(figsize=(5.5 * cols, 4 * rows))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    cmap = colormaps["tab10"]
    for ax, (label, records) in zip(axes, runs):
        for key, style in (("max_angle", "-"), ("max_pairwise_angle", ":")):
            steps, sets = angle_history(records, key)
            for j, (name, angles) in enumerate(sets.items()):
                ax.plot(
                    steps,
                    np.maximum(angles, _FLOOR_DEGREES),
                    ("." if len(steps) < 30 else "") + style,
                    color=cmap(j % 10),
                    label=set_label(name) if key == "max_angle" else None,
                )
        ax.axhline(1.0, color="k", ls="--", lw=1, label="1 degree")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("max angle (degrees): to set mean -, pairwise :")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    return save_figure(fig, path)


def consolidation_extras(run: LoadedRun) -> dict:
    """What a relaxed run's checkpoint adds to its results.json: the errors with
    BatchNorm statistics re-estimated (`LoadedRun.recalibrated`) for the consolidated
    and, as a control, the trained network, and the final largest pairwise angle."""
    mask = sharing.set_mask(run.variables["params"], run.info.scope)
    pairwise = max_pairwise_angles(run.variables["params"], mask)
    return {
        "consolidated_recalibrated_test_error": run.evaluate(
            consolidated=True, variables=run.recalibrated(consolidated=True)
        )["error"],
        "recalibrated_test_error": run.evaluate(
            consolidated=False, variables=run.recalibrated(consolidated=False)
        )["error"],
        "final_max_pairwise_angle": max(float(a) for a in pairwise.values()),
    }


def _final_max(records: Sequence[dict], key: str) -> float | None:
    final = [float(a[-1]) for a in angle_history(records, key)[1].values() if len(a)]
    return max(final) if final else None


def consolidation_rows(infos: Sequence[RunInfo]) -> list[dict]:
    """Per relaxed run: test errors before and after consolidation (with the trained and
    with re-estimated BatchNorm statistics) and the final largest angles."""
    rows = []
    for info in infos:
        if info.sharing != "relaxed":
            continue
        res = info.results or {}
        pairwise = _final_max(info.metrics, "max_pairwise_angle")
        rows.append(
            {
                "run": info.name,
                "label": info.label,
                "before": res.get("test_error"),
                "before_recalibrated": res.get("recalibrated_test_error"),
                "after": res.get("consolidated_test_error"),
                "after_recalibrated": res.get("consolidated_recalibrated_test_error"),
                "params": res.get("params"),
                "params_consolidated": res.get("params_consolidated"),
                "final_max_angle": _final_max(info.metrics, "max_angle"),
                "final_max_pairwise_angle": res.get("final_max_pairwise_angle", pairwise),
            }
        )
    return rows


def consolidation_table(infos: Sequence[RunInfo]) -> str:
    """Markdown table of `consolidation_rows`; what a run lacks shows as '-'."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    below = lambda a: "-" if a is None else ("yes" if a < 1.0 else "no")
    lines = [
        "| run | label | before: trained stats (%) | before: re-estimated (%) "
        "| after: trained stats (%) | after: re-estimated (%) | params before | params after "
        "| final max angle to mean (deg) | < 1 deg | final max pairwise angle (deg) | < 1 deg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in consolidation_rows(infos):
        lines.append(
            f"| {r['run']} | {r['label']} | {fmt(r['before'], '.2f')} "
            f"| {fmt(r['before_recalibrated'], '.2f')} | {fmt(r['after'], '.2f')} "
            f"| {fmt(r['after_recalibrated'], '.2f')} | {fmt(r['params'], 'd')} "
            f"| {fmt(r['params_consolidated'], 'd')} | {fmt(r['final_max_angle'], '.3g')} "
            f"| {below(r['final_max_angle'])} | {fmt(r['final_max_pairwise_angle'], '.3g')} "
            f"| {below(r['final_max_pairwise_angle'])} |"
        )
    return "\n".join(lines) + "\n"
