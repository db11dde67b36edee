r"""Error against readout time, 1x to 2x the trained depth, BatchNorm recalibrated for
each readout time, for several runs side by side (`rvm.analysis.thinking_longer`):

  python -m experiments.thinking_longer --runs results/cifar10_cpu/all3_raw \
      results/cifar10_cpu/all3_raw_randiter --out results/cifar10_cpu/thinking_longer

writes `--out`.md (the answer: does error fall, hold or rise past the trained depth),
.png and .json. Each run is read at its newest checkpoint; all runs must read the same
images (`data` section of their configs); a pack's workdir stands for its seeds' runs.
"""

import shlex
import sys
from pathlib import Path

from absl import app, flags

from experiments import launcher
from rvm.analysis import thinking_longer
from rvm.analysis.records import runs_in
from rvm.analysis.runs import load_run, read_run_info
from rvm.data import load_images
from rvm.train import console

flags.DEFINE_multi_string("runs", None, "Run or pack directories (repeat the flag or list them).")
flags.DEFINE_string("out", None, "Path stem of the .md, .png and .json written.")
flags.DEFINE_list("levels", ["0", "1", "2"], "Levels (0-based) to read out longer, if shared.")
flags.DEFINE_integer("max_factor", 2, "Readout times 1..max_factor*N.")
flags.mark_flags_as_required(["runs", "out"])
FLAGS = flags.FLAGS


def main(argv):
    launcher.start()
    command = "python -m experiments.thinking_longer " + shlex.join(sys.argv[1:])
    with launcher.user_errors():
        workdirs = [run for d in [*FLAGS.runs, *argv[1:]] for run in runs_in(d)]
        data = load_images(read_run_info(workdirs[0]).config.data)  # once, for every run
        runs = [load_run(workdir, data=data) for workdir in workdirs]
        levels = [int(lvl) for lvl in FLAGS.levels]
        results = []
        for run in runs:
            console.status(f"{run.info.name}: readout time, recalibrated")
            curves = thinking_longer.curves(run, levels, FLAGS.max_factor)
            results.append((thinking_longer.label(run), curves))
        notes = thinking_longer.caveats(runs)
        written = thinking_longer.write(results, Path(FLAGS.out), command, notes)
    console.clear_status()
    print(f"wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    app.run(main)
