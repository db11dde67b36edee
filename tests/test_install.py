"""pyproject.toml declares the versions rvm works with as ranges (installing rvm keeps a
host's own jax); constraints.txt pins the ones CI tests, inside those ranges."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    """constraints.txt: name -> its one exact version."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not one version"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_dependencies_are_ranges_and_constraints_pin_a_version_inside_each():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [Requirement(d) for d in project["dependencies"]]
    deps += [Requirement(d) for d in project["optional-dependencies"]["test"]]
    pins = _pins()
    for dep in deps:
        ops = {spec.operator for spec in dep.specifier}
        assert "==" not in ops and "===" not in ops, f"{dep}: a range, not one version"
        name = canonicalize_name(dep.name)
        assert name in pins, f"constraints.txt pins no version of {dep.name}"
        assert dep.specifier.contains(pins[name]), f"{dep.name}=={pins[name]} is outside {dep}"
    jax = next(d for d in deps if d.name == "jax")
    assert not jax.specifier.contains("0.10.1") and jax.specifier.contains("0.11.2")


def test_the_install_commands_use_the_constraints():
    readme = (REPO / "README.md").read_text()
    assert "pip install -c constraints.txt -e . && python -m experiments.train" in readme
    assert 'pip install -c constraints.txt -e ".[test]" && python -m pytest' in readme
    assert "-c constraints.txt" in (REPO / ".ci" / "run").read_text()
