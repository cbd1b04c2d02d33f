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
from typing import Callable, TypeVar

from exporter.sources.kernfile import KernelFile

log = logging.getLogger("exporter.cgroup")
T = TypeVar("T")

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


_UINT = re.compile(r"[0-9]{1,20}")  # a u64 at most: a longer run of digits is not a kernel counter


def _uint(text: str) -> int:
    if not _UINT.fullmatch(text):
        raise ValueError(f"not a counter: {text[:40]!r}")
    return int(text)


def parse_keyed(text: str) -> dict[str, int]:
    """Flat keyed files such as cpu.stat: "name value" per line; ValueError on any other line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"malformed line {line[:60]!r}")
        out[parts[0]] = _uint(parts[1])
    return out


def parse_cpu_max(text: str) -> float | None:
    """v2 cpu.max "<quota> <period>" (or "max <period>") -> limit in cores, None when unlimited."""
    parts = text.split()
    if len(parts) != 2:
        raise ValueError(f"want '<quota> <period>', got {text[:60]!r}")
    period = _uint(parts[1])
    if period == 0:
        raise ValueError("period 0")
    return None if parts[0] == "max" else _uint(parts[0]) / period


def parse_limit(text: str) -> int | None:
    """A byte count or CFS quota: None for "max", -1 (v1 quota) or v1's huge no-limit value."""
    text = text.strip()
    if text in ("max", "-1"):
        return None
    value = _uint(text)
    return None if value >= _NO_LIMIT else value


def parse_counter(text: str) -> int:
    return _uint(text.strip())


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
    errors: tuple[str, ...]  # files that could not be read or parsed this tick


class CgroupPathError(ValueError):
    """An explicit --cgroup.path that is not there: reporting the root's figures under its name would lie."""


@dataclass(frozen=True, slots=True)
class CgroupLocation:
    v2: bool
    path: str  # the cgroup, as a label value
    files: dict[str, Path]  # accounting file name -> where it is


def locate(cgroupfs: str | Path = "/sys/fs/cgroup", path: str = "",
           self_cgroup: str | Path = "/proc/self/cgroup") -> CgroupLocation:
    """Which files to read for the cgroup `path` (default: our own, from self_cgroup).

    An explicit path must exist (v2: under the mount; v1: under at least one controller, and controllers
    without it are not read): CgroupPathError otherwise. Our own cgroup falls back to the mount root, which
    is what a private cgroup namespace shows.
    """
    root = Path(cgroupfs)
    v2 = (root / "cgroup.controllers").exists()
    own = {} if path else parse_proc_cgroup(Path(self_cgroup).read_text())
    label = path or own.get("" if v2 else "cpu", own.get("cpu,cpuacct", "/")) or "/"
    missing = CgroupPathError(f"no cgroup {path!r} under {root} "
                              f"({'v2' if v2 else 'v1 cpu, cpuacct or memory controllers'})")

    def directory(base: Path, controller: str) -> Path | None:
        rel = (path or own.get(controller) or own.get("cpu,cpuacct") or "/").lstrip("/")
        if (base / rel).is_dir():
            return base / rel
        return None if path else base

    if v2:
        d = directory(root, "")
        if d is None:
            raise missing
        return CgroupLocation(True, label, {n: d / n for n in ("cpu.stat", "cpu.max", "memory.current", "memory.max")})
    cpu_base = root / "cpu,cpuacct" if (root / "cpu,cpuacct").exists() else root / "cpu"
    cpu = directory(cpu_base, "cpu")
    acct = directory(root / "cpuacct", "cpuacct") if (root / "cpuacct").exists() else cpu
    mem = directory(root / "memory", "memory")
    if path and cpu is None and acct is None and mem is None:
        raise missing
    wanted = ((cpu, ("cpu.stat", "cpu.cfs_quota_us", "cpu.cfs_period_us")), (acct, ("cpuacct.usage",)),
              (mem, ("memory.usage_in_bytes", "memory.limit_in_bytes")))
    return CgroupLocation(False, label, {n: d / n for d, names in wanted if d is not None for n in names})


class CgroupSource:
    """Reads one cgroup's CPU and memory accounting each tick. A file that cannot be read or parsed costs
    its own values and is named in the reading's errors; the others are still reported."""

    def __init__(self, cgroupfs: str | Path = "/sys/fs/cgroup", path: str = "",
                 self_cgroup: str | Path = "/proc/self/cgroup") -> None:
        where = locate(cgroupfs, path, self_cgroup)
        self.v2, self.path = where.v2, where.path
        self._files = {n: KernelFile(f) for n, f in where.files.items()}
        present = [n for n, f in self._files.items() if f.path.exists()]
        self.available = bool(present)
        log.info("cgroup %s (%s): reading %s", self.path, "v2" if self.v2 else "v1", ", ".join(present) or "nothing")

    def _value(self, name: str, parse: Callable[[str], T], errors: list[str]) -> T | None:
        f = self._files.get(name)
        if f is None:  # v1: the cgroup is not in this controller's hierarchy
            return None
        try:
            return parse(f.read())
        except (OSError, ValueError):
            errors.append(name)
            return None

    def read(self) -> CgroupReading:
        errors: list[str] = []
        stat = self._value("cpu.stat", parse_keyed, errors) or {}
        if self.v2:
            usage = stat["usage_usec"] / 1e6 if "usage_usec" in stat else None
            throttled_s = stat["throttled_usec"] / 1e6 if "throttled_usec" in stat else None
            limit = self._value("cpu.max", parse_cpu_max, errors)
            mem = self._value("memory.current", parse_limit, errors)
            mem_limit = self._value("memory.max", parse_limit, errors)
        else:
            acct = self._value("cpuacct.usage", parse_counter, errors)
            usage = acct / 1e9 if acct is not None else None
            throttled_s = stat["throttled_time"] / 1e9 if "throttled_time" in stat else None
            quota = self._value("cpu.cfs_quota_us", parse_limit, errors)
            period = self._value("cpu.cfs_period_us", parse_limit, errors)
            limit = quota / period if quota and period else None
            mem = self._value("memory.usage_in_bytes", parse_limit, errors)
            mem_limit = self._value("memory.limit_in_bytes", parse_limit, errors)
        return CgroupReading(self.path, usage, stat.get("nr_periods"), stat.get("nr_throttled"), throttled_s, limit,
                             mem, mem_limit, tuple(errors))
