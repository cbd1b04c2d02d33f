"""Replaying a real GPU's capture (bench/capture_gpu.py's JSON) through the Python fake: tests only."""
from __future__ import annotations

import time
from typing import Any, Callable

import pynvml

from exporter.fake.nvml import FakeGpuSpec, FakeHandle, FakeNvml, _nvml_call, _unwrapped


class FixtureNvml(FakeNvml):
    """The fake answering as a captured GPU did (a bench/capture_gpu.py JSON): every call recorded as failing
    (NotSupported, ...) fails the same way, the recorded readings come back as recorded, and what the fake
    integrates over time (energy, PCIe and NVLink counters, the driver buffer) keeps the fake's own."""

    def __init__(self, capture: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.recorded = {gpu["index"]: gpu["calls"] for gpu in capture["gpus"]}
        super().__init__(specs=[self._spec(gpu) for gpu in capture["gpus"]], clock=clock,
                         driver_version=str(capture["system"]["driver"]), pcie_throughput_latency_s=0.0)
        for index, calls in self.recorded.items():
            by_function: dict[str, list[dict[str, Any]]] = {}
            for key, answer in calls.items():
                by_function.setdefault(key.split("[")[0], []).append(answer)
            for function, answers in by_function.items():
                # A call fails if every recorded variant failed (v1 memory info may work where v2 does not).
                if hasattr(pynvml, function) and all(a.get("code") for a in answers):
                    self.inject(function, gpu=index, error=answers[0]["code"])

    @staticmethod
    def _spec(gpu: dict[str, Any]) -> FakeGpuSpec:
        calls = gpu["calls"]
        value = lambda key, default: calls.get(key, {}).get("value", default)  # noqa: E731
        memory = value("nvmlDeviceGetMemoryInfo[v2]", None) or value("nvmlDeviceGetMemoryInfo", None) or {}
        counters = value("nvmlDeviceGetFieldValues[PCIE_COUNT_TX,RX]", None) or []
        return FakeGpuSpec(
            name=gpu["name"] or "", memory_total_bytes=memory.get("total", FakeGpuSpec.memory_total_bytes),
            pcie_generation=value("nvmlDeviceGetMaxPcieLinkGeneration", 0), pcie_width=value("nvmlDeviceGetMaxPcieLinkWidth", 0),
            power_limit_mw=value("nvmlDeviceGetEnforcedPowerLimit", FakeGpuSpec.power_limit_mw),
            pcie_counters=bool(counters) and all(c["nvmlReturn"] == 0 for c in counters),
            gpm_supported=gpu["gpm"] is not None, nvlink_links=gpu["nvlink_links"])

    def _recorded(self, handle: FakeHandle, key: str) -> Any:
        return self.recorded[handle.index].get(key, {}).get("value")

    @_nvml_call
    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        got = self._recorded(handle, "nvmlDeviceGetUtilizationRates")
        return pynvml.c_nvmlUtilization_t(**got) if got else _unwrapped(FakeNvml.nvmlDeviceGetUtilizationRates)(self, handle)

    @_nvml_call
    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        got = self._recorded(handle, "nvmlDeviceGetMemoryInfo[v2]" if version else "nvmlDeviceGetMemoryInfo")
        if not got:
            return _unwrapped(FakeNvml.nvmlDeviceGetMemoryInfo)(self, handle, version)
        return (pynvml.c_nvmlMemory_v2_t if version else pynvml.c_nvmlMemory_t)(**got)

    @_nvml_call
    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        got = self._recorded(handle, "nvmlDeviceGetTemperature[GPU]")
        return got if got is not None else _unwrapped(FakeNvml.nvmlDeviceGetTemperature)(self, handle, sensor)

    @_nvml_call
    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        got = self._recorded(handle, "nvmlDeviceGetPowerUsage")
        return got if got is not None else _unwrapped(FakeNvml.nvmlDeviceGetPowerUsage)(self, handle)

    @_nvml_call
    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, type: int) -> int:
        got = self._recorded(handle, "nvmlDeviceGetClockInfo[MEM]" if type == pynvml.NVML_CLOCK_MEM
                             else "nvmlDeviceGetClockInfo[SM]")
        return got if got is not None else _unwrapped(FakeNvml.nvmlDeviceGetClockInfo)(self, handle, type)
