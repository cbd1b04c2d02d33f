"""Recorded GPUs: an `nvidia-smi -q -x` dump turned into what NVML would answer on that board.

`parse_dump` reads the XML (every GPU in it) into `SmiGpu`s whose values are keyed and scaled as the NVML
calls behind them answer (MiB -> bytes, W -> mW, "Active" -> the clock-event bitmask, ...). A value the dump
shows as "N/A", or does not show at all, is absent: the call behind it answers NVML_ERROR_NOT_SUPPORTED.
`SmiNvml` serves a dump through the Python fake (--fake-gpus-from); testkit/smi_dump.py writes the same
parse as the C stand-in's configuration, so both replay one board from one parser.

The dump is untrusted: bounded in bytes, GPUs, elements and depth, parsed by expat with no DTD or entity of
its own allowed in any encoding (the dumps' `<!DOCTYPE nvidia_smi_log SYSTEM "...dtd">` names an external
DTD, which expat never loads).
"""
from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from xml.parsers import expat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pynvml

from exporter.fake.nvml import FakeGpuSpec, FakeHandle, FakeMigHandle, FakeNvml, _nvml_call, _unwrapped, fake_uuid

MAX_DUMP_BYTES = 4 * 1024 * 1024  # a 16-GPU dump with every supported clock listed is ~1.2 MB
MAX_GPUS = 16
MAX_PROCESSES = 256
MAX_MIG = 7
MAX_ELEMENTS = 100_000  # a real dump has ~300-1 100 per GPU; a tree costs ~100 bytes an element
MAX_DEPTH = 32  # real dumps nest 6 deep
MIB = 1024 * 1024
# Bounded digits (a longer number is no reading, and would overflow float -> int); _text strips the
# value, so no second run of \s* may follow the unit (two adjacent ones backtrack quadratically).
_NUMBER = re.compile(r"(-?[0-9]{1,20}(?:\.[0-9]{1,20})?)\s*([A-Za-z/%]*)\Z")
_DOCTYPE = re.compile(rb"<!DOCTYPE\s+nvidia_smi_log(\s+SYSTEM\s+\"[A-Za-z0-9_.]+\")?\s*>")

# nvidia-smi's clock event (formerly "throttle") reason -> NVML's nvmlClocksEventReason* bit.
_REASON_BITS = {"gpu_idle": 0x1, "applications_clocks_setting": 0x2, "sw_power_cap": 0x4, "hw_slowdown": 0x8,
                "sync_boost": 0x10, "sw_thermal_slowdown": 0x20, "hw_thermal_slowdown": 0x40,
                "hw_power_brake_slowdown": 0x80, "display_clocks_setting": 0x100}

# Every NVML call the exporter makes whose answer a dump shows, and the values (SmiGpu.values keys) it
# needs: a call with any of them absent answers NotSupported. One table for the stand-in, the fake and docs.
CALL_VALUES: dict[str, tuple[str, ...]] = {
    "nvmlDeviceGetUtilizationRates": ("util", "mem_util"),
    "nvmlDeviceGetSamples": ("util",),
    "nvmlDeviceGetMemoryInfo": ("mem_total", "mem_used"),
    "nvmlDeviceGetMemoryInfo_v2": ("mem_total", "mem_used", "mem_reserved"),
    "nvmlDeviceGetTemperature": ("temp",),
    "nvmlDeviceGetPowerUsage": ("power_mw",),
    "nvmlDeviceGetEnforcedPowerLimit": ("limit_mw",),
    "nvmlDeviceGetTotalEnergyConsumption": ("energy_mj",),
    "nvmlDeviceGetClockInfo(SM)": ("sm_mhz",),
    "nvmlDeviceGetClockInfo(MEM)": ("mem_mhz",),
    "nvmlDeviceGetCurrentClocksEventReasons": ("reasons", "reasons_api_r535"),
    "nvmlDeviceGetCurrentClocksThrottleReasons": ("reasons",),
    "nvmlDeviceGetMaxPcieLinkGeneration": ("pcie_gen",),
    "nvmlDeviceGetMaxPcieLinkWidth": ("pcie_width",),
    "nvmlDeviceGetCurrPcieLinkGeneration": ("pcie_cur_gen",),
    "nvmlDeviceGetCurrPcieLinkWidth": ("pcie_cur_width",),
    "nvmlDeviceGetPcieThroughput": ("pcie_tx_kbps", "pcie_rx_kbps"),
    "nvmlDeviceGetFieldValues(PCIE_COUNT_TX/RX_BYTES)": ("pcie_tx_kbps", "pcie_rx_kbps", "pcie_counters_r555"),
    "nvmlDeviceGetPcieReplayCounter": ("replay",),
    "nvmlDeviceGetFanSpeed_v2": ("fan",),
    "nvmlDeviceGetPerformanceState": ("pstate",),
    "nvmlDeviceGetTotalEccErrors": ("ecc_0_0", "ecc_0_1", "ecc_1_0", "ecc_1_1"),
    "nvmlDeviceGetRemappedRows": ("remap_corr", "remap_unc", "remap_pending", "remap_failure"),
    "nvmlDeviceGetProcessUtilization": ("process_samples",),  # never shown by nvidia-smi -q: always absent
}
# Calls answered from SmiGpu.mig / .processes (None: NotSupported).
MIG_CALL = "nvmlDeviceGetMigMode"
PROCESS_CALLS = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses")


