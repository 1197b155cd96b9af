"""Wrong input and misuse: every case raises a clear kvtier exception (type and message), never
crashes or hangs, and a refused call changes nothing."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import kvtier
from kvtier import (
    BlockStateError,
    BusyError,
    ClosedError,
    DeviceError,
    DTypeError,
    InvalidArgumentError,
    OutOfCapacityError,
)
from kvhelpers import block_bytes_of, make_kv, register

LAYOUT = kvtier.KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=4, dtype="float32")
FLASH_SHAPE = (6, 2, 4, 2, 8)  # [N, 2, T, H, D]


@pytest.fixture
def setup(rng):
    """A registration of 6 random blocks, a pool of 4 (3 allocated), and an engine."""
    src = make_kv(LAYOUT, "vllm_flash", 6, rng=rng)
    reg = register(src, LAYOUT, "vllm_flash")
    pool = kvtier.HostPool(LAYOUT, num_blocks=4)
    ids = pool.allocate(3)
    engine = kvtier.CopyEngine(threads=2)
    yield src, reg, pool, ids, engine
    engine.close()


def pool_state(pool: kvtier.HostPool) -> tuple:
    return (tuple(pool.refcount(i) for i in range(pool.num_blocks)),
            tuple(pool.pins(i) for i in range(pool.num_blocks)), pool.stats(), pool.view().copy().tobytes())


def assert_refused(engine, pool, reg, call, exc, word) -> None:
    """`call()` raises exc with `word` in its message, and changes neither the pool, nor the
    engine's counters, nor the registration (which must still be closable: nothing in flight)."""
    before_pool, before_stats = pool_state(pool), engine.stats()
    with pytest.raises(exc) as info:
        call()
    assert word.lower() in str(info.value).lower(), f"message {str(info.value)!r} lacks {word!r}"
    assert pool_state(pool) == before_pool
    assert engine.stats() == before_stats
    assert reg._core.inflight == 0


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_wrong_dtype_tensor(dtype) -> None:
    kv = [torch.zeros(FLASH_SHAPE, dtype=dtype) for _ in range(2)]
    with pytest.raises(DTypeError, match="dtype") as info:
        kvtier.register_kv(kv, LAYOUT)
    assert "float32" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_wrong_dtype_numpy() -> None:
    kv = [np.zeros(FLASH_SHAPE, dtype=np.float64) for _ in range(2)]
    with pytest.raises(DTypeError, match="float64"):
        kvtier.register_kv(kv, LAYOUT)


def test_one_layer_with_the_wrong_dtype() -> None:
    kv = [torch.zeros(FLASH_SHAPE), torch.zeros(FLASH_SHAPE, dtype=torch.float16)]
    with pytest.raises(DTypeError, match="tensor 1"):
        kvtier.register_kv(kv, LAYOUT)


@pytest.mark.parametrize("shape", [(6, 2, 4, 2, 9), (6, 1, 4, 2, 8), (6, 2, 5, 2, 8), (6, 2, 4, 3, 8)])
def test_wrong_shape_names_the_expected_shape(shape) -> None:
    kv = [torch.zeros(shape) for _ in range(2)]
    with pytest.raises(InvalidArgumentError) as info:
        kvtier.register_kv(kv, LAYOUT)
    msg = str(info.value)
    assert str((6, 2, 4, 2, 8)) in msg and str(shape) in msg, msg


def test_wrong_number_of_dims() -> None:
    with pytest.raises(InvalidArgumentError, match="expects 5 dims"):
        kvtier.register_kv([torch.zeros(6, 2, 4, 16) for _ in range(2)], LAYOUT)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_wrong_number_of_per_layer_tensors(count: int) -> None:
    with pytest.raises(InvalidArgumentError, match=f"needs 2 tensors .*got {count}"):
        kvtier.register_kv([torch.zeros(FLASH_SHAPE) for _ in range(count)], LAYOUT)


def test_per_layer_kind_given_a_single_tensor() -> None:
    with pytest.raises(InvalidArgumentError, match="list of one tensor per layer"):
        kvtier.register_kv(torch.zeros(FLASH_SHAPE), LAYOUT, "vllm_flash")


