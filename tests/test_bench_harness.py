"""The benchmark harness's bookkeeping (no timing): child environments, rounds, the plan."""

import pytest

from bench import run


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
    assert run.fastest_round([a, failed]) is failed


def test_malloc_section_reuses_the_train_sections_huge_page_measurements():
    plan = run.plan(run.Settings())
    assert set(plan) == set(run.MEASUREMENTS)
    train = list(plan["train"].values())
    huge = [spec for label, spec in plan["malloc"].items() if label.endswith("huge pages")]
    default = [spec for label, spec in plan["malloc"].items() if label.endswith("default")]
    assert len(huge) == len(default) == 4
    assert all(spec in train for spec in huge)
    assert all(spec["malloc"] == "default" and spec not in train for spec in default)
