"""`gpu-telemetry-exporter diagnose --prometheus URL [--instance I] [--at T | --from T --to T]`: the
diagnosis of exporter.diagnosis for a past window, from what a real Prometheus scraped (its HTTP API),
and, where the TTS service exports `tts_real_time_factor` (docs/metrics.md), when the RTF crossed 0.7
and which finding coincides with it.

Prometheus has one point per scrape: gauges are read with query_range at a step near the scrape
interval; counters (clock events, CFS periods, XIDs, sampler overruns) with increase()/rate(), which
keep the sub-scrape resolution the exporter's counters carry.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Sequence

from exporter.diagnosis import DEFAULT_THRESHOLDS, Finding, GpuWindow, Window, diagnose, render_text, report
from exporter.durations import parse_duration
from exporter.flagparser import FlagParser  # one-line errors, exit 2: the same as the exporter's flags
from exporter.histogram import HOST_CPU_BUCKETS, PCIE_BUCKETS, RATIO_BUCKETS

RTF_LIMIT = 0.7  # the checklist's "RTF suddenly > 0.7"
RTF_QUANTILE = 0.95
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_POINTS = 1000  # per series: the step grows with the window beyond this
COINCIDE_BEFORE_S = 60.0  # the window diagnosed around an RTF crossing: this long before it ...
COINCIDE_AFTER_S = 15.0  # ... and this long after
_TIME_TEXT = re.compile(r"^[0-9T:.+\-Zz ]{1,40}$")
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: the last second a datetime (and iso()) can show


class DiagnoseError(Exception):
    """Bad input or an unusable answer: one line for the user, exit 2."""


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


class Prometheus:
    """The few calls of Prometheus's HTTP API this needs (GET /api/v1/query and /api/v1/query_range)."""

    def __init__(self, url: str, timeout_s: float = 15.0) -> None:
        self.url = check_url(url)
        self.timeout_s = timeout_s

    def _get(self, path: str, params: dict, samples: str = "value") -> list[dict]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            body = self._fetch(url)
        except urllib.error.HTTPError as exc:  # Prometheus explains a bad query in the JSON body
            try:
                reason = json.loads(getattr(exc, "body", b"")).get("error", "")
            except (ValueError, AttributeError, RecursionError):
                reason = ""
            raise DiagnoseError(f"Prometheus at {self.url} answered {exc.code}: {reason or exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DiagnoseError(f"cannot reach Prometheus at {self.url}: {reason}") from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise DiagnoseError(f"Prometheus at {self.url}: answer over {MAX_RESPONSE_BYTES} bytes; narrow the window")
        try:
            doc = json.loads(body)
            if doc["status"] != "success":
                raise DiagnoseError(f"Prometheus at {self.url}: {doc.get('error', 'query failed')}")
            return _checked(doc["data"]["result"], samples)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
            # RecursionError: JSON nested thousands deep
            raise DiagnoseError(f"{self.url} did not answer like a Prometheus server ({path})") from None

    def _fetch(self, url: str) -> bytes:
        """The body of GET url, with one deadline for the whole exchange: urllib's timeout bounds each
        socket read, so a server sending a byte at a time would hold us for as long as it liked. The
        request runs on a daemon thread that is abandoned (and ends with the process) past the deadline."""
        outcome: list[bytes | BaseException] = []

        def get() -> None:
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as r:
                    outcome.append(r.read(MAX_RESPONSE_BYTES + 1))
            except urllib.error.HTTPError as exc:
                exc.body = exc.read(64 * 1024)  # type: ignore[attr-defined]  # read within the deadline too
                outcome.append(exc)
            except BaseException as exc:  # handed to the caller's thread
                outcome.append(exc)

        worker = threading.Thread(target=get, name="prometheus-query", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if not outcome:
            raise DiagnoseError(f"Prometheus at {self.url} did not answer within {self.timeout_s:g}s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def instant(self, expr: str, at: float) -> list[dict]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})

    def raw(self, selector: str, at: float) -> list[dict]:
        """The stored samples of a range selector (`metric{...}[5m]`) ending at `at`."""
        return self._get("/api/v1/query", {"query": selector, "time": f"{at:.3f}"}, "values")

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step:.3f}"}, "values")


def _checked(result: list, key: str) -> list[dict]:
    """The vector/matrix shape this module reads, with every sample a number: else ValueError."""
    if not isinstance(result, list):
        raise ValueError("result is not a list")
    for series in result:
        labels = series["metric"]
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValueError("bad labels")
        for t, v in series["values"] if key == "values" else [series["value"]]:
            float(v)
            if not math.isfinite(float(t)):
                raise ValueError("timestamp not finite")
    return result


def _scalar(result: list[dict]) -> float | None:
    values = [float(r["value"][1]) for r in result]
    values = [v for v in values if not math.isnan(v)]
    return values[0] if values else None


def _aligned(result: list[dict], start: float, step: float, points: int,
             key: str | None = None) -> dict[str, list[float | None]]:
    """query_range result -> {label value (or ""): `points` values from start every step, None where absent}."""
    out: dict[str, list[float | None]] = {}
    for series in result:
        name = series["metric"].get(key, "") if key else ""
        row = out.setdefault(name, [None] * points)
        for t, v in series["values"]:
            i = round((float(t) - start) / step)
            value = float(v)
            if 0 <= i < points and not math.isnan(value):
                row[i] = value
    return out


class PromWindow:
    """Builds the diagnosis Window for one exporter instance and [start, end] from Prometheus."""

    def __init__(self, prom: Prometheus, instance: str) -> None:
        self.prom = prom
        self.sel = f'instance="{_escape(instance)}"'

    def step(self, start: float, end: float) -> float:
        """The query_range step: about the scrape interval, in whole milliseconds (as Prometheus keeps it)."""
        return round(max(self.scrape_interval(start, end), (end - start) / MAX_POINTS), 3)

    def scrape_interval(self, start: float, end: float) -> float:
        """The median gap between the instance's scrapes (its `up` samples) in the window."""
        stamps = sorted(float(t) for r in self.prom.raw(f"up{{{self.sel}}}[{_secs(end - start)}]", end)
                        for t, _ in r["values"])
        if len(stamps) < 2:
            raise DiagnoseError(f"fewer than 2 scrapes of {self.sel} between {iso(start)} and {iso(end)}")
        return max(0.5, statistics.median(b - a for a, b in zip(stamps, stamps[1:])))

    def build(self, start: float, end: float) -> Window:
        scrape = self.scrape_interval(start, end)
        step = self.step(start, end)
        points = int((end - start) / step) + 1
        rate_w = _secs(max(4 * scrape, 2 * step))
        span = _secs(end - start)
        q = lambda expr, key=None: _aligned(self.prom.range(expr, start, end, step), start, step, points, key)  # noqa: E731
        s = self.sel
        per_gpu = {
            "utilization": q(f"gpu_utilization_ratio{{{s}}}", "gpu"),
            "memory_used_ratio": q(f"gpu_memory_used_ratio{{{s}}}", "gpu"),
            "pcie_tx": q(f'gpu_pcie_utilization_ratio{{{s},direction="tx"}}', "gpu"),
            "pcie_rx": q(f'gpu_pcie_utilization_ratio{{{s},direction="rx"}}', "gpu"),
            "health": {g: [None if v is None else 1.0 - v for v in vals]
                       for g, vals in q(f"gpu_up{{{s}}}", "gpu").items()},
        }
        info = self.prom.instant(f"last_over_time(gpu_info{{{s}}}[{span}])", end)
        names = {r["metric"].get("gpu", ""): r["metric"].get("name", "") for r in info}
        mig = {r["metric"].get("gpu", "") for r in self.prom.instant(
            f"last_over_time(gpu_mig_memory_total_bytes{{{s}}}[{span}])", end)}
        clock: dict[str, dict[str, float]] = {}
        for r in self.prom.instant(f"increase(gpu_clock_event_seconds_total{{{s}}}[{span}])", end):
            clock.setdefault(r["metric"].get("gpu", ""), {})[r["metric"].get("reason", "")] = min(
                1.0, float(r["value"][1]) / (end - start))
        xids: dict[str, dict[int, float]] = {}
        for r in self.prom.instant(f"increase(gpu_xid_errors_total{{{s}}}[{span}])", end):
            n = float(r["value"][1])
            if n >= 0.5 and _is_number(r["metric"].get("xid", "0"), int):
                xids.setdefault(r["metric"].get("gpu", ""), {})[int(r["metric"].get("xid", "0"))] = n
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
            pcie_saturated_share={d: v.get(g, []) for d, v in pcie_sat.items() if v is not None} or None,
        ) for g in gpus)
        host_cpu = q(f"host_cpu_utilization_ratio{{{s}}}").get("", empty)
        throttled = q(f"rate(cgroup_cpu_throttled_periods_total{{{s}}}[{rate_w}]) / "
                      f"rate(cgroup_cpu_periods_total{{{s}}}[{rate_w}])").get("", [])
        shm_size = _scalar(self.prom.instant(f"max_over_time(host_shm_size_bytes{{{s}}}[{span}])", end))
        shm_used = _scalar(self.prom.instant(f"max_over_time(host_shm_used_bytes{{{s}}}[{span}])", end))
        shm_path = next((r["metric"].get("path") for r in self.prom.instant(
            f"last_over_time(host_shm_size_bytes{{{s}}}[{span}])", end)), None)
        interval = _scalar(self.prom.instant(f"last_over_time(exporter_sample_interval_seconds{{{s}}}[{span}])", end))
        nvml = _scalar(self.prom.instant(f"last_over_time(exporter_nvml_up{{{s}}}[{span}])", end))
        return Window(
            seconds=end - start, interval_s=interval or scrape, host_cpu=host_cpu, cgroup_throttled=throttled,
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
        bounds = sorted((float(r["metric"]["le"]), float(r["value"][1])) for r in buckets
                        if _is_number(r["metric"].get("le", ""), float))
        on_time = next((n for le, n in bounds if le >= late_by), None)
        total = bounds[-1][1] if bounds else 0.0
        overruns = _scalar(self.prom.instant(f"increase(exporter_sample_overruns_total{{{self.sel}}}[{span}])", end))
        if on_time is None or total + (overruns or 0) <= 0:
            return None
        return ((total - on_time) + (overruns or 0)) / (total + (overruns or 0))


def _is_number(label: str, kind: type) -> bool:
    """Whether a label value (from a server we do not control) converts with int or float."""
    try:
        kind(label)
    except ValueError:
        return False
    return True


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _secs(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def _gpu_order(gpu: str) -> tuple[int, str]:
    return (int(gpu), "") if gpu.isdigit() else (1 << 30, gpu)


def rtf_crossing(prom: Prometheus, selector: str, start: float, end: float, step: float,
                 rate_w: str) -> tuple[float, float, bool] | None:
    """(first time the RTF p95 was above 0.7 in [start, end], peak p95, whether it already was at the
    window's start), or None when it never was."""
    expr = (f"histogram_quantile({RTF_QUANTILE}, sum by (le) "
            f"(rate(tts_real_time_factor_bucket{selector}[{rate_w}])))")
    points = [(float(t), float(v)) for r in prom.range(expr, start, end, step) for t, v in r["values"]]
    points = sorted(p for p in points if not math.isnan(p[1]))
    above = [t for t, v in points if v > RTF_LIMIT]
    return (above[0], max(v for _, v in points), above[0] < start + step / 2) if above else None


def find_instance(prom: Prometheus, end: float, span: str) -> str:
    found = sorted({r["metric"].get("instance", "") for r in prom.instant(
        f"last_over_time(exporter_sample_interval_seconds[{span}])", end)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise DiagnoseError("no gpu-telemetry-exporter instance in that window (exporter_sample_interval_seconds)")
    raise DiagnoseError("several exporter instances; pick one with --instance: " + ", ".join(found))


def _parser():
    p = FlagParser(prog="gpu-telemetry-exporter diagnose",
                description="Diagnose a past window (why the TTS real-time factor jittered) from a Prometheus "
                            "that scraped the exporter.")
    p.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://prometheus:9090")
    p.add_argument("--instance", default="", help="the exporter's instance label (needed when several)")
    p.add_argument("--at", default="", help="end of the window (default now): now, now-10m, unix seconds, RFC 3339")
    p.add_argument("--window", default="5m", help="with --at: how far back (default 5m)")
    p.add_argument("--from", dest="start", default="", help="start of the window (with --to)")
    p.add_argument("--to", dest="end", default="", help="end of the window (with --from)")
    p.add_argument("--rtf-selector", default="{}",
                   help='PromQL label matchers for tts_real_time_factor, e.g. {job="tts"} (default: all)')
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
    prom = Prometheus(a.prometheus)
    instance = a.instance or find_instance(prom, end, _secs(end - start))
    source = PromWindow(prom, instance)
    w = source.build(start, end)
    findings = diagnose(w)
    doc = report(w, findings)
    doc.update(instance=instance, start=iso(start), end=iso(end))
    text = [f"Diagnosis of {instance} from {iso(start)} to {iso(end)} ({len(w.gpus)} GPU(s)):", render_text(findings)]
    scrape = source.scrape_interval(start, end)
    crossing = rtf_crossing(prom, a.rtf_selector, start, end, source.step(start, end), _secs(4 * scrape))
    if crossing is None:
        doc["rtf"] = None
        text.append(f"RTF: p{RTF_QUANTILE * 100:g} of tts_real_time_factor{a.rtf_selector} stayed at or below "
                    f"{RTF_LIMIT} (or is not scraped).")
    else:
        at, peak, already = crossing
        around = (round(max(start, at - COINCIDE_BEFORE_S), 3), round(min(end, at + COINCIDE_AFTER_S), 3))
        near = diagnose(source.build(*around)) if around[1] - around[0] > 2 * scrape else findings
        coincides = _first_abnormal(near)
        doc["rtf"] = {"crossed_at": iso(at), "above_from_start": already, "peak": round(peak, 3), "limit": RTF_LIMIT,
                      "coinciding": coincides.to_dict() if coincides else None}
        when = f"was above {RTF_LIMIT} from the window's start, {iso(at)}" if already else \
            f"crossed {RTF_LIMIT} at {iso(at)}"
        text.append(f"RTF: p{RTF_QUANTILE * 100:g} {when} (peak {peak:.2f}); "
                    + (f"coinciding finding: {coincides.title} ({coincides.rule}): {coincides.evidence}"
                       if coincides else "no finding coincides: look inside the TTS service."))
    return json.dumps(doc, indent=1) + "\n" if a.json else "\n".join(text) + "\n"


def _first_abnormal(findings: list[Finding]) -> Finding | None:
    return next((f for f in findings if f.severity in ("critical", "warning")), None)


def main(argv: Sequence[str]) -> int:
    try:
        out = run(argv)
    except DiagnoseError as exc:
        print(f"gpu-telemetry-exporter diagnose: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


__all__ = ["DiagnoseError", "Prometheus", "PromWindow", "main", "parse_time", "run"]
