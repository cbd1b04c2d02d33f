"""The admission policy (exporter/web/admission.py) without sockets or sleeps: fake connections, a fake clock.

Each eviction edge case the server once got wrong (git log -- exporter/web/httpd.py) is a named test here;
tests/test_httpd.py still checks the same rules end to end over real sockets."""
from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import given, settings, strategies as st

from exporter.web.admission import Admission, ConnState, Place, Verdict
from exporter.web.httpd import Limits

S = ConnState
GRACE = Limits().silent_grace_s  # 250 ms
SILENT_STATES = (S.IDLE, S.HANDSHAKE)  # where a connection that has sent nothing can be


@dataclass(eq=False)  # identity: a connection is a key in the policy's places
class FakeConn:
    name: str = "c"
    state: ConnState = S.NEW
    since: float = 0.0
    fresh: bool = True
    closed: bool = False
    stalled: bool = False
    sending: bytes | None = None
    waiting_bytes: bool = False  # what FIONREAD would say
    asked: int = 0  # how often the policy asked (a syscall in the server)

    def unread(self) -> bool:
        self.asked += 1
        return self.waiting_bytes

    def __repr__(self) -> str:
        return self.name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(**limits) -> tuple[Admission[FakeConn], Clock]:
    clock = Clock()
    return Admission(Limits(**limits), clock=clock), clock


def start(p: Admission[FakeConn], name: str, state: ConnState = S.IDLE, **attrs) -> FakeConn:
    """Admitted below the cap, then started as the server does (its state begins now)."""
    conn = FakeConn(name)
    assert p.admit(conn) == Verdict(Place.IN)
    conn.state, conn.since = state, p.clock()
    for key, value in attrs.items():
        setattr(conn, key, value)
    return conn


def newcomer(name: str = "new", spoken: bool = False) -> FakeConn:
    return FakeConn(name, waiting_bytes=spoken)


# -- below the cap, and the order of victims at it

def test_below_the_cap_everyone_gets_a_place_and_no_socket_is_asked():
    p, _ = policy(max_connections=3)
    conns = [start(p, f"c{i}") for i in range(3)]
    assert list(p.placed) == conns and p.open == 3
    assert all(c.asked == 0 for c in conns)  # FIONREAD only at the cap


def test_at_the_cap_victims_go_by_rank_linger_idle_trickling_stalled():
    p, clock = policy(max_connections=4, reserve_connections=0)
    stalled = start(p, "stalled", S.BUSY, fresh=False, stalled=True)
    head = start(p, "head", S.HEAD, fresh=False)
    idle = start(p, "idle", S.IDLE, fresh=False)  # served a request, waits for the next
    linger = start(p, "linger", S.LINGER, fresh=False)
    clock.now += 0.01
    evicted = []
    for i in range(4):
        verdict = p.admit(newcomer(f"n{i}"))
        assert verdict.place is Place.IN
        evicted.append(verdict.evict)
        # the newcomers start busy (answered): never victims themselves
        list(p.placed)[-1].state, list(p.placed)[-1].fresh = S.BUSY, False
    assert evicted == [linger, idle, head, stalled]


def test_within_a_rank_the_oldest_goes_and_equal_ages_go_in_order_of_arrival():
    p, _ = policy(max_connections=3, reserve_connections=0)
    a, b, c = (start(p, name, S.HEAD, fresh=False) for name in "abc")  # one clock reading
    c.since -= 5  # c has made no progress for longest
    order = [p.admit(newcomer(f"n{i}", spoken=True)).evict for i in range(3)]
    assert order == [c, a, b]


def test_a_busy_connection_whose_client_reads_is_never_evicted():
    p, _ = policy(max_connections=1, reserve_connections=0, probation_s=0.05)
    start(p, "busy", S.BUSY, fresh=False)
    assert p.admit(newcomer(spoken=True)) == Verdict(Place.OUT)


