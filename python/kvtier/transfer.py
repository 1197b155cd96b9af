"""The async copy engine: batches of block transfers with completion handles."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import weakref
from collections.abc import Generator
from typing import Any

import numpy as np

from kvtier import _core
from kvtier.errors import ClosedError, InvalidArgumentError, KvtierError, TransferTimeoutError
from kvtier.memory import HostPool, KVRegistration, as_block_ids

BlockMemory = HostPool | KVRegistration


def _space(obj: Any, role: str) -> Any:
    if isinstance(obj, KVRegistration):
        obj._check_storage()  # Note [Registered storage] in kvtier/memory.py
        return obj._core
    if isinstance(obj, HostPool):
        return obj._core
    remote = getattr(obj, "_remote_space", None)  # a peer's pool (kvtier.cluster.peer.RemotePool)
    if remote is not None:
        return remote
    if hasattr(obj, "__dlpack__") or hasattr(obj, "__array_interface__"):
        raise InvalidArgumentError(
            f"the transfer {role} is a raw tensor; register it first with kvtier.register_kv(...)"
        )
    raise InvalidArgumentError(
        f"the transfer {role} must be a HostPool or a KVRegistration, got {type(obj).__name__}"
    )


class TransferHandle:
    """A batch of block transfers in flight.

    ``done()`` polls, ``wait(timeout)`` blocks (raising the transfer's error, if any), and the
    handle is awaitable from asyncio. The source and target stay alive until completion even if
    the caller drops every other reference to them (or to this handle).
    """

    __slots__ = ("_core", "_keep", "_engine", "__weakref__")

    def __init__(self, core: Any, keep: tuple[Any, ...], engine: CopyEngine | None) -> None:
        self._core = core
        self._keep: tuple[Any, ...] | None = keep
        self._engine = engine

    @property
    def num_blocks(self) -> int:
        return self._core.num_blocks

    @property
    def bytes(self) -> int:
        return self._core.bytes

    @property
    def latency_s(self) -> float:
        """Seconds from submission to completion (0.0 while pending)."""
        return self._core.latency_s

    @property
    def block_ok(self) -> np.ndarray | None:
        """Per-block outcome (True = ok) for transfers that can succeed partially, such as tier
        reads where a missing or corrupt block is a miss; None for all-or-nothing transfers."""
        ok = self._core.block_ok
        return None if ok is None else ok.astype(bool)

    def done(self) -> bool:
        return self._core.done()

    def wait(self, timeout: float | None = None) -> None:
        """Block until complete; raise ``TransferTimeoutError`` after ``timeout`` seconds, or the
        transfer's own error if it failed. ``timeout`` None or ``float('inf')`` waits as long as
        it takes (so does any timeout too long to be a deadline); NaN or a negative number is an
        ``InvalidArgumentError``."""
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
                raise InvalidArgumentError(f"timeout must be a number of seconds or None, got {timeout!r}")
            if math.isnan(timeout) or timeout < 0:
                raise InvalidArgumentError(f"timeout must be >= 0 seconds (or None / inf: no limit), got {timeout}")
        if not self._core.wait(-1.0 if timeout is None or math.isinf(timeout) else float(timeout)):
            raise TransferTimeoutError(
                f"transfer of {self.num_blocks} blocks ({self.bytes} bytes) not complete after {timeout} s"
            )
        self._keep = None
        self._core.raise_if_failed()

    def exception(self) -> KvtierError | None:
        """The transfer's error once it failed; None while pending or after success."""
        try:
            self._core.raise_if_failed()
        except KvtierError as e:
            return e
        return None

    def __await__(self) -> Generator[Any, None, None]:
        if not self._core.done():
            if self._engine is not None:
                yield from self._engine._waiter().wait(self).__await__()
            else:  # a tier's own handle: wait on a worker thread
                loop = asyncio.get_running_loop()
                yield from loop.run_in_executor(None, self._core.wait, -1.0).__await__()
        self._keep = None
        self._core.raise_if_failed()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"TransferHandle({self.num_blocks} blocks, {self.bytes} B, {state})"


class _AsyncWaiter:
    """Resolves asyncio futures for one event loop from the engine's completion eventfd."""

    def __init__(self, engine: CopyEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = engine._core.completion_fd
        self._loop = loop
        self._waiting: dict[asyncio.Future[None], TransferHandle] = {}
        loop.add_reader(self._fd, self._on_readable)

    async def wait(self, handle: TransferHandle) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiting[fut] = handle
        if handle._core.done():  # completed between the check and the registration
            self._waiting.pop(fut, None)
            return
        try:
            await fut
        finally:
            self._waiting.pop(fut, None)

    def _on_readable(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass
        done = [f for f, h in self._waiting.items() if h._core.done()]
        for f in done:
            del self._waiting[f]
            if not f.done():
                f.set_result(None)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)


class CopyEngine:
    """Moves batches of blocks between registered KV memory and pools, asynchronously.

    Args:
        threads: CPU copy threads (default: one per core, at most 16).
        nontemporal_threshold_bytes: batches at least this large use streaming stores, which
            do not pollute the cache (tune only for unusual cache sizes).
    """

    def __init__(self, threads: int | None = None, nontemporal_threshold_bytes: int = 8 << 20) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InvalidArgumentError(f"threads must be a positive int or None, got {threads!r}")
        self._core = _core.CopyEngine(threads or 0, nontemporal_threshold_bytes)
        self._pending: list[TransferHandle] = []  # guarded by _lock
        self._prune_at = 64
        self._lock = threading.Lock()
        self._waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncWaiter] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False

    @property
    def threads(self) -> int:
        return self._core.cpu_threads

    @property
    def backends(self) -> list[str]:
        """Copy backends in this process (``cpu``, plus ``cuda`` when a GPU is usable)."""
        return list(self._core.backends)

    def transfer(self, src: BlockMemory, src_ids: Any, dst: BlockMemory, dst_ids: Any) -> TransferHandle:
        """Copy blocks ``src[src_ids[i]] -> dst[dst_ids[i]]``; returns at once with a handle."""
        if self._closed:
            raise ClosedError("the copy engine was closed")
        s, d = _space(src, "source"), _space(dst, "target")
        core = self._core.submit(s, as_block_ids(src_ids, "source ids"), d, as_block_ids(dst_ids, "target ids"))
        handle = TransferHandle(core, (src, dst), self)
        if not core.done():
            with self._lock:
                self._pending.append(handle)
                if len(self._pending) >= self._prune_at:
                    self._pending = [h for h in self._pending if not h._core.done()]
                    self._prune_at = max(64, 2 * len(self._pending))
        return handle

    def gather(self, kv: KVRegistration, kv_ids: Any, pool: HostPool, pool_ids: Any) -> TransferHandle:
        """Registered KV blocks -> pool blocks (offload)."""
        return self.transfer(kv, kv_ids, pool, pool_ids)

    def scatter(self, pool: HostPool, pool_ids: Any, kv: KVRegistration, kv_ids: Any) -> TransferHandle:
        """Pool blocks -> registered KV blocks (load)."""
        return self.transfer(pool, pool_ids, kv, kv_ids)

    def stats(self) -> dict[str, int]:
        return dict(self._core.stats())

    def inject_faults(self, every_nth: int) -> None:
        """Test switch: make every ``every_nth``-th batch fail (0 turns it off)."""
        self._core.inject_faults(int(every_nth))

    def drain(self) -> None:
        """Wait for every transfer submitted so far."""
        self._core.drain()
        with self._lock:
            self._pending = [h for h in self._pending if not h._core.done()]

    def close(self) -> None:
        if self._closed:
            return
        self.drain()
        for w in list(self._waiters.values()):
            w.close()
        self._closed = True

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Drain before attributes go away: pending transfers still point into their memory.
        core = getattr(self, "_core", None)
        if core is not None:
            core.drain()

    def _waiter(self) -> _AsyncWaiter:
        loop = asyncio.get_running_loop()
        w = self._waiters.get(loop)
        if w is None:
            w = self._waiters[loop] = _AsyncWaiter(self, loop)
        return w


_default: CopyEngine | None = None


def default_engine() -> CopyEngine:
    """A process-wide engine with default settings, created on first use."""
    global _default
    if _default is None:
        _default = CopyEngine()
    return _default
