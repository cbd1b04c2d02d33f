"""cgroup v2/v1 accounting, container/pod attribution for every cgroup layout, /dev/shm."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.pipeline.collectors import ALL as ALL_COLLECTORS, nvml_options
from exporter.sources.nvml.specs import GPU_SCALARS
from exporter.fake.nvml import FakeNvml
from exporter.sources.cgroup import (
    CgroupPathError,
    CgroupSource,
    container_of,
    locate,
    parse_cpu_max,
    parse_keyed,
    parse_limit,
    parse_proc_cgroup,
)
from exporter.sources.processes import ProcessAttributor, ProcessIdentity
from exporter.sources.shm import read_shm
from tests.conftest import families, make_sampler

CID = "3f2a" + "0" * 56 + "beef"
UID = "0e3c6d1a-8a7b-4c2d-9e1f-123456789abc"
LAYOUTS = {
    "v2 systemd containerd": (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                              f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n", CID, UID),
    "v2 systemd cri-o guaranteed": (f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope\n",
                                    CID, UID),
    "v1 cgroupfs kubepods": (f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n"
                             f"4:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/"
                             f"pod{UID}/{CID}\n", CID, UID),
    "v2 docker": (f"0::/system.slice/docker-{CID}.scope\n", CID, ""),
    "v1 docker": (f"5:cpu,cpuacct:/docker/{CID}\n3:memory:/docker/{CID}\n", CID, ""),
    "not in a container": ("0::/user.slice/user-1000.slice/session-2.scope\n", "", ""),
    "v1 host process": ("4:cpu,cpuacct:/\n3:memory:/user.slice\n", "", ""),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_container_and_pod_from_every_cgroup_layout(layout):
    text, container, pod = LAYOUTS[layout]
    assert container_of(parse_proc_cgroup(text)) == (container, pod)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789abcdef:/-_.podkubeslicescrio\n"), max_size=3000)
       | st.text(max_size=500))
def test_proc_cgroup_parsing_fuzzed(text):
    """/proc/<pid>/cgroup of any process on the node: never raises, ids have their fixed shapes."""
    container, pod = container_of(parse_proc_cgroup(text))
    assert container == "" or (len(container) == 64 and set(container) <= set("0123456789abcdef"))
    assert pod == "" or len(pod) == 36


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(root: Path, rel: str, usage_us: int, periods: int, throttled: int, throttled_us: int,
            cpu_max: str = "150000 100000", mem_max: str = "4294967296") -> None:
    write(root / "cgroup.controllers", "cpu memory\n")
    d = root / rel.lstrip("/")
    write(d / "cpu.stat", f"usage_usec {usage_us}\nuser_usec 1\nsystem_usec 1\nnr_periods {periods}\n"
                          f"nr_throttled {throttled}\nthrottled_usec {throttled_us}\n")
    write(d / "cpu.max", cpu_max + "\n")
    write(d / "memory.current", "1048576\n")
    write(d / "memory.max", mem_max + "\n")


def test_v2_counters_advance_and_limits(tmp_path):
    root = tmp_path / "cgroup"
    rel = "/kubepods.slice/tts.scope"
    v2_tree(root, rel, 1_000_000, 10, 2, 50_000)
    src = CgroupSource(root, path=rel)
    r = src.read()
    assert src.v2 and r.path == rel and r.errors == ()
    assert (r.cpu_usage_seconds, r.cpu_periods, r.cpu_throttled_periods) == (1.0, 10, 2)
    assert r.cpu_throttled_seconds == pytest.approx(0.05) and r.cpu_limit_cores == 1.5
    assert (r.memory_usage_bytes, r.memory_limit_bytes) == (1048576, 4294967296)
    v2_tree(root, rel, 3_500_000, 30, 12, 650_000, cpu_max="max 100000", mem_max="max")
    r = src.read()  # same open files, new contents
    assert (r.cpu_usage_seconds, r.cpu_periods, r.cpu_throttled_periods) == (3.5, 30, 12)
    assert r.cpu_limit_cores is None and r.memory_limit_bytes is None  # unlimited: absent, not infinite


@pytest.mark.parametrize("own,usage", [("/pod/exporter", 5), ("/", 7)])
def test_v2_own_cgroup_from_proc_self(tmp_path, own, usage):
    """Own cgroup from /proc/self/cgroup; "/" (a private cgroup namespace) is the mount root itself."""
    root = tmp_path / "cgroup"
    v2_tree(root, own, usage, 0, 0, 0)
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text(f"0::{own}\n")
    assert CgroupSource(root, self_cgroup=self_cgroup).read().cpu_usage_seconds == usage / 1e6


@pytest.mark.parametrize("combined", [True, False])
def test_v1_fallback(tmp_path, combined):
    root = tmp_path / "cgroup"
    rel = f"/kubepods/burstable/pod{UID}/{CID}"
    cpu = root / ("cpu,cpuacct" if combined else "cpu") / rel.lstrip("/")
    acct = cpu if combined else root / "cpuacct" / rel.lstrip("/")
    write(cpu / "cpu.stat", "nr_periods 40\nnr_throttled 10\nthrottled_time 2500000000\n")
    write(cpu / "cpu.cfs_quota_us", "50000\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    write(acct / "cpuacct.usage", "12000000000\n")
    write(root / "memory" / rel.lstrip("/") / "memory.usage_in_bytes", "2048\n")
    write(root / "memory" / rel.lstrip("/") / "memory.limit_in_bytes", "9223372036854771712\n")
    self_cgroup = tmp_path / "self"
    ctrl = "cpu,cpuacct" if combined else "cpu"
    self_cgroup.write_text(f"4:{ctrl}:{rel}\n3:memory:{rel}\n" + ("" if combined else f"2:cpuacct:{rel}\n"))
    src = CgroupSource(root, self_cgroup=self_cgroup)
    r = src.read()
    assert not src.v2 and r.errors == ()
    assert (r.cpu_usage_seconds, r.cpu_periods, r.cpu_throttled_periods) == (12.0, 40, 10)
    assert r.cpu_throttled_seconds == 2.5 and r.cpu_limit_cores == 0.5
    assert r.memory_usage_bytes == 2048 and r.memory_limit_bytes is None  # PAGE_COUNTER_MAX = unlimited


def test_missing_files_are_errors_not_exceptions(tmp_path):
    root = tmp_path / "cgroup"
    v2_tree(root, "/x", 1, 0, 0, 0)
    src = CgroupSource(root, path="/x")
    (root / "x" / "cpu.stat").unlink()
    src._files["cpu.stat"].close()
    r = src.read()
    assert "cpu.stat" in r.errors and r.cpu_usage_seconds is None and r.memory_usage_bytes == 1048576


def test_parse_cpu_max():
    assert parse_cpu_max("max 100000") is None and parse_cpu_max("250000 100000") == 2.5
    for bad in ("1.5 100000", "100000 0", "max 0", "abc def", "100000", "", "1 2 3", "-5 100000", "9" * 30 + " 1"):
        with pytest.raises(ValueError):
            parse_cpu_max(bad)


def test_parse_keyed_and_limit_refuse_garbage():
    assert parse_keyed("usage_usec 5\n\nnr_periods 0\n") == {"usage_usec": 5, "nr_periods": 0}
    for bad in ("usage_usec five", "usage_usec", "a 1 2", "x -1", "x 1e3", "x \u00b2"):
        with pytest.raises(ValueError):
            parse_keyed(bad)
    assert parse_limit("max") is None and parse_limit("-1") is None and parse_limit("4096\n") == 4096
    assert parse_limit("9223372036854771712") is None  # v1's "no limit"


V2_FILES = ("cpu.stat", "cpu.max", "memory.current", "memory.max")


@pytest.mark.parametrize("name,content", [
    ("cpu.max", b"1.5 100000\n"),  # not an integer
    ("cpu.max", b"100000 0\n"),  # period 0
    ("cpu.stat", b"\x00\x01garbage here\n"),
    ("memory.current", b"\xff\xfe1048576\n"),  # not UTF-8
    ("memory.max", b""),  # truncated to nothing
])
def test_a_malformed_file_costs_its_own_values_only(tmp_path, name, content):
    root = tmp_path / "cgroup"
    v2_tree(root, "/tts", 2_000_000, 100, 25, 400_000)
    (root / "tts" / name).write_bytes(content)
    r = CgroupSource(root, path="/tts").read()
    assert r.errors == (name,)
    values = {"cpu.stat": r.cpu_periods, "cpu.max": r.cpu_limit_cores, "memory.current": r.memory_usage_bytes,
              "memory.max": r.memory_limit_bytes}
    assert values.pop(name) is None
    assert None not in values.values()  # the other files still report


CGROUP_FILE_TEXT = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet=st.sampled_from("0123456789 -max\nusec_nr\t.\u00b2"), max_size=300).map(str.encode),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.tuples(*[CGROUP_FILE_TEXT] * 6), v2=st.booleans())
def test_cgroup_source_survives_arbitrary_bytes(tmp_path_factory, contents, v2):
    root = tmp_path_factory.mktemp("cg")
    if v2:
        v2_tree(root, "/t", 1, 1, 1, 1)
        names, dirs = V2_FILES, [root / "t"] * 4
    else:
        names = ("cpu.stat", "cpu.cfs_quota_us", "cpu.cfs_period_us", "cpuacct.usage", "memory.usage_in_bytes",
                 "memory.limit_in_bytes")
        dirs = [root / "cpu,cpuacct" / "t"] * 4 + [root / "memory" / "t"] * 2
    for name, d, content in zip(names, dirs, contents):
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content)
    r = CgroupSource(root, path="/t").read()
    assert set(r.errors) <= set(names)
    for value in (r.cpu_usage_seconds, r.cpu_periods, r.cpu_throttled_periods, r.cpu_throttled_seconds,
                  r.cpu_limit_cores, r.memory_usage_bytes, r.memory_limit_bytes):
        assert value is None or value >= 0


def test_an_explicit_cgroup_that_does_not_exist_is_refused(tmp_path):
    """Not the root's figures under the wrong name (the path may be misspelt)."""
    root = tmp_path / "cgroup"
    v2_tree(root, "/tts", 1, 0, 0, 0)
    with pytest.raises(CgroupPathError, match="no cgroup '/tts-typo'"):
        locate(root, "/tts-typo")
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "tts" / "memory.usage_in_bytes", "5\n")
    with pytest.raises(CgroupPathError):
        locate(v1, "/other")
    # v1, present under one controller only: that controller is read, the others are not (no root figures).
    assert set(locate(v1, "/tts").files) == {"memory.usage_in_bytes", "memory.limit_in_bytes"}
    with pytest.raises(CgroupPathError):
        locate(tmp_path / "no-cgroupfs", "/tts")


