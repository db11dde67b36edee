"""One measurement in its own process: `python -m bench.measure SPEC_JSON RESULT_PATH`.

`bench/run.py` starts one of these per measurement, so JAX and PyTorch never
share a process's threads or memory, XLA flags can differ per measurement, and
the peak RSS (`ru_maxrss`) belongs to that measurement alone. A measurement
imports only the framework it measures: rvm's are in `measure_rvm.py`, the
PyTorch twin's in `measure_torch.py`, the matmul ceiling of all three libraries
here; `timing.py` times them all alike.

A spec's `platform` ("cpu" or "gpu", default "cpu") says where the model runs (the
parent sets JAX_PLATFORMS to match), its `dtype` ("float32" or "bfloat16") how it
computes: rvm's `model.dtype` (parameters and BatchNorm statistics stay float32),
PyTorch's `torch.autocast`.
"""

from __future__ import annotations

import json
import sys
from functools import partial

from bench import measure_rvm, measure_torch, timing


def matmul(spec: dict) -> dict:
    """An n x n matrix product (2 n^3 FLOPs) with numpy's BLAS, PyTorch or XLA, in the spec's dtype.

    Each library reaches a different fraction of the hardware (on the 2-core VM
    XLA's, through YNNPACK, ran at 1.4x numpy's and 1.8x PyTorch's rate in
    `bench/results/cpu.md`), so the ceiling is the fastest of them. On the GPU,
    float32 means float32: PyTorch's TF32 matrix products stay off, XLA's product
    runs at HIGHEST precision.
    """
    n, library = spec["n"], spec["library"]
    if library == "torch":
        import torch

        device = measure_torch.torch_device(torch, spec)
        torch.backends.cuda.matmul.allow_tf32 = False
        dtype = getattr(torch, timing.spec_dtype(spec))
        a, b = (torch.rand(n, n, device=device).to(dtype) for _ in range(2))
        sync = measure_torch.torch_sync(torch, device)
        step = lambda: a @ b
    elif library == "jax":
        import jax
        import jax.numpy as jnp

        from rvm.train import xla

        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        a, b = (jax.random.uniform(k, (n, n), dtype=timing.spec_dtype(spec)) for k in (ka, kb))
        product = xla.jit(partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST))
        sync = jax.block_until_ready
        step = lambda: product(a, b)
    elif library == "numpy":
        import numpy as np

        if timing.spec_dtype(spec) != "float32" or spec.get("platform", "cpu") != "cpu":
            raise ValueError("numpy's matmul measures the CPU in float32 only")
        rng = np.random.default_rng(0)
        a, b = (rng.random((n, n), dtype=np.float32) for _ in range(2))
        sync = timing.synchronous
        step = lambda: a @ b
    else:
        raise ValueError(f"library={library!r}: 'numpy', 'torch' or 'jax'")
    result = timing.time_windows(step, sync, spec)
    result["gflops"] = 2 * n**3 / result["step_s"] / 1e9
    return result


KINDS = {
    "rvm_train": measure_rvm.rvm_train,
    "rvm_loop": measure_rvm.rvm_loop,
    "rvm_eval": measure_rvm.rvm_eval,
    "rvm_pack": measure_rvm.rvm_pack,
    "rvm_processes": measure_rvm.rvm_processes,
    "torch_train": measure_torch.torch_train,
    "torch_eval": measure_torch.torch_eval,
    "matmul": matmul,
    "jax_conv": measure_rvm.jax_conv,
    "torch_conv": measure_torch.torch_conv,
}


def main(argv: list[str]) -> None:
    spec, out_path = json.loads(argv[0]), argv[1]
    result = KINDS[spec["kind"]](spec)
    result["max_rss_mb"] = timing.peak_rss_mb()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
