"""Block pools (tiers' memory) and registered engine KV memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier import _core
from kvtier.errors import DeviceError, DTypeError, InvalidArgumentError
from kvtier.layout import KVLayout, dtype_name, layout_kind

_INT32_MAX = np.iinfo(np.int32).max


def as_block_ids(ids: Any, what: str = "block ids") -> np.ndarray:
    """Coerce ``ids`` (list, numpy or torch integer array) to a contiguous int32 numpy array."""
    if hasattr(ids, "__dlpack__") and not isinstance(ids, np.ndarray):
        ids = ids.cpu().numpy() if hasattr(ids, "cpu") else np.from_dlpack(ids)
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int32)
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.int32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _INT32_MAX:
            bad = lo if lo < 0 else hi
            raise InvalidArgumentError(f"{what}: block id {bad} is out of range")
        arr = arr.astype(np.int32)
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class PoolStats:
    """A pool's occupancy (gauges) and activity since creation (counters)."""

    num_blocks: int
    block_bytes: int
    used_blocks: int
    pinned_blocks: int
    peak_used_blocks: int
    allocated_total: int
    freed_total: int
    failed_allocs: int

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.used_blocks

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.block_bytes


class HostPool:
    """A DRAM tier: fixed-size blocks carved from one page-aligned host arena.

    Give either ``num_blocks`` or ``capacity_bytes``. Blocks come back from :meth:`allocate`
    with one holder; :meth:`ref` adds holders, :meth:`free` removes one and returns the block
    when the last leaves. Pinned blocks cannot be freed until unpinned. Every batch call is
    all-or-nothing: a call that raises changed nothing.

    Args:
        layout: a :class:`KVLayout` (block size derived from it) or a block size in bytes.
        num_blocks: number of blocks.
        capacity_bytes: alternatively, the tier's size; rounded down to whole blocks.
        populate: pre-fault the arena now (recommended; the first copy then runs at full speed).
        pin: page-lock through CUDA when a GPU is usable.
    """

    def __init__(
        self,
        layout: KVLayout | int,
        *,
        num_blocks: int | None = None,
        capacity_bytes: int | None = None,
        populate: bool = True,
        pin: bool = True,
    ) -> None:
        self.layout = layout if isinstance(layout, KVLayout) else None
        block_bytes = layout.block_bytes if isinstance(layout, KVLayout) else int(layout)
        if block_bytes <= 0:
            raise InvalidArgumentError(f"block size must be > 0 bytes, got {block_bytes}")
        if (num_blocks is None) == (capacity_bytes is None):
            raise InvalidArgumentError("give exactly one of num_blocks or capacity_bytes")
        if capacity_bytes is not None:
            if capacity_bytes < block_bytes:
                raise InvalidArgumentError(
                    f"capacity_bytes={capacity_bytes} is smaller than one block ({block_bytes} bytes)"
                )
            num_blocks = capacity_bytes // block_bytes
        assert num_blocks is not None
        if num_blocks <= 0 or num_blocks > _INT32_MAX:
            raise InvalidArgumentError(f"num_blocks must be in [1, 2^31), got {num_blocks}")
        self._core = _core.HostPool.create(block_bytes, num_blocks, populate=populate, pin=pin)

    @property
    def block_bytes(self) -> int:
        return self._core.block_bytes

    @property
    def num_blocks(self) -> int:
        return self._core.num_blocks

    @property
    def capacity_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    @property
    def free_blocks(self) -> int:
        return self._core.free_blocks

    @property
    def page_mode(self) -> str:
        """``hugetlb``, ``thp`` (transparent huge pages advised) or ``4k``."""
        return self._core.page_mode

    @property
    def pinned(self) -> bool:
        """True when the arena is page-locked for a GPU."""
        return self._core.pinned

    def allocate(self, n: int) -> np.ndarray:
        """``n`` block ids (int32), all or nothing; raises OutOfCapacityError when too few are free."""
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidArgumentError(f"allocate(n) needs a non-negative int, got {n!r}")
        return self._core.allocate(int(n))

    def free(self, ids: Any) -> None:
        """Drop one holder of each block; a block with no holder left returns to the free list."""
        self._core.unref(as_block_ids(ids))

    def ref(self, ids: Any) -> None:
        self._core.ref(as_block_ids(ids))

    def pin(self, ids: Any) -> None:
        self._core.pin(as_block_ids(ids))

    def unpin(self, ids: Any) -> None:
        self._core.unpin(as_block_ids(ids))

    def refcount(self, block_id: int) -> int:
        return self._core.refcount(int(block_id))

    def pins(self, block_id: int) -> int:
        return self._core.pins(int(block_id))

    def check_allocated(self, ids: Any) -> None:
        self._core.check_allocated(as_block_ids(ids))

    def checksums(self, ids: Any) -> np.ndarray:
        """``[n]`` uint64: XXH3-64 of each block's bytes (what the NVMe tier and the cluster
        directory carry); computed in C++ without the GIL."""
        return self._core.checksums(as_block_ids(ids))

    def stats(self) -> PoolStats:
        return PoolStats(block_bytes=self.block_bytes, **self._core.stats())

    def view(self) -> np.ndarray:
        """``[num_blocks, block_bytes]`` uint8 view of the arena (keeps the pool alive)."""
        return self._core.buffer()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"HostPool({s.num_blocks} x {s.block_bytes} B, used={s.used_blocks}, "
            f"pages={self.page_mode}, pinned={self.pinned})"
        )


