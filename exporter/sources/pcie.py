"""PCIe arithmetic: link capacity from generation x width, and rates from wrapping byte counters."""
from __future__ import annotations

from dataclasses import dataclass

# Per-lane transfer rate (GT/s) and line-code efficiency per PCIe generation.
_GT_PER_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
_ENCODING = {1: 8 / 10, 2: 8 / 10, 3: 128 / 130, 4: 128 / 130, 5: 128 / 130, 6: 1.0}  # Gen6 FLIT ~ 1


def link_bytes_per_second(generation: int, width: int) -> float | None:
    """Usable bytes/s in one direction for a link, or None for an unknown generation/width."""
    if generation not in _GT_PER_S or width <= 0:
        return None
    return _GT_PER_S[generation] * 1e9 * width * _ENCODING[generation] / 8


@dataclass(frozen=True, slots=True)
class CounterReading:
    value: int  # cumulative bytes
    timestamp_us: int  # NVML's timestamp for the value, microseconds


def counter_rate(
    prev: CounterReading | None,
    cur: CounterReading,
    modulus: int,
    max_rate: float | None,
) -> float | None:
    """Bytes/s between two readings of a cumulative counter that wraps at `modulus`.

    A counter that goes down either wrapped (plausible only if the wrapped delta fits under max_rate)
    or was reset (driver reload); a reset yields no rate for that interval rather than a huge spike.
    """
    if prev is None:
        return None
    dt = (cur.timestamp_us - prev.timestamp_us) / 1e6
    if dt <= 0:
        return None
    delta = cur.value - prev.value
    if delta < 0:
        delta += modulus
        if max_rate is None or delta / dt > max_rate:
            return None
    return delta / dt
