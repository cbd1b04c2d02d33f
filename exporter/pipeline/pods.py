"""Kubernetes attribution on the collector side: gpu_pod_info, and namespace/pod/container on GPU series.

The snapshot collector (collector.py) renders the pod-info collector with pod_info_family and stamps its
other families with stamp(), from the same snapshot: series with a `uuid` (or `mig_uuid`) label belong
to that device. Labels are stamped only where they are certain, i.e. exactly
one container holds the device; with time-slicing or MPS the join on gpu_pod_info is the answer.
"""
from __future__ import annotations

from typing import Mapping

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from exporter.pipeline.snapshot import Snapshot
from exporter.sources.kubelet import ContainerRef

Owners = Mapping[str, tuple[ContainerRef, ...]]


def pod_info_family(snap: Snapshot, owners: Owners) -> Metric:
    """One series per (device, container holding it); none for an unallocated device. A whole GPU's series
    has gpu, uuid, namespace, pod, container; a MIG device's also mig_uuid, gpu_instance_id,
    compute_instance_id, as on its gpu_mig_* series."""
    info = GaugeMetricFamily(
        "gpu_pod_info", "Container holding the GPU (or MIG device), from the kubelet pod-resources API; "
        "always 1. Several with time-slicing or MPS, none when unallocated.")
    for g in snap.gpus:
        gpu = {"gpu": str(g.identity.index), "uuid": g.identity.uuid}
        for ref in owners.get(g.identity.uuid, ()):
            info.samples.append(Sample("gpu_pod_info", {**gpu, **_pod_labels(ref)}, 1))
        for m in (g.reading.mig or ()) if g.reading is not None else ():
            mig = {**gpu, "mig_uuid": m.uuid, "gpu_instance_id": str(m.gpu_instance_id),
                   "compute_instance_id": str(m.compute_instance_id)}
            for ref in owners.get(m.uuid, ()):
                info.samples.append(Sample("gpu_pod_info", {**mig, **_pod_labels(ref)}, 1))
    return info


def _pod_labels(ref: ContainerRef) -> dict[str, str]:
    return {"namespace": ref.namespace, "pod": ref.pod, "container": ref.container}


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
            s = s._replace(labels={**s.labels, **_pod_labels(ref)})
            changed = True
        samples.append(s)
    if not changed:
        return metric
    out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    out.samples = samples
    return out