def test_attribution_of_gpu_processes(tmp_path, procfs):
    procfs.add_process(4000, "chattts-server", LAYOUTS["v2 systemd containerd"][0])
    procfs.add_process(4001, "python", LAYOUTS["not in a container"][0])
    attributor = ProcessAttributor(procfs.root)
    who = attributor.lookup([4000, 4001, 4999])  # 4999 exited before we looked: empty labels, no error
    assert who[4000].comm == "chattts-server" and (who[4000].container_id, who[4000].pod_uid) == (CID, UID)
    assert who[4001].container_id == "" and who[4999].comm == ""
    procfs.add_process(4000, "renamed", LAYOUTS["v2 systemd containerd"][0])
    assert attributor.lookup([4000])[4000].comm == "chattts-server"  # cached while the pid lives
    attributor.lookup([])  # 4000 exited: forgotten
    assert attributor.lookup([4000])[4000].comm == "renamed"


def test_process_name_is_not_cut_at_15_characters(procfs):
    """psutil completes the kernel's 15-character comm from the command line."""
    procfs.add_process(4000, "chattts-inference-server", LAYOUTS["v2 docker"][0])
    assert (procfs.root / "4000" / "comm").read_text() == "chattts-inferen\n"
    assert ProcessAttributor(procfs.root).lookup([4000])[4000].comm == "chattts-inference-server"


