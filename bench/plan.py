"""What the benchmark suite measures: settings, FLOP counts, and each section's specs.

A spec is a JSON-able dict that `bench/measure.py` turns into one measurement in
a child process; `plan(settings)` maps section -> label -> spec. The CPU plan
(`MEASUREMENTS`) covers every question asked of rvm's speed; the GPU plan
(`GPU_MEASUREMENTS`) only what its targets need, to fit a short GPU session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

WIDTHS = (16, 32, 64)
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
SYNTHETIC_IMAGES = 2048  # synthetic training split the batches are drawn from
MEASUREMENTS = (
    "ceiling",  # float32 GFLOP/s of a large matmul (numpy, torch and XLA)
    "train",  # training throughput, rvm against the PyTorch twin
    "compile",  # (18,18,18) compile and init time, nn.scan against unrolled blocks
    "relaxed",  # relaxed against raw sharing, step time
    "stochastic_depth",  # stochastic depth on against off, rvm and torch
    "eval",  # evaluation throughput
    "memory",  # peak RSS of a training process
    "data_parallel",  # rvm over the host's cores as separate XLA devices
    "xla_cpu",  # rvm's step under XLA:CPU's default options against rvm's
    "convs",  # one 3x3 conv per level: rvm under both option sets, and PyTorch
    "malloc",  # rvm and PyTorch steps under glibc's default malloc against huge pages
    "loop",  # the real training loop against the benchmark's step
    "packed",  # K runs of one variant in one step (rvm.train.pack) against K runs apart
)
# On a GPU: what its targets need, in the order run (a run cut short keeps the open
# questions; `train`, `eval` and `ceiling` were measured on an H200 before).
GPU_MEASUREMENTS = ("stochastic_depth", "loop", "xla_gpu", "ceiling", "eval", "train", "packed")
# How training can execute stochastic depth (`rvm.models.stochastic_depth.SD_IMPLS` less "auto").
SD_IMPLS = ("cond", "masked", "compact")
# XLA:GPU flag sets of `rvm.train.xla.GPU_FLAG_SETS` (copied: this module imports no JAX),
# each with the stochastic-depth strategies it can change.
XLA_GPU_VARIANTS = {
    "command buffers with loops and conditionals": (
        "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1",
        SD_IMPLS,
    ),
    "latency-hiding scheduler": ("--xla_gpu_enable_latency_hiding_scheduler=true", ("masked",)),
    "autotuning off": ("--xla_gpu_autotune_level=0", ("masked",)),
}
# How a pack's runs share a step: a strategy of `rvm.train.pack.STRATEGIES` with the spec
# fields it takes ("vmap gemm", "vmap kernel_gemm": vmapped with `model.conv_impl` set,
# the convolutions or only their kernel gradients as matrix products), or K processes.
PACK_HOWS = {
    "vmap": {"strategy": "vmap"},
    "vmap gemm": {"strategy": "vmap", "conv_impl": "gemm"},
    "vmap kernel_gemm": {"strategy": "vmap", "conv_impl": "kernel_gemm"},
    "map": {"strategy": "map"},
    "loop": {"strategy": "loop"},
    "processes": {},
}
LEVELS = ((32, 16), (16, 32), (8, 64))  # (size, channels) of the three levels' convs
# A conv's passes: the forward convolution, either gradient alone, or all three.
CONV_PASSES = ("forward", "input_grad", "kernel_grad", "train")
CONV_IMPLS = {
    "rvm (Eigen convs)": {"kind": "jax_conv", "xla": "rvm"},
    "XLA default (YNNPACK convs)": {"kind": "jax_conv", "xla": "default"},
    "torch channels_last": {"kind": "torch_conv"},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    platform: str = "cpu"  # or "gpu": where the models run, and which plan
    small: tuple[int, ...] = (3, 4, 4)
    large: tuple[int, ...] = (18, 18, 18)
    batch: int = 128
    eval_batch: int = 1000
    steps: int = 4  # per timed window
    windows: int = 5  # the median window is reported
    warmup: int = 2  # untimed calls, the first (compiling) one included
    rounds: int = 1  # passes over the whole plan; each measurement's fastest pass counts
    matmul_n: int = 4096
    timeout: float = 1800.0  # seconds per child process
    packs: tuple[int, ...] = (1, 2, 4, 8)  # runs per pack in section `packed`


# A GPU step takes tens of milliseconds: longer windows, a larger matmul.
GPU_SETTINGS = {"steps": 20, "warmup": 3, "matmul_n": 8192, "timeout": 300.0}
EPOCHS, TRAIN_IMAGES, TEST_IMAGES = 500, 50_000, 10_000  # the paper's CIFAR-10 run


# --- FLOPs -------------------------------------------------------------------------------


def forward_macs(blocks: tuple[int, ...], size: int = 32, channels: int = 3) -> int:
    """Multiply-accumulates of one image's forward pass: every 3x3 conv and the dense head.

    A 3x3 conv producing an HxWxC_out map from C_in channels costs H*W*C_out*C_in*9;
    a padding block's first conv works at the halved size. BatchNorm, ReLU, biases,
    pooling and the optimiser are left out (elementwise, a few percent at most).
    """
    macs = size * size * WIDTHS[0] * channels * 9  # stem
    cin = WIDTHS[0]
    for level, (num, width) in enumerate(zip(blocks, WIDTHS)):
        size //= 2 if level > 0 else 1
        for _ in range(num):
            macs += size * size * width * 9 * (cin + width)  # conv1 (cin -> width), conv2
            cin = width
    return macs + WIDTHS[-1] * NUM_CLASSES


def train_flops(blocks: tuple[int, ...]) -> int:
    """Training FLOPs per image: 3 x forward (backward = input and kernel gradients) x 2 per MAC."""
    return 3 * 2 * forward_macs(blocks)


def conv_pass(spec: dict, passes: dict) -> Callable:
    """What runs for the spec's `pass`: the forward convolution, either gradient alone
    (`input_grad`, `kernel_grad`), or all three (`train`)."""
    if spec["pass"] not in passes:
        raise ValueError(f"pass={spec['pass']!r}: one of {', '.join(passes)}")
    return passes[spec["pass"]]


def conv_flops(spec: dict) -> float:
    """FLOPs of one call: a 3x3 same-size conv, x3 with both gradients (`pass` = train)."""
    hw, c = spec["size"], spec["channels"]
    return 2 * spec["batch"] * hw * hw * c * c * 9 * (3 if spec["pass"] == "train" else 1)


# --- Specs: what each section measures ---------------------------------------------------


def _timing(s: Settings) -> dict:
    return {"steps": s.steps, "windows": s.windows, "warmup": s.warmup}


def rvm(s: Settings, blocks, sharing="nonshared", sd=False, **extra) -> dict:
    return {
        "kind": "rvm_train",
        "platform": s.platform,
        "dtype": "float32",
        "blocks": list(blocks),
        "sharing": sharing,
        "scope": "all",
        "stochastic_depth": sd,
        "devices": 1,
        "unroll": False,
        "batch": s.batch,
        **_timing(s),
        **extra,
    }


def loop(s: Settings, **extra) -> dict:
    """The real loop on the large model, stochastic depth on, as `rvm(s, s.large, sd=True)`:
    on a GPU epochs of CIFAR-10's size with its 10,000 test images evaluated after each;
    on the CPU (and with tiny models) epochs of twice a timed window."""
    gpu = s.platform == "gpu"
    cifar = gpu and tuple(s.large) == Settings().large  # the real model, not --tiny's
    return {
        **rvm(s, s.large, sd=True, **(BF16 if gpu else {})),
        "kind": "rvm_loop",
        "epochs": 3,
        "epoch_steps": TRAIN_IMAGES // s.batch if cifar else 2 * s.steps,
        "test_images": TEST_IMAGES if cifar else s.eval_batch,
        **extra,
    }


def twin(s: Settings, blocks, sharing="nonshared", layout="channels_last", **extra) -> dict:
    return {
        "kind": "torch_train",
        "platform": s.platform,
        "dtype": "float32",
        "blocks": list(blocks),
        "sharing": sharing,
        "scope": "all",
        "stochastic_depth": False,
        "layout": layout,
        "compile": False,
        "batch": s.batch,
        **_timing(s),
        **extra,
    }


BF16 = {"dtype": "bfloat16"}
IMPLS = {
    "rvm": lambda s, b, sh: rvm(s, b, sh),
    "torch eager NCHW": lambda s, b, sh: twin(s, b, sh, layout="nchw"),
    "torch eager channels_last": lambda s, b, sh: twin(s, b, sh),
    "torch.compile channels_last": lambda s, b, sh: twin(s, b, sh, compile=True),
}
# The GPU's targets are in bfloat16 (PyTorch under autocast); float32 and torch.compile
# for the large model only, to fit a GPU session's few minutes.
GPU_IMPLS = {
    "rvm bfloat16": lambda s, b, sh: rvm(s, b, sh, **BF16),
    "torch eager channels_last bfloat16 autocast": lambda s, b, sh: twin(s, b, sh, **BF16),
    "rvm float32": lambda s, b, sh: rvm(s, b, sh),
    "torch eager channels_last float32": lambda s, b, sh: twin(s, b, sh),
    "torch.compile channels_last bfloat16 autocast": lambda s, b, sh: twin(
        s, b, sh, compile=True, **BF16
    ),
}
GPU_SMALL_IMPLS = ("rvm bfloat16", "torch eager channels_last bfloat16 autocast")
SHARINGS = {"nonshared": "nonshared", "raw": "all-levels raw"}


def model_label(blocks, sharing: str) -> str:
    return f"{tuple(blocks)} {SHARINGS.get(sharing, sharing)}"


def impls(s: Settings, blocks) -> dict[str, Callable[..., dict]]:
    """Implementation label -> spec maker, for one model size on the settings' platform."""
    if s.platform == "cpu":
        return IMPLS
    keep = GPU_IMPLS if tuple(blocks) == tuple(s.large) else GPU_SMALL_IMPLS
    return {label: GPU_IMPLS[label] for label in keep}


