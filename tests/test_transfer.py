"""The copy engine: byte-exact gather/scatter for every layout kind, async handles, faults, stats."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvtier
from kvtier import TransferError, TransferTimeoutError
from kvhelpers import (
    assert_blocks_equal,
    assert_other_blocks_unchanged,
    block_bytes_of,
    make_kv,
    pattern_bytes,
    register,
    snapshot,
)

KINDS = sorted(kvtier.LAYOUT_KINDS)
SMALL = kvtier.KVLayout(num_layers=3, kv_heads=2, head_dim=8, block_tokens=4, dtype="float32")
DTYPE_CASES = [("torch", "float32"), ("torch", "bfloat16"), ("numpy", "float32")]


def layout_with(dtype: str, base: kvtier.KVLayout = SMALL) -> kvtier.KVLayout:
    return kvtier.KVLayout(base.num_layers, base.kv_heads, base.head_dim, base.block_tokens, dtype)


def fill_pool(pool: kvtier.HostPool, salt: int = 99) -> np.ndarray:
    """Fill the whole arena with a known pattern; returns a copy of it."""
    v = pool.view()
    v[:] = pattern_bytes(v.size, salt).reshape(v.shape)
    return v.copy()


def round_trip(layout: kvtier.KVLayout, kind: str, lib: str, rng: np.random.Generator,
               engine: kvtier.CopyEngine, num_kv: int = 12, num_pool: int = 8, count: int = 6,
               perm: tuple[int, ...] | None = None) -> None:
    """Gather `count` random KV blocks into random pool slots, check the tier bytes, scatter them
    to other random KV blocks of a zeroed registration, check every block of every tensor."""
    src = make_kv(layout, kind, num_kv, lib, rng=rng, perm=perm)
    dst = make_kv(layout, kind, num_kv, lib, perm=perm)
    src_before, dst_before = snapshot(src), snapshot(dst)
    reg_src, reg_dst = register(src, layout, kind), register(dst, layout, kind)
    assert reg_src.block_bytes == layout.block_bytes == reg_dst.block_bytes
    assert reg_src.num_blocks == num_kv
    pool = kvtier.HostPool(layout, num_blocks=num_pool, populate=False)
    pool_before = fill_pool(pool)
    slots = pool.allocate(num_pool)[rng.permutation(num_pool)[:count]]
    src_ids = rng.permutation(num_kv)[:count]
    dst_ids = rng.permutation(num_kv)[:count]

    engine.gather(reg_src, src_ids, pool, slots).wait(timeout=60)
    view = pool.view()
    for s, k in zip(slots.tolist(), src_ids.tolist()):
        assert np.array_equal(view[s], block_bytes_of(src, kind, k)), f"pool block {s} != kv block {k}"
    untouched = sorted(set(range(num_pool)) - set(slots.tolist()))
    assert np.array_equal(view[untouched], pool_before[untouched]), "gather wrote outside its slots"
    assert [np.array_equal(a, b) for a, b in zip(snapshot(src), src_before)] == [True] * len(src), \
        "gather modified its source"

    engine.scatter(pool, slots, reg_dst, dst_ids).wait(timeout=60)
    assert_blocks_equal(src, src_ids, dst, dst_ids, kind)
    assert_other_blocks_unchanged(dst_before, dst, dst_ids, kind, num_kv)
    # The pool is unchanged by a scatter and its blocks are released again.
    for s, k in zip(slots.tolist(), src_ids.tolist()):
        assert np.array_equal(view[s], block_bytes_of(src, kind, k))
    assert all(pool.refcount(s) == 1 for s in slots.tolist())
    reg_src.close()
    reg_dst.close()


@pytest.fixture
def engine() -> kvtier.CopyEngine:
    e = kvtier.CopyEngine()
    yield e
    e.close()


# ---------------------------------------------------------------- every layout kind


@pytest.mark.parametrize("lib,dtype", DTYPE_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_gather_scatter_round_trip(kind: str, lib: str, dtype: str, rng, engine) -> None:
    round_trip(layout_with(dtype), kind, lib, rng, engine)


def test_every_kind_is_covered() -> None:
    assert set(KINDS) == {"vllm_flash", "kv_first", "heads_first", "vllm_cpu", "layers_first", "blocks_first"}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_with_permuted_storage(kind: str, rng, engine) -> None:
    """The registered tensors are permuted views (block dim not outermost in memory)."""
    lk = kvtier.LAYOUT_KINDS[kind]
    ndim = len(lk.shape)
    perm = tuple(int(i) for i in rng.permutation(ndim))
    perm = perm if perm != tuple(range(ndim)) else tuple(reversed(range(ndim)))
    round_trip(layout_with("bfloat16"), kind, "torch", rng, engine, perm=perm)


@pytest.mark.parametrize("kind", KINDS)
def test_tier_block_is_the_block_slices_in_order(kind: str, rng, engine) -> None:
    """A pool block holds each registered tensor's block slice (row-major), tensors in order."""
    layout = layout_with("float32")
    src = make_kv(layout, kind, 4, "torch", rng=rng)
    reg = register(src, layout, kind)
    pool = kvtier.HostPool(layout, num_blocks=4)
    ids = pool.allocate(4)
    engine.gather(reg, [0, 1, 2, 3], pool, ids).wait(timeout=30)
    assert pool.view()[ids].shape == (4, layout.block_bytes)
    for n in range(4):
        assert np.array_equal(pool.view()[ids[n]], block_bytes_of(src, kind, n))


