"""Drives an agent-trace workload through one cache policy in virtual time.

``kvtier replay`` (a real decoder, measured step times) and ``kvtier simulate`` (a modelled GPU
server) share this module: the same event loop, the same :class:`PolicyRunner` and through it the
same :class:`~kvtier.TieredCache` and :class:`~kvtier.TraceManager` code. Only the
:class:`Executor` differs: what a step's compute is and how long things take.

Time model (Note [Virtual time]): a server has one prefill resource, which runs one step's cache
lookup, KV load, prefill and store at a time; decode then proceeds in parallel with other steps
(continuous batching; the real replay decodes inside the step, so its decode time is part of the
step). Tool-call gaps and arrivals are virtual. A trace's JCT runs from its arrival to the end of
its last step, queueing included. Every policy's moves between tiers (LRU demotion and promotion,
NVMe writes, the trace-aware policy's demotions and restores) run on the cache's move queue and are
timed by one rule (Note [Background moves] in kvtier/trace.py): on the copy lanes, not on the
server's prefill resource, because on a GPU server they run on the copy engines and the NVMe queues
beside compute. A step is charged the virtual time it waits for a move it needs (a store waiting
for room, under any policy), never the move's wall time; a resume whose restore is still on the
lane waits for it or recomputes the late part.

Note [Short waits keep the server]: a step whose restore is late by less than a typical step's
service time (the median so far) keeps the server and waits: the server idles for the lateness,
then runs it. Letting the next ready step cut in would cost the waiting trace a whole step for a
lateness of milliseconds, which a continuously batching engine does not charge (a request whose
KV lands joins the next iteration). The LRU policies load inside the step, holding the server for
their loads too. A longer wait gives the server up.

Policies:
  none         no reuse: every step prefills its whole context.
  device-lru   reuse within the device-tier budget only (what engines do today).
  tiered       kvtier's tiers below the same device budget: DRAM, NVMe, LRU demotion.
  trace-aware  the same tiers, driven by traces: gap-aware offload and prefetch, private partial
               tail blocks kept, shared prefixes held hot (kvtier.policy, kvtier.trace).
  trace-aware-nohint  trace-aware told nothing about a gap in advance: the workload's hints are
               withheld, every gap is estimated from the gaps it has seen (per tool, then overall).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from kvtier.cache import TieredCache
from kvtier.errors import InvalidArgumentError, UnavailableError
from kvtier.policy import CostModel, TraceAwarePolicy
from kvtier.trace import BackgroundLane, TraceManager
from kvtier.harness.workload import Trace

UTILISATION = 0.8  # Note [Sustained throughput]
POLICIES = ("none", "device-lru", "tiered", "trace-aware", "trace-aware-nohint")
TRACE_POLICIES = ("trace-aware", "trace-aware-nohint")  # the policies driven by a TraceManager
DEFAULT_POLICY = "trace-aware"


def check_policies(policies: list[str] | None) -> list[str]:
    """``None`` or ``["all"]``: every policy; else the named ones, checked."""
    if not policies or "all" in policies:
        return list(POLICIES)
    for p in policies:
        if p not in POLICIES:
            raise InvalidArgumentError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)} or all")
    return list(dict.fromkeys(policies))


class Executor(Protocol):
    """A step's compute on some engine, real or modelled."""

    registration: Any  # the engine's KV: block b = tokens [b * block_tokens, (b + 1) * block_tokens)

    def reset(self) -> None: ...  # a fresh, empty sequence

    def set_cached(self, tokens: int) -> None: ...  # the first `tokens` tokens' KV have been loaded

    def compute(self, ctx: np.ndarray, generate: int, trace_id: str, step: int) -> tuple[list[int], int, float]:
        """Prefill what is not cached and generate ``generate`` tokens greedily: returns (new tokens,
        tokens of KV the engine now holds, seconds of decode that run beside other steps)."""
        ...

    def stopwatch(self) -> float: ...  # seconds of work on the step's critical path so far


@dataclass
class StepResult:
    tokens: list[int]
    computed: int  # prefill tokens computed
    total: int  # prefill tokens in the context
    service_s: float  # on the server's prefill resource
    decode_s: float = 0.0  # after it, beside other steps
    wait_s: float = 0.0  # > 0: not run; the trace's restore is late, try again then


