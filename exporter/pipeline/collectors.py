"""The collectors, node_exporter style: each declared once, here, and everything else derived from the row.

A row names the collector, its default, its help, the families it emits and the reads it needs:
- exporter/cli.py makes `--[no-]collector.<name>` (and GPU_EXPORTER_COLLECTOR_*) from it, and builds a source only
  when an enabled collector needs it (`needs`: "host.cgroup", "host.shm", "host.processes", "kubelet");
- the NVML reader makes an optional call group only when an enabled collector needs it ("nvml.<group>",
  the reader's READS), and reads a spec row (sources/nvml/specs.py) only when the collector the row names is on;
- the snapshot collector (collector.py) renders each enabled collector's families with the method
  registered under its name (`@renders("<name>")`); collect[] and exporter_collector_* use the same names.

The defaults keep one 8-GPU scrape within the series budget (docs/metrics.md) while everything the
dashboard's default rows and the alert rules read stays on. The always-on groups (ALWAYS_ON) are the
exporter itself, the core GPU gauges, and host CPU and memory: no flag turns them off.

Plain data: no source imports this module (sources get plain sets and spec rows from exporter/cli.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

ALWAYS_ON = ("exporter", "gpu", "host")


@dataclass(frozen=True)
class Collector:
    name: str
    default: bool
    help: str
    families: tuple[str, ...]  # as exposed (counters with _total): what the switch removes
    needs: tuple[str, ...] = ()  # sources and NVML call groups it needs beyond the always-on ones


COLLECTORS: tuple[Collector, ...] = (
    Collector("gpm", True, "SM, tensor, DRAM and graphics-engine activity from GPU Performance Monitoring "
              "(Hopper and newer)", ("gpu_sm_active_ratio", "gpu_sm_occupancy_ratio", "gpu_tensor_active_ratio",
                                     "gpu_dram_active_ratio", "gpu_graphics_engine_active_ratio")),
    Collector("nvlink", True, "NVLink throughput per direction, all links together",
              ("gpu_nvlink_throughput_bytes_per_second",)),
    Collector("nvlink-per-link", False, "NVLink throughput per link too (a `link` label; 36 series per H100)",
              ("gpu_nvlink_link_throughput_bytes_per_second",)),
    Collector("sample-buffer", False, "how far back the driver's utilisation sample buffer reached at start-up "
              "(constant: the longest --sample.interval that loses no sample)", ("gpu_sample_buffer_seconds",)),
    Collector("power-from-energy", False, "average power over each sampling interval from the energy counter "
              "(rate(gpu_energy_joules_total) gives the same)", ("gpu_power_from_energy_watts",)),
    Collector("pcie-histograms", True, "histogram of every sampled PCIe utilisation per direction (le=0.9 only: "
              "the saturation alert and panel read it)", ("gpu_sampled_pcie_utilization_ratio",)),
    Collector("pcie-link", False, "maximum PCIe link bytes/s per direction (static; the ratio already divides "
              "by it)", ("gpu_pcie_link_max_bytes_per_second",)),
    Collector("clock-events", True, "seconds each clock event (throttle) reason was active, per reason",
              ("gpu_clock_event_seconds_total",), needs=("nvml.clock-events",)),
    Collector("clock-event-state", False, "a 0/1 gauge per clock event reason (rate() of the seconds counter "
              "gives the same at sample resolution)", ("gpu_clock_event_active",), needs=("nvml.clock-events",)),
    Collector("ecc", False, "ECC error counters (corrected/uncorrected, volatile/aggregate) and remapped rows by "
              "cause, every 5 s", ("gpu_ecc_errors_total", "gpu_remapped_rows"),
              needs=("nvml.ecc", "nvml.remapped-rows")),
    Collector("row-remap", True, "whether a row remap waits for a GPU reset or failed (replace the board), "
              "every 5 s", ("gpu_row_remap_pending", "gpu_row_remap_failure"), needs=("nvml.remapped-rows",)),
    Collector("processes", True, "per-process GPU memory and utilisation with container/pod labels",
              ("gpu_process_memory_used_bytes", "gpu_process_sm_utilization_ratio",
               "gpu_mig_process_memory_used_bytes"), needs=("nvml.processes", "host.processes")),
    Collector("mig", True, "MIG devices: memory (and processes, with the processes collector) per instance",
              ("gpu_mig_memory_used_bytes", "gpu_mig_memory_total_bytes", "gpu_mig_process_memory_used_bytes"),
              needs=("nvml.mig", "host.processes")),
    Collector("cpu-per-core", True, "busy share of each CPU", ("host_cpu_core_utilization_ratio",)),
    Collector("cpu-histogram", True, "histogram of every sampled host CPU utilisation (le=0.9 only: the "
              "diagnosis' host-busy share reads it)",
              ("host_sampled_cpu_utilization_ratio",)),
    Collector("cgroup", True, "CPU throttling and memory of the watched cgroup (--cgroup.path)",
              ("cgroup_cpu_usage_seconds_total", "cgroup_cpu_throttled_seconds_total",
               "cgroup_cpu_throttled_periods_total", "cgroup_cpu_periods_total", "cgroup_cpu_limit_cores",
               "cgroup_memory_usage_bytes", "cgroup_memory_limit_bytes"), needs=("host.cgroup",)),
    Collector("shm", True, "size and use of the shared-memory mount (--path.shm)",
              ("host_shm_size_bytes", "host_shm_used_bytes"), needs=("host.shm",)),
    Collector("pod-info", True, "which pod holds each GPU, from the kubelet pod-resources API "
              "(--kubernetes.pod-resources-socket)", ("gpu_pod_info", "exporter_pod_resources_up",
                                                       "exporter_pod_resources_left_out"), needs=("kubelet",)),
)

BY_NAME = {c.name: c for c in COLLECTORS}
DEFAULT = frozenset(c.name for c in COLLECTORS if c.default)
ALL = frozenset(BY_NAME)
# What the snapshot collector renders and collect[] can name: the always-on groups and every collector.
GROUPS = ALWAYS_ON + tuple(c.name for c in COLLECTORS)
# collect[] values a scrape may carry (node_exporter has no bound; ours: every group once, and no more).
MAX_SELECT = len(GROUPS)


def enabled(collectors: frozenset[str], name: str) -> bool:
    """Whether a group is on: always-on groups always are; a switchable one when named in `collectors`."""
    if name in ALWAYS_ON:
        return True
    if name not in BY_NAME:
        raise KeyError(f"collector {name!r} is not registered in exporter/pipeline/collectors.py")
    return name in collectors


_Row = TypeVar("_Row")


def rows_enabled(collectors: frozenset[str], rows: Sequence[_Row]) -> tuple[_Row, ...]:
    """The declarative rows (specs.py's GpuScalar, each naming its `collector`) whose collector is on."""
    return tuple(r for r in rows if enabled(collectors, getattr(r, "collector")))


def needs(collectors: frozenset[str]) -> frozenset[str]:
    """Every source and call group an enabled collector needs ("host.cgroup", "nvml.ecc", ...)."""
    return frozenset(n for c in COLLECTORS if c.name in collectors for n in c.needs)


def nvml_reads(collectors: frozenset[str]) -> frozenset[str]:
    """The NVML reader's optional call groups (sources/nvml/reader.py's READS) the enabled collectors need."""
    return frozenset(n.removeprefix("nvml.") for n in needs(collectors) if n.startswith("nvml."))


def nvml_options(collectors: frozenset[str], specs: Sequence[_Row]) -> dict[str, object]:
    """NvmlSource's keyword arguments for these collectors: the spec rows to read, the call groups to make."""
    return {"specs": rows_enabled(collectors, specs), "reads": nvml_reads(collectors)}


class SelectError(ValueError):
    """A collect[] parameter the server answers 400 to; the message says what is valid."""


def select(names: Sequence[str], collectors: frozenset[str]) -> frozenset[str]:
    """The groups a `collect[]` scrape asks for, checked: known, enabled, bounded in count. The exporter's
    own group always comes along (node_exporter keeps its scrape metrics too)."""
    if len(names) > MAX_SELECT:
        raise SelectError(f"collect[]: at most {MAX_SELECT} values, got {len(names)}")
    for name in names:
        if name not in GROUPS:
            shown = name if len(name) <= 40 and name.isprintable() else name[:40].encode("unicode_escape").decode()
            # only the names this exporter would serve: a disabled one listed here would be refused next
            valid = ", ".join(g for g in GROUPS[1:] if enabled(collectors, g))
            raise SelectError(f"collect[]: unknown collector {shown!r}; valid: {valid}")
        if not enabled(collectors, name):
            raise SelectError(f"collect[]: collector {name!r} is disabled (--collector.{name} enables it)")
    return frozenset(names) | {"exporter"}
