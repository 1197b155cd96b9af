"""kvtier's UCX progress modes against each other: event-driven (epoll on the worker's event fd)
and polling (spinning while transfers are in flight), same run, alternating rounds.

    python bench/bench_ucx_progress.py [--size-mib 64] [--reps 6] [--json out.json]

For each transport (shm: posix,cma,tcp; tcp) and op (put, get) of 2 MiB blocks, one Peer per
mode in turn (one UCX agent per process: the modes alternate by closing and reopening it) moves
the same block list to and from a worker process (running in the same mode). Reports the median
GB/s per mode and the paired ratio poll/event (kvtier.harness.benchmarks.nvme.paired_ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics

from kvtier.harness.benchmarks.nvme import paired_ratio
from kvtier.harness.benchmarks.remote import NET_DEVICES, TRANSPORTS, _Worker


def one(mode: str, tls: str, op: str, n: int, block_bytes: int) -> float:
    import kvtier
    from kvtier.cluster.peer import Peer

    w = _Worker("--kvtier-target", {"tls": tls, "block_bytes": block_bytes, "num_blocks": n, "seed": 0})
    try:
        with Peer(tls=tls, net_devices=NET_DEVICES, progress=mode) as peer:
            pool = kvtier.HostPool(block_bytes, num_blocks=n)
            ids = pool.allocate(n)
            peer.register(pool)
            remote = peer.connect(bytes.fromhex(w.hello["address"])).import_pool(bytes.fromhex(w.hello["descriptor"]))

            def run() -> float:
                h = (peer.put(pool, ids, remote, ids) if op == "put" else peer.get(remote, ids, pool, ids))
                h.wait(600)
                return h.latency_s

            run()  # untimed wire-up
            return n * block_bytes / run() / 1e9
    finally:
        w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    block_bytes = 2 << 20
    n = (args.size_mib << 20) // block_bytes
    out = []
    for transport, tls in TRANSPORTS.items():
        for op in ("put", "get"):
            by_mode: dict[str, list[float]] = {"event": [], "poll": []}
            for rnd in range(args.reps):
                for mode in (("event", "poll") if rnd % 2 == 0 else ("poll", "event")):
                    by_mode[mode].append(one(mode, tls, op, n, block_bytes))
            row = {"case": f"{transport} 2MiB {op}", **{f"{m}_gbps": round(statistics.median(v), 3)
                                                          for m, v in by_mode.items()},
                   "poll_over_event": paired_ratio(by_mode["poll"], by_mode["event"]), "rounds": by_mode}
            out.append(row)
            pr = row["poll_over_event"]
            print(f"{row['case']}: event {row['event_gbps']:.2f} GB/s, poll {row['poll_gbps']:.2f} GB/s, "
                  f"poll/event {pr['median']:.2f}x {pr['ci95']} {pr['verdict']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": out}, f, indent=2)


if __name__ == "__main__":
    main()
