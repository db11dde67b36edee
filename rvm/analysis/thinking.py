"""The "thinking longer" report: accuracy against iterations per test size, from run records.

Everything comes from each run directory's config.json, metrics.jsonl and results.json
(the curves are computed at the end of training by `rvm.tasks.thinking.task`), so the
report can be rebuilt without retraining. It writes `summary.md` (a table per problem:
exact-match accuracy at the trained count, the best count and 10x, halting) and
`thinking_longer.png` (one panel per run, one curve per size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rvm.analysis.records import read_records

# The targets the CPU results are held against: problem -> size -> exact match (%).
TARGETS = {"prefix_sums": {64: 95.0, 128: 80.0}, "mazes": {13: 90.0, 21: 50.0}}
# A drop from the best count to the last evaluated one larger than this is "overthinking".
COLLAPSE_POINTS = 10.0


def read_run(path: str | Path) -> dict[str, Any]:
    """The records of one run directory (or a folder of copied records)."""
    records = read_records(path)
    # results: None while the run is unfinished: it has per-epoch numbers only
    return {k: getattr(records, k) for k in ("name", "config", "metrics", "results")}


def evaluate_run(
    path: str | Path, sizes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    """`read_run`, with the curves computed again from the newest checkpoint in `path`
    (by the code at hand, so with every field it now reports), on the run's test sizes
    or on `sizes[data.kind]` where given (say, larger ones than it was tested on while
    it trained). The trained size is always evaluated too, as the reference."""
    import ml_collections

    from rvm.errors import ConfigError
    from rvm.tasks.thinking import task as thinking_task
    from rvm.train import loop
    from rvm.train.checkpoint import Checkpoints

    path = Path(path)
    if not (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{path} has no checkpoints/ to evaluate")
    run = read_run(path)
    config = ml_collections.ConfigDict(run["config"])
    if sizes and config.data.kind in sizes:
        config.data.test_sizes = tuple(sizes[config.data.kind])
        try:
            thinking_task.validate(config)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    data = thinking_task.load_data(config)
    ckpts = Checkpoints(path, keep=config.keep_checkpoints)
    try:
        state = ckpts.restore(loop.state_shapes(config, data))
    finally:
        ckpts.close()
    model = thinking_task.build_model(config)
    sizes = thinking_task.size_results(config, model, state.variables, data, mesh=None)
    run["results"] = {
        **(run["results"] or {"params": None}),
        "sizes": sizes,
        "trained_iterations": config.train.iterations,
    }
    return run


def train_seconds(run: dict) -> float:
    """Wall time of training and per-epoch evaluation, from the epochs' throughput."""
    batch = run["config"]["batch_size"]
    return sum(r["train_steps"] * batch / r["examples_per_sec"] for r in run["metrics"])


def describe(run: dict) -> str:
    c = run["config"]
    t, m = c["train"], c["model"]
    loss = (
        "plain loss at m"
        if t["progressive_weight"] == 0
        else f"{t['counts']} counts, k={t['grad_iterations']}, weight {t['progressive_weight']}"
    )
    head = "pointwise head" if m.get("head_kernel", 3) == 1 else "3-wide head"
    text = (
        f"width {m['width']}, {m['blocks']} block(s)/iteration, recall {m['recall']}, "
        f"norm {m['norm']}, {head}, m={t['iterations']}, {loss}"
    )
    if run["results"] is None:
        last = run["metrics"][-1] if run["metrics"] else {"step": 0, "test_error": float("nan")}
        return (
            f"{text}; UNFINISHED at step {last['step']}, exact match at the trained size and "
            f"count {100 - last['test_error']:.1f}% (no curves)"
        )
    return f"{text}; {run['results']['params']:,} parameters"


