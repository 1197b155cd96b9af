"""The data plane between workers: this process's UCX peer, and other workers' pools.

One :class:`Peer` per process owns the UCP context and worker (and their progress thread). It
registers host pools with UCX, exports its worker address and each pool's descriptor as bytes
(any metadata store can carry them), connects to other peers from their addresses, and moves
block lists between a local registered pool and a remote one with one-sided ``put`` and ``get``
(no staging copies). Transfers run through a :class:`~kvtier.transfer.CopyEngine` and complete
on the same :class:`~kvtier.transfer.TransferHandle` (and the same completion eventfd) as every
other transfer.

Typical use, in two processes::

    # worker A                                   # worker B
    peer = Peer(tls="posix,cma,tcp",              peer = Peer(tls="posix,cma,tcp", net_devices="lo")
                net_devices="lo")
    pool = HostPool(block_bytes, 1024)           pool = HostPool(block_bytes, 1024)
    desc = peer.register(pool)                   a = peer.connect(address_of_a)   # bytes from the store
    # publish peer.address and desc              remote = a.import_pool(desc_of_a)
                                                 peer.get(remote, [3, 4], pool, ids).wait(10)

Failures (docs/cluster.md, "Failure rules"): a peer that dies makes its transfers fail with
:class:`~kvtier.errors.TransferError` (or :class:`~kvtier.errors.TransferTimeoutError` when UCX
missed it and the transfer's deadline passed) and refuses later ones; the local pools' blocks are
released exactly as after any failed transfer. Bad addresses and descriptors raise
:class:`~kvtier.errors.InvalidArgumentError`; use after close raises
:class:`~kvtier.errors.ClosedError`.
"""

from __future__ import annotations

from typing import Any

from kvtier import _core
from kvtier import _ucx_preload
from kvtier.errors import ClosedError, InvalidArgumentError, KvtierError, UnavailableError
from kvtier.memory import HostPool
from kvtier.transfer import CopyEngine, TransferHandle

__all__ = ["Peer", "RemotePeer", "RemotePool", "ucx_runtime"]

_PROGRESS_MODES = ("event", "poll")


def ucx_runtime() -> dict[str, str]:
    """The UCX kvtier was built against and the one actually loaded in this process."""
    if not _core.HAVE_UCX:
        return {"built": "", "loaded": "", "wheel": _ucx_preload.STATE}
    return {"built": _core.UCX_BUILD_VERSION, "loaded": _core.ucx_loaded_version(), "wheel": _ucx_preload.STATE}


def _bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgumentError(f"{what} must be bytes (as exported by Peer), got {type(value).__name__}")


class RemotePool:
    """A pool registered by another worker, as this process reaches it (``remote:<peer id>``).

    Use it as the target of :meth:`Peer.put` or the source of :meth:`Peer.get`. Holds no
    reference on the remote blocks: what they contain is the owner's business (the metadata
    layer carries checksums and generations).
    """

    __slots__ = ("_remote_space", "peer")

    def __init__(self, core: Any, peer: RemotePeer) -> None:
        self._remote_space = core
        self.peer = peer

    @property
    def num_blocks(self) -> int:
        return self._remote_space.num_blocks

    @property
    def block_bytes(self) -> int:
        return self._remote_space.block_bytes

    def __repr__(self) -> str:
        return f"RemotePool({self.num_blocks} x {self.block_bytes} B on peer {self.peer.id})"


