"""`kvtier bench remote` runs end to end and writes the JSON shape of `bench nvme`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvtier import _core


@pytest.mark.slow
@pytest.mark.skipif(not _core.HAVE_UCX, reason="kvtier was built without UCX")
def test_bench_remote_quick_json(tmp_path) -> None:
    out = tmp_path / "remote.json"
    cmd = [sys.executable, "-m", "kvtier.cli", "bench", "remote", "--quick", "--transport", "tcp",
           "--cases", "192KiB put", "--reps", "2", "--json", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["suite"] == "remote"
    settings = report["config"]["settings"]["tcp"]
    assert settings["UCX_TLS"] == "tcp" and settings["UCX_NET_DEVICES"] == "lo"
    assert settings["error_mode"] == "peer" and settings["progress"] == "event"
    (r,) = report["results"]
    assert r["case"] == "tcp qwen2-0.5b 192KiB put" and r["kvtier_gbps"] > 0
    assert r["kvtier"]["verified"] is True
    for peer in ("ucx_perftest_gbps", "nixl_gbps", "ucx_perftest_reused_buffer_gbps",
                 "ucx_perftest_in_flight_gbps"):  # a figure, or why not
        assert isinstance(r[peer], float) or set(r[peer]) == {"missing"}
    # Note [perftest buffers]: the perftest anchor moves the list's bytes as one message of
    # distinct memory, one list per sample as kvtier (Note [One list per sample]); the stream
    # and the block-sized reused buffer are reported beside it, never the anchor.
    assert r["anchor"] in ("ucx_perftest", "nixl", "none (no peer ran)")
    if isinstance(r["ucx_perftest_gbps"], float):
        total = r["blocks"] * r["block_bytes"]
        assert f"-s {total} -n 1 " in r["peers"]["ucx_perftest"]["cmd"]
        assert f"-s {total} -n {r['in_flight']} " in r["peers"]["ucx_perftest_in_flight"]["cmd"]
        assert f"-s {r['block_bytes']} " in r["peers"]["ucx_perftest_reused_buffer"]["cmd"]
        assert r["paired_in_flight"]["rounds"] == 2
    # kvtier in the stream: one figure per round, in the list's bytes per second
    assert len(r["kvtier"]["in_flight_rounds_gbps"]) == 2 and r["kvtier_in_flight_gbps"] > 0
    if r["anchor_gbps"] is not None:
        assert r["ratio"] == pytest.approx(r["kvtier_gbps"] / r["anchor_gbps"], rel=0.01)
        assert r["paired"]["rounds"] >= 1 and r["paired"]["verdict"] == "too few rounds"
    assert len(r["turn_order"]) == 2 and r["turn_order"][0] != r["turn_order"][1]
