"""Turns the latest Snapshot into Prometheus metric families. Never touches NVML or procfs.

Series of a GPU that vanished simply stop being yielded; nothing is kept in global gauges.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, Sequence

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.pipeline import collectors as registry
from exporter.pipeline.histogram import HistogramSnapshot
from exporter.pipeline.pods import pod_info_family, stamp
from exporter.pipeline.snapshot import GpuState, Snapshot
from exporter.sources.nvml.readings import CLOCK_EVENT_REASONS, PCIE_DIRECTIONS, GpuProcess, GpuReading
from exporter.sources.nvml.specs import GPU_SCALARS, GpuScalar
from exporter.sources.processes import ProcessIdentity

log = logging.getLogger("exporter.pipeline.collector")

GPU_LABELS = ["gpu", "uuid"]


PROCESS_LABELS = ["pid", "comm", "container_id", "pod_uid"]


def _labels(g: GpuState) -> list[str]:
    return [str(g.identity.index), g.identity.uuid]


def _live(snap: Snapshot) -> list[tuple[GpuState, GpuReading]]:
    """GPUs with a fresh, successful read: a lost or stuck GPU's old values would lie, so only these
    export values."""
    return [(g, g.reading) for g in snap.gpus if g.up and g.reading is not None]


def _family(kind: str, name: str, doc: str, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


def _scalar_families(specs: tuple[GpuScalar, ...],
                     live: list[tuple[GpuState, GpuReading]]) -> Iterator[Metric]:
    """One family per spec name (rows sharing a name, like the clocks, are adjacent and differ by labels).
    A spec's labelled series (MIG devices, links) join its family with their extra labels."""
    fam: CounterMetricFamily | GaugeMetricFamily | None = None
    for spec in specs:
        if fam is None or fam.name != spec.name:
            if fam is not None:
                yield fam
            fam = _family(spec.type, spec.name, spec.help, GPU_LABELS + [k for k, _ in spec.labels])
        extra = [v for _, v in spec.labels]
        for g, r in live:
            value = r[spec]
            if value is not None:
                fam.add_metric(_labels(g) + extra, value)
            for more, value in r.labelled.get(spec, ()):  # per MIG device, per link: more labels
                fam.add_sample(spec.name, dict(zip(GPU_LABELS, _labels(g))) | dict(spec.labels) | dict(more), value)
    if fam is not None:
        yield fam


def _buckets(h: HistogramSnapshot) -> Sequence[tuple[str, float]]:
    cumulative = h.cumulative
    return [(repr(b), c) for b, c in zip(h.bounds, cumulative)] + [("+Inf", cumulative[-1])]


def _add_processes(memory: GaugeMetricFamily, sm: GaugeMetricFamily | None, base: list[str],
                   processes: tuple[GpuProcess, ...] | None, who: dict[int, ProcessIdentity]) -> None:
    """One row per process: base labels, then pid, comm, container_id, pod_uid."""
    for p in processes or ():
        ident = who.get(p.pid) or ProcessIdentity()
        values = base + [str(p.pid), ident.comm, ident.container_id, ident.pod_uid]
        if p.used_memory_bytes is not None:
            memory.add_metric(values, p.used_memory_bytes)
        if sm is not None and p.sm_utilization is not None:
            sm.add_metric(values, p.sm_utilization)


_RENDERERS: dict[str, list[str]] = {}  # collector group -> method names, in definition (= exposition) order


def renders(group: str) -> Callable[[_Render], _Render]:
    """Registers a SnapshotCollector method as (part of) the rendering of a collector group of collectors.py."""
    def register(method: _Render) -> _Render:
        _RENDERERS.setdefault(group, []).append(method.__name__)
        return method
    return register


_Render = Callable[["SnapshotCollector", Snapshot], Iterator[Metric]]


