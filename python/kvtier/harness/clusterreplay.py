"""``kvtier replay --workers N --migration none|full|dedup|all``: the agent workload on N real
worker processes, each with its own decoder and tiers, behind one router, with real trace
migration between them.

What is real: each worker is a process of its own (``multiprocessing`` spawn) running the
replay's decoder (:class:`~kvtier.harness.replay.ModelExecutor`) over its own
:class:`~kvtier.TieredCache` (device, DRAM and NVMe tiers, the ``tiered`` policy) with a
:class:`~kvtier.cluster.ClusterWorker` attached: its DRAM tier is published in a real Redis
(started here unless ``store_url`` is given) and served to the other workers over UCX (the remote
tier: a prefix one worker computed is pulled by another instead of recomputed, in every mode). A
migration is the library's: the source stages the trace's blocks in its DRAM and asks the target
(through the store's mailbox) to pull what it lacks (``dedup``) or everything the source serves
(``full``: the blocks the target already holds are sent again and dropped,
:meth:`~kvtier.cluster.ClusterWorker.pull_trace`), validate it and take ownership under a fence.
``none`` keeps every trace on the worker it started on. Every step's tokens come from the real
decoder on whichever worker it ran, so a migrated trace that resumed on wrong KV would generate
different tokens: the modes' tokens are compared.

Time is the replay's (Note [Virtual time] in :mod:`kvtier.harness.driver`): steps run one at a
time, each charged its measured service time (lookups, remote pulls and the store's round trips,
loads, the calibrated compute, stores) on its worker's own prefill resource, so the workers'
timelines overlap in virtual time as N servers would. The event loop and the router are
:class:`kvtier.harness.simcluster.ClusterReplay`'s (Note [Router]), the same rule in every mode;
what differs from ``kvtier simulate --workers`` is that a migration really runs, when the router
decides it, and its *measured* wall time (staging at the source, plan, pull, validation, publish,
commit) is the time it occupies both workers' NICs in virtual time. The router's prediction of a
transfer (when to decide, whether a target has room) uses the measured network preset of the
transport (``NETWORKS["shm"]`` or ``["tcp"]``, a MODEL from ``kvtier bench remote`` on this VM),
identical in every mode.

Note [Live landing]: the pulled blocks are in the target's DRAM from the moment the migration
ran (the router's decision time), not from its end in virtual time as the simulator lands them.
Only the migrated trace uses its private blocks, and it starts on the target after the landing,
so this changes nothing but a shared block another trace on the target might find a few
milliseconds early.

Only the ``tiered`` cache policy runs on several workers (as in the simulator): the trace-aware
policy's per-trace state would have to migrate with the trace (:meth:`kvtier.Trace.migrate` does
that for one trace; the replay does not drive it yet).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.errors import InvalidArgumentError, KvtierError, UnavailableError
from kvtier.harness import workload as wl
from kvtier.harness.driver import StepResult, render_table, save_report
from kvtier.harness.simcluster import _STEP, NETWORKS, ClusterReplay, _Worker, check_migration, render_migrations

__all__ = ["run", "TRANSPORTS"]

# transport -> (UCX_TLS, UCX_NET_DEVICES, the router's network preset)
TRANSPORTS: dict[str, tuple[str, str | None, str]] = {
    "shm": ("posix,cma,tcp", "lo", "shm"),  # shared memory; tcp listed for peer error handling
    "tcp": ("tcp", "lo", "tcp"),
}
_STEP_TIMEOUT_S = 600.0  # one RPC to a worker (a step, a migration); a hung worker fails the run


# ----------------------------------------------------------------------------- worker process


class _WorkerState:
    """One mode's cache, cluster member and runner inside a worker process."""

    def __init__(self, spec: dict[str, Any], ex: Any, mode: dict[str, Any]) -> None:
        import kvtier
        from kvtier.cluster.worker import ClusterWorker
        from kvtier.harness.driver import PolicyRunner

        self.ex = ex
        nvme_dir = mode["nvme_dir"]
        shutil.rmtree(nvme_dir, ignore_errors=True)
        self.cache = kvtier.TieredCache(ex.layout, spec["salt"], device_bytes=spec["device_budget"],
                                        dram_bytes=spec["dram_budget"], nvme_dir=nvme_dir,
                                        nvme_bytes=spec["nvme_budget"])
        tls, net_devices, _ = TRANSPORTS[spec["transport"]]
        try:
            self.worker = ClusterWorker(spec["url"], spec["worker_id"], self.cache, cluster=mode["cluster"],
                                        tls=tls, net_devices=net_devices, lease_ms=3000,
                                        transfer_timeout_s=30.0)
        except BaseException:
            self.cache.close()
            raise
        if mode["full"]:  # the full-resend baseline's landing area, made before any timing
            self.worker.reserve_resend(spec["max_tokens"] // self.cache.block_tokens)
        self.runner = PolicyRunner("tiered", ex, lambda _p: self.cache)
        self.fences: dict[str, int] = {}
        self.migrations: list[dict[str, Any]] = []

    def step(self, tid: str, k: int, ctx: np.ndarray, generate: int, now: float) -> dict[str, Any]:
        rem = self.cache.metrics.remote
        rtt0, lk0 = rem["store_rtt_s"], rem["lookups"]
        res = self.runner.run_step(tid, k, ctx, generate, now)
        return {"tokens": [int(x) for x in res.tokens], "computed": res.computed, "total": res.total,
                "service_s": res.service_s, "decode_s": res.decode_s, "wait_s": res.wait_s,
                "store_rtt_s": rem["store_rtt_s"] - rtt0, "store_lookups": rem["lookups"] - lk0}

    def migrate(self, tid: str, ctx: np.ndarray, target: str, dedup: bool) -> dict[str, Any]:
        from kvtier.cache import DRAM, NVME
        from kvtier.cluster.migration import MigrationState

        cache, bt = self.cache, self.cache.block_tokens
        n = len(ctx) // bt
        keys = cache.keys_for(ctx[: n * bt]) if n else np.zeros((0, 2), dtype=np.uint64)
        t0 = time.perf_counter()
        fence = self.fences.get(tid)
        if fence is None:
            fence = self.worker.store.claim_trace(tid)  # this worker's own trace: its fence
        # Peers pull from the DRAM tier only: stage the trace's blocks there (as Trace.migrate
        # does), the same in every mode; the cache's calls publish them.
        held = cache.locate(keys)[0] != 255 if n else np.zeros(0, dtype=bool)
        if n:
            cache.demote_keys(keys, DRAM)
            if cache.has_tier(NVME):
                cache.promote_keys(keys, DRAM)
        staged = int(((cache.locate(keys)[0] == DRAM)).sum()) if n else 0
        stage_s = time.perf_counter() - t0
        res = self.worker.request_migration(tid, keys, target, fence, timeout_s=60.0, dedup=dedup)
        total_s = time.perf_counter() - t0
        if res.state is MigrationState.COMMITTED:
            self.fences.pop(tid, None)
        elif res.owner == self.worker.worker_id and res.fence is not None:
            self.fences[tid] = int(res.fence)
        return {"state": res.state.value, "error": res.error, "blocks": int(n), "blocks_held": int(held.sum()),
                "blocks_staged_in_dram": staged, "blocks_present": res.blocks_present,
                "blocks_moved": res.blocks_moved, "blocks_resent": res.blocks_resent,
                "blocks_unavailable": res.blocks_unavailable, "bytes": res.bytes_moved, "stage_s": stage_s,
                "wall_s": total_s, "timings_s": dict(res.timings_s)}

    def report(self) -> dict[str, Any]:
        return {"metrics": self.cache.metrics.snapshot(), "blocks_per_tier": self.cache.blocks_per_tier(),
                "cluster": self.worker.status(), "store": self.worker.store.metrics.snapshot()}

    def close(self) -> None:
        try:
            self.worker.close()
        finally:
            self.runner.close()


def _worker_main(conn: Any, spec: dict[str, Any]) -> None:
    """A worker process: load the model once, then serve the coordinator's calls until ``exit``."""
    state: _WorkerState | None = None
    try:
        import torch

        from kvtier.harness.replay import ComputeModel, ModelExecutor, load_model

        torch.set_num_threads(spec["torch_threads"])
        model = load_model(spec["model_path"])
        speed = ComputeModel(*spec["compute"]) if spec["compute"] is not None else None
        ex = ModelExecutor(model, spec["max_tokens"], speed)
        conn.send(("ok", {"pid": os.getpid()}))
    except BaseException as e:  # noqa: BLE001 (reported to the coordinator)
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            break  # the coordinator is gone
        try:
            if op == "exit":
                break
            if op == "setup":
                state = _WorkerState(spec, ex, *args)
                out: Any = {"worker": spec["worker_id"]}
            elif op == "teardown":
                if state is not None:
                    state.close()
                state = None
                out = None
            elif state is None:
                raise InvalidArgumentError(f"{op!r} before setup")
            elif op == "step":
                out = state.step(*args)
            elif op == "migrate":
                out = state.migrate(*args)
            elif op == "report":
                out = state.report()
            else:
                raise InvalidArgumentError(f"unknown call {op!r}")
            conn.send(("ok", out))
        except BaseException as e:  # noqa: BLE001 (reported to the coordinator)
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    if state is not None:
        with contextlib.suppress(Exception):
            state.close()


# ----------------------------------------------------------------------------- coordinator


class _Proc:
    """The coordinator's handle on one worker process: synchronous calls with a deadline."""

    def __init__(self, ctx: Any, spec: dict[str, Any]) -> None:
        self.worker_id = spec["worker_id"]
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, spec), name=f"kvtier-{self.worker_id}",
                                daemon=True)
        self.proc.start()
        child.close()

    def wait_ready(self) -> None:
        self._reply("start")

    def call(self, op: str, *args: Any) -> Any:
        try:
            self.conn.send((op, args))
        except (BrokenPipeError, OSError) as e:
            raise KvtierError(f"worker {self.worker_id} is gone (exit code {self.proc.exitcode}): {e}") from None
        return self._reply(op)

    def _reply(self, op: str) -> Any:
        if not self.conn.poll(_STEP_TIMEOUT_S):
            raise KvtierError(f"worker {self.worker_id}: no answer to {op!r} within {_STEP_TIMEOUT_S:.0f} s")
        try:
            kind, out = self.conn.recv()
        except (EOFError, OSError):
            raise KvtierError(f"worker {self.worker_id} died during {op!r} (exit code {self.proc.exitcode})") from None
        if kind != "ok":
            raise KvtierError(f"worker {self.worker_id}, {op!r}: {out}")
        return out

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("exit", ()))
        self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class _RemoteRunner:
    """What :class:`ClusterReplay` calls a worker's runner: steps go to the process; the trace
    hooks are no-ops (the tiered policy keeps no per-trace state)."""

    def __init__(self, proc: _Proc, log: list[dict[str, Any]]) -> None:
        self.proc = proc
        self.log = log

    def open(self, tid: str, parent: str | None = None) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def tool_start(self, tid: str, now: float, expected_gap_s: float | None, tool: str | None) -> None:
        pass

    def tool_end(self, tid: str, now: float) -> None:
        pass

    def close_trace(self, tid: str) -> None:
        pass

    def run_step(self, tid: str, k: int, ctx: np.ndarray, generate: int, now: float) -> StepResult:
        out = self.proc.call("step", tid, k, ctx, generate, now)
        self.log.append({"worker": self.proc.worker_id, "store_rtt_s": out["store_rtt_s"],
                         "store_lookups": out["store_lookups"]})
        return StepResult(out["tokens"], out["computed"], out["total"], out["service_s"], out["decode_s"],
                          out["wait_s"])


