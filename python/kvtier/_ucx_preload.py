"""Loads the newer UCX of PyPI's ``libucx-cu12`` wheel before kvtier's native core, when installed.

kvtier's core links against whichever UCX the build found (Debian's ``libucx-dev`` 1.13 by
default). UCX keeps its ABI across these versions, and the dynamic loader resolves the core's
``libucp.so.0`` to a library of that name that is already loaded: so when the wheel is installed
(``pip install kvtier[ucx]``) its libraries are loaded first, and the core runs on UCX 1.22
(zero-copy shared memory to any registered memory, and a killed peer seen in milliseconds; see
docs/cluster.md). ``KVTIER_UCX_WHEEL=0`` keeps the UCX the build linked.
"""

from __future__ import annotations

import os

#: What happened: "not installed", "disabled (KVTIER_UCX_WHEEL=0)", "loaded <version>" or "failed: ...".
STATE = "not installed"


def _load() -> str:
    if os.environ.get("KVTIER_UCX_WHEEL", "1") == "0":
        return "disabled (KVTIER_UCX_WHEEL=0)"
    try:
        import libucx  # type: ignore[import-not-found]
    except ImportError:
        return "not installed"
    try:
        libucx.load_library()
    except OSError as e:  # a broken wheel must not stop kvtier from importing
        return f"failed: {e}"
    return f"loaded libucx-cu12 {getattr(libucx, '__version__', '?')}"


STATE = _load()
