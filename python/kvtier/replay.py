"""``kvtier replay``: run an agent-trace workload on a real decoder under each cache policy.

Every policy replays the same workload on the same model, greedily, so the generated tokens
must be identical; what changes is how much prefill is recomputed and how long traces take.

Time: a single inference server runs one step at a time. A step's service time is the *measured*
wall time of its cache lookup, KV load, prefill + decode and store on this machine; tool-call gaps
and arrivals are virtual (not slept). A trace's JCT is the virtual time from its arrival to the end
of its last step, so JCT includes queueing behind other traces, as on a real server.

Policies:
  none        no reuse: every step prefills its whole context.
  device-lru  reuse within a device-tier budget only (what engines do today).
  tiered      kvtier's tiers: the same device budget, plus DRAM and NVMe below it, LRU demotion.
"""

from __future__ import annotations

import heapq
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import kvtier
from kvtier.errors import InvalidArgumentError
from kvtier.workload import Trace

POLICIES = ("none", "device-lru", "tiered")
BLOCK_TOKENS = 16
_CACHE_KW = "past_key_values"  # set to "cache" on transformers releases that renamed it (load_model)


# ---------------------------------------------------------------------------------------- model


def build_default_model(directory: str | Path, seed: int = 0) -> Path:
    """A small random-weight Llama saved to ``directory`` (built offline, cached by config)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def load_model(model_dir: str | Path) -> Any:
    """A transformers causal LM from a local folder, in eval mode; clear errors otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise InvalidArgumentError(f"{str(path)!r} is not a model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises several kinds here
        raise InvalidArgumentError(f"{str(path)!r}: cannot read its config: {e}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except ValueError as e:
        raise InvalidArgumentError(
            f"{str(path)!r} holds a {config.model_type!r} model, which is not a causal LM transformers "
            f"can load with AutoModelForCausalLM ({str(e).splitlines()[0]})") from None
    model.eval()
    global _CACHE_KW
    _CACHE_KW = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    gc = model.generation_config
    gc.eos_token_id = None  # generate exactly the requested number of tokens
    if gc.pad_token_id is None:
        gc.pad_token_id = 0
    return model


# ---------------------------------------------------------------------------------------- runner


@dataclass
class StepResult:
    tokens: list[int]
    computed: int  # prefill tokens computed
    total: int  # prefill tokens in the context
    service_s: float


class PolicyRunner:
    """Runs steps for one policy: lookup, load, generate, store."""

    def __init__(self, policy: str, model: Any, max_tokens: int, device_budget: int, dram_budget: int,
                 nvme_dir: str | None, nvme_budget: int) -> None:
        from kvtier.integrations.transformers import KvtierCache

        self.policy = policy
        self.model = model
        self.kvc = KvtierCache(model.config, max_tokens=max_tokens, block_tokens=BLOCK_TOKENS, dtype=model.dtype)
        layout = self.kvc.layout
        salt = kvtier.keys.make_salt(str(getattr(model.config, "_name_or_path", "model")), layout, kind="transformers")
        self.cache: kvtier.TieredCache | None = None
        if policy == "device-lru":
            self.cache = kvtier.TieredCache(layout, salt, device_bytes=device_budget)
        elif policy == "tiered":
            self.cache = kvtier.TieredCache(layout, salt, device_bytes=device_budget, dram_bytes=dram_budget,
                                            nvme_dir=nvme_dir, nvme_bytes=nvme_budget if nvme_dir else 0)
        elif policy != "none":
            raise InvalidArgumentError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)} or all")

    def run_step(self, context: list[int], generate: int) -> StepResult:
        import torch

        t0 = time.perf_counter()
        ctx = np.asarray(context, dtype=np.int64)
        self.kvc.reset()
        hit = 0
        match = None
        if self.cache is not None:
            match = self.cache.match(ctx, max_blocks=(len(ctx) - 1) // BLOCK_TOKENS)
            handle = self.cache.load(match, self.kvc.registration, np.arange(match.hit_blocks))
            handle.wait()
            hit = handle.total_blocks
            self.kvc.set_seq_length(hit * BLOCK_TOKENS)
        ids = torch.from_numpy(ctx).unsqueeze(0)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{_CACHE_KW: self.kvc},
                                      max_new_tokens=generate, min_new_tokens=generate, do_sample=False)
        new = out[0, len(ctx):].tolist()
        if self.cache is not None:
            self.cache.release(match)
            filled = self.kvc.num_blocks_filled()
            full = np.concatenate([ctx, np.asarray(new, dtype=np.int64)])[: filled * BLOCK_TOKENS]
            if filled > hit:
                self.cache.store(full, self.kvc.registration, np.arange(hit, filled), first_block=hit)
        return StepResult(new, len(ctx) - hit * BLOCK_TOKENS, len(ctx), time.perf_counter() - t0)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


