"""Traces and the trace-aware policy: lifecycle, ownership, gap-aware placement, prefetch, and the
fleet simulator that drives the same code."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kvtier
import numpy as np
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from kvtier import _core
from kvtier.cache import DEVICE, DRAM, NVME, TieredCache
from kvtier.keys import make_salt
from kvtier.policy import Action, CostModel, GapEstimator, TierState, TraceAwarePolicy
from kvtier.trace import BackgroundLane, TraceManager, TraceState

torch = pytest.importorskip("torch")
L = kvtier.KVLayout(num_layers=2, kv_heads=2, head_dim=16, block_tokens=4, dtype="float32")
SALT = make_salt("tiny", L)
BT = L.block_tokens


def cost(bw: float = 1e6, recompute: float = 1e-3) -> CostModel:
    """Slow links (1 MB/s: a 1 KiB block takes ~1 ms each way) so that gaps of seconds are long."""
    links = ("device->dram", "dram->device", "dram->nvme", "nvme->dram", "device->engine", "dram->engine")
    return CostModel(L.block_bytes, BT, {k: bw for k in links}, recompute)


def make(tmp_path: Path, device: int = 32, dram: int = 64, nvme: int = 0) -> TieredCache:
    return TieredCache(L, SALT, device_bytes=device * L.block_bytes, dram_bytes=dram * L.block_bytes,
                       nvme_dir=str(tmp_path / "nvme") if nvme else None, nvme_bytes=nvme * L.block_bytes)


def engine_kv(seed: int = 0):
    kv = torch.randn(64, 2, 2, BT, 2, 16, generator=torch.Generator().manual_seed(seed))  # blocks_first
    return kv, kvtier.register_kv(kv, L, "blocks_first")


def run_step(tr, tokens: np.ndarray, now: float, seed: int):
    """One engine step: load what is cached into a fresh engine KV, 'compute' the rest (fill with
    known data), then hand the KV to end_step. Returns (hit tokens, engine KV)."""
    plan = tr.begin_step(tokens, now=now)
    kv, reg = engine_kv(seed)
    tr._mgr.cache.load(plan.match, reg, np.arange(plan.match.hit_blocks)).wait()
    seq = len(tokens)
    tr.end_step(tokens, reg, seq, now=now)
    return plan.hit_tokens, kv


# ------------------------------------------------------------------------------ the index's refs


def test_index_refs_and_shared_keys_are_evicted_last() -> None:
    ix = _core.BlockIndex()
    keys = np.arange(12, dtype=np.uint64).reshape(6, 2)
    ix.insert(keys, 0, np.arange(6, dtype=np.int32))  # key 0 most recent ... key 5 least
    ix.ref(keys[4:])  # keys 4, 5: owned by two traces
    ix.ref(keys[4:])
    ix.ref(keys[:1])
    assert ix.refs(keys).tolist() == [1, 0, 0, 0, 2, 2]
    plain, _, _ = ix.victims(0, 3)
    shared_last, _, n = ix.victims(0, 6, shared_refs=2)
    assert plain[:, 1].tolist() == [11, 9, 7]  # LRU: keys 5, 4, 3
    assert n == 6 and shared_last[:, 1].tolist() == [7, 5, 3, 1, 11, 9]  # unshared first, then 5, 4
    with pytest.raises(kvtier.InvalidArgumentError, match="no trace reference"):
        ix.unref(keys[1:2])
    with pytest.raises(kvtier.InvalidArgumentError, match="no trace reference"):
        ix.unref(np.concatenate([keys[:1], keys[:1]]))  # one ref, dropped twice: refused, nothing changes
    assert ix.refs(keys[:1]).tolist() == [1]
    tiers, blocks, pins = ix.locate(np.concatenate([keys[:2], [[99, 99]]]).astype(np.uint64))
    assert tiers.tolist() == [0, 0, 255] and blocks.tolist() == [0, 1, -1] and pins.tolist() == [0, 0, 0]


# ------------------------------------------------------------------------------ the policy alone


def decide(gap: float, fill: float = 0.9, dram_fill: float = 0.1, blocks: int = 100, **kw):
    tiers = TierState(device_blocks=1000, device_fill=fill, kept_blocks=kw.pop("kept", 0), dram_fill=dram_fill,
                      has_dram=True, has_nvme=kw.pop("nvme", True))
    return TraceAwarePolicy().decide(private_blocks=blocks, private_tokens=blocks * BT, gap_s=gap, gap_low_s=gap,
                                     gap_source="hint", tiers=tiers, cost=kw.pop("cost", cost()))


def test_policy_keeps_short_gaps_and_demotes_long_ones() -> None:
    c = cost()
    rt = c.round_trip_s(100, DRAM)  # 100 blocks of 1 KiB both ways at 1 MB/s: ~0.2 s
    short, long_ = decide(rt), decide(100 * rt)
    assert short.action is Action.KEEP and "round trip" in short.reason and short.ttl_s > rt
    assert long_.action is Action.DRAM and long_.prefetch_in_s is not None
    # the prefetch starts early enough to finish before the expected resume
    assert long_.prefetch_in_s + 1.5 * c.restore_s(100, DRAM) <= 100 * rt
    # a device with room keeps even long gaps; a full DRAM sends long gaps to NVMe
    assert decide(100 * rt, fill=0.1).action is Action.KEEP
    assert decide(100 * rt, dram_fill=0.95).action is Action.NVME
    # a critically full device and a gap no round trip fits: drop when recompute is cheap,
    # else restore late
    assert decide(0.5 * rt, fill=0.99, cost=cost(recompute=1e-7)).action is Action.DROP
    late = decide(0.5 * rt, fill=0.99, cost=cost(recompute=1.0))
    assert late.action is Action.DRAM and late.costs["dram"] == pytest.approx(0.5 * rt)
    with pytest.raises(kvtier.InvalidArgumentError):
        decide(-1.0)


def test_gap_estimator_hint_then_learned_then_fleet() -> None:
    g = GapEstimator(prior_s=7.0)
    assert g.estimate("build", None) == (7.0, 0.0, "prior")
    assert g.estimate("build", 3.0)[2] == "hint"
    for x in (10.0, 20.0, 30.0, 40.0):
        g.observe("build", x)
    gap, low, src = g.estimate("build", None)
    assert src == "learned" and gap == 25.0 and low < gap
    assert g.estimate("grep", None)[2] == "fleet"


def test_cost_model_rejects_bad_numbers() -> None:
    with pytest.raises(kvtier.InvalidArgumentError, match="unknown link"):
        CostModel(L.block_bytes, BT, {"gpu->moon": 1.0}, 0.0)
    with pytest.raises(kvtier.InvalidArgumentError, match="must be > 0"):
        CostModel(L.block_bytes, BT, {"device->dram": 0.0}, 0.0)


# ------------------------------------------------------------------------------ traces on a real cache


def two_traces(tmp_path: Path, device: int = 32):
    """Traces a and b share a 4-block prefix; each then has 3 private blocks and a 2-token tail."""
    cache = make(tmp_path, device=device, dram=64)
    mgr = TraceManager(cache, cost())
    shared = np.arange(4 * BT)
    ta, tb = mgr.open("a"), mgr.open("b")
    ctx_a = np.concatenate([shared, 1000 + np.arange(3 * BT + 2)])
    ctx_b = np.concatenate([shared, 2000 + np.arange(3 * BT + 2)])
    _, kv_a = run_step(ta, ctx_a, 0.0, seed=1)
    run_step(tb, ctx_b, 0.0, seed=2)
    return cache, mgr, ta, tb, ctx_a, ctx_b, kv_a


def test_long_gap_demotes_private_blocks_and_prefetches_them_before_resume(tmp_path: Path) -> None:
    cache, mgr, ta, tb, ctx_a, _, kv_a = two_traces(tmp_path, device=16)
    assert ta.num_blocks == 8 and ta.tokens_cached == len(ctx_a)  # 7 full + the tail
    assert cache.index.refs(ta.owned_keys()).tolist() == [2] * 4 + [1] * 4
    d = ta.tool_start(expected_gap_s=60.0, tool="build", now=1.0)
    assert d.action is Action.DRAM and ta.state is TraceState.PARKED
    # the private blocks (3 full + tail) went to DRAM; the shared prefix stayed on the device
    assert ta.tiers() == {"device": 4, "dram": 4, "nvme": 0, "missing": 0}
    mgr.tick(1.0 + d.prefetch_in_s)  # the prefetch is due before the resume
    assert ta.tiers()["device"] == 8
    ta.tool_end(now=61.0)
    assert ta.state is TraceState.RESUMED
    more = np.concatenate([ctx_a, 3000 + np.arange(5)])
    plan = ta.begin_step(more, now=61.0)
    assert plan.hit_tokens == len(ctx_a)  # every token, the partial tail included
    out, reg = engine_kv(seed=9)
    cache.load(plan.match, reg, np.arange(plan.match.hit_blocks)).wait()
    assert torch.equal(out[:8], kv_a[:8])  # the bytes came back exactly
    ta.end_step(more, reg, len(more), now=61.0)
    snap = mgr.metrics.snapshot()
    assert snap["decisions"]["dram"] == 1 and snap["prefetch_lateness_s"]["count"] == 1
    assert snap["prefetch_lateness_s"]["late"] == 0 and snap["tail_tokens_reused"] == 2


def test_short_gap_keeps_kv_on_the_device(tmp_path: Path) -> None:
    cache, mgr, ta, tb, ctx_a, _, _ = two_traces(tmp_path, device=16)
    rt = mgr.cost.round_trip_s(4, DRAM)
    d = ta.tool_start(expected_gap_s=rt, tool="read_file", now=1.0)
    assert d.action is Action.KEEP and ta.state is TraceState.TOOL
    assert ta.tiers() == {"device": 8, "dram": 0, "nvme": 0, "missing": 0}
    # kept blocks are leased: pinned, so other traffic cannot push them out during the gap
    assert (cache.locate(ta.owned_keys())[1] > 0).all()
    ta.tool_end(now=1.0 + rt)
    assert ta.begin_step(np.concatenate([ctx_a, [7]]), now=1.0 + rt).hit_tokens == len(ctx_a)


def test_the_hint_decides_where_the_kv_goes(tmp_path: Path) -> None:
    """Same traces, same state, only the hint differs: the placement must differ with it."""
    placements = {}
    for hint in (0.001, 600.0):
        cache, mgr, ta, *_ = two_traces(tmp_path / str(hint), device=16)
        ta.tool_start(expected_gap_s=hint, now=1.0)
        placements[hint] = ta.tiers()
    assert placements[0.001]["device"] == 8
    assert placements[600.0]["device"] == 4 and placements[600.0]["dram"] == 4


def test_no_private_blocks_on_the_device_is_a_nothing_decision_not_a_keep(tmp_path: Path) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from kvtier.metrics import register_traces

    cache, mgr, ta, tb, ctx_a, _, kv_a = two_traces(tmp_path, device=16)
    child = ta.fork("a.sub")  # every block of a now has two owners: a has nothing private
    cache.demote_keys(ta.owned_keys()[-2:], DRAM)  # two of them below the device
    d = ta.tool_start(expected_gap_s=600.0, tool="build", now=1.0)
    assert d.action is Action.NOTHING and d.reason == "no private blocks on the device"
    # handled like a keep: the device blocks are leased, the ones below are restored before the resume
    assert ta.state is TraceState.TOOL and d.ttl_s >= 1200.0
    assert mgr.kept_blocks() == 6 and (cache.locate(ta.owned_keys()[:6])[1] > 0).all()
    assert ta.tiers()["dram"] == 2
    mgr.tick(601.0)  # the restore was due before the expected resume
    assert ta.tiers()["device"] == 8
    snap = mgr.metrics.snapshot()
    assert snap["decisions"] == {"keep": 0, "dram": 0, "nvme": 0, "drop": 0, "nothing": 1}
    assert snap["reasons"] == {"nothing: no private blocks on the device": 1}
    registry = prometheus_client.CollectorRegistry()
    register_traces(mgr, registry, name="t")
    text = prometheus_client.generate_latest(registry).decode()
    assert 'kvtier_trace_decisions_total{action="nothing",cache="t"} 1.0' in text
    assert 'kvtier_trace_decisions_total{action="keep",cache="t"} 0.0' in text
    plan = ta.begin_step(np.concatenate([ctx_a, [9]]), now=601.0)
    assert plan.hit_tokens == len(ctx_a)
    # a trace with private blocks on the device still gets a real decision
    child.close()
    ta.end_step(np.concatenate([ctx_a, [9]]), engine_kv()[1], len(ctx_a) + 1, now=601.0)
    assert ta.tool_start(expected_gap_s=0.001, now=602.0).action is Action.KEEP


def test_late_restore_recomputes_or_waits(tmp_path: Path) -> None:
    cache, mgr, ta, tb, ctx_a, _, _ = two_traces(tmp_path, device=16)
    d = ta.tool_start(expected_gap_s=60.0, now=1.0)
    assert d.action is Action.DRAM
    cache.moves.lanes["in"] = BackgroundLane(measure=lambda fn: (10.0, fn()))  # a slow restore: 10 s on the lane
    ta.tool_end(now=2.0)  # the tool came back early: the restore starts now and is late
    mgr.cost.recompute_s_per_token = 1e-6  # recomputing is far cheaper than waiting
    plan = ta.begin_step(np.concatenate([ctx_a, [5]]), now=2.0)
    assert plan.late_recompute_tokens > 0 and plan.hit_tokens < len(ctx_a)
    assert mgr.metrics.prefetch_lateness_s == [10.0]
    ta.end_step(np.concatenate([ctx_a, [5]]), engine_kv()[1], len(ctx_a) + 1, now=3.0)
    # dear recompute: begin_step says to wait instead, and pins nothing
    d = ta.tool_start(expected_gap_s=60.0, now=4.0)
    cache.moves.lanes["in"] = BackgroundLane(measure=lambda fn: (4.0, fn()))  # 4 s on an idle lane
    ta.tool_end(now=5.0)
    mgr.cost.recompute_s_per_token = 10.0
    plan = ta.begin_step(np.concatenate([ctx_a, [5, 6]]), now=5.0)
    assert plan.match is None and plan.wait_s == pytest.approx(4.0)
    assert ta.begin_step(np.concatenate([ctx_a, [5, 6]]), now=9.0).match is not None


def test_fork_shares_blocks_and_close_releases_them(tmp_path: Path) -> None:
    cache, mgr, ta, tb, ctx_a, _, _ = two_traces(tmp_path)
    child = ta.fork("a.sub")
    keys = ta.owned_keys()
    assert np.array_equal(child.owned_keys(), keys)
    assert cache.index.refs(keys).tolist() == [3] * 4 + [2] * 4
    ta.close()
    assert cache.index.refs(keys).tolist() == [2] * 4 + [1] * 4
    # the child resumes from the parent's context, tail included
    assert child.begin_step(np.concatenate([ctx_a, [1, 2]]), now=1.0).hit_tokens == len(ctx_a)
    child.end_step(np.concatenate([ctx_a, [1, 2]]), engine_kv()[1], len(ctx_a) + 2)
    child.close()
    tail = keys[-1:]
    assert cache.index.refs(tail).tolist() == [0] and cache.locate(tail)[0].tolist() == [255]  # freed
    assert cache.locate(keys[:7])[0].max() < 255  # full blocks stay cached for others to match
    ta.close()  # idempotent


def test_lifecycle_errors_are_clear(tmp_path: Path) -> None:
    cache = make(tmp_path)
    mgr = TraceManager(cache, cost())
    t = mgr.open("x")
    with pytest.raises(kvtier.InvalidArgumentError, match="already open"):
        mgr.open("x")
    with pytest.raises(kvtier.InvalidArgumentError, match="non-empty string"):
        mgr.open("")
    with pytest.raises(kvtier.InvalidArgumentError, match="not running"):
        t.end_step(np.arange(8), engine_kv()[1], 8)
    with pytest.raises(kvtier.InvalidArgumentError, match="tool_start follows a step"):
        t.tool_start(1.0)
    with pytest.raises(kvtier.InvalidArgumentError, match="not waiting on a tool"):
        t.tool_end()
    with pytest.raises(kvtier.InvalidArgumentError, match="at least one token"):
        t.begin_step([])
    t.begin_step(np.arange(9), now=0.0)
    with pytest.raises(kvtier.InvalidArgumentError, match="already running"):
        t.begin_step(np.arange(9), now=0.0)
    with pytest.raises(kvtier.InvalidArgumentError, match="seq_len"):
        t.end_step(np.arange(9), engine_kv()[1], 99)
    t.end_step(np.arange(9), engine_kv()[1], 9)
    with pytest.raises(kvtier.InvalidArgumentError, match="expected_gap_s"):
        t.tool_start(-3.0)
    with pytest.raises(kvtier.InvalidArgumentError, match="ttl_s"):
        t.retain(0)
    t.close()
    with pytest.raises(kvtier.InvalidArgumentError, match="closed"):
        t.begin_step(np.arange(9))
    with pytest.raises(kvtier.InvalidArgumentError, match="no open trace"):
        mgr.get("x")
    with pytest.raises(kvtier.InvalidArgumentError, match="TieredCache"):
        TraceManager(object(), cost())  # type: ignore[arg-type]


def test_a_step_may_follow_a_step_and_tool_start_follows_each_step_once(tmp_path: Path) -> None:
    """end_step leaves the trace ready: a second step may begin without a tool call in between;
    a second end_step, or a tool_start anywhere but right after a step, names the state."""
    cache = make(tmp_path)
    mgr = TraceManager(cache, cost())
    t = mgr.open("x")
    ctx = np.arange(9)
    _, kv = run_step(t, ctx, 0.0, seed=1)
    assert t.state is TraceState.READY
    with pytest.raises(kvtier.InvalidArgumentError, match="'x' is ready, not running: its last step already ended"):
        t.end_step(ctx, engine_kv()[1], 9)
    more = np.concatenate([ctx, [50, 51, 52]])
    plan = t.begin_step(more, now=1.0)  # step after step: no tool call in between
    assert t.state is TraceState.RUNNING and plan.hit_tokens == 9  # the tail block too
    with pytest.raises(kvtier.InvalidArgumentError, match="'x' is running a step: call end_step before tool_start"):
        t.tool_start(1.0, now=1.0)
    out, reg = engine_kv(seed=2)
    cache.load(plan.match, reg, np.arange(plan.match.hit_blocks)).wait()
    assert torch.equal(out[:2], kv[:2])
    t.end_step(more, reg, len(more), now=1.0)
    assert t.tool_start(0.001, now=1.0).action is Action.KEEP and t.state is TraceState.TOOL
    with pytest.raises(kvtier.InvalidArgumentError, match=r"'x' is tool: tool_start follows a step, once \(it is "
                                                          r"already waiting on a tool\)"):
        t.tool_start(0.001, now=1.0)
    with pytest.raises(kvtier.InvalidArgumentError, match="'x' is tool, not running: call begin_step first"):
        t.end_step(more, reg, len(more))
    t.tool_end(now=2.0)
    with pytest.raises(kvtier.InvalidArgumentError, match="'x' is resumed: tool_start follows a step, once"):
        t.tool_start(1.0, now=2.0)
    fresh = mgr.open("y")
    with pytest.raises(kvtier.InvalidArgumentError, match=r"'y' is ready: tool_start follows a step, once "
                                                          r"\(no step has run yet\)"):
        fresh.tool_start(1.0)
    # a rejected hint does not use up the step's tool_start
    run_step(t, np.concatenate([more, [7]]), 3.0, seed=3)
    with pytest.raises(kvtier.InvalidArgumentError, match="expected_gap_s"):
        t.tool_start(-1.0, now=3.0)
    t.tool_start(1.0, now=3.0)


def test_retain_lease_expires(tmp_path: Path) -> None:
    cache, mgr, ta, *_ = two_traces(tmp_path)
    assert ta.retain(5.0, now=0.0) == 8
    assert (cache.locate(ta.owned_keys())[1] > 0).all()
    mgr.tick(4.0)
    assert (cache.locate(ta.owned_keys())[1] > 0).all()
    mgr.tick(5.0)
    assert (cache.locate(ta.owned_keys())[1] == 0).all() and mgr.metrics.expired_leases == 1


def test_kept_blocks_counts_a_shared_prefix_once(tmp_path: Path) -> None:
    """Two traces leasing the same 4-block prefix occupy 4 device blocks, not 8: the policy's
    keep budget and the simulator's decode capacity read this (it counted per lease, and reached
    10x the device's size in a fleet run)."""
    cache, mgr, ta, tb, *_ = two_traces(tmp_path)
    assert ta.retain(5.0, now=0.0) == 8 and tb.retain(5.0, now=0.0) == 8
    assert mgr.kept_blocks() == 4 + 4 + 4 <= cache.pools[0].num_blocks
    tb.release_retained()
    assert mgr.kept_blocks() == 8


