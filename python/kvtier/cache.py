"""TieredCache: a prefix cache across tiers (device, DRAM, NVMe), found by content.

Blocks are keyed by chained hashes of their tokens (``kvtier.keys``), live in exactly one tier at
a time (Note [Exclusive tiers] in csrc/index/block_index.h), and move through the copy engine
and the NVMe tier in batches. The policy decisions below are made per batch; the per-block work
(hashing, index lookups, LRU order, copies, I/O) is in C++.

Tiers, fastest first:
  device  the inference engine's own memory for cached blocks. Here a pool of the engine's
          device type; on a CPU-only machine it is host memory standing in for HBM.
  dram    a pinned (when a GPU exists) host pool.
  nvme    a :class:`~kvtier.NvmeTier` on a directory.

A tier that declines a block (full) demotes its least recently used unpinned blocks to the next
tier (copy, then release); the last tier drops them (they will be recomputed). Every move between
tiers, whichever policy asks for it, goes through ``cache.moves`` (a :class:`~kvtier.moves.MoveQueue`):
submitted to the copy engine or the NVMe tier, completed on its handle, and timed the same way
(Note [Background moves] in kvtier/trace.py).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier import _core
from kvtier import errors as kvtier_errors
from kvtier.errors import InvalidArgumentError, OutOfCapacityError
from kvtier.keys import as_token_ids, hash_blocks
from kvtier.layout import KVLayout
from kvtier.memory import HostPool, KVRegistration, as_block_ids
from kvtier.moves import Move, MoveQueue
from kvtier.nvme import NvmeTier
from kvtier.nvme import as_block_keys as _as_keys
from kvtier.transfer import CopyEngine, TransferHandle

DEVICE, DRAM, NVME = 0, 1, 2
REMOTE = 3  # in a PrefixMatch's tiers: held by another worker (a ClusterWorker is attached)
TIER_NAMES = ("device", "dram", "nvme")
_REMOTE_COUNTERS = ("lookups", "found", "hits", "misses", "validation_failures", "checksum_failures",
                    "generation_failures", "transfer_failures", "no_room", "store_unavailable", "bytes")


def _locked(fn: Any) -> Any:
    """Run a public cache method under the cache's lock (a ClusterWorker's service thread adds
    pulled blocks to the DRAM tier from another thread)."""
    @functools.wraps(fn)
    def wrapper(self: TieredCache, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            out = fn(self, *args, **kwargs)
            if self.cluster is not None:
                self.cluster.flush()  # publish/free what moved in or out of DRAM (batched; no-op if nothing did)
            return out
    return wrapper


@dataclass
class CacheMetrics:
    """What the cache did. Counters only grow; ``snapshot()`` gives a plain dict."""

    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # blocks found, by tier
    misses: int = 0  # full blocks looked up and not found
    lookups: int = 0
    stored_blocks: int = 0
    dropped_blocks: int = 0  # evicted from the last tier (or refused by a full/failing one)
    declined_blocks: int = 0  # not stored: the device tier (and DRAM below it) was full of pinned blocks
    stored_below_blocks: int = 0  # stored straight into DRAM: the device tier was full of pinned blocks
    nvme_write_errors: int = 0
    bytes_moved: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # "a->b": bytes
    prefill_tokens_saved: int = 0
    transfer_latency_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # the remote tier (a ClusterWorker attached): blocks found by the store lookup, pulled and
    # checked (hits), failed a check (misses), bytes pulled, store round-trip seconds
    remote: dict[str, float] = field(default_factory=lambda: defaultdict(int))

    def record_transfer(self, src: str, dst: str, nbytes: int, latency_s: float) -> None:
        self.bytes_moved[f"{src}->{dst}"] += nbytes
        lat = self.transfer_latency_s[f"{src}->{dst}"]
        if len(lat) < 100_000:  # bounded
            lat.append(latency_s)

    def snapshot(self) -> dict[str, Any]:
        lat = {k: {"count": len(v), "p50_ms": float(np.median(v)) * 1e3 if v else 0.0,
                   "p99_ms": float(np.percentile(v, 99)) * 1e3 if v else 0.0}
               for k, v in self.transfer_latency_s.items()}
        return {"hits": {t: self.hits.get(t, 0) for t in TIER_NAMES}, "misses": self.misses,
                "lookups": self.lookups, "stored_blocks": self.stored_blocks,
                "dropped_blocks": self.dropped_blocks, "declined_blocks": self.declined_blocks,
                "stored_below_blocks": self.stored_below_blocks,
                "nvme_write_errors": self.nvme_write_errors, "bytes_moved": dict(self.bytes_moved),
                "prefill_tokens_saved": self.prefill_tokens_saved, "transfer_latency": lat,
                "remote": {**{k: self.remote.get(k, 0) for k in _REMOTE_COUNTERS},
                           "store_rtt_s": float(self.remote.get("store_rtt_s", 0.0))}}


@dataclass
class PrefixMatch:
    """The longest cached prefix of a token sequence; its blocks are pinned until released."""

    keys: np.ndarray  # [n_full_blocks, 2] keys of every full block of the sequence
    hit_blocks: int  # leading blocks found
    tiers: np.ndarray  # [hit_blocks] tier of each hit block at match time
    block_tokens: int
    pinned: int = 0  # leading keys this match holds pinned (released by TieredCache.release)
    remote: Any = None  # the blocks after the local ones that other workers hold (RemoteMatch), if any

    @property
    def hit_tokens(self) -> int:
        return self.hit_blocks * self.block_tokens


class LoadHandle:
    """A prefix being loaded in chunks: compute may start once the first blocks have arrived."""

    def __init__(self, chunks: list[tuple[int, TransferHandle]], total_blocks: int,
                 on_done: Any = None) -> None:
        self._chunks = chunks  # (blocks in place once this chunk and all before it are done, handle)
        self.total_blocks = total_blocks
        self._on_done = on_done

    def wait_blocks(self, n: int, timeout: float | None = None) -> None:
        """Wait until at least the first ``n`` blocks are in place."""
        for upto, h in self._chunks:
            h.wait(timeout)
            if upto >= n:
                break
        if n >= self.total_blocks and self._on_done is not None:
            done, self._on_done = self._on_done, None
            done()

    def wait(self, timeout: float | None = None) -> None:
        self.wait_blocks(self.total_blocks, timeout)


class TieredCache:
    """Prefix cache over device, DRAM and NVMe tiers.

    Args:
        layout: the model's KV layout (block size, dtype).
        salt: names the model/layout/adapter (``kvtier.keys.make_salt``); part of every key.
        device_bytes: capacity of the device tier (must hold at least one block).
        dram_bytes: capacity of the DRAM tier (0: no DRAM tier).
        nvme_dir / nvme_bytes: the NVMe tier (both, or neither).
        engine: the copy engine (default: a new one).
        load_chunk_blocks: blocks per load transfer (the granularity ``LoadHandle`` waits on).
        backend: where the tiers' memory comes from. ``None``: real pools, copy engine and NVMe
            tier. ``kvtier.harness.sim`` passes a modelled one (no bytes move; transfers take modelled
            time), so the simulator runs this class's placement code unchanged.
    """

    def __init__(self, layout: KVLayout, salt: str, *, device_bytes: int, dram_bytes: int = 0,
                 nvme_dir: str | None = None, nvme_bytes: int = 0, engine: CopyEngine | None = None,
                 load_chunk_blocks: int = 8, backend: Any = None) -> None:
        if not isinstance(layout, KVLayout):
            raise InvalidArgumentError(f"layout must be a kvtier.KVLayout, got {type(layout).__name__}")
        for name, value in (("device_bytes", device_bytes), ("dram_bytes", dram_bytes), ("nvme_bytes", nvme_bytes)):
            if value < 0:
                raise InvalidArgumentError(f"{name} must be >= 0, got {value}")
        if device_bytes < layout.block_bytes:
            raise InvalidArgumentError(
                f"device_bytes={device_bytes} is smaller than one block ({layout.block_bytes} bytes)")
        if 0 < dram_bytes < layout.block_bytes:
            raise InvalidArgumentError(f"dram_bytes={dram_bytes} is smaller than one block ({layout.block_bytes} bytes)")
        if (nvme_dir is None) != (nvme_bytes == 0):
            raise InvalidArgumentError("give both nvme_dir and nvme_bytes, or neither")
        if nvme_dir is not None and dram_bytes == 0:
            raise InvalidArgumentError("the NVMe tier stages through DRAM: give dram_bytes too")
        self.layout = layout
        self.salt = salt
        self.block_tokens = layout.block_tokens
        if backend is None:
            self.engine = engine or CopyEngine()
            make_pool = lambda capacity, tier: HostPool(layout, capacity_bytes=capacity)
            make_nvme = lambda d, pool, capacity: NvmeTier(d, pool, capacity_bytes=capacity)
        else:
            self.engine, make_pool, make_nvme = backend.engine, backend.make_pool, backend.make_nvme
        self.index = _core.BlockIndex()
        self.pools: list[Any] = [make_pool(device_bytes, DEVICE), None]
        if dram_bytes:
            self.pools[DRAM] = make_pool(dram_bytes, DRAM)
        self.nvme: NvmeTier | None = None
        # DRAM blocks never filled with cached data: staging for NVMe reads always has room,
        # even when every cached DRAM block is pinned by running steps.
        self.staging_reserve = 0
        if nvme_dir is not None:
            if self.pools[DRAM].num_blocks < 2:
                raise InvalidArgumentError("with an NVMe tier, dram_bytes must hold at least 2 blocks")
            self.staging_reserve = max(1, self.pools[DRAM].num_blocks // 8)
            # The NVMe tier's staging blocks come from the DRAM pool itself.
            self.nvme = make_nvme(nvme_dir, self.pools[DRAM], nvme_bytes)
        self.load_chunk_blocks = max(1, int(load_chunk_blocks))
        self.metrics = CacheMetrics()
        # Keys owned by at least this many traces are evicted after all others (0: plain LRU).
        # kvtier.trace sets it to 2 so that prefixes shared by several traces stay hot.
        self.shared_refs = 0
        self.moves = MoveQueue(self)  # every move between tiers (Note [Background moves] in kvtier/trace.py)
        self._lock = threading.RLock()
        self.cluster: Any = None  # a kvtier.cluster.worker.ClusterWorker: the remote tier

    # ------------------------------------------------------------------ remote tier

    def attach_cluster(self, worker: Any) -> None:
        """Serve this cache's DRAM tier to a cluster and continue local misses remotely (called
        by :class:`kvtier.cluster.worker.ClusterWorker`): the index and the DRAM pool report
        blocks landing in and leaving DRAM to the worker, which keeps the store's directory in
        step. Attach before the cache fills (blocks already in DRAM are not published)."""
        from kvtier.cluster.worker import _HookedIndex

        with self._lock:
            if self.cluster is not None:
                raise InvalidArgumentError("this cache already has a ClusterWorker attached")
            if self.pools[DRAM] is None:
                raise InvalidArgumentError("the remote tier serves the DRAM tier: give dram_bytes > 0")
            self._plain = (self.index, self.pools[DRAM])
            self.index = _HookedIndex(self.index, worker)
            self.pools[DRAM] = worker.pool
            self.cluster = worker

    def detach_cluster(self, worker: Any) -> None:
        with self._lock:
            if self.cluster is worker:
                self.index, self.pools[DRAM] = self._plain
                self.cluster = None

    # ------------------------------------------------------------------ lookup

    def keys_for(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        return hash_blocks(as_token_ids(tokens), self.block_tokens, self.salt)

    def match(self, tokens: Sequence[int] | np.ndarray, max_blocks: int | None = None) -> PrefixMatch:
        """Longest cached prefix of ``tokens`` (full blocks only), pinned until :meth:`release`."""
        return self.match_keys(self.keys_for(tokens), max_blocks)

    @_locked
    def match_keys(self, keys: np.ndarray, max_blocks: int | None = None) -> PrefixMatch:
        """Longest cached prefix of a sequence of block keys, pinned until :meth:`release`.

        The keys need not all be content keys: a trace appends the private key of its partial
        tail block (``kvtier.trace``). With a cluster attached, a prefix that misses locally
        continues with ONE store lookup of the rest: blocks other workers hold come after the
        local ones (``tiers`` == ``REMOTE``, ``match.remote``), counted in ``hit_blocks``;
        :meth:`load` pulls and checks them (a block failing a check ends the prefix there)."""
        keys = _as_keys(keys)
        self.moves.poll()
        probe = keys if max_blocks is None else keys[:max_blocks]
        n, tiers, _ = self.index.match_prefix(probe)
        if n:
            self.index.pin(probe[:n])
        self.metrics.lookups += 1
        for t in range(3):
            self.metrics.hits[TIER_NAMES[t]] += int((tiers[:n] == t).sum())
        remote = None
        if self.cluster is not None and n < len(probe):
            remote = self.cluster.lookup_remote(probe[n:])
            if remote is not None and len(remote) == 0:
                remote = None
        m = len(remote) if remote is not None else 0
        self.metrics.remote["found"] += m
        self.metrics.misses += len(probe) - n - m
        out_tiers = tiers[:n].copy()
        if m:
            out_tiers = np.concatenate([out_tiers, np.full(m, REMOTE, dtype=out_tiers.dtype)])
        return PrefixMatch(keys, n + m, out_tiers, self.block_tokens, pinned=n, remote=remote)

    @_locked
    def release(self, match: PrefixMatch) -> None:
        if match.pinned:
            self.index.unpin(match.keys[: match.pinned])
            match.pinned = 0

    # ------------------------------------------------------------------ load (promotion)

    def _load_remote(self, match: PrefixMatch) -> None:
        """Pull ``match.remote`` into DRAM, check each block (checksum of the bytes, generation in
        the store), add the good ones to the DRAM tier (pinned for this match), and cut the
        prefix at the first block that failed or did not fit: the caller recomputes from there."""
        rm, match.remote = match.remote, None
        local = match.pinned
        m = len(rm)
        met = self.metrics.remote
        try:
            slots = self._allocate(DRAM, m, staging=True)
        except OutOfCapacityError:
            slots = None
        if slots is None:
            met["no_room"] += m
            met["misses"] += m
            self.metrics.misses += m
            match.hit_blocks = local
            match.tiers = match.tiers[:local]
            return
        out = self.cluster.pull(rm, slots)
        ok = out.ok
        met["bytes"] += out.bytes
        met["store_rtt_s"] += out.store_rtt_s
        met["transfer_failures"] += out.transfer_failed
        met["checksum_failures"] += out.checksum_failed
        met["generation_failures"] += out.validation_failed
        met["validation_failures"] += out.checksum_failed + out.validation_failed
        good = ok & (self.index.contains(rm.keys) == 0)  # a key the cache got meanwhile: keep that copy
        if good.any():
            self.index.insert(rm.keys[good], DRAM, slots[good])
        if (~good).any():
            self.pools[DRAM].free(slots[~good])
        usable = m if ok.all() else int(np.argmin(ok))
        met["hits"] += usable
        met["misses"] += m - usable
        self.metrics.misses += m - usable  # found in the store, not usable: a miss after all
        if usable:
            self.index.pin(rm.keys[:usable])
            self.metrics.record_transfer("remote", "dram", usable * self.layout.block_bytes, out.seconds)
        match.hit_blocks = match.pinned = local + usable
        match.tiers = np.concatenate([match.tiers[:local], np.full(usable, DRAM, dtype=match.tiers.dtype)])

    @_locked
    def load(self, match: PrefixMatch, dst: KVRegistration, dst_blocks: Any, promote_min_refs: int = 0) -> LoadHandle:
        """Copy the matched prefix into ``dst`` blocks ``dst_blocks[i]`` (one per hit block).

        Device and DRAM blocks are copied straight into ``dst`` in chunks of ``load_chunk_blocks``;
        the returned handle is not waited on, so the caller may start on the first blocks
        (``wait_blocks(n)``) while the rest arrive, and must ``wait()`` before using all of them.
        NVMe blocks are read
        into DRAM staging blocks first. Hit blocks are then promoted one tier up where room can
        be made without evicting pinned blocks. A block that is missing or fails its checksum on
        the way back ends the prefix there: ``match.hit_blocks`` (and the handle's
        ``total_blocks``) shrink to what was loaded, and the caller recomputes the rest.
        With ``promote_min_refs`` > 0 only DRAM hits owned by that many traces are promoted (the
        trace-aware policy moves each trace's private blocks itself, around its tool gaps).
        """
        dst_ids = as_block_ids(dst_blocks, "destination blocks")
        if len(dst_ids) < match.hit_blocks:
            raise InvalidArgumentError(f"{match.hit_blocks} matched blocks but {len(dst_ids)} destination blocks")
        if match.remote is not None:
            if self.cluster is None:
                raise InvalidArgumentError("the match has remote blocks but no ClusterWorker is attached")
            self._load_remote(match)
        n = match.hit_blocks
        if n == 0:
            return LoadHandle([], 0)
        t0 = time.perf_counter()
        self.moves.poll()
        on_nvme_now = self.locate(match.keys[:n])[0] == NVME
        if on_nvme_now.any():  # a restore of these blocks from NVMe in flight: it lands first
            self.moves.wait_keys(match.keys[:n][on_nvme_now])
        _, tiers, blocks = self.index.match_prefix(match.keys[:n])
        tiers, blocks = tiers[:n].copy(), blocks[:n].copy()
        on_nvme = np.flatnonzero(tiers == NVME)
        if len(on_nvme):
            n = self._load_from_nvme(match, on_nvme, dst, dst_ids)
            tiers, blocks = tiers[:n], blocks[:n]
        chunks: list[tuple[int, TransferHandle]] = []
        for tier in (DEVICE, DRAM):
            pos = np.flatnonzero(tiers == tier)
            for start in range(0, len(pos), self.load_chunk_blocks):
                p = pos[start:start + self.load_chunk_blocks]
                h = self.engine.transfer(self.pools[tier], blocks[p], dst, dst_ids[p])
                chunks.append((int(p[-1]) + 1, h))
        chunks.sort(key=lambda c: c[0])

        def record() -> None:
            for tier in (DEVICE, DRAM):
                moved = int((tiers == tier).sum()) * self.layout.block_bytes
                if moved:
                    self.metrics.record_transfer(TIER_NAMES[tier], "engine", moved, time.perf_counter() - t0)

        handle = LoadHandle(chunks, n, record)
        self.metrics.prefill_tokens_saved += n * self.block_tokens
        # Promotion (a background move) reads the same DRAM blocks the load is reading; the copy
        # engine's leases keep each block alive until every transfer that reads it is done.
        promote = tiers
        if promote_min_refs > 0:  # a trace policy places private blocks itself: promote shared ones only
            promote = np.where(self.index.refs(match.keys[:n]) >= promote_min_refs, tiers, 255)
        up = match.keys[:n][promote == DRAM]
        up = up[~self.moves.moving(up)]
        if len(up):
            self._move_up(up, DRAM, DEVICE)
        return handle

    def _load_from_nvme(self, match: PrefixMatch, on_nvme: np.ndarray, dst: KVRegistration,
                        dst_ids: np.ndarray) -> int:
        """Read the prefix's NVMe blocks through DRAM staging into ``dst``; returns the number of
        leading blocks still usable (all, unless one was missing or corrupt)."""
        keys = match.keys[: match.hit_blocks]
        dram = self.pools[DRAM]
        step = self.staging_reserve
        usable = match.hit_blocks
        released = np.zeros(match.hit_blocks, dtype=bool)  # this match's pin already dropped
        for start in range(0, len(on_nvme), step):
            pos = on_nvme[start:start + step]
            pos = pos[pos < usable]
            if len(pos) == 0:
                break
            k = keys[pos]
            try:
                staging = self._allocate(DRAM, len(pos), staging=True)
            except OutOfCapacityError:
                usable = int(pos[0])  # no staging room: recompute from here
                break
            h = self.nvme.read(k, staging)
            h.wait()
            ok = h.block_ok
            self.metrics.record_transfer("nvme", "dram", int(ok.sum()) * self.layout.block_bytes, h.latency_s)
            if not ok.all():  # missing, corrupt or unreadable: a miss from the first bad block on
                usable = int(pos[np.argmin(ok)])
                self.metrics.hits["nvme"] -= int((~ok).sum())
                self.metrics.misses += int((~ok).sum())
                self._forget_lost(k[~ok])
                released[pos[~ok]] = True
            good = ok & (pos < usable)
            if good.any():
                self.engine.transfer(dram, staging[good], dst, dst_ids[pos[good]]).wait()
                self.metrics.record_transfer("dram", "engine", int(good.sum()) * self.layout.block_bytes, 0.0)
            # Promote to DRAM only into blocks that were free anyway; otherwise stay on NVMe.
            keep = good & (np.cumsum(good) <= max(0, dram.free_blocks + len(pos) - 2 * self.staging_reserve))
            if keep.any():
                self.nvme.evict(k[keep])
                self.index.relocate(k[keep], DRAM, staging[keep])
            dram.free(staging[~keep])
        if usable < match.hit_blocks:
            # Unpin the rest once: a lost key another match still pins stays in the index, and a
            # second unpin here would take that match's pin.
            self.index.unpin(keys[usable:][~released[usable:]])
            match.hit_blocks = match.pinned = usable
        return usable

    def _move_up(self, keys: np.ndarray, src: int, top: int, at: float | None = None) -> None:
        """In the background: move ``keys`` (cached at tier ``src``, not moving) one tier up, and on
        to ``top``, head first, as far as room can be made without evicting pinned blocks. Room is
        made by background demotions; the keys stay pinned until it is there."""
        dst = src - 1
        if len(keys) == 0 or dst < top:
            return
        keys = keys[self.index.locate(keys)[0] == src]
        if len(keys) == 0:
            return

        def go(at: float) -> None:
            where, blocks, _ = self.index.locate(keys)
            sel = (where == src) & ~self.moves.moving(keys)
            room = max(0, self._free_blocks(dst))
            k, b = keys[sel][:room], blocks[sel][:room]
            if len(k) == 0:
                return
            at = max(at, self.moves.room_ready_at(dst, len(k), room, at))  # starts once its room exists
            m = self.moves.submit(k, src, b, dst, self.pools[dst].allocate(len(k)), at=at)
            if m is not None and dst > top:
                m.then.append(lambda mv: self._move_up(mv.keys[mv.ok], dst, top, at=mv.done_at))

        self.index.pin(keys)  # making room below must not push these out
        try:
            _, making = self._make_room(dst, len(keys), wait=False)
            self.moves.after(making, keys, go, at=at)
        finally:
            self.index.unpin(keys)

    # ------------------------------------------------------------------ store

    def store(self, tokens: Sequence[int] | np.ndarray, src: KVRegistration, src_blocks: Any,
              first_block: int = 0) -> int:
        """Cache full blocks ``first_block..`` of ``tokens`` from ``src`` blocks ``src_blocks``.

        ``src_blocks[i]`` holds block ``first_block + i`` of the sequence. Blocks already cached
        are skipped. Returns how many blocks were stored.
        """
        return self.store_keys(self.keys_for(tokens)[first_block:], src, src_blocks)

    @_locked
    def store_keys(self, keys: np.ndarray, src: KVRegistration, src_blocks: Any) -> int:
        """Cache ``src`` blocks ``src_blocks[i]`` under ``keys[i]`` (extra keys or blocks are
        ignored; keys already cached are skipped). Returns how many blocks were stored."""
        keys = _as_keys(keys)
        self.moves.poll()
        ids = as_block_ids(src_blocks, "source blocks")
        if len(ids) < len(keys):
            keys = keys[: len(ids)]
        ids = ids[: len(keys)]
        if len(keys) == 0:
            return 0
        new = self.index.contains(keys) == 0
        if not new.any():
            return 0
        keys, ids = keys[new], ids[new]
        # In chunks of at most half the device tier, so a long sequence streams down the tiers;
        # tail chunk first, so the head ends most recent (Note [Tail-first eviction]).
        step = max(1, self.pools[DEVICE].num_blocks // 2)
        for start in reversed(range(0, len(keys), step)):
            k, i = keys[start:start + step], ids[start:start + step]
            tier = DEVICE
            try:
                dst_ids = self._allocate(DEVICE, len(k), now_only=True)
            except OutOfCapacityError:
                # The device tier is pinned full: store one tier down when there is one, else skip.
                try:
                    if self.pools[DRAM] is None:
                        raise
                    tier, dst_ids = DRAM, self._allocate(DRAM, len(k), now_only=True)
                    self.metrics.stored_below_blocks += len(k)
                except OutOfCapacityError:
                    self.metrics.declined_blocks += len(k)
                    continue
            h = self.engine.transfer(src, i, self.pools[tier], dst_ids)
            h.wait()
            self.metrics.record_transfer("engine", TIER_NAMES[tier], h.bytes, h.latency_s)
            self.index.insert(k, tier, dst_ids)
        stored = int(self.index.contains(keys).sum())  # those of the new keys that made it in
        self.metrics.stored_blocks += stored
        return stored

    # ------------------------------------------------------------------ capacity and demotion

    def _free_blocks(self, tier: int, staging: bool = False) -> int:
        reserve = 0 if staging or tier != DRAM else self.staging_reserve
        return self.pools[tier].free_blocks - reserve

    def _allocate(self, tier: int, n: int, staging: bool = False, now_only: bool = False) -> np.ndarray:
        """``n`` blocks of ``tier``, demoting its LRU blocks to make room; OutOfCapacityError when
        the tier is too full of pinned blocks (the caller then declines to cache). ``now_only`` (a
        step's store): room that exists only at a later virtual time (freed by a move issued then)
        counts as no room, so the store goes a tier down instead of waiting for the future."""
        short = n - self._free_blocks(tier, staging)
        if short > 0 and self.moves.leaving(tier):
            self.moves.wait(self.moves.leaving(tier))  # background demotions already freeing room
            short = n - self._free_blocks(tier, staging)
        # Room that a move frees only at a later virtual time is not room yet: make it now from the
        # LRU where there is some (an ordinary eviction), so that a store waits (charge_room below)
        # only for room nothing else can give, under every policy alike.
        short = max(short, n - self._free_blocks(tier, staging) + self.moves.future_room(tier))
        if short > 0:
            self._demote(tier, short, wait=True)
        if now_only and self._free_blocks(tier, staging) - self.moves.future_room(tier) < n:
            raise OutOfCapacityError(f"the {TIER_NAMES[tier]} tier's free room for {n} blocks exists only later")
        if self._free_blocks(tier, staging) < n:
            raise OutOfCapacityError(
                f"the {TIER_NAMES[tier]} tier has {max(0, self._free_blocks(tier, staging))} free blocks and the "
                f"rest are pinned by running steps: {n} needed")
        self.moves.charge_room(tier, n, self._free_blocks(tier, staging))  # room a move made exists once it lands
        return self.pools[tier].allocate(n)

    def _make_room(self, tier: int, n: int, wait: bool = True) -> tuple[int, list[Move]]:
        """Try to have ``n`` free blocks in ``tier`` by demoting its LRU blocks. With ``wait`` the
        demotions (and any already leaving the tier) complete first and the free count is final;
        without, they run in the background: returns (free now, the moves that will free more)."""
        if tier > NVME or (tier == DRAM and self.pools[DRAM] is None) or (tier == NVME and self.nvme is None):
            return 0, []
        if tier == NVME:
            free = self.tier_free_blocks(NVME)
            if free < n:
                keys, _, found = self.index.victims(NVME, n - free)
                self.nvme.evict(keys)
                self.index.remove(keys)
                self.metrics.dropped_blocks += found
                free += found
            return free, []
        leaving = self.moves.leaving(tier)
        if wait:
            if leaving and self._free_blocks(tier) < n:
                self.moves.wait(leaving)  # background demotions already freeing room: a step needs it now
            short = n - self._free_blocks(tier)
            if short > 0:
                self._demote(tier, short, wait=True)
            return max(0, self._free_blocks(tier)), []
        short = n - self._free_blocks(tier) - sum(len(m.keys) for m in leaving)
        new = self._demote(tier, short, wait=False) if short > 0 else []
        return max(0, self._free_blocks(tier)), leaving + new

    def _demote(self, tier: int, n: int, wait: bool = True) -> list[Move]:
        """Free up to ``n`` blocks of ``tier`` by moving its LRU unpinned blocks one tier down;
        what the tier below cannot take is dropped (recomputed later). Copy, then release."""
        keys, blocks, found = self.index.victims(tier, n, self.shared_refs)
        if found == 0:
            return []
        return self._move_down(keys[:found], blocks[:found], tier, evicting=True, wait=wait)

    def _move_down(self, keys: np.ndarray, blocks: np.ndarray, tier: int, *, evicting: bool, wait: bool,
                   to: int | None = None, at: float | None = None) -> list[Move]:
        """Move unpinned ``keys`` (held in ``blocks`` of ``tier``) one tier down (and on to ``to``,
        in the background), as many as the tier below has room for. The rest: ``evicting`` (they
        must go to free room) drops them unless room below is on its way (then they follow it);
        otherwise they stay. With ``wait`` the move completes before returning. Returns the moves."""
        to = tier + 1 if to is None else to
        below = tier + 1
        room, making = self._make_room(below, len(keys), wait=wait)
        # Note [Stale victims]: making room below can wait for moves whose completion runs other
        # work (a policy's callback, a chained move), which may have moved, pinned or dropped
        # some of these keys meanwhile. Only those still where they were, unpinned, go on;
        # moving or dropping the others again would free their blocks twice.
        where, now_at, pins = self.index.locate(keys)
        still = (where == tier) & (now_at == blocks) & (pins == 0)
        keys, blocks = keys[still], blocks[still]
        found = len(keys)
        moved = min(found, room)
        out: list[Move] = []
        if moved:
            dst = None
            if below != NVME:
                at = self.moves.at() if at is None else at
                at = max(at, self.moves.room_ready_at(below, moved, self._free_blocks(below), at))
                dst = self.pools[below].allocate(moved)
            m = self.moves.submit(keys[:moved], tier, blocks[:moved], below, dst, evicting=evicting, at=at)
            if m is None:
                if evicting:
                    moved = 0  # not even submitted (a full or failing disk): dropped below
            else:
                if to > below:
                    m.then.append(lambda mv: self._demote_now(mv.keys[mv.ok], below, to, mv.done_at))
                out.append(m)
        rest_k, rest_b = keys[moved:], blocks[moved:]
        if len(rest_k):
            if making and not wait:  # room below is being made: they follow once it is there
                self.moves.after(making, rest_k, lambda at2: self._demote_now(rest_k, tier, to, at2, evicting))
            elif evicting:  # nothing below can take them: dropped (recomputed later)
                self.index.remove(rest_k)
                self.pools[tier].free(rest_b)
                self.metrics.dropped_blocks += len(rest_k)
        if wait:
            self.moves.wait(out)
        return out

    def _demote_now(self, keys: np.ndarray, src: int, to: int, at: float, evicting: bool = False) -> None:
        """Background continuation: move those of ``keys`` still at ``src`` and unpinned down to ``to``."""
        if len(keys) == 0 or src >= to:
            return
        where, blocks, pins = self.index.locate(keys)
        sel = (where == src) & (pins == 0)
        if sel.any():
            self._move_down(keys[sel], blocks[sel], src, evicting=evicting, wait=False, to=to, at=at)

    # ------------------------------------------------------------------ explicit placement (trace policies)

    @_locked
    def make_room(self, tier: int, n: int, wait: bool = True) -> int:
        """Demote LRU blocks (copy, then release) until ``tier`` has ``n`` free blocks, as far as
        unpinned blocks allow; returns how many are free. A trace policy calls this with
        ``wait=False`` (the demotions run in the background; the count is what is free now) so
        that the next step's store finds room without waiting on a demotion."""
        if not self.has_tier(tier):
            raise InvalidArgumentError(f"this cache has no tier {tier}")
        self.moves.poll()
        return self._make_room(tier, n, wait=wait)[0]

    def locate(self, keys: Any) -> tuple[np.ndarray, np.ndarray]:
        """(tier, pins) of each key without touching LRU order; tier is 255 where not cached."""
        tiers, _, pins = self.index.locate(_as_keys(keys))
        return tiers, pins

    def has_tier(self, tier: int) -> bool:
        return tier == DEVICE or (tier == DRAM and self.pools[DRAM] is not None) or (tier == NVME and self.nvme is not None)

    def tier_fill(self, tier: int) -> float:
        """Fraction of a tier's blocks in use (cached or staging); 1.0 for a tier that does not exist."""
        if not self.has_tier(tier):
            return 1.0
        if tier == NVME:
            st = self.nvme.stats()
            return st["used_slots"] / max(1, st["num_slots"])
        pool = self.pools[tier]
        return 1.0 - pool.free_blocks / max(1, pool.num_blocks)

    def tier_free_blocks(self, tier: int) -> int:
        if not self.has_tier(tier):
            return 0
        if tier == NVME:
            st = self.nvme.stats()
            return int(st["num_slots"] - st["used_slots"])
        return max(0, self._free_blocks(tier))

    @_locked
    def demote_keys(self, keys: Any, tier: int, wait: bool = True) -> int:
        """Move the cached, unpinned ``keys`` that sit above ``tier`` down to ``tier`` (DRAM or
        NVMe), copy then release, making room there by LRU demotion. With ``wait`` (the default)
        the moves complete before returning, and keys the tiers below cannot take are dropped;
        returns how many keys now sit at ``tier`` or below. With ``wait=False`` the moves run in the
        background (Note [Background moves] in kvtier/trace.py), a failed one leaves the block
        where it was, and the return value counts the keys at or below ``tier`` or on their way."""
        if tier not in (DRAM, NVME) or not self.has_tier(tier):
            raise InvalidArgumentError(f"cannot demote to tier {tier}: this cache has no such tier")
        keys = _as_keys(keys)
        self.moves.poll()
        for src in range(tier):
            where, blocks, pins = self.index.locate(keys)
            sel = (where == src) & (pins == 0)
            if sel.any():
                self._move_down(keys[sel], blocks[sel], src, evicting=wait, wait=wait, to=tier)
        where, _, _ = self.index.locate(keys)
        below = (where >= tier) & (where != 255)
        if not wait:
            below |= self.moves.moving(keys) & (where != 255)
        return int(below.sum())

    @_locked
    def promote_keys(self, keys: Any, tier: int = DEVICE, wait: bool = True) -> int:
        """Bring cached ``keys`` up to ``tier`` (a prefetch), head first, as far as room can be
        made without evicting pinned blocks; the keys are pinned meanwhile so that making room
        never demotes them. NVMe blocks are read into DRAM, then copied up. A block that fails its
        checksum is removed (a miss). With ``wait`` (the default) returns how many keys sit at
        ``tier`` afterwards; with ``wait=False`` the moves run in the background and it returns
        how many are there or on their way."""
        keys = _as_keys(keys)
        self.moves.poll()
        where, _, _ = self.index.locate(keys)
        free = ~self.moves.moving(keys)
        held = keys[where != 255]
        self.index.pin(held)  # making room for one part must not push out another
        try:
            for src in (NVME, DRAM):
                if src > tier:
                    self._move_up(keys[(where == src) & free], src, tier)
        finally:
            self.index.unpin(held)
        if wait:
            self.moves.wait_keys(keys)
            where, _, _ = self.index.locate(keys)
            return int((where == tier).sum())
        where, _, _ = self.index.locate(keys)
        return int(((where == tier) | (self.moves.moving(keys) & (where != 255))).sum())

    def _forget_lost(self, keys: np.ndarray) -> None:
        """NVMe ``keys`` that failed to read (missing, corrupt, I/O error), pinned once by the caller:
        drop that pin and the index entry (unless another reader still pins it: it will find the
        block lost too), and free the slot, which an I/O error leaves behind (nothing would find
        it again once the index forgets the key)."""
        self.index.unpin(keys)
        self.index.remove(keys)
        self.nvme.evict(keys)

    @_locked
    def drop_keys(self, keys: Any) -> int:
        """Remove cached, unpinned ``keys`` from every tier (they will be recomputed); returns how many."""
        keys = _as_keys(keys)
        self.moves.poll()
        where, blocks, pins = self.index.locate(keys)
        moving = self.moves.moving(keys) & (where != 255)
        if moving.any():  # in flight: dropped once the move lands (it holds the blocks meanwhile)
            k = keys[moving]
            self.moves.after(self.moves.touching(k), np.zeros((0, 2), dtype=np.uint64),
                             lambda at: self.drop_keys(k) and None)
        sel = (where != 255) & (pins == 0)
        if not sel.any():
            return 0
        k, w, b = keys[sel], where[sel], blocks[sel]
        self.index.remove(k)
        for tier in (DEVICE, DRAM):
            if (w == tier).any():
                self.pools[tier].free(b[w == tier])
        if (w == NVME).any():
            self.nvme.evict(k[w == NVME])
        return int(sel.sum())

    # ------------------------------------------------------------------ introspection

    def blocks_per_tier(self) -> dict[str, int]:
        return {TIER_NAMES[t]: self.index.count(t) for t in range(3)}

    def close(self) -> None:
        self.moves.drain()
        if self.nvme is not None:
            self.nvme.close()