class LiveClusterReplay(ClusterReplay):
    """:class:`ClusterReplay` over real worker processes: steps and migrations really run."""

    def __init__(self, mode: str, trs: list[wl.Trace], procs: list[_Proc], network: Any, threshold_s: float,
                 block_bytes: int, block_tokens: int, placement: dict[str, int] | None = None) -> None:
        self.procs = procs
        self.step_log: list[dict[str, Any]] = []
        ws = [_Worker(_RemoteRunner(p, self.step_log), None, None) for p in procs]  # type: ignore[arg-type]
        super().__init__(mode, trs, ws, network, threshold_s, block_bytes, block_tokens, placement)

    def _migrate(self, now: float, tid: str, k: int, src: int, dst: int, gap_start: float, ret: float) -> None:
        s, d = self.w[src], self.w[dst]
        out = self.procs[src].call("migrate", tid, self.contexts[tid], self.procs[dst].worker_id,
                                   self.mode == "dedup")
        begin = max(now, s.nic, d.nic)
        end = begin + out["wall_s"]  # measured: staging, plan, pull, validation, publish, commit
        s.nic = d.nic = end
        ok = out["state"] == "committed"
        rec = {"trace": tid, "step": k, "src": src, "dst": dst, "gap_start": gap_start, "decided": now,
               "start": begin, "end": end, "returned": ret, "delay_s": max(0.0, end - ret) if ok else 0.0,
               "state": out["state"], "error": out["error"], "blocks": out["blocks"],
               "blocks_held": out["blocks_held"], "blocks_staged_in_dram": out["blocks_staged_in_dram"],
               "blocks_present": out["blocks_present"], "blocks_sent": out["blocks_moved"] + out["blocks_resent"],
               "blocks_resent": out["blocks_resent"], "blocks_unavailable": out["blocks_unavailable"],
               "bytes": out["bytes"], "stage_s": out["stage_s"], "timings_s": out["timings_s"]}
        self.migrations.append(rec)
        if not ok:  # the trace stays usable at its source (the protocol's rule): it resumes there
            self._push(ret, _STEP, (tid, k, ret))
            return
        self.loc[tid] = dst
        self._push(max(ret, end), _STEP, (tid, k, ret))


