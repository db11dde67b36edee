"""Why a thinking net solved to equilibrium learns or does not: three readings at h*.

- `gradient_agreement`: the cosine between the implicit gradient of the loss at the fixed
  point and the gradient of the same net unrolled (plain iteration, autodiff through
  every step) long enough to converge. Near 1: the implicit backward computes what it
  claims, so a run that does not learn fails for another reason.
- `spectral_radius`: how contractive the iteration F is at h* (power iteration on its
  Jacobian, per example). Far below 1: perturbations die out within a few steps.
- `reach`: how far the answer follows the input, for bit strings. Flipping bit 0 flips
  every running parity after it, so a net that solves prefix sums changes its
  prediction at every position; a contractive fixed point's dependence on a distant
  bit decays with the distance, and the predictions stop following.

And, for a net whose test solves stop at their cap unconverged, `solver_budgets`: its
validation exact match at each of several caps, to tell whether allowing more
iterations would answer more. `experiments/equilibrium_diagnosis.py` reads them from
runs' checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from rvm.models.thinking import ThinkingNet


def _loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _cosine(model: ThinkingNet, params: Any, inputs, labels, unrolled: int) -> jax.Array:
    def at_fixed_point(p):
        logits, _, _ = model.apply({"params": p}, inputs, method=ThinkingNet.solve)
        return _loss(logits, labels)

    def through_iterations(p):
        return _loss(model.apply({"params": p}, inputs, unrolled), labels)

    a, _ = ravel_pytree(jax.grad(at_fixed_point)(params))
    b, _ = ravel_pytree(jax.grad(through_iterations)(params))
    return jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)


def gradient_agreement(
    model: ThinkingNet, params: Any, inputs: jax.Array, labels: jax.Array, unrolled: int
) -> float:
    """Cosine between the parameter gradients of the loss at the fixed point (the model's
    equilibrium backward) and of the net unrolled `unrolled` plain iterations from h_0."""
    return float(_cosine(model, params, inputs, labels, unrolled))


def _radius(f, z: jax.Array, key: jax.Array, steps: int = 50) -> jax.Array:
    axes = tuple(range(1, z.ndim))
    norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axes, keepdims=True))
    _, pull = jax.vjp(f, z)

    def body(v, _):
        (w,) = pull(v)
        n = norm(w)
        return w / (n + 1e-30), jnp.log(n + 1e-30)

    v = jax.random.normal(key, z.shape, z.dtype)
    _, logs = jax.lax.scan(body, v / norm(v), None, length=steps)
    return jnp.exp(jnp.mean(logs[steps // 2 :], axis=0)).reshape(-1)


def spectral_radius(f, z: jax.Array, key: jax.Array, steps: int = 50) -> np.ndarray:
    """Per example (axis 0), an estimate of the spectral radius of J = df/dz at `z`: the
    growth per step of ||(J^T)^k v|| over the last half of `steps` power-iteration steps
    from a random v (J^T has J's eigenvalues; a VJP works through custom-VJP convolutions
    where a JVP does not). `f` must act on each example alone, as a convolution does."""
    return np.asarray(_radius(f, z, key, steps))


def fixed_point(model: ThinkingNet, params: Any, inputs: jax.Array):
    """(h*, solver Stats): where the model's forward solve stops, as in training."""

    def state(mdl, x):
        return mdl.deq(mdl.encode(x), x)[:2]

    return model.apply({"params": params}, inputs, method=state)


def _flips(model: ThinkingNet, params: Any, bits: jax.Array) -> jax.Array:
    flipped = bits.at[:, 0].set(1 - bits[:, 0])

    def predict(x):
        logits, _, _ = model.apply({"params": params}, x, method=ThinkingNet.solve)
        return jnp.argmax(logits, -1)

    return jnp.mean(predict(bits) != predict(flipped), axis=0)


def reach(model: ThinkingNet, params: Any, bits: jax.Array) -> np.ndarray:
    """Per position of [N, L, 1] bit strings, the fraction of strings whose prediction at
    the fixed point changes when bit 0 flips (a prefix-sum solver: 1 everywhere)."""
    return np.asarray(_flips(model, params, bits))


def iteration(model: ThinkingNet, params: Any, inputs: jax.Array):
    """F(., x) as a function of the state alone, for `spectral_radius`."""
    return lambda h: model.apply({"params": params}, h, inputs, method=ThinkingNet.step)


@partial(jax.jit, static_argnames=("model", "unrolled"))
def _measured(model: ThinkingNet, params: Any, inputs, labels, key, unrolled: int) -> dict:
    """Every reading of `_readings` in one program: compiled once per net shape, so the
    trained net reuses the fresh one's."""
    h, stats = fixed_point(model, params, inputs)
    logits = model.apply({"params": params}, h, method=ThinkingNet.readout)
    return {
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "stats": stats,
        "radius": _radius(iteration(model, params, inputs), h, key),
        "cosine": _cosine(model, params, inputs, labels, unrolled),
        "flips": _flips(model, params, inputs),
    }


