"""The live view: /api/v1/samples (shape, bounds, values, memory bound) and the page in a real browser."""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from exporter.fake.nvml import FakeNvml
from exporter.fake.scenarios import SCENARIOS
from exporter.diagnosis.live import new_history
from exporter.pipeline.history import GPU_FIELDS
from exporter.sources.nvml.specs import MEMORY_USED_RATIO, TENSOR_ACTIVE, UTILIZATION
from tests.conftest import FakeProcfs, ManualClock, find_tool, http_get, make_sampler


def sampled_history(procfs, ticks: int, window: float = 2.0, interval: float = 0.1):
    clock = ManualClock()
    wall = ManualClock(1_700_000_000.0)
    fake = FakeNvml(2, clock=clock)
    history = new_history(window, interval, wall_clock=wall)
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
    assert doc["interval_seconds"] == 0.1 and len(doc["t"]) == 5 and doc["history_seconds"] == 2.0
    assert doc["t"] == sorted(doc["t"]) and len(doc["host_cpu_utilization"]) == 5
    assert [g["gpu"] for g in doc["gpus"]] == ["0", "1"]
    for g in doc["gpus"]:
        assert g["name"] == "NVIDIA H100 80GB HBM3" and g["uuid"].startswith("GPU-") and g["mig"] is False
        for f in GPU_FIELDS:
            assert len(g[f]) == 5, f
    last5 = snaps[-5:]
    assert doc["gpus"][0]["utilization"] == [s.gpus[0].reading[UTILIZATION] for s in last5]
    assert doc["gpus"][1]["memory_used_ratio"] == [s.gpus[1].reading[MEMORY_USED_RATIO] for s in last5]
    assert doc["host_cpu_utilization"] == [s.host.cpu_utilization for s in last5]
    tensor = [s.gpus[1].reading[TENSOR_ACTIVE] for s in last5]  # GPM activity, for diagnosis
    assert doc["gpus"][1]["tensor_active"] == tensor and None not in tensor
    # below_40_fraction: of every driver sample those ticks took (the histogram's delta), not of the 5
    # polled values
    old, new = snaps[-6].gpus[0].utilization_hist, snaps[-1].gpus[0].utilization_hist
    below = new.cumulative[new.bounds.index(0.4)] - old.cumulative[old.bounds.index(0.4)]
    assert new.count > old.count
    assert doc["gpus"][0]["below_40_fraction"] == below / (new.count - old.count)


def test_api_says_what_is_simulated_and_when_clocks_were_held_down(procfs):
    from exporter.fake.scenarios import ScenarioNvml

    clock, wall = ManualClock(), ManualClock(1_700_000_000.0)
    fake = ScenarioNvml("throttled", 1, clock=clock)
    history = new_history(5.0, 0.1, wall_clock=wall)
    s = make_sampler(fake, procfs.root, interval=0.1, clock=clock, history=history)
    busy = []
    for _ in range(30):
        procfs.advance(busy=[10, 30], idle=[90, 70])
        s.tick()
        busy.append(fake._busy(0, fake._now()))
        clock.advance(0.1)
        wall.advance(0.1)
    doc = history.query(5.0)
    assert doc["simulated"] == {"gpus": True, "host_cpu": False}
    g = doc["gpus"][0]
    assert g["clocks_held_down"] == [float(b) for b in busy]  # the scenario's thermal bits, set while busy
    assert g["clocks_held_down_fraction"] == sum(busy) / 30 and 0 < sum(busy) < 30
    assert g["mig_instances"] == []
    assert json.loads(history.query_json(5.0)) == doc


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
    for window in ("0s", "fast", "-1s"):
        status, _, body = http_get(p.url + f"/api/v1/samples?window={window}")
        assert status == 400 and "error" in json.loads(body), window
    status, _, body = http_get(p.url + "/api/v1/samples?window=31s")  # capped, as /api/v1/diagnosis does
    doc = json.loads(body)
    assert status == 200 and (doc["window_seconds"], doc["requested_seconds"]) == (30.0, 31.0), doc


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


