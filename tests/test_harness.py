"""The measuring side: the coding-agent workload of issue 12's finding 6, hints as a harness has
them, and the trace-aware policy on such traces (Note [A restore never drops] in kvtier/policy.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvtier import sim
from kvtier import workload as wl

# The built-in model on this project's 2-core CI machine, as `kvtier replay` calibrated it
# (`kvtier.sim.server_like_replay` of a replay report); budgets are set per workload below.
BUILTIN_MODEL_HERE = sim.ServerModel(
    name="built-in model, 2-core machine", hbm_kv_gib=1, dram_kv_gib=1, nvme_kv_gib=1, pcie_gbps=19.05,
    hbm_gbps=18.67, nvme_read_gbps=1.83, nvme_write_gbps=1.64, network_gbps=0.0, prefill_tokens_per_s=860.6,
    decode_tokens_per_s=60.8, kv_bytes_per_token=98304, dollars_per_hour=0.1, serial_decode=True)


def coding_replay_like(seed: int, traces: int) -> dict:
    """The coding-agent workload at the replay's gap scale and budgets (device 1/16 of its KV,
    DRAM 1/8, NVMe 2x), simulated on the built-in model's figures."""
    trs = wl.scale_gaps(wl.coding_agent_workload(2048, seed=seed, traces=traces), 0.1)
    kv = sum(len(s.append) + s.generate for t in trs for s in t.steps) * BUILTIN_MODEL_HERE.kv_bytes_per_token
    server = dataclasses.replace(BUILTIN_MODEL_HERE, hbm_kv_gib=kv / 16 / 2**30, dram_kv_gib=kv / 8 / 2**30,
                                 nvme_kv_gib=kv * 2 / 2**30)
    return sim.simulate(server=server, servers=1, policies=["tiered", "trace-aware"], workload=trs, block_tokens=16,
                        progress=False, quiet=True, vocab=2048)


def test_coding_agent_workload_has_the_properties_of_finding_6() -> None:
    trs = wl.coding_agent_workload(2048, seed=0, traces=12)
    by_id = {t.trace_id: t for t in trs}
    roots = [t for t in trs if t.fork_of is None]
    subs = [t for t in trs if t.fork_of is not None]
    assert all(5 <= len(t.steps) <= 10 for t in roots) and subs
    peak = [max(wl.context_tokens(by_id, t, k) for k in range(len(t.steps))) for t in roots]
    assert 1500 <= np.median(peak) and max(peak) <= 2300  # contexts grow to about 2k tokens
    assert any(s.reset for t in trs for s in t.steps)  # compactions
    for t in trs:  # a compaction breaks the prefix: the context restarts from the system prompt
        for s in t.steps:
            if s.reset:
                assert s.append[:384] == roots[0].steps[0].append[:384] if t.fork_of is None else True
    # subagents have a context of their own, starting with the subagents' shared system prompt
    assert all(t.fork_of.own_context for t in subs)
    assert len({tuple(t.steps[0].append[:256]) for t in subs}) == 1
    assert subs[0].steps[0].append[:256] != roots[0].steps[0].append[:256]
    gaps = [s.tool_gap_s for t in trs for s in t.steps[:-1]]
    assert min(gaps) < 5 and max(gaps) > 300  # seconds to many minutes


def test_hints_are_per_tool_estimates_never_the_gap() -> None:
    """Note [Harness hints]: a hint is the tool's typical duration, the same for every call."""
    for trs, tools in ((wl.default_workload(2048, seed=5, traces=30), wl.DEFAULT_TOOLS),
                       (wl.coding_agent_workload(2048, seed=5, traces=30), wl.CODING_TOOLS)):
        hinted = {name: median for name, median, _, _, h in tools if h}
        by_tool: dict[str, set] = {}
        for t in trs:
            for s in t.steps:
                assert (s.expected_gap_s is not None) == (s.tool in hinted)
                if s.tool in hinted:
                    assert s.expected_gap_s == pytest.approx(hinted[s.tool])
                    by_tool.setdefault(s.tool, set()).add(s.tool_gap_s)
        assert all(len(g) > 1 for g in by_tool.values())  # the gaps vary, the hint does not


def test_trace_aware_no_worse_than_tiered_on_coding_agent_traces() -> None:
    """Finding 6: on coding-agent traces (small DRAM next to ~2k-token contexts) trace-aware's
    restores pinned DRAM full and dropped other traces' blocks mid-prefix; it computed more prefill
    than tiered (13,594 tokens against 12,404 on this workload) and was slower at JCT p50."""
    p = coding_replay_like(seed=2, traces=6)["policies"]
    ta, tiered = p["trace-aware"], p["tiered"]
    assert ta["prefill_tokens"]["computed"] <= tiered["prefill_tokens"]["computed"]
    assert ta["jct_s"]["p50"] <= tiered["jct_s"]["p50"]
    assert ta["dropped_blocks"] == 0


def test_trace_aware_nohint_withholds_hints() -> None:
    trs = wl.scale_gaps(wl.coding_agent_workload(2048, seed=1, traces=4), 0.1)
    rep = sim.simulate(server=dataclasses.replace(BUILTIN_MODEL_HERE, hbm_kv_gib=0.02, dram_kv_gib=0.05,
                                                  nvme_kv_gib=1.0),
                       servers=1, policies=["trace-aware", "trace-aware-nohint"], workload=trs, block_tokens=16,
                       progress=False, quiet=True, vocab=2048)
    p = rep["policies"]
    assert p["trace-aware"]["trace_policy"]["gap_sources"].get("hint", 0) > 0
    assert "hint" not in p["trace-aware-nohint"]["trace_policy"]["gap_sources"]
    assert p["trace-aware"]["prefill_tokens"]["total"] == p["trace-aware-nohint"]["prefill_tokens"]["total"]
