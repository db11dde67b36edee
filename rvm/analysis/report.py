"""The paper's tables and figures rebuilt from run directories alone (no retraining).

Runs are grouped into tables by (scope, blocks_per_level) from their config.json;
groups matching the paper's Tables 1-3 get every paper row (with "no run" where
none was given) and the paper's numbers beside ours. Runs that share a config
apart from the seed form one row (mean ± sample sd); the same seed twice in a row
is an error (one run given twice, e.g. a workdir and its copy). Curves come from
metrics.jsonl; ablations (Figure 3), readout time, trajectories (Figures 4-5) and
linear separability restore one checkpoint per row; angle plots read relaxed runs'
metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from rvm.analysis import angles, readout, trajectories
from rvm.analysis.paper import EPOCHS as PAPER_EPOCHS
from rvm.analysis.paper import Paper
from rvm.analysis.records import runs_in
from rvm.analysis.runs import (
    LEVEL_NAMES,
    NotARunError,
    RunInfo,
    load_run,
    read_run_info,
    require_checkpoint,
)
from rvm.data import load_images
from rvm.train import console
from rvm.train.config_check import CIFAR10_SOURCES, RESUME_SAFE, flatten, with_added_fields

METHODS = ("nonshared", "relaxed", "raw", "minimal")  # the paper's row order
METHOD_NAMES = {"nonshared": "Non-shared", "relaxed": "Relaxed", "raw": "Raw", "minimal": "Minimal"}
# Fields that do not make another experiment: like the seed, the key streams change only
# which random draws a run makes.
_NOT_A_DIFFERENCE = RESUME_SAFE | {"seed", "rng_streams"}


@dataclasses.dataclass(frozen=True)
class Options:
    """What the checkpoint-based analyses cost; defaults follow the paper."""

    analyses: bool = True  # False: tables, curves and angles only (no checkpoints read)
    level: int = 1  # the level of the ablations and readout-time curve (paper: middle)
    readout_examples: int | None = None  # test images per ablation point (None: all)
    max_factor: int = 2  # readout times 1..max_factor*N for shared levels
    trajectory_examples: int = 100
    separability_examples: int = 1000
    separability_folds: int = 5
    seed: int = 0
    # Where to read CIFAR-10 instead of the runs' own `data.binary_dir` / `data.tfds_data_dir`
    # (paths in a run's config are relative to the directory it was trained from).
    binary_dir: str | None = None
    tfds_data_dir: str | None = None


@dataclasses.dataclass
class Row:
    method: str
    label: str
    runs: list[RunInfo]


@dataclasses.dataclass
class Group:
    slug: str  # file-name part: table1 .. table3, or scope_blocks
    title: str
    paper_table: int | None
    rows: list[Row]


def _experiment_key(info: RunInfo) -> tuple:
    """The config minus what repeats an experiment (seed) or only steers bookkeeping."""
    flat = flatten(with_added_fields(info.config.to_dict()))
    if flat.get("data.source") in CIFAR10_SOURCES:
        flat["data.source"] = "cifar10"  # readers of the same images in the same order
    ignore = set(_NOT_A_DIFFERENCE)
    if info.sharing == "nonshared":
        ignore.add("model.scope")  # the scope changes nothing without sharing
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in ignore))


def _paper_table(paper: Paper, scope: str, blocks: tuple[int, ...]) -> int | None:
    for number, (s, depth) in paper.tables.items():
        if s == scope and tuple(paper.depths[depth]) == blocks:
            return number
    return None


def group_runs(infos: Sequence[RunInfo], paper: Paper) -> list[Group]:
    """Tables by (scope, blocks_per_level); rows by experiment (config minus seed).

    A non-shared run joins every table of its depth: its network does not depend
    on the scope, so one run serves both Table 1 and Table 2, as in the paper.
    """
    keys = sorted({(i.scope, i.blocks_per_level) for i in infos if i.sharing != "nonshared"})
    for i in infos:
        if i.sharing == "nonshared" and not any(b == i.blocks_per_level for _, b in keys):
            keys.append((i.scope, i.blocks_per_level))
    groups = []
    for scope, blocks in keys:
        members = [
            i
            for i in infos
            if i.blocks_per_level == blocks and (i.scope == scope or i.sharing == "nonshared")
        ]
        number = _paper_table(paper, scope, blocks)
        blocks_text = ",".join(map(str, blocks))
        slug = f"table{number}" if number else f"{scope}_{blocks_text.replace(',', '-')}"
        where = "the middle level" if scope == "middle" else "all levels"
        title = (
            f"Table {number}: sharing on {where}, ({blocks_text}) blocks per level"
            if number
            else f"Other runs: scope {scope}, ({blocks_text}) blocks per level"
        )
        groups.append(Group(slug, title, number, _rows(members)))
    return sorted(groups, key=lambda g: (g.paper_table is None, g.paper_table or 0, g.slug))


def _rows(members: Sequence[RunInfo]) -> list[Row]:
    by_key: dict[tuple, list[RunInfo]] = {}
    for info in sorted(members, key=lambda i: (i.seed, str(i.workdir))):
        by_key.setdefault((info.sharing, _experiment_key(info)), []).append(info)
    rows = []
    for (method, key), runs in by_key.items():
        seeds = [i.seed for i in runs]
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            dirs = [str(i.workdir) for i in runs if i.seed in twice]
            raise ValueError(
                f"runs {dirs} are one experiment with the same seed {twice}; give one of them"
            )
        # Name a row by the config fields that set it apart from same-method rows.
        others = [dict(k) for (m, k) in by_key if m == method and k != key]
        mine = dict(key)
        differing = sorted({f for o in others for f in mine if o.get(f) != mine[f]})
        suffix = ", ".join(f"{f.split('.')[-1]}={mine[f]}" for f in differing[:3])
        label = METHOD_NAMES.get(method, method) + (f" ({suffix})" if suffix else "")
        rows.append(Row(method, label, runs))
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (order.get(r.method, len(order)), r.label))


_NOTES = {  # what the table says of an error's source (`RunInfo.final_test_error`)
    "final": "",
    "consolidated": "after consolidation, trained BatchNorm statistics",
    "consolidated, recalibrated": "after consolidation, BatchNorm statistics re-estimated",
}


def _mean_sd(values: Sequence[float]) -> str:
    """Mean ± the sample standard deviation (n - 1) over seeds."""
    sd = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):.2f}{sd}"


def table_markdown(group: Group, paper: Paper) -> str:
    """One table: our rows (mean ± sample sd over seeds) with the paper's values beside them."""
    paper_err = paper.test_error.get(paper.tables.get(group.paper_table, ()), {})
    paper_par = paper.params.get(group.paper_table, {})
    lines = [
        f"### {group.title}",
        "",
        "| Method | Parameter count | Test error (%) | Epochs | Paper params "
        f"| Paper test error (%, {PAPER_EPOCHS} epochs) | Runs (seeds) | Notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in group.rows:
        errors, notes = [], set()
        for info in row.runs:
            err, source = info.final_test_error()
            errors += [] if err is None else [err]
            notes.add(_NOTES.get(source, f"{info.name}: {source}"))
            if source == "consolidated, recalibrated":
                stale = (info.results or {}).get("consolidated_test_error")
                notes.add(f"{info.name}: {stale:.2f} with the trained statistics")
            if "test_error_at_best_val" in (r := info.results or {}):
                notes.add(f"{info.name}: {r['test_error_at_best_val']:.2f} at best val")
        notes.discard("")
        params = row.runs[0].param_count()
        seeds = ",".join(str(i.seed) for i in row.runs)
        epochs = "/".join(sorted({str(i.config.num_epochs) for i in row.runs}))
        lines.append(
            f"| {row.label} | {params} | {_mean_sd(errors) if errors else '-'} | {epochs} "
            f"| {paper_par.get(row.method, '-')} | {paper_err.get(row.method, '-')} "
            f"| {len(row.runs)} ({seeds}) | {'; '.join(sorted(notes))} |"
        )
    present = {r.method for r in group.rows}
    for method in METHODS:
        if method in paper_err and method not in present:
            lines.append(
                f"| {METHOD_NAMES[method]} | - | no run | - | {paper_par.get(method, '-')} "
                f"| {paper_err[method]} | 0 | no run given |"
            )
    return "\n".join(lines) + "\n"


def plot_curves(group: Group, path: str | Path) -> Path:
    """Test error against epoch for every run of a table (one colour per row)."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    for j, row in enumerate(group.rows):
        for k, info in enumerate(row.runs):
            recs = [r for r in info.metrics if "test_error" in r]
            ax.plot(
                [r["epoch"] for r in recs],
                [r["test_error"] for r in recs],
                ".-" if len(recs) < 30 else "-",
                color=cmap(j % 10),
                lw=1,
                label=row.label if k == 0 else None,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_title(group.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return readout.save_figure(fig, path)


def _analysed(group: Group) -> list[tuple[str, RunInfo]]:
    """Each row's label and run (the lowest seed); minimal rows have nothing to ablate."""
    return [(row.label, row.runs[0]) for row in group.rows if row.method != "minimal"]


def _unique_names(infos: Sequence[RunInfo]) -> dict[Path, str]:
    """Directory names, numbered where runs from different parents share one."""
    names: dict[Path, str] = {}
    for info in infos:
        name, n = info.name, 1
        while name in names.values():
            n, name = n + 1, f"{info.name}-{n + 1}"
        names[info.workdir] = name
    return names


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    paper: Paper,
    options: Options | None = None,
) -> list[Path]:
    """Writes tables, figures and `report.md` into `out_dir` from `run_dirs` (runs, or
    packs' workdirs: each stands for its seeds' runs); returns every file written."""
    options = options or Options()
    # A pack's workdir stands for its runs; a directory given twice is not two seeds.
    dirs = dict.fromkeys(r.resolve() for d in run_dirs for r in runs_in(d))
    infos = [read_run_info(d) for d in dirs]
    if not infos:
        raise ValueError("no run directories given")
    data_cache: dict[str, object] = {}
    if options.analyses:
        infos = [_with_consolidation_extras(i, options, data_cache) for i in infos]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(infos)
    groups = group_runs(infos, paper)
    written: list[Path] = []
    md = ["# Report", "", f"Runs: {len(infos)}.", ""]
    # Paths relative to the report, so a committed report names no machine's directories.
    where = {i.workdir: os.path.relpath(i.workdir, out.resolve()) for i in infos}
    md += [
        f"- `{names[i.workdir]}`: {i.label} (`{where[i.workdir]}`)"
        + (f"; trained by {i.trained_by()}" if i.starts else "")
        for i in infos
    ]

    md += ["", "## Tables", ""]
    for g in groups:
        text = table_markdown(g, paper)
        written.append(out / f"{g.slug}.md")
        written[-1].write_text(text)
        md += [text, f"([{written[-1].name}]({written[-1].name}))", ""]
    missing = sorted(set(paper.tables) - {g.paper_table for g in groups})
    if missing:
        md += [f"Paper tables without a run (left out): {', '.join(map(str, missing))}.", ""]

    md += ["## Test error during training", ""]
    for g in groups:
        stem = {1: "figure1", 2: "figure2"}.get(g.paper_table, f"curves_{g.slug}")
        written.append(plot_curves(g, out / f"{stem}.png"))
        md += [f"![{g.title}]({written[-1].name})", ""]

    if options.analyses:
        md += _analyses(groups, names, out, options, written, data_cache)

    relaxed = [i for i in infos if i.sharing == "relaxed" and angles.angle_history(i.metrics)[1]]
    if relaxed:
        path = angles.plot_angles([(i.label, i.metrics) for i in relaxed], out / "angles.png")
        written.append(path)
        md += ["## Relaxed sharing: angles and consolidation", "", f"![angles]({path.name})", ""]
        md += [angles.CONSOLIDATION_NOTE, "", angles.consolidation_table(relaxed)]

    linked = "\n".join(md)
    data = [p.name for p in written if f"]({p.name})" not in linked]
    md += ["## Data files", "", *(f"- [{n}]({n})" for n in data)] if data else []
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")
    return [*written, report]


