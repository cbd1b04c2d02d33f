"""`gpu-telemetry-exporter diagnose --prometheus URL [--instance I] [--at T | --from T --to T]`: the
diagnosis of exporter.diagnosis.rules for a past window, from what a real Prometheus scraped (its HTTP API),
and, where the TTS service exports `tts_real_time_factor` (docs/metrics.md), when the RTF crossed 0.7
and which finding coincides with it.

Prometheus has one point per scrape: gauges are read with query_range at a step near the scrape
interval; counters (clock events, CFS periods, XIDs, sampler overruns) with increase()/rate(), which
keep the sub-scrape resolution the exporter's counters carry.
"""
from __future__ import annotations

import http.client
import json
import math
import re
import ssl
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

from exporter.diagnosis.rules import (DEFAULT_THRESHOLDS, Finding, GpuWindow, Window, coverage, covered_span, diagnose,
                                render_text, report)
from exporter.durations import parse_duration
from exporter.flagparser import FlagParser  # one-line errors, exit 2: the same as the exporter's flags
from exporter.pipeline.histogram import HOST_CPU_BUCKETS, PCIE_BUCKETS, RATIO_BUCKETS

RTF_LIMIT = 0.7  # the checklist's "RTF suddenly > 0.7"
RTF_QUANTILE = 0.95
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_POINTS = 1000  # per series: the step grows with the window beyond this
# One answer is refused past these, counted in its bytes before it is parsed: memory grows with series x
# points (a Python list and float per sample), not with bytes alone. A node has at most a few dozen GPUs
# (x MIG instances); 1 000 points each.
MAX_SERIES = 512
MAX_SAMPLES = 200_000
# Object members (a ":" each, also counting the few in label values): a dict entry per label costs what
# a sample does; ~20 labels a series is usual.
MAX_MEMBERS = MAX_SERIES * 128
DEFAULT_TIMEOUT_S = 60.0  # --timeout: the whole run, every query together
QUERY_TIMEOUT_S = 15.0  # one query, within what is left of --timeout
COINCIDE_MIN_S = 30.0  # the window judged around an RTF crossing: this long (or 2 scrapes) either side
_GPU_LABEL = re.compile(r"[0-9A-Za-z_.:/-]{1,64}")  # a `gpu` label value shown in a report; others skipped
_TIME_TEXT = re.compile(r"^[0-9T:.+\-Zz ]{1,40}$")
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: the last second a datetime (and iso()) can show


class DiagnoseError(Exception):
    """Bad input or an unusable answer: one line for the user, exit 2."""


def _shown(text: str, limit: int = 120) -> str:
    """A string from outside, safe on one line of a terminal: printable, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + ("…" if len(text) >= limit else "")


def parse_time(text: str, now: float) -> float:
    """'now', 'now-10m', unix seconds ('1795543931.5') or RFC 3339 ('2026-11-25T14:30:00Z') -> unix seconds."""
    t = text.strip()
    if t == "now":
        return now
    if t.startswith("now-"):
        try:
            return now - parse_duration(t[4:])
        except ValueError:
            pass
    elif re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", t):
        return float(t)
    elif _TIME_TEXT.match(t):
        try:
            parsed = datetime.fromisoformat(t[:-1] + "+00:00" if t[-1:] in "Zz" else t)
        except ValueError:
            pass
        else:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    raise DiagnoseError(f"invalid time {text!r}: want now, now-10m, unix seconds or 2026-11-25T14:30:00Z")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. "http://[::1": an unclosed IPv6 bracket
        parts = urllib.parse.urlsplit("")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise DiagnoseError(f"invalid --prometheus URL {url!r}: spaces or control characters in it")
    if parts.username is not None:  # urllib would take "user:pw@host" for a host name and print the password
        raise DiagnoseError("invalid --prometheus URL: credentials in the URL are not supported")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise DiagnoseError(f"invalid --prometheus URL {url!r}: want http(s)://host:port[/path]")
    try:
        parts.port  # raises on a bad port
    except ValueError:
        raise DiagnoseError(f"invalid --prometheus URL {url!r}: bad port") from None
    return url.rstrip("/")


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the --prometheus origin (a path prefix, a trailing slash): one to
    another host, port or scheme is refused and named, not followed silently."""

    def __init__(self, base: str) -> None:
        self.origin = _origin(base)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if _origin(target) != self.origin:
            raise DiagnoseError(f"Prometheus at {self.origin} redirected to {_shown(target)} (another host, "
                                "port or scheme): refused; give that URL as --prometheus if it is the one")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _origin(url: str) -> str:
    try:
        p = urllib.parse.urlsplit(url)
        return f"{p.scheme}://{p.hostname}:{p.port or {'http': 80, 'https': 443}.get(p.scheme)}"
    except ValueError:
        return "?"


