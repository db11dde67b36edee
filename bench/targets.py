"""What a benchmark's results imply: the matmul ceilings, each target's verdict with its
margin, and the projected wall time of the paper's run. `derive` writes them into the
result's JSON document, which `bench.report` renders."""

from __future__ import annotations

from bench.plan import (
    EPOCHS,
    TARGET_PACKS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    Settings,
    model_label,
    pack_label,
    sharings,
)


def step_s(r: dict | None) -> float | None:
    """A measurement's step time, None when it failed or never ran."""
    return r["step_s"] if r and r.get("ok") else None


def dtype(r: dict) -> str:
    """The dtype a measurement trained in."""
    return r["spec"].get("dtype", "float32")


def total_compile_s(r: dict) -> float:
    """Trace + lower + XLA compile of the step, measured ahead of time."""
    return r["trace_s"] + r["lower_s"] + r["compile_s"]


def target(name: str, value: float | None, bound: float, at_most: bool, unit: str = "") -> dict:
    """A target with its margin: how far the value sits inside (+) or outside (-) the bound."""
    if value is None:
        return {"target": name, "pass": None, "text": "not measured"}
    ok = value <= bound if at_most else value >= bound
    margin = (bound - value) if at_most else (value - bound)
    verdict = "PASS" if ok else "FAIL"
    text = f"{verdict}: {value:.3g}{unit} vs {bound:.3g}{unit} (margin {margin:+.3g}{unit})"
    return {"target": name, "pass": ok, "value": value, "bound": bound, "text": text}


def ceilings(res: dict) -> dict[str, float]:
    """dtype -> the fastest matmul's GFLOP/s in it: the ceiling FLOP rates are read against."""
    out: dict[str, float] = {}
    for r in res.values():
        if r["ok"]:
            out[dtype(r)] = max(out.get(dtype(r), 0.0), r["gflops"])
    return out


def packed_rate(res: dict, label: str, s: Settings) -> float | None:
    """Images/s of all the runs of `packed` measurement `label` ("model / K=k / how")."""
    r = res.get(label)
    if not r or not r.get("ok"):
        return None
    return int(label.split(" / ")[1][2:]) * s.batch / r["step_s"]


def _best_pack(res: dict, blocks, k: int, s: Settings) -> tuple[str | None, float | None]:
    """The fastest strategy for K packed runs of `blocks`, and its images/s."""
    rates = {
        label.rsplit(" / ", 1)[1]: packed_rate(res, label, s)
        for label, r in res.items()
        if label.startswith(pack_label(blocks, k, "")) and r["spec"]["kind"] == "rvm_pack"
    }
    rates = {how: rate for how, rate in rates.items() if rate}
    if not rates:
        return None, None
    best = max(rates, key=rates.get)
    return best, rates[best]


def pack_targets(res: dict, s: Settings) -> list[dict]:
    """CPU: two packed runs at least as fast as the two one after another; H200 (GPU
    plan): 8 packed (3,4,4) runs at >= 4x one run's images/s, 4 (18,18,18) at >= 2x."""
    bounds = {"cpu": {2: 1.0}, "gpu": {8: 4.0, 4: 2.0}}[s.platform]
    out = []
    for blocks, k in TARGET_PACKS[s.platform](s):
        one = packed_rate(res, pack_label(blocks, 1, "one run"), s)
        how, rate = _best_pack(res, blocks, k, s)
        name = (
            f"{tuple(blocks)}: {k} packed runs ({how or 'fastest strategy'}) >= {bounds[k]:g}x "
            "one run's images/s"
        )
        out.append(target(name, rate / one if rate and one else None, bounds[k], False, "x"))
    return out


def sd_on(sd: dict) -> tuple[str, dict | None]:
    """rvm's stochastic-depth step as shipped (`rvm on`), or else its fastest strategy."""
    if "rvm on" in sd:
        return "rvm on", sd["rvm on"]
    ran = {k: r for k, r in sd.items() if k.startswith("rvm on") and step_s(r)}
    label = min(ran, key=lambda k: ran[k]["step_s"], default="rvm on")
    return label, ran.get(label)


