"""``kvtier simulate --workers N --migration ...`` (kvtier.harness.simcluster): the router, the migration
modes and the network model. Small seeded workloads on a small modelled server: fast."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from kvtier import cli
from kvtier.harness import simcluster
from kvtier.harness import sim
from kvtier.harness import workload as wl
from kvtier.errors import InvalidArgumentError
from kvtier.harness.workload import Step, Trace

# A small server: 1k tokens/s of prefill, 64 KiB of KV per token (1 MiB blocks of 16 tokens),
# tiers small enough for a few traces to fill them.
SMALL = sim.ServerModel(
    name="small", hbm_kv_gib=0.05, dram_kv_gib=0.2, nvme_kv_gib=1, pcie_gbps=10, hbm_gbps=100, nvme_read_gbps=2,
    nvme_write_gbps=1, network_gbps=0.0, prefill_tokens_per_s=1000, decode_tokens_per_s=100,
    kv_bytes_per_token=65536, dollars_per_hour=1.0)
BT = 16
FAST = simcluster.NetworkModel("test-fast", 1e-3, 100.0, "test")


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(4, 2000, size=n).tolist()


def busy_home_workload(shared: int = 512, own: int = 1024, traces: int = 8, gap_s: float = 1.0,
                       seed: int = 0) -> list[Trace]:
    """``traces`` traces arriving together with a ``shared``-token common prefix (0: none) and
    ``own`` tokens of their own, then two more steps after ``gap_s`` tool gaps; and one trace
    ``warm`` (placed on worker 1 by the tests) that caches the shared prefix there first."""
    rng = np.random.default_rng(seed)
    common = _tokens(rng, shared)
    out = [Trace("warm", 0.0, [Step(common + _tokens(rng, own), 4)])]
    for i in range(traces):
        steps = [Step(common + _tokens(rng, own), 4, gap_s, "t"), Step(_tokens(rng, 64), 4, gap_s, "t"),
                 Step(_tokens(rng, 64), 4)]
        out.append(Trace(f"t{i}", 0.5 + 0.001 * i, steps))
    return out


def run(trs: list[Trace], modes: str = "all", network: simcluster.NetworkModel = FAST, threshold_s: float = 0.5,
        workers: int = 2, all_home: bool = True) -> dict:
    placement = {t.trace_id: (1 if t.trace_id == "warm" else 0) for t in trs} if all_home else None
    return simcluster.simulate_cluster(server=SMALL, workers=workers, migration=modes, network=network,
                                       workload=trs, block_tokens=BT, threshold_s=threshold_s, placement=placement,
                                       progress=False, quiet=True, vocab=2000)


def test_workers_1_keeps_the_old_json(tmp_path: Path) -> None:
    """--workers 1 (the default) runs today's code path: the same JSON as without the flag."""
    out = []
    for extra in ([], ["--workers", "1"]):
        path = tmp_path / f"r{len(out)}.json"
        assert cli.main(["simulate", "--traces", "12", "--policy", "tiered", "--no-progress", "--json", str(path),
                         *extra]) == 0
        rep = json.loads(path.read_text())
        rep.pop("wall_s")
        out.append(rep)
    assert out[0] == out[1]
    assert "workers" not in out[0] and "network" not in out[0] and "migrations" not in out[0]["policies"]["tiered"]


def test_none_is_the_static_fleet_of_simulate() -> None:
    """With migration none the N workers are kvtier simulate's fleet of N servers (same placement):
    the same JCT, prefill and hits, step for step."""
    trs = sim.fleet_workload(40, seed=3)
    server = dataclasses.replace(sim.PRESETS["h100-llama3-8b"], hbm_kv_gib=2, dram_kv_gib=4)
    old = sim.simulate(server=server, servers=2, policies=["tiered"], workload=trs, progress=False, quiet=True)
    new = simcluster.simulate_cluster(server=server, workers=2, migration="none", workload=trs, progress=False,
                                      quiet=True)
    a, b = old["policies"]["tiered"], new["policies"]["none"]
    assert b["bytes_moved"]["migration"] == 0
    for key in ("jct_s", "jct_subagents_s", "prefill_tokens", "hits", "makespan_s", "sustained"):
        assert _rounded(a[key]) == _rounded(b[key]), key  # sums in another order: last-bit differences
    assert {k: v for k, v in b["bytes_moved"].items() if k != "migration"} == a["bytes_moved"]


def _rounded(x: object) -> object:
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return float(f"{x:.12g}") if isinstance(x, float) else x


