"""GPU benchmarks: kvtier's CUDA copy backend and GPUDirect Storage against their anchors, same run.

Cases (each moves the same bytes both ways, interleaved with its anchor, ``--reps`` times):

* ``hbm->dram`` / ``dram->hbm``: gather / scatter of random KV blocks between a registered GPU KV
  cache (real Llama-3-8B and Qwen2-0.5B shapes, every layout kind) and a pinned ``HostPool``,
  against ``cudaMemcpy`` of one contiguous pinned buffer of the same size (torch ``copy_``, which
  is the PCIe ceiling the design contract names: "HBM <-> pinned DRAM near the PCIe bandwidth
  cudaMemcpy reaches on that machine").
* ``hbm->hbm``: block copy between two registrations on the same GPU, against one contiguous
  device-to-device ``cudaMemcpy`` of the same bytes.
* ``gds write`` / ``gds read``: ``GdsFile`` (cuFile) moving 2 MiB blocks between GPU memory and a
  file, against kvtier's own staged path for the same blocks: NVMe tier (io_uring, O_DIRECT) into
  a pinned pool, then the CUDA copy engine into HBM. Reported only where the GDS probe says cuFile
  is usable; otherwise the probe's reason is printed and recorded.

Run on a machine with a GPU: ``python bench/bench_gpu.py --json gpu.json``. Prints a table and
exits non-zero when no GPU is usable (saying why).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import kvtier
import numpy as np
from kvtier import _core


def _gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    probe = _core.probe_cuda()
    if not probe["usable"]:
        return f"kvtier's CUDA backend is not usable: {probe['reason']}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def _median_gbps(nbytes: int, samples: list[float]) -> float:
    return nbytes / statistics.median(samples) / 1e9


def copy_case(model: tuple[str, int, int, int], kind: str, mib: int, reps: int,
              engine: kvtier.CopyEngine, rng: np.random.Generator) -> list[dict[str, Any]]:
    import torch

    name, layers, heads, dim = model
    layout = kvtier.KVLayout(num_layers=layers, kv_heads=heads, head_dim=dim, block_tokens=16, dtype="bfloat16")
    lk = kvtier.LAYOUT_KINDS[kind]
    n = max(1, (mib << 20) // layout.block_bytes)
    total = 2 * n
    count = layout.num_layers if lk.per_layer else 1
    kv = [torch.randn(lk.expected_shape(layout, total), device="cuda").to(torch.bfloat16) for _ in range(count)]
    reg = kvtier.register_kv(kv if lk.per_layer else kv[0], layout, kind)
    pool = kvtier.HostPool(layout, num_blocks=n)
    slots = pool.allocate(n)
    nbytes = n * layout.block_bytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    kv_ids = rng.permutation(total)[:n].astype(np.int32)
    other_ids = rng.permutation(total)[:n].astype(np.int32)
    kv2 = [torch.zeros_like(t) for t in kv]
    reg2 = kvtier.register_kv(kv2 if lk.per_layer else kv2[0], layout, kind)

    def timed(fn: Any) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    ops = {
        "hbm->dram": (lambda: engine.gather(reg, kv_ids, pool, slots).wait(timeout=60),
                      lambda: host.copy_(dev, non_blocking=True)),
        "dram->hbm": (lambda: engine.scatter(pool, slots, reg, other_ids).wait(timeout=60),
                      lambda: dev.copy_(host, non_blocking=True)),
        "hbm->hbm": (lambda: engine.transfer(reg, kv_ids, reg2, other_ids).wait(timeout=60),
                     lambda: dev2.copy_(dev, non_blocking=True)),
    }
    rows = []
    for direction, (ours, anchor) in ops.items():
        ours(), anchor()  # warm-up
        a, b = [], []
        for _ in range(reps):
            a.append(timed(ours))
            b.append(timed(anchor))
        k, c = _median_gbps(nbytes, a), _median_gbps(nbytes, b)
        rows.append({"case": f"{name} {kind} {direction}", "kvtier_gbps": round(k, 2),
                     "anchor": "cudaMemcpy (torch copy_, contiguous)", "anchor_gbps": round(c, 2),
                     "ratio": round(k / c, 3), "bytes": nbytes, "blocks": n, "block_bytes": layout.block_bytes,
                     "runs_per_block": reg.num_segments, "reps": reps,
                     "samples_s": {"kvtier": a, "anchor": b}})
    # exactness of the last round trip: the pool holds kv[kv_ids]; scattered to other_ids
    bd = lk.block_dim
    engine.gather(reg, kv_ids, pool, slots).wait(timeout=60)
    engine.scatter(pool, slots, reg2, other_ids).wait(timeout=60)
    torch.cuda.synchronize()
    ki = torch.as_tensor(kv_ids, device="cuda", dtype=torch.long)
    oi = torch.as_tensor(other_ids, device="cuda", dtype=torch.long)
    for s, d in zip(kv, kv2):
        if not torch.equal(s.index_select(bd, ki).view(torch.int16), d.index_select(bd, oi).view(torch.int16)):
            raise AssertionError(f"{name} {kind}: blocks came back different after gather + scatter")
    reg.close(), reg2.close()
    return rows


def gds_cases(mib: int, reps: int, directory: str, engine: kvtier.CopyEngine) -> list[dict[str, Any]]:
    import torch

    probe = _core.probe_gds()
    if not probe["usable"]:
        return [{"case": "gds", "skipped": f"GPUDirect Storage not usable: {probe['reason']}", "probe": probe}]
    chunk = 2 << 20
    n = max(1, (mib << 20) // chunk)
    nbytes = n * chunk
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    torch.cuda.synchronize()
    rows: list[dict[str, Any]] = []
    # the staged anchor: HBM <-> pinned pool (CUDA copy engine) <-> NVMe tier (io_uring, O_DIRECT)
    layout = kvtier.KVLayout(num_layers=32, kv_heads=8, head_dim=128, block_tokens=16, dtype="bfloat16")
    assert layout.block_bytes == chunk
    shape = kvtier.LAYOUT_KINDS["blocks_first"].expected_shape(layout, n)
    reg_src = kvtier.register_kv(src.view(torch.bfloat16).view(shape), layout, "blocks_first")
    reg_dst = kvtier.register_kv(dst.view(torch.bfloat16).view(shape), layout, "blocks_first")
    ids = np.arange(n, dtype=np.int32)
    pool = kvtier.HostPool(layout, num_blocks=n)
    slots = pool.allocate(n)
    tier = kvtier.NvmeTier(tempfile.mkdtemp(dir=directory), pool, num_slots=n, queue_depth=64)
    keys = np.arange(1, n + 1, dtype=np.uint64)
    try:
        f = _core.GdsFile.open(os.path.join(directory, "gds.blocks"), create=True, size_bytes=nbytes)
    except Exception:
        tier.close()
        reg_src.close(), reg_dst.close()
        raise
    try:
        f.register_buffer(src)
        f.register_buffer(dst)
        ios = np.array([[src.data_ptr() + i * chunk, i * chunk, chunk] for i in range(n)], dtype=np.uint64)
        rios = ios.copy()
        rios[:, 0] = dst.data_ptr() + np.arange(n, dtype=np.uint64) * chunk

        def gds_write() -> None:
            f.write(ios)
            f.sync()

        def gds_read() -> None:
            f.read(rios)
            torch.cuda.synchronize()

        def staged_write() -> None:  # HBM -> pinned pool -> NVMe tier (durable)
            engine.gather(reg_src, ids, pool, slots).wait(timeout=60)
            tier.evict(keys)
            tier.write(keys, slots).wait(timeout=120)

        def staged_read() -> None:  # NVMe tier -> pinned pool -> HBM
            tier.read(keys, slots).wait(timeout=120)
            engine.scatter(pool, slots, reg_dst, ids).wait(timeout=60)

        for name, ours, anchor in (("gds write", gds_write, staged_write), ("gds read", gds_read, staged_read)):
            ours(), anchor()
            a, b = [], []
            for _ in range(reps):
                os.sync()
                t = time.perf_counter(); ours(); a.append(time.perf_counter() - t)
                os.sync()
                t = time.perf_counter(); anchor(); b.append(time.perf_counter() - t)
            k, c = _median_gbps(nbytes, a), _median_gbps(nbytes, b)
            rows.append({"case": name, "kvtier_gbps": round(k, 2), "anchor": "kvtier staged (NVMe tier + pinned DRAM)",
                         "anchor_gbps": round(c, 2), "ratio": round(k / c, 3), "bytes": nbytes, "blocks": n,
                         "io_mode": f.io_mode, "probe": probe, "reps": reps, "samples_s": {"kvtier": a, "anchor": b}})
        for name, read in (("gds", gds_read), ("staged", staged_read)):
            dst.zero_()
            read()
            torch.cuda.synchronize()
            if not torch.equal(src, dst):
                raise AssertionError(f"the {name} read gave back different bytes than were written")
    finally:
        f.close()
        tier.close()
        reg_src.close(), reg_dst.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=1024, help="bytes per case (MiB)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--gds-dir", default=os.environ.get("KVTIER_GDS_TEST_DIR", tempfile.gettempdir()))
    p.add_argument("--kinds", default=",".join(kvtier.LAYOUT_KINDS), help="KV layout kinds, comma-separated")
    p.add_argument("--no-gds", action="store_true", help="copy cases only")
    p.add_argument("--no-copy", action="store_true", help="GDS cases only")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    why = _gpu_reason()
    if why:
        print(f"bench_gpu: no usable GPU: {why}", file=sys.stderr)
        return 2
    import torch

    engine = kvtier.CopyEngine()
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for model in () if args.no_copy else (("llama3-8b", 32, 8, 128), ("qwen2-0.5b", 24, 2, 64)):
        for kind in args.kinds.split(","):
            rows += copy_case(model, kind, args.mib, args.reps, engine, rng)
            torch.cuda.empty_cache()
    try:
        if not args.no_gds:
            rows += gds_cases(args.mib, max(3, args.reps // 2), args.gds_dir, engine)
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        rows.append({"case": "gds", "error": f"{type(e).__name__}: {e}"})
    report = {"suite": "gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cuda_probe": _core.probe_cuda(), "results": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    print(f"{'case':40s} {'kvtier GB/s':>12s} {'anchor GB/s':>12s} {'ratio':>7s}")
    for r in rows:
        if "kvtier_gbps" in r:
            print(f"{r['case']:40s} {r['kvtier_gbps']:12.2f} {r['anchor_gbps']:12.2f} {r['ratio']:7.3f}")
        else:
            print(f"{r['case']:40s} {r.get('skipped') or r.get('error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
