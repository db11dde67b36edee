"""The benchmark's PyTorch twin (bench/torch_resnet.py) is the same network as rvm's ResNet.

Skipped where PyTorch is not installed (it is not a dependency of rvm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.cifar10 import get_config
from rvm.models import sharing
from rvm.models.resnet import ResNet

torch = pytest.importorskip("torch")
from bench import torch_resnet  # noqa: E402  (imports torch)


@pytest.mark.parametrize(("blocks", "shared"), list(torch_resnet.EXPECTED_PARAMS))
def test_param_counts_match_rvm(blocks, shared):
    config = get_config().model
    config.blocks_per_level = blocks
    config.sharing, config.scope = ("raw" if shared else "nonshared"), "all"
    model = sharing.build_model(config, 10)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    rvm_count = sharing.count_params(shapes["params"])
    twin = torch_resnet.TorchResNet(blocks, (shared,) * 3)
    assert (
        torch_resnet.count_params(twin) == rvm_count == torch_resnet.EXPECTED_PARAMS[blocks, shared]
    )


def _tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def _kernel(hwio) -> torch.Tensor:
    return _tensor(np.transpose(np.asarray(hwio), (3, 2, 0, 1)))  # HWIO -> OIHW


def _norm(prefix: str, params: dict, stats: dict) -> dict:
    return {
        f"{prefix}.weight": _tensor(params["scale"]),
        f"{prefix}.bias": _tensor(params["bias"]),
        f"{prefix}.running_mean": _tensor(stats["mean"]),
        f"{prefix}.running_var": _tensor(stats["var"]),
        f"{prefix}.num_batches_tracked": torch.tensor(0),
    }


def _block(prefix: str, params: dict, stats: dict, kernels: bool) -> dict:
    out = {}
    for i in (1, 2):
        if kernels:
            out[f"{prefix}.kernel{i}"] = _kernel(params[f"conv{i}"]["kernel"])
        out[f"{prefix}.bias{i}"] = _tensor(params[f"conv{i}"]["bias"])
        out.update(_norm(f"{prefix}.bn{i}", params[f"bn{i}"], stats[f"bn{i}"]))
    return out


def _state_dict(params: dict, stats: dict) -> dict:
    """rvm's variables as the twin's state dict; a level's stacked blocks are split."""
    out = {
        "stem_conv.weight": _kernel(params["stem_conv"]["kernel"]),
        "stem_conv.bias": _tensor(params["stem_conv"]["bias"]),
        **_norm("stem_bn", params["stem_bn"], stats["stem_bn"]),
        "head.weight": _tensor(np.asarray(params["head"]["kernel"]).T),
        "head.bias": _tensor(params["head"]["bias"]),
    }
    for i in range(3):
        p, s = params[f"level{i + 1}"], stats[f"level{i + 1}"]
        if "pad" in p:
            out.update(_block(f"levels.{i}.pad", p["pad"]["residual"], s["pad"]["residual"], True))
        shared = "conv1_kernel" in p
        if shared:
            out[f"levels.{i}.kernels.0"] = _kernel(p["conv1_kernel"])
            out[f"levels.{i}.kernels.1"] = _kernel(p["conv2_kernel"])
        stacked = (p["blocks"]["block"]["residual"], s["blocks"]["block"]["residual"])
        for j in range(len(stacked[0]["conv1"]["bias"])):
            one = jax.tree.map(lambda x, j=j: x[j], stacked)
            out.update(_block(f"levels.{i}.blocks.{j}", *one, kernels=not shared))
    return out


@pytest.mark.parametrize(
    ("shared_levels", "train"), [((False, True, True), True), ((False, False, False), False)]
)
def test_same_function_as_rvm(shared_levels, train):
    """Same logits from the same variables: topology, padding, strides, BN and death rates."""
    blocks = (2, 3, 3)
    rate = 0.0 if train else 0.5  # training with stochastic depth would draw different blocks
    model = ResNet(blocks, shared_levels, final_death_rate=rate)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    # Random biases, BN affine parameters and statistics, so none of them is a no-op.
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    noisy = [v + 0.1 * jax.random.uniform(k, v.shape) for v, k in zip(leaves, keys)]
    variables = jax.tree.unflatten(treedef, noisy)
    out = model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
    logits = out[0] if train else out

    twin = torch_resnet.TorchResNet(blocks, shared_levels, final_death_rate=rate)
    twin.load_state_dict(_state_dict(variables["params"], variables["batch_stats"]))
    twin.train(train)
    with torch.no_grad():
        got = twin(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(got.numpy(), np.asarray(logits), rtol=1e-4, atol=1e-4)
    if train:  # flax's momentum 0.9 is torch's 0.1
        mean = out[1]["batch_stats"]["stem_bn"]["mean"]
        np.testing.assert_allclose(twin.stem_bn.running_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