class NotADump(ValueError):
    """The input is not an nvidia-smi -q -x dump this parser accepts."""


@dataclass(frozen=True)
class SmiMig:
    gpu_instance_id: int
    compute_instance_id: int
    memory_total: int | None  # bytes
    memory_used: int | None
    memory_reserved: int


@dataclass(frozen=True)
class SmiProcess:
    pid: int
    kind: str  # "C" compute, "G" graphics, "C+G" both
    used: int | None  # bytes; None: N/A (as on Windows WDDM)


@dataclass(frozen=True)
class SmiGpu:
    name: str
    uuid: str
    bus_id: str
    architecture: str  # "" where the schema predates <product_architecture>
    values: dict[str, int] = field(default_factory=dict)  # NVML units; absent: NotSupported
    mig: tuple[SmiMig, ...] | None = None  # None: MIG mode N/A (NotSupported); (): MIG off
    processes: tuple[SmiProcess, ...] | None = None

    def unsupported(self) -> list[str]:
        """The NVML calls (CALL_VALUES keys, MIG_CALL, PROCESS_CALLS) that answer NotSupported on this board."""
        out = [call for call, keys in CALL_VALUES.items() if any(k not in self.values for k in keys)]
        if self.mig is None:
            out.append(MIG_CALL)
        if self.processes is None:
            out.extend(PROCESS_CALLS)
        return out


@dataclass(frozen=True)
class SmiDump:
    driver: str
    schema: str  # the DTD's version ("v12"), or "" where the dump names none
    gpus: tuple[SmiGpu, ...]


def _text(el: ET.Element | None, *paths: str) -> str | None:
    """The first of `paths` under el that is present with a value; None for N/A, absent or empty."""
    if el is None:
        return None
    for path in paths:
        found = el.find(path)
        if found is not None:
            text = (found.text or "").strip()
            if text and text not in ("N/A", "[N/A]", "Unknown Error", "[Not Supported]", "Not Supported") \
                    and not text.startswith("Requested functionality"):
                return text
    return None


def _number(el: ET.Element | None, *paths: str, unit: str = "", scale: float = 1.0) -> int | None:
    """A "67.03 W"-style value in the wanted unit, times scale, rounded; None for N/A or another unit."""
    text = _text(el, *paths)
    m = _NUMBER.match(text) if text is not None else None
    if m is None or m.group(2) != unit:
        return None
    value = round(float(m.group(1)) * scale)
    return value if 0 <= value < 2**63 else None  # NVML answers unsigned, and no board holds 8 EiB


def _put(values: dict[str, int], key: str, value: int | None) -> None:
    if value is not None:
        values[key] = value


def _yes_no(el: ET.Element | None, path: str) -> int | None:
    text = _text(el, path)
    return {"Yes": 1, "No": 0}.get(text) if text else None


def _ecc(gpu: ET.Element, values: dict[str, int]) -> None:
    """Corrected / uncorrected totals per scope, as nvmlDeviceGetTotalEccErrors sums the locations."""
    for counter, scope in enumerate(("volatile", "aggregate")):
        el = gpu.find(f"ecc_errors/{scope}")
        if el is None:
            return
        for etype, (old, uncorrected) in enumerate(((("single_bit/total",), False), (("double_bit/total",), True))):
            if el.find(old[0].split("/")[0]) is not None:  # schema v10/v11 on older boards
                total = _number(el, *old)
            else:
                parts = [c for c in el if c.tag.endswith("_correctable") != uncorrected
                         and ("uncorrectable" in c.tag) == uncorrected]
                nums = [_number(c, ".") for c in parts]
                total = sum(n for n in nums if n is not None) if parts and None not in nums else None
            _put(values, f"ecc_{etype}_{counter}", total)


