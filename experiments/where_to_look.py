r"""The where-to-look report of finished runs: `summary.md`, the glimpse and IoU figures.

  python -m experiments.where_to_look --runs=DIR1,DIR2 --out=DIR [--machine=...] [--command=...]
      [--evaluate]

Each DIR is a run directory of a `task="glimpses"` or `task="tracker"` config (or a copy
of its config.json and results.json); nothing is retrained. --evaluate: each tracker run
with a checkpoint and no intervals yet (runs recorded before they were measured) is
evaluated again from it first (`rvm.analysis.where_to_look.evaluate_tracker`: the same
scores, with intervals, in evaluated.json).
"""

import json
from pathlib import Path

from absl import app, flags

from experiments import launcher
from rvm.analysis.where_to_look import evaluate_tracker, write_summary

flags.DEFINE_list("runs", None, "Run directories, comma-separated.")
flags.DEFINE_string("out", None, "Where summary.md and the figures go.")
flags.DEFINE_string("machine", "the machine at hand", "The machine the runs trained on.")
flags.DEFINE_string("command", "", "The command that made the runs.")
flags.DEFINE_bool("evaluate", False, "Evaluate tracker runs' checkpoints again first.")
flags.mark_flags_as_required(["runs", "out"])
FLAGS = flags.FLAGS


def _lacks_intervals(run: Path) -> bool:
    """A tracker run with a checkpoint whose scores have no intervals yet."""
    if json.loads((run / "config.json").read_text())["task"] != "tracker":
        return False
    results = json.loads((run / "results.json").read_text())
    measured = "intervals" in results["test"] or (run / "evaluated.json").is_file()
    return (run / "checkpoints").is_dir() and not measured


def main(argv):
    del argv
    with launcher.user_errors():
        for run in map(Path, FLAGS.runs if FLAGS.evaluate else []):
            if _lacks_intervals(run):
                print(f"{run}: evaluated again, step {evaluate_tracker(run)['step']}")
        print(write_summary(FLAGS.runs, FLAGS.out, FLAGS.machine, FLAGS.command))


if __name__ == "__main__":
    app.run(main)
