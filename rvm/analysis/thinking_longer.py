"""Thinking longer: do shared levels read out past their trained depth gain or lose?

For each run and each of its raw-shared levels, `readout.readout_time_curve` with
BatchNorm statistics re-estimated for every readout time (the trained ones describe
only the trained depth), 1 to `max_factor` times the level's depth, on the same test
images for every run, so that runs trained differently (a fixed depth, random
iteration counts) can be compared point by point.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from rvm.analysis import readout
from rvm.analysis.runs import LEVEL_NAMES, LoadedRun
from rvm.tasks.image import RECALIBRATION_IMAGES

# Points of test error within which error "holds": about one binomial standard error
# of a 10,000-image test error near 23% (0.42 points).
HOLD = 0.5


def label(run: LoadedRun) -> str:
    """The run's name, how it was trained, and the epoch of the checkpoint read."""
    counts = "random iteration counts" if run.config.model.get("random_iterations") else "fixed"
    epochs = [m["epoch"] for m in run.info.metrics if m.get("step") == run.step]
    epoch = f"epoch {epochs[0]}" if epochs else f"step {run.step}"
    return f"{run.info.name} ({counts}, {epoch} of {run.config.num_epochs})"


def caveats(runs: Sequence[LoadedRun]) -> list[str]:
    """What the reader must know when the runs were read at different points of training."""
    if len({r.step for r in runs}) < 2:
        return []
    return [
        "The runs were read at different points of training (their labels give the epoch; "
        "an unfinished run may miss learning-rate drops): compare how error moves "
        "past the trained depth within each run, not the error of one run with another's."
    ]


def curves(run: LoadedRun, levels: Sequence[int], max_factor: int = 2) -> dict[int, list[dict]]:
    """Per raw-shared level of `levels`, test error at readout times 1..max_factor*N,
    BatchNorm statistics recalibrated for each."""
    return {
        level: readout.readout_time_curve(run, level, max_factor=max_factor, recalibrate=True)
        for level in levels
        if run.level_is_shared(level)
    }


def verdict(records: Sequence[dict]) -> str:
    """Whether error "falls", "holds" or "rises" from the trained depth to the longest readout."""
    at = {r["iterations"]: r["error"] for r in records}
    change = at[max(at)] - at[records[0]["trained"]]
    return "falls" if change < -HOLD else "rises" if change > HOLD else "holds"


def summary(records: Sequence[dict]) -> str:
    """One sentence: the verdict and the numbers it rests on."""
    n = records[0]["trained"]
    at = {r["iterations"]: r["error"] for r in records}
    best = min((t for t in at if t > n), key=lambda t: at[t])
    return (
        f"error {verdict(records)} past the trained depth: {at[n]:.2f}% at {n} iterations, "
        f"{at[max(at)]:.2f}% at {max(at)} (best past {n}: {at[best]:.2f}% at {best})"
    )


def markdown(
    results: Sequence[tuple[str, dict[int, list[dict]]]],
    command: str,
    figure: str,
    notes: Sequence[str] = (),
) -> str:
    """The report: the answer per run and level, then one table per level."""
    levels = sorted({lvl for _, by_level in results for lvl in by_level})
    first = next(iter(results[0][1].values()))
    factor = first[-1]["iterations"] // first[0]["trained"]
    md = [
        "# Thinking longer: error against readout time past the trained depth",
        "",
        f"Command: `{command}`",
        "",
        "Test error (%, the whole test split) of each raw-shared level read out for 1 to "
        f"{factor}x its trained depth N, the other levels as trained; iterations past N "
        "reuse the last block's parameters, and every readout time gets BatchNorm "
        f"statistics re-estimated for it ({RECALIBRATION_IMAGES} fixed training images). "
        f"Error *holds* when the error at {factor}N is within {HOLD} points of the error "
        "at N.",
        *[line for note in notes for line in ("", note)],
        "",
        "## Answer",
        "",
    ]
    for name, by_level in results:
        for level, records in by_level.items():
            md.append(f"- {name}, {LEVEL_NAMES[level]} level: {summary(records)}.")
    md += ["", f"![readout time]({figure})", ""]
    for level in levels:
        rows = [(name, by_level[level]) for name, by_level in results if level in by_level]
        md += [f"## {LEVEL_NAMES[level].capitalize()} level", ""]
        md.append("| readout time | " + " | ".join(name for name, _ in rows) + " |")
        md.append("|---" * (len(rows) + 1) + "|")
        for i, r in enumerate(rows[0][1]):
            mark = " (trained)" if r["iterations"] == r["trained"] else ""
            errors = " | ".join(f"{records[i]['error']:.2f}" for _, records in rows)
            md.append(f"| {r['iterations']}{mark} | {errors} |")
        md.append("")
    return "\n".join(md)


def write(
    results: Sequence[tuple[str, dict[int, list[dict]]]],
    stem: Path,
    command: str,
    notes: Sequence[str] = (),
) -> tuple[Path, Path, Path]:
    """`stem`.md, .png (one panel per level) and .json; returns their paths."""
    levels = sorted({lvl for _, by_level in results for lvl in by_level})
    fig = Figure(figsize=(5.5 * len(levels), 4.2))
    axes = fig.subplots(1, len(levels), squeeze=False)[0]
    for ax, level in zip(axes, levels):
        shown = [(name, by_level[level]) for name, by_level in results if level in by_level]
        readout.readout_time_axes(ax, shown, level)
    png = readout.save_figure(fig, stem.with_suffix(".png"))
    records = [
        {"run": name, "level": level, **r}
        for name, by_level in results
        for level, rs in by_level.items()
        for r in rs
    ]
    js = stem.with_suffix(".json")
    js.write_text(json.dumps(records, indent=1) + "\n")
    md = stem.with_suffix(".md")
    md.write_text(markdown(results, command, png.name, notes) + "\n")
    return md, png, js
