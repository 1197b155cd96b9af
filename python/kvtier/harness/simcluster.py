"""``kvtier simulate --workers N --migration none|full|dedup|all``: several workers and a router,
with KV migration between them, in virtual time.

SIMULATION, and a MODEL of the network. Each worker is the single-server model of
:mod:`kvtier.harness.sim` (its own device, DRAM and NVMe tiers through :class:`~kvtier.TieredCache`, its
own prefill resource and copy lanes); what is new here is one global event loop over all the
workers, a router that places every step, and migrations whose time comes from a
:class:`NetworkModel` (Note [Network model]).

Note [Router]: the same rule under every migration mode; only what a "migrate" decision does
differs. A root trace goes at its arrival to the worker with the fewest root traces so far (as
``kvtier simulate`` places them), a subagent to the worker its parent's step ran on. When a trace
enters a tool-call gap that returns at ``ret``, the router decides at ``max(gap start, ret -
lead)``, where ``lead`` is the modelled time to send the trace's whole context (``full``'s
transfer, whatever the mode: the decision time is the same in all three). It predicts each
worker's queueing at ``ret`` as ``max(0, busy_until - ret)`` (``busy_until``: when the worker's
prefill resource finishes the steps placed so far). The trace's home worker is *busy* when its
predicted queueing exceeds ``threshold_s``; another worker *has room* when its own queueing, plus
how far a full transfer started now (behind the migrations already on either worker's NIC) would
run past the trace's return, is lower than the home's by more than ``threshold_s``. The cost
term is ``full``'s in every mode, so ``dedup`` is not let migrate more often than ``full``; it
only lands sooner. Busy home and a worker with room: the decision is "migrate to the worker with
the least predicted queueing" (lowest index on a tie). ``none`` records the decision and keeps the
trace home (it waits there); ``full`` and ``dedup`` migrate it at the decision time, so the transfer
overlaps the rest of the gap. The step starts on the target when the trace returns, or when the
migration has landed if that is later: a migration that outlasts the gap delays the step by
exactly the remainder. The trace's home is then the target.

Note [Migration content]: the trace's blocks are the full blocks of its context so far (after its
last step's output), by content key. The source sends those it holds on any tier (a block it no
longer holds cannot be sent; the target will recompute it). ``full`` sends all of them, ``dedup``
only those the target does not hold at the decision time (shared prefixes, by key: the plan of
docs/cluster.md, "Migration protocol"). When the transfer lands, the target's DRAM tier receives
the blocks it still lacks, making room by its own LRU demotion (to NVMe, then dropping), exactly as
its cache makes room for anything else; the blocks then load into the step like any DRAM hit (over
PCIe, inside the step). The source keeps its copies (they age out of its LRU). Not modelled: the
source reading blocks from its NVMe or HBM before sending, the control plane's per-key cost beyond
the fixed per-migration latency, and migrations contending with anything but other migrations
(each worker has one NIC, used by one migration at a time, in or out).
"""

from __future__ import annotations

import heapq
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from kvtier.cache import DRAM, TieredCache
from kvtier.harness.driver import UTILISATION, PolicyRunner, jct_stats, render_table, save_report, sustained, task_jcts
from kvtier.errors import InvalidArgumentError, OutOfCapacityError
from kvtier.harness.workload import Trace

__all__ = ["MIGRATION_MODES", "NETWORKS", "NetworkModel", "simulate_cluster", "check_migration", "check_network"]

MIGRATION_MODES = ("none", "full", "dedup")
# Note [Cluster cache policy]: only tiered for now. The trace-aware policies keep per-trace state
# (leases, kept tails, gap estimates) in each worker's TraceManager, which a migration would have to
# hand over; that is not modelled yet.
CLUSTER_CACHE_POLICIES = ("tiered",)


