"""Time per train step of one equilibrium block: rvm's custom_vjp against optimistix.

Both solve z = f(z, x) for the CIFAR cell (`rvm.models.equilibrium_resnet.Cell`, 16
channels, GroupNorm, 16x16 maps, batch 32) by plain fixed-point iteration to the same
relative tolerance and maximum, and differentiate implicitly: rvm by its adjoint
fixed-point iteration, optimistix by `ImplicitAdjoint` with a GMRES solve from lineax
(its default linear solver would materialise the Jacobian). optimistix is not a
dependency of rvm: install it (`pip install optimistix`) to run this.

    python bench/equilibrium_optimistix.py > bench/results/equilibrium_optimistix.md
"""

import platform
import re
import subprocess
import time
from functools import partial

import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx

from rvm.models.equilibrium import Backward, Equilibrium, Solver
from rvm.models.equilibrium_resnet import Cell

TOL, MAX_ITER, REPEATS = 1e-3, 30, 10


def timed(step, params):
    params = step(params)  # compile
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(REPEATS):
        params = step(params)
    jax.block_until_ready(params)
    return (time.perf_counter() - start) / REPEATS


def main() -> None:
    x = jax.random.normal(jax.random.key(0), (32, 16, 16, 16))
    cell = Cell(16, "group")
    solver = Solver("iterate", TOL, MAX_ITER)
    layer = Equilibrium(cell, solver, Backward(solver=solver))
    params = layer.init(jax.random.key(1), x, x)["params"]

    def sgd(loss):
        return jax.jit(lambda p: jax.tree.map(lambda a, g: a - 1e-3 * g, p, jax.grad(loss)(p)))

    def ours(p):
        return jnp.mean(layer.apply({"params": p}, x, x)[0] ** 2)

    def theirs(p, gmres_steps=MAX_ITER):
        fn = lambda z, args: cell.apply({"params": args["block"]}, z, x)
        sol = optx.fixed_point(
            fn,
            optx.FixedPointIteration(rtol=TOL, atol=1e-6),
            x,
            args=p,
            max_steps=MAX_ITER,
            throw=False,
            adjoint=optx.ImplicitAdjoint(
                lx.GMRES(
                    rtol=TOL,
                    atol=1e-6,
                    max_steps=gmres_steps,
                    restart=MAX_ITER,
                    stagnation_iters=MAX_ITER,
                )
            ),
        )
        return jnp.mean(sol.value**2)

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "")
    print("# Equilibrium train step: rvm custom_vjp vs optimistix\n")
    print(f"{platform.machine()} {model}, jax {jax.__version__}, optimistix {optx.__version__}")
    print(f"(tol {TOL}, at most {MAX_ITER} iterations, mean of {REPEATS} steps after compiling)\n")
    print("| implementation | s per step |\n| --- | --- |")
    runs = (
        ("rvm custom_vjp (iterate)", ours),
        (f"optimistix ImplicitAdjoint, GMRES {MAX_ITER} steps", theirs),
        (
            f"optimistix ImplicitAdjoint, GMRES {10 * MAX_ITER} steps",
            partial(theirs, gmres_steps=10 * MAX_ITER),
        ),
    )
    for name, loss in runs:
        try:
            print(f"| {name} | {timed(sgd(loss), params):.3f} |", flush=True)
        except Exception as e:  # noqa: BLE001 - a failed solve is a result here
            found = re.search(r"EquinoxRuntimeError: ([^\n]*)", str(e))
            print(f"| {name} | raised: {found.group(1) if found else type(e).__name__} |")


if __name__ == "__main__":
    main()
