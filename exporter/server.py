"""HTTP routes: /metrics (text or OpenMetrics, gzip on request), /healthz, the live view at / and its
/api/v1/samples, served by the bounded asyncio server of httpd.py (limits, TLS and basic auth there).

A scrape renders the latest snapshot once: concurrent scrapers of the same snapshot share the rendered
(and gzipped) bytes, so 200 scrapers cost about one render, and the sampler keeps its schedule.
"""
from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import urllib.parse
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from exporter import __version__
from exporter.durations import parse_duration
from exporter.exposition import TextRenderer
from exporter.history import SampleHistory
from exporter.httpd import HttpServer, Limits, Request, Response
from exporter.listen import ListenAddressError, parse_listen_address  # noqa: F401  (re-exported)
from exporter.liveview import live_page
from exporter.webconfig import WebConfigWatcher

log = logging.getLogger("exporter.server")


class _RenderCache:
    """Rendered bytes per (format, gzip) for one generation of the data; one render per generation
    even when many scrapers arrive at once (they wait on the key's lock and reuse the result)."""

    def __init__(self, render: Callable[[bool], bytes], generation: Callable[[], object] | None) -> None:
        self._render = render
        self._generation = generation
        self._entries: dict[tuple[bool, bool], tuple[object, bytes]] = {}
        self._locks = {key: threading.Lock() for key in ((False, False), (False, True), (True, False), (True, True))}

    def get(self, openmetrics: bool, gz: bool) -> bytes:
        if self._generation is None:
            body = self._render(openmetrics)
            return gzip.compress(body, compresslevel=5) if gz else body
        key = (openmetrics, gz)
        with self._locks[key]:
            generation = self._generation()
            entry = self._entries.get(key)
            if entry is not None and entry[0] is generation:
                return entry[1]
            body = self._render(openmetrics)
            if gz:
                body = gzip.compress(body, compresslevel=5)
            self._entries[key] = (generation, body)
            return body


class ExporterApp:
    def __init__(self, registry: CollectorRegistry, health: Callable[[], tuple[bool, str]],
                 telemetry_path: str, history: SampleHistory | None,
                 generation: Callable[[], object] | None) -> None:
        text = TextRenderer()
        self.health = health
        self.telemetry_path = telemetry_path
        self.history = history
        self.cache = _RenderCache(lambda om: text.render(registry.collect(), openmetrics=om), generation)
        self.landing = live_page(telemetry_path)
        self.landing_gz = gzip.compress(self.landing, compresslevel=9)

    def inline(self, request: Request) -> Response | None:
        """Cheap answers, on the server's loop: never queued behind scrapes, never refused by the cap."""
        path = request.path
        if path == "/healthz":
            ok, reason = self.health()
            return Response(200 if ok else 503, reason.encode())
        if path == "/":
            gz = _wants_gzip(request)
            return Response(200, self.landing_gz if gz else self.landing, "text/html; charset=utf-8",
                            (("Content-Encoding", "gzip"),) if gz else ())
        if path not in (self.telemetry_path, "/api/v1/samples"):
            return Response(404, b"not found\n")
        return None

    def handle(self, request: Request) -> Response:
        if request.path == self.telemetry_path:
            # prometheus_client negotiates the format; the cached-label renderer writes it.
            _, content_type = choose_encoder(request.headers.get("accept", ""))
            om = content_type.startswith("application/openmetrics-text")
            gz = _wants_gzip(request)
            return Response(200, self.cache.get(om, gz), content_type,
                            (("Content-Encoding", "gzip"),) if gz else ())
        return self._samples(request)

    def _samples(self, request: Request) -> Response:
        if self.history is None:
            return _json(404, {"error": "history is off (--history.window=0)"})
        query = urllib.parse.parse_qs(request.query)
        try:
            window = parse_duration(query.get("window", ["60s"])[0])
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        if not 0 < window <= self.history.window_s:
            return _json(400, {"error": f"window must be > 0 and <= {self.history.window_s:g}s (--history.window)"})
        return _json(200, self.history.query(window))


def _wants_gzip(request: Request) -> bool:
    return "gzip" in request.headers.get("accept-encoding", "")


def _json(code: int, doc: dict) -> Response:
    return Response(code, json.dumps(doc, separators=(",", ":")).encode(), "application/json")


class ServerCollector:
    """exporter_http_*: what the HTTP server refused or cut, so load and bad clients show in metrics."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        stats = self.server.stats
        requests = CounterMetricFamily("exporter_http_requests", "HTTP responses sent, by status code.",
                                       labels=["code"])
        for code, n in sorted(dict(stats.requests).items()):
            requests.add_metric([str(code)], n)
        yield requests
        closed = CounterMetricFamily(
            "exporter_http_connections_closed", "Connections closed, by reason (done, client_closed, idle_timeout, "
            "header_timeout, write_timeout, evicted, connection_limit, bad_request, shutdown).", labels=["reason"])
        for reason, n in sorted(dict(stats.closed).items()):
            closed.add_metric([reason], n)
        yield closed
        yield GaugeMetricFamily("exporter_http_connections_open", "Client connections open now.",
                                value=stats.open_connections)
        yield GaugeMetricFamily("exporter_http_requests_in_flight", "Requests being answered now.",
                                value=stats.in_flight)


def bind(listen_address: str) -> socket.socket:
    """A listening socket (raises OSError when the port is taken). '' and '::' accept IPv4 and IPv6."""
    host, port = parse_listen_address(listen_address)
    if host in ("", "::"):
        family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
        host = "::" if family == socket.AF_INET6 else ""
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, host = infos[0][0], str(infos[0][4][0])
    try:
        return _listen(family, host, port)
    except OSError:
        if host == "::":  # no IPv6 in this kernel/container: fall back to IPv4 any
            return _listen(socket.AF_INET, "", port)
        raise


def _listen(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # like Go's ":9445"
        sock.bind((host, port))
        sock.listen(256)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(
    listen_address: str | socket.socket,
    registry: CollectorRegistry,
    health: Callable[[], tuple[bool, str]],
    telemetry_path: str = "/metrics",
    history: SampleHistory | None = None,
    generation: Callable[[], object] | None = None,
    web_config: WebConfigWatcher | None = None,
    limits: Limits | None = None,
) -> HttpServer:
    """Bind (raises OSError when the port is taken; or take a socket from bind()) and return the server,
    not yet serving.

    generation: returns an object that changes when the metrics do (the sampler's snapshot); with it,
    rendered pages are shared between scrapes of the same generation."""
    app = ExporterApp(registry, health, telemetry_path, history, generation)
    return HttpServer(
        bind(listen_address) if isinstance(listen_address, str) else listen_address, app, limits or Limits(),
        ssl_context=web_config.ssl_context if web_config else None,
        auth=web_config.auth if web_config else None,
        extra_headers=web_config.headers if web_config else (lambda: ()),
        server_name=f"gpu-telemetry-exporter/{__version__}",
        on_tick=web_config.poll if web_config else None)
