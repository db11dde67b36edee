"""Equilibrium layers: a weight-tied block run to its fixed point z* = f(z*, x).

Forward: a fixed-point solver (plain, optionally damped iteration, or Anderson
acceleration) inside `lax.while_loop`, until the relative residual
||f(z) - z|| / ||f(z)|| of every example is at most `tol`, or `max_iter` evaluations
of f. A while loop cannot be reverse-differentiated, so no tape is kept: the memory
of a train step does not grow with the iterations (tests/test_equilibrium.py checks
compiled memory for 10 and 50). Each call reports its iterations, its final residual
(the worst example's) and whether it converged: a batch that stops at `max_iter` is
counted in the metrics, never silently taken for a fixed point.

Backward (`Backward.mode`):
  implicit  the implicit function theorem, by a `jax.custom_vjp`: with g the output's
            cotangent, solve the adjoint fixed point u = g + J_f(z*)^T u (the same
            solver, its own tolerance and maximum) and pull u back through f to the
            parameters and x. Exact at the fixed point (tested against the unrolled
            solve to 1e-3 relative). The adjoint solve is reported like the forward
            one (the train step's `adjoint_*` metrics), through a probe's gradient.
  phantom   Geng et al.'s (2021) phantom gradient: from the (untaped) z*, k damped
            steps z <- (1 - l) z + l f(z) with autodiff; the layer outputs their end.
Jacobian regularisation (Bai et al. 2021): `jacobian_penalty` is a Hutchinson estimate
of ||J_f(z*)||_F^2 per element, E_e ||e^T J||^2 / numel with e ~ N(0, I).

Why a `jax.custom_vjp` of our own rather than `optimistix.fixed_point` with
`ImplicitAdjoint`: optimistix installs here (with equinox, lineax, jaxtyping), but it
has no Anderson acceleration (fixed-point iteration, or root finders that build
Jacobians), its stopping rule is one tolerance over the whole batch, and its implicit
backward is a lineax linear solve: the default materialises the Jacobian, and an
iterative one (GMRES) raises at run time when it reaches its step limit or stagnates,
where a training step should report and go on. On the same block and tolerance
(bench/equilibrium_optimistix.py, bench/results/equilibrium_optimistix.md, 2-core CPU)
our step ran and optimistix's raised at 30 GMRES steps; the file says what 300 gave.
Flax fits either way: the block is unbound (`Module.unbind`) into a pure f(params, x, z).

Normalisation inside the block must mean the same at every iteration: GroupNorm,
LayerNorm or none. BatchNorm (statistics of a batch at an iteration count that varies
per step) and any other mutable collection are refused (`check_block`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
SOLVERS = ("anderson", "iterate")
PROBES = "probes"  # the variable collection of the adjoint probes
MODES = ("implicit", "phantom")
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Solver:
    """A fixed-point solve: `name` in SOLVERS, stop at `tol` or after `max_iter` f-evals.

    `memory`: Anderson's history length; `damping`: the step z <- (1-d) z + d f(z)
    (Anderson's mixing beta); `ridge`: Anderson's regulariser of its normal equations.
    """

    name: str = "anderson"
    tol: float = 1e-3
    max_iter: int = 30
    memory: int = 5
    damping: float = 1.0
    ridge: float = 1e-4

    def __post_init__(self):
        check_solver(self)


@dataclasses.dataclass(frozen=True)
class Backward:
    """How gradients pass the layer: `mode` in MODES; the adjoint solve's own `solver`
    (implicit); `steps` damped unrolled steps with `damping` (phantom)."""

    mode: str = "implicit"
    solver: Solver = dataclasses.field(default_factory=lambda: Solver(tol=1e-4, max_iter=40))
    steps: int = 5
    damping: float = 0.5

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"backward mode {self.mode!r} is not one of {', '.join(MODES)}")
        _positive_int(self.steps, "phantom steps")
        _fraction(self.damping, "phantom damping")


def _positive_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r} must be an integer >= 1")


def _fraction(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{what}={value!r} must be a number in (0, 1]")


def check_solver(s: Solver) -> None:
    """A ValueError naming the field where `s` cannot run."""
    if s.name not in SOLVERS:
        raise ValueError(f"solver {s.name!r} is not one of {', '.join(SOLVERS)}")
    if isinstance(s.tol, bool) or not isinstance(s.tol, int | float) or not s.tol > 0:
        raise ValueError(f"solver tol={s.tol!r} must be a number > 0")
    _positive_int(s.max_iter, "solver max_iter")
    _positive_int(s.memory, "solver memory")
    _fraction(s.damping, "solver damping")


class Stats(NamedTuple):
    """One solve over a batch: f-evaluations, the worst example's relative residual,
    and whether that is within tolerance (else the solve stopped at `max_iter`)."""

    iterations: Array  # int32
    residual: Array  # float32
    converged: Array  # bool


def _residuals(fz: Array, z: Array) -> Array:
    """Per-example relative residual ||f(z) - z|| / ||f(z)||, examples on axis 0."""
    axes = tuple(range(1, z.ndim))
    diff = jnp.sqrt(jnp.sum(jnp.square(fz - z), axes))
    return diff / (jnp.sqrt(jnp.sum(jnp.square(fz), axes)) + EPS)


def _iterate(f: Callable[[Array], Array], z0: Array, s: Solver) -> tuple[Array, Stats]:
    def cond(carry):
        _, k, res = carry
        return (k < s.max_iter) & (res > s.tol)

    def body(carry):
        z, k, _ = carry
        fz = f(z)
        res = jnp.max(_residuals(fz, z))
        return (1 - s.damping) * z + s.damping * fz, k + 1, res

    z, k, res = jax.lax.while_loop(cond, body, (z0, jnp.int32(0), jnp.float32(jnp.inf)))
    return z, Stats(k, res, res <= s.tol)


def _anderson(f: Callable[[Array], Array], z0: Array, s: Solver) -> tuple[Array, Stats]:
    """Anderson acceleration, per example (examples never mix); one f-eval per step.

    The history keeps the last `memory` pairs (z_i, f(z_i)) of each example; the next z
    mixes them with the weights a (summing to 1) that minimise ||sum a_i (f(z_i) - z_i)||,
    from the bordered normal equations [[0, 1^T], [1, G G^T + ridge I]] [nu, a] = [1, 0].
    Empty slots get a unit diagonal and a 0 in the constraint, so their weight is 0; the
    ridge is relative to the mean squared residual of the history.
    """
    b, m = z0.shape[0], s.memory
    flat = lambda z: z.reshape(b, -1)
    fz0 = f(z0)
    xs = jnp.zeros((b, m, flat(z0).shape[1]), z0.dtype).at[:, 0].set(flat(z0))
    fs = jnp.zeros_like(xs).at[:, 0].set(flat(fz0))
    res0 = jnp.max(_residuals(fz0, z0))

    def cond(carry):
        *_, k, res = carry
        return (k < s.max_iter) & (res > s.tol)

    def body(carry):
        xs, fs, k, _ = carry
        valid = (jnp.arange(m) < k).astype(z0.dtype)  # k pairs stored so far, at most m
        g = (fs - xs) * valid[None, :, None]
        gram = jnp.einsum("bid,bjd->bij", g, g)
        # The ridge scales with the residuals, which shrink by orders of magnitude.
        scale = jnp.trace(gram, axis1=1, axis2=2) / jnp.sum(valid) + 1e-20
        gram = gram + (s.ridge * scale)[:, None, None] * jnp.diag(valid) + jnp.diag(1 - valid)
        top = jnp.concatenate([jnp.zeros((1,)), valid])[None, None, :]
        side = valid[None, :, None] * jnp.ones((b, 1, 1))
        system = jnp.concatenate([top.repeat(b, 0), jnp.concatenate([side, gram], 2)], 1)
        rhs = jnp.zeros((b, m + 1)).at[:, 0].set(1.0)
        alpha = jnp.linalg.solve(system, rhs[..., None])[:, 1:, 0]
        mixed_f = jnp.einsum("bi,bid->bd", alpha, fs)
        mixed_x = jnp.einsum("bi,bid->bd", alpha, xs)
        z = s.damping * mixed_f + (1 - s.damping) * mixed_x
        fz = flat(f(z.reshape(z0.shape)))
        slot = k % m
        xs, fs = xs.at[:, slot].set(z), fs.at[:, slot].set(fz)
        res = jnp.max(_residuals(fz, z))
        return xs, fs, k + 1, res

    xs, fs, k, res = jax.lax.while_loop(cond, body, (xs, fs, jnp.int32(1), res0))
    last = fs[:, (k - 1) % m].reshape(z0.shape)  # f of the last iterate: the answer
    return last, Stats(k, res, res <= s.tol)


def solve(f: Callable[[Array], Array], z0: Array, s: Solver) -> tuple[Array, Stats]:
    """The fixed point of `f` from `z0` by solver `s`, and its statistics. Not taped."""
    check_solver(s)
    return (_anderson if s.name == "anderson" else _iterate)(f, z0, s)


# --- Implicit backward ------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def implicit_fixed_point(f, forward: Solver, adjoint: Solver, params, x, z0, probe=None):
    """z* = f(params, x, z*) from z0, and the forward Stats; differentiated implicitly.

    `probe` (float32[3] zeros, optional) changes nothing forward; its gradient is the
    adjoint solve's (iterations, residual, 1 if it stopped at its maximum): the only way
    out of a backward pass (`adjoint_metrics` reads it)."""
    return solve(lambda z: f(params, x, z), z0, forward)


def _implicit_fwd(f, forward, adjoint, params, x, z0, probe):
    z, stats = solve(lambda z: f(params, x, z), z0, forward)
    return (z, stats), (params, x, z, probe)


def _implicit_bwd(f, forward, adjoint, res, cotangents):
    params, x, z, probe = res
    g = cotangents[0]  # the Stats carry no gradient
    _, pull = jax.vjp(f, params, x, z)
    # u = g + J_z^T u: the adjoint fixed point, solved like the forward one.
    u, stats = solve(lambda u: pull(u)[2] + g, g, adjoint)
    dparams, dx, _ = pull(u)
    measured = None
    if probe is not None:
        measured = jnp.stack(
            [stats.iterations.astype(jnp.float32), stats.residual, 1.0 - stats.converged]
        ).astype(probe.dtype)
    return dparams, dx, jnp.zeros_like(z), measured


implicit_fixed_point.defvjp(_implicit_fwd, _implicit_bwd)


def phantom_fixed_point(f, forward: Solver, steps: int, damping: float, params, x, z0):
    """The untaped solve, then `steps` damped steps with autodiff from its (stopped) end."""
    z, stats = solve(lambda z: f(params, x, z), jax.lax.stop_gradient(z0), forward)
    z = jax.lax.stop_gradient(z)
    for _ in range(steps):
        z = (1 - damping) * z + damping * f(params, x, z)
    return z, stats


def jacobian_penalty(f: Callable[[Array], Array], z: Array, key: Array, samples: int = 1):
    """Hutchinson estimate of ||d f / d z||_F^2 at `z`, divided by z's size.

    E ||e^T J||^2 = tr(J J^T) = ||J||_F^2 for e ~ N(0, I); differentiable in f's
    parameters (z itself is taken as given).
    """
    _, pull = jax.vjp(f, jax.lax.stop_gradient(z))
    noise = jax.random.normal(key, (samples, *z.shape), z.dtype)
    sq = jax.vmap(lambda e: jnp.sum(jnp.square(pull(e)[0])))(noise)
    return jnp.mean(sq) / z.size


# --- The Flax layer ---------------------------------------------------------------------


def check_block(variables: dict) -> None:
    """Only `params` may live in an equilibrium block (no BatchNorm statistics)."""
    other = sorted(k for k in variables if k != "params")
    if other:
        raise ValueError(
            f"an equilibrium block may hold only params, not {', '.join(other)}: BatchNorm's "
            "statistics are not defined at a fixed point reached in a varying number of "
            "steps; use GroupNorm, LayerNorm or no normalisation"
        )


class Equilibrium(nn.Module):
    """z* = block(z*, x) from z0; returns (z*, Stats, Jacobian penalty or None).

    `block` is any weight-tied Flax module called as block(z, x) with parameters only.
    `jacobian_key` (training) adds the penalty estimate at z*. With the implicit backward
    the layer holds a probe in the `PROBES` collection: a loss given it and
    differentiated with respect to it learns how the adjoint solve went
    (`adjoint_probes`); without it the backward is the same, unreported.
    """

    block: nn.Module
    solver: Solver = Solver()
    backward: Backward = Backward()
    jacobian_samples: int = 1

    @nn.compact
    def __call__(self, z0: Array, x: Array, jacobian_key: Array | None = None, solver=None):
        solver = solver or self.solver
        b = self.backward
        if b.mode == "implicit" and (
            self.is_initializing() or self.has_variable(PROBES, "adjoint")
        ):  # zeros whose gradient reports the adjoint solve (`adjoint_metrics`)
            probe = self.variable(PROBES, "adjoint", jnp.zeros, (3,), jnp.float32).value
        else:
            probe = None
        if self.is_initializing():
            z = self.block(z0, x)
            check_block(self.block.variables)
            zero = Stats(jnp.int32(0), jnp.float32(0), jnp.bool_(True))
            return z, zero, None
        module, variables = self.block.unbind()
        check_block(variables)
        f = lambda p, x, z: module.apply({"params": p}, z, x)
        params = variables["params"]
        if b.mode == "implicit":
            z, stats = implicit_fixed_point(f, solver, b.solver, params, x, z0, probe)
        else:
            z, stats = phantom_fixed_point(f, solver, b.steps, b.damping, params, x, z0)
        penalty = None
        if jacobian_key is not None:
            penalty = jacobian_penalty(
                lambda z: f(params, x, z), z, jacobian_key, self.jacobian_samples
            )
        return z, stats, penalty


def adjoint_probes(model: nn.Module, *args, method: Any = None, **kwargs) -> Any:
    """Zeros for every probe of `model`'s implicit equilibrium layers (None if it has
    none), from its variables' shapes when initialised with `args` (nothing computed)."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    shapes = jax.eval_shape(lambda: model.init(rngs, *args, method=method, **kwargs))
    if PROBES not in shapes:
        return None
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[PROBES])


