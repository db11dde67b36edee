"""The benchmark harness's bookkeeping (no timing): child environments, rounds, the plan."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import plan, report, run, targets


def test_children_run_on_the_cpu_with_huge_page_malloc_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=x")
    env = run.child_env({"kind": "rvm_train"})
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env["XLA_FLAGS"] == "--xla_dump_to=x"
    env = run.child_env({"kind": "torch_train", "malloc": "default", "devices": 2})
    assert "GLIBC_TUNABLES" not in env
    assert env["XLA_FLAGS"] == "--xla_dump_to=x --xla_force_host_platform_device_count=2"
    with pytest.raises(ValueError, match="malloc"):
        run.child_env({"malloc": "tcmalloc"})


def test_children_keep_the_callers_pythonpath(tmp_path, monkeypatch):
    """A GPU host may have what rvm needs only on PYTHONPATH: a child must import from it.
    Python imports `sitecustomize` from the path at start-up; this one leaves a mark."""
    site = tmp_path / "site"
    site.mkdir()
    mark = tmp_path / "imported"
    (site / "sitecustomize.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    env = run.child_env({"kind": "matmul"})
    assert env["PYTHONPATH"].split(":") == [str(run.REPO), str(site)]
    spec = {"kind": "matmul", "library": "numpy", "n": 8, "steps": 1, "windows": 1, "warmup": 1}
    assert not mark.exists()
    record = run.Runner(timeout=120, workdir=tmp_path)(spec, "numpy 8x8")
    assert record["ok"], record.get("log_tail")
    assert mark.exists()


HLO = """HloModule jit_step

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %c = f32[4] conditional(%pred, %x, %x), true_computation=%t, false_computation=%f
}