def test_long_gap_under_dram_pressure_goes_to_nvme_and_back(tmp_path: Path) -> None:
    cache = make(tmp_path, device=16, dram=16, nvme=64)
    mgr = TraceManager(cache, cost(), policy=TraceAwarePolicy(dram_pressure=0.0, fill_keep=0.0))  # any use is pressure
    t = mgr.open("n")
    ctx = np.arange(6 * BT + 1)
    _, kv = run_step(t, ctx, 0.0, seed=3)
    d = t.tool_start(expected_gap_s=600.0, now=1.0)
    assert d.action is Action.NVME
    cache.moves.drain()  # the write runs in the background (Note [Background moves]): let it land
    assert t.tiers()["nvme"] == 7
    mgr.tick(601.0)  # the restore is submitted; begin_step waits for exactly these blocks
    plan = t.begin_step(np.concatenate([ctx, [1]]), now=601.0)
    assert t.tiers()["device"] == 7
    out, reg = engine_kv(seed=8)
    cache.load(plan.match, reg, np.arange(plan.match.hit_blocks)).wait()
    assert plan.hit_tokens == len(ctx) and torch.equal(out[:7], kv[:7])


def test_background_lane_fills_idle_stretches_in_time_order() -> None:
    lane = BackgroundLane(measure=lambda fn: (1.0, fn()))
    assert lane.run(10.0, lambda: None)[:2] == (10.0, 11.0)
    assert lane.run(5.0, lambda: None)[:2] == (5.0, 6.0)  # issued later, earlier in time: fits before
    assert lane.run(5.5, lambda: None)[:2] == (6.0, 7.0)
    assert lane.run(10.5, lambda: None)[:2] == (11.0, 12.0)
    assert lane.busy_s == 4.0


