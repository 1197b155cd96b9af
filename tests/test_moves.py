"""Moves between tiers (Note [Background moves] in kvtier/trace.py): one asynchronous machinery and
one timing rule for every policy; tool_start returns before its copy; a failed move leaves the
trace usable; nothing leaks."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier.harness import sim
from kvtier.cache import DEVICE, DRAM, NVME, TieredCache
from kvtier.harness.driver import PolicyRunner
from kvtier.keys import make_salt
from kvtier.policy import Action, CostModel, TraceAwarePolicy
from kvtier.trace import TraceManager

torch = pytest.importorskip("torch")

_LINKS = ("device->dram", "dram->device", "dram->nvme", "nvme->dram", "device->engine", "dram->engine")


def _cost(layout: kvtier.KVLayout, bw: float = 1e6) -> CostModel:
    return CostModel(layout.block_bytes, layout.block_tokens, {k: bw for k in _LINKS}, 1e-3)


def assert_no_leak(cache: TieredCache) -> None:
    """Every pool block is free or cached, every NVMe slot belongs to a key the index has there,
    and nothing is pinned or in flight."""
    cache.moves.drain()
    assert not cache.moves.pending and not cache.moves.pinned_keys()
    idx = cache.index
    for tier in (DEVICE, DRAM):
        if cache.has_tier(tier):
            pool = cache.pools[tier]
            assert pool.free_blocks + idx.count(tier) == pool.num_blocks, f"tier {tier} leaks blocks"
    if cache.has_tier(NVME):
        assert cache.nvme.stats()["used_slots"] == idx.count(NVME), "NVMe slots leak"
    for tier in (DEVICE, DRAM, NVME):
        n = idx.count(tier)
        assert idx.victims(tier, n + 1)[2] == n, f"blocks of tier {tier} still pinned"


# ------------------------------------------------------------------------------ one timing rule


def _sim_runner(policy: str) -> tuple[PolicyRunner, TieredCache, float]:
    """A runner on the modelled H100 server with an 8-block device tier; the trace-aware policy
    is told that any device use is pressure (so a long gap sends KV to DRAM)."""
    server = replace(sim.PRESETS["h100-llama3-8b"], pcie_gbps=1.0)  # slow enough to see
    layout = sim._layout(server, 64)
    backend = sim.ModelBackend(server, layout)
    bb = layout.block_bytes
    holder: dict[str, TieredCache] = {}

    def make_cache(p: str) -> TieredCache:
        c = TieredCache(layout, "sim", device_bytes=8 * bb, dram_bytes=64 * bb, nvme_dir="(modelled)",
                        nvme_bytes=256 * bb, backend=backend, load_chunk_blocks=1 << 20)
        backend.engine.mover = c.moves
        holder["c"] = c
        return c

    runner = PolicyRunner(policy, sim.ModelExecutor(server, backend, 1000), make_cache, sim._cost(server, layout),
                          trace_policy=TraceAwarePolicy(fill_keep=0.0, headroom=0.0))
    return runner, holder["c"], 8 * bb / (server.pcie_gbps * 1e9)


def test_equal_moves_cost_equal_time_under_every_policy() -> None:
    """Trace a fills the device (8 blocks); at t=1 trace b's step stores 8 blocks. Under tiered,
    its store evicts a's blocks to DRAM; under trace-aware, a's tool start at t=1 demotes the same
    blocks to DRAM in the background, and b's store needs that room. The same 8 blocks move over
    the same link at the same time: b's step is charged the same, the copy's modelled time (it
    used to be charged to tiered's step and free for trace-aware's)."""
    ctx_a, ctx_b = np.arange(8 * 64), 10_000 + np.arange(8 * 64)  # 8 full blocks each, no tail
    out = {}
    for policy in ("tiered", "trace-aware"):
        runner, cache, copy_s = _sim_runner(policy)
        runner.open("a")
        runner.run_step("a", 0, ctx_a, 1, now=0.0)
        assert cache.blocks_per_tier()["device"] == 8
        if policy == "trace-aware":
            runner.tool_start("a", 1.0, 600.0, "build")
            d = runner.traces.get("a").decision
            assert d.action is Action.DRAM, d
        runner.open("b")
        res = runner.run_step("b", 0, ctx_b, 1, now=1.0)
        cache.moves.drain()
        out[policy] = (res.service_s, cache.metrics.bytes_moved.get("device->dram", 0), cache.moves.lanes["out"].busy_s)
        assert cache.blocks_per_tier() == {"device": 8, "dram": 8, "nvme": 0}
        runner.close()
    (s_t, bytes_t, lane_t), (s_a, bytes_a, lane_a) = out["tiered"], out["trace-aware"]
    assert bytes_t == bytes_a > 0 and lane_t == pytest.approx(lane_a) == pytest.approx(copy_s)
    assert s_t == pytest.approx(s_a, rel=1e-9)
    compute = len(ctx_b) / sim.PRESETS["h100-llama3-8b"].prefill_tokens_per_s
    assert s_t >= compute + copy_s * 0.999  # the wait for the copy is in the step, for both


def test_a_move_done_before_the_step_costs_it_nothing_under_every_policy() -> None:
    """The same as above with b's step 10 s later: the copy finished long before, so neither
    policy's step waits (tiered's own eviction happens at b's store, so it still waits: what it
    decides, and when, is the only difference)."""
    ctx_a, ctx_b = np.arange(8 * 64), 10_000 + np.arange(8 * 64)
    server = sim.PRESETS["h100-llama3-8b"]
    compute = server.prefill_s(len(ctx_b), 0)  # linear work plus attention over its own tokens
    store = len(ctx_b) * server.kv_bytes_per_token / (server.hbm_gbps * 1e9)  # the step's own store, in HBM
    service = {}
    for policy in ("tiered", "trace-aware"):
        runner, cache, copy_s = _sim_runner(policy)
        runner.open("a")
        runner.run_step("a", 0, ctx_a, 1, now=0.0)
        runner.tool_start("a", 1.0, 600.0, "build")  # a no-op for tiered
        runner.open("b")
        service[policy] = runner.run_step("b", 0, ctx_b, 1, now=11.0).service_s
        runner.close()
    assert service["trace-aware"] == pytest.approx(compute + store, rel=1e-9)  # its move landed at 1.07 s
    assert service["tiered"] == pytest.approx(compute + store + copy_s, rel=1e-9)  # decided at the store


# ------------------------------------------------------------------------------ real moves


BIG = kvtier.KVLayout(num_layers=4, kv_heads=8, head_dim=128, block_tokens=16, dtype="float32")  # 512 KiB blocks


def _big_trace(tmp_path: Path, blocks: int, nvme: bool, engine_threads: int = 1):
    cache = TieredCache(BIG, make_salt("big", BIG), device_bytes=(blocks + 8) * BIG.block_bytes,
                        dram_bytes=(2 * blocks + 8) * BIG.block_bytes, engine=kvtier.CopyEngine(threads=engine_threads),
                        nvme_dir=str(tmp_path / "nvme") if nvme else None,
                        nvme_bytes=(2 * blocks + 8) * BIG.block_bytes if nvme else 0)
    policy = TraceAwarePolicy(fill_keep=0.0, dram_pressure=0.0 if nvme else 0.9, headroom=0.0)
    mgr = TraceManager(cache, _cost(BIG), policy=policy)
    t = mgr.open("t")
    ctx = np.arange(blocks * BIG.block_tokens + 1)
    kv = torch.randn(blocks + 2, 4, 2, 16, 8, 128, generator=torch.Generator().manual_seed(blocks))  # blocks_first
    reg = kvtier.register_kv(kv, BIG, "blocks_first")
    plan = t.begin_step(ctx, now=0.0)
    assert plan.hit_tokens == 0
    t.end_step(ctx, reg, len(ctx), now=0.0)
    return cache, mgr, t, ctx, kv


@pytest.mark.parametrize("nvme", [False, True])
def test_tool_start_returns_before_its_copy_completes(tmp_path: Path, nvme: bool) -> None:
    """tool_start submits the demotion and returns: right after it, the move is still in flight
    (a big batch on one copy thread, or a write with fdatasync), the blocks are still where they
    were, and nothing was waited on. Then the move lands and the KV comes back byte for byte."""
    for blocks in (32, 96, 192):
        cache, mgr, t, ctx, kv = _big_trace(tmp_path / str(blocks), blocks, nvme)
        waited0 = cache.moves.waited_wall_s
        t0 = time.perf_counter()
        d = t.tool_start(expected_gap_s=600.0, tool="build", now=1.0)
        returned_s = time.perf_counter() - t0
        assert d.action is (Action.NVME if nvme else Action.DRAM), d
        in_flight = [m for m in cache.moves.pending if not m.handle.done()]
        if not in_flight:  # the copy beat the check: try a bigger one
            mgr.close()
            cache.close()
            continue
        assert cache.moves.waited_wall_s == waited0  # tool_start waited on no handle
        where, pins = cache.locate(t.owned_keys())
        assert (where == DEVICE).all() and (pins >= 1).all()  # still on the device, held by the move
        cache.moves.drain()
        assert t.tiers()["nvme" if nvme else "dram"] == blocks + 1 and t.tiers()["device"] == 0
        t.tool_end(now=600.0)  # the restore starts: it takes its measured time on the lane
        plan = t.begin_step(np.concatenate([ctx, [7]]), now=600.0)
        if plan.match is None:  # late by its measured duration: come back then, as the driver does
            assert 0 < plan.wait_s < 30.0
            plan = t.begin_step(np.concatenate([ctx, [7]]), now=600.0 + plan.wait_s)
        assert plan.hit_tokens == len(ctx)
        out = torch.zeros_like(kv)
        reg = kvtier.register_kv(out, BIG, "blocks_first")
        cache.load(plan.match, reg, np.arange(plan.match.hit_blocks)).wait()
        assert torch.equal(out[:blocks], kv[:blocks])
        t.close()
        assert_no_leak(cache)
        assert returned_s < 5.0
        mgr.close()
        cache.close()
        return
    pytest.fail("could not catch a demotion in flight, even at 192 x 512 KiB on one copy thread")


@pytest.mark.parametrize("fault", ["copy engine", "nvme write", "nvme read"])
def test_a_failed_move_leaves_the_trace_usable(tmp_path: Path, fault: str) -> None:
    """Copy, then release: a demotion (or restore) that fails frees its target and leaves the
    source copy, so the trace's next step still finds all its KV; nothing leaks."""
    nvme = fault != "copy engine"
    cache, mgr, t, ctx, kv = _big_trace(tmp_path, 8, nvme, engine_threads=2)
    if fault == "copy engine":
        cache.engine.inject_faults(1)  # every batch fails
    elif fault == "nvme write":
        cache.nvme.inject_io_errors(1)
    d = t.tool_start(expected_gap_s=600.0, tool="build", now=1.0)
    cache.moves.drain()
    cache.engine.inject_faults(0)
    if fault == "copy engine":
        assert d.action is Action.DRAM and t.tiers()["device"] == 9  # stayed where it was
        assert cache.moves.stats["failed"] >= 1
    elif fault == "nvme write":
        assert t.tiers()["dram"] == 9 and cache.metrics.nvme_write_errors >= 1  # the write failed: DRAM keeps it
        cache.nvme.inject_io_errors(0)
    else:
        assert t.tiers()["nvme"] == 9
        cache.nvme.inject_io_errors(1)  # the restore's reads fail: those blocks are misses
    t.tool_end(now=600.0)
    plan = t.begin_step(np.concatenate([ctx, [7]]), now=700.0)  # long after the restore
    if cache.nvme is not None:
        cache.nvme.inject_io_errors(0)
    out = torch.zeros_like(kv)
    reg = kvtier.register_kv(out, BIG, "blocks_first")
    cache.load(plan.match, reg, np.arange(plan.match.hit_blocks)).wait()
    if fault == "nvme read":
        assert plan.match.hit_blocks == 0  # lost on the way back: recomputed, never wrong
    else:
        assert plan.hit_tokens == len(ctx) and torch.equal(out[:8], kv[:8])
    t.end_step(np.concatenate([ctx, [7]]), reg, len(ctx), now=600.0)
    t.close()
    assert_no_leak(cache)
    mgr.close()
    cache.close()


