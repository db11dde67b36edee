"""The teaching notebooks in colabs/: committed without outputs, and each runs top to bottom.

Every notebook is executed with nbclient in a fresh ipykernel of this very interpreter
(a kernelspec written to a temporary directory put on `JUPYTER_PATH`, so neither an
installed `python3` kernelspec nor its absence matters), in a temporary working
directory, with `SMOKE = True`. nbclient starts the kernel itself, so it also shuts it
down: a kernel left running would hold its memory until the suite ends. The kernels see
one CPU device: the suite's 8 simulated devices would only slow the tiny runs down.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from helpers import child_env
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
EXPECTED = {
    "01_quickstart",
    "02_relaxed_sharing",
    "03_readout_time",
    "04_visual_sequences",
    "05_thinking_longer",
    "06_video_objects",
    "07_where_to_look",
    "08_equilibrium",
}
KERNEL = "rvm-test-python"
CELL_TIMEOUT_S = 600  # per cell; a whole smoke notebook takes well under a minute on an idle CPU
SMOKE_LINE = re.compile(r"^SMOKE = (True|False)\b", re.MULTILINE)


def _ids(paths):
    return [p.stem for p in paths]


def test_every_notebook_is_there():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}, f"colabs/ holds {_ids(NOTEBOOKS)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts"
    assert nb.cells[0].cell_type == "markdown", f"{path.name} must open with its story"
    smoke = [c for c in nb.cells if c.cell_type == "code" and SMOKE_LINE.search(c.source)]
    assert len(smoke) == 1, f"{path.name} needs exactly one `SMOKE = ...` switch"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A data directory whose kernelspec starts ipykernel on the interpreter running the tests."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL / "kernel.json"
    spec.parent.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return str(root)


def _kernel_env() -> dict:
    env = child_env()
    env["JAX_PLATFORMS"] = "cpu"
    # The notebooks import this checkout, whether or not it is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_runs_top_to_bottom_in_smoke_mode(path, jupyter_path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    switched = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source, n = SMOKE_LINE.subn("SMOKE = True", cell.source)
            switched += n
    assert switched == 1, f"{path.name} needs exactly one `SMOKE = ...` switch"

    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    start = time.time()
    client.execute(env=_kernel_env())  # raises CellExecutionError, with the cell, on failure
    print(f"{path.name}: {time.time() - start:.1f} s")
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in ran), f"{path.name}: some cells did not run"
    assert not [o for c in ran for o in c.outputs if o.output_type == "error"]


def _install_cell(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


def test_install_cells_are_one_and_say_in_one_line_when_they_cannot_install(tmp_path):
    cells = {_install_cell(p) for p in NOTEBOOKS}
    assert len(cells) == 1, "the notebooks' install cells differ"
    cell = cells.pop()
    assert "# @param" in cell and "YOUR_ORG" not in cell

    def run(source: str) -> subprocess.CompletedProcess:
        # As on a fresh runtime: `import rvm` fails; pip may not reach any index.
        code = re.sub(r'^RVM_SOURCE = ".*?"', f"RVM_SOURCE = {source!r}", cell, flags=re.M)
        env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        script = "import sys\nsys.modules['rvm'] = None\n" + code
        return subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )

    nothing = run(str(tmp_path / "rvm-*"))
    assert nothing.stdout.splitlines() == [
        f"rvm is not installed and nothing matches RVM_SOURCE={str(tmp_path / 'rvm-*')!r}: build "
        "a wheel (python -m build in a checkout of rvm), upload dist/rvm-*.whl to /content, rerun."
    ]
    (tmp_path / "rvm-0.1.0.tar.gz").write_bytes(b"not an sdist")
    (tmp_path / "rvm-0.1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    broken = run(str(tmp_path / "rvm-*"))
    wheel = str(tmp_path / "rvm-0.1.0-py3-none-any.whl")
    [line] = broken.stdout.splitlines()
    assert line.startswith(
        f"could not install rvm from {wheel!r} (pip's message above): fix RVM_SOURCE, or this "
        "runtime's jax=="
    ) and line.endswith(" is outside the versions rvm works with.")
