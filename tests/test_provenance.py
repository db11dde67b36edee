"""What produced a run: the commit and versions that `starts.jsonl` and benchmark reports
record, and the file's appends surviving a torn line."""

import json
import subprocess
import sys

from rvm.train import metrics, provenance


def test_the_commit_comes_from_git_else_from_the_environment(tmp_path, monkeypatch):
    """From git where the checkout has its history, else from $RVM_COMMIT (a lent GPU
    machine gets the tree without it); "-dirty" when code was changed or added (a new
    module runs too), not for results, the benchmark's reports or ignored files."""
    monkeypatch.setenv("RVM_COMMIT", "0123abcd")
    assert provenance.commit(tmp_path) == "0123abcd"
    monkeypatch.delenv("RVM_COMMIT")
    assert provenance.commit(tmp_path) is None
    git = lambda *a: subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    git("init", "-q")
    for path, text in (("rvm/f", "1"), ("results/f", "1"), (".gitignore", "__pycache__/\n")):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", path)
    git("commit", "-q", "-m", "m")
    head = git("rev-parse", "--short=12", "HEAD")
    monkeypatch.setenv("RVM_COMMIT", "ignored where git knows")
    (tmp_path / "results/f").write_text("2")  # a result written since is not the code
    (tmp_path / "results/new").write_text("")
    (tmp_path / "bench/results").mkdir(parents=True)
    (tmp_path / "bench/results/new").write_text("")
    (tmp_path / "rvm/__pycache__").mkdir()
    (tmp_path / "rvm/__pycache__/f.pyc").write_text("")  # ignored
    assert provenance.commit(tmp_path) == head
    (tmp_path / "rvm/new.py").write_text("")  # a module not yet committed
    assert provenance.commit(tmp_path) == f"{head}-dirty"
    (tmp_path / "rvm/new.py").unlink()
    (tmp_path / "rvm/f").write_text("2")
    assert provenance.commit(tmp_path) == f"{head}-dirty"


def test_versions_name_missing_packages():
    got = provenance.versions(("numpy", "no-such-package-rvm"))
    assert got["python"] == ".".join(map(str, sys.version_info[:3]))
    assert got["numpy"] != "not installed"
    assert got["no-such-package-rvm"] == "not installed"


def test_an_append_drops_a_torn_last_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "starts.jsonl"
    metrics.append_jsonl(path, {"step": 0})
    path.write_text(path.read_text() + '{"step": 4, "ti')  # a kill mid-write
    metrics.append_jsonl(path, {"step": 2})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"step": 0}, {"step": 2}]


def test_the_benchmark_harness_reads_provenance_without_importing_jax():
    """bench/run.py must not load JAX: its children own the device and the threads."""
    code = "import sys; from rvm.train import provenance as p; p.commit(); p.versions()"
    code += "; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
