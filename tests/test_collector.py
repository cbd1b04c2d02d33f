from __future__ import annotations

import threading
import re

import pynvml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.pipeline.collector import SnapshotCollector
from exporter.fake.nvml import FakeNvml
from exporter.sources.nvml.specs import UTILIZATION
from tests.conftest import families, make_sampler

GPU_GAUGES = {
    "gpu_info", "gpu_up", "gpu_utilization_ratio", "gpu_memory_bandwidth_utilization_ratio",
    "gpu_memory_used_bytes", "gpu_memory_total_bytes", "gpu_memory_used_ratio", "gpu_temperature_celsius", "gpu_power_watts",
    "gpu_power_limit_watts", "gpu_pcie_throughput_bytes_per_second", "gpu_pcie_link_max_bytes_per_second",
    "gpu_pcie_utilization_ratio", "gpu_clock_hertz", "gpu_clock_event_active",
}
GPU_COUNTERS = {"gpu_energy_joules", "gpu_pcie_replay_errors", "gpu_clock_event_seconds"}
HISTOGRAMS = {"gpu_sampled_utilization_ratio", "gpu_sampled_pcie_utilization_ratio",
              "host_sampled_cpu_utilization_ratio", "exporter_sample_duration_seconds",
              "exporter_sample_lateness_seconds"}


def sampled(n_gpus: int, procfs, ticks: int = 3):
    fake = FakeNvml(n_gpus)
    s = make_sampler(fake, procfs.root)
    for _ in range(ticks):
        s.tick()
        procfs.advance(busy=[10, 20], idle=[90, 80])
    return fake, s


def test_every_family_has_its_type_and_labels(procfs):
    fake = FakeNvml(2)
    for gpu in (0, 1):  # the polled value instead of the driver's buffer: a histogram from the first tick
        fake.inject("nvmlDeviceGetSamples", gpu=gpu, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = make_sampler(fake, procfs.root)
    for _ in range(3):
        s.tick()
        procfs.advance(busy=[10, 20], idle=[90, 80])
    fams = families(s)
    for name in GPU_GAUGES:
        assert fams[name].type == "gauge", name
    for name in GPU_COUNTERS:
        assert fams[name].type == "counter", name
    for name in HISTOGRAMS:
        assert fams[name].type == "histogram", name
    for name in GPU_GAUGES | GPU_COUNTERS:
        for sample in fams[name].samples:
            assert {"gpu", "uuid"} <= set(sample.labels), (name, sample)
    info = fams["gpu_info"].samples[0].labels
    assert set(info) == {"gpu", "uuid", "name", "pci_bus_id", "driver_version", "node"}
    assert {s.labels["direction"] for s in fams["gpu_pcie_utilization_ratio"].samples} == {"tx", "rx"}
    assert {s.labels["clock"] for s in fams["gpu_clock_hertz"].samples} == {"sm", "memory"}
    assert fams["exporter_build_info"].samples[0].labels["nvml"] == "fake"
    assert fams["exporter_nvml_up"].samples[0].value == 1
    assert {s.labels["cpu"] for s in fams["host_cpu_core_utilization_ratio"].samples} == {"0", "1"}


def test_names_follow_prometheus_conventions(procfs):
    _, s = sampled(2, procfs)
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: s.snapshot))
    text = generate_latest(registry).decode()
    names = {m.name for m in text_string_to_metric_families(text)}
    units = ("_ratio", "_bytes", "_bytes_per_second", "_celsius", "_watts", "_joules", "_hertz", "_seconds",
             "_info", "_up", "_active", "_errors", "_samples", "_overruns", "_rows", "_pending", "_failure",
             "_success")
    for name in names:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert not re.search(r"percent|_pct|_mib|_mb|_kb|_ms\b|milli|celcius", name), name
        assert name.endswith(units), f"{name}: no base unit suffix"
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert len(line.rsplit(" ", 1)) == 2 and not re.search(r"\}\s+\S+\s+\d+$", line), "no timestamps"


