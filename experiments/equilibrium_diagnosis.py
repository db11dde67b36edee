r"""Why a prefix-sum net trained to equilibrium learns or stays at chance: the readings of
`rvm.analysis.equilibrium` for runs' newest checkpoints and their fresh initial nets.

  python -m experiments.equilibrium_diagnosis --runs=DIR1,DIR2 --out=FILE.json

Each DIR is a run directory (or a copy of its config.json and a checkpoint) of a
prefix-sum config with `train.scheme="equilibrium"`; FILE.json gets the readings and
FILE.md a table of them.
"""

import json
from pathlib import Path

from absl import app, flags

from experiments import launcher
from rvm.analysis.equilibrium import diagnose, markdown

flags.DEFINE_list("runs", None, "Run directories, comma-separated.")
flags.DEFINE_string("out", None, "The JSON file written (and a .md beside it).")
flags.DEFINE_integer("num", 128, "Validation strings of the trained length read.")
flags.DEFINE_integer("unrolled", 200, "Plain iterations of the unrolled gradient compared.")
flags.DEFINE_string("command", "", "The command that made this, for the table's heading.")
flags.mark_flags_as_required(["runs", "out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    launcher.start()
    with launcher.user_errors():
        rows = [diagnose(run, FLAGS.num, FLAGS.unrolled) for run in FLAGS.runs]
        out = Path(FLAGS.out)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(rows, FLAGS.command))
        print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    app.run(main)
