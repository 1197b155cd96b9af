"""HostPool: the block allocator against a reference model (Note [Block states]), and the arena."""

from __future__ import annotations

import gc
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvtier
from kvtier import BlockStateError, InvalidArgumentError, OutOfCapacityError

# ---------------------------------------------------------------- reference model


class PoolModel:
    """What Note [Block states] says a pool is: refcount and pin count per block, plus counters."""

    def __init__(self, num_blocks: int) -> None:
        self.n = num_blocks
        self.refs = [0] * num_blocks
        self.pins = [0] * num_blocks
        self.peak = 0
        self.allocated_total = 0
        self.freed_total = 0
        self.failed_allocs = 0

    @property
    def used(self) -> int:
        return sum(1 for r in self.refs if r > 0)

    @property
    def pinned(self) -> int:
        return sum(1 for p in self.pins if p > 0)

    def allocated(self) -> list[int]:
        return [i for i, r in enumerate(self.refs) if r > 0]

    def free_ids(self) -> list[int]:
        return [i for i, r in enumerate(self.refs) if r == 0]

    def predict(self, op: str, ids: list[int]) -> tuple[type[Exception], str] | None:
        """The error (class, message keyword) a batch call must raise, or None when it succeeds."""
        if any(i < 0 or i >= self.n for i in ids):
            return InvalidArgumentError, "out of range"
        counts = Counter(ids)
        if op in ("ref", "pin"):
            for i in ids:
                if self.refs[i] == 0:
                    return BlockStateError, "not allocated"
        elif op == "free":
            for i in sorted(counts):
                c = counts[i]
                if self.refs[i] < c:
                    return BlockStateError, ("double free" if self.refs[i] == 0 else "holder")
                if self.refs[i] == c and self.pins[i] > 0:
                    return BlockStateError, "pinned"
        elif op == "unpin":
            for i in sorted(counts):
                if self.pins[i] < counts[i]:
                    return BlockStateError, "unpinned more times"
        return None

    def apply(self, op: str, ids: list[int]) -> None:
        for i in ids:
            if op == "ref":
                self.refs[i] += 1
            elif op == "pin":
                self.pins[i] += 1
            elif op == "unpin":
                self.pins[i] -= 1
            elif op == "free":
                self.refs[i] -= 1
                if self.refs[i] == 0:
                    self.freed_total += 1


