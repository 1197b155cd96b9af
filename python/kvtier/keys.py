"""Block keys: chained 128-bit hashes of token blocks (Note [Block keys] in csrc/index/block_hash.h).

``key_i`` names block i *and everything before it*, so the longest cached prefix of a sequence
is the longest run of its keys found in the cache. Only full blocks get keys: a partial last
block is never cached and its (at most ``block_tokens - 1``) tokens are recomputed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtier import _core
from kvtier.errors import InvalidArgumentError
from kvtier.layout import KVLayout


def make_salt(model: str, layout: KVLayout, kind: str = "", adapter: str = "") -> str:
    """The salt string for a model: equal salts must mean interchangeable KV bytes."""
    return (
        f"kvtier/v1|model={model}|layers={layout.num_layers}|kv_heads={layout.kv_heads}|"
        f"head_dim={layout.head_dim}|block_tokens={layout.block_tokens}|dtype={layout.dtype}|"
        f"kind={kind}|adapter={adapter}"
    )


def as_token_ids(tokens: Any) -> np.ndarray:
    """``tokens`` (a list, numpy array or torch tensor of integer ids) as a contiguous int64 array.

    Float, bool or other non-integer ids are an ``InvalidArgumentError``: converting them with
    ``dtype=int64`` would truncate 3.7 to 3 and hash a context the caller never had."""
    if hasattr(tokens, "__dlpack__") and not isinstance(tokens, np.ndarray):
        tokens = tokens.cpu().numpy() if hasattr(tokens, "cpu") else np.from_dlpack(tokens)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.int64:
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise InvalidArgumentError("token id out of range")
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


def hash_blocks(tokens: Any, block_tokens: int, salt: str) -> np.ndarray:
    """Keys of every full block of ``tokens`` as an ``[n_full_blocks, 2]`` uint64 array."""
    if not isinstance(block_tokens, int) or block_tokens <= 0:
        raise InvalidArgumentError(f"block_tokens must be a positive int, got {block_tokens!r}")
    arr = as_token_ids(tokens)
    hi, lo = _core.salt_key(salt)
    return _core.hash_blocks(arr, block_tokens, hi, lo)
