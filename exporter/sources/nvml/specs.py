"""One declarative row per scalar GPU metric: what to ask NVML, how to convert it, how to expose it.

The reader (reader.py) reads every spec it is given and the collector renders every spec, so a new
scalar metric is one row here, its answer in fake/nvml.py and its line in docs/metrics.md (a test checks
the docs against this table). A row may also carry labelled series beside (or instead of) the GPU's own
value: GPM activity per MIG GPU instance, NVLink per link (GpuReading.labelled). Families of another shape
(PCIe per direction, histograms, processes, MIG memory, ECC, clock events) keep their own code in the
reader and the collector.

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
    this call is not supported (an older driver or binding).

    `field_name` names an NVML_FI_DEV_* field id whose value is this call's answer in the same unit: where the
    GPU answers it (decided on the first read after each open), it comes in the one nvmlDeviceGetFieldValues
    batch of the read instead of a call of its own; where it does not, the call is made as before."""

    function: str
    args: tuple[int | str, ...] = ()
    kwargs: tuple[tuple[str, int | str], ...] = ()
    fallback: NvmlCall | None = None
    field_name: str | None = None
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


@dataclass(frozen=True)
class Gpm:
    """One GPM activity ratio (a GpmActivity field, sources/gpm.py) over the last >= 100 ms sample pair, for
    the GPU and, under MIG, per GPU instance (labelled with the instance's MIG devices)."""

    activity: Literal["sm_active", "sm_occupancy", "tensor_active", "dram_active", "graphics_engine_active"]


@dataclass(frozen=True)
class NvLink:
    """NVLink bytes/s in one direction, summed over links (GPM on Hopper+, else the per-link field
    counters); `per_link`: one series per link (a `link` label) instead of the sum."""

    direction: Literal["tx", "rx"]
    per_link: bool = False


# Filled in by GpuReader itself because it needs state across reads (a delta, the first read's buffer).
STATEFUL = None


@dataclass(frozen=True, eq=False)  # identity equality: specs are dictionary keys of GpuReading.scalars
class GpuScalar:
    name: str  # as exposed, without _total for counters
    type: Literal["gauge", "counter"]
    help: str
    source: NvmlCall | FieldValue | Derived | Gpm | NvLink | None
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
    "that loses no sample (nvmlDeviceGetSamples).", STATEFUL, collector="sample-buffer")
# Field ids batched in place of a call (reader.py): the same quantity in the same unit as the call's answer.
# Energy: mJ since driver load, either way. Power: NVML_FI_DEV_POWER_AVERAGE (mW, the 1 s average), which is
# what nvmlDeviceGetPowerUsage answers on Ampere and newer (nvidia-smi's power.draw); _INSTANT would be the
# raw sensor. Replays: the same counter. No field carries the GPU temperature, the current clocks, the
# utilisation rates or the memory info, so those stay calls; NVML_FI_DEV_POWER_CURRENT_LIMIT is not
# documented as the enforced limit (which is the minimum of several), so that stays a call too.
ENERGY = GpuScalar(
    "gpu_energy_joules", "counter", "Energy consumed since driver load (nvmlDeviceGetTotalEnergyConsumption).",
    NvmlCall("nvmlDeviceGetTotalEnergyConsumption", field_name="NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION"), _milli)
POWER_FROM_ENERGY = GpuScalar(
    "gpu_power_from_energy_watts", "gauge",
    "Average power over the last sampling interval: energy counter delta / time delta.", STATEFUL,
    collector="power-from-energy")  # rate(gpu_energy_joules_total) gives the same: off by default

PCIE_REPLAY_ERRORS = GpuScalar(
    "gpu_pcie_replay_errors", "counter", "PCIe replays since driver load (nvmlDeviceGetPcieReplayCounter).",
    NvmlCall("nvmlDeviceGetPcieReplayCounter", field_name="NVML_FI_DEV_PCIE_REPLAY_COUNTER"))
