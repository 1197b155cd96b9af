"""Cluster metadata on Redis: worker liveness, the block directory, and trace ownership.

One :class:`ClusterStore` per worker process. It registers the worker under a liveness lease (a
Redis key with a millisecond TTL, renewed by a background thread), publishes the worker's data
plane address and pool rkeys, publishes which block keys the worker holds (slot, generation,
checksum per block), answers "who holds these keys" for a whole prefix in one round trip, and
keeps trace ownership behind fences. The schema, scripts and failure rules are in docs/cluster.md.

Failure rules in short:
- A worker is live while its lease key holds its incarnation. Lookups return live holders only;
  a dead worker's entries vanish with its lease and are garbage-collected later (:meth:`cleanup`).
- A worker that restarts (or whose lease lapsed) rejoins with a new, larger incarnation: every
  write of its old incarnation (publish, claim, fenced trace writes) is refused.
- A store that cannot be reached makes every call raise :class:`StoreUnavailableError` within
  ``timeout_s``, and, until the background thread reconnects (with backoff), at once, without
  touching the network. The worker keeps serving from its own tiers; :meth:`status`, ``kvtier
  info`` and the metrics say it is disconnected.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.cluster import _scripts
from kvtier.errors import ClosedError, InvalidArgumentError, KvtierError, UnavailableError

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_WORKER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# One lookup record as the LOOKUP script packs it (see kvtier.cluster._scripts).
LOOKUP_RECORD = np.dtype([("key", "<u4"), ("worker", "<u4"), ("slot", "<u4"),
                          ("generation", "<u4"), ("checksum", "<u8")])
_PUBLISH_RECORD = np.dtype([("key", "<u8", (2,)), ("slot", "<u4"), ("checksum", "<u8")])
_VALIDATE_RECORD = np.dtype([("key", "<u8", (2,)), ("worker", "<u4"), ("slot", "<u4"),
                             ("generation", "<u4")])
assert LOOKUP_RECORD.itemsize == 24 and _PUBLISH_RECORD.itemsize == 28 and _VALIDATE_RECORD.itemsize == 28

_LATENCY_SAMPLES = 4096  # per operation, for the p50/p99 the metrics report


class StoreUnavailableError(UnavailableError):
    """The metadata store could not be reached (or is being reconnected to, with backoff).

    The worker keeps serving from its own tiers; cluster features (remote hits, migration) pause.
    """


class StaleWriteError(KvtierError):
    """A write refused by the store: a stale incarnation, a stale fence, or a dead owner."""


class OwnershipError(KvtierError):
    """A trace ownership call refused: the trace is owned by another live worker, the target is
    not live, or the trace is not in the state the call needs."""


def _error_from_reply(op: str, message: str) -> KvtierError:
    code = message.split(" ", 1)[0]
    text = f"{op}: {message}"
    if code in ("KVT_STALE", "KVT_FENCE"):
        return StaleWriteError(text)
    if code in ("KVT_OWNED", "KVT_TARGET", "KVT_STATE", "KVT_NOTRACE"):
        return OwnershipError(text)
    return KvtierError(text)


def as_keys(keys: Any) -> np.ndarray:
    """Block keys as a contiguous ``[n, 2]`` uint64 array (``kvtier.keys.hash_blocks``' shape)."""
    arr = np.asarray(keys)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InvalidArgumentError(f"block keys must have shape [n, 2] (uint64 hi, lo), got {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"block keys must be unsigned integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def _as_u32(values: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidArgumentError(f"{what} must be one-dimensional with {n} entries, got shape {arr.shape}")
    if n and arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{what} must be integers, got dtype {arr.dtype}")
    if n and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise InvalidArgumentError(f"{what}: value out of range for uint32")
    return arr.astype(np.uint32)


def check_worker_id(worker_id: Any) -> str:
    if not isinstance(worker_id, str) or not _WORKER_RE.match(worker_id):
        raise InvalidArgumentError(
            f"worker id must be 1-64 characters of [A-Za-z0-9_.-], got {worker_id!r}")
    return worker_id


def check_trace_id(trace_id: Any) -> str:
    if not isinstance(trace_id, str) or not _ID_RE.match(trace_id):
        raise InvalidArgumentError(
            f"trace id must be 1-128 characters of [A-Za-z0-9_.:-], got {trace_id!r}")
    return trace_id


def check_fence(fence: Any) -> int:
    if isinstance(fence, bool) or not isinstance(fence, (int, np.integer)) or int(fence) <= 0:
        raise InvalidArgumentError(f"fence must be a positive int (from claim_trace), got {fence!r}")
    return int(fence)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker publishes about itself for its peers.

    Attributes:
        ucx_address: the worker's UCX (ucp) worker address, opaque bytes.
        rkeys: its registered pools' packed remote keys, opaque bytes.
        capacity_blocks: blocks its remote-served pool holds.
        block_bytes: bytes per block in that pool.
        extra: other string fields (e.g. the data plane's version), published as they are.
    """

    ucx_address: bytes = b""
    rkeys: bytes = b""
    capacity_blocks: int = 0
    block_bytes: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_fields(self) -> list[bytes | str | int]:
        if not isinstance(self.ucx_address, (bytes, bytearray)) or not isinstance(self.rkeys, (bytes, bytearray)):
            raise InvalidArgumentError("WorkerInfo.ucx_address and .rkeys must be bytes")
        if self.capacity_blocks < 0 or self.block_bytes < 0:
            raise InvalidArgumentError("WorkerInfo.capacity_blocks and .block_bytes must be >= 0")
        out: list[bytes | str | int] = ["ucx_address", bytes(self.ucx_address), "rkeys", bytes(self.rkeys),
                                        "capacity_blocks", int(self.capacity_blocks),
                                        "block_bytes", int(self.block_bytes)]
        for k, v in self.extra.items():
            if k in ("ucx_address", "rkeys", "capacity_blocks", "block_bytes", "incarnation"):
                raise InvalidArgumentError(f"WorkerInfo.extra must not use the reserved field {k!r}")
            out += [f"x:{k}", str(v)]
        return out

    @staticmethod
    def from_fields(fields: Mapping[bytes, bytes]) -> WorkerInfo:
        extra = {k[2:].decode(): v.decode() for k, v in fields.items() if k.startswith(b"x:")}
        return WorkerInfo(ucx_address=fields.get(b"ucx_address", b""), rkeys=fields.get(b"rkeys", b""),
                          capacity_blocks=int(fields.get(b"capacity_blocks", 0)),
                          block_bytes=int(fields.get(b"block_bytes", 0)), extra=extra)


@dataclass(frozen=True)
class WorkerRecord:
    """A live worker as the store sees it."""

    worker_id: str
    incarnation: int
    info: WorkerInfo


@dataclass(frozen=True)
class TraceOwner:
    """A trace's ownership record: ``owner`` (incarnation ``incarnation``) holds ``fence``;
    ``state`` is ``owned`` or ``moving`` (then ``target`` names where to)."""

    trace_id: str
    owner: str
    incarnation: int
    fence: int
    state: str
    target: str | None
    owner_live: bool


@dataclass(frozen=True)
class Lookup:
    """The live holders of a list of block keys, as columns (no per-block Python objects).

    ``records`` has one row per (key, live holder): ``key`` (index into the looked-up keys),
    ``worker`` (index into :attr:`workers`), ``slot``, ``generation``, ``checksum``; rows come in
    key order. ``rtt_s`` is the round trip the lookup took.
    """

    num_keys: int
    workers: tuple[str, ...]
    records: np.ndarray  # [n_records] LOOKUP_RECORD
    rtt_s: float

    def held_by(self, worker_id: str) -> np.ndarray:
        """``[num_keys]`` bool: which keys ``worker_id`` holds (live)."""
        mask = np.zeros(self.num_keys, dtype=bool)
        if worker_id in self.workers:
            w = self.workers.index(worker_id)
            mask[self.records["key"][self.records["worker"] == w]] = True
        return mask

    def holder_count(self) -> np.ndarray:
        """``[num_keys]`` int: how many live workers hold each key."""
        return np.bincount(self.records["key"], minlength=self.num_keys)

    def holders(self, i: int) -> list[tuple[str, int, int]]:
        """(worker, slot, generation) of key ``i``'s live holders (for tests and tools)."""
        rows = self.records[self.records["key"] == i]
        return [(self.workers[int(r["worker"])], int(r["slot"]), int(r["generation"])) for r in rows]

    def prefix_blocks(self) -> int:
        """How many leading keys have at least one live holder (the longest remote prefix)."""
        held = self.holder_count() > 0
        return int(np.argmin(held)) if not held.all() else self.num_keys


class StoreMetrics:
    """Per-operation calls, errors and round-trip times, plus connection events.

    Counters only grow; latencies keep the last ``_LATENCY_SAMPLES`` per operation.
    Thread-safe (the heartbeat thread records too).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.fast_failures = 0  # calls refused at once while disconnected
        self.keys_looked_up = 0
        self.records_returned = 0
        self.lease_renewals = 0
        self.rejoins = 0  # new incarnations after a lost lease or a lost store
        self.reconnects = 0
        self.cleaned_entries = 0
        self._latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=_LATENCY_SAMPLES))

    def record(self, op: str, seconds: float, ok: bool) -> None:
        with self._lock:
            self.calls[op] += 1
            if not ok:
                self.errors[op] += 1
            else:
                self._latency[op].append(seconds)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = {}
            for op, d in self._latency.items():
                if d:
                    a = np.fromiter(d, dtype=np.float64)
                    lat[op] = {"p50_ms": float(np.percentile(a, 50)) * 1e3,
                               "p99_ms": float(np.percentile(a, 99)) * 1e3, "samples": len(a)}
            return {"calls": dict(self.calls), "errors": dict(self.errors), "latency": lat,
                    "fast_failures": self.fast_failures, "keys_looked_up": self.keys_looked_up,
                    "records_returned": self.records_returned, "lease_renewals": self.lease_renewals,
                    "rejoins": self.rejoins, "reconnects": self.reconnects,
                    "cleaned_entries": self.cleaned_entries}


_OPEN_STORES: weakref.WeakSet[ClusterStore] = weakref.WeakSet()


def open_stores() -> list[ClusterStore]:
    """The ClusterStores open in this process (what ``kvtier info`` reports)."""
    return [s for s in list(_OPEN_STORES) if not s.closed]


class ClusterStore:
    """One worker's view of the cluster metadata in Redis.

    Args:
        url: the Redis server, ``redis://host:port/db`` (``unix:///path`` works too).
        worker_id: this worker's name in the cluster (1-64 of ``[A-Za-z0-9_.-]``).
        info: what to publish about this worker (UCX address, rkeys, capacity).
        cluster: the namespace; every key is under ``kvt:{<cluster>}:``.
        lease_ms: the liveness lease; a worker silent for this long is dead to the others.
        renew_ms: how often the heartbeat renews it (default ``lease_ms // 3``).
        timeout_s: the bound on every call's wait for the server (connect and reply).
        backoff_s: (first, largest) wait between reconnection attempts; doubles each miss.
        on_rejoin: called (from the heartbeat thread) with this store after the worker got an
            incarnation other than at construction (its lease had lapsed, the store was lost, or
            the store was down at construction): republish blocks and re-claim traces there.
        heartbeat: run the background renewal thread (tests turn it off to let a lease lapse).

    The constructor does not fail when the store is down: the worker starts disconnected, and
    the heartbeat joins as soon as the store answers.
    """

    def __init__(self, url: str, worker_id: str, info: WorkerInfo | None = None, *,
                 cluster: str = "default", lease_ms: int = 3000, renew_ms: int | None = None,
                 timeout_s: float = 0.5, backoff_s: tuple[float, float] = (0.05, 2.0),
                 on_rejoin: Callable[[ClusterStore], None] | None = None, heartbeat: bool = True) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise UnavailableError("kvtier.cluster needs the Redis client: pip install 'kvtier[cluster]'") from None
        self._redis_mod = redis
        self.worker_id = check_worker_id(worker_id)
        if not isinstance(cluster, str) or not _WORKER_RE.match(cluster):
            raise InvalidArgumentError(f"cluster must be 1-64 characters of [A-Za-z0-9_.-], got {cluster!r}")
        if not isinstance(lease_ms, int) or lease_ms < 10:
            raise InvalidArgumentError(f"lease_ms must be an int >= 10, got {lease_ms!r}")
        renew_ms = lease_ms // 3 if renew_ms is None else renew_ms
        if not isinstance(renew_ms, int) or not 1 <= renew_ms < lease_ms:
            raise InvalidArgumentError(f"renew_ms must be an int in [1, lease_ms), got {renew_ms!r}")
        if not timeout_s > 0:
            raise InvalidArgumentError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not 0 < backoff_s[0] <= backoff_s[1]:
            raise InvalidArgumentError(f"backoff_s must be (first, largest) with 0 < first <= largest, got {backoff_s!r}")
        self.url = url
        self.cluster = cluster
        self.prefix = f"kvt:{{{cluster}}}:"
        self.lease_ms = lease_ms
        self.renew_ms = renew_ms
        self.timeout_s = float(timeout_s)
        self.backoff_s = (float(backoff_s[0]), float(backoff_s[1]))
        self.on_rejoin = on_rejoin
        self._info = info if info is not None else WorkerInfo()
        self._info.to_fields()  # validate now
        self.metrics = StoreMetrics()
        try:
            self._client = redis.Redis.from_url(
                url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
                decode_responses=False, client_name=f"kvtier-{worker_id}-{os.getpid()}")
        except ValueError as e:
            raise InvalidArgumentError(f"bad store url {url!r}: {e}") from None
        self._scripts = {name: self._client.register_script(getattr(_scripts, name))
                         for name in ("REGISTER", "RENEW", "UPDATE_INFO", "LEAVE", "WORKERS", "PUBLISH",
                                      "FREE_SLOTS", "LOOKUP", "VALIDATE", "CLEANUP", "CLAIM_TRACE",
                                      "TRACE_OWNER", "TRANSFER_TRACE", "BEGIN_MOVE", "ABORT_MOVE",
                                      "WRITE_TRACE", "RELEASE_TRACE")}
        # Locking: _state_lock guards the connection state below; store calls themselves go
        # through redis-py's thread-safe connection pool.
        self._state_lock = threading.Lock()
        self._incarnation: int | None = None
        self._connected = False
        self._last_error: str = ""
        self._disconnected_since: float | None = time.monotonic()
        self._next_attempt = 0.0
        self._backoff = self.backoff_s[0]
        self._lease_deadline = 0.0  # monotonic time the lease surely ends unless renewed
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._join()
        except StoreUnavailableError:
            pass  # start disconnected; the heartbeat keeps trying
        if heartbeat:
            self._thread = threading.Thread(target=self._heartbeat, name=f"kvtier-store-{worker_id}", daemon=True)
            self._thread.start()
        _OPEN_STORES.add(self)

    # ------------------------------------------------------------ connection state

    @property
    def connected(self) -> bool:
        """True while the store answers and this worker holds a lease on it."""
        return self._connected

    @property
    def incarnation(self) -> int | None:
        """This worker's current incarnation (None until it first joined)."""
        return self._incarnation

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> dict[str, Any]:
        """Connection and lease state, for ``kvtier info`` and logs."""
        with self._state_lock:
            since = self._disconnected_since
            return {
                "worker": self.worker_id, "cluster": self.cluster, "url": self.url,
                "connected": self._connected, "incarnation": self._incarnation,
                "lease_ms": self.lease_ms,
                "lease_left_ms": max(0.0, (self._lease_deadline - time.monotonic()) * 1e3) if self._connected else 0.0,
                "disconnected_s": (time.monotonic() - since) if since is not None else 0.0,
                "last_error": self._last_error, "closed": self._closed,
                "mode": "cluster" if self._connected else "local only (serving from own tiers)",
            }

    def _mark_down(self, error: str) -> None:
        with self._state_lock:
            if self._connected or self._disconnected_since is None:
                self._disconnected_since = time.monotonic()
            self._connected = False
            self._last_error = error
            self._next_attempt = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.backoff_s[1])

    def _mark_up(self) -> None:
        with self._state_lock:
            if not self._connected:
                self._disconnected_since = None
            self._connected = True
            self._backoff = self.backoff_s[0]

    def _call(self, op: str, fn: Callable[[], Any], *, needs_lease: bool = True) -> Any:
        """Run one store round trip, mapping failures to kvtier errors and timing it."""
        if self._closed:
            raise ClosedError(f"{op}: the ClusterStore of {self.worker_id} is closed")
        if needs_lease and not self._connected and self._thread is None and time.monotonic() >= self._next_attempt:
            self._renew_or_rejoin()  # no heartbeat thread: reconnect inline (bounded by timeout_s)
        if needs_lease and not self._connected:
            self.metrics.add("fast_failures")
            raise StoreUnavailableError(
                f"{op}: store {self.url} unreachable (last error: {self._last_error or 'not joined yet'}); "
                f"serving from local tiers, reconnecting with backoff")
        t0 = time.perf_counter()
        try:
            out = fn()
        except (self._redis_mod.ConnectionError, self._redis_mod.TimeoutError, OSError) as e:
            self.metrics.record(op, time.perf_counter() - t0, ok=False)
            self._mark_down(f"{type(e).__name__}: {e}")
            raise StoreUnavailableError(f"{op}: store {self.url} unreachable: {e}") from None
        except self._redis_mod.ResponseError as e:
            self.metrics.record(op, time.perf_counter() - t0, ok=False)
            raise _error_from_reply(op, str(e)) from None
        self.metrics.record(op, time.perf_counter() - t0, ok=True)
        return out

    def _run(self, op: str, script: str, *args: Any, needs_lease: bool = True) -> Any:
        s = self._scripts[script]
        return self._call(op, lambda: s(args=[self.prefix, *args]), needs_lease=needs_lease)

    def _join(self) -> int:
        """Register with a new incarnation (first join, or rejoin after a lost lease/store)."""
        inc = int(self._run("register", "REGISTER", self.worker_id, self.lease_ms, *self._info.to_fields(),
                            needs_lease=False))
        rejoin = self._incarnation is not None
        with self._state_lock:
            self._incarnation = inc
            self._lease_deadline = time.monotonic() + self.lease_ms / 1e3
        self._mark_up()
        if rejoin:
            self.metrics.add("rejoins")
        return inc

    def _renew_or_rejoin(self) -> None:
        """One heartbeat: renew the lease; rejoin if it was lost. Raises StoreUnavailableError."""
        t_sent = time.monotonic()
        if self._incarnation is None:  # the store was down when this worker started
            self._join()
            if self.on_rejoin is not None:
                self.on_rejoin(self)
            return
        ok = int(self._run("renew", "RENEW", self.worker_id, self._incarnation, self.lease_ms, needs_lease=False))
        if ok:
            was_down = not self._connected
            with self._state_lock:
                self._lease_deadline = t_sent + self.lease_ms / 1e3
            self._mark_up()
            self.metrics.add("lease_renewals")
            if was_down:
                self.metrics.add("reconnects")
            return
        was_down = not self._connected
        self._join()
        if was_down:
            self.metrics.add("reconnects")
        if self.on_rejoin is not None:
            self.on_rejoin(self)

    def _heartbeat(self) -> None:
        beats = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._connected:
                wait = self.renew_ms / 1e3
            else:
                wait = max(0.0, self._next_attempt - now)
            if wait and self._stop.wait(wait):
                return
            if self._stop.is_set():
                return
            try:
                self._renew_or_rejoin()
                beats += 1
                if beats % 16 == 0:  # garbage-collect one batch of a dead worker's entries now and then
                    self.cleanup(max_entries=256, max_batches=1)
            except StoreUnavailableError:
                pass  # _mark_down set the backoff
            except KvtierError as e:  # a refusal during cleanup: note it, keep beating
                self._last_error = str(e)
            except Exception as e:  # noqa: BLE001  (the heartbeat must not die; a rejoin callback may raise)
                self._last_error = f"heartbeat: {type(e).__name__}: {e}"

    def renew(self) -> None:
        """Renew the lease now (the heartbeat does this; tests with ``heartbeat=False`` call it)."""
        self._renew_or_rejoin()

    def close(self, leave: bool = True) -> None:
        """Stop the heartbeat; with ``leave``, delete the lease so peers see this worker gone now
        (its entries vanish from lookups at once). Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s * 2 + 1)
        if leave and self._incarnation is not None and self._connected:
            try:
                self._run("leave", "LEAVE", self.worker_id, self._incarnation)
            except (StoreUnavailableError, KvtierError):
                pass
        self._closed = True
        self._connected = False
        self._client.close()

    def __enter__(self) -> ClusterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._connected else f"disconnected ({self._last_error or 'not joined'})"
        return f"ClusterStore(worker={self.worker_id!r}, incarnation={self._incarnation}, {state})"

    # ------------------------------------------------------------ workers

    def update_info(self, info: WorkerInfo) -> None:
        """Publish new worker info (e.g. after the data plane registered its pools)."""
        fields = info.to_fields()
        self._run("update_info", "UPDATE_INFO", self.worker_id, self._incarnation, *fields)
        self._info = info

    def workers(self) -> dict[str, WorkerRecord]:
        """Every live worker, with its info (one round trip)."""
        rows = self._run("workers", "WORKERS")
        out = {}
        for w, inc, flat in rows:
            fields = dict(zip(flat[::2], flat[1::2]))
            out[w.decode()] = WorkerRecord(w.decode(), int(inc), WorkerInfo.from_fields(fields))
        return out

    # ------------------------------------------------------------ block directory

    def publish(self, keys: Any, slots: Any, checksums: Any = None) -> np.ndarray:
        """Record that this worker holds ``keys`` at ``slots`` of its served pool.

        Each slot's generation goes up by one; the new generations come back (``[n]`` uint32).
        ``checksums`` (``[n]`` uint64, optional) travel with the entries so a reader can check
        what it pulled. A slot published again for another key replaces that key's entry.
        Raises :class:`StaleWriteError` if this incarnation is no longer live.
        """
        keys = as_keys(keys)
        n = keys.shape[0]
        rec = np.empty(n, dtype=_PUBLISH_RECORD)
        rec["key"] = keys
        rec["slot"] = _as_u32(slots, n, "slots")
        if checksums is None:
            rec["checksum"] = 0
        else:
            ck = np.asarray(checksums)
            if ck.shape != (n,) or (n and ck.dtype.kind not in "iu"):
                raise InvalidArgumentError(f"checksums must be [{n}] integers, got {ck.shape} {ck.dtype}")
            rec["checksum"] = ck.astype(np.uint64)
        if n == 0:
            return np.empty(0, dtype=np.uint32)
        out = self._run("publish", "PUBLISH", self.worker_id, self._incarnation, rec.tobytes())
        return np.frombuffer(out, dtype="<u4").astype(np.uint32)

    def free_slots(self, slots: Any) -> int:
        """Forget this worker's entries at ``slots`` (freed or about to be reused) and bump their
        generations, so a reader holding an older lookup sees a miss. Call it before the slot is
        overwritten. Returns how many entries went."""
        arr = np.asarray(slots)
        if arr.ndim > 1:
            raise InvalidArgumentError(f"slots must be one-dimensional, got shape {arr.shape}")
        arr = _as_u32(arr.reshape(-1), arr.size, "slots")
        if arr.size == 0:
            return 0
        return int(self._run("free_slots", "FREE_SLOTS", self.worker_id, self._incarnation,
                             arr.astype("<u4").tobytes()))

    def lookup(self, keys: Any) -> Lookup:
        """The live holders of each of ``keys`` (slot, generation, checksum), in one round trip."""
        keys = as_keys(keys)
        t0 = time.perf_counter()
        if keys.shape[0] == 0:
            return Lookup(0, (), np.empty(0, dtype=LOOKUP_RECORD), 0.0)
        names, packed = self._run("lookup", "LOOKUP", keys.astype("<u8").tobytes())
        rtt = time.perf_counter() - t0
        records = np.frombuffer(packed, dtype=LOOKUP_RECORD).copy()
        self.metrics.add("keys_looked_up", keys.shape[0])
        self.metrics.add("records_returned", records.shape[0])
        return Lookup(keys.shape[0], tuple(n.decode() for n in names), records, rtt)

    def validate(self, keys: Any, workers: str | Sequence[str], slots: Any, generations: Any) -> np.ndarray:
        """``[n]`` bool: whether each (key, worker, slot, generation) entry is still current and
        its holder live (one round trip). Read a remote block, then validate: a block whose
        holder freed or reused its slot in between fails here and is a miss. ``workers`` is one
        name for all the entries, or one per entry."""
        keys = as_keys(keys)
        n = keys.shape[0]
        names: dict[str, int] = {}
        if isinstance(workers, str):
            names[check_worker_id(workers)] = 0
            widx = np.zeros(n, dtype=np.uint32)
        else:
            if len(workers) != n:
                raise InvalidArgumentError(f"workers must have {n} entries, got {len(workers)}")
            widx = np.fromiter((names.setdefault(check_worker_id(w), len(names)) for w in workers),
                               dtype=np.uint32, count=n)
        return self._validate(keys, widx, tuple(names), slots, generations)

    def _validate(self, keys: np.ndarray, widx: np.ndarray, names: Sequence[str], slots: Any,
                  generations: Any) -> np.ndarray:
        n = keys.shape[0]
        if n == 0:
            return np.empty(0, dtype=bool)
        rec = np.empty(n, dtype=_VALIDATE_RECORD)
        rec["key"] = keys
        rec["worker"] = widx
        rec["slot"] = _as_u32(slots, n, "slots")
        rec["generation"] = _as_u32(generations, n, "generations")
        out = self._run("validate", "VALIDATE", rec.tobytes(), *names)
        return np.frombuffer(out, dtype=np.uint8).astype(bool)

    def validate_lookup(self, lookup: Lookup, rows: Any, keys: Any) -> np.ndarray:
        """:meth:`validate` for ``rows`` of a :class:`Lookup` made on ``keys`` (no per-row Python)."""
        keys = as_keys(keys)
        if keys.shape[0] != lookup.num_keys:
            raise InvalidArgumentError(f"the lookup was made on {lookup.num_keys} keys, got {keys.shape[0]}")
        rec = lookup.records[np.asarray(rows, dtype=np.int64)]
        return self._validate(keys[rec["key"]], rec["worker"], lookup.workers, rec["slot"], rec["generation"])

    def cleanup(self, max_entries: int = 1024, max_batches: int = 64) -> int:
        """Garbage-collect directory entries of dead (or rejoined) workers, ``max_entries`` per
        script call so the server is never blocked long. Lookups never return such entries
        anyway; this only frees the store's memory. Returns entries removed."""
        removed = 0
        for w in self._client_smembers():
            for _ in range(max_batches):
                n, done = self._run("cleanup", "CLEANUP", w, int(max_entries))
                removed += int(n)
                if int(done):
                    break
        self.metrics.add("cleaned_entries", removed)
        return removed

    def _client_smembers(self) -> list[str]:
        members = self._call("workers", lambda: self._client.smembers(self.prefix + "workers"))
        return sorted(m.decode() for m in members)

    # ------------------------------------------------------------ trace ownership

    def claim_trace(self, trace_id: str) -> int:
        """Own ``trace_id``: returns its fence. Claiming a trace this incarnation already owns
        returns the same fence; a trace whose owner is dead is taken over with a new fence;
        a trace owned by a live worker raises :class:`OwnershipError`."""
        check_trace_id(trace_id)
        return int(self._run("claim_trace", "CLAIM_TRACE", trace_id, self.worker_id, self._incarnation))

    def trace_owner(self, trace_id: str) -> TraceOwner | None:
        """The ownership record of ``trace_id`` (None if nobody claimed it)."""
        check_trace_id(trace_id)
        r = self._run("trace_owner", "TRACE_OWNER", trace_id)
        if r is None:
            return None
        owner, inc, fence, state, target, live = r
        return TraceOwner(trace_id, owner.decode(), int(inc), int(fence), state.decode(),
                          target.decode() or None, bool(int(live)))

    def transfer_trace(self, trace_id: str, from_worker: str, to_worker: str, fence: int) -> int:
        """Move ownership from ``from_worker`` to ``to_worker`` atomically; returns the new fence.

        Refused (:class:`StaleWriteError`) unless ``fence`` is the trace's current fence and
        ``from_worker`` its live owner; refused (:class:`OwnershipError`) if ``to_worker`` is
        not live, or the trace is moving to another worker. After it, ``fence`` is stale:
        the old owner's late writes are refused."""
        check_trace_id(trace_id)
        return int(self._run("transfer_trace", "TRANSFER_TRACE", trace_id, check_worker_id(from_worker),
                             check_worker_id(to_worker), check_fence(fence)))

    def begin_move(self, trace_id: str, to_worker: str, fence: int) -> None:
        """Mark the trace ``moving`` to ``to_worker`` (the owner does not change yet)."""
        check_trace_id(trace_id)
        self._run("begin_move", "BEGIN_MOVE", trace_id, check_worker_id(to_worker), check_fence(fence))

    def abort_move(self, trace_id: str, fence: int) -> None:
        """Back to ``owned`` by the same owner, same fence (idempotent)."""
        check_trace_id(trace_id)
        self._run("abort_move", "ABORT_MOVE", trace_id, check_fence(fence))

    def write_trace(self, trace_id: str, fence: int, fields: Mapping[str, bytes | str | int]) -> None:
        """Write fields of the trace's record under ``fence``; a stale fence is refused."""
        check_trace_id(trace_id)
        flat: list[Any] = []
        for k, v in fields.items():
            if not isinstance(k, str) or not k:
                raise InvalidArgumentError(f"trace field names must be non-empty str, got {k!r}")
            flat += [k, v]
        self._run("write_trace", "WRITE_TRACE", trace_id, check_fence(fence), *flat)

    def read_trace(self, trace_id: str) -> dict[str, bytes]:
        """The fields written with :meth:`write_trace`."""
        check_trace_id(trace_id)
        raw = self._call("read_trace", lambda: self._client.hgetall(f"{self.prefix}t:{trace_id}"))
        return {k[2:].decode(): v for k, v in raw.items() if k.startswith(b"d:")}

    def release_trace(self, trace_id: str, fence: int) -> None:
        """Delete the trace's record (the trace ended)."""
        check_trace_id(trace_id)
        self._run("release_trace", "RELEASE_TRACE", trace_id, check_fence(fence))


def probe_store(url: str, cluster: str = "default", timeout_s: float = 0.5) -> dict[str, Any]:
    """Is the store at ``url`` reachable (one PING and one read, each bounded by ``timeout_s``)?

    Returns ``reachable``, ``server`` (Redis version), ``live_workers`` (of ``cluster``) and
    ``error``. Never raises for an unreachable store (``kvtier info`` calls it).
    """
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        return {"reachable": False, "server": "", "live_workers": 0, "error": "the Redis client is not installed"}
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0))
    except ValueError as e:
        return {"reachable": False, "server": "", "live_workers": 0, "error": f"bad url {url!r}: {e}"}
    try:
        version = client.info("server").get("redis_version", "?")
        prefix = f"kvt:{{{cluster}}}:"
        members = client.smembers(prefix + "workers")
        live = sum(1 for v in client.mget([prefix + "w:" + m.decode() + ":live" for m in members]) if v) if members else 0
        return {"reachable": True, "server": str(version), "live_workers": live, "error": ""}
    except (redis.RedisError, OSError) as e:
        return {"reachable": False, "server": "", "live_workers": 0, "error": f"{type(e).__name__}: {e}"}
    finally:
        client.close()


def new_worker_id(prefix: str = "w") -> str:
    """A random worker id (for tools and tests that need a fresh one)."""
    return f"{prefix}-{secrets.token_hex(4)}"
