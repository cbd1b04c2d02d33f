from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.sources.procfs import CpuTimes, ProcfsSource, parse_meminfo, parse_proc_stat, utilization


def test_parse_proc_stat_aggregate_and_cores():
    text = ("cpu  10 1 5 80 4 0 0 0 3 0\n"
            "cpu0 6 1 3 40 2 0 0 0 3 0\n"
            "cpu1 4 0 2 40 2 0 0 0 0 0\n"
            "intr 5\n")
    t = parse_proc_stat(text)
    assert set(t) == {"all", "0", "1"}
    # guest (9th column) is already inside user, so it is not added again; iowait counts as idle.
    assert t["all"] == CpuTimes(busy=16, total=100)
    assert t["0"] == CpuTimes(busy=10, total=52)


def test_utilization_uses_deltas_not_since_boot_average():
    boot_avg_idle = CpuTimes(busy=10, total=1000)  # 1 % busy since boot
    now_busy = CpuTimes(busy=10 + 90, total=1000 + 100)  # 90 % busy over the last interval
    assert utilization(boot_avg_idle, now_busy) == 0.9


def test_utilization_rejects_counters_going_backwards_and_first_read():
    assert utilization(None, CpuTimes(5, 10)) is None
    assert utilization(CpuTimes(50, 100), CpuTimes(40, 90)) is None
    assert utilization(CpuTimes(50, 100), CpuTimes(50, 100)) is None  # no time passed
    assert utilization(CpuTimes(50, 100), CpuTimes(70, 110)) is None  # busy grew more than total


def test_malformed_lines_are_skipped():
    text = "cpu  1 2 3 4\ncpu0 x y z w\ncpux 1 2 3 4\ncpu1 1 2\ncpu2 -1 2 3 4\ncpu3 1 1 1 1\n"
    t = parse_proc_stat(text)
    assert set(t) == {"all", "3"}


def test_source_per_core_and_hotplug(procfs):
    src = ProcfsSource(procfs.root)
    first = src.read()
    assert first.cpu_utilization is None and first.core_utilization == ()  # no delta yet
    assert first.memory_total_bytes == 16384000 * 1024
    assert first.memory_available_bytes == 8192000 * 1024
    procfs.advance(busy=[30, 10], idle=[70, 90])
    r = src.read()
    assert dict(r.core_utilization) == {"0": 0.3, "1": 0.1}
    assert abs(r.cpu_utilization - 0.2) < 1e-9
    # CPU 1 goes offline: it drops out, the aggregate keeps working.
    procfs.advance(busy=[50, 0], idle=[50, 0])
    text = (procfs.root / "stat").read_text().splitlines()
    (procfs.root / "stat").write_text("\n".join(line for line in text if not line.startswith("cpu1")) + "\n")
    r = src.read()
    assert [c for c, _ in r.core_utilization] == ["0"]
    assert r.errors == ()


def test_missing_and_truncated_files_are_errors_not_exceptions(procfs):
    src = ProcfsSource(procfs.root)
    (procfs.root / "stat").write_text("cpu")  # truncated mid-line
    (procfs.root / "meminfo").unlink()
    r = src.read()
    assert r.cpu_utilization is None and r.memory_total_bytes is None
    assert set(r.errors) == {"stat", "meminfo"}


def test_parse_meminfo_units():
    m = parse_meminfo("MemTotal: 2 kB\nHugePages_Total: 3\nbroken line\nX:\n")
    assert m == {"MemTotal": 2048, "HugePages_Total": 3}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("cpu0123456789 -\nabx:kB"), max_size=400))
def test_parsers_never_raise_on_garbage(text):
    for times in parse_proc_stat(text).values():
        assert 0 <= times.busy <= times.total
    for value in parse_meminfo(text).values():
        assert value >= 0