def test_none_moves_nothing_and_the_same_rule_decides_everywhere() -> None:
    rep = run(busy_home_workload())
    none, full, dedup = (rep["policies"][m] for m in ("none", "full", "dedup"))
    assert none["bytes_moved"]["migration"] == 0 and none["migrations"]["count"] == 0
    assert none["migrations"]["router_wanted_migration"] > 0  # the rule said move; none keeps the trace home
    for r in (full, dedup):
        assert r["migrations"]["count"] == r["migrations"]["router_wanted_migration"] > 0
    # identical token accounting: the same generated tokens and the same prefill total in every mode
    for key in ("tokens_crc32", "generated_tokens"):
        assert none[key] == full[key] == dedup[key]
    assert none["prefill_tokens"]["total"] == full["prefill_tokens"]["total"] == dedup["prefill_tokens"]["total"]
    # migrating to the idle worker helps here: the work spreads over both workers
    assert full["workers"][1]["steps"] > none["workers"][1]["steps"]
    assert full["jct_s"]["p50"] < 0.8 * none["jct_s"]["p50"]  # 7.47 s vs 11.25 s


def test_dedup_sends_only_what_the_target_lacks() -> None:
    shared = run(busy_home_workload(shared=512))
    full, dedup = shared["policies"]["full"], shared["policies"]["dedup"]
    # the same migrations happen (same rule, same decision times); dedup skips the shared prefix
    assert [(m["trace"], m["step"], m["dst"]) for m in full["migrations"]["first"]] == \
        [(m["trace"], m["step"], m["dst"]) for m in dedup["migrations"]["first"]]
    assert dedup["bytes_moved"]["migration"] < full["bytes_moved"]["migration"]
    for m in full["migrations"]["first"]:
        assert m["blocks_sent"] == m["blocks_held"]
    for m in dedup["migrations"]["first"]:
        assert m["blocks_sent"] == m["blocks_held"] - m["blocks_present"]
    assert any(m["blocks_present"] >= 512 // BT for m in dedup["migrations"]["first"])
    # nothing shared with the target: dedup sends what full sends
    alone = run(busy_home_workload(shared=0, own=1536))
    f, d = alone["policies"]["full"], alone["policies"]["dedup"]
    assert f["migrations"]["count"] > 0
    assert d["bytes_moved"]["migration"] <= f["bytes_moved"]["migration"]
    first = [m for m in d["migrations"]["first"] if m["step"] == 1]
    assert first and all(m["blocks_present"] == 0 for m in first)


def test_dedup_never_sends_more_per_migration_on_the_fleet_workload() -> None:
    trs = sim.fleet_workload(60, seed=1)
    server = dataclasses.replace(sim.PRESETS["h100-llama3-8b"], hbm_kv_gib=2, dram_kv_gib=4,
                                 prefill_tokens_per_s=2000)
    rep = simcluster.simulate_cluster(server=server, workers=2, migration=["full", "dedup"], network="rdma-400g",
                                      workload=trs, progress=False, quiet=True)
    f, d = rep["policies"]["full"], rep["policies"]["dedup"]
    assert f["migrations"]["count"] > 0 and d["migrations"]["count"] > 0
    per = lambda r: r["bytes_moved"]["migration"] / r["migrations"]["count"]  # noqa: E731
    assert per(d) < per(f)  # the system prompt and tool schemas are shared
    assert f["migrations"]["blocks_sent"] == f["migrations"]["blocks_of_traces"] or \
        f["migrations"]["blocks_sent"] <= f["migrations"]["blocks_of_traces"]


def test_a_migration_that_outlasts_the_gap_delays_the_step_by_the_remainder() -> None:
    slow = simcluster.NetworkModel("test-slow", 0.25, 0.08, "test")  # 80 MB/s: a trace's 96 MiB take 1.5 s
    trs = busy_home_workload(shared=0, own=1024, traces=8, gap_s=0.2)
    rep = run(trs, modes="full", network=slow, threshold_s=0.5)
    mig = rep["policies"]["full"]["migrations"]
    assert mig["outlasted_gap"] > 0
    cr_steps = _step_starts(trs, slow)
    checked = 0
    for m in mig["first"]:
        transfer = slow.transfer_s(m["bytes"])
        assert m["end"] - m["start"] == pytest.approx(transfer, abs=1e-12)
        if m["end"] > m["returned"]:
            assert m["delay_s"] == pytest.approx(m["end"] - m["returned"], abs=1e-12)
            # the step starts when the blocks land (the target is idle then): the gap plus the remainder
            start = cr_steps[(m["trace"], m["step"])]
            assert start - m["returned"] == pytest.approx(m["delay_s"], abs=1e-9)
            checked += 1
        else:
            assert m["delay_s"] == 0
    assert checked > 0


def _step_starts(trs: list[Trace], net: simcluster.NetworkModel) -> dict[tuple[str, int], float]:
    """Rerun the 'full' mode by hand to read each step's start (not in the report)."""
    layout = sim._layout(SMALL, BT)
    ws = []
    for _ in range(2):
        backend = sim.ModelBackend(SMALL, layout)

        def make_cache(policy: str, backend=backend):  # type: ignore[no-untyped-def]
            from kvtier.cache import TieredCache

            c = TieredCache(layout, "sim", device_bytes=int(SMALL.hbm_kv_gib * 2**30),
                            dram_bytes=int(SMALL.dram_kv_gib * 2**30), nvme_dir="(modelled)",
                            nvme_bytes=int(SMALL.nvme_kv_gib * 2**30), backend=backend, load_chunk_blocks=1 << 20)
            backend.engine.mover = c.moves
            return c

        runner = simcluster.PolicyRunner("tiered", sim.ModelExecutor(SMALL, backend, 2000), make_cache,
                                         sim._cost(SMALL, layout))
        ws.append(simcluster._Worker(runner, runner.cache, backend))
    placement = {t.trace_id: (1 if t.trace_id == "warm" else 0) for t in trs}
    cr = simcluster.ClusterReplay("full", trs, ws, net, 0.5, layout.block_bytes, BT, placement)
    cr.run()
    return cr.step_start


@pytest.mark.parametrize("argv, needle", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "-3"], "got -3"),
    (["--workers", "2", "--migration", "teleport"], "'teleport'"),
    (["--workers", "2", "--network", "infiniband-9000"], "'infiniband-9000'"),
    (["--workers", "2", "--policy", "trace-aware"], "'trace-aware'"),
    (["--migration", "dedup"], "needs --workers"),
    (["--network", "tcp"], "needs --workers"),
    (["--workers", "2", "--servers", "3"], "--servers 3"),
    (["--workers", "2", "--route-threshold", "-1"], "-1"),
])
def test_bad_arguments_are_clear_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["simulate", "--traces", "2", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert "kvtier: error:" in err and needle in err


def test_bad_arguments_of_the_function() -> None:
    trs = busy_home_workload(traces=1)
    with pytest.raises(InvalidArgumentError, match="got 0"):
        simcluster.simulate_cluster(server=SMALL, workers=0, workload=trs, progress=False, quiet=True)
    with pytest.raises(InvalidArgumentError, match="'sideways'"):
        simcluster.simulate_cluster(server=SMALL, workers=2, migration="sideways", workload=trs, progress=False,
                                    quiet=True)
    with pytest.raises(InvalidArgumentError, match="'carrier-pigeon'"):
        simcluster.check_network("carrier-pigeon")
    with pytest.raises(InvalidArgumentError, match="bandwidth_gbps"):
        simcluster.NetworkModel("x", 0.0, 0.0)


def test_network_presets_are_sourced() -> None:
    assert set(simcluster.NETWORKS) == {"shm", "tcp", "rdma-400g"}
    doc = (Path(__file__).parent.parent / "docs" / "benchmarks.md").read_text()
    # The presets cite the 2026-12-05 table of `bench remote`; later runs follow it in the section.
    section = doc[doc.index("## `kvtier bench remote`"):]
    section = section[:section.index("### 2026-12-06")]
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"\| (shm|tcp) 2 MiB put \| ([0-9.]+) \|", section)}
    assert simcluster.NETWORKS["shm"].bandwidth_gbps == rows["shm"]
    assert simcluster.NETWORKS["tcp"].bandwidth_gbps == rows["tcp"]
    assert simcluster.NETWORKS["rdma-400g"].bandwidth_gbps == pytest.approx(400 / 8 * 0.9)
    for n in simcluster.NETWORKS.values():
        assert n.source and n.transfer_s(0) == n.latency_s > 0


