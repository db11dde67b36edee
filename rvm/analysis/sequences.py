"""The moving-digits summary (tables and figures) from run directories: no training.

Every number is read from a run's config.json, metrics.jsonl and results.json, except
two things recomputed from the run directory: the memory of each scheme's train step
(its jitted step compiled again on one device; XLA's
`memory_analysis().temp_size_in_bytes`, the temporary buffers: activations kept for
the backward pass and scratch space, without parameters, optimiser state or data)
and the frames of the prediction figure (the newest checkpoint applied to the first
test videos). `experiments/sequence_summary.py` is its launcher.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from rvm.analysis.records import read_records
from rvm.data.moving_digits import MOTION_CLASSES
from rvm.tasks.video import task as video_task
from rvm.train import loop
from rvm.train import sharding as shd
from rvm.train.checkpoint import Checkpoints

GROUPS = ("depth", "dropout", "schemes", "sgd")
CHANCE = 100.0 * (1 - 1 / len(MOTION_CLASSES))
OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam"}
STACK_NAMES = {"cbm": "CBM", "lstm": "ConvLSTM", "gru": "ConvGRU", "elman": "ConvElman"}


def read_run(workdir: str | Path) -> dict:
    """config (a ConfigDict), metrics (epoch records), results (None if unfinished)."""
    records = read_records(workdir)
    return {
        "dir": records.workdir,
        "name": records.name,
        "config": ml_collections.ConfigDict(records.config),
        "metrics": records.metrics,
        "results": records.results,
    }


def train_seconds(run: dict) -> float:
    """Wall time of the training epochs (from their throughput): the steps, each epoch's
    test evaluation and the step's compilation in epoch 1; not data generation or init."""
    c = run["config"]
    per_epoch = c.data.num_train // c.batch_size * c.batch_size
    return sum(per_epoch / r["sequences_per_sec"] for r in run["metrics"])


def with_error_bar(error: float, n: int) -> str:
    """A test error (%) with its binomial standard error over n test videos."""
    p = error / 100
    return f"{error:.1f} ± {100 * np.sqrt(p * (1 - p) / n):.1f}"


def final(run: dict, key: str) -> float:
    if run["results"] is None:
        raise ValueError(f"{run['dir']} has not finished (no results.json)")
    return float(run["results"][key])


def budget(run: dict) -> str:
    c = run["config"]
    steps = c.data.num_train // c.batch_size * c.num_epochs
    optimizer = OPTIMIZER_NAMES[c.optim.get("name", "sgd")]
    return (
        f"{c.data.num_train} training videos of {c.data.num_frames} frames at "
        f"{c.data.canvas}x{c.data.canvas}, {c.num_epochs} epochs of batch {c.batch_size} "
        f"({steps} {optimizer} steps), tested on {c.data.num_test} videos "
        "of digits no training video shows"
    )


def motion_columns(run: dict) -> list[str]:
    n = run["config"].data.num_test
    return [
        with_error_bar(final(run, "test_error"), n),
        with_error_bar(final(run, "test_anticipation_error"), n),
    ]


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


# --- (a) depth --------------------------------------------------------------------------
DEPTH_HEADER = ["stack", "depth", "base width", "norm", "params", "whole-sequence error (%)"]
DEPTH_HEADER += ["anticipation error (%)", "train s"]


def by_stack(runs: list[dict]) -> list[dict]:
    return sorted(runs, key=lambda r: (r["config"].model.kind, r["config"].model.depth))


def depth_rows(runs: list[dict]) -> list[list]:
    rows = []
    for r in by_stack(runs):
        m = r["config"].model
        rows.append(
            [STACK_NAMES[m.kind], m.depth, video_task.stack_width(r["config"]), m.norm]
            + [int(final(r, "params")), *motion_columns(r), f"{train_seconds(r):.0f}"]
        )
    return rows


def trend(errors: list[float]) -> str:
    steps = np.diff(errors)
    return "falls" if all(steps < 0) else "rises" if all(steps > 0) else "is not monotonic"


def depth_trends(runs: list[dict]) -> list[str]:
    """Per stack, its whole-sequence errors in order of depth and their trend; then
    whether they bear out the paper's claim about depth."""
    lines, trends = [], {}
    for kind in sorted({r["config"].model.kind for r in runs}):
        mine = [r for r in by_stack(runs) if r["config"].model.kind == kind]
        errors = [final(r, "test_error") for r in mine]
        trends[kind] = trend(errors)
        depths = "/".join(str(r["config"].model.depth) for r in mine)
        lines.append(
            f"- {STACK_NAMES[kind]} at depths {depths}: whole-sequence error "
            f"{' → '.join(f'{e:.1f}' for e in errors)} %; it {trends[kind]} with depth."
        )
    if {"cbm", "lstm"} <= trends.keys():
        held = trends["cbm"] == "falls" and trends["lstm"] == "rises"
        lines.append(
            "- The paper's claim that CBM stacks keep improving with depth while stacked "
            f"ConvLSTMs degrade is {'reproduced' if held else 'not reproduced'} by these runs."
        )
    return lines


