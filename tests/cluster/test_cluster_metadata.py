"""ClusterStore against a real redis-server: directory, leases, fencing, degraded mode."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from kvtier.cluster import (
    ClusterStore,
    OwnershipError,
    StaleWriteError,
    StoreUnavailableError,
    WorkerInfo,
)
from kvtier.errors import InvalidArgumentError

HERE = Path(__file__).parent


def make(server: Any, worker: str, **kw: Any) -> ClusterStore:
    kw.setdefault("lease_ms", 60_000)
    kw.setdefault("timeout_s", 1.0)  # generous: the machine may be loaded; tests of bounds set their own
    kw.setdefault("heartbeat", False)
    return ClusterStore(server.url, worker, **kw)


def shorten_lease(store: ClusterStore, lease_ms: int) -> None:
    """Renew with a short lease, so that it lapses ``lease_ms`` from now (tests' lease lapse)."""
    store.lease_ms = lease_ms
    store.renew()


def keys_of(ids: Any, tag: int = 1) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.uint64)
    return np.stack([ids, np.full(ids.shape, tag, dtype=np.uint64)], axis=1)


def evalsha_calls(server: Any) -> int:
    r = redis.Redis.from_url(server.url)
    try:
        stats = r.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(stats.get("cmdstat_eval", {}).get("calls", 0))
    finally:
        r.close()


