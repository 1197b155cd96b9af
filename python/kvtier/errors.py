"""kvtier's exceptions: one class per core status code, all under :class:`KvtierError`.

Classes that mean "your argument was wrong" also derive from the matching built-in
(``ValueError``, ``TypeError``, ``TimeoutError``), so generic handlers keep working.
"""

from __future__ import annotations

from kvtier import _core


class KvtierError(Exception):
    """Base class of every error kvtier raises."""


class InvalidArgumentError(KvtierError, ValueError):
    """An argument is out of range, has the wrong shape, or does not fit the layout."""


class DTypeError(KvtierError, TypeError):
    """A tensor's element type does not match the KV layout."""


class DeviceError(KvtierError, ValueError):
    """A tensor is on the wrong device, or on one kvtier cannot use."""


class OutOfCapacityError(KvtierError):
    """A pool, tier or queue has no room for the request."""


class BlockStateError(KvtierError):
    """A block is in the wrong state: double free, freeing a pinned block, using a free block."""


class UnavailableError(KvtierError):
    """A backend is not compiled in, or not usable on this machine (see ``kvtier info``)."""


class TransferError(KvtierError):
    """A transfer failed; the blocks it targeted hold no valid data."""


class TransferTimeoutError(KvtierError, TimeoutError):
    """Waiting for a transfer took longer than the timeout (the transfer goes on)."""


class BusyError(KvtierError):
    """The resource still has transfers in flight."""


class ClosedError(KvtierError):
    """The object was closed."""


class CorruptBlockError(KvtierError):
    """A block failed its checksum."""


class InternalError(KvtierError):
    """A bug in kvtier: please report it with the message."""


_BY_CODE_NAME: dict[str, type[KvtierError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "DTYPE": DTypeError,
    "DEVICE": DeviceError,
    "OUT_OF_CAPACITY": OutOfCapacityError,
    "BLOCK_STATE": BlockStateError,
    "UNAVAILABLE": UnavailableError,
    "TRANSFER": TransferError,
    "TIMEOUT": TransferTimeoutError,
    "BUSY": BusyError,
    "CLOSED": ClosedError,
    "CORRUPT": CorruptBlockError,
    "INTERNAL": InternalError,
}


def _install() -> None:
    table = {}
    for name, code in _core.STATUS_CODES.items():
        if name not in _BY_CODE_NAME:  # a new core code without a Python class is a bug
            raise ImportError(f"kvtier: status code {name} has no Python exception class")
        table[code] = _BY_CODE_NAME[name]
    _core._set_error_types(table)


_install()
