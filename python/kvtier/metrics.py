"""Prometheus export of a :class:`~kvtier.TieredCache`'s metrics.

``register_cache(cache, registry=None, name="default")`` adds a collector that reads the
cache's counters at scrape time (no background thread, nothing on the hot path);
``prometheus_client.start_http_server(port)`` then serves them. Metric names:

- ``kvtier_cache_hits_total{cache, tier}``: blocks found, by the tier they were on
- ``kvtier_cache_misses_total{cache}``: full blocks looked up and not found
- ``kvtier_cache_lookups_total{cache}``
- ``kvtier_cache_stored_blocks_total{cache}``, ``kvtier_cache_dropped_blocks_total{cache}``,
  ``kvtier_cache_declined_blocks_total{cache}``
  ``kvtier_cache_stored_below_blocks_total{cache}``
- ``kvtier_cache_bytes_moved_total{cache, src, dst}``
- ``kvtier_cache_prefill_tokens_saved_total{cache}``
- ``kvtier_cache_blocks{cache, tier}``: blocks held now (gauge)
- ``kvtier_cache_transfer_latency_seconds{cache, path, quantile}``: p50/p99 (gauge)
- ``kvtier_cache_remote_total{cache, what}`` (a ClusterWorker attached): ``lookups``, ``found``,
  ``hits``, ``misses``, ``validation_failures`` (``checksum_failures`` + ``generation_failures``),
  ``transfer_failures``, ``no_room``, ``store_unavailable``, ``bytes``; and
  ``kvtier_cache_remote_store_seconds_total{cache}``

``register_traces(manager, registry=None, name="default")`` does the same for a
:class:`~kvtier.TraceManager` (the trace-aware policy):

- ``kvtier_trace_decisions_total{cache, action}``: tool-start decisions (keep, dram, nvme, drop,
  nothing)
- ``kvtier_trace_decision_reasons_total{cache, reason}``
- ``kvtier_trace_gap_sources_total{cache, source}``: hint, learned, fleet, prior
- ``kvtier_trace_prefetch_lateness_seconds{cache, quantile}``: p50/p90/p99/max (gauge), and
  ``kvtier_trace_prefetches_total``, ``kvtier_trace_late_prefetches_total``
- ``kvtier_trace_{prefetched,demoted,dropped}_blocks_total``, ``kvtier_trace_late_recompute_tokens_total``,
  ``kvtier_trace_tail_tokens_reused_total``, ``kvtier_trace_expired_leases_total``
- ``kvtier_trace_open{cache}``, ``kvtier_trace_leased_blocks{cache}`` (gauges)

``register_cluster(store, registry=None, name="default")`` does the same for a
:class:`~kvtier.cluster.ClusterStore` (the cluster metadata store, docs/cluster.md):

- ``kvtier_cluster_store_connected{cache, worker}``: 1 while the store answers and the lease is
  held, 0 while the worker serves from its own tiers only (gauge)
- ``kvtier_cluster_store_disconnected_seconds{cache, worker}`` (gauge)
- ``kvtier_cluster_store_calls_total{cache, op}``, ``kvtier_cluster_store_errors_total{cache, op}``
- ``kvtier_cluster_store_latency_seconds{cache, op, quantile}``: round trip p50/p99 (gauge)
- ``kvtier_cluster_store_{fast_failures,keys_looked_up,records_returned,lease_renewals,rejoins,
  reconnects,cleaned_entries}_total{cache}``
"""

from __future__ import annotations

from typing import Any

from kvtier.errors import UnavailableError


def _families() -> tuple[Any, Any]:
    try:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        raise UnavailableError("Prometheus export needs prometheus-client: pip install prometheus-client") from None
    return CounterMetricFamily, GaugeMetricFamily


class _Collector:
    """What prometheus_client registers: an object whose ``collect()`` yields metric families."""

    def __init__(self, collect: Any) -> None:
        self.collect = collect


def _register(collect: Any, registry: Any) -> _Collector:
    from prometheus_client import REGISTRY

    collector = _Collector(collect)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector


def register_cache(cache: Any, registry: Any = None, name: str = "default") -> Any:
    """Register a scrape-time collector for ``cache``; returns the collector."""
    CounterMetricFamily, GaugeMetricFamily = _families()

    def collect() -> Any:
        snap = cache.metrics.snapshot()
        hits = CounterMetricFamily("kvtier_cache_hits", "Blocks found, by tier", labels=["cache", "tier"])
        for tier, v in snap["hits"].items():
            hits.add_metric([name, tier], v)
        yield hits
        for key, help_text in (("misses", "Full blocks looked up and not found"),
                               ("lookups", "Prefix lookups"),
                               ("stored_blocks", "Blocks stored"),
                               ("dropped_blocks", "Blocks evicted from the last tier or refused by it"),
                               ("declined_blocks", "Blocks not stored: device and DRAM tiers pinned full"),
                               ("stored_below_blocks", "Blocks stored into DRAM: device tier pinned full"),
                               ("prefill_tokens_saved", "Prefill tokens loaded instead of recomputed")):
            c = CounterMetricFamily(f"kvtier_cache_{key}", help_text, labels=["cache"])
            c.add_metric([name], snap[key])
            yield c
        moved = CounterMetricFamily("kvtier_cache_bytes_moved", "Bytes moved between tiers",
                                    labels=["cache", "src", "dst"])
        for path, v in snap["bytes_moved"].items():
            src, dst = path.split("->")
            moved.add_metric([name, src, dst], v)
        yield moved
        blocks = GaugeMetricFamily("kvtier_cache_blocks", "Blocks held now, by tier", labels=["cache", "tier"])
        for tier, v in cache.blocks_per_tier().items():
            blocks.add_metric([name, tier], v)
        yield blocks
        lat = GaugeMetricFamily("kvtier_cache_transfer_latency_seconds", "Transfer latency quantiles",
                                labels=["cache", "path", "quantile"])
        for path, d in snap["transfer_latency"].items():
            lat.add_metric([name, path, "0.5"], d["p50_ms"] / 1e3)
            lat.add_metric([name, path, "0.99"], d["p99_ms"] / 1e3)
        yield lat
        remote = CounterMetricFamily("kvtier_cache_remote", "Remote tier: blocks found in the store, pulled and "
                                     "checked (hits), failed a check (misses, by cause), bytes pulled",
                                     labels=["cache", "what"])
        for what, v in snap["remote"].items():
            if what != "store_rtt_s":
                remote.add_metric([name, what], v)
        yield remote
        rtt = CounterMetricFamily("kvtier_cache_remote_store_seconds", "Remote tier: store round-trip seconds "
                                  "(lookups and validations)", labels=["cache"])
        rtt.add_metric([name], snap["remote"]["store_rtt_s"])
        yield rtt

    return _register(collect, registry)


