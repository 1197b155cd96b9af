"""Traces: an agent run as the unit of caching, with its tool-call gaps.

A :class:`Trace` owns the blocks of its context, in order: the content-keyed full blocks (shared
with every trace whose context starts the same way, refcounted across the traces that own them,
Note [Trace references] in csrc/index/block_index.h) and the private partial tail block, which a
plain prefix cache cannot keep. Its lifecycle::

    ready --begin_step--> running --end_step--> ready (a step may follow a step)
    ready, right after end_step --tool_start--> tool (KV kept on the device, with a TTL)
                                           \\-> parked (KV demoted to DRAM/NVMe, or dropped)
    tool/parked --tool_end (or the next begin_step)--> resumed --begin_step--> running ...
    any --close--> closed

``tool_start`` is valid once per step, right after its ``end_step``; a second ``end_step`` or
``tool_start`` without a new step is an :class:`~kvtier.InvalidArgumentError` naming the state.

At ``tool_start`` the :class:`~kvtier.policy.TraceAwarePolicy` decides where the trace's private
KV spends the gap (Note [Gap-aware placement] in kvtier/policy.py) and, when it is moved out, when
to prefetch it back (Note [Prefetch timing]). The manager runs due prefetches and expires leases
in :meth:`TraceManager.tick`; ``tool_end`` starts a prefetch that has not started yet.

Time: every call takes an optional ``now`` (seconds). An engine leaves it out and the manager
reads its clock; ``kvtier replay`` and ``kvtier simulate`` pass virtual time. The manager's moves
(demotions at a tool start, headroom, restores) run in the background on the cache's move queue,
exactly like every other policy's moves (Note [Background moves]).

Note [Background moves]: one mechanism and one timing rule for every move of a cached block between
tiers, whichever policy asks for it (``tiered``'s LRU demotion when a store needs room, its
promotion of DRAM hits, the NVMe writes below both, ``trace-aware``'s demotions at a tool start,
its headroom and its restores). The policies differ only in what they move and when.

- *Asynchronous*: a move is one batch, one tier up or down (device<->DRAM on the copy engine,
  DRAM<->NVMe on the NVMe tier), submitted to ``cache.moves`` (:class:`kvtier.moves.MoveQueue`),
  which returns at once. It completes on its handle: the queue reaps finished handles whenever
  the cache or the manager is called (``poll``), never blocking for one nobody needs yet. A move
  of several hops (device -> NVMe; a restore NVMe -> device) chains its next hop on the previous
  one's completion; a move that needs room first (a full DRAM tier) waits, pinned, for the
  demotions that make it. ``tool_start``, ``tick`` and ``tool_end`` only submit.
- *Copy, then release*: the index changes only when a move completes. Until then the keys stay
  where they were, pinned by the move (never an LRU victim, never moved twice), and readers
  keep loading the source copy; the target blocks are reserved. On success the key is relocated
  and the source freed; a failed or crashed move frees the target and leaves the source, so the
  trace stays usable (an eviction that had to free room drops its blocks instead, as before). A
  block that a running step pins when its demotion lands stays where it is.
- *Who waits*: a step waits only for moves whose result it needs now: ``begin_step`` for the
  pending restores of exactly the blocks this trace restored (``MoveQueue.wait_keys``), a load
  for in-flight NVMe reads of the blocks it loads, a store that finds no room for the demotions
  making it (under every policy alike).
- *One timing rule* (``kvtier replay`` and ``kvtier simulate`` alike): a move takes its handle's
  duration (measured on the copy engine / disk in the replay, bytes over the link's modelled
  bandwidth in the simulator) on one of two :class:`BackgroundLane` s (``out``: demotions and
  NVMe writes; ``in``: restores and promotions), booked from the virtual time it was issued, one
  move at a time per lane. A step is never charged a move's wall time; it is charged up to the
  virtual completion of each move it waited for (``MoveQueue.blocked_until``), and a late restore
  is decided on that completion (Note [Prefetch timing]). In the simulator a step's own PCIe loads
  and NVMe reads are booked on the same ``in`` lane, so background moves and steps share the
  bandwidth; in the replay the moves run on the copy engine's threads and the NVMe tier's queue
  beside the model, on the same cores.

Example (an engine with a transformers decoder)::

    mgr = kvtier.TraceManager(cache, cost=kvtier.CostModel(...))
    tr = mgr.open("agent-1")
    plan = tr.begin_step(context)                  # pins and loads what is cached
    cache.load(plan.match, kvc.registration, range(plan.match.hit_blocks)).wait()
    kvc.set_seq_length(plan.hit_tokens)
    ... generate ...
    tr.end_step(context + new_tokens, kvc.registration, kvc.get_seq_length())
    tr.tool_start(expected_gap_s=30.0, tool="run_tests")
    ... the tool runs ...
    tr.tool_end()
"""

from __future__ import annotations

