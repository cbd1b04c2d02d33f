"""XID critical errors: an NVML event set waited on in its own thread, counted per (GPU, XID)."""
from __future__ import annotations

import logging
import threading
from typing import Any

from exporter.sources.nvml.errors import error_name

log = logging.getLogger("exporter.nvml")

XID_WAIT_MS = 500


class XidWatcher:
    """Counters, not a "last XID" gauge: every event is counted and nothing needs resetting."""

    def __init__(self, nvml: Any, gpu_count: int) -> None:
        self._nvml = nvml
        self._gpu_count = gpu_count
        self._counts: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xid-events", daemon=True)
        self._thread.start()

    def counts(self) -> tuple[tuple[tuple[int, int], int], ...]:
        """((gpu index, xid), events) since the watcher started."""
        with self._lock:
            return tuple(sorted(self._counts.items()))

    def stop(self, timeout: float = 0.0) -> None:
        """Ask the thread to end; with a timeout, wait for it (it wakes every XID_WAIT_MS)."""
        self._stop.set()
        if timeout:
            self._thread.join(timeout)

    def _run(self) -> None:
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except Exception as exc:
            log.info("XID events unavailable: %s (%s)", exc, error_name(exc))
            return
        registered = 0
        for index in range(self._gpu_count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
                registered += 1
            except Exception as exc:  # NotSupported on some boards; a lost GPU
                log.info("GPU %d: XID events not available (%s)", index, error_name(exc))
        while registered and not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait(events, XID_WAIT_MS)
            except Exception as exc:
                if error_name(exc) != "NVMLError_Timeout":  # a timeout is the normal quiet case
                    self._stop.wait(1.0)
                continue
            if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                index = nvml.nvmlDeviceGetIndex(data.device)
            except Exception:
                continue
            xid = int(data.eventData)
            log.warning("GPU %d: XID %d", index, xid)
            with self._lock:
                self._counts[(index, xid)] = self._counts.get((index, xid), 0) + 1
        try:
            nvml.nvmlEventSetFree(events)
        except Exception:  # shutting down anyway
            pass
