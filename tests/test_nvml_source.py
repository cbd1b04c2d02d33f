from __future__ import annotations

import pynvml
import pytest

from exporter.fake_nvml import FakeGpuSpec, FakeNvml
from exporter.sources.nvml import GpuReader, NvmlSource
from exporter.sources.nvml.reader import REOPEN_BACKOFF_S
from exporter.sources.nvml.specs import ENERGY, MEMORY_BANDWIDTH_UTILIZATION, MEMORY_CLOCK, MEMORY_TOTAL, MEMORY_USED, POWER, POWER_LIMIT, SM_CLOCK, TEMPERATURE, UTILIZATION


def open_reader(fake: FakeNvml, index: int = 0) -> GpuReader:
    src = NvmlSource(fake, "fake", clock=fake.clock)
    src.poll(0.0)
    assert src.status.up
    return src.gpus[index]


def test_values_are_converted_to_base_units(clock):
    fake = FakeNvml(1, clock=clock)
    r = open_reader(fake)
    first = r.read()
    clock.advance(0.2)
    reading = r.read()
    assert reading.ok
    h = fake.nvmlDeviceGetHandleByIndex(0)
    util = fake.nvmlDeviceGetUtilizationRates(h)
    assert reading[UTILIZATION] == util.gpu / 100
    assert reading[MEMORY_BANDWIDTH_UTILIZATION] == util.memory / 100
    mem = fake.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert reading[MEMORY_USED] == mem.used and reading[MEMORY_TOTAL] == mem.total
    assert reading[POWER] == fake.nvmlDeviceGetPowerUsage(h) / 1000
    assert reading[POWER_LIMIT] == 700.0
    assert reading[ENERGY] == fake.nvmlDeviceGetTotalEnergyConsumption(h) / 1000
    assert reading[SM_CLOCK] == fake.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) * 1e6
    assert reading[MEMORY_CLOCK] == 2619e6
    assert reading[TEMPERATURE] == fake.nvmlDeviceGetTemperature(h, 0)
    # PCIe from the byte counters: the first read has no previous value, the second gives a rate.
    assert first.pcie_rx_bytes_per_second is None
    busy = fake._busy(0, clock() - fake.t0)
    assert reading.pcie_rx_bytes_per_second == pytest.approx(12e9 if busy else 1e9, rel=0.01)
    ident = r.identity
    assert ident.uuid.startswith("GPU-") and ident.name == "NVIDIA H100 80GB HBM3"
    assert ident.pci_bus_id == "00000000:18:00.0"
    assert ident.pcie_link_max_bytes_per_second == pytest.approx(63.0e9, rel=0.01)


