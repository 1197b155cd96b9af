"""kvtier: a KV-cache tiering engine for LLM inference.

The package is two rooms. The library, what an inference engine embeds: block pools per tier,
the async copy engine between registered engine KV memory and the tiers (``memory``,
``transfer``, ``staging``, ``layout``, ``keys``), the NVMe tier (``nvme``), the tiered prefix
cache and its background moves (``cache``, ``moves``), agent traces and the trace-aware policy
(``trace``, ``policy``), ``metrics``, the engine integrations (``integrations``) and the
cross-worker pieces (``cluster``). The harness, what measures it (:mod:`kvtier.harness`):
workloads, the replay and the simulator, and the microbenchmarks. Nothing in the library
imports the harness.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kvtier import _ucx_preload  # noqa: F401  (before _core: the libucx wheel's UCX, if installed)
from kvtier import _core  # noqa: F401  (native module; fails loudly if the build is broken)
from kvtier.errors import (
    BlockStateError,
    BusyError,
    ClosedError,
    CorruptBlockError,
    DeviceError,
    DTypeError,
    InternalError,
    InvalidArgumentError,
    KvtierError,
    OutOfCapacityError,
    TransferError,
    TransferTimeoutError,
    UnavailableError,
)
from kvtier.layout import LAYOUT_KINDS, KVLayout
from kvtier.memory import HostPool, KVRegistration, PoolStats, register_kv, register_kv_views
from kvtier import keys  # noqa: F401
from kvtier.cache import TieredCache
from kvtier.policy import Action, CostModel, GapEstimator, TraceAwarePolicy
from kvtier.trace import Trace, TraceManager, TraceState
from kvtier.nvme import NvmeTier
from kvtier.staging import kv_to_nvme, nvme_to_kv
from kvtier.transfer import CopyEngine, TransferHandle, default_engine
from kvtier import metrics, trace  # noqa: F401  (docs/api.md names kvtier.metrics, .trace)

__all__ = [
    "LAYOUT_KINDS",
    "Action",
    "BlockStateError",
    "BusyError",
    "ClosedError",
    "CopyEngine",
    "CorruptBlockError",
    "CostModel",
    "DTypeError",
    "DeviceError",
    "GapEstimator",
    "HostPool",
    "InternalError",
    "InvalidArgumentError",
    "KVLayout",
    "KVRegistration",
    "KvtierError",
    "NvmeTier",
    "OutOfCapacityError",
    "PoolStats",
    "TieredCache",
    "Trace",
    "TraceAwarePolicy",
    "TraceManager",
    "TraceState",
    "TransferError",
    "TransferHandle",
    "TransferTimeoutError",
    "UnavailableError",
    "__version__",
    "default_engine",
    "kv_to_nvme",
    "nvme_to_kv",
    "register_kv",
    "register_kv_views",
]
