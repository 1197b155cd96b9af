"""A second kvtier worker process for the remote-tier and migration tests.

    python remote_worker_proc.py '<json options>'

Options: ``url``, ``worker``, ``lease_ms``, ``dram_blocks``, ``device_blocks``, ``head_dim``,
``transfer_timeout_s``, ``tls``. It builds a TieredCache (device + DRAM) with a :class:`ClusterWorker`
and a TraceManager, prints ``{"ready": true, ...}``, then serves JSON commands on stdin, one a
line, answering each with one JSON line (``{"exception": ...}`` on failure):

- ``store`` tokens: cache the blocks of ``tokens`` (bytes = :func:`block_bytes_for` of each
  key), demote them to DRAM, publish; -> ``slots`` (DRAM slot of each block).
- ``read`` tokens: match + load into a scratch pool; -> ``hit_blocks``, ``digests`` of the loaded
  blocks, ``exact`` (the loaded bytes are the expected ones), cache ``remote`` metrics.
- ``corrupt`` slot: flip bytes of a DRAM slot behind the directory's back.
- ``drop`` tokens first: drop blocks ``first..`` of ``tokens`` (the store frees their slots).
- ``reuse`` tokens first other: drop them, then store ``other`` (reusing their slots).
- ``trace`` id tokens seq_len: run one step of a trace (begin_step, end_step).
- ``migrate`` id target timeout_s: ``Trace.migrate`` -> the result.
- ``begin`` id tokens: one step of an (adopted) trace: begin_step -> hit tokens, load, end_step.
- ``status``, ``exit``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

import numpy as np


def layout(head_dim: int = 64) -> Any:
    import kvtier

    return kvtier.KVLayout(num_layers=2, kv_heads=2, head_dim=head_dim, block_tokens=16, dtype="float32")


def block_bytes_for(keys: np.ndarray, nbytes: int) -> np.ndarray:
    """[n, nbytes] uint8: the KV bytes every test uses for these block keys (distinct per key)."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 2)
    words = np.arange(nbytes // 4, dtype=np.uint32) * np.uint32(2654435761)
    tag = (keys[:, 1] ^ keys[:, 0]).astype(np.uint64) & np.uint64(0xFFFFFFFF)
    return (words[None, :] ^ tag.astype(np.uint32)[:, None]).view(np.uint8)


def digests(rows: np.ndarray) -> list[str]:
    return [hashlib.blake2b(r.tobytes(), digest_size=12).hexdigest() for r in rows]


def result_dict(r: Any) -> dict[str, Any]:
    return {"state": r.state.value, "owner": r.owner, "fence": r.fence, "blocks_total": r.blocks_total,
            "blocks_present": r.blocks_present, "blocks_moved": r.blocks_moved,
            "blocks_unavailable": r.blocks_unavailable, "bytes_moved": r.bytes_moved, "error": r.error,
            "timings_s": r.timings_s}


class Node:
    """A worker: cache + ClusterWorker + TraceManager, and helpers the tests drive (in either process)."""

    def __init__(self, url: str, worker: str, *, lease_ms: int = 1000, dram_blocks: int = 256,
                 device_blocks: int = 64, head_dim: int = 64, transfer_timeout_s: float = 5.0,
                 tls: str = "posix,cma,tcp") -> None:
        import kvtier
        from kvtier.cache import TieredCache
        from kvtier.cluster.worker import ClusterWorker
        from kvtier.keys import make_salt

        self.L = layout(head_dim)
        bb = self.L.block_bytes
        self.cache = TieredCache(self.L, make_salt("remote-test", self.L), device_bytes=device_blocks * bb,
                                 dram_bytes=dram_blocks * bb)
        cost = kvtier.CostModel(block_bytes=bb, block_tokens=16, bandwidth={"device->dram": 1e10,
                                "dram->device": 1e10}, recompute_s_per_token=1e-3)
        self.traces = kvtier.TraceManager(self.cache, cost)
        self.worker = ClusterWorker(url, worker, self.cache, lease_ms=lease_ms, timeout_s=0.5,
                                    transfer_timeout_s=transfer_timeout_s, traces=self.traces,
                                    tls=tls, net_devices="lo")
        self.src = kvtier.HostPool(bb, num_blocks=max(dram_blocks, 64))  # the "engine's" KV
        self.dst = kvtier.HostPool(bb, num_blocks=max(dram_blocks, 64))
        self.src.allocate(self.src.num_blocks)  # engine-side blocks: always allocated
        self.dst.allocate(self.dst.num_blocks)

    def fill_src(self, keys: np.ndarray) -> None:
        self.src.view()[: len(keys)] = block_bytes_for(keys, self.L.block_bytes)

    def store(self, tokens: Any) -> list[int]:
        from kvtier.cache import DRAM

        keys = self.cache.keys_for(tokens)
        self.fill_src(keys)
        self.cache.store_keys(keys, self.src, np.arange(len(keys)))
        self.cache.demote_keys(keys, DRAM)
        self.worker.flush()
        return self.slots(tokens)

    def slots(self, tokens: Any) -> list[int]:
        keys = self.cache.keys_for(tokens)
        _, blocks, _ = self.cache.index.locate(keys)
        return [int(b) for b in blocks]

    def read(self, tokens: Any) -> dict[str, Any]:
        keys = self.cache.keys_for(tokens)
        m = self.cache.match_keys(keys)
        found = m.hit_blocks
        h = self.cache.load(m, self.dst, np.arange(m.hit_blocks))
        h.wait(30)
        n = m.hit_blocks
        self.cache.release(m)
        got = self.dst.view()[:n]
        exact = bool(np.array_equal(got, block_bytes_for(keys[:n], self.L.block_bytes)))
        return {"found": found, "hit_blocks": n, "exact": exact, "digests": digests(got),
                "remote": self.cache.metrics.snapshot()["remote"]}

    def step(self, trace_id: str, tokens: Any, seq_len: int) -> dict[str, Any]:
        tr = self.traces.traces.get(trace_id) or self.traces.open(trace_id)
        tokens = np.asarray(tokens, dtype=np.int64)
        plan = tr.begin_step(tokens)
        if plan.match is not None and plan.match.hit_blocks:
            self.cache.load(plan.match, self.dst, np.arange(plan.match.hit_blocks)).wait(30)
        keys = self.cache.keys_for(tokens[: seq_len - seq_len % 16])
        self.fill_src(keys)
        tr.end_step(tokens, self.src, seq_len)
        self.worker.flush()
        return {"hit_tokens": int(plan.hit_tokens), "blocks": tr.num_blocks}

    def begin(self, trace_id: str, tokens: Any) -> dict[str, Any]:
        tr = self.traces.get(trace_id)
        plan = tr.begin_step(np.asarray(tokens, dtype=np.int64))
        hit = plan.match.hit_blocks if plan.match is not None else 0
        remote = plan.match.remote is not None if plan.match is not None else False
        tiers = [int(t) for t in plan.match.tiers] if plan.match is not None else []
        if hit:
            self.cache.load(plan.match, self.dst, np.arange(hit)).wait(30)
        toks = np.asarray(tokens, dtype=np.int64)
        self.fill_src(self.cache.keys_for(toks[: len(toks) - len(toks) % 16]))
        tr.end_step(toks, self.src, len(toks))  # the step ran: its KV is cached
        return {"hit_tokens": int(plan.hit_tokens), "hit_blocks": int(hit), "remote_part": remote,
                "tiers": tiers, "blocks": tr.num_blocks}

    def close(self) -> None:
        self.worker.close()
        self.cache.close()


def main() -> None:
    opts = json.loads(sys.argv[1])
    node = Node(opts["url"], opts["worker"], lease_ms=opts.get("lease_ms", 1000),
                dram_blocks=opts.get("dram_blocks", 256), device_blocks=opts.get("device_blocks", 64),
                head_dim=opts.get("head_dim", 64), transfer_timeout_s=opts.get("transfer_timeout_s", 5.0),
                tls=opts.get("tls", "posix,cma,tcp"))
    print(json.dumps({"ready": True, "incarnation": node.worker.store.incarnation}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "store":
                out: dict[str, Any] = {"slots": node.store(cmd["tokens"])}
            elif op == "read":
                out = node.read(cmd["tokens"])
            elif op == "corrupt":
                node.worker._raw_pool.view()[cmd["slot"], :64] ^= 0xFF
                out = {"ok": True}
            elif op == "drop":
                out = {"dropped": node.cache.drop_keys(node.cache.keys_for(cmd["tokens"])[cmd.get("first", 0):])}
            elif op == "reuse":
                node.cache.drop_keys(node.cache.keys_for(cmd["tokens"])[cmd.get("first", 0):])
                out = {"slots": node.store(cmd["other"])}
            elif op == "trace":
                out = node.step(cmd["id"], cmd["tokens"], cmd["seq_len"])
            elif op == "migrate":
                t0 = time.perf_counter()
                res = node.traces.get(cmd["id"]).migrate(cmd["target"], timeout_s=cmd.get("timeout_s", 10.0))
                out = {**result_dict(res), "wall_s": time.perf_counter() - t0}
            elif op == "begin":
                out = node.begin(cmd["id"], cmd["tokens"])
            elif op == "status":
                out = {"status": node.worker.status(), "metrics": node.cache.metrics.snapshot()["remote"]}
            elif op == "exit":
                node.close()
                print(json.dumps({"ok": True}), flush=True)
                return
            else:
                out = {"exception": f"unknown op {op!r}"}
        except Exception as e:  # reported to the test, which fails on it
            out = {"exception": f"{type(e).__name__}: {e}"}
        print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main()
