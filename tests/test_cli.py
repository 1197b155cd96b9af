"""The kvtier command: info and bench copy, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvtier.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_json_explains_every_backend() -> None:
    out = run_cli("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["version"]
    for name in ("cuda", "io_uring", "ucx"):
        feature = data[name]
        assert isinstance(feature["compiled"], bool) and isinstance(feature["usable"], bool)
        if not feature["usable"]:
            assert feature["reason"], f"{name} is off without a reason"
    assert data["build"]["nontemporal_copy"] in {"avx512", "avx2", "memcpy"}


def test_info_table_names_backends() -> None:
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    for word in ("cpu copy", "cuda", "io_uring", "ucx"):
        assert word in out.stdout


def test_bench_copy_json_shape(tmp_path) -> None:
    path = tmp_path / "copy.json"
    rc = main(["bench", "copy", "--size-mib", "4", "--reps", "1", "--no-progress", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["suite"] == "copy"
    assert report["machine"]["cores"] >= 1
    cases = {r["case"] for r in report["results"]}
    assert any("llama3-8b" in c for c in cases) and any("qwen2-0.5b" in c for c in cases)
    for r in report["results"]:
        assert set(r) >= {"case", "kvtier_gbps", "anchor", "anchor_gbps", "ratio"}
        assert r["kvtier_gbps"] > 0 and r["anchor_gbps"] > 0
        assert r["ratio"] == pytest.approx(r["kvtier_gbps"] / r["anchor_gbps"], rel=0.01, abs=6e-4)  # rounded to 3 places
        # Note [Copy anchor]: the best of three contiguous copies of the same bytes, each reported
        three = {k: r[f"{k}_gbps"] for k in ("memcpy_1t", "memcpy_mt", "stream_mt")}
        assert all(v > 0 for v in three.values())
        assert r["anchor_gbps"] == max(three.values()) and r["anchor_kind"] == max(three, key=three.get)
        assert set(r["ratio_vs"]) == set(three) and min(r["ratio_vs"].values()) == pytest.approx(r["ratio"], abs=6e-4)
        assert len(r["samples_s"]["stream_mt"]) == len(r["samples_s"]["kvtier"]) == 1


@pytest.mark.parametrize("threads", [1, 3])
def test_stream_copy_anchor_copies_every_byte(threads: int) -> None:
    """The streaming-store anchor copies exactly (unaligned starts, odd lengths, thread splits
    that fall mid-vector), so its speed is that of a real copy."""
    import numpy as np

    from kvtier import _core

    rng = np.random.default_rng(5)
    for n in (1, 63, 1000, 4097, (1 << 20) + 77):
        src = rng.integers(0, 256, size=n + 5, dtype=np.uint8)
        dst = np.zeros(n + 9, dtype=np.uint8)
        s, d = src[5:], dst[3:3 + n]  # misaligned on both sides
        assert _core.timed_stream_copy(d, s, threads) >= 0.0
        assert np.array_equal(d, s) and not dst[:3].any() and not dst[3 + n:].any()


def test_bench_copy_llama_block_is_2mib(tmp_path) -> None:
    path = tmp_path / "copy.json"
    assert main(["bench", "copy", "--size-mib", "4", "--reps", "1", "--cases", "llama3-8b vllm_flash gather",
                 "--no-progress", "--json", str(path)]) == 0
    (r,) = json.loads(path.read_text())["results"]
    assert r["block_bytes"] == 32 * 2 * 8 * 128 * 2 * 16 == 2 << 20
    assert r["runs_per_block"] == 32  # one contiguous run per layer in the flash layout


def test_bench_unknown_case_is_a_clear_error(capsys) -> None:
    assert main(["bench", "copy", "--cases", "no-such-model", "--no-progress"]) == 2
    assert "no copy case matches" in capsys.readouterr().err


def test_bad_arguments_exit_2() -> None:
    out = run_cli("bench", "copy", "--size-mib", "-3")
    assert out.returncode == 2
    assert "positive integer" in out.stderr


@pytest.mark.parametrize("case", ["192KiB read", "192KiB write"])
def test_bench_nvme_json_shape(tmp_path, case: str) -> None:
    """A tiny run; fio and NIXL may be missing here (they are then reported, not dropped)."""
    from kvtier import _core

    if not getattr(_core, "HAVE_NVME", False):
        pytest.skip("kvtier built without io_uring")
    path = tmp_path / "nvme.json"
    rc = main(["bench", "nvme", "--size-mib", "4", "--reps", "1", "--cases", case, "--dir",
               str(tmp_path / "d"), "--no-progress", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["suite"] == "nvme"
    (r,) = report["results"]
    assert r["kvtier"]["verified"] is True and r["kvtier_gbps"] > 0
    assert r["turn_order"][0][0] == "kvtier"  # round 0 starts with kvtier; later rounds rotate
    if r["anchor_gbps"] is None:
        assert r["paired"] is None
    else:
        assert r["paired"]["rounds"] == 1 and r["paired"]["verdict"] == "too few rounds"
    for peer in ("fio", "nixl"):
        p = r["peers"][peer]
        assert ("gbps" in p) or p["missing"]  # measured, or missing with a reason
    # fio is installed by scripts/setup.sh (apt), so the comparison itself is exercised: a run in
    # which every peer is missing must not pass as a comparison.
    from kvtier.harness.benchmarks import nvme_anchors

    assert nvme_anchors.fio_available() is None, "fio missing: run scripts/setup.sh (it installs fio)"
    assert r["peers"]["fio"]["gbps"] > 0 and r["anchor_gbps"] is not None
    assert r["anchor_gbps"] == pytest.approx(max(p["gbps"] for p in r["peers"].values() if "gbps" in p), rel=0.01)
    assert r["ratio"] == pytest.approx(r["kvtier_gbps"] / r["anchor_gbps"], rel=0.01, abs=6e-4)  # rounded to 3 places
    assert r["kvtier"]["durable"] is True and r["kvtier"]["fsyncs"] > 0
    if case.endswith("write"):  # also timed without the fdatasync, as the peers write
        ns = r["kvtier_nosync"]
        assert ns["durable"] is False and ns["fsyncs"] == 0 and ns["verified"] is True
        assert r["kvtier_nosync_gbps"] > 0
    else:
        assert r["kvtier_nosync"] is None and r["kvtier_nosync_gbps"] is None


def test_bench_nvme_fio_figure_is_best_variant_by_median() -> None:
    """fio's figure: the variant with the best median over the rounds, not each round's best."""
    from kvtier.harness.benchmarks.nvme import _merge_peer

    def rnd(a: float, b: float) -> dict:
        return {"gbps": max(a, b), "variants": {"a": {"gbps": a, "cmd": "fio a"}, "b": {"gbps": b, "cmd": "fio b"}}}

    out = _merge_peer([rnd(3.0, 1.0), rnd(1.0, 3.0), rnd(2.0, 1.5)])
    assert out["variant"] == "a" and out["cmd"] == "fio a"
    assert out["gbps"] == 2.0 and out["rounds_gbps"] == [3.0, 1.0, 2.0]
    assert out["median_of_rounds_best_variant_gbps"] == 3.0  # the biased figure, kept for reference
    nixl = _merge_peer([{"gbps": 1.0}, {"gbps": 3.0}, {"gbps": 2.0}])
    assert nixl["gbps"] == 2.0 and "variant" not in nixl


def test_bench_nvme_paired_ratio_and_its_interval() -> None:
    """Note [Paired ratios]: per-round ratios, an order-statistic 95% interval of their median."""
    from kvtier.harness.benchmarks.nvme import _round_gbps, median_ci95, paired_ratio

    assert median_ci95([1.0] * 5) is None  # [min, max] of 5 covers the median with 93.75% only
    assert median_ci95([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)
    assert median_ci95([float(v) for v in range(20)]) == (5.0, 14.0)  # P(B(20, 1/2) <= 5) = 2.07%
    faster = paired_ratio([2.2] * 7, [2.0, 2.1, 1.9, 2.0, 2.05, 2.1, 2.0])
    assert faster["verdict"] == "faster" and faster["ci95"][0] > 1.0 and faster["rounds"] == 7
    slower = paired_ratio([1.8] * 7, [2.0, 2.1, 1.9, 2.0, 2.05, 2.1, 2.0])
    assert slower["verdict"] == "slower" and slower["ci95"][1] < 1.0
    tie = paired_ratio([2.0, 2.2, 1.8, 2.0, 2.1, 1.9, 2.0], [2.0] * 7)
    assert tie["verdict"] == "parity" and tie["median"] == 1.0
    assert paired_ratio([2.0, 2.0], [1.0, None])["verdict"] == "too few rounds"
    assert paired_ratio([2.0], [None]) is None
    # A peer's per-round figure is the variant its figure uses; a failed round stays a gap.
    runs = [{"gbps": 3.0, "variants": {"a": {"gbps": 1.0}, "b": {"gbps": 3.0}}}, {"missing": "fio failed"},
            {"gbps": 2.5, "variants": {"a": {"gbps": 2.0}, "b": {"gbps": 2.5}}}]
    assert _round_gbps(runs, {"variant": "a"}) == [1.0, None, 2.0]
    assert _round_gbps([{"gbps": 1.5}, {"missing": "x"}], {}) == [1.5, None]


def test_write_workload_holds_real_gaps_that_a_replay_scales_once(tmp_path) -> None:
    """--write-workload writes the gaps before --gap-scale; loading the file for a replay with
    the same --gap-scale scales them once (they used to be scaled twice: x0.01 by default)."""
    from kvtier.harness import replay
    from kvtier.harness import workload as wl

    path = tmp_path / "w.jsonl"
    assert main(["replay", "--write-workload", str(path), "--traces", "4", "--seed", "3", "--gap-scale", "0.1"]) == 0
    real = wl.default_workload(2048, seed=3, traces=4)  # gap_scale 1: the real gaps
    written = wl.load(path, vocab_size=2048)
    gaps = [s.tool_gap_s for t in written for s in t.steps]
    assert gaps == [s.tool_gap_s for t in real for s in t.steps] and max(gaps) > 1.0
    replayed = replay.load_workload(str(path), 2048, 0, 0, 0.1)
    assert [s.tool_gap_s for t in replayed for s in t.steps] == pytest.approx([0.1 * g for g in gaps], abs=1e-6)


def test_submodules_named_in_the_api_docs_are_reachable() -> None:
    import subprocess as sp

    code = ("import kvtier, kvtier.harness.workload; kvtier.metrics.register_traces; "
            "kvtier.harness.workload.default_workload; kvtier.trace.calibrate")
    out = sp.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
