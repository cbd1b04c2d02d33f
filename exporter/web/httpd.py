"""A small HTTP/1.1 server on one asyncio loop, built so that bad clients cannot exhaust it.

HTTP/1.1 itself (request parsing, framing, keep-alive, HEAD) is h11's; this module owns the timing and
the bounds around it. A connection costs a protocol object and an h11 state machine, not a thread, and
every phase has a bound:

- TLS handshake and request head: `header_timeout_s` from the moment the TCP connection is accepted
  (TLS runs inside the connection, tlsconn.py, so handshaking clients count like any other);
- idle keep-alive wait for the next request: `idle_timeout_s`;
- head size and header count: `max_head_bytes` / `max_headers` (431 beyond), request bodies: 413;
- open connections: `max_connections`, with `reserve_connections` more past the cap that answer only the
  priority paths (/healthz). Who gets a place, who is evicted for it and who waits `probation_s` for
  its first bytes is the pure policy of admission.py (rules and their history there); this module asks
  it and carries its verdicts out;
- requests in flight: `max_requests` (503 beyond, like node_exporter's --web.max-requests; at the cap
  the oldest request whose client does not read its answer is cut first). Handlers run on a pool of at
  most that many threads, so threads stay bounded whatever the load;
- password checks (bcrypt): one thread, a bounded queue (`max_pending_auth`, `max_pending_auth_per_peer`)
  served by rank, then round-robin per client address (fairqueue.py, Authenticator.rank). A user name
  that does not exist never enters it: refused after as long as a check takes, on a timer, so however
  many names and addresses guess, a real first login waits only for checks of real names;
- a response written to a client that does not read it: `write_timeout_s`, then the connection is cut.

The application supplies `inline(request)` for cheap answers made on the loop (health, 404) and
`handle(request)` for work done on the pool. Authentication (an `Authenticator`) runs before either; the
rate limit (`allow_request`) is asked after the cheap credential check, so it can tell a verified user
from anonymous clients. An exception while answering closes that connection and is logged; a client
that goes away or writes garbage is a DEBUG line and a count, never an ERROR.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import resource
import socket
import ssl
import struct
import termios
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Mapping, Protocol, cast

import h11

from exporter.web.admission import Admission, ConnState, Place, Verdict
from exporter.web.fairqueue import FairQueue
from exporter.web.tlsconn import TlsSession

log = logging.getLogger("exporter.web.server")

_TLS_HANDSHAKE = 0x16  # the first byte of every TLS connection: a handshake record
_HTTP_TO_HTTPS = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"  # Go's
# A 429 is sent after this wait, at no CPU cost: a keep-alive client over its rate limit that asks again at
# once (a flood) gets one answer a second, not thousands that spend the pod's CPU quota the sampler needs.
RATE_LIMITED_DELAY_S = 1.0
_WRITE_CHUNK = 64 * 1024  # the transport's high-water mark: a slow reader holds at most about this much
# One read from a client (asyncio's own is 256 KiB): what a connection adds past the pause on pipelined
# requests, so 512 clients that pipeline and never read hold ~16 MB, not ~130 MB
_READ_BYTES = 16 * 1024


@dataclass(frozen=True)
class Limits:
    max_requests: int = 40  # requests in flight; 0 = no cap (the worker pool still bounds threads)
    max_connections: int = 512
    reserve_connections: int = 16  # past the cap, for /healthz only
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    write_timeout_s: float = 30.0
    max_head_bytes: int = 16 * 1024
    max_headers: int = 100
    max_pending_auth: int = 32  # bcrypt checks queued
    max_pending_auth_per_peer: int = 4  # of those, from one client address (per rank)
    # distinct response bodies waiting on clients that do not read them (40 different 9 MB /api/v1/samples
    # bodies held for 30 s took 522 MB); past it the oldest such client is cut
    max_stalled_bytes: int = 32 * 1024 * 1024
    # a connection that has sent nothing yet keeps its place this long against newcomers that have not
    # either: the moment between a client's connect and its request reaching us (a scraper evicted there by
    # a burst of silent connects gets a reset)
    silent_grace_s: float = 0.25
    # a newcomer at a full server that has sent nothing waits up to this long for its first bytes before
    # its place is decided: a request arriving then outranks silence
    probation_s: float = 0.05


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: Mapping[str, str]  # lower-cased names; repeated headers joined with ", "
    peer: str


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


class App(Protocol):
    def inline(self, request: Request) -> Response | None: ...

    def handle(self, request: Request) -> Response: ...


class Authenticator(Protocol):
    def exempt(self, request: Request) -> bool: ...

    def user(self, request: Request) -> str:
        """The user name the request claims ('' without credentials)."""

    def rank(self, request: Request) -> int:
        """Its place in the password-check queue, lower first (0: an address that logged in before)."""

    def refusal_delay(self, request: Request) -> float | None:
        """Seconds after which to refuse it without a check (a user name that does not exist), or None."""

    def check_cached(self, request: Request) -> bool | None:
        """True/False when decided without real work; None when a slow check (bcrypt) is needed."""

    def check(self, request: Request) -> bool: ...

    def challenge(self) -> Response: ...


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def to_request(event: h11.Request, peer: str, limits: Limits) -> Request:
    """Our checks on top of h11's: size and count bounds, HTTP version, the request target's form."""
    size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
    if size > limits.max_head_bytes:
        raise BadRequest(431, "request head too large")
    if len(event.headers) > limits.max_headers:
        raise BadRequest(431, "too many header fields")
    if event.http_version not in (b"1.0", b"1.1"):
        raise BadRequest(505, "unsupported HTTP version")
    method = event.method.decode("ascii")  # h11 checked it is a token
    target = event.target.decode("latin-1")
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target == "*" and method == "OPTIONS":
        path, query = "*", ""
    elif target[:7].lower() == "http://" or target[:8].lower() == "https://":  # absolute form (proxies)
        parts = urllib.parse.urlsplit(target)
        path, query = parts.path or "/", parts.query
    else:
        raise BadRequest(400, "malformed request target")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key, text = name.decode("ascii"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(method, target, urllib.parse.unquote(path), query, "HTTP/" + event.http_version.decode(),
                   headers, peer)


def parse_head(head: bytes, peer: str, limits: Limits = Limits()) -> Request:
    """Parse one request head (without the final blank line) as the server does; raises BadRequest."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
    conn.receive_data(head + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise BadRequest(exc.error_status_hint, str(exc)) from None
    if not isinstance(event, h11.Request):
        raise BadRequest(400, "incomplete request head")
    return to_request(event, peer, limits)


@dataclass
class ServerStats:
    """Counters for the exporter's own metrics; updated on the loop thread only."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # by status code
    closed: collections.Counter = field(default_factory=collections.Counter)  # connections cut, by reason
    open_connections: int = 0
    in_flight: int = 0


class _Connection(asyncio.BufferedProtocol):
    """One client connection; to the admission policy an `admission.Conn`."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.state = ConnState.NEW
        self.since = 0.0
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.limits.max_head_bytes)
        self.tls: TlsSession | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.peer = "-"
        self.writable: asyncio.Future | None = None  # set while the client does not read what we write
        self.closed = False
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.must_close = False  # the request had a body we did not read
        self.fresh = True  # nothing received yet: the first byte tells TLS from plain HTTP
        self.sending: bytes | None = None  # the body being written
        self.context: ssl.SSLContext | None = None  # TLS, from the configuration when it connected

    @property
    def tx(self) -> asyncio.Transport:
        assert self.transport is not None  # set in connection_made, before any other callback
        return self.transport

    # -- asyncio callbacks
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer  # shared: the loop hands each read over before the next

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.server.read_buffer[:nbytes]))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Responses go out in one write; without NODELAY the client's delayed ACK can add ~40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "-"
        transport.set_write_buffer_limits(high=64 * 1024)
        self.context = self.server.tls_context()
        if self.server.admit(self):
            self.start()

    def start(self) -> None:
        """Admitted: serve it."""
        if self.context is not None:
            self.tls = TlsSession(self.context)
            self._set_state(ConnState.HANDSHAKE, self._head_timeout(), "header_timeout")
        else:
            self._to_idle()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.state is ConnState.LINGER:
            return  # discarded: a connection being closed politely
        if self.state is ConnState.NEW and not self.server.settle(self, spoken=True):
            return  # on probation, and its first bytes did not win it a place
        if self.fresh:
            self.fresh = False
            if self._wrong_protocol(data[0]):
                return
        if self.tls is not None:
            try:
                data = self.tls.receive(data)
            except ssl.SSLError as exc:
                log.debug("%s: TLS: %s", self.peer, exc)
                self._flush_tls()  # the alert, so the client learns why
                self.close("tls_error")
                return
            self._flush_tls()
            if self.state is ConnState.HANDSHAKE:
                if not self.tls.handshaken:
                    return
                if not self.server.allow_peer(self.tls.peercert):
                    log.debug("%s: client certificate names none of client_allowed_sans", self.peer)
                    self.close("client_san")
                    return
                self._to_idle()
        if data:
            self.h11.receive_data(data)
            if self.state is ConnState.BUSY:
                if len(self.h11.trailing_data[0]) > self.server.limits.max_head_bytes:
                    self.tx.pause_reading()  # pipelined flood while we answer
            else:
                if self.state is ConnState.IDLE:
                    self._set_state(ConnState.HEAD, self._head_timeout(), "header_timeout")
                self._next_request()
        if self.tls is not None and self.tls.peer_closed and not self.closed:
            self.eof_received()

    def _wrong_protocol(self, first: int) -> bool:
        """A TLS hello on the plain port, or plain HTTP on the TLS port (a request line starts with a
        capital letter): answered at once as Go's net/http does, instead of waiting for the head deadline."""
        if self.tls is None and first == _TLS_HANDSHAKE:
            self.server.stats.requests[400] += 1
            self.tx.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        elif self.tls is not None and ord("A") <= first <= ord("Z"):
            self.server.stats.requests[400] += 1
            self.tx.write(_HTTP_TO_HTTPS)
        else:
            return False
        self.tls = None  # nothing of TLS was started: close plainly
        self.close("bad_request", linger=True)
        return True

    def eof_received(self) -> bool:
        if self.state is ConnState.LINGER:
            self.close_now()
            return False
        self.eof = True
        if self.state is ConnState.BUSY:  # the client half-closed after its request: answer, then close
            return True
        self.close("client_closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self.server.forget(self)
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()
        self.server.trim_stalled()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # -- state
    def _head_timeout(self) -> float:
        # past the cap a connection gets a short deadline: it holds a reserved place
        return min(self.server.limits.header_timeout_s, 2.0) if self.reserve else self.server.limits.header_timeout_s

    @property
    def reserve(self) -> bool:
        """Admitted past the cap: priority paths only."""
        return self in self.server.admission.reserve

    def _set_state(self, state: ConnState, timeout: float | None, reason: str) -> None:
        self.state = state
        self.since = self.server.admission.clock()
        self._cancel_timer()
        if timeout is not None and reason:
            self.timer = asyncio.get_running_loop().call_later(timeout, self.close, reason)

    async def refusal_wait(self, delay: float) -> None:
        """The wait before a refusal, at no CPU cost; meanwhile its place may go to a newcomer (admission)."""
        self._set_state(ConnState.REFUSING, None, "")
        try:
            await asyncio.sleep(delay)
        finally:
            if not self.closed and self.state is ConnState.REFUSING:
                self._set_state(ConnState.BUSY, None, "")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _to_idle(self) -> None:
        self._set_state(ConnState.IDLE, self.server.limits.idle_timeout_s, "idle_timeout")
        if self.h11.trailing_data[0]:  # a pipelined request already arrived
            self._set_state(ConnState.HEAD, self._head_timeout(), "header_timeout")
            self._next_request()
        elif self.eof:
            self.close("client_closed")

    def unread(self) -> bool:
        """Bytes wait in the socket that the loop has not read yet (FIONREAD; the policy asks only at the cap)."""
        sock = self.tx.get_extra_info("socket")
        try:
            return sock is not None and struct.unpack(
                "i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
        except OSError:
            return False

    @property
    def stalled(self) -> bool:
        """Being answered, but the client does not read the answer."""
        return self.state is ConnState.BUSY and self.writable is not None

    def close(self, reason: str, linger: bool = False) -> None:
        """Close and count why. With linger, half-close and discard what the client still sends for a
        moment: closing with unread data makes the kernel send a reset that can destroy our last response."""
        if self.closed or self.state is ConnState.LINGER:
            return
        self.server.stats.closed[reason] += 1
        log.debug("%s: connection closed: %s", self.peer, reason)
        if self.transport is None:
            return
        abort = reason in ("write_timeout", "evicted")
        if self.tls is not None and self.tls.handshaken and not abort:
            self.tls.close()
            self._flush_tls()
        if linger and self.tx.can_write_eof() and not self.eof:
            self._set_state(ConnState.LINGER, 2.0, "")
            self.timer = asyncio.get_running_loop().call_later(2.0, self.close_now)
            self.tx.resume_reading()
            try:
                self.tx.write_eof()
            except OSError as exc:  # the client is gone already (ENOTCONN): nothing to linger for
                log.debug("%s: half-close: %s", self.peer, exc)
                self.close_now()
            return
        self.closed = True
        self._cancel_timer()
        self.tx.abort() if abort else self.tx.close()

    def close_now(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.tx.close()

    def _flush_tls(self) -> None:
        if self.tls is None:
            return
        out = self.tls.outgoing()
        if out:
            self.tx.write(out)

    def _h11_send(self, event: h11.Response | h11.Data | h11.EndOfMessage) -> list[bytes]:
        return self.h11.send_with_data_passthrough(event) or []

    def _write(self, pieces: list[bytes]) -> None:
        if self.tls is None:
            self.tx.writelines(pieces)
            return
        for piece in pieces:
            self.tls.send(piece)
        self._flush_tls()

    async def _drained(self, deadline: float) -> bool:
        """Wait while the client does not read what we wrote, until the response's write deadline; False
        when the connection is gone or was cut for it."""
        if self.writable is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.writable), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                self.close("write_timeout")
                return False
        return not self.closed

    # -- requests
    def _next_request(self) -> None:
        try:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                self.close("client_closed")
                return
            assert isinstance(event, h11.Request)
            request = to_request(event, self.peer, self.server.limits)
            # Requests we answer carry no body; one that does is answered (413/405), then closed.
            self.must_close = (not isinstance(self.h11.next_event(), h11.EndOfMessage)
                               or "transfer-encoding" in request.headers
                               or request.headers.get("content-length", "0") != "0")
        except h11.RemoteProtocolError as exc:
            self._reject(BadRequest(exc.error_status_hint, str(exc)))
            return
        except BadRequest as exc:
            self._reject(exc)
            return
        self._set_state(ConnState.BUSY, None, "")
        self.task = asyncio.get_running_loop().create_task(self._serve(request))

    def _reject(self, exc: BadRequest) -> None:
        self._set_state(ConnState.BUSY, None, "")
        log.debug("%s: bad request: %s", self.peer, exc)
        response = Response(exc.status, f"{HTTPStatus(exc.status).phrase}: {exc}\n".encode(), close=True)
        self.task = asyncio.get_running_loop().create_task(self._serve(None, response))

    async def _serve(self, request: Request | None, response: Response | None = None) -> None:
        """Answer request (or send the given error response). Whatever goes wrong closes this connection
        and is logged: a client must never be left waiting on a connection nobody serves."""
        slot = False
        try:
            if request is not None:
                response, slot = await self.server.respond(request, self)
            assert response is not None  # given for a rejected request, made for an accepted one
            await self._send(response, request is not None and request.method == "HEAD",
                             "done" if request is not None else "bad_request")
        except asyncio.CancelledError:
            raise
        except OSError as exc:  # the client went away under us: its doing, not ours; counted, not an ERROR
            log.debug("%s: connection lost while answering: %s", self.peer, exc)
            self.close("client_closed")
        except Exception:  # e.g. a header h11 refuses: this connection goes, the server does not
            what = f"{request.method} {request.target}" if request else "a bad request"
            log.exception("%s: error answering %s; connection closed", self.peer, what)
            self.close("internal_error")
        finally:
            if slot:
                self.server.release()
        if request is not None and response is not None:
            log.debug('%s "%s %s %s" %d %d', self.peer, request.method, request.target, request.version,
                      response.status, len(response.body))

    async def _send(self, response: Response, head_only: bool, reason: str) -> None:
        if self.closed:
            return
        headers = [("Server", self.server.server_name), ("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))), *response.headers, *self.server.extra_headers()]
        if response.close or self.must_close or self.reserve:
            headers.append(("Connection", "close"))
        phrase = HTTPStatus(response.status).phrase if response.status in HTTPStatus._value2member_map_ else ""
        self.server.stats.requests[response.status] += 1
        self._write(self._h11_send(h11.Response(status_code=response.status, headers=headers, reason=phrase)))
        # The body goes out a chunk at a time as the client takes it: written at once, every slow reader
        # would hold its own copy of the rest in the transport's buffer (40 readers x 4 MB of JSON).
        deadline = asyncio.get_running_loop().time() + self.server.limits.write_timeout_s
        body = memoryview(response.body if not head_only else b"")
        self.sending = response.body
        try:
            for start in range(0, len(body), _WRITE_CHUNK):
                # h11 passes any bytes-like object through; a memoryview slice avoids copying the body
                self._write(self._h11_send(h11.Data(data=cast(bytes, body[start:start + _WRITE_CHUNK]))))
                if not await self._drained(deadline):
                    return
            self._write(self._h11_send(h11.EndOfMessage()))
            if not await self._drained(deadline):
                return
        finally:
            self.sending = None
        if self.closed:
            return
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            self.close(reason, linger=True)  # h11 says this connection ends here (Connection: close, HTTP/1.0)
            return
        self.h11.start_next_cycle()
        if len(self.h11.trailing_data[0]) <= self.server.limits.max_head_bytes:
            # else requests already read wait: reading on after each answer let a client that pipelines
            # and never reads grow this buffer by a read (256 KiB) per request answered
            self.tx.resume_reading()
        self._to_idle()


class HttpServer:
    """Bound in the constructor (a taken port fails early); `serve_forever` runs the loop in the caller's
    thread; `shutdown` (from another thread) stops it and waits, like socketserver.

    tls: returns the SSL context for a new connection (None: plain HTTP); asked per connection, so a
    reloaded configuration takes effect for the next client without touching live ones.
    background: blocking work (config reloads) run every second on its own thread, never overlapping.
    allow_peer: after a TLS handshake, whether that client may stay, given a getter for its certificate
    (as getpeercert() decodes it; only called when needed); allow_request(request, user): False answers
    429 (a rate limit), user being the name whose credentials were already verified (cached), else None.
    Both run on the loop: keep them cheap. config_status: (whether the last web config reload took
    effect, Unix time of the last one that did), for the self metrics."""

    def __init__(self, sock: socket.socket, app: App, limits: Limits = Limits(),
                 tls: Callable[[], ssl.SSLContext | None] = lambda: None, auth: Authenticator | None = None,
                 extra_headers: Callable[[], tuple[tuple[str, str], ...]] = lambda: (),
                 server_name: str = "exporter", background: Callable[[], object] | None = None,
                 priority_paths: frozenset[str] = frozenset({"/healthz"}),
                 allow_peer: Callable[[Callable[[], dict | None]], bool] = lambda peercert: True,
                 allow_request: Callable[[Request, str | None], bool] = lambda request, user: True,
                 config_status: Callable[[], tuple[bool, float]] | None = None) -> None:
        self.socket = sock
        self.server_address = sock.getsockname()
        self.app = app
        self.limits = limits
        self.tls_context = tls
        self.auth = auth
        self.extra_headers = extra_headers
        self.server_name = server_name
        self.background = background
        self.priority_paths = priority_paths
        self.allow_peer = allow_peer
        self.allow_request = allow_request
        self.config_status = config_status
        self.stats = ServerStats()
        self.admission: Admission[_Connection] = Admission(limits, clock=time.monotonic)
        self._probation: dict[_Connection, asyncio.TimerHandle] = {}  # the timers of newcomers on probation
        self.read_buffer = memoryview(bytearray(_READ_BYTES))
        self._pool = ThreadPoolExecutor(max_workers=limits.max_requests or 64, thread_name_prefix="http-worker")
        self._auth_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-auth")
        self._background_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-background")
        self._auth_queue: FairQueue[tuple[Request, asyncio.Future]] = FairQueue(
            limits.max_pending_auth, limits.max_pending_auth_per_peer)
        self._auth_worker: asyncio.Task | None = None
        self._accept_logged_at = -1e9  # monotonic time of the last "cannot accept" line
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._running = threading.Event()
        self._done = threading.Event()

    # -- connection bookkeeping (loop thread): the admission policy decides, this carries it out
    @property
    def _connections(self) -> dict[_Connection, None]:
        """The full places, oldest first (the policy's; the socket tests look into them)."""
        return self.admission.placed

    @property
    def _reserve(self) -> dict[_Connection, None]:
        return self.admission.reserve

    def admit(self, conn: _Connection) -> bool:
        """A new connection: True when it is to be served now (a full or a reserved place); else it waits on
        probation (settle() decides) or was refused."""
        return self._carry_out(conn, self.admission.admit(conn))

    def settle(self, conn: _Connection, spoken: bool) -> bool:
        """The end of a newcomer's probation: its first bytes arrived (spoken) or its time is up. True when
        it got a place (and was started)."""
        timer = self._probation.pop(conn, None)
        if timer is None:
            return False
        timer.cancel()
        if conn.closed:  # it went away while it waited
            self.forget(conn)
            return False
        verdict = self.admission.settle(conn, spoken)
        if verdict is None or not self._carry_out(conn, verdict):
            return False
        conn.start()
        return True

    def _carry_out(self, conn: _Connection, verdict: Verdict[_Connection]) -> bool:
        if verdict.evict is not None:
            self._evict(verdict.evict)
        if verdict.place is Place.WAIT:
            self._probation[conn] = asyncio.get_running_loop().call_later(
                self.limits.probation_s, self.settle, conn, False)
        elif verdict.place is Place.OUT:
            self.stats.closed["connection_limit"] += 1
            conn.closed = True
            if conn.context is None:  # a TLS client could not read a plain answer
                conn.tx.writelines(conn._h11_send(h11.Response(
                    status_code=503, headers=[("Content-Length", "0"), ("Connection", "close")])))
            conn.tx.close()
        self._count_open()
        return verdict.place is Place.IN or verdict.place is Place.RESERVE

    def _count_open(self) -> None:
        self.stats.open_connections = self.admission.open

    def _evict(self, victim: _Connection) -> None:
        victim.close_now() if victim.state is ConnState.LINGER else victim.close("evicted")
        self.forget(victim)

    def _promote(self, conn: _Connection) -> bool:
        """A reserved connection whose request is not for a priority path: a full place if one is free or
        can be made (it may have been silent only because its request had not arrived when accepted)."""
        verdict = self.admission.promote(conn)
        if verdict is None:
            return False
        self._carry_out(conn, verdict)
        return True

    def trim_stalled(self) -> None:
        """Keep the distinct bodies held for clients that do not read under `max_stalled_bytes`."""
        for conn in self.admission.over_budget():
            conn.close("evicted")

    def forget(self, conn: _Connection) -> None:
        self.admission.forget(conn)
        if (timer := self._probation.pop(conn, None)) is not None:
            timer.cancel()
        self._count_open()

    # -- requests (loop thread)
    async def respond(self, request: Request, conn: _Connection) -> tuple[Response, bool]:
        """(response, whether it holds a request slot the caller must release)."""
        if conn.reserve and request.path not in self.priority_paths and not self._promote(conn):
            return Response(503, b"too many open connections\n", close=True), False
        auth = self.auth if self.auth is not None and not self.auth.exempt(request) else None
        ok = auth.check_cached(request) if auth is not None else None
        # A verified user is charged apart from anonymous clients: a flood without valid credentials
        # cannot spend a scraper's budget (exporter-toolkit charges everyone to one bucket).
        if not self.allow_request(request, auth.user(request) if auth is not None and ok else None):
            await conn.refusal_wait(RATE_LIMITED_DELAY_S)
            return Response(429, b"Too Many Requests\n"), False
        if request.method == "OPTIONS":
            return Response(200, headers=(("Allow", "GET, HEAD, OPTIONS"),), close=conn.must_close), False
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD, OPTIONS"),), close=True), False
        if conn.must_close:
            return Response(413, b"request bodies are not accepted\n", close=True), False
        if auth is not None:
            if ok is None and (delay := auth.refusal_delay(request)) is not None:
                await conn.refusal_wait(delay)  # as slow as a check, at no CPU cost and outside the queue
                ok = False
            elif ok is None:
                ok = await self._check_password(request)
            if ok is None:
                return Response(503, b"too many pending authentications\n", headers=(("Retry-After", "1"),),
                                close=True), False
            if not ok:
                return auth.challenge(), False
        try:
            inline = self.app.inline(request)
        except Exception:
            log.exception("error answering %s", request.path)
            return Response(500, b"internal error\n"), False
        if inline is not None:
            return inline, False
        if self.limits.max_requests and self.stats.in_flight >= self.limits.max_requests:
            # A slot held by a client that does not read its answer (its handler is done, only the write
            # waits) gives way, as at the connection cap: else 40 such clients 503 every scrape for 30 s.
            if (stalled := self.admission.oldest_stalled(besides=conn)) is None:
                return Response(503, b"too many concurrent requests\n"), False
            stalled.close("evicted")  # its slot is released as its task ends
        self.stats.in_flight += 1
        try:
            response = await asyncio.get_running_loop().run_in_executor(self._pool, self.app.handle, request)
        except asyncio.CancelledError:
            self.release()
            raise
        except Exception:
            log.exception("error answering %s", request.path)
            response = Response(500, b"internal error\n")
        return response, True

    async def _check_password(self, request: Request) -> bool | None:
        """bcrypt on the auth thread, queued fairly; None when the queue refused it."""
        assert self.auth is not None  # only called to authenticate
        future = asyncio.get_running_loop().create_future()
        dropped = self._auth_queue.push(request.peer, (request, future), self.auth.rank(request))
        if dropped is not None and not dropped[1].done():
            dropped[1].set_result(None)
        if self._auth_worker is None or self._auth_worker.done():
            self._auth_worker = asyncio.get_running_loop().create_task(self._run_password_checks())
        return await future

    async def _run_password_checks(self) -> None:
        loop, auth = asyncio.get_running_loop(), self.auth
        assert auth is not None  # started by _check_password
        while (item := self._auth_queue.pop()) is not None:
            request, future = item
            if future.done():  # its client went away while it waited
                continue
            try:
                ok = await loop.run_in_executor(self._auth_pool, auth.check, request)
            except Exception:
                log.exception("password check failed")
                ok = False
            if not future.done():
                future.set_result(ok)

    def release(self) -> None:
        self.stats.in_flight -= 1

    # -- lifecycle
    def serve_forever(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(self._loop_exception)
        try:
            server = loop.run_until_complete(loop.create_server(lambda: _Connection(self), sock=self.socket,
                                                                backlog=256))
            self._stop = loop.create_future()
            if self.background is not None:
                self._schedule_background()
            self._running.set()
            loop.run_until_complete(self._stop)
            server.close()
            for conn in [*self.admission.placed, *self.admission.reserve, *self.admission.waiting]:
                conn.close("shutdown")
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=1))
        finally:
            for pool in (self._pool, self._auth_pool, self._background_pool):
                pool.shutdown(wait=False, cancel_futures=True)
            loop.close()
            self._done.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # asyncio's accept loop retries by itself a second later: one line a minute while it lasts, not a
            # traceback per attempt
            self.stats.closed["accept_failed"] += 1
            now = time.monotonic()
            if now - self._accept_logged_at >= 60:
                self._accept_logged_at = now
                log.error("cannot accept connections: %s (open file limit %d, %d connections open); retrying "
                          "every second, logged once a minute (exporter_http_connections_closed_total"
                          "{reason=\"accept_failed\"} counts them)", exc.strerror,
                          resource.getrlimit(resource.RLIMIT_NOFILE)[0], self.stats.open_connections)
            return
        loop.default_exception_handler(context)

    def _schedule_background(self) -> None:
        loop, background = self._loop, self.background
        assert loop is not None and background is not None  # called from serve_forever when background is set
        running: list[asyncio.Future] = []

        def run() -> None:
            try:
                background()
            except Exception:
                log.exception("periodic server task failed")

        def tick() -> None:
            if not running or running[0].done():
                running[:] = [loop.run_in_executor(self._background_pool, run)]
            loop.call_later(1.0, tick)
        loop.call_later(1.0, tick)

    def shutdown(self) -> None:
        if not self._running.wait(timeout=5):
            return
        loop, stop = self._loop, self._stop
        assert loop is not None and stop is not None  # both are set before _running

        def finish() -> None:
            if not stop.done():
                stop.set_result(None)
        loop.call_soon_threadsafe(finish)
        self._done.wait(timeout=10)

    def server_close(self) -> None:
        self.socket.close()
