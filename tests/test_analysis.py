"""The analysis layer on two tiny trained runs: ablations, readout time, trajectories, report."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs import cifar10
from rvm.analysis import (
    angles,
    readout,
    records,
    report,
    runs,
    sequences,
    thinking,
    thinking_longer,
    trajectories,
)
from rvm.analysis.paper import PAPER
from rvm.data import load_images
from rvm.train import provenance

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax.monitoring event
BLOCKS = (2, 3, 3)  # two scanned blocks per level (levels 2-3 lose one to padding)

# Trains one tiny run exactly as the fixture's docstring says, in a child process.
TRAIN = f"""
import sys
from experiments.configs import cifar10, equilibrium
from rvm.train.loop import train_and_evaluate

config = cifar10.get_config("smoke")
config.model.blocks_per_level = {BLOCKS}
config.model.sharing = sys.argv[2]
config.model.stochastic_depth = sys.argv[3] == "on"
config.num_epochs = 1
config.data.synthetic_train = 128
config.data.synthetic_test = 64
config.batch_size = 32
config.eval_batch_size = 64
if config.model.sharing == "equilibrium":
    config.model.equilibrium = equilibrium.solver_section(max_iter=3, backward_max_iter=3)
train_and_evaluate(config, sys.argv[1])
"""


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """A relaxed run (stochastic depth on), a non-shared run and one whose levels are
    solved to equilibrium (at most 3 solver iterations; both off), one epoch each.

    Both train with `train_and_evaluate` in child processes started together: on a
    shared 2-core machine compilation dominates, and two processes compile in
    parallel. The children use one device while the analyses here use every
    (simulated) device, so checkpoints are also restored onto another topology.
    """
    root = tmp_path_factory.mktemp("runs")
    # Four steps on 128 images: compiling is the cost, so the children compile cheaply.
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {fast}"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    specs = {"relaxed": "on", "nonshared": "off", "equilibrium": "off"}
    procs = {}
    for mode, sd in specs.items():
        # Logs go to files: an unread pipe that fills up would stall a child.
        with (root / f"{mode}.log").open("w") as log:
            procs[mode] = subprocess.Popen(
                [sys.executable, "-c", TRAIN, str(root / mode), mode, sd],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    for mode, proc in procs.items():
        proc.wait(timeout=600)
        log = (root / f"{mode}.log").read_text()
        assert proc.returncode == 0, f"training the {mode} run failed:\n{log[-3000:]}"
    return {mode: root / mode for mode in specs}


@pytest.fixture(scope="module")
def loaded(run_dirs):
    return {mode: runs.load_run(path) for mode, path in run_dirs.items()}


def test_non_run_directories_are_named_in_the_error(tmp_path):
    with pytest.raises(runs.NotARunError, match=re.escape(str(tmp_path))):
        runs.read_run_info(tmp_path)
    saved = cifar10.get_config("smoke").to_dict()
    saved["model"].pop("unroll", None)  # a field added after older runs were written
    (tmp_path / "config.json").write_text(json.dumps(saved))
    info = runs.read_run_info(tmp_path)
    expected = json.loads(json.dumps(cifar10.get_config("smoke").model.to_dict()))
    assert info.config.model.to_dict() == expected
    with pytest.raises(runs.NotARunError, match=re.escape(f"{tmp_path} has no checkpoint")):
        runs.load_run(tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # looking must not create it


def test_the_reports_read_a_run_through_one_reader(tmp_path):
    """config, metrics (a torn last line dropped), results and starts, read by `records`
    alike for the image tables, the thinking report and the moving-digits summary; without
    importing JAX."""
    config = json.loads(cifar10.get_config("smoke").to_json())
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    (tmp_path / "starts.jsonl").write_text('{"step": 0}\n')
    read = records.read_records(tmp_path)
    assert (read.config, read.metrics, read.results) == (config, [{"epoch": 1}, {"epoch": 2}], None)
    assert read.starts == [{"step": 0}] and read.name == tmp_path.name
    (tmp_path / "results.json").write_text('{"test_error": 5.0}')
    info, think, seq = (
        f(tmp_path) for f in (runs.read_run_info, thinking.read_run, sequences.read_run)
    )
    for got in (info.metrics, think["metrics"], seq["metrics"]):
        assert got == [{"epoch": 1}, {"epoch": 2}]
    assert info.results == think["results"] == seq["results"] == {"test_error": 5.0}
    assert think["config"] == config and seq["config"].to_dict() == info.config.to_dict()
    for reader in (thinking.read_run, sequences.read_run):
        with pytest.raises(records.NotARunError, match="has no config.json"):
            reader(tmp_path / "nothing")
    code = "import sys, rvm.analysis.records, rvm.analysis.thinking; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_run_restores_the_trained_state(loaded):
    run = loaded["nonshared"]
    last = run.info.metrics[-1]
    assert run.step == last["step"] == 4
    assert run.consolidated_model is None and loaded["relaxed"].consolidated_model is not None
    ours = run.evaluate()
    assert ours["error"] == pytest.approx(last["test_error"], abs=1e-6)
    assert ours["loss"] == pytest.approx(last["test_loss"], rel=1e-4)
    relaxed = loaded["relaxed"]
    trained = relaxed.variables["params"]["level2"]["blocks"]["block"]["residual"]["conv1"]
    merged = relaxed.consolidated_variables["params"]["level2"]["conv1_kernel"]
    assert trained["kernel"].shape == (2, *merged.shape)  # two kernels became one: their mean
    np.testing.assert_allclose(np.mean(trained["kernel"], axis=0), merged, rtol=1e-6, atol=1e-7)
    assert relaxed.evaluate()["error"] == pytest.approx(
        relaxed.info.results["consolidated_test_error"], abs=1e-6
    )


@pytest.mark.parametrize("mode", ["nonshared", "relaxed"])
def test_ablation_points_and_all_on_equals_plain_evaluation(loaded, mode, tmp_path):
    run = loaded[mode]
    n = run.info.scanned_blocks(1)
    assert n == 2
    records = readout.ablations(run)
    by_kind = {k: [r for r in records if r["kind"] == k] for k in readout.KINDS}
    assert [r["k"] for r in by_kind["top_to_bottom"]] == list(range(n + 1))
    assert [r["k"] for r in by_kind["bottom_to_top"]] == list(range(n + 1))
    assert [r["k"] for r in by_kind["single"]] == list(range(n))
    assert [r["blocks_off"] for r in by_kind["top_to_bottom"]] == [[], [1], [0, 1]]
    assert [r["blocks_off"] for r in by_kind["bottom_to_top"]] == [[], [0], [0, 1]]
    assert [r["blocks_off"] for r in by_kind["single"]] == [[0], [1]]

    plain = run.evaluate()
    all_off = by_kind["top_to_bottom"][-1]
    assert all_off["loss"] != pytest.approx(plain["loss"], rel=1e-4)  # ablating does something
    for kind in ("top_to_bottom", "bottom_to_top"):
        assert by_kind[kind][0]["error"] == plain["error"]
        assert by_kind[kind][0]["loss"] == pytest.approx(plain["loss"], rel=1e-6)

    json_path, csv_path = readout.write_records(records, tmp_path / "abl")
    assert json.loads(json_path.read_text()) == records
    assert len(csv_path.read_text().splitlines()) == len(records) + 1


def test_readout_time_at_trained_depth_equals_plain_evaluation(loaded):
    run = loaded["relaxed"]
    assert run.level_is_shared(1) and not run.level_is_shared(1, consolidated=False)
    compiles = []
    listen = lambda event, secs, **kw: compiles.append(event) if event == BACKEND_COMPILE else None
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        curve = readout.readout_time_curve(run)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    n = run.info.scanned_blocks(1)
    assert len(compiles) == 1  # one program for every readout time
    assert [r["iterations"] for r in curve] == list(range(1, 2 * n + 1))
    plain = run.evaluate()
    at_n = curve[n - 1]
    assert curve[-1]["loss"] != pytest.approx(plain["loss"], rel=1e-4)  # longer runs differ
    assert at_n["error"] == plain["error"]
    assert at_n["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    # Reading out early is the top-to-bottom ablation: the same network.
    top = {r["k"]: r for r in readout.ablations(run) if r["kind"] == "top_to_bottom"}
    for r in curve[:n]:
        assert r["loss"] == pytest.approx(top[n - r["iterations"]]["loss"], rel=1e-5)
    # Past the trained depth: as the level scanned for exactly that many iterations.
    for t in (n + 1, 2 * n):
        exact = run.evaluate(iterations=(None, t, None))
        assert curve[t - 1]["error"] == exact["error"]
        assert curve[t - 1]["loss"] == pytest.approx(exact["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="not raw-shared"):
        readout.readout_time_curve(loaded["nonshared"])


def test_readout_time_of_an_equilibrium_level_is_error_against_solver_iterations(loaded):
    run = loaded["equilibrium"]
    assert run.level_is_equilibrium(1) and not run.level_is_shared(1)
    curve = readout.readout_time_curve(run, 1, max_factor=2)
    assert [r["iterations"] for r in curve] == [1, 2, 3, 4, 6]
    assert {r["trained"] for r in curve} == {3}
    assert len({round(r["loss"], 6) for r in curve}) > 1  # the count changes the network
    for r in (curve[0], curve[-1]):
        exact = run.evaluate(iterations=(None, r["iterations"], None))
        assert r["error"] == exact["error"]
        assert r["loss"] == pytest.approx(exact["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="no blocks to switch off"):
        readout.ablations(run)


def test_trajectories_of_an_equilibrium_level_follow_its_solver(loaded):
    """An equilibrium level's trajectory: the plain iterates from its input, then the
    fixed point its solver found, which is what the level passes on."""
    run = loaded["equilibrium"]
    images = run.split("train")[0][:8]
    acts = run.activations(images)
    ends = run.level_ends(images)
    for level, (inputs, path) in enumerate(acts):
        assert path.shape == (3 + 1, *inputs.shape)  # at most 3 iterations, then the answer
        np.testing.assert_array_equal(path[-1], ends[level])
    levels = trajectories.trajectories(run, num_examples=16)
    assert [lt.raw.shape for lt in levels] == [(16, 5, 2)] * 3


def test_recalibrated_ablations_reestimate_each_ablated_network(loaded):
    run = loaded["nonshared"]
    stale = {(r["kind"], r["k"]): r for r in readout.ablations(run)}
    fresh = {(r["kind"], r["k"]): r for r in readout.ablations(run, recalibrate=True)}
    assert fresh[("single", 0)]["loss"] != pytest.approx(stale[("single", 0)]["loss"], rel=1e-4)
    mask = np.array([0.0, 1.0], np.float32)  # the first middle block switched off
    variables = run.recalibrated([None, mask, None])
    exact = run.evaluate([None, mask, None], variables=variables)
    assert fresh[("single", 0)]["loss"] == pytest.approx(exact["loss"], rel=1e-6)


def test_recalibrated_readout_time_runs_each_length_with_statistics_of_its_own(loaded):
    run = loaded["relaxed"]
    n = run.info.scanned_blocks(1)
    curve = readout.readout_time_curve(run, recalibrate=True)
    stale = readout.readout_time_curve(run)
    assert curve[-1]["loss"] != pytest.approx(stale[-1]["loss"], rel=1e-4)
    # Each point is the network of that readout time with statistics re-estimated for it.
    for t in (n, 2 * n):
        iterations = (None, t, None)
        fresh = run.recalibrated(iterations=iterations)
        exact = run.evaluate(iterations=iterations, variables=fresh)
        assert curve[t - 1]["loss"] == pytest.approx(exact["loss"], rel=1e-4)
    bn1 = fresh["batch_stats"]["level2"]["blocks"]["block"]["residual"]["bn1"]["var"]
    assert bn1.shape[0] == 2 * n  # one set of statistics per iteration


@pytest.mark.parametrize("at_2n, expected", [(19.0, "falls"), (20.4, "holds"), (21.0, "rises")])
def test_thinking_longer_compares_the_longest_readout_with_the_trained_depth(at_2n, expected):
    errors = {1: 30.0, 2: 20.0, 3: 18.0, 4: at_2n}  # the best past N does not decide
    records = [{"iterations": t, "trained": 2, "error": e} for t, e in errors.items()]
    assert thinking_longer.verdict(records) == expected
    assert thinking_longer.summary(records) == (
        f"error {expected} past the trained depth: 20.00% at 2 iterations, "
        f"{at_2n:.2f}% at 4 (best past 2: 18.00% at 3)"
    )


def test_thinking_longer_reads_out_shared_levels_recalibrated(loaded, tmp_path):
    run = loaded["relaxed"]  # analysed consolidated: every level raw-shared
    assert thinking_longer.curves(loaded["nonshared"], [0, 1, 2]) == {}
    by_level = thinking_longer.curves(run, [1])
    want = readout.readout_time_curve(run, 1, recalibrate=True)
    assert [r["loss"] for r in by_level[1]] == pytest.approx([r["loss"] for r in want], rel=1e-6)
    name = thinking_longer.label(run)
    assert name == "relaxed (fixed, epoch 1 of 1)"
    assert thinking_longer.caveats([run, loaded["nonshared"]]) == []  # both at their last step
    earlier = dataclasses.replace(run, step=run.step - 1)
    notes = thinking_longer.caveats([run, earlier])
    assert len(notes) == 1 and "different points of training" in notes[0]
    md, png, js = thinking_longer.write([(name, by_level)], tmp_path / "longer", "cmd", notes)
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert len(json.loads(js.read_text())) == 2 * run.info.scanned_blocks(1)
    text = md.read_text()
    assert f"- {name}, middle level: {thinking_longer.summary(by_level[1])}." in text
    assert "![readout time](longer.png)" in text and "| 2 (trained) |" in text
    assert notes[0] in text


def test_pca_2d_shapes_and_normalised_mean():
    rng = np.random.default_rng(0)
    drift = np.arange(5)[None, :, None] * rng.normal(size=(1, 1, 40)) * 10
    points = rng.normal(size=(30, 5, 40)) + drift
    raw, ex_raw = trajectories.pca_2d(points, normalized=False)
    norm, ex_norm = trajectories.pca_2d(points, normalized=True)
    assert raw.shape == norm.shape == (30, 5, 2) and ex_raw.shape == (2,)
    assert np.abs(raw.mean(axis=0)).max() > 1.0  # the drift is there before normalising
    np.testing.assert_allclose(norm.mean(axis=0), 0.0, atol=1e-6)
    assert ex_raw[0] > 0.9 > ex_norm[0]  # the drift is the dominant direction


def test_trajectories_of_a_run(loaded):
    run = loaded["nonshared"]
    levels = trajectories.trajectories(run, num_examples=100)
    again = trajectories.sample_indices(len(run.data.train_labels), 100, 0)
    np.testing.assert_array_equal(levels[0].labels, run.data.train_labels[again])
    assert len(levels) == 3
    for lt in levels:
        n = run.info.scanned_blocks(lt.level)
        assert lt.raw.shape == lt.normalized.shape == (100, n + 1, 2)
        scale = np.abs(lt.normalized).max()
        assert scale > 0
        np.testing.assert_allclose(lt.normalized.mean(axis=0), 0.0, atol=1e-4 * scale)
    assert max(np.abs(lt.raw.mean(axis=0)).max() for lt in levels) > 1e-3


def test_cv_accuracy_separates_separable_classes_only():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    centres = rng.normal(size=(4, 500)) * 3
    separable = centres[labels] + rng.normal(size=(120, 500))
    assert trajectories.cv_accuracy(separable, labels, folds=3)["accuracy"] == 1.0
    noise = trajectories.cv_accuracy(rng.normal(size=(120, 500)), labels, folds=3)
    assert noise["accuracy"] < 0.5 and noise["chance"] == 0.25


def test_a_run_resumed_under_other_code_says_so(tmp_path):
    config = cifar10.get_config("smoke")
    start = lambda commit, kind: {"commit": commit, "devices": {"count": 1, "kind": kind}}
    run = runs.RunInfo(tmp_path, config, [], None, [start("a1", "cpu"), start("a1", "cpu")])
    assert run.trained_by() == "code a1 on 1 x cpu"
    run.starts.extend([start("b2-dirty", "H200"), start(None, "H200")])
    assert (
        run.trained_by() == "code a1, b2-dirty, of unknown commit (3 commits) on 1 x cpu, 1 x H200"
    )
    assert runs.RunInfo(tmp_path, config, [], None).trained_by() == ""


def test_tables_group_seeds_and_mark_missing_rows(tmp_path):
    infos = []
    for i, (variant, seed, err) in enumerate(
        [("middle18_relaxed", 0, 7.0), ("middle18_relaxed", 1, 8.0), ("all18_nonshared", 0, 6.5)]
    ):
        config = cifar10.get_config(variant)
        config.seed = seed
        results = {"finished": True, "params": 1, "params_consolidated": 2, "test_error": 99.0}
        results["consolidated_test_error"] = err
        infos.append(runs.RunInfo(tmp_path / f"r{i}", config, [], results))
    groups = report.group_runs(infos, PAPER)
    # The non-shared run serves Table 1 (and would serve Table 2) whatever its scope.
    assert [g.paper_table for g in groups] == [1]
    text = report.table_markdown(groups[0], PAPER)
    assert "| Relaxed | 2 | 7.50 ± 0.71 | 500 | 1437098 | 6.67 | 2 (0,1) |" in text
    assert "| Non-shared | 1 | 99.00 | 500 |" in text
    assert "| Raw | - | no run | - | 1437098 | 7.78 | 0 |" in text
    assert "| Minimal | - | no run | - | 1434026 | 7.23 | 0 |" in text

    # Synthetic images are another experiment; tfds and binary read the same CIFAR-10.
    synthetic = cifar10.get_config("middle18_relaxed")
    synthetic.seed, synthetic.data.source = 2, "synthetic"
    binary = cifar10.get_config("middle18_relaxed")
    binary.seed, binary.data.source = 3, "binary"
    pairs = (("s", synthetic), ("b", binary))
    more = [runs.RunInfo(tmp_path / n, c, [], results) for n, c in pairs]
    rows = report.group_runs([*infos, *more], PAPER)[0].rows
    assert sorted(len(r.runs) for r in rows if r.method == "relaxed") == [1, 3]
    # One run given twice under two names (a workdir and its copy) is not a second seed.
    copy = runs.RunInfo(tmp_path / "copy", infos[0].config, [], results)
    with pytest.raises(ValueError, match=r"same seed \[0\]; give one of them"):
        report.group_runs([*infos, copy], PAPER)


def test_report_writes_every_file_it_promises(run_dirs, loaded, tmp_path):
    del loaded  # restored first, so the report reuses the compiled evaluations
    options = report.Options(trajectory_examples=32, separability_examples=64, separability_folds=3)
    written = report.write_report(
        [run_dirs["relaxed"], run_dirs["nonshared"]], tmp_path, PAPER, options
    )
    names = {p.name for p in written}
    md = (tmp_path / "report.md").read_text()
    for path in written:
        assert path.parent == tmp_path and path.stat().st_size > 0, path
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_SIGNATURE), path
        if path.name != "report.md":
            assert f"]({path.name})" in md, f"report.md does not link {path.name}"
    slug = "all_2-3-3"
    expected = {
        f"{slug}.md",
        f"curves_{slug}.png",
        f"figure3_ablation_{slug}.png",
        f"readout_time_{slug}.png",
        f"readout_time_{slug}_recalibrated.png",
        "angles.png",
        "report.md",
        "readout_time_relaxed.json",
        "readout_time_relaxed.csv",
        "readout_time_relaxed_recalibrated.json",
        "readout_time_relaxed_recalibrated.csv",
    }
    for mode in ("relaxed", "nonshared"):
        expected |= {f"trajectories_{mode}.png", f"separability_{mode}.json"}
        expected |= {f"ablation_{mode}.json", f"ablation_{mode}.csv"}
    assert names == expected
    assert "Paper tables without a run (left out): 1, 2, 3." in md
    # each run: where it is (relative to the report) and what code on which devices trained it
    listed = dict(re.findall(r"^- `[^`]+`: .* \(`([^`]+)`\); trained by (.*)$", md, re.M))
    kind = jax.devices()[0].device_kind
    code = provenance.commit() or "of unknown commit"  # a checkout without git history
    assert set(listed.values()) == {f"code {code} on 1 x {kind}"}, md
    assert not any(Path(p).is_absolute() for p in listed)
    ran = {run_dirs["relaxed"].resolve(), run_dirs["nonshared"].resolve()}
    assert {(tmp_path / p).resolve() for p in listed} == ran
    table = (tmp_path / f"{slug}.md").read_text()
    assert "| Relaxed |" in table and "| Non-shared |" in table
    results = json.loads((run_dirs["relaxed"] / "results.json").read_text())
    before, after = results["test_error"], results["consolidated_test_error"]
    fresh = results["consolidated_recalibrated_test_error"]
    # The consolidation table: before, before re-estimated (from the checkpoint), after with
    # the trained and with re-estimated statistics.
    assert re.search(rf"\| {before:.2f} \| [0-9.]+ \| {after:.2f} \| {fresh:.2f} \|", md)
    assert "with the trained statistics" in table
    for key in ("max_angle", "max_pairwise_angle"):
        history = angles.angle_history(runs.read_run_info(run_dirs["relaxed"]).metrics, key)
        assert len(history[1]) == 6


def test_report_reads_cifar10_where_it_is_told(run_dirs, monkeypatch, tmp_path):
    """A run's `data.binary_dir` is relative to where it was trained; `binary_dir` of the
    options replaces it (the data loader is a stand-in serving the run's own images)."""
    run = tmp_path / "run"
    shutil.copytree(run_dirs["nonshared"], run)
    config = json.loads((run / "config.json").read_text())
    trained_on = dict(config["data"])
    config["data"].update(source="binary", binary_dir="data/cifar10")
    (run / "config.json").write_text(json.dumps(config))
    asked = []

    def loader(data_config):
        asked.append(dict(data_config))
        return load_images(trained_on)

    monkeypatch.setattr(report, "load_images", loader)
    options = report.Options(
        binary_dir="/elsewhere/cifar10",
        readout_examples=64,
        trajectory_examples=16,
        separability_examples=40,
        separability_folds=2,
    )
    written = report.write_report([run], tmp_path / "out", PAPER, options)
    assert any(p.name == "trajectories_run.png" for p in written)
    assert len(asked) == 1 and asked[0]["binary_dir"] == "/elsewhere/cifar10"
    assert asked[0]["source"] == "binary"


def test_a_run_without_checkpoints_is_skipped_without_reading_its_data(run_dirs, tmp_path):
    """Its tables and curves come from its records alone; its data may be long gone."""
    run = tmp_path / "run"
    shutil.copytree(run_dirs["nonshared"], run, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((run / "config.json").read_text())
    config["data"].update(source="binary", binary_dir=str(tmp_path / "nowhere"))
    (run / "config.json").write_text(json.dumps(config))
    report.write_report([run], tmp_path / "out", PAPER, report.Options())
    assert "`run` skipped: it has no checkpoint" in (tmp_path / "out" / "report.md").read_text()
