"""Measures of the video-object systems: J (mask IoU), its decay, J against frames since
the key frame, FLOPs per frame from XLA's cost analysis of each compiled part, the
effective multiply-adds of predictive-corrective blocks, and frames per second.

FLOPs come from parts compiled for one frame (the big network, the recurrent cell, the
memory write, the small network's step, the trunk segments), combined per system by
its schedule: XLA's cost analysis counts a loop's body once, whatever its trip count,
so a whole video's scan would be undercounted. XLA counts a multiply-add as 2 FLOPs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rvm.models import video_objects as vo


def mask_iou(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """[..., T] IoU of (logits > 0) with masks [..., T, H, W]; 1 where both are empty (DAVIS)."""
    pred, true = logits > 0, masks > 0
    inter = jnp.sum(pred & true, axis=(-2, -1))
    union = jnp.sum(pred | true, axis=(-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def summarize_j(per_frame: np.ndarray, key_every: int | None = None) -> dict:
    """J (x100) over frames 1..T-1 and videos from per-video, per-frame IoU [N, T]:
    mean, its standard error over videos, decay (first quarter of frames 1..T-1 minus
    the last quarter) and, given K, J by frames since the last key frame."""
    j = np.asarray(per_frame, np.float64)[:, 1:] * 100
    per_video = j.mean(axis=1)
    quarter = max(1, j.shape[1] // 4)
    out = {
        "J": float(per_video.mean()),
        "J_se": float(per_video.std(ddof=1) / np.sqrt(len(per_video))) if len(j) > 1 else 0.0,
        "J_decay": float(j[:, :quarter].mean() - j[:, -quarter:].mean()),
        "J_per_frame": [float(v) for v in j.mean(axis=0)],
    }
    if key_every:
        since = np.arange(1, j.shape[1] + 1) % key_every
        out["J_since_key"] = [float(j[:, since == s].mean()) for s in range(key_every)]
    return out


def j_by_distractor_class(per_frame: np.ndarray, classes: np.ndarray) -> dict:
    """J (x100, frames 1..T-1) of the videos with a distractor of the target's class and of
    the others, with their counts, from per-frame IoU [N, T] and the slots' classes [N, D]
    (slot 0 the target, -1 an absent slot): where the target's look alone cannot find it."""
    per_video = np.asarray(per_frame, np.float64)[:, 1:].mean(axis=1) * 100
    classes = np.asarray(classes)
    same = np.any(classes[:, 1:] == classes[:, :1], axis=1)
    mean = lambda pick: float(per_video[pick].mean()) if pick.any() else None
    return {
        "J_same_class": mean(same),
        "J_other_class": mean(~same),
        "videos_same_class": int(same.sum()),
        "videos_other_class": int((~same).sum()),
    }


def compiled_flops(fn: Callable, *args) -> float:
    """FLOPs of `fn(*args)` by XLA's cost analysis of the compiled function."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def part_flops(model: vo.VideoObjects, variables: dict, frame_shape: tuple[int, int]) -> dict:
    """FLOPs of each part of `model` for one frame at batch 1."""
    h, w = frame_shape
    x = jnp.zeros((1, h, w, 1))
    apply = lambda f, *a: compiled_flops(lambda v, *b: model.apply(v, *b, method=f), variables, *a)
    prev = (x,) if model.system == "propagate" else ()  # the previous frame's mask
    out = {"big": apply(lambda m, x: m.big(x, x, x, False, *prev), x)}
    big = lambda v: model.apply(v, x, x, x, False, *prev, method=_big)
    feats = jax.eval_shape(big, variables)[1]
    protos = lambda f, x: vo.prototypes(f, x) if model.match else None  # x: a mask's shape
    out["head"] = apply(lambda m, f, x: m.big.logits(f, x, protos(f, x)), jnp.zeros(feats.shape), x)
    bounds = (0, *model.pc_layers)
    y = jnp.zeros((1, h, w, 3 + len(prev)))  # the trunk's input channels
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg = lambda m, y, a=a, b=b: m.big.trunk(y, False, a, b)
        out[f"segment{i}"] = apply(seg, y)
        y = jnp.zeros(
            jax.eval_shape(lambda v, y, s=seg: model.apply(v, y, method=s), variables, y).shape
        )
    if model.system == "resrec" and model.cell != "none":
        carry = model.apply(
            variables, feats.shape, method=lambda m, s: m.rnn.initialize_carry(None, s)
        )
        cell = lambda m, c, f: m.rnn(c, f, train=False)
        out["cell"] = apply(cell, carry, jnp.zeros(feats.shape))
    if model.system in ("dual", "small"):
        out["write"] = apply(lambda m, f: m.write_memory(f, (h, w)), jnp.zeros(feats.shape))
        state = jnp.zeros((1, h // 4, w // 4, model.small_features))
        step = vo.SmallStep(model.small_features)
        small = variables["params"]["small"]
        small = small.get("step", small)  # every_frame nests the step in its loop
        out["small"] = compiled_flops(
            lambda p, m, x: step.apply({"params": p}, (state, m), x), small, x[..., 0], x
        )
    return out


def _big(m, x, x0, m0, train, *prev):
    return m.big(x, x0, m0, train, *prev)


def system_flops(model: vo.VideoObjects, parts: dict, num_frames: int, kinds=None, nonzero=None):
    """FLOPs per frame of `model`'s system over a video of `num_frames`; for pc, dense
    and effective from the evaluated schedules `kinds` [N, T] and non-zero site fractions
    of each block's input difference `nonzero` [blocks, N, T]."""
    big, s = parts["big"], model.system
    keys = -(-num_frames // model.key_every)
    if s in ("frame", "propagate"):
        return {"flops_per_frame": big}
    if s == "stale":
        return {"flops_per_frame": keys * big / num_frames}
    if s == "resrec":
        return {"flops_per_frame": big + parts.get("cell", 0.0)}
    if s in ("dual", "small"):
        keys = 1 if s == "small" else keys
        total = keys * (big + parts["write"]) + (num_frames - keys) * parts["small"]
        return {"flops_per_frame": total / num_frames, "small_over_big": parts["small"] / big}
    blocks = [parts[f"segment{i}"] for i in range(len(model.pc_layers))]
    kinds = np.asarray(kinds)
    processed = kinds != vo.IGNORE
    dense = processed.mean() * big
    upd = kinds == vo.UPDATE
    sparse = sum(c * np.asarray(nz) for c, nz in zip(blocks, nonzero))  # [N, T]
    per_frame = np.where(kinds == vo.REINIT, big, np.where(upd, big - sum(blocks) + sparse, 0.0))
    return {
        "flops_per_frame": float(dense),
        "effective_flops_per_frame": float(per_frame.mean()),
        "frames_ignored": float((kinds == vo.IGNORE).mean()),
        "frames_reinit": float((kinds == vo.REINIT).mean()),
    }


def frames_per_second(fn: Callable, video: jax.Array, repeats: int = 3) -> float:
    """Frames per second of the jitted `fn(video)` ([B, T, ...]); best of `repeats`."""
    jax.block_until_ready(fn(video))  # compile
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(video))
        best = min(best, time.perf_counter() - start)
    return float(video.shape[0] * video.shape[1] / best)


