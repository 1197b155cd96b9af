"""kvtier across workers: cluster metadata on Redis and the trace migration protocol.

- :mod:`kvtier.cluster.metadata`: :class:`ClusterStore`, one worker's view of the store:
  liveness leases, published worker info, the block directory, fenced trace ownership.
- :mod:`kvtier.cluster.migration`: migration planning (dedup against what the target holds)
  and the ownership-move state machine; the data moves through an injected mover.
- :mod:`kvtier.cluster.peer`: the UCX data plane (:class:`Peer`, one-sided put/get of block lists
  between registered pools); it plugs into migration as a mover.
- :mod:`kvtier.cluster.worker`: :class:`~kvtier.cluster.worker.ClusterWorker`, one per process:
  store + peer + a TieredCache's DRAM pool (the remote tier, :class:`~kvtier.cluster.worker.UcxMover`,
  the migration mailbox). Import it from there (it loads the UCX binding). See docs/cluster.md.
"""

from __future__ import annotations

from kvtier.cluster.metadata import (
    LOOKUP_RECORD,
    ClusterStore,
    Lookup,
    OwnershipError,
    StaleWriteError,
    StoreMetrics,
    StoreUnavailableError,
    TraceOwner,
    WorkerInfo,
    WorkerRecord,
    open_stores,
)

__all__ = [
    "LOOKUP_RECORD",
    "ClusterStore",
    "Lookup",
    "OwnershipError",
    "StaleWriteError",
    "StoreMetrics",
    "StoreUnavailableError",
    "TraceOwner",
    "WorkerInfo",
    "WorkerRecord",
    "open_stores",
]