def _tensor_device(t: Any) -> str:
    dev = getattr(t, "device", None)
    if dev is None:
        return "cpu"  # numpy
    return str(dev)


class _StorageGuard:
    """Note [Registered storage]: the native registration records raw addresses into the
    tensors' memory and holds the (detached) tensors, which keeps their storage objects alive.
    That is not enough: ``kv.resize_(bigger)`` reallocates the storage's memory in place (the
    storage object survives, its old bytes are freed), ``kv.set_(other)`` points the tensor at
    other memory, and ``kv.untyped_storage().resize_(0)`` frees it. A gather would then read,
    and a scatter write, memory the tensor no longer uses (or nobody owns).

    So the registration keeps the caller's own tensor objects and their storages, and before
    every transfer compares each tensor's ``data_ptr()`` and its storage's ``nbytes()`` with
    what they were at registration: two attribute reads per tensor (a few microseconds for a
    32-layer model, per batch, never per block). A change is an ``InvalidArgumentError`` that
    asks for a new registration. numpy arrays need no guard (numpy refuses to resize an array
    that another object references, and the registration references it). A resize while a
    transfer is already in flight cannot be caught this way; :meth:`KVRegistration.close`
    (BusyError while transfers are pending) is the caller's tool for that.
    """

    __slots__ = ("_tensors", "_storages", "_expect")

    def __init__(self, tensors: Sequence[Any]) -> None:
        pairs = [(t, t.untyped_storage()) for t in tensors
                 if hasattr(t, "data_ptr") and hasattr(t, "untyped_storage")]
        self._tensors = [t for t, _ in pairs]
        self._storages = [st for _, st in pairs]
        self._expect = self._now()

    def _now(self) -> list[tuple[int, int]]:
        return [(t.data_ptr(), st.nbytes()) for t, st in zip(self._tensors, self._storages)]

    def check(self) -> None:
        if not self._tensors:
            return
        now = self._now()
        if now != self._expect:
            i = next(i for i, (a, b) in enumerate(zip(now, self._expect)) if a != b)
            (ptr, nbytes), (ptr0, nbytes0) = now[i], self._expect[i]
            what = (f"its storage changed size ({nbytes0} -> {nbytes} bytes)" if nbytes != nbytes0
                    else f"its memory moved (data_ptr {ptr0:#x} -> {ptr:#x})")
            raise InvalidArgumentError(
                f"registered tensor {i} was resized or given new storage after register_kv ({what}); "
                "kvtier would read or write memory the tensor no longer owns: register it again")


