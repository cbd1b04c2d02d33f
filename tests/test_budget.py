"""The series budget (issue #16): one scrape of 8 GPUs with the default collectors holds at most 600 samples
and no more bytes of text than node_exporter's scrape of the same host; docs/metrics.md's table of series
per family is what a real collect gives.

    .venv/bin/python -m tests.test_budget    # prints the table for docs/metrics.md
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path


from exporter.pipeline import collectors as registry
from exporter.pipeline.collector import SnapshotCollector
from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.sources.cgroup import CgroupSource
from exporter.sources.kubelet import ContainerRef, PodResources
from exporter.sources.nvml.specs import GPU_SCALARS, NVLINK_PER_LINK_SCALARS
from tests.conftest import REPO, ExporterProcess, FakeProcfs, ManualClock, free_port, make_sampler, stop_process
from testkit.processes import exposition_size, http_get
from tests.test_cgroup_processes import v2_tree

MAX_SAMPLES = 600
DOCS = REPO / "docs" / "metrics.md"
BEGIN, END = "<!-- series-table: python -m tests.test_budget -->", "<!-- /series-table -->"
# Families whose count depends on what runs: the table counts the case named here.
VARIABLE = {
    "gpu_process_memory_used_bytes": "per process (1 here)",
    "gpu_process_sm_utilization_ratio": "per process (1 here)",
    "gpu_clock_event_seconds_total": "per reason active since start (1 here)",
    "gpu_mig_memory_used_bytes": "per MIG device, on a MIG GPU (1 here)",
    "gpu_mig_memory_total_bytes": "per MIG device, on a MIG GPU (1 here)",
    "gpu_mig_process_memory_used_bytes": "per process on a MIG device (1 here)",
    "gpu_xid_errors_total": "per XID code seen (1 here)",
    "host_cpu_core_utilization_ratio": "per CPU (2 here)",
    "exporter_errors_total": "per failing source and call (none here)",
    "gpu_pod_info": "per container holding the GPU (1 here)",
    "exporter_collector_success": "per enabled collector group (all 21 here; 16 at defaults)",
    "exporter_collector_duration_seconds": "per enabled collector group (all 21 here; 16 at defaults)",
}


def scrape(url: str) -> bytes:
    status, _, body = http_get(url + "/metrics")  # no Accept header: the plain-text format
    assert status == 200
    return body


def test_8_gpus_at_defaults_fit_the_budget_beside_node_exporter():
    """Both scrapes in the same run: ours at most 600 samples and no more bytes than node_exporter's.
    Over several seconds, so the fake's batch job (a second process per GPU every other 10 s) and its
    clock-event reasons are in the worst scrape."""
    binary = shutil.which("prometheus-node-exporter")
    assert binary, "prometheus-node-exporter is missing: tests/run.sh installs it"
    port = free_port()
    node = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = ExporterProcess("--fake-gpus", "8", "--sample.interval", "100ms")
    try:
        ours.wait_for_sample(needle=b"gpu_sm_active_ratio{")
        deadline = time.monotonic() + 15
        node_body = b""
        while not node_body and time.monotonic() < deadline:
            try:
                node_body = scrape(f"http://127.0.0.1:{port}")
            except OSError:
                time.sleep(0.1)
        node_samples, node_bytes = exposition_size(node_body)
        worst = (0, 0)
        end = time.monotonic() + 12  # past the fake's first batch job (from 10 s)
        while time.monotonic() < end:
            worst = max(worst, exposition_size(scrape(ours.url)), key=lambda x: x[1])
            time.sleep(0.5)
    finally:
        ours.stop()
        stop_process(node)
    samples, size = worst
    print(f"8 GPUs at defaults: {samples} samples, {size} bytes; node_exporter: {node_samples} samples, "
          f"{node_bytes} bytes")
    assert node_samples > 100  # node_exporter answered with its usual page
    assert samples <= MAX_SAMPLES
    assert size <= node_bytes


def collect_all() -> dict[str, dict[str, int]]:
    """One real collect with every collector on, counted per family: samples of a plain GPU (gpu 1), of
    the MIG GPU (gpu 0, one instance) and without a GPU label (host)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        clock = ManualClock()
        fake = FakeNvml(specs=[FakeGpuSpec(mig_profiles=("3g.40gb",)), FakeGpuSpec()], clock=clock)
        for gpu in (0, 1):
            fake.set_processes(gpu, [(4000 + gpu, 2**30)])
        fake.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4  # sw_power_cap
        procfs = FakeProcfs(tmp_path / "proc")
        v2_tree(tmp_path / "cgroup", "/tts", 2_000_000, 100, 25, 400_000)
        specs = GPU_SCALARS + NVLINK_PER_LINK_SCALARS
        pods: list[PodResources] = []
        s = make_sampler(fake, procfs.root, clock=clock, specs=specs, shm_path=str(tmp_path),
                         cgroup=CgroupSource(tmp_path / "cgroup", path="/tts"),
                         pods=lambda: pods[0] if pods else None)
        try:
            s.tick()
            pods.append(PodResources(up=True, holders=((s.snapshot.gpus[1].identity.uuid,
                                                         (ContainerRef("tts", "synth-0", "model"),)),)))
            fake.emit_xid(1, 79)
            deadline = time.monotonic() + 5
            while not s.nvml.xid_counts() and time.monotonic() < deadline:
                time.sleep(0.02)
            for _ in range(3):
                clock.advance(0.2)
                procfs.advance(busy=[10, 20], idle=[90, 80])
                s.tick()
            fams = list(SnapshotCollector(lambda: s.snapshot, specs=specs, collectors=registry.ALL).collect())
        finally:
            s.stop()
    out: dict[str, dict[str, int]] = {}
    for m in fams:
        name = m.name + "_total" if m.type == "counter" else m.name
        row = out.setdefault(name, {"gpu": 0, "mig": 0, "host": 0})
        for x in m.samples:
            where = {"1": "gpu", "0": "mig"}.get(x.labels.get("gpu", ""), "host")
            row[where] += 1
    return out