def test_single_tensor_kind_given_a_list_of_two() -> None:
    t = torch.zeros(2, 6, 2, 4, 2, 8)
    with pytest.raises(InvalidArgumentError, match="single tensor"):
        kvtier.register_kv([t, t], LAYOUT, "layers_first")
    assert kvtier.register_kv([t], LAYOUT, "layers_first").num_blocks == 6  # a list of one is fine


def test_layers_disagree_on_the_number_of_blocks() -> None:
    kv = [torch.zeros(FLASH_SHAPE), torch.zeros(7, 2, 4, 2, 8)]
    with pytest.raises(InvalidArgumentError, match="7 blocks"):
        kvtier.register_kv(kv, LAYOUT)


def test_not_a_tensor() -> None:
    with pytest.raises(InvalidArgumentError, match="not a tensor"):
        kvtier.register_kv([[1.0, 2.0], torch.zeros(FLASH_SHAPE)], LAYOUT)
    with pytest.raises(InvalidArgumentError, match="KVLayout"):
        kvtier.register_kv([torch.zeros(FLASH_SHAPE)] * 2, {"num_layers": 2})


def test_meta_device_tensor() -> None:
    kv = [torch.zeros(FLASH_SHAPE, device="meta") for _ in range(2)]
    with pytest.raises(DeviceError, match="meta"):
        kvtier.register_kv(kv, LAYOUT)


def test_mixed_devices() -> None:
    kv = [torch.zeros(FLASH_SHAPE), torch.zeros(FLASH_SHAPE, device="meta")]
    with pytest.raises(DeviceError) as info:
        kvtier.register_kv(kv, LAYOUT)
    assert "tensor 1" in str(info.value) and "meta" in str(info.value)


@pytest.mark.parametrize("kind", ["vllm-flash", "flash", "", "VLLM_FLASH"])
def test_unknown_layout_kind(kind: str) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown KV layout kind") as info:
        kvtier.register_kv([torch.zeros(FLASH_SHAPE)] * 2, LAYOUT, kind)
    assert "vllm_flash" in str(info.value)  # the message lists the valid kinds


def test_expanded_view_cannot_hold_blocks() -> None:
    t = torch.zeros(1, 2, 4, 2, 8).expand(FLASH_SHAPE)
    with pytest.raises(InvalidArgumentError, match="stride"):
        kvtier.register_kv([t, t], LAYOUT)


def test_flipped_numpy_view_cannot_hold_blocks() -> None:
    a = np.zeros(FLASH_SHAPE, np.float32)[::-1]
    try:
        kvtier.register_kv([a, a], LAYOUT)
    except InvalidArgumentError as e:
        assert "stride" in str(e)
    else:  # pragma: no cover - must not be accepted: block b would live at a negative offset
        pytest.fail("a flipped view was registered")


def test_too_fragmented_tensor() -> None:
    # One block = 2 x 64 x 513 separate 4-byte runs (the head dim is strided): more than 65536.
    layout = kvtier.KVLayout(num_layers=1, kv_heads=513, head_dim=1, block_tokens=64, dtype="float32")
    t = torch.zeros(2, 2, 64, 513, 2)[..., :1]
    with pytest.raises(InvalidArgumentError, match="fragmented"):
        kvtier.register_kv([t], layout)


@pytest.mark.parametrize("lib", ["torch", "numpy"])
def test_zero_blocks_tensor(lib: str) -> None:
    t = torch.zeros(0, 2, 4, 2, 8) if lib == "torch" else np.zeros((0, 2, 4, 2, 8), np.float32)
    # torch gives a zero-size tensor no data pointer, so the core says that before "empty dimension".
    with pytest.raises(InvalidArgumentError, match="empty dimension|no data pointer"):
        kvtier.register_kv([t, t], LAYOUT)


def test_read_only_numpy_array_is_a_clear_error() -> None:
    a = np.zeros(FLASH_SHAPE, np.float32)
    a.flags.writeable = False
    with pytest.raises(kvtier.KvtierError, match="read-only|writ"):
        kvtier.register_kv([a, a.copy()], LAYOUT)


# ---------------------------------------------------------------- KVLayout