def test_a_connection_waiting_out_a_refusal_goes_like_an_idle_one():
    """A client over its rate limit (or with bad credentials) waits before its 429 (401): it has no claim
    to its place, or a pipelining flood would hold every one."""
    p, _ = policy(max_connections=2, reserve_connections=0)
    busy = start(p, "busy", S.BUSY, fresh=False)
    refused = start(p, "refused", S.REFUSING, fresh=False)
    new = newcomer(spoken=True)
    assert p.admit(new) == Verdict(Place.IN, refused)
    assert list(p.placed) == [busy, new]


# -- silent grace (250 ms): a burst of silent connects cannot cut a client whose request is on its way

def test_a_silent_newcomer_cannot_evict_a_silent_connection_within_its_grace():
    p, clock = policy(max_connections=1, reserve_connections=0)
    scraper = start(p, "scraper")  # connected, its request not sent yet
    clock.now += GRACE * 0.99
    verdict = p.admit(newcomer())
    assert verdict.place is Place.WAIT and verdict.evict is None and scraper in p.placed


def test_a_silent_connection_past_its_grace_counts_as_idle():
    p, clock = policy(max_connections=1, reserve_connections=0)
    silent = start(p, "silent")
    clock.now += GRACE
    assert p.admit(newcomer()) == Verdict(Place.IN, silent)


def test_a_newcomer_whose_request_has_arrived_may_evict_a_silent_one_within_its_grace():
    p, _ = policy(max_connections=1, reserve_connections=0)
    silent = start(p, "silent")
    assert p.admit(newcomer(spoken=True)) == Verdict(Place.IN, silent)


def test_a_fresh_connection_whose_bytes_wait_unread_is_never_a_victim():
    p, clock = policy(max_connections=2, reserve_connections=0)
    about_to_speak = start(p, "about_to_speak", waiting_bytes=True)
    clock.now += 0.01
    later = start(p, "later")
    clock.now += GRACE * 2  # both silent past their grace, as far as the loop knows
    assert p.admit(newcomer()) == Verdict(Place.IN, later)
    assert about_to_speak in p.placed


def test_fionread_is_asked_in_age_order_only_until_a_victim_qualifies():
    p, clock = policy(max_connections=100, reserve_connections=0)
    conns = []
    for i in range(100):
        conns.append(start(p, f"c{i}"))
        clock.now += 0.001
    clock.now += GRACE
    conns[0].waiting_bytes = True
    new = newcomer()
    assert p.admit(new) == Verdict(Place.IN, conns[1])
    assert new.asked == 1 and conns[0].asked == 1 and conns[1].asked == 1
    assert sum(c.asked for c in conns[2:]) == 0


# -- probation (50 ms): a silent newcomer at a full server waits for its first bytes

def test_a_silent_newcomer_at_a_full_server_waits_on_probation_and_counts_as_open():
    p, _ = policy(max_connections=2, reserve_connections=0)
    fillers = [start(p, f"f{i}") for i in range(2)]
    late = newcomer("late")
    assert p.admit(late) == Verdict(Place.WAIT)
    assert late in p.waiting and p.open == 3 and all(f in p.placed for f in fillers)


def test_a_newcomer_on_probation_whose_request_arrives_takes_a_silent_ones_place():
    p, _ = policy(max_connections=2, reserve_connections=0)
    fillers = [start(p, f"f{i}") for i in range(2)]
    late = newcomer("late")
    p.admit(late)
    assert p.settle(late, spoken=True) == Verdict(Place.IN, fillers[0])
    assert late.asked == 1  # asked once at admission; its spoken bytes need no second syscall
    assert list(p.placed) == [fillers[1], late] and not p.waiting


def test_a_silent_newcomer_is_refused_when_its_probation_ends():
    p, _ = policy(max_connections=1, reserve_connections=0)
    filler = start(p, "filler")
    late = newcomer("late")
    p.admit(late)
    assert p.settle(late, spoken=False) == Verdict(Place.OUT)
    assert list(p.placed) == [filler] and p.open == 1


