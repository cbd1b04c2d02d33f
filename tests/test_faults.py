"""Faults that must stay contained: an all-NotSupported GPU is up with no values, and problems are logged
once per transition, not once per tick. (The request cap is tested in test_httpd.py.)"""
from __future__ import annotations

import logging
import threading
import time

import pynvml
from prometheus_client import CollectorRegistry

from exporter.fake_nvml import FakeNvml, fake_call_names
from exporter.server import make_server
from tests.conftest import families, http_get, make_sampler


def test_gpu_with_every_call_not_supported_is_up_with_no_values(procfs):
    fake = FakeNvml(2)
    identity = {"nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount",
                "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetPciInfo"}
    for call in set(fake_call_names()) - identity:  # every optional (data) call
        fake.inject(call, gpu=1, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = make_sampler(fake, procfs.root)
    for _ in range(3):
        s.tick()
    fams = families(s)
    assert {x.labels["gpu"]: x.value for x in fams["gpu_up"].samples} == {"0": 1, "1": 1}
    for name in ("gpu_utilization_ratio", "gpu_power_watts", "gpu_temperature_celsius", "gpu_clock_hertz",
                 "gpu_pcie_throughput_bytes_per_second", "gpu_process_memory_used_bytes"):
        assert {x.labels["gpu"] for x in fams[name].samples} <= {"0"}, name
    assert dict(s.snapshot.stats.errors) == {}
    calls_after_probe = sum(fake.calls.values())
    s.tick()
    gpu0_calls_per_tick = sum(fake.calls.values()) - calls_after_probe
    assert gpu0_calls_per_tick < 20  # GPU 1 is not asked again: only GPU 0's reads remain


def test_problems_are_logged_once_per_transition(procfs, caplog):
    fake = FakeNvml(1)
    s = make_sampler(fake, procfs.root)
    s.tick()
    fake.inject("nvmlDeviceGetTemperature", gpu=0, error=pynvml.NVML_ERROR_UNKNOWN)
    with caplog.at_level(logging.INFO, logger="exporter"):
        for _ in range(5):
            s.tick()
        fake.clear_faults(0)
        for _ in range(3):
            s.tick()
    messages = [r.getMessage() for r in caplog.records if r.name == "exporter.sampler"]
    assert messages == ["GPU 0: failing calls: nvmlDeviceGetTemperature", "GPU 0: recovered"]
    assert dict(s.snapshot.stats.errors)[("nvml", "nvmlDeviceGetTemperature")] == 5  # counted every tick


def test_a_lost_gpu_is_logged_once_for_the_whole_outage(procfs, caplog):
    fake = FakeNvml(1)
    s = make_sampler(fake, procfs.root)
    s.tick()
    fake.lose_gpu(0)
    with caplog.at_level(logging.INFO, logger="exporter"):
        for _ in range(6):  # the failing read, then ticks inside the re-open back-off
            s.tick()
    lost = [r.getMessage() for r in caplog.records if r.name == "exporter.sampler"]
    assert len(lost) == 1 and lost[0].startswith("GPU 0: lost"), lost


def test_no_permission_is_counted_and_logged_once_and_not_asked_again(procfs, caplog):
    fake = FakeNvml(2)
    fake.inject("nvmlDeviceGetComputeRunningProcesses", gpu=0, error=pynvml.NVML_ERROR_NO_PERMISSION)
    fake.inject("nvmlDeviceGetTotalEnergyConsumption", gpu=0, error=pynvml.NVML_ERROR_NO_PERMISSION)
    s = make_sampler(fake, procfs.root)
    with caplog.at_level(logging.INFO, logger="exporter"):
        s.tick()
        asked = fake.calls["nvmlDeviceGetTotalEnergyConsumption"]
        for _ in range(5):
            s.tick()
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == asked + 5  # GPU 1 only, every tick
    errors = dict(s.snapshot.stats.errors)
    assert errors[("nvml", "nvmlDeviceGetTotalEnergyConsumption")] == 1
    assert errors[("nvml", "nvmlDeviceGetComputeRunningProcesses")] == 1
    denied = [r for r in caplog.records if "no permission" in r.getMessage()]
    assert len(denied) == 2 and all(r.levelno == logging.WARNING for r in denied)
    fams = families(s)
    assert {x.labels["gpu"]: x.value for x in fams["gpu_up"].samples} == {"0": 1, "1": 1}
    assert {x.labels["gpu"] for x in fams["gpu_energy_joules"].samples} == {"1"}
    assert {x.labels["gpu"] for x in fams["gpu_power_watts"].samples} == {"0", "1"}  # the rest of GPU 0 stays


def test_a_5s_hang_seen_through_http_while_everything_else_keeps_serving(procfs):
    """The issue's case end to end in one process: real sampler thread, real HTTP server, one NVML call
    of GPU 1 hanging for 5 s."""
    from exporter.collector import SnapshotCollector
    from prometheus_client.parser import text_string_to_metric_families

    fake = FakeNvml(2)
    s = make_sampler(fake, procfs.root, interval=0.1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: s.snapshot))
    server = make_server("127.0.0.1:0", registry, s.health, generation=lambda: s.snapshot)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    s.start()

    def scrape() -> dict:
        body = http_get(url + "/metrics")[2].decode()
        return {(x.name, x.labels.get("gpu")): x.value for f in text_string_to_metric_families(body) for x in f.samples}

    try:
        deadline = time.monotonic() + 5
        while ("gpu_up", "1") not in scrape() and time.monotonic() < deadline:
            time.sleep(0.05)
        fake.inject("nvmlDeviceGetTemperature", gpu=1, latency_s=5.0, times=1)
        hung_at = time.monotonic()
        deadline = hung_at + 3
        while scrape().get(("gpu_up", "1")) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = scrape()
        status, _, health = http_get(url + "/healthz")
        assert status == 200 and b"gpu 1: stuck in nvmlDeviceGetTemperature" in health
        for _ in range(20):  # 2 s, still inside the hang; the host's CPU keeps moving
            procfs.advance([5, 5], [5, 5])
            time.sleep(0.1)
        during = scrape()
        assert time.monotonic() - hung_at < 5
        assert during[("gpu_up", "1")] == 0 and during[("gpu_up", "0")] == 1
        assert during[("exporter_samples_total", None)] - before[("exporter_samples_total", None)] >= 10  # ~20 due
        assert during[("gpu_energy_joules_total", "0")] > before[("gpu_energy_joules_total", "0")]  # GPU 0 fresh
        host = ("host_sampled_cpu_utilization_ratio_count", None)
        assert during[host] - before[host] >= 10  # the host is sampled on schedule too
        deadline = time.monotonic() + 10
        while scrape().get(("gpu_up", "1")) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scrape()[("gpu_up", "1")] == 1  # back once the call returned
        assert b"stuck" not in http_get(url + "/healthz")[2]
    finally:
        s.stop()
        server.shutdown()
        server.server_close()
