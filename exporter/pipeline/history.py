"""The last minutes of samples at full resolution, for the built-in live view (/api/v1/samples) and the
diagnosis (/api/v1/diagnosis).

Prometheus sees one point per scrape; this ring keeps every tick: one row per tick (wall time, host
CPU, the container's CFS-throttled share, and per GPU the charted ratios of GPU_FIELDS — utilisation,
memory used, PCIe tx/rx, and GPM's SM, tensor and DRAM activity where the GPU has GPM — plus what the
diagnosis reads: clock event bits, health, XID count, and how many utilisation samples the driver took
since the previous tick and how many of them were at or below the starved line: the utilisation
histogram's delta, so the diagnosis counts every driver sample as /metrics' histogram does, not one
polled value per tick, which aliases with a periodic load).
The sampler appends, HTTP threads read; a lock guards the deque. Memory is bounded by window / interval
rows, each a flat array of doubles (8 bytes a value; NaN for "no value"), about 1.5 MB for 5 minutes of
8 GPUs at 200 ms.
"""
from __future__ import annotations

import threading
import time
from array import array
import json
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterable, Iterator

from exporter.pipeline.histogram import HistogramSnapshot
from exporter.pipeline.snapshot import GpuState, Snapshot
from exporter.sources.cgroup import CgroupReading
from exporter.sources.nvml.readings import CLOCK_EVENT_REASONS
from exporter.sources.nvml.specs import DRAM_ACTIVE, MEMORY_USED_RATIO, SM_ACTIVE, TENSOR_ACTIVE, UTILIZATION



@dataclass(frozen=True)
class Marks:
    """What the live view marks, as the diagnosis' checklist defines it (diagnosis/live.py builds it, so
    the pipeline imports nothing of the diagnosis): utilisation at or below `starved_at` counts into
    below_40_fraction; clock event reasons in `held_down` draw the clocks strip."""

    starved_at: float
    held_down: frozenset[str]

    @property
    def held_down_bits(self) -> int:
        return sum(bit for bit, name in CLOCK_EVENT_REASONS if name in self.held_down)

# Charted by the live view and served by /api/v1/samples; the GPM ratios are null without GPM (pre-Hopper,
# the gpm collector off, the first tick).
GPM_FIELDS = ("sm_active", "tensor_active", "dram_active")
GPU_FIELDS = ("utilization", "memory_used_ratio", "pcie_tx_utilization", "pcie_rx_utilization", *GPM_FIELDS)
# Kept for the diagnosis only. health: 0 up, 1 down (failing or stuck call), 2 lost. utilization_samples /
# utilization_starved: the tick's delta of gpu_sampled_utilization_ratio's _count and of its bucket at the
# starved line (Marks.starved_at); no value where that line is not a bucket bound or the count went back.
DIAGNOSIS_FIELDS = ("clock_event_reasons", "health", "xid_errors", "utilization_samples", "utilization_starved")
ALL_GPU_FIELDS = GPU_FIELDS + DIAGNOSIS_FIELDS
HOST_FIELDS = ("host_cpu_utilization", "cgroup_cpu_throttled_ratio")


_NAN = float("nan")
_CLOCK_EVENTS = ALL_GPU_FIELDS.index("clock_event_reasons")


def _gpu_values(g: GpuState, xids: int, samples: tuple[float | None, float | None]) -> tuple[float | None, ...]:
    r = g.reading
    health = 2.0 if r is not None and r.lost else 0.0 if g.up else 1.0
    if r is None or not g.up:
        return (None,) * len(GPU_FIELDS) + (None, health, xids, *samples)
    link = g.identity.pcie_link_max_bytes_per_second
    return (r[UTILIZATION], r[MEMORY_USED_RATIO], r.pcie_utilization("tx", link), r.pcie_utilization("rx", link),
            r[SM_ACTIVE], r[TENSOR_ACTIVE], r[DRAM_ACTIVE], r.clock_event_reasons, health, xids, *samples)