def test_a_newcomer_whose_bytes_arrived_unread_during_probation_counts_as_spoken():
    p, _ = policy(max_connections=1, reserve_connections=0)
    filler = start(p, "filler")
    late = newcomer("late")
    p.admit(late)
    late.waiting_bytes = True  # the timer fired before the loop read them
    assert p.settle(late, spoken=False) == Verdict(Place.IN, filler)


def test_probation_is_bounded_to_max_connections_newcomers():
    p, _ = policy(max_connections=2, reserve_connections=0)
    for i in range(2):
        start(p, f"f{i}")
    assert [p.admit(newcomer(f"w{i}")).place for i in range(3)] == [Place.WAIT, Place.WAIT, Place.OUT]
    assert p.open == 4


def test_settle_of_a_connection_no_longer_on_probation_is_none():
    p, _ = policy(max_connections=1, reserve_connections=0)
    start(p, "filler")
    late = newcomer("late")
    p.admit(late)
    p.forget(late)  # it went away while it waited
    assert p.settle(late, spoken=True) is None and p.open == 1


# -- the reserve (16 places past the cap, for /healthz)

def test_past_probation_a_newcomer_nothing_can_make_room_for_gets_one_of_16_reserved_places():
    p, _ = policy(max_connections=2)
    assert p.limits.reserve_connections == 16
    for i in range(2):
        start(p, f"busy{i}", S.BUSY, fresh=False)
    places = []
    for i in range(17):
        conn = newcomer(f"n{i}")
        assert p.admit(conn).place is Place.WAIT
        places.append(p.settle(conn, spoken=False))
    assert places == [Verdict(Place.RESERVE)] * 16 + [Verdict(Place.OUT)]
    assert len(p.reserve) == 16 and p.open == 18


def test_a_silent_newcomer_at_a_full_probation_goes_straight_to_the_reserve():
    p, _ = policy(max_connections=1, reserve_connections=1)
    start(p, "busy", S.BUSY, fresh=False)
    assert p.admit(newcomer("w")).place is Place.WAIT
    assert p.admit(newcomer("r")) == Verdict(Place.RESERVE)


def test_a_full_reserve_gives_up_a_trickling_connection_for_a_newcomer():
    p, clock = policy(max_connections=1, reserve_connections=1)
    start(p, "filler")  # silent, in its grace
    trickler = newcomer("trickler")
    p.admit(trickler)
    assert p.settle(trickler, spoken=False) == Verdict(Place.RESERVE)
    trickler.state, trickler.since, trickler.fresh = S.HEAD, clock(), False
    late = newcomer("late")
    p.admit(late)
    assert p.settle(late, spoken=False) == Verdict(Place.RESERVE, trickler)
    assert list(p.reserve) == [late]


def test_a_full_reserve_keeps_a_silent_one_within_its_grace_and_gives_it_up_past_it():
    p, clock = policy(max_connections=1, reserve_connections=1)
    start(p, "filler")
    first = newcomer("first")
    p.admit(first)
    p.settle(first, spoken=False)
    first.state, first.since = S.IDLE, clock()
    second = newcomer("second")
    p.admit(second)
    assert p.settle(second, spoken=False) == Verdict(Place.OUT)
    clock.now += GRACE
    third = newcomer("third")
    assert p.admit(third).place is Place.IN  # the filler is past its grace too: it goes for the full place
    third.state, third.since = S.IDLE, clock()
    fourth = newcomer("fourth")
    assert p.admit(fourth).place is Place.WAIT  # third holds the full place, in its grace
    assert p.settle(fourth, spoken=False) == Verdict(Place.RESERVE, first)


def test_no_reserve_means_refusal_not_eviction_from_an_empty_reserve():
    p, _ = policy(max_connections=1, reserve_connections=0)
    start(p, "busy", S.BUSY, fresh=False)
    late = newcomer()
    p.admit(late)
    assert p.settle(late, spoken=False) == Verdict(Place.OUT) and not p.reserve


# -- a reserved connection's request for another path (promotion)

