"""Container CPU throttling and limits from cgroupfs (v2, with a v1 fallback), and which container and
pod a process belongs to, from its /proc/<pid>/cgroup.

Which cgroup: the exporter's own by default (as a sidecar it shares the pod or, with the right mounts, is
pointed at the TTS container's with --cgroup.path).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from exporter.sources.kernfile import KernelFile

log = logging.getLogger("exporter.cgroup")

# v1 reports "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX); anything this big is none.
_NO_LIMIT = 2**60
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
# The last path element of a container's cgroup: "<64 hex>", "docker-<id>.scope",
# "cri-containerd-<id>.scope", "crio-<id>.scope".
_CONTAINER = re.compile(r"^(?:[a-z][a-z-]*-)?([0-9a-f]{64})(?:\.scope)?$")


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """`/proc/<pid>/cgroup` -> {controllers: path}; the v2 line's controllers key is ""."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def container_of(cgroups: dict[str, str]) -> tuple[str, str]:
    """(container_id, pod_uid) from a process's cgroup paths; "" where it is not in a container/pod."""
    ordered = [cgroups[k] for k in ("", "cpu,cpuacct", "cpu", "memory") if k in cgroups] + list(cgroups.values())
    for path in ordered:
        leaf = path.rstrip("/").rsplit("/", 1)[-1]
        m = _CONTAINER.match(leaf)
        if m:
            pod = _POD.search(path)
            return m.group(1), pod.group(1).replace("_", "-") if pod else ""
    return "", ""


def parse_keyed(text: str) -> dict[str, int]:
    """Flat keyed files such as cpu.stat: "name value" per line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_cpu_max(text: str) -> float | None:
    """v2 cpu.max "<quota> <period>" (or "max <period>") -> limit in cores, None when unlimited."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return int(parts[0]) / int(parts[1])


@dataclass(frozen=True, slots=True)
class CgroupReading:
    path: str  # the cgroup, as a label value
    cpu_usage_seconds: float | None
    cpu_periods: int | None
    cpu_throttled_periods: int | None
    cpu_throttled_seconds: float | None
    cpu_limit_cores: float | None
    memory_usage_bytes: int | None
    memory_limit_bytes: int | None
    errors: tuple[str, ...]


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    value = int(text)
    return None if value < 0 or value >= _NO_LIMIT else value


class CgroupSource:
    """Reads one cgroup's CPU and memory accounting each tick."""

    def __init__(self, cgroupfs: str | Path = "/sys/fs/cgroup", path: str = "",
                 self_cgroup: str | Path = "/proc/self/cgroup") -> None:
        root = Path(cgroupfs)
        self.v2 = (root / "cgroup.controllers").exists()
        own = parse_proc_cgroup(Path(self_cgroup).read_text()) if not path else {}
        self.path = path or own.get("" if self.v2 else "cpu", own.get("cpu,cpuacct", "/")) or "/"

        def resolve(controller_dirs: tuple[str, ...], controller: str) -> Path:
            # v1: <root>/<controller dir>/<path>; with a private cgroup namespace the mount root is already
            # our cgroup, so fall back to it when the full path is not there.
            rel = (path or own.get(controller) or own.get("cpu,cpuacct") or "/").lstrip("/")
            base = root.joinpath(*controller_dirs)
            return base / rel if (base / rel).exists() else base

        if self.v2:
            rel = self.path.lstrip("/")
            d = root / rel if (root / rel).exists() else root
            self._files = {n: KernelFile(d / n) for n in ("cpu.stat", "cpu.max", "memory.current", "memory.max")}
        else:
            cpu = resolve(("cpu,cpuacct",), "cpu") if (root / "cpu,cpuacct").exists() else resolve(("cpu",), "cpu")
            acct = resolve(("cpuacct",), "cpuacct") if (root / "cpuacct").exists() else cpu
            mem = resolve(("memory",), "memory")
            self._files = {
                "cpu.stat": KernelFile(cpu / "cpu.stat"),
                "cpu.cfs_quota_us": KernelFile(cpu / "cpu.cfs_quota_us"),
                "cpu.cfs_period_us": KernelFile(cpu / "cpu.cfs_period_us"),
                "cpuacct.usage": KernelFile(acct / "cpuacct.usage"),
                "memory.usage_in_bytes": KernelFile(mem / "memory.usage_in_bytes"),
                "memory.limit_in_bytes": KernelFile(mem / "memory.limit_in_bytes"),
            }
        present = [n for n, f in self._files.items() if f.path.exists()]
        self.available = bool(present)
        log.info("cgroup %s (%s): reading %s", self.path, "v2" if self.v2 else "v1", ", ".join(present) or "nothing")

    def _read(self, name: str, errors: list[str]) -> str | None:
        try:
            return self._files[name].read()
        except OSError:
            errors.append(name)
            return None

    def read(self) -> CgroupReading:
        errors: list[str] = []
        usage = periods = throttled = throttled_s = limit = mem = mem_limit = None
        stat = parse_keyed(self._read("cpu.stat", errors) or "")
        if self.v2:
            if "usage_usec" in stat:
                usage = stat["usage_usec"] / 1e6
            throttled_s = stat["throttled_usec"] / 1e6 if "throttled_usec" in stat else None
            cpu_max = self._read("cpu.max", errors)
            limit = parse_cpu_max(cpu_max) if cpu_max else None
            mem = _int_or_none(self._read("memory.current", errors) or "")
            mem_limit = _int_or_none(self._read("memory.max", errors) or "")
        else:
            acct = self._read("cpuacct.usage", errors)
            usage = int(acct) / 1e9 if acct and acct.strip().isdigit() else None
            throttled_s = stat["throttled_time"] / 1e9 if "throttled_time" in stat else None
            quota = _int_or_none(self._read("cpu.cfs_quota_us", errors) or "")
            period = _int_or_none(self._read("cpu.cfs_period_us", errors) or "")
            limit = quota / period if quota and period else None
            mem = _int_or_none(self._read("memory.usage_in_bytes", errors) or "")
            mem_limit = _int_or_none(self._read("memory.limit_in_bytes", errors) or "")
        periods = stat.get("nr_periods")
        throttled = stat.get("nr_throttled")
        return CgroupReading(self.path, usage, periods, throttled, throttled_s, limit, mem, mem_limit, tuple(errors))