@dataclass(frozen=True)
class NetworkModel:
    """A migration's modelled time: ``latency_s + bytes / (bandwidth_gbps * 1e9)`` (Note [Network model])."""

    name: str
    latency_s: float  # per migration: the control plane's round trips and the transfer's setup
    bandwidth_gbps: float  # GB/s (1e9 bytes/s) of one transfer between two workers
    source: str = ""

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and np.isfinite(self.latency_s)):
            raise InvalidArgumentError(f"network {self.name!r}: latency_s must be >= 0, got {self.latency_s!r}")
        if not (self.bandwidth_gbps > 0 and np.isfinite(self.bandwidth_gbps)):
            raise InvalidArgumentError(f"network {self.name!r}: bandwidth_gbps must be > 0, "
                                       f"got {self.bandwidth_gbps!r}")

    def transfer_s(self, nbytes: int) -> float:
        """Seconds for one migration moving ``nbytes`` (the latency applies even to 0 bytes: the
        ownership still changes hands)."""
        return self.latency_s + nbytes / (self.bandwidth_gbps * 1e9)


# Note [Network model]: a migration takes latency + bytes / bandwidth. Sources:
#   latency (all presets): the migration protocol's store round trips as measured on this machine
#     (docs/cluster.md, "Costs (measured)", 128 keys: lookup 0.47 ms + validate 0.47 ms + publish
#     1.03 ms, plus BEGIN_MOVE and TRANSFER_TRACE, single scripts at ~7.7k/s = 0.13 ms each):
#     2.2 ms. On a real fabric the store is across the network; we keep the same figure (assumed).
#   shm / tcp bandwidth: kvtier's own `kvtier bench remote` put of a 2 MiB-block list between two
#     processes on this 2-vCPU VM (docs/benchmarks.md, "kvtier bench remote", 2026-12-05, 32 MiB
#     per sample: shm 5.23 GB/s, tcp 1.64 GB/s). Loopback on a shared, loaded VM: a lower bound
#     for real shared memory, and TCP on one host, not across a data-centre network.
#   rdma-400g: NVIDIA ConnectX-7, 400 Gb/s per port (NVIDIA ConnectX-7 product brief / datasheet:
#     "up to 400Gb/s"), i.e. 50 GB/s line rate, at an assumed 90% efficiency for large RDMA
#     writes (headers and the PCIe gen 5 x16 host link): 45 GB/s. One NIC per GPU worker (a DGX
#     H100 has one 400G ConnectX-7 per GPU for its compute fabric). Not measured here: no RDMA.
CONTROL_PLANE_S = 0.47e-3 + 0.47e-3 + 1.03e-3 + 2 * 0.13e-3
NETWORKS: dict[str, NetworkModel] = {
    "shm": NetworkModel("shm", CONTROL_PLANE_S, 5.23,
                        "kvtier bench remote, shm 2 MiB put, 32 MiB/sample, this VM, 2026-12-05 "
                        "(docs/benchmarks.md); latency: store round trips (docs/cluster.md)"),
    "tcp": NetworkModel("tcp", CONTROL_PLANE_S, 1.64,
                        "kvtier bench remote, tcp 2 MiB put, 32 MiB/sample, this VM, 2026-12-05 "
                        "(docs/benchmarks.md); latency: store round trips (docs/cluster.md)"),
    "rdma-400g": NetworkModel("rdma-400g", CONTROL_PLANE_S, 50.0 * 0.9,
                              "NVIDIA ConnectX-7 400 Gb/s line rate (50 GB/s), 90% efficiency assumed; "
                              "latency: store round trips (docs/cluster.md)"),
}


def check_network(network: str | NetworkModel) -> NetworkModel:
    """A preset by name, or a :class:`NetworkModel` as given."""
    if isinstance(network, NetworkModel):
        return network
    if network not in NETWORKS:
        raise InvalidArgumentError(f"unknown network preset {network!r}; presets: {', '.join(NETWORKS)}")
    return NETWORKS[network]


