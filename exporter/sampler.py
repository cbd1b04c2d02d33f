"""The sampler owns timing: it ticks on a drift-free monotonic schedule and publishes a Snapshot.

Each GPU is read by its own worker thread. A tick hands every idle worker a read, reads procfs
meanwhile, and waits for the GPUs until a deadline within the tick; a GPU whose worker is still blocked
in an NVML call (a hang, a GPU falling off the bus) is reported down with the call it is stuck in, and
is not handed another read until that call returns. So one bad GPU cannot stall the host, the other
GPUs, or the HTTP server.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Callable

from exporter.histogram import DURATION_BUCKETS, RATIO_BUCKETS, Histogram
from exporter.snapshot import (
    CLOCK_EVENT_REASONS,
    PCIE_DIRECTIONS,
    GpuReading,
    GpuState,
    NvmlStatus,
    SamplerStats,
    Snapshot,
)
from exporter.sources.nvml import GpuReader, NvmlSource
from exporter.sources.procfs import ProcfsSource
from exporter.transitions import TransitionLog

log = logging.getLogger("exporter.sampler")

GPU_DEADLINE_SHARE = 0.6  # GPU reads must come back within this share of the interval
HEALTHY_WITHIN_INTERVALS = 5
LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _GpuWorker:
    """A thread that reads one GPU whenever the sampler asks, and posts the result to a shared queue."""

    def __init__(self, reader: GpuReader, results: queue.SimpleQueue) -> None:
        self.reader = reader
        self.busy = False  # set and cleared by the sampler thread only
        self.tick = 0
        self.dispatched_at = 0.0
        self.stuck_reported = False
        self._results = results
        self._go = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"gpu-{reader.index}", daemon=True)
        self._thread.start()

    def dispatch(self, tick: int, now: float) -> None:
        self.busy, self.tick, self.dispatched_at = True, tick, now
        self._go.set()

    def stop(self) -> None:
        self._stopped = True
        self._go.set()

    def _run(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            if self._stopped:
                return
            started = time.perf_counter()
            try:
                reading = self.reader.read()
            except Exception as exc:  # a bug must cost one GPU one sample, not the worker
                log.exception("GPU %d: read failed", self.reader.index)
                reading = GpuReading(errors=(f"internal:{type(exc).__name__}",))
            self._results.put((self, self.tick, reading, time.perf_counter() - started))


class _GpuHistory:
    """Per-GPU state that outlives a tick: sample histograms and clock-event time."""

    def __init__(self) -> None:
        self.utilization = Histogram(RATIO_BUCKETS)
        self.pcie = {d: Histogram(RATIO_BUCKETS) for d in PCIE_DIRECTIONS}
        self.clock_event_seconds = {name: 0.0 for _, name in CLOCK_EVENT_REASONS}
        self.clock_events_seen = False  # exported only once the GPU has reported reasons at all


class Sampler:
    def __init__(
        self,
        nvml: NvmlSource,
        procfs: ProcfsSource,
        interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nvml = nvml
        self.procfs = procfs
        self.interval = interval
        self._clock = clock
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[_GpuWorker] = []
        self._worker_generation = -1
        self._histories: dict[int, _GpuHistory] = {}
        self._host_cpu = Histogram(RATIO_BUCKETS)
        self._durations = {s: Histogram(DURATION_BUCKETS) for s in ("nvml", "procfs", "all")}
        self._lateness = Histogram(LATENESS_BUCKETS)
        self._errors: Counter[tuple[str, str]] = Counter()
        self._ticks = 0
        self._overruns = 0
        self._transitions = TransitionLog(log)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.snapshot = Snapshot(0, clock(), nvml.status, (), None, None, None, interval)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 0.5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for w in self._workers:
            w.stop()
        self.nvml.close()

    def _run(self) -> None:
        start = self._clock()
        k = 0
        while not self._stop.is_set():
            scheduled = start + k * self.interval
            now = self._clock()
            if now < scheduled:
                if self._stop.wait(scheduled - now):
                    return
                now = self._clock()
            self._lateness.observe(max(0.0, now - scheduled))
            try:
                self.tick(now)
            except Exception:  # never let the loop die: /healthz turns 503 if ticks stop
                log.exception("sampler tick failed")
            # Next slot on the original grid; slots that already passed are counted, not run late.
            k += 1
            behind = int((self._clock() - start) / self.interval) - k + 1
            if behind > 0:
                self._overruns += behind
                k += behind

    # ---- one tick ----------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> Snapshot:
        """Sample everything once and publish a new snapshot (called by the loop; tests call it too)."""
        now = self._clock() if now is None else now
        tick_started = time.perf_counter()
        self._ticks += 1
        seq = self._ticks

        failed = self.nvml.poll(now)
        if failed:
            self._errors[("nvml", failed)] += 1
        self._sync_workers()
        self._drain(block_until=None, seq=seq)
        dispatched = []
        for w in self._workers:
            if not w.busy:
                w.dispatch(seq, now)
                dispatched.append(w)

        procfs_started = time.perf_counter()
        host = self.procfs.read()
        self._durations["procfs"].observe(time.perf_counter() - procfs_started)
        for name in host.errors:
            self._errors[("procfs", name)] += 1
        self._transitions.update("procfs", {n: f"cannot read or parse {n}" for n in host.errors})
        if host.cpu_utilization is not None:
            self._host_cpu.observe(host.cpu_utilization)

        fresh = self._drain(block_until=now + GPU_DEADLINE_SHARE * self.interval, seq=seq,
                            pending={id(w) for w in dispatched})
        if dispatched:
            self._durations["nvml"].observe(time.perf_counter() - procfs_started)
        gpus = tuple(self._gpu_state(w, fresh.get(id(w)), now) for w in self._workers)

        self._durations["all"].observe(time.perf_counter() - tick_started)
        snap = Snapshot(
            sequence=seq,
            taken_at=self._clock(),
            nvml=self.nvml.status,
            gpus=gpus,
            host=host,
            host_cpu_hist=self._host_cpu.freeze(),
            stats=SamplerStats(
                ticks=self._ticks,
                overruns=self._overruns,
                errors=tuple(sorted(self._errors.items())),
                durations=tuple((s, h.freeze()) for s, h in self._durations.items()),
                lateness=self._lateness.freeze(),
            ),
            interval=self.interval,
        )
        self.snapshot = snap  # a single reference assignment: scrapes see the old or the new, whole
        return snap

    def _sync_workers(self) -> None:
        if self._worker_generation == self.nvml.generation:
            return
        for w in self._workers:
            w.stop()
        self._workers = [_GpuWorker(r, self._results) for r in self.nvml.readers]
        self._worker_generation = self.nvml.generation

    def _drain(self, block_until: float | None, seq: int, pending: set[int] | None = None) -> dict:
        """Collect worker results; with block_until, wait until all `pending` are in or the deadline."""
        fresh: dict[int, GpuReading] = {}
        pending = set(pending or ())
        while True:
            timeout = None
            if block_until is not None and pending:
                timeout = block_until - self._clock()
                if timeout <= 0:
                    break
            try:
                if timeout is None:
                    worker, tick, reading, _ = self._results.get_nowait()
                else:
                    worker, tick, reading, _ = self._results.get(timeout=timeout)
            except queue.Empty:
                break
            worker.busy = False
            if tick == seq:
                fresh[id(worker)] = reading
                pending.discard(id(worker))
            elif worker.stuck_reported:
                worker.stuck_reported = False  # the hung call returned; its stale result is dropped
            if block_until is not None and not pending:
                break
        return fresh

    def _gpu_state(self, w: _GpuWorker, reading: GpuReading | None, now: float) -> GpuState:
        index = w.reader.index
        hist = self._histories.setdefault(index, _GpuHistory())
        identity = w.reader.identity
        key = f"GPU {index}"
        stuck_call = None
        if reading is None:
            stuck_call = w.reader.current_call or "read"
            if w.busy and not w.stuck_reported:
                w.stuck_reported = True
                self._errors[("nvml", stuck_call)] += 1
            self._transitions.set(
                key, f"stuck in {stuck_call} for {now - w.dispatched_at:.1f}s; reported down")
            up = False
        else:
            for call in reading.errors:
                self._errors[("nvml", call)] += 1
            up = reading.ok
            if reading.lost:
                self._transitions.set(key, "lost (" + ", ".join(reading.errors or ("not reopened",)) + ")")
            elif reading.errors:
                self._transitions.set(key, "failing calls: " + ", ".join(reading.errors))
            else:
                self._transitions.set(key, None)
            self._observe(hist, identity.pcie_link_max_bytes_per_second, reading)
        return GpuState(
            identity=identity,
            up=up,
            reading=reading,
            utilization_hist=hist.utilization.freeze(),
            pcie_utilization_hist=tuple((d, h.freeze()) for d, h in hist.pcie.items()),
            clock_event_seconds=tuple(hist.clock_event_seconds.items()) if hist.clock_events_seen else (),
            stuck_call=stuck_call,
        )

    def _observe(self, hist: _GpuHistory, link_max: float | None, r: GpuReading) -> None:
        if r.utilization is not None:
            hist.utilization.observe(r.utilization)
        if link_max:
            for d in PCIE_DIRECTIONS:
                bps = r.pcie_bytes_per_second(d)
                if bps is not None:
                    hist.pcie[d].observe(bps / link_max)
        if r.clock_event_reasons is not None:
            hist.clock_events_seen = True
            for bit, name in CLOCK_EVENT_REASONS:
                if r.clock_event_reasons & bit:
                    hist.clock_event_seconds[name] += self.interval

    # ---- health ------------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """(healthy, human-readable reason) for /healthz."""
        snap = self.snapshot
        age = self._clock() - snap.taken_at
        lines = []
        healthy = snap.sequence > 0 and age <= HEALTHY_WITHIN_INTERVALS * self.interval
        if snap.sequence == 0:
            lines.append("sampler has not completed a tick yet")
        elif not healthy:
            lines.append(f"sampler stalled: last tick {age:.2f}s ago "
                         f"(limit {HEALTHY_WITHIN_INTERVALS} x {self.interval:g}s)")
        else:
            lines.append(f"sampler ok: last tick {age * 1000:.0f}ms ago")
        nv: NvmlStatus = snap.nvml
        lines.append(f"nvml ({nv.mode}): {'up' if nv.up else 'down'}: {nv.message}")
        for g in snap.gpus:
            if g.stuck_call:
                lines.append(f"gpu {g.identity.index}: stuck in {g.stuck_call}")
            elif not g.up:
                lines.append(f"gpu {g.identity.index}: down")
        if snap.host is not None and snap.host.errors:
            lines.append("procfs: cannot read " + ", ".join(snap.host.errors))
        return healthy, "\n".join(lines) + "\n"