def test_a_reserved_connection_whose_request_arrives_takes_a_silent_ones_place():
    p, _ = policy(max_connections=2, reserve_connections=1)
    fillers = [start(p, f"f{i}") for i in range(2)]  # silent, in their grace
    late = newcomer("late")
    p.admit(late)
    p.settle(late, spoken=False)
    assert late in p.reserve
    assert p.promote(late) == Verdict(Place.IN, fillers[0])
    assert list(p.placed) == [fillers[1], late] and not p.reserve


def test_a_reserved_connection_takes_a_place_freed_while_it_waited_without_evicting():
    p, _ = policy(max_connections=2, reserve_connections=1)
    busy = [start(p, f"b{i}", S.BUSY, fresh=False) for i in range(2)]
    late = newcomer("late")
    p.admit(late)
    p.settle(late, spoken=False)
    for b in busy:
        p.forget(b)  # answered and closed
    start(p, "other", S.BUSY, fresh=False)  # one place taken again, one still free
    assert p.promote(late) == Verdict(Place.IN) and late in p.placed and p.open == 2


def test_a_reserved_connection_stays_reserved_when_every_place_is_busy():
    p, _ = policy(max_connections=1, reserve_connections=1)
    start(p, "busy", S.BUSY, fresh=False)
    late = newcomer("late")
    p.admit(late)
    p.settle(late, spoken=False)
    assert p.promote(late) is None and late in p.reserve


# -- a TLS handshake begun within the grace (the client one round trip from its request)

def test_a_burst_of_silent_connects_does_not_evict_a_tls_client_in_the_middle_of_its_handshake():
    p, clock = policy(max_connections=2, reserve_connections=0)
    scraper = start(p, "scraper", S.HANDSHAKE, fresh=False)  # its ClientHello was read
    start(p, "filler", S.HANDSHAKE)
    clock.now += GRACE * 0.99
    assert p.admit(newcomer()).place is Place.WAIT and scraper in p.placed


def test_a_handshake_within_its_grace_gives_way_to_a_newcomer_that_has_spoken():
    p, _ = policy(max_connections=1, reserve_connections=0)
    tls = start(p, "tls", S.HANDSHAKE, fresh=False)
    assert p.admit(newcomer(spoken=True)) == Verdict(Place.IN, tls)


def test_a_handshake_past_its_grace_goes_like_a_trickler():
    p, clock = policy(max_connections=2, reserve_connections=0)
    tls = start(p, "tls", S.HANDSHAKE, fresh=False)
    busy = start(p, "busy", S.BUSY, fresh=False, stalled=True)
    clock.now += GRACE
    assert p.admit(newcomer()) == Verdict(Place.IN, tls) and busy in p.placed


def test_a_silent_tls_connection_past_its_grace_goes_before_one_whose_hello_arrived():
    p, clock = policy(max_connections=2, reserve_connections=0)
    hello = start(p, "hello", S.HANDSHAKE, fresh=False)
    silent = start(p, "silent", S.HANDSHAKE)
    clock.now += GRACE
    assert p.admit(newcomer()).evict is silent and hello in p.placed


# -- clients that do not read their answers

def test_bodies_held_for_non_readers_stay_under_32_mib_oldest_cut_first():
    p, clock = policy(max_connections=10)
    assert p.limits.max_stalled_bytes == 32 * 1024 * 1024
    bodies = [bytes(9 * 1024 * 1024) for _ in range(5)]  # 45 MiB distinct
    conns = []
    for i, body in enumerate(bodies):
        conns.append(start(p, f"s{i}", S.BUSY, fresh=False, stalled=True, sending=body))
        clock.now += 1
    conns[0].since, conns[1].since = conns[1].since, conns[0].since  # s1 stalled longest
    assert p.over_budget() == [conns[1], conns[0]]  # 45 -> 36 -> 27 MiB


def test_a_body_shared_by_many_non_readers_counts_once():
    p, _ = policy(max_connections=50)
    shared = bytes(9 * 1024 * 1024)
    for i in range(40):
        start(p, f"s{i}", S.BUSY, fresh=False, stalled=True, sending=shared)
    assert p.over_budget() == []


