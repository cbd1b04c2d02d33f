"""Who a GPU process is: its name (psutil) and container/pod (its cgroup file, which psutil does not
parse), from the (host's) procfs.

NVML reports host PIDs; with hostPID (DaemonSet) or a shared PID namespace (sidecar) they are visible
under --path.procfs. A process that exits between NVML's list and this read simply gets empty labels
and is gone from the next list: no error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from exporter.sources.cgroup import container_of, parse_proc_cgroup
from exporter.sources.kernfile import check_regular, read_once
from exporter.sources.procfs import psutil_at


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    comm: str = ""
    container_id: str = ""
    pod_uid: str = ""


class ProcessAttributor:
    def __init__(self, procfs: str | Path = "/proc") -> None:
        self._procfs = Path(procfs)
        self._root = str(procfs)
        self._cache: dict[int, ProcessIdentity] = {}

    def lookup(self, pids: Iterable[int]) -> dict[int, ProcessIdentity]:
        """Identity of each pid; cached while the pid keeps appearing, forgotten once it does not."""
        out: dict[int, ProcessIdentity] = {}
        for pid in pids:
            ident = self._cache.get(pid)
            if ident is None:
                # Not visible (exited, or another PID namespace): cached as unknown too, so an invisible
                # process costs one failed open, not one per tick.
                ident = self._cache[pid] = self._read(pid) or ProcessIdentity()
            out[pid] = ident
        self._cache = {pid: self._cache[pid] for pid in out}
        return out

    def cached(self, pids: Iterable[int]) -> bool:
        """Whether lookup(pids) would read no file (every pid known): the sampler then runs it inline."""
        return all(pid in self._cache for pid in pids)

    def _read(self, pid: int) -> ProcessIdentity | None:
        base = self._procfs / str(pid)
        try:
            # psutil open()s these itself: refuse a FIFO or device first, or the read would block the tick.
            check_regular(base / "stat")
            check_regular(base / "cmdline")  # read for names the kernel cut at 15 characters
            name = psutil_at(self._root).Process(pid).name()
            cgroups = parse_proc_cgroup(read_once(base / "cgroup"))
        except Exception:  # exited, not visible from this PID namespace, or files psutil cannot parse
            return None
        container, pod = container_of(cgroups)
        return ProcessIdentity(name, container, pod)