def _gpu(el: ET.Element, driver_major: int) -> SmiGpu:
    v: dict[str, int] = {}
    _put(v, "util", _number(el, "utilization/gpu_util", unit="%"))
    _put(v, "mem_util", _number(el, "utilization/memory_util", unit="%"))
    _put(v, "mem_total", _number(el, "fb_memory_usage/total", unit="MiB", scale=MIB))
    _put(v, "mem_used", _number(el, "fb_memory_usage/used", unit="MiB", scale=MIB))
    _put(v, "mem_reserved", _number(el, "fb_memory_usage/reserved", unit="MiB", scale=MIB))  # R510+ (v2)
    _put(v, "temp", _number(el, "temperature/gpu_temp", unit="C"))
    power = el.find("gpu_power_readings")
    power = power if power is not None else el.find("power_readings")
    # NVML's power usage is the 1 s average on Ampere and newer, which v12+ dumps show beside the instant.
    _put(v, "power_mw", _number(power, "average_power_draw", "power_draw", unit="W", scale=1000))
    _put(v, "limit_mw", _number(power, "enforced_power_limit", "current_power_limit", unit="W", scale=1000))
    # No committed dump shows an energy counter; this element name is an assumption (unverified).
    _put(v, "energy_mj", _number(el, "total_energy_consumption", unit="mJ"))
    _put(v, "sm_mhz", _number(el, "clocks/sm_clock", unit="MHz"))
    _put(v, "mem_mhz", _number(el, "clocks/mem_clock", unit="MHz"))
    reasons = el.find("clocks_event_reasons")
    if reasons is None:
        reasons = el.find("clocks_throttle_reasons")
    if reasons is not None and len(reasons):
        mask, known = 0, 0
        for child in reasons:
            bit = _REASON_BITS.get(re.sub(r"^clocks_(event|throttle)_reason_", "", child.tag))
            state = _text(child, ".")
            if bit is not None and state in ("Active", "Not Active"):
                known += 1
                mask |= bit if state == "Active" else 0
        if known:
            v["reasons"] = mask
    if driver_major >= 535:  # nvmlDeviceGetCurrentClocksEventReasons is new in R535
        v["reasons_api_r535"] = 1
    link = el.find("pci/pci_gpu_link_info")
    _put(v, "pcie_gen", _number(link, "pcie_gen/max_link_gen"))
    _put(v, "pcie_width", _number(link, "link_widths/max_link_width", unit="x"))
    _put(v, "pcie_cur_gen", _number(link, "pcie_gen/current_link_gen"))
    _put(v, "pcie_cur_width", _number(link, "link_widths/current_link_width", unit="x"))
    _put(v, "pcie_tx_kbps", _number(el, "pci/tx_util", unit="KB/s"))
    _put(v, "pcie_rx_kbps", _number(el, "pci/rx_util", unit="KB/s"))
    if driver_major >= 555:  # NVML_FI_DEV_PCIE_COUNT_*_BYTES are R555+
        v["pcie_counters_r555"] = 1
    _put(v, "replay", _number(el, "pci/replay_counter"))
    _put(v, "fan", _number(el, "fan_speed", unit="%"))
    pstate = _text(el, "performance_state")
    if pstate and re.fullmatch(r"P[0-9]{1,2}", pstate):
        v["pstate"] = int(pstate[1:])
    _ecc(el, v)
    _put(v, "remap_corr", _number(el, "remapped_rows/remapped_row_corr"))
    _put(v, "remap_unc", _number(el, "remapped_rows/remapped_row_unc"))
    _put(v, "remap_pending", _yes_no(el, "remapped_rows/remapped_row_pending"))
    _put(v, "remap_failure", _yes_no(el, "remapped_rows/remapped_row_failure"))

    mig: tuple[SmiMig, ...] | None = None
    mode = _text(el, "mig_mode/current_mig")
    if mode == "Disabled":
        mig = ()
    elif mode == "Enabled":
        found = []
        for dev in el.findall("mig_devices/mig_device")[:MAX_MIG]:
            gi, ci = _number(dev, "gpu_instance_id"), _number(dev, "compute_instance_id")
            if gi is None:
                continue
            found.append(SmiMig(gi, ci if ci is not None else 0,
                                _number(dev, "fb_memory_usage/total", unit="MiB", scale=MIB),
                                _number(dev, "fb_memory_usage/used", unit="MiB", scale=MIB),
                                _number(dev, "fb_memory_usage/reserved", unit="MiB", scale=MIB) or 0))
        mig = tuple(found)
    procs_el = el.find("processes")
    processes: tuple[SmiProcess, ...] | None = None
    if procs_el is not None:
        listed = []
        for p in procs_el.findall("process_info")[:MAX_PROCESSES]:
            pid = _number(p, "pid")
            kind = _text(p, "type") or "C"
            if pid is not None and pid > 0 and kind in ("C", "G", "C+G"):
                listed.append(SmiProcess(pid, kind, _number(p, "used_memory", unit="MiB", scale=MIB)))
        processes = tuple(listed)
    return SmiGpu(name=_text(el, "product_name") or "", uuid=_text(el, "uuid") or "", bus_id=el.get("id", ""),
                  architecture=_text(el, "product_architecture") or "", values=v, mig=mig, processes=processes)