class RemotePeer:
    """An endpoint to another worker's :class:`Peer` (one per remote process)."""

    __slots__ = ("_peer", "id")

    def __init__(self, peer: Peer, peer_id: int) -> None:
        self._peer = peer
        self.id = peer_id

    @property
    def alive(self) -> bool:
        """False once UCX (or a transfer deadline) declared the peer failed, or it was disconnected."""
        return self.error is None

    @property
    def error(self) -> KvtierError | None:
        """Why the peer is not usable, or None."""
        try:
            self._peer._agent().check_peer(self.id)
        except KvtierError as e:
            return e
        return None

    def import_pool(self, descriptor: bytes) -> RemotePool:
        """A pool this peer registered, from the descriptor its :meth:`Peer.register` returned."""
        core = self._peer._agent().import_pool(self.id, _bytes(descriptor, "the pool descriptor"))
        return RemotePool(core, self)

    def disconnect(self) -> None:
        """Close the endpoint; transfers still in flight fail, later ones are refused."""
        self._peer._agent().disconnect(self.id)

    def fail(self) -> None:
        """Test switch: declare this peer failed, as if UCX had reported it dead."""
        self._peer._agent().fail_peer(self.id)

    def __repr__(self) -> str:
        return f"RemotePeer({self.id}, {'alive' if self.alive else 'failed'})"


def _checked_max_op_bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 4096 <= value < 2**63:
        raise InvalidArgumentError(f"max_op_bytes must be an int >= 4096, got {value!r}")
    return value


