"""Reads one GPU into a GpuReading: the scalar specs (specs.py) plus the families with their own shape.

Every NVML error is classified and handled as errors.py says (one policy for the scalar, GPM and NVLink
calls): unsupported, denied and a bug of ours (a TypeError) are recorded once and the call is skipped for
that GPU, which stays up; a transient failure omits that one value and is reported in `errors`; a lost GPU
or a driver gone aborts the read.
"""
from __future__ import annotations

import logging
import struct
import time
from typing import Any, Callable

# The module, not its names: gpm.py imports errors.py from this package, so either may be imported first.
from exporter.sources import gpm as gpm_source
from exporter.sources.nvml.errors import POLICY, Fault, NvmlCalls, classify, error_name
from exporter.sources.nvml.pcie_fallback import BlockingPcieThroughput
from exporter.sources.nvml.readings import GpuIdentity, GpuProcess, GpuReading, MigReading
from exporter.sources.nvml.specs import (
    ENERGY,
    GPU_SCALARS,
    POWER_FROM_ENERGY,
    SAMPLE_BUFFER_SECONDS,
    Derived,
    FieldValue,
    Gpm,
    GpuScalar,
    NvLink,
    NvmlCall,
)
from exporter.sources.pcie import CounterReading, counter_rate, link_bytes_per_second

log = logging.getLogger("exporter.nvml")

FI_PCIE_TX_BYTES = 197  # NVML_FI_DEV_PCIE_COUNT_TX_BYTES
FI_PCIE_RX_BYTES = 198  # NVML_FI_DEV_PCIE_COUNT_RX_BYTES
# Wrap modulus per NVML value type (nvmlValueType_t): uint, ulong (64-bit on Linux), ulonglong.
_VALUE_MODULUS = {1: 2**32, 2: 2**64, 3: 2**64}
REOPEN_BACKOFF_S = 5.0
PROCESS_REFRESH_S = 1.0  # process lists change slowly; two list calls per GPU per tick are not worth it
HEALTH_REFRESH_S = 5.0  # ECC counters and remapped rows: health, not jitter
_CLOCK_EVENT_REASONS = NvmlCall("nvmlDeviceGetCurrentClocksEventReasons",
                                fallback=NvmlCall("nvmlDeviceGetCurrentClocksThrottleReasons"))  # before R535
_NVML_SUCCESS = 0
_NVML_ERROR_NOT_SUPPORTED = 3
_UNRESOLVED = object()  # a call's pynvml constant is missing from this binding
_FIELDS_KEY = "nvmlDeviceGetFieldValues"  # the one batch per read: scalar fields and the PCIe counters


class _GpuLost(Exception):
    pass


_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _field_value(fv: Any) -> int | float:
    """The number in an nvmlFieldValue_t, by its value type (nvmlValueType_t)."""
    return getattr(fv.value, _VALUE_MEMBER.get(fv.valueType, "ullVal"))


# nvmlFieldValue_t as pynvml lays it out (LP64): fieldId, scopeId, timestamp, latencyUsec, valueType,
# nvmlReturn, the 8-byte value union. Unpacked in one go: pynvml's structs run Python code on every
# attribute read (_PrintableStructure.__getattribute__), a few dozen per GPU per tick otherwise.
_FIELD_VALUE = struct.Struct("=IIqqII8s")
_VALUE_FORMAT = {t: struct.Struct(f) for t, f in
                 {0: "=d", 1: "=I", 2: "=Q", 3: "=Q", 4: "=q", 5: "=i", 6: "=H"}.items()}
_ULL = _VALUE_FORMAT[3]
Field = tuple[int, int, int | float, int, int]  # (nvmlReturn, valueType, value, timestamp us, fieldId)