def _prescan(data: bytes) -> None:
    """Refuse, in a streaming pass before a tree is built, what the byte check above cannot see: a
    declaration in an encoding other than UTF-8 (expat reads UTF-16 too), and more elements or depth
    than any dump has (4 MB of <a/> is a 100 MiB tree)."""
    parser = expat.ParserCreate()
    depth, count = 0, 0

    def doctype(name: str, sysid: str | None, pubid: str | None, internal: int) -> None:
        if internal:
            raise NotADump("has a DTD or entity declaration that nvidia-smi never writes: not an nvidia-smi dump")

    def entity(*_: object) -> None:
        raise NotADump("has an entity declaration that nvidia-smi never writes: not an nvidia-smi dump")

    def start(name: str, attrs: object) -> None:
        nonlocal depth, count
        depth, count = depth + 1, count + 1
        if depth > MAX_DEPTH:
            raise NotADump(f"elements nested over {MAX_DEPTH} deep: not an nvidia-smi dump")
        if count > MAX_ELEMENTS:
            raise NotADump(f"over {MAX_ELEMENTS} elements: not an nvidia-smi dump")

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1

    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = entity
    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.Parse(data, True)


def parse_dump(data: bytes) -> SmiDump:
    """The GPUs of an `nvidia-smi -q -x` dump; NotADump (one line) for anything else."""
    if len(data) > MAX_DUMP_BYTES:
        raise NotADump(f"larger than {MAX_DUMP_BYTES} bytes: not an nvidia-smi dump")
    # Entities are how XML bombs work and no dump has one; the only DOCTYPE allowed is nvidia-smi's own
    # external one, without an internal subset.
    if b"<!ENTITY" in data.upper() or data.count(b"<!") != len(_DOCTYPE.findall(data)):
        raise NotADump("has a DTD or entity declaration that nvidia-smi never writes: not an nvidia-smi dump")
    doctype = _DOCTYPE.search(data)
    schema = ""
    if doctype and doctype.group(1):
        m = re.search(rb"_(v[0-9]+)\.dtd", doctype.group(1))
        schema = m.group(1).decode() if m else ""
    try:
        _prescan(data)
        root = ET.fromstring(data)
    except (ET.ParseError, expat.ExpatError) as exc:
        raise NotADump(f"not XML ({str(exc)[:200]}): not an nvidia-smi dump") from None
    if root.tag != "nvidia_smi_log":
        raise NotADump(f"root element <{root.tag[:40]}>, not <nvidia_smi_log>: not an nvidia-smi dump")
    gpus_el = root.findall("gpu")
    if not gpus_el:
        raise NotADump("no <gpu> element: not an nvidia-smi -q -x dump")
    if len(gpus_el) > MAX_GPUS:
        raise NotADump(f"{len(gpus_el)} GPUs; at most {MAX_GPUS}")
    driver = _text(root, "driver_version") or ""
    version = re.match(r"([0-9]{1,9})(?![0-9])", driver)
    major = int(version.group(1)) if version else 0
    return SmiDump(driver=driver, schema=schema, gpus=tuple(_gpu(g, major) for g in gpus_el))


def read_dump(path: str | Path) -> SmiDump:
    """parse_dump of a file, reading at most MAX_DUMP_BYTES + 1 bytes; OSError and NotADump as one line.
    Opened as the web config is: a FIFO or a device must not hold start-up."""
    from exporter.sources.kernfile import read_regular

    return parse_dump(read_regular(path, MAX_DUMP_BYTES))


