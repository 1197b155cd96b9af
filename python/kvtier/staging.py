"""Registered KV <-> NVMe, staged through the NVMe tier's DRAM pool.

The NVMe tier moves blocks between the disk and its staging :class:`HostPool`; these helpers
chain that with the copy engine so an engine's own KV blocks can go to NVMe and come back in
one call. Staging blocks are borrowed for the duration and always returned.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtier.errors import InvalidArgumentError
from kvtier.memory import KVRegistration, as_block_ids
from kvtier.nvme import NvmeTier, as_block_keys
from kvtier.transfer import CopyEngine


def _batch(kv_ids: Any, keys: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = as_block_ids(kv_ids, "kv ids")
    k = as_block_keys(keys)
    if len(ids) != len(k):
        raise InvalidArgumentError(f"{len(ids)} kv ids but {len(k)} keys")
    return ids, k


def kv_to_nvme(engine: CopyEngine, kv: KVRegistration, kv_ids: Any, tier: NvmeTier, keys: Any,
               timeout: float | None = None) -> None:
    """Store registered KV blocks ``kv_ids[i]`` on NVMe under ``keys[i]`` (gather, then write)."""
    ids, k = _batch(kv_ids, keys)
    staging = tier.staging.allocate(len(ids))
    try:
        engine.gather(kv, ids, tier.staging, staging).wait(timeout)
        tier.write(k, staging).wait(timeout)
    finally:
        tier.staging.free(staging)


def nvme_to_kv(engine: CopyEngine, tier: NvmeTier, keys: Any, kv: KVRegistration, kv_ids: Any,
               timeout: float | None = None) -> np.ndarray:
    """Load ``keys[i]`` from NVMe into registered KV blocks ``kv_ids[i]`` (read, then scatter).

    Returns the per-block hit mask; blocks that missed (absent, or failed their checksum) are
    left untouched in ``kv``.
    """
    ids, k = _batch(kv_ids, keys)
    staging = tier.staging.allocate(len(ids))
    try:
        h = tier.read(k, staging)
        h.wait(timeout)
        ok = h.block_ok if h.block_ok is not None else np.zeros(len(ids), dtype=bool)
        if ok.any():
            engine.scatter(tier.staging, staging[ok], kv, ids[ok]).wait(timeout)
        return ok
    finally:
        tier.staging.free(staging)