def wait_for(pred: Any, timeout_s: float, step_s: float = 0.01) -> float:
    """Seconds until pred() held; fails the test after timeout_s."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(step_s)
    return time.monotonic() - t0


# ------------------------------------------------------------------ workers and input checks


def test_register_publishes_worker_info(redis_server: Any) -> None:
    info = WorkerInfo(ucx_address=b"\x00ucx\xffaddr", rkeys=b"\x01rkey", capacity_blocks=64,
                      block_bytes=196_608, extra={"ucx_version": "1.22"})
    a = make(redis_server, "a", info=info)
    b = make(redis_server, "b")
    ws = b.workers()
    assert set(ws) == {"a", "b"}
    assert ws["a"].info == info and ws["a"].incarnation == a.incarnation
    assert b.incarnation is not None and a.incarnation is not None and b.incarnation > a.incarnation
    a.update_info(WorkerInfo(ucx_address=b"new", capacity_blocks=1))
    assert b.workers()["a"].info.ucx_address == b"new"
    a.close()
    assert set(b.workers()) == {"b"}  # left: gone at once, not after its lease
    b.close()


def test_bad_input_raises_clear_errors(redis_server: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="worker id"):
        make(redis_server, "bad id!")
    with pytest.raises(InvalidArgumentError, match="lease_ms"):
        make(redis_server, "a", lease_ms=1)
    with pytest.raises(InvalidArgumentError, match="url"):
        ClusterStore("nonsense://x", "a", heartbeat=False)
    s = make(redis_server, "a")
    with pytest.raises(InvalidArgumentError, match=r"shape \[n, 2\]"):
        s.publish(np.zeros((3, 3), dtype=np.uint64), [0, 1, 2])
    with pytest.raises(InvalidArgumentError, match="slots must be one-dimensional with 2"):
        s.publish(keys_of([1, 2]), [0])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        s.publish(keys_of([1]), [-1])
    with pytest.raises(InvalidArgumentError, match="checksums"):
        s.publish(keys_of([1]), [0], checksums=[1, 2])
    with pytest.raises(InvalidArgumentError, match="fence"):
        s.write_trace("t", 0, {"x": 1})
    with pytest.raises(InvalidArgumentError, match="trace id"):
        s.claim_trace("")
    with pytest.raises(InvalidArgumentError, match="reserved"):
        s.update_info(WorkerInfo(extra={"rkeys": "x"}))
    with pytest.raises(OwnershipError, match="KVT_NOTRACE"):
        s.write_trace("never-claimed", 5, {"x": 1})
    s.close()


# ------------------------------------------------------------------ the block directory


def test_publish_lookup_free_generations(redis_server: Any) -> None:
    a, b = make(redis_server, "a"), make(redis_server, "b")
    k = keys_of(range(8))
    ck = np.arange(8, dtype=np.uint64) + np.uint64(2**63 + 5)  # full 64-bit checksums survive
    assert a.publish(k, np.arange(8), ck).tolist() == [1] * 8
    assert b.publish(k[4:], [10, 11, 12, 13]).tolist() == [1] * 4
    lk = b.lookup(k)
    assert lk.holder_count().tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert lk.held_by("b").tolist() == [False] * 4 + [True] * 4
    assert lk.holders(5) == [("a", 5, 1), ("b", 11, 1)]
    rows_a = lk.records[lk.records["worker"] == lk.workers.index("a")]
    assert rows_a["checksum"].tolist() == ck.tolist()
    # a frees slots 0 and 5: their entries go, their generations move on
    assert a.free_slots([0, 5, 99]) == 2
    assert b.validate_lookup(lk, np.arange(len(lk.records)), k).tolist() == [
        a_or_b not in (("a", 0), ("a", 5)) for a_or_b in
        ((lk.workers[int(r["worker"])], int(r["slot"])) for r in lk.records)]
    assert a.publish(keys_of([100]), [0]).tolist() == [3]  # slot 0: published 1, freed 2, now 3
    lk2 = b.lookup(k)
    assert lk2.holder_count().tolist() == [0, 1, 1, 1, 2, 1, 2, 2]
    # reusing a slot without freeing it first replaces the old key's entry
    assert a.publish(keys_of([200]), [1]).tolist() == [2]
    assert b.lookup(k[1:2]).holder_count().tolist() == [0]
    # the same key at another slot: one entry per worker, the newest
    a.publish(k[2:3], [50])
    assert b.lookup(k[2:3]).holders(0) == [("a", 50, 1)]
    assert a.free_slots([2]) == 0  # slot 2 no longer holds anything
    assert b.lookup(keys_of([999])).holder_count().tolist() == [0]
    assert b.lookup(np.empty((0, 2), dtype=np.uint64)).num_keys == 0
    a.close()
    b.close()


def test_lookup_is_one_round_trip(redis_server: Any) -> None:
    a = make(redis_server, "a")
    k = keys_of(range(2000))
    a.publish(k, np.arange(2000))
    a.lookup(k[:1])  # the scripts are loaded now (a first EVALSHA fails with NOSCRIPT)
    a.validate(k[:1], ["a"], [0], [1])
    before = evalsha_calls(redis_server)
    lk = a.lookup(k)
    assert evalsha_calls(redis_server) - before == 1
    assert lk.holder_count().tolist() == [1] * 2000 and lk.prefix_blocks() == 2000
    before = evalsha_calls(redis_server)
    assert a.validate_lookup(lk, np.arange(2000), k).all()
    assert evalsha_calls(redis_server) - before == 1
    a.close()


class DirectoryModel:
    """The reference: per worker, slot -> key and key -> slot (inverse maps), and generations."""

    def __init__(self) -> None:
        self.slot_key: dict[str, dict[int, int]] = {}
        self.key_slot: dict[str, dict[int, int]] = {}
        self.gen: dict[str, dict[int, int]] = {}

    def join(self, w: str) -> None:
        self.slot_key[w], self.key_slot[w] = {}, {}
        self.gen.setdefault(w, {})

    def publish(self, w: str, keys: list[int], slots: list[int]) -> list[int]:
        out = []
        sk, ks, g = self.slot_key[w], self.key_slot[w], self.gen[w]
        for k, s in zip(keys, slots):
            old = sk.get(s)
            if old is not None and old != k and ks.get(old) == s:
                del ks[old]
            ps = ks.get(k)
            if ps is not None and ps != s and sk.get(ps) == k:
                del sk[ps]
            g[s] = g.get(s, 0) + 1
            sk[s], ks[k] = k, s
            out.append(g[s])
        return out

    def free(self, w: str, slots: list[int]) -> int:
        n = 0
        sk, ks, g = self.slot_key[w], self.key_slot[w], self.gen[w]
        for s in slots:
            k = sk.get(s)
            if k is not None and ks.get(k) == s:
                del sk[s], ks[k]
                g[s] = g.get(s, 0) + 1
                n += 1
        return n

    def leave(self, w: str) -> None:
        del self.slot_key[w], self.key_slot[w]

    def holders(self, keys: list[int]) -> set[tuple[int, str, int, int]]:
        out = set()
        for i, k in enumerate(keys):
            for w, ks in self.key_slot.items():
                if k in ks:
                    out.add((i, w, ks[k], self.gen[w][ks[k]]))
        return out


@pytest.mark.parametrize("trial", range(3))
def test_directory_matches_model(redis_server: Any, rng: np.random.Generator, trial: int) -> None:
    """Random publish / free / leave / rejoin / cleanup / lookup against the reference model."""
    names = ["w0", "w1", "w2"]
    stores = {w: make(redis_server, w) for w in names}
    model = DirectoryModel()
    for w in names:
        model.join(w)
    reader = make(redis_server, "reader")
    universe = 24  # few keys and slots: collisions and reuse are the point
    for step in range(250):
        op = rng.choice(["publish", "free", "lookup", "leave", "cleanup"], p=[0.4, 0.2, 0.3, 0.05, 0.05])
        w = names[int(rng.integers(len(names)))]
        if op == "publish" and w in model.slot_key:
            n = int(rng.integers(1, 6))
            ks = rng.integers(0, universe, n).tolist()
            ss = rng.integers(0, 16, n).tolist()
            got = stores[w].publish(keys_of(ks), ss).tolist()
            assert got == model.publish(w, ks, ss), f"step {step}: publish {w} {ks} {ss}"
        elif op == "free" and w in model.slot_key:
            ss = rng.integers(0, 16, int(rng.integers(1, 5))).tolist()
            assert stores[w].free_slots(ss) == model.free(w, ss), f"step {step}: free {w} {ss}"
        elif op == "leave":
            if w in model.slot_key:
                stores[w].close(leave=True)
                model.leave(w)
            else:  # rejoin: a new incarnation, nothing published yet
                stores[w] = make(redis_server, w)
                model.join(w)
        elif op == "cleanup":
            reader.cleanup(max_entries=4)
            for dead in [x for x in names if x not in model.slot_key]:
                model.gen[dead] = {}  # a dead worker's generations go with its last entry
        ks = rng.integers(0, universe, 12).tolist()
        lk = reader.lookup(keys_of(ks))
        got = {(int(r["key"]), lk.workers[int(r["worker"])], int(r["slot"]), int(r["generation"]))
               for r in lk.records}
        assert got == model.holders(ks), f"step {step} after {op} on {w}"
    for s in [*stores.values(), reader]:
        s.close()


# ------------------------------------------------------------------ leases


def test_lapsed_lease_hides_entries_and_cleanup_removes_them(redis_server: Any) -> None:
    a = make(redis_server, "a")
    b = make(redis_server, "b")
    k = keys_of(range(100))
    a.publish(k, np.arange(100))
    assert b.lookup(k).holder_count().sum() == 100
    shorten_lease(a, 150)
    gone = wait_for(lambda: b.lookup(k).holder_count().sum() == 0, timeout_s=5.0)
    assert gone < 2.0, f"a 150 ms lease took {gone:.2f} s to lapse"
    assert "a" not in b.workers()
    raw = redis.Redis.from_url(redis_server.url)
    assert len(raw.keys("kvt:{default}:b:*")) == 100
    assert b.cleanup(max_entries=16) == 100
    assert raw.keys("kvt:{default}:b:*") == [] and raw.smembers("kvt:{default}:workers") == {b"b"}
    raw.close()
    with pytest.raises(StaleWriteError, match="not live"):
        a.publish(k[:1], [0])
    a.lease_ms = 60_000
    a.renew()  # the lapsed worker rejoins with a new incarnation and may publish again
    assert a.publish(k[:1], [0]).tolist() == [1]
    assert b.lookup(k[:1]).holders(0)[0][0] == "a"
    a.close()
    b.close()


def test_heartbeat_keeps_a_short_lease(redis_server: Any) -> None:
    a = make(redis_server, "a", lease_ms=1000, heartbeat=True)
    b = make(redis_server, "b")
    a.publish(keys_of([1]), [0])
    inc = a.incarnation
    time.sleep(2.5)  # two and a half leases long
    assert b.lookup(keys_of([1])).holder_count().tolist() == [1]
    assert a.incarnation == inc and a.metrics.lease_renewals >= 3
    a.close()
    b.close()


def _spawn_worker(server: Any, worker: str, lease_ms: int, n: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, str(HERE / "cluster_worker_proc.py"), server.url, worker,
                             str(lease_ms), str(n)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready "), f"worker process said {line!r}"
    return proc, int(line.split()[1])


def test_killed_worker_vanishes_with_its_lease_and_rejoins(redis_server: Any) -> None:
    """kill -9 a worker process: its blocks leave lookups when its lease lapses; restarted, it
    rejoins with a larger incarnation and the dead incarnation's entries stay refused."""
    b = make(redis_server, "b")
    k = np.stack([np.arange(50, dtype=np.uint64), np.full(50, 7, dtype=np.uint64)], axis=1)
    proc, inc1 = _spawn_worker(redis_server, "victim", lease_ms=1000, n=50)
    try:
        assert b.lookup(k).held_by("victim").all()
        proc.kill()
        proc.wait(timeout=10)
        t_kill = time.monotonic()
        wait_for(lambda: not b.lookup(k).held_by("victim").any(), timeout_s=6.0)
        assert time.monotonic() - t_kill < 1.0 + 2.0
        assert "victim" not in b.workers()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    proc2, inc2 = _spawn_worker(redis_server, "victim", lease_ms=1000, n=50)
    try:
        assert inc2 > inc1
        assert b.lookup(k).held_by("victim").all()
        assert b.workers()["victim"].incarnation == inc2
    finally:
        proc2.kill()
        proc2.wait(timeout=10)
    b.close()


