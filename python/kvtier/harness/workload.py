"""Agent-trace workloads: the JSONL format ``kvtier replay`` reads, and a seedable default.

One JSON object per line, one trace each::

    {"trace_id": "t1", "arrival_s": 0.0, "fork_of": null,
     "steps": [{"append": [token ids added before this step], "generate": 32, "tool_gap_s": 1.5}, ...]}

``fork_of`` may be ``{"trace_id": "t0", "after_step": 2}``: a subagent that starts from its
parent's context as it was after the parent's step 2 (its appended tokens and its generated
tokens), no earlier than its own ``arrival_s``; with ``"own_context": true`` the subagent starts
then with a context of its own (its first step appends it), as a harness's task subagent does.
``tool_gap_s`` is the tool-call gap after the step (the last step's gap is ignored). A step may also name the ``tool`` it calls (gaps are learned
per tool) and carry the harness's hint for the gap, ``expected_gap_s``; both are optional. A step
with ``"reset": true`` replaces the context: its ``append`` is the whole context the model sees
(a context compaction, which breaks the prefix the trace had).

:func:`load` also reads the Mooncake trace format (Note [Mooncake traces]), recognised from the
file's first line.
"""

from __future__ import annotations

import json
import math
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
    reset: bool = False  # the context is replaced by ``append`` (a compaction), not extended


@dataclass
class Fork:
    trace_id: str
    after_step: int
    own_context: bool = False  # a subagent with a context of its own (not its parent's), started then


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
        reset = s.get("reset", False)
        if not isinstance(reset, bool):
            raise InvalidArgumentError(f"{sw}: reset must be true or false, got {reset!r}")
        if reset and not append:
            raise InvalidArgumentError(f"{sw}: a reset step must append the new context")
        steps.append(Step(list(append), gen, float(gap), tool, None if hint is None else float(hint), reset))
    fork = obj.get("fork_of")
    fork_of = None
    if fork is not None:
        if (not isinstance(fork, dict) or not isinstance(fork.get("trace_id"), str)
                or not isinstance(fork.get("after_step"), int) or not isinstance(fork.get("own_context", False), bool)):
            raise InvalidArgumentError(f"{where}: fork_of must be null or {{\"trace_id\": str, \"after_step\": int"
                                       f"[, \"own_context\": bool]}}")
        fork_of = Fork(fork["trace_id"], fork["after_step"], fork.get("own_context", False))
    if (fork_of is None or fork_of.own_context) and not steps[0].append:
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


def context_tokens(by_id: dict[str, Trace], t: Trace, upto: int) -> int:
    """Tokens of ``t``'s context after its step ``upto`` (appends and generated tokens, since the
    last reset, on top of its parent's for a fork)."""
    first = max((i for i in range(upto + 1) if t.steps[i].reset), default=-1)
    base = 0
    if t.fork_of is not None and not t.fork_of.own_context and first < 0:
        base = context_tokens(by_id, by_id[t.fork_of.trace_id], t.fork_of.after_step)
    return base + sum(len(s.append) + s.generate for s in t.steps[max(first, 0): upto + 1])


def detect_format(path: str | Path) -> str:
    """``"kvtier"`` or ``"mooncake"``, from the first non-empty line of a JSONL file."""
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
            if isinstance(obj, dict) and "hash_ids" in obj and "steps" not in obj:
                return "mooncake"
            return "kvtier"
    raise InvalidArgumentError(f"workload file {str(p)!r} holds no traces")


def load(path: str | Path, vocab_size: int | None = None, *, mooncake_block_tokens: int = 512) -> list[Trace]:
    """Read a JSONL workload, kvtier's format or Mooncake's (:func:`load_mooncake`, recognised from
    the first line); every error names the line."""
    if detect_format(path) == "mooncake":
        return load_mooncake(path, vocab_size or MOONCAKE_VOCAB, block_tokens=mooncake_block_tokens)
    traces = []
    p = Path(path)
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
                                                           "after_step": t.fork_of.after_step,
                                                           **({"own_context": True} if t.fork_of.own_context else {})},
                "steps": [{"append": s.append, "generate": s.generate, "tool_gap_s": s.tool_gap_s,
                           **({"tool": s.tool} if s.tool is not None else {}),
                           **({"expected_gap_s": s.expected_gap_s} if s.expected_gap_s is not None else {}),
                           **({"reset": True} if s.reset else {})}
                          for s in t.steps],
            }) + "\n")


