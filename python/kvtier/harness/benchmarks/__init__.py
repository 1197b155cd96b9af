"""Benchmarks behind ``kvtier bench``: each measures kvtier and its anchor in the same run."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

import numpy as np

import kvtier
from kvtier import _core


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    build = _core.build_info()
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "kvtier": kvtier.__version__,
        "nontemporal_copy": build["nontemporal_copy"],
        "cuda_devices": _core.probe_cuda()["device_count"],
    }
