"""One measurement in its own process: `python -m bench.measure SPEC_JSON RESULT_PATH`.

`bench/run.py` starts one of these per measurement, so JAX and PyTorch never
share a process's threads or memory, XLA flags can differ per measurement, and
the peak RSS (`ru_maxrss`) belongs to that measurement alone. A measurement
imports only the framework it measures. Timing: `time.perf_counter` around
windows of `steps` steps after warm-up, JAX results blocked on and CUDA
synchronised; the result holds every window's seconds per step and their median.

A spec's `platform` ("cpu" or "gpu", default "cpu") says where the model runs (the
parent sets JAX_PLATFORMS to match), its `dtype` ("float32" or "bfloat16") how it
computes: rvm's `model.dtype` (parameters and BatchNorm statistics stay float32),
PyTorch's `torch.autocast`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench import hlo
from bench.plan import NUM_CLASSES

IMAGE_SHAPE = (32, 32, 3)
SYNTHETIC_IMAGES = 2048  # synthetic training split the batches are drawn from


def _rss_mb() -> float:
    """Current resident set size, for the baseline before any model is built."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _dtype(spec: dict) -> str:
    dtype = spec.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: 'float32' or 'bfloat16'")
    return dtype


def _synchronous(out: Any) -> Any:
    """Nothing to wait for: the call returned when its work was done (eager CPU, host values)."""
    return out


def _barrier(spec: dict) -> None:
    """Waits until the spec's `barrier` (`{"dir": ..., "n": ...}`) has `n` processes at it:
    processes measured together (section `packed`) time the same seconds."""
    barrier = spec.get("barrier")
    if not barrier:
        return
    folder = Path(barrier["dir"])
    (folder / str(os.getpid())).touch()
    deadline = time.time() + 900
    while len(list(folder.iterdir())) < barrier["n"]:
        if time.time() > deadline:
            raise TimeoutError(f"{barrier['n']} processes never met at {folder}")
        time.sleep(0.05)


def _time_windows(step: Callable[[], Any], sync: Callable[[Any], Any], spec: dict) -> dict:
    """First call (compilation included), warm-up, then `windows` timed windows of `steps`."""
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    for _ in range(max(spec["warmup"] - 1, 0)):
        sync(step())
    _barrier(spec)
    windows = []
    for _ in range(spec["windows"]):
        start = time.perf_counter()
        out = None
        for _ in range(spec["steps"]):
            out = step()
        sync(out)
        windows.append((time.perf_counter() - start) / spec["steps"])
    return {"first_call_s": first, "windows_s": windows, "step_s": statistics.median(windows)}


# --- rvm ---------------------------------------------------------------------------------


def _xla_options(spec: dict) -> None:
    """`"xla": "default"` compiles with XLA:CPU's defaults instead of `rvm.train.xla`'s options."""
    if spec.get("xla", "rvm") == "default":
        from rvm.train import xla

        xla.compiler_options = lambda platform=None, once=False: None
    elif spec.get("xla", "rvm") != "rvm":
        raise ValueError(f"xla={spec['xla']!r}: 'rvm' or 'default'")


def rvm_config(spec: dict):
    """The CIFAR-10 config on synthetic images, with the spec's model, batch and `unroll`."""
    from experiments.configs.cifar10 import get_config

    config = get_config()
    config.data.source = "synthetic"
    config.data.synthetic_train = max(SYNTHETIC_IMAGES, spec["batch"])
    config.data.synthetic_test = spec.get("eval_batch", 512)
    config.batch_size = spec["batch"]
    config.eval_batch_size = spec.get("eval_batch", spec["batch"])
    config.model.blocks_per_level = tuple(spec["blocks"])
    config.model.sharing = spec["sharing"]
    config.model.scope = spec.get("scope", "all")
    config.model.stochastic_depth = spec["stochastic_depth"]
    config.model.unroll = bool(spec.get("unroll"))
    config.model.dtype = _dtype(spec)
    config.model.sd_impl = spec.get("sd_impl", "auto")
    config.model.conv_impl = spec.get("conv_impl", "xla")
    return config


