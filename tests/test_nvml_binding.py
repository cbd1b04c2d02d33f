"""The NVML source through both NVML stand-ins: the Python fake, and the real pynvml (ctypes structs,
versioned calls, two-call buffers, event sets) loaded against the C stand-in in testkit/nvml_stub.

Each test drives the backend through the same small interface, so what passes on the fake has to pass
through pynvml's real struct layouts too.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import pynvml
import pytest

from exporter.fake_nvml import FakeNvml
from exporter.sources.nvml import GpuReader, NvmlSource, specs
from tests.conftest import ManualClock, make_sampler


class FakeBackend:
    name = "fake"

    def __init__(self, gpus: int) -> None:
        self.clock = ManualClock()
        self.nvml: Any = FakeNvml(gpus, clock=self.clock)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def unsupported(self, call: str, gpu: int) -> None:
        self.nvml.inject(call, gpu=gpu, error=pynvml.NVML_ERROR_NOT_SUPPORTED)

    def lose(self, gpu: int) -> None:
        self.nvml.lose_gpu(gpu)

    def hang(self, call: str, gpu: int, seconds: float) -> None:
        self.nvml.inject(call, gpu=gpu, latency_s=seconds, times=1)

    def xid(self, gpu: int, code: int) -> None:
        self.nvml.emit_xid(gpu, code)


class StubBackend:
    """The real pynvml bound to the C stand-in; faults are lines of its config file."""

    name = "stub"

    def __init__(self, stub: Any, gpus: int) -> None:
        self.stub = stub
        self.config: dict[str, Any] = {"gpus": gpus, "samples": "10,90,50", "sample_period_s": 0.02}
        stub.configure(self.config)
        self.nvml = stub.bind()

    def _set(self, **kv: Any) -> None:
        self.config.update(kv)
        self.stub.configure(self.config)

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)  # the stand-in runs on real time

    def unsupported(self, call: str, gpu: int) -> None:
        self._set(**{f"fail.{call}.{gpu}": pynvml.NVML_ERROR_NOT_SUPPORTED})

    def lose(self, gpu: int) -> None:
        self._set(lost_gpu=gpu)

    def hang(self, call: str, gpu: int, seconds: float) -> None:
        self._set(**{f"block.{call}.{gpu}": seconds})

    def xid(self, gpu: int, code: int) -> None:
        self._set(xid=f"{gpu}:{code}")


@pytest.fixture(params=["fake", "stub"])
def backend(request: pytest.FixtureRequest) -> Iterator[FakeBackend | StubBackend]:
    if request.param == "fake":
        yield FakeBackend(2)
    else:
        yield StubBackend(request.getfixturevalue("nvml_stub"), 2)


@pytest.fixture
def source(backend) -> Iterator[NvmlSource]:
    src = NvmlSource(backend.nvml, "real")
    src.poll(0.0)
    assert src.status.up, src.status.message
    yield src
    src.close()


def test_values_are_what_nvml_answers_in_base_units(backend, source):
    reader: GpuReader = source.gpus[1]
    first = reader.read()
    backend.advance(0.2)
    reading = reader.read()
    assert first.ok and reading.ok, (first.errors, reading.errors)
    nvml = backend.nvml
    h = nvml.nvmlDeviceGetHandleByIndex(1)
    util = nvml.nvmlDeviceGetUtilizationRates(h)
    assert reading[specs.UTILIZATION] == util.gpu / 100 and reading[specs.MEMORY_BANDWIDTH_UTILIZATION] == util.memory / 100
    mem = nvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert reading[specs.MEMORY_USED] == mem.used and reading[specs.MEMORY_TOTAL] == mem.total
    assert reading[specs.POWER] == nvml.nvmlDeviceGetPowerUsage(h) / 1000
    assert reading[specs.POWER_LIMIT] == nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000
    assert reading[specs.ENERGY] == nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000
    assert reading[specs.SM_CLOCK] == nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) * 1e6
    assert reading[specs.MEMORY_CLOCK] == nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM) * 1e6
    assert reading[specs.TEMPERATURE] == nvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
    assert reading.clock_event_reasons == nvml.nvmlDeviceGetCurrentClocksEventReasons(h)
    assert first.pcie_rx_bytes_per_second is None and reading.pcie_rx_bytes_per_second > 0
    ident = reader.identity
    assert ident.uuid == nvml.nvmlDeviceGetUUID(h) and ident.uuid.startswith("GPU-")
    assert ident.name == "NVIDIA H100 80GB HBM3"
    assert ident.pci_bus_id == nvml.nvmlDeviceGetPciInfo(h).busId and ident.pci_bus_id.endswith(":00.0")
    assert ident.pcie_link_max_bytes_per_second == pytest.approx(63.0e9, rel=0.01)  # Gen5 x16
    assert reading.ecc_errors is not None and reading.remapped_rows == (0, 0, 0, 0)


def test_driver_sample_buffer_through_the_two_call_get_samples(backend, source):
    reader = source.gpus[0]
    started = time.monotonic()
    assert reader.read().utilization_samples == ()  # the first read measures the buffer, counts nothing
    first_done = time.monotonic()
    backend.advance(0.3)
    second_started = time.monotonic()
    samples = reader.read().utilization_samples
    ended = time.monotonic()
    assert samples and all(0.0 <= s <= 1.0 for s in samples)
    if backend.name == "stub":  # one every 20 ms, cycling 10/90/50 %: as many as fit between the reads
        assert set(samples) <= {0.1, 0.9, 0.5}, samples
        assert (second_started - first_done) / 0.02 - 1 <= len(samples) <= (ended - started) / 0.02 + 1


def test_not_supported_is_omitted_and_the_rest_still_read(backend, source):
    backend.unsupported("nvmlDeviceGetPowerUsage", 0)
    reader = source.gpus[0]
    for _ in range(3):
        reading = reader.read()
        backend.advance(0.05)
    assert reading.ok and reading[specs.POWER] is None and reading[specs.UTILIZATION] is not None
    assert source.gpus[1].read()[specs.POWER] is not None  # per GPU, not global


def test_a_lost_gpu_costs_only_that_gpu(backend, source):
    assert all(r.read().ok for r in source.gpus)
    backend.lose(1)
    lost, other = source.gpus[1].read(), source.gpus[0].read()
    assert lost.lost and lost[specs.UTILIZATION] is None
    assert other.ok and other[specs.UTILIZATION] is not None


def test_xid_events_are_counted_per_gpu(backend, source):
    # The watcher registers the GPUs on its own thread; an event sent before that is lost, as with the
    # real driver, so send one per half second until one is counted.
    deadline = time.monotonic() + 5
    while not source.xid_counts() and time.monotonic() < deadline:
        backend.xid(1, 79)
        wait_until = time.monotonic() + 0.5
        while not source.xid_counts() and time.monotonic() < wait_until:
            time.sleep(0.02)
    ((key, events),) = source.xid_counts()
    assert key == (1, 79) and events >= 1  # counted for GPU 1 only


def test_a_hung_call_stalls_only_its_gpu(backend, procfs):
    s = make_sampler(backend.nvml, procfs.root, interval=0.1, mode="real")
    try:
        s.tick()
        backend.hang("nvmlDeviceGetPowerUsage", 1, 1.5)
        started = time.monotonic()
        snap = s.tick()
        assert time.monotonic() - started < 1.2  # the tick gave up on GPU 1 at its deadline
        g0, g1 = snap.gpus
        assert g0.up and not g1.up and g1.stuck_call == "nvmlDeviceGetPowerUsage"
    finally:
        s.nvml.close()


def test_mig_devices_and_process_lists_through_real_pynvml(nvml_stub):
    """Struct-heavy paths on the real binding only: MIG handles, nvmlProcessInfo_t arrays (two-call,
    NVML_VALUE_NOT_AVAILABLE as None)."""
    nvml_stub.configure({"gpus": 2, "mig.0": "1,2", "procs.0": "77:1048576", "mem_used.0": 3e9,
                         "procs.1": f"4242:1073741824,4243:{2**64 - 1}", "proc_util.1": "4242:55"})
    src = NvmlSource(nvml_stub.bind(), "real")
    src.poll(0.0)
    try:
        mig = src.gpus[0].read()
        assert [(m.gpu_instance_id, m.compute_instance_id) for m in mig.mig] == [(1, 0), (2, 0)]
        # MIG memory is read with v1 (no version argument), whose "used" includes the driver's reservation
        assert all(m.uuid.startswith("MIG-") and m.memory_used_bytes == 3e9 + 2**29 for m in mig.mig)
        assert mig.mig[0].processes[0].pid == 77 and mig.mig[0].processes[0].used_memory_bytes == 1048576
        assert mig.processes is None  # listed per MIG device instead
        plain = src.gpus[1].read()
        assert plain.mig is None and [(p.pid, p.used_memory_bytes, p.sm_utilization) for p in plain.processes] == [
            (4242, 1073741824, 0.55), (4243, None, None)]
    finally:
        src.close()


def test_a_gpu_falls_off_the_bus_at_a_chosen_moment(nvml_stub):
    nvml_stub.configure({"gpus": 2, "lost_gpu": 1, "lost_after_s": 1.0})
    src = NvmlSource(nvml_stub.bind(), "real")
    src.poll(0.0)
    try:
        assert src.gpus[1].read().ok
        time.sleep(1.1)
        assert src.gpus[1].read().lost and src.gpus[0].read().ok
    finally:
        src.close()


def test_unbinding_leaves_this_processes_pynvml_as_it_was(nvml_stub):
    """Once a test is done with the stand-in, pynvml in this process is as it was, and loading
    libnvidia-ml.so.1 by name never yields the stand-in (it has a soname of its own), so later tests that
    expect "no NVIDIA GPU" (or a real driver, on a GPU machine) still get that."""
    import ctypes

    had = pynvml.nvmlLib
    nvml = nvml_stub.bind()
    nvml.nvmlInit()
    nvml.nvmlShutdown()
    nvml_stub.unbind()
    assert pynvml.nvmlLib is had
    stand_in = ctypes.CDLL(str(nvml_stub.lib))._handle
    try:
        by_name = ctypes.CDLL("libnvidia-ml.so.1")._handle
    except OSError:  # no driver on this machine
        by_name = None
    assert by_name != stand_in


@pytest.mark.parametrize("c_type, ctypes_type", [
    ("nvmlValue_t", pynvml.c_nvmlValue_t), ("nvmlUtilization_t", pynvml.c_nvmlUtilization_t),
    ("nvmlMemory_t", pynvml.c_nvmlMemory_t), ("nvmlMemory_v2_t", pynvml.c_nvmlMemory_v2_t),
    ("nvmlPciInfo_t", pynvml.nvmlPciInfo_t), ("nvmlProcessInfo_t", pynvml.c_nvmlProcessInfo_v3_t),
    ("nvmlSample_t", pynvml.c_nvmlSample_t),
    ("nvmlProcessUtilizationSample_t", pynvml.c_nvmlProcessUtilizationSample_t),
    ("nvmlFieldValue_t", pynvml.c_nvmlFieldValue_t), ("nvmlEventData_t", pynvml.c_nvmlEventData_t),
    ("nvmlGpmSupport_t", pynvml.c_nvmlGpmSupport_t), ("nvmlGpmMetric_t", pynvml.c_nvmlGpmMetric_t),
])
def test_the_stand_ins_structs_have_pynvmls_layout(nvml_stub_lib, c_type, ctypes_type):
    import ctypes

    sizeof = ctypes.CDLL(str(nvml_stub_lib)).nvmlStubSizeof
    sizeof.restype, sizeof.argtypes = ctypes.c_size_t, [ctypes.c_char_p]
    assert sizeof(c_type.encode()) == ctypes.sizeof(ctypes_type)
    if c_type == "nvmlGpmMetric_t":  # the metrics-get struct: a header, then pynvml's NVML_GPM_METRIC_MAX entries
        header = sizeof(b"nvmlGpmMetricsGet_t")
        assert header + pynvml.NVML_GPM_METRIC_MAX * ctypes.sizeof(ctypes_type) == ctypes.sizeof(
            pynvml.c_nvmlGpmMetricsGet_t)
