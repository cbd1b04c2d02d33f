"""The live view: /api/v1/samples (shape, bounds, values, memory bound) and the page in a real browser."""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from exporter.fake_nvml import FakeNvml
from exporter.history import GPU_FIELDS, SampleHistory
from exporter.sources.nvml.specs import MEMORY_USED_RATIO, UTILIZATION
from tests.conftest import ManualClock, find_tool, http_get, make_sampler


def sampled_history(procfs, ticks: int, window: float = 2.0, interval: float = 0.1):
    clock = ManualClock()
    wall = ManualClock(1_700_000_000.0)
    fake = FakeNvml(2, clock=clock)
    history = SampleHistory(window, interval, wall_clock=wall)
    s = make_sampler(fake, procfs.root, interval=interval, clock=clock, history=history)
    snaps = []
    for _ in range(ticks):
        procfs.advance(busy=[10, 30], idle=[90, 70])
        snaps.append(s.tick())
        clock.advance(interval)
        wall.advance(interval)
    return history, snaps


def test_api_shape_and_values_match_what_the_fake_produced(procfs):
    history, snaps = sampled_history(procfs, ticks=10)
    doc = history.query(0.45)  # rows newer than last - 0.45 s: the last 5 ticks, 0.1 s apart
    assert doc["interval_seconds"] == 0.1 and len(doc["t"]) == 5
    assert doc["t"] == sorted(doc["t"]) and len(doc["host_cpu_utilization"]) == 5
    assert [g["gpu"] for g in doc["gpus"]] == ["0", "1"]
    for g in doc["gpus"]:
        assert g["name"] == "NVIDIA H100 80GB HBM3" and g["uuid"].startswith("GPU-")
        for f in GPU_FIELDS:
            assert len(g[f]) == 5, f
    last5 = snaps[-5:]
    assert doc["gpus"][0]["utilization"] == [s.gpus[0].reading[UTILIZATION] for s in last5]
    assert doc["gpus"][1]["memory_used_ratio"] == [s.gpus[1].reading[MEMORY_USED_RATIO] for s in last5]
    assert doc["host_cpu_utilization"] == [s.host.cpu_utilization for s in last5]
    util = doc["gpus"][0]["utilization"]
    assert doc["gpus"][0]["below_40_fraction"] == sum(u <= 0.4 for u in util) / len(util)


def test_memory_is_bounded_by_window_over_interval(procfs):
    history, _ = sampled_history(procfs, ticks=60, window=2.0, interval=0.1)
    assert len(history.query(2.0)["t"]) == 20  # 60 ticks appended, 20 kept


@pytest.mark.e2e
def test_api_window_bounds(exporter_proc):
    p = exporter_proc("--fake-gpus", "1", "--sample.interval", "100ms", "--history.window", "30s")
    p.wait_for_sample("/api/v1/samples?window=5s", needle=b'"gpu":"0"')
    status, headers, body = http_get(p.url + "/api/v1/samples?window=5s")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["gpus"][0]["gpu"] == "0"
    for window in ("31s", "0s", "fast", "-1s"):
        status, _, body = http_get(p.url + f"/api/v1/samples?window={window}")
        assert status == 400 and "error" in json.loads(body), window


@pytest.mark.e2e
def test_api_off_when_history_is_off(exporter_proc):
    p = exporter_proc("--fake-gpus", "1", "--history.window", "0")
    assert http_get(p.url + "/api/v1/samples")[0] == 404
    assert http_get(p.url + "/")[0] == 200


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,1000", "--virtual-time-budget=5000"]


def chromium(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([find_tool("chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def live_exporter(exporter_proc):
    p = exporter_proc("--fake-gpus", "2", "--sample.interval", "100ms")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # some history to draw
        if len(json.loads(http_get(p.url + "/api/v1/samples?window=60s")[2])["t"]) >= 10:
            break
        time.sleep(0.2)
    return p


@pytest.mark.e2e
def test_page_draws_every_gpu_in_a_real_browser(live_exporter, tmp_path):
    r = chromium(["--dump-dom", live_exporter.url + "/"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert 'data-gpu="0"' in dom and 'data-gpu="1"' in dom  # one section per GPU the fake has
    assert 'data-gpus="2"' in dom and "GPU 1 · NVIDIA H100 80GB HBM3" in dom
    assert "at or below 40 % utilisation:" in dom
    status = re.search(r'<span id="status"[^>]*>([^<]*)<', dom).group(1)
    assert re.fullmatch(r"\d+ samples every 100 ms", status), status
    assert 'href="/metrics"' in dom and 'href="/healthz"' in dom
    shot = tmp_path / "live-view.png"
    r = chromium([f"--screenshot={shot}", live_exporter.url + "/"], tmp_path)
    assert r.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
