"""A worker process for the kill -9 tests: joins the store, publishes blocks, then waits.

    python cluster_worker_proc.py URL WORKER_ID LEASE_MS NUM_KEYS

Prints ``ready <incarnation>`` once its blocks are published, then heartbeats until killed.
Keys are ``[[i, worker_tag] for i in range(NUM_KEYS)]`` at slot i.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from kvtier.cluster import ClusterStore, WorkerInfo


def main() -> None:
    url, worker, lease_ms, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = ClusterStore(url, worker, WorkerInfo(ucx_address=worker.encode(), capacity_blocks=n),
                         lease_ms=lease_ms, timeout_s=0.5)
    keys = np.stack([np.arange(n, dtype=np.uint64), np.full(n, 7, dtype=np.uint64)], axis=1)
    store.publish(keys, np.arange(n))
    print(f"ready {store.incarnation}", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
