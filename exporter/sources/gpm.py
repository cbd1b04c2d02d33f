"""GPM (GPU Performance Monitoring, Hopper and newer) activity ratios and NVLink throughput of one GPU.

Reads only, into plain dataclasses. One `GpmReader` per GPU, created and used by the one thread that reads
that GPU: the GPM sample buffers are never shared between threads (a race on shared GPM buffers was
reported to crash a node's driver). `GpmReaders` holds one read thread's readers: a new read thread starts
its own (fresh buffers), and a thread frees its own on its way out, after its last call has returned.

Per tick: one nvmlGpmSampleGet (plus one nvmlGpmMigSampleGet per GPU instance under MIG) and one
nvmlGpmMetricsGet over the previous and the current sample, only when they are at least 100 ms apart (the
driver's refresh); a tick closer than that reports the last pair that was. Unsupported (GPM or one metric):
None, never 0, logged once. NVLink comes from GPM's totals where it has them, else from the per-link
cumulative field counters (KiB) as delta/delta-timestamp, one nvmlDeviceGetFieldValues call per tick.
Errors are classified and handled as every NVML call's (sources/nvml/errors.py): unsupported and denied
turn the feature off (GPM, GPM per instance, NVLink) for good, and the GPU stays up.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from exporter.sources.nvml.errors import Fault, NvmlCalls, error_name
from exporter.sources.pcie import CounterReading, counter_rate

log = logging.getLogger("exporter.gpm")

# GpmActivity field -> NVML_GPM_METRIC_* id; each a percentage 0-100 over the sample pair.
RATIO_METRICS = {
    "graphics_engine_active": 1,  # GRAPHICS_UTIL
    "sm_active": 2,  # SM_UTIL, ~ DCGM PROF_SM_ACTIVE
    "sm_occupancy": 3,  # SM_OCCUPANCY
    "tensor_active": 5,  # ANY_TENSOR_UTIL, ~ DCGM PROF_PIPE_TENSOR_ACTIVE
    "dram_active": 10,  # DRAM_BW_UTIL, ~ DCGM PROF_DRAM_ACTIVE
}
GPM_NVLINK_RX, GPM_NVLINK_TX = 60, 61  # NVLINK_TOTAL_RX/TX_PER_SEC, MiB/s over all links
FI_NVLINK_LINK_COUNT = 91
FI_NVLINK_TX, FI_NVLINK_RX = 138, 139  # NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX: KiB, scopeId = link
MIN_SAMPLE_GAP_S = 0.1
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpmActivity:
    """0-1 ratios over the last sample pair; None where the metric is not supported."""

    sm_active: float | None = None
    sm_occupancy: float | None = None
    tensor_active: float | None = None
    dram_active: float | None = None
    graphics_engine_active: float | None = None


@dataclass(frozen=True, slots=True)
class GpmReading:
    activity: GpmActivity | None = None  # None: GPM unsupported, or no sample pair yet
    mig: tuple[tuple[int, GpmActivity], ...] = ()  # (gpu_instance_id, activity) under MIG
    nvlink_tx_bytes_per_second: float | None = None  # summed over links; None without NVLink
    nvlink_rx_bytes_per_second: float | None = None
    nvlink_source: str | None = None  # "gpm" or "fields"
    nvlink_links: tuple[tuple[int, float | None, float | None], ...] = ()  # (link, tx, rx) with per_link
    errors: tuple[str, ...] = ()  # calls that failed this tick (not unsupported ones)
    lost: bool = False  # GpuIsLost, or the driver went away: call rebind() with a fresh handle
    recorded: tuple[str, ...] = ()  # calls recorded once and not asked again (NoPermission, a bug)


def _integer(entry: Any) -> int:
    """An nvmlFieldValue_t's value as its valueType says (1 uint, 2 ulong, 3 ulonglong, 4 slonglong, 5 sint,
    6 ushort)."""
    kind = {1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}.get(entry.valueType, "ullVal")
    return int(getattr(entry.value, kind))


class _Unsupported(Exception):
    pass


class _Lost(Exception):
    pass


class _Failed(Exception):
    """A call failed this tick (neither unsupported nor lost); it is in the reading's errors."""