# ------------------------------------------------------------------------------ the simulator


def test_simulate_orders_policies_and_reports_cost(tmp_path: Path) -> None:
    from kvtier.harness import sim

    out = tmp_path / "s.json"
    rep = sim.simulate(traces=40, servers=2, hbm_kv_gib=4, progress=False, quiet=True, json_path=str(out))
    assert rep["kind"].startswith("SIMULATION") and out.exists()
    p = rep["policies"]
    # Which policy leads is what the simulator measures, not something to pin here. What must hold
    # whatever the policies decide: the books balance between independent counters (the cache's
    # hits and bytes moved, the driver's computed tokens) and the same work is offered to all.
    bt = rep["block_tokens"]
    block_bytes = rep["server"]["kv_bytes_per_token"] * bt
    total = p["none"]["prefill_tokens"]["total"]
    assert p["none"]["prefill_tokens"]["computed"] == total and sum(p["none"]["hits"].values()) == 0
    for name, v in p.items():
        assert v["prefill_tokens"]["total"] == total, name
        moved = v["bytes_moved"]
        for tier in ("device", "dram"):  # every hit is loaded into the engine, once, block by block
            assert moved.get(f"{tier}->engine", 0) == v["hits"][tier] * block_bytes, (name, tier)
        if name in ("device-lru", "tiered"):  # no partial tails: saved tokens are whole hit blocks
            assert total - v["prefill_tokens"]["computed"] == sum(v["hits"].values()) * bt, name
        assert v["prefill_tokens"]["computed"] < total or name == "none"
        assert v["dollars_per_task"] > 0 and v["tasks_per_hour"] > 0
    dec = p["trace-aware"]["trace_policy"]["decisions"]
    assert dec["dram"] + dec["nvme"] > 0 and dec["keep"] > 0