def test_cutting_one_sharer_of_a_body_frees_nothing_so_the_next_goes_too():
    p, clock = policy(max_connections=10, max_stalled_bytes=100)
    a, b = bytes(60), bytes(60)
    first = start(p, "first", S.BUSY, fresh=False, stalled=True, sending=a)
    clock.now += 1
    second = start(p, "second", S.BUSY, fresh=False, stalled=True, sending=a)
    clock.now += 1
    start(p, "third", S.BUSY, fresh=False, stalled=True, sending=b)
    assert p.over_budget() == [first, second]


def test_non_readers_already_closed_or_readers_do_not_count():
    p, _ = policy(max_connections=10, max_stalled_bytes=100)
    start(p, "closed", S.BUSY, fresh=False, stalled=True, sending=bytes(200), closed=True)
    start(p, "reader", S.BUSY, fresh=False, stalled=False, sending=bytes(200))
    start(p, "between", S.BUSY, fresh=False, stalled=True, sending=None)
    assert p.over_budget() == []


def test_at_the_request_cap_the_oldest_non_reader_besides_the_asker_gives_its_slot_up():
    p, clock = policy(max_connections=10)
    older = start(p, "older", S.BUSY, fresh=False, stalled=True)
    clock.now += 1
    newer = start(p, "newer", S.BUSY, fresh=False, stalled=True)
    start(p, "reader", S.BUSY, fresh=False)
    assert p.oldest_stalled(besides=newer) is older
    assert p.oldest_stalled(besides=older) is newer
    p.forget(older)
    assert p.oldest_stalled(besides=newer) is None


def test_forget_frees_any_place_and_open_counts_all_three():
    p, _ = policy(max_connections=1, reserve_connections=1)
    busy = start(p, "busy", S.BUSY, fresh=False)
    waiting, reserved = newcomer("w"), newcomer("r")
    p.admit(waiting)
    p.admit(reserved)
    assert p.open == 3
    for conn in (busy, waiting, reserved):
        p.forget(conn)
    assert p.open == 0


# -- the one-pass ranking picks exactly whom the former five filtered passes picked

def reference_evictable(pool: list[FakeConn], spoken: bool, young: float) -> FakeConn | None:
    """The ranks as httpd.py wrote them before the policy was its own object (ec1a0d1)."""
    ranks = (
        lambda c: c.state is S.LINGER,
        lambda c: c.state is S.IDLE and not c.fresh or c.fresh and c.state in SILENT_STATES and c.since <= young,
        lambda c: not c.fresh and (c.state is S.HEAD or c.state is S.HANDSHAKE and (spoken or c.since <= young)),
        lambda c: c.stalled,
        lambda c: spoken and c.fresh and c.state in SILENT_STATES)
    for rank in ranks:
        for c in sorted((c for c in pool if rank(c)), key=lambda c: c.since):
            if not c.fresh or c.state in SILENT_STATES and not c.waiting_bytes:
                return c
    return None


conn_strategy = st.builds(
    FakeConn, state=st.sampled_from([S.HANDSHAKE, S.IDLE, S.HEAD, S.BUSY, S.LINGER]),
    since=st.sampled_from([900.0, 999.0, 999.75, 999.9, 1000.0]), fresh=st.booleans(), stalled=st.booleans(),
    waiting_bytes=st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(conn_strategy, min_size=1, max_size=12), st.booleans())
def test_the_victim_is_the_one_the_former_ranking_chose(pool, spoken):
    pool = [replace(c, name=f"c{i}", stalled=c.stalled and c.state is S.BUSY) for i, c in enumerate(pool)]
    p, clock = policy(max_connections=len(pool), reserve_connections=0)
    for c in pool:
        p.placed[c] = None
    expected = reference_evictable(pool, spoken, clock() - GRACE)
    verdict = p.admit(newcomer(spoken=spoken))
    if expected is not None:
        assert verdict == Verdict(Place.IN, expected)
    else:
        assert verdict.evict is None and verdict.place in (Place.WAIT, Place.OUT)
