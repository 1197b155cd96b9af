"""``kvtier bench copy``: block gather/scatter throughput against the machine's best contiguous copy.

For each case, the same number of bytes is moved four ways in one run, interleaved, ``reps``
times: kvtier's copy engine (random block ids, real KV layouts), and three copies of one
contiguous buffer of the same size (Note [Copy anchor]). Every buffer (KV tensors, pool, anchor
buffers) is pre-faulted and on transparent huge pages where the kernel gives them, so the
comparison is about the copy, not about page faults or TLB reach. The ratio is kvtier / anchor.

Note [Copy anchor]: the anchor is the best contiguous copy of the same bytes this machine does,
measured in the same run: ``memcpy`` on one thread, ``memcpy`` split over the engine's threads,
and a copy with streaming (non-temporal) stores split over the engine's threads (the store kind
kvtier's own engine uses for large batches, ``_core.timed_stream_copy``). Each is reported; the
one with the best median is the anchor. Against memcpy alone a gather that streams could score
well above 1.0 on a machine where glibc's memcpy does not stream at this size (the ratios of
1.0-1.8 seen before), which says nothing about the gather. With the best of the three, 1.0 means
gathering scattered runs is as fast as copying one contiguous buffer can be here.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import kvtier
from kvtier import _core
from kvtier.harness.benchmarks import machine_info


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    kv_heads: int
    head_dim: int


# KV shapes from real model configurations (config.json of each model).
LLAMA3_8B = ModelShape("llama3-8b", num_layers=32, kv_heads=8, head_dim=128)
QWEN2_05B = ModelShape("qwen2-0.5b", num_layers=24, kv_heads=2, head_dim=64)


@dataclass(frozen=True)
class Case:
    name: str
    model: ModelShape
    kind: str | None  # KV layout kind; None for a DRAM -> DRAM pool copy
    direction: str  # "gather" (KV -> DRAM), "scatter" (DRAM -> KV), "copy" (DRAM -> DRAM)


CASES = [
    Case("llama3-8b vllm_flash gather", LLAMA3_8B, "vllm_flash", "gather"),
    Case("llama3-8b vllm_flash scatter", LLAMA3_8B, "vllm_flash", "scatter"),
    Case("llama3-8b kv_first gather", LLAMA3_8B, "kv_first", "gather"),
    Case("llama3-8b kv_first scatter", LLAMA3_8B, "kv_first", "scatter"),
    Case("qwen2-0.5b vllm_flash gather", QWEN2_05B, "vllm_flash", "gather"),
    Case("qwen2-0.5b vllm_flash scatter", QWEN2_05B, "vllm_flash", "scatter"),
    Case("qwen2-0.5b kv_first gather", QWEN2_05B, "kv_first", "gather"),
    Case("llama3-8b dram copy", LLAMA3_8B, None, "copy"),
]

# numpy has no bfloat16; float16 has the same size, and copies move bytes, not numbers.
_STORAGE_DTYPE = "float16"


def _layout(model: ModelShape, block_tokens: int) -> kvtier.KVLayout:
    return kvtier.KVLayout(model.num_layers, model.kv_heads, model.head_dim, block_tokens, _STORAGE_DTYPE)


def _alloc_kv(layout: kvtier.KVLayout, kind: str, num_blocks: int) -> list[np.ndarray]:
    lk = kvtier.LAYOUT_KINDS[kind]
    shape = lk.expected_shape(layout, num_blocks)
    count = layout.num_layers if lk.per_layer else 1
    # np.ones touches every page now, so no page faults land inside a timed copy.
    return [np.ones(shape, dtype=np.float16) for _ in range(count)]


def run_case(case: Case, size_bytes: int, reps: int, engine: kvtier.CopyEngine, block_tokens: int,
             rng: np.random.Generator, tick: Callable[[], None]) -> dict[str, Any]:
    layout = _layout(case.model, block_tokens)
    n = max(1, size_bytes // layout.block_bytes)
    nbytes = n * layout.block_bytes
    pool = kvtier.HostPool(layout, num_blocks=2 * n if case.kind is None else n)
    pool_ids = pool.allocate(pool.num_blocks)
    rng.shuffle(pool_ids)
    if case.kind is None:
        src, src_ids, dst, dst_ids = pool, pool_ids[:n], pool, pool_ids[n:]
    else:
        kv = _alloc_kv(layout, case.kind, 2 * n)
        reg = kvtier.register_kv(kv, layout, case.kind)
        kv_ids = rng.permutation(2 * n)[:n].astype(np.int32)
        if case.direction == "gather":
            src, src_ids, dst, dst_ids = reg, kv_ids, pool, pool_ids
        else:
            src, src_ids, dst, dst_ids = pool, pool_ids, reg, kv_ids
    # The anchor's buffers get what kvtier's memory gets: one pre-faulted arena each, on
    # transparent huge pages (registered KV is collapsed onto huge pages by register_kv).
    a_pool, b_pool = kvtier.HostPool(nbytes, num_blocks=1), kvtier.HostPool(nbytes, num_blocks=1)
    a, b = a_pool.view()[0], b_pool.view()[0]
    a[:] = 1

    def kvtier_once() -> float:
        h = engine.transfer(src, src_ids, dst, dst_ids)
        h.wait()
        return h.latency_s

    kvtier_once()  # warm-up: thread pool, plan cache
    _core.timed_memcpy(b, a, 1)
    _core.timed_stream_copy(b, a, engine.threads)
    nt = engine.threads
    anchors: dict[str, tuple[str, Callable[[], float]]] = {
        "memcpy_1t": ("memcpy, 1 thread", lambda: _core.timed_memcpy(b, a, 1)),
        "memcpy_mt": (f"memcpy, {nt} threads", lambda: _core.timed_memcpy(b, a, nt)),
        "stream_mt": (f"streaming-store copy, {nt} threads", lambda: _core.timed_stream_copy(b, a, nt)),
    }
    samples: dict[str, list[float]] = {"kvtier": [], **{k: [] for k in anchors}}
    for _ in range(reps):
        for k, (_, fn) in anchors.items():  # kvtier runs between the anchors: drift lands on all
            samples[k].append(fn())
            if k == "memcpy_1t":
                samples["kvtier"].append(kvtier_once())
        tick()
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in samples.items()}
    anchor = max(anchors, key=lambda k: gbps[k])
    return {
        "case": case.name,
        "kvtier_gbps": round(gbps["kvtier"], 3),
        "anchor": f"{anchor}: {anchors[anchor][0]}, contiguous (the best of {', '.join(anchors)})",
        "anchor_kind": anchor,
        "anchor_gbps": round(gbps[anchor], 3),
        "ratio": round(gbps["kvtier"] / gbps[anchor], 3),
        "memcpy_1t_gbps": round(gbps["memcpy_1t"], 3),
        "memcpy_mt_gbps": round(gbps["memcpy_mt"], 3),
        "stream_mt_gbps": round(gbps["stream_mt"], 3),
        "ratio_vs": {k: round(gbps["kvtier"] / gbps[k], 3) for k in anchors},
        "layout": case.kind or "dram pool",
        "direction": case.direction,
        "block_bytes": layout.block_bytes,
        "runs_per_block": None if case.kind is None else reg.num_segments,
        "kv_huge_pages": None if case.kind is None else reg.huge_pages,
        "pool_pages": pool.page_mode,
        "blocks": n,
        "bytes": nbytes,
        "threads": engine.threads,
        "reps": reps,
        "samples_s": {k: [round(x, 6) for x in v] for k, v in samples.items()},
    }


def run(size_mib: int = 512, reps: int = 7, threads: int | None = None, block_tokens: int = 16,
        cases: str | None = None, seed: int = 0, json_path: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=True)
    selected = [c for c in CASES if cases is None or cases in c.name]
    if not selected:
        raise kvtier.InvalidArgumentError(f"no copy case matches {cases!r}; cases: {[c.name for c in CASES]}")
    rng = np.random.default_rng(seed)
    engine = kvtier.CopyEngine(threads=threads)
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("bench copy", total=len(selected) * reps)
        for case in selected:
            bar.update(task, description=f"bench copy: {case.name}")
            results.append(run_case(case, size_mib << 20, reps, engine, block_tokens, rng,
                                    lambda: bar.advance(task)))
    report = {"suite": "copy", "machine": machine_info(),
              "config": {"size_mib": size_mib, "reps": reps, "threads": engine.threads,
                         "block_tokens": block_tokens, "seed": seed},
              "results": results}
    table = Table(title=f"kvtier bench copy ({size_mib} MiB per transfer, median of {reps}, "
                        f"{engine.threads} copy threads)")
    for col in ("case", "block", "runs", "kvtier GB/s", "memcpy 1t", f"memcpy {engine.threads}t",
                f"stream {engine.threads}t", "anchor", "ratio"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in results:
        style = "green" if r["ratio"] >= 0.95 else "red"
        table.add_row(r["case"], f"{r['block_bytes'] >> 10} KiB", str(r["runs_per_block"] or 1),
                      f"{r['kvtier_gbps']:.2f}", f"{r['memcpy_1t_gbps']:.2f}", f"{r['memcpy_mt_gbps']:.2f}",
                      f"{r['stream_mt_gbps']:.2f}", r["anchor_kind"], f"[{style}]{r['ratio']:.2f}x[/{style}]")
    Console().print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        console.print(f"wrote {json_path}")
    engine.close()
    return report