@pytest.mark.parametrize("field", ["num_layers", "kv_heads", "head_dim", "block_tokens"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 2.0, True, "2", None])
def test_kvlayout_fields_must_be_positive_ints(field: str, value) -> None:
    args = {"num_layers": 2, "kv_heads": 2, "head_dim": 8, "block_tokens": 4}
    args[field] = value
    with pytest.raises(InvalidArgumentError, match=f"KVLayout.{field} must be a positive int"):
        kvtier.KVLayout(**args)


@pytest.mark.parametrize("dtype", ["int4", "float64", torch.float64, np.int32, "complex64"])
def test_kvlayout_unsupported_dtype(dtype) -> None:
    with pytest.raises(InvalidArgumentError, match="unsupported KV dtype"):
        kvtier.KVLayout(2, 2, 8, 4, dtype)


def test_kvlayout_accepts_dtype_spellings() -> None:
    for spelling in ("bf16", torch.bfloat16, "bfloat16"):
        assert kvtier.KVLayout(1, 1, 1, 1, spelling).dtype == "bfloat16"
    assert kvtier.KVLayout(1, 1, 1, 1, np.dtype("float32")).dtype == "float32"
    assert kvtier.KVLayout(2, 8, 128, 16, "bf16").block_bytes == 16 * 2 * 2 * 8 * 128 * 2


# ---------------------------------------------------------------- transfer arguments


def test_out_of_range_source_kv_id(setup) -> None:
    src, reg, pool, ids, engine = setup
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [0, 6], pool, ids[:2]),
                   InvalidArgumentError, "out of range for the kv registration")


def test_out_of_range_target_kv_id(setup) -> None:
    src, reg, pool, ids, engine = setup
    assert_refused(engine, pool, reg, lambda: engine.scatter(pool, ids[:2], reg, [1, 2**31 - 1]),
                   InvalidArgumentError, "out of range")


def test_out_of_range_pool_ids(setup) -> None:
    src, reg, pool, ids, engine = setup
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [0, 1], pool, [int(ids[0]), 4]),
                   InvalidArgumentError, "out of range")
    assert_refused(engine, pool, reg, lambda: engine.scatter(pool, [int(ids[0]), 40], reg, [0, 1]),
                   InvalidArgumentError, "out of range")


@pytest.mark.parametrize("which", ["source", "target"])
@pytest.mark.parametrize("bad", [-1, np.int64(-5), -(2**40)])
def test_negative_ids(setup, which: str, bad) -> None:
    src, reg, pool, ids, engine = setup
    kv_ids, pool_ids = [0, bad], list(ids[:2])
    call = (lambda: engine.gather(reg, kv_ids, pool, pool_ids)) if which == "source" else \
        (lambda: engine.scatter(pool, pool_ids, reg, kv_ids))
    assert_refused(engine, pool, reg, call, InvalidArgumentError, "out of range")


@pytest.mark.parametrize("bad", [[0.0, 1.0], np.array([0.5]), torch.tensor([1.0]), ["0"], [True]])
def test_non_integer_ids(setup, bad) -> None:
    src, reg, pool, ids, engine = setup
    n = len(bad)
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, bad, pool, ids[:n]),
                   InvalidArgumentError, "must be integers")
    assert_refused(engine, pool, reg, lambda: engine.scatter(pool, bad, reg, np.arange(n)),
                   InvalidArgumentError, "must be integers")


def test_two_dimensional_ids(setup) -> None:
    src, reg, pool, ids, engine = setup
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [[0, 1]], pool, ids[:2]),
                   InvalidArgumentError, "one-dimensional")
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [0, 1], pool, ids[:2].reshape(1, 2)),
                   InvalidArgumentError, "one-dimensional")


def test_mismatched_id_list_lengths(setup) -> None:
    src, reg, pool, ids, engine = setup
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [0, 1, 2], pool, ids[:2]),
                   InvalidArgumentError, "differ in length (3 vs 2)")
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [], pool, ids[:1]),
                   InvalidArgumentError, "differ in length")


def test_duplicate_target_ids(setup) -> None:
    src, reg, pool, ids, engine = setup
    a = int(ids[0])
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [0, 1], pool, [a, a]),
                   InvalidArgumentError, f"target block {a} appears more than once")
    assert_refused(engine, pool, reg, lambda: engine.scatter(pool, ids[:3], reg, [4, 2, 4]),
                   InvalidArgumentError, "target block 4 appears more than once")


