"""The web config's `rate_limit` (exporter-toolkit): token buckets, 429 beyond them.

    rate_limit:
      interval: 1s    # one more request allowed per interval; 0 or absent: no limit
      burst: 10       # requests allowed at once (the bucket's size); 0 with an interval: none at all

Same semantics as Go's golang.org/x/time/rate.Limiter(rate.Every(interval), burst) that exporter-toolkit
uses: a bucket starts full and refills continuously. Where we differ, on purpose:
- /healthz is not counted or refused (config.py's exempt paths): a kubelet probe must not fail because
  scrapes used up the budget;
- exporter-toolkit keeps one bucket for every request, charged before authentication, so anyone who can
  reach the port spends the scraper's budget (an unauthenticated flood: the valid scraper got 429 6/6).
  Here each verified basic-auth user has a bucket of its own, and every other request is charged to its
  client address's bucket (`KeyedBuckets`): a flood spends only its own. The total allowed is then the
  limit per user and per address, not overall.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

from exporter.durations import parse_duration

SECTION = "rate_limit"


@dataclass(frozen=True)
class RateLimit:
    interval_s: float
    burst: int


def parse_rate_limit(doc: dict) -> RateLimit | None:
    """The section as a mapping -> settings, or None for no limit. Raises ValueError (one line)."""
    for key in doc:
        if key not in ("interval", "burst"):
            raise ValueError(f"{SECTION}: unknown key {key!r}")
    burst = doc.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise ValueError(f"{SECTION}.burst: want a whole number >= 0, got {burst!r}")
    interval = doc.get("interval", 0)
    if interval == 0 and not isinstance(interval, bool):  # YAML 0 (Go reads a bare number as nanoseconds)
        return None
    if not isinstance(interval, str) or len(interval) > 64:
        raise ValueError(f"{SECTION}.interval: want a duration with a unit, e.g. 1s or 100ms")
    try:
        seconds = parse_duration(interval)
    except ValueError as exc:
        raise ValueError(f"{SECTION}.interval: {exc}") from None
    if seconds < 0:
        raise ValueError(f"{SECTION}.interval: want a duration >= 0")
    return RateLimit(seconds, burst) if seconds > 0 else None


class TokenBucket:
    """`burst` tokens, one more every `interval_s`; `allow()` takes one if there is one. Thread-safe."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._last = clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.limit.burst), self._tokens + (now - self._last) / self.limit.interval_s)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class KeyedBuckets:
    """One TokenBucket per key (a verified user, a client address), at most `keys` of them: the least
    recently used goes first (a key seen again starts full, so cycling through more than `keys` addresses
    buys their burst again: bounded memory over exactness)."""

    def __init__(self, limit: RateLimit, keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._keys = keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> bool:
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.limit, self._clock)
                if len(self._buckets) > self._keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
        return bucket.allow()
