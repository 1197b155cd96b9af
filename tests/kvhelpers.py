"""Helpers shared by the test files: KV tensors for every layout kind, byte-exact views of them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import kvtier

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int8": torch.int8, "uint8": torch.uint8}


def random_bytes(rng: np.random.Generator, nbytes: int) -> np.ndarray:
    """nbytes random bytes (every bit pattern, NaN payloads included: copies must be exact)."""
    return rng.integers(0, 256, size=nbytes, dtype=np.uint8)


def pattern_bytes(nbytes: int, salt: int = 0) -> np.ndarray:
    """A cheap, position-dependent byte pattern for big buffers (random generation is too slow)."""
    words = (np.arange((nbytes + 3) // 4, dtype=np.uint32) * np.uint32(2654435761)) ^ np.uint32(salt)
    return words.view(np.uint8)[:nbytes].copy()


def make_tensor(shape: tuple[int, ...], dtype: str, lib: str, data: np.ndarray | None = None,
                perm: tuple[int, ...] | None = None) -> Any:
    """A tensor of `shape` holding `data` (uint8 bytes, row-major in the logical shape), or zeros.

    With `perm`, the storage is laid out in dimension order `perm` and the returned tensor is a
    (non-contiguous) permuted view with the logical `shape`.
    """
    itemsize = kvtier.layout.DTYPE_SIZES[dtype]
    n = int(np.prod(shape))
    raw = np.zeros(n * itemsize, np.uint8) if data is None else data
    assert raw.size == n * itemsize
    if lib == "numpy":
        arr = raw.view(np.dtype(dtype)).reshape(shape)
        if perm is not None:
            base = np.ascontiguousarray(arr.transpose(perm))
            inv = tuple(int(i) for i in np.argsort(perm))
            arr = base.transpose(inv)
        return arr if perm is not None else arr.copy()
    t = torch.from_numpy(raw.copy()).view(TORCH_DTYPES[dtype]).reshape(shape)
    if perm is not None:
        base = t.permute(perm).contiguous()
        inv = tuple(int(i) for i in np.argsort(perm))
        t = base.permute(inv)
    return t


def to_bytes(t: Any) -> np.ndarray:
    """The tensor's elements, row-major in its logical shape, as a flat uint8 numpy array."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t).reshape(-1).view(np.uint8).copy()
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def block_slice(t: Any, block_dim: int, n: int) -> Any:
    if isinstance(t, np.ndarray):
        return np.take(t, n, axis=block_dim)
    return t.select(block_dim, n)


def block_bytes_of(tensors: list[Any], kind: str, n: int) -> np.ndarray:
    """Tier format of block n: each tensor's block slice (row-major), tensors in order."""
    bd = kvtier.LAYOUT_KINDS[kind].block_dim
    return np.concatenate([to_bytes(block_slice(t, bd, n)) for t in tensors])


def make_kv(layout: kvtier.KVLayout, kind: str, num_blocks: int, lib: str = "torch",
            rng: np.random.Generator | None = None, perm: tuple[int, ...] | None = None,
            big: bool = False, salt: int = 0) -> list[Any]:
    """The engine-side KV tensors for `kind` (a list: one per layer, or one for all layers),
    filled with random bytes (rng), a cheap pattern (big=True) or zeros."""
    lk = kvtier.LAYOUT_KINDS[kind]
    shape = lk.expected_shape(layout, num_blocks)
    count = layout.num_layers if lk.per_layer else 1
    nbytes = int(np.prod(shape)) * layout.itemsize
    out = []
    for i in range(count):
        if big:
            data = pattern_bytes(nbytes, salt=salt * 7919 + i)
        elif rng is not None:
            data = random_bytes(rng, nbytes)
        else:
            data = None
        out.append(make_tensor(shape, layout.dtype, lib, data, perm))
    return out


def reg_arg(tensors: list[Any], kind: str) -> Any:
    """What register_kv takes for `kind`: the list, or the single tensor."""
    return tensors if kvtier.LAYOUT_KINDS[kind].per_layer else tensors[0]


def register(tensors: list[Any], layout: kvtier.KVLayout, kind: str) -> kvtier.KVRegistration:
    return kvtier.register_kv(reg_arg(tensors, kind), layout, kind)


def snapshot(tensors: list[Any]) -> list[np.ndarray]:
    return [to_bytes(t) for t in tensors]


def assert_blocks_equal(src: list[Any], src_ids: Any, dst: list[Any], dst_ids: Any, kind: str) -> None:
    bd = kvtier.LAYOUT_KINDS[kind].block_dim
    for s, d in zip(src, dst):
        for a, b in zip(np.asarray(src_ids).tolist(), np.asarray(dst_ids).tolist()):
            sa, db = to_bytes(block_slice(s, bd, a)), to_bytes(block_slice(d, bd, b))
            assert np.array_equal(sa, db), f"block {a} -> {b} differs ({kind})"


def assert_other_blocks_unchanged(before: list[np.ndarray], after: list[Any], touched: Any, kind: str,
                                  num_blocks: int) -> None:
    """Blocks not in `touched` hold exactly the bytes they held before (no stray writes)."""
    bd = kvtier.LAYOUT_KINDS[kind].block_dim
    touched_set = set(np.asarray(touched).tolist())
    for b_before, t in zip(before, after):
        shape = tuple(t.shape)
        itemsize = kvtier.layout.DTYPE_SIZES[kvtier.layout.dtype_name(t.dtype)]
        old = b_before.reshape(*shape, itemsize)
        new = to_bytes(t).reshape(*shape, itemsize)
        for n in range(num_blocks):
            if n not in touched_set:
                assert np.array_equal(np.take(old, n, axis=bd), np.take(new, n, axis=bd)), (
                    f"untouched block {n} changed ({kind})"
                )
