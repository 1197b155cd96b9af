"""transformers integration: a KV cache whose memory kvtier can move block by block.

:class:`KvtierCache` is a transformers 5.x ``Cache`` for one sequence (batch size 1). Each
layer's K and V live in a tensor preallocated for ``max_tokens`` tokens,
``[1, kv_heads, max_tokens, head_dim]``, and the cache registers all of them with kvtier as one
:class:`~kvtier.KVRegistration` (``cache.registration``) in which block ``b`` is tokens
``[b * block_tokens, (b + 1) * block_tokens)`` of every layer's K and V (layer 0 K, layer 0 V,
layer 1 K, ... in the layout of ``cache.layout``). The running sequence's KV can therefore be
offloaded with ``CopyEngine.gather(cache.registration, ...)`` and a prefix restored into a fresh
cache with ``CopyEngine.scatter(pool, ids, cache.registration, ...)`` followed by
:meth:`KvtierCache.set_seq_length`::

    cache = KvtierCache(model.config, max_tokens=4096, dtype=model.dtype)
    model(input_ids=prompt, cache=cache)                  # or generate(...)
    n = cache.num_blocks_filled()                         # full blocks only
    ids = pool.allocate(n)
    engine.gather(cache.registration, range(n), pool, ids).wait()
    ...
    fresh = KvtierCache(model.config, max_tokens=4096, dtype=model.dtype)
    engine.scatter(pool, ids, fresh.registration, range(n)).wait()   # wait before using it
    fresh.set_seq_length(n * fresh.block_tokens)
    model.generate(input_ids=prompt_plus_more, cache=fresh)  # computes only the new tokens

``generate`` feeds only the tokens the cache does not hold yet, so the cache must hold fewer
tokens than the ``input_ids`` passed to it. (transformers 5.x renames the ``past_key_values``
argument to ``cache``; both spellings work until the old one is removed.)

Supported models: every attention layer is full attention (Llama, Qwen2, ...), or a sliding
window that never slides because ``max_tokens <= sliding_window`` (Mistral's default 4096
window, for example), in which case it is exactly full attention. Other layer types (sliding
windows shorter than ``max_tokens``, chunked, linear/recurrent, shared-KV layers) are refused at
construction with :class:`kvtier.InvalidArgumentError`.

The cache is for inference: run the model under ``torch.no_grad()`` / ``torch.inference_mode()``
(``generate`` does). It does not support beam search or several sequences.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvtier.errors import DeviceError, DTypeError, InvalidArgumentError, OutOfCapacityError
from kvtier.layout import KVLayout, dtype_name
from kvtier.memory import KVRegistration, register_kv_views

__all__ = ["KvtierCache", "KvtierLayer"]


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"{what} must be a positive int, got {value!r}")
    return value


def _layer_types(config: Any, num_layers: int) -> tuple[list[str], list[int | None]]:
    """Each layer's attention type and sliding window, as transformers' own caches see them."""
    types = None
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
        types, kwargs = list(types), list(kwargs)
        if len(kwargs) == len(types):
            return types, [kw.get("sliding_window") for kw in kwargs]
        # Some 5.x releases (5.17 seen) give per-layer kwargs only for some layers: the types
        # from it, the windows from the config, below.
    except (ImportError, AttributeError):  # a release without it: infer like DynamicCache does
        types = None
    if types is None:
        types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        if window is not None:
            types = ["sliding_attention"] * num_layers
        elif getattr(config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * num_layers
        else:
            types = ["full_attention"] * num_layers
    types = list(types)
    return types, [window if t == "sliding_attention" else None for t in types]


def _resolve_dtype(dtype: Any, config: Any) -> torch.dtype:
    dt = dtype if dtype is not None else (getattr(config, "dtype", None) or torch.float32)
    name = dtype_name(dt)  # InvalidArgumentError for dtypes kvtier cannot move
    return getattr(torch, name)


class KvtierLayer(CacheLayerMixin):
    """One attention layer of a :class:`KvtierCache`: fixed K/V buffers plus a length.

    ``key_buffer`` / ``value_buffer`` are the whole preallocated tensors
    ``[1, kv_heads, max_tokens, head_dim]``; ``keys`` / ``values`` are views of the first
    ``get_seq_length()`` tokens (what attention sees).
    """

    is_compileable = False
    is_croppable = True
    supports_early_init = True

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, *, layer_idx: int,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.key_buffer = key_buffer
        self.value_buffer = value_buffer
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.device = key_buffer.device
        self.dtype = key_buffer.dtype
        self.batch_size, self.num_heads, self.max_tokens, self.head_dim = key_buffer.shape
        self.k_head_dim = self.v_head_dim = self.head_dim
        self._length = 0
        self.is_initialized = True  # the buffers exist from the start; early_initialization skips us
        self._sync_views()

    def __repr__(self) -> str:
        return f"KvtierLayer(layer {self.layer_idx}, {self._length}/{self.max_tokens} tokens)"

    def _sync_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self._length]
        self.values = self.value_buffer[:, :, : self._length]

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """Validate new K/V states against the buffers; returns the number of new tokens."""
        where = f"KvtierCache layer {self.layer_idx}"
        for name, t in (("key", key_states), ("value", value_states)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise InvalidArgumentError(
                    f"{where}: {name} states must be a 4-d tensor [batch, kv_heads, tokens, head_dim], "
                    f"got {getattr(t, 'shape', type(t).__name__)}"
                )
            if t.shape[0] != 1:
                raise InvalidArgumentError(
                    f"{where}: KvtierCache holds a single sequence (batch size 1), got a batch of "
                    f"{t.shape[0]}; use one cache per sequence"
                )
            if t.shape[1] != self.num_heads or t.shape[3] != self.head_dim:
                raise InvalidArgumentError(
                    f"{where}: {name} states have {t.shape[1]} heads x {t.shape[3]} dims, the cache was "
                    f"built for {self.num_heads} kv heads x {self.head_dim} dims (from the model config)"
                )
            if t.dtype != self.dtype:
                raise DTypeError(
                    f"{where}: {name} states are {t.dtype} but the cache holds {self.dtype}; build the "
                    f"cache with dtype=model.dtype"
                )
            if t.device != self.device:
                raise DeviceError(
                    f"{where}: {name} states are on {t.device} but the cache lives on {self.device}; "
                    f"build the cache with device=<the layer's device>"
                )
            if t.requires_grad and torch.is_grad_enabled():
                raise InvalidArgumentError(
                    f"{where}: KvtierCache is an inference cache; run the model under torch.no_grad() "
                    f"or torch.inference_mode()"
                )
        if key_states.shape[2] != value_states.shape[2]:
            raise InvalidArgumentError(
                f"{where}: {key_states.shape[2]} key tokens but {value_states.shape[2]} value tokens"
            )
        return int(key_states.shape[2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Nothing to allocate (the buffers are made up front, and registered with kvtier);
        # only check that the states fit them.
        self._check(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens after the current ones; return K/V views of the whole sequence."""
        n = self._check(key_states, value_states)
        start, end = self._length, self._length + n
        if end > self.max_tokens:
            raise OutOfCapacityError(
                f"KvtierCache layer {self.layer_idx}: {n} new tokens after {start} would make "
                f"{end}, more than max_tokens={self.max_tokens}; build the cache with a larger "
                f"max_tokens (or generate fewer tokens)"
            )
        self.key_buffer[:, :, start:end].copy_(key_states)
        self.value_buffer[:, :, start:end].copy_(value_states)
        self._length = end
        self._sync_views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for mask creation: every cached token plus the queries."""
        return self._length + query_length, 0

    def get_seq_length(self) -> int:
        return self._length

    def get_max_length(self) -> int:
        return self.max_tokens

    def set_length(self, n: int) -> None:
        self._length = n
        self._sync_views()

    def reset(self) -> None:
        """Forget the sequence (the buffers keep their bytes; the length governs what is read)."""
        self.set_length(0)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise InvalidArgumentError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove}"
            )
        self.set_length(max(0, self._length - abs(int(tokens_to_remove))))

    def offload(self) -> None:
        """No-op: the KV stays at its registered address; kvtier moves blocks itself."""

    def prefetch(self) -> None:
        """No-op (see :meth:`offload`)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = beam_idx.reshape(-1).tolist()
        if idx != [0]:
            raise InvalidArgumentError(
                f"KvtierCache holds a single sequence; beam search / reordering to {idx} is not supported"
            )

    def batch_repeat_interleave(self, repeats: int) -> None:
        if int(repeats) != 1:
            raise InvalidArgumentError(
                f"KvtierCache holds a single sequence; cannot repeat it {repeats} times "
                f"(num_beams / num_return_sequences > 1 are not supported)"
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices).reshape(-1)
        keeps_row_0 = idx.tolist() in ([0], [True])
        if not keeps_row_0:
            raise InvalidArgumentError(
                f"KvtierCache holds a single sequence; cannot select batch rows {idx.tolist()}"
            )