def test_simulate_bad_input() -> None:
    from kvtier.harness import sim

    with pytest.raises(kvtier.InvalidArgumentError, match="unknown server model"):
        sim.simulate(server="tpu-v9", traces=1, progress=False, quiet=True)
    with pytest.raises(kvtier.InvalidArgumentError, match="unknown policy"):
        sim.simulate(traces=1, policies=["clairvoyant"], progress=False, quiet=True)
    with pytest.raises(kvtier.InvalidArgumentError, match="must be > 0"):
        sim.ServerModel(**{**sim.PRESETS["h100-llama3-8b"].__dict__, "pcie_gbps": 0})


def test_simulate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kvtier.cli import main

    out = tmp_path / "s.json"
    assert main(["simulate", "--traces", "6", "--servers", "2", "--set", "hbm_kv_gib=2", "--no-progress",
                 "--json", str(out), "--policy", "tiered", "--policy", "trace-aware"]) == 0
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"tiered", "trace-aware"} and data["server"]["hbm_kv_gib"] == 2
    assert "SIMULATION" in capsys.readouterr().out
    assert main(["simulate", "--set", "pcie_gbps=fast", "--no-progress"]) == 2
    assert "not a number" in capsys.readouterr().err


def test_workload_tool_and_hint_round_trip(tmp_path: Path) -> None:
    from kvtier.harness import workload as wl

    trs = wl.default_workload(256, seed=2, traces=4)
    assert {s.tool for t in trs for s in t.steps} <= {x[0] for x in wl.DEFAULT_TOOLS}
    assert any(s.expected_gap_s is not None for t in trs for s in t.steps)
    wl.dump(trs, tmp_path / "w.jsonl")
    again = wl.load(tmp_path / "w.jsonl", vocab_size=256)
    assert [(s.tool, s.expected_gap_s) for t in again for s in t.steps] == \
        [(s.tool, s.expected_gap_s) for t in trs for s in t.steps]
    (tmp_path / "bad.jsonl").write_text('{"trace_id": "a", "steps": [{"append": [1], "generate": 2, '
                                        '"expected_gap_s": "soon"}]}\n')
    with pytest.raises(kvtier.InvalidArgumentError, match="expected_gap_s"):
        wl.load(tmp_path / "bad.jsonl")


def test_trace_metrics_export_to_prometheus(tmp_path: Path) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from kvtier.metrics import register_traces

    cache, mgr, ta, *_ = two_traces(tmp_path, device=16)
    ta.tool_start(expected_gap_s=60.0, now=1.0)
    registry = prometheus_client.CollectorRegistry()
    register_traces(mgr, registry, name="t")
    text = prometheus_client.generate_latest(registry).decode()
    assert 'kvtier_trace_decisions_total{action="dram",cache="t"} 1.0' in text
    assert 'kvtier_trace_gap_sources_total{cache="t",source="hint"} 1.0' in text
    assert 'kvtier_trace_demoted_blocks_total{cache="t"} 4.0' in text
    assert 'kvtier_trace_open{cache="t"} 2.0' in text


def test_cost_model_from_bench_reports(tmp_path: Path) -> None:
    import json

    copy = {"suite": "copy", "results": [{"case": "x vllm_flash gather", "kvtier_gbps": 10.0},
                                         {"case": "y kv_first gather", "kvtier_gbps": 20.0},
                                         {"case": "x vllm_flash scatter", "kvtier_gbps": 12.0}]}
    (tmp_path / "nvme.json").write_text(json.dumps({"suite": "nvme", "results": [
        {"case": "a write", "mode": "write", "kvtier_gbps": 1.0},
        {"case": "a read", "mode": "read", "kvtier_gbps": 2.0},
        {"case": "a randread", "mode": "randread", "kvtier_gbps": 9.0}]}))
    c = CostModel.from_bench(L.block_bytes, BT, 1e-4, copy_report=copy, nvme_report=str(tmp_path / "nvme.json"))
    assert c.bandwidth["device->dram"] == 15e9 and c.bandwidth["dram->device"] == 12e9
    assert c.bandwidth["dram->nvme"] == 1e9 and c.bandwidth["nvme->dram"] == 2e9
    with pytest.raises(kvtier.InvalidArgumentError, match="no 'results'"):
        CostModel.from_bench(L.block_bytes, BT, 1e-4, copy_report={"suite": "copy"})
    with pytest.raises(kvtier.InvalidArgumentError, match="cannot read"):
        CostModel.from_bench(L.block_bytes, BT, 1e-4, nvme_report=str(tmp_path / "missing.json"))


def test_restore_makes_room_from_the_trace_back_last(tmp_path: Path) -> None:
    """Note [Farthest resume first]: a restore frees DRAM from the waiting trace expected back
    last, not from the least recently used one (which here resumes sooner)."""
    cache = make(tmp_path, device=16, dram=8, nvme=64)  # DRAM: 7 usable blocks + 1 staging reserve
    keep_all = TraceAwarePolicy(fill_keep=1.0, keep_share=1.0)
    mgr = TraceManager(cache, cost(), policy=keep_all)
    traces = {}
    for i, name in enumerate(("c", "b", "a")):  # 3 private full blocks each
        t = mgr.open(name)
        run_step(t, 100 * (i + 1) + np.arange(3 * BT), 0.0, seed=i)
        t.tool_start(expected_gap_s=100.0, now=0.0)
        t.release_retained()
        traces[name] = t
    c, b, a = traces["c"], traces["b"], traces["a"]
    c.expected_resume, b.expected_resume, a.expected_resume = 20.0, 1000.0, 10.0
    cache.demote_keys(a.owned_keys(), 2)  # a on NVMe (through an empty DRAM)
    cache.demote_keys(c.owned_keys(), DRAM)  # then c: the least recently used in DRAM
    cache.demote_keys(b.owned_keys(), DRAM)
    assert c.tiers()["dram"] == 3 and b.tiers()["dram"] == 3 and a.tiers()["nvme"] == 3
    c._prefetch_due = b._prefetch_due = None  # only a's restore is under test
    a._prefetch(5.0)
    cache.moves.drain()  # the restore and the demotions making room for it run in the background
    assert a.tiers()["device"] == 3
    assert c.tiers()["dram"] == 3  # c comes back soon: left alone although least recently used
    assert b.tiers()["nvme"] >= 1 and mgr.metrics.farthest_demoted_blocks >= 1


# ------------------------------------------------------------------------------ found by the random walks


def test_refused_begin_step_of_a_waiting_trace_changes_nothing(tmp_path: Path) -> None:
    cache, mgr, ta, *_ = two_traces(tmp_path, device=16)
    ta.tool_start(expected_gap_s=60.0, now=1.0)
    for bad in ([], [1, -5, 3, 4, 5]):
        with pytest.raises(kvtier.InvalidArgumentError):
            ta.begin_step(bad, now=2.0)
        assert ta.state is TraceState.PARKED  # not resumed (its tool_end not taken) by a refused call
    assert mgr.gaps.estimate(None, None)[2] == "prior"  # no gap was observed


def nvme_cache_with_shared_nvme_block(tmp_path: Path):
    """10 blocks stored through a 2-block device: some of them on NVMe; two readers pin them all."""
    cache = TieredCache(L, SALT, device_bytes=2 * L.block_bytes, dram_bytes=4 * L.block_bytes,
                        nvme_dir=str(tmp_path / "nvme"), nvme_bytes=64 * L.block_bytes)
    kv, reg = engine_kv(seed=4)
    toks = np.arange(40)
    cache.store(toks, reg, np.arange(10))
    m1, m2 = cache.match(toks), cache.match(toks)
    victim = int(np.flatnonzero(m1.tiers == NVME)[0])
    return cache, kv, m1, m2, victim