def register_traces(manager: Any, registry: Any = None, name: str = "default") -> Any:
    """Register a scrape-time collector for a :class:`~kvtier.TraceManager`; returns it."""
    CounterMetricFamily, GaugeMetricFamily = _families()

    def collect() -> Any:
        snap = manager.metrics.snapshot()
        for metric, key, label, help_text in (
                ("decisions", "decisions", "action", "Tool-start placement decisions, by action"),
                ("decision_reasons", "reasons", "reason", "Tool-start placement decisions, by reason"),
                ("gap_sources", "gap_sources", "source", "Where the expected gap came from")):
            c = CounterMetricFamily(f"kvtier_trace_{metric}", help_text, labels=["cache", label])
            for k, v in snap[key].items():
                c.add_metric([name, k], v)
            yield c
        late = snap["prefetch_lateness_s"]
        g = GaugeMetricFamily("kvtier_trace_prefetch_lateness_seconds", "How late restores were at resume",
                              labels=["cache", "quantile"])
        for q, k in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"), ("1", "max")):
            g.add_metric([name, q], late[k])
        yield g
        for key, value, help_text in (
                ("prefetches", snap["prefetches"], "Restores started"),
                ("late_prefetches", late["late"], "Resumes whose restore was not done"),
                ("prefetched_blocks", snap["prefetched_blocks"], "Blocks restored to the device"),
                ("demoted_blocks", snap["demoted_blocks"], "Blocks demoted at tool starts"),
                ("dropped_blocks", snap["dropped_blocks"], "Blocks dropped at tool starts"),
                ("late_recompute_tokens", snap["late_recompute_tokens"], "Tokens recomputed: restore late"),
                ("tail_tokens_reused", snap["tail_tokens_reused"], "Partial-tail tokens loaded, not recomputed"),
                ("expired_leases", snap["expired_leases"], "Device leases that ran out")):
            c = CounterMetricFamily(f"kvtier_trace_{key}", help_text, labels=["cache"])
            c.add_metric([name], value)
            yield c
        for key, value, help_text in (("open", len(manager.traces), "Open traces"),
                                      ("leased_blocks", manager.kept_blocks(), "Device blocks held by leases")):
            gg = GaugeMetricFamily(f"kvtier_trace_{key}", help_text, labels=["cache"])
            gg.add_metric([name], value)
            yield gg

    return _register(collect, registry)


def register_cluster(store: Any, registry: Any = None, name: str = "default") -> Any:
    """Register a scrape-time collector for a :class:`~kvtier.cluster.ClusterStore`."""
    CounterMetricFamily, GaugeMetricFamily = _families()

    def collect() -> Any:
        snap = store.metrics.snapshot()
        status = store.status()
        up = GaugeMetricFamily("kvtier_cluster_store_connected", "1 while the metadata store answers and "
                               "the lease is held; 0: serving from own tiers only", labels=["cache", "worker"])
        up.add_metric([name, store.worker_id], 1.0 if status["connected"] else 0.0)
        yield up
        down = GaugeMetricFamily("kvtier_cluster_store_disconnected_seconds", "Seconds since the store "
                                 "stopped answering (0 while connected)", labels=["cache", "worker"])
        down.add_metric([name, store.worker_id], status["disconnected_s"])
        yield down
        for key, help_text in (("calls", "Store round trips, by operation"),
                               ("errors", "Store round trips that failed, by operation")):
            c = CounterMetricFamily(f"kvtier_cluster_store_{key}", help_text, labels=["cache", "op"])
            for op, v in snap[key].items():
                c.add_metric([name, op], v)
            yield c
        lat = GaugeMetricFamily("kvtier_cluster_store_latency_seconds", "Store round trip quantiles",
                                labels=["cache", "op", "quantile"])
        for op, d in snap["latency"].items():
            lat.add_metric([name, op, "0.5"], d["p50_ms"] / 1e3)
            lat.add_metric([name, op, "0.99"], d["p99_ms"] / 1e3)
        yield lat
        for key, help_text in (("fast_failures", "Calls refused at once while disconnected"),
                               ("keys_looked_up", "Block keys looked up"),
                               ("records_returned", "Live holder records returned by lookups"),
                               ("lease_renewals", "Lease renewals"),
                               ("rejoins", "New incarnations after a lost lease or store"),
                               ("reconnects", "Reconnections after the store was unreachable"),
                               ("cleaned_entries", "Dead workers' directory entries removed")):
            c = CounterMetricFamily(f"kvtier_cluster_store_{key}", help_text, labels=["cache"])
            c.add_metric([name], snap[key])
            yield c

    return _register(collect, registry)
