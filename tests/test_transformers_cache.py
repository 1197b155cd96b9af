"""KvtierCache (kvtier.integrations.transformers) against transformers' own caches.

Tiny random-weight models are built offline (config -> from_config -> save_pretrained ->
from_pretrained), fed token ids; no tokenizer, no network.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvtier  # noqa: E402
from kvtier.integrations.transformers import KvtierCache  # noqa: E402

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# transformers 5.x renamed the `past_key_values` argument to `cache` (the old name still works,
# with a deprecation warning); use whichever this version's forward takes.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models are tiny: one thread is fastest (bf16 matmuls on 2 busy threads take ~10 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One saved random-weight model folder per architecture (saved in float32)."""
    folders = {}
    for i, (name, config_cls) in enumerate(CONFIGS.items()):
        torch.manual_seed(1234 + i)
        model = AutoModelForCausalLM.from_config(config_cls(**TINY))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


_loaded: dict[tuple[str, str], object] = {}


def load(saved_models: dict[str, str], arch: str, dtype: str):
    key = (arch, dtype)
    if key not in _loaded:
        _loaded[key] = AutoModelForCausalLM.from_pretrained(saved_models[arch], dtype=DTYPES[dtype]).eval()
    return _loaded[key]


def token_ids(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (1, n)))


def generate(model, ids: torch.Tensor, cache=None, max_new_tokens: int = 8) -> torch.Tensor:
    kwargs = {CACHE_KW: cache} if cache is not None else {}
    # eos_token_id=None: a random model may emit its EOS id early; always make max_new_tokens.
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=None, **kwargs)


def tolerance(dtype: str) -> float:
    # float32: ~1 ulp from a differently split prefill; bfloat16: a few ulps of the ~0.5 logits
    return 1e-5 if dtype == "float32" else 1e-2


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_and_logits_match_default_cache(saved_models, arch, dtype):
    model = load(saved_models, arch, dtype)
    ids = token_ids(21, seed=1)

    cache = KvtierCache(model.config, max_tokens=64, block_tokens=BLOCK)
    assert cache.layers[0].key_buffer.dtype == DTYPES[dtype]  # follows the model's dtype
    assert cache.layout == kvtier.KVLayout(2, 2, 16, BLOCK, dtype)
    assert cache.registration.num_blocks == 4
    ref = generate(model, ids)
    out = generate(model, ids, cache)
    assert out.shape == (1, 21 + 8)
    assert torch.equal(out, ref)
    # the last sampled token is returned, not yet fed to the model (so not cached)
    assert cache.get_seq_length() == 21 + 8 - 1
    assert cache.num_blocks_filled() == (21 + 8 - 1) // BLOCK

    # A plain forward loop: prefill, then one token at a time, logits against DynamicCache.
    ours = KvtierCache(model.config, max_tokens=64, block_tokens=BLOCK)
    theirs = DynamicCache(config=model.config)
    tol = tolerance(dtype)
    with torch.no_grad():
        step_ids = ids
        for step in range(6):
            a = model(step_ids, **{CACHE_KW: theirs}).logits.float()
            b = model(step_ids, **{CACHE_KW: ours}).logits.float()
            torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=f"step {step}")
            assert ours.get_seq_length() == theirs.get_seq_length()
            step_ids = a[:, -1:].argmax(-1)
    # The returned K/V views are the buffers' first tokens, equal to DynamicCache's tensors.
    for layer_ours, layer_theirs in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(layer_ours.keys, layer_theirs.keys, atol=tol, rtol=tol)
        torch.testing.assert_close(layer_ours.values, layer_theirs.values, atol=tol, rtol=tol)
        assert layer_ours.keys.data_ptr() == layer_ours.key_buffer.data_ptr()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mistral_window_that_never_slides(saved_models, dtype):
    # Mistral's layers are sliding-window (4096): with max_tokens <= window they are full attention.
    model = load(saved_models, "mistral", dtype)
    ids = token_ids(19, seed=2)
    cache = KvtierCache(model.config, max_tokens=64, block_tokens=BLOCK)
    assert all(cache.is_sliding)
    assert torch.equal(generate(model, ids, cache), generate(model, ids))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_reuse_through_kvtier_blocks(saved_models, arch, dtype):
    model = load(saved_models, arch, dtype)
    prefix_len = 3 * BLOCK
    prompt = token_ids(prefix_len + 7, seed=3)  # 48 cached tokens + 7 new ones
    prefix = prompt[:, :prefix_len]

    # Cache A: compute the prefix, then offload its 3 full blocks into a host pool.
    a = KvtierCache(model.config, max_tokens=96, block_tokens=BLOCK)
    with torch.no_grad():
        model(prefix, **{CACHE_KW: a})
    assert a.get_seq_length() == prefix_len and a.num_blocks_filled() == 3
    pool = kvtier.HostPool(a.layout, num_blocks=8)
    engine = kvtier.CopyEngine(threads=2)
    pool_ids = pool.allocate(3)
    engine.gather(a.registration, [0, 1, 2], pool, pool_ids).wait()
    # Block b is tokens [16b, 16b+16) of layer 0 K, layer 0 V, layer 1 K, ... ([heads, T, dim] each).
    arena = pool.view()
    for b, pid in enumerate(pool_ids):
        tokens = slice(b * BLOCK, (b + 1) * BLOCK)
        expected = torch.cat([
            t[0, :, tokens].contiguous().reshape(-1).view(torch.uint8)
            for layer in a.layers for t in (layer.key_buffer, layer.value_buffer)
        ])
        assert np.array_equal(arena[pid], expected.numpy())

    # Cache B: fresh, restore the blocks, declare them.
    b = KvtierCache(model.config, max_tokens=96, block_tokens=BLOCK)
    engine.scatter(pool, pool_ids, b.registration, [0, 1, 2]).wait()
    b.set_seq_length(prefix_len)
    assert b.num_blocks_filled() == 3
    for la, lb in zip(a.layers, b.layers):  # byte-exact copies of every layer's K and V
        assert torch.equal(lb.keys.view(torch.uint8), la.keys.view(torch.uint8))
        assert torch.equal(lb.values.view(torch.uint8), la.values.view(torch.uint8))

    # Generate from the whole prompt: only the 7 uncached tokens may be computed.
    first_forward_lengths: list[int] = []

    def count(_module, args, kwargs):
        if not first_forward_lengths:
            ids = kwargs.get("input_ids", args[0] if args else None)
            first_forward_lengths.append(ids.shape[1])

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        reused = generate(model, prompt, b)
    finally:
        handle.remove()
    assert first_forward_lengths == [prompt.shape[1] - prefix_len]
    assert torch.equal(reused, generate(model, prompt))  # full recompute, default cache

    # Next-token logits after reuse match a full recompute into a fresh cache.
    full = KvtierCache(model.config, max_tokens=96, block_tokens=BLOCK)
    c = KvtierCache(model.config, max_tokens=96, block_tokens=BLOCK)
    engine.scatter(pool, pool_ids, c.registration, [0, 1, 2]).wait()
    c.set_seq_length(prefix_len)
    with torch.no_grad():
        want = model(prompt, **{CACHE_KW: full}).logits[:, -1].float()
        got = model(prompt[:, prefix_len:], **{CACHE_KW: c}).logits[:, -1].float()
    torch.testing.assert_close(got, want, atol=tolerance(dtype), rtol=tolerance(dtype))

    # Control: declaring 48 tokens that were never written (zeros) changes the logits, so the
    # checks above do depend on the restored bytes.
    empty = KvtierCache(model.config, max_tokens=96, block_tokens=BLOCK)
    empty.set_seq_length(prefix_len)
    with torch.no_grad():
        wrong = model(prompt[:, prefix_len:], **{CACHE_KW: empty}).logits[:, -1].float()
    assert not torch.allclose(wrong, want, atol=tolerance(dtype), rtol=tolerance(dtype))
    pool.free(pool_ids)
    engine.close()