def collectors_of(family: str) -> list[str]:
    return [c.name for c in registry.COLLECTORS if family in c.families] or ["always"]


def series_table() -> str:
    counts = collect_all()
    lines = ["| family | collector | default | series per GPU | per host | counted for |",
             "|---|---|---|---|---|---|"]
    totals = {True: [0, 0], False: [0, 0]}
    for name, c in counts.items():
        owners = collectors_of(name)
        on = all(o == "always" or o in registry.DEFAULT for o in owners)
        mig_only = name.startswith("gpu_mig_")  # not on a GPU without MIG: not in the totals
        per_gpu = c["mig"] if mig_only else c["gpu"]
        totals[on][0] += 0 if mig_only else per_gpu
        totals[on][1] += c["host"]
        lines.append(f"| `{name}` | {' + '.join(owners)} | {'on' if on else 'off'} | {per_gpu} | {c['host']} | "
                     f"{VARIABLE.get(name, '')} |")
    (g, h), (g_off, h_off) = totals[True], totals[False]
    lines.append(f"| **default families, GPUs without MIG** | | on | **{g}** | **{h}** | 8 GPUs: {8 * g + h} |")
    lines.append(f"| **the other collectors, in addition** | | off | {g_off} | {h_off} | 8 GPUs: "
                 f"+{8 * g_off + h_off} |")
    return "\n".join(lines)


def test_docs_series_table_is_what_a_collect_gives():
    text = DOCS.read_text()
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, flags=re.S)
    assert m, f"docs/metrics.md lacks the {BEGIN} block"
    assert m.group(1) == series_table(), "docs/metrics.md's series table is stale: python -m tests.test_budget"


if __name__ == "__main__":
    print(BEGIN)
    print(series_table())
    print(END)
