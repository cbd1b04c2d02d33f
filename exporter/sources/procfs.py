"""Host CPU and memory from procfs (`--path.procfs`, so a container can read the host's /proc).

Utilisation is busy/total over the *delta* between two reads of /proc/stat; the since-boot average that
a single read gives is exactly the figure that hides jitter.

Memory comes from psutil. CPU times do not: psutil.cpu_times(percpu=True) returns a list in file order
without the CPU numbers, so with a CPU offlined in the middle (cpu1 of cpu0..cpu3) every later core would
be labelled one too low and its delta taken against another core's counters; it also fails the whole read
on one malformed line and needs a second read of the file for the aggregate (31 us a tick against 16 us
here). /proc/stat is read by hand below, keyed by the kernel's own CPU numbers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psutil

from exporter.sources.kernfile import KernelFile, check_regular

# We report total and available only; psutil warns (once, on stderr) when fields we do not use are missing.
warnings.filterwarnings("ignore", message=r".*memory stats couldn't be determined", category=RuntimeWarning)

# /proc/stat cpu columns: user nice system idle iowait irq softirq steal guest guest_nice.
# guest and guest_nice are already counted inside user and nice, so they are left out of the total.
_IDLE_COLUMNS = (3, 4)  # idle, iowait
_SUMMED_COLUMNS = 8


@dataclass(frozen=True, slots=True)
class CpuTimes:
    busy: int  # jiffies
    total: int  # jiffies


@dataclass(frozen=True, slots=True)
class HostReading:
    cpu_utilization: float | None  # all CPUs, 0..1, over the last interval
    core_utilization: tuple[tuple[str, float], ...]  # (cpu index, 0..1), over the last interval
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    errors: tuple[str, ...]  # procfs files that could not be read or parsed this tick
    simulated: bool = False  # CPU figures made up by a --fake-scenario (exporter.fake.scenarios), not read


def parse_proc_stat(text: str) -> dict[str, CpuTimes]:
    """CPU times keyed by "all" (the aggregate line) and the CPU index ("0", "1", ...).

    Malformed cpu lines are skipped rather than failing the whole read.
    """
    times: dict[str, CpuTimes] = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        parts = line.split()
        label = parts[0][3:]
        if label and not (label.isascii() and label.isdigit()):
            continue
        try:
            values = [int(v) for v in parts[1 : 1 + _SUMMED_COLUMNS]]
        except ValueError:
            continue
        if len(values) < 4 or any(v < 0 for v in values):
            continue
        total = sum(values)
        idle = sum(values[i] for i in _IDLE_COLUMNS if i < len(values))
        times[label or "all"] = CpuTimes(busy=total - idle, total=total)
    return times


def utilization(prev: CpuTimes | None, cur: CpuTimes) -> float | None:
    """Busy share between two reads; None when there is no previous read or a counter went back."""
    if prev is None:
        return None
    d_total = cur.total - prev.total
    d_busy = cur.busy - prev.busy
    if d_total <= 0 or d_busy < 0 or d_busy > d_total:
        return None
    return d_busy / d_total


def psutil_at(procfs: str) -> ModuleType:
    """psutil reading under `procfs`. PROCFS_PATH is psutil's one global, read on every call: set it before
    each use (every reader runs on the sampler thread, and in production all share one procfs)."""
    psutil.PROCFS_PATH = procfs
    return psutil


class ProcfsSource:
    """Reads /proc/stat and /proc/meminfo; keeps the previous CPU times to compute deltas."""

    def __init__(self, procfs: str | Path = "/proc") -> None:
        self._root = str(procfs)
        self._stat = KernelFile(Path(procfs) / "stat")
        self._meminfo = Path(procfs) / "meminfo"
        self._zoneinfo = Path(procfs) / "zoneinfo"  # psutil's fallback where MemAvailable is missing
        self._prev: dict[str, CpuTimes] = {}

    def read(self) -> HostReading:
        errors: list[str] = []
        cpu: float | None = None
        cores: list[tuple[str, float]] = []
        try:
            times = parse_proc_stat(self._stat.read())
            if "all" not in times:
                raise ValueError("no aggregate cpu line")
        except (OSError, ValueError):
            errors.append("stat")
            times = {}
        for label, cur in times.items():
            value = utilization(self._prev.get(label), cur)
            if value is None:
                continue
            if label == "all":
                cpu = value
            else:
                cores.append((label, value))
        if times:
            # CPUs that went offline drop out here; ones that came online get a value from the next tick.
            self._prev = times

        total = available = None
        try:
            total, available = self._memory()
        except Exception:  # psutil parsing a file under a user-given path: any failure is "unreadable"
            errors.append("meminfo")
        return HostReading(cpu, tuple(cores), total, available, tuple(errors))

    def _memory(self) -> tuple[int, int]:
        """(MemTotal, available) in bytes; available is psutil's estimate where MemAvailable is missing."""
        # psutil open()s the files itself: refuse a FIFO or device first, or the read would block the tick.
        check_regular(self._meminfo)
        if self._zoneinfo.exists():
            check_regular(self._zoneinfo)
        memory = psutil_at(self._root).virtual_memory()
        return memory.total, memory.available