def screenshot(url: str, name: str, tmp_path) -> Path:
    """A PNG of the page; GPU_EXPORTER_SCREENSHOTS=docs/img writes the documentation's pictures."""
    shot = Path(os.environ.get("GPU_EXPORTER_SCREENSHOTS") or tmp_path) / name
    r = chromium([f"--screenshot={shot.resolve()}", url], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    return shot


def started(exporter_proc, *args: str, samples: int = 10):
    p = exporter_proc(*args)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # some history to draw
        status, _, body = http_get(p.url + "/api/v1/samples?window=10s")
        if status != 200 or len(json.loads(body)["t"]) >= samples:
            break
        time.sleep(0.2)
    return p


@pytest.fixture
def live_exporter(exporter_proc):
    return started(exporter_proc, "--fake-gpus", "2", "--sample.interval", "100ms", samples=30)


def dom(url: str, tmp_path) -> str:
    r = chromium(["--dump-dom", url], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


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
    screenshot(live_exporter.url + "/", "live-view.png", tmp_path)


@pytest.mark.e2e
def test_findings_panel_axes_and_threshold_lines(live_exporter, tmp_path):
    page = dom(live_exporter.url + "/", tmp_path)
    findings = re.search(r'<section id="findings"[^>]*data-first="([a-z_]+)"', page)
    assert findings, page[:3000]
    api = json.loads(http_get(live_exporter.url + "/api/v1/diagnosis?window=60s")[2])
    assert re.findall(r'<li data-rule="([a-z_]+)"', page)[:1] == [api["findings"][0]["rule"]]
    # threshold lines, labelled, on the GPU charts only; a time axis on every chart
    gpu_canvas = re.search(r'<section class="gpu" data-gpu="0">.*?<canvas ([^>]*)>', page, re.S).group(1)
    assert 'data-lines="40 % starved (utilisation),90 % saturated (PCIe)"' in gpu_canvas
    host_canvas = re.search(r'<canvas id="host-canvas" ([^>]*)>', page).group(1)
    assert 'data-lines=""' in host_canvas
    for canvas in (gpu_canvas, host_canvas):
        assert 'data-ticks="\u221260 s,\u221250 s,\u221240 s,\u221230 s,\u221220 s,\u221210 s,now"' in canvas, canvas
    assert re.findall(r'<button data-w="(\d+)"', page) == ["60", "300"]  # the default 5 min history


class BusyHost:
    """A --path.procfs whose CPU is 95 % busy, advanced every 20 ms while the page is open."""

    def __init__(self, root: Path) -> None:
        self.procfs = FakeProcfs(root)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.procfs.advance(busy=[19, 19], idle=[1, 1])  # more often than the sampler reads


# The README's opening picture, and the command it gives for it (README.md, "What each picture is").
CPU_STARVED = ("--fake-gpus", "2", "--fake-scenario", "cpu-starved", "--sample.interval", "100ms",
               "--history.window", "15s")


@pytest.mark.e2e
def test_the_readme_picture_from_its_command(exporter_proc, tmp_path):
    """cpu-starved: CPU-side starvation named on each GPU over a simulated busy host CPU, and the page says
    the host CPU is simulated."""
    p = started(exporter_proc, *CPU_STARVED, samples=120)
    page = dom(p.url + "/", tmp_path)
    assert 'data-first="cpu_starvation"' in page
    rules = re.findall(r'<li data-rule="([a-z_]+)"', page)
    assert rules[:2] == ["cpu_starvation", "cpu_starvation"], rules
    assert "GPU 0 starved by the CPU side" in page and "GPU 1 starved by the CPU side" in page
    assert "host CPU ≥ 90 % during" in page and "num_workers 4 → 8" in page
    assert 'data-simulated="gpus,host_cpu"' in page and "<h2>Host CPU (simulated)</h2>" in page
    for gpu in ("0", "1"):  # the cards red, as the headline is
        assert re.search(rf'data-gpu="{gpu}">.*?<div class="stat bad">at or below 40 %', page, re.S), gpu
    screenshot(p.url + "/", "diagnosis.png", tmp_path)


def idle_host(tmp_path: Path) -> list[str]:
    """Flags for a quiet host: a /proc/stat that never moves (no host CPU value, so no CPU-side cause), an
    empty cgroup and a roomy --path.shm: the GPU scenario alone decides the headline."""
    procfs = FakeProcfs(tmp_path / "proc")
    return ["--path.procfs", str(procfs.root), "--path.cgroupfs", str(tmp_path), "--path.shm", str(tmp_path),
            "--no-collector.processes"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "cpu-starved"])
def test_every_scenario_headline_in_the_browser(exporter_proc, tmp_path, name):
    """Each --fake-scenario's headline is its own finding, and a GPU card is red exactly where the headline
    names a CPU-side cause (starved: a grey note under a grey headline, not a green all-clear)."""
    expected = SCENARIOS[name].finding
    p = started(exporter_proc, "--fake-gpus", "1", "--fake-scenario", name, "--sample.interval", "100ms",
                "--history.window", "15s", *idle_host(tmp_path), samples=40)
    if name == "xids":  # the first XID comes 5 s after start
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and b"xid_errors" not in http_get(p.url + "/api/v1/diagnosis")[2]:
            time.sleep(0.3)
    page = dom(p.url + "/", tmp_path)
    assert f'data-first="{expected}"' in page, re.findall(r'<li data-rule="([a-z_]+)"', page)
    assert 'data-simulated="gpus"' in page and "<h2>Host CPU</h2>" in page  # only the GPUs are simulated
    stat = re.search(r'<section class="gpu" data-gpu="0">.*?<div class="(stat[^"]*)">', page, re.S).group(1)
    assert stat == {"gpu_underused": "stat note"}.get(expected, "stat"), stat
    clocks = re.search(r'<section class="gpu" data-gpu="0">.*?<div class="(clockstat[^"]*)">([^<]*)<', page, re.S)
    if name == "throttled":  # the strip draws what the finding names
        assert clocks.group(1) == "clockstat bad", clocks.group(0)
        share = float(re.fullmatch(r"clocks held down \(heat or power\): ([\d.]+) % of the last .*", clocks.group(2))[1])
        assert share > 70, clocks.group(2)  # held while busy: ~90 % of the duty cycle
        held = re.search(r'<canvas class="clocks"[^>]*data-held="(\d+)"', page).group(1)
        assert int(held) > 20
        screenshot(p.url + "/", "live-view-throttled.png", tmp_path)
    else:
        assert clocks.group(1) == "clockstat", clocks.group(0)


@pytest.mark.e2e
def test_plain_simulated_gpus_inject_nothing_alarming(exporter_proc, tmp_path):
    """`--fake-gpus 2`, a newcomer's first demo: past the 5 s at which the simulator used to inject XID 31
    on GPU 1, no warning or critical finding, and the page says the GPUs are simulated."""
    p = started(exporter_proc, "--fake-gpus", "2", "--sample.interval", "100ms", *idle_host(tmp_path), samples=70)
    api = json.loads(http_get(p.url + "/api/v1/diagnosis?window=60s")[2])
    assert api["window_seconds"] >= 6.5, api["window_seconds"]
    assert not [f for f in api["findings"] if f["severity"] in ("warning", "critical")], api["findings"]
    page = dom(p.url + "/", tmp_path)
    assert 'data-first="nothing_abnormal"' in page and 'class="sev sev-critical"' not in page
    assert 'class="sev sev-warning"' not in page
    assert "Simulated GPUs (--fake-gpus, --fake-gpus-from)" in page and " · simulated</h2>" in page


@pytest.mark.e2e
def test_notice_when_history_is_off(exporter_proc, tmp_path):
    p = exporter_proc("--fake-gpus", "1", "--history.window", "0")
    page = dom(p.url + "/", tmp_path)
    notice = re.search(r'<section id="notices" class="notice">([^<]*)<', page)
    assert notice and notice.group(1).startswith("History is off (--history.window=0)"), page[:3000]
    assert "<button" not in page.split("<script>")[0]  # no window to choose


@pytest.mark.e2e
def test_notice_when_no_gpu_is_found(exporter_proc, tmp_path):
    p = started(exporter_proc, "--fake-gpus", "0", "--sample.interval", "100ms", samples=3)
    page = dom(p.url + "/", tmp_path)
    notice = re.search(r'<section id="notices" class="notice">([^<]*)<', page)
    assert notice and notice.group(1).startswith("No GPU found"), page[:3000]
    assert notice.group(1).lower().count("gpu found") == 1, notice.group(1)  # the reason without the wording twice
    assert 'data-first="no_gpu"' in page and 'data-gpus="0"' in page


@pytest.mark.e2e
def test_mig_gpu_says_utilisation_is_not_supported(exporter_proc, tmp_path):
    p = started(exporter_proc, "--fake-gpus", "1", "--fake-mig", "3g.40gb,1g.10gb", "--sample.interval", "100ms")
    page = dom(p.url + "/", tmp_path)
    stat = re.search(r'<section class="gpu" data-gpu="0">.*?<div class="stat">([^<]*)<', page, re.S).group(1)
    assert stat == "utilisation not supported under MIG (memory and PCIe still shown; memory per instance below)"
    # one bar per instance, with its memory: 3g.40gb and 1g.10gb
    mig = re.findall(r'<div data-uuid="(MIG-[^"]+)">.*?<span>MIG instance (\d+) · [^:]+: ([^<]*)</span>', page)
    assert len(mig) == 2, page[:4000]
    totals = sorted(float(re.search(r"of ([\d.]+) GiB", m[2]).group(1)) for m in mig)
    assert totals[0] < 11 and 35 < totals[1] < 41, mig
    screenshot(p.url + "/", "live-view-mig.png", tmp_path)


@pytest.mark.e2e
def test_window_buttons_never_ask_for_more_than_kept(exporter_proc, tmp_path):
    p = started(exporter_proc, "--fake-gpus", "1", "--sample.interval", "100ms", "--history.window", "30s")
    page = dom(p.url + "/", tmp_path)
    assert re.findall(r'<button data-w="(\d+)"', page) == ["30"]
    assert 'class="on"' in re.search(r'<button data-w="30"[^>]*>', page).group(0)
    status = re.search(r'<span id="status"[^>]*>([^<]*)<', page).group(1)
    assert re.fullmatch(r"\d+ samples every 100 ms", status), status  # not "error: ... HTTP 400"
