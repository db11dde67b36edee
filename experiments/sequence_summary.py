r"""Writes the moving-digits summary (tables and figures) from run directories: no training.

  python -m experiments.sequence_summary --out results/moving_digits_cpu \
      --depth DIR,DIR,... --dropout DIR,DIR,... --schemes DIR,DIR,... --prediction DIR

Each group is a comma-separated list of run directories written by
`python -m experiments.train` with `experiments/configs/moving_digits.py`:
`--depth` motion runs of several stacks and depths, `--dropout` runs differing in
`model.td_rate`, `--schemes` runs differing in `train.scheme`, `--prediction` one
frame-prediction run. What is read and recomputed: `rvm.analysis.sequences`.
"""

from absl import app, flags

from rvm.analysis import sequences

flags.DEFINE_list("depth", [], "Motion runs of several stacks and depths.")
flags.DEFINE_list("dropout", [], "Motion runs differing in model.td_rate.")
flags.DEFINE_list("schemes", [], "Motion runs differing in train.scheme.")
flags.DEFINE_string("prediction", None, "A frame-prediction run.")
flags.DEFINE_list("sgd", [], "The depth runs trained with SGD (the optimiser check).")
flags.DEFINE_string("machine", "this machine", "The hardware, in words, for the summary.")
flags.DEFINE_string("command", None, "The command that made the runs, for the summary.")
flags.DEFINE_string("out", None, "Folder for summary.md and the figures.")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    groups = {name: getattr(FLAGS, name) for name in sequences.GROUPS}
    path = sequences.write_summary(
        FLAGS.out, groups, FLAGS.prediction, FLAGS.machine, FLAGS.command
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
