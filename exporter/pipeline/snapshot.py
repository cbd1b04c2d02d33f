"""Immutable snapshots: what the sampler publishes each tick and the collector renders on a scrape.

Composed of the sources' own reading types (imports run one way: sources never import this module)."""
from __future__ import annotations

from dataclasses import dataclass, field

from exporter.pipeline.histogram import HistogramSnapshot
from exporter.sources.cgroup import CgroupReading
from exporter.sources.kubelet import PodResources
from exporter.sources.nvml.readings import GpuIdentity, GpuReading, NvmlStatus
from exporter.sources.processes import ProcessIdentity
from exporter.sources.procfs import HostReading
from exporter.sources.shm import ShmReading


@dataclass(frozen=True, slots=True)
class GpuState:
    identity: GpuIdentity
    up: bool
    reading: GpuReading | None  # None while no fresh read came back (stuck call, never opened)
    utilization_hist: HistogramSnapshot
    pcie_utilization_hist: tuple[tuple[str, HistogramSnapshot], ...]  # per direction
    clock_event_seconds: tuple[tuple[str, float], ...]  # seconds active, per reason active at least once
    stuck_call: str | None = None  # the NVML call a worker has been blocked in past the deadline


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
    stuck_sources: tuple[str, ...] = ()  # host sources whose read is blocked past its deadline