%command_buffer (p0: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %call = f32[4] call(%a), to_apply=%command_buffer
  %w2 = (s32[], f32[4]) while(%init2), condition=%cond2, body=%body2
  %c2 = f32[4] conditional(%i, %a, %a), branch_computations={%b0, %b1}
}
"""


def test_command_buffer_counts_find_loops_and_conditionals_run_on_the_device():
    from bench import hlo

    assert hlo.command_buffer_counts(HLO) == {
        "command_buffers": 1,
        "whiles": 2,
        "whiles_in_command_buffers": 1,  # %w, in the command buffer
        "conditionals": 2,
        "conditionals_in_command_buffers": 1,  # %c, in the body of %w
    }
    without = HLO.replace("command_buffer", "fused_computation")
    assert hlo.command_buffer_counts(without)["conditionals_in_command_buffers"] == 0


def _record(windows, **extra):
    return {"ok": True, "windows_s": windows, "step_s": sorted(windows)[1], "wall_s": 10.0, **extra}


def test_rounds_keep_the_fastest_round_every_window_and_the_largest_peak_memory():
    a = _record([1.0, 2.0, 3.0], max_rss_mb=100.0, first_call_s=5.0, gflops=10.0)
    b = _record([0.5, 1.5, 9.0], max_rss_mb=80.0, first_call_s=7.0, gflops=20.0)
    out = run.fastest_round([a, b])
    assert out["step_s"] == 1.5 and out["gflops"] == 20.0
    assert out["round_steps_s"] == [2.0, 1.5]
    assert out["windows_s"] == [1.0, 2.0, 3.0, 0.5, 1.5, 9.0]
    assert out["max_rss_mb"] == 100.0
    assert out["first_call_s"] == 6.0
    assert out["wall_s"] == 20.0 and out["rounds"] == 2
    assert run.fastest_round([a]) is a
    failed = {"ok": False, "error": "timed out", "log_tail": "", "wall_s": 1.0}
    assert run.fastest_round([failed, failed]) is failed
    assert run.fastest_round([failed, a]) == {**a, "failed_rounds": 1}
    out = run.fastest_round([a, failed, b])
    assert out["step_s"] == 1.5 and out["rounds"] == 2 and out["failed_rounds"] == 1
    assert out["windows_s"] == [1.0, 2.0, 3.0, 0.5, 1.5, 9.0] and out["wall_s"] == 21.0


def test_a_deadline_cuts_measurements_short_and_skips_those_past_it(tmp_path):
    spec = {"timeout": 300.0}
    assert run.Runner(900.0, tmp_path).time_limit(spec) == 300.0
    soon = run.Runner(900.0, tmp_path, deadline=time.perf_counter() + 100)
    assert 90 < soon.time_limit(spec) <= 100
    late = run.Runner(900.0, tmp_path, deadline=time.perf_counter() + run.Runner.MIN_RUN_S / 2)
    assert late.time_limit(spec) is None
    record = late(spec, "rvm on")  # not started: no child, a record saying why
    assert not record["ok"] and "--deadline" in record["error"]
    assert "**rvm on**: not run" in "\n".join(report._failures({"rvm on": record}))


def test_malloc_section_reuses_the_train_sections_huge_page_measurements():
    specs = plan.plan(plan.Settings())
    assert set(specs) == set(plan.MEASUREMENTS)
    train = list(specs["train"].values())
    huge = [spec for label, spec in specs["malloc"].items() if label.endswith("huge pages")]
    default = [spec for label, spec in specs["malloc"].items() if label.endswith("default")]
    assert len(huge) == len(default) == 4
    assert all(spec in train for spec in huge)
    assert all(spec["malloc"] == "default" and spec not in train for spec in default)


def test_gpu_plan_compares_bfloat16_and_shares_runs_between_sections(monkeypatch):
    s = plan.Settings(platform="gpu", **plan.GPU_SETTINGS)
    specs = plan.plan(s)
    assert tuple(specs) == plan.GPU_MEASUREMENTS == plan.measurements(s)
    assert all(spec["platform"] == "gpu" for sec in specs.values() for spec in sec.values())
    train = specs["train"]
    assert len([k for k in train if k.startswith("(18, 18, 18)")]) == len(plan.GPU_IMPLS)
    assert len([k for k in train if k.startswith("(3, 4, 4)")]) == len(plan.GPU_SMALL_IMPLS)
    assert train["(18, 18, 18) nonshared / rvm bfloat16"] == specs["stochastic_depth"]["rvm off"]
    assert specs["eval"]["rvm evaluate"]["dtype"] == "bfloat16"
    sd = specs["stochastic_depth"]
    assert {sd[f"rvm on / {impl}"]["sd_impl"] for impl in plan.SD_IMPLS} == set(plan.SD_IMPLS)
    assert specs["xla_gpu"]["command buffers with loops and conditionals / cond"] == {
        **sd["rvm on / cond"],
        "xla_flags": plan.XLA_GPU_VARIANTS["command buffers with loops and conditionals"][0],
        "count_command_buffers": True,
    }
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")
    monkeypatch.delenv("JAX_PLATFORMS")
    env = run.child_env(train["(18, 18, 18) nonshared / torch eager channels_last float32"])
    assert env["JAX_PLATFORMS"] == "cuda" and env["GLIBC_TUNABLES"] == "glibc.malloc.check=0"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # a dry run of the GPU plan
    assert run.child_env(sd["rvm on / compact"])["JAX_PLATFORMS"] == "cpu"
    with pytest.raises(ValueError, match="platform"):
        run.child_env({"platform": "tpu"})


def test_xla_gpu_section_measures_every_flag_set_of_rvm_train_xla():
    """The plan (which imports no JAX) copies the flag sets; they must stay the same."""
    from rvm.train import xla

    copied = {name: flags for name, (flags, _) in plan.XLA_GPU_VARIANTS.items()}
    assert copied == {k: v for k, v in xla.GPU_FLAG_SETS.items() if v}
    assert xla.gpu_xla_flags() == xla.GPU_FLAGS
    assert xla.gpu_xla_flags("--xla_dump_to=x").split()[-1] == "--xla_dump_to=x"  # caller wins


def _timed(spec, step_s):
    return {"ok": True, "spec": spec, "step_s": step_s, "windows_s": [step_s], "first_call_s": 9.0}


def test_gpu_targets_and_projection_from_step_times():
    s = plan.Settings(platform="gpu", **plan.GPU_SETTINGS)
    specs = plan.plan(s)
    steps = {  # s/step: rvm 1.25x faster than PyTorch; stochastic depth 1.25x faster
        "rvm bfloat16": 0.020,
        "torch eager channels_last bfloat16 autocast": 0.025,
        "rvm float32": 0.040,
        "torch eager channels_last float32": 0.032,
        "rvm on / cond": 0.025,
        "rvm on / masked": 0.016,
        "rvm on / compact": 0.018,
        "rvm off": 0.020,
        "torch eager channels_last on": 0.020,
        "torch eager channels_last off": 0.025,
        "rvm evaluate": 0.5,
        "torch eager channels_last no_grad": 1.0,
    }
    results = {
        section: {
            label: _timed(spec, steps.get(label) or steps[label.split(" / ")[-1]])
            for label, spec in specs[section].items()
            if label in steps or label.split(" / ")[-1] in steps
        }
        for section in ("train", "stochastic_depth", "eval")
    }
    # The loop's training steps at 0.02 s a step against its strategy's (masked) 0.016 s;
    # its whole epochs, evaluation and checkpoint included, at 0.025 s a step.
    loop = {**_timed(specs["loop"]["rvm loop"], 0.02), "eval_s": [1.0, 0.1, 0.12]}
    loop.update(epoch_step_s=0.025, checkpoint_s=[0.3, 0.2, 0.25])
    results["loop"] = {"rvm loop": {**loop, "sd_impl": "masked", "loop_wall_s": 60.0}}
    verdicts = {
        t["target"]: (t["pass"], round(t["value"], 3)) for t in targets.verdicts(results, s)
    }
    assert verdicts == {
        "(3, 4, 4) nonshared: rvm bfloat16 >= 3x torch eager channels_last bfloat16 autocast "
        "throughput": (False, 1.25),
        "(18, 18, 18) nonshared: rvm bfloat16 >= 3x torch eager channels_last bfloat16 "
        "autocast throughput": (False, 1.25),
        "(18, 18, 18) rvm: stochastic depth step at least 15% faster than off (speed-up, "
        "rvm on / masked)": (True, 1.25),
        "(18, 18, 18) rvm: the real loop's training steps/s >= 0.95x the benchmark step's "
        "(evaluation and checkpoint apart)": (False, 0.8),
        "(18, 18, 18) the paper's run (stochastic depth on, test set every epoch), real loop": (
            False,
            5120,
        ),
    }
    missed = [t["text"] for t in targets.verdicts(results, s) if t["pass"] is False]
    assert "FAIL: 5.12e+03 images/s vs 1.4e+04 images/s (margin -8.88e+03 images/s)" in missed
    rvm, torch = targets.projection(results, s)
    assert rvm["steps"] == 500 * 390 and rvm["dtype"] == "bfloat16"
    assert rvm["train_h"] == pytest.approx(500 * 390 * 0.016 / 3600)
    assert rvm["eval_h"] == pytest.approx(500 * 10 * 0.5 / 3600)  # 10 batches of 1000 an epoch
    assert torch["total_h"] > rvm["total_h"]
    doc = {
        "name": "gpu",
        "date": "today",
        "command": "python bench/run.py --platform gpu",
        "machine": {**run.machine(), "gpus": ["H200, 143771 MiB, 580"]},
        "versions": {},
        "results": results,
    }
    targets.derive(doc, s)
    assert doc["projection"] == [rvm, torch] and len(doc["targets"]) == 5
    md = report.render(doc, s)
    assert "| rvm | bfloat16 | 0.016 |" in md
    # Training steps, whole epoch, evaluation and checkpoint (medians after the first epoch).
    assert "| loop | 0.02 [0.02-0.02] | 6400.0 | 50.0 | 0.8x | 0.025 | 0.11 | 0.25 | 60 |" in md
    # Each PyTorch run against rvm's run in its own dtype.
    row = lambda impl: next(
        r for r in md.splitlines() if r.startswith(f"| (18, 18, 18) nonshared | {impl} |")
    )
    assert "| 0.8x |" in row("torch eager channels_last bfloat16 autocast")
    assert "| 1.25x |" in row("torch eager channels_last float32")


@pytest.mark.parametrize(
    "section, label",
    [
        ("stochastic_depth", "rvm on / compact"),
        ("eval", "rvm evaluate"),
        ("stochastic_depth", "torch eager channels_last on"),
        ("eval", "torch eager channels_last no_grad"),
    ],
)
def test_gpu_plans_bfloat16_measurements_run(section, label, tmp_path):
    """The GPU plan's bfloat16 children (stochastic depth on), run on the CPU, tiny."""
    if label.startswith("torch"):
        pytest.importorskip("torch")
    s = plan.Settings(platform="gpu", small=(1, 2, 2), large=(1, 2, 2), batch=8, eval_batch=16)
    spec = {**plan.plan(s)[section][label], "platform": "cpu", "steps": 1, "windows": 1}
    record = run.Runner(timeout=300, workdir=tmp_path)(spec, label)
    assert record["ok"], record.get("log_tail")
    assert record["spec"]["dtype"] == "bfloat16" and record["step_s"] > 0
    if section == "stochastic_depth":
        assert 0 < record["final_loss"] < 10