import enum
import functools
import heapq
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.cache import DEVICE, DRAM, NVME, PrefixMatch, TieredCache
from kvtier.errors import InvalidArgumentError
from kvtier.keys import as_token_ids
from kvtier.memory import KVRegistration
from kvtier.moves import BackgroundLane
from kvtier.policy import Action, CostModel, Decision, GapEstimator, TierState, TraceAwarePolicy

__all__ = ["BackgroundLane", "StepPlan", "Trace", "TraceManager", "TraceMetrics", "TraceState"]  # BackgroundLane: from kvtier.moves

_EMPTY_KEYS = np.zeros((0, 2), dtype=np.uint64)


def _cache_locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a trace operation under its cache's lock (a ClusterWorker's service thread changes the
    cache's DRAM tier from another thread; without one the lock is uncontended)."""
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        mgr = self._mgr if isinstance(self, Trace) else self
        with mgr.cache._lock:
            return fn(self, *args, **kwargs)
    return wrapper


class TraceState(str, enum.Enum):
    READY = "ready"
    RUNNING = "running"
    TOOL = "tool"
    PARKED = "parked"
    RESUMED = "resumed"
    CLOSED = "closed"


@dataclass
class TraceMetrics:
    """What the trace-aware policy did. ``snapshot()`` gives a plain dict."""

    decisions: Counter = field(default_factory=Counter)  # by action
    reasons: Counter = field(default_factory=Counter)  # "action: reason"
    gap_sources: Counter = field(default_factory=Counter)  # hint / learned / fleet / prior
    prefetch_lateness_s: list[float] = field(default_factory=list)  # per resume of a parked trace
    prefetches: int = 0
    prefetched_blocks: int = 0
    demoted_blocks: int = 0
    dropped_blocks: int = 0
    late_recompute_tokens: int = 0  # tokens recomputed because their restore would be late
    waited_s: float = 0.0  # resumes that waited for a late restore
    expired_leases: int = 0
    tail_tokens_reused: int = 0  # partial-tail tokens loaded instead of recomputed
    headroom_runs: int = 0  # background demotions that kept headroom free (Note [Headroom])
    farthest_demoted_blocks: int = 0  # freed for a restore from traces back later (Note [Farthest resume first])
    restore_capped_blocks: int = 0  # left below by a restore that had no room (Note [A restore never drops])

    def snapshot(self) -> dict[str, Any]:
        late = np.asarray(self.prefetch_lateness_s, dtype=float)
        q = (lambda p: float(np.percentile(late, p))) if len(late) else (lambda p: 0.0)
        return {
            "decisions": {a.value: self.decisions.get(a.value, 0) for a in Action},
            "reasons": dict(self.reasons), "gap_sources": dict(self.gap_sources),
            "prefetch_lateness_s": {"count": len(late), "late": int((late > 0).sum()), "p50": q(50), "p90": q(90),
                                    "p99": q(99), "max": float(late.max()) if len(late) else 0.0},
            "prefetches": self.prefetches, "prefetched_blocks": self.prefetched_blocks,
            "demoted_blocks": self.demoted_blocks, "dropped_blocks": self.dropped_blocks,
            "late_recompute_tokens": self.late_recompute_tokens, "waited_s": self.waited_s,
            "expired_leases": self.expired_leases, "tail_tokens_reused": self.tail_tokens_reused,
            "headroom_runs": self.headroom_runs, "farthest_demoted_blocks": self.farthest_demoted_blocks,
            "restore_capped_blocks": self.restore_capped_blocks,
        }


@dataclass
class StepPlan:
    """What :meth:`Trace.begin_step` found: load ``match`` into blocks ``0..match.hit_blocks`` of
    the engine's KV, then the engine holds ``hit_tokens`` tokens. ``wait_s`` > 0 (and ``match``
    None): the trace's restore is late by that much and waiting beats recomputing; nothing was
    pinned, call ``begin_step`` again once it is done."""

    match: PrefixMatch | None
    hit_tokens: int
    wait_s: float = 0.0
    late_recompute_tokens: int = 0


