"""A weight-tied recurrent CNN that can think longer at test time (Bansal et al. 2022).

The network embeds its input x, iterates ONE block `iterations` times and reads
out per-position logits:

    h_0 = relu(embed(x));  h_t = F(h_{t-1}, x);  logits = head(h_T)

F is `blocks` residual blocks (conv-relu-conv, identity shortcut, relu), run
under `nn.scan` with its parameters broadcast to every iteration, so the
parameter count does not depend on the iteration count and any count can be run
after training. With `recall`, F first concatenates the input to the state and
projects back to `width` channels, so late iterations still see the problem;
without it (the plain recurrent net) x enters through h_0 alone.

Convolutions are 3x3 over images (`dims=2`, mazes) or width 3 over sequences
(`dims=1`, prefix sums), without bias, with the VJP of `rvm.models.conv` that keeps
their backward pass fast inside a scan on XLA:CPU (a width-64 prefix-sum step: 2.0 s
with `nn.Conv`, 0.14 s with it, on the 2-core CPU). With `head_kernel=1` the head
reads each position's answer from that position's state alone, so the answer must be
in the state, not assembled by the head from neighbours: prefix-sum nets trained with
a 3-wide head stalled once they had the first two bits (which the head can compute
from raw bits), and learned the task with a pointwise one. There is no normalisation by default:
BatchNorm statistics would be those of the trained iteration counts and mean
something else after more iterations; `norm="layer"` normalises each position
over its channels, which means the same at every iteration.

With an `equilibrium` spec, `solve` runs F to its fixed point h* = F(h*, x) instead
(`rvm.models.equilibrium`: no tape through the solve, implicit or phantom gradients);
the parameters are those of the iterated net, so every curve below applies to it too:
plain iteration from h_0 is the solver without acceleration.

`iterations` is a Python int, static per compiled program. `encode`, `step` and
`readout` are the pieces, for training schemes that run some iterations outside
the scan (`rvm.tasks.thinking.progressive`); `trajectory` emits a value after every
iteration from one scan, for evaluating every count in one compiled program.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvm.models.conv import SameConv
from rvm.models.equilibrium import Equilibrium

Array = jax.Array
NORMS = ("none", "layer")


def check_iterations(iterations, field: str = "iterations") -> int:
    """`iterations` as an int >= 1, or a ValueError naming `field`."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{field}={iterations!r} must be an integer >= 1")
    return iterations


class _Norm(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, h: Array) -> Array:
        return nn.LayerNorm(use_bias=False)(h) if self.kind == "layer" else h


class Iteration(nn.Module):
    """F(h, x): recall (optional), then `blocks` residual blocks."""

    width: int
    blocks: int
    recall: bool
    dims: int
    norm: str = "none"

    @nn.compact
    def __call__(self, h: Array, x: Array) -> Array:
        conv = lambda name: SameConv(self.width, (3,) * self.dims, use_bias=False, name=name)
        if self.recall:
            h = conv("recall")(jnp.concatenate([h, x.astype(h.dtype)], axis=-1))
        for b in range(self.blocks):
            r = nn.relu(_Norm(self.norm)(conv(f"block{b}_conv1")(h)))
            r = _Norm(self.norm)(conv(f"block{b}_conv2")(r))
            h = nn.relu(h + r)
        return h


class ThinkingNet(nn.Module):
    """Per-position logits [..., num_classes] of a weight-tied recurrent CNN."""

    width: int = 32
    blocks: int = 2  # residual blocks per iteration
    recall: bool = True
    dims: int = 2  # 2: images [B, H, W, C]; 1: sequences [B, L, C]
    num_classes: int = 2
    norm: str = "none"
    head_kernel: int = 3  # 1: each position's answer is read from its own state alone
    # An `rvm.models.equilibrium.Spec`: `solve` runs the iteration to its fixed point.
    equilibrium: Any = None

    def setup(self):
        k = (3,) * self.dims
        hk = (self.head_kernel,) * self.dims
        self.embed = SameConv(self.width, k, use_bias=False)
        self.iteration = Iteration(self.width, self.blocks, self.recall, self.dims, self.norm)
        if self.equilibrium is not None:  # the same iteration's params, solved to equilibrium
            spec = self.equilibrium
            self.deq = Equilibrium(
                self.iteration, spec.solver, spec.backward, spec.jacobian_samples
            )
        head = max(self.width // 2, self.num_classes)
        self.head = nn.Sequential(
            [
                SameConv(head, hk, use_bias=False),
                nn.relu,
                SameConv(max(head // 4, self.num_classes), hk, use_bias=False),
                nn.relu,
                SameConv(self.num_classes, hk, use_bias=False),
            ]
        )

    def encode(self, x: Array) -> Array:
        """h_0 from the input."""
        return nn.relu(self.embed(x))

    def step(self, h: Array, x: Array) -> Array:
        """One iteration, h_t from h_{t-1}."""
        return self.iteration(h, x)

    def readout(self, h: Array) -> Array:
        return self.head(h)

    def think(self, h: Array, x: Array, iterations: int) -> Array:
        """`iterations` steps from `h`, one scan whose body holds the shared block."""
        check_iterations(iterations)
        scan = nn.scan(
            lambda mdl, h, _: (mdl.step(h, x), None),
            variable_broadcast="params",
            split_rngs={"params": False},
            length=iterations,
        )
        return scan(self, h, None)[0]

    def solve(self, x: Array, jacobian_key: Array | None = None, solver: Any = None):
        """(logits at the fixed point h* = F(h*, x) from h_0, solver `Stats`, Jacobian
        penalty or None); `solver` overrides the spec's forward solver."""
        h, stats, penalty = self.deq(self.encode(x), x, jacobian_key, solver)
        return self.readout(h), stats, penalty

    def __call__(self, x: Array, iterations: int = 1) -> Array:
        return self.readout(self.think(self.encode(x), x, iterations))

    def trajectory(
        self,
        x: Array,
        iterations: int,
        emit: Callable[[Any, Array], tuple[Any, Any]],
        aux: Any,
    ) -> Any:
        """Stacked `emit` outputs after iterations 1..`iterations`, from one scan.

        `emit(aux, logits) -> (aux, out)` sees the logits after each iteration; it
        reduces them (to a correctness bit per example, say), so the scan stacks
        small values instead of every iteration's logits.
        """
        check_iterations(iterations)

        def body(mdl, carry, _):
            h, a = carry
            h = mdl.step(h, x)
            a, out = emit(a, mdl.readout(h))
            return (h, a), out

        scan = nn.scan(
            body, variable_broadcast="params", split_rngs={"params": False}, length=iterations
        )
        return scan(self, (self.encode(x), aux), None)[1]

    def radius(self, iterations: int) -> int:
        """Positions a logit can see on each side after `iterations` (one per 3-wide conv)."""
        per_iteration = 2 * self.blocks + int(self.recall)
        return 1 + iterations * per_iteration + 3 * (self.head_kernel // 2)


def warn_if_unseen(model: ThinkingNet, extent: int, iterations: int, what: str) -> bool:
    """Warns (and returns True) when a logit cannot see all `extent` positions of a problem.

    A prefix sum at the last bit needs the first; a maze's path pixel may need the
    far corner. Such a count cannot solve the problem, but evaluating it is allowed.
    """
    if model.radius(iterations) >= extent - 1:
        return False
    warnings.warn(
        f"{what}: {iterations} iterations see {model.radius(iterations)} positions each "
        f"way, fewer than the {extent - 1} the problem spans; accuracy there is bounded",
        stacklevel=2,
    )
    return True
