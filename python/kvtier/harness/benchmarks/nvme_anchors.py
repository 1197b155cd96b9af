"""Anchors for ``kvtier bench nvme``: what the disk does for fio and for NIXL's POSIX backend.

Both anchors move ``num_blocks`` blocks of ``block_bytes`` between DRAM and ONE file opened with
O_DIRECT, as one batch, and return a dict with at least ``gbps`` (1e9 bytes/s, median over
``repeat`` runs), ``iops`` and ``cmd``; the rest of the dict says how the number was obtained
(every sample, every variant, the buffer kind, and device-level request statistics read from
``/sys/block/<disk>/stat`` around each run).

* :func:`run_fio`: fio, ``--ioengine=io_uring --direct=1 --hipri=0``, one job, in the variants of
  :data:`FIO_VARIANTS` (``--fixedbufs``, ``--registerfiles``, batched submission, hugetlb
  buffers); the anchor is the variant with the best median, and all variants are reported.
* :func:`run_nixl_posix`: NIXL's POSIX backend (one agent, the DRAM buffer and an O_DIRECT fd
  registered, one transfer of all blocks timed from ``transfer()`` to ``DONE``), run in a
  separate Python process (``python_exe``) so NIXL can live in its own virtual environment.
  Every timed read is compared byte for byte with what was written (``verified``).

What decides the numbers on a virtio disk (findings behind this module): the scatter-gather
*segments* per request, and so the DRAM buffer's pages. A buffer on scattered 4 KiB pages
turns a 1 MiB I/O into 256 segments; on the 2-core virtio-blk VM this was measured on
(``max_segments`` 254, no indirect descriptors) every such I/O reached the disk as 512 KiB
requests that never merge with their neighbours. A buffer on huge pages is one segment per I/O,
never split, and adjacent I/Os in flight together merge up to ``max_sectors_kb`` (4 MiB there):
2x the throughput, on the same disk, with either interface. numpy arrays of 4 MiB or more are
on transparent huge pages by default, fio's buffers are not (unless ``--iomem=mmaphuge``): that,
not the I/O interface, is most of the gap between NIXL (Linux AIO) and fio (io_uring) with
their default settings. Hence the ``buffer_pages`` knob of :func:`run_nixl_posix` and the
``hugebufs`` variants of :func:`run_fio`.

This module imports only the standard library at import time (numpy and NIXL only inside the
NIXL worker), so ``python -I nvme_anchors.py --nixl-worker CONFIG_JSON`` runs under any Python
that has numpy and NIXL, without kvtier installed.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

Mode = Literal["write", "read", "randread"]
NixlQueue = Literal["default", "AIO", "URING", "POSIXAIO"]
BufferPages = Literal["huge", "small", "scattered"]
MODES: tuple[str, ...] = ("write", "read", "randread")

#: fio io_uring variants tried by :func:`run_fio`. Every command also has ``--hipri=0`` (no
#: polled queues on virtio, nor on NVMe without ``poll_queues``: hipri=1 fails or falls back).
#: ``{batch}`` becomes ``min(queue_depth, 64)``: submit that many SQEs per io_uring_enter, as
#: NIXL's POSIX backend submits 64 iocbs per io_submit (one block plug, so adjacent I/Os merge).
#: ``--iomem=mmaphuge`` puts fio's buffers on hugetlb pages (MAP_HUGETLB): a 1 MiB I/O is then one
#: scatter-gather segment instead of up to 256. These variants run only when enough hugetlb pages
#: are free (``reserve_hugetlb=True`` reserves them for the run, as root).
FIO_VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "fixedbufs": ["--fixedbufs=1"],
    "fixedbufs+registerfiles": ["--fixedbufs=1", "--registerfiles=1"],
    "fixedbufs+registerfiles+batch": ["--fixedbufs=1", "--registerfiles=1",
                                      "--iodepth_batch_submit={batch}",
                                      "--iodepth_batch_complete_min=1"],
    "hugebufs": ["--iomem=mmaphuge"],
    "hugebufs+fixedbufs+registerfiles": ["--iomem=mmaphuge", "--fixedbufs=1", "--registerfiles=1"],
    "hugebufs+fixedbufs+registerfiles+batch": ["--iomem=mmaphuge", "--fixedbufs=1",
                                               "--registerfiles=1",
                                               "--iodepth_batch_submit={batch}",
                                               "--iodepth_batch_complete_min=1"],
}

_RESULT_MARK = "KVTIER_NIXL_RESULT "
_HUGE = 2 << 20
_PAGE = mmap.PAGESIZE
_NIXL_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl._api")


# --------------------------------------------------------------------------------------------
# shared helpers


def _check_args(block_bytes: int, num_blocks: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if block_bytes <= 0 or block_bytes % 4096:
        raise ValueError(
            f"block_bytes must be a positive multiple of 4096 (O_DIRECT), got {block_bytes}")
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")


def block_device_stat_path(path: str) -> str | None:
    """``/sys/block/<disk>/stat`` of the disk holding ``path`` (a partition's own stat if any)."""
    try:
        target = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
        st = os.stat(target)
        sys_dir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError:
        return None
    stat = os.path.join(sys_dir, "stat")
    return stat if os.path.exists(stat) else None


def _read_dev_stat(stat_path: str | None) -> list[int] | None:
    if stat_path is None:
        return None
    try:
        with open(stat_path) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None


def _dev_stat_delta(before: list[int] | None, after: list[int] | None,
                    seconds: float) -> dict[str, Any] | None:
    """Requests the block layer completed between two reads of ``/sys/block/<dev>/stat``.

    Fields (Documentation/block/stat.rst): 0 read ios, 2 read sectors, 4 write ios, 6 write
    sectors, 10 time in queue (ms summed over requests, so / elapsed = mean requests in flight).
    Other processes' I/O on the same disk counts too: compare ``read_mib``/``write_mib`` with
    the bytes the anchor moved to see whether a sample was disturbed.
    """
    if before is None or after is None or len(before) < 11 or len(after) < 11 or seconds <= 0:
        return None
    d = [a - b for a, b in zip(after, before, strict=False)]
    ios = d[0] + d[4]
    sectors = d[2] + d[6]
    return {
        "read_requests": d[0],
        "write_requests": d[4],
        "read_mib": round(d[2] * 512 / 2**20, 1),
        "write_mib": round(d[6] * 512 / 2**20, 1),
        "mean_request_kib": round(sectors * 512 / ios / 1024, 1) if ios else None,
        "mean_requests_in_flight": round(d[10] / 1000 / seconds, 1),
    }


def wait_for_quiet_disk(path: str, timeout_s: float = 10.0, window_s: float = 0.25,
                        max_mib_per_s: float = 4.0) -> bool:
    """Wait until the disk holding ``path`` moves under ``max_mib_per_s`` over ``window_s``.

    On a shared machine (tests, builds, other benchmarks) a sample taken while something else
    writes is worthless. Returns False if the disk never went quiet within ``timeout_s``, or
    True (also when the disk cannot be watched).
    """
    stat_path = block_device_stat_path(path)
    if stat_path is None:
        return True
    deadline = time.monotonic() + timeout_s
    while True:
        a = _read_dev_stat(stat_path)
        time.sleep(window_s)
        b = _read_dev_stat(stat_path)
        if a is None or b is None:
            return True
        mib = ((b[2] - a[2]) + (b[6] - a[6])) * 512 / 2**20
        if mib / window_s <= max_mib_per_s:
            return True
        if time.monotonic() >= deadline:
            return False


def settle_disk(path: str, timeout_s: float = 10.0) -> bool:
    """Before a sample: ``sync`` (writes back dirty pages and flushes the disk's write cache,
    which on a VM is the host's page cache), then :func:`wait_for_quiet_disk`.

    Without the flush, whichever run next flushes the disk's cache (kvtier's fdatasync; fio and
    NIXL never flush) pays for the data every earlier run left in the host's cache: kvtier's
    write samples took 0.2-0.56 s instead of ~0.1 s in about one round in six. Every peer settles
    the same way before every sample. Returns False if the disk did not go quiet.
    """
    os.sync()
    return wait_for_quiet_disk(path, timeout_s)


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


@contextlib.contextmanager
def reserved_hugetlb(nbytes: int) -> Iterator[bool]:
    """Make ``nbytes`` of hugetlb pages free for the ``with`` body, then restore the setting.

    Raises ``/proc/sys/vm/nr_hugepages`` by what is missing (root only) and puts the old value
    back afterwards. Yields whether enough pages are free.
    """
    knob = "/proc/sys/vm/nr_hugepages"
    missing = nbytes - hugetlb_free_bytes()
    old: int | None = None
    if missing > 0:
        try:
            with open(knob) as f:
                old = int(f.read())
            with open(knob, "w") as f:
                f.write(str(old + -(-missing // _HUGE)))
        except (OSError, ValueError):
            old = None
    try:
        yield hugetlb_free_bytes() >= nbytes
    finally:
        if old is not None:
            with contextlib.suppress(OSError), open(knob, "w") as f:
                f.write(str(old))


# --------------------------------------------------------------------------------------------
# fio


def fio_available(fio: str = "fio") -> str | None:
    """None when ``fio`` runs and has the io_uring engine; otherwise why not."""
    exe = shutil.which(fio)
    if exe is None:
        return f"{fio!r} not found on PATH (Debian/Ubuntu: apt-get install fio)"
    try:
        out = subprocess.run([exe, "--enghelp"], check=False, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe} --enghelp failed: {e}"
    if "io_uring" not in out.stdout:
        return f"{exe} was built without the io_uring engine"
    return None


def fio_command(path: str, block_bytes: int, num_blocks: int, queue_depth: int, mode: Mode,
                runtime_limit_s: float = 60, variant: str = "plain", fio: str = "fio") -> list[str]:
    """The fio command line :func:`run_fio` runs for one variant of :data:`FIO_VARIANTS`."""
    extra = [a.format(batch=min(queue_depth, 64)) for a in FIO_VARIANTS[variant]]
    return [
        fio, "--name=kvtier-nvme-anchor", f"--filename={path}",
        "--ioengine=io_uring", "--direct=1", "--hipri=0", "--thread", "--numjobs=1",
        f"--bs={block_bytes}", f"--iodepth={queue_depth}", f"--size={block_bytes * num_blocks}",
        f"--rw={mode}", f"--runtime={max(1, int(runtime_limit_s))}",
        # Writes overwrite a file laid out (written) beforehand, outside the timed phase, so a
        # write anchor never pays for extending the file or converting unwritten extents.
        "--overwrite=1", "--output-format=json",
        *extra,
    ]


def _fio_once(cmd: list[str], mode: str, timeout_s: float) -> dict[str, Any]:
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip()[-2000:]
        raise RuntimeError(f"fio exited {out.returncode}: {why}")
    text = out.stdout
    data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {out.stderr.strip()[-2000:]}")
    side = job["write" if mode == "write" else "read"]
    if not side["bw_bytes"]:
        raise RuntimeError("fio moved no bytes")
    return {
        # fio's bw_bytes is io_bytes / runtime in ms: keep its own number, as seconds.
        "seconds": side["io_bytes"] / side["bw_bytes"],
        "io_bytes": side["io_bytes"],
        "iops": side["iops"],
        "clat_mean_us": round(side.get("clat_ns", {}).get("mean", 0.0) / 1e3, 1),
        "cpu_pct": round((job.get("usr_cpu") or 0) + (job.get("sys_cpu") or 0), 1),
    }


def _ensure_written(path: str, nbytes: int, block_bytes: int, fio: str, timeout_s: float) -> None:
    """Make sure ``path`` holds ``nbytes`` of data really written (no holes) before the anchor."""
    try:
        st = os.stat(path)
        if st.st_size >= nbytes and st.st_blocks * 512 >= nbytes:
            return
    except FileNotFoundError:
        pass
    n = -(-nbytes // block_bytes)
    cmd = fio_command(path, block_bytes, n, 16, "write", timeout_s, "plain", fio)
    _fio_once(cmd, "write", timeout_s)


def run_fio(path: str, block_bytes: int, num_blocks: int, queue_depth: int, mode: Mode,
            runtime_limit_s: float = 60, *, repeat: int = 3, variants: Sequence[str] | None = None,
            reserve_hugetlb: bool = False, quiet_wait_s: float = 10.0,
            fio: str = "fio") -> dict[str, Any]:
    """fio io_uring O_DIRECT anchor: ``num_blocks`` x ``block_bytes`` at ``queue_depth``.

    Every variant in ``variants`` (default: all of :data:`FIO_VARIANTS`) runs ``repeat`` times,
    interleaved, each after the disk was flushed and went quiet; the anchor is the variant with
    the best median.
    The file is written before the first run if it is short or sparse, so reads (``read``, and
    ``randread``: every block once, fio's random map) read real data and writes overwrite.
    ``reserve_hugetlb`` reserves hugetlb pages for the ``hugebufs`` variants (root; restored
    after); without it they run only if the pages are already free, else are marked skipped.
    Returns ``{"gbps", "iops", "cmd", "variant", "variants": {name: {...}}, ...}``.
    """
    _check_args(block_bytes, num_blocks, mode)
    if queue_depth <= 0:
        raise ValueError(f"queue_depth must be positive, got {queue_depth}")
    reason = fio_available(fio)
    if reason:
        raise RuntimeError(reason)
    names = list(variants) if variants is not None else list(FIO_VARIANTS)
    unknown = [n for n in names if n not in FIO_VARIANTS]
    if unknown:
        raise ValueError(f"unknown fio variants {unknown}; known: {list(FIO_VARIANTS)}")
    nbytes = block_bytes * num_blocks
    timeout_s = runtime_limit_s + 60
    _ensure_written(path, nbytes, block_bytes, fio, timeout_s)
    # --iomem=mmaphuge maps bs*iodepth (+ alignment) in hugetlb pages.
    need_huge = block_bytes * queue_depth + 2 * _HUGE
    wants_huge = any("--iomem=mmaphuge" in FIO_VARIANTS[n] for n in names)
    with reserved_hugetlb(need_huge if (reserve_hugetlb and wants_huge) else 0):
        have_huge = hugetlb_free_bytes() >= need_huge
        results: dict[str, dict[str, Any]] = {}
        runnable: list[tuple[str, list[str]]] = []
        for name in names:
            cmd = fio_command(path, block_bytes, num_blocks, queue_depth, mode, runtime_limit_s,
                              name, fio)
            results[name] = {"cmd": " ".join(cmd)}
            if "--iomem=mmaphuge" in FIO_VARIANTS[name] and not have_huge:
                results[name]["skipped"] = (
                    f"needs {need_huge >> 20} MiB of free hugetlb pages, have "
                    f"{hugetlb_free_bytes() >> 20} (reserve_hugetlb=True, or raise "
                    "/proc/sys/vm/nr_hugepages)")
                continue
            runnable.append((name, cmd))
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in runnable}
        stat_path = block_device_stat_path(path)
        noisy = 0
        for _ in range(max(1, repeat)):
            for name, cmd in runnable:
                if quiet_wait_s > 0 and not settle_disk(path, quiet_wait_s):
                    noisy += 1
                before = _read_dev_stat(stat_path)
                t0 = time.perf_counter()
                try:
                    one = _fio_once(cmd, mode, timeout_s)
                except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                    # One failed run (seen: EFAULT on hugetlb buffers under memory pressure)
                    # does not drop the variant; it fails only if no run succeeds.
                    results[name].setdefault("errors", []).append(str(e)[-500:])
                    continue
                # The window also covers fio's start-up, so in-flight is a lower bound.
                one["device"] = _dev_stat_delta(before, _read_dev_stat(stat_path),
                                                time.perf_counter() - t0)
                samples[name].append(one)
    best_name = None
    for name, _ in runnable:
        runs = samples[name]
        if not runs:
            continue
        r = _summary([x["seconds"] for x in runs], nbytes, num_blocks)
        r["iops"] = round(statistics.median(x["iops"] for x in runs), 1)
        r["clat_mean_us"] = statistics.median(x["clat_mean_us"] for x in runs)
        r["cpu_pct"] = statistics.median(x["cpu_pct"] for x in runs)
        r["device"] = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]["device"]
        results[name].update(r)
        if best_name is None or r["gbps"] > results[best_name]["gbps"]:
            best_name = name
    if best_name is None:
        errors = {n: v.get("errors") or v.get("skipped") for n, v in results.items()}
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
        "buffer_pages": "huge (hugetlb)" if "hugebufs" in best_name else "small (malloc)",
        "noisy_samples": noisy,
        "variants": results,
    }


# --------------------------------------------------------------------------------------------
# NIXL POSIX backend (in a subprocess)


def _default_python() -> str:
    return os.environ.get("KVTIER_NIXL_PYTHON") or sys.executable


def nixl_available(python_exe: str | None = None, timeout_s: float = 120) -> str | None:
    """None when ``python_exe`` (default ``$KVTIER_NIXL_PYTHON``, else this Python) imports NIXL
    (``pip install nixl-cu12``) with its POSIX plugin, and numpy; otherwise why not."""
    exe = python_exe or _default_python()
    probe = (
        "import importlib, sys\n"
        "import numpy\n"
        "api = None\n"
        f"for m in {_NIXL_MODULES!r}:\n"
        "    try:\n"
        "        api = importlib.import_module(m); break\n"
        "    except ImportError:\n"
        "        pass\n"
        "if api is None: sys.exit('no NIXL module (pip install nixl-cu12)')\n"
        "cfg = api.nixl_agent_config(enable_prog_thread=False, backends=[])\n"
        "a = api.nixl_agent('kvtier-probe', cfg)\n"
        "if 'POSIX' not in a.get_plugin_list(): sys.exit('NIXL has no POSIX plugin')\n"
    )
    try:
        out = subprocess.run([exe, "-I", "-c", probe], check=False, capture_output=True,
                             text=True, timeout=timeout_s, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe}: {e}"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return f"{exe}: {lines[-1] if lines else f'exit {out.returncode}'}"
    return None


def run_nixl_posix(path: str, block_bytes: int, num_blocks: int, mode: Mode, repeat: int = 5, *,
                   python_exe: str | None = None, io_queue: NixlQueue = "default",
                   buffer_pages: BufferPages = "huge", seed: int = 0, quiet_wait_s: float = 10.0,
                   timeout_s: float = 600, queue_depth: int | None = None) -> dict[str, Any]:
    """NIXL POSIX-backend anchor: one batched transfer of ``num_blocks`` x ``block_bytes``.

    Runs in ``python_exe`` (default ``$KVTIER_NIXL_PYTHON``, else this Python) as
    ``python -I nvme_anchors.py --nixl-worker CONFIG``, answering JSON on stdout. The worker
    writes random data to ``path`` first (untimed), then times ``repeat`` transfers, each after
    the disk was flushed and went quiet: ``write`` overwrites the blocks, ``read`` reads them
    back in order, ``randread`` in a random permutation (one descriptor per block). Every timed read, and a
    read-back after the timed writes, is compared byte for byte with the data (``verified``).
    ``io_queue``: NIXL's kernel interface (``default`` is Linux AIO in the PyPI wheels).
    ``queue_depth``: NIXL's ``kernel_queue_size`` (the size of its kernel AIO/io_uring queue;
    NIXL's own default, 256, when None), so it can run at the same queue depth as the others.
    ``buffer_pages``: the DRAM buffer on transparent ``huge`` pages (what a numpy array of 4 MiB
    or more gets by default), ``small`` 4 KiB pages (often physically contiguous anyway), or
    ``scattered`` 4 KiB pages interleaved with another mapping's, so none are contiguous (what a
    long-running process's malloc buffers look like).
    Returns ``{"gbps", "iops", "cmd", "verified", "samples_s", "device", ...}``.
    """
    _check_args(block_bytes, num_blocks, mode)
    if buffer_pages not in ("huge", "small", "scattered"):
        raise ValueError(f"buffer_pages must be huge, small or scattered, got {buffer_pages!r}")
    exe = python_exe or _default_python()
    cfg = {"path": os.path.abspath(path), "block_bytes": block_bytes, "num_blocks": num_blocks,
           "mode": mode, "repeat": max(1, repeat), "io_queue": io_queue,
           "buffer_pages": buffer_pages, "seed": seed, "quiet_wait_s": quiet_wait_s,
           "queue_depth": queue_depth}
    # -I: the script's folder (which has a copy.py) must not shadow the standard library.
    cmd = [exe, "-I", os.path.abspath(__file__), "--nixl-worker", json.dumps(cfg)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s,
                         cwd="/")
    result: dict[str, Any] | None = None
    for line in out.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            result = json.loads(line[len(_RESULT_MARK):])
    if out.returncode != 0 or result is None or "error" in result:
        why = (result["error"] if result and "error" in result
               else (out.stderr or out.stdout).strip()[-3000:])
        raise RuntimeError(f"NIXL worker failed (exit {out.returncode}): {why}")
    result["cmd"] = " ".join(cmd[:4]) + " '" + cmd[4] + "'"
    return result


def _alloc_buffer(nbytes: int, pages: str) -> tuple[list[mmap.mmap], Any, int]:
    """A 2 MiB-aligned anonymous buffer, every page faulted in; (mappings, uint8 view, address)."""
    import numpy as np

    def mapping() -> tuple[mmap.mmap, Any]:
        mm = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE" if pages == "huge" else "MADV_NOHUGEPAGE", None)
        if advice is not None:
            mm.madvise(advice)
        return mm, np.frombuffer(mm, dtype=np.uint8)

    mm, whole = mapping()
    maps = [mm]
    if pages == "scattered":
        # Fault this buffer's pages in alternately with a decoy's: consecutive physical pages
        # go to different mappings, so no two neighbouring pages of the buffer are adjacent.
        decoy_mm, decoy = mapping()
        for off in range(0, whole.size, _PAGE):
            whole[off] = 0
            decoy[off] = 0
        del decoy
        with contextlib.suppress(BufferError):
            decoy_mm.close()
    base = whole.ctypes.data
    off = (-base) % _HUGE
    view = whole[off:off + nbytes]
    view.fill(0)  # fault every page in now, not inside a timed transfer
    return maps, view, base + off


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
    nbytes = bb * n
    rng = np.random.default_rng(cfg["seed"])
    expected = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).reshape(n, bb)
    perm = rng.permutation(n) if mode == "randread" else np.arange(n)

    maps, buf, addr = _alloc_buffer(nbytes, cfg["buffer_pages"])
    blocks = buf.reshape(n, bb)
    thp_kib = _anon_huge_kib()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        if os.fstat(fd).st_size < nbytes:
            os.ftruncate(fd, nbytes)  # DIO writes past EOF are synchronous on ext4/xfs
        agent_name = f"kvtier-nvme-anchor-{os.getpid()}"
        agent = api.nixl_agent(agent_name, api.nixl_agent_config(
            enable_prog_thread=False, backends=[], capture_telemetry=True))
        params = {"AIO": {"use_aio": "true"}, "URING": {"use_uring": "true"},
                  "POSIXAIO": {"use_posix_aio": "true"}}.get(cfg["io_queue"], {})
        if cfg.get("queue_depth"):
            params = {**params, "kernel_queue_size": str(cfg["queue_depth"])}
        agent.create_backend("POSIX", params)
        dram_reg = agent.register_memory([(addr, nbytes, 0, "")], "DRAM", backends=["POSIX"])
        file_reg = agent.register_memory([(0, nbytes, fd, "")], "FILE", backends=["POSIX"])
        dram_descs = agent.get_xfer_descs([(addr + i * bb, bb, 0) for i in range(n)], "DRAM")
        file_seq = agent.get_xfer_descs([(i * bb, bb, fd) for i in range(n)], "FILE")
        file_rd = agent.get_xfer_descs([(int(p) * bb, bb, fd) for p in perm], "FILE")

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

        wr = agent.initialize_xfer("WRITE", dram_descs, file_seq, agent_name)
        rd = agent.initialize_xfer("READ", dram_descs, file_rd, agent_name)
        timed = wr if mode == "write" else rd
        blocks[:] = expected
        run(wr)  # lay the data out (untimed): reads read real data, writes overwrite
        stat_path = block_device_stat_path(path)
        samples: list[float] = []
        devs: list[dict[str, Any] | None] = []
        verified = True
        noisy = 0
        for _ in range(cfg["repeat"]):
            if mode != "write":
                buf.fill(0)
            if cfg["quiet_wait_s"] > 0 and not settle_disk(path, cfg["quiet_wait_s"]):
                noisy += 1
            before = _read_dev_stat(stat_path)
            s = run(timed)
            devs.append(_dev_stat_delta(before, _read_dev_stat(stat_path), s))
            samples.append(s)
            if mode != "write":
                verified = verified and verify()
        if mode == "write":
            buf.fill(0)
            run(rd)
            verified = verify()
        telemetry: dict[str, Any] = {}
        with contextlib.suppress(Exception):  # informative only
            t = agent.get_xfer_telemetry(timed)
            telemetry = {"desc_count": int(t.descCount), "post_us": int(t.postDuration),
                         "xfer_us": int(t.xferDuration)}
        backend_params = dict(agent.get_backend_params("POSIX"))
        for h in (wr, rd):
            agent.release_xfer_handle(h)
        agent.deregister_memory(dram_reg, backends=["POSIX"])
        agent.deregister_memory(file_reg, backends=["POSIX"])
    finally:
        os.close(fd)
    order = sorted(range(len(samples)), key=samples.__getitem__)
    res = {"anchor": "nixl-posix", **_summary(samples, nbytes, n), "verified": verified,
           "mode": mode, "block_bytes": bb, "num_blocks": n, "bytes": nbytes,
           "repeat": cfg["repeat"], "io_queue": cfg["io_queue"], "backend_params": backend_params,
           "buffer_pages": cfg["buffer_pages"], "anon_huge_kib": thp_kib,
           "device": devs[order[len(order) // 2]], "noisy_samples": noisy,
           "telemetry": telemetry, "nixl_module": api.__name__.rsplit(".", 1)[0]}
    del maps  # the mappings go with the process, which ends right after
    return res


def _worker_main(argv: Sequence[str]) -> int:
    try:
        res = _nixl_worker(json.loads(argv[0]))
    except Exception as e:  # noqa: BLE001  (reported to the parent as JSON)
        res = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(_RESULT_MARK + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--nixl-worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} --nixl-worker CONFIG_JSON (run by run_nixl_posix)")
