"""HTTP routes: /metrics (text or OpenMetrics, gzip on request), /healthz, the live view at / and its
/api/v1/samples, served by the bounded asyncio server of httpd.py (limits, TLS and basic auth there).

A scrape renders the latest snapshot once: concurrent scrapers of the same snapshot share the rendered
(and gzipped) bytes, so 200 scrapers cost about one render, and the sampler keeps its schedule. The live
view's JSON is shared per window for up to a second, and at most `_SAMPLES_RENDERS` of those renders
run at once (503 beyond): 5 minutes of 64 GPUs is 7.5 MB of JSON.
"""
from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Iterator, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import parse_version

from exporter import __version__
from exporter.diagnosis.live import diagnosis_json
from exporter.durations import parse_duration
from exporter.pipeline.exposition import TextRenderer
from exporter.pipeline.history import SampleHistory
from exporter.web.httpd import HttpServer, Limits, Request, Response
from exporter.web.listen import parse_listen_address
from exporter.web.liveview import live_page

if TYPE_CHECKING:  # a type only: the web config (YAML, bcrypt) loads with --web.config.file alone
    from exporter.web.config import WebConfigWatcher

log = logging.getLogger("exporter.web.server")


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


class _SharedRenders:
    """Bodies of one history endpoint (/api/v1/samples, /api/v1/diagnosis) per window, rendered at most
    once per `max_age_s` each and at most `renders` at a time; None when that many are already running.

    Keyed by age, not by snapshot: the sampler publishes several snapshots a second, and every body
    still being written to a slow client stays in memory, so one body per snapshot made 40 clients
    hold 40 different multi-megabyte bodies. The live view polls once a second; a body up to a second
    old is what it would have seen anyway. Renders run on their own `renders` threads: glibc gives
    each thread that allocates its own malloc arena and keeps what it freed, so multi-megabyte renders
    spread over the 40 request threads left ~100 MB resident (measured; 17 MB with one arena)."""

    def __init__(self, render: Callable[..., bytes], renders: int, name: str, max_age_s: float = 1.0,
                 windows: int = 4, clock: Callable[[], float] = time.monotonic) -> None:
        self._render = render
        self._renders = threading.BoundedSemaphore(renders)
        self._render_threads = ThreadPoolExecutor(max_workers=renders, thread_name_prefix=f"{name}-render")
        self._max_age_s = max_age_s
        self._windows = windows
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, tuple[float, threading.Lock, list[bytes]]] = {}

    def get(self, window: Hashable) -> bytes | None:
        """The body for `window` (a key: the render is called with it, unpacked when a tuple)."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(window)
            if entry is None or now - entry[0] >= self._max_age_s:
                self._entries.pop(window, None)
                if len(self._entries) >= self._windows:
                    self._entries.pop(next(iter(self._entries)))
                entry = self._entries[window] = (now, threading.Lock(), [])
        _, lock, body = entry
        with lock:  # later requests for this window wait for the first one's render and share it
            if body:
                return body[0]
            if not self._renders.acquire(blocking=False):
                return None
            try:
                args = window if isinstance(window, tuple) else (window,)
                body.append(self._render_threads.submit(self._render, *args).result())
            finally:
                self._renders.release()
            return body[0]


_SAMPLES_RENDERS = 2
# A diagnosis of a long window over many GPUs costs seconds of CPU (docs/performance.md): one at a time,
# shared by everyone asking for the same window within a second, 503 for the rest.
_DIAGNOSIS_RENDERS = 1
_MAX_QUERY = 256  # bytes of query string the history endpoints read; their one parameter needs a few
_MAX_METRICS_QUERY = 1024  # collect[] names every collector in about 450 bytes
_MAX_METRICS_FIELDS = 32  # parameters a /metrics query may carry; pipeline.collectors.select bounds collect[] itself

# collect[] values -> the families to render (ValueError: a 400 with its message). main() builds it from
# pipeline.collectors.select, so the server needs nothing of the collectors.
Select = Callable[[Sequence[str]], Callable[[], Iterable[Metric]]]


class ExporterApp:
    def __init__(self, registry: CollectorRegistry, health: Callable[[], tuple[bool, str]],
                 telemetry_path: str, history: SampleHistory | None,
                 generation: Callable[[], object] | None, select: Select | None = None) -> None:
        text = self.text = TextRenderer()
        self.select = select
        self.health = health
        self.telemetry_path = telemetry_path
        self.history = history
        self.cache = _RenderCache(lambda om: text.render(registry.collect(), openmetrics=om), generation)
        self.landing = live_page(telemetry_path, history.window_s if history else 0.0)
        self.landing_gz = gzip.compress(self.landing, compresslevel=9)
        self.samples = _SharedRenders(history.query_json, _SAMPLES_RENDERS, "samples") if history else None
        self.diagnoses = (_SharedRenders(lambda w, asked: diagnosis_json(history, w, asked), _DIAGNOSIS_RENDERS,
                                         "diagnosis")
                          if history else None)

    def inline(self, request: Request) -> Response | None:
        """Cheap answers, on the server's loop: never queued behind scrapes, never refused by the cap."""
        path = request.path
        if path == "/healthz":
            ok, reason = self.health()
            return Response(200 if ok else 503, reason.encode())
        if path == "/":
            gz = _wants_gzip(request)
            return Response(200, self.landing_gz if gz else self.landing, "text/html; charset=utf-8",
                            _encoding_headers(gz))
        if path not in (self.telemetry_path, "/api/v1/samples", "/api/v1/diagnosis"):
            return Response(404, b"not found\n")
        return None

    def handle(self, request: Request) -> Response:
        if request.path == self.telemetry_path:
            # prometheus_client negotiates the format; the cached-label renderer writes it.
            content_type = _negotiate(request.headers.get("accept", ""))
            om = content_type.startswith("application/openmetrics-text")
            gz = _wants_gzip(request)
            try:
                body = self._subset(request.query, om, gz)
            except ValueError as exc:
                return Response(400, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return Response(200, self.cache.get(om, gz) if body is None else body, content_type,
                            _encoding_headers(gz, vary="Accept, Accept-Encoding"))
        if request.path == "/api/v1/diagnosis":
            return self._history_query(request, self.diagnoses, "5m")
        return self._history_query(request, self.samples, "60s")

    def _subset(self, query: str, om: bool, gz: bool) -> bytes | None:
        """The page of a `collect[]` scrape (node_exporter's parameter), or None: no collect[], the whole
        page, shared through the cache. A subset is rendered for its scraper alone (its bytes are a part
        of the whole page's, and --web.max-requests bounds how many run at once)."""
        names = collect_params(query)
        if not names or self.select is None:
            return None
        body = self.text.render(self.select(names)(), openmetrics=om)
        return gzip.compress(body, compresslevel=5) if gz else body

    def _history_query(self, request: Request, renders: _SharedRenders | None, default: str) -> Response:
        """Both history endpoints alike: a window longer than the history kept is capped to it ("the last
        hour" means "all there is") and the answer says so: `window_seconds` (capped) beside
        `requested_seconds` (asked)."""
        if self.history is None or renders is None:
            return _json(404, {"error": "history is off (--history.window=0)"})
        try:
            window = parse_duration(window_param(request.query, default))
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        if not window > 0:
            return _json(400, {"error": "window must be > 0"})
        if window < self.history.interval_s:  # no sample in it: the diagnosis would say "No GPU found"
            return _json(400, {"error": f"window must be at least the sample interval, "
                                        f"{self.history.interval_s:g}s (--sample.interval)"})
        body = renders.get((min(window, self.history.window_s), round(window, 3)))
        if body is None:
            return Response(503, b'{"error":"busy: too many history queries at once, retry"}', "application/json",
                            (("Retry-After", "1"),))
        return Response(200, body, "application/json")


def window_param(query: str, default: str) -> str:
    """The `window` parameter of a history endpoint (`default` when absent). Length-capped before any
    parsing, so what reaches parse_duration is short whatever a client sends."""
    if len(query) > _MAX_QUERY:
        raise ValueError(f"query string longer than {_MAX_QUERY} bytes")
    try:
        pairs = urllib.parse.parse_qsl(query, max_num_fields=8)
    except ValueError:
        raise ValueError("too many query parameters") from None
    window = dict(pairs).get("window", default)
    if len(window) > 32:
        raise ValueError("window: too long, want e.g. 60s or 5m")
    return window


def collect_params(query: str) -> list[str]:
    """The `collect[]` values of a /metrics query string, bounded in bytes and count before any parsing."""
    if not query:
        return []
    if len(query) > _MAX_METRICS_QUERY:
        raise ValueError(f"query string longer than {_MAX_METRICS_QUERY} bytes")
    try:
        pairs = urllib.parse.parse_qsl(query, max_num_fields=_MAX_METRICS_FIELDS)
    except ValueError:
        raise ValueError(f"more than {_MAX_METRICS_FIELDS} query parameters") from None
    return [value for key, value in pairs if key == "collect[]"]


# prometheus_client.exposition's, which its choose_encoder() returns last (not imported: see promlazy.py).
CONTENT_TYPE_PLAIN_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
_ESCAPINGS = (openmetrics.ALLOWUTF8, openmetrics.UNDERSCORES, openmetrics.DOTS, openmetrics.VALUES)


def _choose_content_type(accept: str) -> str:
    """The Content-Type prometheus_client's exposition.choose_encoder(accept) picks, line for line (a test
    compares the two), without importing that module: it brings HTTP servers, urllib and email (~4 MB)."""
    for accepted in accept.split(","):
        toks = accepted.split(";")
        media = toks[0].strip()
        if media not in ("application/openmetrics-text", "text/plain"):
            continue
        version = next((v for k, v in (t.strip().split("=", 1) for t in toks if "=" in t) if k == "version"), "")
        escaping = next((v if v in _ESCAPINGS else openmetrics.UNDERSCORES
                         for k, v in (t.strip().split("=", 1) for t in toks if "=" in t) if k == "escaping"),
                        openmetrics.UNDERSCORES)
        if media == "application/openmetrics-text":
            if not version:
                return openmetrics.CONTENT_TYPE_LATEST
            if parse_version(version) >= (1, 0, 0):
                return f"application/openmetrics-text; version={version}; charset=utf-8; escaping={escaping}"
        elif version and parse_version(version) >= (1, 0, 0):
            return f"text/plain; version=1.0.0; charset=utf-8; escaping={escaping}"
    return CONTENT_TYPE_PLAIN_0_0_4


def _negotiate(accept: str) -> str:
    """The Content-Type of a /metrics answer: prometheus_client's choice, except where its parser raises on
    a client's version (`version=abc`: a 500) or it echoes a version that cannot go in our header
    (`version=1.0.0.\xb2`: not ASCII, the connection dropped): then the text format, which every scraper reads."""
    try:
        content_type = _choose_content_type(accept)
    except Exception:
        return CONTENT_TYPE_PLAIN_0_0_4
    return content_type if content_type.isascii() and content_type.isprintable() else CONTENT_TYPE_PLAIN_0_0_4


def _wants_gzip(request: Request) -> bool:
    """Accept-Encoding as RFC 9110 reads it: gzip (or *) with a q-value above 0; 'gzip;q=0' refuses it."""
    header = request.headers.get("accept-encoding", "")
    star = False
    for item in header.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip()[:5])
                except ValueError:
                    q = 0.0
        if coding == "*":
            star = q > 0
        else:
            return q > 0
    return star