@given(
    kind=st.sampled_from(KINDS),
    dims=st.tuples(st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2, 3, 8, 67, 130]),
                   st.integers(1, 5)),
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
    lib=st.sampled_from(["torch", "numpy"]),
    view=st.sampled_from(["contiguous", "permuted", "sliced"]),
    num_kv=st.integers(1, 9),
    nontemporal=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=150)
def test_round_trip_property(kind, dims, dtype, lib, view, num_kv, nontemporal, seed) -> None:
    """Any small layout, any kind, contiguous or strided tensors, both copy paths: exact bytes."""
    if lib == "numpy" and dtype == "bfloat16":
        dtype = "float16"
    layers, heads, head_dim, tokens = dims
    layout = kvtier.KVLayout(layers, heads, head_dim, tokens, dtype)
    rng = np.random.default_rng(seed)
    engine = kvtier.CopyEngine(threads=2, nontemporal_threshold_bytes=0 if nontemporal else 1 << 40)
    count = int(rng.integers(0, num_kv + 1))
    lk = kvtier.LAYOUT_KINDS[kind]
    if view == "contiguous":
        round_trip(layout, kind, lib, rng, engine, num_kv=num_kv, num_pool=num_kv + 1, count=count)
    elif view == "permuted":
        perm = tuple(int(i) for i in rng.permutation(len(lk.shape)))
        round_trip(layout, kind, lib, rng, engine, num_kv=num_kv, num_pool=num_kv + 1, count=count, perm=perm)
    else:
        sliced_round_trip(layout, kind, lib, rng, engine, num_kv, count)
    engine.close()


# ---------------------------------------------------------------- strided views


