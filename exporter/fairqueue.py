"""A bounded queue served round-robin across keys, for work that clients can flood (bcrypt checks).

One queue per key (the server uses peer address and user name); `pop` takes from each non-empty key in
turn, so a client that queues a hundred guesses delays a newcomer by at most one check per other key,
not by a hundred. When the queue is full a newcomer still gets in if its key is shorter than the
longest one, which gives up its newest entry instead: a flood only ever pushes itself out.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, Hashable, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._queues: OrderedDict[Hashable, deque[T]] = OrderedDict()  # next key to serve first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, key: Hashable, item: T) -> T | None:
        """Queue item; returns the item that lost its place (item itself, or the newest of the longest
        key's), or None when nothing had to go."""
        dropped = None
        if self._size >= self.capacity:
            longest = max(self._queues, key=lambda k: len(self._queues[k]))
            mine = len(self._queues.get(key, ()))
            if len(self._queues[longest]) <= mine + 1:
                return item  # already among the heaviest: the newcomer is the one refused
            dropped = self._remove_newest(longest)
        self._queues.setdefault(key, deque()).append(item)
        self._size += 1
        return dropped

    def pop(self) -> T | None:
        """The next item round-robin across keys, None when empty."""
        if not self._queues:
            return None
        key, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._queues.move_to_end(key)  # its next item waits for every other key's
        else:
            del self._queues[key]
        return item

    def _remove_newest(self, key: Hashable) -> T:
        queue = self._queues[key]
        item = queue.pop()
        self._size -= 1
        if not queue:
            del self._queues[key]
        return item
