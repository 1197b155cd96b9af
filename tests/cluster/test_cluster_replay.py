"""``kvtier replay --workers N``: real worker processes (a decoder, tiers and a ClusterWorker
each), a real Redis and real UCX migrations, on a tiny offline model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier.cli import main
from kvtier.errors import InvalidArgumentError
from kvtier.harness import workload as wl

pytest.importorskip("transformers")
pytest.importorskip("redis")
if not kvtier._core.HAVE_UCX:
    pytest.skip("kvtier was built without UCX", allow_module_level=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("qwen2-tiny-cluster")
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.mark.slow
def test_migrations_really_move_the_trace_and_dedup_sends_only_what_the_target_lacks(
        model_dir: Path, tmp_path: Path) -> None:
    from kvtier.harness import clusterreplay

    traces = wl.default_workload(256, seed=4, traces=4, system_tokens=160, tools_tokens=32, steps=(4, 4), forks=1)
    path = tmp_path / "w.jsonl"
    wl.dump(traces, path)
    roots = sorted((t for t in traces if t.fork_of is None), key=lambda t: t.arrival_s)
    assert roots[0].arrival_s + 5 < roots[1].arrival_s  # worker 1 has the system prompt when the others come
    out = tmp_path / "r.json"
    # the first root on worker 1 (which then holds the shared system prompt), the others (two of them
    # arriving together) on worker 0; gaps so short that traces return while worker 0 is busy, and
    # an eager router: traces move to worker 1
    report = clusterreplay.run(model_dir=str(model_dir), workload=str(path), workers=2, migration="all",
                               json_path=str(out), progress=False, quiet=True, threshold_s=0.0, gap_scale=0.002,
                               placement={r.trace_id: int(i == 0) for i, r in enumerate(roots)}, nvme_dir=str(tmp_path / "nvme"))
    assert report["tokens_identical"]  # a migrated trace resumed on exactly the KV it had at home
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"none", "full", "dedup"}
    p = data["policies"]
    assert p["none"]["migrations"]["count"] == 0 and p["none"]["bytes_moved"]["migration"] == 0
    assert p["none"]["migrations"]["router_wanted_migration"] > 0  # the same rule decided; none stayed home
    bb = data["config"]["block_bytes"]
    for mode in ("full", "dedup"):
        m = p[mode]["migrations"]
        assert m["count"] > 0 and m["failed"] == 0, m["first"]
        assert p[mode]["bytes_moved"]["migration"] == sum(x["bytes"] for x in m["first"]) > 0
        for x in m["first"]:
            assert x["state"] == "committed"
            # the source holds every block of the context but, at most, the last one: the last
            # generated token has no KV yet, so that block may not be full
            assert x["blocks"] - x["blocks_held"] <= 1 and x["blocks_unavailable"] == x["blocks"] - x["blocks_held"]
            assert x["blocks_staged_in_dram"] == x["blocks_held"]
            assert x["bytes"] == x["blocks_sent"] * bb
            if mode == "full":  # every block the source holds crosses, held at the target or not
                assert x["blocks_sent"] == x["blocks_held"] and x["blocks_present"] == 0
            else:  # only what the target lacks; the shared system prompt is there already
                assert x["blocks_sent"] + x["blocks_present"] == x["blocks_held"]
        # the migrated traces' steps ran on the target: work moved from worker 0 to worker 1
        w = p[mode]["workers"]
        assert w[1]["steps"] > p["none"]["workers"][1]["steps"] and w[0]["steps"] < p["none"]["workers"][0]["steps"]
    assert any(x["blocks_present"] > 0 for x in p["dedup"]["migrations"]["first"])
    per_full = p["full"]["bytes_moved"]["migration"] / p["full"]["migrations"]["count"]
    per_dedup = p["dedup"]["bytes_moved"]["migration"] / p["dedup"]["migrations"]["count"]
    assert per_dedup < per_full
    for r in p.values():
        assert r["prefill_tokens"]["total"] == p["none"]["prefill_tokens"]["total"]
        assert r["store_per_step"]["steps"] == sum(len(t.steps) for t in traces)
        assert r["store_per_step"]["lookups"] <= r["store_per_step"]["steps"]  # at most one round trip a step
        assert np.isfinite(r["jct_s"]["p50"]) and r["jct_s"]["count"] == len(roots)
    assert data["config"]["transport"]["UCX_TLS"] == "posix,cma,tcp"


def test_bad_arguments_are_refused_before_anything_starts(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.harness import clusterreplay

    with pytest.raises(InvalidArgumentError, match="workers >= 2"):
        clusterreplay.run(model_dir=str(model_dir), workers=1)
    with pytest.raises(InvalidArgumentError, match="unknown migration mode"):
        clusterreplay.run(model_dir=str(model_dir), workers=2, migration="teleport")
    with pytest.raises(InvalidArgumentError, match="unknown transport"):
        clusterreplay.run(model_dir=str(model_dir), workers=2, transport="pigeon")
    with pytest.raises(InvalidArgumentError, match="threshold"):
        clusterreplay.run(model_dir=str(model_dir), workers=2, threshold_s=float("nan"))
    assert main(["replay", "--model", str(model_dir), "--migration", "dedup"]) != 0
    assert "need --workers" in capsys.readouterr().err
    assert main(["replay", "--model", str(model_dir), "--workers", "2", "--engine", "vllm"]) != 0
    assert "--workers runs the transformers engine" in capsys.readouterr().err