class PolicyRunner:
    """One policy over one executor: lookup, load, compute, store, and the trace hooks."""

    def __init__(self, policy: str, executor: Executor, make_cache: Callable[[str], TieredCache | None],
                 cost: CostModel | None = None, lane: BackgroundLane | None = None,
                 trace_policy: TraceAwarePolicy | None = None) -> None:
        check_policies([policy])
        self.policy = policy
        self.ex = executor
        self.cache = make_cache(policy) if policy != "none" else None
        self.traces: TraceManager | None = None
        self.hints = policy != "trace-aware-nohint"  # False: the workload's gap hints are withheld
        if policy in TRACE_POLICIES:
            if cost is None:
                raise InvalidArgumentError("the trace-aware policy needs a cost model")
            self.traces = TraceManager(self.cache, cost, policy=trace_policy, lane=lane)
        self.block_tokens = self.cache.block_tokens if self.cache is not None else 16

    # trace hooks: no-ops for the policies that do not know about traces
    def open(self, tid: str, parent: str | None = None) -> None:
        if self.traces is None:
            return
        if parent is not None:
            self.traces.get(parent).fork(tid)
        else:
            self.traces.open(tid)

    def tick(self, now: float) -> None:
        if self.traces is not None:
            self.traces.tick(now)

    def tool_start(self, tid: str, now: float, expected_gap_s: float | None, tool: str | None) -> None:
        if self.traces is not None:
            self.traces.get(tid).tool_start(expected_gap_s if self.hints else None, tool, now=now)

    def tool_end(self, tid: str, now: float) -> None:
        if self.traces is not None:
            t = self.traces.get(tid)
            if t.state.value in ("tool", "parked"):
                t.tool_end(now)

    def close_trace(self, tid: str) -> None:
        if self.traces is not None:
            self.traces.get(tid).close()

    def run_step(self, tid: str, k: int, ctx: np.ndarray, generate: int, now: float) -> StepResult:
        ex, cache, bt = self.ex, self.cache, self.block_tokens
        moves = cache.moves if cache is not None else None
        if moves is not None:  # Note [Background moves]: moves issued by this step start at `now`
            moves.now, moves.blocked_until, waited0 = now, float("-inf"), moves.waited_wall_s
        t0 = ex.stopwatch()
        ex.reset()
        hit = 0
        match = None
        trace = self.traces.get(tid) if self.traces is not None else None
        if trace is not None:
            plan = trace.begin_step(ctx, now=now)
            if plan.match is None:
                return StepResult([], 0, 0, 0.0, wait_s=plan.wait_s)
            match = plan.match
            pinned = match.hit_blocks
            cache.load(match, ex.registration, np.arange(match.hit_blocks), promote_min_refs=2).wait()
            # A block lost on the way (corrupt on NVMe) shortens the prefix, and the tail with it.
            hit = plan.hit_tokens if match.hit_blocks == pinned else match.hit_blocks * bt
        elif cache is not None:
            match = cache.match(ctx, max_blocks=(len(ctx) - 1) // bt)
            cache.load(match, ex.registration, np.arange(match.hit_blocks)).wait()
            hit = match.hit_blocks * bt
        if hit:
            ex.set_cached(hit)
        new, seq_len, decode_s = ex.compute(ctx, generate, tid, k)
        full = np.concatenate([ctx, np.asarray(new, dtype=np.int64)])
        if trace is not None:
            trace.end_step(full, ex.registration, seq_len, now=now)
        elif cache is not None:
            cache.release(match)
            filled = seq_len // bt
            if filled > match.hit_blocks:
                cache.store(full[: filled * bt], ex.registration, np.arange(match.hit_blocks, filled),
                            first_block=match.hit_blocks)
        service = ex.stopwatch() - t0
        if moves is not None:  # a move's wall time is not the step's; its wait for one is
            service += max(0.0, moves.blocked_until - now) - (moves.waited_wall_s - waited0)
        return StepResult(new, len(ctx) - hit, len(ctx), service, decode_s)

    def close(self) -> None:
        if self.traces is not None:
            self.traces.close()
        if self.cache is not None:
            self.cache.close()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


P99_MIN_TRACES = 100  # below this a p99 is the slowest trace, or between the two slowest


def jct_stats(values: list[float]) -> dict[str, Any]:
    """JCT percentiles, with p99 only when there are enough values for it to be more than the
    slowest one (``P99_MIN_TRACES``); ``max`` always."""
    n = len(values)
    out: dict[str, Any] = {"count": n, "p50": _percentile(values, 50), "p90": _percentile(values, 90),
                           "p99": _percentile(values, 99) if n >= P99_MIN_TRACES else None,
                           "max": float(max(values)) if values else 0.0,
                           "mean": float(np.mean(values)) if values else 0.0}
    if n < P99_MIN_TRACES:
        out["p99_note"] = f"{n} values: a p99 would be the slowest; see max"
    return out


def task_jcts(traces: list[Trace], start: dict[str, float], finish: dict[str, float]) -> tuple[dict[str, float],
                                                                                               dict[str, float]]:
    """Note [Tasks and subagents]: a task is a root trace with every subagent it started; its JCT
    runs from the root's arrival to the end of the last of them. A subagent's own JCT runs from its
    own start (when its parent's step ended, or its arrival if later) to its end. Returns (JCT by
    root trace id, JCT by subagent id)."""
    by_id = {t.trace_id: t for t in traces}

    def root(t: Trace) -> str:
        while t.fork_of is not None:
            t = by_id[t.fork_of.trace_id]
        return t.trace_id

    end: dict[str, float] = {}
    for t in traces:
        r = root(t)
        end[r] = max(end.get(r, 0.0), finish[t.trace_id])
    tasks = {t.trace_id: end[t.trace_id] - t.arrival_s for t in traces if t.fork_of is None}
    subs = {t.trace_id: finish[t.trace_id] - start[t.trace_id] for t in traces if t.fork_of is not None}
    return tasks, subs


def sustained(service_s: float, tasks: int, utilisation: float) -> dict[str, float]:
    """Note [Sustained throughput]: what one server sustains under a policy, from the server time
    the policy spends per task (its steps on the prefill resource: lookup, loads, prefill, store),
    at a utilisation that keeps queueing moderate (``utilisation`` of the server's time busy),
    rather than from one fixed run's makespan, which the longest trace sets."""
    per_task = service_s / max(1, tasks)
    return {"server_s_per_task": per_task, "utilisation": utilisation,
            "tasks_per_server_hour": 3600 * utilisation / per_task if per_task > 0 else 0.0}


class PolicyReplay:
    """One policy's run of a workload in virtual time, advanced one step at a time, so that
    several policies can be interleaved step by step (noise on a shared machine then lands on
    all of them alike)."""

    def __init__(self, runner: PolicyRunner, traces: list[Trace]) -> None:
        self.runner = runner
        self.traces = traces
        self.by_id = {t.trace_id: t for t in traces}
        self.contexts: dict[str, np.ndarray] = {}
        self.children: dict[tuple[str, int], list[Trace]] = {}
        for t in traces:
            if t.fork_of is not None:
                self.children.setdefault((t.fork_of.trace_id, t.fork_of.after_step), []).append(t)
        self.tokens: dict[str, list[list[int]]] = {t.trace_id: [] for t in traces}
        self.ready: list[tuple[float, int, str, int]] = []  # (ready time, seq, trace id, step)
        self.seq = 0
        self.started: set[tuple[str, int]] = set()
        for t in traces:
            if t.fork_of is None:
                self._push(t.arrival_s, t.trace_id, 0)
                self.contexts[t.trace_id] = np.zeros(0, dtype=np.int64)
                runner.open(t.trace_id)
        self.server_free = 0.0
        self.start: dict[str, float] = {t.trace_id: t.arrival_s for t in traces if t.fork_of is None}
        self.finish: dict[str, float] = {}
        self.computed = self.total = 0
        self.service: list[float] = []
        self.service_by_step: dict[str, float] = {}  # "trace/step" -> seconds on the prefill resource
        self.held_s = 0.0  # server time spent waiting on late restores (Note [Short waits keep the server])
        self.steps_done = 0

    def _push(self, at: float, tid: str, step: int) -> None:
        heapq.heappush(self.ready, (at, self.seq, tid, step))
        self.seq += 1

    def step(self) -> bool:
        """Run the next ready step; False once every trace has finished."""
        if not self.ready:
            return False
        at, _, tid, k = heapq.heappop(self.ready)
        t = self.by_id[tid]
        step = t.steps[k]
        r = self.runner
        start = max(self.server_free, at)
        r.tick(at)
        if k > 0:
            r.tool_end(tid, at)
        r.tick(start)
        if (tid, k) not in self.started:
            appended = np.asarray(step.append, dtype=np.int64)
            # a reset step (a compaction) replaces the context instead of extending it
            self.contexts[tid] = appended if step.reset else np.concatenate([self.contexts[tid], appended])
            self.started.add((tid, k))
        ctx = self.contexts[tid]
        res = r.run_step(tid, k, ctx, step.generate, start)
        if res.wait_s > 0:  # the restore is late and waiting beats recomputing: come back then
            typical = _percentile(self.service, 50) if self.service else 0.0
            if res.wait_s <= typical:  # Note [Short waits keep the server]
                self.server_free = start + res.wait_s
                self.held_s += res.wait_s
                self._push(at, tid, k)  # keeps its place: nothing ready later can start first
            else:
                self._push(start + res.wait_s, tid, k)
            return True
        self.server_free = start + res.service_s
        done = self.server_free + res.decode_s
        self.service.append(res.service_s)
        self.service_by_step[f"{tid}/{k}"] = res.service_s
        self.computed += res.computed
        self.total += res.total
        self.steps_done += 1
        ctx = self.contexts[tid] = np.concatenate([ctx, np.asarray(res.tokens, dtype=np.int64)])
        self.tokens[tid].append(res.tokens)
        for child in self.children.get((tid, k), []):
            own = child.fork_of.own_context  # a subagent with a context of its own, or a fork of this one
            self.contexts[child.trace_id] = np.zeros(0, dtype=np.int64) if own else ctx
            r.open(child.trace_id, parent=None if own else tid)
            self.start[child.trace_id] = max(done, child.arrival_s)
            self._push(self.start[child.trace_id], child.trace_id, 0)
        if k + 1 < len(t.steps):
            r.tool_start(tid, done, step.expected_gap_s, step.tool)
            self._push(done + step.tool_gap_s, tid, k + 1)
        else:
            self.finish[tid] = done
            r.close_trace(tid)
        return True

    def report(self, keep_tokens: bool = True) -> dict[str, Any]:
        cache = self.runner.cache
        tasks, subs = task_jcts(self.traces, self.start, self.finish)
        makespan = max(self.finish.values()) - min(t.arrival_s for t in self.traces)
        out: dict[str, Any] = {
            "jct_s": jct_stats(list(tasks.values())),  # tasks: root traces with their subagents
            "jct_subagents_s": jct_stats(list(subs.values())),  # each from its own start
            "makespan_s": makespan,
            "tasks_per_hour": len(tasks) / makespan * 3600 if makespan > 0 else 0.0,  # of this run
            "sustained": sustained(float(np.sum(self.service)), len(tasks), UTILISATION),
            "prefill_tokens": {"computed": self.computed, "total": self.total},
            "service_s": {"sum": float(np.sum(self.service)), "p50": _percentile(self.service, 50)},
            # the server's load: its service time over the makespan (Note [Replay load] in kvtier.harness.replay)
            "busy": float(np.sum(self.service)) / makespan if makespan > 0 else 0.0,
            "server_held_for_restores_s": self.held_s,
            "jct_by_trace_s": {**tasks, **subs},
        }
        if keep_tokens:
            out["tokens"] = self.tokens
            out["service_by_step_s"] = self.service_by_step
        if cache is not None:
            snap = cache.metrics.snapshot()
            out.update(hits=snap["hits"], misses=snap["misses"], bytes_moved=snap["bytes_moved"],
                       blocks_per_tier=cache.blocks_per_tier(), transfer_latency=snap["transfer_latency"],
                       dropped_blocks=snap["dropped_blocks"], moves=cache.moves.snapshot())
        else:
            out.update(hits={"device": 0, "dram": 0, "nvme": 0}, misses=0, bytes_moved={})
        out["nvme_bytes_written_per_task"] = out["bytes_moved"].get("dram->nvme", 0) / len(self.traces)
        if self.runner.traces is not None:
            out["trace_policy"] = self.runner.traces.metrics.snapshot()
            out["trace_policy"]["background_lane_s"] = {"out": self.runner.traces.lane.busy_s,
                                                        "in": self.runner.traces.restore_lane.busy_s}
            out["trace_policy"]["prefetch_lateness_all_s"] = list(self.runner.traces.metrics.prefetch_lateness_s)
            out["cost_model"] = self.runner.traces.cost.as_dict()
        return out


def render_table(results: dict[str, dict[str, Any]], title: str) -> None:
    """The per-policy table ``kvtier replay`` and ``kvtier simulate`` print."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    kinds = ("keep", "dram", "nvme", "drop", "nothing")  # trace-aware decisions at tool starts
    cols = ("policy", "task JCT p50 s", "p99 s", "subagent p50 s", "tasks/server-h", "prefill computed",
            "hits dev/dram/nvme",
            "NVMe writes/task", "/".join(kinds), "late/prefetches, p90 ms")
    dollars = any("dollars_per_task" in r for r in results.values())
    busy = all("busy" in r for r in results.values())
    for col in cols + (("busy",) if busy else ()) + (("$/task",) if dollars else ()):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p, r in results.items():
        pt, h = r["prefill_tokens"], r["hits"]
        ta = r.get("trace_policy")
        dec = "-" if not ta else "/".join(str(ta["decisions"].get(k, 0)) for k in kinds)
        late = "-" if not ta else (f"{ta['prefetch_lateness_s']['late']}/{ta['prefetch_lateness_s']['count']}, "
                                   f"{ta['prefetch_lateness_s']['p90'] * 1e3:.1f}")
        extra = ([f"{r['busy']:.0%}"] if busy else []) + ([f"{r.get('dollars_per_task', 0.0):.5f}"] if dollars else [])
        j, js = r["jct_s"], r.get("jct_subagents_s", {"count": 0})
        p99 = f"{j['p99']:.2f}" if j.get("p99") is not None else f"max {j['max']:.2f}"
        sub = f"{js['p50']:.2f}" if js["count"] else "-"
        table.add_row(p, f"{j['p50']:.2f}", p99, sub, f"{r['sustained']['tasks_per_server_hour']:.0f}",
                      f"{pt['computed']}/{pt['total']} ({pt['computed'] / max(1, pt['total']):.0%})",
                      f"{h['device']}/{h['dram']}/{h['nvme']}", f"{r['nvme_bytes_written_per_task'] / 2**20:.1f} MiB",
                      dec, late, *extra)
    import sys

    Console(width=None if sys.stdout.isatty() else 200).print(table)


def save_report(report: dict[str, Any], json_path: str | None, plot_path: str | None, console: Any) -> None:
    """Write a replay or simulation report as JSON and/or a plot, saying where."""
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        console.print(f"wrote {json_path}")
    if plot_path:
        plot(report, plot_path)
        console.print(f"wrote {plot_path}")


def plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UnavailableError("--plot needs matplotlib: pip install 'kvtier[plot]'") from None
    pols = list(report["policies"])
    res = report["policies"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    x = np.arange(len(pols))
    axes[0].bar(x - 0.2, [res[p]["jct_s"]["p50"] for p in pols], 0.4, label="p50")
    few = any(res[p]["jct_s"].get("p99") is None for p in pols)
    axes[0].bar(x + 0.2, [res[p]["jct_s"]["max" if few else "p99"] for p in pols], 0.4, label="max" if few else "p99")
    axes[0].set_title(f"JCT (s, {report.get('time_axis', 'virtual time')})")
    axes[0].legend(fontsize=8, loc="upper left")
    axes[1].bar(x, [res[p]["prefill_tokens"]["computed"] for p in pols], color="tab:orange")
    axes[1].set_title("prefill tokens computed")
    bottom = np.zeros(len(pols))
    for tier, color in (("device", "tab:green"), ("dram", "tab:blue"), ("nvme", "tab:purple")):
        vals = np.array([res[p]["hits"][tier] for p in pols], dtype=float)
        axes[2].bar(x, vals, bottom=bottom, label=tier, color=color)
        bottom += vals
    axes[2].set_title("block hits by tier")
    axes[2].legend()
    for ax in axes[:3]:
        ax.set_xticks(x, pols, fontsize=8)
    ta = res.get("trace-aware", {}).get("trace_policy")
    ax = axes[3]
    if ta:
        late = np.sort(np.asarray(ta.get("prefetch_lateness_all_s", []), dtype=float)) * 1e3
        if len(late):
            ax.step(late, np.arange(1, len(late) + 1) / len(late), where="post")
        dec = ta["decisions"]
        ax.set_title("trace-aware: prefetch lateness (ms), CDF", fontsize=9)
        ax.text(0.98, 0.05, "decisions: " + ", ".join(f"{k} {v}" for k, v in dec.items()), transform=ax.transAxes,
                ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
    else:
        ax.set_axis_off()
    fig.suptitle(f"{report.get('title', 'kvtier replay')}: {report['model'][:60]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
