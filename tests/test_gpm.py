"""The GPM + NVLink reader through the real pynvml against the C stand-in (and the Python fake where a
test counts calls): ratios equal what the stand-in serves, absent (never 0) where unsupported, NVLink
rates right from GPM and from the per-link field counters."""
from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.sources.gpm import MIN_SAMPLE_GAP_S, GpmActivity, GpmReader
from tests.conftest import ManualClock

GAP = MIN_SAMPLE_GAP_S + 0.02  # real time between ticks on the stand-in
ACTIVITY = {"gpm.1": 20, "gpm.2": 42.5, "gpm.3": 30, "gpm.5": 17.5, "gpm.10": 60}
EXPECTED = GpmActivity(sm_active=0.425, sm_occupancy=0.30, tensor_active=0.175, dram_active=0.60,
                       graphics_engine_active=0.20)


def open_stub(stub: Any, **config: Any) -> tuple[Any, list[GpmReader]]:
    stub.configure({"gpus": 2, **config})
    nvml = stub.bind()
    nvml.nvmlInit()
    readers = [GpmReader(nvml, nvml.nvmlDeviceGetHandleByIndex(i), i) for i in range(2)]
    return nvml, readers


def two_ticks(reader: GpmReader, **kw: Any):
    first = reader.read(**kw)
    time.sleep(GAP)
    return first, reader.read(**kw)


@pytest.fixture
def stub(nvml_stub):
    yield nvml_stub
    import pynvml

    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass


def test_ratios_equal_the_stand_ins_values(stub):
    _, (r0, _) = open_stub(stub, **ACTIVITY)
    first, second = two_ticks(r0)
    assert first.activity is None  # no pair yet
    assert second.activity == EXPECTED  # the stand-in's percentages / 100, exactly
    assert second.errors == () and not second.lost
    r0.close()


def test_a_metric_that_fails_or_is_not_finite_is_absent_not_zero(stub):
    config = {k: v for k, v in ACTIVITY.items() if k != "gpm.3"}  # SM occupancy: per-metric NotSupported
    _, (r0, _) = open_stub(stub, **{**config, "gpm.5": "nan", "gpm.10": "inf"})
    act = two_ticks(r0)[1].activity
    assert act.sm_occupancy is None  # per-metric nvmlReturn NotSupported
    assert act.tensor_active is None and act.dram_active is None  # NaN, inf
    assert act.sm_active == 0.425 and act.graphics_engine_active == 0.20


@pytest.mark.parametrize("config", [{"gpm_supported": 0}, {"fail.nvmlGpmQueryDeviceSupport": 3},
                                    {"fail.nvmlGpmQueryDeviceSupport": 13}, {"fail.nvmlGpmQueryDeviceSupport": 25},
                                    {"fail.nvmlGpmSampleGet": 3}, {"fail.nvmlGpmMetricsGet": 25}],
                         ids=["not-a-gpm-device", "NotSupported", "FunctionNotFound", "VersionMismatch",
                              "SampleGet-NotSupported", "MetricsGet-VersionMismatch"])
def test_unsupported_gpm_is_absent_and_logged_once(stub, caplog, config):
    _, (r0, r1) = open_stub(stub, **ACTIVITY, **{f"{k}.0": v for k, v in config.items()})
    caplog.set_level(logging.INFO, logger="exporter.gpm")
    readings = [r0.read()]
    for _ in range(3):
        time.sleep(GAP)
        readings.append(r0.read())
    assert all(r.activity is None and r.errors == () for r in readings)
    assert sum("GPM not available" in m for m in caplog.messages) == 1
    assert two_ticks(r1)[1].activity == EXPECTED  # GPU 1 has GPM


def test_ticks_closer_than_100ms_report_the_last_pair_that_was(stub):
    """The reader decides "too close" on its own clock (a manual one here, so a slow machine cannot turn
    the close ticks into far ones); the stand-in, on real time, refuses any pair under 100 ms."""
    nvml, _ = open_stub(stub, **ACTIVITY)
    clock = ManualClock()
    r0 = GpmReader(nvml, nvml.nvmlDeviceGetHandleByIndex(0), 0, clock=clock)
    r0.read()
    time.sleep(GAP)
    clock.advance(GAP)
    assert r0.read().activity.sm_active == 0.425
    stub.configure({"gpus": 2, **ACTIVITY, "gpm.2": 80})
    for _ in range(2):  # 30 and 60 ms after the last pair: no new pair, the last one again
        clock.advance(0.03)
        close = r0.read()
        assert close.errors == () and close.activity.sm_active == 0.425
    time.sleep(GAP)
    clock.advance(0.05)  # 110 ms after the last pair's second sample
    assert r0.read().activity.sm_active == 0.80
    r0.close()


