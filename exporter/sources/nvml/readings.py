"""What the NVML source reads: plain, immutable values in base units (pipeline/snapshot.py composes them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from exporter.sources.nvml.specs import GpuScalar

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
    """One read of one GPU, in base units. A missing value: not supported by this GPU, or the call failed.

    `scalars` holds one value per scalar spec (specs.py) that has one, keyed by the spec itself, so the
    reader and the collector meet on the spec object, not on a field name: `reading[UTILIZATION]`.
    """

    scalars: Mapping[GpuScalar, float] = field(default_factory=dict)
    # Labelled series of a spec beside its GPU-wide value: ((label, value) pairs, value) per MIG device or link.
    labelled: Mapping[GpuScalar, tuple[tuple[tuple[tuple[str, str], ...], float], ...]] = field(default_factory=dict)
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    clock_event_reasons: int | None = None  # bitmask
    processes: tuple[GpuProcess, ...] | None = None  # None: not collected or not supported
    # Every driver utilisation sample (ratio) since the previous read; None where the driver buffer is
    # not supported (MIG, old boards), so the histograms fall back to the polled value.
    utilization_samples: tuple[float, ...] | None = None
    ecc_errors: tuple[tuple[tuple[str, str], int], ...] | None = None  # ((corrected|uncorrected, scope), n)
    remapped_rows: tuple[int, int, int, int] | None = None  # correctable, uncorrectable, pending, failed
    mig: tuple[MigReading, ...] | None = None  # None: MIG mode off or unsupported
    errors: tuple[str, ...] = ()  # NVML calls that failed this read (errors.py: lost, driver gone, transient)
    lost: bool = False  # GpuIsLost / ResetRequired
    recorded: tuple[str, ...] = ()  # calls recorded once, not asked again (NoPermission, a bug): GPU stays up

    def __getitem__(self, spec: GpuScalar) -> float | None:
        return self.scalars.get(spec)

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
class NvmlStatus:
    mode: str  # "real" | "fake" | "absent"
    up: bool
    driver_version: str | None
    message: str  # why NVML is down, or a short description when up
