r"""Writes the paper's tables and figures from run directories: no training, no flags for
the model (everything is read from each run's config.json, metrics and checkpoints).

  python -m experiments.report --runs workdirs/middle18_nonshared workdirs/middle18_relaxed \
      --out reports/middle18

Extra positional arguments are taken as more run directories, so a shell glob after
`--runs` works (`--runs workdirs/*`); a pack's workdir (trained with `config.seeds`)
stands for the runs of all its seeds. `--noanalyses` skips everything that restores a
checkpoint (ablations, readout time, trajectories); `--readout_examples=1000` evaluates
each ablation point on the first 1000 test images only, for a quicker look.
`--binary_dir` (or `--tfds_data_dir`) says where CIFAR-10 is when the runs' own
`data.binary_dir`, relative to where they were trained, does not lead to it from here.

It shows which run it is analysing; the libraries' INFO log only with `--verbosity=1`.
Like `experiments.train`, it first restarts itself with glibc's malloc on huge pages
(`experiments.launcher`; `--nohugepages` keeps the process as started), which
speeds up its evaluations on the CPU.
"""

from pathlib import Path

from absl import app, flags

from experiments import launcher
from rvm.analysis.paper import PAPER
from rvm.analysis.report import Options, write_report
from rvm.train import console

flags.DEFINE_multi_string("runs", None, "Run or pack directories (repeat the flag or list them).")
flags.DEFINE_string("out", None, "Folder for the tables, figures and report.md.")
flags.DEFINE_bool("analyses", True, "Restore checkpoints for Figures 3-5 and readout time.")
flags.DEFINE_integer("level", 1, "Level of the ablations, 0-based (paper: 1, the middle).")
flags.DEFINE_integer("readout_examples", None, "Test images per ablation point (default all).")
flags.DEFINE_integer("max_factor", 2, "Readout times 1..max_factor*N for shared levels.")
flags.DEFINE_integer("trajectory_examples", 100, "Training images per trajectory plot.")
flags.DEFINE_integer("separability_examples", 1000, "Training images for linear separability.")
flags.DEFINE_integer("separability_folds", 5, "Cross-validation folds for separability.")
flags.DEFINE_integer("seed", 0, "Seed choosing the trajectory and separability images.")
flags.DEFINE_string("binary_dir", None, "Read CIFAR-10 here, not from the runs' data.binary_dir.")
flags.DEFINE_string("tfds_data_dir", None, "tfds data dir, instead of the runs' own.")
flags.mark_flags_as_required(["runs", "out"])
FLAGS = flags.FLAGS


def main(argv):
    launcher.start()
    with launcher.user_errors():
        written = report([*FLAGS.runs, *argv[1:]])
    console.clear_status()
    print(f"wrote {len(written)} files to {FLAGS.out}; open {written[-1]}")


def report(runs: list[str]) -> list[Path]:
    """Writes the report of `runs` as the flags ask; returns its files, report.md last."""
    options = Options(
        analyses=FLAGS.analyses,
        level=FLAGS.level,
        readout_examples=FLAGS.readout_examples,
        max_factor=FLAGS.max_factor,
        trajectory_examples=FLAGS.trajectory_examples,
        separability_examples=FLAGS.separability_examples,
        separability_folds=FLAGS.separability_folds,
        seed=FLAGS.seed,
        binary_dir=FLAGS.binary_dir,
        tfds_data_dir=FLAGS.tfds_data_dir,
    )
    return write_report(runs, FLAGS.out, PAPER, options)


if __name__ == "__main__":
    app.run(main)
