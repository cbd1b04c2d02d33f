from __future__ import annotations

import logging
import threading
import time

import pynvml
import pytest

from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.pipeline.histogram import RATIO_BUCKETS
from exporter.sources.cgroup import CgroupReading
from exporter.sources.processes import ProcessAttributor
from exporter.sources.nvml.specs import SAMPLE_BUFFER_SECONDS, UTILIZATION
from tests.conftest import fraction_at_or_below, make_sampler


def test_tick_publishes_an_immutable_snapshot(procfs):
    s = make_sampler(FakeNvml(2), procfs.root)
    assert s.snapshot.sequence == 0
    s.tick()
    procfs.advance(busy=[30, 10], idle=[70, 90])
    snap = s.tick()
    assert s.snapshot is snap and snap.sequence == 2
    assert [g.identity.index for g in snap.gpus] == [0, 1]
    assert all(g.up for g in snap.gpus)
    assert snap.host.cpu_utilization == pytest.approx(0.2)
    assert snap.host_cpu_hist.count == 1  # the first tick has no CPU delta
    with pytest.raises(AttributeError):
        snap.sequence = 5  # frozen


def test_polled_histograms_without_a_driver_buffer(procfs, clock):
    """MIG or old boards: no nvmlDeviceGetSamples, so each tick's polled value is observed."""
    fake = FakeNvml(1, spec=FakeGpuSpec(low_fraction=0.3, duty_period_s=2.0), clock=clock)
    fake.inject("nvmlDeviceGetSamples", gpu=0, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = make_sampler(fake, procfs.root, interval=0.1, clock=clock)
    expected_low = 0
    n = 200  # 20 s of fake time at 100 ms
    for _ in range(n):
        util = fake.utilization_at(0, clock() - fake.t0)
        expected_low += util <= 40
        s.tick()
        clock.advance(0.1)
    h = s.snapshot.gpus[0].utilization_hist
    assert h.count == n
    assert h.cumulative[RATIO_BUCKETS.index(0.4)] == expected_low  # every sample, none lost
    assert fraction_at_or_below(h, 0.4) == pytest.approx(0.3, abs=0.03)
    rx = dict(s.snapshot.gpus[0].pcie_utilization_hist)["rx"]
    assert rx.count == n - 1  # the first counter read has no rate


def test_a_hung_gpu_does_not_stall_the_others(procfs):
    fake = FakeNvml(3)
    s = make_sampler(fake, procfs.root, interval=0.1)
    s.tick()
    fake.inject("nvmlDeviceGetPowerUsage", gpu=1, latency_s=1.5, times=1)
    started = time.monotonic()
    snap = s.tick()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0  # the tick gave up on GPU 1 at its deadline instead of waiting 1.5 s
    by_index = {g.identity.index: g for g in snap.gpus}
    assert by_index[0].up and by_index[2].up
    assert not by_index[1].up and by_index[1].stuck_call == "nvmlDeviceGetPowerUsage"
    assert dict(snap.stats.errors)[("nvml", "nvmlDeviceGetPowerUsage")] == 1
    ok, reason = s.health()
    assert "gpu 1: stuck in nvmlDeviceGetPowerUsage" in reason
    # Once the call returns, the GPU is read again and comes back up.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        snap = s.tick()
        if all(g.up for g in snap.gpus):
            break
        time.sleep(0.1)
    assert all(g.up for g in snap.gpus)
    assert dict(snap.stats.errors)[("nvml", "nvmlDeviceGetPowerUsage")] == 1  # counted once, not per tick


def test_lost_gpu_is_down_and_others_keep_updating(procfs):
    fake = FakeNvml(2)
    s = make_sampler(fake, procfs.root)
    s.tick()
    fake.lose_gpu(0)
    snap = s.tick()
    g0, g1 = snap.gpus
    assert not g0.up and g0.reading.lost and g1.up
    assert g1.reading[UTILIZATION] is not None and g0.reading[UTILIZATION] is None
    assert s.tick().gpus[0].utilization_hist == g0.utilization_hist  # nothing observed while lost


def test_no_nvml_still_samples_the_host(procfs):
    s = make_sampler(FakeNvml(2, library_present=False), procfs.root, mode="real")
    s.tick()
    procfs.advance(busy=[10, 10], idle=[90, 90])
    snap = s.tick()
    assert snap.gpus == () and not snap.nvml.up and snap.nvml.mode == "absent"
    assert snap.host.cpu_utilization == pytest.approx(0.1)
    assert dict(snap.stats.errors)[("nvml", "nvmlInit")] >= 1


def test_clock_event_seconds_accumulate_per_tick(procfs, clock):
    fake = FakeNvml(1, clock=clock)
    fake.nvmlDeviceGetCurrentClocksEventReasons = lambda h: (
        pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown)
    s = make_sampler(fake, procfs.root, interval=0.25, clock=clock)
    for _ in range(4):
        s.tick()
        clock.advance(0.25)
    secs = dict(s.snapshot.gpus[0].clock_event_seconds)
    assert secs["sw_power_cap"] == pytest.approx(1.0) and secs["hw_thermal_slowdown"] == pytest.approx(1.0)
    assert "gpu_idle" not in secs  # a reason appears with its first active tick, not as a zero series


def test_loop_keeps_schedule_and_counts_overruns(procfs, clock):
    # The sampler's clock is the test's: the slow tick moves it by 0.18 s, and no other time passes on
    # it, so the count does not depend on how loaded the machine is.
    s = make_sampler(FakeNvml(1, clock=clock), procfs.root, interval=0.05, clock=clock)
    slow_once = {"done": False}
    real_tick = s.tick

    def tick(now=None):
        result = real_tick(now)
        if not slow_once["done"]:
            slow_once["done"] = True
            clock.advance(0.18)  # runs over three and a bit slots
        return result

    s.tick = tick
    s.start()
    deadline = time.monotonic() + 5
    while s.snapshot.sequence < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.stop()
    assert s.snapshot.stats.overruns == 3
    healthy, _ = s.health()
    assert healthy


def test_wait_first_tick_returns_once_a_snapshot_is_published(procfs):
    s = make_sampler(FakeNvml(1), procfs.root, interval=0.05)
    gate = threading.Event()
    real_tick = s.tick

    def tick(now=None):
        gate.wait(5)
        return real_tick(now)

    s.tick = tick
    s.start()
    try:
        assert not s.wait_first_tick(0.1) and s.snapshot.sequence == 0  # bounded while the tick is held
        gate.set()
        assert s.wait_first_tick(5) and s.snapshot.sequence >= 1
    finally:
        s.stop()


def test_health_turns_503_when_ticks_stop(procfs, clock):
    s = make_sampler(FakeNvml(1), procfs.root, interval=0.2, clock=clock)
    ok, reason = s.health()
    assert not ok and "not completed a tick" in reason
    s.tick()
    assert s.health()[0]
    clock.advance(1.01)  # more than 5 intervals
    ok, reason = s.health()
    assert not ok and "stalled" in reason


def test_driver_samples_catch_a_dip_between_ticks(procfs, clock):
    """Ticks 1 s apart; the driver samples every 62.5 ms; a 150 ms dip to 10 % in each second falls
    between ticks. The polled value never sees it; the histogram counts every dip sample exactly."""
    spec = FakeGpuSpec(driver_sample_period_s=1 / 16, driver_sample_depth=120)
    fake = FakeNvml(1, spec=spec, clock=clock)
    fake.utilization_at = lambda gpu, t: 10 if 0.375 <= t % 1.0 < 0.525 else 90
    s = make_sampler(fake, procfs.root, interval=1.0, clock=clock)
    first = s.tick()  # reads the whole buffer: measures its reach, counts nothing
    assert first.gpus[0].utilization_hist.count == 0
    assert first.gpus[0].reading[SAMPLE_BUFFER_SECONDS] == 119 / 16
    n = 10
    for _ in range(n):
        clock.advance(1.0)
        snap = s.tick()
        assert snap.gpus[0].reading[UTILIZATION] == 0.9  # the tick itself lands outside the dip
    h = snap.gpus[0].utilization_hist
    assert h.count == 16 * n  # every driver sample, none twice
    assert h.cumulative[RATIO_BUCKETS.index(0.4)] == 3 * n  # the three samples of each 150 ms dip
    assert fraction_at_or_below(h, 0.4) == 3 / 16


def test_driver_sample_quirks_are_filtered(procfs, clock):
    fake = FakeNvml(1, clock=clock)
    batches = [
        [(1_000_000, 50), (2_000_000, 60)],  # first read: the buffer
        [(0, 10), (2_000_000, 60), (3_000_000, 250), (4_000_000, 20)],  # ts 0, repeat, value > 100
        "NotFound",  # nothing new
        [(5_000_000, 30)],
    ]
    seen = []

    def samples(handle, sampling_type, timeStamp):
        seen.append(timeStamp)
        batch = batches[len(seen) - 1]
        if batch == "NotFound":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        out = []
        for ts, value in batch:
            sample = pynvml.c_nvmlSample_t()
            sample.timeStamp, sample.sampleValue.uiVal = ts, value
            out.append(sample)
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, out

    fake.nvmlDeviceGetSamples = samples
    s = make_sampler(fake, procfs.root, clock=clock)
    readings = [s.tick().gpus[0].reading for _ in range(4)]
    assert [r.utilization_samples for r in readings] == [(), (0.2,), (), (0.3,)]
    assert seen == [0, 2_000_000, 4_000_000, 4_000_000]  # last_seen only from returned timestamps
    assert readings[0][SAMPLE_BUFFER_SECONDS] == 1.0
    assert all(r.ok for r in readings)  # NotFound is not an error


def test_nvml_duration_is_the_gpu_reads_only(procfs):
    s = make_sampler(FakeNvml(1), procfs.root)
    real_read = s.procfs.read

    def slow_read():
        time.sleep(0.05)  # procfs runs while the GPUs are read: it must not count as NVML time
        return real_read()

    s.procfs.read = slow_read
    for _ in range(3):
        s.tick()
    s.stop()
    durations = dict(s.snapshot.stats.durations)
    assert durations["nvml"].count == durations["procfs"].count == 3
    assert durations["nvml"].sum < 0.15 <= durations["procfs"].sum


def _threads(name: str) -> int:
    return sum(t.name == name for t in threading.enumerate())


def _until(tick, ready, seconds: float = 5.0):
    """Tick until ready(snapshot), for at most `seconds` (a late thread on a loaded box, not a sleep)."""
    deadline = time.monotonic() + seconds
    snap = tick()
    while not ready(snap) and time.monotonic() < deadline:
        time.sleep(0.01)
        snap = tick()
    return snap


def test_a_blocked_host_read_does_not_stall_the_tick(procfs, tmp_path, caplog):
    """procfs behind a stale mount: its read blocks in the kernel. The tick publishes on time without
    it, counts the hang once, keeps one thread blocked in it (no new one per tick), and picks procfs up
    again by itself when the read returns."""
    caplog.set_level(logging.INFO, logger="exporter.pipeline.sampler")
    s = make_sampler(FakeNvml(2), procfs.root, interval=0.2, shm_path=str(tmp_path))
    s.tick()
    real_read = s.procfs.read
    release = threading.Event()
    calls = []

    def blocked():
        calls.append(1)
        release.wait(30)  # bounded only so a broken sampler cannot hang the test run
        return real_read()

    s.procfs.read = blocked
    before = _threads("host-reader")
    started = time.monotonic()
    snap = s.tick()
    assert time.monotonic() - started < 1.0  # the deadline is 0.12 s; generous for a loaded box
    assert snap.host is None and snap.host_cpu_hist is not None  # only procfs's own series go
    assert snap.shm is not None and [g.up for g in snap.gpus] == [True, True]
    assert dict(snap.stats.errors)[("procfs", "deadline")] == 1
    assert snap.stuck_sources == ("procfs",)
    ok, reason = s.health()
    assert ok and "procfs: read stuck past the tick deadline" in reason  # named, not 503 (as a stuck GPU)
    for _ in range(3):
        snap = s.tick()
        assert snap.host is None and snap.shm is not None and snap.stuck_sources == ("procfs",)
    # One thread left blocked in procfs, one fresh one for the others: no more, however long it lasts.
    assert len(calls) == 1 and _threads("host-reader") == before + 1
    assert dict(snap.stats.errors)[("procfs", "deadline")] == 1  # counted once per hang, not per tick
    stuck_logs = [r for r in caplog.records if "procfs deadline" in r.getMessage()]
    assert [r.levelno for r in stuck_logs] == [logging.WARNING]

    s.procfs.read = real_read
    release.set()
    snap = _until(s.tick, lambda snap: snap.host is not None)
    assert snap.host is not None and snap.host.errors == () and snap.stuck_sources == ()
    assert "stuck" not in s.health()[1]
    stuck_logs = [r for r in caplog.records if "procfs deadline" in r.getMessage()]
    assert [r.levelno for r in stuck_logs] == [logging.WARNING, logging.INFO]  # once each way
    assert dict(snap.stats.errors)[("procfs", "deadline")] == 1
    _until(lambda: _threads("host-reader"), lambda n: n == before)  # the blocked thread has exited
    assert _threads("host-reader") == before
    s.stop()


class _BlockingCgroup:
    """A cgroup source whose read blocks until released (a hung cgroupfs)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def read(self):
        self.calls += 1
        self.release.wait(30)
        return CgroupReading("/test", 1.0, 10, 0, 0.0, None, 1024, None, errors=())


def test_a_blocked_cgroup_read_costs_only_the_cgroup_series(procfs, tmp_path):
    cgroup = _BlockingCgroup()
    s = make_sampler(FakeNvml(1), procfs.root, interval=0.2, cgroup=cgroup, shm_path=str(tmp_path))
    first = s.tick()  # the first read already blocks: shm, after it, is read on a fresh thread in time
    assert first.cgroup is None and first.shm is not None and first.host is not None
    procfs.advance(busy=[10, 10], idle=[90, 90])
    started = time.monotonic()
    snap = s.tick()
    assert time.monotonic() - started < 1.0
    assert snap.cgroup is None and snap.host.cpu_utilization == pytest.approx(0.1) and snap.shm is not None
    assert snap.gpus[0].up and snap.stuck_sources == ("cgroup",)
    assert dict(snap.stats.errors)[("cgroup", "deadline")] == 1 and cgroup.calls == 1
    cgroup.release.set()
    snap = _until(s.tick, lambda snap: snap.cgroup is not None)
    assert snap.cgroup is not None and snap.stuck_sources == () and cgroup.calls == 2
    s.stop()


def test_host_reads_reuse_one_thread_and_stop_ends_it(procfs, tmp_path):
    s = make_sampler(FakeNvml(1), procfs.root, interval=0.2, shm_path=str(tmp_path))
    s.tick()
    thread = s._host_worker._thread
    for _ in range(5):
        snap = s.tick()
        assert snap.host is not None and snap.shm is not None
    assert s._host_worker._thread is thread  # one hand-off per tick, no thread per read
    s.stop()
    thread.join(2)
    assert not thread.is_alive()


def test_a_blocked_process_lookup_costs_only_the_process_labels(procfs):
    """A /proc/PID file in D state: the attributor's lookup blocks; GPUs and host keep their series."""
    fake = FakeNvml(1)
    fake.set_processes(0, [(4000, 1024)])
    procfs.add_process(4000, "server", "0::/\n")
    attributor = ProcessAttributor(procfs.root)
    release = threading.Event()
    real_lookup = attributor.lookup
    calls = []

    def blocked(pids):
        calls.append(set(pids))
        release.wait(30)
        return real_lookup(pids)

    attributor.lookup = blocked
    # 0.5 s: the GPU read (0.3 s deadline) must bring the pid on a loaded box; the lookup's is 0.45 s
    s = make_sampler(fake, procfs.root, interval=0.5, attributor=attributor)
    started = time.monotonic()
    snap = s.tick()
    assert time.monotonic() - started < 2.0
    assert snap.processes == () and snap.gpus[0].up and snap.host is not None
    assert snap.stuck_sources == ("processes",)
    assert dict(s.tick().stats.errors)[("processes", "deadline")] == 1 and len(calls) == 1
    release.set()
    snap = _until(s.tick, lambda snap: snap.processes != ())
    assert [pid for pid, _ in snap.processes] == [4000] and snap.stuck_sources == ()
    s.stop()


# ---- the deadline worker (exporter/pipeline/deadline.py), driven by Events: no sleeps ----------------------------
class _Jobs:
    """Keyed jobs that count their runs; `hold` blocks the job of that key until released."""

    def __init__(self, hold: str | None = None) -> None:
        self.hold = hold
        self.entered = threading.Event()
        self.release = threading.Event()
        self.runs: dict[str, int] = {}
        self.threads: set[str] = set()

    def job(self, key: str):
        def run(context):
            self.runs[key] = self.runs.get(key, 0) + 1
            self.threads.add(threading.current_thread().name)
            if key == self.hold:
                self.entered.set()
                assert self.release.wait(10)
            if key == "raises":
                raise ValueError("bad file")
            return (key, context)
        return run

    def list(self, *keys: str):
        return [(k, self.job(k)) for k in keys]


def test_deadline_worker_reads_every_job_and_keeps_each_outcome():
    from exporter.pipeline.deadline import DeadlineReads
    from tests.conftest import ManualClock

    clock = ManualClock()
    jobs = _Jobs()
    reads = DeadlineReads("test-reader", clock=clock, setup=lambda: "ctx")
    for _ in range(3):
        keys, stuck = reads.dispatch(jobs.list("a", "raises", "b"))
        assert keys == ["a", "raises", "b"] and stuck is None
        got = reads.collect(clock() + 10)  # returns as soon as the list is done
        assert got.done and got.stuck is None and got.elapsed is not None
        assert got.outcomes["a"].value == ("a", "ctx") and got.outcomes["b"].error is None
        assert isinstance(got.outcomes["raises"].error, ValueError) and got.outcomes["raises"].value is None
    assert jobs.runs == {"a": 3, "raises": 3, "b": 3} and jobs.threads == {"test-reader"}
    worker = reads.worker
    reads.stop()
    worker._thread.join(5)
    assert not worker._thread.is_alive()


def test_a_stuck_job_holds_one_thread_is_not_dispatched_again_and_the_rest_move_on():
    from exporter.pipeline.deadline import DeadlineReads
    from tests.conftest import ManualClock

    clock = ManualClock()
    jobs = _Jobs(hold="a")
    closed = []
    reads = DeadlineReads("test-reader", clock=clock, setup=object,
                          teardown=lambda ctx: closed.append((ctx, threading.current_thread().name)))
    reads.dispatch(jobs.list("a", "b"))
    assert jobs.entered.wait(10)
    stuck_worker = reads.worker
    got = reads.collect(clock())  # the deadline is now: abandoned to "a"
    assert not got.done and got.stuck is not None and got.stuck.key == "a" and got.outcomes == {}
    assert reads.stuck == {"a": stuck_worker} and reads.worker is not stuck_worker
    for _ in range(3):  # "a" is never dispatched again while its read is blocked: one stuck thread at most
        keys, _ = reads.dispatch(jobs.list("a", "b"))
        assert keys == ["b"]
        got = reads.collect(clock() + 10)
        assert got.done and set(got.outcomes) == {"b"} and reads.released() == []
    assert jobs.runs == {"a": 1, "b": 3}
    jobs.release.set()
    stuck_worker._thread.join(10)
    # The abandoned thread finished "a" and exited without starting "b" (checked under its lock), and
    # freed its own context on its own thread, after its last job returned.
    assert jobs.runs == {"a": 1, "b": 3} and not stuck_worker._thread.is_alive()
    assert len(closed) == 1 and closed[0][1] == "test-reader"
    assert reads.released() == ["a"] and reads.stuck == {}
    keys, _ = reads.dispatch(jobs.list("a", "b"))
    assert keys == ["a", "b"] and reads.collect(clock() + 10).done
    reads.stop()


def test_a_job_that_hangs_mid_list_costs_only_its_own_outcome():
    """One hand-off per list, yet the outcomes done before a hung job are kept: the tick reads them at its
    deadline. The jobs after it miss this list only and run on the fresh worker from the next dispatch."""
    from exporter.pipeline.deadline import DeadlineReads
    from tests.conftest import ManualClock

    clock = ManualClock()
    jobs = _Jobs(hold="a")
    reads = DeadlineReads("test-reader", clock=clock)
    reads.dispatch(jobs.list("b", "a", "c"))
    assert jobs.entered.wait(10)  # "b" is done: the worker is in "a"
    got = reads.collect(clock())
    assert not got.done and got.stuck is not None and got.stuck.key == "a"
    assert set(got.outcomes) == {"b"} and got.outcomes["b"].value == ("b", None)
    keys, _ = reads.dispatch(jobs.list("b", "a", "c"))
    assert keys == ["b", "c"]
    got = reads.collect(clock() + 10)
    assert got.done and set(got.outcomes) == {"b", "c"}
    jobs.release.set()
    reads.stop()


def test_a_gpu_hung_mid_tick_keeps_the_readings_taken_before_it(procfs):
    """Through the sampler: GPU 0's reading from the tick in which GPU 1 hangs is published, GPU 2 (not
    reached) keeps its last state and is read on the fresh thread from the next tick."""
    fake = FakeNvml(3)
    s = make_sampler(fake, procfs.root, interval=1.0)  # the tick waits 0.6 s for the hung GPU, no longer
    before = s.tick()
    entered, release = threading.Event(), threading.Event()
    power = fake.nvmlDeviceGetPowerUsage

    def blocking_power(handle):
        if handle.index == 1 and not release.is_set():
            entered.set()
            assert release.wait(30)
        return power(handle)

    fake.nvmlDeviceGetPowerUsage = blocking_power
    try:
        snap = s.tick()
        assert entered.is_set()
        by_index = {g.identity.index: g for g in snap.gpus}
        assert by_index[0].up and by_index[0].reading is not before.gpus[0].reading  # read this tick, kept
        assert by_index[1].stuck_call == "nvmlDeviceGetPowerUsage" and not by_index[1].up
        assert by_index[2].reading is before.gpus[2].reading  # behind the hung GPU: its last state
        after = s.tick()
        assert after.gpus[2].reading is not before.gpus[2].reading and after.gpus[1].stuck_call
    finally:
        release.set()
    s.stop()


def test_a_list_nobody_waited_for_is_abandoned_at_the_next_dispatch():
    """A tick that raised before waiting: the next dispatch must not hand a busy worker a new list."""
    from exporter.pipeline.deadline import DeadlineReads
    from tests.conftest import ManualClock

    clock = ManualClock()
    jobs = _Jobs(hold="a")
    reads = DeadlineReads("test-reader", clock=clock)
    reads.dispatch(jobs.list("a"))
    assert jobs.entered.wait(10)
    keys, stuck = reads.dispatch(jobs.list("a", "b"))
    assert stuck is not None and stuck.key == "a" and keys == ["b"]  # never a second thread into "a"
    got = reads.collect(clock() + 10)
    assert got.done and set(got.outcomes) == {"b"} and jobs.runs == {"a": 1, "b": 1}
    jobs.release.set()
    reads.stop()
