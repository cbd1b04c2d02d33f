"""One declarative row per scalar GPU metric: what to ask NVML, how to convert it, how to expose it.

The reader (reader.py) reads every spec it is given and the collector renders every spec, so a new
scalar metric is one row here, its answer in fake_nvml.py and its line in docs/metrics.md (a test checks
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
ENERGY = GpuScalar(
    "gpu_energy_joules", "counter", "Energy consumed since driver load (nvmlDeviceGetTotalEnergyConsumption).",
    NvmlCall("nvmlDeviceGetTotalEnergyConsumption"), _milli)
POWER_FROM_ENERGY = GpuScalar(
    "gpu_power_from_energy_watts", "gauge",
    "Average power over the last sampling interval: energy counter delta / time delta.", STATEFUL,
    collector="power-from-energy")  # rate(gpu_energy_joules_total) gives the same: off by default

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


_GPM_HELP = ("{what}, share of the last >= 100 ms (GPM, nvmlGpmMetricsGet {metric}; Hopper and newer). "
             "Under MIG also per GPU instance (gpu_instance_id; its MIG devices share the value).")
SM_ACTIVE = GpuScalar(
    "gpu_sm_active_ratio", "gauge",
    _GPM_HELP.format(what="Time an SM had at least one warp resident, averaged over SMs", metric="SM_UTIL"),
    Gpm("sm_active"), collector="gpm")
SM_OCCUPANCY = GpuScalar(
    "gpu_sm_occupancy_ratio", "gauge",
    _GPM_HELP.format(what="Resident warps against the SMs' maximum", metric="SM_OCCUPANCY"),
    Gpm("sm_occupancy"), collector="gpm")
TENSOR_ACTIVE = GpuScalar(
    "gpu_tensor_active_ratio", "gauge",
    _GPM_HELP.format(what="Time any tensor-core pipe was busy", metric="ANY_TENSOR_UTIL"),
    Gpm("tensor_active"), collector="gpm")
DRAM_ACTIVE = GpuScalar(
    "gpu_dram_active_ratio", "gauge",
    _GPM_HELP.format(what="DRAM bandwidth used against the peak", metric="DRAM_BW_UTIL"),
    Gpm("dram_active"), collector="gpm")
GRAPHICS_ENGINE_ACTIVE = GpuScalar(
    "gpu_graphics_engine_active_ratio", "gauge",
    _GPM_HELP.format(what="Time the graphics/compute engine was busy", metric="GRAPHICS_UTIL"),
    Gpm("graphics_engine_active"), collector="gpm")

_NVLINK_HELP = ("NVLink payload bytes/s, summed over links (GPM NVLINK_TOTAL_*_PER_SEC on Hopper+, else "
                "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_* deltas); absent without NVLink.")
NVLINK_TX = GpuScalar("gpu_nvlink_throughput_bytes_per_second", "gauge", _NVLINK_HELP, NvLink("tx"),
                      labels=(("direction", "tx"),), collector="nvlink")
NVLINK_RX = GpuScalar("gpu_nvlink_throughput_bytes_per_second", "gauge", _NVLINK_HELP, NvLink("rx"),
                      labels=(("direction", "rx"),), collector="nvlink")
_NVLINK_LINK_HELP = ("NVLink payload bytes/s per link (NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_* deltas, scopeId = "
                     "link); only with --collector.nvlink-per-link.")
NVLINK_LINK_TX = GpuScalar("gpu_nvlink_link_throughput_bytes_per_second", "gauge", _NVLINK_LINK_HELP,
                           NvLink("tx", per_link=True), labels=(("direction", "tx"),), collector="nvlink-per-link")
NVLINK_LINK_RX = GpuScalar("gpu_nvlink_link_throughput_bytes_per_second", "gauge", _NVLINK_LINK_HELP,
                           NvLink("rx", per_link=True), labels=(("direction", "rx"),), collector="nvlink-per-link")

# Rendering order; rows that share a name (the clocks) must be adjacent.
GPU_SCALARS: tuple[GpuScalar, ...] = (
    UTILIZATION, MEMORY_BANDWIDTH_UTILIZATION, MEMORY_USED, MEMORY_TOTAL, MEMORY_USED_RATIO,
    SAMPLE_BUFFER_SECONDS, PCIE_REPLAY_ERRORS, TEMPERATURE, POWER, POWER_LIMIT, ENERGY, POWER_FROM_ENERGY,
    SM_CLOCK, MEMORY_CLOCK, FAN_SPEED,
    SM_ACTIVE, SM_OCCUPANCY, TENSOR_ACTIVE, DRAM_ACTIVE, GRAPHICS_ENGINE_ACTIVE, NVLINK_TX, NVLINK_RX,
)
# Off by default (18 links x 2 directions per H100): GPU_SCALARS + these with --collector.nvlink-per-link.
NVLINK_PER_LINK_SCALARS: tuple[GpuScalar, ...] = (NVLINK_LINK_TX, NVLINK_LINK_RX)
