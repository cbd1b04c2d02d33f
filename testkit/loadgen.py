"""Load generators shared by tests/test_load.py (which asserts) and bench/load.py (which reports):
many keep-alive scrapers, a burst of simultaneous one-shot requests, a slowloris crowd, idle TLS and
silent TCP connections, password guessers, and watches on the exporter's thread count and memory. 127.0.0.1 only; every loop ends by itself."""
from __future__ import annotations

import base64
import http.client
import multiprocessing
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from testkit.processes import http_get, read_until_closed

PROM_ACCEPT = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


class ThreadWatch:
    """The exporter's thread count, sampled every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self) -> "ThreadWatch":
        def watch() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, threads_of(self.pid))
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def metric_values(url: str) -> dict[tuple[str, tuple], float]:
    body = http_get(url + "/metrics")[2].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}


def lateness_within_5ms(before: dict, after: dict) -> tuple[float, float]:
    """(ticks between the two scrapes, share of them started within 5 ms of schedule)."""
    def get(d: dict, le: str | None) -> float:
        if le is None:
            return d[("exporter_sample_lateness_seconds_count", ())]
        return d[("exporter_sample_lateness_seconds_bucket", (("le", le),))]
    ticks = get(after, None) - get(before, None)
    ok = get(after, "0.005") - get(before, "0.005")
    return ticks, ok / ticks if ticks else 1.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def scrape_concurrently(port: int, scrapers: int, seconds: float) -> tuple[list[object], list[float]]:
    """`scrapers` keep-alive clients scraping back to back for `seconds`, as Prometheus does (gzip,
    its Accept header). Returns every status (or the exception) and every latency."""
    statuses: list[object] = []
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def scraper() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine_s, mine_l = [], []
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                conn.request("GET", "/metrics", headers={"Accept": PROM_ACCEPT, "Accept-Encoding": "gzip"})
                r = conn.getresponse()
                r.read()
                mine_s.append(r.status)
            except OSError as exc:
                mine_s.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            mine_l.append(time.monotonic() - t0)
        conn.close()
        with lock:
            statuses.extend(mine_s)
            latencies.extend(mine_l)

    threads = [threading.Thread(target=scraper) for _ in range(scrapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return statuses, latencies


def burst(port: int, n: int) -> list[tuple[object, float]]:
    """n clients released at once, each a new connection with one request: (status or error, seconds)."""
    barrier = threading.Barrier(n, timeout=30)
    results: list[tuple[object, float]] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
                data = read_until_closed(s)
            status: object = int(data.split(b" ", 2)[1])
        except (OSError, IndexError, ValueError) as exc:
            status = repr(exc)
        with lock:
            results.append((status, time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


class SlowLoris:
    """`n` connections each sending a request head at a byte a second, reconnecting when cut, plus `idle`
    connections that send nothing: what an attacker (or a broken client) does to exhaust a server."""

    def __init__(self, port: int, n: int, idle: int) -> None:
        # Its own process: run as a thread, its 400 sockets competed for the GIL with the scraper it is
        # measured against, so the scraper's request could reach the server late for reasons of the test.
        ctx = multiprocessing.get_context("fork")
        self.port, self.n, self.idle = port, n, idle
        self._cut = ctx.Value("i", 0)
        self._stop = ctx.Event()
        self._thread = ctx.Process(target=self._run, daemon=True)

    @property
    def cut(self) -> int:
        """How often the server cut one of the trickling connections (each came back)."""
        return int(self._cut.value)

    def _connect(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            s.setblocking(False)
            return s
        except OSError:
            return None

    def _run(self) -> None:
        head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 10_000
        slow = [[self._connect(), 0] for _ in range(self.n)]
        idle = [self._connect() for _ in range(self.idle)]
        while not self._stop.wait(1.0):
            for entry in slow:
                s, sent = entry
                try:
                    if s is None:
                        raise OSError
                    s.send(head[sent:sent + 1])
                    entry[1] = sent + 1
                except OSError:  # cut by the server: come back, as an attacker would
                    self._cut.value += 1
                    if s is not None:
                        s.close()
                    entry[0], entry[1] = self._connect(), 0
        for s, _ in slow:
            if s is not None:
                s.close()
        for s in idle:
            if s is not None:
                s.close()

    def __enter__(self) -> "SlowLoris":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._thread.is_alive():
            self._thread.kill()


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process from /proc/<pid>/status (VmRSS now, VmHWM peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}: line")


def timed_get(url: str, context: ssl.SSLContext | None = None, headers: dict | None = None,
              timeout: float = 10.0) -> tuple[object, float]:
    """(status or the error, seconds) for one GET on a new connection."""
    t0 = time.monotonic()
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            r.read()
            status: object = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as exc:
        status = repr(exc)
    return status, time.monotonic() - t0


def tls_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def open_tls_idle(port: int, n: int, timeout: float = 10.0) -> list[socket.socket]:
    """n TLS connections that finish the handshake and then send nothing (those the server cut stay
    in the list, closed)."""
    ctx = tls_client_context()
    socks = []
    for _ in range(n):
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            socks.append(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
        except OSError:
            pass
    return socks


def open_silent(port: int, n: int) -> list[socket.socket]:
    """n TCP connections that send nothing at all (no TLS ClientHello, no request)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def basic_auth(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class Crowd:
    """`n` clients each sending `request(client, k)` (returns a status) back to back until the block
    ends; every status is kept."""

    def __init__(self, n: int, request: Callable[[int, int], object]) -> None:
        self.request = request
        self.statuses: list[object] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            k += 1
            self.statuses.append(self.request(i, k))

    def __enter__(self) -> "Crowd":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def guessers(url: str, n: int, context: ssl.SSLContext | None = None) -> Crowd:
    """`n` clients guessing passwords (a new user name and password, on a new connection, each time)."""
    return Crowd(n, lambda i, k: timed_get(url, context, basic_auth(f"guess{i}-{k}", f"pw{k}"))[0])


def repeaters(url: str, n: int, timeout: float = 30) -> Crowd:
    """`n` clients asking for the same URL back to back, each on a new connection."""
    return Crowd(n, lambda i, k: timed_get(url, timeout=timeout)[0])
