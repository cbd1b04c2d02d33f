"""Host CPU and memory from procfs (`--path.procfs`, so a container can read the host's /proc).

Utilisation is busy/total over the *delta* between two reads of /proc/stat; the since-boot average that
a single read gives is exactly the figure that hides jitter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporter.sources.kernfile import KernelFile

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
        if label and not label.isdigit():
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


def parse_meminfo(text: str) -> dict[str, int]:
    """`/proc/meminfo` fields in bytes (the file says kB, meaning KiB)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
        fields[name.strip()] = int(parts[0]) * scale
    return fields


class ProcfsSource:
    """Reads /proc/stat and /proc/meminfo; keeps the previous CPU times to compute deltas."""

    def __init__(self, procfs: str | Path = "/proc") -> None:
        self._stat = KernelFile(Path(procfs) / "stat")
        self._meminfo = KernelFile(Path(procfs) / "meminfo")
        self._prev: dict[str, CpuTimes] = {}

    def read(self) -> HostReading:
        errors: list[str] = []
        cpu: float | None = None
        cores: list[tuple[str, float]] = []
        try:
            times = parse_proc_stat(self._stat.read())
            if "all" not in times:
                raise ValueError("no aggregate cpu line")
        except (OSError, ValueError, UnicodeDecodeError):
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
            mem = parse_meminfo(self._meminfo.read())
            total = mem["MemTotal"]
            available = mem.get("MemAvailable")
        except (OSError, KeyError, UnicodeDecodeError):
            errors.append("meminfo")
        return HostReading(cpu, tuple(cores), total, available, tuple(errors))