def test_gpu_plans_loop_and_xla_gpu_children_run(tmp_path):
    """The real loop, and a step under the command-buffer flags with its HLO counted,
    run on the CPU, tiny (XLA:CPU makes no command buffers but has the scans' loops)."""
    s = plan.Settings(platform="gpu", small=(1, 2, 2), large=(1, 2, 2), batch=8, eval_batch=16)
    specs = plan.plan(s)
    tiny = {"platform": "cpu", "steps": 1, "windows": 1}
    runner = run.Runner(timeout=300, workdir=tmp_path)
    loop_spec = {**specs["loop"]["rvm loop"], **tiny, "epoch_steps": 2, "test_images": 16}
    loop = runner(loop_spec, "rvm loop")
    assert loop["ok"], loop.get("log_tail")
    assert len(loop["windows_s"]) == loop_spec["epochs"] - 1 and loop["step_s"] > 0
    assert loop["sd_impl"] == "cond" and len(loop["eval_s"]) == loop_spec["epochs"]
    # A checkpoint per epoch; each window is its epoch less its evaluation and the
    # checkpoint written in it (the previous epoch's), per step.
    assert len(loop["checkpoint_s"]) == loop_spec["epochs"]
    ckpts, evals = loop["checkpoint_s"], loop["eval_s"]
    for i, (train, epoch) in enumerate(zip(loop["windows_s"], loop["epoch_windows_s"])):
        apart = (evals[i + 1] + ckpts[i]) / loop_spec["epoch_steps"]
        assert 0 < train < epoch and epoch - train == pytest.approx(apart)
    label = "command buffers with loops and conditionals / cond"
    step = runner({**specs["xla_gpu"][label], **tiny}, label)
    assert step["ok"], step.get("log_tail")
    # The step's module: a scan per level, a cond per stochastic block (forward and back).
    counts = step["hlo"]
    assert counts["command_buffers"] == 0 and counts["whiles"] >= 3
    assert counts["conditionals"] >= 8 and counts["conditionals_in_command_buffers"] == 0
    results = {"loop": {"rvm loop": loop}, "xla_gpu": {label: step}}
    results["stochastic_depth"] = {"rvm on / cond": {**step, "step_s": 2 * step["step_s"]}}
    text = "\n".join(
        report.report_xla_gpu(results["xla_gpu"], {"sd": results["stochastic_depth"]}, s)
    )
    assert f"| {label} |" in text and "| 2x | 0 (0) | 0 of " in text
    assert targets.loop_step(results) is results["stochastic_depth"]["rvm on / cond"]


