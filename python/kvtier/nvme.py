"""The NVMe tier: blocks in slots of one preallocated file, moved by io_uring with O_DIRECT.

See docs/nvme.md for the on-disk format, the write ordering and the recovery rules.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kvtier import _core
from kvtier.errors import ClosedError, InvalidArgumentError, UnavailableError
from kvtier.memory import HostPool, as_block_ids
from kvtier.transfer import TransferHandle

_MASK64 = (1 << 64) - 1


def as_block_keys(keys: Any) -> np.ndarray:
    """Coerce keys to an ``[n, 2]`` uint64 array (high half, low half).

    Accepts such an array, a 1-D integer array (low half only), or a list of Python ints
    below 2**128.
    """
    if isinstance(keys, np.ndarray) and keys.ndim == 2:
        if keys.shape[1] != 2 or keys.dtype != np.uint64:
            raise InvalidArgumentError(f"block keys must be [n, 2] uint64, got {keys.shape} {keys.dtype}")
        return np.ascontiguousarray(keys)
    if isinstance(keys, np.ndarray) and keys.ndim == 1 and keys.dtype.kind in "iu":
        if keys.dtype.kind == "i" and keys.size and keys.min() < 0:
            raise InvalidArgumentError("block keys must be non-negative")
        out = np.zeros((keys.size, 2), dtype=np.uint64)
        out[:, 1] = keys.astype(np.uint64)
        return out
    values = list(keys)
    out = np.zeros((len(values), 2), dtype=np.uint64)
    for i, k in enumerate(values):
        if isinstance(k, bytes) and len(k) == 16:
            k = int.from_bytes(k, "big")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= int(k) < 1 << 128:
            raise InvalidArgumentError(f"block key {k!r} is not an int in [0, 2**128) or 16 bytes")
        out[i, 0] = (int(k) >> 64) & _MASK64
        out[i, 1] = int(k) & _MASK64
    return out


class NvmeTier:
    """A durable, checksummed block store on NVMe (or any file system that takes O_DIRECT).

    Blocks move between the tier and ``staging`` (a :class:`HostPool` whose arena is registered
    with io_uring once). Reopening the same directory finds every acknowledged block again.

    Args:
        directory: where the tier's two files live (created if missing).
        staging: the DRAM pool blocks are written from and read into.
        capacity_bytes / num_slots: the tier's size (give one).
        queue_depth: io_uring operations in flight.
        max_io_bytes: the largest single I/O request: blocks adjacent in the file and in the
            staging pool are merged up to it, larger blocks split (default 4 MiB).
        durable: acknowledge writes only after fdatasync.
        allow_buffered_io: opt in to buffered I/O where the file system refuses O_DIRECT.
        verify_threads: threads that verify read blocks against their checksums (default: one
            per core, at most 8). A disk hands completions back in bursts; verifying a burst on
            several cores keeps the caller from waiting on checksums after the last byte arrived.
        taper_reads: keep a read's bytes in flight within half of what is left to read (at
            least 16 MiB), so a disk that answers in rounds returns the last bytes in a small
            round whose checksums are quick to verify (docs/nvme.md, "Tapering reads").
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        staging: HostPool,
        *,
        capacity_bytes: int | None = None,
        num_slots: int | None = None,
        queue_depth: int = 64,
        max_io_bytes: int = 4 << 20,
        durable: bool = True,
        allow_buffered_io: bool = False,
        verify_threads: int | None = None,
        taper_reads: bool = True,
    ) -> None:
        if not getattr(_core, "HAVE_NVME", False):
            raise UnavailableError(f"kvtier was built without io_uring: {_core.build_info()['io_uring_why']}")
        if not isinstance(staging, HostPool):
            raise InvalidArgumentError(f"staging must be a kvtier.HostPool, got {type(staging).__name__}")
        if (num_slots is None) == (capacity_bytes is None):
            raise InvalidArgumentError("give exactly one of num_slots or capacity_bytes")
        if capacity_bytes is not None:
            if capacity_bytes < staging.block_bytes:
                raise InvalidArgumentError(
                    f"capacity_bytes={capacity_bytes} is smaller than one block ({staging.block_bytes} bytes)"
                )
            num_slots = capacity_bytes // staging.block_bytes
        assert num_slots is not None
        if not 0 < num_slots < 1 << 31:
            raise InvalidArgumentError(f"num_slots must be in [1, 2^31), got {num_slots}")
        if verify_threads is not None and (
            not isinstance(verify_threads, (int, np.integer)) or isinstance(verify_threads, bool)
            or not 1 <= verify_threads <= 64
        ):
            raise InvalidArgumentError(f"verify_threads must be an int in [1, 64] or None, got {verify_threads!r}")
        self.staging = staging
        self.directory = os.fspath(directory)
        self._core: Any = _core.NvmeTier.open(
            self.directory, staging._core, int(num_slots), queue_depth, max_io_bytes, durable, allow_buffered_io,
            int(verify_threads or 0), bool(taper_reads),
        )

    def _tier(self) -> Any:
        if self._core is None:
            raise ClosedError("the NVMe tier was closed")
        return self._core

    @property
    def num_slots(self) -> int:
        return self._tier().num_slots

    @property
    def verify_threads(self) -> int:
        """Threads verifying read checksums (Note [Verifying reads in parallel])."""
        return self._tier().verify_threads

    @property
    def io_mode(self) -> str:
        """How I/O is issued, e.g. ``O_DIRECT, io_uring QD 64, fixed buffers + fixed file``."""
        return self._tier().io_mode

    def write(self, keys: Any, pool_ids: Any) -> TransferHandle:
        """Store staging blocks ``pool_ids[i]`` under ``keys[i]``; keys already stored are skipped."""
        core = self._tier().write(as_block_keys(keys), as_block_ids(pool_ids, "pool ids"))
        return TransferHandle(core, (self, self.staging), None)

    def read(self, keys: Any, pool_ids: Any) -> TransferHandle:
        """Load ``keys[i]`` into staging blocks ``pool_ids[i]``. After ``wait()``, ``block_ok[i]``
        says whether block i was found and passed its checksum (a miss is not an error)."""
        core = self._tier().read(as_block_keys(keys), as_block_ids(pool_ids, "pool ids"))
        return TransferHandle(core, (self, self.staging), None)

    def contains(self, keys: Any) -> np.ndarray:
        return self._tier().contains(as_block_keys(keys)).astype(bool)

    def evict(self, keys: Any) -> int:
        """Forget these keys (their slots are reused once in-flight reads finish); returns how many."""
        return self._tier().evict(as_block_keys(keys))

    def keys(self) -> np.ndarray:
        """Every stored key, ``[n, 2]`` uint64."""
        return self._tier().keys()

    def stats(self) -> dict[str, int]:
        return dict(self._tier().stats())

    def drain(self) -> None:
        self._tier().drain()

    def inject_io_errors(self, every_nth: int) -> None:
        """Test switch: every ``every_nth``-th I/O operation fails with EIO (0: off)."""
        self._tier().inject_io_errors(int(every_nth))

    def inject_staging_change(self, every_nth: int, after_write: bool = False) -> None:
        """Test switch: in each write batch, the staging block at every ``every_nth``-th position
        has its first byte flipped between its checksum and its payload write (hashed, changed,
        then written; or with ``after_write``: written, changed, then hashed). Reads of those
        blocks must then fail their checksum. 0: off."""
        if isinstance(every_nth, bool) or not isinstance(every_nth, (int, np.integer)) or every_nth < 0:
            raise InvalidArgumentError(f"every_nth must be an int >= 0, got {every_nth!r}")
        self._tier().inject_staging_change(int(every_nth), bool(after_write))

    def close(self) -> None:
        """Wait for pending I/O and release the directory (another NvmeTier may then open it)."""
        if self._core is not None:
            self._core.drain()
            self._core = None

    def __enter__(self) -> NvmeTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
