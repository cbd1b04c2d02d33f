"""Faults that must stay contained: a capped server answers 503 at once, an all-NotSupported GPU is up
with no values, and problems are logged once per transition, not once per tick."""
from __future__ import annotations

import logging
import threading
import time

import pynvml
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from exporter.fake_nvml import FakeNvml, fake_call_names
from exporter.server import make_server
from tests.conftest import families, http_get, make_sampler


class SlowCollector:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def describe(self):
        return []

    def collect(self):
        time.sleep(self.seconds)
        yield GaugeMetricFamily("slow_metric", "A collect that takes a while.", value=1)


def test_request_cap_answers_503_without_waiting():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SlowCollector(1.5))
    server = make_server("127.0.0.1:0", registry, lambda: (True, "ok\n"), max_requests=2)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def scrape() -> None:
        started = time.monotonic()
        status = http_get(url, timeout=10)[0]
        with lock:
            results.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=scrape) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    server.shutdown()
    server.server_close()
    ok = [e for s, e in results if s == 200]
    busy = [e for s, e in results if s == 503]
    assert len(ok) == 2 and len(busy) == 4, results
    assert max(busy) < min(ok)  # refused at once, not queued behind the slow scrapes


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