def rvm_train(spec: dict) -> dict:
    """rvm's real jitted, donated train step from `build_run` (optionally blocks unrolled).

    `"stages": true` traces, lowers and compiles the step ahead of time and times each.
    """

    dump = hlo.dump_to(spec)
    import jax

    from rvm.data import load_images
    from rvm.models import sharing, stochastic_depth
    from rvm.train import loop
    from rvm.train import sharding as shd

    _xla_options(spec)
    config = rvm_config(spec)
    data = load_images(config.data)
    devices = jax.devices()
    if len(devices) != spec["devices"]:
        raise RuntimeError(f"{len(devices)} devices, spec asks for {spec['devices']}")
    baseline = _rss_mb()

    start = time.perf_counter()
    run = loop.build_run(config, data, shd.data_mesh(devices))
    jax.block_until_ready(run.state)
    init_s = time.perf_counter() - start

    box = {"state": run.state}
    step_fn, stages = run.step_fn, {}
    if spec.get("stages"):
        # Ahead of time, each stage on its own clock; the first call is then execution only.
        t0 = time.perf_counter()
        traced = run.step_fn.trace(run.state, run.train_data)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        step_fn = lowered.compile()
        t3 = time.perf_counter()
        stages = {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2}

    def step():
        box["state"], metrics = step_fn(box["state"], run.train_data)
        return box["state"], metrics

    result = _time_windows(step, jax.block_until_ready, spec)
    loss = float(jax.device_get(step()[1]["loss"]))
    return {
        **result,
        **stages,
        "init_s": init_s,
        "final_loss": loss,
        "params": sharing.count_params(box["state"].params),
        "baseline_rss_mb": baseline,
        "device_peak_mb": _device_peak_mb(jax),
        "sd_impl": stochastic_depth.sd_impl_for(config.model.sd_impl),
        **hlo.counted(dump),
    }


def _device_peak_mb(jax) -> float | None:
    """Peak bytes in use on the first device (GPUs report it; XLA:CPU does not)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def rvm_pack(spec: dict) -> dict:
    """`pack` runs of one variant trained as one pack under `strategy`: the loop's step of
    `rvm.train.loop.build_pack` (which also sums each run's epoch metrics on device)."""
    import jax

    from rvm.data import load_images
    from rvm.train import loop

    config = rvm_config(spec)
    k = spec["pack"]
    config.seeds, config.pack_strategy = tuple(range(k)), spec["strategy"]
    data = load_images(config.data)
    baseline = _rss_mb()
    runs = loop.build_pack(config, data)
    box = {"states": runs.states, "sums": runs.sums}

    def step():
        box["states"], box["sums"] = runs.epoch_step(
            box["states"], box["sums"], runs.run.train_data
        )
        return box["states"]

    result = _time_windows(step, jax.block_until_ready, spec)
    return {
        **result,
        "images_per_s": k * spec["batch"] / result["step_s"],
        "baseline_rss_mb": baseline,
        "device_peak_mb": _device_peak_mb(jax),
    }


def rvm_processes(spec: dict) -> dict:
    """`processes` copies of the `run` spec at once, each in its own process, timed over
    the same seconds; `step_s` is the time per step of all of them together."""
    n, run = spec["processes"], spec["run"]
    env = dict(os.environ)
    if run.get("platform", "cpu") == "gpu":  # each process takes its share of the GPU
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false")
    with tempfile.TemporaryDirectory(prefix="rvm_processes_") as tmp:
        meet = Path(tmp) / "barrier"
        meet.mkdir()
        outs = [Path(tmp) / f"{i}.json" for i in range(n)]
        child = {**run, "barrier": {"dir": str(meet), "n": n}}
        cmd = lambda out: [sys.executable, "-m", "bench.measure", json.dumps(child), str(out)]
        procs = [subprocess.Popen(cmd(out), env=env) for out in outs]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"a process of {n} failed: exit {[p.returncode for p in procs]}")
        results = [json.loads(out.read_text()) for out in outs]
    # Window j of every process covers about the same seconds: their images add up.
    windows = [
        n * run["batch"] / sum(run["batch"] / r["windows_s"][j] for r in results)
        for j in range(run["windows"])
    ]
    peaks = [r.get("device_peak_mb") for r in results]
    return {
        "first_call_s": max(r["first_call_s"] for r in results),
        "windows_s": windows,
        "step_s": statistics.median(windows),
        "images_per_s": n * run["batch"] / statistics.median(windows),
        "processes_rss_mb": sum(r["max_rss_mb"] for r in results),
        "device_peak_mb": None if None in peaks else sum(peaks),
    }


