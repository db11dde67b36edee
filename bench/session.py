"""What `bench/gpu_session.sh` checks around its device time, run from the repository root:

    python3 bench/session.py missing                  # carried wheels whose modules are absent
    python3 bench/session.py installed                # name==version of every installed package
    python3 bench/session.py preflight [--data] [--device]
    python3 bench/session.py check RESULT.json --sections A,B [--run OUT]

`missing` names the distributions of `.carry/wheels` that the session needs and this
Python lacks (the session installs those alone); `installed` pins everything already
installed, as pip constraints, so that installing them can add packages but never
replace one (the machine's CUDA jax above all). `preflight` runs every import statement
of the files the session runs (`SESSION_FILES`: the benchmark's parent and children,
the launcher of the training run, with `--data` CIFAR-10's `build.py`), and with
`--device` checks that jax sees a GPU and PyTorch has CUDA; it prints one line and
exits 1 when anything is missing. `check` reads a benchmark's JSON and exits 1, naming
them, when rvm measured nothing in a section the session exists for (`--sections`), or
every rvm measurement that ran in another section failed; with `--run` it also wants
the training run's `metrics.jsonl` there.
This module itself imports only the standard library.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Module -> the distribution `.carry/wheels` brings for it: what rvm's session imports and
# a lent GPU machine (jax with CUDA, flax, optax, orbax-checkpoint, PyTorch) lacks. Their
# own dependencies (absl-py, PyYAML, protobuf, packaging, numpy) travel beside them and
# are installed only where missing.
CARRIED = {"ml_collections": "ml_collections", "tensorboardX": "tensorboardX", "PIL": "pillow"}
# The files whose imports the session runs (function-level imports included: the
# benchmark's children import JAX and rvm inside their measurements).
SESSION_FILES = (
    "bench/run.py",
    "bench/measure.py",
    "bench/measure_rvm.py",
    "bench/timing.py",
    "bench/hlo.py",
    "experiments/train.py",
)
TORCH_FILES = ("bench/measure_torch.py", "bench/torch_resnet.py")
DATA_FILES = (".carry/build.py",)


def import_statements(path: Path) -> list[str]:
    """Every import statement of a file, at any depth, as source (`__future__` left out)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) or (
            isinstance(node, ast.ImportFrom) and node.module != "__future__" and not node.level
        ):
            line = ast.unparse(node)
            if line not in out:
                out.append(line)
    return out


def session_files(data: bool, device: bool) -> list[Path]:
    names = SESSION_FILES + (TORCH_FILES if device else ()) + (DATA_FILES if data else ())
    return [REPO / name for name in names]


def missing_carried() -> list[str]:
    """Distributions of `CARRIED` whose module this Python cannot find."""
    return [dist for module, dist in CARRIED.items() if importlib.util.find_spec(module) is None]


def installed() -> list[str]:
    """`name==version` of every installed distribution whose version pip can parse (the
    first of a name on the path, the one Python imports)."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pip brings its own copy
        from pip._vendor.packaging.version import InvalidVersion, Version
    seen: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        key = re.sub(r"[-_.]+", "-", name or "").lower()
        if not name or key in seen:
            continue
        try:
            Version(dist.version)
        except (InvalidVersion, TypeError):
            continue
        seen[key] = f"{name}=={dist.version}"
    return sorted(seen.values(), key=str.lower)


def _failure(statement: str, error: BaseException) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name:
        return error.name
    return f"{statement!r}: {type(error).__name__}: {error}"


def preflight(files: list[Path], device: bool) -> tuple[bool, str]:
    """Runs the files' imports (and with `device` looks for the GPU); (ok, one line)."""
    start = time.perf_counter()
    sys.path.insert(0, str(REPO))
    problems: dict[str, list[str]] = {}  # what is missing -> the files that import it
    for path in files:
        where = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
        if not path.exists():
            problems.setdefault(f"{where} (not there)", [])
            continue
        for statement in import_statements(path):
            if not device and statement.split()[1].split(".")[0] == "torch":
                continue  # PyTorch's measurements run on the GPU alone
            try:
                exec(statement, {})
            except Exception as e:  # every failure is reported, none raised
                problems.setdefault(_failure(statement, e), []).append(where)
    if not problems and device:
        import jax
        import torch

        if not jax.devices()[0].platform == "gpu":
            problems[f"a GPU for jax {jax.__version__} (it sees {jax.devices()})"] = []
        if not torch.cuda.is_available():
            problems[f"CUDA for torch {torch.__version__}"] = []
    if problems:
        what = "; ".join(
            f"{name} ({', '.join(dict.fromkeys(files))})" if files else name
            for name, files in problems.items()
        )
        return False, f"preflight FAILED, missing: {what}"
    versions = [f"python {platform.python_version()}"]
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", *CARRIED.values()):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    if device:
        import jax
        import torch

        versions += [f"torch {torch.__version__}", f"devices {jax.devices()}"]
    else:
        versions.append(f"no device check (JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')})")
    took = time.perf_counter() - start
    return True, f"preflight ok in {took:.1f} s: {', '.join(versions)}"


