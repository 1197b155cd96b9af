"""Agent-trace workloads: the JSONL format ``kvtier replay`` reads, and a seedable default.

One JSON object per line, one trace each::

    {"trace_id": "t1", "arrival_s": 0.0, "fork_of": null,
     "steps": [{"append": [token ids added before this step], "generate": 32, "tool_gap_s": 1.5}, ...]}

``fork_of`` may be ``{"trace_id": "t0", "after_step": 2}``: a subagent that starts from its
parent's context as it was after the parent's step 2 (its appended tokens and its generated
tokens), no earlier than its own ``arrival_s``. ``tool_gap_s`` is the tool-call gap after the
step (the last step's gap is ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.errors import InvalidArgumentError


@dataclass
class Step:
    append: list[int]
    generate: int
    tool_gap_s: float = 0.0


@dataclass
class Fork:
    trace_id: str
    after_step: int


@dataclass
class Trace:
    trace_id: str
    arrival_s: float
    steps: list[Step]
    fork_of: Fork | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _parse_trace(obj: Any, where: str) -> Trace:
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"{where}: a trace must be a JSON object, got {type(obj).__name__}")
    for k in ("trace_id", "steps"):
        if k not in obj:
            raise InvalidArgumentError(f"{where}: missing field {k!r}")
    tid = obj["trace_id"]
    if not isinstance(tid, str) or not tid:
        raise InvalidArgumentError(f"{where}: trace_id must be a non-empty string")
    arrival = obj.get("arrival_s", 0.0)
    if not isinstance(arrival, (int, float)) or arrival < 0:
        raise InvalidArgumentError(f"{where}: arrival_s must be a number >= 0, got {arrival!r}")
    steps_raw = obj["steps"]
    if not isinstance(steps_raw, list) or not steps_raw:
        raise InvalidArgumentError(f"{where}: steps must be a non-empty list")
    steps = []
    for i, s in enumerate(steps_raw):
        sw = f"{where}, step {i}"
        if not isinstance(s, dict):
            raise InvalidArgumentError(f"{sw}: a step must be an object")
        append = s.get("append", [])
        if not isinstance(append, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in append):
            raise InvalidArgumentError(f"{sw}: append must be a list of integer token ids")
        gen = s.get("generate")
        if not isinstance(gen, int) or isinstance(gen, bool) or gen < 1:
            raise InvalidArgumentError(f"{sw}: generate must be an int >= 1, got {gen!r}")
        gap = s.get("tool_gap_s", 0.0)
        if not isinstance(gap, (int, float)) or gap < 0:
            raise InvalidArgumentError(f"{sw}: tool_gap_s must be a number >= 0, got {gap!r}")
        steps.append(Step(list(append), gen, float(gap)))
    fork = obj.get("fork_of")
    fork_of = None
    if fork is not None:
        if not isinstance(fork, dict) or not isinstance(fork.get("trace_id"), str) or not isinstance(fork.get("after_step"), int):
            raise InvalidArgumentError(f"{where}: fork_of must be null or {{\"trace_id\": str, \"after_step\": int}}")
        fork_of = Fork(fork["trace_id"], fork["after_step"])
    if fork_of is None and not steps[0].append:
        raise InvalidArgumentError(f"{where}: the first step of a trace that is not a fork must append tokens")
    return Trace(tid, float(arrival), steps, fork_of)


def validate(traces: list[Trace], vocab_size: int | None = None) -> None:
    """Cross-trace checks: unique ids, forks point at earlier steps of known traces, token ids in
    the vocabulary."""
    by_id: dict[str, Trace] = {}
    for t in traces:
        if t.trace_id in by_id:
            raise InvalidArgumentError(f"trace_id {t.trace_id!r} appears twice")
        by_id[t.trace_id] = t
    for t in traces:
        if t.fork_of is not None:
            parent = by_id.get(t.fork_of.trace_id)
            if parent is None:
                raise InvalidArgumentError(f"trace {t.trace_id!r} forks from unknown trace {t.fork_of.trace_id!r}")
            if not 0 <= t.fork_of.after_step < len(parent.steps):
                raise InvalidArgumentError(
                    f"trace {t.trace_id!r} forks after step {t.fork_of.after_step} of {parent.trace_id!r}, "
                    f"which has {len(parent.steps)} steps")
            seen = {t.trace_id}
            p: Trace | None = parent
            while p is not None and p.fork_of is not None:
                if p.trace_id in seen:
                    raise InvalidArgumentError(f"trace {t.trace_id!r} is part of a fork cycle")
                seen.add(p.trace_id)
                p = by_id.get(p.fork_of.trace_id)
        if vocab_size is not None:
            for i, s in enumerate(t.steps):
                bad = [x for x in s.append if not 0 <= x < vocab_size]
                if bad:
                    raise InvalidArgumentError(
                        f"trace {t.trace_id!r} step {i}: token id {bad[0]} is outside the model's vocabulary "
                        f"[0, {vocab_size})")


def load(path: str | Path, vocab_size: int | None = None) -> list[Trace]:
    """Read a JSONL workload; every error names the line."""
    traces = []
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"workload file {str(p)!r} does not exist")
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgumentError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            traces.append(_parse_trace(obj, f"{p}:{lineno}"))
    if not traces:
        raise InvalidArgumentError(f"workload file {str(p)!r} holds no traces")
    validate(traces, vocab_size)
    return traces


def dump(traces: list[Trace], path: str | Path) -> None:
    with Path(path).open("w") as f:
        for t in traces:
            f.write(json.dumps({
                "trace_id": t.trace_id, "arrival_s": t.arrival_s,
                "fork_of": None if t.fork_of is None else {"trace_id": t.fork_of.trace_id,
                                                           "after_step": t.fork_of.after_step},
                "steps": [{"append": s.append, "generate": s.generate, "tool_gap_s": s.tool_gap_s} for s in t.steps],
            }) + "\n")


def default_workload(vocab_size: int, seed: int = 0, traces: int = 8, system_tokens: int = 320,
                     tools_tokens: int = 128, steps: tuple[int, int] = (4, 7), forks: int = 3) -> list[Trace]:
    """An agent workload shaped like published agent traffic, scaled for a CPU.

    Every trace starts with one shared system prompt and tool schemas (so prefixes are long and
    shared), then alternates short generations with tool results appended to a growing history;
    tool gaps run from sub-second to tens of seconds (log-normal); a few subagents fork from a
    parent mid-trace and share its whole context.
    """
    rng = np.random.default_rng(seed)
    low = 4  # keep a few ids free (no special meaning, just never sampled)

    def toks(n: int) -> list[int]:
        return rng.integers(low, vocab_size, size=n).tolist()

    system = toks(system_tokens) + toks(tools_tokens)
    out: list[Trace] = []
    for i in range(traces):
        n_steps = int(rng.integers(steps[0], steps[1] + 1))
        st = []
        for j in range(n_steps):
            append = (system + toks(int(rng.integers(32, 72)))) if j == 0 else toks(int(rng.integers(24, 96)))
            gap = float(np.clip(rng.lognormal(mean=1.0, sigma=1.2), 0.2, 120.0))
            st.append(Step(append, int(rng.integers(6, 14)), round(gap, 3)))
        out.append(Trace(f"t{i}", round(float(rng.uniform(0, 20.0)), 3), st))
    for k in range(forks):
        parent = out[int(rng.integers(0, traces))]
        after = int(rng.integers(0, len(parent.steps) - 1))
        n_steps = int(rng.integers(2, 4))
        st = [Step(toks(int(rng.integers(24, 64))), int(rng.integers(6, 12)),
                   round(float(np.clip(rng.lognormal(0.5, 1.0), 0.2, 60.0)), 3)) for _ in range(n_steps)]
        out.append(Trace(f"{parent.trace_id}.sub{k}", parent.arrival_s, st, Fork(parent.trace_id, after)))
    validate(out, vocab_size)
    return out
