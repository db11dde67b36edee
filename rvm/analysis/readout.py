"""Readout-time analyses of one level (section 4.3 and Figure 3 of the paper).

Switching a non-padding block off makes it the identity, so switching off the top
`k` blocks of a level is the same network as reading the level out `k` steps
early. Three ablations probe how a level spreads its work over its blocks:
  top_to_bottom  blocks off from the top of the level: readout time N, N-1, ..., 0;
  bottom_to_top  blocks off from the bottom: which early blocks the level relies on;
  single         each block off alone: how much any one block matters.
For a raw-shared level (or the consolidated relaxed one) the recurrence can also
run *longer* than trained: `readout_time_curve` evaluates readout times 1..2N. An
equilibrium level has no blocks to switch off: its readout time is the number of solver
iterations, up to twice the maximum it was trained with (`readout_time_curve` again).

Every analysis can keep the trained BatchNorm statistics or (`recalibrate=True`)
re-estimate them for each network it evaluates (`LoadedRun.recalibrated`): an
ablated level or one run past its depth feeds its blocks, and the levels above it,
inputs whose statistics the trained ones do not describe.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rvm.analysis.runs import LEVEL_NAMES, LoadedRun
from rvm.tasks.image import RECALIBRATION_IMAGES

STATISTICS = {  # the readout-time curves, and how their statistics were obtained
    "trained": "BatchNorm statistics as trained: iterations past the trained depth reuse the "
    "last block's statistics.",
    "recalibrated": "BatchNorm statistics re-estimated for every readout time (exact mean "
    f"and variance over {RECALIBRATION_IMAGES} fixed training images, no augmentation), each "
    "extra iteration its own.",
}
KINDS = ("top_to_bottom", "bottom_to_top", "single")
KIND_TITLES = {
    "top_to_bottom": "top-to-bottom ablation",
    "bottom_to_top": "bottom-to-top ablation",
    "single": "single ablation",
}


def ablation_masks(num_blocks: int) -> list[tuple[str, int, np.ndarray]]:
    """(kind, k, keep-mask) for every ablation point of a level with `num_blocks` blocks.

    For the two sweeps `k` is the number of blocks switched off (0..N, N+1 points);
    for `single` it is the index (0-based) of the one block switched off (N points).
    """
    n = num_blocks
    points = []
    for k in range(n + 1):
        mask = np.ones(n, np.float32)
        mask[n - k :] = 0.0
        points.append(("top_to_bottom", k, mask))
    for k in range(n + 1):
        mask = np.ones(n, np.float32)
        mask[:k] = 0.0
        points.append(("bottom_to_top", k, mask))
    for i in range(n):
        mask = np.ones(n, np.float32)
        mask[i] = 0.0
        points.append(("single", i, mask))
    return points


def ablations(
    run: LoadedRun,
    level: int = 1,
    *,
    consolidated: bool | None = None,
    num_examples: int | None = None,
    recalibrate: bool = False,
) -> list[dict]:
    """Test error at every ablation point of `level` (default: the middle level).

    Returns records {kind, k, blocks_off, error, loss}. Masks that coincide (all
    on, all off) are evaluated once. `consolidated=None` analyses the network the
    run is evaluated as (the consolidated one for relaxed runs); `num_examples`
    limits the test split for quick looks.
    """
    if run.level_is_equilibrium(level):
        raise ValueError(
            f"{run.info.workdir}: level {level + 1} is solved to equilibrium, it has no blocks "
            "to switch off; readout_time_curve gives its error against solver iterations"
        )
    n = run.info.scanned_blocks(level)
    masks = [None] * 3
    cache: dict[tuple, dict] = {}
    records = []
    for kind, k, mask in ablation_masks(n):
        key = tuple(mask.tolist())
        if key not in cache:
            masks[level] = mask
            fresh = None
            if recalibrate:
                fresh = run.recalibrated(list(masks), consolidated=consolidated)
            cache[key] = run.evaluate(
                list(masks), consolidated=consolidated, num_examples=num_examples, variables=fresh
            )
        off = [int(i) for i in np.flatnonzero(mask == 0)]
        records.append(
            {
                "kind": kind,
                "k": k,
                "blocks_off": off,
                "error": cache[key]["error"],
                "loss": cache[key]["loss"],
            }
        )
    return records


def readout_time_curve(
    run: LoadedRun,
    level: int = 1,
    *,
    max_factor: int = 2,
    consolidated: bool | None = None,
    num_examples: int | None = None,
    recalibrate: bool = False,
) -> list[dict]:
    """Test error for readout times 1..max_factor*N of a raw-shared level of N blocks.

    Iterations past N reuse the last block's per-block variables (biases, and the
    BatchNorm statistics unless `recalibrate`), as `rvm.models.resnet.Level`
    defines. With `recalibrate` every readout time gets statistics re-estimated for
    it, each extra iteration its own. Every readout time runs the same program: the
    level scanned for max_factor*N iterations, those past the readout time masked
    off (a masked-off block is the identity), so the evaluation compiles once rather
    than once per readout time.

    For an equilibrium level the readout times are solver iterations (exactly t
    f-evaluations of its solver, no tolerance), on `solver_counts`' grid up to
    max_factor times the solver's trained maximum: one program per count.
    """
    if run.level_is_equilibrium(level):
        return _solver_iterations_curve(run, level, max_factor, num_examples, recalibrate)
    if not run.level_is_shared(level, consolidated):
        raise ValueError(
            f"{run.info.workdir}: level {level + 1} is not raw-shared in this network "
            f"({run.info.sharing} sharing, scope {run.info.scope}); only shared levels run "
            "past their trained depth"
        )
    n = run.info.scanned_blocks(level)
    longest = max_factor * n
    iterations = [None] * 3
    iterations[level] = longest
    masks = [None] * 3
    records = []
    for t in range(1, longest + 1):
        masks[level] = (np.arange(longest) < t).astype(np.float32)
        fresh = None
        if recalibrate:
            fresh = run.recalibrated(list(masks), tuple(iterations), consolidated=consolidated)
        result = run.evaluate(
            list(masks),
            iterations=tuple(iterations),
            consolidated=consolidated,
            num_examples=num_examples,
            variables=fresh,
        )
        records.append({"iterations": t, "trained": n, **result})
    return records


def solver_counts(longest: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to `longest` (included): each count of a
    readout-time curve over solver iterations compiles its own program."""
    powers = [2**i for i in range(longest.bit_length())]
    return sorted({c for p in powers for c in (p, 3 * p) if c < longest}) + [longest]


