"""End to end: the exporter with fake GPUs, scraped by a real Prometheus, queried through its HTTP API."""
from __future__ import annotations

import subprocess

import pytest

from exporter.fake.nvml import FakeGpuSpec
from tests.conftest import STACK_PODS, find_tool, http_get

pytestmark = pytest.mark.e2e


def values(result: list[dict]) -> dict[str, float]:
    return {r["metric"].get("gpu", ""): float(r["value"][1]) for r in result}


def test_gpu_and_cpu_gauges_are_plausible(stack):
    prom = stack.prom
    assert values(prom.query("gpu_up")) == {"0": 1.0, "1": 1.0}
    for gpu, v in values(prom.query("gpu_utilization_ratio")).items():
        assert 0.05 <= v <= 1.0, (gpu, v)
    for gpu, v in values(prom.query("gpu_memory_used_ratio")).items():
        assert 0.1 < v < 0.5
    assert all(20 < v < 100 for v in values(prom.query("gpu_temperature_celsius")).values())
    assert all(100 <= v <= 700 for v in values(prom.query("gpu_power_watts")).values())
    cpu = prom.query("host_cpu_utilization_ratio")
    assert len(cpu) == 1 and 0.0 <= float(cpu[0]["value"][1]) <= 1.0
    assert len(prom.query("host_cpu_core_utilization_ratio")) >= 1
    info = prom.query("gpu_info")
    assert {r["metric"]["name"] for r in info} == {"NVIDIA H100 80GB HBM3"}


def test_counters_increase(stack):
    prom = stack.prom
    energy = values(prom.query("rate(gpu_energy_joules_total[10s])"))
    assert set(energy) == {"0", "1"}
    spec = FakeGpuSpec()
    for v in energy.values():  # average watts over the window lies between the two phases
        assert spec.power_low_mw / 1000 <= v <= spec.power_high_mw / 1000
    pcie = prom.query('gpu_pcie_throughput_bytes_per_second{direction="rx"}')
    assert len(pcie) == 2 and all(float(r["value"][1]) > 0 for r in pcie)


def test_gpm_activity_and_nvlink_follow_the_fakes_duty_cycle(stack):
    """The fake's GPM: SM activity 0.9 x utilisation, occupancy 0.45 x, graphics = utilisation; NVLink
    between its idle and busy rates, summed over 18 links."""
    prom = stack.prom
    util = values(prom.query("avg_over_time(gpu_graphics_engine_active_ratio[8s])"))
    assert set(util) == {"0", "1"} and all(0.05 < v <= 1.0 for v in util.values())
    sm = values(prom.query("avg_over_time(gpu_sm_active_ratio[8s])"))
    assert sm == {g: pytest.approx(0.9 * util[g], rel=1e-6) for g in util}
    for name in ("gpu_sm_occupancy_ratio", "gpu_tensor_active_ratio", "gpu_dram_active_ratio"):
        got = values(prom.query(name))
        assert set(got) == {"0", "1"} and all(0.0 <= v <= 1.0 for v in got.values()), name
    spec = FakeGpuSpec()
    for direction in ("tx", "rx"):
        nvlink = values(prom.query(f'gpu_nvlink_throughput_bytes_per_second{{direction="{direction}"}}'))
        assert set(nvlink) == {"0", "1"}
        low, high = getattr(spec, f"nvlink_{direction}_low_bps"), getattr(spec, f"nvlink_{direction}_high_bps")
        assert all(low * 0.99 <= v <= high * 1.01 for v in nvlink.values())


def test_fraction_below_40_percent_matches_the_duty_cycle(stack):
    prom = stack.prom
    expr = ('sum by (gpu) (rate(gpu_sampled_utilization_ratio_bucket{le="0.4"}[10s]))'
            ' / sum by (gpu) (rate(gpu_sampled_utilization_ratio_count[8s]))')
    fractions = values(prom.query(expr))
    assert set(fractions) == {"0", "1"}
    for gpu, f in fractions.items():
        assert 0.0 < f < 1.0
        assert abs(f - FakeGpuSpec().low_fraction) < 0.1, (gpu, f)


