r"""Equilibrium networks: weight-tied blocks run to their fixed point, trained implicitly.

Command (CIFAR-10, every level of the (3,4,4) ResNet one block solved to equilibrium):

  python -m experiments.train \
      --config=experiments/configs/equilibrium.py:all3 --workdir=workdirs/deq_all3

Variants (`rvm.models.equilibrium`, `rvm.models.equilibrium_resnet`):
  all3, middle3      CIFAR-10 (3,4,4), `model.sharing="equilibrium"` on every level or the
                     middle one; the other fields are cifar10.py's all3_raw
  all3_jac           all3 with Jacobian regularisation (Bai et al. 2021)
  all3_phantom       all3 with the phantom gradient (Geng et al. 2021) instead of implicit
  all3_wide          all3 four times as wide (64-128-256 filters, 2.7M parameters) with
                     pad-4 random crops: a CIFAR model of multiscale-DEQ size for a GPU
                     (results/equilibrium_gpu/run.sh)
  mazes, prefix_sums the thinking nets of mazes.py:recall_prog / prefix_sums.py:recall_prog
                     with their block solved to equilibrium (`train.scheme="equilibrium"`)
  smoke, mazes_smoke tiny runs on synthetic images / 5x5 mazes, under a minute on a CPU

Hardware, time and results: the 2-core CPU VM's runs and their numbers are in
results/equilibrium_cpu/ (its run.sh says the command of each, its README.md the
budget). Any solver field can be overridden, e.g. `--config.model.equilibrium.solver=iterate`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import cifar10, mazes, prefix_sums

VARIANTS = (
    "all3",
    "middle3",
    "all3_jac",
    "all3_phantom",
    "all3_wide",
    "mazes",
    "prefix_sums",
    "smoke",
    "mazes_smoke",
)


def solver_section(**overrides) -> ml_collections.ConfigDict:
    """The fields `rvm.models.equilibrium.spec_from_config` reads."""
    s = ml_collections.ConfigDict()
    s.norm = "group"  # group, layer or none: BatchNorm is refused
    s.solver = "anderson"  # anderson or iterate
    s.tol = 1e-3  # relative residual ||f(z) - z|| / ||f(z)|| of the worst example
    s.max_iter = 30
    s.memory = 5  # Anderson's history
    s.damping = 1.0
    s.backward = "implicit"  # implicit or phantom
    s.backward_tol = 1e-3
    s.backward_max_iter = 30
    s.phantom_steps = 5
    s.phantom_damping = 0.5
    s.jacobian_weight = 0.0  # > 0: Hutchinson estimate of ||J_f||_F^2 added to the loss
    s.jacobian_samples = 1
    s.update(overrides)
    return s


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = variant or "all3"
    if variant not in VARIANTS:
        raise ValueError(f"unknown equilibrium config variant {variant!r}; known: {VARIANTS}")
    if variant in ("mazes", "prefix_sums", "mazes_smoke"):
        family = prefix_sums if variant == "prefix_sums" else mazes
        config = family.get_config("smoke" if variant == "mazes_smoke" else "recall_prog")
        config.train.scheme = "equilibrium"
        config.model.norm = "layer"
        # The trained count m stays what the evaluation curves are measured against.
        config.equilibrium = solver_section(norm="layer", max_iter=3 * config.train.iterations)
        return config
    config = cifar10.get_config("smoke" if variant == "smoke" else "all3_raw")
    if variant == "middle3":
        config.model.scope = "middle"
    config.model.sharing = "equilibrium"
    config.model.stochastic_depth = False  # no drops inside a fixed point
    config.model.equilibrium = solver_section()
    if variant == "smoke":
        config.model.scope = "all"
        config.model.equilibrium.max_iter = 8
        config.model.equilibrium.backward_max_iter = 8
    if variant == "all3_jac":
        config.model.equilibrium.jacobian_weight = 0.5
    if variant == "all3_phantom":
        config.model.equilibrium.backward = "phantom"
    if variant == "all3_wide":
        config.model.widths = (64, 128, 256)
        config.data.crop = True
    return config
