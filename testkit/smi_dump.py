"""An `nvidia-smi -q -x` dump as the C stand-in's configuration (testkit/nvml_stub), or as the Python fake's.

    python -m testkit.smi_dump DUMP.xml [--out FILE] [--format stub|fake]

stub (default): the stand-in's key=value lines ($NVML_STUB_CONFIG), every GPU of the dump; fake: the parsed
dump as JSON (what exporter.fake.smi.SmiNvml serves, which `--fake-gpus-from DUMP.xml` reads directly).
The parse is exporter/fake/smi.py's, so both replay one board. A file that is not a dump: one line, exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from exporter.fake.smi import CALL_VALUES, SmiDump, error_code, parse_dump, read_dump, NotADump  # noqa: F401

# SmiGpu.values keys that are stand-in keys of the same name and unit.
_SAME = ("util", "mem_util", "mem_total", "mem_used", "temp", "power_mw", "limit_mw", "energy_mj",
         "reasons", "pcie_gen", "pcie_width", "pcie_cur_gen", "pcie_cur_width", "replay", "fan", "pstate",
         "ecc_0_0", "ecc_0_1", "ecc_1_0", "ecc_1_1", "remap_corr", "remap_unc", "remap_pending", "remap_failure")
# pynvml names whose C symbol (the stand-in's fail.<symbol> key) carries a version suffix.
_C_SYMBOL = {"nvmlDeviceGetComputeRunningProcesses": "nvmlDeviceGetComputeRunningProcesses_v3",
             "nvmlDeviceGetGraphicsRunningProcesses": "nvmlDeviceGetGraphicsRunningProcesses_v3"}
# Scalar field ids the exporter batches in place of calls (specs.py), and the driver branch from which a board
# answers each. Not checked against every branch's headers: an older guess only moves a board to the
# fallback path (the calls), whose values are the same; what matters is that the old dumps exercise it.
_FIELD_SINCE = {83: 450, 94: 450, 185: 535}  # TOTAL_ENERGY_CONSUMPTION, PCIE_REPLAY_COUNTER, POWER_AVERAGE
_NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE: a process's memory nvidia-smi shows as N/A


def stub_config(dump: SmiDump) -> dict[str, str]:
    """The stand-in's configuration replaying every GPU of the dump (keys suffixed .<gpu>)."""
    out: dict[str, str] = {"gpus": str(len(dump.gpus)), "driver": dump.driver or "unknown"}
    major = re.match(r"[0-9]+", dump.driver or "")
    refused = [str(f) for f, since in _FIELD_SINCE.items() if major is None or int(major.group()) < since]
    if refused:
        out["field_na"] = ",".join(refused)
    for i, g in enumerate(dump.gpus):
        put = lambda key, value: out.__setitem__(f"{key}.{i}", str(value))  # noqa: E731
        put("name", g.name or "unknown")
        if g.uuid:
            put("uuid", g.uuid)
        if g.bus_id:
            put("bus_id", g.bus_id)
        for key in _SAME:
            if key in g.values:
                put(key, g.values[key])
        put("mem_reserved", g.values.get("mem_reserved", 0))  # before R510 nvidia-smi's "used" is v1's
        for key in ("sm_mhz", "mem_mhz"):  # one clock may be N/A while the other is not: per reading
            put(key, g.values.get(key, "na"))
        put("pcie_tx_bps", g.values.get("pcie_tx_kbps", 0) * 1024)  # NVML's "KB/s" is KiB/s
        put("pcie_rx_bps", g.values.get("pcie_rx_kbps", 0) * 1024)
        put("gpm_supported", 0)  # nvidia-smi -q shows no GPM; Hopper dumps would need it stated
        unsupported = g.unsupported()
        put("pcie_counters", int("nvmlDeviceGetFieldValues(PCIE_COUNT_TX/RX_BYTES)" not in unsupported))
        for call in unsupported:
            if "(" not in call:
                put(f"fail.{_C_SYMBOL.get(call, call)}", error_code(g, call))
        if g.mig:
            put("mig", ",".join(str(m.gpu_instance_id) for m in g.mig))
            for m in g.mig:
                for key, value in (("mem_total", m.memory_total), ("mem_used", m.memory_used),
                                   ("mem_reserved", m.memory_reserved)):
                    if value is not None:
                        put(f"{key}.gi{m.gpu_instance_id}", value)
        for key, kinds in (("procs", ("C", "C+G")), ("gprocs", ("G", "C+G"))):
            listed = [f"{p.pid}:{_NOT_AVAILABLE if p.used is None else p.used}"
                      for p in g.processes or () if p.kind in kinds]
            if listed:
                put(key, ",".join(listed))
    return out


def fake_fixture(dump: SmiDump) -> dict[str, Any]:
    """The parsed dump as JSON, with the calls each GPU answers NotSupported."""
    doc = dataclasses.asdict(dump)
    for gpu, parsed in zip(doc["gpus"], dump.gpus):
        gpu["not_supported"] = parsed.unsupported()
    return doc


