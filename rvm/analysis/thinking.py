"""The "thinking longer" report: accuracy against iterations per test size, from run records.

Everything comes from each run directory's config.json, metrics.jsonl and results.json
(the curves are computed at the end of training by `rvm.tasks.thinking.task`), or from
its newest checkpoint evaluated again (`evaluate_run`), so the report can be rebuilt
without retraining. It writes `summary.md` (a table per problem: test exact-match
accuracy at the trained count m, at the count chosen on the validation split, at the
largest count and with halting, each with a Wilson 95% interval), `curves.json` (every
size's test and validation curves, the numbers of the table) and `thinking_longer.png`.
No number is chosen on the test split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rvm.analysis.records import read_records

# The targets the CPU results are held against, on the test split at the count chosen on
# validation: problem -> size -> exact match (%). The largest sizes are the raised bar.
TARGETS = {
    "prefix_sums": {64: 95.0, 128: 80.0, 512: 95.0},
    "mazes": {13: 90.0, 21: 50.0, 33: 90.0},
}
# The z of a two-sided 95% interval.
Z95 = 1.959963984540054
# A drop from the best count to the last evaluated one larger than this is "overthinking".
COLLAPSE_POINTS = 10.0


def wilson_interval(solved: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion, in %: honest near 0% and 100%,
    where the normal approximation gives intervals past the ends or of zero width."""
    if n <= 0:
        raise ValueError(f"n={n!r} must be positive")
    p = solved / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def readings(curve: dict, m: int) -> dict[str, dict]:
    """The test split read at m, at the validation-chosen count, at the largest count and
    at halting: {name: {"iterations", "accuracy", "interval"}} (no chosen count without a
    validation curve; nothing for records without counts of examples solved)."""
    n = curve.get("examples")
    if n is None:
        return {}
    solved = curve["solved"]
    points = {"trained": m, "chosen": curve.get("chosen_iterations"), "max": len(solved)}
    out = {
        name: {
            "iterations": t,
            "accuracy": 100.0 * solved[t - 1] / n,
            "interval": wilson_interval(solved[t - 1], n),
        }
        for name, t in points.items()
        if t is not None
    }
    out["halting"] = {
        "iterations": curve["halt_iterations"],
        "accuracy": 100.0 * curve["halt_solved"] / n,
        "interval": wilson_interval(curve["halt_solved"], n),
    }
    return out


def read_run(path: str | Path) -> dict[str, Any]:
    """The records of one run directory (or a folder of copied records)."""
    records = read_records(path)
    # results: None while the run is unfinished: it has per-epoch numbers only
    return {k: getattr(records, k) for k in ("name", "config", "metrics", "results")}


