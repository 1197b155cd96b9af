"""What the metadata store costs: ops/s and the round trip of a lookup of N keys.

    python -m kvtier.harness.benchmarks.store [--url redis://host:port/0] [--sizes 1,16,128,1024,8192] [--json out.json]

Without ``--url`` it starts its own ``redis-server`` (no persistence) on a free port in a temp
dir and stops it after. Every figure comes with its anchor from the same run on the same server:
the lookup script against N sequential ``HGETALL`` round trips (what one call per block would
cost) and against one pipeline of N ``HGETALL`` (one round trip without the liveness filter).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from kvtier.cluster.metadata import ClusterStore


@contextmanager
def local_redis() -> Iterator[str]:
    """A throwaway redis-server on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as d, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", d, "--loglevel", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis

            r = redis.Redis(port=port)
            for _ in range(500):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.01)
            r.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _times(fn: Callable[[], Any], repeats: int) -> np.ndarray:
    fn()  # warm (script load, connection)
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def _rate(fn: Callable[[], Any], seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def measure(url: str, sizes: tuple[int, ...] = (1, 16, 128, 1024, 8192), repeats: int = 30,
            seconds: float = 1.0) -> dict[str, Any]:
    """Run the measurements against the store at ``url`` (in its own cluster namespace)."""
    import redis

    ns = f"bench{int(time.time() * 1e3) % 10**9}"
    a = ClusterStore(url, "bench-a", cluster=ns, lease_ms=600_000, heartbeat=False)
    b = ClusterStore(url, "bench-b", cluster=ns, lease_ms=600_000, heartbeat=False)
    raw = redis.Redis.from_url(url)
    try:
        n_max = max(sizes)
        keys = np.stack([np.arange(n_max, dtype=np.uint64), np.full(n_max, 0xB, dtype=np.uint64)], axis=1)
        a.publish(keys, np.arange(n_max))
        b.publish(keys[: n_max // 2], np.arange(n_max // 2))  # half the keys have two holders
        names = [a.prefix.encode() + b"b:" + keys[i].astype("<u8").tobytes() for i in range(n_max)]
        out: dict[str, Any] = {"url": url, "server": raw.info("server").get("redis_version"), "lookup": []}
        out["ops_per_s"] = {
            "get_sequential": _rate(lambda: raw.get("kvt-bench-missing"), seconds),
            "renew_sequential": _rate(a.renew, seconds),
            "claim_trace_sequential": _rate(lambda: a.claim_trace("bench-trace"), seconds),
        }
        pipe_n = 1000

        def pipelined() -> None:
            p = raw.pipeline(transaction=False)
            for _ in range(pipe_n):
                p.get("kvt-bench-missing")
            p.execute()

        out["ops_per_s"]["get_pipelined"] = pipe_n * _rate(pipelined, seconds)
        for n in sizes:
            k = keys[:n]
            t_lookup = _times(lambda: a.lookup(k), repeats)

            def per_key() -> None:
                for name in names[:n]:
                    raw.hgetall(name)

            def pipeline() -> None:
                p = raw.pipeline(transaction=False)
                for name in names[:n]:
                    p.hgetall(name)
                p.execute()

            lk = a.lookup(k)
            rows = np.arange(lk.records.shape[0])
            t_validate = _times(lambda: a.validate_lookup(lk, rows, k), repeats)
            t_per_key = _times(per_key, max(3, repeats // 10)) if n <= 1024 else None
            t_pipe = _times(pipeline, repeats)
            t_publish = _times(lambda: b.publish(k, np.arange(n)), max(3, repeats // 3))
            row = {
                "keys": n, "records": int(lk.records.shape[0]),
                "lookup_ms_p50": float(np.median(t_lookup) * 1e3), "lookup_ms_p99": float(np.percentile(t_lookup, 99) * 1e3),
                "lookup_us_per_key": float(np.median(t_lookup) / n * 1e6),
                "validate_ms_p50": float(np.median(t_validate) * 1e3),
                "publish_ms_p50": float(np.median(t_publish) * 1e3),
                "anchor_pipelined_hgetall_ms_p50": float(np.median(t_pipe) * 1e3),
                "anchor_per_key_hgetall_ms_p50": float(np.median(t_per_key) * 1e3) if t_per_key is not None else None,
            }
            row["lookup_vs_pipeline"] = row["lookup_ms_p50"] / row["anchor_pipelined_hgetall_ms_p50"]
            if row["anchor_per_key_hgetall_ms_p50"] is not None:
                row["lookup_vs_per_key"] = row["lookup_ms_p50"] / row["anchor_per_key_hgetall_ms_p50"]
            out["lookup"].append(row)
        return out
    finally:
        for s in (a, b):
            s.close()
        for key in raw.scan_iter(match=f"kvt:{{{ns}}}:*", count=1000):
            raw.delete(key)
        raw.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="the store (default: start a throwaway redis-server)")
    ap.add_argument("--sizes", default="1,16,128,1024,8192", help="lookup sizes (keys), comma separated")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    sizes = tuple(int(x) for x in args.sizes.split(","))

    def run(url: str) -> dict[str, Any]:
        return measure(url, sizes, args.repeats)

    if args.url:
        res = run(args.url)
    else:
        with local_redis() as url:
            res = run(url)
    print(f"redis {res['server']}: ops/s " + ", ".join(f"{k} {v:,.0f}" for k, v in res["ops_per_s"].items()))
    print(f"{'keys':>6} {'lookup p50 ms':>14} {'p99 ms':>8} {'us/key':>7} {'validate ms':>12} "
          f"{'publish ms':>11} {'pipeline ms':>12} {'per-key ms':>11}")
    for r in res["lookup"]:
        per_key = f"{r['anchor_per_key_hgetall_ms_p50']:.2f}" if r["anchor_per_key_hgetall_ms_p50"] is not None else "-"
        print(f"{r['keys']:>6} {r['lookup_ms_p50']:>14.3f} {r['lookup_ms_p99']:>8.3f} {r['lookup_us_per_key']:>7.2f} "
              f"{r['validate_ms_p50']:>12.3f} {r['publish_ms_p50']:>11.3f} "
              f"{r['anchor_pipelined_hgetall_ms_p50']:>12.3f} {per_key:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