# ---- what the exporter should serve for a dump (the tests' expectations, and docs/gpus.md) ------------
# Flags that turn on every collector whose series nvidia-smi also shows.
EXPORTER_FLAGS = ("--collector.ecc", "--collector.row-remap", "--collector.pcie-link", "--collector.clock-event-state")
_GT_PER_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
            0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
            0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}
# The families each NotSupported call costs (with the label that narrows it, if it shares a family).
CALL_FAMILIES: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {
    "nvmlDeviceGetUtilizationRates": (("gpu_utilization_ratio", {}), ("gpu_memory_bandwidth_utilization_ratio", {})),
    "nvmlDeviceGetSamples": (("gpu_sampled_utilization_ratio_count", {}), ("gpu_sample_buffer_seconds", {})),
    "nvmlDeviceGetTemperature": (("gpu_temperature_celsius", {}),),
    "nvmlDeviceGetPowerUsage": (("gpu_power_watts", {}),),
    "nvmlDeviceGetEnforcedPowerLimit": (("gpu_power_limit_watts", {}),),
    "nvmlDeviceGetTotalEnergyConsumption": (("gpu_energy_joules_total", {}),),
    "nvmlDeviceGetClockInfo(SM)": (("gpu_clock_hertz", {"clock": "sm"}),),
    "nvmlDeviceGetClockInfo(MEM)": (("gpu_clock_hertz", {"clock": "memory"}),),
    "nvmlDeviceGetCurrentClocksThrottleReasons": (("gpu_clock_event_active", {}),
                                                  ("gpu_clock_event_seconds_total", {})),
    "nvmlDeviceGetMaxPcieLinkGeneration": (("gpu_pcie_link_max_bytes_per_second", {}),
                                           ("gpu_pcie_utilization_ratio", {})),
    "nvmlDeviceGetMaxPcieLinkWidth": (("gpu_pcie_link_max_bytes_per_second", {}), ("gpu_pcie_utilization_ratio", {})),
    "nvmlDeviceGetPcieThroughput": (("gpu_pcie_throughput_bytes_per_second", {}),),
    "nvmlDeviceGetPcieReplayCounter": (("gpu_pcie_replay_errors_total", {}),),
    "nvmlDeviceGetFanSpeed_v2": (("gpu_fan_speed_ratio", {}),),
    "nvmlDeviceGetTotalEccErrors": (("gpu_ecc_errors_total", {}),),
    "nvmlDeviceGetRemappedRows": (("gpu_remapped_rows", {}), ("gpu_row_remap_pending", {}),
                                  ("gpu_row_remap_failure", {})),
    "nvmlDeviceGetMigMode": (("gpu_mig_memory_used_bytes", {}),),
    "nvmlDeviceGetComputeRunningProcesses": (("gpu_process_memory_used_bytes", {}),),
    "nvmlDeviceGetProcessUtilization": (("gpu_process_sm_utilization_ratio", {}),),
}
# Readings the Python fake jitters (exporter/fake/smi.py): relative or absolute tolerance there.
JITTER = {"gpu_utilization_ratio": (0.0, 0.02), "gpu_power_watts": (0.01, 0.0)}


def pcie_link_bytes_per_second(gen: int, width: int) -> float:
    """Per direction: GT/s x lanes x line-code efficiency / 8 bits."""
    return _GT_PER_S[gen] * 1e9 * width * (0.8 if gen <= 2 else 128 / 130) / 8


Series = tuple[str, tuple[tuple[str, str], ...]]  # family sample name, the labels that identify it