def test_ceiling_is_the_fastest_matmul_of_numpy_torch_and_xla(tmp_path):
    """Every library's matmul child runs (tiny), and the ceiling is the fastest per dtype."""
    s = plan.Settings(matmul_n=64, steps=1, windows=1, warmup=1)
    specs = plan.plan(s)["ceiling"]
    assert {spec["library"] for spec in specs.values()} == {"numpy", "torch", "jax"}
    runner = run.Runner(timeout=300, workdir=tmp_path)
    for label in ("numpy 64x64", "jax 64x64"):
        record = runner(specs[label], label)
        assert record["ok"], record.get("log_tail")
        assert record["gflops"] == pytest.approx(2 * 64**3 / record["step_s"] / 1e9)
    numpy_runs = runner.runs[json.dumps(specs["numpy 64x64"], sort_keys=True)]
    runner(specs["numpy 64x64"], "again")  # another section asking for it: measured above
    assert len(numpy_runs) == 1
    twice = runner(specs["numpy 64x64"], "round 2", round_=1)
    assert len(numpy_runs) == 2 and twice["rounds"] == 2
    bad = runner({**specs["jax 64x64"], "library": "mkl"}, "mkl")
    assert not bad["ok"] and "library='mkl'" in bad["log_tail"]
    rates = {"numpy": 160.0, "torch": 170.0, "jax": 280.0}
    results = {
        label: {"ok": True, "spec": spec, "gflops": rates[spec["library"]]}
        for label, spec in specs.items()
    }
    results["torch bfloat16"] = {"ok": True, "spec": {"dtype": "bfloat16"}, "gflops": 900.0}
    results["failed"] = {"ok": False, "spec": specs["jax 64x64"]}
    assert targets.ceilings(results) == {"float32": 280.0, "bfloat16": 900.0}


