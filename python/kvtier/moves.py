"""Moves of cached blocks between tiers, in the background, timed alike for every policy.

Note [Background moves] in kvtier/trace.py says what a move is, when it completes, how it is
timed, and who waits for it. :class:`MoveQueue` is the machinery (one per
:class:`~kvtier.TieredCache`, ``cache.moves``); :class:`BackgroundLane` times moves on a link.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.errors import KvtierError

if TYPE_CHECKING:
    from kvtier.cache import TieredCache

__all__ = ["BackgroundLane", "Move", "MoveQueue"]

DEVICE, DRAM, NVME = 0, 1, 2
_TIER = ("device", "dram", "nvme")


class BackgroundLane:
    """Times moves on one link direction, one at a time, in virtual time.

    A move issued at ``at`` that takes ``seconds`` takes the first idle stretch of the lane at or
    after ``at`` that is long enough (:meth:`place`); moves may be placed out of time order (a
    move is placed when its handle completes, and a tool start is issued when its step's decode
    ends, which may be after later events were handled). ``measure`` (tests) replaces the measured
    duration: ``measure(fn)`` returns ``(seconds, fn())``; :meth:`run` runs ``fn`` on the caller's
    thread and places it.
    """

    def __init__(self, measure: Callable[[Callable[[], Any]], tuple[float, Any]] | None = None,
                 horizon_s: float = 3600.0) -> None:
        self.busy_s = 0.0
        self.measure = measure
        self._busy: list[tuple[float, float]] = []  # disjoint (start, end), sorted
        self._horizon = horizon_s

    def twin(self) -> BackgroundLane:
        """A second, independent lane timed the same way (the other direction of the link)."""
        return BackgroundLane(self.measure, self._horizon)

    @property
    def free_at(self) -> float:
        return self._busy[-1][1] if self._busy else 0.0

    def place(self, at: float, seconds: float) -> tuple[float, float]:
        """Book ``seconds`` of the lane at or after ``at``: returns (start, done)."""
        seconds = max(0.0, float(seconds))
        busy = self._busy
        if busy and busy[0][1] < at - self._horizon:  # forget the distant past
            del busy[: bisect.bisect_left(busy, (at - self._horizon, 0.0))]
        i = bisect.bisect_left(busy, (at, -1.0))
        if i > 0 and busy[i - 1][1] > at:
            i -= 1
        start = at
        while i < len(busy) and busy[i][0] < start + seconds:
            start = max(start, busy[i][1])
            i += 1
        if seconds > 0:
            bisect.insort(busy, (start, start + seconds))
        self.busy_s += seconds
        return start, start + seconds

    def duration(self, measured_s: float) -> float:
        """The seconds a move takes on this lane: as measured, unless ``measure`` overrides it."""
        return measured_s if self.measure is None else float(self.measure(lambda: None)[0])

    def run(self, at: float, fn: Callable[[], Any]) -> tuple[float, float, Any]:
        """Run ``fn`` now as a move issued at ``at``: returns (start, done, result)."""
        seconds, result = (self.measure or _wall_time)(fn)
        start, done = self.place(at, seconds)
        return start, done, result


def _wall_time(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


class Move:
    """One batch of blocks moving one tier up or down; completes on its handle."""

    __slots__ = ("keys", "src", "src_blocks", "dst", "dst_blocks", "handle", "lane", "issued_at", "start_at",
                 "done_at", "evicting", "then", "ok")

    def __init__(self, keys: np.ndarray, src: int, src_blocks: np.ndarray, dst: int, dst_blocks: np.ndarray | None,
                 handle: Any, issued_at: float, evicting: bool) -> None:
        self.keys, self.src, self.src_blocks, self.dst, self.dst_blocks = keys, src, src_blocks, dst, dst_blocks
        self.handle = handle
        self.lane = "out" if dst > src else "in"
        self.issued_at = issued_at
        self.start_at = self.done_at = issued_at
        self.evicting = evicting  # made to free room now: a failed copy drops the blocks (they must go)
        self.then: list[Callable[[Move], None]] = []  # run once it completed (ok or not)
        self.ok: np.ndarray | None = None  # per key, once complete: it now sits at dst

    def __repr__(self) -> str:
        return (f"Move({len(self.keys)} blocks {_TIER[self.src]}->{_TIER[self.dst]}, "
                f"{'done' if self.ok is not None else 'pending'})")


class _Deferred:
    """Work waiting on moves (room being made), for keys held pinned meanwhile."""

    __slots__ = ("keys", "waiting", "fn")

    def __init__(self, keys: np.ndarray, waiting: list[Move], fn: Callable[[float], None]) -> None:
        self.keys, self.waiting, self.fn = keys, waiting, fn


def _hits(keys: np.ndarray, query_hi: np.ndarray) -> bool:
    # The first 64 bits of a 128-bit key name it well enough for "does this move touch it".
    return bool(len(keys)) and bool(np.isin(keys[:, 0], query_hi).any())


class MoveQueue:
    """The cache's moves in flight: submitted to the copy engine or the NVMe tier, completed on
    their handles (copy, then release), timed on two :class:`BackgroundLane` s (Note [Background
    moves] in kvtier/trace.py).

    ``now`` is the caller's virtual time (``kvtier replay``/``simulate`` set it; None: ``clock``).
    ``blocked_until`` is the latest virtual completion of a move a caller had to wait for (the
    driver charges a step ``blocked_until - start``); ``waited_wall_s`` sums the wall time callers
    blocked on move handles (which the driver does not charge twice).
    """

    def __init__(self, cache: TieredCache, clock: Callable[[], float] = time.monotonic) -> None:
        self._cache = cache
        self.clock = clock
        self.now: float | None = None
        self.lanes: dict[str, BackgroundLane] = {"out": BackgroundLane(), "in": BackgroundLane()}
        self.pending: list[Move] = []
        self._deferred: list[_Deferred] = []
        # (key hi, start, done, lane, issued) of completed moves whose virtual completion may be ahead
        self._recent: list[tuple[np.ndarray, float, float, str, float]] = []
        self.blocked_until = float("-inf")
        self.waited_wall_s = 0.0
        self.stats: Counter = Counter()
        # Per tier, (virtual time, blocks) freed by completed moves: room exists from then on.
        self._freed: dict[int, list[tuple[float, int, float]]] = {DEVICE: [], DRAM: []}  # (done, blocks, issued)

    # ------------------------------------------------------------------ time

    def at(self) -> float:
        return self.clock() if self.now is None else self.now

    # ------------------------------------------------------------------ submit

    def submit(self, keys: np.ndarray, src: int, src_blocks: np.ndarray, dst: int, dst_blocks: np.ndarray | None,
               *, evicting: bool = False, at: float | None = None) -> Move | None:
        """Start copying ``keys`` (held in ``src_blocks`` of tier ``src``, unpinned or pinned by a
        reader) into ``dst_blocks`` of the adjacent tier ``dst`` (None for NVMe, which picks its
        slots). The keys are pinned until the move completes; the index changes only then. Returns
        the move, or None when it could not even be submitted (the source copy stays)."""
        cache = self._cache
        at = self.at() if at is None else at
        cache.index.pin(keys)
        engine = cache.engine
        flag = getattr(engine, "charge_to_step", None)  # the simulator's engine: not the step's time
        if flag is not None:
            engine.charge_to_step = False
        try:
            if dst == NVME:
                h = cache.nvme.write(keys, src_blocks)
            elif src == NVME:
                h = cache.nvme.read(keys, dst_blocks)
            else:
                h = engine.transfer(cache.pools[src], src_blocks, cache.pools[dst], dst_blocks)
        except KvtierError:
            cache.index.unpin(keys)
            if dst_blocks is not None:
                cache.pools[dst].free(dst_blocks)
            self.stats["submit_errors"] += 1
            return None
        finally:
            if flag is not None:
                engine.charge_to_step = flag
        m = Move(keys, src, src_blocks, dst, dst_blocks, h, at, evicting)
        self.pending.append(m)
        self.stats["submitted"] += 1
        self.stats[f"{_TIER[src]}->{_TIER[dst]} blocks"] += len(keys)
        return m

    def after(self, moves: Sequence[Move], keys: np.ndarray, fn: Callable[[float], None],
              at: float | None = None) -> None:
        """Run ``fn(at)`` once every one of ``moves`` completed (at once if there are none), ``at``
        being the latest of their virtual completions (and of ``at``); ``keys`` are pinned until then."""
        base = self.at() if at is None else at
        done = [m.done_at for m in moves if m.ok is not None]
        moves = [m for m in moves if m.ok is None]
        if not moves:
            fn(max([base] + done))
            return
        self._cache.index.pin(keys)
        d = _Deferred(keys, list(moves), fn)
        self._deferred.append(d)

        def one_done(m: Move, d: _Deferred = d) -> None:
            if m in d.waiting:
                d.waiting.remove(m)
            d_at = max(d_at_box[0], m.done_at)
            d_at_box[0] = d_at
            if not d.waiting and d in self._deferred:
                self._deferred.remove(d)
                self._cache.index.unpin(d.keys)
                d.fn(d_at)

        d_at_box = [max([base] + done)]
        for m in moves:
            m.then.append(one_done)

    # ------------------------------------------------------------------ complete

    def poll(self) -> None:
        """Complete every move whose handle is done (and what they chain), without blocking."""
        progressed = True
        while progressed and self.pending:
            progressed = False
            for m in list(self.pending):
                if m in self.pending and m.handle.done():
                    self.pending.remove(m)
                    self._complete(m)
                    progressed = True

    def wait(self, moves: Sequence[Move], charge: bool = True) -> None:
        """Block until ``moves`` completed (a caller that needs their result now). With ``charge``
        the caller is charged up to their virtual completion (``blocked_until``)."""
        for m in moves:
            if m in self.pending:
                if not m.handle.done():  # a real wait (a finished handle, or the simulator's, costs none)
                    t0 = time.perf_counter()
                    _settle(m.handle)
                    self.waited_wall_s += time.perf_counter() - t0
                if m in self.pending:
                    self.pending.remove(m)
                    self._complete(m)
            if charge:
                self.blocked_until = max(self.blocked_until, m.done_at)
        self.poll()

    def wait_keys(self, keys: np.ndarray, lane: str = "in", since: float = float("-inf"),
                  until: float = float("inf")) -> tuple[float, float]:
        """Block until no move on ``lane`` (default: toward the device) is pending for ``keys``,
        nor waits for room to be made for them; returns the virtual (start, done) span of the moves
        on that lane that touched them, issued at ``since`` or later and by ``until`` (or as the next
        leg of one of those; ``(inf, -inf)``: none). Not charged: the caller decides
        what being late costs (a trace's begin_step recomputes or waits, Note [Prefetch timing])."""
        if len(keys) == 0:
            return float("inf"), float("-inf")
        hi = np.asarray(keys)[:, 0]
        while True:
            self.poll()
            need = [m for m in self.pending if m.lane == lane and _hits(m.keys, hi)]
            for d in self._deferred:
                if _hits(d.keys, hi):
                    need.extend(m for m in d.waiting if m in self.pending)
            if not need:
                break
            self.wait(need[:1], charge=False)
        start, done = float("inf"), float("-inf")
        touched = sorted((issued, s, e) for khi, s, e, ln, issued in self._recent
                         if ln == lane and issued >= since and np.isin(khi, hi).any())
        for issued, s, e in touched:
            # A later leg of a chain (NVMe -> DRAM -> device) is issued when the leg before it
            # lands, possibly after ``until``; a move issued after ``until`` that is no such leg
            # (another step's promotion of a shared block, handled earlier in event order) is not
            # one the caller can be waiting for.
            if issued > until and issued > done:
                break
            start, done = min(start, s), max(done, e)
        return start, done

    def drain(self) -> None:
        """Complete every move in flight and every deferred one (close, tests, the end of a run)."""
        while self.pending or self._deferred:
            if self.pending:
                self.wait(self.pending[:1], charge=False)
            else:  # nothing in flight can release them: run them now
                d = self._deferred.pop(0)
                self._cache.index.unpin(d.keys)
                d.fn(self.at())

    def _complete(self, m: Move) -> None:
        cache, idx = self._cache, self._cache.index
        lane = self.lanes[m.lane]
        m.start_at, m.done_at = lane.place(m.issued_at, lane.duration(float(getattr(m.handle, "latency_s", 0.0))))
        failed = _error(m.handle)
        n = len(m.keys)
        ok = getattr(m.handle, "block_ok", None)
        ok = np.ones(n, dtype=bool) if ok is None else np.asarray(ok, dtype=bool).copy()
        if failed is not None and getattr(m.handle, "block_ok", None) is None:
            ok[:] = False
        lost = np.zeros(n, dtype=bool)
        if m.dst > m.src:
            # Never move a block out from under a running step (pinned by someone besides this move):
            # it stays where it is; the copy below is undone.
            ok &= cache.index.locate(m.keys)[2] <= 1
        elif m.src == NVME:
            lost = ~ok  # missing, corrupt or unreadable on NVMe: a miss
        bb = cache.layout.block_bytes
        if ok.any():
            k = m.keys[ok]
            if m.dst == NVME:
                idx.relocate(k, NVME, np.zeros(len(k), dtype=np.int32))
            else:
                if m.src == NVME:
                    cache.nvme.evict(k)
                idx.relocate(k, m.dst, m.dst_blocks[ok])
            if m.src != NVME:
                cache.pools[m.src].free(m.src_blocks[ok])
                self._freed[m.src].append((m.done_at, int(ok.sum()), m.issued_at))
            cache.metrics.record_transfer(_TIER[m.src], _TIER[m.dst], int(ok.sum()) * bb,
                                          float(getattr(m.handle, "latency_s", 0.0)))
        bad = ~ok & ~lost
        unpinned = lost.copy()  # keys whose pin this move already gave back
        if bad.any():  # the copy failed or was undone: the source copy stays (copy, then release)
            if m.dst == NVME:
                cache.nvme.evict(m.keys[bad])  # a slot written (or half written) for nothing
            elif m.dst_blocks is not None:
                cache.pools[m.dst].free(m.dst_blocks[bad])
            if failed is not None:
                self.stats["failed_blocks"] += int(bad.sum())
                if m.dst == NVME:
                    cache.metrics.nvme_write_errors += 1
                if m.evicting:  # made to free room: the blocks go anyway (recomputed later)
                    k, b = m.keys[bad], m.src_blocks[bad]
                    idx.unpin(k)
                    unpinned |= bad
                    free = idx.locate(k)[2] == 0  # a reader's pin keeps its block
                    idx.remove(k[free])
                    cache.pools[m.src].free(b[free])
                    cache.metrics.dropped_blocks += int(free.sum())
        if lost.any():
            if m.dst_blocks is not None:
                cache.pools[m.dst].free(m.dst_blocks[lost])
            cache.metrics.misses += int(lost.sum())
            cache._forget_lost(m.keys[lost])  # takes this move's pin
        if (~unpinned).any():
            idx.unpin(m.keys[~unpinned])
        m.ok = ok
        self.stats["completed"] += 1
        if failed is not None:
            self.stats["failed"] += 1
        if m.done_at > self.at() - 600.0:
            self._recent.append((m.keys[:, 0].copy(), m.start_at, m.done_at, m.lane, m.issued_at))
            if len(self._recent) > 256:
                cut = self.at() - 600.0
                self._recent = [r for r in self._recent if r[2] > cut][-256:]
        for fn in m.then:
            fn(m)

    def room_ready_at(self, tier: int, n: int, free: int, at: float | None = None) -> float:
        """The virtual time from which ``n`` of the ``free`` blocks of ``tier`` exist: blocks that
        moves freed count only from those moves' virtual completion (a step that takes them waits
        until then, whichever policy's move freed them)."""
        at = self.at() if at is None else at
        freed = self._freed[tier]
        if len(freed) > 64:
            freed[:] = [f for f in freed if f[0] > at - 600.0]
        future = sorted(f for f in freed if f[0] > at)
        avail = free - sum(f[1] for f in future)
        if n <= avail:
            return at
        for done, k, _ in future:
            avail += k
            if avail >= n:
                return done
        return future[-1][0] if future else at

    def future_room(self, tier: int, at: float | None = None) -> int:
        """Blocks of ``tier`` freed by moves *issued* after ``at`` (handled earlier in event order,
        e.g. a tool start at the end of another trace's decode): at ``at`` that room does not exist
        yet, and no wait makes it exist sooner. (Moves issued by ``at`` and still in flight are
        ``room_ready_at``'s: a step may wait for those.)"""
        at = self.at() if at is None else at
        return sum(k for _, k, issued in self._freed.get(tier, ()) if issued > at)

    def charge_room(self, tier: int, n: int, free: int) -> None:
        """A step takes ``n`` blocks of ``tier``: it waits until they exist in virtual time."""
        self.blocked_until = max(self.blocked_until, self.room_ready_at(tier, n, free))

    # ------------------------------------------------------------------ introspection

    def moving(self, keys: np.ndarray) -> np.ndarray:
        """Per key: whether a move in flight (or waiting for room) holds it."""
        out = np.zeros(len(keys), dtype=bool)
        if len(keys) == 0:
            return out
        hi = np.asarray(keys)[:, 0]
        for group in [m.keys for m in self.pending] + [d.keys for d in self._deferred]:
            out |= np.isin(hi, group[:, 0])
        return out

    def leaving(self, tier: int) -> list[Move]:
        """Moves in flight that will free blocks of ``tier`` (demotions out of it)."""
        return [m for m in self.pending if m.src == tier and m.dst > tier]

    def touching(self, keys: np.ndarray) -> list[Move]:
        """Moves in flight that hold ``keys`` or that work waiting for room for them waits on."""
        if len(keys) == 0:
            return []
        hi = np.asarray(keys)[:, 0]
        out = [m for m in self.pending if _hits(m.keys, hi)]
        for d in self._deferred:
            if _hits(d.keys, hi):
                out.extend(d.waiting)
        return out

    def pinned_keys(self) -> list[np.ndarray]:
        """The keys the queue holds pinned, one array per pin (a key may appear more than once)."""
        return [m.keys for m in self.pending] + [d.keys for d in self._deferred]

    def reserved_blocks(self, tier: int) -> int:
        """Blocks of ``tier`` allocated as move targets, not yet in the index."""
        return sum(len(m.dst_blocks) for m in self.pending if m.dst == tier and m.dst_blocks is not None)

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight": len(self.pending), "deferred": len(self._deferred),
                "lane_busy_s": {k: v.busy_s for k, v in self.lanes.items()},
                "waited_wall_s": self.waited_wall_s, **dict(self.stats)}


def _settle(handle: Any) -> None:
    """Wait for a handle without raising its error (the move's completion handles it)."""
    core = getattr(handle, "_core", None)
    if core is not None:
        core.wait(-1.0)
    else:
        try:
            handle.wait()
        except KvtierError:
            pass


def _error(handle: Any) -> KvtierError | None:
    exc = getattr(handle, "exception", None)
    return exc() if callable(exc) else None