def _decode_fields(got: Any) -> list[Field]:
    """Each entry of an nvmlDeviceGetFieldValues answer as (nvmlReturn, valueType, value, timestamp, fieldId)."""
    try:
        data = bytes(got)
    except TypeError:  # not a ctypes array (a test double): attribute by attribute
        data = b""
    if data and len(data) == len(got) * _FIELD_VALUE.size:
        return [(ret, vt, _VALUE_FORMAT.get(vt, _ULL).unpack_from(raw)[0], ts, fid)
                for fid, _, ts, _, vt, ret, raw in _FIELD_VALUE.iter_unpack(data)]
    return [(fv.nvmlReturn, fv.valueType, _field_value(fv), fv.timestamp, fv.fieldId) for fv in got]


# The optional NVML call groups, each made only when asked for (`reads`): pipeline/collectors.py maps
# collectors onto them.
READS = frozenset({"processes", "mig", "clock-events", "ecc", "remapped-rows"})

_Labelled = dict[GpuScalar, tuple[tuple[tuple[tuple[str, str], ...], float], ...]]


class GpuReader:
    """Reads one GPU. Not thread-safe: one read thread at a time uses it; `in_call()` may be asked from
    another. GPM state is the read thread's own (a GpmReaders passed to read())."""

    def __init__(self, nvml: Any, index: int, pcie_fallback: BlockingPcieThroughput, *,
                 specs: tuple[GpuScalar, ...] = GPU_SCALARS, reads: frozenset[str] = READS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nvml = nvml
        self.index = index
        self.identity = GpuIdentity(index, "", "", "", None)
        # Only the rows and optional call groups asked for are read (exporter/cli.py derives both from
        # pipeline/collectors.py).
        self.collect_processes = "processes" in reads
        self._collect_mig = "mig" in reads
        self._collect_clock_events = "clock-events" in reads
        self._collect_ecc = "ecc" in reads
        self._collect_remapped_rows = "remapped-rows" in reads
        self._specs = specs
        # Split once by source: the read is on every tick.
        self._called = tuple((s, s.source) for s in specs if isinstance(s.source, NvmlCall))
        self._fields = tuple(s for s in specs if isinstance(s.source, FieldValue))
        self._derived = tuple((s, s.source) for s in specs if isinstance(s.source, Derived))
        self._gpm = tuple((s, s.source) for s in specs if isinstance(s.source, Gpm))
        self._nvlink = tuple((s, s.source) for s in specs if isinstance(s.source, NvLink))
        self._own_gpm = gpm_source.GpmReaders()  # for callers that read from one thread only (tests, benches)
        self._gpm_reader: gpm_source.GpmReader | None = None  # the one in use during a read, for in_call()
        self._clock = clock
        self._processes: tuple[GpuProcess, ...] | None = None
        self._last_refresh: dict[str, float] = {}  # what -> clock() of its last refresh (see _due)
        self._process_util_seen = 0  # newest per-process sample timestamp NVML returned (us)
        self._util_seen = 0  # newest utilisation sample timestamp NVML returned (us); 0 = not read yet
        self._health: dict[str, Any] = {}
        self._energy_prev: tuple[float, float] | None = None  # (joules, clock() seconds)
        self._mig: list[tuple[Any, str, int, int]] | None = None  # (handle, uuid, gi, ci), re-enumerated
        self._buffer_seconds: float | None = None
        self._handle: Any = None
        self._arguments: dict[NvmlCall, tuple[tuple[Any, ...], dict[str, Any]] | None] = {}
        # What this GPU's calls answered, shared with its GPM/NVLink readers (errors.py's policy).
        self._calls = NvmlCalls(index)
        self._unsupported = self._calls.skip  # call keys not asked again (NotSupported, NoPermission, bugs)
        self._current_call: str | None = None
        self._pcie_fallback = pcie_fallback
        self._pcie_prev: dict[str, CounterReading] = {}
        # Calls answered by their field in the read's batch: None until the first read after an open decides.
        self._batched: dict[NvmlCall, int] | None = None
        self._pcie_fields: tuple[Field | None, Field | None] | None = None  # this read's, from the batch
        self._reopen_at = 0.0
        self._errors: list[str] = []  # calls that failed this read: counted, the GPU is not ok
        self._recorded: list[str] = []  # calls recorded once this read (denied, bugs): the GPU stays up

    @property
    def driver_gone(self) -> bool:
        """A call said NVML lost its driver: the source must initialise again."""
        return self._calls.driver_gone

    def in_call(self) -> str | None:
        """The NVML function this reader is blocked in right now, if any (for "stuck in <call>")."""
        gpm = self._gpm_reader
        return self._current_call or (gpm.current_call if gpm is not None else None)

    def _due(self, what: str, period: float) -> bool:
        """True at most once per `period` seconds for `what`; the first ask is always due."""
        now = self._clock()
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
        if key in self._unsupported:
            return None
        fn = getattr(self.nvml, name, None)
        if fn is None:  # an older binding without this function
            self._unsupported.add(key)
            return None
        self._current_call = name
        try:
            return fn(self._handle if on is None else on, *args, **kwargs)
        except Exception as exc:
            if error_name(exc) in quiet:
                return None
            fault = self._calls.failed(key, name, exc, self._errors, self._recorded)
            if fault is Fault.UNSUPPORTED:
                log.info("GPU %d: %s not supported (%s); omitted from now on", self.index, key, error_name(exc))
            elif fault in (Fault.LOST, Fault.DRIVER_GONE):
                raise _GpuLost(fault.value) from exc
            return None
        finally:
            self._current_call = None

    def _query(self, call: NvmlCall | None) -> Any:
        """Ask a declared call (or its fallback once it is unsupported); None without an answer."""
        while call is not None:
            if call.key not in self._unsupported:
                if call not in self._arguments:
                    self._arguments[call] = self._resolve(call)
                resolved = self._arguments[call]
                if resolved is None:
                    self._unsupported.add(call.key)  # a binding too old to name the constant
                else:
                    answer = self._call(call.function, *resolved[0], key=call.key, **resolved[1])
                    if answer is not None or call.key not in self._unsupported:
                        return answer
            call = call.fallback
        return None

    def _resolve(self, call: NvmlCall) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The call's arguments with pynvml constant names looked up; None when one is missing."""
        def value(arg: int | str) -> Any:
            return getattr(self.nvml, arg, _UNRESOLVED) if isinstance(arg, str) else arg

        args = tuple(value(a) for a in call.args)
        kwargs = {k: value(v) for k, v in call.kwargs}
        if _UNRESOLVED in args or _UNRESOLVED in kwargs.values():
            return None
        return args, kwargs

    def _open(self) -> None:
        nvml = self.nvml
        self._current_call = "nvmlDeviceGetHandleByIndex"
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        finally:
            self._current_call = None
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
        self._batched = None  # a reset board may answer other fields

    # ---- one read ----------------------------------------------------------------------------------
    @property
    def lost(self) -> bool:
        """The last read found the GPU lost (it is re-opened every REOPEN_BACKOFF_S)."""
        return self._handle is None and self._reopen_at > 0

    def read(self, gpm: gpm_source.GpmReaders | None = None) -> GpuReading:
        """One read. `gpm`: the calling thread's own GPM readers (the sampler's read thread passes its
        own, so a thread that replaces a stuck one never touches the stuck one's GPM buffers)."""
        self._errors, self._recorded = [], []
        values: dict[str, Any] = {}
        scalars: dict[GpuScalar, float] = {}
        labelled: _Labelled = {}
        try:
            if self._handle is None:
                now = self._clock()
                if now < self._reopen_at:
                    raise _GpuLost("not reopened yet")
                self._reopen_at = now + REOPEN_BACKOFF_S
                try:
                    self._open()
                except _GpuLost:
                    raise
                except Exception as exc:  # no handle: the GPU is down whatever the class
                    self._errors.append("nvmlDeviceGetHandleByIndex")
                    if classify(exc) is Fault.DRIVER_GONE:
                        self._calls.driver_gone = True
                    raise _GpuLost(error_name(exc)) from exc
            self._read_scalars(scalars)
            self._read_values(values, scalars)
            if self._gpm or self._nvlink:
                self._read_gpm(self._own_gpm if gpm is None else gpm, scalars, labelled)
        except _GpuLost:
            self._handle = None  # re-open later: after a reset the old handle is stale
            return GpuReading(errors=tuple(self._errors), recorded=tuple(self._recorded), lost=True)
        return GpuReading(scalars=scalars, labelled=labelled, errors=tuple(self._errors),
                          recorded=tuple(self._recorded), **values)

    def _read_gpm(self, readers: gpm_source.GpmReaders, scalars: dict[GpuScalar, float], labelled: _Labelled) -> None:
        """GPM activity (the GPU's and per MIG GPU instance) and NVLink throughput, for the Gpm and NvLink
        specs read; a collector switched off (its specs left out) makes no call."""
        reader = readers.get(self.index, self._handle, self._new_gpm_reader)
        mig = self._mig or ()
        self._gpm_reader = reader
        try:
            got = reader.read(sorted({gi for _, _, gi, _ in mig if gi >= 0}))
        finally:
            self._gpm_reader = None
        self._errors.extend(got.errors)
        self._recorded.extend(got.recorded)
        if got.lost:
            raise _GpuLost("GPM")
        per_instance = dict(got.mig)
        for spec, source in self._gpm:
            if got.activity is not None and (value := getattr(got.activity, source.activity)) is not None:
                scalars[spec] = value
            if per_instance:
                labelled[spec] = tuple(
                    ((("mig_uuid", uuid), ("gpu_instance_id", str(gi)), ("compute_instance_id", str(ci))), v)
                    for _, uuid, gi, ci in mig
                    if gi in per_instance and (v := getattr(per_instance[gi], source.activity)) is not None)
        for spec, link_source in self._nvlink:
            tx = link_source.direction == "tx"
            if link_source.per_link:
                links = tuple(((("link", str(link)),), v) for link, link_tx, link_rx in got.nvlink_links
                              if (v := link_tx if tx else link_rx) is not None)
                if links:
                    labelled[spec] = links
            elif (total := got.nvlink_tx_bytes_per_second if tx else got.nvlink_rx_bytes_per_second) is not None:
                scalars[spec] = total

    def _new_gpm_reader(self, handle: Any) -> gpm_source.GpmReader:
        return gpm_source.GpmReader(self.nvml, handle, self.index, self._clock, calls=self._calls,
                                    activity=bool(self._gpm), nvlink=bool(self._nvlink),
                                    per_link=any(s.per_link for _, s in self._nvlink))

    def _read_scalars(self, out: dict[GpuScalar, float]) -> None:
        """Every scalar spec: one NVML call per distinct call (specs may share one), except the calls whose
        field this GPU answers; those, the field specs and the PCIe counters come in one batch."""
        answers = self._read_batch(out)
        for spec, call in self._called:
            if call not in answers:
                answers[call] = self._query(call)
            raw = answers[call]
            value = spec.convert(raw) if raw is not None else None
            if value is not None:
                out[spec] = value
        for spec, derived in self._derived:
            value = derived.compute(out)
            if value is not None:
                out[spec] = value

    def _field_candidates(self) -> dict[NvmlCall, int]:
        """The calls that declare a field this binding names (the first read after an open tries them all)."""
        out: dict[NvmlCall, int] = {}
        for _, call in self._called:
            if call.field_name is not None and call not in out and call.key not in self._unsupported:
                field_id = getattr(self.nvml, call.field_name, None)
                if isinstance(field_id, int):
                    out[call] = field_id
        return out

    def _read_batch(self, out: dict[GpuScalar, float]) -> dict[NvmlCall, Any]:
        """The read's one nvmlDeviceGetFieldValues: fields standing in for calls (their answers, returned),
        FieldValue specs (into `out`) and the PCIe byte counters (kept for _read_pcie). A field the GPU does
        not answer goes back to its call, decided on the first read after an open and logged at DEBUG."""
        self._pcie_fields = None
        deciding = self._batched is None
        batched = self._field_candidates() if self._batched is None else self._batched
        pcie = "pcie_counters" not in self._unsupported
        ids = list(dict.fromkeys([*batched.values(),
                                  *(s.source.field_id for s in self._fields if isinstance(s.source, FieldValue)),
                                  *((FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES) if pcie else ())]))
        if not ids or _FIELDS_KEY in self._unsupported:
            if deciding:
                self._decided({})
            return {}
        got = self._call("nvmlDeviceGetFieldValues", ids, key=_FIELDS_KEY)
        if got is None:  # not supported at all (every call is made), or failed this once (so is every call)
            if _FIELDS_KEY in self._unsupported:
                self._decided({})
            return {}
        by_id = {fv[4]: fv for fv in _decode_fields(got)}
        if pcie:
            self._pcie_fields = (by_id.get(FI_PCIE_TX_BYTES), by_id.get(FI_PCIE_RX_BYTES))
        answers: dict[NvmlCall, Any] = {}
        kept: dict[NvmlCall, int] = {}
        for call, field_id in batched.items():
            fv = by_id.get(field_id)
            if fv is not None and fv[0] == _NVML_SUCCESS:
                answers[call] = fv[2]
                kept[call] = field_id
            elif not deciding and fv is not None and fv[0] != _NVML_ERROR_NOT_SUPPORTED:
                answers[call] = None  # failed this once: omitted, as a failed call would be
                kept[call] = field_id
                self._errors.append(_FIELDS_KEY)
            elif not deciding:  # the field stopped being answered: its call from now on (asked this read)
                log.info("GPU %d: field %s no longer supported; calling %s instead", self.index, call.field_name,
                         call.key)
        if deciding:
            self._decided(kept)
        else:
            self._batched = kept
        unsupported = []
        for spec in self._fields:
            fv = by_id.get(spec.source.field_id) if isinstance(spec.source, FieldValue) else None
            if fv is not None and fv[0] == _NVML_SUCCESS:  # each entry has its own status
                value = spec.convert(fv[2])
                if value is not None:
                    out[spec] = value
            elif fv is not None and fv[0] == _NVML_ERROR_NOT_SUPPORTED:
                unsupported.append(spec)
        if unsupported:  # probed once, like any other call
            log.info("GPU %d: fields not supported: %s; omitted from now on", self.index,
                     ", ".join(s.name for s in unsupported))
            self._fields = tuple(s for s in self._fields if s not in unsupported)
        return answers

    def _decided(self, batched: dict[NvmlCall, int]) -> None:
        self._batched = batched
        if log.isEnabledFor(logging.DEBUG):
            called = sorted({c.key for c in self._field_candidates() if c not in batched})
            log.debug("GPU %d: read as field values: %s; as calls: %s", self.index,
                      ", ".join(f"{c.key} <- {c.field_name}" for c in batched) or "none", ", ".join(called) or "none")

    def _read_values(self, v: dict[str, Any], scalars: dict[GpuScalar, float]) -> None:
        samples = self._read_utilization_samples()
        if samples is not None:
            v["utilization_samples"] = samples
            if self._buffer_seconds is not None and SAMPLE_BUFFER_SECONDS in self._specs:
                scalars[SAMPLE_BUFFER_SECONDS] = self._buffer_seconds
        self._read_pcie(v)
        joules = scalars.get(ENERGY)
        if joules is not None:
            at = self._clock()
            prev = self._energy_prev
            if prev is not None and at > prev[1] and joules >= prev[0] and POWER_FROM_ENERGY in self._specs:
                scalars[POWER_FROM_ENERGY] = (joules - prev[0]) / (at - prev[1])  # none across a driver reload
            self._energy_prev = (joules, at)
        if self._collect_clock_events:
            v["clock_event_reasons"] = self._query(_CLOCK_EVENT_REASONS)
        mig = self._read_mig() if self._collect_mig else None
        if mig is not None:
            v["mig"] = mig
        elif self.collect_processes:  # with MIG on, processes are listed per MIG device instead
            v["processes"] = self._read_processes()
        if self._collect_ecc or self._collect_remapped_rows:
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
                n = self._call("nvmlDeviceGetTotalEccErrors", etype, ctype, key="ecc") if self._collect_ecc else None
                if n is not None:
                    ecc.append(((error, scope), int(n)))
        rows = self._call("nvmlDeviceGetRemappedRows") if self._collect_remapped_rows else None
        self._health = {"ecc_errors": tuple(ecc) if ecc else None,
                        "remapped_rows": tuple(int(x) for x in rows) if rows is not None else None}
        return self._health

    def _read_utilization_samples(self) -> tuple[float, ...] | None:
        """Every driver utilisation sample since the last read, as ratios; None where unsupported.

        last_seen only ever comes from timestamps NVML returned. Samples with timestamp 0 or a value over
        100 are skipped. The first read returns the whole buffer: it measures how far back the buffer
        reaches and is not counted (those samples predate the exporter).
        """
        if "samples_gpu" in self._unsupported:
            return None
        got = self._call("nvmlDeviceGetSamples", self.nvml.NVML_GPU_UTILIZATION_SAMPLES, self._util_seen,
                         key="samples_gpu", quiet=("NVMLError_NotFound",))
        if got is None:
            return None if "samples_gpu" in self._unsupported else ()
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
        if "pcie_counters" not in self._unsupported:
            fields = self._pcie_fields  # from this read's batch (_read_batch)
            if fields is not None:
                link = self.identity.pcie_link_max_bytes_per_second
                max_rate = link * 1.5 if link else None
                supported = 0
                for direction, fv in zip(("tx", "rx"), fields):
                    if fv is None or fv[0] != _NVML_SUCCESS:  # each entry has its own status
                        continue
                    supported += 1
                    _, value_type, raw, stamp, _ = fv
                    modulus = _VALUE_MODULUS.get(value_type, 2**64)
                    cur = CounterReading(int(raw), int(stamp))
                    rate = counter_rate(self._pcie_prev.get(direction), cur, modulus, max_rate)
                    self._pcie_prev[direction] = cur
                    v[f"pcie_{direction}_bytes_per_second"] = rate
                if supported:
                    return
                self._unsupported.add("pcie_counters")
                log.info("GPU %d: PCIe byte counters not supported; using the blocking "
                         "nvmlDeviceGetPcieThroughput on a 1 s cadence in its own thread", self.index)
                self._pcie_fallback.register(self.index, self._handle)
            elif _FIELDS_KEY in self._unsupported:
                self._unsupported.add("pcie_counters")
                self._pcie_fallback.register(self.index, self._handle)
        slot = self._pcie_fallback.latest(self.index)
        if slot is None:
            return
        if slot.unsupported:  # counted once where its policy counts it (denied)
            if slot.fault is not None and "pcie_fallback" not in self._unsupported:
                self._unsupported.add("pcie_fallback")
                if POLICY[slot.fault].counted:
                    self._recorded.append("nvmlDeviceGetPcieThroughput")
            return
        if slot.error:
            self._errors.append("nvmlDeviceGetPcieThroughput")
        if slot.at and self._clock() - slot.at < 5.0:
            v["pcie_tx_bytes_per_second"] = slot.tx
            v["pcie_rx_bytes_per_second"] = slot.rx