def weight_rms(params: dict) -> dict:
    """Root-mean-square of resrec's recurrent kernels and of the trunk's conv kernels:
    the notes saw the recurrent weights shrink towards zero."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    rms = lambda vs: float(np.sqrt(np.mean(np.concatenate([np.ravel(v) ** 2 for v in vs]))))
    name = lambda p: "/".join(str(getattr(k, "key", k)) for k in p)
    pick = lambda cond: [v for p, v in leaves if cond(name(p)) and name(p).endswith("kernel")]
    out = {"trunk_kernel_rms": rms(pick(lambda n: "trunk" in n))}
    if any("rnn" in name(p) for p, _ in leaves):
        out["rnn_input_kernel_rms"] = rms(pick(lambda n: "rnn/ih" in n))
        out["rnn_recurrent_kernel_rms"] = rms(pick(lambda n: "rnn/h" in n))
    return out


def evaluate_run(path) -> dict:
    """Validation and test J of the run in `path` again, from its newest checkpoint, by the
    code at hand (with the measures its results.json may predate, J by distractor class):
    written to `evaluated.json` beside results.json and returned."""
    import json
    from pathlib import Path

    import ml_collections

    from rvm.tasks.video_objects import task
    from rvm.train import loop
    from rvm.train.config_check import with_added_fields

    path = Path(path)
    saved = with_added_fields(json.loads((path / "config.json").read_text()))
    config = ml_collections.ConfigDict(saved)
    data = task.load_data(config)
    step, state = loop.restore_newest(config, data, path)
    model = task.build_model(config)
    evaluated = {"step": step}
    for split in ("validation", "test"):
        out = task.evaluate(model, state.variables, getattr(data, split), config.eval_batch_size)
        evaluated[split] = {k: v for k, v in out.items() if not k.startswith("pc_")}
    (path / "evaluated.json").write_text(json.dumps(evaluated, indent=1) + "\n")
    return evaluated


def evaluate_where_missing(out_dir: str) -> list[str]:
    """`evaluate_run` for each run in `out_dir` with a checkpoint whose results.json
    predates J by distractor class and that has no evaluated.json yet; their names."""
    import json
    from pathlib import Path

    done = []
    for path in sorted(Path(out_dir).glob("*/results.json")):
        run = path.parent
        measured = "test_J_same_class" in json.loads(path.read_text())
        if (
            (run / "checkpoints").is_dir()
            and not measured
            and not (run / "evaluated.json").exists()
        ):
            evaluate_run(run)
            done.append(run.name)
    return done


def _j_by_class(results: dict, evaluated: dict | None, name: str) -> dict | None:
    """A run's test J by distractor class, from results.json or else evaluated.json, whose
    test J must then be results.json's."""
    if "test_J_same_class" in results:
        return {
            k: results[f"test_{k}"]
            for k in ("J_same_class", "J_other_class", "videos_same_class", "videos_other_class")
        }
    if evaluated is None:
        return None
    if (
        evaluated["step"] != results["step"]
        or abs(evaluated["test"]["J"] - results["test_J"]) > 1e-4
    ):
        raise ValueError(
            f"{name}/evaluated.json (step {evaluated['step']}, test J "
            f"{evaluated['test']['J']:.4f}) differs from results.json (step {results['step']}, "
            f"{results['test_J']:.4f}): "
            "evaluate the run again"
        )
    return evaluated["test"]