class Trace:
    """One agent run. Create with :meth:`TraceManager.open` or :meth:`fork`."""

    def __init__(self, manager: TraceManager, trace_id: str) -> None:
        self.id = trace_id
        self.state = TraceState.READY
        self._mgr = manager
        self._keys = _EMPTY_KEYS  # content keys of the full blocks this trace owns, in order
        self._tail_key: np.ndarray | None = None  # [1, 2] private key of the partial tail block
        self._tail_tokens = np.zeros(0, dtype=np.int64)  # the tokens the tail block holds
        self._lease: np.ndarray = _EMPTY_KEYS  # keys pinned on the device for this trace (keep/prefetch/retain)
        self._lease_until = 0.0
        self.tool: str | None = None
        self.decision: Decision | None = None
        self._tool_started = 0.0
        self._prefetch_due: float | None = None
        self._restore = (0.0, 0.0)  # (start, done) of the last restore on the lane
        self._restore_blocks = 0
        self._restore_keys = _EMPTY_KEYS  # the blocks the last restore moves up (Note [Background moves])
        self._lateness_recorded = False
        self._match: PrefixMatch | None = None
        self._step_ended = False  # end_step ran and no tool_start or begin_step since: tool_start may follow
        self.expected_resume = float("inf")  # while waiting on a tool: when the trace should be back
        self.fence: int | None = None  # cluster ownership fence, once claimed (migrate)
        self.migrated_to: str | None = None

    # ------------------------------------------------------------------ introspection

    @property
    def num_blocks(self) -> int:
        """Blocks this trace owns (full blocks plus the tail block, if any)."""
        return len(self._keys) + (self._tail_key is not None)

    @property
    def tokens_cached(self) -> int:
        return len(self._keys) * self._mgr.block_tokens + len(self._tail_tokens)

    def owned_keys(self) -> np.ndarray:
        if self._tail_key is None:
            return self._keys
        return np.concatenate([self._keys, self._tail_key])

    def tiers(self) -> dict[str, int]:
        """How many of the trace's blocks sit on each tier (``missing``: not cached anywhere), once
        the moves that have finished are reaped (a block in flight counts where it was)."""
        self._mgr.cache.moves.poll()
        where, _ = self._mgr.cache.locate(self.owned_keys())
        return {"device": int((where == DEVICE).sum()), "dram": int((where == DRAM).sum()),
                "nvme": int((where == NVME).sum()), "missing": int((where == 255).sum())}

    def private_keys(self) -> np.ndarray:
        """Owned keys no other live trace owns."""
        keys = self.owned_keys()
        return keys[self._mgr.cache.index.refs(keys) <= 1] if len(keys) else keys

    def __repr__(self) -> str:
        return f"Trace({self.id!r}, {self.state.value}, {self.num_blocks} blocks)"

    # ------------------------------------------------------------------ steps

    @_cache_locked
    def begin_step(self, tokens: Sequence[int] | np.ndarray, now: float | None = None) -> StepPlan:
        """Find the cached KV for this step's context ``tokens`` (everything the model will see
        before generating), pinned until :meth:`end_step`. The trace's own partial tail block is
        part of the match when the context extends the tokens the trace holds KV for."""
        self._check_open()
        if self.state is TraceState.RUNNING:
            raise InvalidArgumentError(f"trace {self.id!r} is already running a step; call end_step first")
        now = self._mgr._now(now)
        cache, bt = self._mgr.cache, self._mgr.block_tokens
        tokens = as_token_ids(tokens)  # integer ids only: floats are refused, not truncated
        if len(tokens) == 0:
            raise InvalidArgumentError("a step's context must hold at least one token")
        keys = cache.keys_for(tokens)  # checks the token ids: bad input changes nothing
        if self.state in (TraceState.TOOL, TraceState.PARKED):
            self.tool_end(now)
        limit = (len(tokens) - 1) // bt  # leave at least one token to compute
        nfull = len(self._keys)
        probe = keys[:limit]
        tail_len = len(self._tail_tokens)
        use_tail = (self._tail_key is not None and nfull <= limit and nfull * bt + tail_len < len(tokens)
                    and np.array_equal(keys[:nfull], self._keys)
                    and np.array_equal(tokens[nfull * bt: nfull * bt + tail_len], self._tail_tokens))
        if use_tail:
            probe = np.concatenate([keys[:nfull], self._tail_key])
        # A restore still running (Note [Prefetch timing]): recompute its late part when cheaper
        # than waiting; otherwise tell the caller to come back when it is done.
        late_tokens = 0
        if self._restore_blocks:  # wait for this trace's own restores, and only those
            start, done = cache.moves.wait_keys(self._restore_keys, since=self._restore[0],
                                                until=self._mgr._now(now))
            self._restore = (start, done) if done > float("-inf") else (now, now)
        start, done = self._restore
        if self._restore_blocks and not self._lateness_recorded:
            self._lateness_recorded = True
            self._mgr.metrics.prefetch_lateness_s.append(max(0.0, done - now))
        if done > now and self._restore_blocks:
            late_s = done - now
            arrived = self._restore_blocks * min(1.0, max(0.0, (now - start) / max(done - start, 1e-12)))
            cut = max(0, len(probe) - (self._restore_blocks - int(arrived)))
            tokens_late = (len(tokens) - 1 - cut * bt) if use_tail else (len(probe) - cut) * bt
            if not self._mgr.policy.late_part(late_s=late_s, late_tokens=tokens_late, cost=self._mgr.cost):
                self._mgr.metrics.waited_s += late_s
                return StepPlan(None, 0, wait_s=late_s)
            probe = probe[:cut]
            use_tail = use_tail and cut == nfull + 1
            late_tokens = tokens_late
            self._mgr.metrics.late_recompute_tokens += tokens_late
        self._restore_blocks = 0
        self._restore_keys = _EMPTY_KEYS
        self._step_ended = False
        match = cache.match_keys(probe)
        self._release_lease()  # the match pins what it found
        hit_tokens = match.hit_blocks * bt
        if use_tail and match.hit_blocks == len(probe):
            hit_tokens = nfull * bt + tail_len
            self._mgr.metrics.tail_tokens_reused += tail_len
        self._match = match
        self.state = TraceState.RUNNING
        return StepPlan(match, hit_tokens, 0.0, late_tokens)

    @_cache_locked
    def end_step(self, tokens: Sequence[int] | np.ndarray, src: KVRegistration, seq_len: int,
                 now: float | None = None) -> int:
        """The step is done: ``src`` blocks hold KV for the first ``seq_len`` of ``tokens`` (block
        ``b`` = tokens ``[b * block_tokens, (b + 1) * block_tokens)``). Caches the new full blocks
        and the partial tail, and makes them the trace's. Returns the blocks stored."""
        self._check_open()
        if self.state is not TraceState.RUNNING:
            again = "its last step already ended; " if self._step_ended else ""
            raise InvalidArgumentError(
                f"trace {self.id!r} is {self.state.value}, not running: {again}call begin_step first")
        tokens = as_token_ids(tokens)  # integer ids only: floats are refused, not truncated
        if not 0 <= seq_len <= len(tokens):
            raise InvalidArgumentError(f"seq_len={seq_len} must be within [0, {len(tokens)}] (the tokens given)")
        cache, bt, idx = self._mgr.cache, self._mgr.block_tokens, self._mgr.cache.index
        nf = seq_len // bt
        keys = cache.keys_for(tokens[: nf * bt])
        stored = cache.store_keys(keys, src, np.arange(nf))
        if self._match is not None:  # before the old tail is dropped: the match pins it
            cache.release(self._match)
            self._match = None
        # Ownership: ref the new keys, unref what this trace no longer holds.
        same = min(len(self._keys), nf)
        if not np.array_equal(keys[:same], self._keys[:same]):
            same = int(np.argmin(np.all(keys[:same] == self._keys[:same], axis=1)))
        if len(self._keys) > same:
            idx.unref(self._keys[same:])
        if nf > same:
            idx.ref(keys[same:])
        self._keys = keys
        self._drop_tail()
        tail = seq_len - nf * bt
        if tail:
            key = np.frombuffer(os.urandom(16), dtype=np.uint64).reshape(1, 2).copy()
            if cache.store_keys(key, src, np.array([nf], dtype=np.int32)):
                idx.ref(key)
                self._tail_key = key
                self._tail_tokens = tokens[nf * bt: seq_len].copy()
                stored += 1
        self.state = TraceState.READY
        self._step_ended = True
        return stored

    # ------------------------------------------------------------------ tool calls

    @_cache_locked
    def tool_start(self, expected_gap_s: float | None = None, tool: str | None = None,
                   now: float | None = None) -> Decision:
        """The trace waits on a tool: decide where its private KV spends the gap, and act. Valid
        once per step, right after its :meth:`end_step`."""
        self._check_open()
        if self.state is TraceState.RUNNING:
            raise InvalidArgumentError(f"trace {self.id!r} is running a step: call end_step before tool_start")
        if not (self.state is TraceState.READY and self._step_ended):
            why = {TraceState.READY: "no step has run yet",
                   TraceState.RESUMED: "its tool call ended and no step has run since",
                   }.get(self.state, "it is already waiting on a tool")
            raise InvalidArgumentError(
                f"trace {self.id!r} is {self.state.value}: tool_start follows a step, once ({why})")
        if expected_gap_s is not None and not (isinstance(expected_gap_s, (int, float)) and expected_gap_s >= 0):
            raise InvalidArgumentError(f"expected_gap_s must be a number >= 0 or None, got {expected_gap_s!r}")
        mgr = self._mgr
        now = mgr._now(now)
        self._step_ended = False
        self.tool, self._tool_started = tool, now
        gap, gap_low, source = mgr.gaps.estimate(tool, expected_gap_s)
        self.expected_resume = now + gap
        private = self.private_keys()
        where, _ = mgr.cache.locate(private)
        on_device = private[where == DEVICE]
        cache = mgr.cache
        state = TierState(device_blocks=cache.pools[DEVICE].num_blocks, device_fill=cache.tier_fill(DEVICE),
                          kept_blocks=mgr.kept_blocks(), dram_fill=cache.tier_fill(DRAM),
                          has_dram=cache.has_tier(DRAM), has_nvme=cache.has_tier(NVME))
        tokens = len(on_device) * mgr.block_tokens
        d = mgr.policy.decide(private_blocks=len(on_device), private_tokens=tokens, gap_s=gap, gap_low_s=gap_low,
                              gap_source=source, tiers=state, cost=mgr.cost)
        self.decision = d
        mgr.metrics.decisions[d.action.value] += 1
        mgr.metrics.reasons[f"{d.action.value}: {d.reason}"] += 1
        mgr.metrics.gap_sources[source] += 1
        if d.action in (Action.KEEP, Action.NOTHING):  # nothing to move (NOTHING: no private blocks there)
            self._set_lease(self.owned_keys(), now + (d.ttl_s or 0.0))
            self.state = TraceState.TOOL
            # Blocks of the trace that already sit below the device (LRU demoted them while it ran)
            # are restored before the resume as well.
            where, _ = cache.locate(self.owned_keys())
            below_dram, below_nvme = int((where == DRAM).sum()), int((where == NVME).sum())
            if below_dram + below_nvme:
                restore = mgr.cost.restore_s(below_dram, DRAM) + mgr.cost.restore_s(below_nvme, NVME)
                self._prefetch_due = now + max(0.0, gap_low - mgr.policy.prefetch_safety * restore)
                mgr._schedule(self._prefetch_due, self)
        elif d.action is Action.DROP:
            mgr.metrics.dropped_blocks += cache.drop_keys(on_device)
            self.state = TraceState.PARKED
        else:
            tier = DRAM if d.action is Action.DRAM else NVME
            moved = cache.demote_keys(on_device, tier, wait=False)  # submitted: returns at once
            mgr.metrics.demoted_blocks += moved
            self.state = TraceState.PARKED
            self._prefetch_due = now + (d.prefetch_in_s or 0.0)
            mgr._schedule(self._prefetch_due, self)
        mgr._keep_headroom(now)
        return d

    @_cache_locked
    def tool_end(self, now: float | None = None) -> None:
        """The tool returned: start the restore if it has not started (Note [Prefetch timing])."""
        self._check_open()
        if self.state not in (TraceState.TOOL, TraceState.PARKED):
            raise InvalidArgumentError(f"trace {self.id!r} is {self.state.value}, not waiting on a tool")
        now = self._mgr._now(now)
        self._mgr.gaps.observe(self.tool, now - self._tool_started)
        if self._prefetch_due is not None:
            self._prefetch(now)
        self.state = TraceState.RESUMED

    def _prefetch(self, at: float) -> None:
        self._prefetch_due = None
        mgr = self._mgr
        keys = self.owned_keys()
        if len(keys) == 0:
            return
        cache = mgr.cache
        moves, saved = cache.moves, cache.moves.now
        moves.now = at  # issued when it was due (tick may run later)
        try:
            mgr._make_room_for(self, keys)
            cache.promote_keys(mgr._restorable(keys), DEVICE, wait=False)  # submitted: completes in the background
        finally:
            moves.now = saved
        where, _ = cache.locate(keys)
        up = keys[(where != DEVICE) & (where != 255) & moves.moving(keys)]
        self._restore = (at, at)
        self._restore_keys = up
        self._restore_blocks = len(up)
        self._lateness_recorded = False
        mgr.metrics.prefetches += 1
        mgr.metrics.prefetched_blocks += len(up)
        # Not pinned: the promotion made them the device's most recently used blocks, which is
        # protection enough for the short wait until the step, and pins here would make a small
        # device tier refuse other traces' blocks.

    # ------------------------------------------------------------------ leases

    @_cache_locked
    def retain(self, ttl_s: float, now: float | None = None) -> int:
        """Hold the trace's device-resident blocks on the device for ``ttl_s`` seconds (a lease the
        next step, :meth:`release_retained` or the TTL ends). Returns the blocks held."""
        self._check_open()
        if not (isinstance(ttl_s, (int, float)) and ttl_s > 0):
            raise InvalidArgumentError(f"ttl_s must be a number > 0, got {ttl_s!r}")
        now = self._mgr._now(now)
        return self._set_lease(self.owned_keys(), now + ttl_s)

    def pin(self, ttl_s: float, now: float | None = None) -> int:
        """Same as :meth:`retain`: hold the trace's device blocks for ``ttl_s`` seconds."""
        return self.retain(ttl_s, now)

    @_cache_locked
    def release_retained(self) -> None:
        self._check_open()
        self._release_lease()

    def _set_lease(self, keys: np.ndarray, until: float) -> int:
        self._release_lease()
        if len(keys):
            where, _ = self._mgr.cache.locate(keys)
            keys = keys[where == DEVICE]
        if len(keys) == 0:
            return 0
        self._mgr.cache.index.pin(keys)
        self._lease, self._lease_until = keys, until
        self._mgr._leased += len(keys)
        self._mgr._schedule(until, self)
        return len(keys)

    def _release_lease(self) -> None:
        if len(self._lease):
            self._mgr.cache.index.unpin(self._lease)
            self._mgr._leased -= len(self._lease)
            self._lease = _EMPTY_KEYS

    def _on_due(self, now: float) -> None:
        if (self._prefetch_due is not None and self._prefetch_due <= now
                and self.state in (TraceState.TOOL, TraceState.PARKED)):
            self._prefetch(self._prefetch_due)
        if len(self._lease) and self._lease_until <= now:
            self._release_lease()
            self._mgr.metrics.expired_leases += 1

    # ------------------------------------------------------------------ fork / close

    @_cache_locked
    def fork(self, trace_id: str) -> Trace:
        """A subagent that starts from this trace's context: it owns the same blocks (refcounted)."""
        self._check_open()
        child = self._mgr.open(trace_id)
        idx = self._mgr.cache.index
        if len(self._keys):
            idx.ref(self._keys)
        child._keys = self._keys.copy()
        if self._tail_key is not None:
            idx.ref(self._tail_key)
            child._tail_key = self._tail_key.copy()
            child._tail_tokens = self._tail_tokens.copy()
        return child

    def migrate(self, to_worker: str, timeout_s: float = 10.0) -> Any:
        """Move this trace to another worker of the cluster (the cache's
        :class:`~kvtier.cluster.worker.ClusterWorker`): claim it (or use the fence this worker
        holds), ask ``to_worker`` through its mailbox to pull the blocks it lacks and take over,
        and wait for the result (a :class:`~kvtier.cluster.migration.MigrationResult`: state,
        blocks present/moved, bytes, seconds). COMMITTED: the trace is closed here (its blocks
        stay cached, found by content) and continues at the target. Anything else: the trace
        stays here, usable, under the fence in ``self.fence``. Not while a step runs."""
        self._check_open()
        if self.state is TraceState.RUNNING:
            raise InvalidArgumentError(f"trace {self.id!r} is running a step: migrate it between steps")
        worker = getattr(self._mgr.cache, "cluster", None)
        if worker is None:
            raise InvalidArgumentError("migrate needs a ClusterWorker attached to the cache")
        if self.fence is None:
            self.fence = worker.store.claim_trace(self.id)
        # Peers pull from the DRAM tier only: the trace's blocks go there first (copy, then release),
        # and are published (the cache's operations flush the directory).
        keys = self.owned_keys()
        cache = self._mgr.cache
        if len(keys):
            cache.demote_keys(keys, DRAM)
            if cache.has_tier(NVME):
                cache.promote_keys(keys, DRAM)
        tail = {}
        if self._tail_key is not None:
            tail = {"tokens": [int(t) for t in self._tail_tokens], "full_blocks": int(len(self._keys))}
        res = worker.request_migration(self.id, self.owned_keys(), to_worker, self.fence,
                                       timeout_s=timeout_s, tail=tail)
        from kvtier.cluster.migration import MigrationState

        if res.state is MigrationState.COMMITTED:
            self.migrated_to = to_worker
            self.fence = None
            self.close()
        elif res.owner == worker.worker_id and res.fence is not None:
            self.fence = int(res.fence)
        return res

    @_cache_locked
    def close(self) -> None:
        """The trace is done: its blocks lose this owner (they stay cached for others to match;
        its private tail is freed). Idempotent."""
        if self.state is TraceState.CLOSED:
            return
        cache = self._mgr.cache
        if self._match is not None:
            cache.release(self._match)
            self._match = None
        self._release_lease()
        if len(self._keys):
            cache.index.unref(self._keys)
        self._keys = _EMPTY_KEYS
        self._drop_tail()
        self.state = TraceState.CLOSED
        self._mgr._traces.pop(self.id, None)

    def _drop_tail(self) -> None:
        if self._tail_key is None:
            return
        idx = self._mgr.cache.index
        idx.unref(self._tail_key)
        if idx.refs(self._tail_key)[0] == 0:  # nobody else (a fork) holds it: free it
            self._release_lease()
            self._mgr.cache.drop_keys(self._tail_key)
        self._tail_key = None
        self._tail_tokens = np.zeros(0, dtype=np.int64)

    def _check_open(self) -> None:
        if self.state is TraceState.CLOSED:
            raise InvalidArgumentError(f"trace {self.id!r} is closed")


