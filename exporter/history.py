"""The last minutes of samples at full resolution, for the built-in live view (/api/v1/samples).

Prometheus sees one point per scrape; this ring keeps every tick: one row per tick (wall time, host
CPU, and per GPU utilisation, memory used ratio, PCIe tx/rx ratio). The sampler appends, HTTP threads
read; a lock guards the deque. Memory is bounded by window / interval rows, each a flat array of doubles
(8 bytes a value; NaN for "no value"), about 0.6 MB for 5 minutes of 8 GPUs at 200 ms.
"""
from __future__ import annotations

import json
import threading
import time
from array import array
from collections import deque
from typing import Iterable, Iterator

from exporter.snapshot import GpuState, Snapshot
from exporter.sources.nvml.specs import MEMORY_USED_RATIO, UTILIZATION

GPU_FIELDS = ("utilization", "memory_used_ratio", "pcie_tx_utilization", "pcie_rx_utilization")


_NAN = float("nan")


def _gpu_values(g: GpuState) -> tuple[float | None, ...]:
    r = g.reading
    if r is None or not g.up:
        return (None,) * len(GPU_FIELDS)
    link = g.identity.pcie_link_max_bytes_per_second
    return (r[UTILIZATION], r[MEMORY_USED_RATIO], r.pcie_utilization("tx", link), r.pcie_utilization("rx", link))


def _nullable(v: float) -> float | None:
    return None if v != v else v  # NaN marks "no value"


class SampleHistory:
    def __init__(self, window_s: float, interval_s: float, wall_clock=time.time) -> None:
        self.window_s = window_s
        self.interval_s = interval_s
        # Each row: (unix time, gpu ids, array [host cpu, gpu0 field0..3, gpu1 field0..3, ...]).
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

    def _window(self, window_s: float) -> tuple[list, dict, list[str]]:
        """(rows newer than the last one minus window_s, gpu -> (uuid, name), the GPU ids among them)."""
        with self._lock:
            rows = list(self._rows)
            names = dict(self._names)
        if rows:
            since = rows[-1][0] - window_s
            rows = [r for r in rows if r[0] > since]
        return rows, names, sorted({gpu for _, ids, _ in rows for gpu in ids}, key=int)

    @staticmethod
    def _column(rows: list, gpu: str, k: int) -> Iterator[float | None]:
        """One GPU field over the rows, None where the GPU was absent or had no value."""
        width = len(GPU_FIELDS)
        last_ids: tuple | None = None
        at: int | None = None
        for _, ids, values in rows:
            if ids is not last_ids:  # consecutive rows share one ids tuple while the GPU set holds
                last_ids = ids
                at = 1 + ids.index(gpu) * width if gpu in ids else None
            yield None if at is None else _nullable(values[at + k])

    @staticmethod
    def _below_40(utilization: Iterable[float | None]) -> float | None:
        util = [v for v in utilization if v is not None]
        return (sum(1 for v in util if v <= 0.4) / len(util)) if util else None

    def query(self, window_s: float) -> dict:
        """The documented JSON shape (docs/live-view.md): columns aligned on `t`."""
        rows, names, gpu_ids = self._window(window_s)
        gpus = []
        for gpu in gpu_ids:
            series = {f: list(self._column(rows, gpu, k)) for k, f in enumerate(GPU_FIELDS)}
            gpus.append({
                "gpu": gpu, "uuid": names.get(gpu, ("", ""))[0], "name": names.get(gpu, ("", ""))[1],
                **series, "below_40_fraction": self._below_40(series["utilization"]),
            })
        return {
            "interval_seconds": self.interval_s,
            "window_seconds": window_s,
            "t": [round(t, 3) for t, _, _ in rows],
            "host_cpu_utilization": [_nullable(values[0]) for _, _, values in rows],
            "gpus": gpus,
        }

    def query_json(self, window_s: float) -> bytes:
        """query() as compact JSON, written a column at a time: peak memory is about the size of the
        output, not a Python float and a list slot per value (tens of MB for 5 minutes of 64 GPUs)."""
        rows, names, gpu_ids = self._window(window_s)
        dump = json.dumps
        parts = [f'{{"interval_seconds":{dump(self.interval_s)},"window_seconds":{dump(window_s)},"t":'.encode(),
                 _json_list(round(t, 3) for t, _, _ in rows), b',"host_cpu_utilization":',
                 _json_list(_nullable(values[0]) for _, _, values in rows), b',"gpus":[']
        for n, gpu in enumerate(gpu_ids):
            uuid, name = names.get(gpu, ("", ""))
            parts.append(f'{"," if n else ""}{{"gpu":{dump(gpu)},"uuid":{dump(uuid)},"name":{dump(name)}'.encode())
            for k, f in enumerate(GPU_FIELDS):
                parts += (f',"{f}":'.encode(), _json_list(self._column(rows, gpu, k)))
            parts.append(f',"below_40_fraction":{dump(self._below_40(self._column(rows, gpu, 0)))}}}'.encode())
        parts.append(b"]}")
        return b"".join(parts)


def _json_list(values: Iterable[float | None]) -> bytes:
    return ("[" + ",".join("null" if v is None else repr(v) for v in values) + "]").encode()