def _solver_iterations_curve(
    run: LoadedRun, level: int, max_factor: int, num_examples: int | None, recalibrate: bool
) -> list[dict]:
    trained = run.model.equilibrium.solver.max_iter
    records = []
    for t in solver_counts(max_factor * trained):
        iterations = [None] * 3
        iterations[level] = t
        fresh = run.recalibrated(None, tuple(iterations)) if recalibrate else None
        result = run.evaluate(
            None, iterations=tuple(iterations), num_examples=num_examples, variables=fresh
        )
        records.append({"iterations": t, "trained": trained, **result})
    return records


def write_records(records: Sequence[dict], stem: str | Path) -> tuple[Path, Path]:
    """Writes `stem.json` and `stem.csv` (lists become space-separated in the CSV)."""
    stem = Path(stem)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps(list(records), indent=1) + "\n")
    fields = list(records[0]) if records else []
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in records:
            writer.writerow(
                {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()}
            )
    return json_path, csv_path


def plot_ablations(
    curves: Sequence[tuple[str, Sequence[dict]]], path: str | Path, *, level: int = 1
) -> Path:
    """Figure 3: one panel per ablation kind, one line per run (`curves` = [(label, records)])."""
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3, sharey=True)
    colours = colormaps["tab10"]
    for j, (label, records) in enumerate(curves):
        for ax, kind in zip(axes, KINDS):
            pts = sorted((r["k"], r["error"]) for r in records if r["kind"] == kind)
            x = np.array([p[0] for p in pts]) + (1 if kind == "single" else 0)
            ax.plot(x, [p[1] for p in pts], "o-", ms=3, color=colours(j % 10), label=label)
    for ax, kind in zip(axes, KINDS):
        ax.set_title(f"{KIND_TITLES[kind]}, {LEVEL_NAMES[level]} level")
        # The single block counts from 1 here; the records' `k` counts from 0.
        single = kind == "single"
        ax.set_xlabel("block switched off (1 = first)" if single else "blocks switched off")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test error (%)")
    axes[-1].legend(fontsize=8)
    return save_figure(fig, path)


def plot_readout_time(
    curves: Sequence[tuple[str, Sequence[dict]]], path: str | Path, *, level: int = 1
) -> Path:
    """Test error against readout time, a dashed line at each run's trained depth."""
    fig = Figure(figsize=(6.5, 4.2))
    readout_time_axes(fig.subplots(), curves, level)
    return save_figure(fig, path)


def readout_time_axes(ax, curves: Sequence[tuple[str, Sequence[dict]]], level: int) -> None:
    """Draws `plot_readout_time`'s curves of `level` on `ax` (one panel of a figure)."""
    colours = colormaps["tab10"]
    for j, (label, records) in enumerate(curves):
        colour = colours(j % 10)
        ax.plot(
            [r["iterations"] for r in records],
            [r["error"] for r in records],
            "o-",
            ms=3,
            color=colour,
            label=label,
        )
        ax.axvline(records[0]["trained"], color=colour, ls="--", lw=1)
    ax.set_xlabel(f"readout time of the {LEVEL_NAMES[level]} level (iterations)")
    ax.set_ylabel("test error (%)")
    ax.set_title("readout time (dashed: trained depth or solver maximum)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig: Figure, path: str | Path, rect: tuple | None = None) -> Path:
    """Saves a PNG. Figures are built without pyplot, so nothing global (backend, open
    figures) is touched and plotting works headless under any matplotlib backend."""
    path = Path(path)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110, format="png")
    return path
