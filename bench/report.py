"""The benchmark report: a run's results as markdown tables, with the targets' verdicts
and the projection that `bench.targets` derives into the JSON document. `render` writes
the markdown from that document alone. After a change here or there, redraw committed
reports from their measurements without measuring again:

    python -m bench.report bench/results/cpu.json
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from bench.plan import (
    CONV_IMPLS,
    CONV_PASSES,
    EPOCHS,
    LEVELS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    Settings,
    forward_macs,
    impls,
    model_label,
    sharings,
    train_flops,
)
from bench.targets import (
    derive,
    dtype,
    loop_epoch_s,
    loop_step,
    packed_rate,
    step_s,
    total_compile_s,
)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _spread(r: dict) -> str:
    w = r["windows_s"]
    return f"{_fmt(r['step_s'])} [{_fmt(min(w))}-{_fmt(max(w))}]"


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
    model = lambda x: (x["spec"]["blocks"], x["spec"]["sharing"], dtype(x))
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
                base = step_s(_rvm_of(res, r))
                ratio = _fmt(base / r["step_s"]) + "x" if base else "n/a"
                ceiling = ctx["ceilings"].get(dtype(r))
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
                f"| {_fmt(r['compile_s'])} | {_fmt(total_compile_s(r))} "
                f"| {_fmt(r['first_call_s'])} | {_spread(r)} |"
            )
    return lines


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
            ceiling = ctx["ceilings"].get(dtype(r))
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
            ref = step_s(res.get(label.rsplit("/", 1)[0] + "/ " + base))
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
        rate, one = packed_rate(res, label, s), packed_rate(res, f"{model} / K=1 / one run", s)
        ratio = f"{rate / one:.2f}x" if one else "n/a"
        rss = r.get("processes_rss_mb", r.get("max_rss_mb"))
        lines.append(
            f"| {model} | {k[2:]} | {how} | {_spread(r)} | {rate:.1f} | {ratio} | {_fmt(rss, 4)} "
            f"| {_fmt(r.get('device_peak_mb'), 4)} |"
        )
    return lines


def report_loop(res: dict, ctx: dict, s: Settings) -> list[str]:
    r = res.get("rvm loop")
    if not r or not r["ok"]:
        return []
    spec, step = r["spec"], step_s(ctx["loop_step"])
    median = lambda xs: statistics.median(xs) if xs else None
    epoch = loop_epoch_s(r)
    return [
        f"`rvm.train.loop.train_and_evaluate` on {tuple(spec['blocks'])} nonshared, "
        f"{dtype(r)}, stochastic depth on ({r['sd_impl']}), synthetic images: "
        f"{spec['epochs']} epochs of {spec['epoch_steps']} steps, {spec['test_images']} test "
        "images evaluated and a checkpoint written after each. A window is an epoch after "
        "the first (which compiles). `s/step` is the epoch's training steps alone: its "
        "wall time less its evaluation and the checkpoint written in it, per step; the "
        "target reads it against the benchmark's step of the same config and strategy. "
        "`epoch s/step` is the whole epoch's, evaluation and checkpoint included; "
        "`evaluation s` and `checkpoint s` the median per epoch.",
        "",
        "| run | s/step | images/s | steps/s | vs step | epoch s/step | evaluation s "
        "| checkpoint s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| loop | {_spread(r)} | {s.batch / r['step_s']:.1f} | {1 / r['step_s']:.1f} "
        f"| {_fmt(step / r['step_s'] if step else None)}x | {_fmt(epoch)} "
        f"| {_fmt(median(r['eval_s'][1:]))} | {_fmt(median(r.get('checkpoint_s', [])))} "
        f"| {r['loop_wall_s']:.0f} |",
        f"| step | {_spread(ctx['loop_step']) if step else 'n/a'} "
        f"| {_fmt(s.batch / step if step else None)} | {_fmt(1 / step if step else None)} "
        "| 1x | | | | |",
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
        base = step_s(ctx["sd"].get(f"rvm on / {r['spec']['sd_impl']}"))
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
        *([f"- commit: `{doc['commit']}`"] if doc.get("commit") else []),
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