def loop_epoch_s(loop: dict | None) -> float | None:
    """The loop's seconds per step over whole epochs, evaluation and checkpoint included."""
    return loop.get("epoch_step_s", loop["step_s"]) if step_s(loop) else None


def loop_step(results: dict) -> dict | None:
    """The benchmark step the loop is read against: the same config, the same strategy."""
    loop = results.get("loop", {}).get("rvm loop")
    if "rvm step" in results.get("loop", {}) or not loop or not loop["ok"]:
        return results.get("loop", {}).get("rvm step")
    return results.get("stochastic_depth", {}).get(f"rvm on / {loop['sd_impl']}")


def verdicts(results: dict, s: Settings) -> list[dict]:
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
                a = step_s(train.get(f"{model} / {mine}"))
                b = step_s(train.get(f"{model} / {theirs}"))
                if a is None and b is None and "train" not in results:
                    continue
                name = f"{model}: {mine} >= {bound:g}x {theirs} throughput"
                out.append(target(name, ratio(b, a), bound, at_most=False, unit="x"))
    if "compile" in results:
        scan, unrolled = results["compile"].get("nn.scan"), results["compile"].get("unrolled")
        compile_s = lambda r: total_compile_s(r) if r and r["ok"] else None
        name = f"{large} compile time: scan <= 1/3 of unrolled"
        out.append(target(name, ratio(compile_s(scan), compile_s(unrolled)), 1 / 3, True, "x"))
        name = f"{large} step: scan no slower than unrolled"
        out.append(target(name, ratio(step_s(scan), step_s(unrolled)), 1.0, True, "x"))
    if "relaxed" in results:
        rel = results["relaxed"]
        name = f"{large} all levels: relaxed step within 5% of raw"
        out.append(
            target(name, ratio(step_s(rel.get("relaxed")), step_s(rel.get("raw"))), 1.05, True, "x")
        )
    if "stochastic_depth" in results:
        sd = results["stochastic_depth"]
        label, on = sd_on(sd)
        on, off = step_s(on), step_s(sd.get("rvm off"))
        if s.platform == "cpu":
            name = f"{large} rvm: stochastic depth step no slower than off"
            out.append(target(name, ratio(on, off), 1.0, True, "x"))
        else:
            name = (
                f"{large} rvm: stochastic depth step at least 15% faster than off "
                f"(speed-up, {label})"
            )
            out.append(target(name, ratio(off, on), 1.15, False, "x"))
    if "loop" in results:
        # The loop's training steps alone (its epochs less evaluation and checkpoint):
        # what the host's dispatch costs against the benchmark's step.
        loop = results["loop"].get("rvm loop")
        name = (
            f"{large} rvm: the real loop's training steps/s >= 0.95x the benchmark step's "
            "(evaluation and checkpoint apart)"
        )
        out.append(target(name, ratio(step_s(loop_step(results)), step_s(loop)), 0.95, False, "x"))
        if s.platform == "gpu":
            epoch = loop_epoch_s(loop)
            rate = s.batch / epoch if epoch else None
            name = f"{large} the paper's run (stochastic depth on, test set every epoch), real loop"
            out.append(target(name, rate, 14_000, False, " images/s"))
    if "packed" in results:
        out += pack_targets(results["packed"], s)
    return out


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
        step, eval_batch_s = step_s(sd.get(train_label)), step_s(ev.get(eval_label))
        if not step or not eval_batch_s:
            continue
        eval_s = EPOCHS * TEST_IMAGES / s.eval_batch * eval_batch_s
        row = {"implementation": impl, "dtype": dtype(sd[train_label]), "step_s": step}
        row.update(steps=steps, train_h=steps * step / 3600, eval_h=eval_s / 3600)
        row["total_h"] = row["train_h"] + row["eval_h"]
        out.append(row)
    return out


def derive(doc: dict, s: Settings) -> None:
    """Sets what `doc`'s results imply: the ceilings, the targets' verdicts, the projection."""
    res = doc["results"]
    doc["ceiling_gflops"] = ceilings(res.get("ceiling", {}))
    doc["targets"] = verdicts(res, s)
    doc["projection"] = projection(res, s)