def _at_or_below(h: HistogramSnapshot, bound: float) -> int | None:
    """Observations of h at or below `bound` (one of its bucket bounds), as PromQL's bucket{le=bound}."""
    return h.cumulative[h.bounds.index(bound)] if bound in h.bounds else None


def _throttled_ratio(prev: CgroupReading | None, cur: CgroupReading | None) -> float | None:
    """Share of the CFS periods since the previous tick in which the cgroup was throttled."""
    if prev is None or cur is None:
        return None
    if (prev.cpu_periods is None or cur.cpu_periods is None or prev.cpu_throttled_periods is None
            or cur.cpu_throttled_periods is None):
        return None
    periods = cur.cpu_periods - prev.cpu_periods
    throttled = cur.cpu_throttled_periods - prev.cpu_throttled_periods
    return min(1.0, throttled / periods) if periods > 0 and throttled >= 0 else None


@dataclass(frozen=True)
class Columns:
    """A window of the ring as aligned columns (oldest first): what the diagnosis reads."""

    t: list[float]
    host: dict[str, list[float | None]]  # HOST_FIELDS
    gpus: dict[str, dict[str, list[float | None]]]  # gpu index -> ALL_GPU_FIELDS
    names: dict[str, tuple[str, str]]  # gpu index -> (uuid, name)
    mig: frozenset[str]  # GPUs in MIG mode (utilisation is not supported there)
    latest: Snapshot | None  # for what does not change per tick: /dev/shm, the cgroup's limits, NVML status


def _nullable(v: float) -> float | None:
    return None if v != v else v  # NaN marks "no value"


