"""`--fake-scenario NAME`: simulated GPUs driven into one condition of the RTF checklist, so the diagnosis
can be tried (and is tested) end to end without a GPU. Each scenario's headline finding is the rule named
in its `finding` (tests/test_liveview.py renders every one in Chromium and checks it).

Only the GPU side is simulated, except where a scenario says `host_cpu_busy`: then the host CPU figures
come from `SimulatedHost` (made up, marked `simulated`, and the live page says so) instead of the real
/proc/stat, so `cpu-starved` shows CPU-side starvation on any machine. /dev/shm and the CPU quota always
come from the real files (--path.shm, --path.cgroupfs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pynvml

from exporter.fake.nvml import MIB, FakeGpuSpec, FakeHandle, FakeNvml
from exporter.sources.pcie import link_bytes_per_second
from exporter.sources.procfs import HostReading, ProcfsSource

_BASE = FakeGpuSpec()
_LINK = link_bytes_per_second(_BASE.pcie_generation, _BASE.pcie_width) or 0.0
_RESERVED = 512 * MIB  # what the fake's memory info reserves for the driver
_KV_CACHE_SWING = 6 * 1024 * MIB  # the fake's KV cache grows and shrinks by this much
_STARVED = replace(_BASE, low_fraction=0.85)


@dataclass(frozen=True)
class Scenario:
    description: str
    spec: FakeGpuSpec
    finding: str  # the diagnosis rule this scenario's headline shows (docs/diagnosis.md)
    throttle_bits: int | None = 0  # clock event reasons active while busy; None: the plain simulator's blips
    host_cpu_busy: bool = False  # simulate the host CPU 91-99 % busy instead of reading /proc/stat


SCENARIOS: dict[str, Scenario] = {
    "healthy": Scenario("busy all the time (70-98 %), nothing held down", replace(_BASE, low_fraction=0.0),
                        "nothing_abnormal"),
    "starved": Scenario("at or below 40 % for 85 % of the time, the host CPU real (idle here): "
                        "'mostly idle, no CPU-side cause'", _STARVED, "gpu_underused"),
    "cpu-starved": Scenario("at or below 40 % for 85 % of the time while a simulated host CPU is 91-99 % busy: "
                            "CPU-side starvation (the README's picture)", _STARVED, "cpu_starvation",
                            host_cpu_busy=True),
    "pcie-saturated": Scenario("PCIe rx at 97 % of the link while busy",
                               replace(_BASE, low_fraction=0.1, pcie_rx_high_bps=0.97 * _LINK), "pcie_saturated"),
    "throttled": Scenario("clocks held down by thermal slowdown while busy", replace(_BASE, low_fraction=0.1),
                          "clocks_throttled",
                          pynvml.nvmlClocksEventReasonSwThermalSlowdown | pynvml.nvmlClocksEventReasonHwSlowdown),
    "near-oom": Scenario("memory used 92-99 % of the board",
                         replace(_BASE, low_fraction=0.1, model_memory_bytes=_BASE.memory_total_bytes - _RESERVED
                                 - _KV_CACHE_SWING - 64 * MIB), "near_oom"),
    "xids": Scenario("the plain simulator, plus XID 31 (an application's GPU memory page fault) on every GPU after "
                     "5 s, then every minute", replace(_BASE, xid_schedule=(5.0, 60.0, 31)), "xid_errors",
                     throttle_bits=None),
}


class ScenarioNvml(FakeNvml):
    """FakeNvml whose every GPU follows one scenario (no random power-cap blips but in `xids`, which is the
    plain simulator with XIDs; XIDs only there)."""

    def __init__(self, scenario: str, gpu_count: int, **kw) -> None:
        self.scenario = SCENARIOS[scenario]
        super().__init__(specs=[self.scenario.spec] * gpu_count, **kw)

    def _clock_event_reasons(self, handle: FakeHandle) -> int:
        if self.scenario.throttle_bits is None:
            return super()._clock_event_reasons(handle)
        t = self._now()
        idle = pynvml.nvmlClocksEventReasonGpuIdle if self.utilization_at(handle.index, t) < 10 else 0
        return idle | (self.scenario.throttle_bits if self._busy(handle.index, t) else 0)


class SimulatedHost(ProcfsSource):
    """The host source of a `host_cpu_busy` scenario: memory from the real procfs, CPU made up (91-99 %
    busy, every core) and marked simulated, so the page and the diagnosis never pass it off as measured."""

    def __init__(self, procfs: str | Path = "/proc", cores: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(procfs)
        self._cores = cores
        self._clock = clock

    def read(self) -> HostReading:
        real = super().read()
        t = self._clock()
        busy = [0.91 + 0.08 * FakeNvml._noise(core, t, step=0.5) for core in range(self._cores)]
        return HostReading(sum(busy) / len(busy), tuple((str(i), v) for i, v in enumerate(busy)),
                           real.memory_total_bytes, real.memory_available_bytes,
                           tuple(e for e in real.errors if e != "stat"), simulated=True)


def host_source(scenario: str, procfs: str | Path) -> ProcfsSource:
    """The host CPU source for --fake-scenario (""): simulated where the scenario asks, else the real procfs."""
    s = SCENARIOS.get(scenario)
    return SimulatedHost(procfs) if s is not None and s.host_cpu_busy else ProcfsSource(procfs)


def scenario_help() -> str:
    return "; ".join(f"{name}: {s.description}" for name, s in SCENARIOS.items())