# Note [Mooncake traces]: the trace format of Mooncake's open traces (FAST'25), as aiperf and
# SGLang's bench_serving replay it: one request per JSONL line, ``timestamp`` (ms since the trace's
# start), ``input_length`` and ``output_length`` (tokens) and ``hash_ids``, one id per 512-token
# block of the input, equal ids meaning equal block contents *and* equal prefixes before them;
# multi-turn files add ``session_id`` (turns of one conversation, in file order) and may give a
# turn's ``delay`` (ms after the previous turn) instead of a timestamp. The mapping:
#   - a hash id becomes 512 token ids drawn from a generator seeded by the id alone, so two requests
#     share exactly the tokens of the blocks they share; a partial last block (``input_length`` not a
#     multiple of 512) is the head of its id's tokens; input beyond the listed blocks is tokens
#     seeded by the line, private to it;
#   - a request without a session is a trace of one step arriving at its timestamp; the turns of a
#     session are the steps of one trace, arriving at its first turn, each turn's gap the time
#     between its timestamp and the next one's (or the next ``delay``): an upper bound on the tool
#     time, as the original server's service time is inside it;
#   - a turn whose blocks start with all of the previous turn's blocks extends the context: it
#     appends its input beyond the previous turn's input and output, so the context the model sees
#     has the turn's ``input_length`` (our model's own output takes the place of the recorded one);
#     any other turn resets the context to its own input (a compaction, or a new topic);
#   - ``output_length`` is the step's ``generate`` (at least 1).
MOONCAKE_VOCAB = 32000  # token ids for a Mooncake trace when no model gives its vocabulary
_MOONCAKE_LOW = 4  # keep a few ids free, as the default workload does


def _hash_block(hash_id: int, block_tokens: int, vocab: int) -> np.ndarray:
    return np.random.default_rng([0x6D6F6F6E, hash_id]).integers(_MOONCAKE_LOW, vocab, size=block_tokens)


