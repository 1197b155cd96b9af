"""Trace-aware placement: the cost model and the decision a tool-call gap triggers.

Everything here is pure: numbers in, a decision out. :mod:`kvtier.trace` applies the decisions to
a real :class:`~kvtier.TieredCache`; ``kvtier replay`` runs them on a real decoder and
``kvtier simulate`` on a modelled GPU server, so both exercise this same code.

The question at a tool start: where should this trace's *private* KV (blocks no other live trace
owns; shared prefixes are left alone and stay hot) spend the gap?

  keep     stay on the device, held for a time-to-live; nothing moves.
  dram     demote to DRAM now, prefetch back before the trace resumes.
  nvme     the same through NVMe.
  drop     free it and recompute it at resume.
  nothing  the trace has no private blocks on the device: there is nothing to place (its blocks
           there are held for a time-to-live as for keep, and what sits below is restored).

Note [Gap-aware placement]: moving KV out is worth it only when the gap is long enough to move it
out *and* back before the trace resumes (else the restore is on the critical path), and only when
the device needs the room. So the policy keeps the KV when the expected gap is shorter than
``keep_margin`` round trips to DRAM, or when the device has room to spare (``fill_keep``) and
keeping it would not push the blocks held for kept traces over ``keep_share`` of the device.
Otherwise it demotes to the cheapest tier whose round trip fits in the gap: DRAM, unless DRAM is
itself under pressure and NVMe's round trip fits too. When no tier's round trip fits (a short gap
on a device so full, ``critical_fill``, that keeping is not an option), the restore would be late
by ``round_trip - gap``; that is compared with recomputing the private tokens (drop) and the
cheaper one wins.

Note [Headroom]: after each tool start, the manager demotes least recently used blocks in the
background until ``headroom`` of the device and DRAM tiers is free, so that the next step's store
finds room at once instead of waiting on a demotion chain that may end in an NVMe write. The tool
gap is when such work is free: the copy engines are idle while the trace waits.

Note [A restore never drops]: a background restore pins the trace's blocks and promotes them to
the device, which makes room by pushing the device's least recently used blocks into DRAM, which
makes room by writing its own to NVMe. When DRAM is small next to a trace's context (finding 6 of
issue 12: coding-agent contexts of ~2k tokens, 128 blocks, over a DRAM tier of 113), the blocks
the restore pins (its DRAM blocks, and its NVMe blocks read into DRAM on the way up) leave DRAM
no unpinned block to push down, so the device's victims were *dropped*: blocks from the middle
of other traces' contexts, each of which costs its owner the recompute of everything after it,
far more than the block the restore brought up. So a restore brings up, head first, only as many
blocks as the device has free plus the room DRAM can make without touching the restore's own
blocks; what stays below is loaded at the step (DRAM straight to the engine, NVMe through
staging), never recomputed.

Note [Prefetch timing]: a demoted trace's restore starts ``prefetch_safety`` restore times before
its expected resume, measured from a low estimate of the gap (the hint as given; a learned gap's
25th percentile), and at ``tool_end`` at the latest. If the restore is still running when the step
could start, the late part is recomputed when that is cheaper than waiting for it.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.errors import InvalidArgumentError

DEVICE, DRAM, NVME = 0, 1, 2
_LINKS = ("device->dram", "dram->device", "dram->nvme", "nvme->dram", "device->engine", "dram->engine")


class Action(str, enum.Enum):
    KEEP = "keep"
    DRAM = "dram"
    NVME = "nvme"
    DROP = "drop"
    NOTHING = "nothing"  # no private blocks on the device: nothing to place (not counted as a keep)


@dataclass
class CostModel:
    """Seconds to move and to recompute KV, from measured numbers.

    ``bandwidth`` is bytes/s per link (``"device->dram"``, ``"dram->device"``, ``"dram->nvme"``,
    ``"nvme->dram"``, ``"device->engine"``, ``"dram->engine"``); ``latency_s`` a fixed cost per
    transfer on a link; ``recompute_s_per_token`` the prefill time per token of the model in use.
    """

    block_bytes: int
    block_tokens: int
    bandwidth: dict[str, float]
    recompute_s_per_token: float
    latency_s: dict[str, float] = field(default_factory=dict)
    source: str = "given"

    def __post_init__(self) -> None:
        if self.block_bytes <= 0 or self.block_tokens <= 0:
            raise InvalidArgumentError("block_bytes and block_tokens must be positive")
        for link, bw in self.bandwidth.items():
            if link not in _LINKS:
                raise InvalidArgumentError(f"unknown link {link!r}; links are {', '.join(_LINKS)}")
            if not bw > 0:
                raise InvalidArgumentError(f"bandwidth of {link} must be > 0, got {bw!r}")
        if not self.recompute_s_per_token >= 0:
            raise InvalidArgumentError(f"recompute_s_per_token must be >= 0, got {self.recompute_s_per_token!r}")

    def link_s(self, link: str, blocks: int) -> float:
        if blocks <= 0:
            return 0.0
        bw = self.bandwidth.get(link)
        if bw is None:
            return math.inf
        return self.latency_s.get(link, 0.0) + blocks * self.block_bytes / bw

    def demote_s(self, blocks: int, tier: int) -> float:
        """Device -> ``tier`` (through DRAM for NVMe)."""
        s = self.link_s("device->dram", blocks)
        return s + (self.link_s("dram->nvme", blocks) if tier == NVME else 0.0)

    def restore_s(self, blocks: int, tier: int) -> float:
        """``tier`` -> device (through DRAM for NVMe)."""
        s = self.link_s("dram->device", blocks)
        return s + (self.link_s("nvme->dram", blocks) if tier == NVME else 0.0)

    def round_trip_s(self, blocks: int, tier: int) -> float:
        return self.demote_s(blocks, tier) + self.restore_s(blocks, tier)

    def recompute_s(self, tokens: int) -> float:
        return max(0, tokens) * self.recompute_s_per_token

    def observe_recompute(self, tokens: int, seconds: float, weight: float = 0.2) -> None:
        """Fold a measured prefill (``tokens`` computed in ``seconds``) into the per-token cost."""
        if tokens > 0 and seconds > 0:
            self.recompute_s_per_token += weight * (seconds / tokens - self.recompute_s_per_token)

    @classmethod
    def from_bench(cls, block_bytes: int, block_tokens: int, recompute_s_per_token: float, *,
                   copy_report: str | dict[str, Any] | None = None,
                   nvme_report: str | dict[str, Any] | None = None) -> CostModel:
        """Bandwidths from ``kvtier bench copy --json`` (device<->DRAM: the median of its gather
        cases one way, of its scatter cases the other) and ``kvtier bench nvme --json`` (DRAM<->NVMe:
        the median of its sequential write and read cases) instead of calibrating."""
        def load(r: str | dict[str, Any] | None, suite: str) -> list[dict[str, Any]]:
            if r is None:
                return []
            if isinstance(r, str):
                import json

                try:
                    with open(r) as f:
                        r = json.load(f)
                except (OSError, ValueError) as e:
                    raise InvalidArgumentError(f"cannot read the {suite} bench report {r!r}: {e}") from None
            results = r.get("results") if isinstance(r, dict) else None
            if not isinstance(results, list):
                raise InvalidArgumentError(f"not a kvtier bench {suite} report: no 'results' list")
            return results

        def median(rows: list[dict[str, Any]], pick: Any) -> float | None:
            vals = [row["kvtier_gbps"] * 1e9 for row in rows if pick(row) and row.get("kvtier_gbps")]
            return float(np.median(vals)) if vals else None

        copy, nvme = load(copy_report, "copy"), load(nvme_report, "nvme")
        bw: dict[str, float] = {}
        out_bw = median(copy, lambda r: r["case"].endswith("gather"))
        in_bw = median(copy, lambda r: r["case"].endswith("scatter"))
        if out_bw:
            bw["device->dram"] = out_bw
        if in_bw:
            bw.update({"dram->device": in_bw, "dram->engine": in_bw, "device->engine": in_bw})
        wr = median(nvme, lambda r: r.get("mode") == "write")
        rd = median(nvme, lambda r: r.get("mode") == "read")
        if wr:
            bw["dram->nvme"] = wr
        if rd:
            bw["nvme->dram"] = rd
        if not bw:
            raise InvalidArgumentError("the bench reports hold no kvtier figures to take bandwidths from")
        return cls(block_bytes, block_tokens, bw, recompute_s_per_token, source="kvtier bench reports")

    def as_dict(self) -> dict[str, Any]:
        return {"block_bytes": self.block_bytes, "block_tokens": self.block_tokens,
                "bandwidth_GBps": {k: v / 1e9 for k, v in self.bandwidth.items()},
                "recompute_ms_per_token": self.recompute_s_per_token * 1e3, "source": self.source}


class GapEstimator:
    """Expected tool-call gaps: the hint when given, else learned from that tool's history, else
    from every tool's history, else ``prior_s``."""

    def __init__(self, prior_s: float = 5.0, history: int = 64) -> None:
        self.prior_s = prior_s
        self._by_tool: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=history))
        self._all: deque[float] = deque(maxlen=history * 4)

    def observe(self, tool: str | None, gap_s: float) -> None:
        if gap_s >= 0 and math.isfinite(gap_s):
            self._by_tool[tool or ""].append(gap_s)
            self._all.append(gap_s)

    def estimate(self, tool: str | None, hint_s: float | None) -> tuple[float, float, str]:
        """(expected gap, low estimate for prefetch timing, source: hint|learned|fleet|prior)."""
        if hint_s is not None:
            return hint_s, hint_s, "hint"
        hist = self._by_tool.get(tool or "")
        if hist is not None and len(hist) >= 3:
            a = np.asarray(hist)
            return float(np.median(a)), float(np.percentile(a, 25)), "learned"
        if len(self._all) >= 3:
            a = np.asarray(self._all)
            return float(np.median(a)), float(np.percentile(a, 10)), "fleet"
        return self.prior_s, 0.0, "prior"