def _table(runs: list[dict]) -> list[str]:
    lines = [
        "| run | size | at m | best (iterations) | at max | halting: accuracy, mean iterations "
        "(saved) | positions right: at m, best (iterations), at max; predicting all zeros |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        if run["results"] is None:
            continue
        for size, c in sorted(run["results"]["sizes"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {run['name']} | {size} | {c['accuracy_at_trained']:.1f} | "
                f"{c['best_accuracy']:.1f} ({c['best_iterations']}) | {c['accuracy_at_max']:.1f} | "
                f"{c['halt_accuracy']:.1f}, {c['halt_iterations']:.1f} "
                f"({c['halt_saved_iterations']:.1f}) | {_positions(c, run)} |"
            )
    return lines


def _positions(curve: dict, run: dict) -> str:
    acc = curve.get("position_accuracy")
    if acc is None:  # records written before the field existed
        return "-"
    m = run["results"]["trained_iterations"]
    best = max(range(len(acc)), key=acc.__getitem__)
    text = f"{acc[m - 1]:.1f}, {acc[best]:.1f} ({best + 1}), {acc[-1]:.1f}"
    zero = curve.get("all_zero_position_accuracy")
    return text if zero is None else f"{text}; all zeros {zero:.1f}"


def target_lines(run: dict) -> list[str]:
    """Each target size of the run's problem: met or missed, and by how much."""
    kind = run["config"]["data"]["kind"]
    if run["results"] is None:
        return []
    out = []
    for size, goal in TARGETS[kind].items():
        curve = run["results"]["sizes"].get(str(size))
        if curve is None:
            continue
        best = curve["best_accuracy"]
        verdict = "met" if best >= goal else f"missed by {goal - best:.1f} points"
        out.append(
            f"- {run['name']}, size {size}: best {best:.1f}% at {curve['best_iterations']} "
            f"iterations (target {goal:.0f}%): {verdict}"
        )
    drops = {
        s: c["best_accuracy"] - c["accuracy_at_max"] for s, c in run["results"]["sizes"].items()
    }
    worst = max(drops, key=drops.get)
    collapsed = drops[worst] > COLLAPSE_POINTS
    out.append(
        f"- {run['name']}: largest drop from the best count to the last: {drops[worst]:.1f} points "
        f"(size {worst}){' -- overthinking' if collapsed else ''}"
    )
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r["results"] is not None]
    rows = [("accuracy", "exact match (%)"), ("position_accuracy", "positions right (%)")]
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 6.4), squeeze=False)
    for col, run in enumerate(runs):
        m = run["results"]["trained_iterations"]
        for row, (field, label) in enumerate(rows):
            ax = axes[row][col]
            for size, curve in sorted(run["results"]["sizes"].items(), key=lambda kv: int(kv[0])):
                if field in curve:
                    its = range(1, len(curve[field]) + 1)
                    ax.plot(its, curve[field], label=f"size {size}")
            ax.axvline(m, color="grey", linestyle="--", linewidth=1)
            ax.set_title(run["name"], fontsize=9)
            ax.set_xlabel("iterations at test time (dashed: trained)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        axes[0][col].set_ylim(-2, 102)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs: list[dict], out: str | Path, machine: str, command: str) -> Path:
    """summary.md and thinking_longer.png in `out`; returns the summary's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "thinking_longer.png")
    factor = runs[0]["config"]["eval"]["factor"]
    lines = [
        "# Thinking longer: exact-match accuracy against test-time iterations",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        "",
        "Accuracy is the % of test examples solved exactly (every maze pixel or every bit",
        "right), at the trained count m, at the best count and at the largest (max) of",
        f"1..{factor}m. Halting stops an example when its prediction stops changing; saved =",
        "max - mean iterations at halting.",
        "",
        "![accuracy against iterations](thinking_longer.png)",
        "",
    ]
    for kind in ("prefix_sums", "mazes"):
        chosen = [r for r in runs if r["config"]["data"]["kind"] == kind]
        if not chosen:
            continue
        lines += [f"## {kind.replace('_', ' ')}", ""]
        for r in chosen:
            minutes = train_seconds(r) / 60
            steps = r["metrics"][-1]["step"] if r["metrics"] else 0
            lines.append(
                f"- {r['name']}: {describe(r)}; {steps} steps of "
                f"{r['config']['batch_size']} in {minutes:.1f} min"
            )
        lines += ["", *_table(chosen), ""]
        for r in chosen:
            lines += target_lines(r)
        lines.append("")
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
