"""Immutable snapshots: what the sampler publishes each tick and the collector renders on a scrape."""
from __future__ import annotations

from dataclasses import dataclass, field

from exporter.histogram import HistogramSnapshot
from exporter.sources.cgroup import CgroupReading
from exporter.sources.kubelet import PodResources
from exporter.sources.processes import ProcessIdentity
from exporter.sources.procfs import HostReading
from exporter.sources.shm import ShmReading

# Clock event ("throttle") reason bits, from nvml.h's nvmlClocksEventReason*, with the label we export.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)
PCIE_DIRECTIONS = ("tx", "rx")


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    pcie_link_max_bytes_per_second: float | None  # per direction, from the *maximum* link gen x width


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int  # host PID, as NVML reports it
    used_memory_bytes: int | None  # None where NVML cannot tell (usedGpuMemory not available)
    sm_utilization: float | None  # ratio, from the latest per-process sample; None without one


@dataclass(frozen=True, slots=True)
class MigReading:
    """One MIG device of a MIG-enabled GPU."""

    uuid: str  # "MIG-..."
    gpu_instance_id: int
    compute_instance_id: int
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    processes: tuple[GpuProcess, ...] | None


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One read of one GPU, in base units. None: not supported by this GPU, or the call failed."""

    utilization: float | None = None  # ratio
    memory_bandwidth_utilization: float | None = None  # ratio
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    pcie_replay_errors: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    power_from_energy_watts: float | None = None  # ΔE/Δt since the previous read
    sm_clock_hertz: float | None = None
    memory_clock_hertz: float | None = None
    clock_event_reasons: int | None = None  # bitmask
    processes: tuple[GpuProcess, ...] | None = None  # None: not collected or not supported
    # Every driver utilisation sample (ratio) since the previous read; None where the driver buffer is
    # not supported (MIG, old boards), so the histograms fall back to the polled value.
    utilization_samples: tuple[float, ...] | None = None
    sample_buffer_seconds: float | None = None  # how far back the driver's buffer reached at start-up
    ecc_errors: tuple[tuple[tuple[str, str], int], ...] | None = None  # ((corrected|uncorrected, scope), n)
    remapped_rows: tuple[int, int, int, int] | None = None  # correctable, uncorrectable, pending, failed
    mig: tuple[MigReading, ...] | None = None  # None: MIG mode off or unsupported
    errors: tuple[str, ...] = ()  # NVML calls that failed with something other than NotSupported
    lost: bool = False  # GpuIsLost / ResetRequired

    @property
    def memory_used_ratio(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return self.memory_used_bytes / self.memory_total_bytes

    @property
    def ok(self) -> bool:
        return not self.errors and not self.lost

    def pcie_bytes_per_second(self, direction: str) -> float | None:
        return self.pcie_tx_bytes_per_second if direction == "tx" else self.pcie_rx_bytes_per_second

    def pcie_utilization(self, direction: str, link_max: float | None) -> float | None:
        """Throughput as a share of the link's maximum; None without a rate or a known link."""
        bps = self.pcie_bytes_per_second(direction)
        return bps / link_max if bps is not None and link_max else None

    def pids(self) -> set[int]:
        """Every process pid on the GPU and its MIG devices."""
        found = {p.pid for p in self.processes or ()}
        for m in self.mig or ():
            found.update(p.pid for p in m.processes or ())
        return found


@dataclass(frozen=True, slots=True)
class GpuState:
    identity: GpuIdentity
    up: bool
    reading: GpuReading | None  # None while no fresh read came back (stuck call, never opened)
    utilization_hist: HistogramSnapshot
    pcie_utilization_hist: tuple[tuple[str, HistogramSnapshot], ...]  # per direction
    clock_event_seconds: tuple[tuple[str, float], ...]  # per reason, seconds active; () if never reported
    stuck_call: str | None = None  # the NVML call a worker has been blocked in past the deadline


@dataclass(frozen=True, slots=True)
class NvmlStatus:
    mode: str  # "real" | "fake" | "absent"
    up: bool
    driver_version: str | None
    message: str  # why NVML is down, or a short description when up


@dataclass(frozen=True, slots=True)
class SamplerStats:
    ticks: int
    overruns: int
    errors: tuple[tuple[tuple[str, str], int], ...]  # ((source, call), count)
    durations: tuple[tuple[str, HistogramSnapshot], ...]  # per source
    lateness: HistogramSnapshot


@dataclass(frozen=True, slots=True)
class Snapshot:
    sequence: int  # 0: nothing sampled yet
    taken_at: float  # time.monotonic() at the end of the tick
    nvml: NvmlStatus
    gpus: tuple[GpuState, ...]
    host: HostReading | None
    host_cpu_hist: HistogramSnapshot | None
    stats: SamplerStats | None
    interval: float = field(default=0.2)
    processes: tuple[tuple[int, ProcessIdentity], ...] = ()  # who each GPU process pid is
    cgroup: CgroupReading | None = None
    shm: ShmReading | None = None
    xid_errors: tuple[tuple[tuple[int, int], int], ...] = ()  # ((gpu index, xid), count)
    pods: PodResources | None = None  # kubelet pod-resources; None: off or no socket
