#!/usr/bin/env python3
"""Load figures for docs/performance.md: what the exporter holds and how fast it answers.

    .venv/bin/python bench/load.py            # ~1.5 min, writes bench/load-results.json

One exporter with 8 simulated GPUs at 200 ms on 127.0.0.1, then: 40 keep-alive scrapers for 30 s;
a burst of 200 simultaneous one-shot requests, five times; a scraper beside a slowloris crowd (300
connections sending a byte a second and reconnecting when cut, plus 100 idle ones) against
--web.max-connections 64. For each: statuses, latency, the exporter's peak thread count and the share
of sampler ticks that started within 5 ms of schedule. The same generators back tests/test_load.py,
which asserts correctness (every request answered) but never times.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from testkit.processes import ExporterProcess, http_get, stop_process  # noqa: E402
from testkit.loadgen import (SlowLoris, ThreadWatch, burst, lateness_within_5ms, metric_values,  # noqa: E402
                           percentile, scrape_concurrently, threads_of)


def start(*args: str) -> ExporterProcess:
    e = ExporterProcess("--fake-gpus", "8", *args)
    e.wait_for_sample()
    return e


def main() -> int:
    results: dict[str, dict] = {}
    e = start()
    try:
        idle = threads_of(e.proc.pid)
        before = metric_values(e.url)
        with ThreadWatch(e.proc.pid) as watch:
            statuses, lat = scrape_concurrently(e.port, 40, 30)
        ticks, on_time = lateness_within_5ms(before, metric_values(e.url))
        results["40 scrapers, 30 s"] = {
            "requests": len(statuses), "ok": statuses.count(200), "p50_ms": percentile(lat, 0.5) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000, "max_ms": max(lat) * 1000, "threads_idle": idle,
            "threads_peak": watch.peak, "ticks_within_5ms": on_time, "ticks": ticks}

        before = metric_values(e.url)
        all_results = []
        with ThreadWatch(e.proc.pid) as watch:
            for _ in range(5):
                all_results += burst(e.port, 200)
                time.sleep(1)
        ticks, on_time = lateness_within_5ms(before, metric_values(e.url))
        times = [t for _, t in all_results]
        statuses = [s for s, _ in all_results]
        results["200 at once, x5"] = {
            "requests": len(all_results), "ok": statuses.count(200), "refused_503": statuses.count(503),
            "other": len(statuses) - statuses.count(200) - statuses.count(503),
            "p50_ms": percentile(times, 0.5) * 1000, "p99_ms": percentile(times, 0.99) * 1000,
            "max_ms": max(times) * 1000, "threads_idle": idle, "threads_peak": watch.peak,
            "ticks_within_5ms": on_time, "ticks": ticks}
    finally:
        stop_process(e.proc)

    e = start("--web.max-connections", "64")
    try:
        idle = threads_of(e.proc.pid)
        before = metric_values(e.url)
        statuses, lat = [], []
        with ThreadWatch(e.proc.pid) as watch, SlowLoris(e.port, n=300, idle=100) as loris:
            time.sleep(2)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                statuses.append(http_get(e.url + "/metrics", timeout=5)[0])
                lat.append(time.monotonic() - t0)
                time.sleep(0.2)
        after = metric_values(e.url)
        ticks, on_time = lateness_within_5ms(before, after)
        closed = {dict(k[1])["reason"]: v for k, v in after.items() if k[0] == "exporter_http_connections_closed_total"}
        results["scraper beside slowloris (300 slow + 100 idle, cap 64)"] = {
            "requests": len(statuses), "ok": statuses.count(200), "p50_ms": percentile(lat, 0.5) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000, "max_ms": max(lat) * 1000, "threads_idle": idle,
            "threads_peak": watch.peak, "ticks_within_5ms": on_time, "ticks": ticks,
            "attacker_connections_cut": loris.cut, "closed_by_reason": closed}
    finally:
        stop_process(e.proc)

    print(f"{'scenario':58} {'requests':>8} {'ok':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'threads':>9} {'ticks<=5ms':>10}")
    for name, r in results.items():
        print(f"{name:58} {r['requests']:8d} {r['ok']:6d} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} {r['max_ms']:7.0f} "
              f"{r['threads_idle']:>3}->{r['threads_peak']:<4} {r['ticks_within_5ms']:10.1%}")
    (HERE / "load-results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
