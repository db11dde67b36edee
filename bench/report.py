"""The benchmark report: markdown tables of a run's results, targets with margins, projection.

`derive` computes what the results imply (ceilings, the targets' verdicts, the
projected wall time of the paper's run) into the JSON document; `render` writes
the markdown from that document alone. After a change here, redraw committed
reports from their measurements without measuring again:

    python -m bench.report bench/results/cpu.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from bench.plan import (
    CONV_IMPLS,
    CONV_PASSES,
    EPOCHS,
    LEVELS,
    TARGET_PACKS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    Settings,
    forward_macs,
    impls,
    model_label,
    pack_label,
    sharings,
    train_flops,
)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _step(r: dict | None) -> float | None:
    return r["step_s"] if r and r.get("ok") else None


def _spread(r: dict) -> str:
    w = r["windows_s"]
    return f"{_fmt(r['step_s'])} [{_fmt(min(w))}-{_fmt(max(w))}]"


def _target(name: str, value: float | None, bound: float, at_most: bool, unit: str = "") -> dict:
    """A target with its margin: how far the value sits inside (+) or outside (-) the bound."""
    if value is None:
        return {"target": name, "pass": None, "text": "not measured"}
    ok = value <= bound if at_most else value >= bound
    margin = (bound - value) if at_most else (value - bound)
    verdict = "PASS" if ok else "FAIL"
    text = f"{verdict}: {value:.3g}{unit} vs {bound:.3g}{unit} (margin {margin:+.3g}{unit})"
    return {"target": name, "pass": ok, "value": value, "bound": bound, "text": text}


def _failures(section: dict) -> list[str]:
    lines = []
    for label, r in section.items():
        if r["ok"]:
            continue
        if "log_tail" not in r:  # never started
            lines += [f"- **{label}**: {r['error']}.", ""]
            continue
        tail = (r["log_tail"] or "(empty log)").replace("\n", "\n    ")
        lines += [f"- **{label}** failed: {r['error']}. Log tail:", "", f"    {tail}", ""]
    return lines


def _dtype(r: dict) -> str:
    return r["spec"].get("dtype", "float32")


def ceilings(res: dict) -> dict[str, float]:
    """dtype -> the fastest matmul's GFLOP/s in it: the ceiling FLOP rates are read against."""
    out: dict[str, float] = {}
    for r in res.values():
        if r["ok"]:
            out[_dtype(r)] = max(out.get(_dtype(r), 0.0), r["gflops"])
    return out


def report_ceiling(res: dict, ctx: dict) -> list[str]:
    lines = ["| matmul | s | GFLOP/s |", "| --- | --- | --- |"]
    for label, r in res.items():
        if r["ok"]:
            lines.append(f"| {label} | {_spread(r)} | {r['gflops']:.1f} |")
    lines.append("")
    used = ", ".join(f"{_fmt(g)} GFLOP/s in {d}" for d, g in ctx["ceilings"].items())
    lines.append(f"Ceiling used below: **{used or 'n/a'}** (the fastest matmul in each dtype).")
    return lines


def _rvm_of(res: dict, r: dict) -> dict | None:
    """rvm's training run of run `r`'s model, sharing and dtype: what `r` is compared with."""
    model = lambda x: (x["spec"]["blocks"], x["spec"]["sharing"], _dtype(x))
    for other in res.values():
        if other["spec"]["kind"] == "rvm_train" and model(other) == model(r):
            return other
    return None


