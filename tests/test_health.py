"""Device health: XID events counted per code by the event thread; ECC counters and remapped rows."""
from __future__ import annotations

import time

import pynvml

from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.sources.nvml.specs import POWER, POWER_FROM_ENERGY
from tests.conftest import families, make_sampler


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def xid_series(s) -> dict[tuple[str, str], float]:
    fam = families(s).get("gpu_xid_errors")  # absent until the first XID: an empty family is not rendered
    return {(x.labels["gpu"], x.labels["xid"]): x.value for x in (fam.samples if fam else ())
            if x.name.endswith("_total")}


def test_xids_are_counters_per_gpu_and_code(procfs):
    fake = FakeNvml(2)
    s = make_sampler(fake, procfs.root)
    s.tick()
    assert wait_for(lambda: fake.xid_registered() == {0, 1})
    assert xid_series(s) == {}  # no XID yet: no series, no "last XID" gauge stuck at a value
    fake.emit_xid(1, 79)
    fake.emit_xid(1, 79)
    fake.emit_xid(0, 31)
    assert wait_for(lambda: len(s.nvml.xid_counts()) == 2 and sum(n for _, n in s.nvml.xid_counts()) == 3)
    s.tick()
    assert xid_series(s) == {("1", "79"): 2, ("0", "31"): 1}
    s.stop()


def test_xid_registration_not_supported_on_one_gpu(procfs):
    fake = FakeNvml(2)
    fake.inject("nvmlDeviceRegisterEvents", gpu=0, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = make_sampler(fake, procfs.root)
    s.tick()
    assert wait_for(lambda: fake.xid_registered() == {1})
    fake.emit_xid(1, 48)
    assert wait_for(lambda: s.nvml.xid_counts() == (((1, 48), 1),))
    s.stop()


def test_ecc_and_remapped_rows(procfs):
    specs = [FakeGpuSpec(ecc_corrected=(2, 40), ecc_uncorrected=(0, 1), remapped_rows=(3, 1, 1, 0)),
             FakeGpuSpec()]
    fake = FakeNvml(specs=specs)
    fake.inject("nvmlDeviceGetTotalEccErrors", gpu=1, error=pynvml.NVML_ERROR_NOT_SUPPORTED)  # ECC off
    fake.inject("nvmlDeviceGetRemappedRows", gpu=1, error=pynvml.NVML_ERROR_NOT_SUPPORTED)  # pre-Ampere
    s = make_sampler(fake, procfs.root)
    for _ in range(3):
        s.tick()
    fams = families(s)
    ecc = {(x.labels["gpu"], x.labels["error"], x.labels["scope"]): x.value for x in fams["gpu_ecc_errors"].samples
           if x.name.endswith("_total")}
    assert ecc == {("0", "corrected", "volatile"): 2, ("0", "corrected", "aggregate"): 40,
                   ("0", "uncorrected", "volatile"): 0, ("0", "uncorrected", "aggregate"): 1}
    rows = {(x.labels["gpu"], x.labels["cause"]): x.value for x in fams["gpu_remapped_rows"].samples}
    assert rows == {("0", "correctable"): 3, ("0", "uncorrectable"): 1}
    assert [(x.labels["gpu"], x.value) for x in fams["gpu_row_remap_pending"].samples] == [("0", 1)]
    assert [(x.labels["gpu"], x.value) for x in fams["gpu_row_remap_failure"].samples] == [("0", 0)]
    assert {x.labels["gpu"]: x.value for x in fams["gpu_up"].samples} == {"0": 1, "1": 1}
    assert fake.calls["nvmlDeviceGetRemappedRows"] == 2  # every 5 s, not every tick; NotSupported once


def test_power_from_the_energy_counter(procfs):
    spec = FakeGpuSpec(low_fraction=0.0)  # always busy: 520 W
    s = make_sampler(FakeNvml(1, spec=spec), procfs.root)
    first = s.tick().gpus[0].reading
    assert first[POWER_FROM_ENERGY] is None  # needs two energy readings
    time.sleep(0.3)
    reading = s.tick().gpus[0].reading
    # The fake's energy integral and the reader's clock are both real time here: 520 W within timing noise.
    assert abs(reading[POWER_FROM_ENERGY] - 520) < 520 * 0.05
    assert reading[POWER] == 520


def test_scheduled_xids_are_delivered(procfs, clock):
    fake = FakeNvml(specs=[FakeGpuSpec(), FakeGpuSpec(xid_schedule=(5.0, 60.0, 31))], clock=clock)
    s = make_sampler(fake, procfs.root, clock=clock)
    s.tick()
    assert wait_for(lambda: fake.xid_registered() == {0, 1})
    clock.advance(4.0)
    time.sleep(0.6)  # at least one event wait has run: nothing is due yet
    assert s.nvml.xid_counts() == ()
    clock.advance(126.0)  # t = 130 s: due at 5, 65 and 125 s
    assert wait_for(lambda: s.nvml.xid_counts() == (((1, 31), 3),))
    s.stop()
