"""NVMe tier: round trips, durability across restarts, crashes, corruption, full tier, I/O errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier import _core

pytestmark = pytest.mark.skipif(not getattr(_core, "HAVE_NVME", False), reason="kvtier built without io_uring")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import nvme_crash_writer as writer  # noqa: E402


def fill(pool: kvtier.HostPool, ids: np.ndarray, seed: int) -> np.ndarray:
    view = pool.view()
    rng = np.random.default_rng(seed)
    for i in ids:
        view[i] = rng.integers(0, 256, size=pool.block_bytes, dtype=np.uint8)
    return view[ids].copy()


@pytest.fixture
def pool() -> kvtier.HostPool:
    return kvtier.HostPool(64 * 1024, num_blocks=32)


def test_round_trip_and_restart(tmp_path: Path, pool: kvtier.HostPool) -> None:
    ids = pool.allocate(16)
    data = fill(pool, ids, seed=1)
    keys = np.arange(100, 116)
    with kvtier.NvmeTier(tmp_path, pool, num_slots=64) as tier:
        assert "O_DIRECT" in tier.io_mode
        tier.write(keys, ids).wait()
        assert tier.contains(keys).all()
        assert tier.stats()["fsyncs"] >= 1
    pool.view()[ids] = 0
    with kvtier.NvmeTier(tmp_path, pool, num_slots=64) as tier:
        assert tier.stats()["recovered_blocks"] == 16
        h = tier.read(keys[::-1], ids)
        h.wait()
        assert h.block_ok.all()
        np.testing.assert_array_equal(pool.view()[ids], data[::-1])


def test_unaligned_block_size_is_padded(tmp_path: Path) -> None:
    pool = kvtier.HostPool(5000, num_blocks=4)  # not a multiple of 4 KiB
    ids = pool.allocate(4)
    data = fill(pool, ids, seed=2)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=8)
    tier.write([1, 2, 3, 4], ids).wait()
    pool.view()[ids] = 0
    h = tier.read([1, 2, 3, 4], ids)
    h.wait()
    assert h.block_ok.all()
    np.testing.assert_array_equal(pool.view()[ids], data)


def test_missing_keys_are_misses_not_errors(tmp_path: Path, pool: kvtier.HostPool) -> None:
    ids = pool.allocate(3)
    fill(pool, ids, seed=3)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=8)
    tier.write([7], ids[:1]).wait()
    h = tier.read([7, 8, 9], ids)
    h.wait()
    assert h.block_ok.tolist() == [True, False, False]
    assert tier.stats()["read_misses"] == 2


def test_duplicate_writes_are_deduplicated(tmp_path: Path, pool: kvtier.HostPool) -> None:
    ids = pool.allocate(2)
    fill(pool, ids, seed=4)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=8)
    tier.write([5, 6], ids).wait()
    tier.write([5, 6], ids).wait()
    s = tier.stats()
    assert s["blocks_written"] == 2 and s["blocks_deduplicated"] == 2 and s["used_slots"] == 2




def test_corrupt_payload_is_a_counted_miss_and_removed(tmp_path: Path, pool: kvtier.HostPool) -> None:
    ids = pool.allocate(4)
    data = fill(pool, ids, seed=5)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=4)
    tier.write([10, 11, 12, 13], ids).wait()
    offset = tier._core.payload_offset(2) + 1234
    tier.close()
    # Flip one byte in the payload of slot 2 (key 12) behind the tier's back.
    with open(tmp_path / "kvtier.slots", "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    pool.view()[ids] = 0
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=4)
    h = tier.read([10, 11, 12, 13], ids)
    h.wait()
    assert h.block_ok.tolist() == [True, True, False, True]
    for i in (0, 1, 3):
        np.testing.assert_array_equal(pool.view()[ids[i]], data[i])
    s = tier.stats()
    assert s["corrupt_blocks"] == 1 and s["read_misses"] == 1
    assert tier.contains([12]).tolist() == [False]  # removed, never found again


@pytest.mark.parametrize("max_io_kib", [16, 4096])  # blocks split into 4 requests / merged runs
def test_parallel_verification_finds_exactly_the_corrupt_blocks(tmp_path: Path, max_io_kib: int) -> None:
    """Note [Verifying reads in parallel]: with several verify threads, each corrupt block is a
    miss, every other block arrives intact, and the handle completes once, after all of them."""
    pool = kvtier.HostPool(64 * 1024, num_blocks=48)
    ids = pool.allocate(48)
    data = fill(pool, ids, seed=11)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=48, verify_threads=4, max_io_bytes=max_io_kib << 10)
    assert tier.verify_threads == 4
    keys = list(range(100, 148))
    tier.write(keys, ids).wait()
    bad = {3, 17, 40}
    offsets = [tier._core.payload_offset(s) + 777 * s for s in bad]  # slots follow positions here
    tier.close()
    with open(tmp_path / "kvtier.slots", "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x5A]))
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=48, verify_threads=4, max_io_bytes=max_io_kib << 10)
    for round_ in range(1, 4):
        pool.view()[ids] = 0
        h = tier.read(keys, ids)
        h.wait()
        assert {i for i, ok in enumerate(h.block_ok.tolist()) if not ok} == bad
        for i in set(range(48)) - bad:
            np.testing.assert_array_equal(pool.view()[ids[i]], data[i])
        s = tier.stats()
        # Round 1 finds the three corrupt; they are dropped, so later rounds miss them.
        assert s["corrupt_blocks"] == 3 and s["read_hits"] == 45 * round_ and s["read_misses"] == 3 * round_
    assert tier.contains([keys[i] for i in sorted(bad)]).tolist() == [False] * 3
    tier.close()


def test_random_order_read_is_built_in_file_order(tmp_path: Path) -> None:
    """Note [Reads in file order]: a batch listed in random order reaches the ring as the same
    merged requests as the batch listed in file order (runs adjacent on disk and in the pool are
    one request), every block lands where its caller asked, and a run broken by a missing key or
    a non-adjacent destination is split there."""
    n = 64
    pool = kvtier.HostPool(16 * 1024, num_blocks=2 * n)
    ids = pool.allocate(2 * n)
    data = fill(pool, ids[:n], seed=21)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=n, max_io_bytes=256 << 10)  # 16 blocks a request
    keys = np.arange(1000, 1000 + n)
    tier.write(keys, ids[:n]).wait()
    base = tier.stats()["read_ops"]

    def read(keys_: np.ndarray, dest: np.ndarray) -> tuple[int, list[bool]]:
        before = tier.stats()["read_ops"]
        pool.view()[dest] = 0
        h = tier.read(keys_, dest)
        h.wait()
        return tier.stats()["read_ops"] - before, h.block_ok.tolist()

    ops_in_order, ok = read(keys, ids[:n])
    assert base == 0 and ops_in_order == n // 16 and all(ok)
    perm = np.random.default_rng(5).permutation(n)
    ops_random, ok = read(keys[perm], ids[:n][perm])  # same (slot, destination) pairs, listed at random
    assert ops_random == ops_in_order and all(ok)
    np.testing.assert_array_equal(pool.view()[ids[:n]], data)
    # Destinations in the caller's (random) order: no two file neighbours are pool neighbours
    # unless the permutation makes them so; every block still lands where it was asked to.
    dest = ids[n:][perm]
    ops_scattered, ok = read(keys, dest)
    adjacent = int(np.sum(np.diff(dest) == 1))
    assert ops_scattered == n - adjacent and all(ok)
    np.testing.assert_array_equal(pool.view()[dest], data)
    # A missing key in the middle splits a run; the rest arrive intact.
    mixed = keys.copy()
    mixed[20] = 99
    ops_missing, ok = read(mixed[perm], ids[:n][perm])
    assert ops_missing == ops_in_order + 1
    assert [i for i, v in enumerate(ok) if not v] == [int(np.where(perm == 20)[0][0])]
    got = pool.view()[ids[:n]]
    np.testing.assert_array_equal(np.delete(got, 20, axis=0), np.delete(data, 20, axis=0))
    tier.close()


@pytest.mark.parametrize("after_write", [False, True], ids=["hashed-changed-written", "written-changed-hashed"])
def test_checksum_and_payload_from_different_bytes_is_a_miss(tmp_path: Path, after_write: bool) -> None:
    """Note [Checksums beside the payload]: a checksum is computed apart from the payload write
    (on the verify pool, while the disk writes). A staging block changed between the two (a
    caller writing through a raw pointer) leaves a header whose checksum is not that of the bytes
    on disk: each such block must be a counted miss, every other block intact, after a restart
    too, and the write itself still succeeds (it cannot tell)."""
    pool = kvtier.HostPool(64 * 1024, num_blocks=40)
    ids = pool.allocate(40)
    data = fill(pool, ids, seed=23)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=40, max_io_bytes=256 << 10)
    tier.inject_staging_change(7, after_write=after_write)  # positions 6, 13, 20, 27, 34
    keys = np.arange(500, 540)
    tier.write(keys, ids).wait()
    tier.inject_staging_change(0)
    bad = {6, 13, 20, 27, 34}
    changed = [i for i in range(40) if (pool.view()[ids[i]] != data[i]).any()]
    assert changed == sorted(bad)  # the switch changed exactly those staging blocks, by one byte
    assert tier.contains(keys).all()
    tier.close()
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=40, max_io_bytes=256 << 10)
    assert tier.contains(keys).all()  # headers are valid: only the payload check can tell
    pool.view()[ids] = 0
    h = tier.read(keys[::-1], ids[::-1])  # any order
    h.wait()
    missed = {39 - i for i, ok in enumerate(h.block_ok.tolist()) if not ok}
    assert missed == bad
    for i in set(range(40)) - bad:
        np.testing.assert_array_equal(pool.view()[ids[i]], data[i])
    s = tier.stats()
    assert s["corrupt_blocks"] == 5 and s["read_hits"] == 35
    assert not tier.contains(keys[sorted(bad)]).any()
    tier.close()


def test_checksums_beside_the_payload_round_trip_large_batches(tmp_path: Path) -> None:
    """Several hash tasks and header groups racing the payload completions: every block of a
    batch comes back byte-exact, the tier can be reopened at once, and a rewrite of the same
    slots (new keys) replaces them."""
    pool = kvtier.HostPool(96 * 1024, num_blocks=400)
    ids = pool.allocate(400)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=400, verify_threads=3)
    for round_ in range(3):
        data = fill(pool, ids, seed=100 + round_)
        keys = np.arange(1, 401) + 1000 * round_
        handles = [tier.write(keys[:150], ids[:150]), tier.write(keys[150:], ids[150:])]
        for h in handles:
            h.wait()
        pool.view()[ids] = 0
        h = tier.read(keys, ids)
        h.wait()
        assert h.block_ok.all()
        np.testing.assert_array_equal(pool.view()[ids], data)
        tier.evict(keys)
    assert tier.stats()["corrupt_blocks"] == 0 and tier.stats()["blocks_written"] == 1200
    tier.close()


@pytest.mark.parametrize("taper", [True, False])
def test_tapered_reads_deliver_every_block_once(tmp_path: Path, taper: bool) -> None:
    """Note [Tapering reads]: 72 MiB read in 1 MiB requests, so the in-flight window (half of
    what is left, at least 16 MiB) holds back requests many times over; reads racing a write,
    every block byte-exact, the stats exact, and nothing left hanging."""
    pool = kvtier.HostPool(1 << 20, num_blocks=80)
    ids = pool.allocate(80)
    data = fill(pool, ids, seed=31)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=80, queue_depth=64, max_io_bytes=1 << 20, taper_reads=taper)
    keys = np.arange(1, 73)
    tier.write(keys, ids[:72]).wait(timeout=60)
    rng = np.random.default_rng(7)
    for round_ in range(1, 4):
        order = rng.permutation(72)
        pool.view()[ids[:72]] = 0
        h = tier.read(keys[order], ids[:72][order])
        w = tier.write(np.arange(1000 + 8 * round_, 1008 + 8 * round_), ids[72:])  # a write in between
        h.wait(timeout=60)
        w.wait(timeout=60)
        assert h.block_ok.all()
        np.testing.assert_array_equal(pool.view()[ids[:72]], data[:72])
        s = tier.stats()
        assert s["read_hits"] == 72 * round_ and s["read_misses"] == 0 and s["corrupt_blocks"] == 0
        tier.evict(np.arange(1000 + 8 * round_, 1008 + 8 * round_))
    tier.close()


def test_inject_staging_change_refuses_bad_input(tmp_path: Path, pool: kvtier.HostPool) -> None:
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=4)
    with pytest.raises(kvtier.InvalidArgumentError, match="every_nth"):
        tier.inject_staging_change(-1)
    tier.close()


def test_corrupt_header_is_not_recovered(tmp_path: Path, pool: kvtier.HostPool) -> None:
    ids = pool.allocate(2)
    fill(pool, ids, seed=6)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=2)
    tier.write([1, 2], ids).wait()
    offset = tier._core.header_offset(1) + 24
    tier.close()
    with open(tmp_path / "kvtier.slots", "r+b") as f:
        f.seek(offset)  # inside key 2's header (its generation field)
        f.write(b"\x99")
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=2)
    assert tier.contains([1, 2]).tolist() == [True, False]
    assert tier.stats()["recovered_blocks"] == 1


def test_full_tier_fails_the_handle_and_keeps_stored_blocks(tmp_path: Path, pool: kvtier.HostPool) -> None:
    ids = pool.allocate(6)
    data = fill(pool, ids, seed=7)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=4)
    tier.write([1, 2, 3], ids[:3]).wait()
    h = tier.write([4, 5], ids[3:5])  # needs 2 slots, 1 free: nothing is written
    with pytest.raises(kvtier.OutOfCapacityError, match="full"):
        h.wait()
    assert tier.contains([1, 2, 3, 4, 5]).tolist() == [True, True, True, False, False]
    assert tier.evict([1]) == 1
    tier.write([4, 5], ids[3:5]).wait()
    pool.view()[ids] = 0
    h = tier.read([2, 3, 4, 5], ids[1:5])
    h.wait()
    assert h.block_ok.all()
    np.testing.assert_array_equal(pool.view()[ids[1:5]], data[1:5])


def test_injected_write_errors_fail_only_their_blocks(tmp_path: Path, pool: kvtier.HostPool) -> None:
    ids = pool.allocate(8)
    data = fill(pool, ids, seed=8)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=16, max_io_bytes=16384)
    tier.inject_io_errors(7)
    h = tier.write(np.arange(1, 9), ids)
    with pytest.raises(kvtier.TransferError, match="not written"):
        h.wait()
    ok = h.block_ok
    assert 0 < ok.sum() < 8
    tier.inject_io_errors(0)
    assert tier.contains(np.arange(1, 9)).tolist() == ok.tolist()
    assert tier.stats()["write_errors"] == int((~ok).sum())
    assert tier.stats()["used_slots"] == int(ok.sum())  # failed blocks gave their slots back
    pool.view()[ids] = 0
    h = tier.read(np.arange(1, 9), ids)
    h.wait()
    assert h.block_ok.tolist() == ok.tolist()
    np.testing.assert_array_equal(pool.view()[ids[ok]], data[ok])


@pytest.mark.parametrize("every", [0, 5, 37])
def test_large_batch_headers_in_groups(tmp_path: Path, every: int) -> None:
    # 300 blocks: several header groups (each group's headers are written once its own payloads
    # completed), some keys already stored in between, some I/Os failing. Every block reported
    # written is found with its bytes, after a restart too; no failed block is found.
    pool = kvtier.HostPool(8192, num_blocks=300)
    ids = pool.allocate(300)
    data = fill(pool, ids, seed=11)
    keys = np.arange(1, 301)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=320, max_io_bytes=65536)
    pre = keys[::7]
    tier.write(pre, ids[::7]).wait()  # stored already: skipped inside the big batch
    tier.inject_io_errors(every)
    h = tier.write(keys, ids)
    if every:
        with pytest.raises(kvtier.TransferError, match="not written"):
            h.wait()
    else:
        h.wait()
    ok = h.block_ok
    tier.inject_io_errors(0)
    assert ok[::7].all()
    if every:
        assert 0 < ok.sum() < 300
    else:
        assert ok.all()
    assert tier.contains(keys).tolist() == ok.tolist()
    assert tier.stats()["used_slots"] == int(ok.sum())
    tier.close()
    # An injected error fails an I/O that did reach the disk: a block whose header did is
    # complete and may be found after a restart (docs/nvme.md), with exactly its bytes.
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=320, max_io_bytes=65536)
    found = tier.contains(keys)
    assert found[ok].all()
    pool.view()[ids] = 0
    h = tier.read(keys, ids)
    h.wait()
    assert h.block_ok.tolist() == found.tolist()
    np.testing.assert_array_equal(pool.view()[ids[found]], data[found])


def test_injected_read_errors_are_misses(tmp_path: Path, pool: kvtier.HostPool) -> None:
    ids = pool.allocate(4)
    fill(pool, ids, seed=9)
    tier = kvtier.NvmeTier(tmp_path, pool, num_slots=4)
    tier.write([1, 2, 3, 4], ids).wait()
    tier.inject_io_errors(1)
    h = tier.read([1, 2, 3, 4], ids)
    h.wait()  # a read error degrades the cache, it does not fail the caller
    assert not h.block_ok.any()
    assert tier.stats()["read_errors"] == 4


def test_preallocation_failure_is_a_clear_error(tmp_path: Path) -> None:
    code = (
        "import resource, signal, sys, kvtier\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "pool = kvtier.HostPool(65536, num_blocks=1)\n"
        "try:\n"
        f"    kvtier.NvmeTier({str(tmp_path)!r}, pool, num_slots=1000)\n"
        "except kvtier.OutOfCapacityError as e:\n"
        "    print('ERR', e); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cannot preallocate" in out.stdout


def test_bad_input(tmp_path: Path, pool: kvtier.HostPool) -> None:
    with pytest.raises(kvtier.InvalidArgumentError, match="smaller than one block"):
        kvtier.NvmeTier(tmp_path, pool, capacity_bytes=100)
    with pytest.raises(kvtier.InvalidArgumentError, match="exactly one"):
        kvtier.NvmeTier(tmp_path, pool)
    tier = kvtier.NvmeTier(tmp_path / "a", pool, num_slots=4)
    with pytest.raises(kvtier.BusyError, match="open in another"):
        kvtier.NvmeTier(tmp_path / "a", pool, num_slots=4)
    other = kvtier.HostPool(8192, num_blocks=2)
    tier.close()
    with pytest.raises(kvtier.InvalidArgumentError, match="same block size"):
        kvtier.NvmeTier(tmp_path / "a", other, num_slots=4)
    tier = kvtier.NvmeTier(tmp_path / "a", pool, num_slots=4)
    with pytest.raises(kvtier.InvalidArgumentError, match="out of range"):
        tier.write([1], [999])
    with pytest.raises(kvtier.BlockStateError, match="not allocated"):
        tier.write([1], [0])  # pool block 0 was never allocated
    ids = pool.allocate(2)
    with pytest.raises(kvtier.InvalidArgumentError, match="differ in length"):
        tier.read([1, 2, 3], ids)
    with pytest.raises(kvtier.InvalidArgumentError, match="more than once"):
        tier.read([1, 2], [ids[0], ids[0]])
    with pytest.raises(kvtier.InvalidArgumentError, match="2\\*\\*128"):
        tier.contains([-1])
    with pytest.raises(kvtier.InvalidArgumentError, match="queue_depth"):
        kvtier.NvmeTier(tmp_path / "b", pool, num_slots=4, queue_depth=0)
    for bad in (0, -1, 65, 2.0, True):
        with pytest.raises(kvtier.InvalidArgumentError, match="verify_threads"):
            kvtier.NvmeTier(tmp_path / "b", pool, num_slots=4, verify_threads=bad)
    with pytest.raises(kvtier.InvalidArgumentError, match="max_io_bytes"):
        kvtier.NvmeTier(tmp_path / "c", pool, num_slots=4, max_io_bytes=1000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "kvtier.super").write_bytes(b"garbage" * 100)
    with pytest.raises(kvtier.InvalidArgumentError, match="not a valid kvtier NVMe superblock"):
        kvtier.NvmeTier(tmp_path / "d", pool, num_slots=4)
    tier.close()
    with pytest.raises(kvtier.ClosedError):
        tier.contains([1])


def _crash_once(directory: Path, rng: random.Random, first_key: int) -> tuple[set[int], int]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "nvme_crash_writer.py"), str(directory), str(first_key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Let it start (import + open) and then run for a random while before kill -9.
    deadline = time.monotonic() + 30
    line = proc.stdout.readline()  # first event: the writer is up
    assert line, proc.stderr.read()
    time.sleep(rng.uniform(0.0, 0.25))
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    acked: set[int] = set()
    max_key = first_key
    for ev in (line + rest).splitlines():
        kind, key = ev.split()
        k = int(key)
        max_key = max(max_key, k)
        if kind == "A":
            acked.add(k)
        else:
            acked.discard(k)
    return acked, max_key + 1


def _check_after_crash(directory: Path, acked: set[int]) -> int:
    pool = kvtier.HostPool(writer.BLOCK_BYTES, num_blocks=writer.SLOTS)
    ids = pool.allocate(writer.SLOTS)
    with kvtier.NvmeTier(directory, pool, num_slots=writer.SLOTS, queue_depth=8, max_io_bytes=16384) as tier:
        stored = [int(k[1]) for k in tier.keys()]
        missing = acked - set(stored)
        assert not missing, f"acknowledged blocks lost after kill -9: {sorted(missing)}"
        h = tier.read(stored, ids[: len(stored)])
        h.wait()
        view = pool.view()
        for i, k in enumerate(stored):
            if h.block_ok[i]:
                np.testing.assert_array_equal(view[ids[i]], writer.expected_block(k), err_msg=f"key {k} is wrong")
            else:
                assert k not in acked, f"acknowledged block {k} failed its checksum"
        return int((~h.block_ok).sum())


def _crash_loop(tmp_path: Path, iterations: int, seed: int) -> None:
    rng = random.Random(seed)
    print(f"crash test seed={seed} iterations={iterations}")
    key = 1
    torn = 0
    for _ in range(iterations):
        acked, key = _crash_once(tmp_path, rng, key)
        torn += _check_after_crash(tmp_path, acked)
    print(f"blocks caught torn by their checksum: {torn}")


def test_kill_9_never_loses_acknowledged_or_returns_torn_blocks(tmp_path: Path) -> None:
    _crash_loop(tmp_path, iterations=8, seed=1234)


@pytest.mark.slow
def test_kill_9_many_times(tmp_path: Path) -> None:
    _crash_loop(tmp_path, iterations=60, seed=99)


def test_registered_kv_to_nvme_and_back(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    layout = kvtier.KVLayout(num_layers=4, kv_heads=2, head_dim=64, block_tokens=16, dtype="bfloat16")
    gen = torch.Generator().manual_seed(3)
    src = [torch.randn(32, 2, 16, 2, 64, generator=gen).to(torch.bfloat16) for _ in range(4)]
    dst = [torch.zeros_like(t) for t in src]
    reg_src, reg_dst = kvtier.register_kv(src, layout), kvtier.register_kv(dst, layout)
    staging = kvtier.HostPool(layout, num_blocks=8)
    engine = kvtier.CopyEngine()
    with kvtier.NvmeTier(tmp_path, staging, num_slots=16) as tier:
        kvtier.kv_to_nvme(engine, reg_src, [3, 9, 17], tier, [103, 109, 117])
        assert staging.free_blocks == 8  # staging blocks returned
        ok = kvtier.nvme_to_kv(engine, tier, [117, 555, 103], reg_dst, [0, 1, 2])
        assert ok.tolist() == [True, False, True]
        assert staging.free_blocks == 8
    for s, d in zip(src, dst):
        assert torch.equal(d[0].view(torch.int16), s[17].view(torch.int16))
        assert torch.equal(d[2].view(torch.int16), s[3].view(torch.int16))
        assert not d[1].any()  # the miss left its block untouched


def test_bench_nvme_records_memory_speed_beside_the_disk(tmp_path: Path) -> None:
    """Note [Memory speed beside the disk]: a run records memcpy and XXH3 speed per case and in
    its machine section, and each case's hash share is hashing time over kvtier's time."""
    from kvtier.harness.benchmarks import nvme as bench

    report = bench.run(directory=str(tmp_path / "d"), size_mib=4, reps=1, cases="192KiB read", progress=False)
    (r,) = report["results"]
    mem = r["memory"]
    assert mem["buffer_bytes"] == r["blocks"] * r["block_bytes"]
    assert mem["memcpy_gbps"] > 0 and mem["xxh3_gbps"] > 0 and mem["xxh3_threads_gbps"] > 0
    assert mem["xxh3_threads"] == bench.nvme_verify_threads()
    assert r["hash_share"] == pytest.approx(r["kvtier_gbps"] / mem["xxh3_threads_gbps"], rel=0.02)
    m = report["machine"]["memory"]
    assert m["memcpy_gbps"] == mem["memcpy_gbps"] and m["xxh3_threads_gbps"] == mem["xxh3_threads_gbps"]


def test_timed_checksum_hashes_the_whole_buffer() -> None:
    # 64 MiB hashed in 2 MiB pieces must take measurable time, and longer than 1 MiB of it does
    # (the whole buffer is hashed, not one piece per thread).
    big = np.ones(64 << 20, dtype=np.uint8)
    t_big = min(_core.timed_checksum(big, 2 << 20, 2) for _ in range(3))
    t_small = min(_core.timed_checksum(big[: 1 << 20], 2 << 20, 2) for _ in range(3))
    assert t_big > 8 * t_small > 0
    with pytest.raises(kvtier.InvalidArgumentError, match="piece_bytes"):
        _core.timed_checksum(big, 0, 1)
