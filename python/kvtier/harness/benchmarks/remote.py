"""``kvtier bench remote``: block lists between two processes' registered pools, against
``ucx_perftest`` and NIXL's UCX backend, same run.

For every case (put and get; a Llama-3-8B-sized 2 MiB block and a Qwen2-0.5B-sized 192 KiB
block) and transport (``shm``: UCX_TLS=posix,cma,tcp; ``tcp``: UCX_TLS=tcp; both on loopback,
UCX_NET_DEVICES=lo) the same number of messages of the block size moves between two processes
three ways:

- kvtier: this process's :class:`~kvtier.cluster.peer.Peer` moves a block list of ``n`` distinct
  blocks (ids 0..n-1 on both sides) between its registered HostPool and a worker process's, one
  batch per sample (the handle's submit -> complete time; a put includes its flush). Data is
  checked byte for byte after the samples.
- ucx_perftest (``ucp_put_bw`` / ``ucp_get``), its own timing: the anchor is one message of the
  whole list's bytes (the same distinct memory; one operation instead of ``n``), one per sample
  as kvtier's and NIXL's lists are (Note [perftest buffers], Note [One list per sample]).
- NIXL's UCX backend: an initiator and a target process, started for each of NIXL's turns (Note
  [NIXL between turns]); one prepared transfer of ``n`` descriptors (distinct blocks), posted
  once untimed and once timed, polled to DONE.

Fixed identically for the three and recorded in the JSON: UCX_TLS, UCX_NET_DEVICES,
UCX_RNDV_THRESH=inf, peer error handling (kvtier ``error_handling=True``, perftest ``-e``, NIXL
``ucx_error_handling_mode=peer``) and event-driven progress (kvtier ``progress="event"``,
perftest ``-I -E sleep``, NIXL's progress thread), except that perftest's ``ucp_get`` polls
(Note [perftest progress]). Each tool loads its own UCX (recorded): kvtier
and ucx_perftest the libucx wheel's when it is installed, NIXL the copy it bundles.

Rounds, rotated turns and paired ratios are those of ``kvtier bench nvme``
(:func:`kvtier.harness.benchmarks.nvme.paired_ratio`, Note [Paired ratios] there).

Beside the verdict, each round also times ``IN_FLIGHT`` lists back to back (kvtier: that many
handles posted before the first is awaited; perftest: ``-n IN_FLIGHT``), paired as
``paired_in_flight``: what a worker moving many lists at once sustains.

Note [One list per sample]: kvtier and NIXL are timed one block list per sample, from its
submit to its completion (a put's includes the flush that confirms delivery at the target).
ucx_perftest's ``ucp_put_bw`` with ``-n 8`` posts its 8 messages back to back, each as soon as
the previous one completes *locally* (handed to the transport), and confirms delivery once at
the end: the figure of a stream, not of one list. On the 2026-12-06 VM over TCP a 128 MiB
message ran at 1.8-2.3 GB/s with ``-n 1`` and 3.0-4.3 GB/s with ``-n 8`` (same settings, same
run), while kvtier moved one 128 MiB list at 1.7-2.2 GB/s. So the anchor runs ``-n 1`` (after
its 2 untimed warm-up messages), the timing rule of the other two, and the stream is compared
apart, with kvtier given the same stream.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# kvtier itself is imported lazily: the NIXL helper processes run this file and must not load
# kvtier's UCX beside the one NIXL bundles.

TRANSPORTS = {"shm": "posix,cma,tcp", "tcp": "tcp"}
IN_FLIGHT = 8  # lists back to back in the stream comparison (perftest -n)
NET_DEVICES = "lo"
RNDV_THRESH = "inf"


@dataclass(frozen=True)
class RemoteCase:
    name: str
    block_bytes: int
    op: str  # put | get


_LLAMA = 32 * 2 * 8 * 128 * 2 * 16  # 2 MiB
_QWEN = 24 * 2 * 2 * 64 * 2 * 16  # 192 KiB
CASES = [
    RemoteCase("llama3-8b 2MiB put", _LLAMA, "put"),
    RemoteCase("llama3-8b 2MiB get", _LLAMA, "get"),
    RemoteCase("qwen2-0.5b 192KiB put", _QWEN, "put"),
    RemoteCase("qwen2-0.5b 192KiB get", _QWEN, "get"),
]


def _ucx_env(tls: str) -> dict[str, str]:
    return {"UCX_TLS": tls, "UCX_NET_DEVICES": NET_DEVICES, "UCX_RNDV_THRESH": RNDV_THRESH}


def _pattern(num_blocks: int, block_bytes: int, seed: int) -> np.ndarray:
    # [num_blocks, block_bytes] uint8
    return np.random.default_rng(seed).integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wheel_ucx() -> tuple[str | None, str | None]:
    """(bin dir, lib dir) of the libucx wheel, when installed."""
    try:
        import libucx  # type: ignore[import-not-found]
    except ImportError:
        return None, None
    root = os.path.dirname(libucx.__file__)
    return os.path.join(root, "bin"), os.path.join(root, "lib")


# ---------------------------------------------------------------- kvtier


class _Worker:
    """A JSON-over-pipes helper process (this module run with a role)."""

    def __init__(self, role: str, cfg: dict[str, Any], python_exe: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [python_exe or sys.executable, "-I", __file__, role, json.dumps(cfg)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd="/",
        )
        self.hello = self.read()

    def read(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.poll() is not None else ""
                raise RuntimeError(f"helper exited (rc={self.proc.poll()}): {err.strip().splitlines()[-1:] or ''}")
            if line.startswith("{"):  # NIXL logs to stdout too
                return json.loads(line)

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self.read()
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(op="exit")
                self.proc.wait(20)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


class _KvtierCase:
    def __init__(self, peer: Any, case: RemoteCase, n: int, tls: str, seed: int) -> None:
        import kvtier

        self.case, self.n, self.peer, self.seed = case, n, peer, seed
        self.worker = _Worker("--kvtier-target", {"tls": tls, "block_bytes": case.block_bytes, "num_blocks": n,
                                                  "seed": seed})
        self.pool = kvtier.HostPool(case.block_bytes, num_blocks=n)
        self.ids = self.pool.allocate(n)
        self.pool.view()[:] = _pattern(n, case.block_bytes, seed + 1)
        peer.register(self.pool)
        self.remote = peer.connect(bytes.fromhex(self.worker.hello["address"])).import_pool(
            bytes.fromhex(self.worker.hello["descriptor"]))
        self.samples: list[float] = []
        self.in_flight_samples: list[float] = []  # seconds per list, IN_FLIGHT lists at a time
        self._once()  # untimed: endpoint wire-up, first touch of the remote mapping

    def _post(self) -> Any:
        if self.case.op == "put":
            return self.peer.put(self.pool, self.ids, self.remote, self.ids)
        return self.peer.get(self.remote, self.ids, self.pool, self.ids)

    def _once(self) -> float:
        h = self._post()
        h.wait(600)
        return h.latency_s

    def rep(self) -> None:
        self.samples.append(self._once())

    def rep_in_flight(self, k: int) -> None:
        """``k`` copies of the list posted back to back (the same blocks and bytes each time),
        timed from the first submit to the last completion."""
        t0 = time.perf_counter()
        handles = [self._post() for _ in range(k)]
        for h in handles:
            h.wait(600)
        self.in_flight_samples.append((time.perf_counter() - t0) / k)

    def gbps_by_round(self, in_flight: bool = False) -> list[float]:
        return [self.n * self.case.block_bytes / t / 1e9
                for t in (self.in_flight_samples if in_flight else self.samples)]

    def finish(self) -> dict[str, Any]:
        if self.case.op == "get":
            verified = bool(np.array_equal(self.pool.view(), _pattern(self.n, self.case.block_bytes, self.seed)))
        else:
            import hashlib
            want = [hashlib.blake2b(self.pool.view()[i].tobytes(), digest_size=16).hexdigest() for i in range(self.n)]
            verified = self.worker.call(op="digest", ids=list(range(self.n)))["digests"] == want
        self.worker.close()
        self.peer.unregister(self.pool)
        med = statistics.median(self.samples)
        return {"gbps": self.n * self.case.block_bytes / med / 1e9, "samples_s": self.samples, "verified": verified,
                "ucx": self.peer.info()["version"]}


def _kvtier_target(cfg: dict[str, Any]) -> None:
    import hashlib

    import kvtier
    from kvtier.cluster.peer import Peer

    peer = Peer(tls=cfg["tls"], net_devices=NET_DEVICES, rndv_thresh=RNDV_THRESH, error_handling=True,
                progress="event")
    pool = kvtier.HostPool(cfg["block_bytes"], num_blocks=cfg["num_blocks"])
    pool.allocate(cfg["num_blocks"])
    view = pool.view()
    view[:] = _pattern(cfg["num_blocks"], cfg["block_bytes"], cfg["seed"])
    desc = peer.register(pool)
    print(json.dumps({"address": peer.address.hex(), "descriptor": desc.hex()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "digest":
            print(json.dumps({"digests": [hashlib.blake2b(view[i].tobytes(), digest_size=16).hexdigest()
                                          for i in cmd["ids"]]}), flush=True)
        else:
            print(json.dumps({"ok": True}), flush=True)
            break
    peer.close()


# ---------------------------------------------------------------- ucx_perftest


def perftest_available() -> tuple[str | None, str | None, str]:
    """(ucx_perftest path, LD_LIBRARY_PATH for it, why missing)."""
    wbin, wlib = _wheel_ucx()
    if wbin and os.path.isfile(os.path.join(wbin, "ucx_perftest")) and os.environ.get("KVTIER_UCX_WHEEL", "1") != "0":
        return os.path.join(wbin, "ucx_perftest"), wlib, ""
    exe = shutil.which("ucx_perftest")
    if exe:
        return exe, None, ""
    return None, None, "ucx_perftest not found (apt-get install ucx-utils, or pip install libucx-cu12)"


_PERFTEST_ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")


PERFTEST_MODES = ("list", "in_flight", "reused")  # Note [perftest buffers]


def run_perftest(case: RemoteCase, n: int, tls: str, mode: str = "list", timeout_s: float = 120) -> dict[str, Any]:
    """One ``ucx_perftest`` run of ``n`` blocks' bytes.

    Note [perftest buffers]: ucx_perftest moves one message buffer over and over; it has no
    option for a pool of distinct buffers. Three modes, all recorded:
    - ``"list"``: one message of all ``n`` blocks' bytes (the same memory footprint as kvtier's
      and NIXL's distinct blocks), timed alone after 2 untimed ones (Note [One list per
      sample]). One operation instead of ``n`` favours perftest; the memory traffic is the
      same as theirs. This is the perftest anchor.
    - ``"in_flight"``: ``IN_FLIGHT`` such messages back to back, the stream comparison.
    - ``"reused"``: messages of the block size, ``n`` of them, all from and to the same
      block-sized buffer. At 2 MiB and 192 KiB that buffer stays in the CPU's caches (4 MiB of L2
      here), so this measures a cache-hot copy, not moving ``n`` distinct blocks: on the
      2026-12-06 VM, 2 MiB puts ran at 4.66 GiB/s this way and at 2.14 GiB/s as one 128 MiB
      message. It is reported as a ceiling, not as the anchor.
    """
    if mode not in PERFTEST_MODES:
        raise ValueError(f"perftest mode must be one of {PERFTEST_MODES}, got {mode!r}")
    whole = n * case.block_bytes
    size, iters, warm, buffer = {
        "list": (whole, 1, 2, "one message of the whole block list's bytes (distinct memory), timed alone"),
        "in_flight": (whole, IN_FLIGHT, 2, f"{IN_FLIGHT} messages of the whole block list's bytes, back to back"),
        "reused": (case.block_bytes, n, min(16, n), "one block-sized buffer reused for every message (cache-hot)"),
    }[mode]
    exe, libdir, why = perftest_available()
    if exe is None:
        return {"missing": why}
    test = "ucp_put_bw" if case.op == "put" else "ucp_get"
    env = {**os.environ, **_ucx_env(tls)}
    if libdir:
        env["LD_LIBRARY_PATH"] = libdir + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    port = _free_port()
    # Note [perftest progress]: ucp_put_bw runs event-driven like kvtier (-I -E sleep). ucp_get
    # cannot: with -E sleep it hangs over shared memory (3 of 3 tries here, 20 s each) and crawls
    # over TCP (2.4 MB/s: the responder sleeps through the gets), so ucp_get polls (-E poll),
    # which favours it on the transports where the target must progress. Recorded per case.
    wait = ["-I", "-E", "sleep"] if case.op == "put" else ["-E", "poll"]
    args = ["-t", test, "-s", str(size), "-n", str(iters), "-w", str(warm), "-e", *wait,
            "-p", str(port), "-f"]
    server = subprocess.Popen([exe, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = None
        for _ in range(20):  # the server needs a moment to listen
            time.sleep(0.2)
            try:
                out = subprocess.run([exe, "127.0.0.1", *args], env=env, capture_output=True, text=True,
                                     timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return {"missing": f"ucx_perftest did not finish in {timeout_s} s: {' '.join(args)}"}
            if out.returncode == 0:
                break
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        server.stdout.close()
    rows = [m for m in (_PERFTEST_ROW.match(line) for line in out.stdout.splitlines()) if m]
    if out.returncode != 0 or not rows:
        tail = (out.stderr or out.stdout).strip().splitlines()[-2:]
        return {"missing": f"ucx_perftest failed (rc={out.returncode}): {' '.join(tail)}"}
    mbps = float(rows[-1].group(6))  # bandwidth, overall, MB/s with MB = 2^20
    ver = subprocess.run([os.path.join(os.path.dirname(exe), "ucx_info"), "-v"], env=env, capture_output=True,
                         text=True).stdout
    m = re.search(r"version\D*(\d+\.\d+\.\d+)", ver)
    return {"gbps": mbps * 2**20 / 1e9, "cmd": " ".join([os.path.basename(exe), "127.0.0.1", *args]),
            "ucx": m.group(1) if m else "?",
            "buffer": buffer}


# ---------------------------------------------------------------- NIXL


_NIXL_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl._api")


def nixl_available(python_exe: str | None = None) -> str | None:
    exe = python_exe or os.environ.get("KVTIER_NIXL_PYTHON") or sys.executable
    probe = (
        "import importlib, sys\n"
        "api = None\n"
        f"for m in {_NIXL_MODULES!r}:\n"
        "    try:\n"
        "        api = importlib.import_module(m); break\n"
        "    except ImportError:\n"
        "        pass\n"
        "if api is None: sys.exit('no NIXL module (pip install --no-deps nixl-cu12)')\n"
        "a = api.nixl_agent('kvtier-probe', api.nixl_agent_config(backends=[]))\n"
        "if 'UCX' not in a.get_plugin_list(): sys.exit('NIXL has no UCX plugin')\n"
    )
    try:
        out = subprocess.run([exe, "-I", "-c", probe], capture_output=True, text=True, timeout=120, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe}: {e}"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return f"{exe}: {lines[-1] if lines else out.returncode}"
    return None


def _nixl_api() -> Any:
    import importlib

    for m in _NIXL_MODULES:
        try:
            return importlib.import_module(m)
        except ImportError:
            pass
    raise ImportError("no NIXL module")


def _nixl_agent(api: Any, name: str) -> Any:
    import contextlib
    import io

    cfg = api.nixl_agent_config(enable_prog_thread=True, backends=[])
    with contextlib.redirect_stdout(io.StringIO()):
        agent = api.nixl_agent(name, cfg)
        params = dict(agent.get_plugin_params("UCX"))
        params.update({"ucx_error_handling_mode": "peer", "num_workers": "1"})
        agent.create_backend("UCX", params)
    return agent


def _nixl_buffer(n: int, block_bytes: int) -> tuple[np.ndarray, int]:
    # [n, block_bytes] uint8, 4 KiB-aligned rows like a kvtier pool's blocks
    raw = np.empty(n * block_bytes + 4096, dtype=np.uint8)
    off = (-raw.ctypes.data) % 4096
    buf = raw[off:off + n * block_bytes].reshape(n, block_bytes)
    return buf, buf.ctypes.data


def _nixl_target(cfg: dict[str, Any]) -> None:
    api = _nixl_api()
    agent = _nixl_agent(api, "kvtier-bench-target")
    n, bb = cfg["num_blocks"], cfg["block_bytes"]
    buf, base = _nixl_buffer(n, bb)
    buf[:] = _pattern(n, bb, cfg["seed"])
    agent.register_memory(agent.get_reg_descs([(base, n * bb, 0, "")], "DRAM"))
    descs = agent.get_xfer_descs([(base + i * bb, bb, 0) for i in range(n)], "DRAM")
    print(json.dumps({"metadata": agent.get_agent_metadata().hex(),
                      "descs": agent.get_serialized_descs(descs).hex()}), flush=True)
    import hashlib

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "digest":
            print(json.dumps({"digests": [hashlib.blake2b(buf[i].tobytes(), digest_size=16).hexdigest()
                                          for i in cmd["ids"]]}), flush=True)
        else:
            print(json.dumps({"ok": True}), flush=True)
            break


def _nixl_initiator(cfg: dict[str, Any]) -> None:
    api = _nixl_api()
    agent = _nixl_agent(api, "kvtier-bench-initiator")
    n, bb = cfg["num_blocks"], cfg["block_bytes"]
    buf, base = _nixl_buffer(n, bb)
    buf[:] = _pattern(n, bb, cfg["seed"] + 1)
    agent.register_memory(agent.get_reg_descs([(base, n * bb, 0, "")], "DRAM"))
    remote_name = agent.add_remote_agent(bytes.fromhex(cfg["metadata"]))
    remote_descs = agent.deserialize_descs(bytes.fromhex(cfg["descs"]))
    local = agent.get_xfer_descs([(base + i * bb, bb, 0) for i in range(n)], "DRAM")
    op = "WRITE" if cfg["op"] == "put" else "READ"
    handle = agent.initialize_xfer(op, local, remote_descs, remote_name)

    def once() -> float:
        t0 = time.perf_counter()
        state = agent.transfer(handle)
        while state not in ("DONE", "ERR"):
            state = agent.check_xfer_state(handle)
        if state == "ERR":
            raise RuntimeError("NIXL transfer failed")
        return time.perf_counter() - t0

    once()  # untimed: connection and wire-up
    print(json.dumps({"ready": True}), flush=True)
    import hashlib

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "rep":
            print(json.dumps({"seconds": once()}), flush=True)
        elif cmd["op"] == "check":
            if op == "READ":
                ok = bool(np.array_equal(buf, _pattern(n, bb, cfg["seed"])))
                print(json.dumps({"verified": ok}), flush=True)
            else:
                print(json.dumps({"digests": [hashlib.blake2b(buf[i].tobytes(), digest_size=16).hexdigest()
                                              for i in range(n)]}), flush=True)
        else:
            print(json.dumps({"ok": True}), flush=True)
            break
    agent.release_xfer_handle(handle)


class _NixlCase:
    def __init__(self, case: RemoteCase, n: int, tls: str, seed: int, python_exe: str | None) -> None:
        self.case, self.n = case, n
        env = _ucx_env(tls)
        cfg = {"block_bytes": case.block_bytes, "num_blocks": n, "seed": seed, "op": case.op}
        self.target = _Worker("--nixl-target", cfg, python_exe, env)
        cfg.update(metadata=self.target.hello["metadata"], descs=self.target.hello["descs"])
        self.initiator = _Worker("--nixl-initiator", cfg, python_exe, env)
        self.samples: list[float] = []

    def close(self) -> None:
        self.initiator.close()
        self.target.close()

    def rep(self) -> dict[str, Any]:
        s = self.initiator.call(op="rep")["seconds"]
        self.samples.append(s)
        return {"gbps": self.n * self.case.block_bytes / s / 1e9}

    def finish(self) -> dict[str, Any]:
        out = self.initiator.call(op="check")
        if self.case.op == "get":
            verified = out["verified"]
        else:
            verified = self.target.call(op="digest", ids=list(range(self.n)))["digests"] == out["digests"]
        self.close()
        return {"gbps": self.n * self.case.block_bytes / statistics.median(self.samples) / 1e9,
                "samples_s": self.samples, "verified": verified, "ucx": "bundled with nixl",
                "progress": "NIXL progress thread; the initiator polls check_xfer_state"}


# ---------------------------------------------------------------- the run


def run(transports: tuple[str, ...] = ("shm", "tcp"), size_mib: int = 128, reps: int = 6,
        cases: str | None = None, nixl_python: str | None = None, seed: int = 0,
        json_path: str | None = None, progress: bool = True) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    import kvtier
    from kvtier.harness.benchmarks import machine_info
    from kvtier.harness.benchmarks.nvme import paired_ratio
    from kvtier.cluster.peer import Peer

    console = Console(stderr=True)
    selected = [c for c in CASES if cases is None or cases in c.name]
    if not selected:
        raise kvtier.InvalidArgumentError(f"no remote case matches {cases!r}; cases: {[c.name for c in CASES]}")
    for t in transports:
        if t not in TRANSPORTS:
            raise kvtier.InvalidArgumentError(f"unknown transport {t!r}; choose from {sorted(TRANSPORTS)}")
    # The probe and the helpers must run the same Python (the helpers once fell back to this one
    # while the probe used $KVTIER_NIXL_PYTHON: every NIXL case "missing: no NIXL module").
    nixl_python = nixl_python or os.environ.get("KVTIER_NIXL_PYTHON") or sys.executable
    nixl_missing = nixl_available(nixl_python)
    results = []
    settings: dict[str, Any] = {}
    for transport in transports:
        tls = TRANSPORTS[transport]
        settings[transport] = {
            **_ucx_env(tls), "error_mode": "peer", "progress": "event",
            "kvtier": "Peer(error_handling=True, progress='event')",
            "ucx_perftest": "-e; put: -I -E sleep, get: -E poll (Note [perftest progress])",
            "nixl": "ucx_error_handling_mode=peer, enable_prog_thread=True",
        }
        with Peer(tls=tls, net_devices=NET_DEVICES, rndv_thresh=RNDV_THRESH, error_handling=True,
                  progress="event", transfer_timeout_s=600) as peer:
            for case in selected:
                n = max(2, (size_mib << 20) // case.block_bytes)
                if progress:
                    console.print(f"bench remote: {transport} {case.name} ({n} blocks, {reps} rounds)")
                kv = _KvtierCase(peer, case, n, tls, seed)
                perf_runs: list[dict[str, Any]] = []
                nixl_runs: list[dict[str, Any]] = []
                nixl_outs: list[dict[str, Any]] = []

                def nixl_turn() -> None:
                    # Note [NIXL between turns]: NIXL's progress threads spin even when idle
                    # (about 30% of a core each here), which would slow the other two's turns on
                    # a 2-core machine; so its two processes live for their own turn only (set-up
                    # and one untimed transfer, then the timed one, then a check of the data).
                    if nixl_missing:
                        nixl_runs.append({"missing": nixl_missing})
                        return
                    nixl = None
                    try:
                        nixl = _NixlCase(case, n, tls, seed, nixl_python)
                        nixl_runs.append(nixl.rep())
                        nixl_outs.append(nixl.finish())
                    except Exception as e:  # a failing peer is reported, not hidden
                        nixl_runs.append({"missing": f"NIXL failed: {e}"})
                        if nixl is not None:
                            nixl.close()

                perf_reused_runs: list[dict[str, Any]] = []
                perf_stream_runs: list[dict[str, Any]] = []

                def perftest_turn() -> None:
                    # Note [perftest buffers]: the three modes in one turn, in rotating order.
                    variants = [(perf_runs, "list"), (perf_stream_runs, "in_flight"), (perf_reused_runs, "reused")]
                    k = len(perf_runs) % len(variants)
                    for runs, mode in variants[k:] + variants[:k]:
                        runs.append(run_perftest(case, n, tls, mode))

                def kvtier_turn() -> None:
                    if len(kv.samples) % 2 == 0:
                        kv.rep()
                        kv.rep_in_flight(IN_FLIGHT)
                    else:
                        kv.rep_in_flight(IN_FLIGHT)
                        kv.rep()

                turns = [("kvtier", kvtier_turn), ("ucx_perftest", perftest_turn), ("nixl", nixl_turn)]
                turn_order = []
                for rnd in range(reps):
                    k = rnd % len(turns)  # Note [Rotating turns] (bench nvme)
                    turn_order.append([label for label, _ in turns[k:] + turns[:k]])
                    for _, turn in turns[k:] + turns[:k]:
                        turn()
                kv_out = kv.finish()
                nixl_out = None
                if nixl_outs:
                    nixl_out = dict(nixl_outs[-1])
                    nixl_out["verified"] = all(o["verified"] for o in nixl_outs)
                    nixl_out["samples_s"] = [o["samples_s"][0] for o in nixl_outs]
                peer_rounds = {"ucx_perftest": [r.get("gbps") for r in perf_runs],
                               "nixl": [r.get("gbps") for r in nixl_runs],
                               "ucx_perftest_reused_buffer": [r.get("gbps") for r in perf_reused_runs]}
                peers: dict[str, Any] = {}
                for name, runs in (("ucx_perftest", perf_runs), ("nixl", nixl_runs),
                                   ("ucx_perftest_reused_buffer", perf_reused_runs),
                                   ("ucx_perftest_in_flight", perf_stream_runs)):
                    ok = [r["gbps"] for r in runs if "gbps" in r]
                    if ok:
                        info = dict(next(r for r in runs if "gbps" in r))
                        info.update(gbps=statistics.median(ok), rounds_gbps=ok)
                        if name == "nixl" and nixl_out:
                            info.update({k: v for k, v in nixl_out.items() if k != "gbps"})
                        peers[name] = info
                    else:
                        peers[name] = {"missing": runs[-1].get("missing", "no round ran") if runs else "no round ran"}
                # The anchor is the best peer moving distinct memory (Note [perftest buffers]).
                usable = {k: v["gbps"] for k, v in peers.items() if "gbps" in v and k in ("ucx_perftest", "nixl")}
                anchor = max(usable, key=usable.get) if usable else None
                paired = {name: paired_ratio(kv.gbps_by_round(), r) for name, r in peer_rounds.items()}
                results.append({
                    "case": f"{transport} {case.name}", "transport": transport, "op": case.op,
                    "block_bytes": case.block_bytes, "blocks": n,
                    "kvtier_gbps": round(kv_out["gbps"], 3),
                    **{f"{name}_gbps": round(v["gbps"], 3) if "gbps" in v else {"missing": v["missing"]}
                       for name, v in peers.items()},
                    "anchor": anchor or "none (no peer ran)",
                    "anchor_gbps": round(usable[anchor], 3) if anchor else None,
                    "ratio": round(kv_out["gbps"] / usable[anchor], 3) if anchor else None,
                    "paired": paired[anchor] if anchor else None,
                    "paired_by_peer": paired,
                    # the stream comparison beside the verdict (Note [One list per sample])
                    "in_flight": IN_FLIGHT,
                    "kvtier_in_flight_gbps": round(statistics.median(kv.gbps_by_round(in_flight=True)), 3),
                    "paired_in_flight": paired_ratio(kv.gbps_by_round(in_flight=True),
                                                     [r.get("gbps") for r in perf_stream_runs]),
                    "turn_order": turn_order, "settings": settings[transport],
                    "kvtier": {**kv_out, "rounds_gbps": kv.gbps_by_round(),
                               "in_flight_rounds_gbps": kv.gbps_by_round(in_flight=True)}, "peers": peers,
                })
    report = {"suite": "remote", "machine": machine_info(),
              "config": {"size_mib": size_mib, "reps": reps, "seed": seed, "transports": list(transports),
                         "settings": settings},
              "results": results}
    table = Table(title=f"kvtier bench remote ({size_mib} MiB per sample, median of {reps} rounds)")
    for col in ("case", "kvtier GB/s", "ucx_perftest GB/s", "NIXL GB/s", "ratio to best", "paired [95% CI]",
                f"{IN_FLIGHT} in flight: kvtier / perftest GB/s", "paired", "perftest, reused buffer GB/s"):
        table.add_column(col, justify="left" if col == "case" else "right")

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else "[yellow]missing[/yellow]"

    def pfmt(pr: dict[str, Any] | None) -> str:
        if pr is None or pr.get("median") is None:
            return "n/a"
        return f"{pr['median']:.2f}x " + (
            f"[{pr['ci95'][0]:.2f}, {pr['ci95'][1]:.2f}] {pr['verdict']}" if pr["ci95"] else f"({pr['verdict']})")

    for r in results:
        pcol = pfmt(r["paired"])
        table.add_row(r["case"], f"{r['kvtier_gbps']:.2f}", fmt(r["ucx_perftest_gbps"]), fmt(r["nixl_gbps"]),
                      f"{r['ratio']:.2f}x" if r["ratio"] is not None else "n/a", pcol,
                      f"{r['kvtier_in_flight_gbps']:.2f} / {fmt(r['ucx_perftest_in_flight_gbps'])}",
                      pfmt(r["paired_in_flight"]), fmt(r["ucx_perftest_reused_buffer_gbps"]))
    Console().print(table)
    if nixl_missing:
        console.print(f"[yellow]NIXL missing:[/yellow] {nixl_missing}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        console.print(f"wrote {json_path}")
    return report


if __name__ == "__main__":  # helper processes: python remote.py --role '<json>'
    role, cfg_json = sys.argv[1], sys.argv[2]
    {"--kvtier-target": _kvtier_target, "--nixl-target": _nixl_target,
     "--nixl-initiator": _nixl_initiator}[role](json.loads(cfg_json))
