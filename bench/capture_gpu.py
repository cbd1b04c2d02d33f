#!/usr/bin/env python3
"""Record what NVML answers on this machine for every call the exporter makes, into a replayable fixture.

    python bench/capture_gpu.py [--out tests/fixtures] [--repeat 50] [--gpm-ticks 25]

For each GPU: each call's value (or the NVMLError it raised, NotSupported included) and its latency
percentiles over --repeat calls; GPM support, the activity GPM reports and the cost of one GPM tick
(nvmlGpmSampleGet + nvmlGpmMetricsGet at the exporter's 200 ms cadence, exporter/sources/gpm.py); NVLink
links. Writes tests/fixtures/<gpu-name>.json, which tests/test_fixture_replay.py replays through the fake.
Needs a real NVIDIA driver (or the test stand-in via LD_LIBRARY_PATH); a clear one-line error otherwise.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pynvml  # noqa: E402

from exporter.sources.gpm import GpmReader  # noqa: E402

SCHEMA = 1
P = pynvml


def device_calls(h: Any) -> dict[str, Callable[[], Any]]:
    """key -> the exporter's call on handle h, keyed by pynvml function name plus its distinguishing argument."""
    return {
        "nvmlDeviceGetName": lambda: P.nvmlDeviceGetName(h),
        "nvmlDeviceGetUUID": lambda: P.nvmlDeviceGetUUID(h),
        "nvmlDeviceGetPciInfo": lambda: P.nvmlDeviceGetPciInfo(h),
        "nvmlDeviceGetMaxPcieLinkGeneration": lambda: P.nvmlDeviceGetMaxPcieLinkGeneration(h),
        "nvmlDeviceGetMaxPcieLinkWidth": lambda: P.nvmlDeviceGetMaxPcieLinkWidth(h),
        "nvmlDeviceGetCurrPcieLinkGeneration": lambda: P.nvmlDeviceGetCurrPcieLinkGeneration(h),
        "nvmlDeviceGetCurrPcieLinkWidth": lambda: P.nvmlDeviceGetCurrPcieLinkWidth(h),
        "nvmlDeviceGetUtilizationRates": lambda: P.nvmlDeviceGetUtilizationRates(h),
        "nvmlDeviceGetSamples[GPU_UTILIZATION]": lambda: samples_summary(h),
        "nvmlDeviceGetMemoryInfo": lambda: P.nvmlDeviceGetMemoryInfo(h),
        "nvmlDeviceGetMemoryInfo[v2]": lambda: P.nvmlDeviceGetMemoryInfo(h, version=P.nvmlMemory_v2),
        "nvmlDeviceGetFieldValues[PCIE_COUNT_TX,RX]": lambda: P.nvmlDeviceGetFieldValues(h, [197, 198]),
        "nvmlDeviceGetFieldValues[NVLINK_LINK_COUNT]": lambda: P.nvmlDeviceGetFieldValues(h, [91]),
        "nvmlDeviceGetPcieReplayCounter": lambda: P.nvmlDeviceGetPcieReplayCounter(h),
        "nvmlDeviceGetTemperature[GPU]": lambda: P.nvmlDeviceGetTemperature(h, P.NVML_TEMPERATURE_GPU),
        "nvmlDeviceGetPowerUsage": lambda: P.nvmlDeviceGetPowerUsage(h),
        "nvmlDeviceGetEnforcedPowerLimit": lambda: P.nvmlDeviceGetEnforcedPowerLimit(h),
        "nvmlDeviceGetTotalEnergyConsumption": lambda: P.nvmlDeviceGetTotalEnergyConsumption(h),
        "nvmlDeviceGetClockInfo[SM]": lambda: P.nvmlDeviceGetClockInfo(h, P.NVML_CLOCK_SM),
        "nvmlDeviceGetClockInfo[MEM]": lambda: P.nvmlDeviceGetClockInfo(h, P.NVML_CLOCK_MEM),
        "nvmlDeviceGetCurrentClocksEventReasons": lambda: P.nvmlDeviceGetCurrentClocksEventReasons(h),
        "nvmlDeviceGetCurrentClocksThrottleReasons": lambda: P.nvmlDeviceGetCurrentClocksThrottleReasons(h),
        "nvmlDeviceGetMigMode": lambda: P.nvmlDeviceGetMigMode(h),
        "nvmlDeviceGetMaxMigDeviceCount": lambda: P.nvmlDeviceGetMaxMigDeviceCount(h),
        "nvmlDeviceGetTotalEccErrors[CORRECTED,VOLATILE]": lambda: P.nvmlDeviceGetTotalEccErrors(
            h, P.NVML_MEMORY_ERROR_TYPE_CORRECTED, P.NVML_VOLATILE_ECC),
        "nvmlDeviceGetTotalEccErrors[UNCORRECTED,AGGREGATE]": lambda: P.nvmlDeviceGetTotalEccErrors(
            h, P.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, P.NVML_AGGREGATE_ECC),
        "nvmlDeviceGetRemappedRows": lambda: P.nvmlDeviceGetRemappedRows(h),
        "nvmlDeviceGetComputeRunningProcesses": lambda: P.nvmlDeviceGetComputeRunningProcesses(h),
        "nvmlDeviceGetGraphicsRunningProcesses": lambda: P.nvmlDeviceGetGraphicsRunningProcesses(h),
        "nvmlDeviceGetProcessUtilization": lambda: P.nvmlDeviceGetProcessUtilization(h, 0),
        "nvmlGpmQueryDeviceSupport": lambda: P.nvmlGpmQueryDeviceSupport(h),
    }