class TraceManager:
    """The traces of one :class:`~kvtier.TieredCache`, and the trace-aware policy that places them.

    Args:
        cache: the cache whose blocks the traces own.
        cost: the cost model (:func:`calibrate` measures one on this cache).
        policy: the placement policy (default :class:`~kvtier.policy.TraceAwarePolicy`).
        gaps: the gap estimator (learns each tool's gaps from ``tool_end``).
        clock: seconds, for calls without ``now``.
        lane: where moves out (demotions, NVMe writes) are timed (default: the cache's own,
            ``cache.moves.lanes["out"]``; Note [Background moves]). Given, it replaces it.
        restore_lane: where moves in (restores, promotions) are timed (default: the cache's own;
            a twin of ``lane`` when only ``lane`` is given). PCIe copy engines and NVMe queues serve
            each direction on their own, so a restore does not wait behind demotions.
    """

    def __init__(self, cache: TieredCache, cost: CostModel, *, policy: TraceAwarePolicy | None = None,
                 gaps: GapEstimator | None = None, clock: Callable[[], float] = time.monotonic,
                 lane: BackgroundLane | None = None, restore_lane: BackgroundLane | None = None) -> None:
        if not isinstance(cache, TieredCache):
            raise InvalidArgumentError(f"cache must be a kvtier.TieredCache, got {type(cache).__name__}")
        if not isinstance(cost, CostModel):
            raise InvalidArgumentError(f"cost must be a kvtier.CostModel, got {type(cost).__name__}")
        self.cache = cache
        cache.shared_refs = 2  # prefixes owned by several traces are evicted last: they stay hot
        self.cost = cost
        self.policy = policy or TraceAwarePolicy()
        self.gaps = gaps or GapEstimator()
        self.clock = clock
        cache.moves.clock = clock
        if lane is not None:
            cache.moves.lanes["out"] = lane
            cache.moves.lanes["in"] = restore_lane or lane.twin()
        elif restore_lane is not None:
            cache.moves.lanes["in"] = restore_lane
        self.block_tokens = cache.block_tokens
        self.metrics = TraceMetrics()
        self._traces: dict[str, Trace] = {}
        self._leased = 0
        self._due: list[tuple[float, int, Trace]] = []
        self._seq = itertools.count()

    @property
    def lane(self) -> BackgroundLane:
        """Where moves out of the device are timed (the cache's; Note [Background moves])."""
        return self.cache.moves.lanes["out"]

    @property
    def restore_lane(self) -> BackgroundLane:
        return self.cache.moves.lanes["in"]

    def open(self, trace_id: str) -> Trace:
        if not isinstance(trace_id, str) or not trace_id:
            raise InvalidArgumentError(f"trace_id must be a non-empty string, got {trace_id!r}")
        if trace_id in self._traces:
            raise InvalidArgumentError(f"trace {trace_id!r} is already open")
        t = Trace(self, trace_id)
        self._traces[trace_id] = t
        return t

    def adopt(self, trace_id: str, keys: np.ndarray, tail: dict[str, Any], fence: int | None = None) -> Trace:
        """A trace migrated here (``kvtier.cluster.worker``): open it owning ``keys`` (its full
        blocks, then, when ``tail`` has ``tokens``, the private key of its partial tail block)."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 2)
        if trace_id in self._traces:
            self._traces[trace_id].close()
        t = self.open(trace_id)
        nfull = int(tail.get("full_blocks", len(keys))) if tail.get("tokens") else len(keys)
        idx = self.cache.index
        if len(keys):
            idx.ref(keys)
        t._keys = keys[:nfull].copy()
        if nfull < len(keys):
            t._tail_key = keys[nfull:nfull + 1].copy()
            t._tail_tokens = np.asarray(tail["tokens"], dtype=np.int64)
        t.fence = fence
        t.state = TraceState.RESUMED
        return t

    def get(self, trace_id: str) -> Trace:
        try:
            return self._traces[trace_id]
        except KeyError:
            raise InvalidArgumentError(f"no open trace {trace_id!r}") from None

    @property
    def traces(self) -> dict[str, Trace]:
        return dict(self._traces)

    def kept_blocks(self) -> int:
        """Distinct device blocks held by leases (kept traces, prefetched traces, retains): a shared
        prefix that several traces hold counts once (it occupies the device once)."""
        if self._leased == 0:
            return 0
        held = [t._lease for t in self._traces.values() if len(t._lease)]
        if len(held) == 1:
            return len(held[0])
        return len(np.unique(np.concatenate(held), axis=0))

    @_cache_locked
    def tick(self, now: float | None = None) -> None:
        """Run the prefetches that are due and end expired leases, in time order."""
        now = self._now(now)
        self.cache.moves.poll()
        while self._due and self._due[0][0] <= now:
            _, _, t = heapq.heappop(self._due)
            if t.state is not TraceState.CLOSED:
                t._on_due(now)

    def _make_room_for(self, trace: Trace, keys: np.ndarray) -> None:
        """Note [Farthest resume first]: before a restore, free room on the device and in DRAM for
        ``keys`` by demoting the private blocks of waiting traces expected back *later* than
        ``trace``, the latest first, instead of leaving it to LRU order (which may push out a
        trace that resumes sooner, or the blocks just restored)."""
        cache = self.cache
        where, _ = cache.locate(keys)
        for tier, need in ((DRAM, int((where == NVME).sum())), (DEVICE, int((where != DEVICE).sum()))):
            if need == 0 or not cache.has_tier(tier) or not cache.has_tier(tier + 1):
                continue
            short = need - cache.tier_free_blocks(tier) - sum(len(m.keys) for m in cache.moves.leaving(tier))
            if short <= 0:
                continue
            later = sorted((t for t in self._traces.values()
                            if t is not trace and t.state in (TraceState.TOOL, TraceState.PARKED)
                            and t.expected_resume > trace.expected_resume and not len(t._lease)),
                           key=lambda t: -t.expected_resume)
            for t in later:
                pk = t.private_keys()
                if len(pk) == 0:
                    continue
                w, _ = cache.locate(pk)
                on = pk[w == tier]
                if len(on) == 0:
                    continue
                moved = cache.demote_keys(on[-short:], tier + 1, wait=False)  # the tail of its context first
                self.metrics.farthest_demoted_blocks += moved
                short -= moved
                if short <= 0:
                    break

    def _restorable(self, keys: np.ndarray) -> np.ndarray:
        """The head of ``keys``' blocks below the device that a restore may bring up without
        dropping any block (Note [A restore never drops] in kvtier/policy.py)."""
        cache = self.cache
        where, _ = cache.locate(keys)
        below = np.flatnonzero((where == DRAM) | (where == NVME))
        if not cache.has_tier(DRAM) or len(below) == 0:
            return keys
        _, _, evictable = cache.index.victims(DRAM, cache.pools[DRAM].num_blocks, cache.shared_refs)
        budget = self.policy.restore_budget(
            device_free=cache.tier_free_blocks(DEVICE), dram_evictable=int(evictable),
            restoring_dram=int((where == DRAM).sum()), restoring_nvme=int((where == NVME).sum()),
            staging_reserve=cache.staging_reserve)
        if budget >= len(below):
            return keys
        self.metrics.restore_capped_blocks += len(below) - budget
        return keys[below[:budget]]

    def _keep_headroom(self, now: float) -> None:
        """Note [Headroom] in kvtier/policy.py."""
        cache = self.cache
        for tier in (DEVICE, DRAM):
            if not cache.has_tier(tier) or (tier == DRAM and not cache.has_tier(NVME)):
                continue  # a DRAM tier with nothing below would drop blocks to make headroom
            want = int(self.policy.headroom * cache.pools[tier].num_blocks)
            if want and cache.tier_free_blocks(tier) < want:
                cache.make_room(tier, want, wait=False)  # background demotions (Note [Background moves])
                self.metrics.headroom_runs += 1

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def close(self) -> None:
        for t in list(self._traces.values()):
            t.close()

    def _schedule(self, at: float, t: Trace) -> None:
        heapq.heappush(self._due, (at, next(self._seq), t))

    def _now(self, now: float | None) -> float:
        now = self.clock() if now is None else float(now)
        self.cache.moves.now = now  # moves issued by this call start then
        return now


def calibrate(cache: TieredCache, recompute_s_per_token: float, blocks: int = 16) -> CostModel:
    """Measure the cache's tier bandwidths (device<->DRAM, DRAM<->NVMe) with ``blocks`` scratch
    blocks; the recompute cost is the caller's measurement for its model."""
    bw: dict[str, float] = {}
    layout = cache.layout
    dev = cache.pools[DEVICE]
    n = max(1, min(blocks, dev.num_blocks // 2, cache.pools[DRAM].num_blocks // 2 if cache.has_tier(DRAM) else blocks))
    if cache.has_tier(DRAM):
        a, b = dev.allocate(n), cache.pools[DRAM].allocate(n)
        try:
            for src, dst, sa, da, link in ((dev, cache.pools[DRAM], a, b, "device->dram"),
                                           (cache.pools[DRAM], dev, b, a, "dram->device")):
                best = min(_timed(lambda s=src, i=sa, d=dst, j=da: cache.engine.transfer(s, i, d, j).wait())
                           for _ in range(3))
                bw[link] = n * layout.block_bytes / max(best, 1e-9)
            bw["device->engine"] = bw["dram->engine"] = bw["dram->device"]
            if cache.has_tier(NVME) and cache.tier_free_blocks(NVME) >= n:
                keys = np.frombuffer(os.urandom(16 * n), dtype=np.uint64).reshape(n, 2).copy()
                w = _timed(lambda: cache.nvme.write(keys, b).wait())
                r = _timed(lambda: cache.nvme.read(keys, b).wait())
                cache.nvme.evict(keys)
                bw["dram->nvme"] = n * layout.block_bytes / max(w, 1e-9)
                bw["nvme->dram"] = n * layout.block_bytes / max(r, 1e-9)
        finally:
            dev.free(a)
            cache.pools[DRAM].free(b)
    return CostModel(layout.block_bytes, layout.block_tokens, bw, recompute_s_per_token,
                     source=f"calibrated on this machine with {n} blocks")


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
