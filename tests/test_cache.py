"""TieredCache: prefix lookup, load, store, demotion down the tiers, pins, faults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier.cache import DEVICE, DRAM, NVME, TieredCache
from kvtier.keys import make_salt

torch = pytest.importorskip("torch")
L = kvtier.KVLayout(num_layers=2, kv_heads=2, head_dim=16, block_tokens=4, dtype="float32")
SALT = make_salt("tiny", L)


def kv_region(n: int = 64, seed: int = 0):
    kv = torch.randn(n, 2, 2, 4, 2, 16, generator=torch.Generator().manual_seed(seed))  # blocks_first
    return kv, kvtier.register_kv(kv, L, "blocks_first")


def make(tmp_path: Path | None, device: int, dram: int = 0, nvme: int = 0) -> TieredCache:
    return TieredCache(L, SALT, device_bytes=device * L.block_bytes, dram_bytes=dram * L.block_bytes,
                       nvme_dir=str(tmp_path / "nvme") if nvme else None, nvme_bytes=nvme * L.block_bytes)


def load_into_fresh(cache: TieredCache, tokens: np.ndarray):
    out = torch.zeros(64, 2, 2, 4, 2, 16)
    reg = kvtier.register_kv(out, L, "blocks_first")
    m = cache.match(tokens)
    cache.load(m, reg, np.arange(m.hit_blocks)).wait()
    cache.release(m)
    return m.hit_blocks, out


def test_longest_prefix_and_partial_tail(tmp_path: Path) -> None:
    cache = make(tmp_path, device=16)
    kv, reg = kv_region()
    toks = np.arange(30)  # 7 full blocks + 2 tokens
    assert cache.store(toks, reg, np.arange(7)) == 7
    assert cache.store(toks, reg, np.arange(7)) == 0  # already cached
    other = toks.copy()
    other[13] = 999  # diverges inside block 3
    assert cache.match(other).hit_blocks == 3
    hit, out = load_into_fresh(cache, toks)
    assert hit == 7 and torch.equal(out[:7], kv[:7])


def test_demotion_through_every_tier_and_back(tmp_path: Path) -> None:
    cache = make(tmp_path, device=4, dram=8, nvme=64)
    kv, reg = kv_region()
    toks = np.arange(4 * 20)
    cache.store(toks, reg, np.arange(20))
    tiers = cache.blocks_per_tier()
    assert tiers["device"] == 4 and tiers["nvme"] > 0 and sum(tiers.values()) == 20
    m = cache.match(toks)
    assert set(m.tiers.tolist()) == {DEVICE, DRAM, NVME}
    # tail-first eviction: the prefix head is the most recent, so it stays in the fastest tier
    assert m.tiers[0] <= m.tiers[-1]
    cache.release(m)
    hit, out = load_into_fresh(cache, toks)
    assert hit == 20 and torch.equal(out[:20], kv[:20])
    s = cache.metrics.snapshot()
    assert s["bytes_moved"]["dram->nvme"] > 0 and s["bytes_moved"]["nvme->dram"] > 0
    assert s["prefill_tokens_saved"] == 80


def test_device_only_drops_what_does_not_fit(tmp_path: Path) -> None:
    cache = make(tmp_path, device=4)
    _, reg = kv_region()
    cache.store(np.arange(40), reg, np.arange(10))
    assert cache.blocks_per_tier()["device"] == 4
    assert cache.metrics.dropped_blocks == 6
    # the tail was dropped, the head kept: the first 4 blocks still match
    assert cache.match(np.arange(40)).hit_blocks == 4


def test_pinned_prefix_is_never_evicted(tmp_path: Path) -> None:
    cache = make(tmp_path, device=4)
    _, reg = kv_region()
    a = np.arange(8)
    cache.store(a, reg, np.arange(2))
    m = cache.match(a)
    assert m.hit_blocks == 2
    cache.store(np.arange(100, 116), reg, np.arange(10, 14))  # needs all 4 device blocks
    assert cache.index.contains(m.keys).tolist() == [1, 1]  # pinned: kept
    cache.release(m)
    cache.store(np.arange(200, 216), reg, np.arange(20, 24))
    assert cache.index.contains(m.keys).tolist() == [0, 0]  # released: evictable


def test_corrupt_nvme_block_shortens_the_prefix(tmp_path: Path) -> None:
    cache = make(tmp_path, device=2, dram=4, nvme=64)
    kv, reg = kv_region()
    toks = np.arange(40)
    cache.store(toks, reg, np.arange(10))
    m = cache.match(toks)
    nvme_pos = np.flatnonzero(m.tiers == NVME)
    cache.release(m)
    assert len(nvme_pos) > 0
    victim = int(nvme_pos[-1])
    # the block vanished from NVMe behind the cache's back (as after a failed checksum)
    assert cache.nvme.evict(m.keys[victim:victim + 1]) == 1
    hit, out = load_into_fresh(cache, toks)
    assert hit == victim
    assert torch.equal(out[:hit], kv[:hit])
    assert cache.metrics.misses >= 1


def test_bad_configuration(tmp_path: Path) -> None:
    with pytest.raises(kvtier.InvalidArgumentError, match="smaller than one block"):
        TieredCache(L, SALT, device_bytes=10)
    with pytest.raises(kvtier.InvalidArgumentError, match="both nvme_dir and nvme_bytes"):
        TieredCache(L, SALT, device_bytes=L.block_bytes, dram_bytes=4 * L.block_bytes, nvme_dir=str(tmp_path))
    with pytest.raises(kvtier.InvalidArgumentError, match="stages through DRAM"):
        TieredCache(L, SALT, device_bytes=L.block_bytes, nvme_dir=str(tmp_path), nvme_bytes=L.block_bytes * 4)
    cache = make(tmp_path, device=4)
    _, reg = kv_region()
    with pytest.raises(kvtier.InvalidArgumentError, match="token id"):
        cache.store(np.array([1, 2, -5, 4]), reg, [0])


def test_prometheus_export(tmp_path: Path) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from kvtier.metrics import register_cache

    cache = make(tmp_path, device=4, dram=8)
    _, reg = kv_region()
    cache.store(np.arange(40), reg, np.arange(10))
    load_into_fresh(cache, np.arange(40))
    registry = prometheus_client.CollectorRegistry()
    register_cache(cache, registry, name="t")
    text = prometheus_client.generate_latest(registry).decode()
    assert 'kvtier_cache_hits_total{cache="t",tier="device"}' in text
    assert 'kvtier_cache_bytes_moved_total{cache="t",dst="dram",src="device"}' in text
    assert 'kvtier_cache_blocks{cache="t",tier="dram"}' in text
    hits = registry.get_sample_value("kvtier_cache_hits_total", {"cache": "t", "tier": "dram"})
    assert hits == cache.metrics.snapshot()["hits"]["dram"] > 0


def test_load_lets_compute_start_on_the_first_blocks(tmp_path: Path) -> None:
    cache = TieredCache(L, SALT, device_bytes=32 * L.block_bytes, load_chunk_blocks=2)
    kv, reg = kv_region()
    toks = np.arange(4 * 12)
    cache.store(toks, reg, np.arange(12))
    out = torch.zeros(64, 2, 2, 4, 2, 16)
    dst = kvtier.register_kv(out, L, "blocks_first")
    m = cache.match(toks)
    h = cache.load(m, dst, np.arange(m.hit_blocks))
    assert h.total_blocks == 12 and len(h._chunks) == 6
    h.wait_blocks(2)
    assert torch.equal(out[:2], kv[:2])  # the first chunk is in place
    h.wait()
    assert torch.equal(out[:12], kv[:12])
    cache.release(m)
    assert cache.metrics.snapshot()["bytes_moved"]["device->engine"] == 12 * L.block_bytes
