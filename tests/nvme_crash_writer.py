"""Child process for the NVMe crash test: writes blocks forever (until killed), reusing slots.

Protocol on stdout, one line per event, flushed: ``A <key>`` once a write batch is acknowledged
(its handle completed OK, i.e. after fdatasync), ``E <key>`` just before a key is evicted.
A block's bytes are a pure function of its key (see expected_block), so the parent can check
every block it reads back after the crash.
"""

from __future__ import annotations

import sys

import numpy as np

import kvtier

BLOCK_BYTES = 64 * 1024 + 512  # not a multiple of 4 KiB: exercises the alignment padding
SLOTS = 24
BATCH = 4


def expected_block(key: int) -> np.ndarray:
    return np.random.default_rng(key).integers(0, 256, size=BLOCK_BYTES, dtype=np.uint8)


def main(directory: str, first_key: int) -> None:
    pool = kvtier.HostPool(BLOCK_BYTES, num_blocks=BATCH)
    ids = pool.allocate(BATCH)
    view = pool.view()
    tier = kvtier.NvmeTier(directory, pool, num_slots=SLOTS, queue_depth=8, max_io_bytes=16384)
    live: list[int] = [int(k[1]) for k in tier.keys()]
    key = first_key
    out = sys.stdout
    while True:
        keys = list(range(key, key + BATCH))
        key += BATCH
        while len(live) + BATCH > SLOTS:
            old = live.pop(0)
            out.write(f"E {old}\n")
            out.flush()
            tier.evict([old])
        for i, k in enumerate(keys):
            view[ids[i]] = expected_block(k)
        tier.write(keys, ids).wait()
        live.extend(keys)
        out.write("".join(f"A {k}\n" for k in keys))
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