def rvm_loop(spec: dict) -> dict:
    """`rvm.train.loop.train_and_evaluate` itself on synthetic images, `epochs` epochs of
    `epoch_steps` steps, the `test_images` evaluated after each epoch and a checkpoint
    written, as in a real run. A window is one epoch after the first (which compiles):
    its seconds per step from the loop's own `images_per_sec` in metrics.jsonl (the
    epoch's wall time, evaluation included)."""
    import tempfile
    from pathlib import Path

    from rvm.models import stochastic_depth
    from rvm.train import loop

    config = rvm_config(spec)
    config.data.synthetic_train = spec["epoch_steps"] * spec["batch"]
    config.data.synthetic_test = spec["test_images"]
    config.eval_batch_size = min(1000, spec["test_images"])
    config.num_epochs = spec["epochs"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rvm_loop_") as workdir:
        loop.train_and_evaluate(config, workdir, max_steps=spec["epochs"] * spec["epoch_steps"])
        wall = time.perf_counter() - start
        lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    windows = [spec["batch"] / e["images_per_sec"] for e in epochs[1:]]
    return {
        "first_call_s": spec["batch"] / epochs[0]["images_per_sec"] * spec["epoch_steps"],
        "windows_s": windows,
        "step_s": statistics.median(windows),
        "loop_wall_s": wall,
        "eval_s": [e.get("eval_sec", float("nan")) for e in epochs],
        "sd_impl": stochastic_depth.sd_impl_for(config.model.sd_impl),
    }


def rvm_eval(spec: dict) -> dict:
    """`rvm.train.image_task.evaluate` over one eval batch of synthetic images per call."""
    import jax

    from rvm.data import load_images, normalization_stats
    from rvm.models import sharing
    from rvm.train import image_task

    config = rvm_config(spec)
    data = load_images(config.data)
    baseline = _rss_mb()
    model = sharing.build_model(config.model, data.num_classes)
    dummy = jax.numpy.zeros((1, *IMAGE_SHAPE))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), dummy)
    stats = normalization_stats(data.train_images, config.data.normalization)
    images, labels = data.test_images, data.test_labels

    def step():
        return image_task.evaluate(model, variables, images, labels, stats, len(labels))

    return {**_time_windows(step, _synchronous, spec), "baseline_rss_mb": baseline}


def _conv_pass(spec: dict, passes: dict) -> Any:
    """What runs for the spec's `pass`: the forward convolution, either gradient alone
    (`input_grad`, `kernel_grad`), or all three (`train`)."""
    if spec["pass"] not in passes:
        raise ValueError(f"pass={spec['pass']!r}: one of {', '.join(passes)}")
    return passes[spec["pass"]]


def _conv_flops(spec: dict) -> float:
    """FLOPs of one call: a 3x3 same-size conv, x3 with both gradients (`pass` = train)."""
    hw, c = spec["size"], spec["channels"]
    return 2 * spec["batch"] * hw * hw * c * c * 9 * (3 if spec["pass"] == "train" else 1)


def jax_conv_passes() -> dict[str, Callable]:
    """pass -> f(x, kernel, g) of rvm's `conv3x3`. Each returns exactly what its pass
    computes, so XLA keeps that work and drops the rest: a gradient alone is one
    convolution, `train` three (its output is returned so the forward pass stays)."""
    import jax

    from rvm.models.conv import conv3x3

    def train(x, k, g):
        y, vjp = jax.vjp(conv3x3, x, k)
        return y, vjp(g)

    return {
        "forward": lambda x, k, g: conv3x3(x, k),
        "input_grad": lambda x, k, g: jax.vjp(lambda x: conv3x3(x, k), x)[1](g),
        "kernel_grad": lambda x, k, g: jax.vjp(lambda k: conv3x3(x, k), k)[1](g),
        "train": train,
    }