class KvtierCache(Cache):
    """A transformers cache for one sequence whose K/V are kvtier blocks.

    Args:
        config: the model's config (``model.config``; for multimodal models the text config is
            used).
        max_tokens: capacity in tokens, a multiple of ``block_tokens``.
        block_tokens: tokens per kvtier block.
        dtype: element type of the KV; default the config's ``dtype`` (``model.dtype`` after
            ``from_pretrained(..., dtype=...)``), float32 when the config has none.
        device: where the KV lives (``"cpu"`` or a CUDA device): the attention layers' device.
        huge_pages: for CPU caches, ask for transparent huge pages on the registered buffers
            (see :func:`kvtier.register_kv_views`).

    Attributes:
        layout: the :class:`kvtier.KVLayout` of one block.
        registration: the :class:`kvtier.KVRegistration` of the buffers, ``max_tokens //
            block_tokens`` blocks; block ``b`` is tokens ``[b*T, (b+1)*T)`` of every layer.
        max_tokens, block_tokens, num_blocks: capacity figures.
        layers: one :class:`KvtierLayer` per decoder layer (``layers[i].key_buffer`` is the whole
            K tensor of layer ``i``).

    Raises:
        kvtier.InvalidArgumentError: bad sizes, or a model with layer types the cache does not
            support; kvtier.DTypeError for a dtype kvtier cannot move.
    """

    def __init__(self, config: Any, max_tokens: int, block_tokens: int = 16, dtype: Any = None,
                 device: str | torch.device = "cpu", *, huge_pages: bool = False) -> None:
        max_tokens = _positive_int(max_tokens, "max_tokens")
        block_tokens = _positive_int(block_tokens, "block_tokens")
        if max_tokens % block_tokens:
            raise InvalidArgumentError(
                f"max_tokens={max_tokens} must be a multiple of block_tokens={block_tokens}"
            )
        text = _text_config(config)
        num_layers = _positive_int(getattr(text, "num_hidden_layers", None), "config.num_hidden_layers")
        heads = _positive_int(getattr(text, "num_attention_heads", None), "config.num_attention_heads")
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads

        types, windows = _layer_types(text, num_layers)
        if len(types) != num_layers:
            raise InvalidArgumentError(
                f"the config lists {len(types)} layer types for {num_layers} layers"
            )
        for i, (kind, window) in enumerate(zip(types, windows)):
            if kind == "full_attention":
                continue
            if kind == "sliding_attention" and window is not None and max_tokens <= window:
                continue  # the window never slides within max_tokens: exactly full attention
            detail = (f" with a {window}-token window shorter than max_tokens={max_tokens}"
                      if kind == "sliding_attention" else "")
            raise InvalidArgumentError(
                f"layer {i} is {kind!r}{detail}: KvtierCache supports full-attention layers only "
                f"(sliding windows only when max_tokens <= the window); model type "
                f"{getattr(text, 'model_type', '?')!r} has layer types {sorted(set(types))}"
            )

        torch_dtype = _resolve_dtype(dtype, text)
        layout = KVLayout.from_hf_config(text, block_tokens=block_tokens, dtype=torch_dtype)
        if (layout.num_layers, layout.kv_heads, layout.head_dim) != (num_layers, kv_heads, head_dim):
            raise InvalidArgumentError(
                f"KVLayout.from_hf_config gives {layout.describe()}, but the cache would hold "
                f"{num_layers} layers x {kv_heads} kv heads x {head_dim} dims"
            )
        device = torch.device(device)
        num_blocks = max_tokens // block_tokens

        layers = []
        views = []
        for i in range(num_layers):
            k = torch.zeros((1, kv_heads, max_tokens, head_dim), dtype=torch_dtype, device=device)
            v = torch.zeros_like(k)
            layers.append(KvtierLayer(k, v, layer_idx=i, sliding_window=windows[i]))
            views.append(k[0].unflatten(1, (num_blocks, block_tokens)))  # [H, N, T, D], block dim 1
            views.append(v[0].unflatten(1, (num_blocks, block_tokens)))

        self.layout: KVLayout = layout
        self.max_tokens = max_tokens
        self.block_tokens = block_tokens
        self.num_blocks = num_blocks
        self.registration: KVRegistration = register_kv_views(
            views, layout, [1] * len(views), huge_pages=huge_pages
        )
        if self.registration.num_blocks != num_blocks:  # the core's view of our tensors
            raise InvalidArgumentError(
                f"registered {self.registration.num_blocks} blocks, expected {num_blocks}"
            )
        super().__init__(layers=layers)

    def __repr__(self) -> str:
        return (
            f"KvtierCache({len(self.layers)} layers, {self.get_seq_length()}/{self.max_tokens} "
            f"tokens, {self.num_blocks_filled()}/{self.num_blocks} blocks of {self.block_tokens})"
        )

    # -- transformers Cache API -------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise InvalidArgumentError(
                f"layer_idx {layer_idx} is out of range: the cache has {len(self.layers)} layers"
            )
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """Capacity in tokens (the name older transformers releases use)."""
        return self.max_tokens

    # -- kvtier side --------------------------------------------------------------------------

    @property
    def seq_length(self) -> int:
        return self.get_seq_length()

    def num_blocks_filled(self) -> int:
        """Full blocks the sequence covers in every layer (a partial last block is not counted)."""
        return min(layer.get_seq_length() for layer in self.layers) // self.block_tokens

    def set_seq_length(self, n: int) -> None:
        """Declare that the first ``n`` tokens' KV are in the buffers, written from outside.

        Use after scattering blocks into :attr:`registration` (wait for the transfer first):
        ``n`` may be any length up to ``max_tokens`` (a partial last block is fine if its tokens
        were written). Also truncates the sequence when ``n`` is smaller than the current length.
        """
        given = n
        try:
            n = -1 if isinstance(n, bool) else operator.index(n)  # ints, numpy / torch integers
        except TypeError:
            n = -1
        if n < 0:
            raise InvalidArgumentError(f"set_seq_length needs a non-negative int, got {given!r}")
        if n > self.max_tokens:
            raise InvalidArgumentError(
                f"set_seq_length({n}) exceeds the cache's capacity of max_tokens={self.max_tokens}"
            )
        for layer in self.layers:
            layer.set_length(n)

    def reset(self) -> None:
        """Empty the cache (keeps the buffers and the registration)."""
        super().reset()

    def close(self) -> None:
        """Close the kvtier registration (``BusyError`` while transfers are in flight)."""
        self.registration.close()
