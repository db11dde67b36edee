"""Summary tables and figures of glimpse-recognition and tracking runs, against the targets.

Every number comes from each run directory's config.json and results.json (written by
`rvm.tasks.glimpses` and `rvm.tasks.tracker`); the canvases of the glimpse figure are
regenerated from the run's config (they are a function of its seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rvm.data.cluttered_digits import make_canvases

# The targets (2-core CPU, test split).
GLIMPSE_TARGETS = {"translated": 1.8, "cluttered": 5.0}  # % test error at 60x60
TRACKER_TARGETS = {
    "mean_iou": (">=", 0.75),
    "success_rate": (">=", 0.90),
    "failure_rate": ("<=", 0.05),
    "recovery": (">=", 0.80),
}
STEPS_TARGET = 1000.0  # track steps per second at batch 1


def read(path: str | Path) -> dict:
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    results_path = path / "results.json"
    if not results_path.is_file():
        raise ValueError(f"{path} has not finished (no results.json)")
    results = json.loads(results_path.read_text())
    if (path / "evaluated.json").is_file():
        _add_intervals(results, json.loads((path / "evaluated.json").read_text()), path)
    return {"dir": path, "config": config, "results": results}


SCORED = ("mean_iou", "success_rate", "failure_rate", "recovery", "occlusions")


def _add_intervals(results: dict, evaluated: dict, path: Path) -> None:
    """The intervals of `evaluate_tracker`'s scores into `results`, whose scores they must
    equal: otherwise the evaluation measured something else than the run reported."""
    for key in ("test", "test_no_reset"):
        got, want = evaluated[key], results[key]
        differ = [
            k
            for k in SCORED
            if (got[k] is None) != (want[k] is None)
            or (want[k] is not None and abs(got[k] - want[k]) > 1e-6)
        ]
        if evaluated["step"] != results["step"] or differ:
            raise ValueError(
                f"{path}/evaluated.json (step {evaluated['step']}) differs from results.json "
                f"(step {results['step']}) in {key} {differ}: evaluate the run again"
            )
        want["intervals"] = got["intervals"]


def evaluate_tracker(path: str | Path) -> dict:
    """The test scores of the tracker run in `path` again, from its newest checkpoint, by
    the code at hand (so with the intervals results.json may predate): written to
    `evaluated.json` beside results.json and returned."""
    import ml_collections

    from rvm.tasks import tracker
    from rvm.train import loop
    from rvm.train.config_check import with_added_fields

    path = Path(path)
    saved = with_added_fields(json.loads((path / "config.json").read_text()))
    config = ml_collections.ConfigDict(saved)
    if config.task != "tracker":
        raise ValueError(f"{path} is a {config.task!r} run, not a tracker run")
    data = tracker.load_data(config)
    step, state = loop.restore_newest(config, data, path)
    model = tracker.build_model(config)
    scores, no_reset = tracker.test_scores(config, model, state.params, data.test)
    evaluated = {"step": step, "test": scores, "test_no_reset": no_reset}
    (path / "evaluated.json").write_text(json.dumps(evaluated, indent=1) + "\n")
    return evaluated


def _model_name(config: dict) -> str:
    m = config["model"]
    return "CNN" if m["kind"] == "cnn" else f"RAM, {m['policy']} locations"


def glimpse_table(runs: dict[str, dict]) -> list[str]:
    lines = [
        "| run | canvases | model | test error % (95% interval) | val error % | "
        "operations / image at 60 px | at 100 px | params | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        c, r = run["config"], run["results"]
        low, high = r["test_error_interval"]
        flops = r["flops_per_image"]
        data = "cluttered" if c["data"]["clutter"] else "translated"
        lines.append(
            f"| {name} | {data} | {_model_name(c)} | {r['test_error']:.2f} ({low:.2f}-{high:.2f}) "
            f"| {r['val_error']:.2f} | {flops['60']:,.0f} | {flops['100']:,.0f} | "
            f"{r['params']:,} | {r['step']} |"
        )
    return lines


def tracker_table(runs: dict[str, dict]) -> list[str]:
    lines = [
        "| run | resets | mean IoU | success | failure | AUC | recovery (occlusions) | "
        "failure when occluded | steps/s batch 1 | batch 32 | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        c, r = run["config"], run["results"]
        every = c["eval"]["reset_every"]
        for key, resets in (
            ("test", f"every {every}" if every else "none"),
            ("test_no_reset", "none"),
        ):
            if key == "test_no_reset" and not every:
                continue
            s = r[key]
            cell = _with_interval(s)
            recovery = "-" if s["recovery"] is None else cell("recovery", "{:.1%}")
            occluded = s["failure_rate_occluded"]
            lines.append(
                f"| {name} | {resets} | {cell('mean_iou', '{:.3f}')} | "
                f"{cell('success_rate', '{:.1%}')} | {cell('failure_rate', '{:.1%}')} | "
                f"{s['auc']:.3f} | {recovery} ({s['occlusions']}) | "
                f"{'-' if occluded is None else f'{occluded:.1%}'} | "
                f"{r['steps_per_sec']['1']:,.0f} | {r['steps_per_sec']['32']:,.0f} | {r['step']} |"
            )
    return lines


def _with_interval(scores: dict):
    """A cell formatter: `scores[name]` in `form`, then its interval where one was measured."""

    def cell(name: str, form: str) -> str:
        bounds = scores.get("intervals", {}).get(name)
        text = form.format(scores[name])
        if bounds is None:
            return text
        return f"{text} ({form.format(bounds[0])}-{form.format(bounds[1])})"

    return cell


def _met(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if op == ">=" else value <= target
    return "met" if ok else f"missed by {abs(value - target):.3g}"


def target_lines(glimpses: dict[str, dict], trackers: dict[str, dict]) -> list[str]:
    lines = []
    for name, run in glimpses.items():
        c, r = run["config"], run["results"]
        data = "cluttered" if c["data"]["clutter"] else "translated"
        if c["model"]["kind"] == "ram" and c["model"]["policy"] == "learned":
            lines.append(
                f"- {name}: test error {r['test_error']:.2f}% against the target "
                f"{GLIMPSE_TARGETS[data]}%: {_met(r['test_error'], '<=', GLIMPSE_TARGETS[data])}"
            )
            random = next(
                (
                    o["results"]["test_error"]
                    for o in glimpses.values()
                    if o["config"]["model"]["policy"] == "random"
                    and _differ_only_in(o["config"], c, "model.policy")
                ),
                None,
            )
            if random is not None:
                gain = random - r["test_error"]
                lines.append(
                    f"- {name}: {gain:+.2f} points better than random locations "
                    f"(target at least 2): {_met(gain, '>=', 2.0)}"
                )
        flops = r["flops_per_image"]
        lines.append(
            f"- {name}: operations per image at 100 px / at 60 px = "
            f"{flops['100'] / flops['60']:.2f}"
        )
    for name, run in trackers.items():
        s = run["results"]["test"]
        for key, (op, target) in TRACKER_TARGETS.items():
            value = "-" if s[key] is None else f"{s[key]:.3f}"
            lines.append(f"- {name}: {key} {value} ({op} {target}): {_met(s[key], op, target)}")
        rate = run["results"]["steps_per_sec"]["1"]
        lines.append(
            f"- {name}: {rate:,.0f} track steps/s at batch 1 (>= {STEPS_TARGET:,.0f}): "
            f"{_met(rate, '>=', STEPS_TARGET)}"
        )
    for lstm, feedforward in _ablation_pairs(trackers):
        a = lstm["results"]["test"]["failure_rate_occluded"]
        b = feedforward["results"]["test"]["failure_rate_occluded"]
        verdict = "met" if a is not None and b is not None and a < b else "missed"
        lines.append(
            f"- failure rate on occluded frames, LSTM {lstm['dir'].name} {a:.3f} against "
            f"feed-forward {feedforward['dir'].name} {b:.3f} (LSTM below): {verdict}"
        )
    return lines


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _differ_only_in(a: dict, b: dict, field: str) -> bool:
    """Whether configs `a` and `b` are equal but for `field` (dotted): runs trained alike,
    data, network and budget, so that their scores compare that one field."""
    a, b = _flat(a), _flat(b)
    return {k: v for k, v in a.items() if k != field} == {k: v for k, v in b.items() if k != field}


def _ablation_pairs(trackers: dict[str, dict]) -> list[tuple[dict, dict]]:
    """(LSTM run, feed-forward run) pairs whose configs differ in `model.recurrent` alone."""
    runs = list(trackers.values())
    return [
        (lstm, ff)
        for lstm in runs
        if lstm["config"]["model"]["recurrent"]
        for ff in runs
        if not ff["config"]["model"]["recurrent"]
        and _differ_only_in(lstm["config"], ff["config"], "model.recurrent")
    ]


def iou_figure(trackers: dict[str, dict], path: Path) -> None:
    """IoU over the shown test track with the most occluded frames, of each tracker,
    occluded frames shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    first = next(iter(trackers.values()))["results"]
    shown = int(np.argmax(np.sum(first["shown_occluded"], axis=1)))
    for t in np.flatnonzero(first["shown_occluded"][shown]):
        ax.axvspan(t - 0.5, t + 0.5, color="0.88", lw=0)
    for name, run in trackers.items():
        ax.plot(run["results"]["shown_ious"][shown], label=name)
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="frame", ylabel="IoU with the true box", ylim=(0, 1.02))
    track = first.get("shown_tracks", list(range(len(first["shown_ious"]))))[shown]
    ax.set_title(f"test track {track} (shaded: under half of the target visible)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def locations_figure(run: dict, path: Path, shown: int = 6) -> None:
    """The glimpse path of a RAM run on its first test canvases (square: first glimpse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, r = run["config"]["data"], run["results"]
    locations = np.asarray(r["shown_locations"])
    shown = min(shown, locations.shape[1])
    canvases = make_canvases(
        d["seed"],
        shown,
        "test",
        canvas=d["canvas"],
        digit_size=d["digit_size"],
        clutter=d["clutter"],
    )
    fig, axes = plt.subplots(1, shown, figsize=(2.2 * shown, 2.5))
    for n, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(canvases.images[n, ..., 0], cmap="gray")
        xy = (locations[:, n] + 1) / 2 * d["canvas"]
        ax.plot(xy[:, 0], xy[:, 1], "-o", color="C1", ms=3, lw=1)
        ax.plot(*xy[0], "s", color="C2", ms=4)
        ax.set_title(f"{canvases.labels[n]} -> {r['shown_predictions'][n]}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(runs: list[str | Path], out: str | Path, machine: str, command: str) -> str:
    """summary.md (and the figures) in `out` for the finished runs in `runs`."""
    out = Path(out)
    read_runs = {Path(p).name: read(p) for p in runs}
    glimpses = {k: v for k, v in read_runs.items() if v["config"]["task"] == "glimpses"}
    trackers = {k: v for k, v in read_runs.items() if v["config"]["task"] == "tracker"}
    lines = [
        "# Where to look: glimpse recognition and tracking",
        "",
        f"Made by `{command}` on {machine}. Test splits; the numbers below are read from each "
        "run's results.json.",
        "",
    ]
    if glimpses:
        lines += ["## Glimpse recognition (60x60 canvases)", "", *glimpse_table(glimpses), ""]
        learned = [
            v
            for v in glimpses.values()
            if v["config"]["model"]["kind"] == "ram" and v["config"]["model"]["policy"] == "learned"
        ]
        if learned:  # the first learned-policy run named
            locations_figure(learned[0], out / "glimpse_locations.png")
            lines += ["![glimpse locations](glimpse_locations.png)", ""]
    if trackers:
        frames = next(iter(trackers.values()))["results"]["test_frames"]
        lines += [f"## Tracking ({frames}-frame test tracks)", ""]
        if any("intervals" in v["results"]["test"] for v in trackers.values()):
            lines += [
                "In parentheses: 95% intervals that resample the test tracks (a percentile "
                "bootstrap, `rvm.analysis.measures`); runs recorded before them were evaluated "
                "again from their final checkpoint (`evaluated.json`, the same scores as "
                "results.json).",
                "",
            ]
        lines += [*tracker_table(trackers), ""]
        iou_figure(trackers, out / "tracker_iou.png")
        lines += ["![IoU over a test track](tracker_iou.png)", ""]
    lines += ["## Against the targets", "", *target_lines(glimpses, trackers), ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text