def _ours(section: dict) -> list[dict]:
    """A section's measurements of rvm (JAX's matmul in `ceiling`), or all of them where it
    has none: PyTorch's alone do not make a section measured."""
    ours = [
        r
        for r in section.values()
        if r.get("spec", {}).get("kind", "").startswith(("rvm", "jax"))
        or r.get("spec", {}).get("library") == "jax"
    ]
    return ours or list(section.values())


def unmeasured(doc: dict | None, sections: list[str]) -> list[str]:
    """The sections of `sections` where rvm measured nothing, and any other section of the
    benchmark's result where rvm's measurements that ran all failed (exited with an error;
    not those left out or cut short by the deadline)."""
    results = (doc or {}).get("results", {})
    ok = lambda section: any(r.get("ok") for r in _ours(section))
    out = [name for name in sections if not ok(results.get(name, {}))]
    for name, section in results.items():
        crashed = [r for r in _ours(section) if r.get("error", "").startswith("exit status")]
        if name not in out and crashed and not ok(section):
            out.append(name)
    return out


def summary(doc: dict | None) -> list[str]:
    """One line per section of the result: how many of its measurements measured."""
    lines = []
    for name, section in (doc or {}).get("results", {}).items():
        ok = sum(bool(r.get("ok")) for r in section.values())
        late = sum("--deadline" in r.get("error", "") for r in section.values())
        lines.append(
            f"{name}: {ok} of {len(section)} measured"
            + (f", {late} not run before the deadline" if late else "")
        )
    return lines


def run_measured(out: Path) -> bool:
    """Whether the training run wrote at least one epoch's record into `out`."""
    path = out / "metrics.jsonl"
    return path.exists() and any(line.strip() for line in path.read_text().splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("missing")
    sub.add_parser("installed")
    pre = sub.add_parser("preflight")
    pre.add_argument("--data", action="store_true", help="also CIFAR-10's build.py")
    pre.add_argument("--device", action="store_true", help="jax on a GPU, PyTorch with CUDA")
    check = sub.add_parser("check")
    check.add_argument("result", type=Path)
    check.add_argument("--sections", default="", help="comma-separated")
    check.add_argument("--run", type=Path, help="where the training run's records went")
    args = parser.parse_args(argv)

    if args.command == "missing":
        print(" ".join(missing_carried()))
        return 0
    if args.command == "installed":
        print("\n".join(installed()))
        return 0
    if args.command == "preflight":
        ok, line = preflight(session_files(args.data, args.device), args.device)
        print(line)
        return 0 if ok else 1
    try:
        doc = json.loads(args.result.read_text())
    except (OSError, ValueError):
        doc = None
        print(f"{args.result}: no benchmark result")
    for line in summary(doc):
        print(line)
    failed = unmeasured(doc, [s for s in args.sections.split(",") if s])
    if args.run is not None and not run_measured(args.run):
        failed.append("the training run")
    if failed:
        print(f"measured nothing: {', '.join(failed)}")
        return 1
    print("every section measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
