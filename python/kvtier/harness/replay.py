"""``kvtier replay``: run an agent-trace workload on a real decoder under each cache policy.

Every policy replays the same workload on the same model, greedily, so the generated tokens
must be identical; what changes is how much prefill is recomputed and how long traces take.

Time: a single inference server runs one step at a time. A step's service time is the *measured*
wall time of its cache lookup, KV load, prefill + decode and store on this machine; tool-call gaps
and arrivals are virtual (not slept). A trace's JCT is the virtual time from its arrival to the end
of its last step, so JCT includes queueing behind other traces, as on a real server. The policies
and the event loop are in :mod:`kvtier.harness.driver` (Note [Virtual time]), shared with ``kvtier simulate``.

Note [Calibrated compute]: with ``compute_time="calibrated"`` (``--compute-time calibrated``) the
model still runs every step for real (the tokens are still compared), but a step's compute counts
as the :class:`ComputeModel`'s time for it, measured on this machine at start-up; lookups, loads,
stores, copies and I/O are still timed by the wall clock. Compute grows with the context: a
prefill of ``n`` new tokens after ``c`` cached ones is timed on a grid of (n, c) and fitted as
``e + a n + b n c + d n^2`` (the shape of a transformer's cost: linear layers per token,
attention per pair of token and context token), a decode token after ``c`` tokens as ``f + g c``;
the report's ``compute_model`` gives the fit, the grid, and its error against measured wall time
on held-out points the fit did not see (``docs/benchmarks.md``). A fit whose held-out error's
median is over 20% (a burst of other work on a shared machine during the grid) is measured
again, up to three times, and the best kept (``attempts_held_out_error_median``). On a small
shared machine the model's wall time varies between runs by more than the policies differ; this
takes that noise out and keeps the rest real. It is
the default: a policy changes which tokens are computed and how long cache work takes, not how
fast a forward pass runs.

Note [Replay load]: the replay runs a handful of traces on one small model. At the tool gaps' real
lengths (0.4 s file reads to 90 s human replies) that server idles most of the time and a trace's
JCT is almost all tool time, so no cache policy can move JCT by more than one trace's noise. A
serving replica holds many traces and is busy while each one waits; ``gap_scale`` (``--gap-scale``,
default 0.1) multiplies every gap and gap hint, which keeps the tools, their order and spread
(about 0.1 s to a minute) and loads the server as a busy replica is loaded (the report's ``busy``:
service time over makespan). ``--gap-scale 1`` replays the real lengths; ``kvtier simulate`` keeps
them and gets its load from fleet-sized trace counts instead.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import kvtier
from kvtier.harness import workload as wl
from kvtier.harness.driver import (
    DEFAULT_POLICY,
    POLICIES,
    TRACE_POLICIES,
    PolicyReplay,
    PolicyRunner,
    check_policies,
    render_table,
    save_report,
)
from kvtier.errors import InvalidArgumentError
from kvtier.trace import calibrate
from kvtier.harness.workload import Trace

__all__ = ["POLICIES", "build_default_model", "load_model", "load_workload", "run"]
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
    # Note [Built-in model]: the KV of a real 8B model per token (6 layers x 2 x 8 KV heads x 256 x
    # 4 bytes = 96 KiB; Llama-3-8B has 128 KiB) on the compute of a tiny one, so that moving KV
    # between tiers costs about what it costs next to a real model, on a CPU.
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=256, max_position_embeddings=4096,
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


# ---------------------------------------------------------------------------------------- executor


class ComputeModel:
    """A model's compute time on this machine as a function of what a step does (Note
    [Calibrated compute]): ``prefill_s(new, cached)`` and ``decode_s(tokens, context)``."""

    def __init__(self, prefill_coef: list[float], decode_coef: list[float]) -> None:
        self.prefill_coef = [float(x) for x in prefill_coef]  # e, a, b, d
        self.decode_coef = [float(x) for x in decode_coef]  # f, g

    @staticmethod
    def features(new: Any, cached: Any) -> np.ndarray:
        n, c = np.asarray(new, dtype=float), np.asarray(cached, dtype=float)
        return np.stack([np.ones_like(n), n, n * c, n * n], axis=-1)

    def prefill_s(self, new: int, cached: int) -> float:
        if new <= 0:
            return 0.0
        return max(0.0, float(self.features(new, cached) @ np.asarray(self.prefill_coef)))

    def decode_s(self, tokens: int, context: int) -> float:
        """``tokens`` generated after a ``context``-token prefix (each sees the ones before it)."""
        if tokens <= 0:
            return 0.0
        f, g = self.decode_coef
        return max(0.0, tokens * (f + g * (context + (tokens - 1) / 2)))

    def as_dict(self) -> dict[str, Any]:
        e, a, b, d = self.prefill_coef
        f, g = self.decode_coef
        return {"prefill_s": "e + a*new + b*new*cached + d*new^2", "e_s": e, "a_s_per_token": a,
                "b_s_per_token_pair": b, "d_s_per_token2": d, "decode_s_per_token": "f + g*context",
                "f_s": f, "g_s_per_context_token": g}


def _fit_nonneg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (a cost has no negative part), relative error weighted:
    refit without the columns that come out negative (a handful of columns, so a few rounds)."""
    w = 1.0 / np.maximum(y, 1e-9)
    a, b = x * w[:, None], y * w
    active = np.ones(x.shape[1], dtype=bool)
    coef = np.zeros(x.shape[1])
    while active.any():
        sol = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (sol >= 0).all():
            coef[active] = sol
            break
        idx = np.flatnonzero(active)
        active[idx[np.argmin(sol)]] = False
    return coef