def report_train(res: dict, ctx: dict, s: Settings) -> list[str]:
    dtypes = "float32" if s.platform == "cpu" else "float32 or bfloat16 (PyTorch: autocast)"
    lines = [
        f"Batch {s.batch}, {dtypes}, synthetic 32x32 images, stochastic depth off. Training "
        "FLOPs per image = 3 x 2 x forward MACs (3x3 convs + head): "
        + ", ".join(f"{tuple(b)} {train_flops(b) / 1e9:.3f} GFLOP" for b in (s.small, s.large))
        + ". Step = median of the windows [fastest-slowest], of the fastest round when there "
        "are several. `vs rvm` and `of ceiling`: against rvm and the matmul ceiling in the "
        "same dtype.",
        "",
        "| model | implementation | s/step | images/s | vs rvm | GFLOP/s | of ceiling "
        "| first call s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for blocks in (s.small, s.large):
        for sharing in sharings(s):
            model = model_label(blocks, sharing)
            for impl in impls(s, blocks):
                r = res.get(f"{model} / {impl}")
                if not r or not r["ok"]:
                    lines.append(f"| {model} | {impl} | failed | | | | | |")
                    continue
                ips = s.batch / r["step_s"]
                gflops = ips * train_flops(blocks) / 1e9
                base = _step(_rvm_of(res, r))
                ratio = _fmt(base / r["step_s"]) + "x" if base else "n/a"
                ceiling = ctx["ceilings"].get(_dtype(r))
                frac = f"{100 * gflops / ceiling:.1f}%" if ceiling else "n/a"
                lines.append(
                    f"| {model} | {impl} | {_spread(r)} | {ips:.1f} | {ratio} | {gflops:.1f} "
                    f"| {frac} | {_fmt(r['first_call_s'])} |"
                )
    return lines


def report_compile(res: dict, ctx: dict, s: Settings) -> list[str]:
    lines = [
        f"{tuple(s.large)} nonshared, stochastic depth on (the paper's run), batch {s.batch}. "
        "`init` = `build_run` (jit of the init, its run, data put on device). The step is "
        "traced, lowered to StableHLO and compiled by XLA ahead of time, each stage timed; "
        "`compile` = their sum, `first run` = the first execution after it.",
        "",
        "| blocks | init s | trace s | lower s | XLA compile s | compile s | first run s "
        "| s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in res.items():
        if r["ok"]:
            lines.append(
                f"| {label} | {_fmt(r['init_s'])} | {_fmt(r['trace_s'])} | {_fmt(r['lower_s'])} "
                f"| {_fmt(r['compile_s'])} | {_fmt(_compile_s(r))} | {_fmt(r['first_call_s'])} "
                f"| {_spread(r)} |"
            )
    return lines


def _compile_s(r: dict) -> float:
    """Trace + lower + XLA compile of the step, measured ahead of time."""
    return r["trace_s"] + r["lower_s"] + r["compile_s"]


def report_steps(res: dict, ctx: dict, s: Settings, note: str) -> list[str]:
    lines = [note, "", "| run | s/step | images/s |", "| --- | --- | --- |"]
    for label, r in res.items():
        if r["ok"]:
            lines.append(f"| {label} | {_spread(r)} | {s.batch / r['step_s']:.1f} |")
    return lines


def report_eval(res: dict, ctx: dict, s: Settings) -> list[str]:
    flops = 2 * forward_macs(s.large)
    lines = [
        f"{tuple(s.large)} nonshared in eval mode, one batch of {s.eval_batch} per window "
        f"({flops / 1e9:.3f} GFLOP per image); rvm through `image_task.evaluate` "
        "(host-to-device copy, jitted forward, error and loss).",
        "",
        "| implementation | s/batch | images/s | of ceiling |",
        "| --- | --- | --- | --- |",
    ]
    for label, r in res.items():
        if r["ok"]:
            ips = s.eval_batch / r["step_s"]
            ceiling = ctx["ceilings"].get(_dtype(r))
            frac = f"{100 * ips * flops / 1e9 / ceiling:.1f}%" if ceiling else "n/a"
            lines.append(f"| {label} | {_spread(r)} | {ips:.1f} | {frac} |")
    return lines


def report_memory(res: dict, ctx: dict, s: Settings) -> list[str]:
    lines = [
        f"Peak RSS (`ru_maxrss`) of the process training {tuple(s.large)} nonshared at batch "
        f"{s.batch} (compilation included); baseline = RSS after imports and data, before "
        "the model.",
        "",
        "| process | peak MiB | baseline MiB | peak - baseline MiB |",
        "| --- | --- | --- | --- |",
    ]
    for label, r in res.items():
        if r["ok"]:
            peak, base = r["max_rss_mb"], r["baseline_rss_mb"]
            lines.append(f"| {label} | {peak:.0f} | {base:.0f} | {peak - base:.0f} |")
    return lines


def _report_against(res: dict, s: Settings, note: str, base: str, column: str) -> list[str]:
    """Step times, each also as a ratio to the run labelled `<same model> / <base>`."""
    lines = [note, "", f"| run | s/step | images/s | {column} |", "| --- | --- | --- | --- |"]
    for label, r in res.items():
        if r["ok"]:
            ref = _step(res.get(label.rsplit("/", 1)[0] + "/ " + base))
            ratio = f"{ref / r['step_s']:.2f}x" if ref else "n/a"
            lines.append(f"| {label} | {_spread(r)} | {s.batch / r['step_s']:.1f} | {ratio} |")
    return lines


# Sections reported as step times against one run of the same model: note, that run's
# label (after the model), and the ratio column's heading.
AGAINST = {
    "data_parallel": (
        "rvm's step over a `(\"data\",)` mesh of the host's cores as separate XLA devices "
        "(`--xla_force_host_platform_device_count`), against one device.",
        "1 device",
        "speed-up",
    ),
    "xla_cpu": (
        "rvm's training step (stochastic depth off) as shipped, compiled with XLA:CPU's "
        "default options (convolutions through YNNPACK, not `rvm.train.xla.CPU_OPTIONS`), "
        "and as shipped over two XLA host devices.",
        "rvm",
        "vs rvm",
    ),
    "malloc": (
        "Training steps (stochastic depth off) with glibc's malloc on transparent huge pages "
        "(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, how every other section runs and how "
        "`experiments.train` restarts itself) against glibc's default malloc.",
        "huge pages",
        "vs huge pages",
    ),
}


def report_convs(res: dict, ctx: dict, s: Settings) -> list[str]:
    lines = [
        f"One 3x3 conv, C -> C channels, same size, batch {s.batch}, float32: `forward`, "
        "`input_grad` or `kernel_grad` alone (the same FLOPs), or `train` = forward + input "
        "gradient + kernel gradient (3x the FLOPs). GFLOP/s (median window); rvm's "
        "`conv3x3` (custom VJP, the kernel gradient's transposes included) under its "
        "options and under XLA's defaults, and `nn.Conv2d` channels_last (a gradient "
        "alone through `torch.nn.grad`).",
        "",
        "| conv | pass | " + " | ".join(CONV_IMPLS) + " |",
        "| --- | --- |" + " --- |" * len(CONV_IMPLS),
    ]
    for size, c in LEVELS:
        for kind in CONV_PASSES:
            cells = []
            for impl in CONV_IMPLS:
                r = res.get(f"{size}x{size}x{c} {kind} / {impl}")
                cells.append(f"{r['gflops']:.0f}" if r and r["ok"] else "n/a")
            lines.append(f"| {size}x{size}x{c} | {kind} | " + " | ".join(cells) + " |")
    return lines


def _packed_rate(res: dict, label: str, s: Settings) -> float | None:
    """Images/s of all the runs of `packed` measurement `label` ("model / K=k / how")."""
    r = res.get(label)
    if not r or not r.get("ok"):
        return None
    return int(label.split(" / ")[1][2:]) * s.batch / r["step_s"]


def _best_pack(res: dict, blocks, k: int, s: Settings) -> tuple[str | None, float | None]:
    """The fastest strategy for K packed runs of `blocks`, and its images/s."""
    rates = {
        label.rsplit(" / ", 1)[1]: _packed_rate(res, label, s)
        for label, r in res.items()
        if label.startswith(pack_label(blocks, k, "")) and r["spec"]["kind"] == "rvm_pack"
    }
    rates = {how: rate for how, rate in rates.items() if rate}
    if not rates:
        return None, None
    best = max(rates, key=rates.get)
    return best, rates[best]


def report_packed(res: dict, ctx: dict, s: Settings) -> list[str]:
    lines = [
        f"K runs of one variant (non-shared, stochastic depth off, batch {s.batch} each), "
        "trained as one pack under a strategy of `rvm.train.pack` (`vmap`, `map`, `loop`), "
        "or as K processes at once (timed over the same seconds). `images/s` counts every "
        "run's images; `vs one run` divides it by one run's alone (K=1), which is also the "
        "rate of K runs one after another. Peak memory: the process's RSS (of all K "
        "processes together), and on a GPU the device's peak bytes in use."
        + (
            " `vmap gemm`: `vmap` with the convolutions computed as matrix products "
            "(`model.conv_impl`), which vmap batches instead of grouping; `vmap kernel_gemm` "
            "only their kernel gradients."
            if any(" / vmap " in label for label in res)
            else ""
        ),
        "",
        "| model | K | how | s/step | images/s | vs one run | peak RSS MiB | peak device MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in res.items():
        if not r["ok"]:
            continue
        model, k, how = label.split(" / ")
        rate, one = _packed_rate(res, label, s), _packed_rate(res, f"{model} / K=1 / one run", s)
        ratio = f"{rate / one:.2f}x" if one else "n/a"
        rss = r.get("processes_rss_mb", r.get("max_rss_mb"))
        lines.append(
            f"| {model} | {k[2:]} | {how} | {_spread(r)} | {rate:.1f} | {ratio} | {_fmt(rss, 4)} "
            f"| {_fmt(r.get('device_peak_mb'), 4)} |"
        )
    return lines


def pack_targets(res: dict, s: Settings) -> list[dict]:
    """CPU: two packed runs at least as fast as the two one after another; H200 (GPU
    plan): 8 packed (3,4,4) runs at >= 4x one run's images/s, 4 (18,18,18) at >= 2x."""
    bounds = {"cpu": {2: 1.0}, "gpu": {8: 4.0, 4: 2.0}}[s.platform]
    out = []
    for blocks, k in TARGET_PACKS[s.platform](s):
        one = _packed_rate(res, pack_label(blocks, 1, "one run"), s)
        how, rate = _best_pack(res, blocks, k, s)
        name = (
            f"{tuple(blocks)}: {k} packed runs ({how or 'fastest strategy'}) >= {bounds[k]:g}x "
            "one run's images/s"
        )
        out.append(_target(name, rate / one if rate and one else None, bounds[k], False, "x"))
    return out


def sd_on(sd: dict) -> tuple[str, dict | None]:
    """rvm's stochastic-depth step as shipped (`rvm on`), or else its fastest strategy."""
    if "rvm on" in sd:
        return "rvm on", sd["rvm on"]
    ran = {k: r for k, r in sd.items() if k.startswith("rvm on") and _step(r)}
    label = min(ran, key=lambda k: ran[k]["step_s"], default="rvm on")
    return label, ran.get(label)


def loop_step(results: dict) -> dict | None:
    """The benchmark step the loop is read against: the same config, the same strategy."""
    loop = results.get("loop", {}).get("rvm loop")
    if "rvm step" in results.get("loop", {}) or not loop or not loop["ok"]:
        return results.get("loop", {}).get("rvm step")
    return results.get("stochastic_depth", {}).get(f"rvm on / {loop['sd_impl']}")


def targets(results: dict, s: Settings) -> list[dict]:
    """The suite's targets, for the sections that ran; each with pass/fail and margin."""
    out = []
    ratio = lambda a, b: a / b if a and b else None
    large = tuple(s.large)
    # CPU: rvm at half PyTorch's speed at least; GPU: three times as fast in bfloat16.
    mine, theirs, bound = (
        ("rvm", "torch eager channels_last", 0.5)
        if s.platform == "cpu"
        else ("rvm bfloat16", "torch eager channels_last bfloat16 autocast", 3.0)
    )
    train = results.get("train", {})
    if s.platform == "gpu" and "stochastic_depth" in results and "train" not in results:
        sd = results["stochastic_depth"]  # the same two runs as `train`'s large ones
        model = model_label(s.large, "nonshared")
        train = {f"{model} / {mine}": sd.get("rvm off")}
        train[f"{model} / {theirs}"] = sd.get("torch eager channels_last off")
    if train:
        for blocks in (s.small, s.large):
            for sharing in sharings(s):
                model = model_label(blocks, sharing)
                a = _step(train.get(f"{model} / {mine}"))
                b = _step(train.get(f"{model} / {theirs}"))
                if a is None and b is None and "train" not in results:
                    continue
                name = f"{model}: {mine} >= {bound:g}x {theirs} throughput"
                out.append(_target(name, ratio(b, a), bound, at_most=False, unit="x"))
    if "compile" in results:
        scan, unrolled = results["compile"].get("nn.scan"), results["compile"].get("unrolled")
        compile_s = lambda r: _compile_s(r) if r and r["ok"] else None
        name = f"{large} compile time: scan <= 1/3 of unrolled"
        out.append(_target(name, ratio(compile_s(scan), compile_s(unrolled)), 1 / 3, True, "x"))
        name = f"{large} step: scan no slower than unrolled"
        out.append(_target(name, ratio(_step(scan), _step(unrolled)), 1.0, True, "x"))
    if "relaxed" in results:
        rel = results["relaxed"]
        name = f"{large} all levels: relaxed step within 5% of raw"
        out.append(
            _target(name, ratio(_step(rel.get("relaxed")), _step(rel.get("raw"))), 1.05, True, "x")
        )
    if "stochastic_depth" in results:
        sd = results["stochastic_depth"]
        label, on = sd_on(sd)
        on, off = _step(on), _step(sd.get("rvm off"))
        if s.platform == "cpu":
            name = f"{large} rvm: stochastic depth step no slower than off"
            out.append(_target(name, ratio(on, off), 1.0, True, "x"))
        else:
            name = (
                f"{large} rvm: stochastic depth step at least 15% faster than off "
                f"(speed-up, {label})"
            )
            out.append(_target(name, ratio(off, on), 1.15, False, "x"))
    if "loop" in results:
        loop = results["loop"].get("rvm loop")
        name = f"{large} rvm: the real loop's steps/s >= 0.95x the benchmark step's"
        out.append(_target(name, ratio(_step(loop_step(results)), _step(loop)), 0.95, False, "x"))
        if s.platform == "gpu":
            rate = s.batch / _step(loop) if _step(loop) else None
            name = f"{large} the paper's run (stochastic depth on, test set every epoch), real loop"
            out.append(_target(name, rate, 14_000, False, " images/s"))
    if "packed" in results:
        out += pack_targets(results["packed"], s)
    return out


def report_loop(res: dict, ctx: dict, s: Settings) -> list[str]:
    r = res.get("rvm loop")
    if not r or not r["ok"]:
        return []
    spec, step = r["spec"], _step(ctx["loop_step"])
    return [
        f"`rvm.train.loop.train_and_evaluate` on {tuple(spec['blocks'])} nonshared, "
        f"{_dtype(r)}, stochastic depth on ({r['sd_impl']}), synthetic images: "
        f"{spec['epochs']} epochs of {spec['epoch_steps']} steps, {spec['test_images']} test "
        "images evaluated and a checkpoint written after each. A window is an epoch after "
        "the first (which compiles), its evaluation included; the step is the benchmark's "
        "of the same config and strategy.",
        "",
        "| run | s/step | images/s | steps/s | vs step | evaluation s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| loop | {_spread(r)} | {s.batch / r['step_s']:.1f} | {1 / r['step_s']:.1f} "
        f"| {_fmt(step / r['step_s'] if step else None)}x "
        f"| {_fmt(max(r['eval_s'][1:], default=None))} | {r['loop_wall_s']:.0f} |",
        f"| step | {_spread(ctx['loop_step']) if step else 'n/a'} "
        f"| {_fmt(s.batch / step if step else None)} | {_fmt(1 / step if step else None)} "
        "| 1x | | |",
    ]


def report_xla_gpu(res: dict, ctx: dict, s: Settings) -> list[str]:
    lines = [
        f"{tuple(s.large)} nonshared, bfloat16, stochastic depth on, under XLA_FLAGS "
        "(`rvm.train.xla.GPU_FLAG_SETS`) or unrolled blocks, against the same strategy "
        "under XLA's defaults (`stochastic_depth`). From each compiled step's HLO: "
        "command buffers (CUDA graphs; in brackets the command-buffer thunks of XLA's "
        "dumped thunk sequence), and the while loops and conditionals inside one (run on "
        "the device) of all of them.",
        "",
        "| run | s/step | vs defaults | command buffers | whiles in them | conditionals in "
        "them | first call s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in res.items():
        if not r["ok"]:
            continue
        base = _step(ctx["sd"].get(f"rvm on / {r['spec']['sd_impl']}"))
        h = r.get("hlo", {})
        inside = lambda op, h=h: (
            f"{h[f'{op}s_in_command_buffers']} of {h[f'{op}s']}" if h else "n/a"
        )
        lines.append(
            f"| {label} | {_spread(r)} | {_fmt(base / r['step_s'] if base else None)}x "
            f"| {h.get('command_buffers', 'n/a')} ({h.get('command_buffer_thunks', 'n/a')}) "
            f"| {inside('while')} "
            f"| {inside('conditional')} | {_fmt(r['first_call_s'])} |"
        )
    return lines


def projection(results: dict, s: Settings) -> list[dict]:
    """Projected wall time of the paper's run of the large model: every epoch's training
    steps with stochastic depth on (section `stochastic_depth`) and one evaluation of
    the test set (section `eval`), for rvm and PyTorch; checkpoints and logging left out.
    """
    sd, ev = results.get("stochastic_depth", {}), results.get("eval", {})
    steps = EPOCHS * (TRAIN_IMAGES // s.batch)
    out = []
    torch = "torch eager channels_last"
    for impl, train_label, eval_label in (
        ("rvm", sd_on(sd)[0], "rvm evaluate"),
        (torch, f"{torch} on", f"{torch} no_grad"),
    ):
        step, eval_batch_s = _step(sd.get(train_label)), _step(ev.get(eval_label))
        if not step or not eval_batch_s:
            continue
        eval_s = EPOCHS * TEST_IMAGES / s.eval_batch * eval_batch_s
        row = {"implementation": impl, "dtype": _dtype(sd[train_label]), "step_s": step}
        row.update(steps=steps, train_h=steps * step / 3600, eval_h=eval_s / 3600)
        row["total_h"] = row["train_h"] + row["eval_h"]
        out.append(row)
    return out


def report_projection(rows: list[dict], s: Settings) -> list[str]:
    lines = [
        f"The paper's run of {tuple(s.large)}: {EPOCHS} epochs of {TRAIN_IMAGES // s.batch} "
        f"steps at batch {s.batch} with stochastic depth on (section `stochastic_depth`), and "
        f"the {TEST_IMAGES} test images evaluated after each epoch (section `eval`); "
        "checkpoints and logging left out.",
        "",
        "| implementation | dtype | s/step | training h | evaluation h | total h |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['implementation']} | {r['dtype']} | {_fmt(r['step_s'])} | {r['train_h']:.1f} "
            f"| {r['eval_h']:.2f} | {r['total_h']:.1f} |"
        )
    return lines


def render(doc: dict, s: Settings) -> str:
    """The markdown report of `doc` (the JSON written beside it)."""
    m, v, res = doc["machine"], doc["versions"], doc["results"]
    ctx = {"ceilings": doc["ceiling_gflops"], "sd": res.get("stochastic_depth", {})}
    ctx["loop_step"] = loop_step(res)
    lines = [
        f"# rvm benchmark: {doc['name']}",
        "",
        f"- date: {doc['date']} (wall {doc.get('wall_s', 0) / 60:.1f} min)",
        f"- command: `{doc['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB, "
        f"ISA {' '.join(m['isa']) or 'n/a'}; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in m['load_average_at_start'])} (1/5/15 min)"
        + (f"; GPU {'; '.join(m['gpus'])}" if "gpus" in m else ""),
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- settings: {json.dumps(doc.get('settings', dataclasses.asdict(s)))}",
        "",
    ]
    # The suite's own children load the machine, so only the load at the start says
    # whether something else was running.
    load = m["load_average_at_start"][0]
    if load > 0.5 * (m["logical_cores"] or 1):
        lines += [
            f"**Warning: the machine was busy (1-minute load average up to {load:.1f} on "
            f"{m['logical_cores']} cores); multi-threaded timings are unreliable.**",
            "",
        ]
    if doc["targets"]:
        lines += ["## Targets", ""] + [f"- {t['target']}: {t['text']}" for t in doc["targets"]]
        lines.append("")
    against = lambda name: lambda r, c, s: _report_against(r, s, *AGAINST[name])
    sections: dict[str, Callable[..., list[str]]] = {
        "ceiling": lambda r, c, s: report_ceiling(r, c),
        "train": report_train,
        "compile": report_compile,
        "relaxed": lambda r, c, s: report_steps(
            r, c, s, f"{tuple(s.large)}, all levels in scope, stochastic depth off."
        ),
        "stochastic_depth": lambda r, c, s: report_steps(
            r, c, s, f"{tuple(s.large)} nonshared, the paper's death rates (0 to 0.5) or none."
        ),
        "eval": report_eval,
        "memory": report_memory,
        "data_parallel": against("data_parallel"),
        "xla_cpu": against("xla_cpu"),
        "convs": report_convs,
        "malloc": against("malloc"),
        "loop": report_loop,
        "xla_gpu": report_xla_gpu,
        "packed": report_packed,
    }
    for name, body in sections.items():
        if name in res:
            lines += [f"## {name}", ""] + body(res[name], ctx, s) + [""] + _failures(res[name])
    if doc["projection"]:
        lines += ["## projection", ""] + report_projection(doc["projection"], s) + [""]
    return "\n".join(lines) + "\n"


def derive(doc: dict, s: Settings) -> None:
    """Sets what `doc`'s results imply: the ceilings, the targets' verdicts, the projection."""
    res = doc["results"]
    doc["ceiling_gflops"] = ceilings(res.get("ceiling", {}))
    doc["targets"] = targets(res, s)
    doc["projection"] = projection(res, s)


def redrawn(doc: dict) -> str:
    """Re-derives a report's JSON document in place from its results and settings;
    returns its markdown."""
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc["settings"].items()})
    derive(doc, s)
    return render(doc, s)


def redraw(json_path: Path) -> Path:
    """Re-derives a report's JSON and rewrites it and its markdown; returns the markdown's path."""
    doc = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md")
    md.write_text(redrawn(doc))
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    return md


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m bench.report RESULT.json [RESULT.json ...]")
    for arg in sys.argv[1:]:
        print(f"wrote {redraw(Path(arg))}")
