"""A small HTTP/1.1 server on one asyncio loop, built so that bad clients cannot exhaust it.

Why not http.server: a thread per connection lets idle or slow clients (slowloris) pin threads, and a
socket read timeout does not stop a client that sends one byte a second. Here a connection costs a
protocol object, not a thread, and every phase has a bound:

- idle keep-alive wait for the next request: `idle_timeout_s`;
- first byte of a request to the end of its head: `header_timeout_s` (the slowloris bound);
- head size and header count: `max_head_bytes` / `max_headers` (431 beyond), request bodies: 413;
- open connections: `max_connections`. At the cap a new connection evicts the oldest idle one, then the
  oldest one still sending its head; only when every connection is being served is the new one refused.
  A scraper (head in one packet) therefore always gets in, however many slow clients are connected;
- requests in flight: `max_requests` (503 beyond, like node_exporter's --web.max-requests). Handlers
  run on a pool of at most that many threads, so threads stay bounded whatever the load;
- a response written to a client that does not read it: `write_timeout_s`, then the connection is cut.

The application supplies `inline(request)` for cheap answers made on the loop (health, 404) and
`handle(request)` for work done on the pool. Authentication (an `Authenticator`) runs before either.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Mapping, Protocol

log = logging.getLogger("exporter.server")

_END_OF_HEAD = b"\r\n\r\n"
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Limits:
    max_requests: int = 40  # requests in flight; 0 = no cap (the worker pool still bounds threads)
    max_connections: int = 512
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    write_timeout_s: float = 30.0
    tls_handshake_timeout_s: float = 10.0
    max_head_bytes: int = 16 * 1024
    max_headers: int = 100


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

    def check_cached(self, request: Request) -> bool | None:
        """True/False when decided without real work; None when a slow check (bcrypt) is needed."""

    def check(self, request: Request) -> bool: ...

    def challenge(self) -> Response: ...


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_head(head: bytes, peer: str, max_headers: int) -> Request:
    """Parse a request head (without the final blank line). Raises BadRequest with the 4xx/5xx to send."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest(400, "undecodable head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if not set(method) <= _TOKEN_CHARS:
        raise BadRequest(400, "malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        status = 505 if version.startswith("HTTP/") else 400
        raise BadRequest(status, "unsupported HTTP version")
    if not target.startswith("/") or any(c < "!" or c == "\x7f" for c in target):
        raise BadRequest(400, "malformed request target")
    if len(lines) - 1 > max_headers:
        raise BadRequest(431, "too many header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:  # also rejects obsolete line folding
            raise BadRequest(400, "malformed header field")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    path, _, query = target.partition("?")
    return Request(method, target, urllib.parse.unquote(path), query, version, headers, peer)


@dataclass
class ServerStats:
    """Counters for the exporter's own metrics; updated on the loop thread only."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # by status code
    closed: collections.Counter = field(default_factory=collections.Counter)  # connections cut, by reason
    open_connections: int = 0
    in_flight: int = 0


class _Connection(asyncio.Protocol):
    # states: "idle" (waiting for a request), "head" (receiving one), "busy" (being answered)
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.state = "idle"
        self.since = 0.0
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.peer = "-"
        self.writable: asyncio.Future | None = None
        self.closed = False
        self.eof = False

    # -- asyncio callbacks
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
        if not self.server.admit(self):
            return
        self._to_idle()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.state == "linger":
            return  # discarded: a connection being closed politely
        self.buf += data
        if self.state == "busy":
            if len(self.buf) > self.server.limits.max_head_bytes:  # pipelined flood while we answer
                assert self.transport is not None  # data only arrives after connection_made
                self.transport.pause_reading()
            return
        if self.state == "idle":
            self._set_state("head", self.server.limits.header_timeout_s, "header_timeout")
        self._try_request()

    def eof_received(self) -> bool:
        if self.state == "busy":  # the client half-closed after its request: answer, then close
            self.eof = True
            return True
        if self.state == "linger":
            self.close_now()
        else:
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

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # -- state
    def _set_state(self, state: str, timeout: float | None, reason: str) -> None:
        self.state = state
        self.since = time.monotonic()
        self._cancel_timer()
        if timeout is not None and reason:
            self.timer = asyncio.get_running_loop().call_later(timeout, self.close, reason)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _to_idle(self) -> None:
        self._set_state("idle", self.server.limits.idle_timeout_s, "idle_timeout")
        if self.buf:  # a pipelined request already arrived
            self._set_state("head", self.server.limits.header_timeout_s, "header_timeout")
            self._try_request()

    def close(self, reason: str, linger: bool = False) -> None:
        """Close and count why. With linger, half-close and discard what the client still sends for a
        moment: closing with unread data makes the kernel send a reset that can destroy our last response."""
        if self.closed or self.state == "linger":
            return
        self.server.stats.closed[reason] += 1
        log.debug("%s: connection closed: %s", self.peer, reason)
        if linger and self.transport is not None and self.transport.can_write_eof() and not self.eof:
            self._set_state("linger", 2.0, "")
            self.timer = asyncio.get_running_loop().call_later(2.0, self.close_now)
            self.buf.clear()
            self.transport.resume_reading()
            self.transport.write_eof()
            return
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort() if reason in ("write_timeout", "evicted") else self.transport.close()

    def close_now(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _try_request(self) -> None:
        limits = self.server.limits
        end = self.buf.find(_END_OF_HEAD)
        if (end if end >= 0 else len(self.buf)) > limits.max_head_bytes:
            self._reject(BadRequest(431, "request head too large"))
            return
        if end < 0:
            return  # the head is not complete yet
        head = bytes(self.buf[:end])
        del self.buf[: end + len(_END_OF_HEAD)]
        self._set_state("busy", None, "")
        try:
            request = parse_head(head.lstrip(b"\r\n"), self.peer, limits.max_headers)
        except BadRequest as exc:
            self._reject(exc)
            return
        self.task = asyncio.get_running_loop().create_task(self._serve(request))

    def _reject(self, exc: BadRequest) -> None:
        self._set_state("busy", None, "")
        log.debug("%s: bad request: %s", self.peer, exc)
        self.task = asyncio.get_running_loop().create_task(
            self._send(Response(exc.status, f"{HTTPStatus(exc.status).phrase}: {exc}\n".encode(), close=True),
                       head_only=False, keep_alive=False, reason="bad_request"))

    async def _serve(self, request: Request) -> None:
        response, slot = await self.server.respond(request)
        keep_alive = _keep_alive(request) and not response.close
        try:
            await self._send(response, request.method == "HEAD", keep_alive)
        finally:
            if slot:
                self.server.release()
        log.debug('%s "%s %s %s" %d %d', self.peer, request.method, request.target, request.version,
                  response.status, len(response.body))

    async def _send(self, response: Response, head_only: bool, keep_alive: bool, reason: str = "done") -> None:
        if self.closed:
            return
        self.server.stats.requests[response.status] += 1
        assert self.transport is not None  # a request only arrives after connection_made
        self.transport.write(self.server.encode(response, head_only, keep_alive))
        if self.writable is not None:  # the client is not reading: wait, but not forever
            try:
                await asyncio.wait_for(asyncio.shield(self.writable), self.server.limits.write_timeout_s)
            except asyncio.TimeoutError:
                self.close("write_timeout")
                return
        if self.closed:
            return
        if not keep_alive or self.eof:
            self.close(reason, linger=True)
            return
        assert self.transport is not None
        self.transport.resume_reading()
        self._to_idle()


def _keep_alive(request: Request) -> bool:
    conn = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" in conn
    return "close" not in conn


class HttpServer:
    """Bound in the constructor (a taken port fails early); `serve_forever` runs the loop in the caller's
    thread; `shutdown` (from another thread) stops it and waits, like socketserver."""

    def __init__(self, sock: socket.socket, app: App, limits: Limits = Limits(),
                 ssl_context: ssl.SSLContext | None = None, auth: Authenticator | None = None,
                 extra_headers: Callable[[], tuple[tuple[str, str], ...]] = lambda: (),
                 server_name: str = "exporter", on_tick: Callable[[], object] | None = None) -> None:
        self.socket = sock
        self.server_address = sock.getsockname()
        self.app = app
        self.limits = limits
        self.ssl_context = ssl_context
        self.auth = auth
        self.extra_headers = extra_headers
        self.server_name = server_name
        self.on_tick = on_tick  # called every second on the loop (config reload checks)
        self.stats = ServerStats()
        self._connections: dict[_Connection, None] = {}  # insertion-ordered: oldest first
        self._pool = ThreadPoolExecutor(max_workers=limits.max_requests or 64, thread_name_prefix="http-worker")
        self._auth_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-auth")
        self._auth_pending = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._running = threading.Event()
        self._done = threading.Event()

    # -- connection bookkeeping (loop thread)
    def admit(self, conn: _Connection) -> bool:
        if len(self._connections) >= self.limits.max_connections:
            victim = self._evictable()
            if victim is None:
                self.stats.closed["connection_limit"] += 1
                conn.closed = True
                assert conn.transport is not None  # admitted from connection_made
                conn.transport.write(self.encode(Response(503, b"too many open connections\n"), False, False))
                conn.transport.close()
                return False
            victim.close_now() if victim.state == "linger" else victim.close("evicted")
            self.forget(victim)
        self._connections[conn] = None
        self.stats.open_connections = len(self._connections)
        return True

    def _evictable(self) -> _Connection | None:
        for state in ("linger", "idle", "head"):
            candidates = [c for c in self._connections if c.state == state]
            if candidates:
                return min(candidates, key=lambda c: c.since)
        return None

    def forget(self, conn: _Connection) -> None:
        self._connections.pop(conn, None)
        self.stats.open_connections = len(self._connections)

    # -- requests (loop thread)
    async def respond(self, request: Request) -> tuple[Response, bool]:
        """(response, whether it holds a request slot the caller must release)."""
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),), close=True), False
        if request.headers.get("transfer-encoding") or request.headers.get("content-length", "0") != "0":
            return Response(413, b"request bodies are not accepted\n", close=True), False
        if self.auth is not None and not self.auth.exempt(request):
            ok = self.auth.check_cached(request)
            if ok is None:
                if self._auth_pending >= 8:  # password guessing must not queue up bcrypt work without end
                    return Response(503, b"too many pending authentications\n", close=True), False
                self._auth_pending += 1
                try:
                    ok = await asyncio.get_running_loop().run_in_executor(self._auth_pool, self.auth.check, request)
                finally:
                    self._auth_pending -= 1
            if not ok:
                return self.auth.challenge(), False
        try:
            inline = self.app.inline(request)
        except Exception:
            log.exception("error answering %s", request.path)
            return Response(500, b"internal error\n"), False
        if inline is not None:
            return inline, False
        if self.limits.max_requests and self.stats.in_flight >= self.limits.max_requests:
            return Response(503, b"too many concurrent requests\n"), False
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

    def release(self) -> None:
        self.stats.in_flight -= 1

    def encode(self, r: Response, head_only: bool, keep_alive: bool) -> bytes:
        reason = HTTPStatus(r.status).phrase if r.status in HTTPStatus._value2member_map_ else "Status"
        lines = [f"HTTP/1.1 {r.status} {reason}", f"Server: {self.server_name}",
                 f"Content-Type: {r.content_type}", f"Content-Length: {len(r.body)}"]
        lines += [f"{k}: {v}" for k, v in r.headers]
        lines += [f"{k}: {v}" for k, v in self.extra_headers()]
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + r.body

    # -- lifecycle
    def serve_forever(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            server = loop.run_until_complete(loop.create_server(
                lambda: _Connection(self), sock=self.socket, ssl=self.ssl_context,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout_s if self.ssl_context else None,
                backlog=256))
            self._stop = loop.create_future()
            if self.on_tick is not None:
                self._schedule_tick()
            self._running.set()
            loop.run_until_complete(self._stop)
            server.close()
            for conn in list(self._connections):
                conn.close("shutdown")
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._auth_pool.shutdown(wait=False, cancel_futures=True)
            loop.close()
            self._done.set()

    def _schedule_tick(self) -> None:
        loop, on_tick = self._loop, self.on_tick
        assert loop is not None and on_tick is not None  # called from serve_forever when on_tick is set

        def tick() -> None:
            try:
                on_tick()
            except Exception:
                log.exception("periodic server task failed")
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
