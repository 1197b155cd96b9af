"""A second worker process for the UCX tests and `kvtier bench remote`-style checks.

Run as ``python ucx_peer_worker.py '<json options>'``. It opens a Peer and a registered HostPool
whose blocks hold a known pattern, prints one JSON line (address and pool descriptor, hex), then
serves JSON commands on stdin, one a line, answering each with one JSON line:
``{"op": "digest", "ids": [...]}`` -> per-block BLAKE2b digests; ``{"op": "fill", "seed": s}``
refills the pool; ``{"op": "connect", "address": hex, "descriptor": hex}`` connects back;
``{"op": "stats"}``; ``{"op": "exit"}``. Tests kill it with SIGKILL at chosen moments.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np


def pattern(num_blocks: int, block_bytes: int, seed: int) -> np.ndarray:
    # [num_blocks, block_bytes] uint8, distinct per block and per seed
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)


def digests(view: np.ndarray, ids: list[int]) -> list[str]:
    return [hashlib.blake2b(view[i].tobytes(), digest_size=16).hexdigest() for i in ids]


def main() -> None:
    opts = json.loads(sys.argv[1])
    from kvtier import HostPool
    from kvtier.cluster.peer import Peer

    peer = Peer(
        tls=opts.get("tls"), net_devices=opts.get("net_devices"),
        error_handling=opts.get("error_handling", True), progress=opts.get("progress", "event"),
        transfer_timeout_s=opts.get("transfer_timeout_s", 30.0),
    )
    pool = HostPool(opts["block_bytes"], num_blocks=opts["num_blocks"])
    pool.allocate(opts["num_blocks"])
    view = pool.view()  # [num_blocks, block_bytes]
    view[:] = pattern(opts["num_blocks"], opts["block_bytes"], opts.get("seed", 0))
    desc = peer.register(pool)
    print(json.dumps({"address": peer.address.hex(), "descriptor": desc.hex(), "info": peer.info()}), flush=True)
    remote = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "digest":
            out = {"digests": digests(view, cmd["ids"])}
        elif op == "fill":
            view[:] = pattern(opts["num_blocks"], opts["block_bytes"], cmd["seed"])
            out = {"ok": True}
        elif op == "connect":
            rp = peer.connect(bytes.fromhex(cmd["address"]))
            remote = rp.import_pool(bytes.fromhex(cmd["descriptor"]))
            out = {"peer": rp.id}
        elif op == "get":  # remote[ids] -> pool[ids]
            peer.get(remote, cmd["remote_ids"], pool, cmd["ids"]).wait(60)
            out = {"ok": True}
        elif op == "stats":
            out = {"stats": peer.stats(), "pool_used": int(pool.stats().used_blocks)}
        elif op == "exit":
            print(json.dumps({"ok": True}), flush=True)
            break
        else:
            out = {"error": f"unknown op {op}"}
        print(json.dumps(out), flush=True)
    peer.close()


if __name__ == "__main__":
    main()
