from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from exporter.pipeline.collectors import ALL as ALL_COLLECTORS, nvml_options
from exporter.pipeline.collector import SnapshotCollector
from exporter.fake.nvml import FakeNvml
from exporter.pipeline.histogram import HistogramSnapshot
from exporter.pipeline.sampler import Sampler
from exporter.sources.nvml import NvmlSource
from exporter.sources.nvml.specs import GPU_SCALARS
from exporter.sources.procfs import ProcfsSource
from testkit.processes import (  # noqa: F401  (tests import these from here)
    REPO,
    STACK_PODS,
    ExporterProcess,
    PrometheusServer,
    Stack,
    find_tool,
    free_port,
    http_get,
    read_until_closed,
    start_fake_kubelet,
    stop_process,
)


STAT_TEMPLATE = """cpu  {a0} 0 {s0} {i0} 0 0 0 0 0 0
cpu0 {a1} 0 {s1} {i1} 0 0 0 0 0 0
cpu1 {a2} 0 {s2} {i2} 0 0 0 0 0 0
intr 1 2 3
ctxt 123
btime 1700000000
"""
MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8192000 kB\n"


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcfs:
    """A procfs tree in a tmp dir with /proc/stat counters a test can advance."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cores = [[100, 50, 850], [100, 50, 850]]  # user, system, idle per core
        root.mkdir(parents=True, exist_ok=True)
        (root / "meminfo").write_text(MEMINFO)
        self.write()

    def advance(self, busy: list[int], idle: list[int]) -> None:
        for core, b, i in zip(self.cores, busy, idle):
            core[0] += b
            core[2] += i
        self.write()

    def add_process(self, pid: int, name: str, cgroup: str) -> None:
        """<pid>/{stat,cmdline,comm,cgroup} as the kernel writes them: stat and comm cut the name at 15."""
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        fields = ["S", "1"] + ["0"] * 48  # state, ppid, then zeros (started 0 jiffies after boot)
        (d / "stat").write_text(f"{pid} ({name[:15]}) {' '.join(fields)}\n")
        (d / "cmdline").write_text(f"/usr/bin/{name}\0--port\0" + "9000\0")
        (d / "comm").write_text(name[:15] + "\n")
        (d / "cgroup").write_text(cgroup)

    def write(self) -> None:
        c0, c1 = self.cores
        agg = [c0[j] + c1[j] for j in range(3)]
        (self.root / "stat").write_text(STAT_TEMPLATE.format(
            a0=agg[0], s0=agg[1], i0=agg[2], a1=c0[0], s1=c0[1], i1=c0[2], a2=c1[0], s2=c1[1], i2=c1[2]))


@pytest.fixture
def procfs(tmp_path: Path) -> FakeProcfs:
    return FakeProcfs(tmp_path / "proc")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def make_sampler(nvml: FakeNvml | None, procfs_root: Path, interval: float = 0.2, clock=time.monotonic,
                 mode: str = "fake", collectors: frozenset[str] = ALL_COLLECTORS, specs: tuple = GPU_SCALARS,
                 **extra) -> Sampler:
    """Every collector on unless told otherwise: tests see every family (test_collectors.py: the defaults)."""
    return Sampler(NvmlSource(nvml, mode, backoff_initial_s=0.01, backoff_max_s=0.02, clock=clock,
                              **nvml_options(collectors, specs)),
                   ProcfsSource(procfs_root), interval=interval, clock=clock, **extra)


def fraction_at_or_below(h: HistogramSnapshot, bound: float) -> float | None:
    """Share of a histogram's observations <= bound (one of its bucket bounds), as PromQL's bucket/count."""
    if h.count == 0:
        return None
    return h.cumulative[h.bounds.index(bound)] / h.count


def families(sampler: Sampler, collectors: frozenset[str] = ALL_COLLECTORS) -> dict:
    """name -> Metric from one collect(), keyed by the family name as exposed (counters without _total)."""
    return {m.name: m for m in SnapshotCollector(lambda: sampler.snapshot, collectors=collectors).collect()}


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("prom"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def exporter_proc() -> Iterator[type[ExporterProcess]]:
    started: list[ExporterProcess] = []

    class Tracked(ExporterProcess):
        def __init__(self, *args: str, **kw) -> None:
            super().__init__(*args, **kw)
            started.append(self)

    yield Tracked
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def nvml_stub_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C stand-in for libnvidia-ml.so.1, built once per session (testkit/nvml_stub)."""
    from testkit.nvml_stub import build

    return build(tmp_path_factory.mktemp("nvml-stub"))


@pytest.fixture
def nvml_stub(nvml_stub_lib: Path, tmp_path: Path) -> Iterator["NvmlStub"]:  # noqa: F821
    """A stand-in with its own config file; `bind()` points this process's pynvml at it until the test ends."""
    from testkit.nvml_stub import NvmlStub

    stub = NvmlStub(nvml_stub_lib, tmp_path / "nvml-stub.conf")
    yield stub
    stub.unbind()
