"""`jax.jit` with the XLA:CPU options rvm's convolutions run fastest under.

XLA:CPU hands convolutions to YNNPACK by default. For these networks' 3x3
convolutions (16-64 channels, 8x8 to 32x32 maps, batch 128) its own Eigen
convolutions are faster on the project's 2-core VM, per convolution and per
training step (`bench/results/cpu.md`, sections `convs` and `xla_cpu`). The
options keep YNNPACK for the reductions and matrix products it handles by default
and take convolutions away from it. They are compile options of each jit,
not process-wide XLA_FLAGS, so importing rvm changes nothing else in the process;
other backends compile without them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

# Comma-separated enum names replace the default list of YNNPACK fusions (reduce,
# individual dot, individual convolution) with the list minus convolution.
CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    )
}


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """`CPU_OPTIONS` for the CPU (default: the default backend), else None."""
    platform = platform or jax.default_backend()
    return dict(CPU_OPTIONS) if platform == "cpu" else None


def jit(fun: Callable | None = None, /, **kwargs: Any) -> Callable:
    """`jax.jit(fun, **kwargs)` compiled with `compiler_options()`; usable as a decorator.

    The backend is looked up at the first call (or `.lower`), not when a module
    applies the decorator, so XLA_FLAGS set after importing rvm still count.
    """
    if fun is None:
        return functools.partial(jit, **kwargs)

    @functools.cache
    def jitted():
        return jax.jit(fun, compiler_options=compiler_options(), **kwargs)

    @functools.wraps(fun)
    def call(*args, **kw):
        return jitted()(*args, **kw)

    call.lower = lambda *args, **kw: jitted().lower(*args, **kw)
    return call