def test_block_both_source_and_target_of_one_space(setup) -> None:
    src, reg, pool, ids, engine = setup
    assert_refused(engine, pool, reg, lambda: engine.transfer(pool, ids[:2], pool, [int(ids[1]), int(ids[2])]),
                   InvalidArgumentError, "both a source and a target")
    assert_refused(engine, pool, reg, lambda: engine.transfer(reg, [0, 1], reg, [1, 2]),
                   InvalidArgumentError, "both a source and a target")


@pytest.mark.parametrize("space", ["pool", "kv"])
def test_single_block_self_copy_is_refused_like_a_longer_batch(setup, space: str) -> None:
    src, reg, pool, ids, engine = setup
    a = int(ids[0])
    call = (lambda: engine.transfer(pool, [a], pool, [a])) if space == "pool" else \
        (lambda: engine.transfer(reg, [3], reg, [3]))
    assert_refused(engine, pool, reg, call, InvalidArgumentError, "both a source and a target")


def test_block_size_mismatch(setup) -> None:
    src, reg, pool, ids, engine = setup
    other = kvtier.HostPool(LAYOUT.block_bytes * 2, num_blocks=2)
    oids = other.allocate(2)
    with pytest.raises(InvalidArgumentError, match="different KV layouts") as info:
        engine.gather(reg, [0, 1], other, oids)
    assert str(LAYOUT.block_bytes) in str(info.value) and str(2 * LAYOUT.block_bytes) in str(info.value)
    bf16 = kvtier.KVLayout(2, 2, 8, 4, "bfloat16")
    reg16 = register(make_kv(bf16, "vllm_flash", 4), bf16, "vllm_flash")
    assert_refused(engine, pool, reg, lambda: engine.scatter(pool, ids[:1], reg16, [0]),
                   InvalidArgumentError, "bytes")
    assert [other.refcount(int(i)) for i in oids] == [1, 1]


@pytest.mark.parametrize("raw", ["torch", "numpy"])
def test_raw_tensor_as_transfer_endpoint(setup, raw: str) -> None:
    src, reg, pool, ids, engine = setup
    t = src[0] if raw == "torch" else src[0].numpy()
    assert_refused(engine, pool, reg, lambda: engine.transfer(t, [0], pool, ids[:1]), InvalidArgumentError,
                   "register it first with kvtier.register_kv")
    assert_refused(engine, pool, reg, lambda: engine.transfer(pool, ids[:1], t, [0]), InvalidArgumentError,
                   "register")
    assert_refused(engine, pool, reg, lambda: engine.transfer("pool", [0], pool, ids[:1]), InvalidArgumentError,
                   "must be a HostPool or a KVRegistration")


def test_transfer_into_and_from_a_free_pool_block(setup) -> None:
    src, reg, pool, ids, engine = setup
    free = next(i for i in range(4) if pool.refcount(i) == 0)
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [0, 1], pool, [int(ids[0]), free]),
                   BlockStateError, f"block {free} is not allocated")
    assert_refused(engine, pool, reg, lambda: engine.scatter(pool, [free], reg, [0]),
                   BlockStateError, "not allocated")
    pool.free(ids[:1])  # freed blocks are free blocks, too
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [0], pool, ids[:1]),
                   BlockStateError, "not allocated")


def test_batch_larger_than_pool_capacity(setup) -> None:
    src, reg, pool, ids, engine = setup
    with pytest.raises(OutOfCapacityError, match="cannot allocate 5 blocks: 1 of 4 are free"):
        pool.allocate(5)
    with pytest.raises(OutOfCapacityError, match="cannot allocate 2 blocks"):
        pool.allocate(2)
    assert pool.free_blocks == 1


def test_closed_registration(setup) -> None:
    src, reg, pool, ids, engine = setup
    reg.close()
    assert reg.closed
    assert_refused(engine, pool, reg, lambda: engine.gather(reg, [0], pool, ids[:1]),
                   ClosedError, "source kv registration was closed")
    assert_refused(engine, pool, reg, lambda: engine.scatter(pool, ids[:1], reg, [0]),
                   ClosedError, "target kv registration was closed")
    reg.close()  # closing twice is harmless
    with register(make_kv(LAYOUT, "vllm_flash", 2), LAYOUT, "vllm_flash") as r2:
        assert not r2.closed
    assert r2.closed
    with pytest.raises(ClosedError):
        engine.gather(r2, [0], pool, ids[:1])


