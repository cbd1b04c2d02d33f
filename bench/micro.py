#!/usr/bin/env python3
"""In-process micro-benchmark: one sampler tick, collect+render, one fake NVML call, for N GPUs.

    .venv/bin/python bench/micro.py [--gpus 8] [--iterations 500]

Prints figures; asserts nothing (timings belong here, not in tests). Runs in CI as a smoke test.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry  # noqa: E402

from exporter.pipeline import collectors  # noqa: E402
from exporter.pipeline.collector import SnapshotCollector  # noqa: E402
from exporter.pipeline.exposition import TextRenderer  # noqa: E402
from exporter.fake.nvml import FakeNvml, fake_uuid  # noqa: E402
from exporter.pipeline.sampler import Sampler  # noqa: E402
from exporter.sources.kubelet import ContainerRef, PodResources  # noqa: E402
from exporter.sources.nvml import NvmlSource  # noqa: E402
from exporter.sources.processes import ProcessAttributor  # noqa: E402
from exporter.sources.procfs import ProcfsSource  # noqa: E402


def per_call(fn, n: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - w) / n, (time.process_time() - c) / n


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:8.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=500)
    a = ap.parse_args()
    fake = FakeNvml(a.gpus)
    # Every GPU held by its own pod, as the kubelet pod-resources API would say (feature on).
    pods = PodResources(up=True, holders=tuple((fake_uuid(i), (ContainerRef("tts", f"synth-{i}", "model"),))
                                               for i in range(a.gpus)))
    sampler = Sampler(NvmlSource(fake, "fake"), ProcfsSource("/proc"), interval=0.2, pods=lambda: pods)
    for _ in range(3):
        sampler.tick()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: sampler.snapshot, collectors=collectors.DEFAULT - {"pod-info"}))
    renderer = TextRenderer()
    with_pods = {}
    for label, stamp_gpu_series in (("pods", False), ("pods+labels", True)):
        with_pods[label] = CollectorRegistry(auto_describe=False)
        with_pods[label].register(SnapshotCollector(lambda: sampler.snapshot, pod_labels=stamp_gpu_series))
    gpm_only = SnapshotCollector(lambda: sampler.snapshot)
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    host = ProcfsSource("/proc")
    own_pid = [os.getpid()]
    rows = [
        ("tick", lambda: sampler.tick()),
        ("host read (/proc stat+meminfo)", host.read),  # the procfs share of every tick
        ("process lookup, new pid", lambda: ProcessAttributor("/proc").lookup(own_pid)),  # once per new GPU pid
        ("collect+render text", lambda: renderer.render(registry.collect())),
        ("collect+render openmetrics", lambda: renderer.render(registry.collect(), openmetrics=True)),
        ("collect+render, collect[]=gpm", lambda: renderer.render(gpm_only.collect(frozenset({"exporter", "gpm"})))),
        ("collect+render text, pod info", lambda: renderer.render(with_pods["pods"].collect())),
        ("  same, --kubernetes.pod-labels", lambda: renderer.render(with_pods["pods+labels"].collect())),
        ("fake NVML call", lambda: fake.nvmlDeviceGetPowerUsage(handle)),
    ]
    print(f"# {a.gpus} fake GPUs, {a.iterations} iterations; wall and process CPU per call")
    for label, fn in rows:
        wall, cpu = per_call(fn, a.iterations)
        print(f"{label:32} wall {fmt(wall)}   cpu {fmt(cpu)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
