from __future__ import annotations

import threading
import time

import pynvml
import pytest

from exporter.pipeline import collectors as registry
from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.sources.nvml import GpuReader, NvmlSource
from exporter.sources.nvml.reader import REOPEN_BACKOFF_S
from exporter.sources.nvml.specs import (
    ENERGY,
    GPU_SCALARS,
    FAN_SPEED,
    MEMORY_BANDWIDTH_UTILIZATION,
    MEMORY_CLOCK,
    MEMORY_TOTAL,
    MEMORY_USED,
    POWER,
    POWER_LIMIT,
    SM_CLOCK,
    TEMPERATURE,
    UTILIZATION,
    FieldValue,
    GpuScalar,
)
from tests.conftest import families, make_sampler


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
    src = NvmlSource(fake, "fake", clock=fake.clock,  # NVLink reads
                     **registry.nvml_options(registry.DEFAULT - {"nvlink"}, GPU_SCALARS))
    src.poll(0.0)  # fields too (per-link counters); only PCIe's one call is counted here
    r = src.gpus[0]
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


def test_fan_speed_is_a_ratio_and_omitted_where_not_supported(clock):
    fake = FakeNvml(specs=[FakeGpuSpec(), FakeGpuSpec(fan_speed_percent=45)], clock=clock)
    fanless, fanned = open_reader(fake, 0), open_reader(fake, 1)
    for _ in range(3):
        without, with_fan = fanless.read(), fanned.read()
    assert without.ok and without[FAN_SPEED] is None  # H100 SXM: NotSupported, omitted, never 0
    assert with_fan.ok and with_fan[FAN_SPEED] == 0.45
    assert fake.calls["nvmlDeviceGetFanSpeed_v2"] == 1 + 3  # the fanless board was asked once


def test_specs_sharing_a_call_make_it_once_per_read(clock):
    fake = FakeNvml(1, clock=clock)
    r = open_reader(fake)
    before = dict(fake.calls)
    reading = r.read()
    assert reading[UTILIZATION] is not None and reading[MEMORY_BANDWIDTH_UTILIZATION] is not None
    assert reading[MEMORY_USED] is not None and reading[MEMORY_TOTAL] is not None
    assert fake.calls["nvmlDeviceGetUtilizationRates"] - before.get("nvmlDeviceGetUtilizationRates", 0) == 1
    assert fake.calls["nvmlDeviceGetMemoryInfo"] - before.get("nvmlDeviceGetMemoryInfo", 0) == 1


def test_field_value_specs_are_read_in_one_batch(clock):
    tx = GpuScalar("test_tx_bytes", "counter", "PCIe tx counter as a field spec.", FieldValue(197))
    rx = GpuScalar("test_rx_bytes", "counter", "PCIe rx counter as a field spec.", FieldValue(198))
    nope = GpuScalar("test_unsupported", "gauge", "A field the board does not have.", FieldValue(9999))
    fake = FakeNvml(1, clock=clock)
    src = NvmlSource(fake, "fake", specs=(tx, nope, rx), clock=clock)
    src.poll(0.0)
    reader = src.gpus[0]
    seen = []
    real = fake.nvmlDeviceGetFieldValues
    fake.nvmlDeviceGetFieldValues = lambda h, ids: seen.append(list(ids)) or real(h, ids)
    first = reader.read()
    clock.advance(0.2)
    second = reader.read()
    assert first.ok and second.ok
    assert second[tx] > first[tx] >= 0 and second[rx] > first[rx] >= 0
    assert second[nope] is None
    # One batch per read for the field specs and the PCIe rates (one id asked once); the unsupported field
    # dropped after the first.
    assert seen == [[197, 9999, 198], [197, 198]]


def test_a_type_error_from_our_own_call_is_a_bug_logged_once_and_counted(procfs, caplog):
    fake = FakeNvml(1)
    fake.nvmlDeviceGetPowerUsage = lambda: 0  # a binding whose signature does not fit our call
    s = make_sampler(fake, procfs.root)
    for _ in range(3):
        s.tick()
    s.stop()
    bugs = [r for r in caplog.records if r.levelname == "ERROR" and "nvmlDeviceGetPowerUsage" in r.getMessage()]
    assert len(bugs) == 1 and bugs[0].exc_info is not None
    assert dict(s.snapshot.stats.errors)[("nvml", "nvmlDeviceGetPowerUsage")] == 1
    g = s.snapshot.gpus[0]
    assert g.up and g.reading[POWER] is None and g.reading[TEMPERATURE] is not None  # the rest goes on