def check_migration(modes: str | list[str] | None) -> list[str]:
    """``None``, ``"all"`` or ``["all"]``: every mode; else the named ones, checked."""
    if modes is None:
        return list(MIGRATION_MODES)
    if isinstance(modes, str):
        modes = [modes]
    if not modes or "all" in modes:
        return list(MIGRATION_MODES)
    for m in modes:
        if m not in MIGRATION_MODES:
            raise InvalidArgumentError(f"unknown migration mode {m!r}; choose from {', '.join(MIGRATION_MODES)} or all")
    return list(dict.fromkeys(modes))


@dataclass
class _Worker:
    runner: PolicyRunner
    cache: TieredCache
    backend: Any
    free: float = 0.0  # the prefill resource is busy until then
    nic: float = float("-inf")  # the NIC is busy with a migration until then
    service: float = 0.0
    steps: int = 0
    roots: int = 0


# event kinds, in the order they run at equal times: a landing migration first (its blocks are
# there for a step starting then), then router decisions, then steps
_LAND, _ROUTE, _STEP = 0, 1, 2


class ClusterReplay:
    """One migration mode over ``workers`` modelled workers, one global event loop (Note [Router])."""

    def __init__(self, mode: str, trs: list[Trace], workers: list[_Worker], network: NetworkModel,
                 threshold_s: float, block_bytes: int, block_tokens: int,
                 placement: dict[str, int] | None = None) -> None:
        self.mode, self.traces, self.w, self.net = mode, trs, workers, network
        self.threshold_s, self.block_bytes, self.bt = threshold_s, block_bytes, block_tokens
        self.by_id = {t.trace_id: t for t in trs}
        self.children: dict[tuple[str, int], list[Trace]] = {}
        for t in trs:
            if t.fork_of is not None:
                self.children.setdefault((t.fork_of.trace_id, t.fork_of.after_step), []).append(t)
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.loc: dict[str, int] = {}
        self.contexts: dict[str, np.ndarray] = {}
        self.start: dict[str, float] = {}
        self.finish: dict[str, float] = {}
        self.step_start: dict[tuple[str, int], float] = {}  # (trace, step) -> when it got the server
        self.step_ready: dict[tuple[str, int], float] = {}  # (trace, step) -> when the trace returned
        self.computed = self.total = 0
        self.tokens_by_trace: dict[str, list[list[int]]] = {t.trace_id: [] for t in trs}
        self.migrations: list[dict[str, Any]] = []
        self.wanted = 0  # router decisions "migrate" (also under none, where they are not carried out)
        self.decisions = 0
        self.service: list[float] = []
        for t in sorted(trs, key=lambda t: (t.arrival_s, t.trace_id)):
            if t.fork_of is not None:
                continue
            if placement is not None and t.trace_id in placement:
                home = placement[t.trace_id]
            else:
                home = min(range(len(workers)), key=lambda i: (workers[i].roots, i))
            if not 0 <= home < len(workers):
                raise InvalidArgumentError(f"placement of {t.trace_id!r}: worker {home} does not exist")
            workers[home].roots += 1
            self.loc[t.trace_id] = home
            self.contexts[t.trace_id] = np.zeros(0, dtype=np.int64)
            self.start[t.trace_id] = t.arrival_s
            workers[home].runner.open(t.trace_id)
            self._push(t.arrival_s, _STEP, (t.trace_id, 0, t.arrival_s))

    def _push(self, at: float, kind: int, data: Any) -> None:
        heapq.heappush(self.events, (at, kind, self.seq, data))
        self.seq += 1

    def run(self, advance: Any = None) -> None:
        while self.events:
            at, kind, _, data = heapq.heappop(self.events)
            if kind == _STEP:
                self._step(at, *data)
                if advance is not None:
                    advance()
            elif kind == _ROUTE:
                self._route(at, *data)
            else:
                self._land(at, *data)

    # ---------------------------------------------------------------- steps

    def _step(self, at: float, tid: str, k: int, returned: float) -> None:
        w = self.loc[tid]
        wk = self.w[w]
        r = wk.runner
        t = self.by_id[tid]
        step = t.steps[k]
        start = max(wk.free, at)
        r.tick(at)
        if k > 0:
            r.tool_end(tid, at)
        r.tick(start)
        if (tid, k) not in self.step_ready:
            appended = np.asarray(step.append, dtype=np.int64)
            self.contexts[tid] = appended if step.reset else np.concatenate([self.contexts[tid], appended])
            self.step_ready[(tid, k)] = returned
        ctx = self.contexts[tid]
        res = r.run_step(tid, k, ctx, step.generate, start)
        if res.wait_s > 0:  # not reached with the tiered cache policy (no restores to wait for)
            self._push(start + res.wait_s, _STEP, (tid, k, returned))
            return
        self.step_start[(tid, k)] = start
        wk.free = start + res.service_s
        wk.service += res.service_s
        wk.steps += 1
        self.service.append(res.service_s)
        done = wk.free + res.decode_s
        self.computed += res.computed
        self.total += res.total
        self.tokens_by_trace[tid].append(res.tokens)
        ctx = self.contexts[tid] = np.concatenate([ctx, np.asarray(res.tokens, dtype=np.int64)])
        for child in self.children.get((tid, k), []):
            own = child.fork_of.own_context
            self.contexts[child.trace_id] = np.zeros(0, dtype=np.int64) if own else ctx
            self.loc[child.trace_id] = w
            r.open(child.trace_id, parent=None if own else tid)
            self.start[child.trace_id] = max(done, child.arrival_s)
            self._push(self.start[child.trace_id], _STEP, (child.trace_id, 0, self.start[child.trace_id]))
        if k + 1 < len(t.steps):
            r.tool_start(tid, done, step.expected_gap_s, step.tool)
            ret = done + step.tool_gap_s
            # Note [Router]: the decision time does not depend on the mode (full's transfer time)
            lead = self.net.transfer_s((len(ctx) // self.bt) * self.block_bytes)
            self._push(max(done, ret - lead), _ROUTE, (tid, k + 1, done, ret))
        else:
            self.finish[tid] = done
            r.close_trace(tid)

    # ---------------------------------------------------------------- router and migration

    def predicted_wait(self, w: int, ret: float) -> float:
        """Queueing a step returning at ``ret`` would meet on worker ``w``, from what is placed so far."""
        return max(0.0, self.w[w].free - ret)

    def _route(self, now: float, tid: str, k: int, gap_start: float, ret: float) -> None:
        home = self.loc[tid]
        self.decisions += 1
        target = None
        if len(self.w) > 1:
            waits = [self.predicted_wait(i, ret) for i in range(len(self.w))]
            best = min((i for i in range(len(self.w)) if i != home), key=lambda i: (waits[i], i))
            # what a full transfer decided now would add past the gap (behind migrations in flight)
            lead = self.net.transfer_s((len(self.contexts[tid]) // self.bt) * self.block_bytes)
            late = max(0.0, max(now, self.w[home].nic, self.w[best].nic) + lead - ret)
            if waits[home] > self.threshold_s and waits[best] + late < waits[home] - self.threshold_s:
                target = best
                self.wanted += 1
        if target is None or self.mode == "none":
            self._push(ret, _STEP, (tid, k, ret))
            return
        self._migrate(now, tid, k, home, target, gap_start, ret)

    def _migrate(self, now: float, tid: str, k: int, src: int, dst: int, gap_start: float, ret: float) -> None:
        s, d = self.w[src], self.w[dst]
        ctx = self.contexts[tid]
        n = len(ctx) // self.bt
        keys = s.cache.keys_for(ctx[: n * self.bt]) if n else np.zeros((0, 2), dtype=np.uint64)
        held = s.cache.locate(keys)[0] != 255 if n else np.zeros(0, dtype=bool)
        present = d.cache.locate(keys)[0] != 255 if n else np.zeros(0, dtype=bool)
        send = held if self.mode == "full" else held & ~present
        nbytes = int(send.sum()) * self.block_bytes
        begin = max(now, s.nic, d.nic)
        end = begin + self.net.transfer_s(nbytes)
        s.nic = d.nic = end
        self._push(end, _LAND, (dst, keys[send]))
        self.loc[tid] = dst  # the tiered runners keep no per-trace state: nothing else to hand over
        self.migrations.append({
            "trace": tid, "step": k, "src": src, "dst": dst, "gap_start": gap_start, "decided": now,
            "start": begin, "end": end, "returned": ret, "delay_s": max(0.0, end - ret),
            "blocks": n, "blocks_held": int(held.sum()), "blocks_present": int((held & present).sum()),
            "blocks_sent": int(send.sum()), "bytes": nbytes})
        self._push(max(ret, end), _STEP, (tid, k, ret))

    def _land(self, at: float, dst: int, keys: np.ndarray) -> None:
        """The migrated blocks arrive in ``dst``'s DRAM tier (Note [Migration content])."""
        if len(keys) == 0:
            return
        cache = self.w[dst].cache
        new = keys[cache.locate(keys)[0] == 255]
        if len(new) == 0:
            return
        moves = cache.moves
        moves.now, moves.blocked_until = at, float("-inf")
        try:
            ids = cache._allocate(DRAM, len(new))  # LRU demotion to NVMe makes room, as for any store
        except OutOfCapacityError:  # pinned full: take what fits, head first
            room = cache.tier_free_blocks(DRAM)
            if room <= 0:
                return
            new = new[:room]
            ids = cache.pools[DRAM].allocate(room)
        cache.index.insert(new, DRAM, ids)
        cache.metrics.record_transfer("network", "dram", len(new) * self.block_bytes, 0.0)

    # ---------------------------------------------------------------- report

    def tokens_crc32(self) -> int:
        """A digest of every generated token, by trace and step (independent of the order steps ran in)."""
        crc = 0
        for tid in sorted(self.tokens_by_trace):
            for k, toks in enumerate(self.tokens_by_trace[tid]):
                crc = zlib.crc32(np.asarray([zlib.crc32(tid.encode()), k, *toks], dtype=np.int64).tobytes(), crc)
        return crc

    def report(self, server: Any) -> dict[str, Any]:
        out = self.common_report([wk.cache.metrics.snapshot() for wk in self.w],
                                 [wk.cache.blocks_per_tier() for wk in self.w])
        held = out["sustained"]
        out["dollars_per_task"] = (server.dollars_per_hour / held["tasks_per_server_hour"]
                                   if held["tasks_per_server_hour"] else 0.0)
        out["shared_link_extra_s"] = sum(wk.backend.engine.shared_extra_s for wk in self.w)
        return out

    def common_report(self, snaps: list[dict[str, Any]], blocks_per_tier: list[dict[str, int]]) -> dict[str, Any]:
        """The report from each worker's cache metrics (``snaps``) and tier fill; the simulated and
        the real multi-worker replay (:mod:`kvtier.harness.clusterreplay`) share it."""
        task_jct, sub_jct = task_jcts(self.traces, self.start, self.finish)
        start = min(t.arrival_s for t in self.traces)
        makespan = max(self.finish.values()) - start
        tasks = len(task_jct)
        held = sustained(float(np.sum(self.service)), tasks, UTILISATION)
        bytes_moved: dict[str, int] = {}
        for sn in snaps:
            for key, v in sn["bytes_moved"].items():
                if key != "network->dram":
                    bytes_moved[key] = bytes_moved.get(key, 0) + v
        mig = self.migrations
        bytes_moved["migration"] = int(sum(m["bytes"] for m in mig))
        delays = [m["delay_s"] for m in mig]
        j = jct_stats(list(task_jct.values()))
        out: dict[str, Any] = {
            "jct_s": j,
            "jct_subagents_s": jct_stats(list(sub_jct.values())),
            "jct_p50_s": j["p50"], "jct_p99_s": j["p99"] if j["p99"] is not None else j["max"],
            "makespan_s": makespan,
            "tasks_per_hour": tasks / makespan * 3600 if makespan > 0 else 0.0,
            "sustained": held,
            "prefill_tokens": {"computed": self.computed, "total": self.total},
            "generated_tokens": sum(len(x) for v in self.tokens_by_trace.values() for x in v),
            "tokens_crc32": self.tokens_crc32(),
            "hits": {k: sum(sn["hits"][k] for sn in snaps) for k in ("device", "dram", "nvme")},
            "misses": sum(sn["misses"] for sn in snaps),
            "dropped_blocks": sum(sn["dropped_blocks"] for sn in snaps),
            "bytes_moved": bytes_moved,
            "migrations": {
                "count": len(mig),
                "router_decisions": self.decisions,
                "router_wanted_migration": self.wanted,  # the same rule in every mode; none carries out none
                "blocks_sent": int(sum(m["blocks_sent"] for m in mig)),
                "blocks_present_at_target": int(sum(m["blocks_present"] for m in mig)),
                "blocks_of_traces": int(sum(m["blocks"] for m in mig)),
                "outlasted_gap": int(sum(1 for d in delays if d > 0)),
                "step_delay_s": {"sum": float(sum(delays)), "max": float(max(delays)) if delays else 0.0},
                "transfer_s": {"sum": float(sum(m["end"] - m["start"] for m in mig)),
                               "p50": float(np.percentile([m["end"] - m["start"] for m in mig], 50)) if mig else 0.0},
                "first": mig[:20],
            },
            "workers": [{"worker": i, "root_traces": wk.roots, "steps": wk.steps, "service_s": wk.service,
                         "utilisation": wk.service / makespan if makespan > 0 else 0.0,
                         "blocks_per_tier": blocks_per_tier[i]} for i, wk in enumerate(self.w)],
        }
        out["nvme_bytes_written_per_task"] = bytes_moved.get("dram->nvme", 0) / max(1, tasks)
        return out


def simulate_cluster(*, server: Any = "h100-llama3-8b", workers: int = 2, migration: str | list[str] | None = "all",
                     network: str | NetworkModel = "rdma-400g", cache_policy: str = "tiered", traces: int = 1000,
                     seed: int = 0, workload: list[Trace] | None = None, block_tokens: int = 64,
                     hbm_kv_gib: float | None = None, threshold_s: float = 1.0, placement: dict[str, int] | None = None,
                     json_path: str | None = None, plot_path: str | None = None, progress: bool = True,
                     quiet: bool = False, vocab: int = 32000) -> dict[str, Any]:
    """Run each migration mode over ``workers`` modelled workers behind one router (Note [Router]);
    returns the report (also printed, and written as JSON). ``placement`` (tests): root trace id ->
    worker, instead of the fewest-roots rule."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kvtier.harness import sim

    if isinstance(server, str):
        if server not in sim.PRESETS:
            raise InvalidArgumentError(f"unknown server model {server!r}; presets: {', '.join(sim.PRESETS)}")
        server = sim.PRESETS[server]
    if hbm_kv_gib is not None:
        server = replace(server, hbm_kv_gib=hbm_kv_gib)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidArgumentError(f"workers must be an integer >= 1, got {workers!r}")
    if cache_policy not in CLUSTER_CACHE_POLICIES:
        raise InvalidArgumentError(f"cache policy {cache_policy!r} is not supported with several workers; "
                                   f"choose from {', '.join(CLUSTER_CACHE_POLICIES)}")
    if not (threshold_s >= 0 and np.isfinite(threshold_s)):
        raise InvalidArgumentError(f"the router's threshold must be >= 0 seconds, got {threshold_s!r}")
    modes = check_migration(migration)
    net = check_network(network)
    trs = workload if workload is not None else sim.fleet_workload(traces, seed)
    layout = sim._layout(server, block_tokens)
    gib = 1 << 30
    console = Console(stderr=True)
    results: dict[str, Any] = {}
    t_wall = time.perf_counter()
    total_steps = sum(len(t.steps) for t in trs) * len(modes)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task(f"simulate: {len(trs)} traces on {workers} workers", total=total_steps)
        for mode in modes:
            ws = []
            for _ in range(workers):
                backend = sim.ModelBackend(server, layout)

                def make_cache(policy: str, backend: Any = backend) -> TieredCache:
                    cache = TieredCache(layout, "sim", device_bytes=int(server.hbm_kv_gib * gib),
                                        dram_bytes=int(server.dram_kv_gib * gib), nvme_dir="(modelled)",
                                        nvme_bytes=int(server.nvme_kv_gib * gib), backend=backend,
                                        load_chunk_blocks=1 << 20)
                    backend.engine.mover = cache.moves
                    return cache

                ex = sim.ModelExecutor(server, backend, vocab)
                runner = PolicyRunner(cache_policy, ex, make_cache, sim._cost(server, layout))
                ws.append(_Worker(runner, runner.cache, backend))
            cr = ClusterReplay(mode, trs, ws, net, threshold_s, layout.block_bytes, block_tokens, placement)
            cr.run(lambda: bar.advance(task))
            results[mode] = cr.report(server)
            for wk in ws:
                wk.runner.close()
    wall = time.perf_counter() - t_wall
    report = {
        "kind": "SIMULATION (modelled servers and network, virtual time; no model runs, no bytes move)",
        "server": asdict(server), "servers": workers, "workers": workers, "traces": len(trs),
        "steps": sum(len(t.steps) for t in trs), "block_tokens": block_tokens, "seed": seed,
        "cache_policy": cache_policy, "network": asdict(net),
        "router": {"threshold_s": threshold_s,
                   "rule": "home busy (predicted queueing > threshold) and another worker's queueing lower by "
                           "more than the threshold: migrate to the least queued (Note [Router] in kvtier.harness.simcluster)"},
        "wall_s": wall, "policies": results, "model": f"simulated {workers} x {server.name}, network {net.name}",
        "title": "kvtier simulate --workers (SIMULATION)", "time_axis": "simulated time",
    }
    if not quiet:
        render_table(results, f"kvtier simulate (SIMULATION): {len(trs)} traces, {workers} workers x {server.name}, "
                              f"cache {cache_policy}, network {net.name} (a model: {net.bandwidth_gbps:g} GB/s, "
                              f"{net.latency_s * 1e3:.1f} ms)")
        render_migrations(results)
        console.print(f"simulated in {wall:.1f} s wall time")
    save_report(report, json_path, plot_path, console)
    return report


def render_migrations(results: dict[str, dict[str, Any]],
                      title: str = "migrations (SIMULATION; network is a model)") -> None:
    """The per-mode migration table (beside :func:`kvtier.harness.driver.render_table`)."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("mode", "migrations", "router wanted", "GiB moved", "blocks sent / held", "outlasted gap",
                "step delay s", "JCT p50 s", "JCT p99 s", "utilisation per worker"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode, r in results.items():
        m = r["migrations"]
        table.add_row(mode, str(m["count"]), str(m["router_wanted_migration"]),
                      f"{r['bytes_moved']['migration'] / 2**30:.1f}",
                      f"{m['blocks_sent']} / {m['blocks_of_traces']}", str(m["outlasted_gap"]),
                      f"{m['step_delay_s']['sum']:.2f}", f"{r['jct_p50_s']:.2f}", f"{r['jct_p99_s']:.2f}",
                      " / ".join(f"{w['utilisation']:.0%}" for w in r["workers"]))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
