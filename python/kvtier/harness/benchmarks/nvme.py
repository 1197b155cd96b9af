"""``kvtier bench nvme``: the NVMe tier against fio and NIXL's POSIX backend, same run.

For every case (sequential write, sequential read, random read; a Llama-3-8B-sized 2 MiB block
and a Qwen2-0.5B-sized 192 KiB block) the same number of blocks of the same size moves between
DRAM and a file on the same file system three ways: kvtier's NVMe tier, fio (io_uring, O_DIRECT,
at kvtier's queue depth; its best io_uring variant), and NIXL's POSIX backend (one batched
transfer on an O_DIRECT descriptor, its kernel queue sized to the same queue depth). Every
sample starts on a flushed (``sync``), quiet disk. The default depth is 256: NIXL's Linux AIO
queue admits more requests than asked for (the kernel sizes the AIO ring up: 254 for 64), so
below 256 (what the disk admits) NIXL would run deeper than the other two. The three take turns,
one repetition each per round, in a rotated order (Note [Rotating turns]), and medians over the
rounds are compared. The anchor is the better of fio and NIXL; a peer that cannot run is reported
as missing, never dropped silently. Write cases also time the tier without its fdatasync (Note
[Durable and flush-free writes]), the promise the peers make.

Note [Paired ratios]
~~~~~~~~~~~~~~~~~~~~
``ratio`` divides kvtier's median by the anchor's. On a disk whose samples swing by 1.5x, that
figure alone cannot say whether 0.95 means slower or the same: it carries no spread, and "the
better of two peers" takes the larger of two noisy medians, which puts a tie below 1.0 on
average. ``paired`` answers that question: kvtier's sample divided by the anchor's sample of the
same round (taken seconds apart, so a slow stretch of the host slows both), the median of those
ratios, and a distribution-free 95% interval of that median (order statistics; six rounds at
least). The verdict is ``faster`` or ``slower`` when the interval lies wholly above or below 1.0,
and ``parity`` when it holds 1.0, i.e. the rounds cannot tell the two apart; more ``--reps``
narrow the interval.

Note [Memory speed beside the disk]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
What the tier does that the peers do not (an XXH3-64 over every payload, on both ways) costs
memory bandwidth, and a machine's memory speed varies more than its disk: on one fresh VM of
this project's kind memcpy of 512 MiB ran at 10-12 GB/s, on another at 22-24. So before every
case the run times, on a buffer of the case's size (larger than the caches): a plain memcpy
(one thread), XXH3 in the case's block-size pieces on one thread, and on as many threads as the
tier verifies and hashes with. Each case records them (``memory``) together with ``hash_share``:
the time hashing the case's bytes takes on those threads over kvtier's median time for the case.
A share near 1 would mean hashing alone could bound the case; a small share means the disk did.
The JSON's ``machine`` section keeps the medians over the run's cases (``memory``), and the
table prints them under it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

import kvtier
from kvtier.harness.benchmarks import machine_info, nvme_anchors


@dataclass(frozen=True)
class NvmeCase:
    name: str
    block_bytes: int
    mode: str  # write | read | randread


_LLAMA = 32 * 2 * 8 * 128 * 2 * 16  # 2 MiB
_QWEN = 24 * 2 * 2 * 64 * 2 * 16  # 192 KiB
CASES = [
    NvmeCase("llama3-8b 2MiB write", _LLAMA, "write"),
    NvmeCase("llama3-8b 2MiB read", _LLAMA, "read"),
    NvmeCase("llama3-8b 2MiB randread", _LLAMA, "randread"),
    NvmeCase("qwen2-0.5b 192KiB write", _QWEN, "write"),
    NvmeCase("qwen2-0.5b 192KiB read", _QWEN, "read"),
    NvmeCase("qwen2-0.5b 192KiB randread", _QWEN, "randread"),
]


class _KvtierCase:
    """kvtier's side of one case, in the tier's steady state, one timed repetition at a time.

    The tier is created once and written once untimed (fio and NIXL also lay their file out
    before timing: the first write into freshly allocated extents also pays for the file
    system's extent conversion). A timed write stores new keys into the slots the previous keys
    were evicted from; a timed read reads every block back (in order or in a random
    permutation) and checks each against the bytes written.
    """

    def __init__(self, directory: str, case: NvmeCase, num_blocks: int, queue_depth: int, max_io_bytes: int,
                 rng: np.random.Generator, durable: bool = True) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        self.directory, self.case, self.n, self.rng = directory, case, num_blocks, rng
        self.pool = kvtier.HostPool(case.block_bytes, num_blocks=num_blocks)
        self.ids = self.pool.allocate(num_blocks)
        self.pool.view()[:] = rng.integers(0, 256, size=(num_blocks, case.block_bytes), dtype=np.uint8)
        self.expected = self.pool.view().copy()
        self.durable = durable
        self.tier = kvtier.NvmeTier(directory, self.pool, num_slots=num_blocks, queue_depth=queue_depth,
                                    max_io_bytes=max_io_bytes, durable=durable)
        self.keys = np.arange(1, num_blocks + 1)
        self.tier.write(self.keys, self.ids).wait()  # lay the file out
        self.samples: list[float] = []
        self.verified = True
        self.noisy = 0
        self.stat_path = nvme_anchors.block_device_stat_path(directory)
        self.devs: list[dict[str, Any] | None] = []

    def rep(self) -> None:
        if self.case.mode != "write":
            # Note [Fresh data for every read]: every peer's read sample reads data written just
            # before it (untimed). The NIXL worker rewrites its file on every call; on a VM the
            # host keeps recently written data in its page cache, so a peer reading older data
            # (kvtier's, written when the case began) read 5-10% slower for that reason alone.
            self.tier.evict(self.keys)
            self.keys = self.keys + self.n
            self.tier.write(self.keys, self.ids).wait()
            # Clear the target before the disk settles, as the NIXL worker does: nothing but the
            # transfer itself runs between a quiet disk and the timed sample.
            order = self.rng.permutation(self.n) if self.case.mode == "randread" else np.arange(self.n)
            keys, ids = self.keys[order], self.ids[order]
            self.pool.view()[:] = 0
        # Like every fio and NIXL sample: start on a flushed, quiet disk (not timed).
        if not nvme_anchors.settle_disk(self.directory):
            self.noisy += 1
        before = nvme_anchors._read_dev_stat(self.stat_path)
        if self.case.mode == "write":
            self.tier.evict(self.keys)
            self.keys = self.keys + self.n
            h = self.tier.write(self.keys, self.ids)
            h.wait()
        else:
            h = self.tier.read(keys, ids)
            h.wait()
        self.devs.append(nvme_anchors._dev_stat_delta(before, nvme_anchors._read_dev_stat(self.stat_path),
                                                      h.latency_s))
        if self.case.mode != "write":
            self.verified &= bool(h.block_ok.all()) and np.array_equal(self.pool.view(), self.expected)
        self.samples.append(h.latency_s)

    def gbps_by_round(self) -> list[float]:
        return [self.n * self.case.block_bytes / t / 1e9 for t in self.samples]

    def finish(self) -> dict[str, Any]:
        if self.case.mode == "write":  # read the last write back
            self.pool.view()[:] = 0
            h = self.tier.read(self.keys, self.ids)
            h.wait()
            self.verified &= bool(h.block_ok.all()) and np.array_equal(self.pool.view(), self.expected)
        io_mode = self.tier.io_mode
        fsyncs = self.tier.stats()["fsyncs"]
        self.tier.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        med = statistics.median(self.samples)
        # What the disk saw in the median sample (the same telemetry as the peers report).
        device = self.devs[sorted(range(len(self.samples)), key=self.samples.__getitem__)[len(self.samples) // 2]]
        return {"gbps": self.n * self.case.block_bytes / med / 1e9, "iops": self.n / med,
                "samples_s": self.samples, "io_mode": io_mode, "verified": self.verified,
                "durable": self.durable, "fsyncs": fsyncs, "noisy_samples": self.noisy, "device": device}


def _merge_peer(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One peer's rounds: the median of its per-round figures, and every round kept.

    fio runs each of its variants once per round. Its figure is the variant with the best median
    over the rounds (what ``run_fio`` does with ``repeat`` > 1), not the median of each round's
    best variant: on a disk that swings 1.9-2.9 GB/s between samples, the best of four samples
    per round is biased upwards against the single sample the other peers get per round.
    """
    ok = [r for r in runs if "gbps" in r]
    if not ok:
        return runs[-1]
    out = dict(ok[-1])
    out["gbps"] = statistics.median(r["gbps"] for r in ok)
    out["rounds_gbps"] = [r["gbps"] for r in ok]
    per_variant: dict[str, list[float]] = {}
    for r in ok:
        for name, v in r.get("variants", {}).items():
            if "gbps" in v:
                per_variant.setdefault(name, []).append(v["gbps"])
    if per_variant:
        best = max(per_variant, key=lambda k: statistics.median(per_variant[k]))
        out["rounds_best_variant_gbps"] = out["rounds_gbps"]  # each round's best variant (biased)
        out["median_of_rounds_best_variant_gbps"] = out["gbps"]
        out["variant"] = best
        out["gbps"] = statistics.median(per_variant[best])
        out["rounds_gbps"] = per_variant[best]
        out["variants_rounds_gbps"] = per_variant
        out["cmd"] = out["variants"].get(best, {}).get("cmd", out.get("cmd"))
    return out


def _round_gbps(runs: list[dict[str, Any]], merged: dict[str, Any]) -> list[float | None]:
    """A peer's figure in each round (None where it failed), for the variant its figure uses."""
    variant = merged.get("variant")
    out: list[float | None] = []
    for r in runs:
        v = r.get("variants", {}).get(variant, r) if variant else r
        out.append(v.get("gbps") if "gbps" in v else None)
    return out


def median_ci95(values: list[float]) -> tuple[float, float] | None:
    """A distribution-free 95% interval for the median of ``values``: the order statistics
    x(k) and x(n+1-k) with the largest k such that P(Binomial(n, 1/2) < k) <= 2.5%. None below
    six values, where even [min, max] covers the median with less than 95% probability.
    """
    n = len(values)
    k, below = 0, 0.0  # below = P(B <= k - 1)
    while below + math.comb(n, k) / 2**n <= 0.025:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    x = sorted(values)
    return x[k - 1], x[n - k]


def paired_ratio(kvtier_gbps: list[float], peer_gbps: list[float | None]) -> dict[str, Any] | None:
    """kvtier / peer, round by round (Note [Paired ratios]): the median of the per-round ratios
    and a distribution-free 95% interval of that median (:func:`median_ci95`).

    ``verdict`` is ``faster`` when the interval lies above 1.0, ``slower`` when below, ``parity``
    when it holds 1.0 (the rounds cannot tell the two apart), and ``too few rounds`` under six.
    """
    pairs = [k / p for k, p in zip(kvtier_gbps, peer_gbps) if p]
    if not pairs:
        return None
    ci = median_ci95(pairs)
    if ci is None:
        verdict = "too few rounds"
    else:
        verdict = "faster" if ci[0] > 1.0 else "slower" if ci[1] < 1.0 else "parity"
    return {"median": round(statistics.median(pairs), 3), "ci95": [round(v, 3) for v in ci] if ci else None,
            "rounds": len(pairs), "verdict": verdict, "per_round": [round(v, 3) for v in pairs]}


def nvme_verify_threads() -> int:
    """The threads the tier hashes and verifies with by default (NvmeTier's verify_threads)."""
    return max(1, min(os.cpu_count() or 1, 8))


def memory_speed(size_bytes: int, piece_bytes: int, threads: int, reps: int = 3) -> dict[str, Any]:
    """Note [Memory speed beside the disk]: memcpy and XXH3 GB/s on a ``size_bytes`` buffer, the
    median of ``reps`` timings each (after one untimed pass that faults the pages in)."""
    from kvtier import _core

    src = np.ones(size_bytes, dtype=np.uint8)
    dst = np.zeros(size_bytes, dtype=np.uint8)
    _core.timed_memcpy(dst, src, 1)
    memcpy = [_core.timed_memcpy(dst, src, 1) for _ in range(reps)]
    hash_1t = [_core.timed_checksum(src, piece_bytes, 1) for _ in range(reps)]
    hash_mt = [_core.timed_checksum(src, piece_bytes, threads) for _ in range(reps)]
    gbps = lambda ts: round(size_bytes / statistics.median(ts) / 1e9, 2)  # noqa: E731
    return {"buffer_bytes": size_bytes, "memcpy_gbps": gbps(memcpy), "xxh3_gbps": gbps(hash_1t),
            "xxh3_threads": threads, "xxh3_threads_gbps": gbps(hash_mt)}


def run(directory: str | None = None, size_mib: int = 512, reps: int = 3, queue_depth: int = 256,
        max_io_bytes: int = 4 << 20, cases: str | None = None, nixl_python: str | None = None,
        seed: int = 0, json_path: str | None = None, progress: bool = True) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=True)
    selected = [c for c in CASES if cases is None or cases in c.name]
    if not selected:
        raise kvtier.InvalidArgumentError(f"no nvme case matches {cases!r}; cases: {[c.name for c in CASES]}")
    base = directory or tempfile.mkdtemp(prefix="kvtier-bench-nvme-", dir=os.getcwd())
    os.makedirs(base, exist_ok=True)
    rng = np.random.default_rng(seed)
    fio_missing = nvme_anchors.fio_available()
    nixl_missing = nvme_anchors.nixl_available(nixl_python)
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("bench nvme", total=len(selected) * reps)
        for case in selected:
            n = max(1, (size_mib << 20) // case.block_bytes)
            memory = memory_speed(n * case.block_bytes, case.block_bytes, nvme_verify_threads())
            # Rounds: kvtier, fio, NIXL one repetition each, in turn, so the disk's state (host
            # write-back, other tenants) changes under all three alike.
            kv_case = _KvtierCase(os.path.join(base, "kvtier"), case, n, queue_depth, max_io_bytes, rng)
            # Note [Durable and flush-free writes]: the tier acknowledges a write after an
            # fdatasync (durable=True, its default); fio and NIXL flush nothing. Write cases also
            # time the tier with durable=False, which writes the same payloads, headers and
            # checksums but no flush: the same promise as the peers'. Both figures are reported.
            nosync_case = (_KvtierCase(os.path.join(base, "kvtier-nosync"), case, n, queue_depth, max_io_bytes, rng,
                                       durable=False) if case.mode == "write" else None)
            fio_runs: list[dict[str, Any]] = []
            nixl_runs: list[dict[str, Any]] = []

            def fio_turn() -> None:
                if fio_missing:
                    fio_runs.append({"missing": fio_missing})
                    return
                if case.mode != "write":  # fresh data for every read (Note [Fresh data for every read])
                    try:
                        os.remove(os.path.join(base, "fio.dat"))
                    except OSError:
                        pass
                try:
                    fio_runs.append(nvme_anchors.run_fio(os.path.join(base, "fio.dat"), case.block_bytes, n,
                                                         queue_depth, case.mode, repeat=1))
                except Exception as e:  # a failing peer is reported, not hidden
                    fio_runs.append({"missing": f"fio failed: {e}"})

            def nixl_turn() -> None:
                if nixl_missing:
                    nixl_runs.append({"missing": nixl_missing})
                    return
                try:
                    nixl_runs.append(nvme_anchors.run_nixl_posix(os.path.join(base, "nixl.dat"), case.block_bytes,
                                                                 n, case.mode, repeat=1, python_exe=nixl_python,
                                                                 queue_depth=queue_depth))
                except Exception as e:
                    nixl_runs.append({"missing": f"NIXL failed: {e}"})

            turns = [("kvtier", kv_case.rep)]
            if nosync_case is not None:
                turns.append(("kvtier, no fdatasync", nosync_case.rep))
            turns += [("fio", fio_turn), ("NIXL", nixl_turn)]
            turn_order: list[list[str]] = []
            for rnd in range(reps):
                # Note [Rotating turns]: the peers take their turns in a rotated order each round,
                # so no peer always goes first after the previous case or right after the same
                # other peer's writes (the host's write-back of them).
                k = rnd % len(turns)
                turn_order.append([label for label, _ in turns[k:] + turns[:k]])
                for label, turn in turns[k:] + turns[:k]:
                    bar.update(task, description=f"bench nvme: {case.name} ({label})")
                    turn()
                bar.advance(task)
            kv = kv_case.finish()
            nosync = nosync_case.finish() if nosync_case is not None else None
            peers: dict[str, Any] = {"fio": _merge_peer(fio_runs), "nixl": _merge_peer(nixl_runs)}
            for f in ("fio.dat", "nixl.dat"):
                try:
                    os.remove(os.path.join(base, f))
                except OSError:
                    pass
            usable = {k: v["gbps"] for k, v in peers.items() if "gbps" in v}
            anchor = max(usable, key=usable.get) if usable else None
            peer_rounds = {name: _round_gbps(runs, peers[name])
                           for name, runs in (("fio", fio_runs), ("nixl", nixl_runs))}
            paired = {name: paired_ratio(kv_case.gbps_by_round(), r) for name, r in peer_rounds.items()}
            results.append({
                "case": case.name,
                "kvtier_gbps": round(kv["gbps"], 3),
                "anchor": anchor or "none (no peer ran)",
                "anchor_gbps": round(usable[anchor], 3) if anchor else None,
                "ratio": round(kv["gbps"] / usable[anchor], 3) if anchor else None,
                "fio_gbps": round(usable["fio"], 3) if "fio" in usable else None,
                "nixl_gbps": round(usable["nixl"], 3) if "nixl" in usable else None,
                "paired": paired[anchor] if anchor else None,
                "paired_by_peer": paired,
                "paired_nosync": (paired_ratio(nosync_case.gbps_by_round(), peer_rounds[anchor])
                                  if nosync_case is not None and anchor else None),
                "kvtier_nosync_gbps": round(nosync["gbps"], 3) if nosync else None,
                "ratio_nosync": round(nosync["gbps"] / usable[anchor], 3) if nosync and anchor else None,
                "mode": case.mode, "block_bytes": case.block_bytes, "blocks": n,
                "queue_depth": queue_depth, "turn_order": turn_order, "kvtier": kv, "kvtier_nosync": nosync,
                "peers": peers,
                "memory": memory,
                # Note [Memory speed beside the disk]: hashing the case's bytes on the tier's
                # threads, over kvtier's median time for the case.
                "hash_share": round(n * case.block_bytes / (memory["xxh3_threads_gbps"] * 1e9)
                                    / (n * case.block_bytes / (kv["gbps"] * 1e9)), 3),
            })
    if directory is None:
        shutil.rmtree(base, ignore_errors=True)
    machine = machine_info()
    if results:
        machine["memory"] = {k: round(statistics.median(r["memory"][k] for r in results), 2)
                             for k in ("memcpy_gbps", "xxh3_gbps", "xxh3_threads_gbps")}
        machine["memory"]["xxh3_threads"] = results[0]["memory"]["xxh3_threads"]
        machine["memory"]["note"] = "medians over the cases; each case's own figures are in its 'memory'"
    report = {"suite": "nvme", "machine": machine,
              "config": {"size_mib": size_mib, "reps": reps, "queue_depth": queue_depth,
                         "max_io_bytes": max_io_bytes, "directory": base, "seed": seed},
              "results": results}
    table = Table(title=f"kvtier bench nvme ({size_mib} MiB per case, QD {queue_depth}, median of {reps})")
    for col in ("case", "kvtier GB/s", "fio GB/s", "NIXL GB/s", "ratio to best", "paired [95% CI]",
                "no-fsync kvtier GB/s, ratio", "memcpy / XXH3 GB/s", "hash share"):
        table.add_column(col, justify="left" if col == "case" else "right")

    def fmt(v: float | None, peer: dict[str, Any] | None = None) -> str:
        return f"{v:.2f}" if v is not None else "[yellow]missing[/yellow]"

    for r in results:
        ratio = r["ratio"]
        style = "green" if ratio is not None and ratio >= 1.0 else "red"
        ns = "-" if r["kvtier_nosync_gbps"] is None else (
            f"{r['kvtier_nosync_gbps']:.2f}, {r['ratio_nosync']:.2f}x" if r["ratio_nosync"] is not None
            else f"{r['kvtier_nosync_gbps']:.2f}")
        pr = r["paired"]
        pcol = "n/a" if pr is None else f"{pr['median']:.2f}x " + (
            f"[{pr['ci95'][0]:.2f}, {pr['ci95'][1]:.2f}] {pr['verdict']}" if pr["ci95"] else f"({pr['verdict']})")
        mem = r["memory"]
        table.add_row(r["case"], f"{r['kvtier_gbps']:.2f}", fmt(r["fio_gbps"]), fmt(r["nixl_gbps"]),
                      f"[{style}]{ratio:.2f}x[/{style}]" if ratio is not None else "n/a", pcol, ns,
                      f"{mem['memcpy_gbps']:.1f} / {mem['xxh3_threads_gbps']:.1f}", f"{r['hash_share']:.0%}")
    Console().print(table)
    if results:
        m = machine["memory"]
        Console().print(f"machine: memcpy {m['memcpy_gbps']:.1f} GB/s (1 thread), XXH3 {m['xxh3_gbps']:.1f} GB/s "
                        f"(1 thread), {m['xxh3_threads_gbps']:.1f} GB/s ({m['xxh3_threads']} threads), medians over "
                        "the cases; hash share: hashing a case's bytes on those threads over kvtier's time for it")
    for name, why in (("fio", fio_missing), ("NIXL", nixl_missing)):
        if why:
            console.print(f"[yellow]{name} missing:[/yellow] {why}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        console.print(f"wrote {json_path}")
    return report