def evaluate_run(
    path: str | Path,
    sizes: Mapping[str, Sequence[int]] | None = None,
    splits: Mapping[str, Any] | None = None,
    done: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`read_run`, with the curves computed again from the newest checkpoint in `path`
    (by the code at hand, so with every field it now reports), on the run's test sizes
    or on `sizes[data.kind]` where given (say, larger ones than it was tested on while
    it trained). The trained size is always evaluated too, as the reference. `splits`
    overrides the data fields `num_val`, `num_test` and `eval_stream` (validation and
    test splits other than those the run saw, e.g. for runs recorded before validation
    splits existed). `done`, this run's entry of an earlier `curves.json`, is reused
    where it was evaluated with the same settings (an interrupted report resumes)."""
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
    with config.unlocked():
        if sizes and config.data.kind in sizes:
            config.data.test_sizes = tuple(sizes[config.data.kind])
        for field, value in (splits or {}).items():
            config.data[field] = value
    try:
        thinking_task.validate(config)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    ckpts = Checkpoints(path, keep=config.keep_checkpoints)
    try:
        settings = evaluation_settings(config, ckpts.latest_step())
        if done and done.get("evaluated") == settings:
            run["results"] = {k: v for k, v in done.items() if k != "config"}
            return run
        data = thinking_task.load_data(config)
        state = ckpts.restore(loop.state_shapes(config, data))
    finally:
        ckpts.close()
    model = thinking_task.build_model(config)
    sizes = thinking_task.size_results(config, model, state.variables, data, mesh=None)
    run["results"] = {
        **(run["results"] or {"params": None}),
        "sizes": sizes,
        "trained_iterations": config.train.iterations,
        "evaluated": settings,
    }
    return run


def evaluation_settings(config, step: int) -> dict[str, Any]:
    """What an evaluation of a checkpoint depends on: equal settings, equal curves."""
    d = config.data
    return {
        "step": step,
        "sizes": sorted({d.train_size, *d.test_sizes}),
        "num_val": d.get("num_val", 0),
        "num_test": d.num_test,
        "eval_stream": d.get("eval_stream", 0),
        "factor": config.eval.factor,
    }


def train_seconds(run: dict) -> float:
    """Wall time of training and per-epoch evaluation, from the epochs' throughput."""
    batch = run["config"]["batch_size"]
    return sum(r["train_steps"] * batch / r["examples_per_sec"] for r in run["metrics"])


def describe(run: dict) -> str:
    c = run["config"]
    t, m = c["train"], c["model"]
    if t["progressive_weight"] == 0:
        loss = "plain loss at m"
    elif t["counts"] == "uniform" and t.get("draw", "fixed_k") == "reference":
        loss = f"reference draw n ~ U{{0..m-1}}, k ~ U{{1..m-n}}, weight {t['progressive_weight']}"
    elif t["counts"] == "uniform":
        k = t["grad_iterations"]
        loss = f"fixed-k draw n ~ U{{0..m-{k}}}, k={k}, weight {t['progressive_weight']}"
    else:
        loss = f"{t['counts']} counts, k={t['grad_iterations']}, weight {t['progressive_weight']}"
    head = "pointwise head" if m.get("head_kernel", 3) == 1 else "3-wide head"
    text = (
        f"width {m['width']}, {m['blocks']} block(s)/iteration, recall {m['recall']}, "
        f"norm {m['norm']}, {head}, m={t['iterations']}, {loss}"
    )
    if run["results"] is None:
        last = run["metrics"][-1] if run["metrics"] else {"step": 0}
        watched = next((k for k in ("val_error", "test_error") if k in last), None)
        at = f", {watched} {last[watched]:.1f}% at the trained size and count" if watched else ""
        return f"{text}; UNFINISHED at step {last['step']}{at} (no curves)"
    return f"{text}; {run['results']['params']:,} parameters"


def _reading(r: dict | None) -> str:
    if r is None:
        return "-"
    lo, hi = r["interval"]
    return f"{r['accuracy']:.1f} [{lo:.1f}, {hi:.1f}]"


def _table(runs: list[dict]) -> list[str]:
    lines = [
        "| run | size | examples: test (val) | at m | chosen on val: iterations, test | "
        "at max | halting: accuracy, mean iterations | positions right: at m, chosen, max; "
        "all zeros |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        if run["results"] is None:
            continue
        m = run["results"]["trained_iterations"]
        for size, c in sorted(run["results"]["sizes"].items(), key=lambda kv: int(kv[0])):
            r = readings(c, m)
            if not r:  # records written before the counts of examples solved existed
                continue
            val = c.get("val", {}).get("examples", 0)
            chosen = r.get("chosen")
            lines.append(
                f"| {run['name']} | {size} | {c['examples']} ({val}) | {_reading(r['trained'])} | "
                f"{chosen['iterations'] if chosen else '-'}, {_reading(chosen)} | "
                f"{_reading(r['max'])} | {_reading(r['halting'])}, "
                f"{r['halting']['iterations']:.1f} | {_positions(c, m)} |"
            )
    return lines


def _positions(curve: dict, m: int) -> str:
    acc = curve["position_accuracy"]
    chosen = curve.get("chosen_iterations")
    at_chosen = f"{acc[chosen - 1]:.1f}" if chosen else "-"
    return (
        f"{acc[m - 1]:.1f}, {at_chosen}, {acc[-1]:.1f}; {curve['all_zero_position_accuracy']:.1f}"
    )


def target_lines(run: dict) -> list[str]:
    """Each target size of the run's problem, on the test split at the count chosen on
    validation: met or missed, and by how much; and the largest drop past that count."""
    kind = run["config"]["data"]["kind"]
    if run["results"] is None:
        return []
    m = run["results"]["trained_iterations"]
    out = []
    for size, goal in TARGETS[kind].items():
        curve = run["results"]["sizes"].get(str(size))
        chosen = readings(curve, m).get("chosen") if curve else None
        if chosen is None:
            continue
        acc = chosen["accuracy"]
        verdict = "met" if acc >= goal else f"missed by {goal - acc:.1f} points"
        out.append(
            f"- {run['name']}, size {size}: {_reading(chosen)}% at {chosen['iterations']} "
            f"iterations, the count chosen on validation (target {goal:.0f}%): {verdict}"
        )
    drops = {}
    for size, c in run["results"]["sizes"].items():
        r = readings(c, m)
        if "chosen" in r:
            drops[size] = r["chosen"]["accuracy"] - r["max"]["accuracy"]
    if drops:
        worst = max(drops, key=drops.get)
        collapsed = drops[worst] > COLLAPSE_POINTS
        out.append(
            f"- {run['name']}: largest drop from the chosen count to the last: "
            f"{drops[worst]:.1f} points (size {worst}){' -- overthinking' if collapsed else ''}"
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
    """summary.md, curves.json and thinking_longer.png in `out`; returns the summary's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "thinking_longer.png")
    write_curves(runs, out / "curves.json")
    factor = runs[0]["config"]["eval"]["factor"]
    lines = [
        "# Thinking longer: exact-match accuracy against test-time iterations",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        "",
        "Accuracy is the % of test examples solved exactly (every maze pixel or every bit",
        "right), with its Wilson 95% interval in brackets, at the trained count m, at the",
        "count chosen on the validation split (the most validation examples solved, the",
        f"fewest iterations among ties), at the largest count (max = {factor}m) and with",
        "halting (an example stops when its prediction stops changing). No count is chosen",
        "on the test split. Every curve, validation and test, is in `curves.json`.",
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
            evaluated = (r["results"] or {}).get("evaluated")
            if evaluated:
                lines.append(f"  (evaluated again: {_settings_text(evaluated)})")
        lines += ["", *_table(chosen), ""]
        for r in chosen:
            lines += target_lines(r)
        lines.append("")
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _settings_text(s: dict) -> str:
    return (
        f"checkpoint of step {s['step']}, sizes {', '.join(map(str, s['sizes']))}, "
        f"{s['num_val']} validation and {s['num_test']} test examples per size, "
        f"evaluation stream {s['eval_stream']}"
    )


def write_curves(runs: list[dict], path: Path, earlier: Mapping[str, Any] | None = None) -> None:
    """Every run's curves (test and validation, every size) and the table's readings; the
    entries of `earlier` whose runs are not among `runs` are kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = dict(earlier or {})
    for run in runs:
        if run["results"] is None:
            continue
        m = run["results"]["trained_iterations"]
        sizes = {s: {**c, "readings": readings(c, m)} for s, c in run["results"]["sizes"].items()}
        out[run["name"]] = {
            "config": run["config"],
            **{k: v for k, v in run["results"].items() if k != "sizes"},
            "sizes": sizes,
        }
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


def read_curves(path: str | Path) -> dict[str, Any]:
    """`curves.json` as written by `write_report` (empty where there is none yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}
