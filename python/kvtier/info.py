"""What this kvtier build has, and what it can use on this machine (``kvtier info``)."""

from __future__ import annotations

import platform
from typing import Any

import kvtier
from kvtier import _core


def info() -> dict[str, Any]:
    build = _core.build_info()
    cuda = _core.probe_cuda()
    uring = _core.probe_uring()
    ucx = _core.probe_ucx()
    from kvtier.cluster.peer import ucx_runtime

    ucx["runtime"] = ucx_runtime()  # built against / actually loaded / the libucx wheel's state
    gds = _core.probe_gds()  # cached; bounded by its deadline (5 s) even where cuFileDriverOpen hangs
    return {
        "version": kvtier.__version__,
        "python": platform.python_version(),
        "build": build,
        "cpu": {"usable": True, "threads": build["hardware_threads"],
                "detail": f"{build['hardware_threads']} hardware threads, streaming stores: {build['nontemporal_copy']}"},
        "cuda": cuda,
        "io_uring": uring,
        "ucx": ucx,
        "gds": gds,
        "cluster": _cluster(),
    }


def _cluster() -> dict[str, Any]:
    """The metadata store client, and the state of every ClusterStore open in this process."""
    try:
        import redis
    except ImportError:
        return {"compiled": False, "usable": False, "detail": "", "stores": [], "probe": None,
                "reason": "the Redis client is not installed (pip install 'kvtier[cluster]')"}
    import os

    from kvtier.cluster.metadata import open_stores, probe_store

    stores = [s.status() for s in open_stores()]
    parts = [f"redis-py {redis.__version__}"]
    url = os.environ.get("KVTIER_STORE_URL", "")
    probe = probe_store(url) if url else None  # the store this machine's workers use, if named
    if probe is not None:
        parts.append(f"store {url}: redis {probe['server']}, {probe['live_workers']} live worker(s)"
                     if probe["reachable"] else f"store {url} UNREACHABLE ({probe['error']})")
    for st in stores:
        if st["connected"]:
            parts.append(f"worker {st['worker']} connected to {st['url']} (incarnation {st['incarnation']})")
        else:
            parts.append(f"worker {st['worker']} DISCONNECTED from {st['url']} for {st['disconnected_s']:.1f} s, "
                         f"serving from its own tiers ({st['last_error'] or 'not joined yet'})")
    if not stores:
        parts.append("no store open in this process")
    usable = all(st["connected"] for st in stores) and (probe is None or probe["reachable"])
    return {"compiled": True, "usable": usable, "detail": "; ".join(parts), "stores": stores, "probe": probe,
            "reason": "" if usable else "; ".join(parts[1:])}


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    b = data["build"]
    t = Table(title=f"kvtier {data['version']} (python {data['python']}, {b['compiler']}, {b['build_type']})")
    for col in ("backend", "compiled", "usable here", "detail / reason"):
        t.add_column(col)

    def yes(v: bool) -> str:
        return "[green]yes[/green]" if v else "[red]no[/red]"

    t.add_row("cpu copy", yes(True), yes(True), data["cpu"]["detail"])
    c = data["cuda"]
    cuda_detail = (
        f"{c['device_count']} GPU(s): {', '.join(c['devices'])}; runtime {c['runtime_version']}, driver {c['driver_version']}"
        if c["usable"] else c["reason"]
    )
    if c["compiled"]:
        cuda_detail = f"archs {b['cuda_architectures']}; {cuda_detail}"
    t.add_row("cuda", yes(c["compiled"]), yes(c["usable"]), cuda_detail)
    u = data["io_uring"]
    t.add_row("io_uring", yes(u["compiled"]), yes(u["usable"]), u["detail"] if u["usable"] else u["reason"])
    x = data["ucx"]
    ucx_detail = f"{x['detail']}; transports: {', '.join(x['items'])}" if x["usable"] else (x["reason"] or x["detail"])
    if x["compiled"]:
        r = x["runtime"]
        ucx_detail += f"; built against {r['built']}, loaded {r['loaded']} (libucx wheel: {r['wheel']})"
    t.add_row("ucx", yes(x["compiled"]), yes(x["usable"]), ucx_detail)
    g = data["gds"]
    t.add_row("gds (cuFile)", yes(g["compiled"]), yes(g["usable"]), g["detail"] if g["usable"] else g["reason"])
    k = data.get("cluster")
    if k is not None:
        t.add_row("cluster store", yes(k["compiled"]), yes(k["usable"]), k["detail"] or k["reason"])
    Console().print(t)