def expected_series(dump: SmiDump) -> dict[Series, float]:
    """Every series whose number nvidia-smi also shows, with that number in the exporter's base units."""
    out: dict[Series, float] = {}
    for i, g in enumerate(dump.gpus):
        v, gpu = g.values, ("gpu", str(i))

        def put(name: str, value: float, *labels: tuple[str, str]) -> None:
            out[(name, (gpu, *labels))] = value

        put("gpu_up", 1)
        if g.bus_id:  # the label a user's dashboards will see on that node
            put("gpu_info", 1, ("pci_bus_id", g.bus_id.upper()), ("name", g.name))
        unsupported = set(g.unsupported())
        if "nvmlDeviceGetUtilizationRates" not in unsupported:
            put("gpu_utilization_ratio", v["util"] / 100)
            put("gpu_memory_bandwidth_utilization_ratio", v["mem_util"] / 100)
        put("gpu_memory_total_bytes", v["mem_total"])
        put("gpu_memory_used_bytes", v["mem_used"])
        for key, name, scale in (("temp", "gpu_temperature_celsius", 1), ("power_mw", "gpu_power_watts", 1e-3),
                                 ("limit_mw", "gpu_power_limit_watts", 1e-3), ("fan", "gpu_fan_speed_ratio", 1e-2),
                                 ("replay", "gpu_pcie_replay_errors_total", 1)):
            if key in v:
                put(name, v[key] * scale)
        for key, clock in (("sm_mhz", "sm"), ("mem_mhz", "memory")):
            if key in v:
                put("gpu_clock_hertz", v[key] * 1e6, ("clock", clock))
        if "pcie_gen" in v and "pcie_width" in v:
            for d in ("tx", "rx"):
                put("gpu_pcie_link_max_bytes_per_second", pcie_link_bytes_per_second(v["pcie_gen"], v["pcie_width"]),
                    ("direction", d))
        if "nvmlDeviceGetPcieThroughput" not in unsupported:
            put("gpu_pcie_throughput_bytes_per_second", v["pcie_tx_kbps"] * 1024, ("direction", "tx"))
            put("gpu_pcie_throughput_bytes_per_second", v["pcie_rx_kbps"] * 1024, ("direction", "rx"))
        if "reasons" in v:
            for bit, reason in _REASONS.items():
                put("gpu_clock_event_active", int(bool(v["reasons"] & bit)), ("reason", reason))
        if "nvmlDeviceGetTotalEccErrors" not in unsupported:
            for etype, error in enumerate(("corrected", "uncorrected")):
                for counter, scope in enumerate(("volatile", "aggregate")):
                    put("gpu_ecc_errors_total", v[f"ecc_{etype}_{counter}"], ("error", error), ("scope", scope))
        if "nvmlDeviceGetRemappedRows" not in unsupported:
            put("gpu_remapped_rows", v["remap_corr"], ("cause", "correctable"))
            put("gpu_remapped_rows", v["remap_unc"], ("cause", "uncorrectable"))
            put("gpu_row_remap_pending", v["remap_pending"])
            put("gpu_row_remap_failure", v["remap_failure"])
        for m in g.mig or ():
            gi = ("gpu_instance_id", str(m.gpu_instance_id))
            if m.memory_total is not None and m.memory_used is not None:
                put("gpu_mig_memory_total_bytes", m.memory_total, gi)
                put("gpu_mig_memory_used_bytes", m.memory_used + m.memory_reserved, gi)  # v1 on a MIG device
        if not g.mig:
            for p in g.processes or ():
                if p.used is not None:
                    put("gpu_process_memory_used_bytes", p.used, ("pid", str(p.pid)))
    return out


def absent_series(dump: SmiDump) -> list[Series]:
    """The (family, labels) each GPU must not serve: those of its NotSupported calls."""
    out: list[Series] = []
    for i, g in enumerate(dump.gpus):
        unsupported = set(g.unsupported())
        if "nvmlDeviceGetCurrentClocksThrottleReasons" in unsupported and \
                "nvmlDeviceGetCurrentClocksEventReasons" not in unsupported:
            unsupported.discard("nvmlDeviceGetCurrentClocksThrottleReasons")  # the newer call answers
        for call in unsupported:
            for name, labels in CALL_FAMILIES.get(call, ()):
                out.append((name, (("gpu", str(i)), *labels.items())))
    return out


def gpus_table(dumps: dict[str, SmiDump]) -> str:
    """docs/gpus.md's table: one row per GPU of each dump."""
    rows = ["| Dump | GPU | Architecture | Driver (schema) | Series served (families) | Calls NotSupported (or newer than the driver) |",
            "|---|---|---|---|---|---|"]
    for file, dump in sorted(dumps.items()):
        for i, g in enumerate(dump.gpus):
            served = sorted({name.removesuffix("_count") for (name, labels) in expected_series(dump)
                             if ("gpu", str(i)) in labels})
            missing = [c for c in g.unsupported() if c != "nvmlDeviceGetMemoryInfo_v2" or "mem_total" not in g.values]
            rows.append(f"| {file} | {g.name} | {g.architecture or '-'} | {dump.driver or '-'} "
                        f"({dump.schema or 'no DTD'}) | {', '.join(f'`{n}`' for n in served)} | "
                        f"{', '.join(missing) or '-'} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testkit.smi_dump", description=__doc__.split("\n")[0])
    p.add_argument("dump", nargs="+", help="nvidia-smi -q -x output (several only with --format table)")
    p.add_argument("--out", help="write here instead of stdout")
    p.add_argument("--format", choices=("stub", "fake", "table"), default="stub",
                   help="table: docs/gpus.md's table of what the exporter serves for each dump")
    a = p.parse_args(argv)
    if len(a.dump) > 1 and a.format != "table":
        p.error("several dumps only with --format table")
    dumps = {}
    for path in a.dump:
        try:
            dumps[Path(path).name] = read_dump(path)
        except (OSError, NotADump) as exc:
            print(f"{path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return 2
    dump = next(iter(dumps.values()))
    if a.format == "table":
        text = gpus_table(dumps)
    elif a.format == "stub":
        text = "".join(f"{k}={v}\n" for k, v in stub_config(dump).items())
    else:
        text = json.dumps(fake_fixture(dump), indent=1) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
