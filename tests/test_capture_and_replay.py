"""bench/capture_gpu.py run against the C stand-in (real pynvml), and every capture replayed through the
fake (testkit/fixture_nvml.py): the exporter's families carry the recorded values, and the calls
recorded as NotSupported leave their families absent.

Captures from real GPUs live in tests/fixtures/ (one JSON per GPU model); a capture from the stand-in,
made fresh here, is replayed with them so the replay runs even where no real capture is committed yet.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.fixture_nvml import FixtureNvml
from tests.conftest import REPO, families, make_sampler

STAND_IN = {"gpus": 2, "util.0": 37, "util.1": 64, "power_mw.0": 312500, "temp.1": 55, "mem_used.1": 5e9,
            "gpm.1": 20, "gpm.2": 42.5, "gpm.3": 30, "gpm.5": 17.5, "gpm.10": 60, "gpm_supported.1": 0,
            "nvlink_links.0": 4, "mig.0": "1,2", "gpm.2.gi2": 70, "nvlink_tx_kib_s": 2**20, "nvlink_rx_kib_s": 2**20,
            "fail.nvmlDeviceGetPowerUsage.1": 3, "fail.nvmlDeviceGetTemperature.0": 3,
            "fail.nvmlDeviceGetCurrentClocksThrottleReasons": 13}
FIXTURES = sorted((REPO / "tests" / "fixtures").glob("*.json"))


def run_capture(stub, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "capture_gpu.py"), "--out", str(out), *args],
                          env={**os.environ, **stub.env()}, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture
def stand_in_capture(nvml_stub, tmp_path) -> Path:
    nvml_stub.configure(STAND_IN)
    r = run_capture(nvml_stub, tmp_path, "--repeat", "5", "--gpm-ticks", "3", "--interval", "0.12")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "GPM: p50" in r.stdout
    (path,) = tmp_path.glob("*.json")
    return path


def test_capture_records_values_errors_latency_and_gpm(stand_in_capture):
    assert stand_in_capture.name == "nvidia-h100-80gb-hbm3.json"
    cap = json.loads(stand_in_capture.read_text())
    assert cap["schema"] == 1 and cap["system"]["driver"] == "570.86.15"
    assert cap["system"]["nvml"] is None  # nvmlSystemGetNVMLVersion: FunctionNotFound on the stand-in
    g0, g1 = cap["gpus"]
    assert g0["calls"]["nvmlDeviceGetPowerUsage"]["value"] == 312500
    assert g1["calls"]["nvmlDeviceGetPowerUsage"] == {"error": "NVMLError_NotSupported", "code": 3,
                                                      "latency_us": g1["calls"]["nvmlDeviceGetPowerUsage"]["latency_us"]}
    assert g1["calls"]["nvmlDeviceGetCurrentClocksThrottleReasons"]["error"] == "NVMLError_FunctionNotFound"
    assert g1["calls"]["nvmlDeviceGetUtilizationRates"]["value"] == {"gpu": 64, "memory": 12}
    assert g1["calls"]["nvmlDeviceGetMemoryInfo[v2]"]["value"]["used"] == 5e9
    assert g0["calls"]["nvmlDeviceGetPciInfo"]["value"]["busId"] == "00000000:18:00.0"
    lat = g0["calls"]["nvmlDeviceGetUtilizationRates"]["latency_us"]
    assert lat["n"] == 5 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert g0["calls"]["nvmlDeviceGetPcieThroughput[TX]"]["value"] == int(1e9 / 1024)
    samples = g0["calls"]["nvmlDeviceGetSamples[GPU_UTILIZATION]"]["value"]
    assert samples["count"] == 120 and samples["values_last_10"] == [37] * 10
    # GPM through the exporter's own reader: the stand-in's percentages as ratios, and its cost per tick.
    assert g0["gpm"]["activity"] == {"sm_active": 0.425, "sm_occupancy": 0.30, "tensor_active": 0.175,
                                     "dram_active": 0.60, "graphics_engine_active": 0.20}
    assert g0["gpm"]["tick_cost_us"]["p50"] > 0 and g0["gpm"]["errors"] == []
    assert {gi: a["sm_active"] for gi, a in g0["gpm"]["mig"].items()} == {"1": 0.425, "2": 0.70}
    assert g1["gpm"] is None and g1["calls"]["nvmlGpmQueryDeviceSupport"]["value"]["isSupportedDevice"] == 0
    assert g0["nvlink_links"] == 4 and g1["nvlink_links"] == 0
    per_link = g0["calls"]["nvmlDeviceGetFieldValues[NVLINK_THROUGHPUT_DATA_TX,RX per link]"]["value"]
    assert [(f["fieldId"], f["scopeId"], f["nvmlReturn"]) for f in per_link[:2]] == [(138, 0, 0), (139, 0, 0)]
    assert g0["events"] == {"xid_events": True}


def test_capture_without_nvml_or_with_bad_flags_says_so_in_one_line(nvml_stub, tmp_path):
    nvml_stub.configure({"fail.nvmlInit": 999})
    r = run_capture(nvml_stub, tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "NVML unavailable: Unknown Error" in r.stderr
    r = run_capture(nvml_stub, tmp_path, "--repeat", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.json"))


def replay(capture: dict) -> dict:
    """Two sampler ticks on the fake answering as captured; the families as exposed."""
    sampler = make_sampler(FixtureNvml(capture), Path("/proc"), mode="fake")
    try:
        sampler.tick()
        sampler.tick()
        return families(sampler)
    finally:
        sampler.nvml.close()


def by_gpu(fams: dict, name: str, **labels: str) -> dict[str, float]:
    fam = fams.get(name)
    return {s.labels["gpu"]: s.value for s in (fam.samples if fam else ())
            if all(s.labels.get(k) == v for k, v in labels.items())}


def check_replay(capture: dict) -> None:
    fams = replay(capture)
    assert set(by_gpu(fams, "gpu_up")) == {str(g["index"]) for g in capture["gpus"]}
    assert set(by_gpu(fams, "gpu_up").values()) == {1.0}
    for g in capture["gpus"]:
        gpu, calls = str(g["index"]), g["calls"]
        info = [s for s in fams["gpu_info"].samples if s.labels["gpu"] == gpu]
        assert info[0].labels["name"] == g["name"]
        for key, family, scale, labels in (
            ("nvmlDeviceGetPowerUsage", "gpu_power_watts", 1e-3, {}),
            ("nvmlDeviceGetTemperature[GPU]", "gpu_temperature_celsius", 1, {}),
            ("nvmlDeviceGetClockInfo[SM]", "gpu_clock_hertz", 1e6, {"clock": "sm"}),
            ("nvmlDeviceGetEnforcedPowerLimit", "gpu_power_limit_watts", 1e-3, {}),
        ):
            answer = calls.get(key, {})
            got = by_gpu(fams, family, **labels).get(gpu)
            if "value" in answer:
                assert got == pytest.approx(answer["value"] * scale), (key, got)
            else:
                assert got is None, (key, answer)  # recorded as failing: absent, never 0
        util = calls.get("nvmlDeviceGetUtilizationRates", {}).get("value")
        if util:
            assert by_gpu(fams, "gpu_utilization_ratio")[gpu] == util["gpu"] / 100
        mem = calls.get("nvmlDeviceGetMemoryInfo[v2]", {}).get("value")
        if mem:
            assert by_gpu(fams, "gpu_memory_used_bytes")[gpu] == mem["used"]
            assert by_gpu(fams, "gpu_memory_total_bytes")[gpu] == mem["total"]


def test_stand_in_capture_replays_with_recorded_failures_absent(stand_in_capture):
    fams = replay(json.loads(stand_in_capture.read_text()))
    assert by_gpu(fams, "gpu_power_watts") == {"0": 312.5}  # GPU 1 recorded NotSupported
    assert by_gpu(fams, "gpu_temperature_celsius") == {"1": 55}  # GPU 0 recorded NotSupported


@pytest.mark.parametrize("capture", ["stand-in", *FIXTURES], ids=["stand-in", *(p.stem for p in FIXTURES)])
def test_every_capture_replays_through_the_fake(capture, request):
    path = request.getfixturevalue("stand_in_capture") if capture == "stand-in" else capture
    check_replay(json.loads(path.read_text()))