# ---- the Python fake serving a dump ---------------------------------------------------------------------
# Calls that drivers before their introduction lack altogether: FunctionNotFound there, as pynvml reports.
_MISSING_BEFORE = {"nvmlDeviceGetMemoryInfo_v2": "mem_reserved", "nvmlDeviceGetCurrentClocksEventReasons":
                   "reasons_api_r535"}


def error_code(gpu: SmiGpu, call: str) -> int:
    """NVML's answer to an unsupported call on this board: FunctionNotFound for a call newer than its
    driver, else NotSupported."""
    key = _MISSING_BEFORE.get(call)
    if key and key not in gpu.values and (call != "nvmlDeviceGetCurrentClocksEventReasons" or "reasons" in gpu.values):
        return int(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    return int(pynvml.NVML_ERROR_NOT_SUPPORTED)


def _spec(g: SmiGpu) -> FakeGpuSpec:
    v = g.values
    tx, rx = v.get("pcie_tx_kbps", 0) * 1024, v.get("pcie_rx_kbps", 0) * 1024
    return FakeGpuSpec(
        name=g.name, memory_total_bytes=v.get("mem_total", 0), model_memory_bytes=v.get("mem_used", 0),
        pcie_generation=v.get("pcie_gen", 0), pcie_width=v.get("pcie_width", 0), power_limit_mw=v.get("limit_mw", 0),
        power_low_mw=v.get("power_mw", 0), power_high_mw=v.get("power_mw", 0),
        pcie_tx_low_bps=tx, pcie_tx_high_bps=tx, pcie_rx_low_bps=rx, pcie_rx_high_bps=rx,
        pcie_counters="nvmlDeviceGetFieldValues(PCIE_COUNT_TX/RX_BYTES)" not in g.unsupported(),
        ecc_corrected=(v.get("ecc_0_0", 0), v.get("ecc_0_1", 0)),
        ecc_uncorrected=(v.get("ecc_1_0", 0), v.get("ecc_1_1", 0)),
        remapped_rows=(v.get("remap_corr", 0), v.get("remap_unc", 0), v.get("remap_pending", 0),
                       v.get("remap_failure", 0)),
        replay_counter=v.get("replay", 0), fan_speed_percent=v.get("fan"), gpm_supported=False, nvlink_links=0)


class SmiNvml(FakeNvml):
    """The Python fake answering as the dump's GPUs did: recorded values (utilisation within +-2 points and
    power within +-1 %, the fake's deterministic jitter, so a dashboard looks alive), NotSupported where the
    dump shows N/A, MIG instances and processes as listed. No XIDs, no GPM, no NVLink."""

    def __init__(self, dump: SmiDump, clock: Callable[[], float] = time.monotonic) -> None:
        self.dump = dump
        super().__init__(specs=[_spec(g) for g in dump.gpus], clock=clock, driver_version=dump.driver or "unknown")
        for index, gpu in enumerate(dump.gpus):
            for call in gpu.unsupported():
                if "(" not in call and call in vars(FakeNvml):  # per-argument ones are answered below
                    self.inject(call, gpu=index, error=error_code(gpu, call))

    def _gpu(self, handle: FakeHandle) -> SmiGpu:
        return self.dump.gpus[handle.index]

    def utilization_at(self, gpu: int, t: float) -> int:
        recorded = self.dump.gpus[gpu].values.get("util", 0)
        return max(0, min(100, recorded + round(4 * self._noise(gpu, t)) - 2))

    def _memory_used(self, gpu: int, t: float) -> int:
        return self.dump.gpus[gpu].values.get("mem_used", 0)

    def processes_at(self, gpu: int, t: float) -> list[tuple[int, int | None]]:
        return [(p.pid, p.used) for p in self.dump.gpus[gpu].processes or () if p.kind != "G"]

    def _clock_event_reasons(self, handle: FakeHandle) -> int:
        return self._gpu(handle).values.get("reasons", 0)

    @_nvml_call
    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        if isinstance(handle, FakeMigHandle) or not self._gpu(handle).uuid:
            return fake_uuid(handle.index, handle.slot if isinstance(handle, FakeMigHandle) else None)
        return self._gpu(handle).uuid

    @_nvml_call
    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> Any:
        info = _unwrapped(FakeNvml.nvmlDeviceGetPciInfo)(self, handle)
        m = re.fullmatch(r"([0-9A-Fa-f]{1,8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])", self._gpu(handle).bus_id)
        if m:
            domain, bus, device = (int(x, 16) for x in m.groups()[:3])
            info.domain, info.bus, info.device = domain, bus, device
            info.busId = f"{domain:08X}:{bus:02X}:{device:02X}.{m.group(4)}".encode()
            info.busIdLegacy = f"{domain & 0xFFFF:04X}:{bus:02X}:{device:02X}.{m.group(4)}".encode()
        return info

    @_nvml_call
    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        out = pynvml.c_nvmlUtilization_t()
        out.gpu, out.memory = self.utilization_at(handle.index, self._now()), self._gpu(handle).values["mem_util"]
        return out

    @_nvml_call
    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        g = self._gpu(handle)
        if isinstance(handle, FakeMigHandle):
            m = (g.mig or ())[handle.slot]
            if m.memory_total is None or m.memory_used is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            total, used, reserved = m.memory_total, m.memory_used, m.memory_reserved
        else:
            total, used, reserved = g.values["mem_total"], g.values["mem_used"], g.values.get("mem_reserved", 0)
        if version:
            if "mem_reserved" not in g.values:
                raise pynvml.NVMLError(error_code(g, "nvmlDeviceGetMemoryInfo_v2"))
            out = pynvml.c_nvmlMemory_v2_t()
            out.version, out.total, out.reserved, out.used = version, total, reserved, used
            out.free = max(0, total - reserved - used)
            return out
        out = pynvml.c_nvmlMemory_t()  # v1: "used" includes the driver's reservation
        out.total, out.used, out.free = total, used + reserved, max(0, total - used - reserved)
        return out

    @_nvml_call
    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        return self._gpu(handle).values["temp"]

    @_nvml_call
    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        recorded = self._gpu(handle).values["power_mw"]
        return round(recorded * (0.99 + 0.02 * self._noise(handle.index, self._now())))

    @_nvml_call
    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, type: int) -> int:
        got = self._gpu(handle).values.get("mem_mhz" if type == pynvml.NVML_CLOCK_MEM else "sm_mhz")
        if got is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return got

    @_nvml_call
    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return self._gpu(handle).values["pcie_cur_gen"]

    @_nvml_call
    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self._gpu(handle).values["pcie_cur_width"]

    @_nvml_call
    def nvmlDeviceGetPcieThroughput(self, device: FakeHandle, counter: int) -> int:
        return self._gpu(device).values["pcie_tx_kbps" if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else "pcie_rx_kbps"]

    @_nvml_call
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        out = []
        for p in self._gpu(handle).processes or ():
            if p.kind != "C" and not isinstance(handle, FakeMigHandle):
                info = pynvml.c_nvmlProcessInfo_v2_t()
                info.pid = p.pid
                obj = pynvml.nvmlStructToFriendlyObject(info)
                obj.usedGpuMemory = p.used
                out.append(obj)
        return out

    @_nvml_call
    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        if isinstance(handle, FakeMigHandle):
            return []  # a dump lists MIG processes by instance id; none of the committed ones has any
        out = []
        for pid, used in self.processes_at(handle.index, self._now()):
            info = pynvml.c_nvmlProcessInfo_v2_t()
            info.pid = pid
            obj = pynvml.nvmlStructToFriendlyObject(info)
            obj.usedGpuMemory = used
            out.append(obj)
        return out

    @_nvml_call
    def nvmlDeviceGetProcessUtilization(self, handle: FakeHandle, timeStamp: int) -> list[Any]:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # nvidia-smi -q does not show it

    @_nvml_call
    def nvmlDeviceGetMigMode(self, device: FakeHandle) -> list[int]:
        on = int(bool(self._gpu(device).mig))
        return [on, on]

    @_nvml_call
    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: FakeHandle, index: int) -> FakeMigHandle:
        if index >= len(self._gpu(device).mig or ()):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return FakeMigHandle(device.index, index)

    @_nvml_call
    def nvmlDeviceGetGpuInstanceId(self, device: FakeMigHandle) -> int:
        return (self._gpu(device).mig or ())[device.slot].gpu_instance_id

    @_nvml_call
    def nvmlDeviceGetComputeInstanceId(self, device: FakeMigHandle) -> int:
        return (self._gpu(device).mig or ())[device.slot].compute_instance_id


__all__ = ["CALL_VALUES", "MAX_DUMP_BYTES", "MIG_CALL", "NotADump", "PROCESS_CALLS", "SmiDump", "SmiGpu",
           "SmiMig", "SmiNvml", "SmiProcess", "error_code", "parse_dump", "read_dump"]