def test_nvlink_from_gpm_totals(stub):
    _, (r0, _) = open_stub(stub, **ACTIVITY, **{"gpm.60": 1000, "gpm.61": 250.5, "nvlink_links": 18})
    reading = two_ticks(r0)[1]
    assert reading.nvlink_source == "gpm"
    assert reading.nvlink_tx_bytes_per_second == 250.5 * 2**20 and reading.nvlink_rx_bytes_per_second == 1000 * 2**20


def test_nvlink_from_field_counters_without_gpm(stub):
    # 1 and 3 GiB/s per link: whole-KiB counters then round off under 1e-5 of a 120 ms delta
    _, (r0, r1) = open_stub(stub, gpm_supported=0, nvlink_links=4, nvlink_tx_kib_s=2**20, nvlink_rx_kib_s=3 * 2**20,
                            **{"nvlink_links.1": 0, "gpm.60": 1})
    first, second = two_ticks(r0)
    assert first.nvlink_tx_bytes_per_second is None  # one counter reading so far
    assert second.nvlink_source == "fields" and second.activity is None
    assert second.nvlink_tx_bytes_per_second == pytest.approx(4 * 2**30, rel=1e-4)
    assert second.nvlink_rx_bytes_per_second == pytest.approx(4 * 3 * 2**30, rel=1e-4)
    no_links = two_ticks(r1)[1]  # GPU 1: a PCIe board without NVLink
    assert no_links.nvlink_tx_bytes_per_second is None and no_links.nvlink_source is None


def test_mig_activity_per_gpu_instance(stub):
    _, (r0, _) = open_stub(stub, **ACTIVITY, **{"mig.0": "1,2", "gpm.2.gi1": 20, "gpm.2.gi2": 70})
    reading = two_ticks(r0, gpu_instance_ids=(1, 2))[1]
    assert [(gi, a.sm_active) for gi, a in reading.mig] == [(1, 0.20), (2, 0.70)]
    assert reading.mig[0][1].dram_active == 0.60  # unset per instance: the GPU-wide value
    assert r0.read(gpu_instance_ids=(2,)).mig[0][0] == 2  # instance 1 destroyed: its samples are freed
    assert set(r0._pairs) == {None, 2}


def test_a_lost_gpu_costs_only_that_gpu_and_comes_back_after_rebind(stub):
    nvml, (r0, r1) = open_stub(stub, **ACTIVITY)
    two_ticks(r0), two_ticks(r1)
    stub.configure({"gpus": 2, **ACTIVITY, "lost_gpu": 0})
    time.sleep(GAP)
    assert r0.read().lost
    assert r1.read().activity == EXPECTED
    stub.configure({"gpus": 2, **ACTIVITY})
    r0.rebind(nvml.nvmlDeviceGetHandleByIndex(0))
    assert r0.read().activity is None  # a fresh pair is needed after the reset
    time.sleep(GAP)
    assert r0.read().activity == EXPECTED


def test_buffers_allocated_once_and_one_field_call_per_tick():
    clock = ManualClock()
    fake = FakeNvml(1, clock=clock, spec=FakeGpuSpec(gpm_supported=False))
    fake.nvmlInit()
    reader = GpmReader(fake, fake.nvmlDeviceGetHandleByIndex(0), 0, clock=clock)
    reader.read()
    probes = fake.calls["nvmlDeviceGetFieldValues"]
    for _ in range(5):
        clock.advance(0.2)
        reading = reader.read()
    assert fake.calls["nvmlDeviceGetFieldValues"] == probes + 5
    assert reading.nvlink_source == "fields" and reading.nvlink_tx_bytes_per_second > 0

    fake = FakeNvml(1, clock=clock)  # with GPM: two samples and one metrics struct for the whole life
    fake.nvmlInit()
    reader = GpmReader(fake, fake.nvmlDeviceGetHandleByIndex(0), 0, clock=clock)
    structs = set()
    for _ in range(6):
        clock.advance(0.2)
        reading = reader.read()
        if reader._metrics is not None:
            structs.add(id(reader._metrics))
    assert fake.calls["nvmlGpmSampleAlloc"] == 2 and fake.calls["nvmlGpmSampleGet"] == 6
    assert fake.calls["nvmlGpmMetricsGet"] == 5 and len(structs) == 1
    assert reading.activity is not None and reading.nvlink_source == "gpm"
    reader.close()
    assert fake.calls["nvmlGpmSampleFree"] == 2