class KVRegistration:
    """An engine's own paged KV memory, registered so kvtier can copy blocks in and out.

    Created by :func:`register_kv`. The registration keeps its tensors and their storage alive
    while it is open and while any transfer that uses it is pending, and refuses transfers once
    a tensor was resized or given new storage (Note [Registered storage]). :meth:`close` raises
    ``BusyError`` while transfers are in flight.
    """

    def __init__(self, core: Any, layout: KVLayout, kind: str, device: str,
                 tensors: Sequence[Any] = ()) -> None:
        self._core = core
        self.layout = layout
        self.kind = kind
        self.device = device
        self._guard = _StorageGuard(tensors)

    def _check_storage(self) -> None:
        """Raise ``InvalidArgumentError`` if a registered tensor's memory changed (Note [Registered storage])."""
        self._guard.check()

    @property
    def num_blocks(self) -> int:
        return self._core.num_blocks

    @property
    def block_bytes(self) -> int:
        return self._core.block_bytes

    @property
    def num_segments(self) -> int:
        """Contiguous runs one block is made of (2 per layer for ``kv_first``, ...)."""
        return self._core.num_segments

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def huge_pages(self) -> str:
        """``collapsed`` / ``advised`` / ``unsupported`` for CPU tensors, ``off``, or ``not cpu``."""
        return self._core.huge_pages

    def close(self) -> None:
        self._core.close()
        self._guard = _StorageGuard(())  # the tensors are the caller's again

    def __enter__(self) -> KVRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"KVRegistration({self.kind}, {self.num_blocks} blocks on {self.device}, "
            f"{self.num_segments} runs/block)"
        )


def register_kv(tensors: Any, layout: KVLayout, kind: str = "vllm_flash", *, huge_pages: bool = True) -> KVRegistration:
    """Register an engine's paged KV tensors.

    Args:
        tensors: one tensor per layer for per-layer kinds (``vllm_flash``, ``kv_first``,
            ``heads_first``, ``vllm_cpu``), or a single tensor for ``layers_first`` /
            ``blocks_first``. torch tensors (cpu or cuda) and numpy arrays are accepted.
        layout: the model's :class:`KVLayout`; dtype and shape are checked against it.
        kind: how the tensors are arranged (see :data:`kvtier.layout.LAYOUT_KINDS`).
        huge_pages: for CPU tensors, ask the kernel to back them with transparent huge pages
            (MADV_HUGEPAGE, then MADV_COLLAPSE, which keeps the contents). Gathers of short runs
            from random blocks then stop paying a TLB miss per run. A hint: the registration's
            ``huge_pages`` attribute says what the kernel did.
    """
    if not isinstance(layout, KVLayout):
        raise InvalidArgumentError(f"layout must be a kvtier.KVLayout, got {type(layout).__name__}")
    lk = layout_kind(kind)
    if lk.per_layer:
        if not isinstance(tensors, Sequence) or isinstance(tensors, (str, bytes)):
            raise InvalidArgumentError(f"layout kind {kind!r} takes a list of one tensor per layer")
        tensor_list = list(tensors)
        if len(tensor_list) != layout.num_layers:
            raise InvalidArgumentError(
                f"layout kind {kind!r} needs {layout.num_layers} tensors (one per layer), "
                f"got {len(tensor_list)}"
            )
    else:
        if isinstance(tensors, Sequence):
            if len(tensors) != 1:
                raise InvalidArgumentError(f"layout kind {kind!r} takes a single tensor")
            tensors = tensors[0]
        tensor_list = [tensors]
    devices = set()
    num_blocks = None
    for i, t in enumerate(tensor_list):
        if not hasattr(t, "shape") or not hasattr(t, "dtype"):
            raise InvalidArgumentError(f"tensor {i} is a {type(t).__name__}, not a tensor")
        try:
            got_dtype = dtype_name(t.dtype)
        except InvalidArgumentError:
            got_dtype = str(t.dtype)
        if got_dtype != layout.dtype:
            raise DTypeError(f"tensor {i} has dtype {got_dtype} but the layout says {layout.dtype}")
        shape = tuple(int(s) for s in t.shape)
        if len(shape) != len(lk.shape):
            raise InvalidArgumentError(
                f"tensor {i} has shape {shape}; layout kind {kind!r} expects "
                f"{len(lk.shape)} dims {lk.shape}"
            )
        nb = shape[lk.block_dim]
        expected = lk.expected_shape(layout, nb)
        if shape != expected:
            raise InvalidArgumentError(
                f"tensor {i} has shape {shape} but layout kind {kind!r} with {layout.describe()} "
                f"expects {expected} ({', '.join(lk.shape)})"
            )
        if num_blocks is not None and nb != num_blocks:
            raise InvalidArgumentError(f"tensor {i} has {nb} blocks, tensor 0 has {num_blocks}")
        num_blocks = nb
        flags = getattr(t, "flags", None)
        if flags is not None and not flags.writeable:
            raise InvalidArgumentError(f"tensor {i} is a read-only array; kvtier writes KV into registered memory")
        dev = _tensor_device(t)
        if not (dev == "cpu" or dev.startswith("cuda")):
            raise DeviceError(f"tensor {i} is on {dev}; kvtier registers cpu and cuda tensors")
        devices.add(dev)
    if len(devices) > 1:
        raise DeviceError(f"registered tensors must share one device, got {sorted(devices)}")
    exported = [t.detach() if hasattr(t, "detach") else t for t in tensor_list]
    core = _core.register_kv(exported, [lk.block_dim] * len(exported), layout.block_bytes, huge_pages=huge_pages)
    return KVRegistration(core, layout, kind, devices.pop(), tensor_list)


