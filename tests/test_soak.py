"""Soak: 16 simulated GPUs at 20 ms ticks, a new batch process (new PID, new label set) every other
second on every GPU, scraped every 100 ms with the live view polled too. After a warm-up, memory must
stay flat and series of exited processes must not pile up.

CI runs a short version (4 500 ticks, about 1.5 minutes). The full one, 100 000 ticks (about 35 minutes):
    GPU_EXPORTER_SOAK_TICKS=100000 bash tests/run.sh -m soak -s

The bound on RSS growth is 1 MB for the full run and 2 MB for the short one: Python's allocator takes
memory in 1 MiB arenas, so over a minute RSS moves in steps of up to 1 MiB with no leak at all (+0.2 and
+1.2 MB seen on the same code). The short run catches fast leaks (over ~30 KB/s); slow ones, like the
label cache's ~250 B per exited process, show only in the full run (tests/test_exposition.py guards
that one directly).
"""
from __future__ import annotations

import http.client
import os
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ExporterProcess, stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.soak]

TICKS = int(os.environ.get("GPU_EXPORTER_SOAK_TICKS", "4500"))
GROWTH_LIMIT = (1 if TICKS >= 100_000 else 2) * 2**20
GPUS = 16
INTERVAL_S = 0.020


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_soak_memory_flat_and_no_stale_series():
    e = ExporterProcess("--fake-gpus", str(GPUS), "--sample.interval", "20ms", "--fake-churn", "1s",
                        "--history.window", "10s")  # the ring fills within the warm-up
    try:
        e.wait_for_sample()
        conn = http.client.HTTPConnection("127.0.0.1", e.port, timeout=10)

        def scrape(path: str = "/metrics") -> bytes:
            conn.request("GET", path, headers={"Accept-Encoding": "identity"})
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, (path, r.status, body[:200])
            return body

        def ticks_done(body: bytes) -> int:
            for line in body.splitlines():
                if line.startswith(b"exporter_samples_total "):
                    return int(float(line.split()[1]))
            raise AssertionError("no exporter_samples_total")

        warm_at = max(1000, TICKS // 5)  # label caches, allocator arenas and the history ring fill up first
        rss_warm = None
        pids_seen: set[str] = set()
        scrapes = 0
        body = scrape()
        deadline = time.monotonic() + TICKS * INTERVAL_S * 3 + 60  # bounded even if ticks run late
        while ticks_done(body) < TICKS and time.monotonic() < deadline:
            time.sleep(0.1)
            body = scrape()
            scrapes += 1
            if scrapes % 50 == 0:
                scrape("/api/v1/samples?window=10s")
                for fam in text_string_to_metric_families(body.decode()):
                    if fam.name == "gpu_process_memory_used_bytes":
                        pids_seen |= {s.labels["pid"] for s in fam.samples}
            if rss_warm is None and ticks_done(body) >= warm_at:
                rss_warm = rss_bytes(e.proc.pid)
        rss_end = rss_bytes(e.proc.pid)
        done = ticks_done(body)
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        series_now = len(fams["gpu_process_memory_used_bytes"].samples)
        overruns = fams["exporter_sample_overruns"].samples[0].value
        conn.close()
        growth = rss_end - rss_warm
        print(f"\n[soak] {done} ticks of {GPUS} GPUs at 20 ms, {scrapes} scrapes, {len(pids_seen)} distinct PIDs seen, "
              f"{series_now} process series now, {overruns:.0f} overruns; RSS {rss_warm / 2**20:.1f} MB after "
              f"{warm_at} ticks -> {rss_end / 2**20:.1f} MB at the end ({growth / 2**20:+.2f} MB)")
        assert done >= TICKS
        assert len(pids_seen) > 2 * GPUS  # churn happened: batch jobs came with new PIDs
        assert series_now <= 2 * GPUS  # ... and exited ones left no series behind (TTS server + one batch per GPU)
        assert growth < GROWTH_LIMIT
    finally:
        stop_process(e.proc)