def load_mooncake(path: str | Path, vocab_size: int = MOONCAKE_VOCAB, block_tokens: int = 512) -> list[Trace]:
    """Read a Mooncake-format trace (Note [Mooncake traces]) as kvtier traces."""
    p = Path(path)
    if not isinstance(vocab_size, int) or vocab_size <= _MOONCAKE_LOW:
        raise InvalidArgumentError(f"vocab_size must be an int > {_MOONCAKE_LOW}, got {vocab_size!r}")
    if not isinstance(block_tokens, int) or block_tokens < 1:
        raise InvalidArgumentError(f"block_tokens must be an int >= 1, got {block_tokens!r}")
    blocks: dict[int, np.ndarray] = {}
    # (session or None, timestamp s or None, delay s or None, tokens, output) per line
    rows: list[tuple[str | None, float | None, float | None, np.ndarray, int, list[int]]] = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgumentError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InvalidArgumentError(f"{where}: a Mooncake request must be a JSON object")
            n_in, n_out, ids = obj.get("input_length"), obj.get("output_length", 1), obj.get("hash_ids", [])
            if not isinstance(n_in, int) or isinstance(n_in, bool) or n_in < 1:
                raise InvalidArgumentError(f"{where}: input_length must be an int >= 1, got {n_in!r}")
            if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 0:
                raise InvalidArgumentError(f"{where}: output_length must be an int >= 0, got {n_out!r}")
            if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0
                                                    for h in ids):
                raise InvalidArgumentError(f"{where}: hash_ids must be a list of integers >= 0")
            times = []
            for k in ("timestamp", "delay"):
                v = obj.get(k)
                if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < math.inf):
                    raise InvalidArgumentError(f"{where}: {k} must be a number of ms >= 0, got {v!r}")
                times.append(None if v is None else float(v) / 1e3)
            session = obj.get("session_id")
            if session is not None and not isinstance(session, (str, int)):
                raise InvalidArgumentError(f"{where}: session_id must be a string or an integer, got {session!r}")
            parts = []
            for h in ids[: -(-n_in // block_tokens)]:
                if h not in blocks:
                    blocks[h] = _hash_block(h, block_tokens, vocab_size)
                parts.append(blocks[h])
            toks = np.concatenate(parts)[:n_in] if parts else np.zeros(0, dtype=np.int64)
            if len(toks) < n_in:
                extra = np.random.default_rng([0x6C696E65, lineno]).integers(_MOONCAKE_LOW, vocab_size,
                                                                              size=n_in - len(toks))
                toks = np.concatenate([toks, extra])
            rows.append((None if session is None else str(session), times[0], times[1], toks, max(1, n_out), ids))
    if not rows:
        raise InvalidArgumentError(f"workload file {str(p)!r} holds no requests")
    sessions: dict[str, list[int]] = {}
    order: list[str | int] = []
    for i, r in enumerate(rows):
        if r[0] is None:
            order.append(i)
        else:
            if r[0] not in sessions:
                order.append(r[0])
            sessions.setdefault(r[0], []).append(i)
    # Arrival of each line: its timestamp, else the previous turn's arrival plus its delay, else 0.
    arrival = [0.0] * len(rows)
    for key in order:
        idx = [key] if isinstance(key, int) else sessions[key]
        prev = None
        for i in idx:
            ts, delay = rows[i][1], rows[i][2]
            arrival[i] = ts if ts is not None else (arrival[prev] + (delay or 0.0) if prev is not None else 0.0)
            prev = i
    traces = []
    for key in order:
        idx = [key] if isinstance(key, int) else sessions[key]
        steps: list[Step] = []
        for j, i in enumerate(idx):
            toks, out, ids = rows[i][3], rows[i][4], rows[i][5]
            gap = max(0.0, arrival[idx[j + 1]] - arrival[i]) if j + 1 < len(idx) else 0.0
            if j > 0:
                pt, pout, pids = rows[idx[j - 1]][3], rows[idx[j - 1]][4], rows[idx[j - 1]][5]
                extends = len(pids) <= len(ids) and ids[: len(pids)] == pids and np.array_equal(toks[: len(pt)], pt)
                if extends:
                    steps.append(Step(toks[min(len(toks), len(pt) + pout):].tolist(), out, gap))
                    continue
            steps.append(Step(toks.tolist(), out, gap, reset=j > 0))
        tid = f"req{key}" if isinstance(key, int) else f"session-{key}"
        traces.append(Trace(tid, arrival[idx[0]], steps, meta={"format": "mooncake"}))
    t0 = min(t.arrival_s for t in traces)
    for t in traces:
        t.arrival_s = round(t.arrival_s - t0, 6)
    validate(traces, vocab_size)
    return traces


def _check_gap_scale(scale: Any) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < float("inf"):
        raise InvalidArgumentError(f"gap scale must be a number > 0, got {scale!r}")


def scale_gaps(traces: list[Trace], scale: float) -> list[Trace]:
    """The same traces with every tool-call gap and gap hint multiplied by ``scale`` (> 0).

    Tools, their order and the spread of their gaps are kept; only the time between steps changes
    (Note [Replay load] in :mod:`kvtier.harness.replay`)."""
    _check_gap_scale(scale)
    if scale == 1:
        return traces
    return [replace(t, steps=[replace(s, tool_gap_s=round(s.tool_gap_s * scale, 6),
                                      expected_gap_s=None if s.expected_gap_s is None
                                      else round(s.expected_gap_s * scale, 6)) for s in t.steps])
            for t in traces]


# Tools of the default workload: (name, median gap s, log-normal sigma, share of calls, hinted).
# Sub-second file reads to minutes-long builds and human replies; each call's gap is drawn from its
# tool's log-normal. Note [Harness hints]: a harness knows a tool's *typical* duration (a test
# suite's usual run, a build's timeout budget), not how long this call will take; so the hint of a
# hinted tool is that tool's median, the same for every call and never derived from the gap drawn.
# The other tools carry no hint and are learned from their history (kvtier.policy.GapEstimator);
# the ``trace-aware-nohint`` policy withholds every hint.
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
        hint = round(gap_scale * median, 3) if hinted else None  # Note [Harness hints]
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
            st = [step(toks(int(rng.integers(append[0], append[1] + 1))), generate)
                  for _ in range(int(rng.integers(2, 4)))]
            out.append(Trace(f"{parent.trace_id}.sub{k}", parent.arrival_s, st, Fork(parent.trace_id, after)))
            k += 1
    validate(out, vocab_size)
    return out


# Tools of the coding-agent workload (Note [Coding-agent workload]): (name, median gap s, sigma,
# share of calls, hinted). Seconds for reads and edits to many minutes for test runs, builds and
# the human; replayed at x0.1 these are 0.2 s to a minute of virtual time.
CODING_TOOLS = (
    ("read_file", 2.0, 0.6, 0.30, False),
    ("grep", 3.0, 0.6, 0.15, False),
    ("edit_file", 5.0, 0.5, 0.20, False),
    ("run_tests", 60.0, 0.7, 0.17, True),
    ("build", 180.0, 0.6, 0.10, True),
    ("ask_user", 600.0, 0.9, 0.08, False),
)


def coding_agent_workload(vocab_size: int, seed: int = 0, traces: int = 8, system_tokens: int = 384,
                          subagent_system_tokens: int = 256, steps: tuple[int, int] = (5, 10),
                          first_append: tuple[int, int] = (100, 200), append: tuple[int, int] = (120, 260),
                          generate: tuple[int, int] = (8, 24), compact_at: int = 1800, summary_tokens: int = 160,
                          subagents: float = 0.4, arrival_window_s: float = 60.0,
                          gap_scale: float = 1.0) -> list[Trace]:
    """Note [Coding-agent workload]: traces with the properties of recorded coding-agent sessions
    (issue 12, finding 6), scaled for the built-in model.

    - contexts grow to about 2k tokens over 5-10 steps (a shared system prompt, then 120-260-token
      tool results and 8-24-token outputs);
    - gaps from seconds to many minutes (:data:`CODING_TOOLS`); hints as a harness has them
      (Note [Harness hints]);
    - a context compaction when the context passes ``compact_at`` tokens: the next step resets it to
      the system prompt and a ``summary_tokens`` summary, breaking the prefix the trace had;
    - a share ``subagents`` of the roots start one or two task subagents after a random step, each
      with a context of its own that starts with the subagents' shared system prompt (not the
      parent's context), 3-5 steps long.
    """
    _check_gap_scale(gap_scale)
    rng = np.random.default_rng(seed)
    low = 4
    names = [t[0] for t in CODING_TOOLS]
    share = np.array([t[3] for t in CODING_TOOLS])
    share = share / share.sum()

    def toks(n: int) -> list[int]:
        return rng.integers(low, vocab_size, size=n).tolist()

    def between(r: tuple[int, int]) -> int:
        return int(rng.integers(r[0], r[1] + 1))

    def gap() -> tuple[float, str, float | None]:
        i = int(rng.choice(len(names), p=share))
        name, median, sigma, _, hinted = CODING_TOOLS[i]
        g = round(float(np.clip(gap_scale * median * rng.lognormal(0.0, sigma), 0.05, 3600.0)), 3)
        return g, name, (round(gap_scale * median, 3) if hinted else None)

    def run(prompt: list[int], n_steps: int) -> list[Step]:
        out: list[Step] = []
        ctx = 0
        for j in range(n_steps):
            g, tool, hint = gap()
            gen = between(generate)
            if j == 0:
                add = prompt + toks(between(first_append))
                out.append(Step(add, gen, g, tool, hint))
                ctx = len(add) + gen
            elif ctx > compact_at:
                add = prompt + toks(summary_tokens)
                out.append(Step(add, gen, g, tool, hint, reset=True))
                ctx = len(add) + gen
            else:
                add = toks(between(append))
                out.append(Step(add, gen, g, tool, hint))
                ctx += len(add) + gen
        return out

    system = toks(system_tokens)
    sub_system = toks(subagent_system_tokens)
    out: list[Trace] = []
    for i in range(traces):
        out.append(Trace(f"t{i}", round(float(rng.uniform(0, arrival_window_s)), 3), run(system, between(steps))))
    k = 0
    for i in range(traces):
        parent = out[i]
        if rng.random() >= subagents:
            continue
        after = int(rng.integers(0, len(parent.steps) - 1))
        for _ in range(int(rng.integers(1, 3))):
            out.append(Trace(f"{parent.trace_id}.sub{k}", parent.arrival_s, run(sub_system, between((3, 5))),
                             Fork(parent.trace_id, after, own_context=True)))
            k += 1
    validate(out, vocab_size)
    return out
