"""A PyTorch twin of `rvm.models.resnet.ResNet`, so the benchmark compares like with like.

Same topology as rvm's network: a 3x3 stem conv (with bias) + BN + ReLU, three
levels of 16/32/64 filters, blocks conv3x3-BN-ReLU-conv3x3-BN + shortcut then
ReLU, every conv zero-padded by 1 and with a bias; the first block of levels 2
and 3 is a padding block (stride-2 first conv; shortcut = 2x2 average pooling
with zero channels appended). BatchNorm uses momentum 0.1 (flax's 0.9) and eps
1e-5 (PyTorch updates the running variance with the unbiased batch variance,
flax with the biased one: a factor n/(n-1), n = batch x pixels, irrelevant to
speed). `blocks_per_level` counts the padding block, as in rvm.

Raw sharing: the non-padding blocks of a shared level use one conv1 and one
conv2 kernel (Parameters of the level, so counted once); biases and BatchNorm
stay per block. Stochastic depth draws one Bernoulli per block per minibatch
with rvm's linear schedule (0 at the network's first block, `final_death_rate`
at its last); a dropped block is skipped in Python, the natural eager way, so it
costs nothing. At evaluation the residual is scaled by its survival probability.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.plan import WIDTHS

# (blocks_per_level, all levels raw-shared) -> trainable parameters, as rvm counts them.
EXPECTED_PARAMS = {
    ((3, 4, 4), False): 363_146,
    ((3, 4, 4), True): 169_610,
    ((18, 18, 18), False): 1_732_010,
    ((18, 18, 18), True): 179_114,
}


def death_rates(blocks_per_level: Sequence[int], final_rate: float) -> list[list[float]]:
    """Per-level death rates, 0 at the first block rising linearly to `final_rate` (as rvm)."""
    total = sum(blocks_per_level)
    rates = [final_rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for n in blocks_per_level:
        out.append(rates[start : start + n])
        start += n
    return out


def shortcut(x: Tensor, features: int, stride: int) -> Tensor:
    """Identity, or 2x2 average pooling with zero channels appended (keeps channels_last)."""
    if stride == 1 and x.shape[1] == features:
        return x
    x = F.avg_pool2d(x, stride)
    return F.pad(x, (0, 0, 0, 0, 0, features - x.shape[1]))


def _kernel(cin: int, cout: int) -> nn.Parameter:
    """A 3x3 kernel with He fan-out initialisation, as rvm's Conv3x3."""
    weight = torch.empty(cout, cin, 3, 3)
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
    return nn.Parameter(weight)


def _norm(features: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, then ReLU; its kernels are its own or passed in."""

    def __init__(self, cin: int, cout: int, stride: int, own_kernels: bool = True):
        super().__init__()
        self.cout, self.stride = cout, stride
        self.kernel1 = _kernel(cin, cout) if own_kernels else None
        self.kernel2 = _kernel(cout, cout) if own_kernels else None
        self.bias1 = nn.Parameter(torch.zeros(cout))
        self.bias2 = nn.Parameter(torch.zeros(cout))
        self.bn1, self.bn2 = _norm(cout), _norm(cout)

    def forward(
        self, x: Tensor, kernels: tuple[Tensor, Tensor] | None = None, scale: float = 1.0
    ) -> Tensor:
        k1, k2 = kernels if kernels is not None else (self.kernel1, self.kernel2)
        y = F.relu(self.bn1(F.conv2d(x, k1, self.bias1, self.stride, 1)))
        y = self.bn2(F.conv2d(y, k2, self.bias2, 1, 1))
        if scale != 1.0:  # evaluation with stochastic depth: the survival probability
            y = y * scale
        return F.relu(shortcut(x, self.cout, self.stride) + y)


class Level(nn.Module):
    """A padding block (if `downsample`) then `num_blocks` non-padding blocks."""

    def __init__(self, cin: int, cout: int, num_blocks: int, downsample: bool, shared: bool):
        super().__init__()
        self.cout = cout
        self.pad = Block(cin, cout, 2) if downsample else None
        self.kernels = (
            nn.ParameterList([_kernel(cout, cout), _kernel(cout, cout)]) if shared else None
        )
        self.blocks = nn.ModuleList(
            Block(cout, cout, 1, own_kernels=not shared) for _ in range(num_blocks)
        )

    def forward(self, x: Tensor, rates: Sequence[float], rng: random.Random) -> Tensor:
        kernels = tuple(self.kernels) if self.kernels is not None else None
        calls = [(self.pad, None, 2)] if self.pad is not None else []
        calls += [(block, kernels, 1) for block in self.blocks]
        for (block, k, stride), rate in zip(calls, rates, strict=True):
            if self.training and rate > 0 and rng.random() < rate:
                x = shortcut(x, self.cout, stride)  # dropped: the block never runs
            else:
                x = block(x, k, 1.0 if self.training else 1.0 - rate)
        return x


class TorchResNet(nn.Module):
    """Three-level CIFAR ResNet; `shared_levels` marks raw-shared levels."""

    def __init__(
        self,
        blocks_per_level: Sequence[int] = (18, 18, 18),
        shared_levels: Sequence[bool] = (False, False, False),
        num_classes: int = 10,
        final_death_rate: float = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        self.rates = death_rates(blocks_per_level, final_death_rate)
        self.rng = random.Random(seed)
        self.stem_conv = nn.Conv2d(3, WIDTHS[0], 3, padding=1, bias=True)
        nn.init.kaiming_normal_(self.stem_conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.stem_conv.bias)
        self.stem_bn = _norm(WIDTHS[0])
        cins = (WIDTHS[0], *WIDTHS[:-1])
        self.levels = nn.ModuleList(
            Level(cin, cout, n - int(i > 0), i > 0, shared)
            for i, (cin, cout, n, shared) in enumerate(
                zip(cins, WIDTHS, blocks_per_level, shared_levels, strict=True)
            )
        )
        self.head = nn.Linear(WIDTHS[-1], num_classes)
        # Flax's default Dense init is LeCun normal (truncated); untruncated is close enough.
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(WIDTHS[-1]))
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        for level, rates in zip(self.levels, self.rates):
            x = level(x, rates, self.rng)
        return self.head(x.mean(dim=(2, 3)))


def count_params(model: nn.Module) -> int:
    """Trainable parameters; `parameters()` yields a shared kernel once."""
    return sum(p.numel() for p in model.parameters())


def check_param_counts() -> dict[str, int]:
    """Asserts the twin's parameter counts equal rvm's for the four benchmarked models."""
    counts = {}
    for (blocks, shared), expected in EXPECTED_PARAMS.items():
        got = count_params(TorchResNet(blocks, (shared,) * 3))
        name = f"{blocks} {'raw' if shared else 'nonshared'}"
        assert got == expected, f"{name}: {got} parameters, rvm has {expected}"
        counts[name] = got
    return counts


if __name__ == "__main__":
    print(check_param_counts())
