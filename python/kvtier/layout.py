"""KV layouts: what one KV block holds, and how an engine's paged KV tensors are arranged.

A *block* is the KV of ``block_tokens`` consecutive tokens for every layer, K and V, every KV
head: ``block_bytes = block_tokens * num_layers * 2 * kv_heads * head_dim * itemsize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtier.errors import InvalidArgumentError

#: Element types kvtier can move, with their sizes in bytes.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
_ALIASES = {"half": "float16", "float": "float32", "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def dtype_name(dtype: Any) -> str:
    """Canonical name of a torch dtype, numpy dtype or string (``torch.bfloat16`` -> ``bfloat16``)."""
    if isinstance(dtype, type):  # numpy scalar types such as np.float32
        import numpy as np

        dtype = np.dtype(dtype)
    name = str(dtype).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPE_SIZES:
        raise InvalidArgumentError(
            f"unsupported KV dtype {dtype!r}; kvtier moves {', '.join(DTYPE_SIZES)}"
        )
    return name


@dataclass(frozen=True)
class KVLayout:
    """The shape of one model's KV cache, block by block.

    Args:
        num_layers: decoder layers that hold KV.
        kv_heads: key/value heads per layer (after GQA grouping).
        head_dim: size of one head.
        block_tokens: tokens per block (vLLM uses 16; its CPU backend 128).
        dtype: element type, e.g. ``"bfloat16"`` or ``torch.bfloat16``.
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int = 16
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for field in ("num_layers", "kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgumentError(f"KVLayout.{field} must be a positive int, got {value!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def token_bytes(self) -> int:
        """Bytes of KV per token across all layers."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.token_bytes

    @classmethod
    def from_hf_config(cls, config: Any, block_tokens: int = 16, dtype: Any = None) -> KVLayout:
        """Layout of a transformers ``PretrainedConfig`` (Llama, Qwen2, Mistral, ...)."""
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads)
        dt = dtype if dtype is not None else (getattr(config, "dtype", None) or "float32")
        return cls(config.num_hidden_layers, int(kv_heads), int(head_dim), block_tokens, dtype_name(dt))

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers x 2 x {self.kv_heads} kv heads x {self.head_dim} dim x "
            f"{self.block_tokens} tokens, {self.dtype} = {self.block_bytes / 1024:.0f} KiB/block"
        )


@dataclass(frozen=True)
class LayoutKind:
    """How an engine arranges its paged KV memory.

    ``shape`` uses symbols: ``N`` blocks, ``L`` layers, ``T`` block tokens, ``H`` kv heads,
    ``D`` head dim, ``2D`` K and V packed in the last dimension.
    """

    name: str
    shape: tuple[str, ...]
    per_layer: bool  # one tensor per layer (True) or one tensor for all layers
    doc: str

    @property
    def block_dim(self) -> int:
        return self.shape.index("N")

    def expected_shape(self, layout: KVLayout, num_blocks: int) -> tuple[int, ...]:
        sizes = {
            "N": num_blocks,
            "L": layout.num_layers,
            "T": layout.block_tokens,
            "H": layout.kv_heads,
            "D": layout.head_dim,
            "2D": 2 * layout.head_dim,
            "2": 2,
        }
        return tuple(sizes[s] for s in self.shape)


LAYOUT_KINDS: dict[str, LayoutKind] = {
    k.name: k
    for k in (
        LayoutKind("vllm_flash", ("N", "2", "T", "H", "D"), True,
                   "vLLM FlashAttention: per layer [num_blocks, 2, block_tokens, kv_heads, head_dim]"),
        LayoutKind("kv_first", ("2", "N", "T", "H", "D"), True,
                   "per layer [2, num_blocks, block_tokens, kv_heads, head_dim] (K and V halves)"),
        LayoutKind("heads_first", ("N", "2", "H", "T", "D"), True,
                   "HND paged layout: per layer [num_blocks, 2, kv_heads, block_tokens, head_dim]"),
        LayoutKind("vllm_cpu", ("N", "H", "T", "2D"), True,
                   "vLLM CPU backend: per layer [num_blocks, kv_heads, block_tokens, 2*head_dim]"),
        LayoutKind("layers_first", ("L", "N", "2", "T", "H", "D"), False,
                   "one tensor [num_layers, num_blocks, 2, block_tokens, kv_heads, head_dim]"),
        LayoutKind("blocks_first", ("N", "L", "2", "T", "H", "D"), False,
                   "one tensor [num_blocks, num_layers, 2, block_tokens, kv_heads, head_dim]"),
    )
}


def layout_kind(name: str) -> LayoutKind:
    try:
        return LAYOUT_KINDS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown KV layout kind {name!r}; choose one of {', '.join(LAYOUT_KINDS)}"
        ) from None