# The blocking PCIe fallback takes ~20 ms a call: a few calls are enough.
SLOW_CALLS = {
    "nvmlDeviceGetPcieThroughput[TX]": lambda h: P.nvmlDeviceGetPcieThroughput(h, P.NVML_PCIE_UTIL_TX_BYTES),
    "nvmlDeviceGetPcieThroughput[RX]": lambda h: P.nvmlDeviceGetPcieThroughput(h, P.NVML_PCIE_UTIL_RX_BYTES),
}


def samples_summary(h: Any) -> dict[str, Any]:
    """The whole driver utilisation buffer, summarised (it is too long to keep)."""
    value_type, samples = P.nvmlDeviceGetSamples(h, P.NVML_GPU_UTILIZATION_SAMPLES, 0)
    stamps = [int(s.timeStamp) for s in samples]
    values = [int(s.sampleValue.uiVal if value_type == P.NVML_VALUE_TYPE_UNSIGNED_INT else s.sampleValue.ullVal)
              for s in samples]
    return {"value_type": value_type, "count": len(samples), "values_last_10": values[-10:],
            "span_seconds": (max(stamps) - min(stamps)) / 1e6 if stamps else 0.0,
            "zero_timestamps": stamps.count(0)}


def plain(value: Any) -> Any:
    """JSON-able form of what pynvml returns: ctypes structs and unions, arrays, friendly objects, bytes."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, ctypes.Array)):
        return [plain(v) for v in value]
    if isinstance(value, ctypes.Union):
        return None  # meaningful only with its valueType, below
    if isinstance(value, ctypes.Structure):
        out = {name: plain(getattr(value, name)) for name, *_ in value._fields_}
        if isinstance(getattr(value, "value", None), ctypes.Union) and hasattr(value, "valueType"):
            out["value"] = union_value(value.value, value.valueType)  # nvmlFieldValue_t
        return out
    if isinstance(value, ctypes._Pointer):
        return None
    if hasattr(value, "__dict__"):
        return {k: plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return repr(value)


def union_value(v: Any, value_type: int) -> float | int:
    """An nvmlValue_t read as its nvmlValueType_t says."""
    return {0: v.dVal, 1: v.uiVal, 2: v.ulVal, 3: v.ullVal, 4: v.sllVal, 5: v.siVal, 6: v.usVal}.get(value_type, v.ullVal)


def percentiles(ns: list[int]) -> dict[str, float]:
    us = sorted(x / 1000 for x in ns)
    pick = lambda q: us[min(len(us) - 1, int(q * len(us)))]  # noqa: E731
    return {"p50": round(statistics.median(us), 2), "p90": round(pick(0.9), 2), "p99": round(pick(0.99), 2),
            "max": round(us[-1], 2), "n": len(us)}


def measure(fn: Callable[[], Any], repeat: int) -> dict[str, Any]:
    """Calls fn `repeat` times: its last value (or error) and its latency."""
    times: list[int] = []
    result: dict[str, Any] = {}
    for _ in range(repeat):
        t = time.perf_counter_ns()
        try:
            value = fn()
            times.append(time.perf_counter_ns() - t)
            result = {"value": plain(value)}
        except pynvml.NVMLError as exc:
            times.append(time.perf_counter_ns() - t)
            result = {"error": type(exc).__name__, "code": exc.value}
            break  # the answer does not change; one call says it
        except pynvml.NVMLLibraryMismatchError as exc:
            result = {"error": type(exc).__name__, "code": None}
            break
    result["latency_us"] = percentiles(times) if times else None
    return result


def gpu_instance_ids(h: Any) -> list[int]:
    """The GPU instances of a GPU in MIG mode; [] otherwise."""
    try:
        if not P.nvmlDeviceGetMigMode(h)[0]:
            return []
        slots = P.nvmlDeviceGetMaxMigDeviceCount(h)
    except pynvml.NVMLError:
        return []
    ids = set()
    for slot in range(slots):
        try:
            ids.add(P.nvmlDeviceGetGpuInstanceId(P.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)))
        except pynvml.NVMLError:  # NotFound: an empty slot
            continue
    return sorted(ids)


def capture_gpm(h: Any, index: int, ticks: int, interval: float) -> dict[str, Any]:
    """Runs the exporter's own GPM reader at its cadence: what it reports and what one tick costs
    (with MIG on, that tick includes one nvmlGpmMigSampleGet per GPU instance)."""
    reader = GpmReader(pynvml, h, index)
    instances = gpu_instance_ids(h)
    costs: list[int] = []
    reading = None
    try:
        for _ in range(ticks):
            t = time.perf_counter_ns()
            reading = reader.read(instances)
            costs.append(time.perf_counter_ns() - t)
            time.sleep(interval)
    finally:
        reader.close()
    assert reading is not None
    activity = reading.activity
    return {"activity": dataclasses.asdict(activity) if activity is not None else None,
            "mig": {str(gi): dataclasses.asdict(a) for gi, a in reading.mig},
            "nvlink_tx_bytes_per_second": reading.nvlink_tx_bytes_per_second,
            "nvlink_rx_bytes_per_second": reading.nvlink_rx_bytes_per_second,
            "nvlink_source": reading.nvlink_source, "errors": list(reading.errors),
            "tick_cost_us": percentiles(costs[1:] or costs), "interval_s": interval}


def event_support(h: Any) -> dict[str, Any]:
    es = P.nvmlEventSetCreate()
    try:
        P.nvmlDeviceRegisterEvents(h, P.nvmlEventTypeXidCriticalError, es)
        return {"xid_events": True}
    except pynvml.NVMLError as exc:
        return {"xid_events": False, "error": type(exc).__name__}
    finally:
        P.nvmlEventSetFree(es)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def capture(repeat: int, gpm_ticks: int, interval: float) -> dict[str, Any]:
    t = time.perf_counter_ns()
    P.nvmlInit()
    init_us = (time.perf_counter_ns() - t) / 1000
    try:
        system = {"driver": plain(P.nvmlSystemGetDriverVersion()),
                  "nvml": measure(P.nvmlSystemGetNVMLVersion, 1).get("value"),
                  "cuda_driver": measure(P.nvmlSystemGetCudaDriverVersion, 1).get("value"),
                  "pynvml": getattr(pynvml, "__version__", None) or _dist_version("nvidia-ml-py"),
                  "init_us": round(init_us, 1)}
        gpus = []
        for index in range(P.nvmlDeviceGetCount()):
            t = time.perf_counter_ns()
            h = P.nvmlDeviceGetHandleByIndex(index)
            handle_us = (time.perf_counter_ns() - t) / 1000
            calls = {key: measure(fn, repeat) for key, fn in device_calls(h).items()}
            calls.update({key: measure(lambda fn=fn: fn(h), max(3, repeat // 10)) for key, fn in SLOW_CALLS.items()})
            links_answer = calls["nvmlDeviceGetFieldValues[NVLINK_LINK_COUNT]"].get("value")
            links = links_answer[0]["value"] if links_answer and links_answer[0]["nvmlReturn"] == 0 else 0
            if links:
                fields = [(f, link) for link in range(links) for f in (138, 139)]
                calls["nvmlDeviceGetFieldValues[NVLINK_THROUGHPUT_DATA_TX,RX per link]"] = measure(
                    lambda: P.nvmlDeviceGetFieldValues(h, fields), repeat)
            gpm_answer = calls["nvmlGpmQueryDeviceSupport"].get("value") or {}
            gpm = capture_gpm(h, index, gpm_ticks, interval) if gpm_answer.get("isSupportedDevice") else None
            gpus.append({"index": index, "name": calls["nvmlDeviceGetName"].get("value"),
                         "handle_us": round(handle_us, 1), "nvlink_links": links, "gpm": gpm,
                         "events": event_support(h), "calls": calls})
    finally:
        P.nvmlShutdown()
    return {"schema": SCHEMA, "captured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "kernel": platform.release(), "python": platform.python_version()},
            "repeat": repeat, "system": system, "gpus": gpus}


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures", help="directory for <gpu-name>.json")
    ap.add_argument("--repeat", type=int, default=50, help="calls per NVML function, for latency percentiles")
    ap.add_argument("--gpm-ticks", type=int, default=25, help="GPM reader ticks per GPU, at --interval")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between GPM ticks (the exporter's default)")
    a = ap.parse_args(argv)
    if a.repeat < 1 or a.gpm_ticks < 2 or a.interval < 0.1:
        print("capture_gpu: --repeat >= 1, --gpm-ticks >= 2 and --interval >= 0.1 please", file=sys.stderr)
        return 2
    try:
        result = capture(a.repeat, a.gpm_ticks, a.interval)
    except pynvml.NVMLError as exc:
        print(f"capture_gpu: NVML unavailable: {exc} ({type(exc).__name__}); run it on a machine with an "
              "NVIDIA driver", file=sys.stderr)
        return 1
    if not result["gpus"]:
        print("capture_gpu: NVML found no GPU", file=sys.stderr)
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{slug(result['gpus'][0]['name'] or 'unknown')}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    for gpu in result["gpus"]:
        unsupported = sorted(k for k, v in gpu["calls"].items() if v.get("error") == "NVMLError_NotSupported")
        cost = gpu["gpm"]["tick_cost_us"] if gpu["gpm"] else None
        print(f"GPU {gpu['index']} {gpu['name']}: {len(gpu['calls'])} calls, NotSupported: {', '.join(unsupported) or 'none'}")
        print(f"  GPM: {'p50 %.1f us, p99 %.1f us per tick' % (cost['p50'], cost['p99']) if cost else 'unsupported'}"
              f"; NVLink links: {gpu['nvlink_links']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
