"""Who gets a place at the connection cap: the HTTP server's admission policy, apart from its sockets.

Pure: no sockets, no timers, no clock of its own (one is injected). The server (httpd.py) asks it
"may I admit this one?" (admit), "has this newcomer on probation earned a place?" (settle), "may this
reserved connection's request have a full place?" (promote), "whose stalled answer goes?" (over_budget,
oldest_stalled), tells it when a connection is gone (forget), and carries out its verdicts: it closes the
victims and starts, parks or refuses the newcomer. What the policy knows of a connection is `Conn`.

The rules, each the fix for a way a burst of hostile connects cut a real scraper (git log of httpd.py):
- below `max_connections` everyone gets a place;
- at the cap a newcomer replaces, oldest first within each rank: one closing politely; one idle between
  requests, or waiting out the delay of a refusal (429, 401: else a flood over its rate limit, pipelining,
  held every place), or silent (nothing received) past `silent_grace_s`; one trickling its head, or handshaking TLS
  past the same grace (a client one round trip from its request is as good as silent); one whose client
  does not read its answer; and, only for a newcomer that has spoken (its bytes wait unread), one silent
  within its grace: a request outranks silence, and between two silent ones the first keeps its place;
- a fresh connection whose bytes already wait in its socket is about to be served, never a victim;
- a silent newcomer nothing can make room for waits up to `probation_s` for its first bytes (at most
  `max_connections` of them), then is placed as a speaker or as silent;
- past that, up to `reserve_connections` reserved places that serve only the priority paths (/healthz);
  a full reserve gives up one of its own that is silent past its grace or trickles; else refused;
- a reserved connection whose request is for another path gets a full place if one is free or can be made
  for a speaker (its silence was only its request not having arrived);
- bodies held for clients that do not read stay under `max_stalled_bytes` (distinct bodies, a shared one
  counts once): past it the oldest such client goes.
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar


class ConnState(enum.Enum):
    NEW = "new"  # accepted, not yet placed (on probation, or being admitted)
    HANDSHAKE = "handshake"  # TLS handshake in progress
    IDLE = "idle"  # waiting for a request
    HEAD = "head"  # receiving a request head
    BUSY = "busy"  # being answered
    REFUSING = "refusing"  # waiting out the delay before a refusal (429, 401): evictable, like idle
    LINGER = "linger"  # closing politely


_SINCE = operator.attrgetter("since")
_LINGER, _IDLE, _HEAD, _HANDSHAKE = ConnState.LINGER, ConnState.IDLE, ConnState.HEAD, ConnState.HANDSHAKE
_REFUSING = ConnState.REFUSING
# a connection that has sent nothing is idle (plain) or handshaking (TLS); tested with `is`: an enum's
# hash is a Python call, and the ranking runs over every place per newcomer at the cap


class Conn(Protocol):
    """What the policy needs to know about a connection; the socket code provides it."""

    @property
    def state(self) -> ConnState: ...

    @property
    def since(self) -> float:
        """Clock time it entered its state (its last progress; for a fresh one, when it was started)."""

    @property
    def fresh(self) -> bool:
        """Nothing received from it yet."""

    @property
    def closed(self) -> bool: ...

    @property
    def stalled(self) -> bool:
        """Being answered, but its client does not read the answer."""

    @property
    def sending(self) -> bytes | None:
        """The response body being written to it, if any."""

    def unread(self) -> bool:
        """Bytes from it wait in its socket, not yet read (a syscall: asked only at the cap)."""


class AdmissionLimits(Protocol):
    """The fields of httpd.Limits the policy reads."""

    @property
    def max_connections(self) -> int: ...

    @property
    def reserve_connections(self) -> int: ...

    @property
    def silent_grace_s(self) -> float: ...

    @property
    def probation_s(self) -> float: ...

    @property
    def max_stalled_bytes(self) -> int: ...


C = TypeVar("C", bound=Conn)


class Place(enum.Enum):
    IN = "in"  # a full place: serve it
    WAIT = "wait"  # on probation: settle() decides when its first bytes come or probation_s is up
    RESERVE = "reserve"  # a reserved place: priority paths only (promote() for others)
    OUT = "out"  # refused


@dataclass(frozen=True)
class Verdict(Generic[C]):
    place: Place
    evict: C | None = None  # the connection to cut first (already out of the policy's places)


class Admission(Generic[C]):
    """The places: `placed` (full, insertion-ordered), `reserve` and `waiting` (on probation)."""

    def __init__(self, limits: AdmissionLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self.placed: dict[C, None] = {}
        self.reserve: dict[C, None] = {}
        self.waiting: dict[C, None] = {}

    @property
    def open(self) -> int:
        """Open connections, the reserve and those on probation included."""
        return len(self.placed) + len(self.reserve) + len(self.waiting)

    def admit(self, conn: C) -> Verdict[C]:
        """A new connection's place."""
        return self._place(conn, spoken=None, may_wait=True)

    def settle(self, conn: C, spoken: bool) -> Verdict[C] | None:
        """The end of a newcomer's probation: its first bytes arrived (spoken) or its time is up. None when
        it was not on probation (settled already)."""
        if conn not in self.waiting:
            return None
        del self.waiting[conn]
        return self._place(conn, spoken=spoken or None, may_wait=False)

    def promote(self, conn: C) -> Verdict[C] | None:
        """A reserved connection whose request is not for a priority path: a full place (IN, perhaps
        evicting one) if one is free or can be made for a speaker, else None (it stays reserved)."""
        victim = None
        if len(self.placed) >= self.limits.max_connections:  # else a place freed while it waited
            victim = self._evictable(self.placed, spoken=True)
            if victim is None:
                return None
            self.forget(victim)
        self.reserve.pop(conn, None)
        self.placed[conn] = None
        return Verdict(Place.IN, victim)

    def forget(self, conn: C) -> None:
        """It is gone (or about to be): its place is free."""
        self.placed.pop(conn, None)
        self.reserve.pop(conn, None)
        self.waiting.pop(conn, None)

    def over_budget(self) -> list[C]:
        """Clients that do not read, oldest first, to cut so the distinct bodies held for the rest stay
        under `max_stalled_bytes` (empty when they do)."""
        stalled = sorted((c for c in self.placed if c.stalled and not c.closed and c.sending is not None),
                         key=lambda c: c.since)
        sharers: dict[int, int] = {}
        held = 0
        for c in stalled:
            body = c.sending
            assert body is not None  # filtered above
            if sharers.get(id(body), 0) == 0:
                held += len(body)
            sharers[id(body)] = sharers.get(id(body), 0) + 1
        cut: list[C] = []
        for c in stalled:
            if held <= self.limits.max_stalled_bytes:
                break
            cut.append(c)
            body = c.sending
            assert body is not None
            sharers[id(body)] -= 1
            if sharers[id(body)] == 0:
                held -= len(body)
        return cut

    def oldest_stalled(self, besides: C) -> C | None:
        """At the request cap: the oldest request whose client does not read its answer gives its slot up."""
        stalled = [c for c in self.placed if c.stalled and c is not besides]
        return min(stalled, key=lambda c: c.since) if stalled else None

    # -- the rules
    def _place(self, conn: C, spoken: bool | None, may_wait: bool) -> Verdict[C]:
        """spoken: True when its bytes have arrived, None when not known yet (asked of the connection only
        at the cap: a syscall)."""
        limits = self.limits
        if len(self.placed) < limits.max_connections:
            self.placed[conn] = None
            return Verdict(Place.IN)
        speaker = bool(spoken) or conn.unread()
        if (victim := self._evictable(self.placed, speaker)) is not None:
            self.forget(victim)
            self.placed[conn] = None
            return Verdict(Place.IN, victim)
        if may_wait and not speaker and len(self.waiting) < limits.max_connections:
            # Silent, but perhaps only because its request is still on its way (accepted in the moment of
            # a burst of attackers' connects): it waits a moment for its first bytes, which outrank silence.
            self.waiting[conn] = None
            return Verdict(Place.WAIT)
        if len(self.reserve) < limits.reserve_connections or (
                limits.reserve_connections and (victim := self._evictable(self.reserve, spoken=False))):
            # Nothing could make room: a reserved place, for probes (a request may still find room when it
            # arrives, see promote). A full reserve gives up one that sent nothing past its grace or trickles.
            if victim is not None:
                self.forget(victim)
            self.reserve[conn] = None
            return Verdict(Place.RESERVE, victim)
        return Verdict(Place.OUT)

    def _evictable(self, pool: dict[C, None], spoken: bool) -> C | None:
        """Whom a newcomer replaces, oldest first within each rank (see the module docstring)."""
        young = self.clock() - self.limits.silent_grace_s
        ranks: tuple[list[C], ...] = ([], [], [], [], [])
        linger, idle, head, handshake = _LINGER, _IDLE, _HEAD, _HANDSHAKE
        for c in pool:  # one pass, each connection in the first rank it meets
            state = c.state
            if c.fresh:  # nothing received: a victim only while silent (see _qualifies)
                if state is idle or state is handshake:
                    if c.since <= young:
                        ranks[1].append(c)
                    elif spoken:  # a request outranks silence within its grace; silence does not
                        ranks[4].append(c)
                elif state is linger:
                    ranks[0].append(c)
            elif state is idle or state is _REFUSING:  # a client being refused has no claim to its place
                ranks[1].append(c)
            elif state is head or state is handshake and (spoken or c.since <= young):
                # a handshake begun within the grace may be a client one round trip from its request (a
                # scraper awaiting the server's hello): like silence, only a request outranks it
                ranks[2].append(c)
            elif state is linger:
                ranks[0].append(c)
            elif c.stalled:
                ranks[3].append(c)
        since = _SINCE
        for rank in ranks:
            if not rank:
                continue
            # A fresh one whose bytes wait unread is about to be served, not silent: skipped. Asked (a
            # syscall) in age order only until one qualifies, so a flood of newcomers costs one or two each;
            # the oldest usually qualifies, so the rank is sorted only when it does not.
            oldest = min(rank, key=since)
            if _qualifies(oldest):
                return oldest
            for c in sorted(rank, key=since):
                if c is not oldest and _qualifies(c):
                    return c
        return None


def _qualifies(c: Conn) -> bool:
    """Not a fresh connection whose bytes wait in its socket (asked last: a syscall)."""
    return not c.fresh or (c.state is _IDLE or c.state is _HANDSHAKE) and not c.unread()
