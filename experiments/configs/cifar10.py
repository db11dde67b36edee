r"""CIFAR-10 runs of "Towards Efficient Recurrent Visual Models" (Tables 1-3).

Command (one run of the paper; any variant below after the colon):

  python -m experiments.train \
      --config=experiments/configs/cifar10.py:middle18_relaxed --workdir=workdirs/middle18_relaxed

Variants are `{scope}{depth}_{sharing}`: scope `middle` or `all`, depth 18
(blocks_per_level (18,18,18), ResNet-110) or 3 ((3,4,4), ResNet-24), sharing
`nonshared`, `raw`, `relaxed` or `minimal`; a `_randiter` suffix (raw and relaxed)
trains with random iteration counts per mini-batch (`model.random_iterations`); plus
`smoke`, a tiny model on synthetic data that trains in under a minute on a laptop CPU.

Hardware and time: the paper's runs are 500 epochs at batch 128. On a 2-core CPU
VM, (3,4,4) trained at a median 418-451 images/s non-shared, 375-480 relaxed, 477-482
raw and 867-996 minimal (evaluation included), 8-22 minutes for 10 epochs
(results/cifar10_cpu/run.sh, two seeds; 23.3-26.9% test error after 10 epochs, relaxed
runs consolidated with re-estimated BatchNorm statistics);
(18,18,18) needs a GPU. GPU wall time has not been measured
with this code yet; `python bench/run.py` (`--platform gpu` on a GPU) measures
throughput on the machine at hand and projects the wall time of a 500-epoch
(18,18,18) run from it (69 h on that CPU VM, bench/results/cpu.md).

Expected test error (%) from the paper (single runs, horizontal flips only;
rvm/analysis/paper.py holds them for the report):
  Table 1, middle level, (18,18,18): nonshared 6.67, relaxed 6.67, raw 7.78, minimal 7.23
  Table 2, all levels,   (18,18,18): nonshared 6.67, relaxed 10.63, raw 12.04, minimal 11.18
  Table 3, all levels,   (3,4,4):    nonshared 8.26, relaxed 10.06, raw 10.29, minimal 11.25
"""

from __future__ import annotations

import re

import ml_collections

from rvm.analysis.paper import DEPTHS, PAPER

SHARINGS = ("nonshared", "raw", "relaxed", "minimal")


def variants() -> list[str]:
    """Every named run of Tables 1-3, their random-iteration-count twins, and `smoke`."""
    names = [f"{scope}{depth}_{s}" for (scope, depth) in PAPER.test_error for s in SHARINGS]
    randiter = [f"{n}_randiter" for n in names if n.endswith(("_raw", "_relaxed"))]
    return [*names, *randiter, "smoke"]


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Several seeds trained together in one process, WORKDIR/seed_<s>/ each (rvm.train.pack):
    # --config.seeds="(0,1,2)". None: the one run of `seed`, in WORKDIR itself.
    config.seeds = ml_collections.config_dict.placeholder(tuple)
    config.pack_strategy = "auto"  # how a pack's runs share a step: auto, vmap, map, loop
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 500
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    config.log_every_steps = 50
    config.skip_nonfinite = False  # True: skip (and count) steps with a non-finite loss
    # Keys of the step and of the data order, each from its own tag (rvm.train.step);
    # runs recorded before the field used "shared" (rvm.train.config_check.ADDED_FIELDS).
    config.rng_streams = "tagged"

    config.data = ml_collections.ConfigDict()
    config.data.source = "auto"  # tfds, binary (official archive layout), synthetic, auto
    config.data.binary_dir = "data/cifar10"
    config.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
    config.data.holdout = 0  # Huang et al. hold out 5000 training images for validation
    config.data.holdout_seed = 0
    config.data.flip = True  # the paper's only augmentation
    config.data.crop = False  # Huang et al.'s pad-4 random crop
    config.data.normalization = "feature"  # "per feature normalization"; or "channel"
    config.data.synthetic_train = 2048
    config.data.synthetic_test = 512
    config.data.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.blocks_per_level = (18, 18, 18)
    config.model.widths = (16, 32, 64)  # filters per level (the paper's)
    config.model.sharing = "nonshared"
    config.model.scope = "middle"
    config.model.stochastic_depth = True
    config.model.final_death_rate = 0.5
    config.model.dtype = "float32"
    config.model.unroll = False  # True inlines every block instead of nn.scan (benchmarks)
    config.model.sd_impl = "auto"  # how stochastic depth runs: rvm.models.stochastic_depth.SD_IMPLS
    # How convolutions compute (rvm.models.conv.CONV_IMPLS): "gemm" or "kernel_gemm" for packs
    # vmapped on a GPU (matrix products where vmap would make grouped convolutions).
    config.model.conv_impl = "xla"
    # Random iteration counts: each mini-batch runs the first r blocks of every level in
    # scope (raw or relaxed), r = Poisson(lambda)+1 clipped to the level's depth, lambda
    # log-normal (`rvm.models.stochastic_depth.draw_iterations`); evaluation runs them all.
    config.model.random_iterations = False
    config.model.iterations_mean = 2.0
    config.model.iterations_sigma = 0.5

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 0.1
    config.optim.lr_boundaries = (0.5, 0.75)  # epochs 250 and 375 of 500
    config.optim.lr_decay = 0.1
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 1e-4
    config.optim.pull_start = 1e-4  # relaxation pull, exponential in the step
    config.optim.pull_end = 1e-1

    if variant is None:
        return config
    if variant == "smoke":
        config.data.source = "synthetic"
        config.data.synthetic_train = 1024
        config.data.synthetic_test = 256
        config.batch_size = 64
        config.eval_batch_size = 256
        config.num_epochs = 3
        config.model.blocks_per_level = (2, 2, 2)
        config.model.sharing = "relaxed"
        config.model.scope = "all"
        config.log_every_steps = 8
        # Three epochs are too short for the paper's pull (kernels end ~45 degrees from
        # their set means, and consolidation loses ~45 points); a steeper pull brings them
        # within a few degrees, so consolidation costs about nothing.
        config.optim.pull_start = 1e-3
        config.optim.pull_end = 30.0
        return config
    match = re.fullmatch(r"(middle|all)(18|3)_([a-z]+)(_randiter)?", variant)
    if not match or variant not in variants():
        raise ValueError(
            f"unknown cifar10 config variant {variant!r}; known: {', '.join(variants())}"
        )
    scope, depth, mode, randiter = match.groups()
    config.model.blocks_per_level = DEPTHS[depth]
    config.model.scope = scope
    config.model.sharing = mode
    config.model.random_iterations = bool(randiter)
    # Counts centred on the middle of [1, n] for the middle level's n scanned blocks.
    config.model.iterations_mean = DEPTHS[depth][1] / 2
    return config
