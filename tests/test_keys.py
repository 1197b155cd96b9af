"""Block keys: chained, deterministic across processes, prefix-sensitive, salted."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import kvtier
from kvtier.keys import hash_blocks, make_salt

LAYOUT = kvtier.KVLayout(num_layers=2, kv_heads=2, head_dim=16, block_tokens=4, dtype="float32")
SALT = make_salt("tiny", LAYOUT)
GOLDEN = [[16191311810913832966, 8728874423025938887]]  # hash_blocks(range(4), 4, "kvtier-golden")


def test_one_key_per_full_block_partial_tail_ignored() -> None:
    assert hash_blocks(np.arange(11), 4, SALT).shape == (2, 2)
    assert hash_blocks(np.arange(3), 4, SALT).shape == (0, 2)
    assert hash_blocks([], 4, SALT).shape == (0, 2)


def test_keys_chain_over_the_whole_prefix() -> None:
    a = hash_blocks(np.arange(16), 4, SALT)
    b = np.arange(16)
    b[1] = 99  # change a token of block 0: every later key changes too
    kb = hash_blocks(b, 4, SALT)
    assert not (a == kb).all(axis=1).any()
    c = np.arange(16)
    c[13] = 99  # change block 3 only
    kc = hash_blocks(c, 4, SALT)
    assert (a[:3] == kc[:3]).all() and not (a[3] == kc[3]).all()
    # a prefix's keys are the prefix of the keys
    assert (hash_blocks(np.arange(8), 4, SALT) == a[:2]).all()


def test_same_tokens_different_position_differ() -> None:
    toks = np.array([5, 5, 5, 5, 5, 5, 5, 5])
    k = hash_blocks(toks, 4, SALT)
    assert not (k[0] == k[1]).all()


def test_salt_separates_models_and_layouts() -> None:
    other = make_salt("tiny", kvtier.KVLayout(2, 2, 16, 4, "bfloat16"))
    assert not (hash_blocks(np.arange(8), 4, SALT) == hash_blocks(np.arange(8), 4, other)).all(axis=1).any()


def _pythonpath() -> dict[str, str]:
    """What a child needs to import this same kvtier: PYTHONPATH where it was installed through it
    (pip install --target, the sanitizer build), LD_LIBRARY_PATH where its native libraries are
    found through it, and the sanitizer runtime preloaded ahead of it."""
    keep = ("PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")
    return {k: os.environ[k] for k in keep if os.environ.get(k)}


def test_deterministic_across_processes_and_hash_seeds() -> None:
    code = (
        "import numpy as np, kvtier; from kvtier.keys import hash_blocks, make_salt;"
        "L = kvtier.KVLayout(2, 2, 16, 4, 'float32');"
        "print(hash_blocks(np.arange(1000, 1040), 4, make_salt('tiny', L)).tolist())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": "", **_pythonpath()}).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(hash_blocks(np.arange(1000, 1040), 4, SALT).tolist())


def test_known_value_is_stable() -> None:
    """A golden key: changing the hash scheme must be a deliberate, versioned change."""
    k = hash_blocks(np.arange(4), 4, "kvtier-golden")
    assert k.dtype == np.uint64 and k.shape == (1, 2)
    assert k.tolist() == GOLDEN


def test_bad_tokens() -> None:
    with pytest.raises(kvtier.InvalidArgumentError, match="position 2"):
        hash_blocks([1, 2, -3, 4], 4, SALT)
    with pytest.raises(kvtier.InvalidArgumentError, match="one-dimensional"):
        hash_blocks(np.zeros((2, 4), dtype=np.int64), 4, SALT)
    with pytest.raises(kvtier.InvalidArgumentError, match="integers"):
        hash_blocks([1.5, 2.0, 3.0, 4.0], 4, SALT)
    with pytest.raises(kvtier.InvalidArgumentError, match="block_tokens"):
        hash_blocks([1, 2, 3, 4], 0, SALT)
    with pytest.raises(kvtier.InvalidArgumentError, match="2\\^32"):
        hash_blocks([1, 2, 3, 1 << 33], 4, SALT)