MAX_SECRET_BYTES = 4096  # a password or bearer token file; more is not a credential
MAX_CA_BYTES = 1024 * 1024  # a PEM bundle of CA certificates (the system's whole bundle is ~200 KiB)
PASSWORD_ENV = "DIAGNOSE_PROMETHEUS_PASSWORD"  # the basic-auth password, where no file is given


def _read_bounded(path: str, limit: int, flag: str) -> bytes:
    """At most `limit` bytes of a regular file named by `flag`: else one line (exit 2), naming the file,
    never its content. A FIFO or a device would block or never end: refused before it is opened."""
    import os
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DiagnoseError(f"{flag} {_shown(path)}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise DiagnoseError(f"{flag} {_shown(path)}: cannot read it ({_shown(exc.strerror or str(exc))})") from None
    if len(data) > limit:
        raise DiagnoseError(f"{flag} {_shown(path)}: larger than {limit} bytes")
    return data


def _secret(data: bytes, what: str) -> str:
    """A password or token as Prometheus reads its *_file settings: surrounding whitespace trimmed; it
    must be printable text on one line (it goes into an HTTP header)."""
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        raise DiagnoseError(f"{what}: not UTF-8 text") from None
    if not text:
        raise DiagnoseError(f"{what}: empty")
    if not all(c.isprintable() for c in text):
        raise DiagnoseError(f"{what}: control characters or several lines in it")
    return text


@dataclass(frozen=True)
class Access:
    """How to reach a protected Prometheus, as its own client settings (basic_auth with password_file,
    bearer_token_file, tls_config.ca_file): `authorization` is the header's value, sent only to the
    --prometheus origin; `ca_pem` the CA certificates to verify its TLS certificate with, in place of
    the system's (there is no skip-verify: TLS fails closed)."""

    authorization: str | None = None
    ca_pem: str | None = None

    def __repr__(self) -> str:  # a report, a log or a traceback never shows the credential
        return f"Access(authorization={'<hidden>' if self.authorization else None}, ca_pem={self.ca_pem is not None})"

    @classmethod
    def from_flags(cls, user: str, password_file: str, token_file: str, ca_file: str, environ=None) -> "Access":
        import base64
        import os

        env = os.environ if environ is None else environ
        password = None
        if password_file:
            password = _secret(_read_bounded(password_file, MAX_SECRET_BYTES, "--prometheus.basic-auth-password-file"),
                               f"--prometheus.basic-auth-password-file {_shown(password_file)}")
        elif user and env.get(PASSWORD_ENV):  # read only for basic auth: a stray variable changes nothing else
            password = _secret(env[PASSWORD_ENV].encode(errors="replace"), PASSWORD_ENV)
        if password is not None and not user:
            raise DiagnoseError("a basic-auth password needs --prometheus.basic-auth-user")
        if ":" in user or not all(c.isprintable() for c in user):
            raise DiagnoseError("--prometheus.basic-auth-user: no colon or control characters in a user name")
        if user and password is None:
            raise DiagnoseError(f"--prometheus.basic-auth-user needs a password: --prometheus.basic-auth-password-file "
                                f"FILE or the environment variable {PASSWORD_ENV} (never on the command line)")
        if user and token_file:
            raise DiagnoseError("give either basic auth or --prometheus.bearer-token-file, not both")
        authorization = None
        if user:
            authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        elif token_file:
            token = _secret(_read_bounded(token_file, MAX_SECRET_BYTES, "--prometheus.bearer-token-file"),
                            f"--prometheus.bearer-token-file {_shown(token_file)}")
            authorization = f"Bearer {token}"
        ca_pem = None
        if ca_file:
            try:
                ca_pem = _read_bounded(ca_file, MAX_CA_BYTES, "--prometheus.ca-file").decode("ascii")
            except UnicodeDecodeError:
                raise DiagnoseError(f"--prometheus.ca-file {_shown(ca_file)}: not a PEM file") from None
            if "-----BEGIN CERTIFICATE-----" not in ca_pem:
                raise DiagnoseError(f"--prometheus.ca-file {_shown(ca_file)}: no PEM certificate in it")
        return cls(authorization, ca_pem)

    def tls_context(self) -> ssl.SSLContext:
        """Verifies the server's certificate and name: with the CA file's certificates only, else the system's."""
        return ssl.create_default_context(cadata=self.ca_pem)


class _Authorize(urllib.request.BaseHandler):
    """Adds the Authorization header to every request for the --prometheus origin, redirects within it
    included, and to no other (a redirect elsewhere is refused anyway: this holds if that ever changed)."""

    handler_order = 900  # after urllib's own processors

    def __init__(self, base: str, authorization: str) -> None:
        self.origin = _origin(base)
        self._authorization = authorization

    def http_request(self, req):
        if _origin(req.full_url) == self.origin:
            req.add_unredirected_header("Authorization", self._authorization)
        else:
            req.remove_header("Authorization")
        return req

    https_request = http_request


class Prometheus:
    """The few calls of Prometheus's HTTP API this needs (GET /api/v1/query and /api/v1/query_range).

    Every answer is untrusted: bounded in bytes, series and samples before it is parsed; its timestamps
    must be finite and between 1970 and 9999 (else: not a Prometheus answer, exit 2); values may be
    NaN or ±Inf (Prometheus writes those) and are read as "no value" by the callers. All queries share one
    deadline (`timeout_s` for the whole run), each at most `query_timeout_s`."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, query_timeout_s: float = QUERY_TIMEOUT_S,
                 clock=time.monotonic, access: Access = Access()) -> None:
        self.url = check_url(url)
        tls = urllib.parse.urlsplit(self.url).scheme == "https"
        if access.ca_pem is not None and not tls:
            raise DiagnoseError("--prometheus.ca-file is for an https:// --prometheus URL")
        self.timeout_s = timeout_s
        self.query_timeout_s = query_timeout_s
        self._clock = clock
        self._deadline = clock() + timeout_s
        self.queries = 0
        handlers: list[urllib.request.BaseHandler] = [_SameOrigin(self.url)]
        if tls:
            try:
                handlers.append(urllib.request.HTTPSHandler(context=access.tls_context()))
            except (ssl.SSLError, ValueError) as exc:
                raise DiagnoseError(f"--prometheus.ca-file: not usable CA certificates ({_shown(str(exc))})") from None
        if access.authorization is not None:
            handlers.append(_Authorize(self.url, access.authorization))
        self._opener = urllib.request.build_opener(*handlers)

    def _get(self, path: str, params: dict, samples: str = "value") -> list[dict]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        query = _shown(params.get("query", ""), 100)
        try:
            body = self._fetch(url)
        except urllib.error.HTTPError as exc:  # Prometheus explains a bad query in the JSON body
            try:
                reason = json.loads(getattr(exc, "body", b"")).get("error", "")
            except (ValueError, AttributeError, RecursionError):
                reason = ""
            hint = ("; give its credentials: --prometheus.basic-auth-user with a password file, or "
                    "--prometheus.bearer-token-file") if exc.code in (401, 403) else ""
            raise DiagnoseError(f"Prometheus at {self.url} answered {exc.code}: "
                                f"{_shown(str(reason or exc.reason))}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DiagnoseError(f"cannot reach Prometheus at {self.url}: {_shown(str(reason))}") from None
        except http.client.HTTPException as exc:  # not an OSError: a bad status line, 101 headers, ...
            raise DiagnoseError(f"{self.url} did not answer HTTP as a Prometheus server does: "
                                f"{_shown(f'{type(exc).__name__}: {exc}')}") from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise DiagnoseError(f"Prometheus at {self.url}: answer over {MAX_RESPONSE_BYTES} bytes to {query}; "
                                "narrow the window")
        # Counted in the bytes, before json.loads builds an object per sample: every series has a
        # "metric", every sample (and every series' list of them) a "[".
        if body.count(b'"metric"') > MAX_SERIES:
            raise DiagnoseError(f"Prometheus at {self.url}: more than {MAX_SERIES} series for {query}; "
                                "narrow --instance")
        if body.count(b":") > MAX_MEMBERS:
            raise DiagnoseError(f"Prometheus at {self.url}: more than {MAX_MEMBERS} labels for {query}; "
                                "narrow --instance")
        if body.count(b"[") > MAX_SAMPLES:
            raise DiagnoseError(f"Prometheus at {self.url}: more than {MAX_SAMPLES} samples for {query}; "
                                "narrow the window")
        try:
            doc = json.loads(body)
            if doc["status"] != "success":
                raise DiagnoseError(f"Prometheus at {self.url}: {_shown(str(doc.get('error', 'query failed')))}")
            return _checked(doc["data"]["result"], samples)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError, OverflowError):
            # RecursionError: JSON nested thousands deep
            raise DiagnoseError(f"{self.url} did not answer like a Prometheus server ({path})") from None

    def _fetch(self, url: str) -> bytes:
        """The body of GET url, within what is left of the run's deadline: urllib's timeout bounds each
        socket read, so a server sending a byte at a time would hold us for as long as it liked. The
        request runs on a daemon thread that is abandoned (and ends with the process) past the deadline."""
        left = self._deadline - self._clock()
        if left <= 0:
            raise self._late()
        wait = min(self.query_timeout_s, left)
        self.queries += 1
        outcome: list[bytes | BaseException] = []

        def get() -> None:
            try:
                with self._opener.open(url, timeout=wait) as r:
                    outcome.append(r.read(MAX_RESPONSE_BYTES + 1))
            except urllib.error.HTTPError as exc:
                exc.body = exc.read(64 * 1024)  # type: ignore[attr-defined]  # read within the deadline too
                outcome.append(exc)
            except BaseException as exc:  # handed to the caller's thread
                outcome.append(exc)

        worker = threading.Thread(target=get, name="prometheus-query", daemon=True)
        worker.start()
        worker.join(wait)
        if not outcome:
            if wait < self.query_timeout_s:
                raise self._late()
            raise DiagnoseError(f"Prometheus at {self.url} did not answer within {wait:g}s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _late(self) -> DiagnoseError:
        return DiagnoseError(f"no report within --timeout {self.timeout_s:g}s ({self.queries} queries to "
                             f"{self.url} asked); raise --timeout or narrow the window")

    def instant(self, expr: str, at: float) -> list[dict]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})

    def raw(self, selector: str, at: float) -> list[dict]:
        """The stored samples of a range selector (`metric{...}[5m]`) ending at `at`."""
        return self._get("/api/v1/query", {"query": selector, "time": f"{at:.3f}"}, "values")

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step:.3f}"}, "values")


def _checked(result: list, key: str) -> list[dict]:
    """The vector/matrix shape this module reads, every sample a number and every timestamp one that a
    date can show: else ValueError."""
    if not isinstance(result, list):
        raise ValueError("result is not a list")
    for series in result:
        labels = series["metric"]
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValueError("bad labels")
        samples = series["values"] if key == "values" else [series["value"]]
        if not isinstance(samples, list):
            raise ValueError("bad samples")
        for t, v in samples:
            if not isinstance(v, str):
                raise ValueError("value not a string")
            float(v)
            if not (isinstance(t, (int, float)) and 0 <= float(t) <= MAX_TIME):  # also NaN, ±Inf
                raise ValueError("timestamp out of range")
    return result


def _number(text: str, low: float = -math.inf, high: float = math.inf) -> float | None:
    """A sample value, None where it is NaN, ±Inf or outside [low, high] (a value no exporter writes)."""
    v = float(text)
    return v if math.isfinite(v) and low <= v <= high else None


def _scalar(result: list[dict], low: float = -math.inf, high: float = math.inf) -> float | None:
    values = [_number(r["value"][1], low, high) for r in result]
    return next((v for v in values if v is not None), None)


RATIO_RANGE = (-1e-9, 2.0)  # every series read by query_range is a ratio (or 0/1): outside this, no value


def _aligned(result: list[dict], start: float, step: float, points: int,
             key: str | tuple[str, ...] | None = None) -> dict:
    """query_range result -> {label value (or "", or a tuple of them for a tuple key): `points` values
    from start every step, None where absent or not a plausible ratio}. A series whose `gpu` label is not
    a GPU id is skipped (it would be shown in the report)."""
    out: dict = {}
    low, high = RATIO_RANGE
    for series in result:
        labels = series["metric"]
        if "gpu" in labels and not _GPU_LABEL.fullmatch(labels["gpu"]):
            continue
        name = (tuple(labels.get(k, "") for k in key) if isinstance(key, tuple)
                else labels.get(key, "") if key else "")
        row = out.setdefault(name, [None] * points)
        for t, v in series["values"]:
            i = round((float(t) - start) / step)
            value = _number(v, low, high)
            if 0 <= i < points and value is not None:
                row[i] = min(max(value, 0.0), high)
    return out


class PromWindow:
    """Builds the diagnosis Window for one exporter instance and [start, end] from Prometheus.

    Every share, peak and mean is over the steps that hold a value: a gauge's last sample counts for at
    most 1.5 scrape intervals (last_over_time), so a hole (failed scrapes, a stopped exporter) is no value,
    not its last value repeated, and counters are read per step with irate() (resets handled), never
    divided by the window's length. The covered span comes from the successful scrapes (up == 1) by the
    same rule as the live history (rules.covered_span)."""

    def __init__(self, prom: Prometheus, instance: str) -> None:
        self.prom = prom
        self.sel = f'instance="{_escape(instance)}"'
        self._scrapes: dict[tuple[float, float], tuple[list[float], list[float]]] = {}

    def step(self, start: float, end: float) -> float:
        """The query_range step: about the scrape interval, in whole milliseconds (as Prometheus keeps it)."""
        return round(max(self.scrape_interval(start, end), (end - start) / MAX_POINTS), 3)

    def scrapes(self, start: float, end: float) -> tuple[list[float], list[float]]:
        """(times of the instance's scrapes in [start, end], those that succeeded (up == 1))."""
        key = (start, end)
        if key not in self._scrapes:
            every: set[float] = set()
            ok: set[float] = set()
            for r in self.prom.raw(f"up{{{self.sel}}}[{_secs(end - start)}]", end):
                for t, v in r["values"]:
                    if start <= float(t) <= end:
                        every.add(float(t))
                        if _number(v) == 1:
                            ok.add(float(t))
            self._scrapes[key] = (sorted(every), sorted(ok))
        return self._scrapes[key]

    def scrape_interval(self, start: float, end: float) -> float:
        """The median gap between the instance's scrapes (its `up` samples) in the window."""
        stamps, ok = self.scrapes(start, end)
        if len(stamps) < 2:
            raise DiagnoseError(f"fewer than 2 scrapes of {_shown(self.sel)} between {iso(start)} and {iso(end)}")
        if not ok:
            raise DiagnoseError(f"no successful scrape (up == 1) of {_shown(self.sel)} between {iso(start)} and "
                                f"{iso(end)}: the exporter was down")
        return max(0.5, statistics.median(b - a for a, b in zip(stamps, stamps[1:])))

    def build(self, start: float, end: float) -> Window:
        scrape = self.scrape_interval(start, end)
        ok = self.scrapes(start, end)[1]
        step = self.step(start, end)
        points = int((end - start) / step) + 1
        # Steps counted back from `end`, so the latest scrape is always in: counted from `start`, a step a
        # little over the scrape interval (15.006 s) left up to one whole scrape out at the end.
        first = round(end - (points - 1) * step, 3)
        rate_w = _secs(max(4 * scrape, 2 * step))
        look = _secs(max(1.5 * scrape, step))  # a gauge's sample stands for this long, not 5 min
        span = _secs(end - start)
        q = lambda expr, key=None: _aligned(self.prom.range(expr, first, end, step), first, step, points, key)  # noqa: E731
        gauge = lambda metric: q(f"last_over_time({metric}[{look}])", "gpu")  # noqa: E731
        s = self.sel
        per_gpu = {
            "utilization": gauge(f"gpu_utilization_ratio{{{s}}}"),
            "memory_used_ratio": gauge(f"gpu_memory_used_ratio{{{s}}}"),
            "pcie_tx": gauge(f'gpu_pcie_utilization_ratio{{{s},direction="tx"}}'),
            "pcie_rx": gauge(f'gpu_pcie_utilization_ratio{{{s},direction="rx"}}'),
            "health": {g: [None if v is None else 1.0 - min(v, 1.0) for v in vals]
                       for g, vals in gauge(f"gpu_up{{{s}}}").items()},
        }
        info = self.prom.instant(f"last_over_time(gpu_info{{{s}}}[{span}])", end)
        names = {r["metric"].get("gpu", ""): _shown(r["metric"].get("name", ""), 64) for r in info
                 if _GPU_LABEL.fullmatch(r["metric"].get("gpu", ""))}
        mig = {r["metric"].get("gpu", "") for r in self.prom.instant(
            f"last_over_time(gpu_mig_memory_total_bytes{{{s}}}[{span}])", end)}
        # Per step, the share of time each reason was active between the step's last two scrapes (irate:
        # rate() divides by the whole range, so it reads low where the data begins or resumes); the share
        # is the mean over the steps with data.
        clock: dict[str, dict[str, float]] = {}
        for (gpu, reason), vals in q(f"irate(gpu_clock_event_seconds_total{{{s}}}[{look}])", ("gpu", "reason")).items():
            present = [v for v in vals if v is not None]
            if present:
                clock.setdefault(gpu, {})[reason] = min(1.0, sum(present) / len(present))
        xids: dict[str, dict[int, float]] = {}
        for r in self.prom.instant(f"increase(gpu_xid_errors_total{{{s}}}[{span}])", end):
            n = _number(r["value"][1], 0.0, 1e9)
            gpu, code = r["metric"].get("gpu", ""), r["metric"].get("xid", "")
            if n is not None and n >= 0.5 and _GPU_LABEL.fullmatch(gpu) and re.fullmatch(r"[0-9]{1,4}", code):
                xids.setdefault(gpu, {})[int(code)] = n
        gpus = sorted(set(names) | set(per_gpu["utilization"]) | set(per_gpu["health"]), key=_gpu_order)
        empty = [None] * points
        # The sample histograms keep every tick between scrapes: shares per step where a threshold is a bucket.
        hist_w = _secs(3 * scrape)
        th = DEFAULT_THRESHOLDS
        starved = self._hist_share(q, "gpu_sampled_utilization_ratio", RATIO_BUCKETS, th.starved_utilization, "gpu",
                                   hist_w)
        pcie_sat = {d: self._hist_share(q, "gpu_sampled_pcie_utilization_ratio", PCIE_BUCKETS, th.pcie_saturated,
                                        "gpu", hist_w, above=True, extra=f',direction="{d}"') for d in ("rx", "tx")}
        host_busy = self._hist_share(q, "host_sampled_cpu_utilization_ratio", HOST_CPU_BUCKETS, th.host_cpu_busy,
                                     None, hist_w, above=True)
        window_gpus = tuple(GpuWindow(
            gpu=g, name=names.get(g, ""), mig=g in mig,
            **{f: per_gpu[f].get(g, empty) for f in per_gpu},
            clock_events=clock.get(g, {}), xid_events=round(sum(xids.get(g, {}).values())),
            xid_codes=tuple(sorted(xids.get(g, {}))),
            starved_share=starved.get(g) if starved is not None else None,
            # without the histogram (not scraped, an older exporter) the gauges decide, not an empty share
            pcie_saturated_share={d: v[g] for d, v in pcie_sat.items() if v is not None and g in v} or None,
        ) for g in gpus)
        host_cpu = q(f"last_over_time(host_cpu_utilization_ratio{{{s}}}[{look}])").get("", empty)
        throttled = q(f"rate(cgroup_cpu_throttled_periods_total{{{s}}}[{rate_w}]) / "
                      f"rate(cgroup_cpu_periods_total{{{s}}}[{rate_w}])").get("", [])
        size_range = (0.0, float(1 << 62))
        shm_size = _scalar(self.prom.instant(f"max_over_time(host_shm_size_bytes{{{s}}}[{span}])", end), *size_range)
        shm_used = _scalar(self.prom.instant(f"max_over_time(host_shm_used_bytes{{{s}}}[{span}])", end), *size_range)
        shm_path = next((_shown(r["metric"].get("path", ""), 200) for r in self.prom.instant(
            f"last_over_time(host_shm_size_bytes{{{s}}}[{span}])", end)), None)
        interval = _scalar(self.prom.instant(f"last_over_time(exporter_sample_interval_seconds{{{s}}}[{span}])",
                                             end), 1e-3, 86400.0)
        nvml = _scalar(self.prom.instant(f"last_over_time(exporter_nvml_up{{{s}}}[{span}])", end))
        return Window(
            seconds=covered_span(ok, scrape, end - start), requested_s=end - start, data_from=ok[0],
            interval_s=interval or scrape, host_cpu=host_cpu, cgroup_throttled=throttled,
            gpus=window_gpus, host_busy_share=host_busy.get("") if host_busy is not None else None,
            shm_path=shm_path, shm_size_bytes=None if shm_size is None else int(shm_size),
            shm_used_bytes=None if shm_used is None else int(shm_used),
            sampler_late_share=self.sampler_late(end, span, interval),
            nvml_message="" if window_gpus else ("NVML is down" if nvml == 0 else "NVML reports no GPU"))

    def _hist_share(self, q, metric: str, buckets: tuple[float, ...], threshold: float, by: str | None,
                    rate_w: str, above: bool = False, extra: str = "") -> dict[str, list[float | None]] | None:
        """Per step and `by` label: the share of a sample histogram's observations at or below threshold (or
        above it); None when the threshold is not one of that histogram's `buckets`."""
        if threshold not in buckets:
            return None
        group = f"sum by ({by})" if by else "sum"
        below = (f'{group} (rate({metric}_bucket{{{self.sel}{extra},le="{threshold:g}"}}[{rate_w}])) / '
                 f'{group} (rate({metric}_count{{{self.sel}{extra}}}[{rate_w}]))')
        return q(f"1 - ({below})" if above else below, by)

    def sampler_late(self, end: float, span: str, interval: float | None) -> float | None:
        """Share of ticks skipped (overruns) or late by more than (late_intervals - 1) intervals."""
        if not interval:
            return None
        late_by = (DEFAULT_THRESHOLDS.sampler_late_intervals - 1) * interval
        buckets = self.prom.instant(f"increase(exporter_sample_lateness_seconds_bucket{{{self.sel}}}[{span}])", end)
        counts = ((_le(r["metric"].get("le", "")), _number(r["value"][1], 0.0, 1e15)) for r in buckets)
        bounds = sorted((le, n) for le, n in counts if le is not None and n is not None)
        on_time = next((n for le, n in bounds if le >= late_by), None)
        total = bounds[-1][1] if bounds else 0.0
        overruns = _scalar(self.prom.instant(f"increase(exporter_sample_overruns_total{{{self.sel}}}[{span}])", end),
                           0.0, 1e15)
        if on_time is None or total + (overruns or 0) <= 0:
            return None
        return ((total - on_time) + (overruns or 0)) / (total + (overruns or 0))


def _le(label: str) -> float | None:
    """A histogram bucket's `le` label (from a server we do not control): a number or +Inf, else None."""
    if not re.fullmatch(r"[0-9.eE+-]{1,32}|\+Inf", label):
        return None
    try:
        le = float(label)
    except ValueError:
        return None
    return None if math.isnan(le) else le


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _secs(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def _gpu_order(gpu: str) -> tuple[int, str]:
    """GPU ids in numeric order (str.isdigit() takes "²", which int() does not: a regex decides)."""
    return (int(gpu), "") if re.fullmatch(r"[0-9]{1,9}", gpu) else (1 << 30, gpu)


def rtf_crossing(prom: Prometheus, selector: str, start: float, end: float, step: float,
                 rate_w: str) -> tuple[float, float, bool] | float | None:
    """(first time the RTF p95 was above 0.7 in [start, end], peak p95, whether it already was at the
    window's start); the peak p95 alone when it never was; None when there was no RTF to judge."""
    expr = (f"histogram_quantile({RTF_QUANTILE}, sum by (le) "
            f"(rate(tts_real_time_factor_bucket{selector}[{rate_w}])))")
    read = [(float(t), _number(v, 0.0, 1e6)) for r in prom.range(expr, start, end, step) for t, v in r["values"]]
    points = sorted((t, v) for t, v in read if v is not None and start - step <= t <= end + step)
    above = [t for t, v in points if v > RTF_LIMIT]
    if not points:
        return None
    return (above[0], max(v for _, v in points), above[0] < start + step / 2) if above else max(v for _, v in points)


def find_instance(prom: Prometheus, end: float, span: str) -> str:
    found = sorted({r["metric"].get("instance", "") for r in prom.instant(
        f"last_over_time(exporter_sample_interval_seconds[{span}])", end)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise DiagnoseError("no gpu-telemetry-exporter instance in that window (no exporter_sample_interval_seconds "
                            "series): has Prometheus scraped the exporter yet? See its targets page (up)")
    shown = ", ".join(_shown(i, 80) for i in found[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
    raise DiagnoseError("several exporter instances; pick one with --instance: " + shown)


def _parser():
    p = FlagParser(prog="gpu-telemetry-exporter diagnose",
                description="Diagnose a past window (why the TTS real-time factor jittered) from a Prometheus "
                            "that scraped the exporter.")
    p.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://prometheus:9090")
    p.add_argument("--prometheus.basic-auth-user", dest="auth_user", default="",
                   help="basic auth user for Prometheus; the password from --prometheus.basic-auth-password-file "
                        f"or the environment variable {PASSWORD_ENV}, never the command line")
    p.add_argument("--prometheus.basic-auth-password-file", dest="password_file", default="",
                   help="file holding the basic auth password (surrounding whitespace trimmed)")
    p.add_argument("--prometheus.bearer-token-file", dest="token_file", default="",
                   help="file holding a bearer token for Prometheus (e.g. a service account token)")
    p.add_argument("--prometheus.ca-file", dest="ca_file", default="",
                   help="PEM CA certificate(s) to verify an https:// Prometheus with, instead of the system's")
    p.add_argument("--instance", default="", help="the exporter's instance label (needed when several)")
    p.add_argument("--at", default="", help="end of the window (default now): now, now-10m, unix seconds, RFC 3339")
    p.add_argument("--window", default="5m", help="with --at: how far back (default 5m)")
    p.add_argument("--from", dest="start", default="", help="start of the window (with --to)")
    p.add_argument("--to", dest="end", default="", help="end of the window (with --from)")
    p.add_argument("--rtf-selector", default="{}",
                   help='PromQL label matchers for tts_real_time_factor, e.g. {job="tts"} (default: all)')
    p.add_argument("--timeout", default="60s",
                   help="give up (exit 2) when the whole run takes longer than this (default 60s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def window_bounds(at: str, window: str, start: str, end: str, now: float) -> tuple[float, float]:
    if (start or end) and at:
        raise DiagnoseError("give either --at or --from/--to, not both")
    if bool(start) != bool(end):
        raise DiagnoseError("--from and --to go together")
    if start:
        t0, t1 = parse_time(start, now), parse_time(end, now)
    else:
        try:
            length = parse_duration(window)
        except ValueError as exc:
            raise DiagnoseError(f"--window: {exc}") from None
        t1 = parse_time(at or "now", now)
        t0 = t1 - length
    if not (0 <= t0 and t1 <= MAX_TIME):
        raise DiagnoseError("window out of range: want times between 1970 and 9999")
    if not t0 < t1:
        raise DiagnoseError(f"empty window: {iso(t0)} is not before {iso(t1)}")
    if t1 - t0 > 7 * 86400:
        raise DiagnoseError("window longer than 7 days: narrow it to the moment the RTF spiked")
    return t0, t1


def run(argv: Sequence[str], now: float | None = None) -> str:
    """The report for the command line: text, or JSON with --json."""
    a = _parser().parse_args(argv)
    now = time.time() if now is None else now
    start, end = (round(t, 3) for t in window_bounds(a.at, a.window, a.start, a.end, now))
    if not re.fullmatch(r"\{[^{}]{0,500}\}", a.rtf_selector):
        raise DiagnoseError(f"invalid --rtf-selector {a.rtf_selector!r}: want PromQL matchers in braces")
    try:
        timeout = parse_duration(a.timeout)
    except ValueError as exc:
        raise DiagnoseError(f"--timeout: {exc}") from None
    if not 0 < timeout <= 86400:
        raise DiagnoseError("--timeout: want more than 0 and at most 1 day")
    access = Access.from_flags(a.auth_user, a.password_file, a.token_file, a.ca_file)
    prom = Prometheus(a.prometheus, timeout_s=timeout, access=access)
    instance = a.instance or find_instance(prom, end, _secs(end - start))
    source = PromWindow(prom, instance)
    w = source.build(start, end)
    findings = diagnose(w)
    doc = report(w, findings)
    doc.update(instance=instance, start=iso(start), end=iso(end),
               data_from=iso(w.data_from) if w.data_from is not None else None)
    text = [f"Diagnosis of {_shown(instance)} from {iso(start)} to {iso(end)} ({len(w.gpus)} GPU(s)); {coverage(w)}"
            + (f", from {iso(w.data_from)}" if w.data_from is not None and w.data_from > start + 2 * w.interval_s
               and w.seconds < (end - start) else "") + ":", render_text(findings)]
    scrape = source.scrape_interval(start, end)
    crossing = rtf_crossing(prom, a.rtf_selector, start, end, source.step(start, end), _secs(4 * scrape))
    if crossing is None or isinstance(crossing, float):
        doc["rtf"] = None
        text.append(f"RTF: tts_real_time_factor{a.rtf_selector} was not scraped in this window." if crossing is None
                    else f"RTF: p{RTF_QUANTILE * 100:g} of tts_real_time_factor{a.rtf_selector} stayed at or below "
                    f"{RTF_LIMIT} (peak {crossing:.2f}).")
    else:
        at, peak, already = crossing
        around = coinciding_window(at, scrape)
        near = diagnose(source.build(*around)) if len(source.scrapes(*around)[1]) >= 2 else findings
        coincides = _first_abnormal(near)
        doc["rtf"] = {"crossed_at": iso(at), "above_from_start": already, "peak": round(peak, 3), "limit": RTF_LIMIT,
                      "judged_from": iso(around[0]), "judged_to": iso(around[1]),
                      "coinciding": coincides.to_dict() if coincides else None}
        when = f"was above {RTF_LIMIT} from the window's start, {iso(at)}" if already else \
            f"crossed {RTF_LIMIT} at {iso(at)}"
        text.append(f"RTF: p{RTF_QUANTILE * 100:g} {when} (peak {peak:.2f}); "
                    + (f"coinciding finding: {coincides.title} ({coincides.rule}): {coincides.evidence}"
                       if coincides else "no finding coincides: look inside the TTS service."))
    return json.dumps(doc, indent=1) + "\n" if a.json else "\n".join(text) + "\n"


def coinciding_window(at: float, scrape: float) -> tuple[float, float]:
    """What is judged for the finding that coincides with an RTF crossing at `at`: a short window centred
    on it, max(30 s, 2 scrape intervals) either side. A cause that starts at the crossing fills half of it,
    one that starts d seconds after fills (half - d) / (2 half): over the 20 % starved share up to
    d = 0.6 half (18 s at 30 s), so a cause up to one scrape interval late is still found, and one that
    ended more than `half` before the crossing is not in it at all."""
    half = max(COINCIDE_MIN_S, 2 * scrape)
    return round(max(0.0, at - half), 3), round(min(MAX_TIME, at + half), 3)


def _first_abnormal(findings: list[Finding]) -> Finding | None:
    return next((f for f in findings if f.severity in ("critical", "warning")), None)


def main(argv: Sequence[str]) -> int:
    try:
        out = run(argv)
    except DiagnoseError as exc:
        print(f"gpu-telemetry-exporter diagnose: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a case the checks above missed: still one line for the user, never a traceback
        print(f"gpu-telemetry-exporter diagnose: internal error ({type(exc).__name__}: {_shown(str(exc))}); "
              "please report it", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


__all__ = ["Access", "DiagnoseError", "Prometheus", "PromWindow", "main", "parse_time", "run"]