def _analyses(
    groups, names, out: Path, options: Options, written: list[Path], data_cache: dict
) -> list[str]:
    """Figure 3, readout time, Figures 4-5 and separability; appends files to `written`.

    Each run is restored and analysed once, even when it sits in two tables (a
    non-shared run serves Tables 1 and 2).
    """
    md = [
        "## Readout time (Figure 3)",
        "",
        f"Ablations on the {LEVEL_NAMES[options.level]} level of one run per row (lowest "
        "seed); relaxed runs are analysed after consolidation (the network they are evaluated "
        "as), and so are their trajectories."
        + (f" First {options.readout_examples} test images." if options.readout_examples else ""),
    ]
    done: dict[Path, dict | None] = {}
    total = len({info.workdir for g in groups for _, info in _analysed(g)})
    for g in groups:
        abl_curves, time_curves = [], []
        for label, info in _analysed(g):
            if info.workdir not in done:
                console.status(f"run {len(done) + 1} of {total}: {names[info.workdir]}")
                done[info.workdir] = _analyse_run(
                    info, names[info.workdir], out, options, data_cache
                )
                if done[info.workdir] is None:
                    md += ["", f"- `{names[info.workdir]}` skipped: it has no checkpoint"]
                else:
                    written.extend(done[info.workdir]["files"])
            if done[info.workdir] is None:
                continue
            if done[info.workdir]["ablation"] is not None:
                abl_curves.append((label, done[info.workdir]["ablation"]))
            if done[info.workdir]["times"] is not None:
                time_curves.append((label, done[info.workdir]["times"]))
        if abl_curves:
            path = out / f"figure3_ablation_{g.slug}.png"
            written.append(readout.plot_ablations(abl_curves, path, level=options.level))
            md += ["", f"### {g.title}", "", f"![ablations]({path.name})"]
        if time_curves:
            for stats, note in readout.STATISTICS.items():
                path = out / f"readout_time_{g.slug}{'_recalibrated' * (stats != 'trained')}.png"
                curves = [(label, times[stats]) for label, times in time_curves]
                written.append(readout.plot_readout_time(curves, path, level=options.level))
                md += ["", f"Readout time, {note}", "", f"![readout time]({path.name})"]
    analysed = [(w, r) for w, r in done.items() if r is not None]
    if not analysed:
        return md + [""]
    md += [
        "",
        "## Trajectories (Figures 4-5) and linear separability",
        "",
        f"PCA of {options.trajectory_examples} fixed random training images per level. "
        f"Separability: {options.separability_folds}-fold cross-validated L2 logistic regression "
        f"on the flattened output of each level for {options.separability_examples} training "
        "images drawn independently of the trajectory set (images the network was trained on); "
        "accuracy (%) ± sample sd over folds; chance = largest class share.",
        "",
        "| run | " + " | ".join(LEVEL_NAMES) + " | chance |",
        "| --- |" + " --- |" * (len(LEVEL_NAMES) + 1),
    ]
    for workdir, r in analysed:
        cells = " | ".join(f"{s['accuracy']:.1f} ± {s['sd']:.1f}" for s in r["separability"])
        md += [f"| {names[workdir]} | {cells} | {r['separability'][0]['chance']:.1f} |"]
    for _, r in analysed:
        md += ["", f"### {r['label']}", "", f"![trajectories]({r['trajectories'].name})"]
    return md + [""]