@dataclass(frozen=True)
class Decision:
    action: Action
    gap_s: float  # the expected gap the decision was made for
    gap_source: str
    ttl_s: float | None = None  # keep: how long the blocks are held on the device
    prefetch_in_s: float | None = None  # dram/nvme: start the restore this long after the tool start
    reason: str = ""
    costs: dict[str, float] = field(default_factory=dict)  # expected critical-path seconds per action


@dataclass(frozen=True)
class TierState:
    """What the policy needs to know about the cache at a tool start."""

    device_blocks: int  # capacity of the device tier
    device_fill: float  # fraction of device blocks in use
    kept_blocks: int  # device blocks held for kept traces right now
    dram_fill: float = 1.0  # 1.0 when there is no DRAM tier
    has_dram: bool = False
    has_nvme: bool = False


@dataclass
class TraceAwarePolicy:
    """See Note [Gap-aware placement] and Note [Prefetch timing]."""

    keep_margin: float = 2.0
    fill_keep: float = 0.5
    keep_share: float = 0.5
    dram_pressure: float = 0.8
    prefetch_safety: float = 1.5
    ttl_factor: float = 2.0
    critical_fill: float = 0.98
    headroom: float = 0.125  # share of the device and DRAM tiers kept free by demotion in the background

    def decide(self, *, private_blocks: int, private_tokens: int, gap_s: float, gap_low_s: float,
               gap_source: str, tiers: TierState, cost: CostModel) -> Decision:
        if private_blocks < 0 or private_tokens < 0 or not gap_s >= 0:
            raise InvalidArgumentError("private_blocks, private_tokens and gap_s must be >= 0")
        b = private_blocks
        ttl = gap_s * self.ttl_factor + cost.round_trip_s(b, DRAM)
        costs = {"keep": 0.0, "drop": cost.recompute_s(private_tokens)}
        for tier, name, ok in ((DRAM, "dram", tiers.has_dram), (NVME, "nvme", tiers.has_nvme)):
            if ok:
                costs[name] = max(0.0, cost.round_trip_s(b, tier) - gap_s)
        keep = Decision(Action.KEEP, gap_s, gap_source, ttl_s=ttl, costs=costs)
        if b == 0:
            return Decision(Action.NOTHING, gap_s, gap_source, ttl_s=ttl, reason="no private blocks on the device",
                            costs=costs)
        if not tiers.has_dram:
            return _with(keep, "no tier below the device")
        if gap_s <= self.keep_margin * cost.round_trip_s(b, DRAM) and tiers.device_fill < self.critical_fill:
            return _with(keep, "gap shorter than a round trip to DRAM")
        if tiers.device_fill < self.fill_keep and tiers.kept_blocks + b <= self.keep_share * tiers.device_blocks:
            return _with(keep, "the device has room")
        # Offload: the cheapest of a late restore from DRAM/NVMe and a recompute (Note [Gap-aware placement]).
        late = {k: v for k, v in costs.items() if k in ("dram", "nvme")}
        if late["dram"] == 0.0 and not (tiers.has_nvme and late.get("nvme") == 0.0
                                        and tiers.dram_fill >= self.dram_pressure):
            action, why = Action.DRAM, "long gap, device under pressure"
        elif late.get("nvme") == 0.0:
            action, why = Action.NVME, "long gap, DRAM under pressure"
        else:
            best = min(late, key=late.get)
            if costs["drop"] < late[best]:
                return Decision(Action.DROP, gap_s, gap_source, reason="recompute is cheaper than a late restore",
                                costs=costs)
            action, why = Action(best), "restore will be late but beats recompute"
        restore = cost.restore_s(b, DRAM if action is Action.DRAM else NVME)
        start = max(0.0, gap_low_s - self.prefetch_safety * restore - cost.demote_s(b, DRAM if action is Action.DRAM else NVME))
        return Decision(action, gap_s, gap_source, prefetch_in_s=start, reason=why, costs=costs)

    def restore_budget(self, *, device_free: int, dram_evictable: int, restoring_dram: int,
                       restoring_nvme: int, staging_reserve: int = 0) -> int:
        """How many of a trace's blocks below the device a background restore may bring up
        (Note [A restore never drops]): the device's free blocks, plus the device blocks it may
        push down into DRAM room that can itself be made by demoting unpinned DRAM blocks (the
        restore pins its own DRAM blocks, and its NVMe blocks land in DRAM first)."""
        room_below = dram_evictable - restoring_dram - restoring_nvme - staging_reserve
        return max(0, device_free + max(0, room_below))

    def late_part(self, *, late_s: float, late_tokens: int, cost: CostModel) -> bool:
        """At resume, with the restore ``late_s`` from done: True to recompute the late tokens
        rather than wait (Note [Prefetch timing])."""
        return late_s > 0 and cost.recompute_s(late_tokens) < late_s


def _with(d: Decision, reason: str) -> Decision:
    return Decision(d.action, d.gap_s, d.gap_source, d.ttl_s, d.prefetch_in_s, reason, d.costs)
