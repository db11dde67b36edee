"""What XLA:GPU compiled: command buffers (CUDA graphs) in a dumped HLO module.

XLA:GPU runs a while loop or a conditional outside a command buffer by copying
its predicate to the host and waiting for it. Whether flags such as
`--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL` really moved them into
command buffers is visible only in the compiled module, which a measurement asks
XLA to dump (`dump_to`) and counts here (`counted`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path


def dump_to(spec: dict) -> str | None:
    """With `"count_command_buffers": true`, a directory XLA dumps the compiled HLO into
    (set before JAX starts its backend, which reads XLA_FLAGS once)."""
    if not spec.get("count_command_buffers"):
        return None
    where = tempfile.mkdtemp(prefix="rvm_hlo_")
    dump = f"--xla_dump_to={where} --xla_dump_hlo_as_text"
    # XLA outlines command buffers after scheduling the module, later than the module
    # dumped "after optimizations": dump after that pass (and any pass named for them).
    dump += " --xla_dump_hlo_pass_re=command"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {dump}"
    return where


_CALLED = re.compile(
    r"(?:condition|body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)"
)


def command_buffer_counts(hlo: str) -> dict[str, int]:
    """Command buffers (CUDA graphs) in an HLO module's text, and how many of its while
    loops and conditionals run inside one (on the device) rather than on the host."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            words = line.split()
            name = words[1] if words[0] == "ENTRY" else words[0]
            current = bodies.setdefault(name.lstrip("%"), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)

    def calls(name: str) -> set[str]:
        found = set()
        for line in bodies.get(name, []):
            found.update(_CALLED.findall(line))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                found.update(g.strip().lstrip("%") for g in group.split(","))
        return found

    graphs = [n for n in bodies if n.startswith("command_buffer")]
    inside, todo = set(), list(graphs)
    while todo:
        name = todo.pop()
        if name not in inside:
            inside.add(name)
            todo.extend(calls(name))
    count = lambda op, names: sum(
        len(re.findall(rf"\s{op}\(", line.split("=", 1)[-1]))
        for n in names
        for line in bodies.get(n, [])
    )
    out = {"command_buffers": len(graphs)}
    for op in ("while", "conditional"):
        out[f"{op}s"] = count(op, bodies)
        out[f"{op}s_in_command_buffers"] = count(op, inside)
    return out


def counted(where: str | None) -> dict:
    """The dumped module with the most command buffers (the train step's, after the pass)."""
    if where is None:
        return {}
    paths = sorted(Path(where).glob("*.txt"))
    # The step's module (rvm's jitted `train_step`), not the initialisation's, whose
    # random draws are loops of their own; any module where no name says.
    paths = [p for p in paths if "train_step" in p.name] or paths
    files = {p.name: p.read_text(errors="replace") for p in paths}
    shutil.rmtree(where, ignore_errors=True)
    counts = [command_buffer_counts(text) for text in files.values()]
    most = lambda c: (c["command_buffers"], c["whiles"] + c["conditionals"])
    best = max(counts, key=most, default={})
    # A newer XLA may build command buffers from the thunk sequence instead of the HLO.
    thunks = [t.count("kCommandBuffer") for name, t in files.items() if "thunk" in name]
    return {"hlo": {**best, "command_buffer_thunks": max(thunks, default=0)}}