class ModelExecutor:
    """Steps on a real transformers decoder: a :class:`KvtierCache` the cache loads into and
    stores from, and greedy ``generate``; the stopwatch is wall time."""

    def __init__(self, model: Any, max_tokens: int, speed: ComputeModel | None = None) -> None:
        from kvtier.integrations.transformers import KvtierCache

        self.model = model
        # With ``speed`` (Note [Calibrated compute]) the stopwatch counts the model's compute at its
        # measured per-token speed instead of its wall time; everything else stays wall time.
        self.speed = speed
        self._adjust = 0.0
        self._cached = 0
        self.kvc = KvtierCache(model.config, max_tokens=max_tokens, block_tokens=BLOCK_TOKENS, dtype=model.dtype)
        self.registration = self.kvc.registration
        self.layout = self.kvc.layout

    def reset(self) -> None:
        self.kvc.reset()
        self._cached = 0

    def set_cached(self, tokens: int) -> None:
        self.kvc.set_seq_length(tokens)
        self._cached = tokens

    def compute(self, ctx: np.ndarray, generate: int, trace_id: str, step: int) -> tuple[list[int], int, float]:
        import torch

        ids = torch.from_numpy(ctx).unsqueeze(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{_CACHE_KW: self.kvc},
                                      max_new_tokens=generate, min_new_tokens=generate, do_sample=False)
        if self.speed is not None:
            new = len(ctx) - self._cached
            # the first generated token comes out of the prefill's forward pass
            modelled = self.speed.prefill_s(new, self._cached) + self.speed.decode_s(generate - 1, len(ctx))
            self._adjust += modelled - (time.perf_counter() - t0)
        return out[0, len(ctx):].tolist(), self.kvc.get_seq_length(), 0.0

    def stopwatch(self) -> float:
        return time.perf_counter() + self._adjust

    def prefill_s_per_token(self, tokens: int = 256, reps: int = 3) -> float:
        """Measured prefill time per token of this model on this machine (best of ``reps``)."""
        import torch

        n = min(tokens, self.kvc.max_tokens - 1)
        ids = torch.arange(4, 4 + n).remainder(int(self.model.config.vocab_size)).unsqueeze(0)
        best = float("inf")
        for _ in range(reps):
            self.kvc.reset()
            t0 = time.perf_counter()
            with torch.no_grad():
                self.model(input_ids=ids, **{_CACHE_KW: self.kvc})
            best = min(best, time.perf_counter() - t0)
        self.kvc.reset()
        return best / n

    def _timed_prefill(self, new: int, cached: int, reps: int) -> float:
        """Best of ``reps`` wall times of a ``new``-token forward pass after ``cached`` tokens."""
        import torch

        vocab = int(self.model.config.vocab_size)
        ids = torch.arange(4, 4 + cached + new).remainder(vocab).unsqueeze(0)
        self.kvc.reset()
        if cached:
            with torch.no_grad():
                self.model(input_ids=ids[:, :cached], **{_CACHE_KW: self.kvc})
        best = float("inf")
        for _ in range(reps):
            self.kvc.set_seq_length(cached)
            t0 = time.perf_counter()
            with torch.no_grad():
                self.model(input_ids=ids[:, cached:], **{_CACHE_KW: self.kvc})
            best = min(best, time.perf_counter() - t0)
        self.kvc.reset()
        return best

    def _timed_decode(self, context: int, tokens: int, reps: int) -> float:
        """Best of ``reps`` wall times of generating ``tokens`` after a ``context``-token prefill,
        the prefill's own time taken off (measured alone)."""
        ids = np.arange(4, 4 + context) % int(self.model.config.vocab_size)
        speed, self.speed = self.speed, None
        best = float("inf")
        try:
            for _ in range(reps):
                self.reset()
                t0 = time.perf_counter()
                self.compute(ids, tokens + 1, "", 0)
                best = min(best, time.perf_counter() - t0)
        finally:
            self.speed = speed
            self.reset()
        return max(0.0, best - self._timed_prefill(context, 0, reps)) / tokens

    def calibrate(self, max_context: int, reps: int = 3, seed: int = 0, attempts: int = 3,
                  good_error: float = 0.2) -> tuple[ComputeModel, dict[str, Any]]:
        """:meth:`calibrate_once` until its held-out error's median is within ``good_error``, at
        most ``attempts`` times; the attempt with the smallest held-out error is kept. On a busy
        machine one burst of other work during the grid can leave a fit that is off by half."""
        best: tuple[ComputeModel, dict[str, Any]] | None = None
        errors = []
        for i in range(attempts):
            cm, info = self.calibrate_once(max_context, reps, seed + i)
            errors.append(info["held_out_error_median"])
            if best is None or info["held_out_error_median"] < best[1]["held_out_error_median"]:
                best = (cm, info)
            if info["held_out_error_median"] <= good_error:
                break
        assert best is not None
        best[1]["attempts_held_out_error_median"] = errors
        return best

    def calibrate_once(self, max_context: int, reps: int = 3, seed: int = 0) -> tuple[ComputeModel, dict[str, Any]]:
        """Time prefills on a grid of (new, cached) tokens and decodes at a few context lengths,
        fit a :class:`ComputeModel`, and measure its error on held-out points (Note [Calibrated
        compute])."""
        top = max(32, min(max_context, self.kvc.max_tokens - 24))
        news = sorted({n for n in (16, 64, 256, 1024) if n < top} | {min(top // 2, 1024)})
        cacheds = sorted({c for c in (0, top // 4, top // 2) if c + 16 < top})
        grid = [(n, c) for c in cacheds for n in news if n + c <= top]
        y = np.array([self._timed_prefill(n, c, reps) for n, c in grid])
        coef = _fit_nonneg(ComputeModel.features([g[0] for g in grid], [g[1] for g in grid]), y)
        ctxs = sorted({16, top // 4, top // 2})
        dec = np.array([self._timed_decode(c, 8, reps) for c in ctxs])
        dcoef = _fit_nonneg(np.stack([np.ones(len(ctxs)), np.asarray(ctxs, dtype=float)], axis=1), dec)
        cm = ComputeModel(list(coef), list(dcoef))
        # Held out: points off the grid, drawn once per seed, measured the same way.
        rng = np.random.default_rng(seed)
        held = []
        for _ in range(4):
            c = int(rng.integers(0, max(1, top * 3 // 4)))
            n = int(rng.integers(8, max(9, min(top - c, 768))))
            wall = self._timed_prefill(n, c, reps)
            held.append({"new": n, "cached": c, "measured_s": wall, "modelled_s": cm.prefill_s(n, c),
                         "error": cm.prefill_s(n, c) / wall - 1 if wall > 0 else 0.0})
        fit_err = [abs(cm.prefill_s(n, c) / t - 1) for (n, c), t in zip(grid, y) if t > 0]
        errs = [abs(h["error"]) for h in held]
        info = {**cm.as_dict(), "grid": [{"new": n, "cached": c, "measured_s": float(t)} for (n, c), t in zip(grid, y)],
                "decode_grid": [{"context": c, "s_per_token": float(t)} for c, t in zip(ctxs, dec)],
                "fit_error_median": float(np.median(fit_err)) if fit_err else 0.0,
                "held_out": held, "held_out_error_median": float(np.median(errs)),
                "held_out_error_max": float(np.max(errs)), "reps": reps}
        return cm, info

    def decode_s_per_token(self, prompt: int = 64, tokens: int = 16) -> float:
        """Measured time per generated token after a ``prompt``-token prefill (best of 3)."""
        import torch

        ids = torch.arange(4, 4 + prompt).remainder(int(self.model.config.vocab_size)).unsqueeze(0)
        best = float("inf")
        for _ in range(3):
            self.kvc.reset()
            t0 = time.perf_counter()
            self.compute(ids[0].numpy(), tokens + 1, "", 0)
            best = min(best, time.perf_counter() - t0)
        self.kvc.reset()
        return max(0.0, best - prompt * self.prefill_s_per_token(prompt, 1)) / tokens


GENERATORS = ("agent", "coding-agent")


def load_workload(path: str | None, vocab: int, seed: int, traces: int, gap_scale: float,
                  generator: str = "agent") -> list[Trace]:
    """The replay's workload: a JSONL file, or a generated one (``generator``: ``agent``, the
    default workload, or ``coding-agent``, Note [Coding-agent workload]); gaps scaled (Note
    [Replay load])."""
    if path is None:
        if generator not in GENERATORS:
            raise InvalidArgumentError(f"unknown workload generator {generator!r}; choose from {', '.join(GENERATORS)}")
        if generator == "coding-agent":
            return wl.coding_agent_workload(vocab, seed=seed, traces=traces, gap_scale=gap_scale)
        return wl.default_workload(vocab, seed=seed, traces=traces, gap_scale=gap_scale)
    return wl.scale_gaps(wl.load(path, vocab_size=vocab), gap_scale)  # kvtier's JSONL or Mooncake's


def run(model_dir: str | None = None, workload: str | None = None, policies: list[str] | None = None,
        json_path: str | None = None, plot_path: str | None = None, device_budget: int | None = None,
        dram_budget: int | None = None, nvme_dir: str | None = None, nvme_budget: int | None = None,
        seed: int = 0, traces: int = 8, progress: bool = True, torch_threads: int | None = None,
        compute_time: str = "calibrated", gap_scale: float = 0.1, generator: str = "agent") -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    chosen = check_policies(policies) if policies else [DEFAULT_POLICY]
    if compute_time not in ("measured", "calibrated"):
        raise InvalidArgumentError(f"compute_time must be 'measured' or 'calibrated', got {compute_time!r}")
    if model_dir is None:
        cache_dir = Path(os.environ.get("KVTIER_CACHE_DIR", Path.home() / ".cache" / "kvtier"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        model_path = build_default_model(cache_dir / "small-llama-kv-v3", seed=0)
        model_name = ("built-in small-llama-kv-v3 (6 layers, hidden 256, 8 KV heads x 256: 96 KiB of KV per token, "
                      "random weights)")
    else:
        model_path = Path(model_dir)
        model_name = str(model_path)
    model = load_model(model_path)
    # Compute threads: half the cores by default. A parallel region waits for its slowest thread, so
    # on a small shared machine one busy core can stretch a step tenfold; the other half is left
    # for kvtier's copy and I/O threads.
    import torch

    if torch_threads is not None and torch_threads < 1:
        raise InvalidArgumentError(f"torch_threads must be >= 1, got {torch_threads}")
    threads = torch_threads or max(1, (os.cpu_count() or 2) // 2)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    vocab = int(model.config.vocab_size)
    trs = load_workload(workload, vocab, seed, traces, gap_scale, generator)
    gen_name = "default" if generator == "agent" else generator
    workload_name = (f"{gen_name}(seed={seed}, traces={traces})" if workload is None else str(workload)) + (
        f", gaps x{gap_scale:g}" if gap_scale != 1 else "")
    by_id = {t.trace_id: t for t in trs}
    max_ctx = max(wl.context_tokens(by_id, t, k) for t in trs for k in range(len(t.steps)))
    max_tokens = (max_ctx // BLOCK_TOKENS + 2) * BLOCK_TOKENS
    # Budgets: by default the device tier holds 1/16 of the workload's KV and DRAM 1/8, so reuse
    # depends on what survives below it.
    from kvtier.integrations.transformers import KvtierCache

    layout = KvtierCache(model.config, max_tokens=BLOCK_TOKENS, block_tokens=BLOCK_TOKENS, dtype=model.dtype).layout
    unique_tokens = sum(len(s.append) + s.generate for t in trs for s in t.steps)
    workload_kv = unique_tokens * layout.token_bytes
    device_budget = device_budget or max(layout.block_bytes * 4, workload_kv // 16)
    dram_budget = dram_budget or max(layout.block_bytes * 16, workload_kv // 8)
    nvme_budget = nvme_budget or max(layout.block_bytes * 16, workload_kv * 2)
    own_nvme = nvme_dir is None
    nvme_base = nvme_dir or tempfile.mkdtemp(prefix="kvtier-replay-", dir=os.getcwd())
    steps_total = sum(len(t.steps) for t in trs) * len(chosen)
    salt = kvtier.keys.make_salt(str(getattr(model.config, "_name_or_path", "model")), layout, kind="transformers")
    results: dict[str, Any] = {}
    cost = None
    speed_ex = ModelExecutor(model, max_tokens)
    model_speed = {"prefill_s_per_token": speed_ex.prefill_s_per_token(),
                   "decode_s_per_token": speed_ex.decode_s_per_token()}
    compute_model, compute_info = speed_ex.calibrate(max_ctx, seed=seed)
    del speed_ex
    try:
        def make_cache(policy: str) -> kvtier.TieredCache:
            if policy == "device-lru":
                return kvtier.TieredCache(layout, salt, device_bytes=device_budget)
            pdir = os.path.join(nvme_base, policy)
            shutil.rmtree(pdir, ignore_errors=True)
            return kvtier.TieredCache(layout, salt, device_bytes=device_budget, dram_bytes=dram_budget,
                                      nvme_dir=pdir, nvme_bytes=nvme_budget)

        replays = {}
        for p in chosen:
            ex = ModelExecutor(model, max_tokens, compute_model if compute_time == "calibrated" else None)
            if p in TRACE_POLICIES and cost is None:
                # The cost model: this model's measured prefill time per token, this machine's tiers.
                probe = make_cache("calibrate")
                try:
                    cost = calibrate(probe, model_speed["prefill_s_per_token"])
                finally:
                    probe.close()
                    shutil.rmtree(os.path.join(nvme_base, "calibrate"), ignore_errors=True)
            # each trace policy learns on its own copy of the cost model (observe_recompute)
            own_cost = None if cost is None else copy.deepcopy(cost)
            replays[p] = PolicyReplay(PolicyRunner(p, ex, make_cache, own_cost), trs)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TimeElapsedColumn(), console=console, disable=not progress, transient=True) as bar:
            task = bar.add_task(f"replay: {', '.join(chosen)} (interleaved)", total=steps_total)
            active = list(replays)
            while active:
                for p in list(active):
                    before = replays[p].steps_done
                    if replays[p].step():
                        bar.advance(task, replays[p].steps_done - before)
                    else:
                        active.remove(p)
        for p in chosen:
            results[p] = replays[p].report()
            replays[p].runner.close()
    finally:
        torch.set_num_threads(prev_threads)
        if own_nvme:
            shutil.rmtree(nvme_base, ignore_errors=True)
    ref = next(iter(results.values()))["tokens"]
    identical = all(r["tokens"] == ref for r in results.values())
    report = {
        "model": model_name, "workload": workload_name,
        "config": {"block_tokens": BLOCK_TOKENS, "device_budget_bytes": device_budget, "dram_budget_bytes": dram_budget,
                   "nvme_budget_bytes": nvme_budget, "workload_kv_bytes": workload_kv, "traces": len(trs),
                   "steps": sum(len(t.steps) for t in trs), "seed": seed, "vocab_size": vocab,
                   "workload_file": None if workload is None else str(Path(workload).resolve()),
                   "workload_roots": traces, "torch_threads": threads, "compute_time": compute_time,
                   "gap_scale": gap_scale, "generator": generator},
        "model_speed": model_speed,
        "compute_model": compute_info,
        "time_model": "virtual: measured step service times on this machine, virtual tool gaps and arrivals; "
                      "every policy's moves between tiers timed on the copy lanes (Note [Background moves] in kvtier.trace)",
        "tokens_identical": identical,
        "policies": results,
        "title": f"kvtier replay (gaps x{gap_scale:g}, {compute_time} compute)",
    }
    render_table(results, f"kvtier replay: {len(trs)} traces, {report['config']['steps']} steps, "
                          f"device budget {device_budget / 2**20:.1f} MiB, gaps x{gap_scale:g}, "
                          f"{compute_time} compute")
    if len(results) > 1:
        console.print("generated tokens identical across policies: "
                      + ("[green]yes[/green]" if identical else "[red]NO[/red]"))
    else:
        console.print("one policy replayed: --policy all compares them (and checks their tokens agree)")
    save_report(report, json_path, plot_path, console)
    if not identical:
        raise kvtier.KvtierError("policies generated different tokens: the cache changed the model's outputs")
    return report
