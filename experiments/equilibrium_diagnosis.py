r"""Why a thinking net trained to equilibrium learns or falls short: the readings of
`rvm.analysis.equilibrium` for runs' newest checkpoints.

  python -m experiments.equilibrium_diagnosis --runs=DIR1,DIR2 --out=FILE.json
  python -m experiments.equilibrium_diagnosis --runs=DIR --budgets=90,270,540 --out=FILE.json

Each DIR is a run directory (or a copy of its config.json and a checkpoint) of a thinking
config with `train.scheme="equilibrium"`. Without `--budgets`, prefix-sum runs and their
fresh initial nets are read at h* (`diagnose`); with it, any such run's validation exact
match at each cap on the solver's iterations (`solver_budgets`). FILE.json gets the
readings and FILE.md a table of them.
"""

import json
from pathlib import Path

from absl import app, flags

from experiments import launcher
from rvm.analysis.equilibrium import budgets_markdown, diagnose, markdown, solver_budgets

flags.DEFINE_list("runs", None, "Run directories, comma-separated.")
flags.DEFINE_string("out", None, "The JSON file written (and a .md beside it).")
flags.DEFINE_integer("num", 128, "Validation strings of the trained length read.")
flags.DEFINE_integer("unrolled", 200, "Plain iterations of the unrolled gradient compared.")
flags.DEFINE_list("budgets", None, "Caps on the solver's forward iterations, comma-separated.")
flags.DEFINE_string("command", "", "The command that made this, for the table's heading.")
flags.mark_flags_as_required(["runs", "out"])
FLAGS = flags.FLAGS


def _cap(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise app.UsageError(f"--budgets: {text!r} is not a positive whole number")
    return int(text)


def main(argv):
    del argv
    launcher.start()
    caps = [_cap(b) for b in FLAGS.budgets or ()]
    with launcher.user_errors():
        if caps:
            rows = [solver_budgets(run, caps) for run in FLAGS.runs]
            table = budgets_markdown(rows, FLAGS.command)
        else:
            rows = [diagnose(run, FLAGS.num, FLAGS.unrolled) for run in FLAGS.runs]
            table = markdown(rows, FLAGS.command)
        out = Path(FLAGS.out)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
        print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    app.run(main)
