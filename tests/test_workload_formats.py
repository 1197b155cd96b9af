"""Workload formats and generators: the Mooncake trace format (Note [Mooncake traces] in
kvtier/harness/workload.py), read by ``kvtier replay`` and ``kvtier simulate`` alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier.harness import workload as wl
from kvtier.cli import main

MOONCAKE = [
    # a session of three turns: the second extends the first, the third is compacted (new blocks)
    {"timestamp": 0, "input_length": 600, "output_length": 8, "hash_ids": [7, 8], "session_id": "a"},
    {"timestamp": 4000, "input_length": 900, "output_length": 6, "hash_ids": [7, 8], "session_id": "a"},
    {"timestamp": 9500, "input_length": 300, "output_length": 5, "hash_ids": [7, 99], "session_id": "a"},
    # requests on their own, sharing block 7 (and only it) with the session
    {"timestamp": 1000, "input_length": 700, "output_length": 4, "hash_ids": [7, 11]},
    {"timestamp": 2500, "input_length": 520, "output_length": 3, "hash_ids": [12, 13]},
]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mooncake_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "mc.jsonl", MOONCAKE)
    assert wl.detect_format(path) == "mooncake"
    trs = wl.load(path, vocab_size=256)
    by_id = {t.trace_id: t for t in trs}
    assert set(by_id) == {"session-a", "req3", "req4"}
    a = by_id["session-a"]
    assert [s.generate for s in a.steps] == [8, 6, 5]
    assert [s.tool_gap_s for s in a.steps] == [4.0, 5.5, 0.0]  # from the timestamps, in seconds
    assert (a.arrival_s, by_id["req3"].arrival_s, by_id["req4"].arrival_s) == (0.0, 1.0, 2.5)
    # turn 2 extends turn 1: it appends its input beyond turn 1's input and output
    assert len(a.steps[0].append) == 600 and len(a.steps[1].append) == 900 - 600 - 8 and not a.steps[1].reset
    # turn 3 shares block 7 only: a reset (compaction), whose context is its own input
    assert a.steps[2].reset and len(a.steps[2].append) == 300
    assert wl.context_tokens(by_id, a, 1) == 900 + 6 and wl.context_tokens(by_id, a, 2) == 305
    # equal hash ids give equal tokens, exactly as far as the trace shares them
    s0, r3, s2 = np.array(a.steps[0].append), np.array(by_id["req3"].steps[0].append), np.array(a.steps[2].append)
    assert np.array_equal(s0[:512], r3[:512]) and not np.array_equal(s0[512:600], r3[512:600])
    assert np.array_equal(s2[:300], s0[:300])  # a partial block is the head of its id's tokens
    assert not np.array_equal(np.array(by_id["req4"].steps[0].append)[:512], s0[:512])
    assert all(0 <= x < 256 for t in trs for s in t.steps for x in s.append)
    # deterministic: a second load gives the same tokens
    again = wl.load(path, vocab_size=256)
    assert [s.append for t in again for s in t.steps] == [s.append for t in trs for s in t.steps]
    # and a reset step survives kvtier's own format
    wl.dump(trs, tmp_path / "k.jsonl")
    assert wl.detect_format(tmp_path / "k.jsonl") == "kvtier"
    assert [s.reset for s in wl.load(tmp_path / "k.jsonl")[0].steps] == [False, False, True]


def test_mooncake_delay_and_input_beyond_blocks(tmp_path: Path) -> None:
    rows = [{"session_id": 3, "input_length": 40, "output_length": 2, "hash_ids": [1]},
            {"session_id": 3, "delay": 1500, "input_length": 700, "output_length": 2, "hash_ids": [1]}]
    trs = wl.load(write(tmp_path / "d.jsonl", rows), vocab_size=256)
    (t,) = trs
    assert t.steps[0].tool_gap_s == 1.5
    assert len(t.steps[1].append) == 700 - 42  # input beyond its one listed block is private tokens


@pytest.mark.parametrize("row, match", [
    ({"hash_ids": [1], "input_length": 0}, "input_length"),
    ({"hash_ids": [1, "x"], "input_length": 5}, "hash_ids"),
    ({"hash_ids": [1], "input_length": 5, "timestamp": -1}, "timestamp"),
    ({"hash_ids": [1], "input_length": 5, "output_length": 1.5}, "output_length"),
    ({"hash_ids": [1], "input_length": 5, "session_id": [1]}, "session_id"),
])
def test_mooncake_bad_lines_name_the_problem(tmp_path: Path, row: dict, match: str) -> None:
    path = write(tmp_path / "bad.jsonl", [{"hash_ids": [1], "input_length": 5}, row])
    with pytest.raises(kvtier.InvalidArgumentError, match=f"bad.jsonl:2: {match}"):
        wl.load(path, vocab_size=256)


def test_mooncake_replays_and_simulates(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kvtier.harness import replay

    model = tmp_path / "m"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=1024)).save_pretrained(model)
    path = write(tmp_path / "mc.jsonl", MOONCAKE)
    rep = replay.run(model_dir=str(model), workload=str(path), policies=["none", "tiered"], progress=False,
                     nvme_dir=str(tmp_path / "nvme"))
    assert rep["tokens_identical"]
    p = rep["policies"]
    total = 600 + 900 + 300 + 700 + 520  # each turn's context is its input_length (turn 2: turn 1 + output + rest)
    assert p["none"]["prefill_tokens"]["total"] == total == p["none"]["prefill_tokens"]["computed"]
    # block 7 is shared: tiered computes less
    assert p["tiered"]["prefill_tokens"]["computed"] < total
    out = tmp_path / "s.json"
    assert main(["simulate", "--workload", str(path), "--servers", "1", "--no-progress", "--json", str(out),
                 "--policy", "none", "--policy", "tiered", "--block-tokens", "16"]) == 0
    sim = json.loads(out.read_text())["policies"]
    assert sim["none"]["prefill_tokens"]["total"] == total
    assert sim["tiered"]["prefill_tokens"]["computed"] < total
