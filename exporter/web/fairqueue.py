"""A bounded queue served by tier, then round-robin across keys, for work that clients can flood (bcrypt).

The server keys it by client address and ranks each item into a tier (config.BasicAuth.rank: an
address that has logged in before, then any other). `pop` serves the best non-empty tier, taking from
each of its keys in turn, so a client that queues a hundred guesses delays a newcomer of its tier by at
most one check per other key, not by a hundred, and never one of a better tier by more than the check
already running.

Bounds: `per_key` items per key and tier (a key at it has its newcomer refused) and `capacity` in all.
When full, a newcomer still gets in if a worse tier holds anything, or if its key is shorter than the
longest of its own tier; the longest key of the worst tier gives up its newest entry instead: a flood
only ever pushes itself out.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, Hashable, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, capacity: int, per_key: int | None = None) -> None:
        if capacity < 1 or per_key is not None and per_key < 1:
            raise ValueError("capacity and per_key must be at least 1")
        self.capacity = capacity
        self.per_key = per_key
        self._tiers: dict[int, OrderedDict[Hashable, deque[T]]] = {}  # per tier: next key to serve first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, key: Hashable, item: T, tier: int = 0) -> T | None:
        """Queue item (lower tiers are served first); returns the item that lost its place (item itself,
        or the newest of the worst tier's longest key), or None when nothing had to go."""
        queue = self._tiers[tier].get(key) if tier in self._tiers else None
        mine = len(queue) if queue is not None else 0
        if self.per_key is not None and mine >= self.per_key:
            return item
        dropped = None
        if self._size >= self.capacity:
            worst = max(self._tiers)
            queues = self._tiers[worst]
            longest = max(queues, key=lambda k: len(queues[k]))
            if worst < tier or worst == tier and len(queues[longest]) <= mine + 1:
                return item  # nothing worse waits: the newcomer is the one refused
            dropped = self._remove_newest(worst, longest)
        self._tiers.setdefault(tier, OrderedDict()).setdefault(key, deque()).append(item)
        self._size += 1
        return dropped

    def pop(self) -> T | None:
        """The next item: the best tier's, round-robin across its keys; None when empty."""
        if not self._tiers:
            return None
        tier = min(self._tiers)
        queues = self._tiers[tier]
        key, queue = next(iter(queues.items()))
        item = queue.popleft()
        self._size -= 1
        if queue:
            queues.move_to_end(key)  # its next item waits for every other key's
        else:
            self._drop_key(tier, key)
        return item

    def _remove_newest(self, tier: int, key: Hashable) -> T:
        queue = self._tiers[tier][key]
        item = queue.pop()
        self._size -= 1
        if not queue:
            self._drop_key(tier, key)
        return item

    def _drop_key(self, tier: int, key: Hashable) -> None:
        del self._tiers[tier][key]
        if not self._tiers[tier]:
            del self._tiers[tier]
