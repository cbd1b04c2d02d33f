"""Cumulative histograms fed by the sampler and frozen into each snapshot.

prometheus_client's Histogram is a global, locked, mutable metric; here the sampler thread is the only
writer, so a plain list of counts is enough, and each tick freezes an immutable copy for the collector.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

# Each bucket is a series per GPU on every scrape (the series budget, docs/metrics.md), so a bound is
# kept only where a panel or rule reads it. Utilisation: the RTF checklist's "starved" line (0.4, the
# alerts and rules) and even steps for the dashboard's heatmap; no 1.0 bound, a ratio never exceeds it
# (le=1.0 would repeat +Inf).
RATIO_BUCKETS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
# PCIe utilisation: only the saturation line (the PCIe alert, recording rule and panel: share above 90 %).
PCIE_BUCKETS: tuple[float, ...] = (0.9,)
# Host CPU: only the diagnosis' "host busy" line (share of samples above 90 %, docs/diagnosis.md).
HOST_CPU_BUCKETS: tuple[float, ...] = (0.9,)
# Sampler self-timing, in seconds: sub-millisecond reads up to a hung call.
DURATION_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.025, 0.1)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Upper bounds (without +Inf), the count in each bucket (the last is +Inf), and the sum.

    Counts are stored per bucket, not cumulative: freezing is then one tuple copy per tick, and the
    cumulative form is only computed when a scrape asks for it.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # len(bounds) + 1
    sum: float

    @property
    def cumulative(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate(self.counts))

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """Single-writer histogram: observe() from the sampler thread, freeze() into a snapshot."""

    __slots__ = ("bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must be strictly increasing")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = less or equal).
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def freeze(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts), self._sum)
