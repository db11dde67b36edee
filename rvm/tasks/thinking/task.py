"""Thinking longer: a weight-tied recurrent CNN on mazes or prefix sums, for the training loop.

`config.task="thinking"`; `config.data.kind` picks the problem ("mazes",
"prefix_sums"). The network trains on one size (`data.train_size`: cells per side,
or bits) with the losses of `rvm.tasks.thinking.progressive`, and is tested on every size
of `data.test_sizes` (larger ones included) at iterations 1 .. `eval.factor` x
the trained count m, in ONE compiled scan per size that emits after every
iteration whether each example is solved exactly (every pixel or bit right) and
whether its prediction changed since the last iteration. From those follow the
"thinking longer" curves and halting: an example stops at the first iteration
whose prediction equals that of the previous `eval.halt_patience` iterations,
and the results report its accuracy and the iterations it saves against running
all factor x m.

Every choice is made on a validation split of each size (`data.num_val` examples,
its own seed stream: `rvm.data.mazes.split_seed`), never on the test split: after
each epoch `val_error` (% not solved exactly) on the trained size at m, and at the
end the count reported per size is the one with the best validation accuracy
(`chosen_iterations`; the fewest iterations among ties). The test split (`data.num_test`
per size) is read at the end only: results.json holds its curves, and the counts of
examples solved at every count and at halting, from which `rvm.analysis.thinking`
draws the figure, the table and the Wilson intervals. `data.eval_stream` > 0 draws
other validation and test splits than stream 0 (whose test split the first CPU runs
were tuned while looking at). A config without a validation split (`num_val=0`, the
runs recorded before it existed) reports `test_error` after each epoch, as it did.
A net trained to equilibrium (`train.scheme`) also reports, per size, its accuracy
at the solver's fixed point and the iterations the solver took (allowed `eval.factor`
x its maximum); its per-epoch error and `test_error` are at the fixed point.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from rvm.data import pipeline
from rvm.data.mazes import check_size, maze_split
from rvm.data.prefix_sums import check_length, prefix_sum_split
from rvm.models.equilibrium import adjoint_metrics, adjoint_probes, spec_from_config
from rvm.models.thinking import NORMS, ThinkingNet, check_iterations, warn_if_unseen
from rvm.tasks.thinking import progressive
from rvm.train import sharding, xla
from rvm.train.state import TrainState
from rvm.train.step import Probes
from rvm.train.task import Task, sum_over_split

KINDS = ("mazes", "prefix_sums")
# progressive: the losses of `progressive`; equilibrium: the loss at the fixed point.
SCHEMES = ("progressive", "equilibrium")


class Split(NamedTuple):
    inputs: np.ndarray  # [N, H, W, 3] (mazes) or [N, L, 1] (bits), uint8
    labels: np.ndarray  # [N, H, W] or [N, L], uint8


class ThinkingData(NamedTuple):
    train: Split
    tests: dict[int, Split]  # size -> test split; the trained size among them
    vals: dict[int, Split]  # size -> validation split; empty without one


@struct.dataclass
class DeviceSplit:
    inputs: jax.Array
    labels: jax.Array


def _split(kind: str, seed: int, size: int, split: str, num: int, stream: int = 0) -> Split:
    if kind == "mazes":
        mazes = maze_split(seed, size, split, num, stream)
        return Split(mazes.images, mazes.labels)
    sums = prefix_sum_split(seed, size, split, num, stream)
    return Split(sums.bits[..., None], sums.labels)


def load_data(config: ml_collections.ConfigDict) -> ThinkingData:
    """The fixed train split of the trained size, and a validation and a test split of
    every test size."""
    d = config.data
    sizes = sorted({d.train_size, *d.test_sizes})
    num_val, stream = d.get("num_val", 0), d.get("eval_stream", 0)
    return ThinkingData(
        _split(d.kind, d.seed, d.train_size, "train", d.num_train),
        {s: _split(d.kind, d.seed, s, "test", d.num_test, stream) for s in sizes},
        {s: _split(d.kind, d.seed, s, "val", num_val, stream) for s in sizes} if num_val else {},
    )


def is_equilibrium(config: ml_collections.ConfigDict) -> bool:
    return config.train.get("scheme", "progressive") == "equilibrium"


def build_model(config: ml_collections.ConfigDict) -> ThinkingNet:
    m = config.model
    dims = 2 if config.data.kind == "mazes" else 1
    spec = spec_from_config(config.equilibrium) if is_equilibrium(config) else None
    return ThinkingNet(m.width, m.blocks, m.recall, dims, 2, m.norm, m.get("head_kernel", 3), spec)


def extent(kind: str, size: int) -> int:
    """Positions a problem of `size` spans along one axis (pixels or bits)."""
    return 2 * size + 1 if kind == "mazes" else size


# --- Evaluation: every iteration count in one scan -------------------------------------


def halting_index(same: jax.Array, patience: int) -> jax.Array:
    """Per example, the 0-based iteration to halt at: the first t whose prediction
    equals those of the `patience` iterations before it (same[t]: t's equals t-1's),
    else the last. `same` is [T, B] bool; same[0] compares with no prediction."""
    steps = same.shape[0]
    changes = jnp.cumsum(~same, axis=0)
    before = jnp.concatenate([jnp.zeros((patience, same.shape[1]), changes.dtype), changes])
    stable = (changes == before[:-patience]) & (jnp.arange(steps) >= patience)[:, None]
    return jnp.where(jnp.any(stable, 0), jnp.argmax(stable, 0), steps - 1)


@xla.jit(static_argnames=("model", "iterations", "patience"))
def _curve_sums(model, variables, packed, weight, iterations, patience):
    """Per-batch sums: solved after each iteration [T], solved and iterations at halting."""
    x, labels = packed[..., :-1].astype(jnp.float32), packed[..., -1].astype(jnp.int32)
    axes = tuple(range(1, labels.ndim))

    def emit(previous, logits):
        pred = jnp.argmax(logits, -1).astype(jnp.int32)
        right = pred == labels
        same = jnp.all(pred == previous, axis=axes)
        return pred, (jnp.all(right, axis=axes), same, jnp.mean(right, axis=axes))

    solved, same, positions = model.apply(
        variables, x, iterations, emit, jnp.full_like(labels, -1), method=ThinkingNet.trajectory
    )  # [T, B] each
    halt = halting_index(same, patience)
    solved_at_halt = jnp.take_along_axis(solved, halt[None], 0)[0]
    return (
        jnp.sum(solved * weight, axis=1),
        jnp.sum(solved_at_halt * weight),
        jnp.sum((halt + 1) * weight),
        jnp.sum(positions * weight, axis=1),
    )


def accuracy_curve(
    model: ThinkingNet,
    variables: dict,
    split: Split,
    iterations: int,
    batch_size: int,
    mesh=None,
    patience: int = 1,
) -> dict[str, Any]:
    """Exact-match and per-position accuracy (%) after 1..`iterations` iterations, and
    halting, on `split`, with the counts of examples solved (for intervals)."""
    # The labels ride as a last input channel: eval_batches pads one-dimensional labels only.
    packed = np.concatenate([split.inputs, split.labels[..., None]], axis=-1)
    index = np.zeros(len(packed), np.int32)
    batch_sums = lambda p, _, w: _curve_sums(model, variables, p, w, iterations, patience)
    solved, solved_halt, halt_iterations, positions = sum_over_split(
        batch_sums, packed, index, batch_size, mesh
    )
    n = len(packed)
    mean_halt = float(halt_iterations) / n
    return {
        "examples": n,
        "solved": [int(round(float(s))) for s in solved],
        "accuracy": [100.0 * float(s) / n for s in solved],
        # % of pixels or bits right: progress that exact match cannot show
        "position_accuracy": [100.0 * float(p) / n for p in positions],
        "halt_solved": int(round(float(solved_halt))),
        "halt_accuracy": 100.0 * float(solved_halt) / n,
        "halt_iterations": mean_halt,
        "halt_saved_iterations": iterations - mean_halt,
    }


@xla.jit(static_argnames=("model", "solver"))
def _solver_sums(model, variables, packed, weight, solver):
    x, labels = packed[..., :-1].astype(jnp.float32), packed[..., -1].astype(jnp.int32)
    logits, stats, _ = model.apply(variables, x, None, solver, method=ThinkingNet.solve)
    right = jnp.argmax(logits, -1) == labels
    solved = jnp.all(right.reshape(right.shape[0], -1), axis=1)
    return jnp.sum(solved * weight), stats.iterations, (~stats.converged).astype(jnp.int32)


def solver_results(
    model: ThinkingNet, variables: dict, split: Split, solver, batch_size: int, mesh=None
) -> dict[str, float]:
    """Exact-match accuracy (%) at the solver's fixed point on `split`, the mean
    f-evaluations per batch and the batches that stopped at the maximum unconverged."""
    packed = np.concatenate([split.inputs, split.labels[..., None]], axis=-1)
    index = np.zeros(len(packed), np.int32)
    batch_sums = lambda p, _, w: _solver_sums(model, variables, p, w, solver)
    solved, iterations, nonconverged = sum_over_split(batch_sums, packed, index, batch_size, mesh)
    batches = -(-len(packed) // batch_size)
    return {
        "solver_accuracy": 100.0 * float(solved) / len(packed),
        "solver_iterations": float(iterations) / batches,
        "solver_nonconverged_batches": int(nonconverged),
        "solver_max_iter": solver.max_iter,
    }


def size_results(
    config: ml_collections.ConfigDict, model: ThinkingNet, variables: dict, data: ThinkingData, mesh
) -> dict[str, dict]:
    """The test curves of every test size up to `eval.factor` x m (results.json's `sizes`),
    and where there is a validation split, its curve and the count it chooses."""
    m, kind = config.train.iterations, config.data.kind
    most = config.eval.factor * m
    curve_of = partial(
        accuracy_curve,
        model,
        variables,
        iterations=most,
        batch_size=config.eval_batch_size,
        mesh=mesh,
        patience=config.eval.halt_patience,
    )
    out = {}
    for size, split in sorted(data.tests.items()):
        curve = curve_of(split)
        span = extent(kind, size)
        curve["accuracy_at_trained"] = curve["accuracy"][m - 1]
        curve["accuracy_at_max"] = curve["accuracy"][-1]
        if size in data.vals:
            val = curve_of(data.vals[size])
            chosen = choose_count(val["solved"])
            curve["val"] = {k: val[k] for k in ("examples", "solved", "accuracy")}
            curve["chosen_iterations"] = chosen
            curve["accuracy_at_chosen"] = curve["accuracy"][chosen - 1]
        # positions right when every one is predicted 0 (no path, even parity)
        curve["all_zero_position_accuracy"] = 100.0 * float(np.mean(split.labels == 0))
        # the fewest iterations whose receptive field spans the problem
        curve["iterations_to_see_all"] = next(
            (t for t in range(1, 100 * most) if model.radius(t) >= span - 1), None
        )
        if model.equilibrium is not None:  # the fixed point, allowed eval.factor x max_iter
            solver = model.equilibrium.solver
            solver = dataclasses.replace(solver, max_iter=config.eval.factor * solver.max_iter)
            curve.update(
                solver_results(model, variables, split, solver, config.eval_batch_size, mesh)
            )
        out[str(size)] = curve
    return out


def choose_count(solved: list[int]) -> int:
    """The iteration count (1-based) that solves the most examples; the fewest among ties."""
    return int(np.argmax(solved)) + 1


# --- The task ---------------------------------------------------------------------------


def make_get_batch(config: ml_collections.ConfigDict, mesh):
    """`get_batch(data, step, rng, seed)`, in the order of the run's key `seed`."""
    batch_sharding = sharding.batch(mesh)

    def get_batch(data: DeviceSplit, step, rng, seed):
        del rng  # no augmentation
        idx = pipeline.batch_indices(seed, step, data.inputs.shape[0], config.batch_size)
        x = jax.lax.with_sharding_constraint(data.inputs[idx].astype(jnp.float32), batch_sharding)
        y = jax.lax.with_sharding_constraint(data.labels[idx].astype(jnp.int32), batch_sharding)
        return x, y

    return get_batch


def make_task(config: ml_collections.ConfigDict, data: ThinkingData, mesh) -> Task:
    """The thinking-longer task of `experiments/configs/{mazes,prefix_sums}.py` on `data`."""
    model = build_model(config)
    m, size = config.train.iterations, config.data.train_size
    curve = partial(accuracy_curve, batch_size=config.eval_batch_size, mesh=mesh)
    # what the epochs are watched on: validation, or the test split of runs without one
    watched, key = (data.vals, "val_error") if data.vals else (data.tests, "test_error")

    def epoch_metrics(state: TrainState) -> dict:
        if model.equilibrium is not None:  # at the fixed point, as trained
            solved = solver_results(
                model,
                state.variables,
                watched[size],
                model.equilibrium.solver,
                config.eval_batch_size,
                mesh,
            )
            split = key.removesuffix("_error")
            record = {f"{split}_{k}": v for k, v in solved.items() if k != "solver_max_iter"}
            return {key: 100.0 - solved["solver_accuracy"], **record}
        acc = curve(model, state.variables, watched[size], m)["accuracy"][-1]
        return {key: 100.0 - acc}

    def final_results(state: TrainState) -> dict:
        sizes = size_results(config, model, state.variables, data, mesh)
        trained_curve = sizes[str(size)]
        error = 100.0 - trained_curve["accuracy_at_trained"]
        if model.equilibrium is not None:
            error = 100.0 - trained_curve["solver_accuracy"]
        return {
            "test_error": error,
            "trained_iterations": m,
            "max_iterations": config.eval.factor * m,
            "sizes": sizes,
        }

    train = DeviceSplit(data.train.inputs, data.train.labels)
    t = config.train
    scheme = (
        "plain"
        if t.progressive_weight == 0
        else f"{progressive.draw_name(t)} counts, a={t.progressive_weight}"
    )
    init_input = jnp.zeros((1, *data.train.inputs.shape[1:]), jnp.float32)
    probes = None
    if model.equilibrium is not None:
        scheme = f"solved to equilibrium ({model.equilibrium.solver.name})"
        zeros = adjoint_probes(model, init_input, method=ThinkingNet.solve)
        probes = None if zeros is None else Probes(zeros, adjoint_metrics)
    return Task(
        model=model,
        train_data=jax.device_put(train, sharding.replicated(mesh)),
        num_train=len(data.train.labels),
        init_input=init_input,
        get_batch=make_get_batch(config, mesh),
        loss_fn=progressive.make_loss_fn(model, config.train),
        epoch_metrics=epoch_metrics,
        final_results=final_results,
        unit="examples",
        summary=(
            f"{config.data.kind}, width {config.model.width}, recall {config.model.recall}, "
            f"{m} iterations, {scheme}"
        ),
        probes=probes,
    )


# --- Validation (called by rvm.train.config_check before anything compiles) ------------


def _number_in(config, field: str, low: float, high: float) -> None:
    section, name = field.split(".")
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{field}={value!r} must be a number in [{low}, {high}]")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the thinking fields; warns where a test size cannot be seen whole."""
    d, m, t = config.data, config.model, config.train
    if d.kind not in KINDS:
        raise ValueError(f"data.kind={d.kind!r} is not one of {', '.join(KINDS)}")
    check = check_size if d.kind == "mazes" else check_length
    check(d.train_size, "data.train_size")
    for i, size in enumerate(d.test_sizes):
        check(size, f"data.test_sizes[{i}]")
    for field in ("num_train", "num_test"):
        check_iterations(d[field], f"data.{field}")  # a positive integer, like a count
    for field in ("num_val", "eval_stream"):
        value = d.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"data.{field}={value!r} must be an integer >= 0")
    for field in ("width", "blocks"):
        check_iterations(m[field], f"model.{field}")
    if not isinstance(m.recall, bool):
        raise ValueError(f"model.recall={m.recall!r} must be True or False")
    if m.norm not in NORMS:
        raise ValueError(f"model.norm={m.norm!r} is not one of {', '.join(NORMS)}")
    check_iterations(t.iterations, "train.iterations")
    check_iterations(t.grad_iterations, "train.grad_iterations")
    if t.grad_iterations > t.iterations:
        raise ValueError(
            f"train.grad_iterations={t.grad_iterations} must be at most "
            f"train.iterations={t.iterations}"
        )
    _number_in(config, "train.progressive_weight", 0, 1)
    scheme = t.get("scheme", "progressive")
    if scheme not in SCHEMES:
        raise ValueError(f"train.scheme={scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "equilibrium":
        if "equilibrium" not in config:
            raise ValueError("train.scheme='equilibrium' needs an equilibrium section")
        if not m.recall:
            raise ValueError("train.scheme='equilibrium' needs model.recall=True (x enters F)")
        spec_from_config(config.equilibrium)
    if t.counts not in progressive.COUNTS:
        raise ValueError(f"train.counts={t.counts!r} is not one of {', '.join(progressive.COUNTS)}")
    draw = t.get("draw", "fixed_k")
    if draw not in progressive.DRAWS:
        raise ValueError(f"train.draw={draw!r} is not one of {', '.join(progressive.DRAWS)}")
    if draw == "reference" and t.counts != "uniform":
        raise ValueError(
            f"train.draw='reference' draws uniform counts, not train.counts={t.counts!r}"
        )
    _number_in(config, "train.sigma", 0, 10)
    check_iterations(config.eval.factor, "eval.factor")
    check_iterations(config.eval.halt_patience, "eval.halt_patience")
    model = build_model(config)
    for size in sorted({d.train_size, *d.test_sizes}):
        most = config.eval.factor * t.iterations
        warn_if_unseen(model, extent(d.kind, size), most, f"data size {size}")