def _restore(info: RunInfo, options: Options, data_cache: dict):
    """The run restored from its newest checkpoint; None when it has none."""
    where = {"binary_dir": options.binary_dir, "tfds_data_dir": options.tfds_data_dir}
    data_config = {**info.config.data.to_dict(), **{k: v for k, v in where.items() if v}}
    key = json.dumps(data_config, sort_keys=True)
    try:
        require_checkpoint(info.workdir)  # before reading data it would not need
    except NotARunError:
        return None
    if key not in data_cache:
        data_cache[key] = load_images(data_config)
    return load_run(info.workdir, data=data_cache[key])


def _with_consolidation_extras(info: RunInfo, options: Options, data_cache: dict) -> RunInfo:
    """A finished relaxed run with `angles.consolidation_extras` added to its results
    where its results.json (written before they existed) lacks them."""
    extras = ("recalibrated_test_error", "final_max_pairwise_angle")
    if info.sharing != "relaxed" or not info.finished or all(k in info.results for k in extras):
        return info
    run = _restore(info, options, data_cache)
    if run is None:
        return info
    return dataclasses.replace(info, results={**angles.consolidation_extras(run), **info.results})


def _analyse_run(info: RunInfo, name: str, out: Path, options: Options, data_cache: dict):
    """Restores one run and writes its per-run files; None when it has no checkpoint."""
    run = _restore(info, options, data_cache)
    if run is None:
        return None
    console.status(f"{name}: linear separability, trajectories, ablations")
    sep = trajectories.linear_separability(
        run,
        num_examples=options.separability_examples,
        folds=options.separability_folds,
        seed=options.seed,
    )
    levels = trajectories.trajectories(
        run, num_examples=options.trajectory_examples, seed=options.seed
    )
    classes = trajectories.CIFAR10_CLASSES if run.data.name.startswith("cifar") else None
    traj = trajectories.plot_trajectories(
        levels,
        out / f"trajectories_{name}.png",
        title=info.label,
        class_names=classes,
        separability=sep,
    )
    sep_path = out / f"separability_{name}.json"
    sep_path.write_text(json.dumps(sep, indent=1) + "\n")
    files = [traj, sep_path]
    abl = None  # an equilibrium level has no blocks to switch off
    if not run.level_is_equilibrium(options.level):
        abl = readout.ablations(run, options.level, num_examples=options.readout_examples)
        files.extend(readout.write_records(abl, out / f"ablation_{name}"))
    times = None
    if run.level_is_shared(options.level) or run.level_is_equilibrium(options.level):
        console.status(f"{name}: readout time up to {options.max_factor}x the trained depth")
        times = {}
        for stats in ("trained", "recalibrated"):
            times[stats] = readout.readout_time_curve(
                run,
                options.level,
                max_factor=options.max_factor,
                num_examples=options.readout_examples,
                recalibrate=stats == "recalibrated",
            )
            stem = f"readout_time_{name}" + ("_recalibrated" if stats == "recalibrated" else "")
            files.extend(readout.write_records(times[stats], out / stem))
    return {
        "label": info.label,
        "ablation": abl,
        "times": times,
        "separability": sep,
        "trajectories": traj,
        "files": files,
    }
