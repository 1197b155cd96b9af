"""``kvtier simulate``: the cache policies at fleet scale, on a modelled GPU server, in virtual time.

SIMULATION. Nothing here runs a model or moves bytes. The workload goes through the same code as
``kvtier replay``: :mod:`kvtier.harness.driver`'s event loop and :class:`~kvtier.harness.driver.PolicyRunner`,
:class:`~kvtier.TieredCache` with its C++ :class:`BlockIndex` (LRU, pins, trace refcounts) and
:class:`~kvtier.TraceManager` with :class:`~kvtier.policy.TraceAwarePolicy`. Only the backend is
modelled: the tiers' pools hand out block ids without memory, a transfer takes
``bytes / bandwidth`` of its link, a step's prefill takes ``tokens / prefill throughput`` and its
decode ``tokens / decode speed``, beside other steps (continuous batching).

The fleet is ``servers`` identical servers; each root trace goes to the server with the fewest
traces so far, and a subagent to its parent's server. $ per task is the price of the server time
a task takes under the policy, at the utilisation a server sustains (Note [Sustained throughput]
in :mod:`kvtier.harness.driver`): ``$/h / tasks per server-hour``, not a fixed run's makespan, which one
long trace sets. JCT is per task (a root trace and its subagents) and per subagent apart.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from kvtier.cache import DEVICE, TieredCache
from kvtier.harness.driver import (
    UTILISATION,
    PolicyReplay,
    PolicyRunner,
    StepResult,
    check_policies,
    jct_stats,
    render_table,
    save_report,
    sustained,
    task_jcts,
)
from kvtier.errors import InvalidArgumentError, OutOfCapacityError
from kvtier.layout import KVLayout
from kvtier.memory import as_block_ids
from kvtier.policy import CostModel
from kvtier.harness.workload import Trace, coding_agent_workload, default_workload

__all__ = ["PRESETS", "ServerModel", "fleet_workload", "simulate"]


@dataclass(frozen=True)
class ServerModel:
    """One GPU server, as the simulator sees it. Capacities are what is left for KV blocks."""

    name: str
    hbm_kv_gib: float  # HBM for KV: the cache's device tier, shared with the decode batch (decode_kv_gib)
    dram_kv_gib: float  # pinned host memory for KV
    nvme_kv_gib: float  # local NVMe for KV
    pcie_gbps: float  # GB/s, host <-> device, each way
    hbm_gbps: float  # GB/s, device <-> device copies
    nvme_read_gbps: float
    nvme_write_gbps: float
    network_gbps: float  # GB/s to other servers (reported; no remote tier yet)
    prefill_tokens_per_s: float  # the part of prefill that grows with new tokens only (linear layers)
    decode_tokens_per_s: float  # per sequence, at the server's usual batch, short context
    kv_bytes_per_token: int
    dollars_per_hour: float
    model: str = ""
    serial_decode: bool = False  # decode on the prefill resource (an engine without batching: the replay)
    # Note [Attention compute]: a prefill of n new tokens after c cached ones also computes
    # attention over n * c + n^2 / 2 token pairs, attn_flops_per_pair each (4 x layers x query heads
    # x head dim: QK^T and PV, a multiply-add each), at attention_tflops; a decoded token reads the
    # KV of its context from HBM at hbm_gbps. 0 leaves attention out (linear compute).
    attn_flops_per_pair: float = 0.0
    attention_tflops: float = 0.0
    # Note [Decode capacity]: the usual decode batch needs decode_kv_share of the KV HBM for its
    # running sequences. Cached KV that the LRU may evict costs it nothing (the engine takes those
    # blocks back), but KV held pinned between steps (a trace kept through its tool gap) does: when
    # hbm_kv - pinned < the batch's need, the batch shrinks to what fits and each sequence's decode
    # slows by need / (hbm_kv - pinned).
    decode_kv_share: float = 0.0
    # GB/s at which a decoded token reads its context's KV (Note [Attention compute]); 0: hbm_gbps
    decode_read_gbps: float = 0.0
    prefill_overhead_s: float = 0.0  # fixed cost of a prefill call (a replay's measured intercept)

    def __post_init__(self) -> None:
        optional = ("network_gbps", "serial_decode", "attn_flops_per_pair", "attention_tflops", "decode_kv_share",
                    "decode_read_gbps", "prefill_overhead_s")
        for k, v in asdict(self).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in optional and not v > 0:
                raise InvalidArgumentError(f"server model {self.name!r}: {k} must be > 0, got {v!r}")
            if k in optional and isinstance(v, (int, float)) and not isinstance(v, bool) and not v >= 0:
                raise InvalidArgumentError(f"server model {self.name!r}: {k} must be >= 0, got {v!r}")
        if (self.attn_flops_per_pair > 0) != (self.attention_tflops > 0):
            raise InvalidArgumentError(f"server model {self.name!r}: attn_flops_per_pair and attention_tflops "
                                       "go together (both 0, or both > 0)")
        if not self.decode_kv_share < 1:
            raise InvalidArgumentError(f"server model {self.name!r}: decode_kv_share must be in [0, 1), "
                                       f"got {self.decode_kv_share!r}")

    def prefill_s(self, new: int, cached: int) -> float:
        """Seconds to prefill ``new`` tokens after ``cached`` (Note [Attention compute])."""
        if new <= 0:
            return 0.0
        s = self.prefill_overhead_s + new / self.prefill_tokens_per_s
        if self.attention_tflops > 0:
            s += self.attn_flops_per_pair * (new * cached + new * new / 2) / (self.attention_tflops * 1e12)
        return s

    def decode_s(self, tokens: int, context: int, pinned_kv_gib: float = 0.0) -> float:
        """Seconds for one sequence to decode ``tokens`` after ``context`` tokens (Note [Decode
        capacity] for ``pinned_kv_gib``)."""
        if tokens <= 0:
            return 0.0
        s = tokens / self.decode_tokens_per_s
        if self.attention_tflops > 0:  # each token reads its context's KV once
            read = self.decode_read_gbps or self.hbm_gbps
            s += tokens * (context + tokens / 2) * self.kv_bytes_per_token / (read * 1e9)
        if self.decode_kv_share > 0:
            need = self.decode_kv_share * self.hbm_kv_gib
            s *= max(1.0, need / max(self.hbm_kv_gib - pinned_kv_gib, need / 64))
        return s


# Note [Preset sources]: every figure of a preset, and where it comes from (docs/traces.md has the
# same table). Change any with --set key=value.
#   pcie_gbps: measured, not the link's nominal 64 GB/s (gen 5) or 32 GB/s (gen 4): kvtier's own
#     HBM <-> pinned DRAM copies on an H200 over PCIe gen 5 x16 ran at 48.6-50.0 GB/s, cudaMemcpy
#     at 54-55 GB/s (docs/benchmarks.md, "GPU: bench/bench_gpu.py", 2026-11-28); we take 50. The
#     H100 SXM boards of the presets sit on the same gen 5 x16 host link (NVIDIA H100 datasheet).
#   hbm_gbps: device-to-device copies at about 60% of the HBM's nominal bandwidth (H100 SXM 3.35
#     TB/s, H200 4.8 TB/s, NVIDIA datasheets); kvtier's own HBM -> HBM copies reached 0.75-1.36
#     TB/s on the H200 and cudaMemcpy ~2.0 TB/s (docs/benchmarks.md), so 2000 / 2000 for copies.
#   nvme_read_gbps / nvme_write_gbps: a PCIe gen 4 data-centre drive's sequential 128 KiB figures
#     from its data sheet (Samsung PM9A3 3.84 TB: 6.9 GB/s read, 4.1 GB/s write; Kioxia CM6 is
#     similar), rounded down to 6.5 / 3.5 for a file system on top; the 32B preset's server
#     stripes two such drives.
#   prefill_tokens_per_s / attention_tflops (assumed, from public figures): Llama-3-8B bf16 is ~16
#     GFLOP per token in its linear layers (2 x 8.0 B parameters); 12k tokens/s is ~20% of an H100
#     SXM's 989 dense bf16 TFLOP/s (datasheet), a conservative utilisation for mixed serving
#     batches; the H200 has the same compute, so x1.3 there only for its faster HBM (4.8 vs 3.35
#     TB/s) on the memory-bound share. attention_tflops 350 (H100) / 400 (H200): below the
#     500-740 TFLOP/s bf16 forward FlashAttention-3 reports on H100 for long sequences, for the
#     variable-length batches of serving.
#   attn_flops_per_pair: from the model's shape, 4 x layers x query heads x head dim (Llama-3-8B:
#     4 x 32 x 32 x 128 = 524,288; Qwen2.5-32B: 4 x 64 x 40 x 128 = 1,310,720).
#   decode_tokens_per_s: per sequence at a batch of 32-64 (vLLM's 8B serving benchmarks on H100:
#     ~30-50 tokens/s per user at that load: an assumption, not a measurement); decode_kv_share:
#     that batch's KV, 48 sequences x 4k tokens x 128 KiB = 24 GiB, over the HBM left for KV
#     (hbm_kv_gib: 80 GiB - 16 GiB of weights - activations leaves ~56 GiB on an H100, 141 GiB
#     leaves ~115 GiB on an H200; H100/H200 datasheets for 80 / 141 GB).
#   dollars_per_hour (assumed): on-demand per-GPU prices at specialised GPU clouds, 2025 (H100
#     SXM ~$3/h, H200 ~$3.7/h); the 2-GPU 32B server twice the H100's.
#   prefill_overhead_s: 0 in the presets (a GPU engine batches prefills; set for a replay's machine).
#   decode_read_gbps: left 0 in the presets, so a decoded token reads its context's KV at hbm_gbps
#     (the measured copy bandwidth, below the datasheets' 3.35 / 4.8 TB/s: conservative).
#   kv_bytes_per_token: from the model's shape, 2 (K and V) x layers x KV heads x head dim x 2 bytes.
#   network_gbps: 100 / 200 Gb/s NICs (unused: no remote tier yet).
#   hbm_kv_gib: the GPU's HBM (H100 SXM 80 GB, H200 141 GB: datasheets) less the weights (16 GB
#     for 8B bf16, 64 GB over two GPUs for 32B) and ~8 GB of activations and CUDA graphs.
#   dram_kv_gib / nvme_kv_gib (assumed server builds): 2 TB of host DRAM per 8-GPU node is usual
#     for H100/H200 nodes (DGX H100: 2 TB), so 256 GiB per GPU pinned for KV on an H100, 512 GiB
#     on the H200 node's larger builds; NVMe: a 3.84 TB data-centre drive per GPU (DGX H100 ships
#     8 x 3.84 TB U.2 for data), 2 TB of it for KV; 4 TB on the H200 and the 2-GPU server.
PRESETS: dict[str, ServerModel] = {
    "h100-llama3-8b": ServerModel(
        name="h100-llama3-8b", model="Llama-3-8B bf16 (32 layers, 32 query / 8 KV heads x 128), 1 H100 SXM",
        hbm_kv_gib=56, dram_kv_gib=256, nvme_kv_gib=2000, pcie_gbps=50, hbm_gbps=2000, nvme_read_gbps=6.5,
        nvme_write_gbps=3.5, network_gbps=12.5, prefill_tokens_per_s=12000, decode_tokens_per_s=40,
        kv_bytes_per_token=131072, dollars_per_hour=3.0, attn_flops_per_pair=524288, attention_tflops=350,
        decode_kv_share=0.43),
    "h200-llama3-8b": ServerModel(
        name="h200-llama3-8b", model="Llama-3-8B bf16 (32 layers, 32 query / 8 KV heads x 128), 1 H200 SXM",
        hbm_kv_gib=115, dram_kv_gib=512, nvme_kv_gib=4000, pcie_gbps=50, hbm_gbps=2000, nvme_read_gbps=6.5,
        nvme_write_gbps=3.5, network_gbps=25, prefill_tokens_per_s=15600, decode_tokens_per_s=52,
        kv_bytes_per_token=131072, dollars_per_hour=3.7, attn_flops_per_pair=524288, attention_tflops=400,
        decode_kv_share=0.21),
    "h100-qwen2.5-32b": ServerModel(
        name="h100-qwen2.5-32b", model="Qwen2.5-32B bf16 (64 layers, 40 query / 8 KV heads x 128), 2 H100 SXM",
        hbm_kv_gib=90, dram_kv_gib=512, nvme_kv_gib=4000, pcie_gbps=100, hbm_gbps=4000, nvme_read_gbps=13,
        nvme_write_gbps=7, network_gbps=25, prefill_tokens_per_s=5000, decode_tokens_per_s=30,
        kv_bytes_per_token=262144, dollars_per_hour=6.0, attn_flops_per_pair=1310720, attention_tflops=700,
        decode_kv_share=0.53),
}


# ------------------------------------------------------------------------------- modelled backend


class _Handle:
    """A finished transfer: what TieredCache reads from a real handle."""

    __slots__ = ("block_ok", "bytes", "latency_s", "num_blocks")

    def __init__(self, nbytes: int, seconds: float, n: int, ok: np.ndarray | None = None) -> None:
        self.bytes, self.latency_s, self.num_blocks, self.block_ok = nbytes, seconds, n, ok

    def wait(self, timeout: float | None = None) -> None:
        return None

    def done(self) -> bool:
        return True


class ModelPool:
    """Block ids of a tier without memory behind them."""

    def __init__(self, kind: str, num_blocks: int, block_bytes: int) -> None:
        if num_blocks < 1:
            raise InvalidArgumentError(f"the {kind} tier would hold no block")
        self.kind, self.num_blocks, self.block_bytes = kind, num_blocks, block_bytes
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int32)
        self._n = num_blocks

    @property
    def free_blocks(self) -> int:
        return self._n

    def allocate(self, n: int) -> np.ndarray:
        if n > self._n:
            raise OutOfCapacityError(f"the {self.kind} tier has {self._n} free blocks, {n} requested")
        self._n -= n
        return self._free[self._n:self._n + n][::-1].copy()

    def free(self, ids: Any) -> None:
        ids = as_block_ids(ids)
        if self._n + len(ids) > self.num_blocks:
            raise InvalidArgumentError(f"the {self.kind} tier: more blocks freed than allocated")
        self._free[self._n:self._n + len(ids)] = ids[::-1]
        self._n += len(ids)


class ModelEngine:
    """Transfers that take ``bytes / bandwidth`` of their link; ``elapsed_s`` adds up a step's own.

    Note [Background moves] in kvtier/trace.py: moves between tiers (submitted by the cache's move
    queue, which clears ``charge_to_step`` meanwhile) are not the step's time: the queue books
    their modelled duration (the handle's ``latency_s``) on its lanes. A step's own transfers over
    PCIe or from NVMe are booked on the same lanes (``mover``), so they wait behind background
    moves and background moves behind them: both share the link's bandwidth.
    """

    _LANES = {("dram", "engine"): "in", ("engine", "dram"): "out"}

    def __init__(self, server: ServerModel, block_bytes: int) -> None:
        pcie, hbm = server.pcie_gbps * 1e9, server.hbm_gbps * 1e9
        self.bw = {("device", "engine"): hbm, ("engine", "device"): hbm, ("device", "dram"): pcie,
                   ("dram", "device"): pcie, ("dram", "engine"): pcie, ("engine", "dram"): pcie}
        self.block_bytes = block_bytes
        self.elapsed_s = 0.0
        self.charge_to_step = True
        self.mover: Any = None  # the cache's MoveQueue (its lanes and virtual time), set by simulate()
        self._step_at = self._cursor = float("-inf")
        self.shared_extra_s = 0.0  # step transfer time spent waiting behind background moves on a lane

    def charge(self, nbytes: int, bandwidth: float, lane: str | None = None) -> float:
        s = nbytes / bandwidth
        if not self.charge_to_step:  # a move: timed on its lane by the move queue
            return s
        if self.mover is not None:
            at = self.mover.at()
            if at != self._step_at:  # a new step (or call): its own transfers start at its time
                self._step_at = self._cursor = at
            if lane is not None:
                _, end = self.mover.lanes[lane].place(self._cursor, s)
                self.shared_extra_s += max(0.0, end - self._cursor - s)
                self.elapsed_s += end - self._cursor
                self._cursor = end
                return s
            self._cursor += s
        self.elapsed_s += s
        return s

    def transfer(self, src: Any, src_ids: Any, dst: Any, dst_ids: Any) -> _Handle:
        n = len(as_block_ids(src_ids))
        if n != len(as_block_ids(dst_ids)):
            raise InvalidArgumentError("source and destination block counts differ")
        nbytes = n * self.block_bytes
        link = (src.kind, dst.kind)
        return _Handle(nbytes, self.charge(nbytes, self.bw[link], self._LANES.get(link)), n)


class ModelNvme:
    """The NVMe tier's slots, counted; reads and writes take the disk's bandwidth."""

    def __init__(self, engine: ModelEngine, server: ServerModel, num_slots: int) -> None:
        self.engine, self.num_slots, self.used = engine, num_slots, 0
        self.rd, self.wr = server.nvme_read_gbps * 1e9, server.nvme_write_gbps * 1e9

    def write(self, keys: np.ndarray, ids: Any) -> _Handle:
        n = len(keys)
        if self.used + n > self.num_slots:
            raise OutOfCapacityError("the NVMe tier is full")
        self.used += n
        nbytes = n * self.engine.block_bytes
        return _Handle(nbytes, self.engine.charge(nbytes, self.wr, "out"), n, np.ones(n, dtype=bool))

    def read(self, keys: np.ndarray, ids: Any) -> _Handle:
        n = len(keys)
        nbytes = n * self.engine.block_bytes
        return _Handle(nbytes, self.engine.charge(nbytes, self.rd, "in"), n, np.ones(n, dtype=bool))

    def evict(self, keys: np.ndarray) -> int:
        self.used -= len(keys)
        return len(keys)

    def stats(self) -> dict[str, int]:
        return {"num_slots": self.num_slots, "used_slots": self.used}

    def close(self) -> None:
        pass


class ModelBackend:
    def __init__(self, server: ServerModel, layout: KVLayout) -> None:
        self.server, self.layout = server, layout
        self.engine = ModelEngine(server, layout.block_bytes)

    def make_pool(self, capacity: int, tier: int) -> ModelPool:
        return ModelPool("device" if tier == DEVICE else "dram", capacity // self.layout.block_bytes,
                         self.layout.block_bytes)

    def make_nvme(self, directory: str, staging: ModelPool, capacity: int) -> ModelNvme:
        return ModelNvme(self.engine, self.server, capacity // self.layout.block_bytes)


class ModelExecutor:
    """A step on the modelled server: synthetic greedy tokens (the same for every policy),
    prefill time for the tokens not loaded, decode beside other steps."""

    def __init__(self, server: ServerModel, backend: ModelBackend, vocab: int) -> None:
        self.server, self.engine, self.vocab = server, backend.engine, vocab
        self.registration = ModelPool("engine", 1, backend.layout.block_bytes)
        self.block_bytes = backend.layout.block_bytes
        self.pinned_blocks: Any = None  # () -> device blocks held pinned between steps (Note [Decode capacity])
        self._compute_s = 0.0
        self._cached = 0

    def reset(self) -> None:
        self._cached = 0

    def set_cached(self, tokens: int) -> None:
        self._cached = tokens

    def compute(self, ctx: np.ndarray, generate: int, trace_id: str, step: int) -> tuple[list[int], int, float]:
        self._compute_s += self.server.prefill_s(len(ctx) - self._cached, self._cached)
        seed = (zlib.crc32(trace_id.encode()), step)
        tokens = np.random.default_rng(seed).integers(4, self.vocab, size=generate).tolist()
        # the first token comes out of the prefill; Note [Decode capacity]: KV pinned on the device
        pinned = 0.0 if self.pinned_blocks is None else self.pinned_blocks() * self.block_bytes / 2**30
        decode = self.server.decode_s(generate - 1, len(ctx), pinned) + 1 / self.server.decode_tokens_per_s
        if self.server.serial_decode:
            self._compute_s += decode
            decode = 0.0
        return tokens, len(ctx) + generate - 1, decode

    def stopwatch(self) -> float:
        return self.engine.elapsed_s + self._compute_s


# ------------------------------------------------------------------------------- the fleet


def fleet_workload(traces: int, seed: int = 0, vocab: int = 32000) -> list[Trace]:
    """The default agent workload at production scale: 6k-token shared prefixes, 8-16 turns of
    200-1500-token tool results and 30-150-token outputs, every trace arriving within 10 minutes."""
    return default_workload(vocab, seed=seed, traces=traces, system_tokens=4096, tools_tokens=2048,
                            steps=(8, 16), first_append=(200, 800), append=(200, 1500), generate=(30, 150),
                            arrival_window_s=600.0)


def fleet_coding_workload(traces: int, seed: int = 0, vocab: int = 32000) -> list[Trace]:
    """The coding-agent workload (Note [Coding-agent workload]) at production scale: 4k-token
    system prompts, contexts to ~30k tokens before a compaction, 1-2.5k-token tool results."""
    return coding_agent_workload(vocab, seed=seed, traces=traces, system_tokens=4096, subagent_system_tokens=2048,
                                 first_append=(800, 1600), append=(1000, 2500), generate=(50, 200),
                                 compact_at=30000, summary_tokens=1500, arrival_window_s=600.0)


def _layout(server: ServerModel, block_tokens: int) -> KVLayout:
    # One "layer" of kv_bytes_per_token / 2 bytes per token for each of K and V, in uint8: the
    # policy code only ever sees block_bytes and block_tokens.
    return KVLayout(num_layers=1, kv_heads=1, head_dim=server.kv_bytes_per_token // 2, block_tokens=block_tokens,
                    dtype="uint8")


def _cost(server: ServerModel, layout: KVLayout) -> CostModel:
    pcie, nv_r, nv_w = server.pcie_gbps * 1e9, server.nvme_read_gbps * 1e9, server.nvme_write_gbps * 1e9
    return CostModel(layout.block_bytes, layout.block_tokens,
                     {"device->dram": pcie, "dram->device": pcie, "dram->engine": pcie,
                      "device->engine": server.hbm_gbps * 1e9, "dram->nvme": nv_w, "nvme->dram": nv_r},
                     1.0 / server.prefill_tokens_per_s, source=f"server model {server.name}")


def simulate(*, server: ServerModel | str = "h100-llama3-8b", servers: int = 2, traces: int = 1000,
             policies: list[str] | None = None, seed: int = 0, workload: list[Trace] | None = None,
             block_tokens: int = 64, hbm_kv_gib: float | None = None, json_path: str | None = None,
             plot_path: str | None = None, progress: bool = True, quiet: bool = False,
             vocab: int = 32000) -> dict[str, Any]:
    """Run every policy over the fleet; returns the report (also printed, and written as JSON)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if isinstance(server, str):
        if server not in PRESETS:
            raise InvalidArgumentError(f"unknown server model {server!r}; presets: {', '.join(PRESETS)}")
        server = PRESETS[server]
    if hbm_kv_gib is not None:
        server = replace(server, hbm_kv_gib=hbm_kv_gib)
    if servers < 1:
        raise InvalidArgumentError(f"servers must be >= 1, got {servers}")
    chosen = check_policies(policies)
    trs = workload if workload is not None else fleet_workload(traces, seed)
    layout = _layout(server, block_tokens)
    # Sticky placement: root traces to the least loaded server, subagents with their parent.
    home: dict[str, int] = {}
    load = [0] * servers
    for t in sorted(trs, key=lambda t: (t.fork_of is not None, t.arrival_s)):
        if t.fork_of is None:
            home[t.trace_id] = int(np.argmin(load))
            load[home[t.trace_id]] += 1
    by_id = {t.trace_id: t for t in trs}
    for t in trs:
        root = t
        while root.fork_of is not None:
            root = by_id[root.fork_of.trace_id]
        home[t.trace_id] = home[root.trace_id]
    groups = [[t for t in trs if home[t.trace_id] == s] for s in range(servers)]
    console = Console(stderr=True)
    gib = 1 << 30
    results: dict[str, Any] = {}
    t_wall = time.perf_counter()
    total_steps = sum(len(t.steps) for t in trs) * len(chosen)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task(f"simulate: {len(trs)} traces on {servers} servers", total=total_steps)
        for p in chosen:
            reports = []
            for group in groups:
                if not group:
                    continue
                backend = ModelBackend(server, layout)

                def make_cache(policy: str, backend: ModelBackend = backend) -> TieredCache:
                    dev = int(server.hbm_kv_gib * gib)
                    # Loads in one chunk: nothing waits on part of a modelled transfer.
                    if policy == "device-lru":
                        cache = TieredCache(layout, "sim", device_bytes=dev, backend=backend, load_chunk_blocks=1 << 20)
                    else:
                        cache = TieredCache(layout, "sim", device_bytes=dev, dram_bytes=int(server.dram_kv_gib * gib),
                                            nvme_dir="(modelled)", nvme_bytes=int(server.nvme_kv_gib * gib),
                                            backend=backend, load_chunk_blocks=1 << 20)
                    backend.engine.mover = cache.moves  # steps and moves share the lanes (Note [Background moves])
                    return cache

                ex = ModelExecutor(server, backend, vocab)
                runner = PolicyRunner(p, ex, make_cache, _cost(server, layout))
                if runner.traces is not None:  # leases hold a kept trace's blocks through its gap
                    ex.pinned_blocks = runner.traces.kept_blocks
                rp = PolicyReplay(runner, group)
                while rp.step():
                    bar.advance(task)
                rep = rp.report(keep_tokens=False)
                rep["shared_link_extra_s"] = backend.engine.shared_extra_s
                reports.append((rp, rep))
                runner.close()
            results[p] = _merge(reports, server, servers)
    wall = time.perf_counter() - t_wall
    report = {
        "kind": "SIMULATION (modelled server, virtual time; no model runs, no bytes move)",
        "server": asdict(server), "servers": servers, "traces": len(trs),
        "steps": sum(len(t.steps) for t in trs), "block_tokens": block_tokens, "seed": seed,
        "wall_s": wall, "policies": results, "model": f"simulated {server.name}", "title": "kvtier simulate (SIMULATION)",
        "time_axis": "simulated time",
    }
    if not quiet:
        render_table(results, f"kvtier simulate (SIMULATION): {len(trs)} traces, {servers} x {server.name}, "
                              f"HBM for KV {server.hbm_kv_gib:g} GiB per server")
        console.print(f"simulated in {wall:.1f} s wall time")
    save_report(report, json_path, plot_path, console)
    return report


def _merge(reports: list[tuple[PolicyReplay, dict[str, Any]]], server: ServerModel, servers: int) -> dict[str, Any]:
    task_jct: dict[str, float] = {}
    sub_jct: dict[str, float] = {}
    for rp, _ in reports:
        a, b = task_jcts(rp.traces, rp.start, rp.finish)
        task_jct.update(a)
        sub_jct.update(b)
    start = min(t.arrival_s for rp, _ in reports for t in rp.traces)
    end = max(max(rp.finish.values()) for rp, _ in reports)
    makespan = end - start
    tasks = len(task_jct)
    held = sustained(sum(float(np.sum(rp.service)) for rp, _ in reports), tasks, UTILISATION)
    out: dict[str, Any] = {
        "jct_s": jct_stats(list(task_jct.values())),
        "jct_subagents_s": jct_stats(list(sub_jct.values())),
        "makespan_s": makespan,
        "tasks_per_hour": tasks / makespan * 3600 if makespan > 0 else 0.0,  # of this run, on `servers` servers
        "sustained": held,
        # Note [Sustained throughput] in kvtier.harness.driver: the price of the server time a task takes
        "dollars_per_task": (server.dollars_per_hour / held["tasks_per_server_hour"]
                             if held["tasks_per_server_hour"] else 0.0),
        "prefill_tokens": {k: sum(r["prefill_tokens"][k] for _, r in reports) for k in ("computed", "total")},
        "hits": {k: sum(r["hits"][k] for _, r in reports) for k in ("device", "dram", "nvme")},
        "misses": sum(r.get("misses", 0) for _, r in reports),
        # step transfer time added by sharing PCIe/NVMe with background moves (Note [Background moves] in kvtier/trace.py)
        "shared_link_extra_s": sum(r.get("shared_link_extra_s", 0.0) for _, r in reports),
        "dropped_blocks": sum(r.get("dropped_blocks", 0) for _, r in reports),
        "bytes_moved": {},
    }
    for _, r in reports:
        for k, v in r["bytes_moved"].items():
            out["bytes_moved"][k] = out["bytes_moved"].get(k, 0) + v
    out["nvme_bytes_written_per_task"] = out["bytes_moved"].get("dram->nvme", 0) / max(1, tasks)
    tps = [r["trace_policy"] for _, r in reports if "trace_policy" in r]
    if tps:
        late = [x for t in tps for x in t["prefetch_lateness_all_s"]]
        la = np.asarray(late) if late else np.zeros(1)
        out["trace_policy"] = {
            "decisions": {k: sum(t["decisions"][k] for t in tps) for k in tps[0]["decisions"]},
            "reasons": _sum_counts(t["reasons"] for t in tps),
            "gap_sources": _sum_counts(t["gap_sources"] for t in tps),
            "restore_capped_blocks": sum(t.get("restore_capped_blocks", 0) for t in tps),
            "prefetch_lateness_s": {"count": len(late), "late": int((la > 0).sum()) if late else 0,
                                    "p50": float(np.percentile(la, 50)), "p90": float(np.percentile(la, 90)),
                                    "p99": float(np.percentile(la, 99)), "max": float(la.max())},
            "prefetch_lateness_all_s": late[:5000],
            "late_recompute_tokens": sum(t["late_recompute_tokens"] for t in tps),
            "tail_tokens_reused": sum(t["tail_tokens_reused"] for t in tps),
        }
    return out


def _sum_counts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def server_like_replay(report: dict[str, Any]) -> ServerModel:
    """A server model of the machine a ``kvtier replay`` report was measured on: its tier budgets,
    its calibrated tier bandwidths, its model's measured prefill and decode speed, serial decode."""
    pols = report.get("policies", {})
    ta = pols.get("trace-aware") or pols.get("trace-aware-nohint") or {}
    if "cost_model" not in ta or "model_speed" not in report:
        raise InvalidArgumentError("the replay report has no calibration: run kvtier replay with the trace-aware "
                                   "policy (the default, or --policy all) and --json")
    cfg, bw = report["config"], ta["cost_model"]["bandwidth_GBps"]
    speed = report["model_speed"]
    gib = float(1 << 30)
    # The replay's compute model (Note [Calibrated compute] in kvtier.harness.replay), in the simulator's
    # terms: its per-token term as the prefill speed, its per-pair term as attention (one "flop"
    # per pair at 1 / b pairs per second), its decode intercept as the decode speed.
    cm = report.get("compute_model")
    attn = {}
    prefill_tps = 1.0 / speed["prefill_s_per_token"]
    decode_tps = 1.0 / max(speed["decode_s_per_token"], 1e-6)
    if cm and cm.get("a_s_per_token", 0) > 0:
        prefill_tps = 1.0 / cm["a_s_per_token"]
        if cm.get("b_s_per_token_pair", 0) > 0:
            attn = {"attn_flops_per_pair": 1.0, "attention_tflops": 1e-12 / cm["b_s_per_token_pair"]}
        if cm.get("f_s", 0) > 0:
            decode_tps = 1.0 / cm["f_s"]
        attn["prefill_overhead_s"] = max(0.0, cm.get("e_s", 0.0))
        # a decoded token's cost per context token
        if "attention_tflops" in attn and cm.get("g_s_per_context_token", 0) > 0:
            kv = ta["cost_model"]["block_bytes"] // ta["cost_model"]["block_tokens"]
            attn["decode_read_gbps"] = kv / cm["g_s_per_context_token"] / 1e9
    return ServerModel(
        name="this-machine (from the replay)", model=report.get("model", ""),
        hbm_kv_gib=cfg["device_budget_bytes"] / gib, dram_kv_gib=cfg["dram_budget_bytes"] / gib,
        nvme_kv_gib=cfg["nvme_budget_bytes"] / gib,
        pcie_gbps=(bw["device->dram"] + bw["dram->device"]) / 2, hbm_gbps=bw["device->engine"],
        nvme_read_gbps=bw.get("nvme->dram", 1.0), nvme_write_gbps=bw.get("dram->nvme", 1.0), network_gbps=0.0,
        prefill_tokens_per_s=prefill_tps, decode_tokens_per_s=decode_tps,
        kv_bytes_per_token=ta["cost_model"]["block_bytes"] // ta["cost_model"]["block_tokens"],
        dollars_per_hour=0.1, serial_decode=True, **attn)


def _p99_or_max(j: dict[str, Any]) -> float:
    """p99, or the slowest where there are too few values for a p99 (kvtier.harness.driver.jct_stats)."""
    return j["p99"] if j.get("p99") is not None else j.get("max", 0.0)


def check_against_replay(replay_json: str, json_path: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Simulate the workload of a ``kvtier replay --json`` report on a model of the machine it ran on,
    and compare: the order of the policies, and how far each figure is from the real one."""
    import json

    from rich.console import Console
    from rich.table import Table

    try:
        with open(replay_json) as f:
            real = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot read the replay report {replay_json!r}: {e}") from None
    server = server_like_replay(real)
    cfg = real["config"]
    from kvtier.harness.replay import load_workload

    trs = load_workload(cfg.get("workload_file"), cfg["vocab_size"], cfg["seed"], cfg["workload_roots"],
                        cfg.get("gap_scale", 1.0), cfg.get("generator", "agent"))
    pols = list(real["policies"])
    simulated = simulate(server=server, servers=1, policies=pols, workload=trs, block_tokens=cfg["block_tokens"],
                         progress=progress, quiet=True, vocab=cfg["vocab_size"])
    rows = {}
    for p in pols:
        r, s = real["policies"][p], simulated["policies"][p]
        rows[p] = {k: {"real": a, "sim": b, "sim/real": b / a if a else None} for k, a, b in (
            ("jct_p50_s", r["jct_s"]["p50"], s["jct_s"]["p50"]),
            ("jct_p99_s", _p99_or_max(r["jct_s"]), _p99_or_max(s["jct_s"])),
            ("prefill_computed", r["prefill_tokens"]["computed"], s["prefill_tokens"]["computed"]))}
    order = {k: ([p for p in sorted(pols, key=lambda p: rows[p][k]["real"])],
                 [p for p in sorted(pols, key=lambda p: rows[p][k]["sim"])]) for k in ("jct_p50_s", "jct_p99_s",
                                                                                       "prefill_computed")}
    # A replay whose compute was calibrated counts compute with a fitted formula of the same shape
    # as the simulator's; only a replay with measured compute checks the simulator's compute.
    independent = cfg.get("compute_time") == "measured"
    out = {"kind": "SIMULATION checked against a real replay", "server": asdict(server), "figures": rows,
           "replay_compute_time": cfg.get("compute_time"), "independent_of_the_formula": independent,
           "order": {k: {"real": a, "sim": b, "same": a == b} for k, (a, b) in order.items()}}
    table = Table(title="kvtier simulate vs the real replay (same workload, a model of this machine)")
    for col in ("policy", "JCT p50 real / sim", "JCT p99 real / sim", "prefill computed real / sim"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p in pols:
        cells = [f"{rows[p][k]['real']:.2f} / {rows[p][k]['sim']:.2f}" if k != "prefill_computed"
                 else f"{rows[p][k]['real']} / {rows[p][k]['sim']}" for k in ("jct_p50_s", "jct_p99_s",
                                                                               "prefill_computed")]
        table.add_row(p, *cells)
    import sys

    con = Console(width=None if sys.stdout.isatty() else 160)
    con.print(table)
    if not independent:
        con.print("note: this replay's compute was calibrated (a fitted formula of the simulator's shape), so its "
                  "compute agrees by construction; check against a replay run with --compute-time measured")
    for k, v in out["order"].items():
        con.print(f"order by {k}: real {' < '.join(v['real'])}; simulated {' < '.join(v['sim'])}: "
                  + ("same" if v["same"] else "DIFFERENT"))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out
