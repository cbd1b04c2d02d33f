"""docs/metrics.md is the public contract, checked both ways against the code: every scalar spec and
every family the exporter emits is documented (with its type), and every documented metric exists."""
from __future__ import annotations

import re
import time

import pynvml

from exporter.pipeline.collector import SnapshotCollector
from exporter.pipeline.collectors import ALL as ALL_COLLECTORS
from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.sources.kubelet import ContainerRef, PodResources
from exporter.sources.cgroup import CgroupSource
from exporter.sources.nvml.specs import GPU_SCALARS, NVLINK_PER_LINK_SCALARS
from tests.conftest import REPO, make_sampler
from tests.test_cgroup_processes import v2_tree

_ROW = re.compile(r"^\| `([a-z_]+)` \|")


def documented() -> dict[str, str]:
    """Exposed name -> the type cell, from every table of docs/metrics.md with a `metric` column."""
    found: dict[str, str] = {}
    header: list[str] = []
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not header:
            header = cells
            continue
        m = _ROW.match(line)
        if m and header[0] == "metric":
            found[m.group(1)] = cells[header.index("type")] if "type" in header else "histogram"
    return found


def exposed(name: str, kind: str) -> str:
    return name + "_total" if kind == "counter" else name


def test_every_spec_is_documented_with_its_type():
    docs = documented()
    for spec in GPU_SCALARS + NVLINK_PER_LINK_SCALARS:  # the per-link rows are off by default
        name = exposed(spec.name, spec.type)
        assert name in docs, f"{name} (specs.py) is not in docs/metrics.md"
        assert docs[name].startswith(spec.type), f"{name}: documented as {docs[name]!r}, spec says {spec.type}"


def test_every_emitted_family_is_documented_and_every_documented_metric_exists(procfs, tmp_path):
    root = tmp_path / "cgroup"
    v2_tree(root, "/tts", 1, 1, 1, 1)
    fake = FakeNvml(specs=[FakeGpuSpec(mig_profiles=("3g.40gb",)), FakeGpuSpec(fan_speed_percent=40)])
    pods: list[PodResources] = []  # filled once the GPUs' UUIDs are known
    s = make_sampler(fake, procfs.root, cgroup=CgroupSource(root, path="/tts"), shm_path=str(tmp_path),
                     pods=lambda: pods[0] if pods else None)
    s.tick()
    pods.append(PodResources(up=True, holders=((s.snapshot.gpus[1].identity.uuid,
                                                 (ContainerRef("tts", "synth-0", "model"),)),)))
    fake.emit_xid(1, 79)
    # One failed call, so exporter_errors_total has a series (an empty family is not rendered).
    fake.inject("nvmlDeviceGetTemperature", gpu=1, error=pynvml.NVML_ERROR_UNKNOWN, times=1)
    deadline = time.monotonic() + 5
    while not s.nvml.xid_counts() and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(3):
        time.sleep(0.2)
        s.tick()
        procfs.advance(busy=[10, 20], idle=[90, 80])
    # Everything main() registers that renders the snapshot (pod-info included).
    fams = list(SnapshotCollector(lambda: s.snapshot, collectors=ALL_COLLECTORS).collect())
    s.stop()
    emitted = {exposed(m.name, m.type): m.type for m in fams if m.samples}
    assert len(emitted) > 40
    docs = documented()
    undocumented = sorted(n for n in emitted if n not in docs)
    assert not undocumented, f"undocumented metrics: {undocumented}"
    wrong = sorted(n for n, kind in emitted.items() if not docs[n].startswith(kind))
    assert not wrong, f"documented with another type: {wrong}"
    # The server's exporter_http_* families are checked against the docs in test_collector.py, its
    # exporter_web_config_* ones in test_web_security.py.
    every = {exposed(m.name, m.type) for m in fams} | {exposed(x.name, x.type) for x in GPU_SCALARS + NVLINK_PER_LINK_SCALARS}
    stale = sorted(n for n in docs if n not in every and not n.startswith(("exporter_http_", "exporter_web_config_")))
    assert not stale, f"documented but never exported: {stale}"
