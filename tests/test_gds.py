"""GPUDirect Storage (cuFile): the probe explains itself and never hangs; GdsFile round trips on a GPU.

The probe's deadline is tested for real: ``_probe_gds_uncached(require_gpu=False)`` runs
cuFileDriverOpen in the probe's child even without a GPU (where it is known to spin forever),
and ``test_hang=True`` makes the child stop before the call on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier import _core

PROBE_KEYS = {
    "compiled": bool, "usable": bool, "detail": str, "reason": str, "library": str, "cufile_version": int,
    "compat_mode": bool, "batch_io": bool, "max_batch_io": int, "elapsed_s": float,
}
MAX_PROBE_S = 10.0  # the default deadline is 5 s; anything near 10 s means the deadline did not hold

_probe = _core.probe_gds()
needs_gds = pytest.mark.skipif(not _probe["usable"], reason=f"GPUDirect Storage not usable: {_probe['reason']}")


def _library_loads() -> bool:
    return _probe["compiled"] and bool(_probe["library"])


def _probe_children() -> list[int]:
    """Our kvtier_gds_probe children still in the process table (running or unreaped)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        if comm.startswith("kvtier_gds_prob") and ppid == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


def test_probe_explains_itself() -> None:
    assert set(_probe) == set(PROBE_KEYS)
    for key, typ in PROBE_KEYS.items():
        assert type(_probe[key]) is typ, f"probe_gds()[{key!r}] is {type(_probe[key]).__name__}"
    assert _probe["compiled"] == _core.build_info()["gds"] == _core.HAVE_GDS
    if not _probe["compiled"]:
        assert not _probe["usable"]
        assert _core.build_info()["gds_why"] in _probe["reason"]
    if _probe["usable"]:
        assert _probe["detail"] and _probe["library"] and _probe["cufile_version"] > 0
    else:
        assert _probe["reason"], "GDS is not usable and the probe says not why"
    assert _probe["elapsed_s"] < MAX_PROBE_S


