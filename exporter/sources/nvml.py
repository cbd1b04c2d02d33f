"""NVML source: opens the library and each GPU, and reads a GPU into a GpuReading.

The `pynvml` module (or the fake) is passed in. Calls a GPU answers with NotSupported are probed once and
then skipped for that GPU; any other failure omits that one value and is reported in `errors`, and
GpuIsLost aborts the read. The blocking nvmlDeviceGetPcieThroughput (~20 ms per call) is only a
fallback for drivers without the PCIe byte-counter fields, and runs on its own thread.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from exporter.snapshot import GpuIdentity, GpuProcess, GpuReading, MigReading, NvmlStatus
from exporter.sources.pcie import CounterReading, counter_rate, link_bytes_per_second
from exporter.transitions import TransitionLog

log = logging.getLogger("exporter.nvml")

FI_PCIE_TX_BYTES = 197  # NVML_FI_DEV_PCIE_COUNT_TX_BYTES
FI_PCIE_RX_BYTES = 198  # NVML_FI_DEV_PCIE_COUNT_RX_BYTES
# Wrap modulus per NVML value type (nvmlValueType_t): uint, ulong (64-bit on Linux), ulonglong.
_VALUE_MODULUS = {1: 2**32, 2: 2**64, 3: 2**64}
_LOST_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired")
# Calls that mean "this GPU/driver cannot do that" rather than "it failed this time".
_UNSUPPORTED_ERRORS = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound")
# Lacking a privilege does not change while the process runs: counted and logged once, then not asked again.
_DENIED_ERRORS = ("NVMLError_NoPermission",)
_REOPEN_BACKOFF_S = 5.0
PROCESS_REFRESH_S = 1.0  # process lists change slowly; two list calls per GPU per tick are not worth it
HEALTH_REFRESH_S = 5.0  # ECC counters and remapped rows: health, not jitter
XID_WAIT_MS = 500


class _GpuLost(Exception):
    pass


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


@dataclass
class _PcieSlot:
    """Latest result of the blocking fallback thread for one GPU."""

    tx: float | None = None
    rx: float | None = None
    at: float = 0.0
    error: str | None = None
    unsupported: bool = False


class BlockingPcieThroughput:
    """Reads nvmlDeviceGetPcieThroughput (20 ms per direction) for GPUs without byte counters.

    One thread for all such GPUs, at a slow cadence, so the blocking calls never stall the sampler.
    """

    def __init__(self, nvml: Any, period_s: float = 1.0) -> None:
        self._nvml = nvml
        self._period = period_s
        self._handles: dict[int, Any] = {}
        self._slots: dict[int, _PcieSlot] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, index: int, handle: Any) -> None:
        with self._lock:
            self._handles[index] = handle
            self._slots.setdefault(index, _PcieSlot())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pcie-fallback", daemon=True)
                self._thread.start()

    def latest(self, index: int) -> _PcieSlot | None:
        return self._slots.get(index)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                handles = list(self._handles.items())
            for index, handle in handles:
                slot = self._slots[index]
                if slot.unsupported:
                    continue
                try:
                    tx = nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
                    rx = nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
                except Exception as exc:  # one GPU's failure must not stop the others
                    if _error_name(exc) in _UNSUPPORTED_ERRORS:
                        slot.unsupported = True
                    slot.error = _error_name(exc)
                    continue
                # KB/s, with NVML's KB being 1024 bytes.
                self._slots[index] = _PcieSlot(tx * 1024.0, rx * 1024.0, time.monotonic())
            self._stop.wait(max(0.0, self._period - (time.monotonic() - started)))


class XidWatcher:
    """Waits on an NVML event set for XID critical errors, in its own thread, and counts them per
    (GPU, XID). Counters, not a "last XID" gauge: every event is counted and nothing needs resetting."""

    def __init__(self, nvml: Any, gpu_count: int) -> None:
        self._nvml = nvml
        self._gpu_count = gpu_count
        self._counts: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.supported: frozenset[int] = frozenset()
        self._thread = threading.Thread(target=self._run, name="xid-events", daemon=True)
        self._thread.start()

    def counts(self) -> tuple[tuple[tuple[int, int], int], ...]:
        with self._lock:
            return tuple(sorted(self._counts.items()))

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except Exception as exc:
            log.info("XID events unavailable: %s (%s)", exc, _error_name(exc))
            return
        supported = set()
        for index in range(self._gpu_count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
                supported.add(index)
            except Exception as exc:  # NotSupported on some boards; a lost GPU
                log.info("GPU %d: XID events not available (%s)", index, _error_name(exc))
        self.supported = frozenset(supported)
        while supported and not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait(events, XID_WAIT_MS)
            except Exception as exc:
                if _error_name(exc) != "NVMLError_Timeout":  # a timeout is the normal quiet case
                    self._stop.wait(1.0)
                continue
            if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                index = nvml.nvmlDeviceGetIndex(data.device)
            except Exception:
                continue
            xid = int(data.eventData)
            log.warning("GPU %d: XID %d", index, xid)
            with self._lock:
                self._counts[(index, xid)] = self._counts.get((index, xid), 0) + 1
        try:
            nvml.nvmlEventSetFree(events)
        except Exception:  # shutting down anyway
            pass


class GpuReader:
    """Reads one GPU. Not thread-safe: one worker thread owns it."""

    def __init__(self, nvml: Any, index: int, pcie_fallback: BlockingPcieThroughput,
                 collect_processes: bool = True) -> None:
        self.nvml = nvml
        self.collect_processes = collect_processes
        self._processes: tuple[GpuProcess, ...] | None = None
        self._last_refresh: dict[str, float] = {}  # what -> monotonic time of its last refresh (see _due)
        self._process_util_seen = 0  # newest per-process sample timestamp NVML returned (us)
        self._util_seen = 0  # newest utilisation sample timestamp NVML returned (us); 0 = not read yet
        self._health: dict[str, Any] = {}
        self._energy_prev: tuple[float, float] | None = None  # (joules, monotonic seconds)
        self._mig: list[tuple[Any, str, int, int]] | None = None  # (handle, uuid, gi, ci), re-enumerated
        self._buffer_seconds: float | None = None
        self.index = index
        self.handle: Any = None
        self.identity = GpuIdentity(index, "", "", "", None)
        self.unsupported: set[str] = set()
        self.current_call: str | None = None  # read by the sampler to say where a worker is stuck
        self._pcie_fallback = pcie_fallback
        self._pcie_prev: dict[str, CounterReading] = {}
        self._reopen_at = 0.0
        self._errors: list[str] = []

    def _due(self, what: str, period: float) -> bool:
        """True at most once per `period` seconds for `what`; the first ask is always due."""
        now = time.monotonic()
        if now - self._last_refresh.get(what, float("-inf")) < period:
            return False
        self._last_refresh[what] = now
        return True

    # ---- calling NVML ------------------------------------------------------------------------------
    def _call(self, name: str, *args: Any, key: str | None = None, quiet: tuple[str, ...] = (), on: Any = None,
              **kwargs: Any) -> Any:
        """Call nvml.<name>(handle, ...); None when unsupported or failed (failures are recorded).

        Errors named in `quiet` are answers, not failures (NotFound from a "since" query: nothing new).
        `on` calls it on another handle (a MIG device of this GPU) instead of the GPU's own.
        """
        key = key or name
        if key in self.unsupported:
            return None
        fn = getattr(self.nvml, name, None)
        if fn is None:  # an older binding without this function
            self.unsupported.add(key)
            return None
        self.current_call = name
        try:
            return fn(self.handle if on is None else on, *args, **kwargs)
        except Exception as exc:
            err = _error_name(exc)
            if err in quiet:
                return None
            if err in _UNSUPPORTED_ERRORS or isinstance(exc, TypeError):
                self.unsupported.add(key)
                log.info("GPU %d: %s not supported (%s); omitted from now on", self.index, key, err)
                return None
            self._errors.append(name)
            if err in _DENIED_ERRORS:
                self.unsupported.add(key)
                log.warning("GPU %d: %s: no permission; omitted until restart (the exporter lacks a privilege "
                            "this call needs, see docs/operations.md)", self.index, name)
                return None
            if err in _LOST_ERRORS:
                raise _GpuLost(err) from exc
            return None
        finally:
            self.current_call = None

    def _open(self) -> None:
        nvml = self.nvml
        self.current_call = "nvmlDeviceGetHandleByIndex"
        try:
            self.handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        finally:
            self.current_call = None
        uuid = self._call("nvmlDeviceGetUUID") or f"unknown-{self.index}"
        name = self._call("nvmlDeviceGetName") or ""
        pci = self._call("nvmlDeviceGetPciInfo")
        bus_id = getattr(pci, "busId", "") or ""
        if isinstance(bus_id, bytes):  # pynvml's structs decode char arrays to str; raw ctypes gives bytes
            bus_id = bus_id.decode(errors="replace")
        gen = self._call("nvmlDeviceGetMaxPcieLinkGeneration")
        width = self._call("nvmlDeviceGetMaxPcieLinkWidth")
        link = link_bytes_per_second(gen, width) if gen and width else None
        self.identity = GpuIdentity(self.index, str(uuid), str(name), bus_id, link)
        self._pcie_prev.clear()

    # ---- one read ----------------------------------------------------------------------------------
    def read(self) -> GpuReading:
        self._errors = []
        values: dict[str, Any] = {}
        lost = False
        try:
            if self.handle is None:
                now = time.monotonic()
                if now < self._reopen_at:
                    raise _GpuLost("not reopened yet")
                self._reopen_at = now + _REOPEN_BACKOFF_S
                try:
                    self._open()
                except _GpuLost:
                    raise
                except Exception as exc:
                    self._errors.append("nvmlDeviceGetHandleByIndex")
                    raise _GpuLost(_error_name(exc)) from exc
            self._read_values(values)
        except _GpuLost:
            lost = True
            self.handle = None  # re-open later: after a reset the old handle is stale
        return GpuReading(**values, errors=tuple(self._errors), lost=lost)

    def _read_values(self, v: dict[str, Any]) -> None:
        nvml = self.nvml
        util = self._call("nvmlDeviceGetUtilizationRates")
        if util is not None:
            v["utilization"] = util.gpu / 100.0
            v["memory_bandwidth_utilization"] = util.memory / 100.0
        samples = self._read_utilization_samples()
        if samples is not None:
            v["utilization_samples"] = samples
            v["sample_buffer_seconds"] = self._buffer_seconds

        # v2 (R510+) reports "used" without the driver's reservation, as nvidia-smi does; v1 fallback.
        mem = self._call("nvmlDeviceGetMemoryInfo", key="memory_v2", version=getattr(nvml, "nvmlMemory_v2", 0))
        if mem is None and "memory_v2" in self.unsupported:
            mem = self._call("nvmlDeviceGetMemoryInfo")
        if mem is not None:
            v["memory_used_bytes"] = int(mem.used)
            v["memory_total_bytes"] = int(mem.total)

        self._read_pcie(v)
        v["pcie_replay_errors"] = self._call("nvmlDeviceGetPcieReplayCounter")

        v["temperature_celsius"] = self._call("nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU)
        power = self._call("nvmlDeviceGetPowerUsage")
        v["power_watts"] = power / 1000.0 if power is not None else None
        limit = self._call("nvmlDeviceGetEnforcedPowerLimit")
        v["power_limit_watts"] = limit / 1000.0 if limit is not None else None
        energy = self._call("nvmlDeviceGetTotalEnergyConsumption")
        if energy is not None:
            joules, at = energy / 1000.0, time.monotonic()
            v["energy_joules"] = joules
            prev = self._energy_prev
            if prev is not None and at > prev[1] and joules >= prev[0]:  # a driver reload resets the counter
                v["power_from_energy_watts"] = (joules - prev[0]) / (at - prev[1])
            self._energy_prev = (joules, at)

        sm = self._call("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM, key="clock_sm")
        v["sm_clock_hertz"] = sm * 1e6 if sm is not None else None
        mclk = self._call("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_MEM, key="clock_mem")
        v["memory_clock_hertz"] = mclk * 1e6 if mclk is not None else None

        reasons = self._call("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None and "nvmlDeviceGetCurrentClocksEventReasons" in self.unsupported:
            reasons = self._call("nvmlDeviceGetCurrentClocksThrottleReasons")  # name before R535
        v["clock_event_reasons"] = reasons
        mig = self._read_mig()
        if mig is not None:
            v["mig"] = mig
        elif self.collect_processes:  # with MIG on, processes are listed per MIG device instead
            v["processes"] = self._read_processes()
        v.update(self._read_health())

    def _read_mig(self) -> tuple[MigReading, ...] | None:
        """MIG devices with their memory and processes; None when MIG mode is off or unsupported.

        Instances are re-enumerated every HEALTH_REFRESH_S, so created or destroyed ones are picked up.
        """
        if self._due("mig", HEALTH_REFRESH_S):
            mode = self._call("nvmlDeviceGetMigMode")
            self._mig = self._enumerate_mig() if mode is not None and mode[0] else None
        if self._mig is None:
            return None
        out = []
        for handle, uuid, gi, ci in self._mig:
            mem = self._call("nvmlDeviceGetMemoryInfo", on=handle, key="mig_memory")
            procs = None
            if self.collect_processes:
                listed = self._call("nvmlDeviceGetComputeRunningProcesses", on=handle, key="mig_processes")
                if listed is not None:
                    procs = tuple(GpuProcess(p.pid, p.usedGpuMemory, None) for p in listed)
            out.append(MigReading(uuid, gi, ci, int(mem.used) if mem is not None else None,
                                  int(mem.total) if mem is not None else None, procs))
        return tuple(out)

    def _enumerate_mig(self) -> list[tuple[Any, str, int, int]]:
        found = []
        for slot in range(self._call("nvmlDeviceGetMaxMigDeviceCount") or 0):
            handle = self._call("nvmlDeviceGetMigDeviceHandleByIndex", slot, key="mig_handle",
                                quiet=("NVMLError_NotFound",))  # NotFound: an empty slot
            if handle is None:
                continue
            uuid = self._call("nvmlDeviceGetUUID", on=handle, key="mig_uuid") or f"unknown-mig-{slot}"
            gi = self._call("nvmlDeviceGetGpuInstanceId", on=handle)
            ci = self._call("nvmlDeviceGetComputeInstanceId", on=handle)
            found.append((handle, str(uuid), int(gi) if gi is not None else -1, int(ci) if ci is not None else -1))
        return found

    def _read_health(self) -> dict[str, Any]:
        """ECC error counters and remapped rows, every HEALTH_REFRESH_S (NotSupported: omitted)."""
        if not self._due("health", HEALTH_REFRESH_S):
            return self._health
        nvml = self.nvml
        ecc = []
        for error, etype in (("corrected", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                             ("uncorrected", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)):
            for scope, ctype in (("volatile", nvml.NVML_VOLATILE_ECC), ("aggregate", nvml.NVML_AGGREGATE_ECC)):
                n = self._call("nvmlDeviceGetTotalEccErrors", etype, ctype, key="ecc")
                if n is not None:
                    ecc.append(((error, scope), int(n)))
        rows = self._call("nvmlDeviceGetRemappedRows")
        self._health = {"ecc_errors": tuple(ecc) if ecc else None,
                        "remapped_rows": tuple(int(x) for x in rows) if rows is not None else None}
        return self._health

    def _read_utilization_samples(self) -> tuple[float, ...] | None:
        """Every driver utilisation sample since the last read, as ratios; None where unsupported.

        last_seen only ever comes from timestamps NVML returned. Samples with timestamp 0 or a value over
        100 are skipped. The first read returns the whole buffer: it measures how far back the buffer
        reaches and is not counted (those samples predate the exporter).
        """
        if "samples_gpu" in self.unsupported:
            return None
        got = self._call("nvmlDeviceGetSamples", self.nvml.NVML_GPU_UTILIZATION_SAMPLES, self._util_seen,
                         key="samples_gpu", quiet=("NVMLError_NotFound",))
        if got is None:
            return None if "samples_gpu" in self.unsupported else ()
        value_type, samples = got
        values: list[float] = []
        stamps: list[int] = []
        for sample in samples:
            ts = int(sample.timeStamp)
            value = sample.sampleValue.uiVal if value_type == 1 else sample.sampleValue.ullVal
            if ts == 0 or ts <= self._util_seen or value > 100:
                continue
            stamps.append(ts)
            values.append(value / 100.0)
        first = self._util_seen == 0
        if stamps:
            if first:
                self._buffer_seconds = (max(stamps) - min(stamps)) / 1e6
            self._util_seen = max(self._util_seen, *stamps)
        return () if first else tuple(values)

    def _read_processes(self) -> tuple[GpuProcess, ...] | None:
        if not self._due("processes", PROCESS_REFRESH_S):
            return self._processes
        memory: dict[int, int | None] = {}
        supported = False
        for call in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            procs = self._call(call)
            if procs is None:
                continue
            supported = True
            for p in procs:  # a process in both lists holds one allocation: keep the larger figure
                used = p.usedGpuMemory
                memory[p.pid] = max(used, memory.get(p.pid) or 0) if used is not None else memory.get(p.pid)
        if not supported:
            self._processes = None
            return None
        util: dict[int, tuple[int, float]] = {}
        samples = self._call("nvmlDeviceGetProcessUtilization", self._process_util_seen,
                             quiet=("NVMLError_NotFound",))
        for sample in samples or ():
            if sample.timeStamp and sample.smUtil <= 100 and sample.timeStamp >= util.get(sample.pid, (0, 0))[0]:
                util[sample.pid] = (sample.timeStamp, sample.smUtil / 100.0)
            self._process_util_seen = max(self._process_util_seen, sample.timeStamp)
        self._processes = tuple(GpuProcess(pid, used, util[pid][1] if pid in util else None)
                                for pid, used in sorted(memory.items()))
        return self._processes

    def _read_pcie(self, v: dict[str, Any]) -> None:
        if "pcie_counters" not in self.unsupported:
            fields = self._call("nvmlDeviceGetFieldValues", [FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES])
            if fields is not None:
                link = self.identity.pcie_link_max_bytes_per_second
                max_rate = link * 1.5 if link else None
                supported = 0
                for direction, fv in zip(("tx", "rx"), fields):
                    if fv.nvmlReturn != 0:  # per-entry status: NVML_SUCCESS is 0
                        continue
                    supported += 1
                    modulus = _VALUE_MODULUS.get(fv.valueType, 2**64)
                    raw = fv.value.uiVal if fv.valueType == 1 else fv.value.ullVal
                    cur = CounterReading(int(raw), int(fv.timestamp))
                    rate = counter_rate(self._pcie_prev.get(direction), cur, modulus, max_rate)
                    self._pcie_prev[direction] = cur
                    v[f"pcie_{direction}_bytes_per_second"] = rate
                if supported:
                    return
                self.unsupported.add("pcie_counters")
                log.info("GPU %d: PCIe byte counters not supported; using the blocking "
                         "nvmlDeviceGetPcieThroughput on a 1 s cadence in its own thread", self.index)
                self._pcie_fallback.register(self.index, self.handle)
            elif "nvmlDeviceGetFieldValues" in self.unsupported:
                self.unsupported.add("pcie_counters")
                self._pcie_fallback.register(self.index, self.handle)
        slot = self._pcie_fallback.latest(self.index)
        if slot is None or slot.unsupported:
            return
        if slot.error:
            self._errors.append("nvmlDeviceGetPcieThroughput")
        if slot.at and time.monotonic() - slot.at < 5.0:
            v["pcie_tx_bytes_per_second"] = slot.tx
            v["pcie_rx_bytes_per_second"] = slot.rx


class NvmlSource:
    """Initialises NVML (retrying with backoff while it is absent) and owns one reader per GPU."""

    def __init__(
        self,
        nvml: Any | None,
        mode: str,
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        collect_processes: bool = True,
    ) -> None:
        self.nvml = nvml
        self.collect_processes = collect_processes
        self.mode = mode  # "real" or "fake"; becomes "absent" while the library cannot be loaded
        self.readers: list[GpuReader] = []
        self.status = NvmlStatus(mode, False, None, "not initialised yet")
        self.generation = 0  # bumped whenever the set of readers changes
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._delay = backoff_initial_s
        self._next_try = 0.0
        self._pcie_fallback = BlockingPcieThroughput(nvml) if nvml is not None else None
        self._transitions = TransitionLog(log)
        self.xid: XidWatcher | None = None

    def poll(self, now: float) -> str | None:
        """Try to initialise when due. Returns the name of a failed call, for error counting."""
        if self.status.up or now < self._next_try:
            return None
        nvml = self.nvml
        if nvml is None:
            self._down("absent", "the pynvml module (nvidia-ml-py) is not installed", now)
            return "import"
        call = "nvmlInit"
        try:
            nvml.nvmlInit()
            call = "nvmlSystemGetDriverVersion"
            driver = str(nvml.nvmlSystemGetDriverVersion())
            call = "nvmlDeviceGetCount"
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            err = _error_name(exc)
            if err in ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"):
                self._down("absent", f"no NVIDIA GPU found: {exc} ({err}); serving host metrics only", now)
            else:
                self._down(self.mode, f"NVML initialisation failed in {call}: {exc} ({err})", now)
            return call
        assert self._pcie_fallback is not None
        self.readers = [GpuReader(nvml, i, self._pcie_fallback, self.collect_processes) for i in range(count)]
        self.xid = XidWatcher(nvml, count) if count else None
        self.generation += 1
        self._delay = self._backoff_initial
        if self.mode == "absent":
            self.mode = "real"
        msg = f"driver {driver}, {count} GPU(s)" if count else f"driver {driver}, but no GPU found"
        self.status = NvmlStatus(self.mode, True, driver, msg)
        self._transitions.set("NVML", None)
        log.info("NVML (%s) initialised: %s", self.mode, msg)
        return None

    def _down(self, mode: str, message: str, now: float) -> None:
        self.mode = mode
        self.status = NvmlStatus(mode, False, None, message)
        self._next_try = now + self._delay
        self._transitions.set("NVML", f"{message}; retrying with backoff up to {self._backoff_max:g}s")
        self._delay = min(self._delay * 2, self._backoff_max)

    def close(self) -> None:
        if self._pcie_fallback is not None:
            self._pcie_fallback.stop()
        if self.xid is not None:
            self.xid.stop()
        if self.status.up and self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # shutting down anyway
                pass
