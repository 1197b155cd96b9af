"""Build information, run-time probes and the error table (the `kvtier` CLI has its own tests)."""

from __future__ import annotations

import numpy as np
import pytest

import kvtier
from kvtier import _core, errors

BUILD_KEYS = {
    "compiler": str, "build_type": str, "cuda": bool, "cuda_why": str, "cuda_architectures": str,
    "io_uring": bool, "io_uring_why": str, "ucx": bool, "ucx_why": str, "gds": bool, "gds_why": str,
    "nontemporal_copy": str,
    "hardware_threads": int,
}


def test_build_info_keys_and_types() -> None:
    info = _core.build_info()
    assert set(info) == set(BUILD_KEYS)
    for key, typ in BUILD_KEYS.items():
        assert type(info[key]) is typ, f"build_info()[{key!r}] is {type(info[key]).__name__}"
    assert info["build_type"] in {"release", "debug"}
    assert info["nontemporal_copy"] in {"avx512", "avx2", "memcpy"}
    assert info["hardware_threads"] >= 1
    assert info["compiler"].split()[0] in {"gcc", "clang"}
    for feature in ("cuda", "io_uring", "ucx", "gds"):
        if not info[feature]:
            assert info[f"{feature}_why"], f"{feature} is not compiled in and build_info() says not why"


def test_build_info_matches_this_build_and_machine() -> None:
    """build_info() tells the truth: what it says was compiled in is what the module offers, and
    what it says about the machine is what the OS says."""
    import os
    import platform

    info = _core.build_info()
    assert info["build_type"] == "release"  # pyproject.toml: cmake.build-type = "Release"
    assert info["io_uring"] == bool(getattr(_core, "HAVE_NVME", False))
    assert info["gds"] == bool(getattr(_core, "HAVE_GDS", False))
    assert info["hardware_threads"] == os.cpu_count()
    flags: set[str] = set()
    if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), "flags:").split(":", 1)[1].split())
        # chosen at load time from the CPU's features: the widest streaming store it has
        expected = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "memcpy"
        assert info["nontemporal_copy"] == expected, flags & {"avx512f", "avx2"}


@pytest.mark.parametrize("name,build_key", [("probe_uring", "io_uring"), ("probe_ucx", "ucx")])
def test_feature_probes_explain_themselves(name: str, build_key: str) -> None:
    probe = getattr(_core, name)()
    assert set(probe) == {"compiled", "usable", "detail", "reason", "items"}
    assert isinstance(probe["compiled"], bool) and isinstance(probe["usable"], bool)
    assert isinstance(probe["detail"], str) and isinstance(probe["reason"], str)
    assert isinstance(probe["items"], list) and all(isinstance(i, str) for i in probe["items"])
    assert probe["compiled"] == _core.build_info()[build_key]
    if not probe["compiled"]:
        assert not probe["usable"]
    if not probe["usable"]:
        assert probe["reason"], f"{name}: not usable and no reason"
    else:
        assert probe["detail"], f"{name}: usable but no detail"


def test_cuda_probe_explains_itself() -> None:
    probe = _core.probe_cuda()
    assert set(probe) == {"compiled", "usable", "device_count", "runtime_version", "driver_version",
                          "devices", "reason"}
    assert probe["compiled"] == _core.build_info()["cuda"]
    if not probe["compiled"]:
        assert not probe["usable"]
    if probe["usable"]:
        assert probe["device_count"] >= 1 and len(probe["devices"]) == probe["device_count"]
    else:
        assert probe["reason"], "CUDA is not usable and the probe says not why"
        assert "cuda" not in kvtier.CopyEngine().backends
    assert "cpu" in kvtier.CopyEngine().backends


def test_engine_reports_threads() -> None:
    assert kvtier.CopyEngine(threads=3).threads == 3
    assert 1 <= kvtier.CopyEngine().threads <= 16
    assert kvtier.default_engine() is kvtier.default_engine()


@pytest.mark.gpu
def test_gpu_marker_runs_only_where_cuda_is_usable() -> None:
    """Collected everywhere; skipped by conftest with the probe's reason unless a GPU is usable."""
    assert _core.probe_cuda()["usable"]
    assert "cuda" in kvtier.CopyEngine().backends


def test_gpu_marker_skip_carries_the_probe_reason(request: pytest.FixtureRequest) -> None:
    from testenv import cuda_usable

    usable, reason = cuda_usable()
    if usable:
        pytest.skip("a GPU is usable here: gpu tests run")
    gpu_item = next(i for i in request.session.items if i.name == "test_gpu_marker_runs_only_where_cuda_is_usable")
    skips = [m for m in gpu_item.iter_markers("skip")]
    assert skips and reason in skips[0].kwargs["reason"]
    if not _core.probe_cuda()["usable"]:
        assert _core.probe_cuda()["reason"] in skips[0].kwargs["reason"]


def test_every_status_code_maps_to_its_exception_class() -> None:
    codes = _core.STATUS_CODES
    assert set(codes) == set(errors._BY_CODE_NAME)
    assert len(set(codes.values())) == len(codes)
    for cls in errors._BY_CODE_NAME.values():
        assert issubclass(cls, kvtier.KvtierError)
        assert getattr(kvtier, cls.__name__) is cls
    assert issubclass(kvtier.InvalidArgumentError, ValueError)
    assert issubclass(kvtier.DTypeError, TypeError)
    assert issubclass(kvtier.DeviceError, ValueError)
    assert issubclass(kvtier.TransferTimeoutError, TimeoutError)


def test_core_errors_arrive_as_kvtier_exceptions() -> None:
    pool = kvtier.HostPool(64, num_blocks=2)
    # Straight from the core (no Python-side check in between): the table is installed.
    with pytest.raises(kvtier.BlockStateError, match="double free"):
        pool._core.unref(np.array([0], dtype="int32"))
    with pytest.raises(kvtier.InvalidArgumentError, match="out of range"):
        pool._core.ref(np.array([7], dtype="int32"))