def test_closed_engine() -> None:
    engine = kvtier.CopyEngine()
    pool = kvtier.HostPool(64, num_blocks=2)
    a = pool.allocate(2)
    engine.close()
    engine.close()
    with pytest.raises(ClosedError, match="copy engine was closed"):
        engine.transfer(pool, a[:1], pool, a[1:])
    assert pool.refcount(int(a[0])) == 1


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_engine_threads_argument(threads) -> None:
    with pytest.raises(InvalidArgumentError, match="threads"):
        kvtier.CopyEngine(threads=threads)


# ---------------------------------------------------------------- lifetime races


BIG = kvtier.KVLayout(num_layers=4, kv_heads=8, head_dim=128, block_tokens=16, dtype="float32")  # 512 KiB


def big_kv(n: int, salt: int) -> list[torch.Tensor]:
    return make_kv(BIG, "vllm_flash", n, big=True, salt=salt)


def test_close_while_a_transfer_is_pending_is_busy() -> None:
    """close() right after submitting a big gather must say BusyError. The transfer is queued
    behind another big one on a single copy thread; if it still finished first, retry bigger."""
    engine = kvtier.CopyEngine(threads=1)
    for n in (128, 256, 512):  # 64, 128, 256 MiB per batch
        blocker_src = kvtier.HostPool(BIG, num_blocks=n)
        blocker_dst = kvtier.HostPool(BIG, num_blocks=n)
        kv = big_kv(n, salt=n)
        reg = register(kv, BIG, "vllm_flash")
        pool = kvtier.HostPool(BIG, num_blocks=n)
        slots = pool.allocate(n)
        blocker = engine.transfer(blocker_src, blocker_src.allocate(n), blocker_dst, blocker_dst.allocate(n))
        h = engine.gather(reg, np.arange(n), pool, slots[::-1])
        try:
            reg.close()
        except BusyError as e:
            assert "still use this kv registration" in str(e)
            assert not reg.closed
            # Still usable and still holding its tensors: the transfer completes correctly.
            h.wait(timeout=120)
            blocker.wait(timeout=120)
            assert np.array_equal(pool.view()[slots[-1]], block_bytes_of(kv, "vllm_flash", 0))
            reg.close()  # now idle
            assert reg.closed
            break
        # close() succeeded: the transfer had already released the registration (it may still be
        # completing its handle). Not the case under test: retry with a bigger batch.
        assert reg.closed
        h.wait(timeout=120)
        engine.drain()
    else:
        pytest.fail("every transfer finished before close(); BusyError was never exercised")
    engine.close()


