r"""The thinking-longer report of finished runs: `summary.md` and the accuracy figure.

  python -m experiments.think_eval --runs=DIR1,DIR2 --out=DIR [--machine=...] [--command=...]

Each DIR is a run directory of a `task="thinking"` config (or a copy of its config.json,
metrics.jsonl and results.json); nothing is retrained. With `--evaluate` the curves are
computed again from each DIR's newest checkpoint instead of read from results.json, and
`--sizes=prefix_sums:32,64,128,256,512` evaluates the prefix-sum runs on other test sizes
than their own, `--num_val=mazes:200 --num_test=mazes:1000 --eval_stream=1` on other
validation and test splits. Each run evaluated is written to OUT/curves.json at once; a
run already there with the same settings is not evaluated again.
"""

from pathlib import Path

from absl import app, flags

from experiments import launcher
from rvm.analysis.thinking import evaluate_run, read_curves, read_run, write_curves, write_report
from rvm.tasks.thinking.task import KINDS

flags.DEFINE_list("runs", None, "Run directories, comma-separated.")
flags.DEFINE_string("out", None, "Where summary.md and thinking_longer.png go.")
flags.DEFINE_string("machine", "the machine at hand", "The machine the runs trained on.")
flags.DEFINE_string("command", "", "The command that made the runs.")
flags.DEFINE_bool("evaluate", False, "Evaluate each run's newest checkpoint again.")
flags.DEFINE_multi_string(
    "sizes",
    [],
    "With --evaluate, KIND:S1,S2,...: the test sizes of runs of data.kind KIND (bits, cells "
    "per side) instead of their own, e.g. --sizes=prefix_sums:32,64,128,256,512.",
)
flags.DEFINE_multi_string("num_val", [], "With --evaluate, KIND:N validation examples per size.")
flags.DEFINE_multi_string("num_test", [], "With --evaluate, KIND:N test examples per size.")
flags.DEFINE_integer(
    "eval_stream",
    None,
    "With --evaluate, the validation and test splits' stream (data.eval_stream).",
)
flags.mark_flags_as_required(["runs", "out"])
FLAGS = flags.FLAGS


def parse_sizes(
    specs: list[str], flag: str = "sizes", names: tuple[str, ...] = ()
) -> dict[str, list[int]]:
    """`["prefix_sums:32,64"]` -> {"prefix_sums": [32, 64]}, or a UsageError naming the spec.
    A key is a data.kind or one of the run `names` (a run's folder name), which wins."""
    sizes = {}
    for spec in specs:
        kind, _, numbers = spec.partition(":")
        parts = numbers.split(",")
        if kind not in (*KINDS, *names) or not all(p.isdigit() for p in parts):
            raise app.UsageError(
                f"--{flag}={spec}: expected KEY:N1,N2,... with KEY one of "
                f"{', '.join((*KINDS, *names))} and whole numbers"
            )
        sizes[kind] = [int(p) for p in parts]
    return sizes


def main(argv):
    del argv
    launcher.start()
    overrides = FLAGS.sizes or FLAGS.num_val or FLAGS.num_test or FLAGS.eval_stream is not None
    if overrides and not FLAGS.evaluate:
        raise app.UsageError("--sizes, --num_val, --num_test and --eval_stream need --evaluate")
    names = tuple(Path(r).name for r in FLAGS.runs)
    sizes = parse_sizes(FLAGS.sizes, "sizes", names)
    counts = {f: parse_sizes(getattr(FLAGS, f), f, names) for f in ("num_val", "num_test")}
    with launcher.user_errors():
        if FLAGS.evaluate:
            curves = Path(FLAGS.out) / "curves.json"
            done, runs = read_curves(curves), []
            for path in FLAGS.runs:
                name, kind = Path(path).name, read_run(path)["config"]["data"]["kind"]
                pick = lambda by, name=name, kind=kind: by.get(name, by.get(kind))
                splits = {f: pick(c)[0] for f, c in counts.items() if pick(c)}
                if FLAGS.eval_stream is not None:
                    splits["eval_stream"] = FLAGS.eval_stream
                own = {kind: pick(sizes)} if pick(sizes) else None
                runs.append(evaluate_run(path, own, splits, done.get(name)))
                write_curves(runs, curves, done)  # kept if a later run's evaluation is stopped
        else:
            runs = [read_run(r) for r in FLAGS.runs]
        path = write_report(runs, FLAGS.out, FLAGS.machine, FLAGS.command)
    print(path)


if __name__ == "__main__":
    app.run(main)
