"""MIG: per-MIG-device memory and processes with instance labels, utilisation omitted on the parent,
power/temperature/clocks/PCIe kept on the parent, instances re-enumerated when they change."""
from __future__ import annotations

import pytest

from exporter.fake.nvml import FakeGpuSpec, FakeNvml, mig_memory_bytes
from tests.conftest import ManualClock, PrometheusServer, families, http_get, make_sampler

H100_SPLIT = ("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb")


def mig_sampler(procfs, profiles=H100_SPLIT):
    clock = ManualClock()
    fake = FakeNvml(specs=[FakeGpuSpec(mig_profiles=profiles), FakeGpuSpec()], clock=clock)
    s = make_sampler(fake, procfs.root, clock=clock)
    for _ in range(3):
        s.tick()
        clock.advance(0.5)  # the driver takes new utilisation samples on the non-MIG GPU
    return fake, s


def test_mig_devices_with_memory_processes_and_labels(procfs):
    _, s = mig_sampler(procfs)
    fams = families(s)
    total = {(x.labels["gpu"], x.labels["gpu_instance_id"]): x.value for x in fams["gpu_mig_memory_total_bytes"].samples}
    assert total == {("0", "1"): 40 * 2**30, ("0", "5"): 20 * 2**30, ("0", "13"): 10 * 2**30, ("0", "14"): 10 * 2**30}
    labels = fams["gpu_mig_memory_used_bytes"].samples[0].labels
    assert labels["mig_uuid"].startswith("MIG-") and labels["compute_instance_id"] == "0"
    procs = {(x.labels["gpu_instance_id"], x.labels["pid"]): x.value
             for x in fams["gpu_mig_process_memory_used_bytes"].samples}
    assert procs == {("1", "6000"): 20 * 2**30, ("5", "6001"): 10 * 2**30, ("13", "6002"): 5 * 2**30,
                     ("14", "6003"): 5 * 2**30}
    # The parent's own process list is not read with MIG on (no double counting); GPU 1 is unaffected.
    assert {x.labels["gpu"] for x in fams["gpu_process_memory_used_bytes"].samples} == {"1"}


def test_mig_parent_keeps_physical_metrics_and_omits_utilisation(procfs):
    fake, s = mig_sampler(procfs)
    fams = families(s)
    assert {x.labels["gpu"] for x in fams["gpu_utilization_ratio"].samples} == {"1"}  # omitted, not faked
    assert {x.labels["gpu"] for x in fams["gpu_sampled_utilization_ratio"].samples
            if x.name.endswith("_count")} == {"1"}
    for name in ("gpu_power_watts", "gpu_temperature_celsius", "gpu_memory_used_bytes"):
        assert {x.labels["gpu"] for x in fams[name].samples} == {"0", "1"}, name
    assert {x.labels["gpu"] for x in fams["gpu_clock_hertz"].samples} == {"0", "1"}
    assert {x.labels["gpu"]: x.value for x in fams["gpu_up"].samples} == {"0": 1, "1": 1}
    assert dict(s.snapshot.stats.errors) == {}
    assert fake.calls["nvmlDeviceGetUtilizationRates"] >= 3  # GPU 1 every tick; GPU 0 probed once


def test_mig_instances_are_re_enumerated(procfs, monkeypatch):
    fake, s = mig_sampler(procfs, profiles=("3g.40gb",))
    assert len(families(s)["gpu_mig_memory_total_bytes"].samples) == 1
    fake.specs[0] = FakeGpuSpec(mig_profiles=("3g.40gb", "3g.40gb"))  # an admin adds an instance
    monkeypatch.setattr("exporter.sources.nvml.reader.HEALTH_REFRESH_S", 0.0)
    s.tick()
    assert len(families(s)["gpu_mig_memory_total_bytes"].samples) == 2
    fake.specs[0] = FakeGpuSpec()  # MIG turned off
    s.tick()
    fams = families(s)
    assert "gpu_mig_memory_total_bytes" not in fams  # no MIG device: the family is not rendered
    assert {x.labels["gpu"] for x in fams["gpu_process_memory_used_bytes"].samples} == {"0", "1"}


def test_mig_empty_slots_are_not_errors(procfs):
    fake, s = mig_sampler(procfs, profiles=("1g.10gb",))
    assert fake.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 7  # every slot probed, six empty
    assert dict(s.snapshot.stats.errors) == {}
    assert mig_memory_bytes("7g.80gb") == 80 * 2**30


@pytest.mark.e2e
def test_mig_through_real_prometheus(exporter_proc, tmp_path):
    exporter = exporter_proc("--fake-gpus", "2", "--fake-mig", ",".join(H100_SPLIT), "--sample.interval", "100ms")
    prom = PrometheusServer(tmp_path / "prom", {"gpu": [f"127.0.0.1:{exporter.port}"]})
    try:
        result = prom.wait_for("gpu_mig_memory_total_bytes", timeout=40, min_results=4)
        assert {r["metric"]["gpu_instance_id"] for r in result} == {"1", "5", "13", "14"}
        assert prom.wait_for("gpu_mig_process_memory_used_bytes", min_results=4)
        assert {r["metric"]["gpu"] for r in prom.query("gpu_utilization_ratio")} == {"1"}
        assert {r["metric"]["gpu"] for r in prom.query("gpu_power_watts")} == {"0", "1"}
    finally:
        prom.stop()
    assert http_get(exporter.url + "/healthz")[0] == 200


def test_gpm_activity_per_gpu_instance_on_its_mig_devices(procfs):
    """The only activity signal under MIG: GPM per GPU instance (nvmlGpmMigSampleGet), on the same MIG
    devices and labels as the MIG memory series."""
    fake, s = mig_sampler(procfs)
    fams = families(s)
    t = s.snapshot.taken_at - fake.t0  # the fake time of the last tick (sampler and fake share the clock)
    tensor = {x.labels.get("gpu_instance_id"): x for x in fams["gpu_tensor_active_ratio"].samples
              if x.labels["gpu"] == "0"}
    mig = {x.labels["gpu_instance_id"]: x.labels for x in fams["gpu_mig_memory_used_bytes"].samples}
    assert set(tensor) == {None, *mig}  # the whole GPU, and each GPU instance
    for gi, labels in mig.items():
        assert {k: tensor[gi].labels[k] for k in labels} == labels  # same label set as the MIG series
        want = fake.gpm_percent_at(0, 5, t, int(gi)) / 100  # NVML_GPM_METRIC_ANY_TENSOR_UTIL
        assert tensor[gi].value == pytest.approx(want, rel=1e-12)
    assert len({x.value for gi, x in tensor.items() if gi}) > 1  # instances differ
