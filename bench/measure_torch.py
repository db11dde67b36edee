"""The PyTorch twin's measurements (`bench/torch_resnet.py`), each in a child process of
`bench/run.py`: its eager or compiled train step, evaluation, and one 3x3 convolution
alone. PyTorch is imported inside each, so rvm's children never load it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench import plan, timing
from bench.plan import IMAGE_SHAPE, NUM_CLASSES, SYNTHETIC_IMAGES


def torch_device(torch, spec: dict):
    """CPU threads, or the GPU with cuDNN autotuning (fixed shapes, as XLA autotunes)."""
    if spec.get("platform", "cpu") == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("platform 'gpu' but PyTorch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda")


def torch_sync(torch, device) -> Callable[[Any], Any]:
    """What ends a timed window: eager CPU work is done when the call returns."""
    if device.type == "cuda":
        return lambda out: torch.cuda.synchronize()
    return timing.synchronous


def _autocast(torch, device, spec: dict):
    """`torch.autocast` to bfloat16 for dtype bfloat16, else a no-op context."""
    return torch.autocast(
        device.type, torch.bfloat16, enabled=timing.spec_dtype(spec) == "bfloat16"
    )


def _torch_setup(spec: dict):
    """Device, the twin model (channels_last if asked), a uint8 NHWC synthetic split on it,
    and the RSS once the data is there and before the model is built (as rvm's)."""
    import torch

    from bench.torch_resnet import TorchResNet

    device = torch_device(torch, spec)
    torch.manual_seed(0)
    shared = spec["sharing"] == "raw"
    if shared and spec.get("scope", "all") != "all":
        raise ValueError("the twin benchmarks raw sharing on all levels only")
    n = max(SYNTHETIC_IMAGES, spec["batch"], spec.get("eval_batch", 0))
    images = torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8).to(device)
    labels = torch.randint(0, NUM_CLASSES, (n,)).to(device)
    as_float = images.float()
    mean, std = as_float.mean(0), as_float.std(0) + 1e-6  # per-feature, as rvm's default
    baseline = timing.rss_mb()
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

    result = timing.time_windows(step, torch_sync(torch, device), spec)
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

    return {**timing.time_windows(step, timing.synchronous, spec), "baseline_rss_mb": baseline}


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

    step = plan.conv_pass(
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

    result = timing.time_windows(step, timing.synchronous, spec)
    return {**result, "gflops": plan.conv_flops(spec) / result["step_s"] / 1e9}
