"""NvmlSource: initialises NVML (retrying with backoff while it is absent), owns one reader per GPU, the
XID watcher and the PCIe fallback thread, and initialises again when the driver goes away under it."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from exporter.sources.nvml.errors import error_name
from exporter.sources.nvml.pcie_fallback import BlockingPcieThroughput
from exporter.sources.nvml.reader import READS, GpuReader
from exporter.sources.nvml.readings import NvmlStatus
from exporter.sources.nvml.specs import GPU_SCALARS, GpuScalar
from exporter.sources.nvml.xid import XID_WAIT_MS, XidWatcher
from exporter.transitions import TransitionLog

log = logging.getLogger("exporter.nvml")


class NvmlSource:
    """What the sampler uses: poll(), status, gpus, xid_counts(), close(); per GPU: index, identity,
    read(), in_call()."""

    def __init__(
        self,
        nvml: Any | None,
        mode: str,
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        reads: frozenset[str] = READS,  # the reader's optional call groups to make
        specs: tuple[GpuScalar, ...] = GPU_SCALARS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nvml = nvml
        self.mode = mode  # "real" or "fake"; becomes "absent" while the library cannot be loaded
        self.status = NvmlStatus(mode, False, None, "not initialised yet")
        # A new tuple whenever the set of GPUs changes (NVML initialised again): compare by identity.
        self.gpus: tuple[GpuReader, ...] = ()
        self._reads = reads
        self._specs = specs
        self._clock = clock
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._delay = backoff_initial_s
        self._next_try = 0.0
        self._pcie_fallback: BlockingPcieThroughput | None = None
        self._transitions = TransitionLog(log)
        self._xid: XidWatcher | None = None

    def xid_counts(self) -> tuple[tuple[tuple[int, int], int], ...]:
        """((gpu index, xid), events) since NVML was last initialised."""
        return self._xid.counts() if self._xid is not None else ()

    def poll(self, now: float) -> str | None:
        """Initialise when due, or notice that the driver went away. Returns a failed call's name, for
        error counting."""
        if self.status.up:
            if any(g.driver_gone for g in self.gpus):
                self._release(wait=True)
                self._down(self.mode, "the NVIDIA driver went away (unloaded or reloaded); initialising again", now)
            return None
        if now < self._next_try:
            return None
        nvml = self.nvml
        if nvml is None:
            self._down("absent", "the pynvml module (nvidia-ml-py) is not installed", now)
            return "import"
        call = "nvmlInit"
        try:
            nvml.nvmlInit()
            call = "nvmlSystemGetDriverVersion"
            driver = str(nvml.nvmlSystemGetDriverVersion())
            call = "nvmlDeviceGetCount"
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            err = error_name(exc)
            if err in ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"):
                self._down("absent", f"no NVIDIA GPU found: {exc} ({err}); serving host metrics only", now)
            else:
                self._down(self.mode, f"NVML initialisation failed in {call}: {exc} ({err})", now)
            return call
        self._pcie_fallback = BlockingPcieThroughput(nvml, clock=self._clock)
        self.gpus = tuple(GpuReader(nvml, i, self._pcie_fallback, specs=self._specs,
                                    reads=self._reads, clock=self._clock)
                          for i in range(count))
        self._xid = XidWatcher(nvml, count) if count else None
        self._delay = self._backoff_initial
        if self.mode == "absent":
            self.mode = "real"
        msg = f"driver {driver}, {count} GPU(s)" if count else f"driver {driver}, but no GPU found"
        self.status = NvmlStatus(self.mode, True, driver, msg)
        self._transitions.set("NVML", None)
        log.info("NVML (%s) initialised: %s", self.mode, msg)
        return None

    def _down(self, mode: str, message: str, now: float) -> None:
        self.mode = mode
        self.status = NvmlStatus(mode, False, None, message)
        self._next_try = now + self._delay
        self._transitions.set("NVML", f"{message}; retrying with backoff up to {self._backoff_max:g}s")
        self._delay = min(self._delay * 2, self._backoff_max)

    def _release(self, wait: bool) -> None:
        """Stop the threads of this initialisation; before initialising again, wait for the XID thread
        (it wakes every XID_WAIT_MS), so none leaks across re-inits."""
        if self._pcie_fallback is not None:
            self._pcie_fallback.stop()
            self._pcie_fallback = None
        if self._xid is not None:
            self._xid.stop(timeout=2 * XID_WAIT_MS / 1000 if wait else 0.0)
            self._xid = None
        self.gpus = ()
        if self.status.up and self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # the driver is gone or we are shutting down: nothing to undo
                pass

    def close(self) -> None:
        self._release(wait=False)  # exiting: the daemon threads end with the process