TEMPERATURE = GpuScalar(
    "gpu_temperature_celsius", "gauge", "GPU die temperature (nvmlDeviceGetTemperature).",
    NvmlCall("nvmlDeviceGetTemperature", ("NVML_TEMPERATURE_GPU",)))
POWER = GpuScalar(
    "gpu_power_watts", "gauge", "Board power draw (nvmlDeviceGetPowerUsage).",
    NvmlCall("nvmlDeviceGetPowerUsage", field_name="NVML_FI_DEV_POWER_AVERAGE"), _milli)
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


def _gpm(name: str, what: str, metric: str, activity: Any) -> GpuScalar:
    return GpuScalar(name, "gauge", f"{what}, over the last >= 100 ms (GPM {metric}; Hopper and newer, absent "
                     "elsewhere). Under MIG also per GPU instance, on each of its MIG devices.",
                     Gpm(activity), collector="gpm")  # the GPM reader hands out 0-1 ratios already


SM_ACTIVE = _gpm("gpu_sm_active_ratio", "Share of SMs busy (at least one warp resident)", "SM_UTIL", "sm_active")
SM_OCCUPANCY = _gpm("gpu_sm_occupancy_ratio", "Resident warps against the SMs' maximum", "SM_OCCUPANCY",
                    "sm_occupancy")
TENSOR_ACTIVE = _gpm("gpu_tensor_active_ratio", "Share of time any tensor-core pipe was busy", "ANY_TENSOR_UTIL",
                     "tensor_active")
DRAM_ACTIVE = _gpm("gpu_dram_active_ratio", "DRAM bandwidth used against the peak", "DRAM_BW_UTIL", "dram_active")
GRAPHICS_ENGINE_ACTIVE = _gpm("gpu_graphics_engine_active_ratio", "Share of time the graphics/compute engine was "
                              "busy", "GRAPHICS_UTIL", "graphics_engine_active")


def _nvlink(direction: Literal["tx", "rx"], per_link: bool) -> GpuScalar:
    if per_link:
        return GpuScalar("gpu_nvlink_link_throughput_bytes_per_second", "gauge",
                         "NVLink payload bytes/s per link (NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_* deltas, scopeId = "
                         "link); only with --collector.nvlink-per-link.", NvLink(direction, per_link=True),
                         labels=(("direction", direction),), collector="nvlink-per-link")
    return GpuScalar("gpu_nvlink_throughput_bytes_per_second", "gauge",
                     "NVLink payload bytes/s, summed over links (GPM NVLINK_TOTAL_*_PER_SEC on Hopper+, else "
                     "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_* deltas); absent without NVLink.", NvLink(direction),
                     labels=(("direction", direction),), collector="nvlink")


NVLINK_TX, NVLINK_RX = _nvlink("tx", per_link=False), _nvlink("rx", per_link=False)
NVLINK_LINK_TX, NVLINK_LINK_RX = _nvlink("tx", per_link=True), _nvlink("rx", per_link=True)

# Rendering order; rows that share a name (the clocks) must be adjacent.
GPU_SCALARS: tuple[GpuScalar, ...] = (
    UTILIZATION, MEMORY_BANDWIDTH_UTILIZATION, MEMORY_USED, MEMORY_TOTAL, MEMORY_USED_RATIO,
    SAMPLE_BUFFER_SECONDS, PCIE_REPLAY_ERRORS, TEMPERATURE, POWER, POWER_LIMIT, ENERGY, POWER_FROM_ENERGY,
    SM_CLOCK, MEMORY_CLOCK, FAN_SPEED,
    SM_ACTIVE, SM_OCCUPANCY, TENSOR_ACTIVE, DRAM_ACTIVE, GRAPHICS_ENGINE_ACTIVE, NVLINK_TX, NVLINK_RX,
)
# Off by default (18 links x 2 directions per H100): GPU_SCALARS + these with --collector.nvlink-per-link.
NVLINK_PER_LINK_SCALARS: tuple[GpuScalar, ...] = (NVLINK_LINK_TX, NVLINK_LINK_RX)