def test_probe_from_a_cold_process_is_bounded() -> None:
    """The cached probe as `kvtier info` runs it, in a fresh process, timed from outside."""
    code = (
        "import json, time; from kvtier import _core; t = time.monotonic(); p = _core.probe_gds(); "
        "print(json.dumps({'wall': time.monotonic() - t, **p}))"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert p["wall"] < MAX_PROBE_S, p
    assert elapsed < MAX_PROBE_S + 20, "the import plus the probe took far too long"  # import is slow-ish, not 20 s
    assert p["usable"] or p["reason"]


@pytest.mark.skipif(not _library_loads(), reason=f"no libcufile to probe: {_probe['reason']}")
def test_deadline_cuts_a_hanging_driver_open() -> None:
    t0 = time.monotonic()
    p = _core._probe_gds_uncached(timeout_s=1.0, require_gpu=False, test_hang=True)
    elapsed = time.monotonic() - t0
    assert not p["usable"]
    assert "did not return within 1.0 s" in p["reason"], p["reason"]
    assert 0.9 <= elapsed < MAX_PROBE_S
    time.sleep(0.3)  # killed and reaped within ~200 ms
    assert _probe_children() == [], "the hung probe child is still around"


@pytest.mark.skipif(not _library_loads(), reason=f"no libcufile to probe: {_probe['reason']}")
def test_real_driver_open_is_bounded_even_without_a_gpu() -> None:
    """cuFileDriverOpen for real, GPU or not: it succeeds, fails with cuFile's reason, or is cut off."""
    t0 = time.monotonic()
    p = _core._probe_gds_uncached(timeout_s=3.0, require_gpu=False)
    elapsed = time.monotonic() - t0
    assert elapsed < MAX_PROBE_S
    assert p["cufile_version"] > 0, p  # the child got as far as loading libcufile
    if not p["usable"]:
        assert p["reason"]
        assert "cuFileDriverOpen" in p["reason"] or "probe child" in p["reason"], p["reason"]
    time.sleep(0.3)
    assert _probe_children() == []


def test_gds_file_refuses_with_the_probe_reason(tmp_path: Path) -> None:
    if not _core.HAVE_GDS:
        assert not hasattr(_core, "GdsFile")
        return
    if _probe["usable"]:
        pytest.skip("GDS is usable here: the GPU tests cover GdsFile")
    with pytest.raises(kvtier.UnavailableError, match="GPUDirect Storage is not usable here") as e:
        _core.GdsFile.open(str(tmp_path / "blocks"), create=True, size_bytes=1 << 20)
    assert _probe["reason"] in str(e.value)
    assert not (tmp_path / "blocks").exists(), "nothing may be created when GDS is unusable"


def test_info_has_a_gds_row(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.info import info, render

    data = info()
    assert data["gds"] == _probe
    render(data)
    out = capsys.readouterr().out
    assert "gds (cuFile)" in out


# ---------------------------------------------------------------- on a GPU with usable GDS


def _gds_file(tmp_path: Path, size: int, **kw):
    directory = Path(os.environ.get("KVTIER_GDS_TEST_DIR", str(tmp_path)))
    try:
        return _core.GdsFile.open(str(directory / "gds.blocks"), create=True, size_bytes=size, **kw)
    except kvtier.InvalidArgumentError as e:
        if "O_DIRECT" in str(e):
            pytest.skip(f"{e} (set KVTIER_GDS_TEST_DIR to a directory on a local NVMe file system)")
        raise
    except kvtier.UnavailableError as e:  # cuFile refuses files on this file system (a virtual disk, say)
        if "cuFileHandleRegister" in str(e) and _probe["compat_mode"]:
            pytest.skip(f"{e} (set KVTIER_GDS_TEST_DIR to a file system cuFile accepts)")
        raise


def _ios(ptr_offsets: list[tuple[int, int]], base: int, chunk: int) -> np.ndarray:
    return np.array([[base + p, f, chunk] for p, f in ptr_offsets], dtype=np.uint64)


@pytest.mark.gpu
@needs_gds
@pytest.mark.parametrize("use_batch_api", [True, False], ids=["batch", "threads"])
@pytest.mark.parametrize("register", [True, False], ids=["registered", "unregistered"])
def test_gds_round_trip(tmp_path: Path, use_batch_api: bool, register: bool) -> None:
    torch = pytest.importorskip("torch")
    chunk, n = 256 << 10, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    src = torch.randint(0, 256, (n * chunk,), dtype=torch.uint8, device="cuda", generator=gen)
    dst = torch.zeros_like(src)
    torch.cuda.synchronize()
    f = _gds_file(tmp_path, n * chunk, use_batch_api=use_batch_api)
    try:
        # the batch API can be refused (e.g. compatibility mode): then the file says why and uses threads
        assert f.io_mode.startswith(("batch", "threads") if use_batch_api else "threads"), f.io_mode
        if register:
            f.register_buffer(src)
            f.register_buffer(dst)
        rng = np.random.default_rng(0)
        slots = rng.permutation(n)  # chunk i goes to file slot slots[i]
        f.write(_ios([(i * chunk, int(slots[i]) * chunk) for i in range(n)], src.data_ptr(), chunk))
        f.sync()
        order = rng.permutation(n)  # read back in another order
        f.read(_ios([(int(i) * chunk, int(slots[i]) * chunk) for i in order], dst.data_ptr(), chunk))
        torch.cuda.synchronize()
        assert torch.equal(src, dst)
        with pytest.raises(kvtier.TransferError, match="short|past the end|failed"):
            f.read(_ios([(0, n * chunk)], dst.data_ptr(), chunk))  # entirely past the end of the file
        if register:
            f.deregister_buffer(src)
            f.deregister_buffer(dst)
    finally:
        f.close()
    with pytest.raises(kvtier.ClosedError):
        f.read(_ios([(0, 0)], dst.data_ptr(), chunk))


@pytest.mark.gpu
@needs_gds
def test_gds_rejects_host_memory_and_overruns(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    buf = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    host = np.zeros(1 << 20, dtype=np.uint8)
    f = _gds_file(tmp_path, 1 << 20)
    try:
        with pytest.raises(kvtier.DeviceError, match="not CUDA device memory"):
            f.write(np.array([[host.ctypes.data, 0, 4096]], dtype=np.uint64))
        f.register_buffer(buf)
        with pytest.raises(kvtier.InvalidArgumentError, match="past the end of the registered buffer"):
            f.write(np.array([[buf.data_ptr() + (1 << 20) - 4096, 0, 8192]], dtype=np.uint64))
        with pytest.raises(kvtier.InvalidArgumentError, match="overlaps"):
            f.register_buffer(buf[4096:])
    finally:
        f.close()
