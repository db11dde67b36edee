"""XLA compile options: convolutions on their fastest path, one-off functions compiled fast,
and the XLA:GPU flag sets the benchmark measures.

XLA:CPU hands convolutions to YNNPACK by default. For these networks' 3x3
convolutions (16-64 channels, 8x8 to 32x32 maps, batch 128) its own Eigen
convolutions are faster on the project's 2-core VM, per convolution and per
training step (`bench/results/cpu.md`, sections `convs` and `xla_cpu`). The
options keep YNNPACK for the reductions and matrix products it handles by default
and take convolutions away from it. They are compile options of each jit,
not process-wide XLA_FLAGS, so importing rvm changes nothing else in the process;
other backends compile without them.

A function that runs once, such as the initialisation of a run's state, is better
compiled fast than compiled to run fast: `ONCE_OPTIONS` skip LLVM's optimisation of
its kernels (`bench/results/cpu.md`, section `compile`, column `init`, times
`build_run`, which compiles the initialisation this way).

On a GPU the step is bound by kernel launches and host synchronisation, not
arithmetic (bench/README.md). `GPU_FLAG_SETS` are the process-wide XLA_FLAGS
worth measuring against that (section `xla_gpu` of `python bench/run.py
--platform gpu`, each in a process of its own); `GPU_FLAGS` is what a GPU run
should use, XLA's defaults until a measurement says otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax._src import core as jax_core  # whether a call is staged into an outer jit

# Comma-separated enum names replace the default list of YNNPACK fusions (reduce,
# individual dot, individual convolution) with the list minus convolution.
CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    )
}


# LLVM at -O0 and without its expensive passes; XLA's HLO optimisations still run.
ONCE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


# XLA:GPU runs a conditional by copying its predicate to the host and waiting, and a
# while loop the same way per iteration unless its trip count is static. CUDA-graph
# command buffers can hold conditionals and loops and evaluate them on the device;
# XLA leaves both out of command buffers by default, and turns only sequences of at
# least `xla_gpu_graph_min_graph_size` commands (default 5) into graphs.
_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
GPU_FLAG_SETS = {
    "XLA defaults": "",
    "command buffers with loops and conditionals": (
        f"{_COMMAND_BUFFERS} --xla_gpu_graph_min_graph_size=1"
    ),
    # Overlaps independent work (in the step: the optimiser's updates, parameter
    # gathers) with the convolutions instead of the default scheduler's order.
    "latency-hiding scheduler": "--xla_gpu_enable_latency_hiding_scheduler=true",
    # Autotuning off: the first cuDNN algorithm, compiled fast; says what the
    # autotuner's choice of convolution algorithms is worth to the step.
    "autotuning off": "--xla_gpu_autotune_level=0",
}
# What GPU runs use (`gpu_xla_flags`, which results/cifar10_gpu/run.sh puts in XLA_FLAGS):
# the measured choice goes here, with a comment naming the result file and section.
GPU_FLAGS = GPU_FLAG_SETS["XLA defaults"]


def gpu_xla_flags(existing: str = "") -> str:
    """`GPU_FLAGS` followed by `existing` XLA_FLAGS (later flags win, so the caller's do)."""
    return " ".join(f for f in (GPU_FLAGS, existing) if f)


def compiler_options(platform: str | None = None, *, once: bool = False) -> dict[str, Any] | None:
    """`CPU_OPTIONS` (with `once`: `ONCE_OPTIONS` too) for the CPU, else None.

    `platform` defaults to the default backend.
    """
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return None
    return {**CPU_OPTIONS, **ONCE_OPTIONS} if once else dict(CPU_OPTIONS)


def _nested() -> bool:
    """Whether this call is being traced into an enclosing jit (False where this JAX
    lacks the private check: nesting then fails as it does with plain JAX)."""
    under_jit = getattr(jax_core, "unsafe_am_i_under_a_jit", None)
    return bool(under_jit and under_jit())


def jit(fun: Callable | None = None, /, **kwargs: Any) -> Callable:
    """`jax.jit(fun, **kwargs)` compiled with `compiler_options()`; usable as a decorator.

    The backend is looked up at the first call (or `.lower`), not when a module
    applies the decorator, so XLA_FLAGS set after importing rvm still count.
    Called while an enclosing jit is being traced, it is a plain `jax.jit`: JAX takes
    compile options only on the outermost jit, whose compilation covers this one
    (wrap the outer function in `rvm.train.xla.jit` to keep the options).
    """
    if fun is None:
        return functools.partial(jit, **kwargs)

    @functools.cache
    def jitted(nested: bool = False):
        return jax.jit(fun, compiler_options=None if nested else compiler_options(), **kwargs)

    @functools.wraps(fun)
    def call(*args, **kw):
        return jitted(_nested())(*args, **kw)

    call.lower = lambda *args, **kw: jitted().lower(*args, **kw)
    return call