def write_summary(out_dir: str, machine: str) -> None:
    """summary.md, j_since_key.png and j_vs_flops.png from the runs' results.json in out_dir."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))}
    configs = {
        name: json.loads((out / name / "config.json").read_text())
        for name in runs
        if (out / name / "config.json").exists()
    }
    lines = [f"# Video objects on the CPU ({machine})", "", "Made by `run.sh` in this folder.", ""]
    budgets = {}
    for name, c in configs.items():
        d, steps = c["data"], runs[name].get("step", "?")
        budget = (
            f"{d['num_train']} training videos, {c['num_epochs']} epochs of batch "
            f"{c['batch_size']} ({steps} Adam steps); J on {d['num_val']} validation and "
            f"{d['num_test']} test videos of held-out digits, {d['canvas']}x{d['canvas']} "
            f"canvas, {d['num_frames']} frames, K = {c['model']['key_every']}"
        )
        budgets.setdefault(budget, []).append(name)
    for budget, names in budgets.items():
        who = "every run" if len(budgets) == 1 else ", ".join(names)
        lines += [f"Budget of {who}: {budget}.", ""]
    frames = {len(r["test_J_per_frame"]) for r in runs.values()}
    last = ", ".join(str(n) for n in sorted(frames))
    lines += [
        f"J: mask IoU x 100 over frames 1..{last} of the test videos, +- its standard error",
        "over videos; decay: J of the first quarter of those frames minus the last quarter;",
        "FLOPs per frame from XLA's cost analysis of each compiled part at batch 1 (a",
        "multiply-add counts 2); effective: pc's multiply-adds on non-zero differences,",
        "with the share of test frames its ignore threshold skipped.",
        "Choices are made on val J; test J is only reported.",
        "",
        "| run | val J | test J | decay | MFLOPs/frame | effective MFLOPs | frames/s b1 | b32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        eff = r.get("effective_flops_per_frame")
        effective = "" if eff is None else f"{eff / 1e6:.2f} ({r['frames_ignored']:.0%} ignored)"
        fps = [r.get(f"frames_per_sec_batch{b}", 0) for b in (1, 32)]
        lines.append(
            f"| {name} | {r['val_J']:.1f} | {r['test_J']:.1f} +- {r['test_J_se']:.1f} "
            f"| {r['test_J_decay']:.1f} | {r['flops_per_frame'] / 1e6:.2f} "
            f"| {effective} "
            f"| {fps[0]:.0f} | {fps[1]:.0f} |"
        )
    by_class = {}
    for name, r in runs.items():
        ev = out / name / "evaluated.json"
        split = _j_by_class(r, json.loads(ev.read_text()) if ev.exists() else None, name)
        if split is not None:
            by_class[name] = split
    if by_class:
        lines += [
            "",
            "Test J of the videos with a distractor of the target's class (its look alone",
            "does not tell it apart) and of the others (from results.json, or the run's final",
            "checkpoint evaluated again: evaluated.json, the same test J):",
            "",
            "| run | J, same-class distractor (videos) | J, none (videos) |",
            "|---|---|---|",
        ]
        for name, c in by_class.items():
            lines.append(
                f"| {name} | {c['J_same_class']:.1f} ({c['videos_same_class']}) "
                f"| {c['J_other_class']:.1f} ({c['videos_other_class']}) |"
            )
    for name, r in runs.items():
        if "rnn_recurrent_kernel_rms" in r:
            lines += [
                "",
                f"{name}: kernel RMS, recurrent {r['rnn_recurrent_kernel_rms']:.4f}, "
                f"input {r['rnn_input_kernel_rms']:.4f}, trunk {r['trunk_kernel_rms']:.4f}.",
            ]
    for name, r in runs.items():
        if "small_over_big" in r:
            lines += [
                "",
                f"{name}: the small network's step costs {100 * r['small_over_big']:.1f}% of "
                "the big network's FLOPs per frame.",
            ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in runs.items():
        if "test_J_since_key" in r:
            ax.plot(r["test_J_since_key"], marker="o", label=name)
    ax.set(xlabel="frames since the key frame", ylabel="test J", title="J against key-frame age")
    if ax.get_legend_handles_labels()[0]:  # a frame run alone has no key frames
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "j_since_key.png", dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in runs.items():
        mflops = r.get("effective_flops_per_frame", r["flops_per_frame"]) / 1e6
        ax.scatter(mflops, r["test_J"])
        ax.annotate(name, (mflops, r["test_J"]), fontsize=7)
    ax.set(xlabel="MFLOPs per frame (pc: effective)", ylabel="test J", title="J against compute")
    fig.tight_layout()
    fig.savefig(out / "j_vs_flops.png", dpi=120)