def test_sub_scrape_resolution(stack):
    """Prometheus scrapes every 1 s; the histograms hold every sample of the driver's buffer
    (one per 1/6 s on the simulated H100), and the sampler's own histograms every 100 ms tick."""
    prom = stack.prom
    driver = 1 / FakeGpuSpec().driver_sample_period_s
    for v in values(prom.query("rate(gpu_sampled_utilization_ratio_count[8s])")).values():
        assert driver - 1 <= v <= driver + 1
    ticks = prom.query('rate(exporter_sample_duration_seconds_count{source="all"}[8s])')
    assert 8 <= float(ticks[0]["value"][1]) <= 11  # a 100 ms interval


def test_promtool_check_metrics_has_no_findings(stack):
    exporter = stack.exporter
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        _, _, body = http_get(exporter.url + "/metrics", headers={"Accept": accept} if accept else {})
        if accept:
            continue  # promtool lints the text format; OpenMetrics is covered by the parser test
        r = subprocess.run([find_tool("promtool"), "check", "metrics"], input=body, capture_output=True,
                           timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == b"" and r.stderr.strip() == b"", (r.stdout, r.stderr)


def test_exporter_self_metrics(stack):
    prom = stack.prom
    assert float(prom.query("exporter_nvml_up")[0]["value"][1]) == 1
    assert prom.query('exporter_build_info{nvml="fake"}')
    assert prom.query("process_resident_memory_bytes")
    assert prom.query('rate(exporter_samples_total[10s]) > 5')
    assert not prom.query("python_gc_objects_collected_total")  # gc/platform collectors dropped


def test_process_cgroup_and_shm_series(stack):
    prom = stack.prom
    procs = prom.query("gpu_process_memory_used_bytes")
    assert {r["metric"]["gpu"] for r in procs} == {"0", "1"}
    assert {"pid", "comm", "container_id", "pod_uid"} <= set(procs[0]["metric"]) | {"comm", "container_id",
                                                                                      "pod_uid"}
    assert prom.query("rate(cgroup_cpu_usage_seconds_total[10s]) > 0")  # the exporter's own cgroup, real kernel
    assert float(prom.query("host_shm_size_bytes")[0]["value"][1]) > 0


def test_xid_and_health_series(stack):
    """--fake-scenario xids: GPU 1 reports XID 31 five seconds after start; counters reach Prometheus."""
    prom = stack.prom
    xid = prom.wait_for('gpu_xid_errors_total{gpu="1",xid="31"}', timeout=20)
    assert float(xid[0]["value"][1]) >= 1
    assert prom.query("gpu_row_remap_pending == 0")
    # Off by default (the series budget, exporter/pipeline/collectors.py); test_collectors.py switches them on.
    for name in ("gpu_ecc_errors_total", "gpu_sample_buffer_seconds", "gpu_power_from_energy_watts",
                 "gpu_clock_event_active", "gpu_pcie_link_max_bytes_per_second"):
        assert not prom.query(name), name


def test_which_pod_holds_each_gpu_through_the_join(stack):
    """gpu_pod_info from the stand-in kubelet, joined in Prometheus as README's DaemonSet section shows."""
    prom = stack.prom
    joined = prom.wait_for("gpu_utilization_ratio * on(instance, gpu) group_left(namespace, pod) gpu_pod_info",
                           min_results=2)
    assert {r["metric"]["gpu"]: (r["metric"]["namespace"], r["metric"]["pod"]) for r in joined} == {
        str(gpu): ref[:2] for gpu, ref in STACK_PODS.items()}
    util = values(prom.query("gpu_utilization_ratio"))
    for r in joined:  # the join keeps the utilisation value
        assert abs(float(r["value"][1]) - util[r["metric"]["gpu"]]) < 1e-9
    by_pod = prom.query("sum by (namespace, pod) (gpu_utilization_ratio * on(instance, gpu) group_right gpu_pod_info)")
    assert {r["metric"]["pod"] for r in by_pod} == {"synth-0", "synth-1"}
    assert float(prom.query("exporter_pod_resources_up")[0]["value"][1]) == 1
    # A process on a GPU one container holds carries that container's labels.
    procs = prom.query('gpu_process_memory_used_bytes{gpu="0"}')
    assert procs and {r["metric"].get("pod") for r in procs} == {"synth-0"}
