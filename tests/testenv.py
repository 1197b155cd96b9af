"""What the test files share by import: the base seed and the GPU probe.

Kept out of ``conftest.py`` on purpose: ``tests/cluster`` has its own conftest, and a plain
``from conftest import ...`` gets whichever conftest pytest imported last.
"""

from __future__ import annotations

import os

from kvtier import _core

BASE_SEED = int(os.environ.get("KVTIER_TEST_SEED", "20250101"))


def cuda_usable() -> tuple[bool, str]:
    """(usable, reason): kvtier's own CUDA probe, and torch must see a GPU too."""
    probe = _core.probe_cuda()
    if not probe["usable"]:
        return False, probe["reason"] or "kvtier's CUDA probe says unusable (no reason given)"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "kvtier's CUDA backend is usable but torch has no CUDA"
    return True, ""