def adjoint_metrics(measured: Any) -> dict[str, Array]:
    """Step metrics from the probes' gradients (`implicit_fixed_point`): the adjoint
    solves' summed iterations, their worst residual, and 1.0 where any stopped at its
    maximum, like `solver_metrics` for the forward solves."""
    rows = jnp.stack(jax.tree.leaves(measured))
    return {
        "adjoint_iterations": jnp.sum(rows[:, 0]),
        "adjoint_residual": jnp.max(rows[:, 1]),
        "adjoint_nonconverged": jnp.max(rows[:, 2]),
    }


def solver_metrics(stats: Any) -> dict[str, Array]:
    """Step metrics of one or more solves (a Stats or a list of them): the summed
    iterations, the worst residual, and 1.0 where any solve did not converge."""
    stats = [stats] if isinstance(stats, Stats) else list(stats)
    return {
        "solver_iterations": sum(s.iterations.astype(jnp.float32) for s in stats),
        "solver_residual": jnp.max(jnp.stack([s.residual for s in stats])),
        "solver_nonconverged": jnp.any(jnp.stack([~s.converged for s in stats])).astype(
            jnp.float32
        ),
    }


# --- From a config section --------------------------------------------------------------

NORMS = ("group", "layer", "none")


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything an equilibrium level needs: its block's normalisation, the forward
    solver, the backward, and the Jacobian regularisation's weight and samples."""

    norm: str = "group"
    solver: Solver = dataclasses.field(default_factory=Solver)
    backward: Backward = dataclasses.field(default_factory=Backward)
    jacobian_weight: float = 0.0
    jacobian_samples: int = 1


