"""The fake must behave like pynvml (nvidia-ml-py): same names, signatures, errors and result types."""
from __future__ import annotations

import inspect
import time

import pynvml
import pytest

from exporter.fake.nvml import FakeGpuSpec, FakeNvml, fake_call_names


def test_every_fake_function_exists_in_pynvml_with_the_same_parameters():
    for name in fake_call_names():
        real = getattr(pynvml, name)
        fake = getattr(FakeNvml, name)
        real_params = list(inspect.signature(real).parameters)
        fake_params = list(inspect.signature(fake).parameters)[1:]  # drop self
        assert fake_params == real_params, name


def test_constants_and_error_classes_are_pynvml_objects():
    fake = FakeNvml(1)
    assert fake.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    assert fake.NVML_FI_DEV_PCIE_COUNT_TX_BYTES == pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES == 197
    assert fake.nvmlMemory_v2 == pynvml.nvmlMemory_v2


def test_calls_before_init_raise_uninitialized_like_the_library():
    fake = FakeNvml(1)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    assert fake.nvmlDeviceGetCount() == 1
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(1)


def test_result_types_match_pynvml():
    fake = FakeNvml(1)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(fake.nvmlDeviceGetUtilizationRates(h), pynvml.c_nvmlUtilization_t)
    assert isinstance(fake.nvmlDeviceGetMemoryInfo(h), pynvml.c_nvmlMemory_t)
    v2 = fake.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert isinstance(v2, pynvml.c_nvmlMemory_v2_t)
    assert v2.used + v2.reserved + v2.free == v2.total
    assert isinstance(fake.nvmlDeviceGetName(h), str)
    assert isinstance(fake.nvmlDeviceGetPciInfo(h).busId, str)  # pynvml's struct decodes char arrays
    fields = fake.nvmlDeviceGetFieldValues(h, [197, 198, 9999])
    assert isinstance(fields[0], pynvml.c_nvmlFieldValue_t)
    assert fields[0].nvmlReturn == pynvml.NVML_SUCCESS and fields[2].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_library_missing():
    fake = FakeNvml(1, library_present=False)
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        fake.nvmlInit()


def test_fault_injection_error_latency_start_and_count(clock):
    fake = FakeNvml(2, clock=clock, pcie_throughput_latency_s=0)
    fake.nvmlInit()
    h0, h1 = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(1)
    fake.inject("nvmlDeviceGetPowerUsage", gpu=0, error=pynvml.NVML_ERROR_UNKNOWN, after_s=5, times=1)
    fake.nvmlDeviceGetPowerUsage(h0)  # not yet
    clock.advance(5)
    with pytest.raises(pynvml.NVMLError_Unknown):
        fake.nvmlDeviceGetPowerUsage(h0)
    fake.nvmlDeviceGetPowerUsage(h0)  # only once
    fake.lose_gpu(1)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetTemperature(h1, pynvml.NVML_TEMPERATURE_GPU)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetHandleByIndex(1)
    fake.nvmlDeviceGetTemperature(h0, pynvml.NVML_TEMPERATURE_GPU)  # the other GPU is fine
    fake.inject("nvmlDeviceGetClockInfo", gpu=0, latency_s=0.05)
    t = time.perf_counter()
    fake.nvmlDeviceGetClockInfo(h0, pynvml.NVML_CLOCK_SM)
    assert time.perf_counter() - t >= 0.05
    with pytest.raises(ValueError):
        fake.inject("nvmlNoSuchCall", gpu=0)


def test_pcie_throughput_blocks_like_the_real_call():
    fake = FakeNvml(1)  # default: 20 ms, the driver's measurement window
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    t = time.perf_counter()
    kbps = fake.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES)
    assert time.perf_counter() - t >= 0.02
    assert kbps > 0


def test_duty_cycle_and_counters_are_consistent(clock):
    spec = FakeGpuSpec(low_fraction=0.25, duty_period_s=2.0)
    fake = FakeNvml(1, spec=spec, clock=clock)
    samples = [fake.utilization_at(0, t / 100) for t in range(0, 2000)]  # 20 s at 10 ms
    below = sum(1 for u in samples if u < 40) / len(samples)
    assert below == pytest.approx(0.25, abs=0.01)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    e0 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    clock.advance(20.0)  # ten whole periods: 25 % at 120 W, 75 % at 520 W
    e1 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    assert (e1 - e0) / 1000 == pytest.approx(20 * (0.25 * 120 + 0.75 * 520), rel=1e-6)


def test_plain_simulated_gpus_schedule_no_xid_and_the_xids_scenario_does():
    from exporter.cli import _nvml_module, parse_config

    fake, mode = _nvml_module(parse_config(["--fake-gpus", "2"]))
    assert mode == "fake" and [s.xid_schedule for s in fake.specs] == [None, None]
    fake, _ = _nvml_module(parse_config(["--fake-gpus", "2", "--fake-scenario", "xids"]))
    assert [s.xid_schedule for s in fake.specs] == [(5.0, 60.0, 31)] * 2


def test_every_scenario_names_a_documented_rule():
    from pathlib import Path

    from exporter.fake.scenarios import SCENARIOS

    rules = Path(__file__).resolve().parents[1].joinpath("docs/diagnosis.md").read_text()
    for name, s in SCENARIOS.items():
        assert f"| `{s.finding}` |" in rules, name
        assert f"`{name}`" in rules, f"{name} missing from docs/diagnosis.md's scenario table"


def test_simulated_host_is_busy_marked_and_keeps_the_real_memory(tmp_path):
    from exporter.fake.scenarios import SimulatedHost, host_source
    from exporter.sources.procfs import ProcfsSource
    from tests.conftest import FakeProcfs

    procfs = FakeProcfs(tmp_path / "proc")
    t = [0.0]
    host = SimulatedHost(procfs.root, cores=4, clock=lambda: t[0])
    real = ProcfsSource(procfs.root).read()
    for step in range(20):
        t[0] = step * 0.37
        r = host.read()
        assert r.simulated and 0.91 <= r.cpu_utilization < 0.99 and len(r.core_utilization) == 4
        assert (r.memory_total_bytes, r.memory_available_bytes) == (real.memory_total_bytes, real.memory_available_bytes)
    assert not real.simulated
    assert type(host_source("cpu-starved", procfs.root)) is SimulatedHost
    for name in ("", "starved", "healthy"):  # the real /proc/stat everywhere else
        assert type(host_source(name, procfs.root)) is ProcfsSource
