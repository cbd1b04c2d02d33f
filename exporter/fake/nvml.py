"""A stand-in for the `pynvml` module (nvidia-ml-py) for demos, tests and benchmarks.

It has the same function names, constants, error classes and result structures as pynvml (the
constants, `NVMLError_*` classes and ctypes structs are pynvml's own objects), so the real NVML source
runs on top of it unchanged. Values follow a deterministic TTS-like duty cycle: each period the GPU
spends `low_fraction` of the time starved (utilisation 8-30 %) and the rest busy (70-98 %). PCIe byte
counters and the energy counter are exact integrals of that cycle.

Faults are injected per GPU and per call (`inject`, `lose_gpu`): any NVML error code, a delay (the
blocking 20 ms of nvmlDeviceGetPcieThroughput is on by default), from a given moment, a given number
of times. Latency is a real sleep, which releases the GIL as a ctypes call into libnvidia-ml does.
"""
from __future__ import annotations

import ctypes
import functools
import math
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pynvml

MIB = 1024 * 1024


@dataclass(frozen=True)
class FakeGpuSpec:
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int = 81559 * MIB  # what an H100 SXM 80GB reports
    model_memory_bytes: int = 18 * 1024 * MIB  # weights resident while "serving"
    pcie_generation: int = 5
    pcie_width: int = 16
    power_limit_mw: int = 700_000
    power_low_mw: int = 120_000
    power_high_mw: int = 520_000
    duty_period_s: float = 2.0
    low_fraction: float = 0.3  # share of each period with utilisation below 40 %
    pcie_rx_low_bps: float = 1.0e9
    pcie_rx_high_bps: float = 12.0e9
    pcie_tx_low_bps: float = 0.3e9
    pcie_tx_high_bps: float = 3.0e9
    pcie_counters: bool = True  # NVML_FI_DEV_PCIE_COUNT_{TX,RX}_BYTES supported (driver R555+)
    pcie_counter_start: int = 0  # start near 2**64 to exercise wrap handling
    driver_sample_period_s: float = 1 / 6  # utilisation sample period of the driver's buffer
    ecc_corrected: tuple[int, int] = (0, 3)  # (volatile, aggregate) corrected ECC errors
    ecc_uncorrected: tuple[int, int] = (0, 0)
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # correctable, uncorrectable, pending, failed
    mig_profiles: tuple[str, ...] = ()  # MIG mode on with these instances, e.g. ("3g.40gb", "1g.10gb")
    xid_schedule: tuple[float, float, int] | None = None  # (first after s, then every s, XID code)
    driver_sample_depth: int = 120  # samples the driver keeps (20 s at 1/6 s)
    replay_counter: int = 0
    fan_speed_percent: int | None = None  # None: NotSupported, as on the fanless H100 SXM
    batch_period_s: float = 10.0  # a batch job runs every other period
    batch_new_pid: bool = False  # each batch job a new PID (label churn, as real jobs), not the same one
    gpm_supported: bool = True  # GPM (Hopper and newer); False as on A100, L4, ...
    nvlink_links: int = 18  # H100 SXM; 0 on PCIe boards (the link-count field is then NotSupported)
    nvlink_tx_low_bps: float = 0.5e9  # summed over links, like PCIe following the duty cycle
    nvlink_tx_high_bps: float = 40e9
    nvlink_rx_low_bps: float = 0.5e9
    nvlink_rx_high_bps: float = 40e9


@dataclass
class _Fault:
    error: int | None
    latency_s: float
    start: float  # fake-clock time from which it applies
    remaining: int | None  # None: forever

    def apply(self, now: float) -> None:
        if now < self.start or self.remaining == 0:
            return
        if self.remaining is not None:
            self.remaining -= 1
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.error is not None:
            raise pynvml.NVMLError(self.error)


class FakeEventSet:
    """An NVML event set: the devices registered on it and the events waiting to be read."""

    def __init__(self) -> None:
        self.devices: set[int] = set()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.scheduled_sent: dict[int, int] = {}  # gpu -> scheduled XIDs delivered so far