@pytest.mark.parametrize("damage", ["stat", "cgroup", "fifo"])
def test_a_process_with_unreadable_files_gets_empty_labels(procfs, damage):
    procfs.add_process(4000, "tts", LAYOUTS["v2 docker"][0])
    target = procfs.root / "4000" / ("stat" if damage != "cgroup" else "cgroup")
    target.unlink()
    if damage == "fifo":
        os.mkfifo(target)
    else:
        target.write_bytes(b"\xff garbage (")
    assert ProcessAttributor(procfs.root).lookup([4000])[4000] == ProcessIdentity()


def test_process_series_appear_and_vanish_with_labels(procfs):
    procfs.add_process(4000, "chattts-server", LAYOUTS["v1 cgroupfs kubepods"][0])
    fake = FakeNvml(2)
    fake.set_processes(0, [(4000, 3 * 2**30), (7777, None)])
    fake.set_processes(1, [])
    s = make_sampler(fake, procfs.root, attributor=ProcessAttributor(procfs.root))
    s.tick()
    fams = families(s)
    mem = {(x.labels["gpu"], x.labels["pid"]): x for x in fams["gpu_process_memory_used_bytes"].samples}
    assert set(mem) == {("0", "4000")}  # 7777's memory is "not available": no value, no made-up zero
    labels = mem[("0", "4000")].labels
    assert (labels["comm"], labels["container_id"], labels["pod_uid"]) == ("chattts-server", CID, UID)
    assert mem[("0", "4000")].value == 3 * 2**30
    assert {x.labels["pid"] for x in fams["gpu_process_sm_utilization_ratio"].samples} == {"4000", "7777"}
    fake.set_processes(0, [])
    for reader in s.nvml.gpus:
        reader._last_refresh.clear()  # skip the 1 s refresh wait
    s.tick()
    assert "gpu_process_memory_used_bytes" not in families(s)  # an empty family is not rendered at all