def test_a_lost_nvme_block_takes_one_pin_not_another_readers(tmp_path: Path) -> None:
    """Two matches pin the same NVMe block and it is lost: the first load drops its own pin only,
    so the block stays pinned for the second reader (it was unpinned twice, leaving the second
    match's blocks evictable under it)."""
    cache, kv, m1, m2, victim = nvme_cache_with_shared_nvme_block(tmp_path)
    key = m1.keys[victim:victim + 1]
    cache.nvme.evict(key)  # behind the cache's back
    out, reg = engine_kv(seed=5)
    cache.load(m1, reg, np.arange(m1.hit_blocks)).wait()
    assert m1.hit_blocks == victim and torch.equal(out[:victim], kv[:victim])
    assert cache.locate(key)[1].tolist() == [1]  # m2's pin
    assert (cache.locate(m2.keys)[1] >= 1).all()
    cache.promote_keys(key, DRAM)  # a prefetch finds it lost too: drops its own pin only
    assert cache.locate(key)[1].tolist() == [1]
    cache.load(m2, reg, np.arange(m2.hit_blocks)).wait()
    assert m2.hit_blocks == victim
    cache.release(m1)
    cache.release(m2)
    assert (cache.locate(m1.keys)[1] == 0).all() and cache.locate(key)[0].tolist() == [255]


def test_an_unreadable_nvme_block_frees_its_slot(tmp_path: Path) -> None:
    """A read I/O error makes the block a miss; its slot is freed with it (it was left on the
    tier with no index entry pointing at it, so nothing ever reused or evicted it)."""
    cache, kv, m1, m2, victim = nvme_cache_with_shared_nvme_block(tmp_path)
    cache.release(m2)
    cache.nvme.inject_io_errors(1)  # every read fails
    out, reg = engine_kv(seed=5)
    cache.load(m1, reg, np.arange(m1.hit_blocks)).wait()
    cache.release(m1)
    cache.nvme.inject_io_errors(0)
    assert m1.hit_blocks == victim and torch.equal(out[:victim], kv[:victim])
    assert cache.nvme.stats()["read_errors"] >= 1
    on_nvme = cache.nvme.keys()
    assert (cache.locate(on_nvme)[0] == NVME).all() and len(on_nvme) == cache.blocks_per_tier()["nvme"]


# ------------------------------------------------------------------------------ randomized: try to break it
#
# Random operation sequences on a small real cache (device, DRAM, NVMe), with an engine whose KV
# for a token is a function of the whole prefix up to it, so a block served for the wrong prefix,
# a stale tail or a lost NVMe block that is loaded anyway shows up as wrong bytes. Checked after
# every operation: (a) after each step's load, every hit token holds its expected KV; (b) each
# key's trace refcount equals the number of open traces that own it, and each trace owns the
# content keys of the tokens it holds KV for; (d) each key's pins equal the pins of the open
# matches and leases that hold it; no device/DRAM block is neither cached nor free, no NVMe slot
# belongs to no indexed key. (c) At the end, with every trace closed and every lease expired,
# nothing is referenced or pinned.

FUZZ_KV_BLOCKS = 64  # blocks of the engine's KV per running step
FUZZ_MAX_TOKENS = 180  # longer contexts are cut (diverged) so a step fits the engine's KV
_TOKEN_POS = torch.arange(FUZZ_KV_BLOCKS * BT).reshape(FUZZ_KV_BLOCKS, 1, 1, BT, 1, 1)
_KV_PATTERN = torch.arange(2 * 2 * 2 * 16, dtype=torch.float32).reshape(2, 2, 2, 16)[None, :, :, None, :, :]


def prefix_values(tokens: np.ndarray) -> torch.Tensor:
    """One integer per token position (exact in float32) that depends on every token up to it."""
    out = np.zeros(FUZZ_KV_BLOCKS * BT, dtype=np.float32)
    h = 0
    for i, tok in enumerate(tokens.tolist()):
        h = (h * 1_000_003 + tok + 1) % ((1 << 61) - 1)
        out[i] = (h ^ (h >> 31)) % (1 << 17)
    return torch.from_numpy(out)


def expected_kv(vals: torch.Tensor) -> torch.Tensor:
    """The engine's KV for those values: token t of block b holds vals[b * BT + t] * 128 + pattern."""
    return vals.reshape(FUZZ_KV_BLOCKS, 1, 1, BT, 1, 1) * 128 + _KV_PATTERN


def fill_kv(kv: torch.Tensor, vals: torch.Tensor, lo: int, hi: int) -> None:
    """'Compute' tokens [lo, hi): write their expected KV into the engine's KV."""
    mask = (_TOKEN_POS >= lo) & (_TOKEN_POS < hi)
    kv.copy_(torch.where(mask, expected_kv(vals), kv))


def first_wrong_token(kv: torch.Tensor, vals: torch.Tensor, hit: int) -> int | None:
    same = (kv == expected_kv(vals)).all(dim=5).all(dim=4).all(dim=2).all(dim=1).reshape(-1)  # per token
    bad = np.flatnonzero(~same.numpy()[:hit])
    return int(bad[0]) if len(bad) else None


def corrupt_nvme_block(cache: TieredCache, key: np.ndarray, where: int) -> bool:
    """Flip a payload byte of ``key``'s slot in the tier's file, behind its back (as a bad sector
    would): its checksum fails when read. Returns False when no slot holds the key."""
    core = cache.nvme._core
    with open(core.path, "r+b") as f:
        table = f.read(core.num_slots * 4096)
        best = None
        for slot in range(core.num_slots):
            magic, = struct.unpack_from("8s", table, slot * 4096)
            hi, lo, gen = struct.unpack_from("<QQQ", table, slot * 4096 + 16)
            if magic == b"KVTSLOT1" and (hi, lo) == (int(key[0]), int(key[1])) and (best is None or gen > best[1]):
                best = (slot, gen)
        if best is None:
            return False
        f.seek(core.payload_offset(best[0]) + where % L.block_bytes)
        b = f.read(1)
        f.seek(core.payload_offset(best[0]) + where % L.block_bytes)
        f.write(bytes([b[0] ^ 0x5A]))
        f.flush()
        os.fsync(f.fileno())
    return True


class RngPick:
    """Choices for a walk from a numpy generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:  # inclusive
        return int(self.rng.integers(lo, hi + 1))

    def random(self) -> float:
        return float(self.rng.random())

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.rng.integers(len(seq)))]


class DataPick(RngPick):
    """Choices for a walk drawn by hypothesis (so that it can shrink a failing sequence)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def random(self) -> float:
        return self.data.draw(st.integers(0, 99)) / 100

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.data.draw(st.integers(0, len(seq) - 1))]


class Lagging:
    """A transfer that starts when someone waits on it, and says it is not done before: the walk's
    background moves then run and land when the walk says (a wait that needs them, or a settle),
    never by the machine's timing, so a walk replays exactly (a copy engine and a disk always
    slower than the test; a race of an I/O with a fault injected meanwhile resolves the same way
    every time)."""

    def __init__(self, start: Any) -> None:
        self._start, self._h, self._err = start, None, None

    def done(self) -> bool:
        return self._h is not None or self._err is not None

    def wait(self, timeout: float | None = None) -> None:
        if not self.done():
            try:
                self._h = self._start()
            except kvtier.KvtierError as e:
                self._err = e
        if self._err is not None:
            raise self._err
        self._h.wait(timeout)

    def exception(self) -> Any:
        if self._err is not None:
            return self._err
        return self._h.exception() if self._h is not None else None

    @property
    def latency_s(self) -> float:
        return self._h.latency_s if self._h is not None else 0.0

    @property
    def block_ok(self) -> Any:
        return self._h.block_ok if self._h is not None else None

    @property
    def bytes(self) -> int:
        return self._h.bytes if self._h is not None else 0


