"""CUDA backend: runs only where a GPU is usable; skips with the probe's reason otherwise."""

from __future__ import annotations

import numpy as np
import pytest

import kvtier
from kvtier import _core

torch = pytest.importorskip("torch")

_probe = _core.probe_cuda()
needs_gpu = pytest.mark.skipif(
    not (_probe["usable"] and torch.cuda.is_available()),
    reason=f"no usable CUDA GPU: {_probe['reason'] or 'torch has no CUDA'}",
)


def test_probe_never_lies() -> None:
    info = _core.build_info()
    assert _probe["compiled"] == info["cuda"]
    if not _probe["usable"]:
        assert _probe["reason"]
        assert "cuda" not in kvtier.CopyEngine().backends
    else:
        assert _probe["device_count"] >= 1 and len(_probe["devices"]) == _probe["device_count"]
        assert "cuda" in kvtier.CopyEngine().backends


def test_host_pool_is_pinned_only_with_a_gpu() -> None:
    pool = kvtier.HostPool(4096, num_blocks=4)
    assert pool.pinned == bool(_probe["usable"])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["vllm_flash", "kv_first", "layers_first"])
def test_gpu_gather_scatter_round_trip(kind: str) -> None:
    layout = kvtier.KVLayout(num_layers=4, kv_heads=2, head_dim=64, block_tokens=16, dtype="bfloat16")
    lk = kvtier.LAYOUT_KINDS[kind]
    count = layout.num_layers if lk.per_layer else 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    src = [torch.randn(lk.expected_shape(layout, 64), generator=gen, device="cuda").to(torch.bfloat16)
           for _ in range(count)]
    dst = [torch.zeros_like(t) for t in src]
    reg_src = kvtier.register_kv(src if lk.per_layer else src[0], layout, kind)
    reg_dst = kvtier.register_kv(dst if lk.per_layer else dst[0], layout, kind)
    pool = kvtier.HostPool(layout, num_blocks=32)
    engine = kvtier.CopyEngine()
    slots = pool.allocate(32)
    rng = np.random.default_rng(0)
    src_ids = rng.permutation(64)[:32]
    dst_ids = rng.permutation(64)[:32]
    engine.gather(reg_src, src_ids, pool, slots).wait(timeout=30)
    engine.scatter(pool, slots, reg_dst, dst_ids).wait(timeout=30)
    torch.cuda.synchronize()
    bd = lk.block_dim
    for s, d in zip(src, dst):
        a = s.index_select(bd, torch.as_tensor(src_ids, device="cuda"))
        b = d.index_select(bd, torch.as_tensor(dst_ids, device="cuda"))
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.gpu
@needs_gpu
def test_gpu_to_gpu_copy() -> None:
    layout = kvtier.KVLayout(num_layers=2, kv_heads=2, head_dim=64, block_tokens=16, dtype="float16")
    a = [torch.randn(16, 2, 16, 2, 64, device="cuda", dtype=torch.float16) for _ in range(2)]
    b = [torch.zeros_like(t) for t in a]
    ra, rb = kvtier.register_kv(a, layout), kvtier.register_kv(b, layout)
    kvtier.CopyEngine().transfer(ra, [0, 5, 7], rb, [1, 2, 3]).wait(timeout=30)
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        assert torch.equal(x[[0, 5, 7]], y[[1, 2, 3]])