def test_driver_reload_initialises_nvml_again_and_re_enumerates(procfs):
    def xid_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "xid-events"}

    fake = FakeNvml(2)
    before = xid_threads()
    s = make_sampler(fake, procfs.root)
    s.tick()
    first_watcher = xid_threads() - before
    assert len(first_watcher) == 1
    for gpu in (0, 1):  # the driver is unloaded: NVML answers Uninitialized until initialised again
        fake.inject("*", gpu=gpu, error=pynvml.NVML_ERROR_UNINITIALIZED)
    deadline = time.monotonic() + 10
    while s.snapshot.nvml.up and time.monotonic() < deadline:
        s.tick()
    assert not s.snapshot.nvml.up and "driver went away" in s.snapshot.nvml.message
    assert not any(t.is_alive() for t in first_watcher)  # stopped and joined, not leaked
    fake.clear_faults()  # it comes back with one GPU
    fake.gpu_count, fake.specs = 1, fake.specs[:1]
    while not (s.snapshot.nvml.up and s.snapshot.gpus and s.snapshot.gpus[0].up) and time.monotonic() < deadline:
        time.sleep(0.02)
        s.tick()
    fams = families(s)
    assert [x.labels["gpu"] for x in fams["gpu_up"].samples] == ["0"]
    assert [x.value for x in fams["gpu_up"].samples] == [1]
    assert all(x.labels.get("gpu") != "1" for f in fams.values() for x in f.samples)
    assert len(xid_threads() - before) == 1
    s.stop()


