"""rvm's measurements, each in a child process of `bench/run.py`: the real train step of
`build_run`, packed runs, several processes at once, the real loop, evaluation, and
rvm's 3x3 convolution alone. JAX and rvm are imported inside each, so PyTorch's
children never load them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import hlo, plan, timing
from bench.plan import IMAGE_SHAPE, SYNTHETIC_IMAGES


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
    config.model.dtype = timing.spec_dtype(spec)
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
    baseline = timing.rss_mb()

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

    result = timing.time_windows(step, jax.block_until_ready, spec)
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
    baseline = timing.rss_mb()
    runs = loop.build_pack(config, data)
    box = {"states": runs.states, "sums": runs.sums}

    def step():
        box["states"], box["sums"] = runs.epoch_step(
            box["states"], box["sums"], runs.run.train_data
        )
        return box["states"]

    result = timing.time_windows(step, jax.block_until_ready, spec)
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
    written, as in a real run. A window is one epoch after the first (which compiles).
    An epoch's wall time comes from the loop's own `images_per_sec` in metrics.jsonl; it
    holds the epoch's training steps, its evaluation (`eval_sec` of the same record) and
    the checkpoint written after the previous epoch (timed here around
    `Checkpoints.save`, which writes synchronously). `step_s` is the training steps'
    alone: the epoch less those two, per step; `epoch_step_s` the whole epoch's."""
    from rvm.models import stochastic_depth
    from rvm.train import checkpoint, loop, metrics

    saves: dict[int, float] = {}  # step -> seconds its checkpoint took to write
    save = checkpoint.Checkpoints.save

    def timed_save(self, step, *args, **kwargs):
        start = time.perf_counter()
        save(self, step, *args, **kwargs)
        saves[step] = time.perf_counter() - start

    checkpoint.Checkpoints.save = timed_save
    config = rvm_config(spec)
    config.data.synthetic_train = spec["epoch_steps"] * spec["batch"]
    config.data.synthetic_test = spec["test_images"]
    config.eval_batch_size = min(1000, spec["test_images"])
    config.num_epochs = spec["epochs"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rvm_loop_") as workdir:
        loop.train_and_evaluate(config, workdir, max_steps=spec["epochs"] * spec["epoch_steps"])
        wall = time.perf_counter() - start
        epochs = metrics.read_jsonl(Path(workdir) / "metrics.jsonl")
    steps = spec["epoch_steps"]
    epoch_s = [steps * spec["batch"] / e["images_per_sec"] for e in epochs]
    eval_s = [e["eval_sec"] for e in epochs]
    # The checkpoint written at the end of the previous epoch (none before the first).
    ckpt_s = [saves.get(e["step"] - steps, 0.0) for e in epochs]
    train_s = [t - v - c for t, v, c in zip(epoch_s, eval_s, ckpt_s)]
    windows = [t / steps for t in train_s[1:]]
    return {
        "first_call_s": epoch_s[0],
        "windows_s": windows,
        "step_s": statistics.median(windows),
        "epoch_windows_s": [t / steps for t in epoch_s[1:]],
        "epoch_step_s": statistics.median([t / steps for t in epoch_s[1:]]),
        "loop_wall_s": wall,
        "eval_s": eval_s,
        "checkpoint_s": [saves[step] for step in sorted(saves)],
        "sd_impl": stochastic_depth.sd_impl_for(config.model.sd_impl),
    }


def rvm_eval(spec: dict) -> dict:
    """`rvm.tasks.image.evaluate` over one eval batch of synthetic images per call."""
    import jax

    from rvm.data import load_images, normalization_stats
    from rvm.models import sharing
    from rvm.tasks import image as image_task

    config = rvm_config(spec)
    data = load_images(config.data)
    baseline = timing.rss_mb()
    model = sharing.build_model(config.model, data.num_classes)
    dummy = jax.numpy.zeros((1, *IMAGE_SHAPE))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), dummy)
    stats = normalization_stats(data.train_images, config.data.normalization)
    images, labels = data.test_images, data.test_labels

    def step():
        return image_task.evaluate(model, variables, images, labels, stats, len(labels))

    return {**timing.time_windows(step, timing.synchronous, spec), "baseline_rss_mb": baseline}


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
    f = xla.jit(plan.conv_pass(spec, jax_conv_passes()))
    result = timing.time_windows(lambda: f(x, kernel, g), jax.block_until_ready, spec)
    return {**result, "gflops": plan.conv_flops(spec) / result["step_s"] / 1e9}
