"""HTTP: /metrics (text or OpenMetrics, gzip on request), /healthz and a landing page.

A threaded server with a cap on requests in flight (503 beyond it, as node_exporter's
--web.max-requests) and a socket read timeout so idle or slow clients cannot hold threads forever.
"""
from __future__ import annotations

import gzip
import json
import logging
import urllib.parse
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter import __version__
from exporter.durations import parse_duration
from exporter.exposition import TextRenderer
from exporter.history import SampleHistory
from exporter.liveview import live_page

log = logging.getLogger("exporter.server")

READ_TIMEOUT_S = 10.0


class ListenAddressError(ValueError):
    pass


def parse_listen_address(value: str) -> tuple[str, int]:
    """':9445', '127.0.0.1:9445', '[::1]:9445', 'localhost:9445' -> (host, port); '' host = all."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ListenAddressError(f"invalid --web.listen-address {value!r}: want [host]:port, e.g. :9445")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ListenAddressError(f"invalid --web.listen-address {value!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenAddressError(f"invalid --web.listen-address {value!r}: put IPv6 hosts in brackets")
    return host, port


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "" or "::": accept IPv4 too, like Go's ":9445".
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def make_server(
    listen_address: str,
    registry: CollectorRegistry,
    health: Callable[[], tuple[bool, str]],
    telemetry_path: str = "/metrics",
    max_requests: int = 40,
    history: SampleHistory | None = None,
) -> ThreadingHTTPServer:
    """Bind (raises OSError when the port is taken) and return the server, not yet serving."""
    host, port = parse_listen_address(listen_address)
    slots = threading.BoundedSemaphore(max_requests) if max_requests > 0 else None
    landing = live_page(telemetry_path)
    text = TextRenderer()

    class Handler(BaseHTTPRequestHandler):
        server_version = f"gpu-telemetry-exporter/{__version__}"
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT_S
        # Headers and body go out in one write anyway; without NODELAY a small response can still wait
        # ~40 ms for the client's delayed ACK (Nagle).
        disable_nagle_algorithm = True

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def do_GET(self) -> None:
            if slots is not None and not slots.acquire(blocking=False):
                self._send(503, b"too many concurrent requests\n", "text/plain; charset=utf-8")
                return
            try:
                self._route()
            finally:
                if slots is not None:
                    slots.release()

        def do_HEAD(self) -> None:
            self.do_GET()

        def _route(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == telemetry_path:
                # prometheus_client negotiates the format; the cached-label renderer writes it.
                _, content_type = choose_encoder(self.headers.get("Accept", ""))
                om = content_type.startswith("application/openmetrics-text")
                self._send(200, text.render(registry.collect(), openmetrics=om), content_type)
            elif path == "/healthz":
                ok, reason = health()
                self._send(200 if ok else 503, reason.encode(), "text/plain; charset=utf-8")
            elif path == "/":
                self._send(200, landing, "text/html; charset=utf-8")
            elif path == "/api/v1/samples":
                self._samples()
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _samples(self) -> None:
            if history is None:
                self._json(404, {"error": "history is off (--history.window=0)"})
                return
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            try:
                window = parse_duration(query.get("window", ["60s"])[0])
            except ValueError as exc:
                self._json(400, {"error": str(exc)})
                return
            if not 0 < window <= history.window_s:
                self._json(400, {"error": f"window must be > 0 and <= {history.window_s:g}s (--history.window)"})
                return
            self._json(200, history.query(window))

        def _json(self, code: int, doc: dict) -> None:
            self._send(code, json.dumps(doc, separators=(",", ":")).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            gz = "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 256
            if gz:
                body = gzip.compress(body, compresslevel=5)
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if gz:
                self.send_header("Content-Encoding", "gzip")
            self._headers_buffer.append(b"\r\n")  # end_headers() without its separate flush
            head = b"".join(self._headers_buffer)
            self._headers_buffer = []
            self.wfile.write(head if self.command == "HEAD" else head + body)

    if host in ("", "::"):
        family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
        host = "::" if family == socket.AF_INET6 else ""
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        host = infos[0][4][0]
    try:
        return _Server((host, port), Handler, family)
    except OSError:
        if host == "::":  # no IPv6 in this kernel/container: fall back to IPv4 any
            return _Server(("", port), Handler, socket.AF_INET)
        raise
