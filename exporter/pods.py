"""Kubernetes attribution on the collector side: gpu_pod_info, and namespace/pod/container on GPU series.

Wraps the snapshot collector, so it needs nothing from it but its families: series with a `uuid` (or
`mig_uuid`) label belong to that device. Labels are stamped only where they are certain, i.e. exactly
one container holds the device; with time-slicing or MPS the join on gpu_pod_info is the answer.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.snapshot import Snapshot
from exporter.sources.kubelet import ContainerRef

POD_LABELS = ("namespace", "pod", "container")
INFO_LABELS = ["gpu", "uuid", "mig_uuid", "gpu_instance_id", "compute_instance_id", *POD_LABELS]
Owners = dict[str, tuple[ContainerRef, ...]]


def pod_info_family(snap: Snapshot, owners: Owners) -> Metric:
    """One series per (device, container holding it); none for an unallocated device."""
    info = GaugeMetricFamily(
        "gpu_pod_info", "Container holding the GPU (or MIG device), from the kubelet pod-resources API; "
        "always 1. Several with time-slicing or MPS, none when unallocated.", labels=INFO_LABELS)
    for g in snap.gpus:
        gpu = [str(g.identity.index), g.identity.uuid]
        for ref in owners.get(g.identity.uuid, ()):
            info.add_metric(gpu + ["", "", "", ref.namespace, ref.pod, ref.container], 1)
        for m in (g.reading.mig or ()) if g.reading is not None else ():
            mig = gpu + [m.uuid, str(m.gpu_instance_id), str(m.compute_instance_id)]
            for ref in owners.get(m.uuid, ()):
                info.add_metric(mig + [ref.namespace, ref.pod, ref.container], 1)
    return info


def stamp(metric: Metric, owners: Owners, gpu_series: bool) -> Metric:
    """The family with namespace/pod/container added where exactly one container holds the series' device.

    Per-process series (a `pid` label) always; other per-GPU series only when gpu_series is set.
    """
    samples = []
    changed = False
    for s in metric.samples:
        device = s.labels.get("mig_uuid") or s.labels.get("uuid")
        holders = owners.get(device, ()) if device else ()
        if len(holders) == 1 and (gpu_series or "pid" in s.labels):
            (ref,) = holders
            s = s._replace(labels={**s.labels, "namespace": ref.namespace, "pod": ref.pod,
                                   "container": ref.container})
            changed = True
        samples.append(s)
    if not changed:
        return metric
    out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    out.samples = samples
    return out


class PodCollector(Collector):
    """The inner collector's families, stamped, plus gpu_pod_info and exporter_pod_resources_up."""

    def __init__(self, inner: Collector, snapshot: Callable[[], Snapshot], gpu_series: bool = False) -> None:
        self._inner = inner
        self._snapshot = snapshot
        self._gpu_series = gpu_series

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        pods = snap.pods
        families = self._inner.collect()
        if pods is None:  # off, or no socket: the exposition is what it is without Kubernetes
            yield from families
            return
        owners = pods.by_device()
        for m in families:
            yield stamp(m, owners, self._gpu_series) if m.name.startswith("gpu_") else m
        yield GaugeMetricFamily("exporter_pod_resources_up",
                                "1 when the last List of the kubelet pod-resources API succeeded.", value=int(pods.up))
        yield pod_info_family(snap, owners)