def test_a_restore_is_awaited_only_by_the_step_that_needs_it(tmp_path: Path) -> None:
    """Two parked traces restore at once, the small one first: its begin_step waits for its own
    restore and returns while the big one's is still in flight."""
    for big_n in (48, 160):
        cache = TieredCache(BIG, make_salt("big", BIG), device_bytes=(big_n + 16) * BIG.block_bytes,
                            dram_bytes=(big_n + 16) * BIG.block_bytes, engine=kvtier.CopyEngine(threads=1))
        mgr = TraceManager(cache, _cost(BIG), policy=TraceAwarePolicy(fill_keep=0.0, headroom=0.0))
        trs = {}
        for i, n in ((0, 2), (1, big_n)):
            t = mgr.open(f"t{i}")
            ctx = 1000 * (i + 1) + np.arange(n * BIG.block_tokens + 1)
            reg = kvtier.register_kv(torch.randn(n + 2, 4, 2, 16, 8, 128), BIG, "blocks_first")
            t.begin_step(ctx, now=0.0)
            t.end_step(ctx, reg, len(ctx), now=0.0)
            assert t.tool_start(expected_gap_s=600.0, now=0.0).action is Action.DRAM
            trs[i] = (t, ctx)
        cache.moves.drain()
        (small, small_ctx), (big, _) = trs[0], trs[1]
        small.tool_end(now=1.0)  # its restore is submitted first
        big.tool_end(now=1.0)
        big_moves = [m for m in cache.moves.touching(big.owned_keys()) if m.lane == "in"]
        assert big_moves
        plan = small.begin_step(np.concatenate([small_ctx, [5]]), now=1.0)
        if plan.match is None:  # late by its own restore's time, not the big one's
            assert 0 < plan.wait_s < 1.0
            plan = small.begin_step(np.concatenate([small_ctx, [5]]), now=1.0 + plan.wait_s)
        assert plan.hit_tokens == len(small_ctx)
        assert (cache.locate(small.owned_keys())[0] == DEVICE).all()  # its own restore landed first
        still = [m for m in big_moves if not m.handle.done()]
        mgr.close()
        cache.close()
        if still:
            return  # the big restore was still in flight when the small trace's step went ahead
    pytest.fail("the big restore always finished before the small step: nothing shown")


