"""Collector side of pod attribution: gpu_pod_info, and labels stamped only where they are certain."""
from __future__ import annotations

import time

import pytest

from exporter.pipeline.collector import SnapshotCollector
from exporter.pipeline.collectors import ALL as ALL_COLLECTORS
from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.sources.kubelet import ContainerRef, PodResources, PodResourcesPoller
from tests.conftest import ManualClock, make_sampler
from tests.test_pod_resources import kubelet, sock_dir, wait_until  # noqa: F401 (fixtures)

A = ContainerRef("tts", "synth-0", "model")
B = ContainerRef("tts", "synth-1", "model")
C = ContainerRef("asr", "whisper-0", "main")


class Pods:
    """What the poller would publish, set by the test."""

    def __init__(self) -> None:
        self.latest: PodResources | None = None

    def set(self, owners: dict[str, tuple[ContainerRef, ...]] | None) -> None:
        self.latest = None if owners is None else PodResources(up=True, holders=tuple(sorted(owners.items())))


@pytest.fixture
def setup(procfs):
    clock = ManualClock()
    fake = FakeNvml(specs=[FakeGpuSpec(mig_profiles=("3g.40gb", "1g.10gb")), FakeGpuSpec(), FakeGpuSpec()],
                    clock=clock)
    pods = Pods()
    sampler = make_sampler(fake, procfs.root, clock=clock, pods=lambda: pods.latest)
    sampler.tick()
    uuids = {g.identity.index: g.identity.uuid for g in sampler.snapshot.gpus}
    migs = [m.uuid for m in sampler.snapshot.gpus[0].reading.mig]
    return sampler, pods, uuids, migs


def collect(sampler, gpu_series=False) -> dict:
    collector = SnapshotCollector(lambda: sampler.snapshot, collectors=ALL_COLLECTORS, pod_labels=gpu_series)
    return {m.name: m for m in collector.collect()}


def labels_of(family, **match) -> list[dict]:
    return [s.labels for s in family.samples if all(s.labels.get(k) == v for k, v in match.items())]


def test_pod_info_one_series_per_device_and_container(setup):
    sampler, pods, uuids, migs = setup
    pods.set({uuids[1]: (A,), uuids[2]: (A, B), migs[0]: (C,), "GPU-not-on-this-node": (B,)})
    sampler.tick()
    info = collect(sampler)["gpu_pod_info"]
    rows = sorted((s.labels["gpu"], s.labels.get("mig_uuid", ""), s.labels["pod"], s.labels["container"])
                  for s in info.samples)
    assert rows == [("0", migs[0], "whisper-0", "main"), ("1", "", "synth-0", "model"),
                    ("2", "", "synth-0", "model"), ("2", "", "synth-1", "model")]
    (mig,) = labels_of(info, mig_uuid=migs[0])
    assert mig["namespace"] == "asr" and mig["gpu_instance_id"] == "1" and mig["compute_instance_id"] == "0"
    assert all(s.value == 1 for s in info.samples)
    (whole,) = labels_of(info, gpu="1")  # a whole GPU: just the labels the issue names
    assert set(whole) == {"gpu", "uuid", "namespace", "pod", "container"}
    assert collect(sampler)["exporter_pod_resources_up"].samples[0].value == 1


def test_allocation_moves_and_disappears(setup):
    sampler, pods, uuids, _ = setup
    pods.set({uuids[1]: (A,)})
    sampler.tick()
    assert [s.labels["pod"] for s in collect(sampler)["gpu_pod_info"].samples] == ["synth-0"]
    pods.set({uuids[1]: (B,)})
    sampler.tick()
    assert [s.labels["pod"] for s in collect(sampler)["gpu_pod_info"].samples] == ["synth-1"]
    pods.set({})
    sampler.tick()
    assert "gpu_pod_info" not in collect(sampler)  # no series: no family (as client_golang)


def test_process_series_get_labels_only_from_a_sole_holder(setup):
    sampler, pods, uuids, migs = setup
    pods.set({uuids[1]: (A,), uuids[2]: (A, B), migs[0]: (C,)})
    sampler.tick()
    fams = collect(sampler)
    procs = fams["gpu_process_memory_used_bytes"]
    assert labels_of(procs, gpu="1") and all(l["pod"] == "synth-0" and l["namespace"] == "tts"
                                             and l["container"] == "model" for l in labels_of(procs, gpu="1"))
    assert labels_of(procs, gpu="2") and all("pod" not in l for l in labels_of(procs, gpu="2"))  # shared: unsure
    mig_procs = fams["gpu_mig_process_memory_used_bytes"]
    assert [l.get("pod") for l in labels_of(mig_procs, mig_uuid=migs[0])] == ["whisper-0"]
    assert all("pod" not in l for l in labels_of(mig_procs, mig_uuid=migs[1]))  # unallocated MIG device
    # Without --kubernetes.pod-labels the per-GPU series stay as they are.
    assert all("pod" not in s.labels for s in fams["gpu_temperature_celsius"].samples)