def register_kv_views(views: Sequence[Any], layout: KVLayout, block_dims: Sequence[int], *,
                      huge_pages: bool = False) -> KVRegistration:
    """Register arbitrary strided views as KV memory, for layouts no named kind describes.

    ``views[i]`` is indexed by block along ``block_dims[i]``; block ``b`` of the registration is
    the concatenation, in order, of every view's slice ``b`` (each decomposed into contiguous
    runs from its real strides). The slices must add up to ``layout.block_bytes``. Example: a
    transformers per-layer cache ``k[layer]`` of shape ``[1, heads, max_tokens, head_dim]`` is
    ``k[layer][0].unflatten(1, (max_tokens // T, T))`` with block dim 1, and the same for V.
    """
    if not isinstance(layout, KVLayout):
        raise InvalidArgumentError(f"layout must be a kvtier.KVLayout, got {type(layout).__name__}")
    views = list(views)
    dims = [int(d) for d in block_dims]
    if not views or len(views) != len(dims):
        raise InvalidArgumentError(f"need one block dim per view ({len(views)} views, {len(dims)} dims)")
    devices = set()
    for i, t in enumerate(views):
        if not hasattr(t, "shape") or not hasattr(t, "dtype"):
            raise InvalidArgumentError(f"view {i} is a {type(t).__name__}, not a tensor")
        got = str(t.dtype).removeprefix("torch.")
        try:
            got = dtype_name(t.dtype)
        except InvalidArgumentError:
            pass
        if got != layout.dtype:
            raise DTypeError(f"view {i} has dtype {got} but the layout says {layout.dtype}")
        if not -len(t.shape) <= dims[i] < len(t.shape):
            raise InvalidArgumentError(f"block dim {dims[i]} is out of range for view {i} of shape {tuple(t.shape)}")
        dims[i] %= len(t.shape)
        devices.add(_tensor_device(t))
    if len(devices) > 1:
        raise DeviceError(f"registered views must share one device, got {sorted(devices)}")
    exported = [t.detach() if hasattr(t, "detach") else t for t in views]
    core = _core.register_kv(exported, dims, layout.block_bytes, huge_pages=huge_pages)
    return KVRegistration(core, layout, "views", devices.pop(), views)
