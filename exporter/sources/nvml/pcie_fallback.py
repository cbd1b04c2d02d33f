"""The blocking nvmlDeviceGetPcieThroughput (~20 ms per call), for drivers without PCIe byte counters."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from exporter.sources.nvml.errors import POLICY, Fault, classify, error_name


@dataclass(frozen=True)
class PcieSlot:
    """Latest result of the fallback thread for one GPU."""

    tx: float | None = None  # bytes/s
    rx: float | None = None
    at: float = 0.0  # clock() when read; 0: never
    error: str | None = None
    unsupported: bool = False  # not asked again (errors.py: unsupported, denied, a bug)
    fault: Fault | None = None  # the error's class


class BlockingPcieThroughput:
    """One thread for all GPUs without byte counters, at a slow cadence, so the blocking calls never
    stall the sampler. Started by the first register()."""

    def __init__(self, nvml: Any, period_s: float = 1.0, clock: Callable[[], float] | None = None) -> None:
        self._nvml = nvml
        self._period = period_s
        self._clock = clock or time.monotonic
        self._handles: dict[int, Any] = {}
        self._slots: dict[int, PcieSlot] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, index: int, handle: Any) -> None:
        with self._lock:
            self._handles[index] = handle
            self._slots.setdefault(index, PcieSlot())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pcie-fallback", daemon=True)
                self._thread.start()

    def latest(self, index: int) -> PcieSlot | None:
        return self._slots.get(index)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            started = self._clock()
            with self._lock:
                handles = list(self._handles.items())
            for index, handle in handles:
                if self._slots[index].unsupported:
                    continue
                try:
                    tx = nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
                    rx = nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
                except Exception as exc:  # one GPU's failure must not stop the others
                    fault = classify(exc)
                    self._slots[index] = PcieSlot(error=error_name(exc), fault=fault,
                                                  unsupported=not POLICY[fault].ask_again)
                    continue
                # KB/s, with NVML's KB being 1024 bytes.
                self._slots[index] = PcieSlot(tx * 1024.0, rx * 1024.0, self._clock())
            self._stop.wait(max(0.0, self._period - (self._clock() - started)))