def test_registered_tensors_dropped_while_a_transfer_is_pending() -> None:
    """Drop every reference to the tensors, the registration and the handle mid-transfer: the
    copy still reads the original bytes, and afterwards nothing is leaked."""
    engine = kvtier.CopyEngine(threads=1)
    for n in (128, 256, 512):
        kv = big_kv(n, salt=7 + n)
        expected = [block_bytes_of(kv, "vllm_flash", k) for k in (0, n // 2, n - 1)]
        reg = register(kv, BIG, "vllm_flash")
        pool = kvtier.HostPool(BIG, num_blocks=n)
        slots = pool.allocate(n)
        h = engine.gather(reg, np.arange(n), pool, slots)
        reg_ref, h_ref = weakref.ref(reg), weakref.ref(h)
        pending_at_drop = not h.done()
        del kv, reg, h
        gc.collect()
        # Reuse the freed Python-side memory with other data, in case anything was released.
        junk = [torch.full((n, 2, 16, 8, 128), -1.0) for _ in range(BIG.num_layers)]
        engine.drain()
        v = pool.view()
        for got, k in zip(expected, (0, n // 2, n - 1)):
            assert np.array_equal(v[slots[k]], got), f"block {k} lost its bytes"
        del junk
        gc.collect()
        assert reg_ref() is None and h_ref() is None, "the engine kept a finished transfer's objects"
        assert engine.stats()["completed_ok"] >= 1 and engine.stats()["completed_error"] == 0
        if pending_at_drop:
            break
    else:
        pytest.fail("the transfer always completed before the references were dropped")
    engine.close()


def test_pool_dropped_while_a_transfer_is_pending() -> None:
    engine = kvtier.CopyEngine(threads=1)
    for n in (128, 256, 512):
        kv = big_kv(n, salt=3)
        reg = register(kv, BIG, "vllm_flash")
        pool = kvtier.HostPool(BIG, num_blocks=n)
        h = engine.gather(reg, np.arange(n), pool, pool.allocate(n))
        pool_ref = weakref.ref(pool)
        pending = not h.done()
        del pool, h
        gc.collect()
        engine.drain()
        gc.collect()
        assert pool_ref() is None, "the pool outlived its finished transfer"
        reg.close()  # the registration is idle again
        if pending:
            break
    else:
        pytest.fail("the transfer always completed before the pool was dropped")
    engine.close()


def test_engine_dropped_while_a_transfer_is_pending_finishes_it() -> None:
    kv = big_kv(64, salt=9)
    reg = register(kv, BIG, "vllm_flash")
    pool = kvtier.HostPool(BIG, num_blocks=64)
    slots = pool.allocate(64)
    engine = kvtier.CopyEngine(threads=1)
    h = engine.gather(reg, np.arange(64), pool, slots)
    del engine, h
    gc.collect()
    # The engine drained before going away: every byte is there, nothing is in flight.
    for k in (0, 63):
        assert np.array_equal(pool.view()[slots[k]], block_bytes_of(kv, "vllm_flash", k))
    assert pool.refcount(int(slots[0])) == 1
    reg.close()


def test_registration_keeps_its_tensors_alive_until_closed() -> None:
    a = [np.arange(np.prod(FLASH_SHAPE), dtype=np.float32).reshape(FLASH_SHAPE) + i for i in range(2)]
    expected = block_bytes_of(a, "vllm_flash", 5)
    refs = [weakref.ref(t) for t in a]
    reg = kvtier.register_kv(a, LAYOUT)
    del a
    gc.collect()
    assert all(r() is not None for r in refs), "the registration does not hold its arrays"
    pool = kvtier.HostPool(LAYOUT, num_blocks=1)
    (slot,) = pool.allocate(1)
    kvtier.CopyEngine().gather(reg, [5], pool, [slot]).wait(timeout=30)
    assert np.array_equal(pool.view()[slot], expected)
    reg.close()
    gc.collect()
    assert all(r() is None for r in refs), "close() did not release the arrays"


@pytest.mark.parametrize("change", ["resize_", "set_", "storage_resize", "view_base_resize_"])
def test_transfer_after_a_registered_tensor_lost_its_memory_is_refused(change: str) -> None:
    """Note [Registered storage]: after kv.resize_() (the storage's memory reallocated, the old
    bytes freed), kv.set_() or a storage resize, a gather would read and a scatter write memory
    the tensor no longer owns; both are refused with an error naming the cause, and a new
    registration of the same tensor works."""
    kv = [torch.randn(FLASH_SHAPE) for _ in range(2)]
    base = None
    if change == "view_base_resize_":  # a registration of views into a bigger buffer
        base = torch.randn((2, *FLASH_SHAPE))
        kv = [base[0], base[1]]
        reg = kvtier.register_kv_views(kv, LAYOUT, [0, 0])
    else:
        reg = kvtier.register_kv(kv, LAYOUT)
    pool = kvtier.HostPool(LAYOUT, num_blocks=2)
    slots = pool.allocate(2)
    engine = kvtier.CopyEngine(threads=1)
    engine.gather(reg, [1, 2], pool, slots).wait(timeout=30)  # fine before the change
    if change == "resize_":
        kv[0].resize_(64, *FLASH_SHAPE[1:])  # a bigger storage: reallocated, the old memory freed
    elif change == "set_":
        kv[1].set_(torch.zeros(FLASH_SHAPE))
    elif change == "storage_resize":
        kv[0].untyped_storage().resize_(0)
    else:
        base.resize_(64, *FLASH_SHAPE)
    with pytest.raises(InvalidArgumentError, match="resized or given new storage.*register it again"):
        engine.gather(reg, [1, 2], pool, slots)
    with pytest.raises(InvalidArgumentError, match="resized or given new storage"):
        engine.scatter(pool, slots, reg, [1, 2])
    assert engine.stats()["submitted"] == 1  # nothing reached the engine
    reg.close()
    if change != "storage_resize":
        fresh = [t[:FLASH_SHAPE[0]] for t in (base[:2] if base is not None else kv)]
        again = kvtier.register_kv([t.contiguous() if not t.is_contiguous() else t for t in fresh], LAYOUT)
        engine.gather(again, [1, 2], pool, slots).wait(timeout=30)
        again.close()
    engine.close()


def test_pinned_block_freed_while_a_transfer_holds_it_does_not_leak() -> None:
    engine = kvtier.CopyEngine(threads=1)
    for n in (128, 256, 512):
        kv = big_kv(n, salt=1)
        reg = register(kv, BIG, "vllm_flash")
        blocker_pool = kvtier.HostPool(BIG, num_blocks=n)
        pool = kvtier.HostPool(BIG, num_blocks=n)
        slots, bslots = pool.allocate(n), blocker_pool.allocate(n)
        blocker = engine.gather(reg, np.arange(n), blocker_pool, bslots)
        h = engine.gather(reg, np.arange(n), pool, slots)
        b = int(slots[0])
        pool.pin([b])
        try:
            pool.free([b])  # the caller's only holder of a pinned block; the transfer holds another
            user_freed = True
        except BlockStateError:
            user_freed = False
            still_pending = not h.done()
        h.wait(timeout=120)
        blocker.wait(timeout=120)
        pool.unpin([b])
        if not user_freed:
            if still_pending:  # refused while the transfer held the block: a consistent answer
                pool.free(slots)
                assert pool.free_blocks == n
                break
            pool.free(slots)  # the transfer had finished first: not the case under test; retry
            continue
        # The caller freed b; once the transfer is over and every other holder let go,
        # every block of the pool must be free again.
        pool.free(slots[1:])
        assert pool.refcount(b) == 0, f"block {b} still has {pool.refcount(b)} holder(s) after the transfer"
        assert pool.free_blocks == n
        break
    else:
        pytest.fail("could not pin and free a block while a transfer held it")
    engine.close()


@pytest.mark.parametrize("bad", [np.array([1.0, 2.0, 3.0, 4.0, 5.0]), [1, 2, 3.7, 4, 5],
                                 torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([True] * 5)])
def test_float_token_ids_are_refused_not_truncated(bad) -> None:
    """TieredCache.match/store and Trace.begin_step/end_step take integer ids only: 3.7 must not
    silently become 3 (a different context, hashed as if it were the caller's)."""
    layout = kvtier.KVLayout(num_layers=1, kv_heads=1, head_dim=4, block_tokens=2, dtype="float32")
    cache = kvtier.TieredCache(layout, "salt", device_bytes=8 * layout.block_bytes)
    with pytest.raises(InvalidArgumentError, match="token ids must be integers"):
        cache.match(bad)
    with pytest.raises(InvalidArgumentError, match="token ids must be integers"):
        cache.keys_for(bad)
    mgr = kvtier.TraceManager(cache, kvtier.CostModel(layout.block_bytes, 2, {}, 1e-3))
    tr = mgr.open("t")
    with pytest.raises(InvalidArgumentError, match="token ids must be integers"):
        tr.begin_step(bad, now=0.0)
    assert tr.state is kvtier.TraceState.READY  # refused: nothing changed
    plan = tr.begin_step([1, 2, 3, 4, 5], now=0.0)  # integer ids of any integer dtype are fine
    kv = torch.zeros(8, 1, 2, 2, 1, 4)  # blocks_first: [N, layers, 2, T, H, D]
    reg = kvtier.register_kv(kv, layout, "blocks_first")
    with pytest.raises(InvalidArgumentError, match="token ids must be integers"):
        tr.end_step(bad, reg, 5, now=0.0)
    assert tr.end_step(np.array([1, 2, 3, 4, 5], dtype=np.int32), reg, 5, now=0.0) == 3
    assert cache.match(torch.tensor([1, 2, 3, 4, 5])).hit_blocks == 2 and plan.hit_tokens == 0
    mgr.close()
    reg.close()
