"""Training-step throughput of a residual stack, unrolled vs `nn.scan`, nn.Conv vs Conv3x3.

Why: on XLA:CPU the backward convolutions of `nn.Conv` inside a scan (a while
loop) fall onto a slow generic path; `rvm.models.conv.Conv3x3` avoids that.
This measures all four combinations (plus a scan whose two kernels are shared
by every block, as in the raw-shared ResNet) on one SGD step with BatchNorm in
training mode. It isolates the convolution's gradient: flax's `nn.BatchNorm` and a
plain `jax.jit` (XLA's default options), not rvm's BatchNorm or `rvm.train.xla`, so
its step times are not comparable with `bench/run.py`'s.

    python -m bench.conv_scan --blocks 9 --batch 128 --steps 3   # from the repo root
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rvm.models.conv import Conv3x3

WIDTH, SIZE, CLASSES = 16, 32, 10


def _bn(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=False, momentum=0.9, name=name)


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN + identity, ReLU; kernels its own or (`kernels`) given."""

    fast: bool

    @nn.compact
    def __call__(self, x, kernels=None):
        def conv(name: str, inputs: jax.Array, kernel: jax.Array | None) -> jax.Array:
            if self.fast:
                return Conv3x3(WIDTH, name=name)(inputs, kernel)
            return nn.Conv(WIDTH, (3, 3), padding=1, name=name)(inputs)

        k1, k2 = kernels if kernels is not None else (None, None)
        y = nn.relu(_bn("bn1")(conv("conv1", x, k1)))
        y = _bn("bn2")(conv("conv2", y, k2))
        return nn.relu(x + y)


class ScanBlock(nn.Module):
    fast: bool

    @nn.compact
    def __call__(self, x, kernels):
        return Block(self.fast, name="block")(x, kernels), None


class Stack(nn.Module):
    blocks: int
    scan: bool
    fast: bool
    shared: bool = False

    @nn.compact
    def __call__(self, x):
        if self.scan:
            kernels = None
            if self.shared:
                shape = (3, 3, WIDTH, WIDTH)
                kernels = tuple(self.param(n, Conv3x3.kernel_init, shape) for n in ("k1", "k2"))
            body = nn.scan(
                ScanBlock,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.blocks,
            )
            x, _ = body(self.fast, name="blocks")(x, kernels)
        else:
            for i in range(self.blocks):
                x = Block(self.fast, name=f"block{i}")(x)
        return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))


VARIANTS: dict[str, dict[str, Any]] = {
    "a": dict(scan=False, fast=False, label="unrolled, nn.Conv"),
    "b": dict(scan=True, fast=False, label="nn.scan,  nn.Conv"),
    "c": dict(scan=False, fast=True, label="unrolled, Conv3x3"),
    "d": dict(scan=True, fast=True, label="nn.scan,  Conv3x3"),
    "e": dict(scan=True, fast=True, shared=True, label="nn.scan,  Conv3x3 shared"),
}


def measure(
    name: str, blocks: int, batch: int, steps: int, slow: float
) -> tuple[float, int, float, float]:
    """(compile s, steps timed, wall s/step, CPU s/step) of one jitted SGD step.

    CPU seconds (all threads) are reported too because on a shared machine wall
    time moves with other people's load while the work done barely does. A step
    whose warm-up call alone takes over `slow` seconds (the scanned nn.Conv, ~1
    min) is reported from that call (0 steps timed): its first-call overhead is
    noise next to its compute, and more calls would blow the time budget.
    """
    spec = VARIANTS[name]
    model = Stack(blocks, spec["scan"], spec["fast"], spec.get("shared", False))
    x = jax.random.normal(jax.random.key(0), (batch, SIZE, SIZE, WIDTH))
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, CLASSES)
    variables = model.init(jax.random.key(2), x)
    opt = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], opt.init(variables["params"]))

    def step(state, x, labels):
        params, stats, opt_state = state

        def loss_fn(params):
            logits, new = model.apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, x, labels).compile()
    compile_s = time.perf_counter() - start

    def run(calls: int) -> tuple[float, float]:
        nonlocal state
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            state, loss = compiled(state, x, labels)
        jax.block_until_ready((state, loss))
        return (time.perf_counter() - start) / calls, (time.process_time() - cpu) / calls

    wall, cpu = run(1)  # warm-up
    if wall > slow:
        return compile_s, 0, wall, cpu
    return compile_s, steps, *run(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=9)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--variants", default="abcd", help=f"subset of {''.join(VARIANTS)}")
    parser.add_argument("--slow", type=float, default=10.0, help="see `measure` (seconds)")
    args = parser.parse_args()

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.blocks} blocks, "
        f"{WIDTH} ch, {SIZE}x{SIZE}, batch {args.batch}"
    )
    print(
        f"{'variant':<30}{'compile s':>10}{'timed':>6}{'s/step':>9}{'CPU s/step':>11}{'img/s':>8}"
    )
    for name in args.variants:
        compile_s, timed, wall, cpu = measure(name, args.blocks, args.batch, args.steps, args.slow)
        label = f"({name}) {VARIANTS[name]['label']}"
        row = f"{compile_s:>10.2f}{timed:>6}{wall:>9.3f}{cpu:>11.3f}{args.batch / wall:>8.1f}"
        print(label.ljust(30) + row, flush=True)


if __name__ == "__main__":
    main()