def test_bad_input_is_refused_clearly(saved_models):
    model = load(saved_models, "llama", "float32")

    # Batch size 2.
    cache = KvtierCache(model.config, max_tokens=64)
    batch = torch.cat([token_ids(10, seed=4), token_ids(10, seed=5)])
    with pytest.raises(kvtier.InvalidArgumentError, match="batch size 1"):
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=2,
                       do_sample=False, **{CACHE_KW: cache})
    assert cache.get_seq_length() == 0

    # Exceeding max_tokens: the prompt alone, then during generation.
    with pytest.raises(kvtier.OutOfCapacityError, match="max_tokens=32"):
        with torch.no_grad():
            model(token_ids(33, seed=6), **{CACHE_KW: KvtierCache(model.config, max_tokens=32)})
    cache = KvtierCache(model.config, max_tokens=32)
    with pytest.raises(kvtier.OutOfCapacityError, match="more than max_tokens=32"):
        generate(model, token_ids(20, seed=7), cache, max_new_tokens=20)
    assert [layer.get_seq_length() for layer in cache.layers] == [32, 32]  # nothing half-written

    # set_seq_length beyond capacity, negative, or not an int.
    cache = KvtierCache(model.config, max_tokens=32)
    with pytest.raises(kvtier.InvalidArgumentError, match="capacity"):
        cache.set_seq_length(33)
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(kvtier.InvalidArgumentError, match="non-negative int"):
            cache.set_seq_length(bad)
    assert cache.get_seq_length() == 0
    cache.set_seq_length(np.int64(32))
    assert cache.get_seq_length() == 32 and cache.num_blocks_filled() == 2
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.num_blocks_filled() == 0

    # Construction: capacity not a multiple of the block, a dtype kvtier cannot move, a wrong
    # dtype at run time, a sliding window shorter than the capacity, a training-mode forward.
    with pytest.raises(kvtier.InvalidArgumentError, match="multiple of block_tokens"):
        KvtierCache(model.config, max_tokens=40, block_tokens=16)
    with pytest.raises(kvtier.InvalidArgumentError, match="max_tokens"):
        KvtierCache(model.config, max_tokens=0)
    with pytest.raises(kvtier.InvalidArgumentError, match="float64"):
        KvtierCache(model.config, max_tokens=32, dtype=torch.float64)
    with pytest.raises(kvtier.DTypeError, match="dtype=model.dtype"):
        with torch.no_grad():
            model(token_ids(4, seed=8), **{CACHE_KW: KvtierCache(model.config, 32, dtype=torch.bfloat16)})
    with pytest.raises(kvtier.InvalidArgumentError, match="sliding_attention"):
        KvtierCache(MistralConfig(**TINY, sliding_window=32), max_tokens=64)
    KvtierCache(MistralConfig(**TINY, sliding_window=64), max_tokens=64)  # never slides: fine
    qwen_hybrid = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(kvtier.InvalidArgumentError, match="layer 1 is 'sliding_attention'"):
        KvtierCache(qwen_hybrid, max_tokens=64)
    with torch.enable_grad(), pytest.raises(kvtier.InvalidArgumentError, match="no_grad"):
        model(token_ids(4, seed=9), **{CACHE_KW: KvtierCache(model.config, 32)})
    with pytest.raises(kvtier.InvalidArgumentError, match="single sequence"):
        KvtierCache(model.config, 32).batch_repeat_interleave(2)