def sharings(s: Settings) -> tuple[str, ...]:
    """Sharing modes of section `train`: on a GPU non-shared only (raw does the same FLOPs)."""
    return tuple(SHARINGS) if s.platform == "cpu" else ("nonshared",)


def measurements(s: Settings) -> tuple[str, ...]:
    return MEASUREMENTS if s.platform == "cpu" else GPU_MEASUREMENTS


def plan(s: Settings) -> dict[str, dict[str, dict]]:
    """Section -> label -> spec. Stochastic depth is off unless the section is about it."""
    if s.platform == "gpu":
        return gpu_plan(s)
    eval_timing = {**_timing(s), "steps": 1}  # one window = one eval batch
    two = {"devices": 2, "timeout": min(s.timeout, 900)}  # a hung all-reduce must not hold us
    sections = {
        "ceiling": {
            f"{lib} {s.matmul_n}x{s.matmul_n}": {
                "kind": "matmul",
                "library": lib,
                "n": s.matmul_n,
                **_timing(s),
            }
            for lib in ("numpy", "torch", "jax")
        },
        "train": train_plan(s),
        # The paper's configuration (stochastic depth on); same seed, same dropped blocks.
        "compile": {
            "nn.scan": rvm(s, s.large, sd=True, stages=True),
            "unrolled": rvm(s, s.large, sd=True, unroll=True, stages=True),
        },
        "relaxed": {
            "relaxed": rvm(s, s.large, "relaxed"),
            "raw": rvm(s, s.large, "raw"),
        },
        "stochastic_depth": {
            "rvm on": rvm(s, s.large, sd=True),
            "rvm off": rvm(s, s.large),
            "torch eager channels_last on": twin(s, s.large, stochastic_depth=True),
            "torch eager channels_last off": twin(s, s.large),
        },
        "eval": {
            "rvm evaluate": {
                **rvm(s, s.large, sd=True, kind="rvm_eval", eval_batch=s.eval_batch),
                **eval_timing,
            },
            "torch eager channels_last no_grad": {
                **twin(s, s.large, kind="torch_eval", stochastic_depth=True),
                "eval_batch": s.eval_batch,
                **eval_timing,
            },
        },
        # The training processes of section `train`, read for their peak RSS.
        "memory": {"rvm": rvm(s, s.large), "torch eager channels_last": twin(s, s.large)},
        "data_parallel": {
            f"{tuple(b)} nonshared / {d} device{'s' * (d > 1)}": rvm(s, b, **(two if d > 1 else {}))
            for b in (s.small, s.large)
            for d in (1, 2)
        },
        "xla_cpu": {
            f"{tuple(b)} nonshared / {label}": rvm(s, b, **extra)
            for b in (s.small, s.large)
            for label, extra in (
                ("rvm", {}),
                ("XLA default options (YNNPACK convs)", {"xla": "default"}),
                ("rvm, 2 devices", two),
            )
        },
        "convs": {
            f"{size}x{size}x{c} {kind} / {impl}": {
                **spec,
                "size": size,
                "channels": c,
                "pass": kind,
                "batch": s.batch,
                **_timing(s),
                "steps": 5 * s.steps,  # one conv is ~100x shorter than a step
            }
            for size, c in LEVELS
            for kind in CONV_PASSES
            for impl, spec in CONV_IMPLS.items()
        },
        "malloc": {
            f"{tuple(b)} nonshared {impl} / {malloc}": make(s, b, **extra)
            for b in (s.small, s.large)
            for impl, make in (("rvm", rvm), ("torch eager channels_last", twin))
            for malloc, extra in (("huge pages", {}), ("glibc default", {"malloc": "default"}))
        },
        "loop": {"rvm loop": loop(s), "rvm step": rvm(s, s.large, sd=True)},
        "packed": packed_plan(s),
    }
    sections["stochastic_depth"].update(
        {f"rvm on / {impl}": rvm(s, s.large, sd=True, sd_impl=impl) for impl in SD_IMPLS[1:]}
    )
    assert set(sections) == set(MEASUREMENTS)
    return sections


