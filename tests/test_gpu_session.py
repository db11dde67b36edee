"""The GPU session's checks (`bench/session.py`): what it carries, its preflight, and the
sections that measured nothing. No device, no benchmark run; `bench/bare_gpu_image.sh`
runs the whole session in a bare environment."""

import ast
import json
import sys
from pathlib import Path

from bench import session

REPO = session.REPO
OWN = {"rvm", "experiments", "bench"}
# What a lent GPU machine has (jax with CUDA, flax, optax, orbax-checkpoint and their
# dependencies, PyTorch): the session may import these without carrying them.
MACHINE = {"jax", "flax", "optax", "orbax", "numpy", "absl", "torch"}


def _imports(path: Path, nested: bool) -> list[str]:
    """Modules a file imports: at import time (`nested`: in its functions too)."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not child.level:
                mod = child.module
                found.extend(
                    f"{mod}.{a.name}" if _file(f"{mod}.{a.name}") else mod for a in child.names
                )
            elif nested or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _file(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def test_the_session_imports_only_what_the_machine_has_or_the_carry_brings():
    """Every third-party module that the session's files import (in their functions too)
    and the repository's modules they reach import when loaded: a new one must be
    carried (`session.CARRIED` and the recipe in gpu_session.sh's header)."""
    todo = [(REPO / f, True) for f in session.SESSION_FILES + session.TORCH_FILES]
    seen, third = set(), set()
    while todo:
        path, nested = todo.pop()
        for module in _imports(path, nested):
            top = module.split(".")[0]
            if top not in OWN:
                if top not in sys.stdlib_module_names:
                    third.add(top)
                continue
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way load too
                file = _file(".".join(parts[:i]))
                if file and file not in seen:
                    seen.add(file)
                    todo.append((file, False))
    assert {"jax", "ml_collections", "tensorboardX"} <= third
    assert third <= MACHINE | set(session.CARRIED), sorted(third - MACHINE - set(session.CARRIED))


def test_preflight_names_every_missing_module_and_the_files_importing_it(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(
        "import json\nimport rvm_no_such_one\n\ndef f():\n    from rvm_no_such_two import x\n"
    )
    b.write_text("import rvm_no_such_one\nimport torch\n")
    ok, line = session.preflight([a, b, tmp_path / "c.py"], device=False)
    assert not ok
    assert line == (
        f"preflight FAILED, missing: rvm_no_such_one ({a}, {b}); rvm_no_such_two ({a}); "
        f"{tmp_path / 'c.py'} (not there)"
    )  # PyTorch is needed only with the device
    ok, line = session.preflight([REPO / "bench" / "timing.py"], device=False)
    assert ok and line.startswith("preflight ok in ") and "no device check" in line


def test_installed_pins_what_is_installed():
    import pytest

    pins = session.installed()
    assert f"pytest=={pytest.__version__}" in pins
    assert len({p.split("==")[0].lower() for p in pins}) == len(pins)


def test_check_names_the_sections_where_rvm_measured_nothing(tmp_path):
    rvm, torch = {"spec": {"kind": "rvm_train"}}, {"spec": {"kind": "torch_train"}}
    ok = {"ok": True, "step_s": 1.0}
    crashed = {"ok": False, "error": "exit status 1", "log_tail": "ModuleNotFoundError"}
    cut = {"ok": False, "error": "timed out after 41 s", "log_tail": ""}
    late = {"ok": False, "error": "not run: too little time left before --deadline"}
    doc = {
        "results": {
            "stochastic_depth": {"rvm off": {**rvm, **ok}, "torch off": {**torch, **crashed}},
            "loop": {"rvm loop": {**rvm, **crashed}, "torch": {**torch, **ok}},
            "ceiling": {"torch": {**torch, **ok}, "jax": {"spec": {"library": "jax"}, **crashed}},
            "eval": {"rvm evaluate": {**rvm, **cut}, "torch": {**torch, **crashed}},
            "train": {"rvm": {**rvm, **late}},  # the deadline's: not what the session is for
        }
    }
    need = ["stochastic_depth", "loop", "xla_gpu"]
    assert session.unmeasured(doc, need) == ["loop", "xla_gpu", "ceiling"]
    assert session.unmeasured(None, ["packed"]) == ["packed"]
    assert session.summary(doc)[-1] == "train: 0 of 1 measured, 1 not run before the deadline"
    result = tmp_path / "gpu.json"
    result.write_text(json.dumps({"results": {"loop": {"rvm loop": {**rvm, **ok}}}}))
    assert session.main(["check", str(result), "--sections", "loop"]) == 0
    assert session.main(["check", str(result), "--sections", "loop", "--run", str(tmp_path)]) == 1
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert session.main(["check", str(result), "--sections", "loop", "--run", str(tmp_path)]) == 0
