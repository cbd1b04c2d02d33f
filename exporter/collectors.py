"""The collectors a user can switch, node_exporter style: one row each, the only place they are declared.

cli.py turns every row into `--[no-]collector.<name>` (and its GPU_EXPORTER_COLLECTOR_* variable), the
NVML reader skips the calls of a disabled collector, and the snapshot collector skips its families. The
defaults keep one 8-GPU scrape within the series budget (docs/metrics.md) while everything the dashboard's
default rows and the alert rules read stays on. Families of the always-on groups (ALWAYS_ON) cannot be
switched off: they are the exporter itself, the core GPU gauges, and host CPU and memory.

Plain data only: sources import this module, so it imports nothing of the exporter.
"""
from __future__ import annotations

from dataclasses import dataclass

ALWAYS_ON = ("exporter", "gpu", "host")


@dataclass(frozen=True)
class Collector:
    name: str
    default: bool
    help: str
    families: tuple[str, ...]  # as exposed (counters with _total): what the switch removes


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
              ("gpu_clock_event_seconds_total",)),
    Collector("clock-event-state", False, "a 0/1 gauge per clock event reason (rate() of the seconds counter "
              "gives the same at sample resolution)", ("gpu_clock_event_active",)),
    Collector("ecc", False, "ECC error counters (corrected/uncorrected, volatile/aggregate) and remapped rows by "
              "cause, every 5 s", ("gpu_ecc_errors_total", "gpu_remapped_rows")),
    Collector("row-remap", True, "whether a row remap waits for a GPU reset or failed (replace the board), "
              "every 5 s", ("gpu_row_remap_pending", "gpu_row_remap_failure")),
    Collector("processes", True, "per-process GPU memory and utilisation with container/pod labels",
              ("gpu_process_memory_used_bytes", "gpu_process_sm_utilization_ratio",
               "gpu_mig_process_memory_used_bytes")),
    Collector("mig", True, "MIG devices: memory (and processes, with the processes collector) per instance",
              ("gpu_mig_memory_used_bytes", "gpu_mig_memory_total_bytes", "gpu_mig_process_memory_used_bytes")),
    Collector("cpu-per-core", True, "busy share of each CPU", ("host_cpu_core_utilization_ratio",)),
    Collector("cpu-histogram", True, "histogram of every sampled host CPU utilisation (le=0.9 only: the "
              "diagnosis' host-busy share reads it)",
              ("host_sampled_cpu_utilization_ratio",)),
    Collector("cgroup", True, "CPU throttling and memory of the watched cgroup (--cgroup.path)",
              ("cgroup_cpu_usage_seconds_total", "cgroup_cpu_throttled_seconds_total",
               "cgroup_cpu_throttled_periods_total", "cgroup_cpu_periods_total", "cgroup_cpu_limit_cores",
               "cgroup_memory_usage_bytes", "cgroup_memory_limit_bytes")),
    Collector("shm", True, "size and use of the shared-memory mount (--path.shm)",
              ("host_shm_size_bytes", "host_shm_used_bytes")),
    Collector("pod-info", True, "which pod holds each GPU, from the kubelet pod-resources API "
              "(--kubernetes.pod-resources-socket)", ("gpu_pod_info", "exporter_pod_resources_up",
                                                       "exporter_pod_resources_left_out")),
)

BY_NAME = {c.name: c for c in COLLECTORS}
DEFAULT = frozenset(c.name for c in COLLECTORS if c.default)
ALL = frozenset(BY_NAME)


def enabled(collectors: frozenset[str], name: str) -> bool:
    """Whether a group is on: always-on groups always are; a switchable one when named in `collectors`."""
    if name in ALWAYS_ON:
        return True
    if name not in BY_NAME:
        raise KeyError(f"collector {name!r} is not registered in exporter/collectors.py")
    return name in collectors


def rows_enabled(collectors: frozenset[str], rows: tuple) -> tuple:
    """The declarative rows (specs.py's GpuScalar, each naming its `collector`) whose collector is on."""
    return tuple(r for r in rows if enabled(collectors, r.collector))