def _start_store(store_url: str | None, stack: contextlib.ExitStack) -> str:
    if store_url is not None:
        return store_url
    if shutil.which("redis-server") is None:
        raise UnavailableError("--workers needs a Redis store: give --store redis://HOST:PORT/DB or install "
                               "redis-server (Debian: apt-get install redis-server; scripts/setup.sh does)")
    from kvtier.harness.benchmarks.store import local_redis

    return stack.enter_context(local_redis())


def run(model_dir: str | None = None, workload: str | None = None, workers: int = 2,
        migration: str | list[str] | None = "all", json_path: str | None = None, plot_path: str | None = None,
        device_budget: int | None = None, dram_budget: int | None = None, nvme_dir: str | None = None,
        nvme_budget: int | None = None, seed: int = 0, traces: int | None = None, progress: bool = True,
        compute_time: str = "calibrated", gap_scale: float = 0.1, generator: str = "agent",
        store_url: str | None = None, transport: str = "shm", threshold_s: float | None = None,
        placement: dict[str, int] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Replay the workload on ``workers`` worker processes under each migration mode (module
    docstring); ``traces`` root traces in the generated workload (default 8 per worker); returns the report (printed, and written as JSON with ``json_path``). Raises
    :class:`~kvtier.KvtierError` if the modes generated different tokens."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    import kvtier
    from kvtier.harness import replay
    from kvtier.integrations.transformers import KvtierCache

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
        raise InvalidArgumentError(f"a multi-worker replay needs workers >= 2, got {workers!r}")
    modes = check_migration(migration)
    # Note [Cluster replay load]: each worker as loaded as the single replay's server (8 root
    # traces at gaps x0.1, Note [Replay load] in kvtier.harness.replay): 8 roots per worker
    traces = 8 * workers if traces is None else traces
    if transport not in TRANSPORTS:
        raise InvalidArgumentError(f"unknown transport {transport!r}; choose from {', '.join(TRANSPORTS)}")
    if compute_time not in ("measured", "calibrated"):
        raise InvalidArgumentError(f"compute_time must be 'measured' or 'calibrated', got {compute_time!r}")
    if threshold_s is not None and not (threshold_s >= 0 and np.isfinite(threshold_s)):
        raise InvalidArgumentError(f"the router's threshold must be >= 0 seconds, got {threshold_s!r}")
    if not kvtier._core.HAVE_UCX:
        raise UnavailableError("--workers needs kvtier built with UCX (see `kvtier info`)")
    console = Console(stderr=True)
    if model_dir is None:
        cache_dir = Path(os.environ.get("KVTIER_CACHE_DIR", Path.home() / ".cache" / "kvtier"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        model_path = replay.build_default_model(cache_dir / "small-llama-kv-v3", seed=0)
        model_name = "built-in small-llama-kv-v3 (random weights)"
    else:
        model_path, model_name = Path(model_dir), str(model_dir)
    import torch

    model = replay.load_model(model_path)
    vocab = int(model.config.vocab_size)
    trs = replay.load_workload(workload, vocab, seed, traces, gap_scale, generator)
    by_id = {t.trace_id: t for t in trs}
    max_ctx = max(wl.context_tokens(by_id, t, k) for t in trs for k in range(len(t.steps)))
    bt = replay.BLOCK_TOKENS
    max_tokens = (max_ctx // bt + 2) * bt
    layout = KvtierCache(model.config, max_tokens=bt, block_tokens=bt, dtype=model.dtype).layout
    unique_tokens = sum(len(s.append) + s.generate for t in trs for s in t.steps)
    workload_kv = unique_tokens * layout.token_bytes
    # Per worker: the single replay's defaults (each worker is a server like the replay's one),
    # except that DRAM, where a migration's source stages the trace for its peers to pull (peers
    # read the DRAM tier only), holds at least two of the longest contexts.
    ctx_blocks = max_ctx // bt + 1
    device_budget = device_budget or max(layout.block_bytes * 4, workload_kv // 16)
    dram_budget = dram_budget or max(layout.block_bytes * 2 * ctx_blocks, workload_kv // 8)
    nvme_budget = nvme_budget or max(layout.block_bytes * 16, workload_kv * 2)
    salt = kvtier.keys.make_salt(str(getattr(model.config, "_name_or_path", "model")), layout, kind="transformers")
    threads = max(1, (os.cpu_count() or 2) // workers)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        speed_ex = replay.ModelExecutor(model, max_tokens)
        compute_model, compute_info = None, {"compute_time": "measured: wall time of each step's compute"}
        if compute_time == "calibrated":
            compute_model, compute_info = speed_ex.calibrate(max_ctx, seed=seed)
            prefill_256 = compute_model.prefill_s(256, 0)
        else:
            prefill_256 = speed_ex.prefill_s_per_token() * 256
        del speed_ex, model
    finally:
        torch.set_num_threads(prev_threads)
    # Note [Router] threshold: a typical step's compute (a 256-token prefill from empty), one
    # figure for every mode
    threshold = prefill_256 if threshold_s is None else float(threshold_s)
    net = NETWORKS[TRANSPORTS[transport][2]]
    run_id = uuid.uuid4().hex[:8]
    own_nvme = nvme_dir is None
    nvme_base = nvme_dir or tempfile.mkdtemp(prefix="kvtier-replay-workers-", dir=os.getcwd())
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    t_wall = time.perf_counter()
    ctx = mp.get_context("spawn")
    procs: list[_Proc] = []
    with contextlib.ExitStack() as stack:
        url = _start_store(store_url, stack)
        try:
            for i in range(workers):
                spec = {"worker_id": f"w{i}", "model_path": str(model_path), "max_tokens": max_tokens,
                        "compute": (None if compute_model is None
                                    else (compute_model.prefill_coef, compute_model.decode_coef)),
                        "salt": salt, "device_budget": device_budget, "dram_budget": dram_budget,
                        "nvme_budget": nvme_budget, "url": url, "transport": transport, "torch_threads": threads}
                procs.append(_Proc(ctx, spec))
            for p in procs:
                p.wait_ready()
            total_steps = sum(len(t.steps) for t in trs) * len(modes)
            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(),
                          console=console, disable=not progress, transient=True) as bar:
                task = bar.add_task(f"replay: {len(trs)} traces on {workers} worker processes", total=total_steps)
                for mode in modes:
                    cluster = f"replay-{run_id}-{mode}"
                    for p in procs:
                        p.call("setup", {"cluster": cluster, "full": mode == "full",
                                         "nvme_dir": os.path.join(nvme_base, mode, p.worker_id)})
                    try:
                        cr = LiveClusterReplay(mode, trs, procs, net, threshold, layout.block_bytes, bt, placement)
                        cr.run(lambda: bar.advance(task))
                        reps = [p.call("report") for p in procs]
                    finally:
                        for p in procs:
                            with contextlib.suppress(KvtierError):
                                p.call("teardown")
                    results[mode] = _mode_report(cr, reps)
                    extra[mode] = cr.tokens_by_trace
        finally:
            for p in procs:
                p.stop()
            if own_nvme:
                shutil.rmtree(nvme_base, ignore_errors=True)
    wall = time.perf_counter() - t_wall
    ref = next(iter(extra.values()))
    identical = all(v == ref for v in extra.values())
    tls, net_devices, _ = TRANSPORTS[transport]
    report = {
        "kind": "REPLAY on real worker processes (virtual time from measured steps and migrations)",
        "model": model_name,
        "workload": (f"default(seed={seed}, traces={traces})" if workload is None else str(workload))
        + (f", gaps x{gap_scale:g}" if gap_scale != 1 else ""),
        "workers": workers, "traces": len(trs), "steps": sum(len(t.steps) for t in trs),
        "config": {"block_tokens": bt, "block_bytes": layout.block_bytes, "device_budget_bytes": device_budget, "dram_budget_bytes": dram_budget,
                   "nvme_budget_bytes": nvme_budget, "budgets_are": "per worker", "workload_kv_bytes": workload_kv,
                   "seed": seed, "compute_time": compute_time, "gap_scale": gap_scale, "generator": generator,
                   "torch_threads_per_worker": threads, "cache_policy": "tiered",
                   "transport": {"name": transport, "UCX_TLS": tls, "UCX_NET_DEVICES": net_devices},
                   "store": "redis (started by the replay)" if store_url is None else store_url},
        "compute_model": compute_info,
        "router": {"threshold_s": threshold, "threshold_rule": "a 256-token prefill's modelled compute"
                   if threshold_s is None else "given", "prediction_network": {**net.__dict__},
                   "rule": "Note [Router] in kvtier.harness.simcluster; migrations really run and take their "
                           "measured wall time"},
        "time_model": "virtual: measured step service times and measured migrations on this machine, virtual tool "
                      "gaps and arrivals; each worker its own prefill resource",
        "tokens_identical": identical,
        "wall_s": wall,
        "policies": results,
        "title": f"kvtier replay --workers {workers}", "time_axis": "virtual time",
    }
    if not quiet:
        render_table(results, f"kvtier replay --workers {workers}: {len(trs)} traces, {report['steps']} steps, "
                              f"transport {transport}, gaps x{gap_scale:g}, {compute_time} compute")
        render_migrations(results, title="migrations (real: measured UCX pulls between worker processes)")
        console.print("generated tokens identical across migration modes: "
                      + ("[green]yes[/green]" if identical else "[red]NO[/red]"))
        console.print(f"replayed in {wall:.1f} s wall time")
    save_report(report, json_path, plot_path, console)
    if not identical:
        raise KvtierError("migration modes generated different tokens: a migrated trace resumed on wrong KV")
    return report


def _mode_report(cr: LiveClusterReplay, reps: list[dict[str, Any]]) -> dict[str, Any]:
    out = cr.common_report([r["metrics"] for r in reps], [r["blocks_per_tier"] for r in reps])
    log = cr.step_log
    rtt = np.asarray([x["store_rtt_s"] for x in log], dtype=float)
    out["store_per_step"] = {
        "steps": len(log), "lookups": int(sum(x["store_lookups"] for x in log)),
        "rtt_s_mean": float(rtt.mean()) if rtt.size else 0.0,
        "rtt_s_p99": float(np.percentile(rtt, 99)) if rtt.size else 0.0,
        "note": "the remote tier's store lookups inside steps (one round trip per step at most)"}
    mig = cr.migrations
    m = out["migrations"]
    m["failed"] = sum(1 for x in mig if x["state"] != "committed")
    m["blocks_resent"] = int(sum(x["blocks_resent"] for x in mig))
    m["blocks_unavailable"] = int(sum(x["blocks_unavailable"] for x in mig))
    m["stage_s"] = float(sum(x["stage_s"] for x in mig))
    m["first"] = mig[:20]
    out["jct_by_trace_s"] = {**task_jcts_by_id(cr)}
    out["tokens"] = cr.tokens_by_trace
    out["workers_detail"] = [{"cluster": r["cluster"], "store": r["store"]} for r in reps]
    return out


def task_jcts_by_id(cr: ClusterReplay) -> dict[str, float]:
    from kvtier.harness.driver import task_jcts

    tasks, subs = task_jcts(cr.traces, cr.start, cr.finish)
    return {**tasks, **subs}