class _SamplePair:
    """Two GPM sample buffers for a GPU or GPU instance, allocated once. `anchor` holds the older sample;
    each take() writes the other buffer and, once it is MIN_SAMPLE_GAP_S newer, hands out the pair and
    makes it the anchor."""

    def __init__(self, nvml: Any, buffers: list[Any]) -> None:
        self._nvml = nvml
        self.buffers = buffers
        self.anchor = 0
        self.anchor_at: float | None = None

    def take(self, get: Callable[[Any], Any], now: float) -> tuple[Any, Any] | None:
        cur = 1 - self.anchor
        get(self.buffers[cur])
        if self.anchor_at is not None and now - self.anchor_at < MIN_SAMPLE_GAP_S:
            return None  # too close: the next tick overwrites this buffer
        pair = (self.buffers[self.anchor], self.buffers[cur]) if self.anchor_at is not None else None
        self.anchor, self.anchor_at = cur, now
        return pair

    def free(self) -> None:
        for sample in self.buffers:
            try:
                self._nvml.nvmlGpmSampleFree(sample)
            except Exception:  # freeing on shutdown or after a lost GPU: nothing left to do
                pass
        self.buffers = []


class GpmReader:
    """GPM activity and NVLink throughput of one GPU. Not thread-safe: one reading thread owns it."""

    def __init__(self, nvml: Any, handle: Any, index: int, clock: Callable[[], float] = time.monotonic, *,
                 calls: NvmlCalls | None = None, activity: bool = True, nvlink: bool = True,
                 per_link: bool = False) -> None:
        """`activity`, `nvlink`, `per_link`: what to read (a collector switched off makes no NVML call).
        Without `activity`, NVLink comes from the field counters; `per_link` reads them even with GPM.
        `calls`: the GPU's record of its calls' answers (the GpuReader's), so a call recorded as not to
        be asked again stays so for a reader that replaces this one."""
        self.nvml = nvml
        self.index = index
        self._clock = clock
        self._handle = handle
        self._logged: set[str] = set()
        self._gpm: bool | None = None if activity else False  # None: not probed yet
        self._nvlink = nvlink
        self._per_link = per_link
        self._mig_unsupported = False
        self._pairs: dict[int | None, _SamplePair] = {}  # None: the whole GPU, else a GPU instance id
        self._last: dict[int | None, tuple[GpmActivity, float | None, float | None]] = {}
        self._metrics_ids = [*RATIO_METRICS.values(), GPM_NVLINK_RX, GPM_NVLINK_TX]
        self._metrics: Any = None  # the ~19 KB c_nvmlGpmMetricsGet_t, allocated once when GPM is supported
        self._links: int | None = None  # NVLink links; 0: none
        self._link_fields: list[tuple[int, int]] = []
        self._link_prev: dict[tuple[int, int], CounterReading] = {}
        self._calls = calls if calls is not None else NvmlCalls(index)
        self._errors: list[str] = []
        self._recorded: list[str] = []
        self.current_call: str | None = None  # the NVML function being called, for "stuck in <call>"

    # ---- public ------------------------------------------------------------------------------------
    @property
    def handle(self) -> Any:
        return self._handle

    def read(self, gpu_instance_ids: Iterable[int] = ()) -> GpmReading:
        """One tick. `gpu_instance_ids`: the GPU's MIG instances (empty when MIG is off)."""
        self._errors, self._recorded = [], []
        gpu_instance_ids = tuple(gpu_instance_ids)
        now = self._clock()
        try:
            if self._links is None:
                self._links = self._link_count() if self._nvlink else 0
            activity, gpm_tx, gpm_rx = self._read_gpm(None, now)
            mig = []
            for gi in gpu_instance_ids:
                got = self._read_gpm(gi, now)[0]
                if got is not None:
                    mig.append((gi, got))
            for gone in set(self._pairs) - {None, *gpu_instance_ids}:
                self._pairs.pop(gone).free()
                self._last.pop(gone, None)
            tx = rx = None
            source = None
            links: tuple[tuple[int, float | None, float | None], ...] = ()
            if self._links:
                from_gpm = gpm_tx is not None and gpm_rx is not None
                if not from_gpm or self._per_link:
                    tx, rx, links = self._read_link_counters()
                    source = "fields" if tx is not None or rx is not None else None
                if from_gpm:
                    tx, rx, source = gpm_tx, gpm_rx, "gpm"
        except _Lost:
            self._forget()
            return GpmReading(errors=tuple(self._errors), lost=True, recorded=tuple(self._recorded))
        return GpmReading(activity, tuple(mig), tx, rx, source, links if self._per_link else (),
                          errors=tuple(self._errors), recorded=tuple(self._recorded))

    def rebind(self, handle: Any) -> None:
        """A fresh handle after the GPU was lost and reopened; the next pair starts from scratch."""
        self._handle = handle
        self._forget()
        self._links = None

    def close(self) -> None:
        for pair in self._pairs.values():
            pair.free()
        self._pairs.clear()

    # ---- calling NVML --------------------------------------------------------------------------------
    def _call(self, what: str, name: str, *args: Any) -> Any:
        """nvml.<name>(*args), its errors handled by errors.py's policy: _Unsupported for a call not to be
        asked again (unsupported, denied, a bug), _Lost for a lost GPU or a driver gone, None (error
        recorded) for a transient failure."""
        key = f"{what}:{name}"  # apart from the scalar reads' keys: one GPU's calls share one record
        if key in self._calls.skip:
            raise _Unsupported(name)
        fn = getattr(self.nvml, name, None)
        if fn is None:
            self._calls.skip.add(key)
            self._log_once(what, f"{name} missing from this pynvml")
            raise _Unsupported(name)
        self.current_call = name
        try:
            return fn(*args)
        except Exception as exc:
            fault = self._calls.failed(key, name, exc, self._errors, self._recorded)
            if fault is Fault.UNSUPPORTED:
                self._log_once(what, f"{name}: {error_name(exc)}")
            if fault in (Fault.LOST, Fault.DRIVER_GONE):
                raise _Lost(fault.value) from exc
            if fault in (Fault.UNSUPPORTED, Fault.DENIED, Fault.BUG):
                raise _Unsupported(name) from exc
            return None
        finally:
            self.current_call = None

    def _log_once(self, what: str, why: str) -> None:
        if what not in self._logged:
            self._logged.add(what)
            log.info("GPU %d: %s not available (%s); omitted", self.index, what, why)

    def _forget(self) -> None:
        for pair in self._pairs.values():
            pair.anchor_at = None
        self._last.clear()
        self._link_prev.clear()

    # ---- GPM ---------------------------------------------------------------------------------------
    def _supported(self) -> bool:
        if self._gpm is None:
            try:
                support = self._call("GPM", "nvmlGpmQueryDeviceSupport", self._handle)
            except _Unsupported:
                support = None
                self._gpm = False
            if support is not None:
                self._gpm = bool(support.isSupportedDevice)
                if not self._gpm:
                    self._log_once("GPM", "nvmlGpmQueryDeviceSupport: not a supported device")
        return bool(self._gpm)

    def _read_gpm(self, gi: int | None, now: float) -> tuple[GpmActivity | None, float | None, float | None]:
        """(activity, NVLink tx, NVLink rx bytes/s) of the GPU (gi None) or one GPU instance."""
        if not self._supported():
            return None, None, None
        if gi is not None and self._mig_unsupported:
            return None, None, None
        try:
            pair = self._pairs.get(gi)
            if pair is None:
                pair = self._pairs[gi] = _SamplePair(self.nvml, [self._checked("nvmlGpmSampleAlloc"),
                                                                 self._checked("nvmlGpmSampleAlloc")])
            if gi is None:
                taken = pair.take(lambda s: self._checked("nvmlGpmSampleGet", self._handle, s), now)
            else:
                taken = pair.take(lambda s: self._checked("nvmlGpmMigSampleGet", self._handle, gi, s), now)
            if taken is not None:
                self._last[gi] = self._metrics_over(*taken)
        except _Unsupported:
            if gi is not None:  # GPM per GPU instance only; the whole GPU's stays
                self._mig_unsupported = True
                self._pairs.pop(gi).free()
                return None, None, None
            self._gpm = False
            self.close()
            self._last.clear()
            return None, None, None
        except _Failed:
            self._last.pop(gi, None)
            if gi in self._pairs:
                self._pairs[gi].anchor_at = None  # the next good sample starts a new pair
        return self._last.get(gi, (None, None, None))

    def _checked(self, name: str, *args: Any) -> Any:
        got = self._call("GPM", name, *args)
        if got is None:
            raise _Failed(name)
        return got

    def _metrics_over(self, sample1: Any, sample2: Any) -> tuple[GpmActivity, float | None, float | None]:
        nvml = self.nvml
        m = self._metrics
        if m is None:
            m = self._metrics = nvml.c_nvmlGpmMetricsGet_t()
            for i, metric_id in enumerate(self._metrics_ids):
                m.metrics[i].metricId = metric_id
        m.version = nvml.NVML_GPM_METRICS_GET_VERSION  # pynvml leaves setting the version to the caller
        m.numMetrics = len(self._metrics_ids)
        m.sample1, m.sample2 = sample1, sample2
        self._checked("nvmlGpmMetricsGet", m)
        values: dict[int, float | None] = {}
        metrics = m.metrics  # once: every attribute of a pynvml struct goes through Python code
        for i, metric_id in enumerate(self._metrics_ids):
            got = metrics[i]
            value = float(got.value)
            if got.nvmlReturn != 0 or not math.isfinite(value) or value < 0:
                values[metric_id] = None
                self._log_once(f"GPM metric {metric_id}", f"nvmlReturn {got.nvmlReturn}, value {value}")
            else:
                values[metric_id] = value
        activity = GpmActivity(**{field: _ratio(values[mid]) for field, mid in RATIO_METRICS.items()})
        tx, rx = values[GPM_NVLINK_TX], values[GPM_NVLINK_RX]
        return activity, None if tx is None else tx * _MIB, None if rx is None else rx * _MIB

    # ---- NVLink field counters -----------------------------------------------------------------------
    def _link_count(self) -> int | None:
        """Links NVML_FI_DEV_NVLINK_LINK_COUNT reports; 0 without NVLink, None to ask again next tick."""
        try:
            got = self._call("NVLink", "nvmlDeviceGetFieldValues", self._handle, [FI_NVLINK_LINK_COUNT])
        except _Unsupported:
            return 0
        if got is None:
            return None
        entry = got[0]
        links = _integer(entry) if entry.nvmlReturn == 0 else 0
        if not links:
            self._log_once("NVLink", "no links")
        self._link_fields = [(f, link) for link in range(links) for f in (FI_NVLINK_TX, FI_NVLINK_RX)]
        return links

    def _read_link_counters(self) -> tuple[float | None, float | None, tuple[tuple[int, float | None, float | None], ...]]:
        """Sum over links of Δcounter/Δtimestamp per direction (None for a direction if any link failed),
        and (link, tx, rx) per link."""
        try:
            got = self._call("NVLink counters", "nvmlDeviceGetFieldValues", self._handle, self._link_fields)
        except _Unsupported:
            self._links = 0
            return None, None, ()
        if got is None:
            return None, None, ()
        rates: dict[tuple[int, int], float | None] = {}
        for key, entry in zip(self._link_fields, got):
            if entry.nvmlReturn != 0:
                self._link_prev.pop(key, None)
                rates[key] = None
                continue
            cur = CounterReading(_integer(entry), int(entry.timestamp))
            rate = counter_rate(self._link_prev.get(key), cur, 2**32 if entry.valueType == 1 else 2**64, None)
            self._link_prev[key] = cur
            rates[key] = None if rate is None else rate * 1024.0  # KiB
        links = range(self._links or 0)
        per_link = tuple((link, rates.get((FI_NVLINK_TX, link)), rates.get((FI_NVLINK_RX, link))) for link in links)
        return _sum(r[1] for r in per_link), _sum(r[2] for r in per_link), per_link


class GpmReaders:
    """One read thread's GpmReader per GPU. Only that thread calls get() and close(): a stuck thread's
    buffers are never freed or reused by another while its call may still run."""

    def __init__(self) -> None:
        self._readers: dict[int, GpmReader] = {}

    def get(self, index: int, handle: Any, new: Callable[[Any], GpmReader]) -> GpmReader:
        """GPU `index`'s reader (`new(handle)` the first time), rebound when the GPU was reopened."""
        reader = self._readers.get(index)
        if reader is None:
            reader = self._readers[index] = new(handle)
        elif reader.handle is not handle:
            reader.rebind(handle)
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _sum(values: Iterable[float | None]) -> float | None:
    total = 0.0
    for v in values:
        if v is None:
            return None
        total += v
    return total


def _ratio(percent: float | None) -> float | None:
    """GPM answers percentages; the exporter's ratios are 0-1 (capped: a pair can read a hair over 100)."""
    return None if percent is None else min(percent / 100.0, 1.0)