def test_pod_labels_flag_stamps_per_gpu_series_of_a_sole_holder(setup):
    sampler, pods, uuids, migs = setup
    pods.set({uuids[1]: (A,), uuids[2]: (A, B), migs[0]: (C,)})
    sampler.tick()
    fams = collect(sampler, gpu_series=True)
    temps = {s.labels["gpu"]: s.labels.get("pod") for s in fams["gpu_temperature_celsius"].samples}
    assert temps == {"0": None, "1": "synth-0", "2": None}
    assert {s.labels["gpu"]: s.labels.get("pod") for s in fams["gpu_info"].samples}["1"] == "synth-0"
    assert {s.labels.get("pod") for s in fams["gpu_clock_event_active"].samples if s.labels["gpu"] == "1"} == {"synth-0"}
    assert {s.labels.get("pod") for s in fams["gpu_mig_memory_used_bytes"].samples} == {"whisper-0", None}


def test_off_or_no_socket_leaves_the_exposition_as_it_was(setup):
    sampler, pods, _, _ = setup
    pods.set(None)
    sampler.tick()
    def page(collectors):  # the exporter_collector_* rows name the collectors and time each render
        return [m for m in SnapshotCollector(lambda: sampler.snapshot, collectors=collectors).collect()
                if not m.name.startswith("exporter_collector_")]

    plain = page(ALL_COLLECTORS - {"pod-info"})
    wrapped = page(ALL_COLLECTORS)
    assert [m.name for m in wrapped] == [m.name for m in plain]
    assert [m.samples for m in wrapped] == [m.samples for m in plain]


def test_cut_entries_are_counted_and_pod_info_stays_bounded(setup):
    sampler, pods, uuids, _ = setup
    many = tuple(ContainerRef("tts", f"synth-{i:03d}", "model") for i in range(128))
    pods.latest = PodResources(up=True, holders=((uuids[0], many),), cut=99_872)  # what 100 000 pods leave
    sampler.tick()
    fams = collect(sampler)
    assert fams["exporter_pod_resources_left_out"].samples[0].value == 99_872
    assert len(fams["gpu_pod_info"].samples) == 128
    pods.set({uuids[0]: (A,)})
    sampler.tick()
    assert collect(sampler)["exporter_pod_resources_left_out"].samples[0].value == 0


def test_kubelet_down_drops_pod_info_and_reports_it(setup):
    sampler, pods, uuids, _ = setup
    pods.latest = PodResources(up=False, problem="List timed out after 2s")
    sampler.tick()
    fams = collect(sampler)
    assert "gpu_pod_info" not in fams
    assert fams["exporter_pod_resources_up"].samples[0].value == 0
    assert fams["gpu_up"].samples and all(s.value == 1 for s in fams["gpu_up"].samples)  # GPUs unaffected


def test_hung_kubelet_does_not_delay_ticks(setup, kubelet, sock_dir):  # noqa: F811
    sampler, _, uuids, _ = setup
    kubelet.set({"tts/synth-0/model": {"nvidia.com/gpu": [uuids[1]]}})
    kubelet.delay = 3.0  # each List hangs for 10 timeouts
    poller = PodResourcesPoller(str(sock_dir / "kubelet.sock"), period=0.05, timeout=0.3)
    sampler.pods = lambda: poller.latest
    poller.start()
    try:
        started = time.monotonic()
        for _ in range(20):
            sampler.tick()
        # The ticks only read poller.latest: twenty of them take well under one List timeout.
        assert time.monotonic() - started < 0.3 * 20
        assert wait_until(lambda: poller.latest is not None and not poller.latest.up)
        kubelet.delay = 0
        assert wait_until(lambda: poller.latest is not None and poller.latest.up, timeout=30)
        sampler.tick()
        assert [s.labels["pod"] for s in collect(sampler)["gpu_pod_info"].samples] == ["synth-0"]
    finally:
        poller.stop()