def check_norm(norm: str, field: str = "norm") -> None:
    if norm == "batch":
        raise ValueError(
            f"{field}='batch': BatchNorm's statistics are not defined at a fixed point reached "
            f"in a varying number of steps; use one of {', '.join(NORMS)}"
        )
    if norm not in NORMS:
        raise ValueError(f"{field}={norm!r} is not one of {', '.join(NORMS)}")


def spec_from_config(cfg: Any, prefix: str = "equilibrium") -> Spec:
    """A `Spec` from a config section (fields as in experiments/configs/equilibrium.py);
    a ValueError naming the field where a value cannot run."""

    def named(make, what: str):
        try:
            return make()
        except ValueError as e:
            raise ValueError(f"{prefix}.{what}: {e}") from None

    check_norm(cfg.norm, f"{prefix}.norm")
    forward = named(
        lambda: Solver(cfg.solver, cfg.tol, cfg.max_iter, cfg.memory, cfg.damping), "solver"
    )
    adjoint = named(
        lambda: Solver(cfg.solver, cfg.backward_tol, cfg.backward_max_iter, cfg.memory),
        "backward solver",
    )
    backward = named(
        lambda: Backward(cfg.backward, adjoint, cfg.phantom_steps, cfg.phantom_damping),
        "backward",
    )
    weight = cfg.jacobian_weight
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise ValueError(f"{prefix}.jacobian_weight={weight!r} must be a number >= 0")
    named(lambda: _positive_int(cfg.jacobian_samples, "jacobian_samples"), "jacobian_samples")
    return Spec(cfg.norm, forward, backward, float(weight), cfg.jacobian_samples)


def normalization(kind: str, features: int, name: str) -> Callable[[Array], Array]:
    """GroupNorm (up to 8 groups), LayerNorm over channels, or the identity."""
    check_norm(kind)
    if kind == "group":
        return nn.GroupNorm(num_groups=min(8, features), name=name)
    if kind == "layer":
        return nn.LayerNorm(name=name)
    return lambda y: y


def add_solver_terms(loss: Array, sown: dict, spec: Spec) -> tuple[Array, dict[str, Array]]:
    """The loss with the Jacobian penalty of every sown solve added (weight from `spec`),
    and the solves' step metrics; `sown` is a model's `solver` collection."""
    metrics = solver_metrics(_sown(sown, "stats"))
    penalties = _sown(sown, "jacobian")
    if penalties:
        metrics["jacobian"] = sum(penalties) / len(penalties)
        loss = loss + spec.jacobian_weight * metrics["jacobian"]
    return loss, metrics


def _sown(tree: Any, name: str) -> list:
    """Every value sown under `name` anywhere in a collection (sow keeps tuples)."""
    out = []
    for key, value in tree.items():
        if key == name:
            out.extend(value)
        elif isinstance(value, dict) or hasattr(value, "items"):
            out.extend(_sown(value, name))
    return out