class FakeHandle:
    """Opaque device handle, like pynvml's c_nvmlDevice_t pointer."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<FakeHandle gpu={self.index}>"


class FakeMigHandle(FakeHandle):
    """A MIG device's handle; `index` is the parent's, so faults injected on the parent apply to it."""

    __slots__ = ("slot",)

    def __init__(self, index: int, slot: int) -> None:
        super().__init__(index)
        self.slot = slot


def _xid_event(gpu: int, xid: int) -> Any:
    """Event data as nvmlEventSetWait returns it (a friendly object, since a fake handle is no pointer)."""
    data = pynvml.nvmlStructToFriendlyObject(pynvml.c_nvmlEventData_t())
    data.device, data.eventType, data.eventData = FakeHandle(gpu), pynvml.nvmlEventTypeXidCriticalError, xid
    return data


def fake_uuid(gpu: int, mig_slot: int | None = None) -> str:
    """The UUID the fake reports for a GPU, or for the MIG device in that slot of it."""
    if mig_slot is not None:
        return f"MIG-{0xFA4E0000 + gpu:08x}-{mig_slot:04x}-4000-8000-{gpu:012x}"
    return f"GPU-{0xFA4E0000 + gpu:08x}-0000-4000-8000-{gpu:012x}"


def mig_memory_bytes(profile: str) -> int:
    """'3g.40gb' -> 40 GiB."""
    return int(profile.split(".")[1].rstrip("gb")) * 1024 * MIB


# The GPU instance profiles an H100 80GB (the fake's board) offers: 7 compute slices, 8 x 10 GB of memory.
H100_MIG_PROFILES = ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb")
_MIG_COMPUTE_SLICES = 7
_MIG_MEMORY_GB = 80


def check_mig_layout(profiles: tuple[str, ...]) -> None:
    """ValueError unless these instances fit on one H100 80GB as the driver would let them."""
    unknown = [p for p in profiles if p not in H100_MIG_PROFILES]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not an H100 80GB profile ({', '.join(H100_MIG_PROFILES)})")
    slices = sum(int(p.split("g.")[0]) for p in profiles)
    memory = sum(int(p.split(".")[1][:-2]) for p in profiles)
    if slices > _MIG_COMPUTE_SLICES or memory > _MIG_MEMORY_GB:
        raise ValueError(f"{slices} compute slices and {memory} GB do not fit on the GPU "
                         f"({_MIG_COMPUTE_SLICES} slices, {_MIG_MEMORY_GB} GB)")


_MIG_ONLY_PARENT_UNSUPPORTED = ("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetSamples",
                                "nvmlDeviceGetProcessUtilization")


def _nvml_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Counts the call, enforces nvmlInit, and applies injected faults, as libnvidia-ml would fail."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: FakeNvml, *args: Any, **kwargs: Any) -> Any:
        gpu = args[0].index if args and isinstance(args[0], FakeHandle) else None
        self._enter(name, gpu)
        return fn(self, *args, **kwargs)

    return wrapper


def _copy_pynvml_names(target: object) -> None:
    for attr in dir(pynvml):
        if attr.startswith(("NVML_", "NVMLError", "nvmlClocks", "nvmlMemory_v", "nvmlEventType")) or attr in (
            "NVMLLibraryMismatchError", "c_nvmlGpmMetricsGet_t",
        ):
            setattr(target, attr, getattr(pynvml, attr))


class FakeNvml:
    """Module-like object: pass it wherever the `pynvml` module is expected."""

    def __init__(
        self,
        gpu_count: int = 2,
        *,
        spec: FakeGpuSpec | None = None,
        specs: list[FakeGpuSpec] | None = None,
        clock: Callable[[], float] = time.monotonic,
        pcie_throughput_latency_s: float = 0.020,
        driver_version: str = "570.124.06",
        library_present: bool = True,
    ) -> None:
        _copy_pynvml_names(self)
        self.specs = specs if specs is not None else [spec or FakeGpuSpec()] * gpu_count
        self.gpu_count = len(self.specs)
        self.clock = clock
        self.t0 = clock()
        self.driver_version = driver_version
        self.library_present = library_present
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()
        self._faults: dict[tuple[int | None, str], _Fault] = {}
        self._processes: dict[int, list[tuple[int, int | None]]] = {}  # set_processes() overrides
        self._event_sets: list[FakeEventSet] = []
        self._init_refcount = 0
        self._gpm_samples: dict[int, tuple[Any, tuple[int, int | None, float] | None]] = {}  # address -> (sample, taken)
        if pcie_throughput_latency_s:
            for gpu in range(self.gpu_count):
                self.inject("nvmlDeviceGetPcieThroughput", gpu=gpu, latency_s=pcie_throughput_latency_s)

    # ---- fault injection -------------------------------------------------------------------------
    def inject(
        self,
        call: str,
        *,
        gpu: int | None = None,
        error: int | None = None,
        latency_s: float = 0.0,
        after_s: float = 0.0,
        times: int | None = None,
    ) -> None:
        """Make `call` (or "*": every device call) on `gpu` (None: calls without a device) misbehave."""
        if call != "*" and not hasattr(pynvml, call):
            raise ValueError(f"pynvml has no function {call!r}")
        self._faults[(gpu, call)] = _Fault(error, latency_s, self.clock() + after_s, times)

    def lose_gpu(self, gpu: int, after_s: float = 0.0) -> None:
        """The GPU falls off the bus: every call on it raises NVMLError_GpuIsLost."""
        self.inject("*", gpu=gpu, error=pynvml.NVML_ERROR_GPU_IS_LOST, after_s=after_s)

    def clear_faults(self, gpu: int | None = None) -> None:
        """Remove faults (of one GPU, or all); the default PCIe latency is removed too."""
        for key in [k for k in self._faults if gpu is None or k[0] == gpu]:
            del self._faults[key]

    def set_processes(self, gpu: int, processes: list[tuple[int, int | None]] | None) -> None:
        """Fix GPU `gpu`'s compute processes as (pid, used bytes or None); None restores the schedule."""
        if processes is None:
            self._processes.pop(gpu, None)
        else:
            self._processes[gpu] = list(processes)

    def processes_at(self, gpu: int, t: float) -> list[tuple[int, int | None]]:
        """Default schedule: the TTS server (pid 4000+gpu) holds the model; every other batch period
        (10 s) a batch job (pid 5000+gpu, or a new PID each time) appears with 2 GiB, so series come and go."""
        if gpu in self._processes:
            return self._processes[gpu]
        procs: list[tuple[int, int | None]] = [(4000 + gpu, self._memory_used(gpu, t) - 2 * 1024 * MIB)]
        spec = self.specs[gpu]
        cycle = int(t // spec.batch_period_s)
        if cycle % 2 == 0:
            pid = 5000 + gpu + (1000 * (cycle // 2) % 4_000_000 if spec.batch_new_pid else 0)
            procs.append((pid, 2 * 1024 * MIB))
        return procs

    def emit_xid(self, gpu: int, xid: int) -> None:
        """The driver reports XID `xid` on `gpu` to every event set that registered the GPU."""
        for es in self._event_sets:
            if gpu in es.devices:
                es.events.put(_xid_event(gpu, xid))

    def xid_registered(self) -> set[int]:
        """GPUs registered for XID events on an event set that is still allocated."""
        return set().union(*(es.devices for es in self._event_sets))

    def _enter(self, call: str, gpu: int | None) -> None:
        with self._calls_lock:
            self.calls[call] += 1
        if self._init_refcount == 0 and call not in ("nvmlInit", "nvmlInitWithFlags"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        fault = self._faults.get((gpu, call)) or (gpu is not None and self._faults.get((gpu, "*")))
        if fault:
            fault.apply(self.clock())
        if gpu is not None and self.specs[gpu].mig_profiles and call in _MIG_ONLY_PARENT_UNSUPPORTED:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # utilisation is not available with MIG on

    # ---- the duty cycle --------------------------------------------------------------------------
    def _phase_offset(self, gpu: int) -> float:
        return self.specs[gpu].duty_period_s * ((gpu * 0.37) % 1.0)

    def _busy(self, gpu: int, t: float) -> bool:
        s = self.specs[gpu]
        u = (t + self._phase_offset(gpu)) % s.duty_period_s
        return u >= s.low_fraction * s.duty_period_s

    def _busy_seconds(self, gpu: int, t: float) -> float:
        """Time spent in the busy phase between the fake's start and t (closed form)."""
        s = self.specs[gpu]
        low = s.low_fraction * s.duty_period_s
        high = s.duty_period_s - low

        def h(x: float) -> float:
            periods, rest = divmod(x, s.duty_period_s)
            return periods * high + max(0.0, rest - low)

        off = self._phase_offset(gpu)
        return h(t + off) - h(off)

    def _integral(self, gpu: int, t: float, low_rate: float, high_rate: float) -> float:
        busy = self._busy_seconds(gpu, t)
        return low_rate * (t - busy) + high_rate * busy

    def _now(self) -> float:
        return self.clock() - self.t0

    @staticmethod
    def _noise(gpu: int, t: float, step: float = 0.1) -> float:
        """Deterministic pseudo-random value in [0, 1) that changes every `step` seconds."""
        n = int(t / step) * 2654435761 + gpu * 40503
        return ((n ^ (n >> 13)) * 1103515245 & 0xFFFF) / 0x10000

    def utilization_at(self, gpu: int, t: float) -> int:
        """GPU utilisation in percent at fake time t (seconds since start)."""
        noise = self._noise(gpu, t)
        return int(70 + 28 * noise) if self._busy(gpu, t) else int(8 + 22 * noise)

    # ---- library ---------------------------------------------------------------------------------
    @_nvml_call
    def nvmlInit(self) -> None:
        if not self.library_present:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self._init_refcount += 1

    @_nvml_call
    def nvmlShutdown(self) -> None:
        self._init_refcount -= 1

    @_nvml_call
    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    @_nvml_call
    def nvmlDeviceGetCount(self) -> int:
        return self.gpu_count

    @_nvml_call
    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        if not 0 <= index < self.gpu_count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        # Faults keyed on the device apply to handle lookup too: a lost GPU cannot be re-opened.
        fault = self._faults.get((index, "*"))
        if fault:
            fault.apply(self.clock())
        return FakeHandle(index)

    # ---- identity --------------------------------------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self.specs[handle.index].name

    @_nvml_call
    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        i = handle.index
        return fake_uuid(i, handle.slot if isinstance(handle, FakeMigHandle) else None)

    @_nvml_call
    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> pynvml.nvmlPciInfo_t:
        info = pynvml.nvmlPciInfo_t()
        bus = 0x18 + 0x10 * handle.index
        info.domain, info.bus, info.device = 0, bus, 0
        info.pciDeviceId = 0x233010DE
        info.busId = f"00000000:{bus:02X}:00.0".encode()  # pynvml's struct reads it back as str
        info.busIdLegacy = f"0000:{bus:02X}:00.0".encode()
        return info

    # ---- utilisation and memory ------------------------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> pynvml.c_nvmlUtilization_t:
        t = self._now()
        util = self.utilization_at(handle.index, t)
        out = pynvml.c_nvmlUtilization_t()
        out.gpu, out.memory = util, int(util * 0.55)
        return out

    def _memory_used(self, gpu: int, t: float) -> int:
        s = self.specs[gpu]
        kv_cache = (0.5 + 0.5 * math.sin(t / 7.0 + gpu)) * 6 * 1024 * MIB
        return int(s.model_memory_bytes + kv_cache)

    @_nvml_call
    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        s = self.specs[handle.index]
        if isinstance(handle, FakeMigHandle):
            total = mig_memory_bytes(s.mig_profiles[handle.slot])
            s = FakeGpuSpec(memory_total_bytes=total)
            used = total // 2
        else:
            used = self._memory_used(handle.index, self._now())
        reserved = 512 * MIB
        if version:
            out = pynvml.c_nvmlMemory_v2_t()
            out.version = version
            out.total, out.reserved, out.used = s.memory_total_bytes, reserved, used
            out.free = s.memory_total_bytes - reserved - used
        else:
            out = pynvml.c_nvmlMemory_t()  # v1: "used" includes the driver's reservation
            out.total, out.used = s.memory_total_bytes, used + reserved
            out.free = s.memory_total_bytes - used - reserved
        return out

    @_nvml_call
    def nvmlDeviceGetSamples(self, device: FakeHandle, sampling_type: int, timeStamp: int) -> tuple[int, list[Any]]:
        """The driver's sample buffer: one sample every driver_sample_period_s, the last
        driver_sample_depth of them, those newer than timeStamp (us); NotFound when there are none."""
        gpu = device.index
        s = self.specs[gpu]
        if sampling_type not in (pynvml.NVML_GPU_UTILIZATION_SAMPLES, pynvml.NVML_MEMORY_UTILIZATION_SAMPLES):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        now = self.clock()
        newest = math.floor(now / s.driver_sample_period_s)
        samples = []
        first_new = math.floor(timeStamp / 1e6 / s.driver_sample_period_s)  # the ts check below settles edges
        for k in range(max(0, newest - s.driver_sample_depth + 1, first_new), newest + 1):
            t_abs = k * s.driver_sample_period_s
            ts = int(round(t_abs * 1e6))
            if ts <= timeStamp:  # the buffer predates the exporter, as a real driver's does
                continue
            util = self.utilization_at(gpu, t_abs - self.t0)
            sample = pynvml.c_nvmlSample_t()
            sample.timeStamp = ts
            sample.sampleValue.uiVal = util if sampling_type == pynvml.NVML_GPU_UTILIZATION_SAMPLES else int(util * 0.55)
            samples.append(sample)
        if not samples:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, samples

    # ---- MIG -------------------------------------------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetMigMode(self, device: FakeHandle) -> list[int]:
        on = int(bool(self.specs[device.index].mig_profiles))
        return [on, on]  # [current, pending]

    @_nvml_call
    def nvmlDeviceGetMaxMigDeviceCount(self, device: FakeHandle) -> int:
        return 7

    @_nvml_call
    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: FakeHandle, index: int) -> FakeMigHandle:
        if index >= len(self.specs[device.index].mig_profiles):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)  # an empty slot
        return FakeMigHandle(device.index, index)

    @_nvml_call
    def nvmlDeviceIsMigDeviceHandle(self, device: FakeHandle) -> bool:
        return isinstance(device, FakeMigHandle)

    @_nvml_call
    def nvmlDeviceGetGpuInstanceId(self, device: FakeMigHandle) -> int:
        return (1, 5, 13, 14, 9, 10, 11)[device.slot]  # the ids an H100 gives 3g, 2g and 1g instances

    @_nvml_call
    def nvmlDeviceGetComputeInstanceId(self, device: FakeMigHandle) -> int:
        return 0

    # ---- events and health -----------------------------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        return handle.index

    @_nvml_call
    def nvmlEventSetCreate(self) -> FakeEventSet:
        es = FakeEventSet()
        self._event_sets.append(es)
        return es

    @_nvml_call
    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, eventTypes: int, eventSet: FakeEventSet) -> None:
        if eventTypes & pynvml.nvmlEventTypeXidCriticalError:
            eventSet.devices.add(handle.index)

    def _deliver_scheduled_xids(self, es: FakeEventSet) -> None:
        t = self._now()
        for gpu in es.devices:
            sched = self.specs[gpu].xid_schedule
            if not sched or t < sched[0]:
                continue
            due = int((t - sched[0]) // sched[1]) + 1
            for _ in range(due - es.scheduled_sent.get(gpu, 0)):
                es.events.put(_xid_event(gpu, sched[2]))
            es.scheduled_sent[gpu] = due

    @_nvml_call
    def nvmlEventSetWait(self, eventSet: FakeEventSet, timeoutms: int) -> Any:
        self._deliver_scheduled_xids(eventSet)
        try:
            return eventSet.events.get(timeout=timeoutms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None

    @_nvml_call
    def nvmlEventSetFree(self, eventSet: FakeEventSet) -> None:
        if eventSet in self._event_sets:
            self._event_sets.remove(eventSet)

    @_nvml_call
    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, errorType: int, counterType: int) -> int:
        s = self.specs[handle.index]
        pair = s.ecc_corrected if errorType == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else s.ecc_uncorrected
        return pair[0] if counterType == pynvml.NVML_VOLATILE_ECC else pair[1]

    @_nvml_call
    def nvmlDeviceGetRemappedRows(self, device: FakeHandle) -> tuple[int, int, int, int]:
        return self.specs[device.index].remapped_rows

    # ---- processes -------------------------------------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        out = []
        listed: list[tuple[int, int | None]]
        if isinstance(handle, FakeMigHandle):  # one worker per MIG instance, using most of it
            profile = self.specs[handle.index].mig_profiles[handle.slot]
            listed = [(6000 + 10 * handle.index + handle.slot, mig_memory_bytes(profile) // 2)]
        else:
            listed = self.processes_at(handle.index, self._now())
        for pid, used in listed:
            info = pynvml.c_nvmlProcessInfo_v2_t()
            info.pid, info.usedGpuMemory = pid, pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value if used is None else used
            obj = pynvml.nvmlStructToFriendlyObject(info)
            if obj.usedGpuMemory == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
                obj.usedGpuMemory = None  # as pynvml does
            out.append(obj)
        return out

    @_nvml_call
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        return []  # a headless inference server runs no graphics contexts

    @_nvml_call
    def nvmlDeviceGetProcessUtilization(self, handle: FakeHandle, timeStamp: int) -> list[Any]:
        """One sample per process, stamped now; NotFound when nothing is newer than timeStamp."""
        now_us = int(self.clock() * 1e6)
        if now_us <= timeStamp:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        util = self.utilization_at(handle.index, self._now())
        samples = []
        for i, (pid, _) in enumerate(self.processes_at(handle.index, self._now())):
            sample = pynvml.c_nvmlProcessUtilizationSample_t()
            sample.pid, sample.timeStamp = pid, now_us
            sample.smUtil = util if i == 0 else util // 4
            samples.append(sample)
        return samples

    # ---- PCIe ------------------------------------------------------------------------------------
    def _pcie_bytes(self, gpu: int, t: float, direction: str) -> int:
        s = self.specs[gpu]
        if direction == "tx":
            total = self._integral(gpu, t, s.pcie_tx_low_bps, s.pcie_tx_high_bps)
        else:
            total = self._integral(gpu, t, s.pcie_rx_low_bps, s.pcie_rx_high_bps)
        return (s.pcie_counter_start + int(total)) % 2**64

    @_nvml_call
    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, fieldIds: list[Any]) -> Any:
        gpu = handle.index
        s = self.specs[gpu]
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        now = self.clock()
        t = now - self.t0
        for i, field in enumerate(fieldIds):
            field_id, scope = field if isinstance(field, tuple) else (field, 0)  # (fieldId, scopeId) as pynvml
            values[i].fieldId, values[i].scopeId = field_id, scope
            values[i].timestamp = int(now * 1e6)
            counter = {
                pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES: "tx",
                pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES: "rx",
            }.get(field_id)
            if counter and s.pcie_counters:
                values[i].nvmlReturn = pynvml.NVML_SUCCESS
                values[i].valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                values[i].value.ullVal = self._pcie_bytes(gpu, t, counter)
            else:
                self._nvlink_field(gpu, t, values[i])
        return values

    @_nvml_call
    def nvmlDeviceGetPcieThroughput(self, device: FakeHandle, counter: int) -> int:
        """KB/s over the last 20 ms window (the wait is the injected default latency)."""
        s = self.specs[device.index]
        busy = self._busy(device.index, self._now())
        if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES:
            bps = s.pcie_tx_high_bps if busy else s.pcie_tx_low_bps
        else:
            bps = s.pcie_rx_high_bps if busy else s.pcie_rx_low_bps
        return int(bps / 1024)

    @_nvml_call
    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return self.specs[handle.index].pcie_generation

    @_nvml_call
    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self.specs[handle.index].pcie_width

    @_nvml_call
    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeHandle) -> int:
        # The link downtrains when idle, which is why link max comes from the Max* calls.
        return self.specs[handle.index].pcie_generation if self._busy(handle.index, self._now()) else 1

    @_nvml_call
    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self.specs[handle.index].pcie_width

    @_nvml_call
    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        return self.specs[handle.index].replay_counter

    # ---- thermals, power, clocks -----------------------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        t = self._now()
        return int(52 + 8 * math.sin(t / 30.0 + handle.index) + (6 if self._busy(handle.index, t) else 0))

    @_nvml_call
    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        s = self.specs[handle.index]
        return s.power_high_mw if self._busy(handle.index, self._now()) else s.power_low_mw

    @_nvml_call
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self.specs[handle.index].power_limit_mw

    @_nvml_call
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        s = self.specs[handle.index]
        # mJ since "driver load": integral of the phase power (mW) over seconds.
        return 10_000_000 + int(self._integral(handle.index, self._now(), s.power_low_mw, s.power_high_mw))

    @_nvml_call
    def nvmlDeviceGetFanSpeed_v2(self, handle: FakeHandle, fan: int) -> int:
        speed = self.specs[handle.index].fan_speed_percent
        if speed is None or fan != 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return speed

    @_nvml_call
    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, type: int) -> int:
        if type == pynvml.NVML_CLOCK_MEM:
            return 2619
        return 1980 if self._busy(handle.index, self._now()) else 1755

    def _clock_event_reasons(self, handle: FakeHandle) -> int:
        t = self._now()
        reasons = 0
        if self.utilization_at(handle.index, t) < 10:
            reasons |= pynvml.nvmlClocksEventReasonGpuIdle
        if self._busy(handle.index, t) and self._noise(handle.index, t) > 0.9:
            reasons |= pynvml.nvmlClocksEventReasonSwPowerCap
        if handle.index == 1 and t % 30.0 < 1.0:  # a brief thermal event every 30 s on GPU 1
            reasons |= pynvml.nvmlClocksEventReasonSwThermalSlowdown
        return reasons

    @_nvml_call
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._clock_event_reasons(handle)

    @_nvml_call
    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._clock_event_reasons(handle)

    # ---- NVLink fields and GPM (Hopper+) ----------------------------------------------------------
    def _nvlink_field(self, gpu: int, t: float, entry: Any) -> None:
        """Link count (91) and per-link cumulative KiB (138 tx / 139 rx, scopeId = link); else NotSupported."""
        s = self.specs[gpu]
        entry.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        if not s.nvlink_links:
            return
        if entry.fieldId == pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT:
            entry.nvmlReturn, entry.valueType, entry.value.uiVal = 0, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, s.nvlink_links
        elif entry.fieldId in (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX):
            if entry.scopeId >= s.nvlink_links:
                entry.nvmlReturn = pynvml.NVML_ERROR_INVALID_ARGUMENT
                return
            tx = entry.fieldId == pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
            total = self._integral(gpu, t, *((s.nvlink_tx_low_bps, s.nvlink_tx_high_bps) if tx
                                             else (s.nvlink_rx_low_bps, s.nvlink_rx_high_bps)))
            entry.nvmlReturn, entry.valueType = 0, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            entry.value.ullVal = int(total / s.nvlink_links / 1024)

    def gpm_percent_at(self, gpu: int, metric_id: int, t: float, gpu_instance: int | None = None) -> float | None:
        """GPM metric `metric_id` at fake time t; None: not supported."""
        return self._gpm_percents(gpu, t, gpu_instance).get(metric_id)

    def _gpm_percents(self, gpu: int, t: float, gpu_instance: int | None) -> dict[int, float]:
        """Every GPM metric at fake time t: activity follows the duty cycle, and each GPU drifts between
        tensor-bound and memory-bound phases (a 90 s cycle, offset per GPU) so a dashboard shows the two
        apart; a MIG GPU instance gets its own share."""
        s = self.specs[gpu]
        util: float = self.utilization_at(gpu, t)
        busy = self._busy(gpu, t)
        if gpu_instance is not None:
            util *= 0.4 + 0.15 * (gpu_instance % 4)
        tensor_mix = 0.2 + 0.6 * (0.5 + 0.5 * math.sin(2 * math.pi * (t / 90.0 + gpu * 0.37)))
        per_metric = {
            pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: util,
            pynvml.NVML_GPM_METRIC_SM_UTIL: util * 0.9,
            pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: util * 0.45,
            pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: util * tensor_mix if busy else 1.0,
            pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: util * (1.0 - tensor_mix * 0.8),
            pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: (s.nvlink_tx_high_bps if busy else s.nvlink_tx_low_bps) / MIB,
            pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: (s.nvlink_rx_high_bps if busy else s.nvlink_rx_low_bps) / MIB,
        }
        return per_metric

    @_nvml_call
    def nvmlGpmQueryDeviceSupport(self, device: FakeHandle) -> Any:
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = int(self.specs[device.index].gpm_supported)
        return support

    @_nvml_call
    def nvmlGpmSampleAlloc(self) -> Any:
        """A real c_nvmlGpmSample_t pointer, so it fits c_nvmlGpmMetricsGet_t.sample1/2 like pynvml's."""
        sample = ctypes.pointer(pynvml.struct_c_nvmlGpmSample_t())
        self._gpm_samples[ctypes.addressof(sample.contents)] = (sample, None)
        return sample

    @_nvml_call
    def nvmlGpmSampleFree(self, gpmSample: Any) -> None:
        if self._gpm_samples.pop(ctypes.addressof(gpmSample.contents), None) is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _gpm_take(self, device: FakeHandle, gi: int | None, gpmSample: Any) -> Any:
        if not self.specs[device.index].gpm_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        key = ctypes.addressof(gpmSample.contents)
        if key not in self._gpm_samples:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._gpm_samples[key] = (gpmSample, (device.index, gi, self._now()))
        return gpmSample

    @_nvml_call
    def nvmlGpmSampleGet(self, device: FakeHandle, gpmSample: Any) -> Any:
        return self._gpm_take(device, None, gpmSample)

    @_nvml_call
    def nvmlGpmMigSampleGet(self, device: FakeHandle, gpuInstanceId: int, gpmSample: Any) -> Any:
        return self._gpm_take(device, gpuInstanceId, gpmSample)

    @_nvml_call
    def nvmlGpmMetricsGet(self, metricsGet: Any) -> Any:
        """Checks what the driver checks (version, two samples of one GPU >= 100 ms apart), then fills in
        each requested metric with its own nvmlReturn."""
        if metricsGet.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        first, second = (self._gpm_samples.get(ctypes.addressof(p.contents), (None, None))[1]
                         for p in (metricsGet.sample1, metricsGet.sample2))
        if first is None or second is None or first[:2] != second[:2] or second[2] - first[2] < 0.1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu, gi, t = second
        percents = self._gpm_percents(gpu, t, gi)
        for i in range(metricsGet.numMetrics):
            metric = metricsGet.metrics[i]
            value = percents.get(metric.metricId)
            metric.nvmlReturn = pynvml.NVML_SUCCESS if value is not None else pynvml.NVML_ERROR_NOT_SUPPORTED
            metric.value = value or 0.0
        return metricsGet


def _unwrapped(call: Callable[..., Any]) -> Callable[..., Any]:
    """The fake's own answer without _nvml_call's bookkeeping (a replayed call must count once)."""
    return call.__wrapped__  # type: ignore[attr-defined]


def fake_call_names() -> list[str]:
    """The pynvml functions the fake implements."""
    return sorted(n for n, v in vars(FakeNvml).items() if n.startswith("nvml") and callable(v))


__all__ = ["FakeGpuSpec", "FakeHandle", "FakeNvml", "fake_call_names"]
