"""One process's member of a kvtier cluster: its store, its UCX peer, its cache's DRAM pool.

:class:`ClusterWorker` ties together, in one process (see docs/cluster.md, "Remote tier"):

- a :class:`~kvtier.cluster.metadata.ClusterStore` (lease, published :class:`WorkerInfo`, the
  block directory, trace ownership);
- a :class:`~kvtier.cluster.peer.Peer` (the UCX data plane, on its own copy engine);
- the DRAM :class:`~kvtier.HostPool` of a :class:`~kvtier.TieredCache`, registered with the peer:
  it is the pool other workers pull from.

It keeps the store's directory in step with the DRAM tier: a block that lands in DRAM (a store, a
demotion, a promotion from NVMe, a pulled remote block) is published with its XXH3-64 checksum,
and a DRAM slot the cache frees is freed in the store before the pool hands it out again
(``free_slots`` runs from the pool's ``allocate``). Both are batched: one store round trip per
flush (the end of a cache operation, or the service thread's tick), never one per block.

If the store is unreachable the worker keeps serving from its own tiers: lookups skip the remote
tier, publishes and frees wait for the store (a slot reused meanwhile fails its checksum at a
reader), and :meth:`ClusterWorker.status` / the cache's metrics say so.

Remote blocks are found with ONE store lookup for the part of a prefix that missed locally
(:meth:`lookup_remote`), pulled with one-sided ``Peer.get`` into local DRAM slots, then checked:
the checksum of the bytes against the published one, and the generation with ``validate``. A
block failing either is a miss (:meth:`pull`).

Migration across processes: :class:`UcxMover` is the :class:`~kvtier.cluster.migration.Migration`
mover that pulls each batch over UCX; :meth:`request_migration` (the source) pushes a request on
the target's mailbox (a Redis list, ``BLPOP``-ed by the target's service thread) and waits for
the reply on a reply list; the target runs the migration (dedup against everything it caches) and
commits ownership.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.cluster.metadata import (
    ClusterStore,
    OwnershipError,
    StaleWriteError,
    StoreUnavailableError,
    WorkerInfo,
    as_keys,
    check_fence,
    check_trace_id,
    check_worker_id,
)
from kvtier.cluster.migration import Migration, MigrationError, MigrationResult, MigrationState, PullBatch
from kvtier.cluster.peer import Peer, RemotePeer, RemotePool
from kvtier.errors import ClosedError, InvalidArgumentError, KvtierError
from kvtier.memory import HostPool

if TYPE_CHECKING:
    from kvtier.cache import TieredCache
    from kvtier.trace import TraceManager

__all__ = ["ClusterWorker", "PullOutcome", "RemoteMatch", "UcxMover", "UnknownWorkerError", "WorkerMetrics"]

DRAM = 1


class UnknownWorkerError(InvalidArgumentError):
    """The named worker is not live in the cluster store (never joined, left, or its lease lapsed)."""


@dataclass
class WorkerMetrics:
    """What the worker did with the cluster. Counters only grow."""

    published_blocks: int = 0
    freed_slots: int = 0
    publish_batches: int = 0
    free_batches: int = 0
    store_errors: int = 0  # store round trips that failed (unreachable, stale)
    connects: int = 0
    peer_drops: int = 0  # cached RemotePeer/RemotePool dropped (peer failed, new incarnation)
    pull_batches: int = 0
    pull_failures: int = 0  # blocks whose transfer failed
    migrations_served: int = 0
    migrations_committed: int = 0
    migrations_requested: int = 0
    mailbox_errors: int = 0
    last_migration: dict[str, Any] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RemoteMatch:
    """The remote continuation of a prefix: ``keys[i]`` is held by ``workers[rows[i]["worker"]]``
    at ``rows[i]["slot"]`` with generation and checksum (one row per key, in prefix order)."""

    keys: np.ndarray  # [m, 2] uint64
    workers: tuple[str, ...]
    rows: np.ndarray  # [m] LOOKUP_RECORD
    rtt_s: float

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass
class PullOutcome:
    """What :meth:`ClusterWorker.pull` got: ``ok[i]``: block i is in ``slots[i]``, checked."""

    ok: np.ndarray  # [m] bool
    transfer_failed: int = 0
    checksum_failed: int = 0
    validation_failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    store_rtt_s: float = 0.0


class _HookedPool(HostPool):
    """The cache's DRAM pool as the worker sees it: the same C++ pool (same ``_core``), whose
    ``allocate`` first frees reused slots in the store and whose ``free`` records the slots."""

    def __init__(self, pool: HostPool, worker: ClusterWorker) -> None:  # noqa: D107 (no super init)
        self._core = pool._core
        self.layout = pool.layout
        self._worker = worker

    def allocate(self, n: int) -> np.ndarray:
        self._worker.flush_frees()  # Note: free_slots before a published slot is reused
        return super().allocate(n)

    def free(self, ids: Any) -> None:
        super().free(ids)
        self._worker._on_freed(np.asarray(ids, dtype=np.int64).reshape(-1))


class _HookedIndex:
    """The cache's BlockIndex, forwarding everything; inserts and relocations into DRAM are
    recorded as blocks to publish."""

    def __init__(self, index: Any, worker: ClusterWorker) -> None:
        self._index = index
        self._worker = worker

    def insert(self, keys: Any, tier: int, blocks: Any) -> None:
        self._index.insert(keys, tier, blocks)
        if tier == DRAM:
            self._worker._on_resident(keys, blocks)

    def relocate(self, keys: Any, tier: int, blocks: Any) -> None:
        self._index.relocate(keys, tier, blocks)
        if tier == DRAM:
            self._worker._on_resident(keys, blocks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)


class _OwnerView:
    """The source's side of a :class:`Migration` as the target sees it: the fenced trace
    operations (which need the fence, not the source's connection) through the target's store."""

    def __init__(self, store: ClusterStore, source: str) -> None:
        self._store = store
        self.worker_id = check_worker_id(source)

    def begin_move(self, trace_id: str, to_worker: str, fence: int) -> None:
        self._store.begin_move(trace_id, to_worker, fence)

    def abort_move(self, trace_id: str, fence: int) -> None:
        self._store.abort_move(trace_id, fence)

    def transfer_trace(self, trace_id: str, from_worker: str, to_worker: str, fence: int) -> int:
        return self._store.transfer_trace(trace_id, from_worker, to_worker, fence)

    def trace_owner(self, trace_id: str) -> Any:
        return self._store.trace_owner(trace_id)


def _enc_keys(keys: np.ndarray) -> str:
    return base64.b64encode(as_keys(keys).astype("<u8").tobytes()).decode()


def _dec_keys(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<u8").astype(np.uint64).reshape(-1, 2)


class ClusterWorker:
    """This process's cluster member: store + UCX peer + the cache's DRAM pool (one per process).

    Args:
        url: the Redis store (``redis://host:port/db``).
        worker_id: this worker's name in the cluster.
        cache: the :class:`~kvtier.TieredCache` whose DRAM tier is served to peers (it needs one).
        cluster: the store namespace.
        lease_ms / timeout_s: the store lease and per-call bound (:class:`ClusterStore`).
        peer: a :class:`Peer` to use (default: a new one with its own copy engine).
        tls / net_devices: UCX settings for a new peer (``"posix,cma,tcp"`` keeps peer error
            handling on shared memory; ``net_devices="lo"`` for one machine).
        transfer_timeout_s: the deadline of every remote transfer (a hung peer fails it).
        service: run the service thread (mailbox for migrations, periodic flush, retries).
        traces: a :class:`~kvtier.TraceManager` on ``cache``: migrated traces are adopted there.
        mailbox_poll_s: how long one ``BLPOP`` of the service thread waits.

    Raises :class:`~kvtier.errors.InvalidArgumentError` for a cache without a DRAM tier or a
    simulated backend, :class:`~kvtier.errors.UnavailableError` without UCX.
    """

    def __init__(self, url: str, worker_id: str, cache: TieredCache, *, cluster: str = "default",
                 lease_ms: int = 3000, timeout_s: float = 0.5, peer: Peer | None = None,
                 tls: str | None = "posix,cma,tcp", net_devices: str | None = None,
                 transfer_timeout_s: float = 10.0, service: bool = True,
                 traces: TraceManager | None = None, mailbox_poll_s: float = 0.1) -> None:
        from kvtier.transfer import CopyEngine

        pool = cache.pools[DRAM] if len(cache.pools) > DRAM else None
        if not isinstance(pool, HostPool):
            raise InvalidArgumentError("a ClusterWorker serves the cache's DRAM tier: give the cache dram_bytes > 0")
        if not isinstance(cache.engine, CopyEngine):
            raise InvalidArgumentError("a ClusterWorker needs a cache on real pools (not a simulated backend)")
        if getattr(cache, "cluster", None) is not None:
            raise InvalidArgumentError("this cache already has a ClusterWorker attached")
        if not transfer_timeout_s > 0:
            raise InvalidArgumentError(f"transfer_timeout_s must be > 0, got {transfer_timeout_s!r}")
        self.worker_id = check_worker_id(worker_id)
        self.cache = cache
        self.traces = traces
        self.transfer_timeout_s = float(transfer_timeout_s)
        self.mailbox_poll_s = float(mailbox_poll_s)
        self.metrics = WorkerMetrics()
        self._own_peer = peer is None
        # The peer gets its own copy engine (Peer's default, the tested lifecycle: closing the peer
        # closes its engine), not the cache's, which outlives the peer.
        self.peer = peer if peer is not None else Peer(tls=tls, net_devices=net_devices,
                                                       transfer_timeout_s=transfer_timeout_s)
        self._raw_pool = pool
        self.pool = _HookedPool(pool, self)
        n = pool.num_blocks
        self.block_bytes = pool.block_bytes
        # Directory tracking, one row per DRAM slot (numpy, no per-block Python).
        self._want = np.zeros(n, dtype=bool)  # the cache holds a block here: publish it
        self._want_key = np.zeros((n, 2), dtype=np.uint64)
        self._published = np.zeros(n, dtype=bool)  # the store holds our entry for this slot
        self._pub_key = np.zeros((n, 2), dtype=np.uint64)
        self._dirty = np.zeros(n, dtype=bool)  # freed here, not yet freed in the store
        self._track = threading.RLock()
        self._pending = False  # something changed since the last flush
        self._remotes: dict[str, tuple[int, RemotePeer, RemotePool]] = {}
        self._remotes_lock = threading.Lock()
        self._unsure: list[Migration] = []
        self._scratch: HostPool | None = None  # full-resend migrations land here (pull_trace)
        self._resend_s = 0.0
        self._closed = False
        try:
            self.descriptor = self.peer.register(pool)
            self.store = ClusterStore(
                url, worker_id,
                WorkerInfo(ucx_address=self.peer.address, rkeys=self.descriptor, capacity_blocks=n,
                           block_bytes=pool.block_bytes),
                cluster=cluster, lease_ms=lease_ms, timeout_s=timeout_s, on_rejoin=self._on_rejoin)
        except BaseException:
            if self._own_peer:
                self.peer.close()
            raise
        self._mailbox_key = self.store.prefix + f"mb:{worker_id}"
        import redis

        # Mailbox clients: a BLPOP outlives the store client's short socket timeout.
        self._redis = redis
        self._mb_client = redis.Redis.from_url(url, socket_timeout=None, socket_connect_timeout=timeout_s,
                                               health_check_interval=0, decode_responses=False)
        cache.attach_cluster(self)  # attach before the cache fills: blocks already in DRAM are not published
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if service:
            self._thread = threading.Thread(target=self._serve, name=f"kvtier-worker-{worker_id}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ status

    @property
    def connected(self) -> bool:
        return self.store.connected

    def status(self) -> dict[str, Any]:
        """The store's state (connected, or DISCONNECTED and serving from its own tiers), the
        directory's backlog and the counters."""
        st = self.store.status()
        with self._track:
            backlog = {"to_publish": int((self._want & ~(self._published & self._same_key())).sum()),
                       "to_free": int(self._dirty.sum()), "published": int(self._published.sum())}
        mode = "cluster" if st.get("connected") else "DISCONNECTED: serving from its own tiers"
        return {"worker": self.worker_id, "mode": mode, "store": st, "directory": backlog,
                "peers": sorted(self._remotes), "metrics": self.metrics.snapshot()}

    def _same_key(self) -> np.ndarray:
        return np.all(self._pub_key == self._want_key, axis=1)

    # ------------------------------------------------------------------ directory upkeep

    def _on_resident(self, keys: Any, blocks: Any) -> None:
        slots = np.asarray(blocks, dtype=np.int64).reshape(-1)
        with self._track:
            self._want[slots] = True
            self._want_key[slots] = np.asarray(keys, dtype=np.uint64).reshape(-1, 2)
            self._pending = True

    def _on_freed(self, slots: np.ndarray) -> None:
        with self._track:
            self._want[slots] = False
            self._dirty[slots] |= self._published[slots]
            self._pending = True

    def flush_frees(self) -> int:
        """Free in the store the published slots the cache freed (one round trip); returns how many.
        Runs before the pool hands out slots. A store that does not answer is skipped (the entries'
        checksums then protect readers; the lease or the next flush clears them)."""
        with self._track:
            if not self._dirty.any():
                return 0
            slots = np.flatnonzero(self._dirty)
            try:
                self.store.free_slots(slots)
            except (StoreUnavailableError, StaleWriteError):
                self.metrics.store_errors += 1
                self._pending = True
                return 0
            self._dirty[slots] = False
            self._published[slots] = False
            self.metrics.freed_slots += len(slots)
            self.metrics.free_batches += 1
            return len(slots)

    def flush(self) -> int:
        """Bring the store's directory in step with the DRAM tier: frees, then publishes of the
        blocks that landed in DRAM since the last flush, with their checksums (two round trips
        at most). Returns the blocks published."""
        with self._track:
            if not self._pending:
                return 0
            self._pending = False
            self.flush_frees()
            todo = np.flatnonzero(self._want & ~(self._published & self._same_key()))
            if len(todo) == 0:
                return 0
            keys = self._want_key[todo].copy()
            checksums = self._raw_pool.checksums(todo.astype(np.int32))
            try:
                self.store.publish(keys, todo, checksums)
            except (StoreUnavailableError, StaleWriteError):
                self.metrics.store_errors += 1
                self._pending = True  # try again at the next flush
                return 0
            self._published[todo] = True
            self._pub_key[todo] = keys
            self._dirty[todo] = False  # the publish replaced whatever entry the slot had
            self.metrics.published_blocks += len(todo)
            self.metrics.publish_batches += 1
            return len(todo)

    def _on_rejoin(self, store: ClusterStore) -> None:
        # A new incarnation: none of our old entries is visible; publish everything again.
        with self._track:
            self._published[:] = False
            self._dirty[:] = False
            self._pending = True
        try:
            self.flush()
        except KvtierError:
            pass

    def _adopt(self, keys: np.ndarray, slots: np.ndarray) -> int:
        """Pulled blocks the store already lists at ``slots`` (a migration published them) join
        the DRAM tier; keys the cache got meanwhile give their slot back. Returns blocks adopted."""
        if len(keys) == 0:
            return 0
        cache = self.cache
        with cache._lock, self._track:
            self._published[slots] = True
            self._pub_key[slots] = keys
            self._dirty[slots] = False  # the migration's publish replaced the slots' old entries
            new = cache.index._index.contains(keys) == 0
            if new.any():
                cache.index._index.insert(keys[new], DRAM, slots[new].astype(np.int32))
                self._want[slots[new]] = True
                self._want_key[slots[new]] = keys[new]
            if (~new).any():
                self.pool.free(slots[~new].astype(np.int32))
                self.flush_frees()
            return int(new.sum())

    # ------------------------------------------------------------------ peers

    def remote_pool(self, worker_id: str) -> RemotePool:
        """The DRAM pool ``worker_id`` serves, connected lazily from its published info and
        cached; a failed peer or a new incarnation reconnects. Raises
        :class:`UnknownWorkerError` (not live), ``InvalidArgumentError`` (a bad published
        address or descriptor, naming the worker), ``StoreUnavailableError``."""
        self._check_open()
        check_worker_id(worker_id)
        if worker_id == self.worker_id:
            raise InvalidArgumentError(f"{worker_id!r} is this worker: its pool is local")
        with self._remotes_lock:
            cached = self._remotes.get(worker_id)
            if cached is not None and cached[1].alive:
                return cached[2]
            if cached is not None:
                self._remotes.pop(worker_id, None)
                self.metrics.peer_drops += 1
        live = self.store.workers()
        rec = live.get(worker_id)
        if rec is None:
            raise UnknownWorkerError(f"worker {worker_id!r} is not live in the cluster store "
                                     f"(live: {sorted(live)})")
        info = rec.info
        if not info.ucx_address or not info.rkeys:
            raise InvalidArgumentError(f"worker {worker_id!r} published no UCX address or pool descriptor")
        try:
            rp = self.peer.connect(info.ucx_address)
            pool = rp.import_pool(info.rkeys)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"worker {worker_id!r} published a bad UCX address or descriptor: {e}") from e
        if pool.block_bytes != self.block_bytes:
            raise InvalidArgumentError(f"worker {worker_id!r} serves {pool.block_bytes}-byte blocks, "
                                       f"this worker {self.block_bytes}-byte ones")
        with self._remotes_lock:
            self._remotes[worker_id] = (rec.incarnation, rp, pool)
        self.metrics.connects += 1
        return pool

    def refresh_peers(self) -> int:
        """Drop cached peers that are no longer live or live under a new incarnation (one
        ``workers()`` round trip; the service thread runs it once per lease). Returns how many."""
        live = self.store.workers()
        with self._remotes_lock:
            stale = [w for w, (inc, rp, _) in self._remotes.items()
                     if w not in live or live[w].incarnation != inc or not rp.alive]
            for w in stale:
                del self._remotes[w]
            self.metrics.peer_drops += len(stale)
        return len(stale)

    def drop_peer(self, worker_id: str) -> None:
        """Forget the cached endpoint and pool of ``worker_id`` (reconnect on next use)."""
        with self._remotes_lock:
            if self._remotes.pop(worker_id, None) is not None:
                self.metrics.peer_drops += 1

    # ------------------------------------------------------------------ remote tier

    def lookup_remote(self, keys: Any) -> RemoteMatch | None:
        """ONE store lookup of ``keys`` (the part of a prefix that missed locally): the longest
        leading run held by some other live worker, one holder per key. None when the store does
        not answer (the cache then serves from its own tiers)."""
        keys = as_keys(keys)
        if self._closed or not self.store.connected:
            self.cache.metrics.remote["store_unavailable"] += 1
            return None
        try:
            lk = self.store.lookup(keys)
        except StoreUnavailableError:
            self.cache.metrics.remote["store_unavailable"] += 1
            return None
        self.cache.metrics.remote["store_rtt_s"] += lk.rtt_s
        self.cache.metrics.remote["lookups"] += 1
        rec = lk.records
        if self.worker_id in lk.workers:
            rec = rec[rec["worker"] != lk.workers.index(self.worker_id)]
        held = np.zeros(keys.shape[0], dtype=bool)
        uniq, first = np.unique(rec["key"], return_index=True)
        held[uniq] = True
        m = keys.shape[0] if held.all() else int(np.argmin(held))
        rows = rec[first][:m]  # keys 0..m-1 all held: the first m unique rows are theirs, in order
        return RemoteMatch(keys[:m], lk.workers, rows, lk.rtt_s)

    def pull(self, match: RemoteMatch, slots: np.ndarray) -> PullOutcome:
        """Pull ``match``'s blocks into local DRAM ``slots`` (allocated by the caller) with
        one-sided gets, all holders in flight together; then check each block's checksum and
        generation (one ``validate`` round trip). ``ok[i]`` False: a miss (the slot holds garbage)."""
        m = len(match)
        t0 = time.perf_counter()
        out = PullOutcome(ok=np.zeros(m, dtype=bool))
        if m == 0:
            return out
        slots = np.asarray(slots, dtype=np.int32)
        rows = match.rows
        transferred = np.zeros(m, dtype=bool)
        handles = []
        for w in np.unique(rows["worker"]):
            sel = np.flatnonzero(rows["worker"] == w)
            name = match.workers[int(w)]
            try:
                remote = self.remote_pool(name)
                h = self.peer.get(remote, rows["slot"][sel].astype(np.int32), self._raw_pool, slots[sel])
                handles.append((name, sel, h))
            except (KvtierError, OSError):
                self.drop_peer(name)
        for name, sel, h in handles:
            try:
                h.wait(self.transfer_timeout_s + 1.0)
                transferred[sel] = True
            except KvtierError:
                self.drop_peer(name)
        self.metrics.pull_batches += len(handles)
        out.transfer_failed = int((~transferred).sum())
        self.metrics.pull_failures += out.transfer_failed
        ck_ok = transferred.copy()
        if transferred.any():
            ck = self._raw_pool.checksums(slots[transferred])
            ck_ok[transferred] = ck == rows["checksum"][transferred]
            for w in np.unique(rows["worker"][transferred & ~ck_ok]):
                self.drop_peer(match.workers[int(w)])  # maybe a new incarnation: reconnect next time
        out.checksum_failed = int((transferred & ~ck_ok).sum())
        ok = ck_ok
        if ok.any():
            r = rows[ok]
            t1 = time.perf_counter()
            try:
                valid = self.store._validate(match.keys[ok], r["worker"].astype(np.uint32), match.workers,
                                             r["slot"], r["generation"])
            except (StoreUnavailableError, StaleWriteError):
                valid = np.zeros(int(ok.sum()), dtype=bool)  # cannot check the generation: a miss
            out.store_rtt_s = time.perf_counter() - t1
            out.validation_failed = int((~valid).sum())
            ok[np.flatnonzero(ok)[~valid]] = False
        out.ok = ok
        out.bytes = int(transferred.sum()) * self.block_bytes
        out.seconds = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ migration

    def pull_trace(self, trace_id: str, keys: Any, source: str, fence: int,
                   tail: dict[str, Any] | None = None, dedup: bool = True) -> MigrationResult:
        """The target's side of a migration (run by the service thread for a mailbox request):
        keys this cache holds in any tier are present; the rest go through :class:`Migration`
        with a :class:`UcxMover` (plan, prepare, pull, validate, publish, commit). Pulled blocks
        join the DRAM tier even if the commit fails (valid KV, found by content).

        ``dedup=False`` (the full-resend baseline that ``kvtier replay --workers`` measures dedup
        against): the present blocks the source serves are pulled as well, into a scratch pool,
        checked against their checksums and dropped (the target keeps its own copies); they count
        in ``bytes_moved`` and ``blocks_resent``."""
        check_trace_id(trace_id)
        keys = as_keys(keys)
        t0 = time.perf_counter()
        with self.cache._lock:
            local = self.cache.locate(keys)[0] != 255 if len(keys) else np.zeros(0, dtype=bool)
        resent = 0
        if not dedup and local.any():
            resent = self._resend(keys[local], source)
        mover = UcxMover(self)
        mig = Migration(trace_id, keys[~local], _OwnerView(self.store, source), self.store, fence, mover,
                        discard=mover.discard, block_bytes=self.block_bytes)
        result = mig.run()
        if mig.state is MigrationState.UNKNOWN:
            try:
                mig.resolve()
                result = mig.result()
            except KvtierError:
                pass
        if mig.moved_keys.shape[0]:
            self._adopt(mig.moved_keys, mig.moved_slots)
        if mig.unsure_slots.size:
            self._unsure.append(mig)
        result.blocks_total = int(keys.shape[0])
        result.blocks_present += int(local.sum()) - resent
        result.blocks_resent = resent
        result.bytes_moved += resent * self.block_bytes
        if resent:
            result.timings_s["resend"] = self._resend_s
        result.timings_s["total"] = time.perf_counter() - t0
        self.metrics.migrations_served += 1
        if result.state is MigrationState.COMMITTED:
            self.metrics.migrations_committed += 1
            if self.traces is not None:
                with self.cache._lock:
                    self.traces.adopt(trace_id, keys, tail or {}, fence=result.fence)
        self.metrics.last_migration = _result_dict(result)
        return result

    def reserve_resend(self, blocks: int) -> None:
        """Allocate and register the scratch pool full-resend migrations land in (``dedup=False``)
        now, so that a migration's time does not include making it. It grows on demand."""
        if blocks <= 0:
            raise InvalidArgumentError(f"blocks must be > 0, got {blocks!r}")
        if self._scratch is None or self._scratch.num_blocks < blocks:
            if self._scratch is not None:
                self.peer.unregister(self._scratch)
            self._scratch = HostPool(self.block_bytes, num_blocks=int(blocks))
            self.peer.register(self._scratch)

    def _resend(self, keys: np.ndarray, source: str) -> int:
        """Pull again the blocks of ``keys`` that ``source`` serves (one lookup, one batched get
        into a registered scratch pool, checksums checked), then drop them; returns how many."""
        t0 = time.perf_counter()
        self._resend_s = 0.0
        lk = self.store.lookup(keys)
        if source not in lk.workers:
            return 0
        rec = lk.records[lk.records["worker"] == lk.workers.index(source)]
        if rec.size == 0:
            return 0
        n = int(rec.shape[0])
        self.reserve_resend(n)
        dst = self._scratch.allocate(n)
        try:
            remote = self.remote_pool(source)
            h = self.peer.get(remote, rec["slot"].astype(np.int32), self._scratch, dst)
            try:
                h.wait(self.transfer_timeout_s + 1.0)
            except KvtierError:
                self.drop_peer(source)
                raise
            bad = self._scratch.checksums(dst) != rec["checksum"]
            if bad.any():
                raise MigrationError(f"{int(bad.sum())} of {n} blocks resent by {source!r} fail their checksum")
        finally:
            self._scratch.free(dst)
        self._resend_s = time.perf_counter() - t0
        return n

    def request_migration(self, trace_id: str, keys: Any, target: str, fence: int, *,
                          timeout_s: float = 10.0, tail: dict[str, Any] | None = None,
                          dedup: bool = True) -> MigrationResult:
        """The source's side: ask ``target`` (through its mailbox) to pull and take over
        ``trace_id``, whose owner this worker is under ``fence``; wait for its reply.

        No reply within ``timeout_s`` (the target is dead, hung or slow): the source fences the
        target out (``abort_move``, then a transfer to itself: a new fence the target's late
        commit cannot pass) and the store's record decides: ABORTED (this worker keeps the trace
        with the new fence in ``result.fence``) or COMMITTED (the target's commit got in first).
        ``dedup=False`` asks the target to pull every block the source serves, even those it
        holds (the full-resend baseline; :meth:`pull_trace`).
        Raises :class:`UnknownWorkerError` when ``target`` is not live."""
        self._check_open()
        check_trace_id(trace_id)
        check_worker_id(target)
        check_fence(fence)
        if target == self.worker_id:
            raise InvalidArgumentError(f"cannot migrate trace {trace_id!r} to {target!r}: it is this worker")
        if not timeout_s > 0:
            raise InvalidArgumentError(f"timeout_s must be > 0, got {timeout_s!r}")
        keys = as_keys(keys)
        live = self.store.workers()
        if target not in live:
            raise UnknownWorkerError(f"worker {target!r} is not live in the cluster store (live: {sorted(live)})")
        self.metrics.migrations_requested += 1
        rid = uuid.uuid4().hex
        reply_key = self.store.prefix + f"mbr:{rid}"
        payload = json.dumps({"id": rid, "trace": trace_id, "source": self.worker_id, "fence": int(fence),
                              "keys": _enc_keys(keys), "reply": reply_key, "tail": tail or {}, "dedup": bool(dedup),
                              "deadline": time.time() + timeout_s}).encode()
        mailbox = self.store.prefix + f"mb:{target}"
        t0 = time.perf_counter()
        try:
            self._mb_client.rpush(mailbox, payload)
            left = max(0.01, timeout_s - (time.perf_counter() - t0))
            item = self._mb_client.blpop([reply_key], timeout=left)
        except self._redis.RedisError as e:
            self.metrics.mailbox_errors += 1
            item = None
            err = f"mailbox: {type(e).__name__}: {e}"
        else:
            err = f"no reply from {target!r} within {timeout_s} s"
        if item is not None:
            res = _result_from_dict(json.loads(item[1]))
            res.timings_s["request"] = time.perf_counter() - t0
            return res
        try:
            self._mb_client.lrem(mailbox, 1, payload)  # not picked up yet: never will be
        except self._redis.RedisError:
            pass
        return self._settle(trace_id, target, keys, fence, err, time.perf_counter() - t0)

    def _settle(self, trace_id: str, target: str, keys: np.ndarray, fence: int, err: str,
                waited: float) -> MigrationResult:
        res = MigrationResult(trace_id=trace_id, source=self.worker_id, target=target,
                              state=MigrationState.UNKNOWN, owner=None, fence=None,
                              blocks_total=int(keys.shape[0]), error=err, timings_s={"request": waited})
        try:
            try:
                self.store.abort_move(trace_id, fence)
            except (StaleWriteError, OwnershipError):
                pass
            new_fence = self.store.transfer_trace(trace_id, self.worker_id, self.worker_id, fence)
            res.state, res.owner, res.fence = MigrationState.ABORTED, self.worker_id, new_fence
        except (StaleWriteError, OwnershipError):
            owner = self.store.trace_owner(trace_id)
            if owner is not None and owner.owner == target:
                res.state, res.owner = MigrationState.COMMITTED, target
            else:
                res.state = MigrationState.ABORTED
                res.owner = owner.owner if owner is not None else None
        except StoreUnavailableError as e:
            res.error += f"; store: {e}"
        return res

    # ------------------------------------------------------------------ service thread

    def _serve(self) -> None:
        next_refresh = time.monotonic()
        while not self._stop.is_set():
            try:
                item = self._mb_client.blpop([self._mailbox_key], timeout=self.mailbox_poll_s)
            except self._redis.RedisError:
                self.metrics.mailbox_errors += 1
                self._stop.wait(0.2)
                item = None
            except Exception:  # closed under us
                if self._stop.is_set():
                    return
                raise
            if self._stop.is_set():
                return
            if item is not None:
                self._handle(item[1])
            try:
                with self.cache._lock:
                    self.flush()
                for mig in list(self._unsure):
                    if mig.release_unsure():
                        self._unsure.remove(mig)
                if self._remotes and time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.store.lease_ms / 1000
                    self.refresh_peers()
            except KvtierError:
                pass

    def _handle(self, raw: bytes) -> None:
        try:
            req = json.loads(raw)
            reply = req["reply"]
        except (ValueError, KeyError, TypeError):
            self.metrics.mailbox_errors += 1
            return
        try:
            if time.time() > float(req["deadline"]):
                raise MigrationError(f"request {req['id']} expired before it was picked up")
            res = self.pull_trace(req["trace"], _dec_keys(req["keys"]), req["source"], int(req["fence"]),
                                  req.get("tail") or {}, dedup=bool(req.get("dedup", True)))
            out = _result_dict(res)
        except (KvtierError, ValueError, KeyError, TypeError) as e:
            out = {"trace_id": str(req.get("trace")), "source": str(req.get("source")), "target": self.worker_id,
                   "state": MigrationState.ABORTED.value, "owner": str(req.get("source")),
                   "fence": req.get("fence"), "error": f"{type(e).__name__}: {e}"}
        try:
            self._mb_client.rpush(reply, json.dumps(out).encode())
            self._mb_client.pexpire(reply, 60_000)
        except self._redis.RedisError:
            self.metrics.mailbox_errors += 1

    # ------------------------------------------------------------------ life cycle

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"cluster worker {self.worker_id!r} was closed")

    def close(self, leave: bool = True) -> None:
        """Stop the service thread, leave the store (entries vanish), unregister the pool, close
        the peer if this worker made it."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.mailbox_poll_s + 5.0)
        self.cache.detach_cluster(self)
        self.store.close(leave=leave)
        try:
            self.peer.drain()
            self.peer.unregister(self._raw_pool)
            if self._scratch is not None:
                self.peer.unregister(self._scratch)
        except KvtierError:
            pass
        if self._own_peer:
            self.peer.close()
        try:
            self._mb_client.close()
        except Exception:
            pass

    def __enter__(self) -> ClusterWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ClusterWorker({self.worker_id!r}, {'closed' if self._closed else self.store!r})"


class UcxMover:
    """The cross-process :class:`~kvtier.cluster.migration.Migration` mover: allocates target
    slots in the local DRAM pool and pulls each :class:`PullBatch` with ``Peer.get`` straight from
    the holder's registered pool (no staging); the bytes must match the batch's checksums. On any
    failure the slots go back and the error propagates (the migration aborts)."""

    def __init__(self, worker: ClusterWorker) -> None:
        self.worker = worker
        self.batches = 0
        self.bytes = 0

    def __call__(self, batch: PullBatch) -> np.ndarray:
        w = self.worker
        n = len(batch)
        with w.cache._lock:
            free = w.cache.tier_free_blocks(DRAM)
            if free < n:
                w.cache.make_room(DRAM, n)
            dst = w.pool.allocate(n)
        try:
            remote = w.remote_pool(batch.source)
            h = w.peer.get(remote, batch.source_slots.astype(np.int32), w._raw_pool, dst)
            try:
                h.wait(w.transfer_timeout_s + 1.0)
            except KvtierError:
                w.drop_peer(batch.source)
                raise
            bad = w._raw_pool.checksums(dst) != batch.checksums
            if bad.any():
                raise MigrationError(f"{int(bad.sum())} of {n} blocks pulled from {batch.source!r} fail their "
                                     f"checksum (first: key index {int(batch.key_index[np.argmax(bad)])})")
        except BaseException:
            self.discard(dst)
            raise
        self.batches += 1
        self.bytes += n * w.block_bytes
        return dst

    def discard(self, slots: np.ndarray) -> None:
        with self.worker.cache._lock:
            self.worker.pool.free(np.asarray(slots, dtype=np.int32))


def _result_dict(r: MigrationResult) -> dict[str, Any]:
    d = asdict(r)
    d["state"] = r.state.value
    return d


def _result_from_dict(d: dict[str, Any]) -> MigrationResult:
    d = dict(d)
    d["state"] = MigrationState(d.get("state", "aborted"))
    known = set(MigrationResult.__dataclass_fields__)
    return MigrationResult(**{k: v for k, v in d.items() if k in known})