OPS = ("free", "ref", "pin", "unpin")


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool: kvtier.HostPool | None = None
        self.model: PoolModel | None = None

    @initialize(num_blocks=st.integers(1, 8), block_bytes=st.sampled_from([1, 64, 100, 4096, 5000]))
    def create(self, num_blocks: int, block_bytes: int) -> None:
        self.pool = kvtier.HostPool(block_bytes, num_blocks=num_blocks, populate=False)
        self.model = PoolModel(num_blocks)

    # -- helpers

    def snapshot(self) -> tuple:
        p = self.pool
        return (tuple(p.refcount(i) for i in range(p.num_blocks)), tuple(p.pins(i) for i in range(p.num_blocks)),
                p.free_blocks, p.stats())

    def call(self, op: str, ids: list[int]) -> None:
        expected = self.model.predict(op, ids)
        before = self.snapshot()
        method = getattr(self.pool, op)
        if expected is None:
            method(np.array(ids, dtype=np.int64) if ids and min(ids) >= 0 else ids)
            self.model.apply(op, ids)
        else:
            cls, word = expected
            with pytest.raises(cls) as info:
                method(ids)
            assert word in str(info.value), f"{op}({ids}): message {str(info.value)!r} lacks {word!r}"
            assert self.snapshot() == before, f"a rejected {op}({ids}) changed the pool"

    # -- rules

    @rule(n=st.integers(0, 10))
    def allocate(self, n: int) -> None:
        m = self.model
        free_before = len(m.free_ids())
        if n > free_before:
            before = self.snapshot()
            with pytest.raises(OutOfCapacityError, match="cannot allocate"):
                self.pool.allocate(n)
            m.failed_allocs += 1
            refs, pins, free, stats = self.snapshot()
            assert (refs, pins, free) == before[:3], "a refused allocate changed block state"
            assert stats.failed_allocs == before[3].failed_allocs + 1
            return
        ids = self.pool.allocate(n)
        assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and ids.shape == (n,)
        got = ids.tolist()
        assert len(set(got)) == n, f"allocate({n}) handed out an id twice: {got}"
        for i in got:
            assert 0 <= i < m.n, f"allocate handed out out-of-range id {i}"
            assert m.refs[i] == 0, f"allocate handed out block {i}, which is still allocated"
            m.refs[i] = 1
        m.allocated_total += n
        m.peak = max(m.peak, m.used)

    @rule(data=st.data(), op=st.sampled_from(OPS))
    def batch_of_allocated(self, data: st.DataObject, op: str) -> None:
        """A batch over allocated blocks, repeats allowed (counted together)."""
        alloc = self.model.allocated()
        ids = data.draw(st.lists(st.sampled_from(alloc), max_size=6)) if alloc else []
        self.call(op, ids)

    @rule(data=st.data(), op=st.sampled_from(OPS))
    def batch_of_any(self, data: st.DataObject, op: str) -> None:
        """A batch over any ids, free and out-of-range ones included."""
        n = self.model.n
        ids = data.draw(st.lists(st.integers(-2, n + 2), max_size=6))
        self.call(op, ids)

    @precondition(lambda self: self.model is not None and self.model.free_ids())
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(self.model.free_ids()))
        before = self.snapshot()
        with pytest.raises(BlockStateError, match="double free"):
            self.pool.free([i])
        assert self.snapshot() == before

    @precondition(lambda self: self.model is not None and any(
        r > 0 and p > 0 for r, p in zip(self.model.refs, self.model.pins)))
    @rule(data=st.data())
    def free_pinned_last_holder(self, data: st.DataObject) -> None:
        m = self.model
        i = data.draw(st.sampled_from([i for i in range(m.n) if m.refs[i] > 0 and m.pins[i] > 0]))
        before = self.snapshot()
        with pytest.raises(BlockStateError, match="pinned"):
            self.pool.free([i] * m.refs[i])  # drop every holder at once: the last one is refused
        assert self.snapshot() == before, "a refused free of a pinned block changed the pool"

    @precondition(lambda self: self.model is not None and self.model.allocated())
    @rule(data=st.data(), op=st.sampled_from(OPS), bad=st.sampled_from([-1, -(2**31), "n", "n+5", 2**31 - 1]))
    def good_batch_with_one_out_of_range_id(self, data: st.DataObject, op: str, bad) -> None:
        m = self.model
        good = data.draw(st.lists(st.sampled_from(m.allocated()), min_size=1, max_size=4))
        bad_id = {"n": m.n, "n+5": m.n + 5}.get(bad, bad)
        pos = data.draw(st.integers(0, len(good)))
        ids = good[:pos] + [bad_id] + good[pos:]
        before = self.snapshot()
        with pytest.raises(InvalidArgumentError, match="out of range"):
            getattr(self.pool, op)(ids)
        assert self.snapshot() == before, f"{op} with one bad id changed the pool"

    # -- invariants

    @invariant()
    def matches_model(self) -> None:
        if self.pool is None:
            return
        p, m = self.pool, self.model
        assert [p.refcount(i) for i in range(m.n)] == m.refs
        assert [p.pins(i) for i in range(m.n)] == m.pins
        assert p.free_blocks == m.n - m.used
        s = p.stats()
        assert s.num_blocks == m.n
        assert s.used_blocks == m.used
        assert s.free_blocks == m.n - m.used
        assert s.pinned_blocks == m.pinned
        assert s.peak_used_blocks == m.peak
        assert s.allocated_total == m.allocated_total
        assert s.freed_total == m.freed_total
        assert s.failed_allocs == m.failed_allocs
        assert s.allocated_total - s.freed_total == s.used_blocks
        assert s.used_bytes == m.used * p.block_bytes

    @invariant()
    def check_allocated_agrees(self) -> None:
        if self.pool is None:
            return
        alloc = self.model.allocated()
        self.pool.check_allocated(alloc)
        for i in self.model.free_ids():
            with pytest.raises(BlockStateError, match="not allocated"):
                self.pool.check_allocated([i])


PoolMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=30)
TestPoolStateMachine = PoolMachine.TestCase


# ---------------------------------------------------------------- plain tests


def test_capacity_smaller_than_one_block_is_refused() -> None:
    layout = kvtier.KVLayout(2, 2, 8, 4, "float32")
    with pytest.raises(InvalidArgumentError, match="smaller than one block"):
        kvtier.HostPool(layout, capacity_bytes=layout.block_bytes - 1)
    with pytest.raises(InvalidArgumentError, match="smaller than one block"):
        kvtier.HostPool(1000, capacity_bytes=0)


def test_capacity_bytes_rounds_down_to_whole_blocks() -> None:
    pool = kvtier.HostPool(1000, capacity_bytes=3999)
    assert pool.num_blocks == 3 and pool.capacity_bytes == 3000 and pool.free_blocks == 3
    pool = kvtier.HostPool(1000, capacity_bytes=1000)
    assert pool.num_blocks == 1


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_num_blocks_must_be_positive(num_blocks: int) -> None:
    with pytest.raises(InvalidArgumentError, match="num_blocks"):
        kvtier.HostPool(4096, num_blocks=num_blocks)


def test_block_size_and_size_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="block size"):
        kvtier.HostPool(0, num_blocks=4)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        kvtier.HostPool(4096, num_blocks=4, capacity_bytes=8192)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        kvtier.HostPool(4096)


@pytest.mark.parametrize("block_bytes", [1, 100, 4096, 5000])
def test_view_is_a_writable_uint8_block_matrix_over_the_arena(block_bytes: int) -> None:
    pool = kvtier.HostPool(block_bytes, num_blocks=5)
    v = pool.view()
    assert v.dtype == np.uint8 and v.shape == (5, block_bytes)
    assert v.flags.writeable
    # The view aliases the arena: bytes written through it are what the copy engine reads.
    src = kvtier.HostPool(block_bytes, num_blocks=5)
    pattern = (np.arange(5 * block_bytes) % 251).astype(np.uint8).reshape(5, block_bytes)
    src.view()[:] = pattern
    assert np.array_equal(src.view(), pattern)
    a, b = src.allocate(5), pool.allocate(5)
    kvtier.CopyEngine(threads=1).transfer(src, a, pool, b[::-1]).wait(timeout=30)
    assert np.array_equal(v[b[::-1]], pattern[a])
    # ... and writes through one view are visible in another view of the same pool.
    v[2, :] = 7
    assert (pool.view()[2] == 7).all()


def test_view_keeps_the_pool_alive() -> None:
    pool = kvtier.HostPool(4096, num_blocks=3)
    v = pool.view()
    v[:] = 42
    del pool
    gc.collect()
    assert (v == 42).all()  # would read unmapped memory if the arena had been freed
    v[1, :] = 1
    assert int(v.sum()) == 42 * 4096 * 2 + 4096


def test_page_mode_and_pinned() -> None:
    pool = kvtier.HostPool(4096, num_blocks=4)
    assert pool.page_mode in {"hugetlb", "thp", "4k"}
    assert isinstance(pool.pinned, bool)
    if not kvtier._core.probe_cuda()["usable"]:
        assert pool.pinned is False
    assert "HostPool(" in repr(pool) and pool.page_mode in repr(pool)


def test_allocate_fresh_pool_gives_every_block_once() -> None:
    pool = kvtier.HostPool(64, num_blocks=16)
    ids = pool.allocate(16)
    assert sorted(ids.tolist()) == list(range(16))
    assert pool.free_blocks == 0
    with pytest.raises(OutOfCapacityError, match="0 of 16 are free"):
        pool.allocate(1)
    assert pool.allocate(0).shape == (0,)
    pool.free(ids)
    assert pool.free_blocks == 16
    again = pool.allocate(16)
    assert sorted(again.tolist()) == list(range(16))


