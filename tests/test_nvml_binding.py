"""The NVML source through both NVML stand-ins: the Python fake, and the real pynvml (ctypes structs,
versioned calls, two-call buffers, event sets, GPM) loaded against the C stand-in in testkit/nvml_stub.

Each test drives the backend through the same small interface, so what passes on the fake has to pass
through pynvml's real struct layouts too.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import pynvml
import pytest

from exporter.pipeline.collectors import ALL as ALL_COLLECTORS, nvml_options, nvml_reads
from exporter.pipeline.collector import SnapshotCollector
from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.pipeline.sampler import Sampler
from exporter.sources.gpm import RATIO_METRICS
from exporter.sources.nvml import GpuReader, NvmlSource, specs
from exporter.sources.procfs import ProcfsSource
from tests.conftest import ManualClock, families, make_sampler

MIB = 2**20
# What the stand-in's GPM answers (percent, by NVML_GPM_METRIC_* id; 60/61: NVLink rx/tx MiB/s).
STUB_GPM = {"gpm.1": 20, "gpm.2": 42.5, "gpm.3": 30, "gpm.5": 17.5, "gpm.10": 60, "gpm.60": 1000, "gpm.61": 250.5,
            "nvlink_links": 18}
GPM_FAMILIES = {"gpu_sm_active_ratio": "sm_active", "gpu_sm_occupancy_ratio": "sm_occupancy",
                "gpu_tensor_active_ratio": "tensor_active", "gpu_dram_active_ratio": "dram_active",
                "gpu_graphics_engine_active_ratio": "graphics_engine_active"}


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

    def gpm_percent(self, gpu: int, metric_id: int) -> float:
        """What GPM answers now for the whole GPU (the fake's value at its current time)."""
        return self.nvml.gpm_percent_at(gpu, metric_id, self.clock() - self.nvml.t0)

    def links_without_gpm(self, gpu: int, links: int, tx_bps: float, rx_bps: float) -> None:
        """A pre-Hopper NVLink board: no GPM, constant per-link rates from the field counters."""
        self.nvml.specs[gpu] = FakeGpuSpec(gpm_supported=False, nvlink_links=links, nvlink_tx_low_bps=tx_bps,
                                           nvlink_tx_high_bps=tx_bps, nvlink_rx_low_bps=rx_bps,
                                           nvlink_rx_high_bps=rx_bps)

    def no_nvlink(self, gpu: int) -> None:
        self.nvml.specs[gpu] = FakeGpuSpec(nvlink_links=0)


class StubBackend:
    """The real pynvml bound to the C stand-in; faults are lines of its config file."""

    name = "stub"

    def __init__(self, stub: Any, gpus: int) -> None:
        self.stub = stub
        self.config: dict[str, Any] = {"gpus": gpus, "samples": "10,90,50", "sample_period_s": 0.02, **STUB_GPM}
        stub.configure(self.config)
        self.nvml = stub.bind()
        self.clock = time.monotonic

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

    def gpm_percent(self, gpu: int, metric_id: int) -> float:
        return float(self.config[f"gpm.{metric_id}"])

    def links_without_gpm(self, gpu: int, links: int, tx_bps: float, rx_bps: float) -> None:
        self._set(**{f"gpm_supported.{gpu}": 0, f"nvlink_links.{gpu}": links,
                     f"nvlink_tx_kib_s.{gpu}": tx_bps / links / 1024, f"nvlink_rx_kib_s.{gpu}": rx_bps / links / 1024})

    def no_nvlink(self, gpu: int) -> None:
        self._set(**{f"nvlink_links.{gpu}": 0})


@pytest.fixture(params=["fake", "stub"])
def backend(request: pytest.FixtureRequest) -> Iterator[FakeBackend | StubBackend]:
    if request.param == "fake":
        yield FakeBackend(2)
    else:
        yield StubBackend(request.getfixturevalue("nvml_stub"), 2)


@pytest.fixture
def source(backend) -> Iterator[NvmlSource]:
    src = NvmlSource(backend.nvml, "real", **nvml_options(ALL_COLLECTORS, specs.GPU_SCALARS))
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
        backend.hang("nvmlDeviceGetTemperature", 1, 1.5)
        started = time.monotonic()
        snap = s.tick()
        assert time.monotonic() - started < 1.2  # the tick gave up on GPU 1 at its deadline
        g0, g1 = snap.gpus
        assert g0.up and not g1.up and g1.stuck_call == "nvmlDeviceGetTemperature"
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


# ---- GPM activity and NVLink, as the exporter serves them ---------------------------------------------
def by_gpu(fams: dict, name: str, **match: str) -> dict[str, float]:
    """The GPU-wide series of a family (no MIG or link labels), by gpu, among those matching `match`."""
    return {x.labels["gpu"]: x.value for x in fams[name].samples
            if "gpu_instance_id" not in x.labels and "link" not in x.labels
            and all(x.labels.get(k) == v for k, v in match.items())}


def ticks(backend, procfs, n: int = 3, **source: Any) -> Sampler:
    """A sampler on the backend's clock, ticked n times 200 ms apart (GPM needs pairs >= 100 ms apart)."""
    s = Sampler(NvmlSource(backend.nvml, "real", clock=backend.clock, **{"reads": nvml_reads(ALL_COLLECTORS), **source}),
                ProcfsSource(procfs.root),
                interval=0.2, clock=backend.clock)
    for i in range(n):
        if i:
            backend.advance(0.2)
        s.tick()
    return s


def test_gpm_activity_and_nvlink_in_the_exporters_output_are_what_nvml_answers(backend, procfs):
    s = ticks(backend, procfs)
    try:
        fams = families(s)
        for name, field in GPM_FAMILIES.items():
            want = {str(g): backend.gpm_percent(g, RATIO_METRICS[field]) / 100 for g in (0, 1)}
            assert by_gpu(fams, name) == pytest.approx(want, rel=1e-12), name
        for direction, metric_id in (("tx", 61), ("rx", 60)):  # GPM's NVLink totals, MiB/s
            want = {str(g): backend.gpm_percent(g, metric_id) * MIB for g in (0, 1)}
            assert by_gpu(fams, "gpu_nvlink_throughput_bytes_per_second", direction=direction) == pytest.approx(want)
        assert "gpu_nvlink_link_throughput_bytes_per_second" not in fams  # per link: off by default
    finally:
        s.stop()


def test_gpm_families_vanish_where_gpm_is_unsupported(backend, procfs):
    backend.unsupported("nvmlGpmQueryDeviceSupport", 0)
    s = ticks(backend, procfs)
    try:
        fams = families(s)
        assert by_gpu(fams, "gpu_up") == {"0": 1, "1": 1}
        for name in GPM_FAMILIES:
            assert set(by_gpu(fams, name)) == {"1"}, name  # absent for GPU 0, never 0
        # NVLink of GPU 0 falls back to its field counters
        assert set(by_gpu(fams, "gpu_nvlink_throughput_bytes_per_second", direction="tx")) == {"0", "1"}
    finally:
        s.stop()


def test_nvlink_rates_from_the_field_counters_sum_and_per_link(backend, procfs):
    backend.links_without_gpm(0, links=4, tx_bps=4 * 2**30, rx_bps=8 * 2**30)
    backend.no_nvlink(1)
    with_links = specs.GPU_SCALARS + specs.NVLINK_PER_LINK_SCALARS  # --collector.nvlink-per-link
    s = ticks(backend, procfs, specs=with_links)
    try:
        fams = {m.name: m for m in SnapshotCollector(lambda: s.snapshot, specs=with_links,
                                                      collectors=ALL_COLLECTORS).collect()}
        total = "gpu_nvlink_throughput_bytes_per_second"
        assert by_gpu(fams, total, direction="tx") == {"0": pytest.approx(4 * 2**30, rel=1e-4)}  # GPU 1: no NVLink
        assert by_gpu(fams, total, direction="rx") == {"0": pytest.approx(8 * 2**30, rel=1e-4)}
        assert set(by_gpu(fams, "gpu_sm_active_ratio")) == {"1"}
        links = {(x.labels["link"], x.labels["direction"]): x.value
                 for x in fams["gpu_nvlink_link_throughput_bytes_per_second"].samples}
        assert links == {(str(k), d): pytest.approx((2**30 if d == "tx" else 2 * 2**30), rel=1e-4)
                         for k in range(4) for d in ("tx", "rx")}
    finally:
        s.stop()


def test_a_lost_gpu_costs_only_that_gpus_activity(backend, procfs):
    s = ticks(backend, procfs)
    try:
        backend.lose(1)
        backend.advance(0.2)
        s.tick()
        fams = families(s)
        assert by_gpu(fams, "gpu_up") == {"0": 1, "1": 0}
        for name in GPM_FAMILIES:
            assert set(by_gpu(fams, name)) == {"0"}, name
        assert set(by_gpu(fams, "gpu_nvlink_throughput_bytes_per_second", direction="rx")) == {"0"}
    finally:
        s.stop()


def test_gpm_per_mig_gpu_instance_through_real_pynvml(nvml_stub, procfs):
    backend = StubBackend(nvml_stub, 1)
    backend._set(**{"mig.0": "1,2", "gpm.2.gi1": 20, "gpm.2.gi2": 70})
    s = ticks(backend, procfs)
    try:
        fams = families(s)
        sm = {x.labels.get("gpu_instance_id", ""): (x.labels.get("mig_uuid", ""), x.value)
              for x in fams["gpu_sm_active_ratio"].samples}
        assert sm[""][1] == 0.425  # the whole GPU
        assert sm["1"][1] == 0.20 and sm["2"][1] == 0.70  # per GPU instance, on its MIG device
        assert sm["1"][0].startswith("MIG-") and sm["1"][0] != sm["2"][0]
        mig_memory = {x.labels["mig_uuid"] for x in fams["gpu_mig_memory_used_bytes"].samples}
        assert {sm["1"][0], sm["2"][0]} == mig_memory  # the same MIG devices as the other MIG series
        dram = {x.labels.get("gpu_instance_id"): x.value for x in fams["gpu_dram_active_ratio"].samples}
        assert dram == {None: 0.60, "1": 0.60, "2": 0.60}  # unset per instance: the stand-in's GPU-wide value
    finally:
        s.stop()


def test_a_read_thread_stuck_in_gpm_never_shares_or_frees_its_buffers_early(procfs):
    """The thread that replaces a stuck one allocates its own GPM samples; the stuck one frees its samples
    only after its call has returned (the fake refuses a freed or unknown sample, so a late use shows)."""
    fake = FakeNvml(2)
    s = make_sampler(fake, procfs.root, interval=0.1, mode="real")
    try:
        for _ in range(2):
            s.tick()
            time.sleep(0.12)
        assert fake.calls["nvmlGpmSampleAlloc"] == 4 and fake.calls["nvmlGpmMetricsGet"] == 2
        fake.inject("nvmlGpmSampleGet", gpu=1, latency_s=1.0, times=1)
        snap = s.tick()
        assert snap.gpus[1].stuck_call == "nvmlGpmSampleGet" and snap.gpus[0].up
        for _ in range(2):  # the new thread reads GPU 0 on two fresh samples; the stuck thread's stay
            time.sleep(0.12)
            snap = s.tick()
        assert fake.calls["nvmlGpmSampleAlloc"] == 6 and fake.calls["nvmlGpmSampleFree"] == 0
        assert snap.gpus[0].reading[specs.SM_ACTIVE] is not None
        deadline = time.monotonic() + 5  # the hung call returns after 1 s; then its thread frees its four
        while fake.calls["nvmlGpmSampleFree"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
            s.tick()
        assert fake.calls["nvmlGpmSampleFree"] == 4  # the stuck thread's, once: no double free
        assert len(fake._gpm_samples) == fake.calls["nvmlGpmSampleAlloc"] - 4
        for _ in range(3):  # GPU 1 is read again, by the new thread, on samples of its own
            time.sleep(0.12)
            snap = s.tick()
        assert snap.gpus[1].up and snap.gpus[1].reading[specs.SM_ACTIVE] is not None
        assert fake.calls["nvmlGpmSampleAlloc"] == 8 and len(fake._gpm_samples) == 4
        assert dict(snap.stats.errors) == {("nvml", "nvmlGpmSampleGet"): 1}  # the hang, once; no failed GPM call
    finally:
        s.stop()


SCALAR_FIELD_CALLS = ("nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPcieReplayCounter")


@pytest.mark.parametrize("refused", [False, True], ids=["fields", "fallback"])
def test_scalar_fields_replace_their_calls_where_answered_else_the_calls_stay(nvml_stub, refused):
    config = {"gpus": 1, "power_mw": 312500, "energy_mj": 987654321, "replay": 7, "gpm_supported": 0}
    nvml_stub.configure({**config, **({"field_na": "83,94,185"} if refused else {})})
    nv = nvml_stub.bind()
    src = NvmlSource(nv, "real", **nvml_options(ALL_COLLECTORS - {"gpm", "nvlink", "nvlink-per-link"}, specs.GPU_SCALARS))
    try:
        src.poll(0.0)
        reader = src.gpus[0]
        reader.read()  # decides, per GPU, which fields stand in for calls
        nvml_stub.reset_calls()
        readings = [reader.read() for _ in range(3)]
        calls = nvml_stub.calls()
    finally:
        src.close()
        nvml_stub.unbind()
    for reading in readings:  # the same values either way
        assert reading.ok, reading.errors
        assert reading[specs.POWER] == 312.5 and reading[specs.ENERGY] == 987654.321
        assert reading[specs.PCIE_REPLAY_ERRORS] == 7 and reading.pcie_tx_bytes_per_second is not None
    assert calls["nvmlDeviceGetFieldValues"] == 3  # one batch per read: these fields and the PCIe counters
    for call in SCALAR_FIELD_CALLS:
        assert calls.get(call, 0) == (3 if refused else 0), (call, calls)


def test_a_field_that_stops_being_answered_goes_back_to_its_call(nvml_stub):
    nvml_stub.configure({"gpus": 1, "power_mw": 200000, "gpm_supported": 0})
    nv = nvml_stub.bind()
    src = NvmlSource(nv, "real", **nvml_options(ALL_COLLECTORS - {"gpm", "nvlink", "nvlink-per-link"}, specs.GPU_SCALARS))
    try:
        src.poll(0.0)
        reader = src.gpus[0]
        assert reader.read()[specs.POWER] == 200.0
        nvml_stub.configure({"gpus": 1, "power_mw": 150000, "gpm_supported": 0, "field_na": "185"})
        nvml_stub.reset_calls()
        readings = [reader.read() for _ in range(3)]
        calls = nvml_stub.calls()
    finally:
        src.close()
        nvml_stub.unbind()
    # The read that finds the field refused asks the call at once: no gap in the series.
    assert [r[specs.POWER] for r in readings] == [150.0] * 3 and all(r.ok for r in readings)
    assert calls["nvmlDeviceGetPowerUsage"] == 3 and "nvmlDeviceGetTotalEnergyConsumption" not in calls
