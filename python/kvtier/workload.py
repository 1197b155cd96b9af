"""Agent-trace workloads: the JSONL format ``kvtier replay`` reads, and a seedable default.

One JSON object per line, one trace each::

    {"trace_id": "t1", "arrival_s": 0.0, "fork_of": null,
     "steps": [{"append": [token ids added before this step], "generate": 32, "tool_gap_s": 1.5}, ...]}

``fork_of`` may be ``{"trace_id": "t0", "after_step": 2}``: a subagent that starts from its
parent's context as it was after the parent's step 2 (its appended tokens and its generated
tokens), no earlier than its own ``arrival_s``. ``tool_gap_s`` is the tool-call gap after the
step (the last step's gap is ignored). A step may also name the ``tool`` it calls (gaps are learned
per tool) and carry the harness's hint for the gap, ``expected_gap_s``; both are optional.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.errors import InvalidArgumentError


@dataclass
class Step:
    append: list[int]
    generate: int
    tool_gap_s: float = 0.0
    tool: str | None = None  # the tool called after this step (gaps are learned per tool)
    expected_gap_s: float | None = None  # the harness's hint for the gap, if it has one


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
        tool = s.get("tool")
        if tool is not None and not isinstance(tool, str):
            raise InvalidArgumentError(f"{sw}: tool must be a string or null, got {tool!r}")
        hint = s.get("expected_gap_s")
        if hint is not None and (not isinstance(hint, (int, float)) or isinstance(hint, bool) or hint < 0):
            raise InvalidArgumentError(f"{sw}: expected_gap_s must be a number >= 0 or null, got {hint!r}")
        steps.append(Step(list(append), gen, float(gap), tool, None if hint is None else float(hint)))
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
                a = np.asarray(s.append, dtype=np.int64)
                bad = a[(a < 0) | (a >= vocab_size)]
                if len(bad):
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
                "steps": [{"append": s.append, "generate": s.generate, "tool_gap_s": s.tool_gap_s,
                           **({"tool": s.tool} if s.tool is not None else {}),
                           **({"expected_gap_s": s.expected_gap_s} if s.expected_gap_s is not None else {})}
                          for s in t.steps],
            }) + "\n")


def _check_gap_scale(scale: Any) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < float("inf"):
        raise InvalidArgumentError(f"gap scale must be a number > 0, got {scale!r}")


def scale_gaps(traces: list[Trace], scale: float) -> list[Trace]:
    """The same traces with every tool-call gap and gap hint multiplied by ``scale`` (> 0).

    Tools, their order and the spread of their gaps are kept; only the time between steps changes
    (Note [Replay load] in :mod:`kvtier.replay`)."""
    _check_gap_scale(scale)
    if scale == 1:
        return traces
    return [replace(t, steps=[replace(s, tool_gap_s=round(s.tool_gap_s * scale, 6),
                                      expected_gap_s=None if s.expected_gap_s is None
                                      else round(s.expected_gap_s * scale, 6)) for s in t.steps])
            for t in traces]


# Tools of the default workload: (name, median gap s, log-normal sigma, share of calls, hinted).
# Sub-second file reads to minutes-long builds and human replies; a harness knows roughly how long
# the tools with a timeout or a schedule take (hinted), the rest are learned from their history.
DEFAULT_TOOLS = (
    ("read_file", 0.4, 0.5, 0.30, False),
    ("grep", 0.8, 0.5, 0.15, False),
    ("web_search", 3.0, 0.5, 0.20, False),
    ("run_tests", 12.0, 0.6, 0.20, True),
    ("build", 40.0, 0.5, 0.10, True),
    ("ask_user", 90.0, 0.8, 0.05, True),
)


def default_workload(vocab_size: int, seed: int = 0, traces: int = 8, system_tokens: int = 384,
                     tools_tokens: int = 128, steps: tuple[int, int] = (5, 8), forks: int | None = None,
                     fan_out: int = 2, arrival_window_s: float = 20.0, first_append: tuple[int, int] = (32, 64),
                     append: tuple[int, int] = (16, 64), generate: tuple[int, int] = (4, 12),
                     gap_scale: float = 1.0) -> list[Trace]:
    """An agent workload shaped like published agent traffic, scaled down for a CPU.

    Every trace starts with one shared system prompt and tool schemas (long shared prefixes), then
    alternates short generations (4-12 tokens) with tool results (16-64 tokens) appended to a
    growing history, over 5-8 turns; tool gaps come from :data:`DEFAULT_TOOLS`, sub-second to
    minutes. ``forks`` parents (default 40% of the traces) fan out ``fan_out`` subagents each after
    a random turn; a subagent shares its parent's whole context.
    """
    _check_gap_scale(gap_scale)
    rng = np.random.default_rng(seed)
    low = 4  # keep a few ids free (no special meaning, just never sampled)
    names = [t[0] for t in DEFAULT_TOOLS]
    share = np.array([t[3] for t in DEFAULT_TOOLS])
    share = share / share.sum()

    def toks(n: int) -> list[int]:
        return rng.integers(low, vocab_size, size=n).tolist()

    def step(append: list[int], gen: tuple[int, int]) -> Step:
        i = int(rng.choice(len(names), p=share))
        _, median, sigma, _, hinted = DEFAULT_TOOLS[i]
        gap = round(float(np.clip(gap_scale * median * rng.lognormal(0.0, sigma), 0.1, 600.0)), 3)
        hint = round(gap * float(rng.lognormal(0.0, 0.25)), 3) if hinted and rng.random() < 0.75 else None
        return Step(append, int(rng.integers(gen[0], gen[1] + 1)), gap, names[i], hint)

    system = toks(system_tokens) + toks(tools_tokens)
    out: list[Trace] = []
    for i in range(traces):
        n_steps = int(rng.integers(steps[0], steps[1] + 1))
        st = [step((system + toks(int(rng.integers(*first_append)))) if j == 0
                   else toks(int(rng.integers(append[0], append[1] + 1))), generate) for j in range(n_steps)]
        out.append(Trace(f"t{i}", round(float(rng.uniform(0, arrival_window_s)), 3), st))
    n_forks = max(0, round(0.4 * traces)) if forks is None else forks
    parents = rng.choice(traces, size=min(n_forks, traces), replace=False) if traces else []
    k = 0
    for p in parents:
        parent = out[int(p)]
        after = int(rng.integers(0, len(parent.steps) - 1))
        for _ in range(fan_out):
            st = [step(toks(int(rng.integers(append[0], append[1] + 1))), generate) for _ in range(int(rng.integers(2, 4)))]
            out.append(Trace(f"{parent.trace_id}.sub{k}", parent.arrival_s, st, Fork(parent.trace_id, after)))
            k += 1
    validate(out, vocab_size)
    return out