def train_plan(s: Settings) -> dict[str, dict]:
    return {
        f"{model_label(b, sh)} / {impl}": make(s, b, sh)
        for b in (s.small, s.large)
        for sh in sharings(s)
        for impl, make in impls(s, b).items()
    }


def pack_label(blocks, k: int, how: str) -> str:
    """`packed`'s label of K runs of (blocks) non-shared, trained `how`."""
    return f"{model_label(blocks, 'nonshared')} / K={k} / {how}"


def packed_plan(s: Settings) -> dict[str, dict]:
    """K runs of one variant: one run alone (K=1, also the rate of K runs one after
    another), packed under each strategy, and as K processes at once. The targets' packs
    come first, strategy by strategy, so that a short GPU session measures them first."""
    extra = BF16 if s.platform == "gpu" else {}
    out = {pack_label(b, 1, "one run"): rvm(s, b, **extra) for b in (s.small, s.large)}
    rest = {}
    for b in (s.small, s.large):
        for k in (k for k in s.packs if k > 1):
            for how in PACK_HOWS:
                rest[(b, k, how)] = (
                    {
                        "kind": "rvm_processes",
                        "platform": s.platform,
                        "processes": k,
                        "run": rvm(s, b, **extra),
                    }
                    if how == "processes"
                    else rvm(s, b, kind="rvm_pack", pack=k, **PACK_HOWS[how], **extra)
                )
    targets = set(TARGET_PACKS[s.platform](s))
    first = lambda key: (key[:2] not in targets, list(PACK_HOWS).index(key[2]))
    for key in sorted(rest, key=first):  # stable: the plan's order otherwise
        out[pack_label(*key)] = rest[key]
    return out


