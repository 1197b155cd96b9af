"""Trace migration, store side: dedup planning and the ownership-move state machine.

A trace parked in its tool-call gap moves from its owner (the *source*) to another worker (the
*target*):

1. **plan**: one lookup of the trace's block keys (one store round trip) tells which blocks the
   target already holds (shared prefixes usually are: nothing to send) and, for the rest, which
   live worker to pull each from (the source first, else any other live holder).
2. **prepare**: the source marks the trace ``moving`` to the target under its fence. The owner
   does not change: one owner at any moment.
3. **move**: the injected mover copies each batch of blocks into the target's pool (the UCX data
   plane across processes; :class:`PoolMover` in one process). Then the target *validates* what
   it pulled against the directory (one round trip): a block whose holder freed or reused its
   slot meanwhile fails, is discarded, and aborts the migration. The rest is published as held
   by the target.
4. **commit**: ``transfer_trace`` moves ownership to the target atomically and returns the
   target's fence; the source's fence is stale from then on (its late writes are refused).

Any failure before commit aborts: the record goes back to ``owned`` by the source (if the store
answers) and the source keeps serving the trace from its own blocks, which a migration never
frees or writes (copy-then-release: the source may free them only after a commit). A store lost
in the middle leaves nothing to undo: the source still owns the trace in its own eyes, and
re-claims it when the store is back. A commit whose reply was lost is ``UNKNOWN`` until
:meth:`Migration.resolve` reads the owner. See docs/cluster.md, "Migration protocol".
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.cluster.metadata import (
    ClusterStore,
    Lookup,
    StoreUnavailableError,
    as_keys,
    check_fence,
    check_trace_id,
    check_worker_id,
)
from kvtier.errors import InvalidArgumentError, KvtierError


class MigrationError(KvtierError):
    """A migration step failed or was called out of order; the trace stays with its source."""


@dataclass(frozen=True)
class PullBatch:
    """Blocks to copy from one source worker's pool into the target's.

    ``key_index`` indexes the migration's keys; ``source_slots``, ``generations`` and
    ``checksums`` come from the directory (a mover that can check checksums should).
    """

    source: str
    key_index: np.ndarray  # [n] int64
    keys: np.ndarray  # [n, 2] uint64
    source_slots: np.ndarray  # [n] uint32
    generations: np.ndarray  # [n] uint32
    checksums: np.ndarray  # [n] uint64

    def __len__(self) -> int:
        return int(self.key_index.shape[0])


@dataclass(frozen=True)
class MigrationPlan:
    """What the target lacks, and where to pull it from (made from one store lookup)."""

    trace_id: str
    source: str
    target: str
    keys: np.ndarray  # [n, 2] uint64
    present: np.ndarray  # [n] bool: the target holds the block already (not sent)
    unavailable: np.ndarray  # [n] bool: no live worker holds it (the target recomputes it)
    pulls: tuple[PullBatch, ...]  # one batch per source worker
    lookup_rtt_s: float

    @property
    def blocks_to_pull(self) -> int:
        return sum(len(p) for p in self.pulls)


def plan_migration(store: ClusterStore, trace_id: str, keys: Any, source: str, target: str) -> MigrationPlan:
    """Plan the move of ``keys`` (the trace's blocks) from ``source`` to ``target`` in one lookup.

    Each block the target lacks is pulled from ``source`` if it holds it, else from the first
    other live holder; no per-block Python loop.
    """
    check_trace_id(trace_id)
    check_worker_id(source)
    check_worker_id(target)
    if source == target:
        raise InvalidArgumentError(f"a migration needs two workers, got source == target == {source!r}")
    keys = as_keys(keys)
    n = keys.shape[0]
    lk: Lookup = store.lookup(keys)
    rec = lk.records
    present = lk.held_by(target)
    target_idx = lk.workers.index(target) if target in lk.workers else -1
    source_idx = lk.workers.index(source) if source in lk.workers else -1
    # candidates: records of keys the target lacks, from workers other than the target
    cand = rec[(rec["worker"] != target_idx) & ~present[rec["key"]]] if rec.size else rec
    # prefer the source (rank 0) over other holders (rank 1); first candidate per key wins
    rank = (cand["worker"] != source_idx).astype(np.int64)
    order = np.lexsort((rank, cand["key"]))
    cand = cand[order]
    _, first = np.unique(cand["key"], return_index=True)
    chosen = cand[first]
    unavailable = ~present
    unavailable[chosen["key"]] = False
    pulls = []
    for w in np.unique(chosen["worker"]):
        rows = chosen[chosen["worker"] == w]
        idx = rows["key"].astype(np.int64)
        pulls.append(PullBatch(source=lk.workers[int(w)], key_index=idx, keys=keys[idx],
                               source_slots=rows["slot"].copy(), generations=rows["generation"].copy(),
                               checksums=rows["checksum"].copy()))
    pulls.sort(key=lambda p: (p.source != source, p.source))  # the source's batch first
    assert int(present.sum()) + int(unavailable.sum()) + sum(len(p) for p in pulls) == n
    return MigrationPlan(trace_id, source, target, keys, present, unavailable, tuple(pulls), lk.rtt_s)


class MigrationState(enum.Enum):
    PLANNED = "planned"
    PREPARED = "prepared"  # the store says moving; the source still owns the trace
    MOVED = "moved"  # every block the target lacked is in its pool, validated and published
    COMMITTED = "committed"  # the target owns the trace (new fence)
    ABORTED = "aborted"  # the source keeps the trace
    UNKNOWN = "unknown"  # the commit's reply was lost; resolve() reads the owner


# A mover copies a batch into the target's pool and returns the target slots ([n] ints) that hold
# the blocks, in batch order; it raises if it cannot (leaving nothing allocated).
Mover = Callable[[PullBatch], Any]
# Gives target slots back (their content must not be used); called for blocks that failed validation.
Discard = Callable[[np.ndarray], None]


@dataclass
class MigrationResult:
    """The outcome of :meth:`Migration.run`: who owns the trace, what moved, how long each step took."""

    trace_id: str
    source: str
    target: str
    state: MigrationState
    owner: str | None  # who owns the trace now (None: unknown until the store answers)
    fence: int | None  # the owner's fence, if this side knows it
    blocks_total: int = 0
    blocks_present: int = 0  # deduplicated: the target had them
    blocks_moved: int = 0
    blocks_unavailable: int = 0
    blocks_resent: int = 0  # dedup off: blocks the target held and was sent again (bytes_moved counts them)
    bytes_moved: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    error: str = ""
    record_cleared: bool = True  # False: aborted while the store was away; the record may say moving


class Migration:
    """The ownership-move state machine for one trace: plan -> prepare -> move -> commit, or abort.

    Args:
        trace_id: the trace.
        keys: its block keys (``[n, 2]`` uint64), all of them; the plan deduplicates.
        source: the owner's store (holds ``fence``).
        target: the target worker's store (it looks up, validates and publishes what it pulls).
        fence: the source's fence for the trace (from ``claim_trace``).
        mover: copies a :class:`PullBatch` into the target's pool; returns the target slots.
        discard: gives target slots back (for blocks that failed validation, and on abort).
        block_bytes: bytes per block, for ``bytes_moved`` (0 if unknown).

    Each step checks the state it needs and raises :class:`MigrationError` otherwise. Store and
    data-plane failures propagate from the step; :meth:`run` turns them into an abort.
    """

    def __init__(self, trace_id: str, keys: Any, source: ClusterStore, target: ClusterStore, fence: int,
                 mover: Mover, *, discard: Discard | None = None, block_bytes: int = 0) -> None:
        self.trace_id = check_trace_id(trace_id)
        self.keys = as_keys(keys)
        if source.worker_id == target.worker_id:
            raise InvalidArgumentError(f"source and target are the same worker {source.worker_id!r}")
        self.source = source
        self.target = target
        self.fence = check_fence(fence)
        self.mover = mover
        self.discard = discard
        self.block_bytes = int(block_bytes)
        self.state = MigrationState.PLANNED
        self.plan: MigrationPlan | None = None
        self.new_fence: int | None = None
        self.moved_keys = np.empty((0, 2), dtype=np.uint64)
        self.moved_slots = np.empty(0, dtype=np.int64)  # target slots now holding pulled blocks
        self.unsure_slots = np.empty(0, dtype=np.int64)  # held until release_unsure() (see move)
        self.timings_s: dict[str, float] = {}
        self.error = ""
        self._maybe_moving = False
        self.record_cleared = True  # False after an abort the store did not hear (retry abort())

    def _expect(self, *states: MigrationState) -> None:
        if self.state not in states:
            raise MigrationError(f"migration of {self.trace_id}: step needs state "
                                 f"{'/'.join(s.value for s in states)}, is {self.state.value}")

    def _timed(self, step: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings_s[step] = self.timings_s.get(step, 0.0) + time.perf_counter() - t0

    def make_plan(self) -> MigrationPlan:
        """Step 1 (the target learns what it lacks): one store round trip."""
        self._expect(MigrationState.PLANNED)
        self.plan = self._timed("plan", lambda: plan_migration(
            self.target, self.trace_id, self.keys, self.source.worker_id, self.target.worker_id))
        return self.plan

    def prepare(self) -> None:
        """Step 2: the store marks the trace moving (fenced); the source stays the owner."""
        self._expect(MigrationState.PLANNED)
        if self.plan is None:
            self.make_plan()
        self._maybe_moving = True  # from here the record may say moving, even if the reply is lost
        self._timed("prepare", lambda: self.source.begin_move(self.trace_id, self.target.worker_id, self.fence))
        self.state = MigrationState.PREPARED

    def move(self) -> None:
        """Step 3: pull every batch, validate against the directory, publish at the target."""
        self._expect(MigrationState.PREPARED)
        assert self.plan is not None
        t0 = time.perf_counter()
        keys_done, slots_done = [], []
        try:
            for batch in self.plan.pulls:
                slots = np.asarray(self.mover(batch), dtype=np.int64).reshape(-1)
                if slots.shape[0] != len(batch):
                    if self.discard is not None and slots.size:
                        self.discard(slots)
                    raise MigrationError(f"mover returned {slots.shape[0]} slots for {len(batch)} blocks")
                keys_done.append(batch.keys)
                slots_done.append(slots)
                # seqlock-style check: the holder must not have freed/reused a slot while we read it
                ok = self.target.validate(batch.keys, batch.source, batch.source_slots,
                                          batch.generations)
                if not ok.all():
                    raise MigrationError(
                        f"{int((~ok).sum())} of {len(batch)} blocks from {batch.source} changed while being "
                        f"pulled (slot freed or reused); discarded")
        except BaseException:
            if self.discard is not None and slots_done:
                self.discard(np.concatenate(slots_done))
            raise
        finally:
            self.timings_s["move"] = time.perf_counter() - t0
        self.moved_keys = np.concatenate(keys_done) if keys_done else np.empty((0, 2), dtype=np.uint64)
        self.moved_slots = np.concatenate(slots_done) if slots_done else np.empty(0, dtype=np.int64)
        if self.moved_keys.shape[0]:
            checksums = np.concatenate([b.checksums for b in self.plan.pulls])
            try:
                self._timed("publish", lambda: self.target.publish(self.moved_keys, self.moved_slots, checksums))
            except StoreUnavailableError:
                # Note [A publish whose reply was lost]: the entries may be in the store, pointing
                # at these slots with generations no free has bumped; giving the slots back now
                # would let them be reused under a reader whose validation still passes. They
                # stay held until free_slots has reached the store (release_unsure()).
                self.unsure_slots = self.moved_slots
                self.moved_keys = np.empty((0, 2), dtype=np.uint64)
                self.moved_slots = np.empty(0, dtype=np.int64)
                raise
            except BaseException:
                if self.discard is not None:
                    self.discard(self.moved_slots)  # refused (e.g. stale incarnation): nothing was written
                raise
        self.state = MigrationState.MOVED

    def release_unsure(self) -> bool:
        """Give back the target slots of a publish whose reply was lost: ``free_slots`` them in
        the store first (bumping their generations), then ``discard``. Returns True when done
        (or nothing was pending); False while the store is unreachable (call again later)."""
        if self.unsure_slots.size == 0:
            return True
        try:
            self.target.free_slots(self.unsure_slots)
        except StoreUnavailableError:
            return False
        if self.discard is not None:
            self.discard(self.unsure_slots)
        self.unsure_slots = np.empty(0, dtype=np.int64)
        return True

    def commit(self) -> int:
        """Step 4: ownership moves to the target atomically; returns the target's fence."""
        self._expect(MigrationState.MOVED)
        try:
            self.new_fence = self._timed("commit", lambda: self.source.transfer_trace(
                self.trace_id, self.source.worker_id, self.target.worker_id, self.fence))
        except StoreUnavailableError:
            self.state = MigrationState.UNKNOWN  # the script may have run before the reply was lost
            raise
        self.state = MigrationState.COMMITTED
        return self.new_fence

    def abort(self, reason: str = "") -> bool:
        """Give up: the source keeps the trace. Returns True if the store's record was put back
        to ``owned`` (False if the store did not answer: the record may still say ``moving`` to
        this target, under the source's unchanged fence, which :meth:`abort` retried clears).
        Blocks already published at the target stay there: they are valid KV, found by content."""
        if self.state in (MigrationState.COMMITTED, MigrationState.UNKNOWN):
            raise MigrationError(f"migration of {self.trace_id} is {self.state.value}; cannot abort")
        self.error = self.error or reason
        self.state = MigrationState.ABORTED
        if not self._maybe_moving:
            self.record_cleared = True
            return True
        try:
            self._timed("abort", lambda: self.source.abort_move(self.trace_id, self.fence))
        except StoreUnavailableError:
            self.record_cleared = False
            return False
        except KvtierError:  # a stale fence: someone took the trace over; nothing of ours to undo
            pass
        self._maybe_moving = False
        self.record_cleared = True
        return True

    def resolve(self) -> MigrationState:
        """After UNKNOWN: read the owner (one round trip) and settle on COMMITTED or ABORTED."""
        self._expect(MigrationState.UNKNOWN)
        owner = self.target.trace_owner(self.trace_id)
        if owner is not None and owner.owner == self.target.worker_id and owner.fence > self.fence:
            self.new_fence = owner.fence
            self.state = MigrationState.COMMITTED
        else:
            self.state = MigrationState.ABORTED
        return self.state

    def run(self) -> MigrationResult:
        """The remaining steps; any store or data-plane failure aborts (the source keeps the trace),
        except a commit whose reply was lost (``UNKNOWN``: call :meth:`resolve` later)."""
        try:
            if self.state is MigrationState.PLANNED:
                self.prepare()  # plans first if no plan was made
            if self.state is MigrationState.PREPARED:
                self.move()
            if self.state is MigrationState.MOVED:
                self.commit()
        except (KvtierError, OSError) as e:
            self.error = f"{type(e).__name__}: {e}"
            if self.state is not MigrationState.UNKNOWN:
                self.abort(self.error)
        return self.result()

    def result(self) -> MigrationResult:
        plan = self.plan
        if self.state is MigrationState.COMMITTED:
            owner, fence = self.target.worker_id, self.new_fence
        elif self.state is MigrationState.UNKNOWN:
            owner, fence = None, None
        else:
            owner, fence = self.source.worker_id, self.fence
        moved = int(self.moved_keys.shape[0]) if self.state in (MigrationState.MOVED, MigrationState.COMMITTED) else 0
        return MigrationResult(
            trace_id=self.trace_id, source=self.source.worker_id, target=self.target.worker_id,
            state=self.state, owner=owner, fence=fence, blocks_total=int(self.keys.shape[0]),
            blocks_present=int(plan.present.sum()) if plan else 0, blocks_moved=moved,
            blocks_unavailable=int(plan.unavailable.sum()) if plan else 0,
            bytes_moved=moved * self.block_bytes, timings_s=dict(self.timings_s), error=self.error,
            record_cleared=self.record_cleared)


class PoolMover:
    """The in-process mover: kvtier's copy engine between :class:`~kvtier.HostPool` s of workers
    living in one process (tests, single-process simulations). Across processes the UCX data
    plane takes its place.

    Args:
        pools: each worker's served pool, by worker id.
        target: the worker pulling (its pool receives the blocks).
        engine: the copy engine.
        timeout_s: the bound on one batch's copy.
    """

    def __init__(self, pools: dict[str, Any], target: str, engine: Any, timeout_s: float = 30.0) -> None:
        if target not in pools:
            raise InvalidArgumentError(f"no pool for the target worker {target!r}")
        self.pools = pools
        self.target = target
        self.engine = engine
        self.timeout_s = timeout_s
        self.batches = 0

    def __call__(self, batch: PullBatch) -> np.ndarray:
        src = self.pools.get(batch.source)
        if src is None:
            raise MigrationError(f"no pool for source worker {batch.source!r}")
        dst_pool = self.pools[self.target]
        dst = dst_pool.allocate(len(batch))
        try:
            self.engine.transfer(src, batch.source_slots.astype(np.int32), dst_pool, dst).wait(self.timeout_s)
        except BaseException:
            dst_pool.free(dst)
            raise
        self.batches += 1
        return dst

    def discard(self, slots: np.ndarray) -> None:
        self.pools[self.target].free(np.asarray(slots, dtype=np.int32))
