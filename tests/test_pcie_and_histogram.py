from __future__ import annotations

import pytest

from tests.conftest import fraction_at_or_below

from exporter.pipeline.histogram import PCIE_BUCKETS, RATIO_BUCKETS, Histogram
from exporter.sources.pcie import CounterReading, counter_rate, link_bytes_per_second


@pytest.mark.parametrize("gen,width,expected_gbps", [(3, 16, 15.75), (4, 16, 31.5), (5, 16, 63.0), (1, 1, 0.25)])
def test_link_bandwidth(gen, width, expected_gbps):
    assert link_bytes_per_second(gen, width) / 1e9 == pytest.approx(expected_gbps, rel=0.01)


def test_link_bandwidth_unknown_generation():
    assert link_bytes_per_second(9, 16) is None
    assert link_bytes_per_second(4, 0) is None


def test_counter_rate_basic_and_first_reading():
    assert counter_rate(None, CounterReading(10, 0), 2**64, None) is None
    r = counter_rate(CounterReading(1_000, 1_000_000), CounterReading(3_001_000, 1_500_000), 2**64, None)
    assert r == pytest.approx(6_000_000.0)


def test_counter_rate_wrap_at_modulus():
    prev = CounterReading(2**64 - 1_000, 0)
    cur = CounterReading(4_000, 1_000_000)  # 5000 bytes in 1 s across the wrap
    assert counter_rate(prev, cur, 2**64, max_rate=1e9) == pytest.approx(5_000.0)
    prev32 = CounterReading(2**32 - 10, 0)
    assert counter_rate(prev32, CounterReading(90, 1_000_000), 2**32, max_rate=1e9) == pytest.approx(100.0)


def test_counter_reset_is_not_a_spike():
    # Driver reload: counter restarts near 0 from a mid-range value; the wrapped delta is implausible.
    prev = CounterReading(5 * 10**12, 0)
    assert counter_rate(prev, CounterReading(1_000, 1_000_000), 2**64, max_rate=64e9) is None
    assert counter_rate(prev, CounterReading(1_000, 1_000_000), 2**64, max_rate=None) is None


def test_counter_rate_needs_time_to_pass():
    assert counter_rate(CounterReading(1, 5), CounterReading(2, 5), 2**64, None) is None


def test_histogram_le_semantics_and_freeze():
    h = Histogram(RATIO_BUCKETS)
    for v in (0.0, 0.39, 0.4, 0.41, 0.9, 0.95, 1.0, 1.2):
        h.observe(v)
    s = h.freeze()
    assert s.count == 8
    assert fraction_at_or_below(s, 0.4) == 3 / 8  # 0.4 itself is in the le="0.4" bucket
    assert s.cumulative[RATIO_BUCKETS.index(0.8)] == 4
    assert s.cumulative[-1] == 8  # +Inf
    assert s.sum == pytest.approx(sum((0.0, 0.39, 0.4, 0.41, 0.9, 0.95, 1.0, 1.2)))
    h.observe(0.1)
    assert s.count == 8  # a frozen snapshot does not move


def test_histogram_rejects_unsorted_bounds():
    with pytest.raises(ValueError):
        Histogram((0.5, 0.4))


def test_ratio_buckets_hold_the_bounds_panels_and_rules_read():
    assert 0.4 in RATIO_BUCKETS  # utilisation: share of time starved (alerts, recording rules, dashboard)
    assert PCIE_BUCKETS == (0.9,)  # PCIe: share of time saturated (alert, recording rule, dashboard)