@pytest.mark.parametrize("n", [-1, 1.5, "3", None])
def test_allocate_needs_a_non_negative_int(n) -> None:
    pool = kvtier.HostPool(64, num_blocks=4)
    with pytest.raises(InvalidArgumentError, match="non-negative int"):
        pool.allocate(n)
    assert pool.free_blocks == 4


@pytest.mark.parametrize("n", [2**40, 2**61])
def test_allocate_far_beyond_capacity_is_out_of_capacity(n: int) -> None:
    pool = kvtier.HostPool(64, num_blocks=4)
    with pytest.raises(OutOfCapacityError, match="cannot allocate"):
        pool.allocate(n)
    assert pool.free_blocks == 4 and pool.stats().failed_allocs == 1


def test_allocate_more_than_free_changes_nothing() -> None:
    pool = kvtier.HostPool(64, num_blocks=6)
    held = pool.allocate(4)
    before = [pool.refcount(i) for i in range(6)]
    with pytest.raises(OutOfCapacityError, match="2 of 6 are free"):
        pool.allocate(3)
    assert [pool.refcount(i) for i in range(6)] == before
    s = pool.stats()
    assert (s.used_blocks, s.allocated_total, s.failed_allocs) == (4, 4, 1)
    assert sorted(pool.allocate(2).tolist() + held.tolist()) == list(range(6))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", ["free_block", "out_of_range", "negative"])
def test_failed_batch_changes_nothing(op: str, bad: str) -> None:
    pool = kvtier.HostPool(128, num_blocks=8)
    ids = pool.allocate(6).tolist()
    pool.ref(ids[:3])
    pool.pin(ids[:4])  # so that unpin of the good ids would succeed
    free_id = next(i for i in range(8) if pool.refcount(i) == 0)
    bad_id = {"free_block": free_id, "out_of_range": 8, "negative": -3}[bad]
    if op == "unpin" and bad == "free_block":
        good = ids[:4]
    elif op == "free":
        good = ids[4:]  # unpinned, one holder each: freeing them alone would succeed
    else:
        good = ids[:4]
    batch = good[:2] + [bad_id] + good[2:]
    before = ([pool.refcount(i) for i in range(8)], [pool.pins(i) for i in range(8)], pool.stats())
    expected = InvalidArgumentError if bad != "free_block" else BlockStateError
    with pytest.raises(expected):
        getattr(pool, op)(batch)
    after = ([pool.refcount(i) for i in range(8)], [pool.pins(i) for i in range(8)], pool.stats())
    assert after == before
    getattr(pool, op)(good)  # the same batch without the bad id goes through


def test_repeated_ids_in_one_batch_count_together() -> None:
    pool = kvtier.HostPool(64, num_blocks=4)
    (a,) = pool.allocate(1)
    pool.ref([a, a, a])
    assert pool.refcount(a) == 4
    with pytest.raises(BlockStateError, match="released 5 times but has only 4"):
        pool.free([a] * 5)
    assert pool.refcount(a) == 4
    pool.pin([a, a])
    assert pool.pins(a) == 2 and pool.stats().pinned_blocks == 1
    with pytest.raises(BlockStateError, match="pinned"):
        pool.free([a] * 4)
    pool.free([a] * 3)
    assert pool.refcount(a) == 1
    with pytest.raises(BlockStateError, match="unpinned more times"):
        pool.unpin([a, a, a])
    pool.unpin([a, a])
    assert pool.stats().pinned_blocks == 0
    pool.free([a])
    assert pool.free_blocks == 4


@given(ids=st.lists(st.integers(0, 5), max_size=8), kind=st.sampled_from(["list", "int64", "uint16", "torch"]))
@settings(max_examples=40)
def test_id_containers_are_interchangeable(ids: list[int], kind: str) -> None:
    import torch

    pool = kvtier.HostPool(64, num_blocks=6)
    pool.allocate(6)
    conv = {"list": list, "int64": lambda x: np.array(x, dtype=np.int64),
            "uint16": lambda x: np.array(x, dtype=np.uint16),
            "torch": lambda x: torch.tensor(x, dtype=torch.int64)}[kind]
    pool.ref(conv(ids))
    c = Counter(ids)
    assert [pool.refcount(i) for i in range(6)] == [1 + c[i] for i in range(6)]
