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
"""

from __future__ import annotations

from typing import Any

from kvtier.errors import UnavailableError


def register_cache(cache: Any, registry: Any = None, name: str = "default") -> Any:
    """Register a scrape-time collector for ``cache``; returns the collector."""
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        raise UnavailableError("Prometheus export needs prometheus-client: pip install prometheus-client") from None

    class _Collector:
        def collect(self) -> Any:
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

    collector = _Collector()
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
