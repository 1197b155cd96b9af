"""Trace ownership against a reference model, driven by hypothesis (stateful, derandomized by the
suite's profile): claims, fenced writes, moves, transfers, workers leaving and restarting, on a
real redis-server. After every step: at most one owner per trace, and the store's record is the
model's."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from kvtier.cluster import ClusterStore, OwnershipError, StaleWriteError
from kvtier.errors import ClosedError

WORKERS = ("w0", "w1", "w2")
TRACES = ("t0", "t1")


def test_ownership_matches_model(redis_server: Any) -> None:
    url = redis_server.url
    counts: dict[str, int] = {}  # what the runs did, so the test cannot pass by doing nothing

    def count(what: str) -> None:
        counts[what] = counts.get(what, 0) + 1

    class Ownership(RuleBasedStateMachine):
        @initialize()
        def start(self) -> None:
            raw = redis.Redis.from_url(url)
            raw.flushall()
            raw.close()
            self.stores = {w: ClusterStore(url, w, lease_ms=60_000, timeout_s=1.0, heartbeat=False) for w in WORKERS}
            self.alive = {w: True for w in WORKERS}
            # model: trace -> [owner, incarnation, fence, state, target]
            self.rec: dict[str, list[Any] | None] = {t: None for t in TRACES}
            self.known: dict[tuple[str, str], int] = {}  # (worker, trace) -> the last fence it got
            # old incarnations still running, with the fences they had got
            self.zombies: list[tuple[ClusterStore, str, dict[str, int]]] = []
            self.max_fence = 0

        def teardown(self) -> None:
            for s in [*getattr(self, "stores", {}).values(), *(z[0] for z in getattr(self, "zombies", []))]:
                s.close(leave=False)

        def _owner_live(self, r: list[Any]) -> bool:
            return self.alive[r[0]] and self.stores[r[0]].incarnation == r[1]

        @rule(w=st.sampled_from(WORKERS), t=st.sampled_from(TRACES))
        def claim(self, w: str, t: str) -> None:
            s, r = self.stores[w], self.rec[t]
            if not self.alive[w]:
                with pytest.raises(ClosedError):
                    s.claim_trace(t)
                return
            if r is not None and r[0] == w and r[1] == s.incarnation:
                assert s.claim_trace(t) == r[2]
            elif r is not None and self._owner_live(r):
                count("refused")
                with pytest.raises(OwnershipError, match="KVT_OWNED"):
                    s.claim_trace(t)
            else:
                f = s.claim_trace(t)
                count("claimed")
                assert f > self.max_fence
                self.max_fence = f
                self.rec[t] = [w, s.incarnation, f, "owned", None]
                self.known[(w, t)] = f

        def _fenced_ok(self, w: str, t: str) -> bool:
            r = self.rec[t]
            return r is not None and self.known.get((w, t)) == r[2] and self._owner_live(r)

        @rule(w=st.sampled_from(WORKERS), t=st.sampled_from(TRACES))
        def write(self, w: str, t: str) -> None:
            fence = self.known.get((w, t))
            if fence is None or not self.alive[w]:
                return
            if self._fenced_ok(w, t):
                self.stores[w].write_trace(t, fence, {"by": w})
                count("written")
            else:
                count("refused")
                with pytest.raises((StaleWriteError, OwnershipError)):
                    self.stores[w].write_trace(t, fence, {"by": w})

        @rule(w=st.sampled_from(WORKERS), t=st.sampled_from(TRACES), to=st.sampled_from(WORKERS))
        def begin_move(self, w: str, t: str, to: str) -> None:
            fence = self.known.get((w, t))
            if fence is None or not self.alive[w]:
                return
            r = self.rec[t]
            ok = self._fenced_ok(w, t) and r is not None and r[0] != to and r[3] == "owned" and self.alive[to]
            if ok:
                assert r is not None
                self.stores[w].begin_move(t, to, fence)
                r[3], r[4] = "moving", to
            else:
                count("refused")
                with pytest.raises((StaleWriteError, OwnershipError)):
                    self.stores[w].begin_move(t, to, fence)

        @rule(w=st.sampled_from(WORKERS), t=st.sampled_from(TRACES))
        def abort(self, w: str, t: str) -> None:
            fence = self.known.get((w, t))
            if fence is None or not self.alive[w]:
                return
            if self._fenced_ok(w, t):
                self.stores[w].abort_move(t, fence)
                r = self.rec[t]
                assert r is not None
                r[3], r[4] = "owned", None
            else:
                count("refused")
                with pytest.raises((StaleWriteError, OwnershipError)):
                    self.stores[w].abort_move(t, fence)

        @rule(w=st.sampled_from(WORKERS), t=st.sampled_from(TRACES), to=st.sampled_from(WORKERS))
        def transfer(self, w: str, t: str, to: str) -> None:
            fence = self.known.get((w, t))
            if fence is None or not self.alive[w]:
                return
            r = self.rec[t]
            ok = (self._fenced_ok(w, t) and r is not None and r[0] == w and self.alive[to]
                  and not (r[3] == "moving" and r[4] != to))
            if ok:
                f = self.stores[w].transfer_trace(t, w, to, fence)
                count("transferred")
                assert f > self.max_fence
                self.max_fence = f
                self.rec[t] = [to, self.stores[to].incarnation, f, "owned", None]
                self.known[(to, t)] = f
            else:
                count("refused")
                with pytest.raises((StaleWriteError, OwnershipError)):
                    self.stores[w].transfer_trace(t, w, to, fence)

        @rule(w=st.sampled_from(WORKERS))
        def restart_leaving_a_zombie(self, w: str) -> None:
            """The same worker id starts again while its old process still runs."""
            if not self.alive[w]:
                return
            had = {t: f for (kw, t), f in self.known.items() if kw == w}
            self.zombies.append((self.stores[w], w, had))
            for t in had:  # the new process starts knowing no fence
                del self.known[(w, t)]
            self.stores[w] = ClusterStore(url, w, lease_ms=60_000, timeout_s=1.0, heartbeat=False)

        @rule(t=st.sampled_from(TRACES), data=st.data())
        def zombie_writes(self, t: str, data: Any) -> None:
            if not self.zombies:
                return
            z, w, had = data.draw(st.sampled_from(self.zombies))
            count("zombie refused")
            fence = had.get(t, 1)
            for call in (lambda: z.write_trace(t, fence, {"by": "zombie"}), lambda: z.claim_trace(t),
                         lambda: z.transfer_trace(t, w, w, fence), lambda: z.begin_move(t, "w0", fence)):
                with pytest.raises((StaleWriteError, OwnershipError)):
                    call()

        @rule(w=st.sampled_from(WORKERS))
        def leave_or_restart(self, w: str) -> None:
            if self.alive[w]:
                self.stores[w].close(leave=True)
                self.alive[w] = False
            else:  # a restart: same id, new incarnation; it remembers its old fences (now stale)
                self.stores[w] = ClusterStore(url, w, lease_ms=60_000, timeout_s=1.0, heartbeat=False)
                self.alive[w] = True

        @invariant()
        def store_matches_model(self) -> None:
            if not hasattr(self, "stores"):
                return
            reader = next((s for w, s in self.stores.items() if self.alive[w]), None)
            if reader is None:
                return
            for t in TRACES:
                got, want = reader.trace_owner(t), self.rec[t]
                if want is None:
                    assert got is None
                    continue
                assert got is not None
                assert (got.owner, got.incarnation, got.fence, got.state, got.target) == tuple(want)
                assert got.owner_live == self._owner_live(want)

    run_state_machine_as_test(Ownership, settings=settings(max_examples=150, stateful_step_count=40))
    print(counts)
    assert all(counts.get(k, 0) >= 5 for k in ("claimed", "transferred", "written", "refused",
                                               "zombie refused")), counts