def jax_conv(spec: dict) -> dict:
    """rvm's `conv3x3` alone, one of `jax_conv_passes`."""
    import jax

    from rvm.train import xla

    _xla_options(spec)
    n, hw, c = spec["batch"], spec["size"], spec["channels"]
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (n, hw, hw, c))
    kernel = jax.random.normal(kk, (3, 3, c, c))
    g = jax.random.normal(kg, (n, hw, hw, c))
    f = xla.jit(_conv_pass(spec, jax_conv_passes()))
    result = _time_windows(lambda: f(x, kernel, g), jax.block_until_ready, spec)
    return {**result, "gflops": _conv_flops(spec) / result["step_s"] / 1e9}


def torch_conv(spec: dict) -> dict:
    """`nn.Conv2d(c, c, 3, padding=1, bias=False)` channels_last: forward (no_grad), one gradient
    (`torch.nn.grad`, PyTorch's convolution backward for that input alone), or forward +
    backward."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    n, hw, c = spec["batch"], spec["size"], spec["channels"]
    # No bias, as rvm's `conv3x3`.
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(n, c, hw, hw).to(memory_format=torch.channels_last)
    g = torch.randn(n, c, hw, hw).to(memory_format=torch.channels_last)
    xg = x.detach().clone().requires_grad_()

    def train():
        xg.grad = None
        conv.zero_grad(set_to_none=True)
        conv(xg).backward(g)
        return xg.grad

    def no_grad(f):
        def run():
            with torch.no_grad():
                return f()

        return run

    step = _conv_pass(
        spec,
        {
            "forward": no_grad(lambda: conv(x)),
            "input_grad": no_grad(
                lambda: torch.nn.grad.conv2d_input(x.shape, conv.weight, g, padding=1)
            ),
            "kernel_grad": no_grad(
                lambda: torch.nn.grad.conv2d_weight(x, conv.weight.shape, g, padding=1)
            ),
            "train": train,
        },
    )

    result = _time_windows(step, _synchronous, spec)
    return {**result, "gflops": _conv_flops(spec) / result["step_s"] / 1e9}


# --- PyTorch -----------------------------------------------------------------------------


def _torch_device(torch, spec: dict):
    """CPU threads, or the GPU with cuDNN autotuning (fixed shapes, as XLA autotunes)."""
    if spec.get("platform", "cpu") == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("platform 'gpu' but PyTorch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda")


def _torch_sync(torch, device) -> Callable[[Any], Any]:
    """What ends a timed window: eager CPU work is done when the call returns."""
    if device.type == "cuda":
        return lambda out: torch.cuda.synchronize()
    return _synchronous


def _autocast(torch, device, spec: dict):
    """`torch.autocast` to bfloat16 for dtype bfloat16, else a no-op context."""
    return torch.autocast(device.type, torch.bfloat16, enabled=_dtype(spec) == "bfloat16")


def _torch_setup(spec: dict):
    """Device, the twin model (channels_last if asked), a uint8 NHWC synthetic split on it,
    and the RSS once the data is there and before the model is built (as rvm's)."""
    import torch

    from bench.torch_resnet import TorchResNet

    device = _torch_device(torch, spec)
    torch.manual_seed(0)
    shared = spec["sharing"] == "raw"
    if shared and spec.get("scope", "all") != "all":
        raise ValueError("the twin benchmarks raw sharing on all levels only")
    n = max(SYNTHETIC_IMAGES, spec["batch"], spec.get("eval_batch", 0))
    images = torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8).to(device)
    labels = torch.randint(0, NUM_CLASSES, (n,)).to(device)
    as_float = images.float()
    mean, std = as_float.mean(0), as_float.std(0) + 1e-6  # per-feature, as rvm's default
    baseline = _rss_mb()
    rate = 0.5 if spec["stochastic_depth"] else 0.0
    model = TorchResNet(spec["blocks"], (shared,) * 3, NUM_CLASSES, final_death_rate=rate)
    model = model.to(device)
    if spec["layout"] == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return torch, device, model, images, labels, mean, std, baseline


