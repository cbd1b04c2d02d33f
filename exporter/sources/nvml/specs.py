"""One declarative row per scalar GPU metric: what to ask NVML, how to convert it, how to expose it.

The reader (reader.py) reads every spec it is given and the collector renders every spec, so a new
scalar metric is one row here, its answer in fake_nvml.py and its line in docs/metrics.md (a test checks
the docs against this table). Families that are not one value per GPU (PCIe per direction, histograms,
processes, MIG, ECC, clock events) keep their own code in the reader and the collector.

Like node_exporter's registerCollector(name, ...), every row names the collector it belongs to, so a
collector switch can drop both its families and the NVML calls behind them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping


@dataclass(frozen=True, eq=False)  # identity: specs that share one call object share one NVML call per read
class NvmlCall:
    """nvml.<function>(handle, *args, **kwargs). A str argument names a pynvml constant (resolved on the
    module once per GPU, so the fake and the real binding both work); `fallback` is asked instead once
    this call is not supported (an older driver or binding)."""

    function: str
    args: tuple[int | str, ...] = ()
    kwargs: tuple[tuple[str, int | str], ...] = ()
    fallback: NvmlCall | None = None
    key: str = field(init=False)  # names the call in the not-supported set and in logs

    def __post_init__(self) -> None:
        params = [str(a) for a in self.args] + [f"{k}={v}" for k, v in self.kwargs]
        object.__setattr__(self, "key", f"{self.function}({', '.join(params)})" if params else self.function)


@dataclass(frozen=True)
class FieldValue:
    """One NVML field id (NVML_FI_*), read with every other field spec in one nvmlDeviceGetFieldValues."""

    field_id: int


@dataclass(frozen=True)
class Derived:
    """Computed from the other scalars of the same read (no NVML call of its own)."""

    compute: Callable[[Mapping[GpuScalar, float]], float | None]


# Filled in by GpuReader itself because it needs state across reads (a delta, the first read's buffer).
STATEFUL = None


@dataclass(frozen=True, eq=False)  # identity equality: specs are dictionary keys of GpuReading.scalars
class GpuScalar:
    name: str  # as exposed, without _total for counters
    type: Literal["gauge", "counter"]
    help: str
    source: NvmlCall | FieldValue | Derived | None
    convert: Callable[[Any], float | None] = float  # NVML's answer -> base units
    labels: tuple[tuple[str, str], ...] = ()  # constant labels beside gpu, uuid (rows may share a name)
    collector: str = "gpu"


def _percent(value: Any) -> float:
    return value / 100.0


def _milli(value: Any) -> float:
    return value / 1000.0


def _mega(value: Any) -> float:
    return value * 1e6


_UTILIZATION_RATES = NvmlCall("nvmlDeviceGetUtilizationRates")
# v2 (R510+) reports "used" without the driver's reservation, as nvidia-smi does; v1 where unsupported.
_MEMORY_INFO = NvmlCall("nvmlDeviceGetMemoryInfo", kwargs=(("version", "nvmlMemory_v2"),),
                        fallback=NvmlCall("nvmlDeviceGetMemoryInfo"))

UTILIZATION = GpuScalar(
    "gpu_utilization_ratio", "gauge",
    "Share of the last driver sample period in which a kernel ran (nvmlDeviceGetUtilizationRates .gpu).",
    _UTILIZATION_RATES, lambda u: _percent(u.gpu))
MEMORY_BANDWIDTH_UTILIZATION = GpuScalar(
    "gpu_memory_bandwidth_utilization_ratio", "gauge",
    "Share of the last sample period the memory controller was busy (nvmlDeviceGetUtilizationRates .memory).",
    _UTILIZATION_RATES, lambda u: _percent(u.memory))
MEMORY_USED = GpuScalar(
    "gpu_memory_used_bytes", "gauge", "Framebuffer memory allocated (nvmlDeviceGetMemoryInfo v2 used).",
    _MEMORY_INFO, lambda m: int(m.used))
MEMORY_TOTAL = GpuScalar(
    "gpu_memory_total_bytes", "gauge", "Framebuffer memory installed (nvmlDeviceGetMemoryInfo total).",
    _MEMORY_INFO, lambda m: int(m.total))


def _memory_used_ratio(v: Mapping[GpuScalar, float]) -> float | None:
    used, total = v.get(MEMORY_USED), v.get(MEMORY_TOTAL)
    return used / total if used is not None and total else None


MEMORY_USED_RATIO = GpuScalar(
    "gpu_memory_used_ratio", "gauge", "gpu_memory_used_bytes / gpu_memory_total_bytes (OOM headroom).",
    Derived(_memory_used_ratio))
SAMPLE_BUFFER_SECONDS = GpuScalar(
    "gpu_sample_buffer_seconds", "gauge",
    "How far back the driver's utilisation sample buffer reached at start-up: the longest --sample.interval "
    "that loses no sample (nvmlDeviceGetSamples).", STATEFUL)
ENERGY = GpuScalar(
    "gpu_energy_joules", "counter", "Energy consumed since driver load (nvmlDeviceGetTotalEnergyConsumption).",
    NvmlCall("nvmlDeviceGetTotalEnergyConsumption"), _milli)
POWER_FROM_ENERGY = GpuScalar(
    "gpu_power_from_energy_watts", "gauge",
    "Average power over the last sampling interval: energy counter delta / time delta.", STATEFUL)

PCIE_REPLAY_ERRORS = GpuScalar(
    "gpu_pcie_replay_errors", "counter", "PCIe replays since driver load (nvmlDeviceGetPcieReplayCounter).",
    NvmlCall("nvmlDeviceGetPcieReplayCounter"))
TEMPERATURE = GpuScalar(
    "gpu_temperature_celsius", "gauge", "GPU die temperature (nvmlDeviceGetTemperature).",
    NvmlCall("nvmlDeviceGetTemperature", ("NVML_TEMPERATURE_GPU",)))
POWER = GpuScalar(
    "gpu_power_watts", "gauge", "Board power draw (nvmlDeviceGetPowerUsage).",
    NvmlCall("nvmlDeviceGetPowerUsage"), _milli)
POWER_LIMIT = GpuScalar(
    "gpu_power_limit_watts", "gauge", "Enforced power limit (nvmlDeviceGetEnforcedPowerLimit).",
    NvmlCall("nvmlDeviceGetEnforcedPowerLimit"), _milli)
SM_CLOCK = GpuScalar(
    "gpu_clock_hertz", "gauge", "Current clock (nvmlDeviceGetClockInfo).",
    NvmlCall("nvmlDeviceGetClockInfo", ("NVML_CLOCK_SM",)), _mega, labels=(("clock", "sm"),))
MEMORY_CLOCK = GpuScalar(
    "gpu_clock_hertz", "gauge", "Current clock (nvmlDeviceGetClockInfo).",
    NvmlCall("nvmlDeviceGetClockInfo", ("NVML_CLOCK_MEM",)), _mega, labels=(("clock", "memory"),))
FAN_SPEED = GpuScalar(
    "gpu_fan_speed_ratio", "gauge", "Fan speed the driver targets, as a share of its maximum "
    "(nvmlDeviceGetFanSpeed_v2, fan 0); absent on boards without fans.",
    NvmlCall("nvmlDeviceGetFanSpeed_v2", (0,)), _percent)

# Rendering order; rows that share a name (the clocks) must be adjacent.
GPU_SCALARS: tuple[GpuScalar, ...] = (
    UTILIZATION, MEMORY_BANDWIDTH_UTILIZATION, MEMORY_USED, MEMORY_TOTAL, MEMORY_USED_RATIO,
    SAMPLE_BUFFER_SECONDS, PCIE_REPLAY_ERRORS, TEMPERATURE, POWER, POWER_LIMIT, ENERGY, POWER_FROM_ENERGY,
    SM_CLOCK, MEMORY_CLOCK, FAN_SPEED,
)
