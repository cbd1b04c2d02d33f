"""Reads that may block forever (a hung NVML call, a stale NFS mount, a /proc file in D state) run on a
long-lived worker thread under a deadline; one mechanism for the GPU reads and the host reads.

A DeadlineWorker runs a list of keyed jobs in order whenever dispatched (one hand-off per tick, not a
thread per read). DeadlineReads owns the current worker: past the deadline it abandons it to the job it
is blocked in, which is "stuck": it is not dispatched again until that job returns, so a source never
holds more than one blocked thread, and a fresh worker serves the others. A thread cannot be killed; an
abandoned worker finishes its current job and exits, never starting another (checked under its lock).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
# A job gets the worker's own context (setup()'s value): state no other thread may touch (GPM buffers).
Job = Callable[[Any], T]


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """One job's result: its value or the exception it raised, and the seconds it took."""

    value: T | None
    error: Exception | None
    seconds: float


@dataclass(frozen=True, slots=True)
class Blocked(Generic[K]):
    """What an abandoned worker is blocked in: the job's key and timer() when it began."""

    key: K
    since: float


class DeadlineWorker(Generic[K, T]):
    """Runs a dispatched list of (key, job) in order on its own thread, keeping each Outcome by key. Two
    locks carry the hand-off (cheaper than Events): `_go` is released to start, `_done` by the thread when
    the list is done."""

    def __init__(self, name: str, *, setup: Callable[[], Any] = lambda: None,
                 teardown: Callable[[Any], None] = lambda context: None,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.pending = False  # dispatched, not yet waited for
        self.elapsed = 0.0  # seconds the last list took, once done
        self._timer = timer
        self._jobs: Sequence[tuple[K, Job[T]]] = ()
        self._outcomes: dict[K, Outcome[T]] = {}
        self._abandoned = False
        self._current: K | None = None
        self._current_since = 0.0
        self._state = threading.Lock()  # abandoned vs current, and the outcomes: no job starts once abandoned
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._thread = threading.Thread(target=self._run, args=(setup, teardown), name=name, daemon=True)
        self._thread.start()

    @property
    def current(self) -> K | None:
        """The job being run now, if any."""
        return self._current

    def dispatch(self, jobs: Sequence[tuple[K, Job[T]]]) -> None:
        """Start the list; the caller waits for it (wait()) before dispatching again."""
        assert not self.pending and not self._abandoned, "dispatched while busy or abandoned"
        with self._state:
            self._jobs, self._outcomes, self.pending = jobs, {}, True
        self._go.release()

    def wait(self, timeout: float) -> bool:
        """Whether the dispatched list is done within `timeout` seconds (not pending: True at once)."""
        if self.pending and self._done.acquire(timeout=max(0.0, timeout)):
            self.pending = False
        return not self.pending

    def outcomes(self) -> dict[K, Outcome[T]]:
        """The jobs of the last list done so far (all of them once wait() said so)."""
        with self._state:
            return dict(self._outcomes)

    def abandon(self) -> Blocked[K] | None:
        """Stop it: it finishes the job it is in and exits. Returns that job, None if it is in none."""
        with self._state:
            self._abandoned = True
            blocked = Blocked(self._current, self._current_since) if self._current is not None else None
        # Idle, or done since the last wait (it may be back at _go): wake it to exit. Busy: it exits
        # after its current job.
        if not self.pending or self._done.acquire(blocking=False):
            self.pending = False
            self._go.release()
        return blocked

    def _run(self, setup: Callable[[], Any], teardown: Callable[[Any], None]) -> None:
        context = setup()
        timer = self._timer
        try:
            while True:
                self._go.acquire()
                started = timer()
                for key, job in self._jobs:
                    with self._state:
                        if self._abandoned:
                            break
                        self._current, self._current_since = key, timer()
                    value, error = None, None
                    try:
                        value = job(context)
                    except Exception as exc:  # isolated: the caller counts and logs it
                        error = exc
                    with self._state:
                        self._outcomes[key] = Outcome(value, error, timer() - self._current_since)
                        self._current = None
                self.elapsed = timer() - started
                self._done.release()
                if self._abandoned:
                    return
        finally:
            teardown(context)  # on this thread, after its last job returned


@dataclass(frozen=True, slots=True)
class Collected(Generic[K, T]):
    outcomes: dict[K, Outcome[T]]  # the jobs done in time (not the stuck one)
    stuck: Blocked[K] | None = None  # the job that turned stuck past this deadline
    done: bool = True  # every dispatched job done in time
    elapsed: float | None = None  # seconds the worker took for the list, when done


class DeadlineReads(Generic[K, T]):
    """The current DeadlineWorker of one kind of read (GPUs, host sources) and the jobs stuck in
    abandoned ones. Policy only: `clock` decides the deadlines, the worker's thread does the I/O."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic,
                 setup: Callable[[], Any] = lambda: None, teardown: Callable[[Any], None] = lambda context: None,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self._name = name
        self._clock = clock
        self._setup, self._teardown, self._timer = setup, teardown, timer
        self.worker: DeadlineWorker[K, T] | None = None  # started with the first dispatch
        self.stuck: dict[K, DeadlineWorker[K, T]] = {}  # key -> the abandoned worker blocked in it

    def released(self) -> list[K]:
        """Stuck jobs that returned since (their worker moved on): dispatched again from now on."""
        back = [key for key, worker in self.stuck.items() if worker.current != key]
        for key in back:
            del self.stuck[key]
        return back

    def dispatch(self, jobs: Sequence[tuple[K, Job[T]]]) -> tuple[list[K], Blocked[K] | None]:
        """Start the jobs whose key is not stuck; returns their keys, and the job that turned stuck if the
        worker was still busy with an earlier list nobody waited for (a tick that raised)."""
        stuck = None
        worker = self.worker
        if worker is not None and not worker.wait(0):  # first: the job it is in turns stuck
            stuck = self._abandon(worker)
        jobs = [(key, job) for key, job in jobs if key not in self.stuck]
        if not jobs:
            return [], stuck
        if self.worker is None:
            self.worker = self._new_worker()
        self.worker.dispatch(jobs)
        return [key for key, _ in jobs], stuck

    def collect(self, deadline: float) -> Collected[K, T]:
        """Wait for the dispatched jobs until `deadline` (clock() time). Past it the worker is abandoned
        to the job it is in, which turns stuck; a fresh worker is started at once (ready for the jobs the
        stuck one had not reached)."""
        worker = self.worker
        if worker is None or not worker.pending:
            return Collected({})
        if worker.wait(deadline - self._clock()):
            return Collected(worker.outcomes(), elapsed=worker.elapsed)
        stuck = self._abandon(worker)
        outcomes = worker.outcomes()  # after abandon(): no job starts now, and a late one is stuck
        if stuck is not None:
            outcomes.pop(stuck.key, None)  # came back just now: from the next dispatch
        return Collected(outcomes, stuck, done=False)

    def reset(self) -> None:
        """Start afresh (a new set of sources): abandon the worker, forget the stuck jobs."""
        self.stop()
        self.stuck.clear()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.abandon()
            self.worker = None

    def _new_worker(self) -> DeadlineWorker[K, T]:
        return DeadlineWorker(self._name, setup=self._setup, teardown=self._teardown, timer=self._timer)

    def _abandon(self, worker: DeadlineWorker[K, T]) -> Blocked[K] | None:
        blocked = worker.abandon()  # under its lock: it cannot move on to another job unnoticed
        self.worker = self._new_worker()
        if blocked is not None:  # (None: between two jobs; nothing is blocked)
            self.stuck[blocked.key] = worker
        return blocked
