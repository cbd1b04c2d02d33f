"""The last minutes of samples at full resolution, for the built-in live view (/api/v1/samples).

Prometheus sees one point per scrape; this ring keeps every tick: one row per tick (wall time, host
CPU, and per GPU utilisation, memory used ratio, PCIe tx/rx ratio, and GPM's SM, tensor and DRAM activity
where the GPU has GPM, for readers that diagnose what bounds a GPU). The sampler appends, HTTP threads
read; a lock guards the deque. Memory is bounded by window / interval rows, each a flat array of doubles
(8 bytes a value; NaN for "no value"), about 1.1 MB for 5 minutes of 8 GPUs at 200 ms.
"""
from __future__ import annotations

import threading
import time
from array import array
from collections import deque

from exporter.snapshot import GpuState, Snapshot
from exporter.sources.nvml.specs import DRAM_ACTIVE, MEMORY_USED_RATIO, SM_ACTIVE, TENSOR_ACTIVE, UTILIZATION

# The last three are optional: null without GPM (pre-Hopper, the gpm collector off, the first tick).
GPU_FIELDS = ("utilization", "memory_used_ratio", "pcie_tx_utilization", "pcie_rx_utilization",
              "sm_active", "tensor_active", "dram_active")


_NAN = float("nan")


def _gpu_values(g: GpuState) -> tuple[float | None, ...]:
    r = g.reading
    if r is None or not g.up:
        return (None,) * len(GPU_FIELDS)
    link = g.identity.pcie_link_max_bytes_per_second
    return (r[UTILIZATION], r[MEMORY_USED_RATIO], r.pcie_utilization("tx", link), r.pcie_utilization("rx", link),
            r[SM_ACTIVE], r[TENSOR_ACTIVE], r[DRAM_ACTIVE])


def _nullable(v: float) -> float | None:
    return None if v != v else v  # NaN marks "no value"


class SampleHistory:
    def __init__(self, window_s: float, interval_s: float, wall_clock=time.time) -> None:
        self.window_s = window_s
        self.interval_s = interval_s
        # Each row: (unix time, gpu ids, array [host cpu, gpu0 fields, gpu1 fields, ...]).
        self._rows: deque[tuple[float, tuple[str, ...], array]] = deque(maxlen=max(1, int(round(window_s / interval_s))))
        self._ids: tuple[str, ...] = ()  # shared by consecutive rows while the GPU set is unchanged
        self._names: dict[str, tuple[str, str]] = {}  # gpu -> (uuid, name)
        self._lock = threading.Lock()
        self._wall = wall_clock

    def append(self, snap: Snapshot) -> None:
        ids = tuple(str(g.identity.index) for g in snap.gpus)
        if ids != self._ids:
            self._ids = ids
        values = [snap.host.cpu_utilization if snap.host else None]
        for g in snap.gpus:
            values.extend(_gpu_values(g))
        row = (self._wall(), self._ids, array("d", [_NAN if v is None else v for v in values]))
        with self._lock:
            self._rows.append(row)
            for g in snap.gpus:
                self._names[str(g.identity.index)] = (g.identity.uuid, g.identity.name)

    def query(self, window_s: float) -> dict:
        """The documented JSON shape (docs/live-view.md): columns aligned on `t`."""
        with self._lock:
            rows = list(self._rows)
            names = dict(self._names)
        if rows:
            since = rows[-1][0] - window_s
            rows = [r for r in rows if r[0] > since]
        gpu_ids = sorted({gpu for _, ids, _ in rows for gpu in ids}, key=int)
        series: dict[str, dict[str, list[float | None]]] = {gpu: {f: [] for f in GPU_FIELDS} for gpu in gpu_ids}
        width = len(GPU_FIELDS)
        for _, ids, values in rows:
            where = {gpu: 1 + i * width for i, gpu in enumerate(ids)}
            for gpu in gpu_ids:
                at = where.get(gpu)
                for k, f in enumerate(GPU_FIELDS):
                    series[gpu][f].append(None if at is None else _nullable(values[at + k]))
        gpus = []
        for gpu in gpu_ids:
            util = [v for v in series[gpu]["utilization"] if v is not None]
            gpus.append({
                "gpu": gpu, "uuid": names.get(gpu, ("", ""))[0], "name": names.get(gpu, ("", ""))[1],
                **series[gpu],
                "below_40_fraction": (sum(1 for v in util if v <= 0.4) / len(util)) if util else None,
            })
        return {
            "interval_seconds": self.interval_s,
            "window_seconds": window_s,
            "t": [round(t, 3) for t, _, _ in rows],
            "host_cpu_utilization": [_nullable(values[0]) for _, _, values in rows],
            "gpus": gpus,
        }