@pytest.mark.parametrize("kind", ["jax_conv", "torch_conv"])
def test_conv_children_time_each_gradient_alone(kind, tmp_path):
    """The `convs` section's gradient-alone passes run (tiny), and an unknown pass fails."""
    if kind == "torch_conv":
        pytest.importorskip("torch")
    specs = plan.plan(plan.Settings(steps=1, windows=1, warmup=1))["convs"]
    assert {spec["pass"] for spec in specs.values()} == set(plan.CONV_PASSES)
    runner = run.Runner(timeout=300, workdir=tmp_path)
    tiny = {"kind": kind, "size": 4, "channels": 2, "batch": 2, "steps": 1, "windows": 1}
    for kind_pass in ("input_grad", "kernel_grad"):
        record = runner({**tiny, "pass": kind_pass, "warmup": 1}, kind_pass)
        assert record["ok"], record.get("log_tail")
        assert record["gflops"] == pytest.approx(2 * 2 * 16 * 4 * 9 / record["step_s"] / 1e9)
    bad = runner({**tiny, "pass": "backward", "warmup": 1}, "backward")
    assert not bad["ok"] and "pass='backward'" in bad["log_tail"]


def test_rvm_conv_passes_compile_to_the_convolutions_they_count():
    """`convs` reads a pass's time against 1x (one pass) or 3x (`train`) one conv's FLOPs:
    each must compile to that many convolutions, no fewer (XLA drops unused results)."""
    import re

    import jax
    import jax.numpy as jnp

    from bench import measure_rvm

    x, kernel, g = jnp.ones((2, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), jnp.ones((2, 4, 4, 2))
    counts = {
        name: len(re.findall(r" convolution\(", jax.jit(f).lower(x, kernel, g).compile().as_text()))
        for name, f in measure_rvm.jax_conv_passes().items()
    }
    assert counts == {"forward": 1, "input_grad": 1, "kernel_grad": 1, "train": 3}


COMMITTED = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob("*.json"))


def test_a_report_names_the_commit_it_measured():
    """The commit itself comes from `rvm.train.provenance` (tested there)."""
    head = "0123456789ab"
    doc = json.loads(COMMITTED[0].read_text())
    doc.pop("commit", None)  # reports measured before they recorded it
    assert "- commit:" not in report.redrawn(doc)
    doc["command"], doc["commit"] = "python bench/run.py", head
    assert f"- command: `python bench/run.py`\n- commit: `{head}`\n" in report.redrawn(doc)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_reports_are_what_their_measurements_render_to(path):
    """Every committed table, target verdict and projection follows from the JSON beside it."""
    doc = json.loads(path.read_text())
    assert doc["results"], "a committed report measured something"
    assert report.redrawn(doc) == path.with_suffix(".md").read_text()


def test_redraw_rederives_targets_and_rewrites_the_markdown(tmp_path):
    doc = json.loads(COMMITTED[0].read_text())
    doc["targets"], doc["projection"] = [], []
    stale = tmp_path / "r.json"
    stale.write_text(json.dumps(doc))
    stale.with_suffix(".md").write_text("hand-edited\n")
    md = report.redraw(stale)
    committed = json.loads(COMMITTED[0].read_text())
    redrawn = json.loads(stale.read_text())
    assert redrawn["targets"] and redrawn["targets"] == committed["targets"]
    assert redrawn["projection"] == committed["projection"]
    assert md.read_text() == COMMITTED[0].with_suffix(".md").read_text()


def _state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _measurements(pid: int) -> list[int]:
    """Running `bench.measure` processes whose parent is `pid`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        state = _state(int(proc.name))
        if state and state[1] == pid and state[0] != "Z":
            try:
                if b"bench.measure" in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_the_suite_and_its_running_measurement(tmp_path):
    """A measurement runs in a session of its own; SIGTERM to the suite must end it too."""
    suite = subprocess.Popen(
        [sys.executable, str(run.REPO / "bench" / "run.py"), "--tiny", "--only", "compile"]
        + ["--out", str(tmp_path / "cut")],
        cwd=run.REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (children := _measurements(suite.pid)) and time.time() < deadline:
        time.sleep(0.05)
    assert children, "no measurement started"
    suite.send_signal(signal.SIGTERM)
    assert suite.wait(timeout=60) == 128 + signal.SIGTERM
    # Killed: gone, or a zombie where nothing reaps orphans (a container's init).
    dead = lambda pid: (state := _state(pid)) is None or state[0] == "Z"
    deadline = time.time() + 10
    while not all(map(dead, children)) and time.time() < deadline:
        time.sleep(0.05)
    for pid in children:
        assert dead(pid), f"measurement {pid} survived: {_state(pid)}"