def _to_input(torch, images, mean, std, layout: str):
    """uint8 NHWC -> normalised float NCHW; the permuted view already is channels_last."""
    x = ((images.float() - mean) / std).permute(0, 3, 1, 2)
    return x.contiguous() if layout == "nchw" else x


def torch_train(spec: dict) -> dict:
    """Eager (or `torch.compile`d model) step: gather, flip, forward, backward, SGD-Nesterov.

    With dtype bfloat16 the forward pass and loss run under `torch.autocast`.
    """
    torch, device, model, images, labels, mean, std, baseline = _torch_setup(spec)
    import torch.nn.functional as F

    model.train()
    forward = torch.compile(model) if spec.get("compile") else model
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    gen = torch.Generator(device).manual_seed(0)
    batch = spec["batch"]

    def step():
        idx = torch.randint(len(labels), (batch,), generator=gen, device=device)
        x = images[idx]
        flip = torch.rand(batch, generator=gen, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        with _autocast(torch, device, spec):
            logits = forward(_to_input(torch, x, mean, std, spec["layout"]))
            loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    result = _time_windows(step, _torch_sync(torch, device), spec)
    return {**result, "final_loss": float(step().detach()), "baseline_rss_mb": baseline}


def torch_eval(spec: dict) -> dict:
    """`torch.no_grad()` evaluation of one eval batch: normalise, forward, error and loss."""
    torch, device, model, images, labels, mean, std, baseline = _torch_setup(spec)
    import torch.nn.functional as F

    model.eval()
    n = spec["eval_batch"]
    images, labels = images[:n], labels[:n]

    def step():
        with torch.no_grad(), _autocast(torch, device, spec):
            logits = model(_to_input(torch, images, mean, std, spec["layout"])).float()
            wrong = (logits.argmax(-1) != labels).sum().item()
            return wrong, F.cross_entropy(logits, labels, reduction="sum").item()

    return {**_time_windows(step, _synchronous, spec), "baseline_rss_mb": baseline}


# --- The machine's ceiling --------------------------------------------------------------


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

        device = _torch_device(torch, spec)
        torch.backends.cuda.matmul.allow_tf32 = False
        dtype = getattr(torch, _dtype(spec))
        a, b = (torch.rand(n, n, device=device).to(dtype) for _ in range(2))
        sync = _torch_sync(torch, device)
        step = lambda: a @ b
    elif library == "jax":
        import jax
        import jax.numpy as jnp

        from rvm.train import xla

        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        a, b = (jax.random.uniform(k, (n, n), dtype=_dtype(spec)) for k in (ka, kb))
        product = xla.jit(partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST))
        sync = jax.block_until_ready
        step = lambda: product(a, b)
    elif library == "numpy":
        import numpy as np

        if _dtype(spec) != "float32" or spec.get("platform", "cpu") != "cpu":
            raise ValueError("numpy's matmul measures the CPU in float32 only")
        rng = np.random.default_rng(0)
        a, b = (rng.random((n, n), dtype=np.float32) for _ in range(2))
        sync = _synchronous
        step = lambda: a @ b
    else:
        raise ValueError(f"library={library!r}: 'numpy', 'torch' or 'jax'")
    result = _time_windows(step, sync, spec)
    result["gflops"] = 2 * n**3 / result["step_s"] / 1e9
    return result


KINDS = {
    "rvm_train": rvm_train,
    "rvm_loop": rvm_loop,
    "rvm_eval": rvm_eval,
    "rvm_pack": rvm_pack,
    "rvm_processes": rvm_processes,
    "torch_train": torch_train,
    "torch_eval": torch_eval,
    "matmul": matmul,
    "jax_conv": jax_conv,
    "torch_conv": torch_conv,
}


def main(argv: list[str]) -> None:
    spec, out_path = json.loads(argv[0]), argv[1]
    result = KINDS[spec["kind"]](spec)
    result["max_rss_mb"] = _peak_rss_mb()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