class Peer:
    """This process's UCX peer: one UCP context and worker, an event-driven progress thread.

    Args:
        engine: the copy engine whose handles and completion eventfd UCX transfers share
            (default: a new one-thread engine owned by this peer).
        tls: ``UCX_TLS`` for this peer ("posix,cma,tcp", "tcp", ...); None leaves UCX's own
            selection (and the environment). Peer error handling needs a transport that can
            detect a dead peer: list ``tcp`` beside shared memory.
        net_devices: ``UCX_NET_DEVICES`` ("lo" keeps TCP on loopback); None leaves the default.
        rndv_thresh: ``UCX_RNDV_THRESH``; "inf" (the default, as NIXL sets it) keeps large
            messages off the rendezvous protocol, so a killed peer is detected in milliseconds.
        error_handling: peer error handling on endpoints (UCP_ERR_HANDLING_MODE_PEER).
        progress: "event" (sleep on the worker's event fd) or "poll" (spin while transfers are
            in flight; slower on machines with few cores, kept to measure it).
        max_op_bytes: blocks consecutive in both pools go out together in UCX operations of up
            to this many bytes, larger pieces split (Note [Merged operations]; 1 MiB ran 1.8x
            faster than 64 MiB over TCP here, alike over shared memory).
        transfer_timeout_s: a batch not complete after this long fails with
            ``TransferTimeoutError`` and its peer is declared failed (<= 0: no deadline).

    Only one Peer may be open per process (UCX's context and worker are per process); close it
    (or use it as a context manager) before creating another.
    """

    def __init__(
        self,
        engine: CopyEngine | None = None,
        *,
        tls: str | None = None,
        net_devices: str | None = None,
        rndv_thresh: str | None = "inf",
        error_handling: bool = True,
        progress: str = "event",
        transfer_timeout_s: float = 30.0,
        max_op_bytes: int = 1 << 20,
    ) -> None:
        if not _core.HAVE_UCX:
            raise UnavailableError(
                "kvtier was built without UCX (apt-get install libucx-dev and rebuild); see `kvtier info`"
            )
        if progress not in _PROGRESS_MODES:
            raise InvalidArgumentError(f"progress must be one of {_PROGRESS_MODES}, got {progress!r}")
        for name, value in (("tls", tls), ("net_devices", net_devices), ("rndv_thresh", rndv_thresh)):
            if value is not None and not isinstance(value, str):
                raise InvalidArgumentError(f"{name} must be a string or None, got {type(value).__name__}")
        if engine is not None and not isinstance(engine, CopyEngine):
            raise InvalidArgumentError(f"engine must be a kvtier.CopyEngine, got {type(engine).__name__}")
        self._core = _core.UcxAgent.create(
            tls or "", net_devices or "", rndv_thresh or "", bool(error_handling), progress == "poll",
            float(transfer_timeout_s), _checked_max_op_bytes(max_op_bytes),
        )
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else CopyEngine(threads=1)
        self._core.attach(self.engine._core)
        self._registered: dict[int, HostPool] = {}  # id(pool) -> pool, kept alive while registered
        self._closed = False

    # ------------------------------------------------------------------ identity
    @property
    def address(self) -> bytes:
        """This worker's address, to publish in the metadata store."""
        return self._agent().address

    def info(self) -> dict[str, Any]:
        """UCX version actually loaded, transports, and the settings this peer runs with."""
        d = dict(self._agent().info())
        d.update({"ucx_built": _core.UCX_BUILD_VERSION, "ucx_wheel": _ucx_preload.STATE})
        return d

    @property
    def max_op_bytes(self) -> int:
        """The largest UCX operation (Note [Merged operations]); settable, for batches started after."""
        return int(self._agent().max_op_bytes)

    @max_op_bytes.setter
    def max_op_bytes(self, value: int) -> None:
        self._agent().set_max_op_bytes(_checked_max_op_bytes(value))

    def stats(self) -> dict[str, int]:
        """Counters: batches_ok, batches_failed, ops_posted, bytes_ok, peers_failed; gauge: inflight."""
        return dict(self._agent().stats())

    # ------------------------------------------------------------------ memory
    def register(self, pool: HostPool) -> bytes:
        """Register a host pool with UCX; returns its descriptor (bytes) for other peers."""
        if not isinstance(pool, HostPool):
            raise InvalidArgumentError(f"only a kvtier.HostPool can be registered, got {type(pool).__name__}")
        desc = self._agent().register(pool._core)
        self._registered[id(pool)] = pool
        return desc

    def unregister(self, pool: HostPool) -> None:
        """Unregister a pool (refused with BusyError while a transfer uses it)."""
        if not isinstance(pool, HostPool):
            raise InvalidArgumentError(f"expected a kvtier.HostPool, got {type(pool).__name__}")
        self._agent().unregister(pool._core)
        self._registered.pop(id(pool), None)

    # ------------------------------------------------------------------ peers
    def connect(self, address: bytes) -> RemotePeer:
        """An endpoint to the peer with this address (the same one again if already connected)."""
        return RemotePeer(self, self._agent().connect(_bytes(address, "the peer address")))

    # ------------------------------------------------------------------ transfers
    def put(self, pool: HostPool, ids: Any, remote: RemotePool, remote_ids: Any) -> TransferHandle:
        """Write ``pool[ids[i]] -> remote[remote_ids[i]]``; complete once delivered (flushed)."""
        self._check_pair(pool, remote, "put")
        return self.engine.transfer(pool, ids, remote, remote_ids)

    def get(self, remote: RemotePool, remote_ids: Any, pool: HostPool, ids: Any) -> TransferHandle:
        """Read ``remote[remote_ids[i]] -> pool[ids[i]]``."""
        self._check_pair(pool, remote, "get")
        return self.engine.transfer(remote, remote_ids, pool, ids)

    def _check_pair(self, pool: Any, remote: Any, op: str) -> None:
        agent = self._agent()
        if not isinstance(remote, RemotePool):
            raise InvalidArgumentError(f"{op}: the remote side must be a RemotePool, got {type(remote).__name__}")
        if remote.peer._peer is not self:
            raise InvalidArgumentError(f"{op}: the remote pool was imported through another Peer")
        if not isinstance(pool, HostPool):
            raise InvalidArgumentError(f"{op}: the local side must be a kvtier.HostPool, got {type(pool).__name__}")
        if not agent.is_registered(pool._core):
            raise InvalidArgumentError(f"{op}: the local pool is not registered with this Peer (call register)")

    # ------------------------------------------------------------------ life cycle
    def _agent(self) -> Any:
        if self._closed:
            raise ClosedError("the UCX peer was closed")
        return self._core

    def drain(self) -> None:
        """Wait for every UCX transfer in flight (each is bounded by its deadline)."""
        self._agent().drain()

    def close(self) -> None:
        """Wait for transfers in flight, close endpoints, unregister memory, free the worker."""
        if self._closed:
            return
        self._core.drain()
        self._core.close()
        if self._owns_engine:
            self.engine.close()
        self._registered.clear()
        self._closed = True

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "Peer(closed)"
        i = self._core.info()
        return f"Peer(UCX {i['version']}, progress={i['progress']}, errors={i['error_mode']})"