def _encoding_headers(gz: bool, vary: str = "Accept-Encoding") -> tuple[tuple[str, str], ...]:
    """Caches between a client and us must not hand a gzipped page (or another format) to a client that
    did not ask for it: Vary names the request headers the answer depends on."""
    return (("Content-Encoding", "gzip"), ("Vary", vary)) if gz else (("Vary", vary),)


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
            "header_timeout, write_timeout, evicted, connection_limit, bad_request, tls_error, client_san, "
            "internal_error, accept_failed, shutdown).", labels=["reason"])
        for reason, n in sorted(dict(stats.closed).items()):
            closed.add_metric([reason], n)
        yield closed
        yield GaugeMetricFamily("exporter_http_connections_open", "Client connections open now.",
                                value=stats.open_connections)
        yield GaugeMetricFamily("exporter_http_requests_in_flight", "Requests being answered now.",
                                value=stats.in_flight)
        if self.server.config_status is not None:
            ok, when = self.server.config_status()
            yield GaugeMetricFamily("exporter_web_config_last_reload_successful",
                                    "Whether the last --web.config.file reload took effect (0: refused or broken; "
                                    "the previous configuration is serving).", value=1 if ok else 0)
            yield GaugeMetricFamily("exporter_web_config_last_reload_success_timestamp_seconds",
                                    "When the web config last loaded or reloaded successfully.", value=when)


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
    select: Select | None = None,
) -> HttpServer:
    """Bind (raises OSError when the port is taken; or take a socket from bind()) and return the server,
    not yet serving.

    generation: returns an object that changes when the metrics do (the sampler's snapshot); with it,
    rendered pages are shared between scrapes of the same generation.
    select: with it, `collect[]` scrapes a subset (see Select); without, collect[] is ignored."""
    app = ExporterApp(registry, health, telemetry_path, history, generation, select)
    return HttpServer(
        bind(listen_address) if isinstance(listen_address, str) else listen_address, app, limits or Limits(),
        tls=web_config.tls_context if web_config else (lambda: None),
        auth=web_config.auth if web_config else None,
        extra_headers=web_config.headers if web_config else (lambda: ()),
        server_name=f"gpu-telemetry-exporter/{__version__}",
        background=web_config.poll if web_config else None,
        allow_peer=web_config.allow_peer if web_config else (lambda peercert: True),
        allow_request=web_config.allow_request if web_config else (lambda request, user: True),
        config_status=web_config.status if web_config else None)
