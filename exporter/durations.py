"""Durations as users write them in flags and query strings: Prometheus/Go forms such as 200ms, 0.5s,
1m30s, 500us, 1d, 1h2m3s4ms.

The text may come from an unauthenticated query string, so the parser is one left-to-right pass over at
most MAX_CHARS characters (a regex with nested repetition backtracked quadratically here: ~15 000 digits
held the GIL for seconds).
"""
from __future__ import annotations

MAX_CHARS = 64
# Go's and Prometheus's limit (int64 nanoseconds, ~292 years); anything longer is a typo, not a window.
MAX_SECONDS = (2**63 - 1) / 1e9

# Largest first: a duration lists each unit at most once, in this order (as Prometheus requires).
_UNITS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("y",), 365 * 86400.0),
    (("w",), 7 * 86400.0),
    (("d",), 86400.0),
    (("h",), 3600.0),
    (("m",), 60.0),
    (("s",), 1.0),
    (("ms",), 1e-3),
    (("us", "\u00b5s", "\u03bcs"), 1e-6),  # us, µs (micro sign), μs (Greek mu), as Go accepts
    (("ns",), 1e-9),
)
_RANK = {name: (rank, scale) for rank, (names, scale) in enumerate(_UNITS) for name in names}
_NUMBER_CHARS = frozenset("0123456789.")
_EXAMPLES = "e.g. 200ms, 0.5s, 1m30s"


def parse_duration(text: str) -> float:
    """'200ms', '0.5s', '1m30s', '1h2m3s4ms', '1d' or '0' -> seconds. ValueError says what is wrong."""
    if len(text) > MAX_CHARS:
        raise ValueError(f"invalid duration: longer than {MAX_CHARS} characters")
    s = text.strip()
    if s.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    if s == "0":  # the one number that needs no unit (Go and Prometheus agree)
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}: empty; want {_EXAMPLES}")
    total = 0.0
    last_rank = -1
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] in _NUMBER_CHARS:
            j += 1
        k = j
        while k < len(s) and s[k] not in _NUMBER_CHARS:
            k += 1
        number, unit = s[i:j], s[j:k]
        if not number or number == "." or number.count(".") > 1:
            raise ValueError(f"invalid duration {text!r}: want {_EXAMPLES}")
        if not unit:
            raise ValueError(f"invalid duration {text!r}: missing unit (ms, s, m, h, d, ...), {_EXAMPLES}")
        if unit not in _RANK:
            raise ValueError(f"invalid duration {text!r}: unknown unit {unit!r}; "
                             "want ns, us, ms, s, m, h, d, w or y")
        rank, scale = _RANK[unit]
        if rank <= last_rank:
            raise ValueError(f"invalid duration {text!r}: units must go from largest to smallest, each once")
        last_rank = rank
        total += float(number) * scale
        i = k
    if total > MAX_SECONDS:
        raise ValueError(f"invalid duration {text!r}: longer than 292 years")
    return total