def test_not_supported_is_omitted_and_probed_once(clock):
    fake = FakeNvml(1, clock=clock)
    fake.inject("nvmlDeviceGetPowerUsage", gpu=0, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    fake.inject("nvmlDeviceGetTotalEnergyConsumption", gpu=0, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    r = open_reader(fake)
    for _ in range(5):
        reading = r.read()
        clock.advance(0.2)
    assert reading.ok and reading[POWER] is None and reading[ENERGY] is None
    assert reading[UTILIZATION] is not None
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 1
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1


def test_memory_info_v2_falls_back_to_v1(clock):
    fake = FakeNvml(1, clock=clock)
    real = fake.nvmlDeviceGetMemoryInfo

    def v1_only(handle, version=None):
        if version:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return real(handle)

    fake.nvmlDeviceGetMemoryInfo = v1_only
    reading = open_reader(fake).read()
    assert reading.ok
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert reading[MEMORY_USED] == real(h).used  # v1 "used", reservation included


def test_transient_error_omits_value_and_marks_failure(clock):
    fake = FakeNvml(1, clock=clock)
    r = open_reader(fake)
    fake.inject("nvmlDeviceGetTemperature", gpu=0, error=pynvml.NVML_ERROR_UNKNOWN, times=1)
    bad = r.read()
    assert not bad.ok and bad.errors == ("nvmlDeviceGetTemperature",) and bad[TEMPERATURE] is None
    assert bad[UTILIZATION] is not None  # the rest of the read went on
    assert r.read().ok  # not cached as unsupported: it is retried and recovers


def test_lost_gpu_aborts_the_read_and_reopens_after_reset(clock, monkeypatch):
    fake = FakeNvml(1, clock=clock)
    r = open_reader(fake)
    assert r.read().ok
    fake.lose_gpu(0)
    lost = r.read()
    assert lost.lost and not lost.ok and lost[UTILIZATION] is None
    calls_while_lost = sum(fake.calls.values())
    assert r.read().lost  # within the re-open backoff: no NVML call at all
    assert sum(fake.calls.values()) == calls_while_lost
    fake.clear_faults(0)  # the GPU is reset and comes back
    clock.advance(REOPEN_BACKOFF_S)
    back = r.read()
    assert back.ok and back[UTILIZATION] is not None


def test_nvml_absent_then_present_is_picked_up():
    fake = FakeNvml(2, library_present=False)
    src = NvmlSource(fake, "real", backoff_initial_s=1.0, backoff_max_s=4.0)
    assert src.poll(0.0) == "nvmlInit"
    assert not src.status.up and src.status.mode == "absent"
    assert "no NVIDIA GPU found" in src.status.message
    assert src.poll(0.5) is None  # backing off: no retry yet
    assert src.poll(1.0) == "nvmlInit"  # retried at 1 s, next in 2 s
    fake.library_present = True
    assert src.poll(2.5) is None and not src.status.up
    assert src.poll(3.0) is None
    assert src.status.up and src.status.mode == "real" and len(src.gpus) == 2


def test_init_unknown_error_then_success():
    fake = FakeNvml(1)
    fake.inject("nvmlInit", error=pynvml.NVML_ERROR_UNKNOWN, times=1)
    src = NvmlSource(fake, "real", backoff_initial_s=0.0)
    assert src.poll(0.0) == "nvmlInit" and src.status.mode == "real"
    assert "Unknown Error" in src.status.message
    src.poll(0.0)
    assert src.status.up


def test_module_missing():
    src = NvmlSource(None, "absent")
    assert src.poll(0.0) == "import"
    assert src.status.mode == "absent" and not src.status.up


def test_pcie_counter_wrap_gives_a_correct_rate(clock):
    spec = FakeGpuSpec(pcie_counter_start=2**64 - 5 * 10**8, low_fraction=0.0)  # always busy: rx 12 GB/s
    fake = FakeNvml(1, spec=spec, clock=clock)
    r = open_reader(fake)
    r.read()
    clock.advance(0.2)  # 2.4 GB flows: the rx counter wraps past 2**64
    reading = r.read()
    assert reading.pcie_rx_bytes_per_second == pytest.approx(12e9, rel=1e-6)


def test_pcie_fallback_uses_blocking_call_off_the_read_path(clock):
    import threading

    fake = FakeNvml(1, spec=FakeGpuSpec(pcie_counters=False))
    callers = set()
    blocking = fake.nvmlDeviceGetPcieThroughput

    def recording(device, counter):
        callers.add(threading.current_thread().name)
        return blocking(device, counter)

    fake.nvmlDeviceGetPcieThroughput = recording
    r = open_reader(fake)
    r.read()  # discovers the counters are unsupported and starts the fallback thread
    import time

    deadline = time.monotonic() + 5
    reading = r.read()
    while reading.pcie_rx_bytes_per_second is None and time.monotonic() < deadline:
        time.sleep(0.02)
        reading = r.read()
    assert reading.pcie_rx_bytes_per_second is not None and reading.pcie_rx_bytes_per_second > 0
    assert callers == {"pcie-fallback"}  # the 20 ms call never runs on the reading thread
    assert fake.calls["nvmlDeviceGetFieldValues"] == 1  # unsupported: probed once
