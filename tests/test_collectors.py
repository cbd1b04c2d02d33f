"""Collectors you can switch (exporter/pipeline/collectors.py): each switch removes its families and the NVML calls
behind them; the registry, --help and README's flag table agree."""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.pipeline import collectors as registry
from exporter.cli import parse_config
from exporter.pipeline.collector import SnapshotCollector
from exporter.environment import env_name
from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.sources.cgroup import CgroupSource
from exporter.sources.kubelet import ContainerRef, PodResources
from exporter.sources.nvml.specs import GPU_SCALARS, NVLINK_PER_LINK_SCALARS
from tests.conftest import REPO, ManualClock, make_sampler
from tests.test_cgroup_processes import v2_tree

SPECS = GPU_SCALARS + NVLINK_PER_LINK_SCALARS  # what main() passes: each row is kept or dropped by its collector
# NVML functions only a group of collectors needs: with all of the group off, none is called.
OWN_CALLS: dict[frozenset[str], tuple[str, ...]] = {
    frozenset({"ecc"}): ("nvmlDeviceGetTotalEccErrors",),
    frozenset({"ecc", "row-remap"}): ("nvmlDeviceGetRemappedRows",),
    frozenset({"clock-events", "clock-event-state"}): ("nvmlDeviceGetCurrentClocksEventReasons",),
    frozenset({"processes"}): ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses",
                               "nvmlDeviceGetProcessUtilization"),
    frozenset({"mig"}): ("nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
                         "nvmlDeviceGetMigDeviceHandleByIndex"),
    frozenset({"gpm", "nvlink", "nvlink-per-link"}): ("nvmlGpmSampleGet", "nvmlGpmMetricsGet"),
}


def exposed(m) -> str:
    return m.name + "_total" if m.type == "counter" else m.name


def run(tmp_path, procfs, on: frozenset[str]) -> tuple[dict, Counter]:
    """A few ticks of 3 fake GPUs (GPU 0 in MIG mode), a cgroup, /dev/shm and a kubelet answer, with the
    collectors `on`: (exposed family -> samples, NVML calls made)."""
    clock = ManualClock()
    fake = FakeNvml(specs=[FakeGpuSpec(mig_profiles=("3g.40gb", "1g.10gb")), FakeGpuSpec(), FakeGpuSpec()],
                    clock=clock)
    root = tmp_path / f"cgroup-{len(on)}-{hash(on)}"
    v2_tree(root, "/tts", 2_000_000, 100, 25, 400_000)
    pods: list[PodResources] = []
    s = make_sampler(fake, procfs.root, clock=clock, collectors=on, specs=SPECS,
                     cgroup=CgroupSource(root, path="/tts") if "cgroup" in on else None,
                     shm_path=str(tmp_path) if "shm" in on else None,
                     pods=(lambda: pods[0] if pods else None) if "pod-info" in on else None)
    try:
        s.tick()
        pods.append(PodResources(up=True, holders=((s.snapshot.gpus[1].identity.uuid,
                                                     (ContainerRef("tts", "synth-0", "model"),)),)))
        for _ in range(12):  # 2.4 s of fake time: GPM pairs, PCIe rates, a 1 s process refresh
            clock.advance(0.2)
            procfs.advance(busy=[10, 20], idle=[90, 80])
            s.tick()
        fake.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4  # sw_power_cap, so its counter shows
        clock.advance(0.2)
        procfs.advance(busy=[10, 20], idle=[90, 80])
        s.tick()
        collector = SnapshotCollector(lambda: s.snapshot, specs=SPECS, collectors=on)
        fams = {exposed(m): m.samples for m in collector.collect()}
    finally:
        s.stop()
    return fams, Counter(fake.calls)


@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    from tests.conftest import FakeProcfs

    tmp = tmp_path_factory.mktemp("all")
    return run(tmp, FakeProcfs(tmp / "proc"), registry.ALL)


