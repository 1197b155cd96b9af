"""kvtier replay end to end on a tiny offline model, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier.harness import replay
from kvtier.harness import workload as wl
from kvtier.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("qwen2-tiny")
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    return d


def small_workload(vocab: int, seed: int = 1) -> list[wl.Trace]:
    return wl.default_workload(vocab, seed=seed, traces=3, system_tokens=96, tools_tokens=32, steps=(3, 3), forks=1)


def test_policies_agree_on_tokens_and_order_on_prefill(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    traces = small_workload(256)
    wl.dump(traces, path)
    out = tmp_path / "r.json"
    report = replay.run(model_dir=str(model_dir), workload=str(path), json_path=str(out), policies=["all"],
                        device_budget=8 * 2 * 2 * 2 * 16 * 4 * 16, progress=False, nvme_dir=str(tmp_path / "nvme"))
    assert report["tokens_identical"]
    p = report["policies"]
    comp = {k: v["prefill_tokens"]["computed"] for k, v in p.items()}
    ta = p["trace-aware"]["trace_policy"]
    # Tokens recomputed on purpose because a restore ran late (timing-dependent) aside, trace-aware
    # computes no more than tiered: it also keeps each trace's partial tail block.
    assert comp["trace-aware"] - ta["late_recompute_tokens"] <= comp["tiered"]
    assert comp["tiered"] <= comp["device-lru"] < comp["none"] == p["none"]["prefill_tokens"]["total"]
    assert sum(ta["decisions"].values()) == sum(len(t.steps) - 1 for t in traces)  # one per tool call
    assert ta["tail_tokens_reused"] > 0 and "cost_model" in p["trace-aware"]
    for t in traces:
        gen = p["tiered"]["tokens"][t.trace_id]
        assert [len(x) for x in gen] == [s.generate for s in t.steps]
    data = json.loads(out.read_text())
    assert data["config"]["gap_scale"] == 0.1 and data["config"]["compute_time"] == "calibrated"  # the defaults
    for r in p.values():
        assert 0 < r["busy"] <= 1
        assert set(r["jct_by_trace_s"]) == {t.trace_id for t in traces}
        # tasks (root traces, with their subagents) and subagents apart; too few for a p99
        roots = [t.trace_id for t in traces if t.fork_of is None]
        assert r["jct_s"]["count"] == len(roots) and r["jct_subagents_s"]["count"] == len(traces) - len(roots)
        assert r["jct_s"]["p99"] is None and r["jct_s"]["max"] == max(r["jct_by_trace_s"][t] for t in roots)
        assert r["sustained"]["tasks_per_server_hour"] > 0
    assert set(data["policies"]) == {"none", "device-lru", "tiered", "trace-aware", "trace-aware-nohint"}
    # without hints every gap is learned (or a prior); with them the hinted tools' gaps come from the hint
    assert "hint" not in p["trace-aware-nohint"]["trace_policy"]["gap_sources"]
    for k in ("jct_s", "tasks_per_hour", "prefill_tokens", "hits", "bytes_moved", "tokens", "nvme_bytes_written_per_task"):
        assert k in data["policies"]["tiered"]


def test_workload_round_trip(tmp_path: Path) -> None:
    traces = small_workload(256)
    wl.dump(traces, tmp_path / "w.jsonl")
    again = wl.load(tmp_path / "w.jsonl", vocab_size=256)
    assert [t.trace_id for t in again] == [t.trace_id for t in traces]
    assert again[0].steps[0].append == traces[0].steps[0].append
    assert any(t.fork_of is not None for t in again)


@pytest.mark.parametrize("line, match", [
    ("{not json", "not valid JSON"),
    ('{"trace_id": "a"}', "missing field 'steps'"),
    ('{"trace_id": "a", "steps": []}', "non-empty list"),
    ('{"trace_id": "a", "steps": [{"append": [1, "x"], "generate": 2}]}', "integer token ids"),
    ('{"trace_id": "a", "steps": [{"append": [1], "generate": 0}]}', "generate must be an int >= 1"),
    ('{"trace_id": "a", "steps": [{"append": [1], "generate": 2, "tool_gap_s": -1}]}', "tool_gap_s"),
    ('{"trace_id": "a", "fork_of": {"trace_id": "zz", "after_step": 0}, "steps": [{"append": [1], "generate": 2}]}',
     "unknown trace"),
    ('{"trace_id": "a", "steps": [{"append": [1, 999999], "generate": 2}]}', "outside the model's vocabulary"),
])
def test_bad_workload_lines_name_the_problem(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(kvtier.InvalidArgumentError, match=match):
        wl.load(path, vocab_size=256)


def test_not_a_causal_lm(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(kvtier.InvalidArgumentError, match="not a causal LM"):
        replay.load_model(tmp_path)
    with pytest.raises(kvtier.InvalidArgumentError, match="no config.json"):
        replay.load_model(tmp_path / "missing")


def test_cli_errors_are_clear(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.jsonl"
    wl.dump(small_workload(256), path)
    assert main(["replay", "--model", str(model_dir), "--workload", str(path), "--device-budget", "100",
                 "--no-progress"]) == 2
    assert "smaller than one block" in capsys.readouterr().err
    assert main(["replay", "--model", str(model_dir), "--policy", "bogus", "--no-progress"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", "--model", str(model_dir), "--gap-scale", "0", "--no-progress"])
    assert "expected a positive number" in capsys.readouterr().err


def test_gap_scale_keeps_the_workload_but_its_gaps(model_dir: Path, tmp_path: Path) -> None:
    traces = small_workload(256)
    scaled = wl.scale_gaps(traces, 0.1)
    for a, b in zip(traces, scaled):
        assert (a.trace_id, a.arrival_s, a.fork_of) == (b.trace_id, b.arrival_s, b.fork_of)
        for x, y in zip(a.steps, b.steps):
            assert (x.append, x.generate, x.tool) == (y.append, y.generate, y.tool)
            assert y.tool_gap_s == pytest.approx(x.tool_gap_s * 0.1)
            assert (y.expected_gap_s is None) == (x.expected_gap_s is None)
            if x.expected_gap_s is not None:
                assert y.expected_gap_s == pytest.approx(x.expected_gap_s * 0.1)
    assert traces[0].steps[0].tool_gap_s == small_workload(256)[0].steps[0].tool_gap_s  # not changed in place
    assert wl.scale_gaps(traces, 1) is traces
    for bad in (0, -1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(kvtier.InvalidArgumentError, match="gap scale must be a number > 0"):
            wl.scale_gaps(traces, bad)
    # the scaled gaps load the server more: the same steps in less virtual time. Each replay
    # calibrates its own compute, so their service times (and "busy", service over makespan)
    # differ by calibration noise (0.16-0.27 s here); the steps and the makespan do not.
    path = tmp_path / "w.jsonl"
    wl.dump(traces, path)
    rep = {g: replay.run(model_dir=str(model_dir), workload=str(path), policies=["tiered"], progress=False,
                         nvme_dir=str(tmp_path / f"nvme{g}"), gap_scale=g)["policies"]["tiered"]
           for g in (1.0, 0.1)}
    assert rep[0.1]["prefill_tokens"]["total"] == rep[1.0]["prefill_tokens"]["total"]
    # the gaps a trace waits through before its last step bound the unscaled makespan from below
    start = min(t.arrival_s for t in traces)
    waits = max(t.arrival_s + sum(s.tool_gap_s for s in t.steps[:-1]) for t in traces) - start
    assert rep[1.0]["makespan_s"] >= waits
    assert rep[0.1]["makespan_s"] < rep[1.0]["makespan_s"] - 0.1 * waits
    for r in rep.values():
        assert r["busy"] == pytest.approx(r["service_s"]["sum"] / r["makespan_s"])


def test_token_ids_are_deterministic_per_seed() -> None:
    a = wl.default_workload(512, seed=3)
    b = wl.default_workload(512, seed=3)
    c = wl.default_workload(512, seed=4)
    assert [s.append for t in a for s in t.steps] == [s.append for t in b for s in t.steps]
    assert [s.append for t in a for s in t.steps] != [s.append for t in c for s in t.steps]
    assert all(0 <= x < 512 for t in a for s in t.steps for x in s.append)
    assert np.mean([len(t.steps) for t in a]) >= 3


def test_simulator_checks_against_a_real_replay(model_dir: Path, tmp_path: Path) -> None:
    from kvtier.harness import sim

    path = tmp_path / "w.jsonl"
    wl.dump(small_workload(256), path)
    out = tmp_path / "r.json"
    # measured compute: a replay calibrated with a formula of the simulator's shape would agree by construction
    replay.run(model_dir=str(model_dir), workload=str(path), json_path=str(out), policies=["all"], progress=False,
               device_budget=8 * 2 * 2 * 2 * 16 * 4 * 16, nvme_dir=str(tmp_path / "nvme"), compute_time="measured")
    check = sim.check_against_replay(str(out), json_path=str(tmp_path / "c.json"), progress=False)
    assert check["independent_of_the_formula"] and check["replay_compute_time"] == "measured"
    fig = check["figures"]
    assert set(fig) == {"none", "device-lru", "tiered", "trace-aware", "trace-aware-nohint"}
    # With no reuse the prefill is the whole context in both. The LRU policies place by the same
    # code in both, in (nearly) the same order, so their recomputed prefill agrees closely; the
    # time model lands within 25% of the measured JCT (a 4x window could not fail).
    assert fig["none"]["prefill_computed"]["sim"] == fig["none"]["prefill_computed"]["real"]
    for p in ("device-lru", "tiered"):
        assert fig[p]["prefill_computed"]["sim/real"] == pytest.approx(1.0, rel=0.05), (p, fig[p])
    for p in fig:
        assert 0.8 < fig[p]["jct_p50_s"]["sim/real"] < 1.25, (p, fig[p])
    assert check["server"]["serial_decode"] and check["server"]["prefill_tokens_per_s"] > 0
    with pytest.raises(kvtier.InvalidArgumentError, match="no calibration"):
        sim.server_like_replay({"policies": {"tiered": {}}})


class _ScriptedRunner:
    """A PolicyRunner stand-in: every step takes 0.1 s of server time; the steps named in
    ``late`` are refused once with that restore lateness (as trace-aware's begin_step does)."""

    cache = traces = None

    def __init__(self, late: dict[tuple[str, int], float]) -> None:
        self.late = dict(late)
        self.ran: list[tuple[str, int, float]] = []

    def open(self, tid: str, parent: str | None = None) -> None: ...
    def tick(self, now: float) -> None: ...
    def tool_start(self, tid: str, now: float, expected_gap_s: float | None, tool: str | None) -> None: ...
    def tool_end(self, tid: str, now: float) -> None: ...
    def close_trace(self, tid: str) -> None: ...

    def run_step(self, tid: str, k: int, ctx: np.ndarray, generate: int, now: float):
        from kvtier.harness.driver import StepResult

        wait = self.late.pop((tid, k), 0.0)
        if wait:
            return StepResult([], 0, 0, 0.0, wait_s=wait)
        self.ran.append((tid, k, now))
        return StepResult([7] * generate, len(ctx), len(ctx), 0.1)


@pytest.mark.parametrize("lateness, a_first", [(0.01, True), (0.5, False)])
def test_a_short_restore_wait_keeps_the_server(lateness: float, a_first: bool) -> None:
    """Note [Short waits keep the server]: a step late by less than a typical step's service time
    waits on the server; a longer wait lets the next ready step run first."""
    from kvtier.harness.driver import PolicyReplay

    steps = [wl.Step([5, 6], 1, tool_gap_s=1.0), wl.Step([8], 1)]
    traces = [wl.Trace("a", 0.0, list(steps)), wl.Trace("b", 0.5, [wl.Step([5, 6], 1, 1.0), wl.Step([9], 1)]),
              wl.Trace("c", 1.105, [wl.Step([4], 1)])]
    runner = _ScriptedRunner({("a", 1): lateness})
    replay = PolicyReplay(runner, traces)
    while replay.step():
        pass
    order = [(t, k) for t, k, _ in runner.ran]
    # a's second step is ready at 1.1 s (0.1 s step + 1 s gap) but its restore is late by
    # `lateness`; c arrives at 1.105 s, while a waits
    assert (order.index(("a", 1)) < order.index(("c", 0))) is a_first
    start_a1 = next(now for t, k, now in runner.ran if (t, k) == ("a", 1))
    if a_first:
        assert start_a1 == pytest.approx(1.1 + lateness)
        assert replay.held_s == pytest.approx(lateness)
    else:
        assert replay.held_s == 0.0
    assert replay.report(keep_tokens=False)["server_held_for_restores_s"] == replay.held_s
