r"""The thinking-longer report of finished runs: `summary.md` and the accuracy figure.

  python -m experiments.think_eval --runs=DIR1,DIR2 --out=DIR [--machine=...] [--command=...]

Each DIR is a run directory of a `task="thinking"` config (or a copy of its config.json,
metrics.jsonl and results.json); nothing is retrained. With `--evaluate` the curves are
computed again from each DIR's newest checkpoint instead of read from results.json, and
`--sizes=prefix_sums:32,64,128,256,512` evaluates the prefix-sum runs on other test sizes
than their own.
"""

from absl import app, flags

from experiments import launcher
from rvm.analysis.thinking import evaluate_run, read_run, write_report
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
flags.mark_flags_as_required(["runs", "out"])
FLAGS = flags.FLAGS


def parse_sizes(specs: list[str]) -> dict[str, list[int]]:
    """`["prefix_sums:32,64"]` -> {"prefix_sums": [32, 64]}, or a UsageError naming the spec."""
    sizes = {}
    for spec in specs:
        kind, _, numbers = spec.partition(":")
        parts = numbers.split(",")
        if kind not in KINDS or not all(p.isdigit() for p in parts):
            raise app.UsageError(
                f"--sizes={spec}: expected KIND:S1,S2,... with KIND one of {', '.join(KINDS)} "
                "and whole numbers"
            )
        sizes[kind] = [int(p) for p in parts]
    return sizes


def main(argv):
    del argv
    launcher.start()
    if FLAGS.sizes and not FLAGS.evaluate:
        raise app.UsageError("--sizes needs --evaluate: the curves of other sizes are computed")
    sizes = parse_sizes(FLAGS.sizes)
    with launcher.user_errors():
        if FLAGS.evaluate:
            runs = [evaluate_run(r, sizes) for r in FLAGS.runs]
        else:
            runs = [read_run(r) for r in FLAGS.runs]
        path = write_report(runs, FLAGS.out, FLAGS.machine, FLAGS.command)
    print(path)


if __name__ == "__main__":
    app.run(main)