class PolicyReplay:
    """One policy's replay of the workload in virtual time, advanced one step at a time.

    ``run`` advances every policy's replay in turn, one step each, so that noise on a shared
    machine (other processes, turbo, page cache) lands on all policies alike.
    """

    def __init__(self, policy: str, model: Any, traces: list[Trace], *, device_budget: int, dram_budget: int,
                 nvme_dir: str | None, nvme_budget: int) -> None:
        self.traces = traces
        self.by_id = {t.trace_id: t for t in traces}
        max_ctx = max(self._ctx_len(t, len(t.steps) - 1) for t in traces)
        max_tokens = (max_ctx // BLOCK_TOKENS + 2) * BLOCK_TOKENS
        self.runner = PolicyRunner(policy, model, max_tokens, device_budget, dram_budget, nvme_dir, nvme_budget)
        self.contexts: dict[str, list[int]] = {}
        self.children: dict[tuple[str, int], list[Trace]] = {}
        for t in traces:
            if t.fork_of is not None:
                self.children.setdefault((t.fork_of.trace_id, t.fork_of.after_step), []).append(t)
        self.tokens: dict[str, list[list[int]]] = {t.trace_id: [] for t in traces}
        self.ready: list[tuple[float, int, str, int]] = []  # (ready time, seq, trace id, step)
        self.seq = 0
        for t in traces:
            if t.fork_of is None:
                self._push(t.arrival_s, t.trace_id, 0)
                self.contexts[t.trace_id] = []
        self.clock = 0.0
        self.finish: dict[str, float] = {}
        self.computed = self.total = 0
        self.service: list[float] = []

    def _ctx_len(self, t: Trace, upto: int) -> int:
        base = 0
        if t.fork_of is not None:
            base = self._ctx_len(self.by_id[t.fork_of.trace_id], t.fork_of.after_step)
        return base + sum(len(s.append) + s.generate for s in t.steps[: upto + 1])

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
        self.clock = max(self.clock, at)
        ctx = self.contexts[tid]
        ctx.extend(step.append)
        r = self.runner.run_step(ctx, step.generate)
        self.clock += r.service_s
        self.service.append(r.service_s)
        self.computed += r.computed
        self.total += r.total
        ctx.extend(r.tokens)
        self.tokens[tid].append(r.tokens)
        for child in self.children.get((tid, k), []):
            self.contexts[child.trace_id] = list(ctx)
            self._push(max(self.clock, child.arrival_s), child.trace_id, 0)
        if k + 1 < len(t.steps):
            self._push(self.clock + step.tool_gap_s, tid, k + 1)
        else:
            self.finish[tid] = self.clock
        return True

    def report(self) -> dict[str, Any]:
        self.runner.close()
        jct = [self.finish[t.trace_id] - t.arrival_s for t in self.traces]
        makespan = max(self.finish.values()) - min(t.arrival_s for t in self.traces)
        out: dict[str, Any] = {
            "jct_s": {"p50": _percentile(jct, 50), "p99": _percentile(jct, 99), "mean": float(np.mean(jct))},
            "tasks_per_hour": len(self.traces) / makespan * 3600 if makespan > 0 else 0.0,
            "prefill_tokens": {"computed": self.computed, "total": self.total},
            "service_s": {"sum": float(np.sum(self.service)), "p50": _percentile(self.service, 50)},
            "tokens": self.tokens,
        }
        cache = self.runner.cache
        if cache is not None:
            snap = cache.metrics.snapshot()
            out.update(hits=snap["hits"], misses=snap["misses"], bytes_moved=snap["bytes_moved"],
                       blocks_per_tier=cache.blocks_per_tier(), transfer_latency=snap["transfer_latency"],
                       dropped_blocks=snap["dropped_blocks"])
        else:
            out.update(hits={"device": 0, "dram": 0, "nvme": 0}, misses=0, bytes_moved={})
        return out


def run(model_dir: str | None = None, workload: str | None = None, policies: list[str] | None = None,
        json_path: str | None = None, plot_path: str | None = None, device_budget: int | None = None,
        dram_budget: int | None = None, nvme_dir: str | None = None, nvme_budget: int | None = None,
        seed: int = 0, traces: int = 8, progress: bool = True) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from kvtier import workload as wl

    console = Console(stderr=True)
    chosen = list(POLICIES) if not policies or "all" in policies else policies
    for p in chosen:
        if p not in POLICIES:
            raise InvalidArgumentError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)} or all")
    if model_dir is None:
        cache_dir = Path(os.environ.get("KVTIER_CACHE_DIR", Path.home() / ".cache" / "kvtier"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        model_path = build_default_model(cache_dir / "small-llama-v2", seed=0)
        model_name = "built-in small-llama-v2 (6 layers, hidden 512, 8 heads, 2 kv heads, random weights)"
    else:
        model_path = Path(model_dir)
        model_name = str(model_path)
    model = load_model(model_path)
    vocab = int(model.config.vocab_size)
    if workload is None:
        trs = wl.default_workload(vocab, seed=seed, traces=traces)
        workload_name = f"default(seed={seed}, traces={traces})"
    else:
        trs = wl.load(workload, vocab_size=vocab)
        workload_name = str(workload)
    # Budgets: by default the device tier holds a tenth of the workload's KV and DRAM a quarter, so reuse
    # depends on what survives below it.
    from kvtier.integrations.transformers import KvtierCache

    layout = KvtierCache(model.config, max_tokens=BLOCK_TOKENS, block_tokens=BLOCK_TOKENS, dtype=model.dtype).layout
    unique_tokens = sum(len(s.append) + s.generate for t in trs for s in t.steps)
    workload_kv = unique_tokens * layout.token_bytes
    device_budget = device_budget or max(layout.block_bytes * 4, workload_kv // 10)
    dram_budget = dram_budget or max(layout.block_bytes * 16, workload_kv // 4)
    nvme_budget = nvme_budget or max(layout.block_bytes * 16, workload_kv * 2)
    own_nvme = nvme_dir is None
    nvme_base = nvme_dir or tempfile.mkdtemp(prefix="kvtier-replay-", dir=os.getcwd())
    steps_total = sum(len(t.steps) for t in trs) * len(chosen)
    results: dict[str, Any] = {}
    try:
        replays = {}
        for p in chosen:
            pdir = os.path.join(nvme_base, p)
            shutil.rmtree(pdir, ignore_errors=True)
            replays[p] = PolicyReplay(p, model, trs, device_budget=device_budget, dram_budget=dram_budget,
                                      nvme_dir=pdir if p == "tiered" else None, nvme_budget=nvme_budget)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TimeElapsedColumn(), console=console, disable=not progress, transient=True) as bar:
            task = bar.add_task(f"replay: {', '.join(chosen)} (interleaved)", total=steps_total)
            active = list(replays)
            while active:
                for p in list(active):
                    if replays[p].step():
                        bar.advance(task)
                    else:
                        active.remove(p)
        for p in chosen:
            results[p] = replays[p].report()
    finally:
        if own_nvme:
            shutil.rmtree(nvme_base, ignore_errors=True)
    ref = next(iter(results.values()))["tokens"]
    identical = all(r["tokens"] == ref for r in results.values())
    report = {
        "model": model_name, "workload": workload_name,
        "config": {"block_tokens": BLOCK_TOKENS, "device_budget_bytes": device_budget, "dram_budget_bytes": dram_budget,
                   "nvme_budget_bytes": nvme_budget, "workload_kv_bytes": workload_kv, "traces": len(trs),
                   "steps": sum(len(t.steps) for t in trs), "seed": seed},
        "time_model": "virtual: measured step service times on this machine, virtual tool gaps and arrivals",
        "tokens_identical": identical,
        "policies": results,
    }
    table = Table(title=f"kvtier replay: {len(trs)} traces, {report['config']['steps']} steps, "
                        f"device budget {device_budget / 2**20:.1f} MiB")
    for col in ("policy", "JCT p50 s", "JCT p99 s", "tasks/hour", "prefill computed", "hits dev/dram/nvme",
                "bytes moved"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p, r in results.items():
        pt = r["prefill_tokens"]
        h = r["hits"]
        moved = sum(r["bytes_moved"].values()) if r["bytes_moved"] else 0
        table.add_row(p, f"{r['jct_s']['p50']:.2f}", f"{r['jct_s']['p99']:.2f}", f"{r['tasks_per_hour']:.0f}",
                      f"{pt['computed']}/{pt['total']} ({pt['computed'] / max(1, pt['total']):.0%})",
                      f"{h['device']}/{h['dram']}/{h['nvme']}", f"{moved / 2**20:.1f} MiB")
    Console().print(table)
    console.print("generated tokens identical across policies: "
                  + ("[green]yes[/green]" if identical else "[red]NO[/red]"))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        console.print(f"wrote {json_path}")
    if plot_path:
        _plot(report, plot_path)
        console.print(f"wrote {plot_path}")
    if not identical:
        raise kvtier.KvtierError("policies generated different tokens: the cache changed the model's outputs")
    return report


def _plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise kvtier.UnavailableError("--plot needs matplotlib: pip install 'kvtier[plot]'") from None
    pols = list(report["policies"])
    res = report["policies"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    x = np.arange(len(pols))
    axes[0].bar(x - 0.2, [res[p]["jct_s"]["p50"] for p in pols], 0.4, label="p50")
    axes[0].bar(x + 0.2, [res[p]["jct_s"]["p99"] for p in pols], 0.4, label="p99")
    axes[0].set_title("JCT (s, virtual time)")
    axes[0].legend()
    axes[1].bar(x, [res[p]["prefill_tokens"]["computed"] for p in pols], color="tab:orange")
    axes[1].set_title("prefill tokens computed")
    bottom = np.zeros(len(pols))
    for tier, color in (("device", "tab:green"), ("dram", "tab:blue"), ("nvme", "tab:purple")):
        vals = np.array([res[p]["hits"][tier] for p in pols], dtype=float)
        axes[2].bar(x, vals, bottom=bottom, label=tier, color=color)
        bottom += vals
    axes[2].set_title("block hits by tier")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(x, pols)
    fig.suptitle(f"kvtier replay: {report['model'][:60]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