def test_network_model_vs_the_measurement_in_the_docs() -> None:
    """docs/benchmarks.md compares the model with a kvtier bench remote run it was not set from
    (512 MiB per sample): its model column must be the presets', its ratio the columns' ratio."""
    doc = (Path(__file__).parent.parent / "docs" / "benchmarks.md").read_text()
    section = doc[doc.index("### Network model vs a measurement"):]
    rows = re.findall(r"^\| (shm|tcp) \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \(.*?\) \| ([0-9.]+) \|$",
                      section, flags=re.M)
    assert {r[0] for r in rows} == {"shm", "tcp"}
    for name, nbytes, model_s, measured_s, measured_gbps, ratio in rows:
        net = simcluster.NETWORKS[name]
        assert float(model_s) == pytest.approx(int(nbytes) / (net.bandwidth_gbps * 1e9), abs=1e-4)
        assert float(measured_gbps) == pytest.approx(int(nbytes) / float(measured_s) / 1e9, rel=2e-3)
        assert float(ratio) == pytest.approx(float(model_s) / float(measured_s), abs=0.01)


def test_cli_workers_2_writes_the_three_modes(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    assert cli.main(["simulate", "--workers", "2", "--migration", "all", "--network", "tcp", "--traces", "8",
                     "--no-progress", "--json", str(path)]) == 0
    rep = json.loads(path.read_text())
    assert list(rep["policies"]) == ["none", "full", "dedup"]
    assert rep["network"]["name"] == "tcp" and rep["workers"] == 2 and rep["cache_policy"] == "tiered"
    for r in rep["policies"].values():
        assert "migration" in r["bytes_moved"] and len(r["workers"]) == 2
        assert {"count", "router_wanted_migration"} <= set(r["migrations"])
        assert r["jct_p50_s"] == r["jct_s"]["p50"]