@pytest.mark.parametrize("collector", registry.COLLECTORS, ids=lambda c: c.name)
def test_each_switch_removes_its_families_and_no_other(collector, everything, tmp_path, procfs):
    fams_on, calls_on = everything
    fams_off, calls_off = run(tmp_path, procfs, registry.ALL - {collector.name})
    for name in collector.families:
        assert fams_on.get(name), f"{name} is not produced with every collector on: the test proves nothing"
        assert name not in fams_off, f"--no-collector.{collector.name} still exports {name}"
    # Every other family is still there (a family listed under two collectors goes with either).
    assert set(fams_on) - set(collector.families) == set(fams_off)
    # Switching a collector off never costs NVML calls (with mig off, a MIG GPU's processes are listed on
    # the GPU itself instead of per instance: fewer calls, not none).
    assert sum(calls_off.values()) <= sum(calls_on.values()), collector.name


@pytest.mark.parametrize("group", OWN_CALLS, ids=lambda g: "+".join(sorted(g)))
def test_a_switched_off_collector_makes_no_nvml_calls_for_its_families(group, everything, tmp_path, procfs):
    _, calls_on = everything
    _, calls_off = run(tmp_path, procfs, registry.ALL - group)
    for function in OWN_CALLS[group]:
        assert calls_on[function] > 0, f"{function} is not called with every collector on"
        assert calls_off[function] == 0, f"{function} called with {sorted(group)} off"


def test_spec_rows_of_a_disabled_collector_are_not_read(tmp_path, procfs):
    """A spec row (specs.py) names its collector; off, its NVML call is not made."""
    _, calls = run(tmp_path, procfs, registry.DEFAULT)
    assert "gpu_sample_buffer_seconds" not in registry.DEFAULT  # a STATEFUL row: nothing of its own to call
    for spec in SPECS:
        if spec.collector not in registry.ALWAYS_ON and spec.collector not in registry.DEFAULT:
            shared = [s for s in SPECS if s.source is spec.source and registry.enabled(registry.DEFAULT,
                                                                                          s.collector)]
            function = getattr(spec.source, "function", None)
            if function and not shared:
                assert calls[function] == 0, spec.name


def test_registry_names_every_spec_collector_and_documented_families():
    names = [c.name for c in registry.COLLECTORS]
    assert len(names) == len(set(names))
    assert not set(names) & set(registry.ALWAYS_ON)
    for spec in SPECS:
        assert registry.enabled(registry.ALL, spec.collector)  # KeyError for an unregistered name
    with pytest.raises(KeyError):
        registry.enabled(registry.ALL, "no-such-collector")
    docs = (REPO / "docs" / "metrics.md").read_text()
    for c in registry.COLLECTORS:
        for family in c.families:
            assert f"`{family}`" in docs, f"{family} ({c.name}) is not in docs/metrics.md"


def test_flags_and_environment_switch_collectors(procfs):
    base = ["--path.procfs", str(procfs.root)]
    assert parse_config(base).collectors == registry.DEFAULT
    cfg = parse_config(base + ["--collector.ecc", "--no-collector.processes"])
    assert cfg.collectors == (registry.DEFAULT | {"ecc"}) - {"processes"}


def test_environment_variables_switch_collectors(monkeypatch, procfs):
    monkeypatch.setenv(env_name("--collector.ecc"), "true")
    monkeypatch.setenv(env_name("--collector.pcie-histograms"), "0")
    cfg = parse_config(["--path.procfs", str(procfs.root)])
    assert "ecc" in cfg.collectors and "pcie-histograms" not in cfg.collectors
    # The command line wins over the environment.
    assert "ecc" not in parse_config(["--path.procfs", str(procfs.root), "--no-collector.ecc"]).collectors


