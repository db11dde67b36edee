r"""The thinking-longer report of finished runs: `summary.md` and the accuracy figure.

  python -m experiments.think_eval --runs=DIR1,DIR2 --out=DIR [--machine=...] [--command=...]

Each DIR is a run directory of a `task="thinking"` config (or a copy of its config.json,
metrics.jsonl and results.json); nothing is retrained. With `--evaluate` the curves are
computed again from each DIR's newest checkpoint instead of read from results.json.
"""

from absl import app, flags

from rvm.analysis.thinking import evaluate_run, read_run, write_report

flags.DEFINE_list("runs", None, "Run directories, comma-separated.")
flags.DEFINE_string("out", None, "Where summary.md and thinking_longer.png go.")
flags.DEFINE_string("machine", "the machine at hand", "The machine the runs trained on.")
flags.DEFINE_string("command", "", "The command that made the runs.")
flags.DEFINE_bool("evaluate", False, "Evaluate each run's newest checkpoint again.")
flags.mark_flags_as_required(["runs", "out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runs = [(evaluate_run if FLAGS.evaluate else read_run)(r) for r in FLAGS.runs]
    path = write_report(runs, FLAGS.out, FLAGS.machine, FLAGS.command)
    print(path)


if __name__ == "__main__":
    app.run(main)