def test_restarted_worker_refuses_the_old_incarnation(redis_server: Any) -> None:
    old = make(redis_server, "a")
    b = make(redis_server, "b")
    k = keys_of(range(10))
    old.publish(k, np.arange(10))
    fence = old.claim_trace("t")
    new = make(redis_server, "a")  # the same worker restarted: a new incarnation
    assert new.incarnation is not None and old.incarnation is not None and new.incarnation > old.incarnation
    assert b.lookup(k).holder_count().sum() == 0  # the old incarnation's blocks are not served
    with pytest.raises(StaleWriteError, match="not live"):
        old.publish(k, np.arange(10))
    with pytest.raises(StaleWriteError, match="not live"):
        old.write_trace("t", fence, {"step": 3})
    with pytest.raises(StaleWriteError, match="not live"):
        old.claim_trace("t")
    assert old.free_slots(np.arange(5)) == 5  # its own (already invisible) entries: garbage only
    new.publish(k[:3], [0, 1, 2])
    assert old.free_slots([0, 1, 2]) == 0  # the old incarnation cannot drop the new one's entries
    assert b.lookup(k[:3]).held_by("a").all()
    new_fence = new.claim_trace("t")  # the dead incarnation's trace is taken over, new fence
    assert new_fence > fence
    owner = b.trace_owner("t")
    assert owner is not None and owner.incarnation == new.incarnation and owner.owner_live
    for s in (old, new, b):
        s.close()