def test_sources_never_import_the_snapshot_or_the_sampler():
    """Imports run one way: sources read into their own types; pipeline/snapshot.py composes them."""
    import ast

    from tests.conftest import REPO

    for path in sorted((REPO / "exporter" / "sources").rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {"exporter.pipeline.snapshot", "exporter.pipeline.sampler", "exporter.pipeline.collector"}, path


# ---- one error classifier for every NVML call (errors.py) -------------------------------------------------
class _FailingCall:
    """FakeNvml with one function failing with `code` where `when(args)` holds; counts those calls."""

    def __init__(self, fake: FakeNvml, call: str, code: int, when=lambda args: True) -> None:
        self._fake, self._call, self._code, self._when = fake, call, code, when
        self.active = False
        self.failed = 0

    def __getattr__(self, name: str):
        attr = getattr(self._fake, name)
        if name != self._call:
            return attr

        def failing(*args, **kwargs):
            if self.active and self._when(args):
                self.failed += 1
                raise pynvml.NVMLError(self._code)
            return attr(*args, **kwargs)
        return failing


def _nvlink_fields(args) -> bool:
    from exporter.sources.gpm import FI_NVLINK_LINK_COUNT, FI_NVLINK_RX, FI_NVLINK_TX

    return any(f == FI_NVLINK_LINK_COUNT or (isinstance(f, tuple) and f[0] in (FI_NVLINK_TX, FI_NVLINK_RX))
               for f in args[1])


# The scalar, GPM and NVLink paths of a GpuReader, each with one of its calls failing (NVLink: the per-link
# counters, read where GPM has no totals).
_PATHS = {
    "scalar": ("nvmlDeviceGetTemperature", lambda args: True, FakeGpuSpec()),
    "gpm": ("nvmlGpmSampleGet", lambda args: True, FakeGpuSpec()),
    "nvlink": ("nvmlDeviceGetFieldValues", _nvlink_fields, FakeGpuSpec(gpm_supported=False)),
}
# error -> (GPU ok on the failing read, lost, driver gone, counted on that read, asked again on later reads)
_CLASSES = {
    pynvml.NVML_ERROR_NOT_SUPPORTED: (True, False, False, 0, False),
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: (True, False, False, 0, False),
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH: (True, False, False, 0, False),
    pynvml.NVML_ERROR_NO_PERMISSION: (True, False, False, 1, False),
    pynvml.NVML_ERROR_GPU_IS_LOST: (False, True, False, 1, False),  # re-opened after REOPEN_BACKOFF_S
    pynvml.NVML_ERROR_RESET_REQUIRED: (False, True, False, 1, False),
    pynvml.NVML_ERROR_UNINITIALIZED: (False, True, True, 1, False),  # the source initialises again
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (False, True, True, 1, False),
    pynvml.NVML_ERROR_UNKNOWN: (False, False, False, 1, True),
    pynvml.NVML_ERROR_TIMEOUT: (False, False, False, 1, True),
}


def _outcome(path: str, code: int) -> tuple:
    from exporter.sources.nvml.pcie_fallback import BlockingPcieThroughput
    from tests.conftest import ManualClock

    call, when, spec = _PATHS[path]
    clock = ManualClock()
    fake = FakeNvml(1, clock=clock, spec=spec)
    fake.nvmlInit()
    nvml = _FailingCall(fake, call, code, when)
    reader = GpuReader(nvml, 0, BlockingPcieThroughput(nvml, clock=clock), clock=clock)
    clock.advance(0.2)
    assert reader.read().ok  # probed first, then failing
    nvml.active = True
    clock.advance(0.2)
    first = reader.read()
    assert nvml.failed, "the failing call was not made"
    after = nvml.failed
    for _ in range(2):
        clock.advance(0.2)
        reader.read()
    counted = [c for c in (*first.errors, *first.recorded) if c == call]
    return first.ok, first.lost, reader.driver_gone, len(counted), nvml.failed > after


@pytest.mark.parametrize("code", list(_CLASSES), ids=lambda c: pynvml.NVMLError(c).__class__.__name__)
def test_every_error_class_means_the_same_on_the_scalar_gpm_and_nvlink_paths(code):
    outcomes = {path: _outcome(path, code) for path in _PATHS}
    assert outcomes == {path: _CLASSES[code] for path in _PATHS}


def test_gpm_no_permission_keeps_the_gpu_up_and_is_not_asked_every_tick(procfs, caplog):
    from tests.conftest import families, make_sampler

    fake = FakeNvml(2)
    fake.inject("nvmlGpmSampleGet", gpu=0, error=pynvml.NVML_ERROR_NO_PERMISSION)
    s = make_sampler(fake, procfs.root)
    ups = []
    for _ in range(5):
        s.tick()
        ups.append({x.labels["gpu"]: x.value for x in families(s)["gpu_up"].samples})
    assert ups == [{"0": 1, "1": 1}] * 5
    assert fake.calls["nvmlGpmSampleGet"] == 1 + 5  # GPU 0 once, GPU 1 every tick
    assert dict(s.snapshot.stats.errors)[("nvml", "nvmlGpmSampleGet")] == 1
    assert sum("no permission" in r.getMessage() for r in caplog.records) == 1


def test_field_values_decode_the_same_from_the_buffer_and_attribute_by_attribute():
    from exporter.sources.nvml.reader import _decode_fields

    entries = (pynvml.c_nvmlFieldValue_t * 7)()
    for i, (member, value) in enumerate((("dVal", 2.5), ("uiVal", 2**32 - 1), ("ulVal", 2**64 - 1),
                                         ("ullVal", 2**63 + 5), ("sllVal", -7), ("siVal", -2**31), ("usVal", 65535))):
        entries[i].fieldId, entries[i].valueType, entries[i].timestamp = 180 + i, i, 1000 + i
        entries[i].nvmlReturn = i % 2 * pynvml.NVML_ERROR_NOT_SUPPORTED
        setattr(entries[i].value, member, value)
    fast = _decode_fields(entries)
    slow = _decode_fields(list(entries))  # not a buffer: read attribute by attribute
    assert fast == slow
    assert [v for _, _, v, _, _ in fast] == [2.5, 2**32 - 1, 2**64 - 1, 2**63 + 5, -7, -2**31, 65535]
    assert [(r, t, f) for r, _, _, t, f in fast] == [(i % 2 * 3, 1000 + i, 180 + i) for i in range(7)]
