"""Trace migration against a real redis-server, with real data moved by kvtier's copy engine
between two workers' HostPools (the in-process stand-in for the UCX data plane)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import redis

from kvtier import CopyEngine, HostPool
from kvtier.cluster import ClusterStore, StaleWriteError, StoreUnavailableError
from kvtier.cluster.migration import (
    Migration,
    MigrationError,
    MigrationState,
    PoolMover,
    PullBatch,
    plan_migration,
)

BLOCK_BYTES = 4096
POOL_BLOCKS = 64


class Worker:
    """One worker: its store, its served pool, and which slot holds which key (its own view)."""

    def __init__(self, server: Any, name: str, **kw: Any) -> None:
        self.name = name
        self.pool = HostPool(BLOCK_BYTES, num_blocks=POOL_BLOCKS, pin=False)
        self.held: dict[tuple[int, int], int] = {}  # key -> slot
        self.traces: dict[str, int] = {}  # trace -> fence, as this worker believes
        kw.setdefault("lease_ms", 60_000)
        kw.setdefault("timeout_s", 1.0)  # generous: the machine may be loaded
        kw.setdefault("heartbeat", False)
        self.store = ClusterStore(server.url, name, on_rejoin=self.rejoin, **kw)

    def put(self, keys: np.ndarray, data: np.ndarray) -> np.ndarray:
        """Store blocks locally and publish them."""
        slots = self.pool.allocate(keys.shape[0])
        self.pool.view()[slots] = data
        for k, s in zip(map(tuple, keys.tolist()), slots.tolist()):
            self.held[k] = s
        self.store.publish(keys, slots)
        return slots

    def read(self, keys: np.ndarray) -> np.ndarray:
        slots = [self.held[k] for k in map(tuple, keys.tolist())]
        return self.pool.view()[slots].copy()

    def rejoin(self, store: ClusterStore) -> None:
        """After a new incarnation: republish what this worker holds, re-claim its traces."""
        if self.held:
            keys = np.array(list(self.held), dtype=np.uint64)
            store.publish(keys, np.array(list(self.held.values())))
        for t in self.traces:
            self.traces[t] = store.claim_trace(t)

    def close(self) -> None:
        self.store.close()


def keys_of(ids: Any, tag: int = 3) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.uint64)
    return np.stack([ids, np.full(ids.shape, tag, dtype=np.uint64)], axis=1)


@pytest.fixture
def engine() -> Any:
    e = CopyEngine(threads=1)
    yield e
    e.close()


def setup_trace(server: Any, rng: np.random.Generator, shared: int = 5, private: int = 7,
                **kw: Any) -> tuple[Worker, Worker, np.ndarray, np.ndarray]:
    """A trace owned by src with ``shared + private`` blocks; dst already holds the shared prefix."""
    src, dst = Worker(server, "src", **kw), Worker(server, "dst", **kw)
    keys = keys_of(range(shared + private))
    data = rng.integers(0, 256, (shared + private, BLOCK_BYTES), dtype=np.uint8)
    src.put(keys, data)
    dst.put(keys[:shared], data[:shared])  # same keys, same bytes: a shared prefix
    src.traces["t"] = src.store.claim_trace("t")
    return src, dst, keys, data


def migration(src: Worker, dst: Worker, keys: np.ndarray, engine: Any, mover: Any = None) -> Migration:
    m = PoolMover({src.name: src.pool, dst.name: dst.pool}, dst.name, engine)
    return Migration("t", keys, src.store, dst.store, src.traces["t"], mover or m, discard=m.discard,
                     block_bytes=BLOCK_BYTES)


def evalsha_calls(server: Any) -> int:
    r = redis.Redis.from_url(server.url)
    try:
        return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        r.close()


def test_plan_dedups_in_one_round_trip(redis_server: Any, rng: np.random.Generator) -> None:
    src, dst, keys, _ = setup_trace(redis_server, rng)
    third = Worker(redis_server, "third")
    extra = keys_of([100, 101, 102])
    third.put(extra[:2], rng.integers(0, 256, (2, BLOCK_BYTES), dtype=np.uint8))
    third.put(keys[6:8], src.read(keys[6:8]))  # also at src: src is preferred
    all_keys = np.concatenate([keys, extra])
    dst.store.lookup(all_keys[:1])
    before = evalsha_calls(redis_server)
    plan = plan_migration(dst.store, "t", all_keys, "src", "dst")
    assert evalsha_calls(redis_server) - before == 1
    assert plan.present.tolist() == [True] * 5 + [False] * 10
    assert plan.unavailable.tolist() == [False] * 14 + [True]  # key 102: nobody holds it
    assert [p.source for p in plan.pulls] == ["src", "third"]
    assert plan.pulls[0].key_index.tolist() == list(range(5, 12))
    assert plan.pulls[0].source_slots.tolist() == [src.held[k] for k in map(tuple, keys[5:].tolist())]
    assert plan.pulls[1].key_index.tolist() == [12, 13]
    assert plan.blocks_to_pull == 9
    for w in (src, dst, third):
        w.close()


def test_migration_moves_only_missing_blocks_byte_exact(redis_server: Any, rng: np.random.Generator,
                                                        engine: Any) -> None:
    src, dst, keys, data = setup_trace(redis_server, rng)
    dst_free = dst.pool.free_blocks
    m = migration(src, dst, keys, engine)
    res = m.run()
    assert res.state is MigrationState.COMMITTED, res.error
    assert (res.blocks_total, res.blocks_present, res.blocks_moved, res.blocks_unavailable) == (12, 5, 7, 0)
    assert res.bytes_moved == 7 * BLOCK_BYTES
    assert dst.pool.free_blocks == dst_free - 7
    # the target's pool now holds every block of the trace, byte for byte
    lk = dst.store.lookup(keys)
    assert lk.held_by("dst").all()
    wi = lk.workers.index("dst")
    dst_slots = np.empty(12, dtype=np.int64)
    rows = lk.records[lk.records["worker"] == wi]
    dst_slots[rows["key"]] = rows["slot"]
    np.testing.assert_array_equal(dst.pool.view()[dst_slots], data)
    # ownership moved under a new fence; the source's fence is stale
    owner = src.store.trace_owner("t")
    assert owner is not None and owner.owner == "dst" and owner.fence == res.fence and res.fence > src.traces["t"]
    with pytest.raises(StaleWriteError):
        src.store.write_trace("t", src.traces["t"], {"step": 9})
    dst.store.write_trace("t", res.fence, {"step": 9})
    assert set(res.timings_s) >= {"plan", "prepare", "move", "publish", "commit"}
    # the source's blocks were never touched
    np.testing.assert_array_equal(src.read(keys), data)
    with pytest.raises(MigrationError, match="committed"):
        m.abort()
    src.close()
    dst.close()


def test_failed_copy_aborts_and_source_keeps_trace(redis_server: Any, rng: np.random.Generator,
                                                   engine: Any) -> None:
    src, dst, keys, data = setup_trace(redis_server, rng)
    dst_free = dst.pool.free_blocks
    engine.inject_faults(1)  # every batch fails
    res = migration(src, dst, keys, engine).run()
    engine.inject_faults(0)
    assert res.state is MigrationState.ABORTED and "TransferError" in res.error
    assert res.owner == "src" and res.fence == src.traces["t"] and res.record_cleared
    owner = dst.store.trace_owner("t")
    assert owner is not None and (owner.owner, owner.fence, owner.state) == ("src", src.traces["t"], "owned")
    assert dst.pool.free_blocks == dst_free  # nothing leaked at the target
    assert not dst.store.lookup(keys[5:]).held_by("dst").any()
    src.store.write_trace("t", src.traces["t"], {"step": 2})  # still the owner, same fence
    np.testing.assert_array_equal(src.read(keys), data)
    # and a retry succeeds
    assert migration(src, dst, keys, engine).run().state is MigrationState.COMMITTED
    src.close()
    dst.close()


def test_slot_reused_during_pull_is_refused(redis_server: Any, rng: np.random.Generator, engine: Any) -> None:
    """The source reuses a slot while the target reads it: validation catches it, nothing is
    published, the pulled blocks are given back, the source keeps the trace."""
    src, dst, keys, _ = setup_trace(redis_server, rng)
    dst_free = dst.pool.free_blocks
    inner = PoolMover({"src": src.pool, "dst": dst.pool}, "dst", engine)

    def racing_mover(batch: PullBatch) -> np.ndarray:
        slot = int(batch.source_slots[0])
        src.store.free_slots([slot])  # the holder frees the slot first (the protocol's rule) ...
        src.pool.view()[slot] = 0xEE  # ... then overwrites it
        return inner(batch)

    res = migration(src, dst, keys, engine, mover=racing_mover).run()
    assert res.state is MigrationState.ABORTED and "changed while being pulled" in res.error
    assert dst.pool.free_blocks == dst_free
    assert not dst.store.lookup(keys[5:]).held_by("dst").any()
    assert dst.store.trace_owner("t").owner == "src"  # type: ignore[union-attr]
    src.close()
    dst.close()


def test_target_lease_lapses_before_commit(redis_server: Any, rng: np.random.Generator, engine: Any) -> None:
    src, dst, keys, data = setup_trace(redis_server, rng)
    m = migration(src, dst, keys, engine)
    m.prepare()
    m.move()
    dst.store.lease_ms = 100
    dst.store.renew()
    deadline = time.monotonic() + 5
    while "dst" in src.store.workers():  # dst is dead to the store within 100 ms
        assert time.monotonic() < deadline
        time.sleep(0.01)
    res = m.run()
    assert res.state is MigrationState.ABORTED and "KVT_TARGET" in res.error
    owner = src.store.trace_owner("t")
    assert owner is not None and (owner.owner, owner.state) == ("src", "owned")
    np.testing.assert_array_equal(src.read(keys), data)
    src.close()
    dst.close()


def test_source_dies_mid_move_target_takes_over(redis_server: Any, rng: np.random.Generator,
                                                engine: Any) -> None:
    """The source's lease lapses while the target pulls: what it pulled no longer validates (its
    holder is dead), the move aborts with nothing published; the trace's owner is dead, so the
    target may claim it (with a new fence) and recompute what it lacks."""
    src, dst, keys, _ = setup_trace(redis_server, rng)
    dst_free = dst.pool.free_blocks
    inner = PoolMover({"src": src.pool, "dst": dst.pool}, "dst", engine)

    def slow_mover(batch: PullBatch) -> np.ndarray:
        out = inner(batch)
        src.store.lease_ms = 100  # the source's lease lapses under the copy
        src.store.renew()
        deadline = time.monotonic() + 5
        while "src" in dst.store.workers():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return out

    res = migration(src, dst, keys, engine, mover=slow_mover).run()
    assert res.state is MigrationState.ABORTED and "changed while being pulled" in res.error
    assert dst.pool.free_blocks == dst_free
    assert not dst.store.lookup(keys[5:]).held_by("dst").any()
    assert not dst.store.lookup(keys).held_by("src").any()  # a dead worker's blocks are not offered
    owner = dst.store.trace_owner("t")
    assert owner is not None and owner.owner == "src" and not owner.owner_live
    fence = dst.store.claim_trace("t")
    assert fence > src.traces["t"]
    with pytest.raises(StaleWriteError):
        src.store.write_trace("t", src.traces["t"], {"late": 1})
    src.close()
    dst.close()


@pytest.mark.parametrize("kill_before", ["plan", "prepare", "move", "mid-move", "commit"])
def test_store_killed_mid_migration_trace_stays_at_source(redis_server: Any, rng: np.random.Generator,
                                                          engine: Any, kill_before: str) -> None:
    """Kill -9 the redis-server at each point of a migration: the migration ends (no hang, in
    bounded time), the source still owns the trace with its blocks intact, and once a store is
    back the source rejoins, republishes, re-claims the trace and can migrate it."""
    src, dst, keys, data = setup_trace(redis_server, rng, heartbeat=True, lease_ms=2000,
                                       backoff_s=(0.05, 0.2))
    dst_free = dst.pool.free_blocks
    inner = PoolMover({"src": src.pool, "dst": dst.pool}, "dst", engine)

    def killing_mover(batch: PullBatch) -> np.ndarray:
        out = inner(batch)
        redis_server.kill()
        return out

    m = migration(src, dst, keys, engine, mover=killing_mover if kill_before == "mid-move" else None)
    steps = {"plan": None, "prepare": m.make_plan, "move": m.prepare, "mid-move": m.prepare, "commit": None}
    if kill_before == "commit":
        m.prepare()
        m.move()
    elif steps[kill_before] is not None:
        steps[kill_before]()
    if kill_before != "mid-move":
        redis_server.kill()
    t0 = time.monotonic()
    res = m.run()
    assert time.monotonic() - t0 < 2.0, "a migration against a dead store must end quickly"
    if kill_before == "commit":
        assert res.state is MigrationState.UNKNOWN and res.owner is None
    else:
        assert res.state is MigrationState.ABORTED, res
        assert res.owner == "src" and res.fence == src.traces["t"]
        assert dst.pool.free_blocks == dst_free  # pulled blocks were given back
    assert "StoreUnavailableError" in res.error
    np.testing.assert_array_equal(src.read(keys), data)  # usable at its source
    # an empty store comes back: both workers rejoin; src republishes and re-claims its trace
    redis_server.restart()
    deadline = time.monotonic() + 10
    while not (src.store.connected and dst.store.connected and src.store.metrics.rejoins
               and dst.store.metrics.rejoins and "dst" in src.store.workers()
               and src.store.trace_owner("t") is not None):
        assert time.monotonic() < deadline, "workers did not rejoin the restarted store"
        time.sleep(0.02)
    if kill_before == "commit":
        assert m.resolve() is MigrationState.ABORTED  # the lost store never committed it
    owner = src.store.trace_owner("t")
    assert owner is not None and owner.owner == "src" and owner.owner_live
    assert src.store.lookup(keys).held_by("src").all()
    fresh = migration(src, dst, keys, engine).run()
    assert fresh.state is MigrationState.COMMITTED, fresh.error
    src.close()
    dst.close()


def test_store_paused_during_commit_resolves_consistently(redis_server: Any, rng: np.random.Generator,
                                                          engine: Any) -> None:
    """SIGSTOP the store as the commit is sent: the call times out (UNKNOWN); after SIGCONT the
    outcome is whatever the store did, and resolve() agrees with it: exactly one owner."""
    src, dst, keys, _ = setup_trace(redis_server, rng, heartbeat=True, lease_ms=10_000, backoff_s=(0.05, 0.1))
    m = migration(src, dst, keys, engine)
    m.prepare()
    m.move()
    redis_server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            m.commit()
        assert time.monotonic() - t0 < 1.0 + 1.0
        assert m.state is MigrationState.UNKNOWN
        with pytest.raises(MigrationError, match="unknown"):
            m.abort()
    finally:
        redis_server.resume()
    deadline = time.monotonic() + 5
    while not (src.store.connected and dst.store.connected):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    state = m.resolve()
    owner = dst.store.trace_owner("t")
    assert owner is not None
    if state is MigrationState.COMMITTED:
        assert owner.owner == "dst" and owner.fence == m.new_fence
    else:
        assert state is MigrationState.ABORTED and owner.owner == "src"
    src.close()
    dst.close()


def test_bad_migration_input(redis_server: Any, rng: np.random.Generator, engine: Any) -> None:
    src, dst, keys, _ = setup_trace(redis_server, rng)
    from kvtier.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="source == target"):
        plan_migration(src.store, "t", keys, "src", "src")
    with pytest.raises(InvalidArgumentError, match="same worker"):
        Migration("t", keys, src.store, src.store, 1, lambda b: b)
    with pytest.raises(InvalidArgumentError, match="fence"):
        Migration("t", keys, src.store, dst.store, -3, lambda b: b)
    m = migration(src, dst, keys, engine)
    with pytest.raises(MigrationError, match="needs state prepared"):
        m.move()
    with pytest.raises(InvalidArgumentError, match="no pool for the target"):
        PoolMover({"src": src.pool}, "dst", engine)
    src.close()
    dst.close()


@pytest.mark.slow
def test_store_killed_at_random_points(redis_server: Any, rng: np.random.Generator, engine: Any) -> None:
    """Many migrations, each with the redis-server killed before a random store round trip (of
    the plan, prepare, per-batch validations, publish, commit) or inside a random mover batch.
    Every one ends in bounded time; the source keeps the trace and its bytes; no target slot
    leaks; after the store comes back empty and the workers rejoin, the trace migrates."""
    src, dst, keys, data = setup_trace(redis_server, rng)
    third = Worker(redis_server, "third")
    third.put(keys_of([50, 51, 52]), rng.integers(0, 256, (3, BLOCK_BYTES), dtype=np.uint8))
    all_keys = np.concatenate([keys, keys_of([50, 51, 52])])  # two source batches: src and third
    workers = (src, dst, third)
    calls = {"n": 0, "kill_at": -1}

    def counting(store: ClusterStore) -> None:
        inner_call = store._call

        def call(op: str, fn: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == calls["kill_at"]:
                redis_server.kill()
            return inner_call(op, fn, **kw)

        store._call = call  # type: ignore[method-assign]

    outcomes: dict[str, int] = {}
    for trial in range(24):
        for w in workers:
            counting(w.store)
        dst_used = dst.pool.stats().used_blocks
        inner = PoolMover({"src": src.pool, "dst": dst.pool, "third": third.pool}, "dst", engine)
        # the kill point: 1-6 before that store round trip (plan, prepare, validate x2, publish,
        # commit), 7-8 inside mover batch 1-2, 9 never
        point = int(rng.integers(1, 10))
        kill_in_batch = point - 6 if point in (7, 8) else 0
        batches = {"n": 0}

        def mover(batch: PullBatch) -> np.ndarray:
            batches["n"] += 1
            out = inner(batch)
            if batches["n"] == kill_in_batch:
                redis_server.kill()
            return out

        calls["n"], calls["kill_at"] = 0, (point if point <= 6 else -1)
        m = Migration("t", all_keys, src.store, dst.store, src.traces["t"], mover, discard=inner.discard,
                      block_bytes=BLOCK_BYTES)
        t0 = time.monotonic()
        res = m.run()
        assert time.monotonic() - t0 < 3.0, f"trial {trial}: {res}"
        outcomes[res.state.value] = outcomes.get(res.state.value, 0) + 1
        killed = redis_server.proc is None
        if not killed:  # the kill point came after the last store call: the migration committed
            assert res.state is MigrationState.COMMITTED
        else:
            assert res.state in (MigrationState.ABORTED, MigrationState.UNKNOWN), f"trial {trial}: {res}"
            # nothing leaked at the target: the pulled slots were given back, unless published
            # (UNKNOWN: they are the target's now) or maybe published (held until released)
            published = m.moved_keys.shape[0] if m.state is MigrationState.UNKNOWN else 0
            unsure = m.unsure_slots.shape[0]
            assert dst.pool.stats().used_blocks == dst_used + published + unsure, f"trial {trial}: {res}"
            assert not m.release_unsure() or unsure == 0  # not while the store is down
            if published:
                dst.pool.free(m.moved_slots)  # the store that knew them is gone
        np.testing.assert_array_equal(src.read(keys), data)  # the source's bytes, untouched
        # put the world back: a new empty store, everyone rejoins (on_rejoin republishes/re-claims)
        for w in workers:
            w.store._call = type(w.store)._call.__get__(w.store)  # type: ignore[method-assign]
        if killed:
            redis_server.restart()
            for w in workers:
                w.store.renew()
            if res.state is MigrationState.UNKNOWN:
                assert m.resolve() is MigrationState.ABORTED  # the new store never saw a commit
            assert m.release_unsure() and m.unsure_slots.size == 0
            assert dst.pool.stats().used_blocks == dst_used, f"trial {trial}: {res}"
        else:  # committed: move the trace back home for the next trial
            src.traces["t"] = dst.store.transfer_trace("t", "dst", "src", res.fence or 0)
            dst.store.free_slots(m.moved_slots)
            dst.pool.free(m.moved_slots)
        owner = src.store.trace_owner("t")
        assert owner is not None and owner.owner == "src" and owner.fence == src.traces["t"]
        assert src.store.lookup(keys).held_by("src").all()
    print("outcomes", outcomes)
    assert all(outcomes.get(k, 0) >= 1 for k in ("aborted", "unknown", "committed")), outcomes
    for w in workers:
        w.close()