def test_a_bad_environment_value_is_one_line_and_exit_2(procfs):
    env_var = env_name("--collector.ecc")
    r = subprocess.run([sys.executable, "-m", "exporter", "--path.procfs", str(procfs.root)], cwd=REPO,
                       capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", env_var: "maybe"})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and env_var in r.stderr and "Traceback" not in r.stderr


def test_help_lists_every_collector_with_its_default():
    r = subprocess.run([sys.executable, "-m", "exporter", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=30)
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for c in registry.COLLECTORS:
        assert f"--collector.{c.name}, --no-collector.{c.name}" in text
        assert f"[{env_name('--collector.' + c.name)}] (default: {'on' if c.default else 'off'})" in text


def test_readme_flag_table_equals_the_flag_table():
    """README lists every flag of cli.FLAGS (the collector switches are rows of it), in its order, with its
    variable; a switch with its on/off default."""
    from exporter.cli import FLAGS

    rows = re.findall(r"^\| `(--(?:\[no-\])?[a-z.-]+)` \| `([A-Z_]+)` \| ([^|]+) \|",
                      (REPO / "README.md").read_text(), flags=re.M)
    assert [(flag.replace("[no-]", ""), env) for flag, env, _ in rows] == [(f.name, env_name(f.name)) for f in FLAGS]
    for (flag, _, default), f in zip(rows, FLAGS):
        assert flag.startswith("--[no-]") == f.switch, flag
        if f.switch:
            assert default.strip() == f.default, flag
    collectors = [flag[len("--[no-]collector."):] for flag, _, _ in rows if flag.startswith("--[no-]collector.")]
    assert collectors == ["disable-defaults"] + [c.name for c in registry.COLLECTORS]


def test_disable_defaults_keeps_only_the_collectors_switched_on(procfs, monkeypatch):
    base = ["--path.procfs", str(procfs.root), "--collector.disable-defaults"]
    assert parse_config(base).collectors == frozenset()
    assert parse_config(base + ["--collector.gpm", "--collector.ecc"]).collectors == {"gpm", "ecc"}
    monkeypatch.setenv(env_name("--collector.cgroup"), "yes")  # a variable switches one on, as a flag does
    assert parse_config(base).collectors == {"cgroup"}
    assert parse_config(base[:2]).collectors == registry.DEFAULT | {"cgroup"}


def test_what_each_collector_needs_is_derived_from_its_row():
    assert registry.nvml_reads(frozenset({"row-remap"})) == {"remapped-rows"}
    assert registry.nvml_reads(frozenset({"ecc"})) == {"ecc", "remapped-rows"}
    assert registry.nvml_reads(frozenset({"gpm", "cgroup"})) == frozenset()
    assert registry.needs(frozenset({"mig", "cgroup"})) == {"nvml.mig", "host.processes", "host.cgroup"}
    # Every NVML call group a row names is one the reader knows (reader.READS), and each is used.
    from exporter.sources.nvml.reader import READS

    assert registry.nvml_reads(registry.ALL) == READS
    sources = {n for c in registry.COLLECTORS for n in c.needs if not n.startswith("nvml.")}
    assert sources == {"host.cgroup", "host.shm", "host.processes", "kubelet"}  # what cli.main builds


def test_select_checks_names_count_and_state():
    on = registry.DEFAULT
    assert registry.select(["gpm", "cgroup"], on) == {"gpm", "cgroup", "exporter"}
    assert registry.select(["gpu", "host"], on) == {"gpu", "host", "exporter"}
    with pytest.raises(registry.SelectError, match=r"unknown collector 'gpmm'; valid: gpu, host, gpm"):
        registry.select(["gpmm"], on)
    with pytest.raises(registry.SelectError) as unknown:  # the valid ones are the enabled ones
        registry.select(["gpmm"], on)
    assert "ecc" not in str(unknown.value) and "nvlink-per-link" not in str(unknown.value)
    with pytest.raises(registry.SelectError, match=r"valid: gpu, host, gpm$"):
        registry.select(["gpmm"], frozenset({"gpm"}))
    with pytest.raises(registry.SelectError, match=r"'ecc' is disabled \(--collector.ecc enables it\)"):
        registry.select(["ecc"], on)
    with pytest.raises(registry.SelectError, match="at most"):
        registry.select(["gpm"] * (registry.MAX_SELECT + 1), on)
    with pytest.raises(registry.SelectError) as err:
        registry.select(["x" * 10_000 + "\x00"], on)
    assert len(str(err.value)) < 600


def test_a_collector_that_fails_to_render_costs_its_own_families(procfs, caplog):
    fake = FakeNvml(2)
    s = make_sampler(fake, procfs.root, specs=SPECS)
    try:
        for _ in range(2):
            s.tick()
            procfs.advance(busy=[10, 20], idle=[90, 80])
        collector = SnapshotCollector(lambda: s.snapshot, specs=SPECS, collectors=registry.ALL)

        def broken(snap):
            raise RuntimeError("bug")
            yield  # a generator, as the real ones

        collector._groups = tuple((name, rows, (broken,) if name == "cpu-per-core" else methods)
                                  for name, rows, methods in collector._groups)
        for _ in range(3):
            fams = {m.name: m for m in collector.collect()}
    finally:
        s.stop()
    success = {x.labels["collector"]: x.value for x in fams["exporter_collector_success"].samples}
    assert success.pop("cpu-per-core") == 0 and set(success.values()) == {1}
    assert set(success) | {"cpu-per-core"} == {g for g in registry.GROUPS if registry.enabled(registry.ALL, g)}
    assert "host_cpu_core_utilization_ratio" not in fams and fams["host_cpu_utilization_ratio"].samples
    durations = [x.value for x in fams["exporter_collector_duration_seconds"].samples]
    assert len(durations) == len(success) + 1 and all(0 <= d < 5 for d in durations)
    assert caplog.text.count("collector cpu-per-core failed to render") == 1  # once per transition


def test_the_pod_labels_come_from_the_snapshot_the_scrape_read(procfs):
    """One snapshot per scrape: the pod labels and the GPU series are read from the same object."""
    fake = FakeNvml(2)
    s = make_sampler(fake, procfs.root)
    reads = []
    try:
        s.tick()
        uuid = s.snapshot.gpus[1].identity.uuid
        pods = PodResources(up=True, holders=((uuid, (ContainerRef("tts", "synth-0", "model"),)),))
        import dataclasses

        snap = dataclasses.replace(s.snapshot, pods=pods)

        def snapshot():
            reads.append(1)
            return snap

        fams = {m.name: m for m in SnapshotCollector(snapshot, pod_labels=True, collectors=registry.ALL).collect()}
    finally:
        s.stop()
    assert len(reads) == 1
    assert {x.labels.get("pod") for x in fams["gpu_up"].samples} == {"synth-0", None}
    assert [x.labels["pod"] for x in fams["gpu_pod_info"].samples] == ["synth-0"]


@pytest.mark.e2e
def test_collect_param_scrapes_a_subset(exporter_proc):
    from tests.conftest import http_get

    p = exporter_proc("--fake-gpus", "1", "--sample.interval", "100ms")
    p.wait_for_sample(needle=b"gpu_sm_active_ratio{")
    status, headers, body = http_get(p.url + "/metrics?collect[]=gpm&collect[]=host")
    text = body.decode()
    assert status == 200, text
    assert "gpu_sm_active_ratio{" in text and "host_cpu_utilization_ratio " in text
    assert "gpu_up{" not in text and "gpu_nvlink" not in text and "host_cpu_core_utilization_ratio" not in text
    assert "exporter_build_info{" in text and "process_cpu_seconds_total" in text  # the exporter's own, always
    health = sorted(re.findall(r'exporter_collector_success\{collector="([a-z-]+)"\} 1', text))
    assert health == ["exporter", "gpm", "host"]
    whole = http_get(p.url + "/metrics")[2].decode()
    assert "gpu_up{" in whole and whole.count("exporter_collector_success{") == 3 + len(registry.DEFAULT)
    for query, needle in [("collect[]=gpmm", "unknown collector 'gpmm'; valid: gpu, host, gpm, nvlink"),
                          ("collect[]=ecc", "'ecc' is disabled (--collector.ecc enables it)"),
                          ("&".join(["collect[]=gpm"] * 30), "at most"),
                          ("&".join(["x=1"] * 40), "more than 32 query parameters"),
                          ("collect[]=" + "a" * 2000, "longer than 1024 bytes")]:
        status, _, body = http_get(p.url + "/metrics?" + query)
        assert status == 400 and needle in body.decode() and body.count(b"\n") == 1, (query, body)
    assert http_get(p.url + "/metrics?unrelated=1")[0] == 200  # other parameters are ignored, as node_exporter


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=1500) | st.lists(st.sampled_from(list(registry.GROUPS) + ["", "x", "gpm%00", "ecc"]),
                                         max_size=40).map(lambda names: "&".join(f"collect[]={n}" for n in names)))
def test_collect_query_fuzzed(query):
    """Any query string: a checked selection or ValueError with a short message, never another exception."""
    from exporter.web.server import collect_params

    try:
        chosen = registry.select(collect_params(query), registry.DEFAULT)
    except ValueError as exc:
        assert len(str(exc)) < 600
    else:
        assert "exporter" in chosen and chosen <= set(registry.GROUPS)