def _readings(model: ThinkingNet, params: Any, split, unrolled: int, key: jax.Array) -> dict:
    inputs, labels = jnp.asarray(split.inputs, jnp.float32), jnp.asarray(split.labels)
    m = jax.device_get(_measured(model, params, inputs, labels, key, unrolled))
    thirds = np.array_split(np.asarray(m["flips"])[1:], 3)
    return {
        "position_accuracy": float(m["accuracy"]),
        "solver_iterations": int(m["stats"].iterations),
        "solver_converged": bool(m["stats"].converged),
        "spectral_radius": float(np.median(m["radius"])),  # over the examples
        "gradient_cosine": float(m["cosine"]),
        "reach": [float(np.mean(t)) for t in thirds],  # positions 1.., in thirds
    }


def _restored(path, kind: str | None = None, what: str = "thinking"):
    """(name, step, config, data, model, state) of the newest checkpoint of a thinking run
    trained to equilibrium (of data.kind `kind` where given: `what` names it)."""
    from pathlib import Path

    import ml_collections

    from rvm.analysis.thinking import read_run
    from rvm.tasks.thinking import task as thinking_task
    from rvm.train import loop

    path = Path(path)
    config = ml_collections.ConfigDict(read_run(path)["config"])
    if not thinking_task.is_equilibrium(config) or kind not in (None, config.data.kind):
        raise ValueError(f"{path}: not a {what} net trained to equilibrium")
    data = thinking_task.load_data(config)
    step, state = loop.restore_newest(config, data, path)
    return path.name, step, config, data, thinking_task.build_model(config), state


def diagnose(path, num: int = 128, unrolled: int = 200, max_iter: int = 200, tol: float = 1e-4):
    """`_readings` of a prefix-sum equilibrium run's newest checkpoint and of a fresh net of
    its config (seed `config.seed`), on `num` validation strings of its trained length.

    Both are solved with the implicit backward, to `tol` within `max_iter` iterations (the
    same solver as trained otherwise), whatever the run trained with: the question is
    whether the exact gradient at a fixed point would have taught the net."""
    from rvm.tasks.thinking import task as thinking_task

    name, step, config, _, _, state = _restored(path, "prefix_sums", "prefix-sum")
    backward = config.equilibrium.backward
    with config.unlocked():
        config.equilibrium.backward = "implicit"
        config.equilibrium.max_iter = config.equilibrium.backward_max_iter = max_iter
        config.equilibrium.tol = config.equilibrium.backward_tol = tol
        config.data.num_val = num
    model = thinking_task.build_model(config)
    split = thinking_task.load_data(config).vals[config.data.train_size]
    fresh = model.init(jax.random.key(config.seed), jnp.asarray(split.inputs[:1], jnp.float32))
    key = jax.random.key(0)
    return {
        "run": name,
        "step": step,
        "backward": backward,
        "initial": _readings(model, fresh["params"], split, unrolled, key),
        "trained": _readings(model, state.variables["params"], split, unrolled, key),
    }


def solver_budgets(path, budgets: Sequence[int]) -> dict:
    """Exact match (%) on the validation split of every size a thinking run was tested on,
    at its newest checkpoint's fixed point with the forward solve capped at each of
    `budgets` iterations (the trained solver otherwise), and the batches stopped there
    unconverged: validation, so a cap may be chosen from it."""
    from rvm.tasks.thinking import task as thinking_task

    name, step, config, data, model, state = _restored(path)
    if not data.vals:
        raise ValueError(f"{path}: the run has no validation split to read the caps on")
    solver = model.equilibrium.solver
    sizes = {}
    for size, split in sorted(data.vals.items()):
        sizes[str(size)] = [
            thinking_task.solver_results(
                model,
                state.variables,
                split,
                dataclasses.replace(solver, max_iter=int(cap)),
                config.eval_batch_size,
            )
            | {"examples": len(split.inputs)}
            for cap in budgets
        ]
    return {"run": name, "step": step, "trained_max_iter": solver.max_iter, "sizes": sizes}


def budgets_markdown(rows: list[dict], command: str = "") -> str:
    """The readings of `solver_budgets` as a table, a row per run and size."""
    lines = ["# Validation exact match at the fixed point against the solver's cap", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    lines += [
        "| run | size | validation examples | cap: exact match % (batches unconverged) |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        for size, readings in row["sizes"].items():
            caps = "; ".join(
                f"{r['solver_max_iter']}: {r['solver_accuracy']:.1f} "
                f"({r['solver_nonconverged_batches']})"
                for r in readings
            )
            lines.append(
                f"| {row['run']} (step {row['step']}) | {size} | "
                f"{readings[0]['examples']} | {caps} |"
            )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], command: str = "") -> str:
    """The readings of `diagnose` as a table, a row per net."""
    lines = ["# Prefix-sum nets at their fixed point: contraction, gradient, reach", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    lines += [
        "| run | net | backward trained | position accuracy | solver iterations (converged) "
        "| spectral radius of dF/dh at h* | cosine, implicit vs unrolled gradient "
        "| reach: predictions changed by flipping bit 0, positions in thirds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for net in ("initial", "trained"):
            r = row[net]
            reach_text = " / ".join(f"{v:.2f}" for v in r["reach"])
            lines.append(
                f"| {row['run']} | {net if net == 'initial' else 'step ' + str(row['step'])} "
                f"| {row['backward']} | {r['position_accuracy']:.3f} "
                f"| {r['solver_iterations']} ({'yes' if r['solver_converged'] else 'no'}) "
                f"| {r['spectral_radius']:.3f} | {r['gradient_cosine']:.4f} | {reach_text} |"
            )
    return "\n".join(lines) + "\n"
