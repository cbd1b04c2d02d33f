"""`--fake-scenario NAME`: simulated GPUs driven into one condition of the RTF checklist, so the diagnosis
can be tried (and is tested) end to end without a GPU. Only the GPU side is simulated here; host CPU,
/dev/shm and CPU-quota conditions come from the real files (--path.procfs, --path.shm, --path.cgroupfs).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pynvml

from exporter.fake_nvml import MIB, FakeGpuSpec, FakeHandle, FakeNvml
from exporter.sources.pcie import link_bytes_per_second

_BASE = FakeGpuSpec()
_LINK = link_bytes_per_second(_BASE.pcie_generation, _BASE.pcie_width) or 0.0
_RESERVED = 512 * MIB  # what the fake's memory info reserves for the driver
_KV_CACHE_SWING = 6 * 1024 * MIB  # the fake's KV cache grows and shrinks by this much


@dataclass(frozen=True)
class Scenario:
    description: str
    spec: FakeGpuSpec
    throttle_bits: int = 0  # clock event reasons active while the GPU is busy


SCENARIOS: dict[str, Scenario] = {
    "healthy": Scenario("busy all the time (70-98 %), nothing held down", replace(_BASE, low_fraction=0.0)),
    "starved": Scenario("at or below 40 % for 85 % of the time (pair it with a busy --path.procfs or a "
                        "throttled --path.cgroupfs for CPU-side starvation)", replace(_BASE, low_fraction=0.85)),
    "pcie-saturated": Scenario("PCIe rx at 97 % of the link while busy",
                               replace(_BASE, low_fraction=0.1, pcie_rx_high_bps=0.97 * _LINK)),
    "throttled": Scenario("clocks held down by thermal slowdown while busy", replace(_BASE, low_fraction=0.1),
                          pynvml.nvmlClocksEventReasonSwThermalSlowdown | pynvml.nvmlClocksEventReasonHwSlowdown),
    "near-oom": Scenario("memory used 92-99 % of the board",
                         replace(_BASE, low_fraction=0.1, model_memory_bytes=_BASE.memory_total_bytes - _RESERVED
                                 - _KV_CACHE_SWING - 64 * MIB)),
}


class ScenarioNvml(FakeNvml):
    """FakeNvml whose every GPU follows one scenario (no scheduled XIDs, no random power-cap blips)."""

    def __init__(self, scenario: str, gpu_count: int, **kw) -> None:
        self.scenario = SCENARIOS[scenario]
        super().__init__(specs=[self.scenario.spec] * gpu_count, **kw)

    def _clock_event_reasons(self, handle: FakeHandle) -> int:
        t = self._now()
        idle = pynvml.nvmlClocksEventReasonGpuIdle if self.utilization_at(handle.index, t) < 10 else 0
        return idle | (self.scenario.throttle_bits if self._busy(handle.index, t) else 0)


def scenario_help() -> str:
    return "; ".join(f"{name}: {s.description}" for name, s in SCENARIOS.items())