def test_processes_collector_can_be_switched_off(procfs):
    from exporter.pipeline.sampler import Sampler
    from exporter.sources.nvml import NvmlSource
    from exporter.sources.procfs import ProcfsSource

    fake = FakeNvml(1)
    s = Sampler(NvmlSource(fake, "fake", **nvml_options(ALL_COLLECTORS - {"processes"}, GPU_SCALARS)),
                ProcfsSource(procfs.root))
    s.tick()
    assert "gpu_process_memory_used_bytes" not in families(s)
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 0


def test_cgroup_and_shm_families(tmp_path, procfs):
    root = tmp_path / "cgroup"
    v2_tree(root, "/tts", 2_000_000, 100, 25, 400_000)
    shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    s = make_sampler(FakeNvml(1), procfs.root, cgroup=CgroupSource(root, path="/tts"), shm_path=shm_dir)
    s.tick()
    fams = families(s)
    assert fams["cgroup_cpu_throttled_periods"].samples[0].value == 25
    assert fams["cgroup_cpu_throttled_periods"].samples[0].labels == {"cgroup": "/tts"}
    assert fams["cgroup_cpu_limit_cores"].samples[0].value == 1.5
    st = os.statvfs(shm_dir)
    assert fams["host_shm_size_bytes"].samples[0].value == st.f_blocks * st.f_frsize
    with pytest.raises(OSError):
        read_shm(str(tmp_path / "missing"))  # the sampler counts and logs it (test_faults.py)