# The packs the targets read, per platform: (blocks, K).
TARGET_PACKS = {
    "cpu": lambda s: [(tuple(s.small), 2)],
    "gpu": lambda s: [(tuple(s.small), 8), (tuple(s.large), 4)],
}


def xla_gpu_runs() -> list[tuple[str, str, dict]]:
    """(name, strategy, spec fields) of section `xla_gpu`, in the order run."""
    flag_sets = [
        (name, impl, {"xla_flags": flags, "count_command_buffers": True})
        for name, (flags, impls_) in XLA_GPU_VARIANTS.items()
        for impl in impls_
    ]
    return [*flag_sets[:3], ("blocks unrolled", "masked", {"unroll": True}), *flag_sets[3:]]


def gpu_plan(s: Settings) -> dict[str, dict[str, dict]]:
    """The GPU's sections: rvm in bfloat16 against PyTorch under bfloat16 autocast."""
    eval_timing = {**_timing(s), "steps": 1}
    sections = {
        "ceiling": {
            f"{lib} {dtype} {s.matmul_n}x{s.matmul_n}": {
                "kind": "matmul",
                "library": lib,
                "platform": "gpu",
                "dtype": dtype,
                "n": s.matmul_n,
                **_timing(s),
            }
            for dtype in ("float32", "bfloat16")
            for lib in ("torch", "jax")
        },
        # Strategy by strategy; `rvm off` and PyTorch's off first, for the targets.
        "stochastic_depth": {
            "rvm off": rvm(s, s.large, **BF16),
            "torch eager channels_last off": twin(s, s.large, **BF16),
            **{
                f"rvm on / {impl}": rvm(s, s.large, sd=True, sd_impl=impl, **BF16)
                for impl in SD_IMPLS
            },
            "torch eager channels_last on": twin(s, s.large, stochastic_depth=True, **BF16),
        },
        # Compared with the step of `stochastic_depth` whose strategy it ran ("auto").
        "loop": {"rvm loop": loop(s)},
        # Command buffers first (the open question), then unrolled blocks, then the rest.
        "xla_gpu": {
            f"{name} / {impl}": rvm(s, s.large, sd=True, sd_impl=impl, **BF16, **extra)
            for name, impl, extra in xla_gpu_runs()
        },
        "eval": {
            "rvm evaluate": {
                **rvm(s, s.large, sd=True, kind="rvm_eval", eval_batch=s.eval_batch, **BF16),
                **eval_timing,
            },
            "torch eager channels_last no_grad": {
                **twin(s, s.large, kind="torch_eval", stochastic_depth=True, **BF16),
                "eval_batch": s.eval_batch,
                **eval_timing,
            },
        },
        "train": train_plan(s),
        "packed": packed_plan(s),
    }
    return {name: sections[name] for name in GPU_MEASUREMENTS}