class LaggingEngine:
    """Wraps a copy engine (or an NVMe tier): every transfer is :class:`Lagging`."""

    def __init__(self, inner: Any, methods: tuple[str, ...] = ("transfer",)) -> None:
        self._inner = inner
        for m in methods:
            setattr(self, m, lambda *a, _m=getattr(inner, m), **k: Lagging(lambda: _m(*a, **k)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def lagging(cache: TieredCache) -> TieredCache:
    cache.engine = LaggingEngine(cache.engine)
    if cache.nvme is not None:
        cache.nvme = LaggingEngine(cache.nvme, ("read", "write"))
    return cache


_BB = L.block_bytes
_NO_KEYS = np.zeros((0, 2), dtype=np.uint64)
_SHAPE = (FUZZ_KV_BLOCKS, 2, 2, BT, 2, 16)
# (policy, recompute s/token): default; offload-happy (DRAM and NVMe); drop-happy; wait-happy
FUZZ_PROFILES = (
    (dict(), 1e-3),
    (dict(fill_keep=0.0, dram_pressure=0.3), 1e-3),
    (dict(fill_keep=0.0, critical_fill=0.3), 1e-6),
    (dict(fill_keep=0.0, dram_pressure=0.5), 1.0),
)
HINTS = (None, None, 0.0, 0.001, 0.05, 1.0, 30.0, 500.0)
TOOLS = (None, "read_file", "run_tests", "ask_user")
JUMPS = (0.001, 0.01, 0.1, 1.0, 5.0, 30.0, 120.0, 500.0)


class TraceWalk:
    """A cache, a trace manager, a model of what each trace should hold, and the operations."""

    MAX_TRACES = 6

    def __init__(self, root: Path, pick: RngPick, profile: int = 0,
                 blocks: tuple[int, int, int] = (12, 16, 48)) -> None:  # device, DRAM, NVMe
        policy, recompute = FUZZ_PROFILES[profile % len(FUZZ_PROFILES)]
        device, dram, nvme = blocks
        self.cache = lagging(TieredCache(L, SALT, device_bytes=device * _BB, dram_bytes=dram * _BB,
                                         nvme_dir=str(root / "nvme"), nvme_bytes=nvme * _BB))
        self.pick = pick
        self.now = 0.0
        lane = BackgroundLane(measure=lambda fn: (self.pick.choice((0.0005, 0.05, 2.0, 20.0)), fn()))
        self.mgr = TraceManager(self.cache, cost(recompute=recompute), policy=TraceAwarePolicy(**policy),
                                clock=lambda: self.now, lane=lane)
        self.model: dict[str, dict[str, Any]] = {}  # trace id -> tokens, held, state, run
        self.seen: dict[bytes, np.ndarray] = {}  # every key a trace owned or matched
        self.counts: Counter = Counter()
        self.log: list[str] = []
        self.next_id = 0
        self.current = ""
        self.io_error_ops = 0
        self.prompts = (5000 + np.arange(3 * BT + 1), 6000 + np.arange(5 * BT))  # shared system prompts

    # ---------------------------------------------------------------- helpers

    def when(self) -> float | None:
        return None if self.pick.random() < 0.2 else self.now  # None: the manager's clock (self.now)

    def tokens(self, n: int) -> np.ndarray:
        return np.array([self.pick.int(0, 4999) for _ in range(n)], dtype=np.int64)

    def traces_in(self, *states: str) -> list[str]:
        return sorted(i for i, m in self.model.items() if m["state"] in states)

    def note(self, what: str) -> None:
        self.log.append(f"t={self.now:.3f} {what}")
        del self.log[:-40]

    def fail(self, what: str) -> None:
        raise AssertionError(f"{what}\nin or after op {self.current!r}; the operations before:\n  "
                             + "\n  ".join(self.log))

    def trace(self, tid: str) -> Any:
        return self.mgr.get(tid)

    def remember(self, keys: np.ndarray) -> None:
        for k in keys:
            self.seen.setdefault(k.tobytes(), k)

    # ---------------------------------------------------------------- operations

    def run(self, op: str) -> None:
        self.current = op
        getattr(self, "op_" + op)()
        self.counts["op:" + op] += 1
        if self.io_error_ops:
            self.io_error_ops -= 1
            if self.io_error_ops == 0:
                self.cache.nvme.inject_io_errors(0)
        self.check()

    def op_open(self) -> None:
        if len(self.model) >= self.MAX_TRACES:
            return
        tid = f"t{self.next_id}"
        self.next_id += 1
        self.mgr.open(tid)
        kind = self.pick.int(0, 3)
        base = np.zeros(0, dtype=np.int64)
        if kind in (1, 2):
            base = self.prompts[kind - 1].copy()
        elif kind == 3 and self.model:  # starts like another trace's context (shares it without a fork)
            other = self.model[self.pick.choice(sorted(self.model))]["tokens"]
            base = other[: self.pick.int(0, len(other))].copy()
        self.model[tid] = {"tokens": base, "held": 0, "state": "new", "run": None, "pending": None}
        self.note(f"open {tid} base={len(base)}")

    def op_begin_step(self, tid: str | None = None) -> None:
        ids = self.traces_in("new", "stepped", "tool", "resumed")
        if not ids:
            return
        tid = tid or self.pick.choice(ids)
        m, t = self.model[tid], self.trace(tid)
        ctx = m["pending"]
        if ctx is None:
            base = m["tokens"]
            if len(base) > FUZZ_MAX_TOKENS or (len(base) and self.pick.random() < 0.1):  # the context diverges
                tail = m["held"] - m["held"] // BT * BT
                if tail and m["held"] <= FUZZ_MAX_TOKENS and self.pick.random() < 0.5:
                    base = base[: m["held"] - self.pick.int(1, tail)]  # inside the trace's tail block
                else:
                    base = base[: self.pick.int(0, min(len(base), FUZZ_MAX_TOKENS))]
                self.counts["diverged contexts"] += 1
            ctx = np.concatenate([base, self.tokens(self.pick.int(1, 12))])
        when = self.when()
        plan = t.begin_step(ctx, now=when)
        if m["state"] == "tool":
            m["state"] = "resumed"
        self.note(f"begin_step {tid} ctx={len(ctx)} -> hit={plan.hit_tokens} wait={plan.wait_s:.3f}")
        if plan.match is None:  # a late restore, and waiting beats recomputing: come back later
            if not plan.wait_s > 0:
                self.fail(f"{tid}: begin_step returned no match and no wait")
            m["pending"] = ctx
            self.counts["waits"] += 1
            return
        m["pending"] = None
        self.remember(plan.match.keys)
        kv = torch.full(_SHAPE, -1.0)
        reg = kvtier.register_kv(kv, L, "blocks_first")
        pinned = plan.match.hit_blocks
        self.cache.load(plan.match, reg, np.arange(plan.match.hit_blocks),
                        promote_min_refs=self.pick.choice((0, 2))).wait()
        hit = plan.hit_tokens if plan.match.hit_blocks == pinned else plan.match.hit_blocks * BT
        if plan.match.hit_blocks < pinned:
            self.counts["loads cut short by a lost NVMe block"] += 1
        if not 0 <= hit < len(ctx):
            self.fail(f"{tid}: {hit} hit tokens for a context of {len(ctx)}")
        vals = prefix_values(ctx)
        bad = first_wrong_token(kv, vals, hit)
        if bad is not None:
            self.fail(f"(a) {tid}: loaded KV of token {bad} (block {bad // BT}) is not that of its prefix "
                      f"({hit} hit tokens, {pinned} blocks matched, {plan.match.hit_blocks} loaded)")
        fill_kv(kv, vals, hit, len(ctx))
        m["run"] = {"ctx": ctx, "kv": kv, "reg": reg}
        m["state"] = "running"
        self.counts["steps"] += 1
        self.counts["hit tokens"] += hit
        self.counts["context tokens"] += len(ctx)

    def op_end_step(self, tid: str | None = None) -> None:
        ids = self.traces_in("running")
        if not ids:
            return
        tid = tid or self.pick.choice(ids)
        m, t = self.model[tid], self.trace(tid)
        run = m["run"]
        full = np.concatenate([run["ctx"], self.tokens(self.pick.int(0, 6))])
        seq_len = self.pick.choice((len(full), max(len(run["ctx"]), len(full) - 1), len(run["ctx"])))
        fill_kv(run["kv"], prefix_values(full), len(run["ctx"]), seq_len)
        t.end_step(full, run["reg"], seq_len, now=self.when())
        m.update(tokens=full, held=seq_len, state="stepped", run=None)
        self.note(f"end_step {tid} tokens={len(full)} seq_len={seq_len}")

    def op_tool_start(self, tid: str | None = None) -> None:
        ids = self.traces_in("stepped")
        if not ids:
            return
        tid = tid or self.pick.choice(ids)
        hint, tool = self.pick.choice(HINTS), self.pick.choice(TOOLS)
        d = self.trace(tid).tool_start(hint, tool, now=self.when())
        self.model[tid]["state"] = "tool"
        self.counts["decision:" + d.action.value] += 1
        self.note(f"tool_start {tid} hint={hint} tool={tool} -> {d.action.value} ({d.reason})")

    def op_cycle(self) -> None:
        """A whole turn of one trace: a step, then (mostly) a tool call."""
        ids = self.traces_in("new", "stepped", "tool", "resumed")
        if not ids:
            return
        tid = self.pick.choice(ids)
        self.op_begin_step(tid)
        if self.model[tid]["state"] == "running":
            self.op_end_step(tid)
            if self.pick.random() < 0.7:
                self.op_tool_start(tid)

    def op_tool_end(self) -> None:
        ids = self.traces_in("tool")
        if not ids:
            return
        tid = self.pick.choice(ids)
        self.trace(tid).tool_end(now=self.when())
        self.model[tid]["state"] = "resumed"
        self.note(f"tool_end {tid}")

    def op_fork(self) -> None:
        if not self.model or len(self.model) >= self.MAX_TRACES:
            return
        pid = self.pick.choice(sorted(self.model))
        tid = f"t{self.next_id}"
        self.next_id += 1
        self.trace(pid).fork(tid)
        p = self.model[pid]
        self.model[tid] = {"tokens": p["tokens"].copy(), "held": p["held"], "state": "new", "run": None,
                           "pending": None}
        self.note(f"fork {pid} -> {tid}")

    def op_retain(self) -> None:
        if not self.model:
            return
        tid = self.pick.choice(sorted(self.model))
        ttl = self.pick.choice((0.001, 0.5, 5.0, 60.0, 500.0))
        t = self.trace(tid)
        n = (t.retain if self.pick.random() < 0.5 else t.pin)(ttl, now=self.when())
        self.counts["leased blocks (retain)"] += n
        self.note(f"retain {tid} ttl={ttl} -> {n}")

    def op_release_retained(self) -> None:
        if self.model:
            tid = self.pick.choice(sorted(self.model))
            self.trace(tid).release_retained()
            self.note(f"release_retained {tid}")

    def op_clock(self) -> None:
        self.now += self.pick.choice(JUMPS) * (0.5 + self.pick.random())
        self.mgr.tick(self.when())
        self.note("tick")

    def op_settle(self) -> None:
        """Every move in flight lands now (the walk otherwise lands them only when something waits)."""
        n = len(self.cache.moves.pending)
        self.cache.moves.drain()
        self.counts["moves landed by settle"] += n
        self.note(f"settle ({n} moves)")

    def op_close(self) -> None:
        if self.model:
            tid = self.pick.choice(sorted(self.model))
            if self.model[tid]["state"] == "running":
                self.counts["closed mid-step"] += 1
            self.trace(tid).close()
            del self.model[tid]
            self.note(f"close {tid}")

    def op_lose_nvme_block(self) -> None:
        """A block vanishes from NVMe behind the cache's back: evicted, corrupted on disk, or I/O errors."""
        # In an order that does not depend on the tails' random keys (the walk must replay): the
        # open traces' blocks in their order (first those a running step holds: another reader may
        # find them lost first), else the other (content) keys sorted.
        held = [t._match.keys[: t._match.pinned] for t in map(self.trace, sorted(self.model)) if t._match is not None]
        owned = [self.trace(i).owned_keys() for i in sorted(self.model)]
        for group in (held, owned):
            keys = np.concatenate(group + [_NO_KEYS])
            keys = keys[(self.cache.locate(keys)[0] == NVME) & self.cache.nvme.contains(keys)]  # not lost yet
            if len(keys) and self.pick.random() < 0.6:
                break
        if len(keys) == 0 or self.pick.random() < 0.2:
            keys = self.cache.nvme.keys()
            keys = keys[(self.cache.locate(keys)[0] == NVME) & (self.cache.index.refs(keys) == 0)]
            keys = keys[np.lexsort((keys[:, 1], keys[:, 0]))]
        if len(keys) == 0:
            return
        key = keys[self.pick.int(0, len(keys) - 1)]
        kind = self.pick.choice(("evict", "corrupt", "io_errors"))
        if kind == "evict":
            self.cache.nvme.evict(key[None])
        elif kind == "corrupt":
            if not corrupt_nvme_block(self.cache, key, self.pick.int(0, L.block_bytes - 1)):
                self.fail("no NVMe slot holds a key the tier lists")
        else:
            # every I/O fails for the next few operations (failing every n-th would depend on the
            # order in which io_uring completes them, and the walk could not be replayed)
            self.cache.nvme.inject_io_errors(1)
            self.io_error_ops = self.pick.int(1, 3)
        self.counts["NVMe losses injected: " + kind] += 1
        self.note(f"lose NVMe block ({kind})")

    def op_misuse(self) -> None:
        """A call the trace's state does not allow: a clear error, and nothing changes."""
        if not self.model:
            return
        tid = self.pick.choice(sorted(self.model))
        m, t = self.model[tid], self.trace(tid)
        bad = {"new": ("end_step", "tool_start", "tool_end"), "running": ("begin_step", "tool_start", "tool_end"),
               "stepped": ("end_step", "tool_end", "bad_hint"), "tool": ("end_step", "tool_start"),
               "resumed": ("end_step", "tool_start", "tool_end")}[m["state"]] + ("bad_ttl", "empty_step")
        call = self.pick.choice(bad)
        before = t.state
        with pytest.raises(kvtier.InvalidArgumentError):
            if call == "end_step":
                t.end_step(np.arange(8), engine_kv()[1], 8)
            elif call == "tool_start":
                t.tool_start(1.0)
            elif call == "tool_end":
                t.tool_end()
            elif call == "begin_step":
                t.begin_step(np.arange(8))
            elif call == "bad_hint":
                t.tool_start(-1.0)
            elif call == "bad_ttl":
                t.retain(0)
            else:
                t.begin_step([])
        if t.state is not before:
            self.fail(f"{tid}: a refused {call} changed the state from {before.value} to {t.state.value}")
        self.counts["refused calls"] += 1

    OPS = {"open": 6, "begin_step": 22, "end_step": 20, "tool_start": 14, "tool_end": 6, "cycle": 6, "fork": 4,
           "retain": 4, "release_retained": 2, "clock": 10, "close": 4, "lose_nvme_block": 6, "misuse": 2,
           "settle": 5}

    def can(self, op: str) -> bool:
        """Whether ``op`` has something to act on (the state machine's preconditions)."""
        need = {"begin_step": ("new", "stepped", "tool", "resumed"), "cycle": ("new", "stepped", "tool", "resumed"),
                "end_step": ("running",), "tool_start": ("stepped",), "tool_end": ("tool",)}
        if op in need:
            return bool(self.traces_in(*need[op]))
        if op in ("open", "fork"):
            return len(self.model) < self.MAX_TRACES and (op == "open" or bool(self.model))
        if op in ("clock", "lose_nvme_block", "settle"):
            return True
        return bool(self.model)

    # ---------------------------------------------------------------- checks

    def check(self) -> None:
        cache, idx = self.cache, self.cache.index
        if set(self.mgr.traces) != set(self.model):
            self.fail(f"open traces {sorted(self.mgr.traces)} != {sorted(self.model)}")
        states = {"new": ("ready",), "running": ("running",), "stepped": ("ready",), "tool": ("tool", "parked"),
                  "resumed": ("resumed",)}
        owners: Counter = Counter()
        pins: Counter = Counter()
        leased = 0
        leased_keys: set[bytes] = set()
        for tid, m in self.model.items():
            t = self.trace(tid)
            if t.state.value not in states[m["state"]]:
                self.fail(f"{tid} is {t.state.value}, expected {states[m['state']]}")
            # the trace owns the content keys of the tokens it holds KV for, and its tail
            nf = m["held"] // BT
            owned = t.owned_keys()
            content = cache.keys_for(m["tokens"][: nf * BT])
            if not np.array_equal(owned[:nf], content) or t.num_blocks not in (nf, nf + 1):
                self.fail(f"{tid} owns {t.num_blocks} blocks that are not those of its {m['held']} tokens")
            if t.num_blocks > nf and not np.array_equal(t._tail_tokens, m["tokens"][nf * BT: m["held"]]):
                self.fail(f"{tid}: its tail holds tokens {t._tail_tokens} instead of {m['tokens'][nf * BT: m['held']]}")
            self.remember(owned)
            owners.update(k.tobytes() for k in owned)
            if t._match is not None:
                pins.update(k.tobytes() for k in t._match.keys[: t._match.pinned])
            pins.update(k.tobytes() for k in t._lease)
            leased += len(t._lease)
            leased_keys.update(k.tobytes() for k in t._lease)
        for held in cache.moves.pinned_keys():  # moves in flight hold their blocks (Note [Background moves])
            pins.update(k.tobytes() for k in held)
        keys = np.array(list(self.seen.values()), dtype=np.uint64).reshape(-1, 2)
        names = [k.tobytes() for k in keys]
        refs = idx.refs(keys) if len(keys) else np.zeros(0)
        want = np.array([owners[n] for n in names])
        if not np.array_equal(refs, want):
            i = int(np.flatnonzero(refs != want)[0])
            self.fail(f"(b) key {keys[i].tolist()}: refcount {refs[i]}, but {want[i]} open traces own it")
        if len(keys):
            _, have_pins = cache.locate(keys)
            want_pins = np.array([pins[n] for n in names])
            if not np.array_equal(have_pins, want_pins):
                i = int(np.flatnonzero(have_pins != want_pins)[0])
                tier = cache.locate(keys[i:i + 1])[0][0]
                self.fail(f"(d) key {keys[i].tolist()} (tier {tier}): {have_pins[i]} pins, "
                          f"but the open matches and leases hold {want_pins[i]}")
        if self.mgr._leased != leased or self.mgr.kept_blocks() != len(leased_keys):
            self.fail(f"the manager counts {self.mgr._leased} leases on {self.mgr.kept_blocks()} distinct blocks, "
                      f"the traces hold {leased} on {len(leased_keys)}")
        for tier in (DEVICE, DRAM):
            pool = cache.pools[tier]
            reserved = cache.moves.reserved_blocks(tier)  # targets of moves in flight
            if pool.free_blocks + idx.count(tier) + reserved != pool.num_blocks:
                self.fail(f"(c) {('device', 'dram')[tier]}: {pool.free_blocks} free + {idx.count(tier)} cached + "
                          f"{reserved} move targets != {pool.num_blocks} blocks (a leak or a double use)")
        on_nvme = cache.nvme.keys()
        on_nvme = on_nvme[~cache.moves.moving(on_nvme)]  # a write in flight: the index moves it when it lands
        if len(on_nvme) and (cache.locate(on_nvme)[0] != NVME).any():
            k = on_nvme[cache.locate(on_nvme)[0] != NVME][0]
            self.fail(f"(c) NVMe slot of key {k.tolist()} belongs to no key the index has on NVMe (a leaked slot)")

    def finish(self) -> None:
        """Close every trace, let every lease expire: nothing may stay referenced or pinned."""
        for tid in sorted(self.model):
            self.trace(tid).close()
            del self.model[tid]
        self.now += 1e6
        self.mgr.tick(self.now)
        self.cache.moves.drain()  # every move in flight lands (or fails) and lets go of its blocks
        if self.cache.moves.pending or self.cache.moves.pinned_keys():
            self.fail("moves still in flight after drain")
        self.check()
        idx = self.cache.index
        for tier in (DEVICE, DRAM, NVME):
            n = idx.count(tier)
            if idx.victims(tier, n + 1)[2] != n:
                self.fail(f"(c) {n - idx.victims(tier, n + 1)[2]} blocks of tier {tier} are still pinned at the end")
        if self.mgr.kept_blocks() or self.mgr.traces:
            self.fail("leases or traces left at the end")

    def coverage(self) -> dict[str, int]:
        out = dict(self.counts)
        snap, st_ = self.mgr.metrics.snapshot(), self.cache.nvme.stats()
        for k in ("prefetches", "expired_leases", "tail_tokens_reused", "late_recompute_tokens", "headroom_runs",
                  "farthest_demoted_blocks", "demoted_blocks", "dropped_blocks"):
            out["trace " + k] = snap[k]
        out["late restores"] = snap["prefetch_lateness_s"]["late"]
        for k in ("corrupt_blocks", "read_misses", "read_errors", "write_errors"):
            out["nvme " + k] = st_[k]
        out["cache declined_blocks"] = self.cache.metrics.declined_blocks
        out["cache stored_below_blocks"] = self.cache.metrics.stored_below_blocks
        return out

    def close(self) -> None:
        self.cache.close()


def run_walk(root: Path, seed: int, ops: int) -> TraceWalk:
    rng = np.random.default_rng(seed)
    walk = TraceWalk(root, RngPick(rng), profile=seed)
    names, weights = list(TraceWalk.OPS), np.array(list(TraceWalk.OPS.values()), dtype=float)
    try:
        for _ in range(ops):
            walk.run(names[int(rng.choice(len(names), p=weights / weights.sum()))])
        walk.finish()
        walk.final = walk.coverage()
    finally:
        walk.close()
    return walk


FUZZ_SEEDS = 12
FUZZ_OPS = 500


@pytest.mark.parametrize("i", range(FUZZ_SEEDS))
def test_random_walks_keep_kv_refs_and_pins_right(tmp_path: Path, i: int) -> None:
    from testenv import BASE_SEED

    seed = BASE_SEED + i
    cov = run_walk(tmp_path, seed, ops=FUZZ_OPS).final
    print(f"walk seed {seed} (profile {seed % len(FUZZ_PROFILES)}):", cov)
    assert cov.get("steps", 0) >= 30 and cov.get("op:tool_start", 0) >= 10


class TraceMachine(RuleBasedStateMachine):
    """The same operations, drawn by hypothesis (which shrinks a failing sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-trace-fuzz-"))
        self.walk: TraceWalk | None = None
        self.failed = False

    @initialize(profile=st.integers(0, len(FUZZ_PROFILES) - 1), data=st.data())
    def start(self, profile: int, data: Any) -> None:
        # a smaller cache than the walks': short sequences reach NVMe too
        self.walk = TraceWalk(self.dir, DataPick(data), profile=profile, blocks=(6, 8, 32))
        for _ in range(3):
            self.walk.run("open")

    def _do(self, op: str, data: Any) -> None:
        assert self.walk is not None
        self.walk.pick = DataPick(data)
        try:
            self.walk.run(op)
        except BaseException:
            self.failed = True
            raise

    def _rule(op: str) -> Any:  # noqa: N805 (runs in the class body)
        def do(self: TraceMachine, data: Any) -> None:
            self._do(op, data)

        do.__name__ = op
        return precondition(lambda self: self.walk is not None and self.walk.can(op))(rule(data=st.data())(do))

    for _op in TraceWalk.OPS:
        locals()[_op] = _rule(_op)
    del _op, _rule

    def teardown(self) -> None:
        try:
            if self.walk is not None:
                if not self.failed:
                    self.walk.finish()
                self.walk.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestTraceMachine = TraceMachine.TestCase
# Shrinking a failure runs thousands of sequences (minutes); the failure message already lists the
# operations before it. KVTIER_FUZZ_SHRINK=1 shrinks it too.
TestTraceMachine.settings = settings(
    max_examples=100, stateful_step_count=80,
    phases=[p for p in Phase if p is not Phase.shrink or os.environ.get("KVTIER_FUZZ_SHRINK") == "1"])