# ------------------------------------------------------------------ trace ownership and fencing


def test_two_claimants_race_one_wins(redis_server: Any) -> None:
    a, b = make(redis_server, "a"), make(redis_server, "b")
    wins = {"a": 0, "b": 0}
    for i in range(40):
        barrier = threading.Barrier(2)
        results: dict[str, Any] = {}

        def claim(store: ClusterStore) -> None:
            barrier.wait()
            try:
                results[store.worker_id] = store.claim_trace(f"race-{i}")
            except OwnershipError as e:
                results[store.worker_id] = e

        threads = [threading.Thread(target=claim, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [w for w, r in results.items() if isinstance(r, int)]
        assert len(winners) == 1, results
        loser = "b" if winners[0] == "a" else "a"
        assert isinstance(results[loser], OwnershipError) and f"live worker {winners[0]}" in str(results[loser])
        owner = a.trace_owner(f"race-{i}")
        assert owner is not None and owner.owner == winners[0] and owner.fence == results[winners[0]]
        wins[winners[0]] += 1
    assert sum(wins.values()) == 40
    a.close()
    b.close()


def test_transfer_is_fenced_and_stale_owner_refused(redis_server: Any) -> None:
    a, b, c = make(redis_server, "a"), make(redis_server, "b"), make(redis_server, "c")
    f1 = a.claim_trace("t")
    assert a.claim_trace("t") == f1  # idempotent for the owner
    a.write_trace("t", f1, {"step": 1})
    a.begin_move("t", "b", f1)
    owner = c.trace_owner("t")
    assert owner is not None and (owner.owner, owner.state, owner.target) == ("a", "moving", "b")
    with pytest.raises(OwnershipError, match="KVT_STATE.*moving to b"):
        a.transfer_trace("t", "a", "c", f1)
    with pytest.raises(OwnershipError, match="KVT_OWNED"):
        c.claim_trace("t")  # one owner at any moment, moving or not
    f2 = a.transfer_trace("t", "a", "b", f1)
    assert f2 > f1
    owner = c.trace_owner("t")
    assert owner is not None and (owner.owner, owner.fence, owner.state, owner.target) == ("b", f2, "owned", None)
    # the old owner's late writes carry a stale fence
    for late in (lambda: a.write_trace("t", f1, {"step": 99}), lambda: a.transfer_trace("t", "a", "c", f1),
                 lambda: a.begin_move("t", "c", f1), lambda: a.abort_move("t", f1),
                 lambda: a.release_trace("t", f1)):
        with pytest.raises(StaleWriteError, match="KVT_FENCE"):
            late()
    assert b.read_trace("t") == {"step": b"1"}
    b.write_trace("t", f2, {"step": 2})
    assert c.read_trace("t") == {"step": b"2"}
    # a target that is not live is refused; abort leaves the owner as it was
    b.begin_move("t", "c", f2)
    c.close()
    with pytest.raises(OwnershipError, match="KVT_TARGET"):
        b.transfer_trace("t", "b", "c", f2)
    b.abort_move("t", f2)
    owner = a.trace_owner("t")
    assert owner is not None and (owner.owner, owner.fence, owner.state) == ("b", f2, "owned")
    b.release_trace("t", f2)
    assert a.trace_owner("t") is None
    a.close()
    b.close()


def test_dead_owners_trace_is_taken_over(redis_server: Any) -> None:
    a = make(redis_server, "a")
    b = make(redis_server, "b")
    f1 = a.claim_trace("t")
    with pytest.raises(OwnershipError):
        b.claim_trace("t")
    shorten_lease(a, 150)
    wait_for(lambda: not b.trace_owner("t").owner_live, timeout_s=5.0)  # type: ignore[union-attr]
    f2 = b.claim_trace("t")
    assert f2 > f1
    a.lease_ms = 60_000
    a.renew()  # a comes back (new incarnation): its old fence is stale
    with pytest.raises(StaleWriteError, match="KVT_FENCE"):
        a.write_trace("t", f1, {"x": 1})
    with pytest.raises(OwnershipError, match="KVT_OWNED"):
        a.claim_trace("t")
    a.close()
    b.close()


# ------------------------------------------------------------------ degraded mode


def test_store_killed_calls_fail_fast_then_rejoin(redis_server: Any) -> None:
    rejoined: list[int] = []
    k = keys_of(range(20))

    def republish(store: ClusterStore) -> None:
        store.publish(k, np.arange(20))
        rejoined.append(store.incarnation or 0)

    a = make(redis_server, "a", lease_ms=2000, heartbeat=True, timeout_s=0.5, backoff_s=(0.05, 0.2),
             on_rejoin=republish)
    a.publish(k, np.arange(20))
    inc1 = a.incarnation
    redis_server.kill()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        a.lookup(k)
    first = time.monotonic() - t0
    assert first < 0.5 + 1.0, f"the first failing call took {first:.3f} s"
    assert not a.connected and a.last_error
    t0 = time.monotonic()
    for _ in range(100):  # while disconnected: refused at once, no network wait
        with pytest.raises(StoreUnavailableError):
            a.lookup(k)
    assert (time.monotonic() - t0) / 100 < 0.01
    assert a.metrics.fast_failures >= 100
    st = a.status()
    assert st["connected"] is False and "local only" in st["mode"]
    from kvtier.info import info

    cl = info()["cluster"]
    assert cl["usable"] is False and "DISCONNECTED" in cl["detail"] and "serving from its own tiers" in cl["detail"]
    redis_server.restart()  # an empty store: leases, entries and fences are gone
    wait_for(lambda: a.connected and bool(rejoined), timeout_s=5.0)
    assert a.incarnation is not None and inc1 is not None and a.incarnation > inc1
    assert a.lookup(k).held_by("a").all()  # republished by on_rejoin
    assert a.metrics.rejoins == 1 and a.metrics.reconnects >= 1
    assert info()["cluster"]["usable"] is True
    a.close()


def test_store_paused_calls_bounded_then_reconnect(redis_server: Any) -> None:
    """SIGSTOP: the server holds the connection but never answers; timeouts bound every call."""
    a = make(redis_server, "a", lease_ms=10_000, heartbeat=True, timeout_s=0.5, backoff_s=(0.05, 0.1))
    k = keys_of(range(5))
    a.publish(k, np.arange(5))
    inc = a.incarnation
    redis_server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            a.lookup(k)
        assert time.monotonic() - t0 < 0.5 + 1.0
        with pytest.raises(StoreUnavailableError):
            a.claim_trace("t")
    finally:
        redis_server.resume()
    wait_for(lambda: a.connected, timeout_s=5.0)
    assert a.incarnation == inc  # the lease outlived the pause: same incarnation, entries intact
    assert a.lookup(k).held_by("a").all()
    a.close()


def test_constructor_on_a_dead_store_starts_disconnected(redis_server: Any) -> None:
    port = redis_server.port
    redis_server.kill()
    t0 = time.monotonic()
    joined: list[int] = []
    a = ClusterStore(f"redis://127.0.0.1:{port}/0", "a", timeout_s=1.0, backoff_s=(0.05, 0.1),
                     on_rejoin=lambda s: joined.append(s.publish(keys_of([1]), [0])[0]))
    assert time.monotonic() - t0 < 2.0  # connection refused: no wait for the timeout
    assert not a.connected and a.incarnation is None
    with pytest.raises(StoreUnavailableError):
        a.publish(keys_of([1]), [0])
    redis_server.start(port)
    wait_for(lambda: a.connected and bool(joined), timeout_s=5.0)
    assert joined == [1]  # on_rejoin published what the worker held while the store was away
    assert a.publish(keys_of([1]), [0]).tolist() == [2]
    a.close()


def test_without_heartbeat_calls_reconnect_after_backoff(redis_server: Any) -> None:
    a = make(redis_server, "a", backoff_s=(1.0, 1.0))
    redis_server.kill()
    with pytest.raises(StoreUnavailableError):
        a.lookup(keys_of([1]))
    redis_server.restart()
    with pytest.raises(StoreUnavailableError, match="reconnecting with backoff"):
        a.lookup(keys_of([1]))  # within the backoff: refused at once, even though the store is back
    time.sleep(1.05)
    assert a.lookup(keys_of([1])).num_keys == 1  # reconnected (and rejoined: the store is new)
    assert a.connected and a.metrics.rejoins == 1
    a.close()


def test_metrics_export(redis_server: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from kvtier.metrics import register_cluster

    a = make(redis_server, "a", backoff_s=(5.0, 5.0))
    a.publish(keys_of(range(10)), np.arange(10))
    a.lookup(keys_of(range(10)))
    reg = CollectorRegistry()
    register_cluster(a, registry=reg, name="w")
    text = generate_latest(reg).decode()
    assert 'kvtier_cluster_store_connected{cache="w",worker="a"} 1.0' in text
    assert 'kvtier_cluster_store_keys_looked_up_total{cache="w"} 10.0' in text
    assert 'kvtier_cluster_store_latency_seconds{cache="w",op="lookup",quantile="0.5"}' in text
    redis_server.kill()
    with pytest.raises(StoreUnavailableError):
        a.lookup(keys_of([1]))
    text = generate_latest(reg).decode()
    assert 'kvtier_cluster_store_connected{cache="w",worker="a"} 0.0' in text
    assert 'kvtier_cluster_store_errors_total{cache="w",op="lookup"} 1.0' in text
    a.close()


def test_bench_measure_runs_and_leaves_nothing(redis_server: Any) -> None:
    from kvtier.harness.benchmarks.store import measure

    res = measure(redis_server.url, sizes=(1, 16), repeats=3, seconds=0.05)
    assert [r["keys"] for r in res["lookup"]] == [1, 16]
    # every key held by bench-a, the first half (8) also by bench-b
    assert [r["records"] for r in res["lookup"]] == [1 + 1, 16 + 8]
    assert all(v > 0 for v in res["ops_per_s"].values())
    raw = redis.Redis.from_url(redis_server.url)
    assert [k for k in raw.scan_iter(match="kvt:*")] == []  # its namespace is cleaned up
    raw.close()


def test_kvtier_info_probes_the_named_store(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.info import info

    a = make(redis_server, "a")
    monkeypatch.setenv("KVTIER_STORE_URL", redis_server.url)
    cl = info()["cluster"]
    assert cl["usable"] and cl["probe"]["reachable"] and cl["probe"]["live_workers"] == 1
    assert "redis 7." in cl["detail"] and "1 live worker" in cl["detail"]
    a.close()
    redis_server.kill()
    t0 = time.monotonic()
    cl = info()["cluster"]
    assert time.monotonic() - t0 < 2.0
    assert not cl["usable"] and "UNREACHABLE" in cl["detail"] and cl["reason"]
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "info"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert "cluster store" in out.stdout and "UNREACHABLE" in out.stdout, out.stdout + out.stderr