class SnapshotCollector(Collector):
    """client_python's collect(): the families of every enabled collector group (collectors.py), each
    rendered by its @renders methods from one snapshot read once per scrape; then exporter_collector_*,
    how each group's rendering went. `specs` are the scalar GPU rows to render; rows of a collector not in
    `collectors` are skipped. With pod-resources in the snapshot, per-GPU series of a device one container
    holds get namespace/pod/container (pods.py): per-process series always, the others with `pod_labels`."""

    def __init__(self, snapshot: Callable[[], Snapshot], node_name: str = "",
                 specs: tuple[GpuScalar, ...] = GPU_SCALARS,
                 collectors: frozenset[str] = registry.DEFAULT, pod_labels: bool = False) -> None:
        self._snapshot = snapshot
        self._node = node_name  # an empty label value is the same as no label to Prometheus
        self._specs = registry.rows_enabled(collectors, specs)
        self._pod_labels = pod_labels
        self._collectors = collectors
        # Each enabled group (collectors.py order): its spec rows (sources/nvml/specs.py names the collector of each
        # row), then its @renders methods. A collector of spec rows only (gpm, nvlink) needs no method.
        self._groups = tuple(
            (name, tuple(r for r in self._specs if r.collector == name),
             tuple(getattr(self, m) for m in _RENDERERS.get(name, ())))
            for name in registry.GROUPS if registry.enabled(collectors, name))
        self._failing: set[str] = set()  # groups whose last render raised: one log line per transition

    def describe(self) -> list[Metric]:
        return []  # registration must not trigger a collect

    def collect(self, only: frozenset[str] | None = None) -> Iterator[Metric]:
        """Every enabled group's families, or those of the groups in `only` (collect[]; collectors.select)."""
        snap = self._snapshot()  # one snapshot for the whole scrape, pod labels included
        owners = snap.pods.by_device() if snap.pods is not None and "pod-info" in self._collectors else {}
        success = GaugeMetricFamily("exporter_collector_success",
                                    "1 when the collector's families rendered in this scrape, 0 when it failed.",
                                    labels=["collector"])
        duration = GaugeMetricFamily("exporter_collector_duration_seconds",
                                     "Time this scrape took to render the collector's families.",
                                     labels=["collector"])
        live = _live(snap)
        for name, rows, methods in self._groups:
            if only is not None and name not in only:
                continue
            started = time.perf_counter()
            try:
                families = [f for f in _scalar_families(rows, live) if f.samples]
                families += [f for method in methods for f in method(snap) if f.samples]
            except Exception:  # a bug in one group costs its own families, not the scrape
                if name not in self._failing:
                    log.exception("collector %s failed to render; its families are left out", name)
                self._failing.add(name)
                families, ok = [], 0
            else:
                if name in self._failing:
                    log.info("collector %s renders again", name)
                self._failing.discard(name)
                ok = 1
            success.add_metric([name], ok)
            duration.add_metric([name], time.perf_counter() - started)
            stamped = bool(owners) and name != "pod-info"  # gpu_pod_info carries the pod labels already
            for family in families:  # as client_golang: no HELP/TYPE bytes for a family with nothing in it
                yield stamp(family, owners, self._pod_labels) if stamped and family.name.startswith("gpu_") else family
        yield success
        yield duration

    # ---- Kubernetes --------------------------------------------------------------------------------
    @renders("pod-info")
    def _pod_families(self, snap: Snapshot) -> Iterator[Metric]:
        pods = snap.pods
        if pods is None:  # off, or no socket: the exposition is what it is without Kubernetes
            return
        yield GaugeMetricFamily("exporter_pod_resources_up",
                                "1 when the last List of the kubelet pod-resources API succeeded.", value=int(pods.up))
        yield GaugeMetricFamily("exporter_pod_resources_left_out",
                                "Container-device entries of the last List left out of gpu_pod_info by the "
                                "exporter's bounds (name length, devices, containers per device, series).",
                                value=pods.cut)
        yield pod_info_family(snap, pods.by_device())

    # ---- the exporter itself -----------------------------------------------------------------------
    @renders("exporter")
    def _exporter_families(self, snap: Snapshot) -> Iterator[Metric]:
        info = GaugeMetricFamily("exporter_build_info", "Exporter version and NVML backend (real, fake, absent).",
                                 labels=["version", "nvml"])
        info.add_metric([__version__, snap.nvml.mode], 1)
        yield info
        yield GaugeMetricFamily("exporter_nvml_up", "1 when NVML is initialised.", value=int(snap.nvml.up))
        yield GaugeMetricFamily("exporter_sample_interval_seconds", "Configured sampling interval.",
                                value=snap.interval)
        stats = snap.stats
        if stats is None:
            return
        yield CounterMetricFamily("exporter_samples", "Sampler ticks completed.", value=stats.ticks)
        yield CounterMetricFamily("exporter_sample_overruns",
                                  "Scheduled ticks skipped because a tick ran past the next one.",
                                  value=stats.overruns)
        errors = CounterMetricFamily("exporter_errors", "Failed source reads, by source and call.",
                                     labels=["source", "call"])
        for (source, call), n in stats.errors:
            errors.add_metric([source, call], n)
        yield errors
        dur = HistogramMetricFamily("exporter_sample_duration_seconds",
                                    "Wall time of each tick's reads, by source (all = whole tick).",
                                    labels=["source"])
        for source, h in stats.durations:
            dur.add_metric([source], _buckets(h), h.sum)
        yield dur
        late = HistogramMetricFamily("exporter_sample_lateness_seconds",
                                     "How late each tick started against its schedule.")
        late.add_metric([], _buckets(stats.lateness), stats.lateness.sum)
        yield late

    # ---- GPUs --------------------------------------------------------------------------------------
    @renders("gpu")
    def _gpu_families(self, snap: Snapshot) -> Iterator[Metric]:
        gpus = snap.gpus
        info = GaugeMetricFamily("gpu_info", "GPU identity; always 1.",
                                 labels=GPU_LABELS + ["name", "pci_bus_id", "driver_version", "node"])
        up = GaugeMetricFamily("gpu_up", "1 when the GPU's last sample succeeded; 0 when lost, failing or stuck.",
                               labels=GPU_LABELS)
        for g in gpus:
            info.add_metric(_labels(g) + [g.identity.name, g.identity.pci_bus_id, snap.nvml.driver_version or "",
                                          self._node], 1)
            up.add_metric(_labels(g), int(g.up))
        yield info
        yield up

        yield from self._pcie_families(_live(snap))
        yield from self._xid_family(snap)

        util = HistogramMetricFamily(
            "gpu_sampled_utilization_ratio",
            "Every driver utilisation sample (nvmlDeviceGetSamples); le=0.4 / count = share of time <= 40 %.",
            labels=GPU_LABELS)
        # A histogram appears with its first sample: a GPU without utilisation (MIG mode) exports none.
        for g in gpus:
            if g.utilization_hist.count:
                util.add_metric(_labels(g), _buckets(g.utilization_hist), g.utilization_hist.sum)
        yield util

    @renders("pcie-histograms")
    def _pcie_histogram_family(self, snap: Snapshot) -> Iterator[Metric]:
        pcie = HistogramMetricFamily("gpu_sampled_pcie_utilization_ratio", "Every sampled gpu_pcie_utilization_ratio; "
                                     "le=0.9 / count = share of time <= 90 %.", labels=GPU_LABELS + ["direction"])
        for g in snap.gpus:
            for d, h in g.pcie_utilization_hist:
                if h.count:
                    pcie.add_metric(_labels(g) + [d], _buckets(h), h.sum)
        yield pcie

    @renders("pcie-link")
    def _pcie_link_family(self, snap: Snapshot) -> Iterator[Metric]:
        link = GaugeMetricFamily(
            "gpu_pcie_link_max_bytes_per_second",
            "Usable bytes/s per direction at the maximum link generation x width.", labels=GPU_LABELS + ["direction"])
        for g, _ in _live(snap):
            link_max = g.identity.pcie_link_max_bytes_per_second
            if link_max:
                for d in PCIE_DIRECTIONS:
                    link.add_metric(_labels(g) + [d], link_max)
        yield link

    def _pcie_families(self, live: list[tuple[GpuState, GpuReading]]) -> Iterator[Metric]:
        labels = GPU_LABELS + ["direction"]
        throughput = GaugeMetricFamily(
            "gpu_pcie_throughput_bytes_per_second",
            "PCIe payload bytes/s between the last two samples (NVML_FI_DEV_PCIE_COUNT_*_BYTES deltas).",
            labels=labels)
        ratio = GaugeMetricFamily("gpu_pcie_utilization_ratio",
                                  "gpu_pcie_throughput_bytes_per_second / the link's maximum bytes/s.",
                                  labels=labels)
        for g, r in live:
            link_max = g.identity.pcie_link_max_bytes_per_second
            for d in PCIE_DIRECTIONS:
                bps = r.pcie_bytes_per_second(d)
                if bps is None:
                    continue
                throughput.add_metric(_labels(g) + [d], bps)
                share = r.pcie_utilization(d, link_max)
                if share is not None:
                    ratio.add_metric(_labels(g) + [d], share)
        yield throughput
        yield ratio

    @renders("clock-event-state")
    def _clock_event_state_family(self, snap: Snapshot) -> Iterator[Metric]:
        active = GaugeMetricFamily("gpu_clock_event_active",
                                   "1 while the clock event (throttle) reason is active "
                                   "(nvmlDeviceGetCurrentClocksEventReasons).",
                                   labels=GPU_LABELS + ["reason"])
        masks = [(g, r.clock_event_reasons) for g, r in _live(snap) if r.clock_event_reasons is not None]
        for g, mask in masks:
            for bit, name in CLOCK_EVENT_REASONS:
                active.add_metric(_labels(g) + [name], int(bool(mask & bit)))
        yield active

    @renders("clock-events")
    def _clock_event_seconds_family(self, snap: Snapshot) -> Iterator[Metric]:
        seconds = CounterMetricFamily("gpu_clock_event_seconds",
                                      "Sampled time each clock event reason was active (one interval per tick).",
                                      labels=GPU_LABELS + ["reason"])
        for g in snap.gpus:
            for name, secs in g.clock_event_seconds:
                seconds.add_metric(_labels(g) + [name], secs)
        yield seconds

    def _xid_family(self, snap: Snapshot) -> Iterator[Metric]:
        identity = {g.identity.index: g for g in snap.gpus}
        xid = CounterMetricFamily("gpu_xid_errors", "XID critical errors reported by the driver "
                                  "(NVML event nvmlEventTypeXidCriticalError), per XID code.",
                                  labels=GPU_LABELS + ["xid"])
        for (index, code), n in snap.xid_errors:
            if index in identity:
                xid.add_metric(_labels(identity[index]) + [str(code)], n)
        yield xid

    @renders("ecc")
    def _ecc_family(self, snap: Snapshot) -> Iterator[Metric]:
        ecc = CounterMetricFamily("gpu_ecc_errors", "ECC memory errors (nvmlDeviceGetTotalEccErrors); "
                                  "scope=volatile since driver load, aggregate over the board's life.",
                                  labels=GPU_LABELS + ["error", "scope"])
        for g, r in _live(snap):
            for (error, scope), n in r.ecc_errors or ():
                ecc.add_metric(_labels(g) + [error, scope], n)
        yield ecc

    @renders("ecc")
    def _remapped_rows_family(self, snap: Snapshot) -> Iterator[Metric]:
        rows = GaugeMetricFamily("gpu_remapped_rows", "Memory rows remapped (nvmlDeviceGetRemappedRows), "
                                 "by the cause of the remap.", labels=GPU_LABELS + ["cause"])
        for g, r in _live(snap):
            if r.remapped_rows is not None:
                rows.add_metric(_labels(g) + ["correctable"], r.remapped_rows[0])
                rows.add_metric(_labels(g) + ["uncorrectable"], r.remapped_rows[1])
        yield rows

    @renders("row-remap")
    def _row_remap_families(self, snap: Snapshot) -> Iterator[Metric]:
        pending = GaugeMetricFamily("gpu_row_remap_pending", "1 when a row remap waits for a GPU reset.",
                                    labels=GPU_LABELS)
        failed = GaugeMetricFamily("gpu_row_remap_failure", "1 when a row remap failed: replace the board.",
                                   labels=GPU_LABELS)
        for g, r in _live(snap):
            if r.remapped_rows is not None:
                _, _, is_pending, is_failed = r.remapped_rows
                pending.add_metric(_labels(g), int(bool(is_pending)))
                failed.add_metric(_labels(g), int(bool(is_failed)))
        yield pending
        yield failed

    # ---- processes and MIG devices -----------------------------------------------------------------
    @renders("processes")
    def _process_families(self, snap: Snapshot) -> Iterator[Metric]:
        who = dict(snap.processes)
        memory = GaugeMetricFamily("gpu_process_memory_used_bytes",
                                   "GPU memory held by a process (nvmlDeviceGet{Compute,Graphics}RunningProcesses).",
                                   labels=GPU_LABELS + PROCESS_LABELS)
        sm = GaugeMetricFamily("gpu_process_sm_utilization_ratio",
                               "SM utilisation of a process, latest driver sample (nvmlDeviceGetProcessUtilization).",
                               labels=GPU_LABELS + PROCESS_LABELS)
        for g, r in _live(snap):
            _add_processes(memory, sm, _labels(g), r.processes, who)
        yield memory
        yield sm

    @renders("mig")
    def _mig_families(self, snap: Snapshot) -> Iterator[Metric]:
        who = dict(snap.processes)
        mig_labels = GPU_LABELS + ["mig_uuid", "gpu_instance_id", "compute_instance_id"]
        mig_used = GaugeMetricFamily("gpu_mig_memory_used_bytes", "Memory used on a MIG device "
                                     "(nvmlDeviceGetMemoryInfo on the MIG handle).", labels=mig_labels)
        mig_total = GaugeMetricFamily("gpu_mig_memory_total_bytes", "Memory of a MIG device.", labels=mig_labels)
        mig_memory = GaugeMetricFamily("gpu_mig_process_memory_used_bytes", "GPU memory held by a process on a "
                                       "MIG device (nvmlDeviceGetComputeRunningProcesses on the MIG handle).",
                                       labels=mig_labels + PROCESS_LABELS)
        for g, r in _live(snap):
            for m in r.mig or ():
                base = _labels(g) + [m.uuid, str(m.gpu_instance_id), str(m.compute_instance_id)]
                if m.memory_used_bytes is not None:
                    mig_used.add_metric(base, m.memory_used_bytes)
                if m.memory_total_bytes is not None:
                    mig_total.add_metric(base, m.memory_total_bytes)
                _add_processes(mig_memory, None, base, m.processes, who)
        yield from (mig_used, mig_total, mig_memory)

    # ---- cgroup and /dev/shm ------------------------------------------------------------------------
    @renders("cgroup")
    def _cgroup_families(self, snap: Snapshot) -> Iterator[Metric]:
        c = snap.cgroup
        if c is not None:
            for kind, name, doc, value in (
                ("counter", "cgroup_cpu_usage_seconds", "CPU time used by the cgroup (cpu.stat usage_usec; "
                                                        "v1 cpuacct.usage).", c.cpu_usage_seconds),
                ("counter", "cgroup_cpu_throttled_seconds", "Time the cgroup was throttled by its CPU quota "
                                                            "(cpu.stat throttled_usec; v1 throttled_time).",
                 c.cpu_throttled_seconds),
                ("counter", "cgroup_cpu_throttled_periods", "Enforcement periods in which the cgroup was throttled "
                                                            "(cpu.stat nr_throttled).", c.cpu_throttled_periods),
                ("counter", "cgroup_cpu_periods", "Enforcement periods elapsed (cpu.stat nr_periods).", c.cpu_periods),
                ("gauge", "cgroup_cpu_limit_cores", "CPU quota in cores (cpu.max; v1 cfs_quota_us / cfs_period_us); "
                                                    "absent when unlimited.", c.cpu_limit_cores),
                ("gauge", "cgroup_memory_usage_bytes", "Memory charged to the cgroup (memory.current; "
                                                       "v1 memory.usage_in_bytes).", c.memory_usage_bytes),
                ("gauge", "cgroup_memory_limit_bytes", "Memory limit (memory.max; v1 memory.limit_in_bytes); "
                                                       "absent when unlimited.", c.memory_limit_bytes),
            ):
                if value is not None:
                    fam = _family(kind, name, doc, ["cgroup"])
                    fam.add_metric([c.path], value)
                    yield fam

    @renders("shm")
    def _shm_families(self, snap: Snapshot) -> Iterator[Metric]:
        shm = snap.shm
        if shm is not None:
            size = GaugeMetricFamily("host_shm_size_bytes", "Size of the shared-memory mount (statvfs).",
                                     labels=["path"])
            size.add_metric([shm.path], shm.size_bytes)
            used = GaugeMetricFamily("host_shm_used_bytes", "Bytes used on the shared-memory mount (statvfs).",
                                     labels=["path"])
            used.add_metric([shm.path], shm.used_bytes)
            yield size
            yield used

    # ---- host --------------------------------------------------------------------------------------
    @renders("host")
    def _host_families(self, snap: Snapshot) -> Iterator[Metric]:
        host = snap.host
        if host is None:
            return
        if host.cpu_utilization is not None:
            yield GaugeMetricFamily("host_cpu_utilization_ratio",
                                    "Busy share of all CPUs over the last interval (/proc/stat deltas).",
                                    value=host.cpu_utilization)
        if host.memory_total_bytes is not None:
            yield GaugeMetricFamily("host_memory_total_bytes", "MemTotal from /proc/meminfo.",
                                    value=host.memory_total_bytes)
        if host.memory_available_bytes is not None:
            yield GaugeMetricFamily("host_memory_available_bytes", "MemAvailable from /proc/meminfo.",
                                    value=host.memory_available_bytes)

    @renders("cpu-histogram")
    def _cpu_histogram_family(self, snap: Snapshot) -> Iterator[Metric]:
        h = snap.host_cpu_hist
        if h is not None:
            fam = HistogramMetricFamily("host_sampled_cpu_utilization_ratio",
                                        "Every sampled host_cpu_utilization_ratio.")
            fam.add_metric([], _buckets(h), h.sum)
            yield fam

    @renders("cpu-per-core")
    def _cpu_per_core_family(self, snap: Snapshot) -> Iterator[Metric]:
        cores = GaugeMetricFamily("host_cpu_core_utilization_ratio",
                                  "Busy share of one CPU over the last interval (/proc/stat deltas).",
                                  labels=["cpu"])
        for cpu, value in snap.host.core_utilization if snap.host is not None else ():
            cores.add_metric([cpu], value)
        yield cores


_unknown = set(_RENDERERS) - set(registry.GROUPS)
if _unknown:  # a renderer for a group collectors.py does not declare: fail at import, not in a scrape
    raise RuntimeError(f"@renders for undeclared collector groups {sorted(_unknown)} (exporter/pipeline/collectors.py)")
