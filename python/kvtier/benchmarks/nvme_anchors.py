"""Anchors for ``kvtier bench nvme``: what the disk does for fio and for NIXL's POSIX backend.

Two anchors, both moving ``num_blocks`` blocks of ``block_bytes`` between DRAM and ONE file opened
with O_DIRECT, in one batch:

* :func:`run_fio` runs fio (``--ioengine=io_uring --direct=1``, one job) in a few io_uring
  variants (plain, ``--fixedbufs``, ``--fixedbufs --registerfiles``, and, where hugetlb pages are
  reserved, buffers on huge pages) and reports the best variant, with every variant's numbers.
* :func:`run_nixl_posix` runs NIXL's POSIX backend (one agent, DRAM buffer and O_DIRECT fd
  registered, one transfer of all blocks, timed from ``transfer()`` to ``DONE``) in a separate
  Python process (``python_exe``), so NIXL can live in its own virtual environment. Every timed
  read is checked byte for byte against what was written, so the number is for real data.

Both return a dict with at least ``gbps`` (1e9 bytes/s, median over ``repeat``), ``iops`` and
``cmd``; the rest of the dict says how the number was obtained (samples, variant, device-level
request statistics from ``/sys/block/<dev>/stat``).

What matters most on a virtio disk (see the findings in the module's report): how many
*segments* each request has. A DRAM buffer on 4 KiB pages turns a 1 MiB request into 256
scatter-gather segments; without indirect descriptors a virtio queue of 256 entries then holds
only one such request. A buffer on (transparent) huge pages is one segment per request. That is
why the ``huge_pages`` knob of :func:`run_nixl_posix` and the hugetlb variant of :func:`run_fio`
exist, and why both report the buffer kind.

This module imports only the standard library at import time (numpy and NIXL only inside the
NIXL worker), so ``python nvme_anchors.py --nixl-worker CONFIG_JSON`` runs under any Python that
has numpy and NIXL, without kvtier installed.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

Mode = Literal["write", "read", "randread"]
NixlQueue = Literal["default", "AIO", "URING", "POSIXAIO"]
MODES: tuple[str, ...] = ("write", "read", "randread")

#: fio io_uring variants tried by :func:`run_fio`; ``--hipri=0`` everywhere (no polled queues
#: on virtio/most NVMe setups without ``poll_queues``; hipri=1 would fail or fall back).
FIO_VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "fixedbufs": ["--fixedbufs=1"],
    "fixedbufs+registerfiles": ["--fixedbufs=1", "--registerfiles=1"],
    # Buffers on hugetlb pages (MAP_HUGETLB): one segment per request. Tried only when enough
    # hugetlb pages are free (``/proc/sys/vm/nr_hugepages``); otherwise reported as skipped.
    "fixedbufs+registerfiles+hugebufs": ["--fixedbufs=1", "--registerfiles=1", "--iomem=mmaphuge"],
}

_RESULT_MARK = "KVTIER_NIXL_RESULT "
_HUGE = 2 << 20
_PAGE = mmap.PAGESIZE


# --------------------------------------------------------------------------------------------
# shared helpers


def _check_args(block_bytes: int, num_blocks: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if block_bytes <= 0 or block_bytes % 4096:
        raise ValueError(f"block_bytes must be a positive multiple of 4096 (O_DIRECT), got {block_bytes}")
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")


def _block_device_stat_path(path: str) -> str | None:
    """``/sys/block/<disk>/stat`` of the whole disk holding ``path`` (None if not found)."""
    try:
        st = os.stat(path if os.path.exists(path) else os.path.dirname(os.path.abspath(path)))
        sys_dir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError:
        return None
    for d in (sys_dir, os.path.dirname(sys_dir)):  # a partition's stat counts, but queue is the disk's
        if os.path.exists(os.path.join(d, "stat")) and os.path.exists(os.path.join(d, "queue")):
            return os.path.join(d, "stat")
    return os.path.join(sys_dir, "stat") if os.path.exists(os.path.join(sys_dir, "stat")) else None


def _read_dev_stat(stat_path: str | None) -> list[int] | None:
    if stat_path is None:
        return None
    try:
        with open(stat_path) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None


def _dev_stat_delta(before: list[int] | None, after: list[int] | None, seconds: float) -> dict[str, Any] | None:
    """Requests the block layer completed between two reads of ``/sys/block/<dev>/stat``.

    Fields (Documentation/block/stat.rst): 0 read ios, 2 read sectors, 4 write ios, 6 write
    sectors, 10 time in queue (ms, the sum over requests, so / elapsed = mean requests in flight).
    Other processes' I/O on the same disk counts too: read it as a hint, not as a measurement.
    """
    if before is None or after is None or len(before) < 11 or len(after) < 11 or seconds <= 0:
        return None
    d = [a - b for a, b in zip(after, before)]
    ios = d[0] + d[4]
    sectors = d[2] + d[6]
    return {
        "read_requests": d[0],
        "write_requests": d[4],
        "mean_request_kib": round(sectors * 512 / ios / 1024, 1) if ios else None,
        "mean_requests_in_flight": round(d[10] / 1000 / seconds, 1),
    }


def _summary(samples_s: Sequence[float], nbytes: int, num_blocks: int) -> dict[str, Any]:
    med = statistics.median(samples_s)
    best = min(samples_s)
    return {
        "gbps": round(nbytes / med / 1e9, 3),
        "iops": round(num_blocks / med, 1),
        "gbps_best": round(nbytes / best / 1e9, 3),
        "samples_s": [round(s, 6) for s in samples_s],
    }


def hugetlb_free_bytes() -> int:
    """Bytes of free hugetlb pages of the default size (0 when none are reserved)."""
    free = size_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    free = int(line.split()[1])
                elif line.startswith("Hugepagesize:"):
                    size_kib = int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return free * size_kib * 1024


# --------------------------------------------------------------------------------------------
# fio


def fio_available(fio: str = "fio") -> str | None:
    """None when ``fio`` runs and has the io_uring engine; otherwise why not."""
    exe = shutil.which(fio)
    if exe is None:
        return f"{fio!r} not found on PATH (Debian/Ubuntu: apt-get install fio)"
    try:
        out = subprocess.run([exe, "--enghelp"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe} --enghelp failed: {e}"
    if "io_uring" not in out.stdout:
        return f"{exe} was built without the io_uring engine"
    return None


def _fio_cmd(fio: str, path: str, block_bytes: int, num_blocks: int, queue_depth: int, mode: str,
             runtime_limit_s: float, extra: Sequence[str]) -> list[str]:
    cmd = [
        fio, "--name=kvtier-nvme-anchor", f"--filename={path}",
        "--ioengine=io_uring", "--direct=1", "--hipri=0", "--thread", "--numjobs=1",
        f"--bs={block_bytes}", f"--iodepth={queue_depth}", f"--size={block_bytes * num_blocks}",
        f"--rw={mode}", f"--runtime={max(1, int(runtime_limit_s))}",
        # Writes overwrite a file fio laid out (wrote) beforehand, outside the timed phase, so a
        # write anchor never pays for extending the file or converting unwritten extents.
        "--overwrite=1", "--output-format=json",
    ]
    return cmd + list(extra)


def _fio_once(cmd: list[str], mode: str, timeout_s: float) -> dict[str, Any]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"fio exited {out.returncode}: {(out.stderr or out.stdout).strip()[-2000:]}")
    text = out.stdout
    data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {out.stderr.strip()[-2000:]}")
    side = job["write" if mode == "write" else "read"]
    runtime_ms = side["runtime"]
    return {
        "seconds": side["io_bytes"] / side["bw_bytes"] if side["bw_bytes"] else runtime_ms / 1e3,
        "io_bytes": side["io_bytes"],
        "bw_bytes": side["bw_bytes"],
        "iops": side["iops"],
        "clat_mean_us": round(side.get("clat_ns", {}).get("mean", 0.0) / 1e3, 1),
        "usr_cpu": job.get("usr_cpu"),
        "sys_cpu": job.get("sys_cpu"),
    }


def _ensure_written(path: str, nbytes: int, block_bytes: int, fio: str, timeout_s: float) -> None:
    """Make sure ``path`` holds ``nbytes`` of data really written (not a hole) before reads."""
    try:
        st = os.stat(path)
        if st.st_size >= nbytes and st.st_blocks * 512 >= nbytes:
            return
    except FileNotFoundError:
        pass
    cmd = _fio_cmd(fio, path, block_bytes, max(1, nbytes // block_bytes), 16, "write", timeout_s, [])
    _fio_once(cmd, "write", timeout_s)


def run_fio(path: str, block_bytes: int, num_blocks: int, queue_depth: int, mode: Mode,
            runtime_limit_s: float = 60, *, repeat: int = 3,
            variants: Sequence[str] | None = None, fio: str = "fio") -> dict[str, Any]:
    """fio io_uring O_DIRECT anchor: ``num_blocks`` x ``block_bytes`` at ``queue_depth`` on ``path``.

    Every variant in ``variants`` (default: all of :data:`FIO_VARIANTS`) runs ``repeat`` times,
    interleaved; the anchor is the variant with the highest median. ``gbps`` is 1e9 bytes/s.
    Reads (``read``, ``randread``: each block once, fio's random map) read a file that was
    written beforehand (by a previous write run, or here if the file is short or sparse).
    Returns ``{"gbps", "iops", "cmd", "variant", "variants": {name: {...}}, ...}``.
    """
    _check_args(block_bytes, num_blocks, mode)
    if queue_depth <= 0:
        raise ValueError(f"queue_depth must be positive, got {queue_depth}")
    reason = fio_available(fio)
    if reason:
        raise RuntimeError(reason)
    nbytes = block_bytes * num_blocks
    timeout_s = runtime_limit_s + 60
    if mode == "write":
        # Lay out the file (fio --overwrite=1 would do it inside the first timed run's setup,
        # which is excluded from fio's runtime anyway, but doing it here keeps runs alike).
        _ensure_written(path, nbytes, block_bytes, fio, timeout_s)
    else:
        _ensure_written(path, nbytes, block_bytes, fio, timeout_s)
    names = list(variants) if variants is not None else list(FIO_VARIANTS)
    # mmaphuge needs bs*iodepth (+ fio's alignment slack) of free hugetlb pages.
    need_huge = block_bytes * queue_depth + _HUGE
    results: dict[str, dict[str, Any]] = {}
    runnable = []
    for name in names:
        extra = FIO_VARIANTS[name]
        cmd = _fio_cmd(fio, path, block_bytes, num_blocks, queue_depth, mode, runtime_limit_s, extra)
        results[name] = {"cmd": " ".join(cmd)}
        if any(a.startswith("--iomem=mmaphuge") for a in extra) and hugetlb_free_bytes() < need_huge:
            results[name]["skipped"] = (f"needs {need_huge >> 20} MiB of free hugetlb pages "
                                        f"(have {hugetlb_free_bytes() >> 20}); "
                                        "echo N > /proc/sys/vm/nr_hugepages to try it")
            continue
        runnable.append((name, cmd))
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in runnable}
    stat_path = _block_device_stat_path(path)
    dev: dict[str, list[dict[str, Any] | None]] = {name: [] for name, _ in runnable}
    for _ in range(max(1, repeat)):
        for name, cmd in runnable:
            if "error" in results[name]:
                continue
            before = _read_dev_stat(stat_path)
            t0 = time.perf_counter()
            try:
                samples[name].append(_fio_once(cmd, mode, timeout_s))
            except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                results[name]["error"] = str(e)
                continue
            # The fio process also lays out/opens the file: the window is wider than the I/O.
            dev[name].append(_dev_stat_delta(before, _read_dev_stat(stat_path), time.perf_counter() - t0))
    best_name = None
    for name, _ in runnable:
        s = samples[name]
        if not s or "error" in results[name]:
            continue
        r = _summary([x["seconds"] for x in s], nbytes, num_blocks)
        r["iops"] = round(statistics.median(x["iops"] for x in s), 1)
        r["clat_mean_us"] = statistics.median(x["clat_mean_us"] for x in s)
        r["cpu_pct"] = round(statistics.median((x["usr_cpu"] or 0) + (x["sys_cpu"] or 0) for x in s), 1)
        r["device"] = dev[name][-1]
        results[name].update(r)
        if best_name is None or r["gbps"] > results[best_name]["gbps"]:
            best_name = name
    if best_name is None:
        errors = {n: v.get("error") or v.get("skipped") for n, v in results.items()}
        raise RuntimeError(f"no fio variant ran: {errors}")
    best = results[best_name]
    return {
        "anchor": "fio",
        "gbps": best["gbps"],
        "iops": best["iops"],
        "cmd": best["cmd"],
        "variant": best_name,
        "gbps_best": best["gbps_best"],
        "mode": mode,
        "block_bytes": block_bytes,
        "num_blocks": num_blocks,
        "queue_depth": queue_depth,
        "bytes": nbytes,
        "repeat": repeat,
        "buffers": "hugetlb" if "hugebufs" in best_name else "malloc (4 KiB pages)",
        "variants": results,
    }


# --------------------------------------------------------------------------------------------
# NIXL POSIX backend (in a subprocess)

_NIXL_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl._api")


def _default_python() -> str:
    return os.environ.get("KVTIER_NIXL_PYTHON") or sys.executable


def nixl_available(python_exe: str | None = None, timeout_s: float = 120) -> str | None:
    """None when ``python_exe`` (default ``$KVTIER_NIXL_PYTHON`` or this Python) can import NIXL
    with a POSIX plugin and numpy; otherwise why not."""
    exe = python_exe or _default_python()
    probe = (
        "import importlib, sys\n"
        "import numpy\n"
        f"for m in {_NIXL_MODULES!r}:\n"
        "    try:\n"
        "        api = importlib.import_module(m); break\n"
        "    except ImportError:\n"
        "        api = None\n"
        "if api is None: sys.exit('no NIXL module (pip install nixl-cu12)')\n"
        "a = api.nixl_agent('kvtier-probe', api.nixl_agent_config(enable_prog_thread=False, backends=[]))\n"
        "if 'POSIX' not in a.get_plugin_list(): sys.exit('NIXL has no POSIX plugin')\n"
    )
    try:
        out = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe}: {e}"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return f"{exe}: {lines[-1] if lines else f'exit {out.returncode}'}"
    return None


def run_nixl_posix(path: str, block_bytes: int, num_blocks: int, mode: Mode, repeat: int = 5, *,
                   python_exe: str | None = None, io_queue: NixlQueue = "default",
                   huge_pages: bool = True, seed: int = 0, timeout_s: float = 600) -> dict[str, Any]:
    """NIXL POSIX-backend anchor: one batched transfer of ``num_blocks`` x ``block_bytes``.

    Runs in ``python_exe`` (default ``$KVTIER_NIXL_PYTHON`` or this Python) as
    ``python -I nvme_anchors.py --nixl-worker CONFIG``; the result comes back as JSON on stdout.
    The worker writes random data to ``path`` first (untimed), then times ``repeat`` transfers:
    ``write`` overwrites the same blocks; ``read`` reads them back in order; ``randread`` reads
    them in a random permutation (one descriptor per block). Every timed read, and a read-back
    after the timed writes, is compared byte for byte with the data written (``verified``).
    ``io_queue`` picks NIXL's kernel interface (``default`` is Linux AIO in the PyPI wheels);
    ``huge_pages`` puts the DRAM buffer on transparent huge pages (as numpy does by default).
    Returns ``{"gbps", "iops", "cmd", "verified", "samples_s", "device", ...}``.
    """
    _check_args(block_bytes, num_blocks, mode)
    exe = python_exe or _default_python()
    cfg = {"path": os.path.abspath(path), "block_bytes": block_bytes, "num_blocks": num_blocks,
           "mode": mode, "repeat": max(1, repeat), "io_queue": io_queue, "huge_pages": huge_pages,
           "seed": seed}
    # -I: the script's folder (which has a copy.py) must not shadow the standard library.
    cmd = [exe, "-I", os.path.abspath(__file__), "--nixl-worker", json.dumps(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    result = None
    for line in out.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            result = json.loads(line[len(_RESULT_MARK):])
    if out.returncode != 0 or result is None:
        tail = (out.stderr or out.stdout).strip()[-3000:]
        raise RuntimeError(f"NIXL worker failed (exit {out.returncode}): {tail}")
    if "error" in result:
        raise RuntimeError(f"NIXL worker: {result['error']}")
    result["cmd"] = " ".join(cmd[:4]) + " '" + cmd[4] + "'"
    return result


def _alloc_buffer(nbytes: int, huge_pages: bool) -> tuple[mmap.mmap, Any, int]:
    """An anonymous, 2 MiB-aligned, populated buffer; returns (mapping, uint8 view, address)."""
    import numpy as np

    mm = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        mm.madvise(advice)
    whole = np.frombuffer(mm, dtype=np.uint8)
    base = whole.ctypes.data
    off = (-base) % _HUGE
    view = whole[off:off + nbytes]
    view.fill(0)  # fault every page in now, not inside a timed transfer
    return mm, view, base + off


def _anon_huge_kib() -> int | None:
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _nixl_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import importlib

    import numpy as np

    api = None
    for name in _NIXL_MODULES:
        try:
            api = importlib.import_module(name)
            break
        except ImportError:
            continue
    if api is None:
        return {"error": "no NIXL module importable (pip install nixl-cu12)"}
    path: str = cfg["path"]
    bb: int = cfg["block_bytes"]
    n: int = cfg["num_blocks"]
    mode: str = cfg["mode"]
    repeat: int = cfg["repeat"]
    nbytes = bb * n
    rng = np.random.default_rng(cfg["seed"])
    expected = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).reshape(n, bb)
    perm = rng.permutation(n) if mode == "randread" else np.arange(n)

    mm, buf, addr = _alloc_buffer(nbytes, cfg["huge_pages"])
    blocks = buf.reshape(n, bb)
    thp_kib = _anon_huge_kib()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        if os.fstat(fd).st_size < nbytes:
            os.ftruncate(fd, nbytes)  # DIO writes past EOF are synchronous on ext4/xfs
        agent_name = f"kvtier-nvme-anchor-{os.getpid()}"
        agent = api.nixl_agent(agent_name, api.nixl_agent_config(
            enable_prog_thread=False, backends=[], capture_telemetry=True))
        params: dict[str, str] = {}
        if cfg["io_queue"] == "AIO":
            params["use_aio"] = "true"
        elif cfg["io_queue"] == "URING":
            params["use_uring"] = "true"
        elif cfg["io_queue"] == "POSIXAIO":
            params["use_posix_aio"] = "true"
        agent.create_backend("POSIX", params)
        dram_reg = agent.register_memory([(addr, nbytes, 0, "")], "DRAM", backends=["POSIX"])
        file_reg = agent.register_memory([(0, nbytes, fd, "")], "FILE", backends=["POSIX"])
        dram_seq = agent.get_xfer_descs([(addr + i * bb, bb, 0) for i in range(n)], "DRAM")
        file_seq = agent.get_xfer_descs([(i * bb, bb, fd) for i in range(n)], "FILE")
        file_perm = agent.get_xfer_descs([(int(p) * bb, bb, fd) for p in perm], "FILE")

        def run(handle: Any) -> float:
            t0 = time.perf_counter()
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            t1 = time.perf_counter()
            if state != "DONE":
                raise RuntimeError(f"NIXL transfer ended in state {state}")
            return t1 - t0

        def verify() -> bool:
            if mode == "randread":
                return all(np.array_equal(blocks[i], expected[perm[i]]) for i in range(n))
            return bool(np.array_equal(blocks, expected))

        wr = agent.initialize_xfer("WRITE", dram_seq, file_seq, agent_name)
        rd = agent.initialize_xfer("READ", dram_seq, file_perm if mode == "randread" else file_seq,
                                   agent_name)
        blocks[:] = expected
        run(wr)  # lay the data out (untimed), so reads read real data and writes overwrite
        stat_path = _block_device_stat_path(path)
        samples: list[float] = []
        devs: list[dict[str, Any] | None] = []
        verified = True
        for _ in range(repeat):
            if mode != "write":
                buf.fill(0)
            before = _read_dev_stat(stat_path)
            s = run(rd if mode != "write" else wr)
            devs.append(_dev_stat_delta(before, _read_dev_stat(stat_path), s))
            samples.append(s)
            if mode != "write":
                verified = verified and verify()
        if mode == "write":
            buf.fill(0)
            run(rd)
            verified = verify()
        tele: dict[str, Any] = {}
        try:
            t = agent.get_xfer_telemetry(rd if mode != "write" else wr)
            tele = {"desc_count": int(t.descCount), "post_us": int(t.postDuration),
                    "xfer_us": int(t.xferDuration)}
        except Exception:  # telemetry is informative only
            pass
        backend_params = agent.get_backend_params("POSIX")
        for h in (wr, rd):
            agent.release_xfer_handle(h)
        agent.deregister_memory(dram_reg, backends=["POSIX"])
        agent.deregister_memory(file_reg, backends=["POSIX"])
    finally:
        os.close(fd)
    res = {"anchor": "nixl-posix", **_summary(samples, nbytes, n), "verified": verified,
           "mode": mode, "block_bytes": bb, "num_blocks": n, "bytes": nbytes, "repeat": repeat,
           "io_queue": cfg["io_queue"], "backend_params": dict(backend_params),
           "buffers": "transparent huge pages" if cfg["huge_pages"] else "4 KiB pages",
           "anon_huge_kib": thp_kib, "device": devs[len(devs) // 2], "telemetry": tele,
           "nixl_module": api.__name__.rsplit(".", 1)[0]}
    del blocks, buf
    try:
        mm.close()
    except BufferError:
        pass
    return res


def _worker_main(argv: Sequence[str]) -> int:
    cfg = json.loads(argv[0])
    try:
        res = _nixl_worker(cfg)
    except Exception as e:  # reported to the parent as JSON, not as a traceback only
        res = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(_RESULT_MARK + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--nixl-worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} --nixl-worker CONFIG_JSON (used by run_nixl_posix)")