class SampleHistory:
    def __init__(self, window_s: float, interval_s: float, marks: Marks, wall_clock=time.time) -> None:
        self.window_s = window_s
        self.interval_s = interval_s
        self._starved_at = marks.starved_at
        self._held_down_bits = marks.held_down_bits
        # Each row: (unix time, gpu ids, array [HOST_FIELDS, gpu0 ALL_GPU_FIELDS, gpu1 ..., ...]).
        self._rows: deque[tuple[float, tuple[str, ...], array]] = deque(maxlen=max(1, int(round(window_s / interval_s))))
        self._ids: tuple[str, ...] = ()  # shared by consecutive rows while the GPU set is unchanged
        self._names: dict[str, tuple[str, str]] = {}  # gpu -> (uuid, name)
        self._mig: set[str] = set()
        self._latest: Snapshot | None = None
        self._prev_cgroup: CgroupReading | None = None
        self._prev_util: dict[int, tuple[int, int | None]] = {}  # gpu -> (count, at or below) at the last tick
        self._lock = threading.Lock()
        self._wall = wall_clock

    def append(self, snap: Snapshot) -> None:
        ids = tuple(str(g.identity.index) for g in snap.gpus)
        if ids != self._ids:
            self._ids = ids
        values = [snap.host.cpu_utilization if snap.host else None, _throttled_ratio(self._prev_cgroup, snap.cgroup)]
        self._prev_cgroup = snap.cgroup
        xids: Counter[int] = Counter()
        for (index, _), n in snap.xid_errors:
            xids[index] += n
        for g in snap.gpus:
            values.extend(_gpu_values(g, xids[g.identity.index], self._util_delta(g)))
        row = (self._wall(), self._ids, array("d", [_NAN if v is None else v for v in values]))
        with self._lock:
            self._rows.append(row)
            self._latest = snap
            for g in snap.gpus:
                gpu = str(g.identity.index)
                self._names[gpu] = (g.identity.uuid, g.identity.name)
                if g.reading is not None and g.up:
                    (self._mig.add if g.reading.mig is not None else self._mig.discard)(gpu)

    def _util_delta(self, g: GpuState) -> tuple[float | None, float | None]:
        """(driver utilisation samples since the last tick, those at or below the starved line), from the
        cumulative histogram the sampler feeds; its first tick counts from zero (the sampler's start)."""
        h = g.utilization_hist
        now = (h.count, _at_or_below(h, self._starved_at))
        count0, starved0 = self._prev_util.get(g.identity.index, (0, 0))
        self._prev_util[g.identity.index] = now
        samples = now[0] - count0
        if samples < 0:  # a new histogram (not the sampler's way today): this tick says nothing
            return None, None
        if now[1] is None or starved0 is None or not 0 <= now[1] - starved0 <= samples:
            return float(samples), None
        return float(samples), float(now[1] - starved0)

    def _window(self, window_s: float) -> tuple[list, dict, list[str], frozenset[str], Snapshot | None]:
        """(rows newer than the last one minus window_s, gpu -> (uuid, name), the GPU ids among them,
        the GPUs in MIG mode, the latest snapshot)."""
        with self._lock:
            rows = list(self._rows)
            names = dict(self._names)
            mig = frozenset(self._mig)
            latest = self._latest
        if rows:
            since = rows[-1][0] - window_s
            rows = [r for r in rows if r[0] > since]
        return rows, names, sorted({gpu for _, ids, _ in rows for gpu in ids}, key=int), mig, latest

    @staticmethod
    def _column(rows: list, gpu: str, k: int) -> Iterator[float | None]:
        """One GPU field (index k of ALL_GPU_FIELDS) over the rows, None where the GPU was absent or had no value."""
        width, first = len(ALL_GPU_FIELDS), len(HOST_FIELDS)
        last_ids: tuple | None = None
        at: int | None = None
        for _, ids, values in rows:
            if ids is not last_ids:  # consecutive rows share one ids tuple while the GPU set holds
                last_ids = ids
                at = first + ids.index(gpu) * width if gpu in ids else None
            yield None if at is None else _nullable(values[at + k])

    def _below_40(self, rows: list, gpu: str) -> float | None:
        """Share of the driver's utilisation samples at or below the starved line over the rows (the
        histogram's delta, as the diagnosis counts them); where no tick has that, of the polled values."""
        k = ALL_GPU_FIELDS.index("utilization_samples")
        pairs = [(n, b) for n, b in zip(self._column(rows, gpu, k), self._column(rows, gpu, k + 1))
                 if n is not None and b is not None]
        total = sum(n for n, _ in pairs)
        if total > 0:
            return sum(b for _, b in pairs) / total
        util = [v for v in self._column(rows, gpu, 0) if v is not None]
        return (sum(1 for v in util if v <= self._starved_at) / len(util)) if util else None

    def columns(self, window_s: float) -> Columns:
        """The rows newer than (newest - window_s) as columns: what the diagnosis reads."""
        rows, names, gpu_ids, mig, latest = self._window(window_s)
        gpus = {gpu: {f: list(self._column(rows, gpu, k)) for k, f in enumerate(ALL_GPU_FIELDS)} for gpu in gpu_ids}
        host = {f: [_nullable(values[k]) for _, _, values in rows] for k, f in enumerate(HOST_FIELDS)}
        return Columns([t for t, _, _ in rows], host, gpus, names, mig, latest)

    def _held_down(self, rows: list, gpu: str) -> list[float | None]:
        """Per tick: 1.0 while a heat or power clock event reason held the clocks down, else 0.0; None: no value."""
        bits = self._held_down_bits
        return [None if v is None else float(int(v) & bits != 0) for v in self._column(rows, gpu, _CLOCK_EVENTS)]

    @staticmethod
    def _share(flags: list[float | None]) -> float | None:
        vals = [v for v in flags if v is not None]
        return sum(vals) / len(vals) if vals else None

    @staticmethod
    def _mig_instances(latest: Snapshot | None, gpu: str) -> list[dict]:
        """The MIG instances of a GPU at the newest tick: memory per instance (the live view's bars)."""
        for g in latest.gpus if latest else ():
            if str(g.identity.index) == gpu and g.reading is not None and g.reading.mig:
                return [{"uuid": m.uuid, "gpu_instance_id": m.gpu_instance_id,
                         "memory_used_bytes": m.memory_used_bytes, "memory_total_bytes": m.memory_total_bytes}
                        for m in g.reading.mig]
        return []

    @staticmethod
    def _simulated(latest: Snapshot | None) -> dict[str, bool]:
        """What the page must call simulated: GPUs from --fake-gpus, the host CPU from a --fake-scenario."""
        return {"gpus": latest is not None and latest.nvml.mode == "fake",
                "host_cpu": latest is not None and latest.host is not None and latest.host.simulated}

    def query(self, window_s: float, requested_s: float | None = None) -> dict:
        """The documented JSON shape (docs/live-view.md): columns aligned on `t`."""
        rows, names, gpu_ids, mig, latest = self._window(window_s)
        gpus = []
        for gpu in gpu_ids:
            series = {f: list(self._column(rows, gpu, k)) for k, f in enumerate(GPU_FIELDS)}
            held = self._held_down(rows, gpu)
            gpus.append({
                "gpu": gpu, "uuid": names.get(gpu, ("", ""))[0], "name": names.get(gpu, ("", ""))[1],
                "mig": gpu in mig, **series, "below_40_fraction": self._below_40(rows, gpu),
                "clocks_held_down": held, "clocks_held_down_fraction": self._share(held),
                "mig_instances": self._mig_instances(latest, gpu),
            })
        return {
            "interval_seconds": self.interval_s,
            "window_seconds": window_s,
            "requested_seconds": window_s if requested_s is None else requested_s,
            "history_seconds": self.window_s,
            "simulated": self._simulated(latest),
            "t": [round(t, 3) for t, _, _ in rows],
            "host_cpu_utilization": [_nullable(values[0]) for _, _, values in rows],
            "gpus": gpus,
        }

    def query_json(self, window_s: float, requested_s: float | None = None) -> bytes:
        """query() as compact JSON, written a column at a time: peak memory is about the size of the
        output, not a Python float and a list slot per value (tens of MB for 5 minutes of 64 GPUs)."""
        rows, names, gpu_ids, mig, latest = self._window(window_s)
        dump = json.dumps
        asked = window_s if requested_s is None else requested_s
        parts = [f'{{"interval_seconds":{dump(self.interval_s)},"window_seconds":{dump(window_s)},'
                 f'"requested_seconds":{dump(asked)},"history_seconds":{dump(self.window_s)},'
                 f'"simulated":{dump(self._simulated(latest))},"t":'.encode(),
                 _json_list(round(t, 3) for t, _, _ in rows), b',"host_cpu_utilization":',
                 _json_list(_nullable(values[0]) for _, _, values in rows), b',"gpus":[']
        for n, gpu in enumerate(gpu_ids):
            uuid, name = names.get(gpu, ("", ""))
            parts.append(f'{"," if n else ""}{{"gpu":{dump(gpu)},"uuid":{dump(uuid)},"name":{dump(name)},'
                         f'"mig":{dump(gpu in mig)}'.encode())
            for k, f in enumerate(GPU_FIELDS):
                parts += (f',"{f}":'.encode(), _json_list(self._column(rows, gpu, k)))
            held = self._held_down(rows, gpu)
            parts += (f',"below_40_fraction":{dump(self._below_40(rows, gpu))},"clocks_held_down":'
                      .encode(), _json_list(held),
                      f',"clocks_held_down_fraction":{dump(self._share(held))},'
                      f'"mig_instances":{dump(self._mig_instances(latest, gpu))}}}'.encode())
        parts.append(b"]}")
        return b"".join(parts)


def _json_list(values: Iterable[float | None]) -> bytes:
    return ("[" + ",".join("null" if v is None else repr(v) for v in values) + "]").encode()