def sliced_round_trip(layout, kind, lib, rng, engine, num_kv, count) -> None:
    """Register a slice along the block dim of bigger tensors: copies land inside the slice only."""
    lk = kvtier.LAYOUT_KINDS[kind]
    bd = lk.block_dim
    lo = int(rng.integers(0, 3))
    big_src = make_kv(layout, kind, num_kv + lo + 2, lib, rng=rng)
    big_dst = make_kv(layout, kind, num_kv + lo + 2, lib, rng=rng)
    dst_before = snapshot(big_dst)

    def cut(t):
        index = [slice(None)] * t.ndim
        index[bd] = slice(lo, lo + num_kv)
        return t[tuple(index)]

    src, dst = [cut(t) for t in big_src], [cut(t) for t in big_dst]
    reg_src, reg_dst = register(src, layout, kind), register(dst, layout, kind)
    assert reg_src.num_blocks == num_kv
    pool = kvtier.HostPool(layout, num_blocks=num_kv)
    slots = pool.allocate(num_kv)[:count]
    src_ids = rng.permutation(num_kv)[:count]
    dst_ids = rng.permutation(num_kv)[:count]
    engine.gather(reg_src, src_ids, pool, slots).wait(timeout=60)
    for s, k in zip(slots.tolist(), src_ids.tolist()):
        assert np.array_equal(pool.view()[s], block_bytes_of(src, kind, k))
    engine.scatter(pool, slots, reg_dst, dst_ids).wait(timeout=60)
    assert_blocks_equal(src, src_ids, dst, dst_ids, kind)
    # Everything of the big tensors outside the written blocks (incl. outside the slice) is intact.
    assert_other_blocks_unchanged(dst_before, big_dst, (np.asarray(dst_ids, dtype=np.int64) + lo), kind,
                                  num_kv + lo + 2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lib", ["torch", "numpy"])
def test_slice_along_block_dim_is_registered_and_copied(kind: str, lib: str, rng, engine) -> None:
    sliced_round_trip(layout_with("float32"), kind, lib, rng, engine, num_kv=7, count=5)


def test_interleaved_layers_merge_into_fewer_runs(rng, engine) -> None:
    """Per-layer tensors that are slices of one [N, L, 2, T, H, D] tensor: K/V of consecutive
    layers are adjacent in memory, so one block is fewer runs, and copies are still exact."""
    layout = layout_with("float32")
    L = layout.num_layers
    big = make_kv(layout, "blocks_first", 10, "torch", rng=rng)[0]
    per_layer = [big[:, l] for l in range(L)]
    reg = kvtier.register_kv(per_layer, layout, "vllm_flash")
    assert reg.num_segments == 1  # the layers of one block are contiguous in `big`
    pool = kvtier.HostPool(layout, num_blocks=10)
    ids = pool.allocate(10)
    engine.gather(reg, np.arange(10), pool, ids).wait(timeout=30)
    for n in range(10):
        assert np.array_equal(pool.view()[ids[n]], block_bytes_of(per_layer, "vllm_flash", n))


def test_run_counts_per_kind() -> None:
    layout = layout_with("float32")
    expect = {"vllm_flash": 3, "kv_first": 6, "heads_first": 3, "vllm_cpu": 3, "layers_first": 3, "blocks_first": 1}
    for kind, runs in expect.items():
        reg = register(make_kv(layout, kind, 4), layout, kind)
        assert reg.num_segments == runs, kind
        assert reg.kind == kind and reg.device == "cpu" and reg.num_blocks == 4


# ---------------------------------------------------------------- other directions


def test_dram_to_dram(rng, engine) -> None:
    a = kvtier.HostPool(5000, num_blocks=16)
    b = kvtier.HostPool(5000, num_blocks=16)
    a_bytes = fill_pool(a, salt=1)
    b_before = fill_pool(b, salt=2)
    ia, ib = a.allocate(16), b.allocate(16)
    src_ids = rng.permutation(16)[:10]
    dst_ids = rng.permutation(16)[:10]
    engine.transfer(a, ia[src_ids], b, ib[dst_ids]).wait(timeout=30)
    expected = b_before.copy()
    expected[ib[dst_ids]] = a_bytes[ia[src_ids]]
    assert np.array_equal(b.view(), expected)
    assert np.array_equal(a.view(), a_bytes)
    # Within one pool, between different blocks.
    engine.transfer(a, ia[:4], a, ia[8:12]).wait(timeout=30)
    assert np.array_equal(a.view()[ia[8:12]], a_bytes[ia[:4]])
    assert np.array_equal(a.view()[ia[:8]], a_bytes[ia[:8]])


def test_one_source_block_to_many_targets(rng, engine) -> None:
    layout = layout_with("float32")
    src = make_kv(layout, "vllm_flash", 4, rng=rng)
    reg = register(src, layout, "vllm_flash")
    pool = kvtier.HostPool(layout, num_blocks=4)
    ids = pool.allocate(4)
    engine.gather(reg, [2, 2, 2, 1], pool, ids).wait(timeout=30)
    for i, k in zip(ids.tolist(), [2, 2, 2, 1]):
        assert np.array_equal(pool.view()[i], block_bytes_of(src, "vllm_flash", k))


@pytest.mark.parametrize("kind", KINDS)
def test_kv_to_kv_same_kind(kind: str, rng, engine) -> None:
    layout = layout_with("bfloat16")
    src = make_kv(layout, kind, 8, rng=rng)
    dst = make_kv(layout, kind, 8)
    dst_before = snapshot(dst)
    rs, rd = register(src, layout, kind), register(dst, layout, kind)
    src_ids, dst_ids = rng.permutation(8)[:5], rng.permutation(8)[:5]
    engine.transfer(rs, src_ids, rd, dst_ids).wait(timeout=30)
    assert_blocks_equal(src, src_ids, dst, dst_ids, kind)
    assert_other_blocks_unchanged(dst_before, dst, dst_ids, kind, 8)
    # Within one registration (disjoint source and target blocks).
    src_now = snapshot(src)
    engine.transfer(rs, [0, 1], rs, [5, 6]).wait(timeout=30)
    assert_blocks_equal(src, [0, 1], src, [5, 6], kind)
    assert_other_blocks_unchanged(src_now, src, [5, 6], kind, 8)


# ---------------------------------------------------------------- sizes and copy paths


BIG = kvtier.KVLayout(num_layers=4, kv_heads=8, head_dim=128, block_tokens=16, dtype="float32")  # 512 KiB


def test_large_batch_uses_the_streaming_path_and_is_exact(rng) -> None:
    assert BIG.block_bytes == 512 << 10
    n = 40  # 20 MiB > the 8 MiB non-temporal threshold
    engine = kvtier.CopyEngine()
    src = make_kv(BIG, "vllm_flash", n, big=True, salt=3)
    dst = make_kv(BIG, "vllm_flash", n)
    rs, rd = register(src, BIG, "vllm_flash"), register(dst, BIG, "vllm_flash")
    pool = kvtier.HostPool(BIG, num_blocks=n)
    slots = pool.allocate(n)
    src_ids, dst_ids = rng.permutation(n), rng.permutation(n)
    h = engine.gather(rs, src_ids, pool, slots)
    assert h.num_blocks == n and h.bytes == n * BIG.block_bytes >= 8 << 20
    h.wait(timeout=60)
    engine.scatter(pool, slots, rd, dst_ids).wait(timeout=60)
    order = np.argsort(dst_ids)
    for s, d in zip(src, dst):
        assert torch.equal(s[torch.as_tensor(src_ids[order])].view(torch.int32), d.view(torch.int32))
    engine.close()


def test_large_batch_with_unaligned_odd_sized_runs(rng) -> None:
    """Streaming stores with targets that are not 64-byte aligned and runs of odd lengths."""
    layout = kvtier.KVLayout(num_layers=2, kv_heads=3, head_dim=37, block_tokens=17, dtype="float32")
    n = 300  # 300 x 30192 B = 8.6 MiB
    assert n * layout.block_bytes >= 8 << 20
    engine = kvtier.CopyEngine()
    big_src = make_kv(layout, "kv_first", n + 1, "numpy", big=True, salt=5)
    big_dst = make_kv(layout, "kv_first", n + 1, "numpy")
    src = [t[:, 1:] for t in big_src]  # start one (odd-sized) block in: misaligned bases
    dst = [t[:, 1:] for t in big_dst]
    rs, rd = register(src, layout, "kv_first"), register(dst, layout, "kv_first")
    pool = kvtier.HostPool(layout, num_blocks=n)
    slots = pool.allocate(n)
    src_ids, dst_ids = rng.permutation(n), rng.permutation(n)
    engine.gather(rs, src_ids, pool, slots).wait(timeout=60)
    engine.scatter(pool, slots, rd, dst_ids).wait(timeout=60)
    for s, d in zip(src, dst):
        assert np.array_equal(s[:, src_ids].view(np.uint8), d[:, dst_ids].view(np.uint8))
    assert not big_dst[0][:, 0].any() and not big_dst[1][:, 0].any()
    engine.close()


@pytest.mark.parametrize("kind", KINDS)
def test_multi_chunk_batch_every_kind(kind: str, rng) -> None:
    """~3 MiB on two threads: split into chunks whose boundaries fall inside blocks."""
    layout = kvtier.KVLayout(num_layers=3, kv_heads=2, head_dim=40, block_tokens=8, dtype="bfloat16")
    n = (3 << 20) // layout.block_bytes + 3
    engine = kvtier.CopyEngine(threads=2)
    src = make_kv(layout, kind, n, big=True, salt=17)
    dst = make_kv(layout, kind, n)
    rs, rd = register(src, layout, kind), register(dst, layout, kind)
    pool = kvtier.HostPool(layout, num_blocks=n)
    slots = pool.allocate(n)
    src_ids, dst_ids = rng.permutation(n), rng.permutation(n)
    h = engine.gather(rs, src_ids, pool, slots)
    assert h.bytes > 1 << 20
    h.wait(timeout=60)
    for i in (0, n // 3, n - 1):
        assert np.array_equal(pool.view()[slots[i]], block_bytes_of(src, kind, int(src_ids[i])))
    engine.scatter(pool, slots, rd, dst_ids).wait(timeout=60)
    assert_blocks_equal(src, src_ids, dst, dst_ids, kind)
    engine.close()


def test_tiny_batch_completes_inline(rng, engine) -> None:
    layout = kvtier.KVLayout(1, 1, 4, 2, "float32")  # 64-byte blocks
    src = make_kv(layout, "vllm_flash", 3, rng=rng)
    reg = register(src, layout, "vllm_flash")
    pool = kvtier.HostPool(layout, num_blocks=3)
    ids = pool.allocate(1)
    h = engine.gather(reg, [1], pool, ids)
    assert h.done(), "a 64-byte batch is copied on the caller's thread"
    assert h.exception() is None and h.latency_s >= 0.0
    h.wait(timeout=0)
    assert np.array_equal(pool.view()[ids[0]], block_bytes_of(src, "vllm_flash", 1))
    empty = engine.gather(reg, [], pool, [])
    assert empty.done() and empty.num_blocks == 0 and empty.bytes == 0
    empty.wait(timeout=0)


# ---------------------------------------------------------------- handles


def _pending_setup(n: int = 48, salt: int = 11):
    src = make_kv(BIG, "vllm_flash", n, big=True, salt=salt)
    reg = register(src, BIG, "vllm_flash")
    pool = kvtier.HostPool(BIG, num_blocks=n)
    return src, reg, pool, pool.allocate(n)


def test_await_several_handles_concurrently() -> None:
    src, reg, pool, slots = _pending_setup()
    engine = kvtier.CopyEngine(threads=1)
    groups = np.array_split(np.arange(len(slots)), 6)

    async def main() -> list[kvtier.TransferHandle]:
        handles = [engine.gather(reg, g, pool, slots[g]) for g in groups]
        tiny = engine.gather(reg, [0], pool, [slots[0]])  # may well be done before it is awaited
        results = await asyncio.wait_for(asyncio.gather(*handles, tiny), timeout=60)
        assert results == [None] * 7
        return handles

    handles = asyncio.run(main())
    assert all(h.done() and h.exception() is None for h in handles)
    for n in range(len(slots)):
        assert np.array_equal(pool.view()[slots[n]], block_bytes_of(src, "vllm_flash", n))
    # A second event loop on the same engine works too.
    assert asyncio.run(asyncio.wait_for(_await(engine.gather(reg, [1, 2], pool, slots[1:3])), 30)) is None
    engine.close()


async def _await(h: kvtier.TransferHandle) -> None:
    return await h


def test_await_failed_transfer_raises_transfer_error() -> None:
    src, reg, pool, slots = _pending_setup(n=4)
    engine = kvtier.CopyEngine()
    engine.inject_faults(1)
    h = engine.gather(reg, [0], pool, slots[:1])
    with pytest.raises(TransferError, match="injected fault"):
        asyncio.run(asyncio.wait_for(_await(h), 30))
    engine.inject_faults(0)
    asyncio.run(asyncio.wait_for(_await(engine.gather(reg, [0], pool, slots[:1])), 30))


def test_wait_with_zero_timeout_returns_at_once() -> None:
    src, reg, pool, slots = _pending_setup(n=64)  # 32 MiB on one thread
    engine = kvtier.CopyEngine(threads=1)
    h = engine.gather(reg, np.arange(64), pool, slots)
    t0 = time.monotonic()
    try:
        h.wait(timeout=0)
        assert h.done()
    except TransferTimeoutError as e:
        assert "not complete" in str(e)
        assert isinstance(e, TimeoutError)
    assert time.monotonic() - t0 < 1.0, "wait(timeout=0) blocked"
    h.wait()
    assert h.done() and h.latency_s > 0
    for n in (0, 31, 63):
        assert np.array_equal(pool.view()[slots[n]], block_bytes_of(src, "vllm_flash", n))
    engine.close()


def test_timeout_is_reported_for_a_pending_transfer() -> None:
    """A wait with a tiny timeout on a transfer queued behind a big one times out (retrying with
    bigger batches until it does), and the transfer then still completes."""
    engine = kvtier.CopyEngine(threads=1)
    for n in (64, 256, 512):
        src, reg, pool, slots = _pending_setup(n=n)
        h = engine.gather(reg, np.arange(n), pool, slots)
        try:
            h.wait(timeout=0.0001)
        except TransferTimeoutError as e:
            assert f"{n} blocks" in str(e)
            h.wait(timeout=60)
            assert np.array_equal(pool.view()[slots[n - 1]], block_bytes_of(src, "vllm_flash", n - 1))
            break
        h.wait()
    else:
        pytest.fail("could not make a transfer outlast a 0.1 ms wait, even at 256 MiB")
    engine.close()


@pytest.mark.parametrize("timeout", [float("inf"), 1e300, 1e18, 2.0**63])
def test_wait_without_a_usable_deadline_waits_until_done(timeout: float) -> None:
    """Note [Wait timeouts] in csrc/transfer/transfer.cc: inf and timeouts too long to be a
    deadline wait as long as it takes, on a transfer still pending when the wait starts (they
    used to overflow the deadline and time out at once)."""
    engine = kvtier.CopyEngine(threads=1)
    for n in (64, 256, 512):
        src, reg, pool, slots = _pending_setup(n=n)
        h = engine.gather(reg, np.arange(n), pool, slots)
        if h.done():
            continue
        h.wait(timeout=timeout)
        assert h.done() and h.exception() is None
        assert np.array_equal(pool.view()[slots[n - 1]], block_bytes_of(src, "vllm_flash", n - 1))
        break
    else:
        pytest.fail("could not catch a transfer pending, even at 256 MiB")
    engine.close()


def test_wait_rejects_nan_and_non_numbers(engine) -> None:
    pool = kvtier.HostPool(64, num_blocks=2)
    a = pool.allocate(2)
    h = engine.transfer(pool, a[:1], pool, a[1:])
    for bad in (float("nan"), "1", True):
        with pytest.raises(kvtier.InvalidArgumentError, match="timeout"):
            h.wait(timeout=bad)
    with pytest.raises(kvtier.InvalidArgumentError, match="nan"):  # the binding refuses it too
        h._core.wait(float("nan"))
    h.wait(timeout=float("inf"))


def test_wait_rejects_a_negative_timeout(engine) -> None:
    pool = kvtier.HostPool(64, num_blocks=2)
    a = pool.allocate(2)
    h = engine.transfer(pool, a[:1], pool, a[1:])
    with pytest.raises(kvtier.InvalidArgumentError, match="timeout"):
        h.wait(timeout=-1)


# ---------------------------------------------------------------- faults


def test_injected_fault_fails_the_next_transfer_and_switches_off(rng) -> None:
    layout = layout_with("float32")
    engine = kvtier.CopyEngine()
    src = make_kv(layout, "vllm_flash", 4, rng=rng)
    reg = register(src, layout, "vllm_flash")
    pool = kvtier.HostPool(layout, num_blocks=4)
    ids = pool.allocate(4)
    before = fill_pool(pool)
    engine.inject_faults(1)
    h = engine.gather(reg, [0, 1], pool, ids[:2])
    with pytest.raises(TransferError, match="injected fault"):
        h.wait(timeout=30)
    exc = h.exception()
    assert isinstance(exc, TransferError) and "injected fault" in str(exc)
    assert h.done()
    assert np.array_equal(pool.view(), before), "a failed transfer wrote its target"
    # The failed transfer released what it acquired.
    assert [pool.refcount(int(i)) for i in ids] == [1, 1, 1, 1]
    s = engine.stats()
    assert (s["submitted"], s["completed_ok"], s["completed_error"], s["bytes"], s["inflight"]) == (1, 0, 1, 0, 0)
    engine.inject_faults(0)
    h2 = engine.gather(reg, [0, 1], pool, ids[:2])
    h2.wait(timeout=30)
    assert h2.exception() is None
    assert np.array_equal(pool.view()[ids[1]], block_bytes_of(src, "vllm_flash", 1))
    reg.close()  # nothing left in flight


def test_fault_every_third_batch() -> None:
    engine = kvtier.CopyEngine()
    pool = kvtier.HostPool(64, num_blocks=2)
    a, b = pool.allocate(2)
    engine.inject_faults(3)
    outcomes = []
    for _ in range(7):
        h = engine.transfer(pool, [a], pool, [b])
        try:
            h.wait(timeout=30)
            outcomes.append("ok")
        except TransferError:
            outcomes.append("fail")
    assert outcomes == ["ok", "ok", "fail", "ok", "ok", "fail", "ok"]
    s = engine.stats()
    assert (s["completed_ok"], s["completed_error"]) == (5, 2)


# ---------------------------------------------------------------- stats


def test_stats_add_up(rng) -> None:
    layout = layout_with("float32")
    engine = kvtier.CopyEngine()
    assert engine.stats() == {"submitted": 0, "completed_ok": 0, "completed_error": 0, "blocks": 0,
                              "bytes": 0, "inflight": 0}
    src = make_kv(layout, "kv_first", 16, rng=rng)
    reg = register(src, layout, "kv_first")
    pool = kvtier.HostPool(layout, num_blocks=16)
    ids = pool.allocate(16)
    sizes_ok = [1, 5, 16, 0]
    for k in sizes_ok:
        engine.gather(reg, np.arange(k), pool, ids[:k]).wait(timeout=30)
    engine.inject_faults(1)
    with pytest.raises(TransferError):
        engine.gather(reg, [3, 4], pool, ids[:2]).wait(timeout=30)
    engine.inject_faults(0)
    with pytest.raises(kvtier.InvalidArgumentError):  # refused at submit: not counted
        engine.gather(reg, [99], pool, ids[:1])
    big = [engine.scatter(pool, ids, reg, np.arange(16)) for _ in range(3)]
    engine.drain()
    assert all(h.done() for h in big)
    s = engine.stats()
    assert s["submitted"] == len(sizes_ok) + 1 + 3
    assert s["completed_ok"] == len(sizes_ok) + 3 and s["completed_error"] == 1
    assert s["submitted"] == s["completed_ok"] + s["completed_error"]
    assert s["blocks"] == sum(sizes_ok) + 3 * 16
    assert s["bytes"] == s["blocks"] * layout.block_bytes
    assert s["inflight"] == 0


# ---------------------------------------------------------------- concurrency


def test_four_threads_submitting_to_one_engine(rng) -> None:
    layout = kvtier.KVLayout(num_layers=2, kv_heads=4, head_dim=64, block_tokens=16, dtype="bfloat16")
    engine = kvtier.CopyEngine()
    pool = kvtier.HostPool(layout, num_blocks=4 * 24)
    seeds = rng.integers(0, 2**32, size=4)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    bytes_moved = [0] * 4

    def worker(t: int) -> None:
        try:
            r = np.random.default_rng(int(seeds[t]))
            kind = KINDS[t % len(KINDS)]
            src = make_kv(layout, kind, 32, rng=r)
            dst = make_kv(layout, kind, 32)
            rs, rd = register(src, layout, kind), register(dst, layout, kind)
            barrier.wait(timeout=30)
            for it in range(6):
                k = int(r.integers(1, 25))
                slots = pool.allocate(k)  # the pool is shared: allocation races with the others
                src_ids, dst_ids = r.permutation(32)[:k], r.permutation(32)[:k]
                g = engine.gather(rs, src_ids, pool, slots)
                g.wait(timeout=60)
                engine.scatter(pool, slots, rd, dst_ids).wait(timeout=60)
                assert_blocks_equal(src, src_ids, dst, dst_ids, kind)
                pool.free(slots)
                bytes_moved[t] += 2 * k * layout.block_bytes
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a submitting thread hung"
    assert not errors, errors
    s = engine.stats()
    assert s["submitted"] == s["completed_ok"] == 4 * 6 * 2
    assert s["bytes"] == sum(bytes_moved)
    assert pool.free_blocks == pool.num_blocks


def test_huge_page_collapse_keeps_contents() -> None:
    """register_kv(huge_pages=True) rebuilds CPU tensors on huge pages; the bytes must not change."""
    layout = kvtier.KVLayout(num_layers=2, kv_heads=4, head_dim=128, block_tokens=16, dtype="float32")
    rng = np.random.default_rng(7)
    kv = [rng.standard_normal((512, 2, 16, 4, 128)).astype(np.float32) for _ in range(2)]  # 32 MiB each
    before = [k.copy() for k in kv]
    reg = kvtier.register_kv(kv, layout, "vllm_flash", huge_pages=True)
    assert reg.huge_pages in {"collapsed", "advised", "unsupported"}
    for k, b in zip(kv, before):
        np.testing.assert_array_equal(k, b)
    off = kvtier.register_kv(kv, layout, "vllm_flash", huge_pages=False)
    assert off.huge_pages == "off"