def depth_section(runs: list[dict], out: Path) -> list[str]:
    runs = by_stack(runs)
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2, sharey=True)
    for kind in sorted({r["config"].model.kind for r in runs}):
        mine = [r for r in runs if r["config"].model.kind == kind]
        depths = [r["config"].model.depth for r in mine]
        for ax, key in zip(axes, ("test_error", "test_anticipation_error")):
            ax.plot(depths, [final(r, key) for r in mine], "o-", label=STACK_NAMES[kind])
    for ax, title in zip(axes, ("whole sequence", "anticipation (first 25% of frames)")):
        ax.axhline(CHANCE, color="gray", ls=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="recurrent layers", title=title)
        ax.set_xticks(sorted({r["config"].model.depth for r in runs}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test error (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "depth.png", dpi=120)
    lines = ["## Depth: CBM against stacked ConvLSTM", "", *table(DEPTH_HEADER, depth_rows(runs))]
    lines += ["", "![error against depth](depth.png)", "", *depth_trends(runs)]
    return [*lines, ""]


def sgd_section(runs: list[dict]) -> list[str]:
    """The same depth comparison trained with SGD: why the configs use Adam."""
    opt = runs[0]["config"].optim
    return [
        "## Optimiser check: the depth runs with SGD",
        "",
        f"Same runs with SGD (learning rate {opt.learning_rate}, Nesterov momentum "
        f"{opt.momentum}) instead of Adam; budget: {budget(runs[0])}.",
        "",
        *table(DEPTH_HEADER, depth_rows(runs)),
        "",
        *depth_trends(runs),
        "",
    ]


# --- (b) temporal dropout ---------------------------------------------------------------
def dropout_section(runs: list[dict]) -> list[str]:
    runs = sorted(runs, key=lambda r: r["config"].model.td_rate)
    rows = [
        [r["config"].model.td_rate, *motion_columns(r), f"{r['metrics'][-1]['train_loss']:.3f}"]
        for r in runs
    ]
    m = runs[0]["config"].model
    header = ["td rate", "whole-sequence error (%)", "anticipation error (%)", "last train loss"]
    return [
        f"## Temporal Dropout ({STACK_NAMES[m.kind]}, {m.depth} layers)",
        "",
        *table(header, rows),
        "",
    ]


# --- (c) training schemes ---------------------------------------------------------------
def step_memory_mib(run: dict) -> float:
    """Temporary memory (MiB) of the run's train step, compiled on one device."""
    config = ml_collections.ConfigDict(run["config"].to_dict())
    config.data.num_train = config.batch_size  # the step's temporaries do not depend on N
    config.data.num_test = 1
    built = loop.build_run(config, loop.load_data(config), shd.data_mesh(jax.devices()[:1]))
    compiled = built.step_fn.lower(built.state, built.train_data).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def scheme_clips(config: ml_collections.ConfigDict) -> str:
    t = config.train
    if t.scheme == "full":
        return f"one clip of {config.data.num_frames} frames"
    if t.scheme == "tbptt":
        return f"consecutive clips of {t.clip_len}"
    return (
        f"{t.min_clip}-{t.max_clip} frames, overlaps 1-{t.max_overlap}, "
        f"coherence weight {t.coherence_weight}, handover {t.handover}"
    )


def schemes_section(runs: list[dict]) -> list[str]:
    order = {s: i for i, s in enumerate(("overlap", "tbptt", "full"))}
    runs = sorted(runs, key=lambda r: order.get(r["config"].train.scheme, len(order)))
    rows = [
        [r["config"].train.scheme, scheme_clips(r["config"]), *motion_columns(r)]
        + [f"{step_memory_mib(r):.0f}", f"{train_seconds(r):.0f}"]
        for r in runs
    ]
    header = ["scheme", "clips", "whole-sequence error (%)", "anticipation error (%)"]
    header += ["step temp memory (MiB)", "train s"]
    c = runs[0]["config"]
    return [
        f"## Training schemes on {c.data.num_frames}-frame videos",
        "",
        f"Budget: {budget(runs[0])}.",
        "",
        *table(header, rows),
        "",
        "Memory is XLA's `memory_analysis().temp_size_in_bytes` of the jitted train step "
        "compiled for one CPU device: the temporary buffers (activations kept for the "
        "backward pass, scratch), not parameters, optimiser state or the data. Truncated "
        "and overlap schemes rematerialise each clip in the backward pass (one clip's "
        "activations at a time); full back-propagation keeps every frame's.",
        "",
    ]


# --- (d) frame prediction ---------------------------------------------------------------
def prediction_section(run: dict, out: Path, num_videos: int = 3) -> list[str]:
    config = run["config"]
    data = loop.load_data(config)
    built = loop.build_run(config, data, shd.data_mesh(jax.devices()[:1]))
    ckpts = Checkpoints(run["dir"])
    state = ckpts.restore(built.state)
    ckpts.close()
    n_in = config.data.num_input
    frames = data.test.frames[:num_videos]
    inputs = frames[:, :n_in].astype(np.float32) / 255.0
    predicted = np.asarray(built.model.apply(state.variables, inputs, train=False).frames)
    n_out = predicted.shape[1]
    cols = max(n_in, n_out)
    fig = Figure(figsize=(cols * 0.9, 3 * num_videos * 0.95))
    axes = fig.subplots(3 * num_videos, cols)
    for v in range(num_videos):
        for row, (label, seq) in enumerate(
            (("input", inputs[v]), ("true", frames[v, n_in:] / 255.0), ("predicted", predicted[v]))
        ):
            for t in range(cols):
                ax = axes[3 * v + row, t]
                ax.axis("off")
                if t < len(seq):
                    ax.imshow(seq[t, ..., 0], cmap="gray", vmin=0, vmax=1)
            axes[3 * v + row, 0].text(-2, config.data.canvas / 2, label, ha="right", va="center")
    res = run["results"]
    fig.suptitle(
        f"test MSE {res['test_mse']:.4f}, PSNR {res['test_psnr']:.1f} dB, "
        f"SSIM {res['test_ssim']:.3f} (means over {config.data.num_test} test videos)"
    )
    fig.savefig(out / "prediction.png", dpi=100, bbox_inches="tight")

    fig = Figure(figsize=(8, 3))
    axes = fig.subplots(1, 2)
    ahead = np.arange(1, n_out + 1)
    for ax, key, unit in zip(axes, ("test_psnr", "test_ssim"), ("PSNR (dB)", "SSIM")):
        ax.plot(ahead, res[f"{key}_per_frame"], "o-")
        ax.set(xlabel="frames ahead", ylabel=unit)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "prediction_per_frame.png", dpi=120)

    # the mean training frame, predicted for every future frame: what "no model" scores
    mean_frame = data.train.frames.astype(np.float64).mean((0, 1)) / 255.0
    truth = data.test.frames[:, n_in:].astype(np.float64) / 255.0
    baseline_mse = float(np.mean((truth - mean_frame) ** 2))
    last_seen = data.test.frames[:, n_in - 1 : n_in].astype(np.float64) / 255.0
    copy_mse = float(np.mean((truth - last_seen) ** 2))
    m = config.model
    header = ["", "MSE", "PSNR (dB)", "SSIM"]
    rows = [
        [
            f"{STACK_NAMES[m.kind]} encoder-predictor, {m.depth} layers",
            f"{res['test_mse']:.4f}",
            f"{res['test_psnr']:.2f}",
            f"{res['test_ssim']:.3f}",
        ],
        ["mean training frame (baseline)", f"{baseline_mse:.4f}", "", ""],
        ["last input frame repeated (baseline)", f"{copy_mse:.4f}", "", ""],
    ]
    return [
        f"## Frame prediction ({n_in} frames in, {n_out} out)",
        "",
        f"Budget: {budget(run)}; digits per video: {config.data.num_digits}, bouncing off "
        "the edges.",
        "",
        *table(header, rows),
        "",
        "PSNR and SSIM (Gaussian window, Wang et al. 2004) are computed per predicted frame "
        "and averaged; baselines are MSE only.",
        "",
        "![input, true and predicted frames](prediction.png)",
        "",
        "![PSNR and SSIM per frame ahead](prediction_per_frame.png)",
        "",
    ]


def write_summary(
    out: str | Path,
    groups: dict[str, list[str]],
    prediction: str | None,
    machine: str,
    command: str | None,
) -> Path:
    """Writes `out`/summary.md and its figures from the run directories of each group
    (`depth`, `dropout`, `schemes`, `sgd`) and the `prediction` run; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = {name: [read_run(d) for d in groups.get(name, [])] for name in GROUPS}
    lines = ["# Moving digits on a CPU", ""]
    lines += [f"Machine: {machine}."]
    if command:
        lines += ["", f"Command: `{command}` (it trains every run, then writes this file)."]
    first = next((g[0] for g in groups.values() if g), None)
    if first is not None:
        lines += [
            "",
            f"Motion recognition budget: {budget(first)}. Six motion classes: chance is "
            f"{CHANCE:.1f}% error. Errors are single runs (seed {first['config'].seed}) with the "
            "binomial standard error over the test videos; whole-sequence error reads the class at "
            "the last frame, anticipation error at the last of the first 25% of the frames.",
        ]
    lines.append("")
    if groups["depth"]:
        lines += depth_section(groups["depth"], out)
    if groups["dropout"]:
        lines += dropout_section(groups["dropout"])
    if groups["schemes"]:
        lines += schemes_section(groups["schemes"])
    if prediction:
        lines += prediction_section(read_run(prediction), out)
    if groups["sgd"]:
        lines += sgd_section(groups["sgd"])
    (out / "summary.md").write_text("\n".join(lines))
    return out / "summary.md"
