from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.sources.kernfile import MAX_BYTES, KernelFile, read_once
from exporter.sources.procfs import CpuTimes, ProcfsSource, parse_proc_stat, utilization
from tests.conftest import MEMINFO, FakeProcfs


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


def test_a_cpu_offlined_in_the_middle_keeps_the_others_numbers(procfs):
    """Why /proc/stat is not read through psutil: its per-CPU list has no CPU numbers, so with cpu1 of
    cpu0..cpu2 offline, cpu2 would come back as "1" and be compared with cpu1's counters."""
    def write(cores):
        lines = [f"cpu  {sum(b for b, _ in cores.values())} 0 0 {sum(i for _, i in cores.values())} 0 0 0 0 0 0"]
        lines += [f"cpu{n} {b} 0 0 {i} 0 0 0 0 0 0" for n, (b, i) in cores.items()]
        (procfs.root / "stat").write_text("\n".join(lines) + "\nintr 1\n")

    src = ProcfsSource(procfs.root)
    write({0: (100, 900), 1: (500, 500), 2: (10, 990)})
    src.read()
    write({0: (110, 990), 2: (100, 1000)})  # cpu1 offline; cpu0 10 % busy, cpu2 90 % busy since
    assert dict(src.read().core_utilization) == {"0": pytest.approx(0.1), "2": pytest.approx(0.9)}


def test_missing_and_truncated_files_are_errors_not_exceptions(procfs):
    src = ProcfsSource(procfs.root)
    (procfs.root / "stat").write_text("cpu")  # truncated mid-line
    (procfs.root / "meminfo").unlink()
    r = src.read()
    assert r.cpu_utilization is None and r.memory_total_bytes is None
    assert set(r.errors) == {"stat", "meminfo"}


def test_memory_through_psutil_in_kib_and_estimated_without_memavailable(procfs):
    src = ProcfsSource(procfs.root)
    r = src.read()
    assert (r.memory_total_bytes, r.memory_available_bytes) == (16384000 * 1024, 8192000 * 1024)
    # A kernel before 3.14 has no MemAvailable: psutil estimates it (here from MemFree), no error.
    (procfs.root / "meminfo").write_text("MemTotal: 2048 kB\nMemFree: 1024 kB\n")
    r = src.read()
    assert (r.memory_total_bytes, r.memory_available_bytes, r.errors) == (2048 * 1024, 1024 * 1024, ())
    (procfs.root / "meminfo").write_text("MemTotal: 2048 kB\nMemFree:\n")  # truncated mid-line
    assert src.read().errors == ("meminfo",)


def test_procfs_files_are_read_only_by_their_own_source(procfs, tmp_path):
    """psutil.PROCFS_PATH is global: each source sets its own before reading."""
    other = FakeProcfs(tmp_path / "other")
    (other.root / "meminfo").write_text(MEMINFO.replace("16384000", "1000"))
    a, b = ProcfsSource(procfs.root), ProcfsSource(other.root)
    assert (a.read().memory_total_bytes, b.read().memory_total_bytes, a.read().memory_total_bytes) == (
        16384000 * 1024, 1000 * 1024, 16384000 * 1024)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("cpu0123456789 -\nabx:kB"), max_size=400))
def test_proc_stat_parser_never_raises_on_garbage(text):
    for times in parse_proc_stat(text).values():
        assert 0 <= times.busy <= times.total


PROC_FILE_TEXT = st.one_of(
    st.binary(max_size=2000),
    st.text(alphabet=st.sampled_from("cpu0123456789 -+_.\n\tMemTotalAvailbFrkB:\u00b2"), max_size=2000).map(str.encode),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stat=PROC_FILE_TEXT, meminfo=PROC_FILE_TEXT)
def test_source_survives_arbitrary_bytes_in_its_files(procfs, stat, meminfo):
    """Hostile or truncated /proc files: never an exception, never a value out of range, bounded time."""
    src = ProcfsSource(procfs.root)
    src.read()
    (procfs.root / "stat").write_bytes(stat)
    (procfs.root / "meminfo").write_bytes(meminfo)
    started = time.monotonic()
    r = src.read()
    assert time.monotonic() - started < 1.0
    assert set(r.errors) <= {"stat", "meminfo"}
    for value in [r.cpu_utilization] + [v for _, v in r.core_utilization]:
        assert value is None or 0 <= value <= 1
    assert (r.memory_total_bytes is None) == ("meminfo" in r.errors)


def test_a_fifo_or_a_device_is_refused_without_blocking(procfs):
    os.unlink(procfs.root / "stat")
    os.mkfifo(procfs.root / "stat")
    os.unlink(procfs.root / "meminfo")
    os.mkfifo(procfs.root / "meminfo")
    done = []
    t = threading.Thread(target=lambda: done.append(ProcfsSource(procfs.root).read()), daemon=True)
    t.start()
    t.join(5)  # bounded: a blocking open would never return (no writer ever comes)
    assert done and set(done[0].errors) == {"stat", "meminfo"}
    with pytest.raises(OSError, match="not a regular file"):
        read_once("/dev/zero")  # endless: refused before a byte is read


def test_an_oversized_file_is_an_error_not_a_memory_blowup(tmp_path):
    big = tmp_path / "stat"
    big.write_bytes(b"cpu  1 2 3 4\n" + b"x" * (MAX_BYTES + 1))
    with pytest.raises(OSError, match="larger than"):
        KernelFile(big).read()