# ------------------------------------------------------------------------------ stale victims


class _HeldHandle:
    """A move's handle that a poll never sees done: only an explicit wait completes the move
    (the move finishing *during* another wait, made deterministic)."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def done(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def test_a_victim_moved_while_room_is_made_below_is_not_moved_or_dropped_again(tmp_path: Path) -> None:
    """Demoting a device victim makes room in DRAM first, and that can wait for a DRAM->NVMe move
    whose completion starts other work: here it moves the same victim down itself. The victim
    list from before the wait is stale then: moving or dropping the victim again freed its
    device block twice (`kvtier replay --generator coding-agent`, 2026-12-06)."""
    small = kvtier.KVLayout(num_layers=1, kv_heads=1, head_dim=64, block_tokens=16, dtype="float32")
    bb = small.block_bytes
    cache = TieredCache(small, make_salt("stale", small), device_bytes=4 * bb, dram_bytes=9 * bb,
                        engine=kvtier.CopyEngine(threads=1), nvme_dir=str(tmp_path / "nvme"), nvme_bytes=64 * bb)
    room = cache.tier_free_blocks(DRAM)  # DRAM less its staging reserve
    kv = torch.randn(8, 1, 2, 16, 1, 64, generator=torch.Generator().manual_seed(0))
    reg = kvtier.register_kv(kv, small, "blocks_first")
    rng = np.random.default_rng(0)

    def keys(n: int) -> np.ndarray:
        return rng.integers(1, 2**63, size=(n, 2), dtype=np.uint64)

    x = keys(room)  # fill DRAM exactly: stored on the device, then demoted
    for start in range(0, room, 4):
        assert cache.store_keys(x[start:start + 4], reg, np.arange(4)[: len(x[start:start + 4])]) > 0
        cache.demote_keys(x[start:start + 4], DRAM)
    a = keys(4)  # the device, full; a[0] is its least recently used block
    for i in range(4):
        assert cache.store_keys(a[i:i + 1], reg, [i]) == 1
    assert cache.tier_free_blocks(DEVICE) == 0 and cache.tier_free_blocks(DRAM) == 0
    # A DRAM->NVMe move in flight, whose completion moves a[0] down (as a policy's callback may)
    assert cache.demote_keys(x[:1], NVME, wait=False) == 1
    (m,) = cache.moves.leaving(DRAM)
    m.handle = _HeldHandle(m.handle)
    m.then.append(lambda mv: cache.demote_keys(a[:1], DRAM, wait=False))
    cache.make_room(DEVICE, 1)  # victim a[0]; room below waits for m, whose callback moves a[0]
    cache.moves.drain()
    # a[0] went down once (by the callback), not dropped; the rest stayed
    assert list(cache.locate(a)[0]) == [DRAM, DEVICE, DEVICE, DEVICE]
    assert cache.tier_free_blocks(DEVICE) == 1
    assert_no_leak(cache)
    # and every block reads back as stored
    out = torch.zeros_like(kv)
    dst = kvtier.register_kv(out, small, "blocks_first")
    m2 = cache.match_keys(a)
    assert m2.hit_blocks == 4
    cache.load(m2, dst, np.arange(4)).wait()
    cache.release(m2)
    assert torch.equal(out[:4], kv[:4])