def test_ratios_stay_in_range_and_match_the_snapshot(procfs):
    _, s = sampled(2, procfs)
    fams = families(s)
    for name in ("gpu_utilization_ratio", "gpu_memory_bandwidth_utilization_ratio", "gpu_pcie_utilization_ratio",
                 "gpu_memory_used_ratio",
                 "host_cpu_utilization_ratio"):
        for sample in fams[name].samples:
            assert 0.0 <= sample.value <= 1.0, (name, sample)
    util = {x.labels["gpu"]: x.value for x in fams["gpu_utilization_ratio"].samples}
    assert util == {str(g.identity.index): g.reading[UTILIZATION] for g in s.snapshot.gpus}
    used = {x.labels["gpu"]: x.value for x in fams["gpu_memory_used_bytes"].samples}
    total = {x.labels["gpu"]: x.value for x in fams["gpu_memory_total_bytes"].samples}
    assert all(0 < used[g] < total[g] for g in used)


def test_a_scrape_never_calls_nvml(procfs):
    fake, s = sampled(2, procfs)
    before = sum(fake.calls.values())
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: s.snapshot))
    for _ in range(5):
        generate_latest(registry)
    assert sum(fake.calls.values()) == before


def test_histogram_buckets_are_cumulative_with_inf(procfs):
    fake = FakeNvml(1)
    fake.inject("nvmlDeviceGetSamples", gpu=0, error=pynvml.NVML_ERROR_NOT_SUPPORTED)  # one polled value a tick
    s = make_sampler(fake, procfs.root)
    for _ in range(10):
        s.tick()
    fams = families(s)
    buckets = [x for x in fams["gpu_sampled_utilization_ratio"].samples if x.name.endswith("_bucket")]
    les = [x.labels["le"] for x in buckets]
    assert "0.4" in les and les[-1] == "+Inf"
    values = [x.value for x in buckets]
    assert values == sorted(values) and values[-1] == 10


def test_unsupported_metric_is_omitted_only_for_that_gpu(procfs):
    fake = FakeNvml(2)
    fake.inject("nvmlDeviceGetPowerUsage", gpu=1, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = make_sampler(fake, procfs.root)
    s.tick()
    fams = families(s)
    assert [x.labels["gpu"] for x in fams["gpu_power_watts"].samples] == ["0"]
    assert {x.labels["gpu"]: x.value for x in fams["gpu_up"].samples} == {"0": 1, "1": 1}
    assert "exporter_errors" not in {f for f in fams if fams[f].samples}


def test_lost_gpu_keeps_up_series_drops_values(procfs):
    fake = FakeNvml(2)
    s = make_sampler(fake, procfs.root)
    s.tick()
    fake.lose_gpu(1)
    s.tick()
    fams = families(s)
    assert {x.labels["gpu"]: x.value for x in fams["gpu_up"].samples} == {"0": 1, "1": 0}
    assert [x.labels["gpu"] for x in fams["gpu_utilization_ratio"].samples] == ["0"]
    errors = {(x.labels["source"], x.labels["call"]): x.value for x in fams["exporter_errors"].samples
              if x.name.endswith("_total")}
    # The lost GPU's first call of the tick fails and ends its read: counted once, under that call (the
    # batched field read comes first since scalar fields replaced their calls).
    assert errors == {("nvml", "nvmlDeviceGetFieldValues"): 1}


def test_server_metrics_are_documented_and_count():
    from prometheus_client import CollectorRegistry

    from exporter.web.server import ServerCollector, make_server
    from tests.conftest import REPO, http_get

    registry = CollectorRegistry(auto_describe=False)
    server = make_server("127.0.0.1:0", registry, lambda: (True, "ok\n"))
    registry.register(ServerCollector(server))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert http_get(url + "/nope")[0] == 404
        assert http_get(url + "/metrics")[0] == 200
        body = http_get(url + "/metrics")[2].decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'exporter_http_requests_total{code="404"} 1.0' in body
    assert 'exporter_http_requests_total{code="200"} 1.0' in body  # the first scrape; this one is in flight
    assert "exporter_http_requests_in_flight 1.0" in body
    docs = (REPO / "docs" / "metrics.md").read_text()
    for name in ("exporter_http_requests_total", "exporter_http_connections_closed_total",
                 "exporter_http_connections_open", "exporter_http_requests_in_flight"):
        assert f"# TYPE {name.removesuffix('_total')}" in body or f"# TYPE {name} " in body, name
        assert f"`{name}`" in docs, name
