#!/usr/bin/env python3
"""Build grafana/dashboards/gpu-telemetry.json (Grafana 10/11, schemaVersion 39).

    python3 grafana/build_dashboard.py      # rewrites the JSON; a test fails when it is out of date

Panels are described once here, so units, datasource references and legends stay consistent.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "gpu-telemetry.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance", gpu=~"$gpu"'  # GPU series
HOST = 'instance=~"$instance"'  # host and exporter series
POD = 'instance=~"$instance", gpu=~"$gpu", namespace=~"$namespace", pod=~"$pod"'  # gpu_pod_info


def by_pod(expr: str) -> str:
    """A per-GPU expression with the namespace/pod/container of each container holding the GPU. group_right:
    a GPU shared by several containers (time-slicing, MPS) gives one series per container."""
    return f"{expr} * on(instance, gpu) group_right gpu_pod_info{{{POD}}}"

STARVED_RED = "red"


def _thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def panel(kind: str, title: str, unit: str, targets: list[tuple[str, str]], *, w: int = 8, h: int = 8,
          description: str = "", thresholds: dict | None = None, line: bool = False, extra: dict | None = None,
          max_value: float | None = None) -> dict:
    defaults: dict = {"unit": unit}
    if thresholds:
        defaults["thresholds"] = thresholds
    if max_value is not None:
        defaults["min"], defaults["max"] = 0, max_value
    if line:  # draw the thresholds as dashed lines on the graph
        defaults["custom"] = {"thresholdsStyle": {"mode": "dashed"}}
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": {"w": w, "h": h},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    p.update(extra or {})
    return p


def fraction_below(bound: str, metric: str, by: str = "instance, gpu") -> str:
    return (f'sum by ({by}) (rate({metric}_bucket{{{SEL}, le="{bound}"}}[$__rate_interval]))'
            f" / sum by ({by}) (rate({metric}_count{{{SEL}}}[$__rate_interval]))")


ROWS: list[tuple[str, list[dict]]] = [
    ("Overview", [
        panel("stat", "GPUs up", "none", [(f"sum(gpu_up{{{SEL}}})", "up"), (f"count(gpu_up{{{SEL}}})", "total")],
              w=4, description="GPUs whose last NVML read succeeded, of all GPUs found."),
        panel("timeseries", "GPU utilisation", "percentunit", [(f"gpu_utilization_ratio{{{SEL}}}",
                                                                "{{instance}} GPU {{gpu}}")],
              w=5, thresholds=_thresholds((None, STARVED_RED), (0.4, "green")), line=True, max_value=1),
        panel("timeseries", "GPU memory used", "percentunit", [(f"gpu_memory_used_ratio{{{SEL}}}",
                                                                "{{instance}} GPU {{gpu}}")],
              w=5, thresholds=_thresholds((None, "green"), (0.95, "red")), line=True, max_value=1),
        panel("timeseries", "PCIe utilisation", "percentunit",
              [(f"gpu_pcie_utilization_ratio{{{SEL}}}", "{{instance}} GPU {{gpu}} {{direction}}")],
              w=5, thresholds=_thresholds((None, "green"), (0.9, "red")), line=True, max_value=1),
        panel("timeseries", "Host CPU", "percentunit", [(f"host_cpu_utilization_ratio{{{HOST}}}", "{{instance}}")],
              w=5, max_value=1),
        panel("stat", "Exporter health", "percentunit",
              [(f"rate(exporter_samples_total{{{HOST}}}[$__rate_interval]) * exporter_sample_interval_seconds"
                f"{{{HOST}}}", "{{instance}} on schedule"),
               (f"exporter_nvml_up{{{HOST}}}", "{{instance}} NVML up"),
               (f"min by (instance) (exporter_collector_success{{{HOST}}})", "{{instance}} collectors rendered")],
              w=24, h=4, description="Share of scheduled samples taken (1 = on schedule), whether NVML is up, "
                                     "and whether every collector rendered in the last scrape (0: see "
                                     "exporter_collector_success for which).",
              thresholds=_thresholds((None, "red"), (0.9, "green"))),
    ]),
    ("Jitter: is the GPU falling into a hole?", [
        panel("timeseries", "Time at or below 40 % utilisation", "percentunit",
              [(fraction_below("0.4", "gpu_sampled_utilization_ratio"), "{{instance}} GPU {{gpu}}")],
              w=12, max_value=1, thresholds=_thresholds((None, "green"), (0.5, "red")), line=True,
              description="From every driver utilisation sample (gpu_sampled_utilization_ratio), not one "
                          "gauge per scrape: share of samples at or below 40 %. Spikes line up with RTF "
                          "jitter when the GPU is starved by the CPU side."),
        panel("heatmap", "Utilisation distribution (every sample)", "percentunit",
              [(f"sum by (le) (increase(gpu_sampled_utilization_ratio_bucket{{{SEL}}}[$__rate_interval]))",
                "{{le}}")],
              w=12, extra={"options": {"calculate": False, "yAxis": {"unit": "percentunit"},
                                       "cellGap": 1, "color": {"scheme": "Oranges", "mode": "scheme"}}},
              description="Samples per utilisation bucket per interval. A healthy TTS box sits at the top; "
                          "a starved one shows a band below 0.4."),
        panel("timeseries", "Host CPU per core", "percentunit",
              [(f"host_cpu_core_utilization_ratio{{{HOST}}}", "{{instance}} cpu {{cpu}}")],
              w=12, max_value=1, description="One core pinned at 100 % while the GPU starves: a single-threaded "
                                             "data loader or tokeniser (CPU-side prefetch)."),
        panel("state-timeline", "Clock event reasons (throttling)", "percentunit",
              [(f'max by (gpu, reason) (rate(gpu_clock_event_seconds_total{{{SEL}, reason!="gpu_idle"}}'
                f'[$__rate_interval]))', "GPU {{gpu}} {{reason}}")],
              w=12, thresholds=_thresholds((None, "transparent"), (0.01, "red")),
              extra={"options": {"showValue": "never", "mergeValues": True}},
              description="Red while a clocks-event (throttle) reason was active, from the sampled seconds "
                          "per reason (every tick, not one state per scrape)."),
    ]),
    ("Where the GPU time goes (GPM: Hopper and newer)", [
        panel("timeseries", "Where the time goes: GPU $gpu", "percentunit",
              [(f"gpu_utilization_ratio{{{SEL}}}", "{{instance}} utilisation (a kernel ran)"),
               (f'gpu_sm_active_ratio{{{SEL}, gpu_instance_id=""}}', "{{instance}} SM active"),
               (f'gpu_tensor_active_ratio{{{SEL}, gpu_instance_id=""}}', "{{instance}} tensor active"),
               (f'gpu_dram_active_ratio{{{SEL}, gpu_instance_id=""}}', "{{instance}} DRAM active"),
               (f"max by (instance, gpu) (gpu_pcie_utilization_ratio{{{SEL}}})", "{{instance}} PCIe % of link")],
              w=6, max_value=1, extra={"repeat": "gpu", "repeatDirection": "h", "maxPerRow": 4},
              description="Which wall the GPU hits: tensor active near SM active = tensor-core bound; DRAM "
                          "active high = memory-bandwidth bound; PCIe near 1 = CPU->GPU copies; utilisation "
                          "high with SM active low = small kernels or launch overhead. GPM activity is absent "
                          "on GPUs before Hopper (only utilisation and PCIe then)."),
        panel("timeseries", "NVLink throughput", "Bps",
              [(f"gpu_nvlink_throughput_bytes_per_second{{{SEL}}}", "{{instance}} GPU {{gpu}} {{direction}}")],
              w=12, description="Summed over links (GPM on Hopper+, else the per-link counters); absent on "
                                "boards without NVLink."),
    ]),
    ("PCIe", [
        panel("timeseries", "PCIe throughput", "Bps",
              [(f"gpu_pcie_throughput_bytes_per_second{{{SEL}}}", "{{instance}} GPU {{gpu}} {{direction}}")], w=12),
        panel("timeseries", "PCIe % of link max", "percentunit",
              [(f"gpu_pcie_utilization_ratio{{{SEL}}}", "{{instance}} GPU {{gpu}} {{direction}}"),
               (fraction_below("0.9", "gpu_sampled_pcie_utilization_ratio", "instance, gpu, direction")
                .join(["1 - (", ")"]), "{{instance}} GPU {{gpu}} {{direction}} share of samples > 90 %")],
              w=12, max_value=1, thresholds=_thresholds((None, "green"), (0.9, "red")), line=True),
    ]),
    ("Who uses the GPU, and what starves it", [
        panel("timeseries", "GPU memory by process", "bytes",
              [(f"sum by (instance, gpu, pid, comm, pod_uid) (gpu_process_memory_used_bytes{{{SEL}}})",
                "{{instance}} GPU {{gpu}} {{comm}} ({{pid}}) pod {{pod_uid}}")],
              w=10, description="Per process from NVML; container and pod from the process's cgroup."),
        panel("timeseries", "Container CPU: used and throttled", "short",
              [(f"rate(cgroup_cpu_usage_seconds_total{{{HOST}}}[$__rate_interval])", "{{cgroup}} used (cores)"),
               (f"rate(cgroup_cpu_throttled_seconds_total{{{HOST}}}[$__rate_interval])",
                "{{cgroup}} throttled (s/s)")],
              w=7, description="CPU quota throttling of the watched cgroup (--cgroup.path). Compare with "
                               "cgroup_cpu_limit_cores where a limit is set."),
        panel("timeseries", "Shared memory (/dev/shm)", "bytes",
              [(f"host_shm_size_bytes{{{HOST}}}", "{{instance}} {{path}} size"),
               (f"host_shm_used_bytes{{{HOST}}}", "{{instance}} {{path}} used")],
              w=7, thresholds=_thresholds((None, "red"), (1073741824, "green")),
              description="Under 1 GiB beside a DataLoader: \"Bus error\" (Docker's default is 64 MB)."),
    ]),
    ("Pods (kubelet pod-resources API; needs the DaemonSet's pod-resources mount)", [
        panel("timeseries", "GPU utilisation: pod $pod", "percentunit",
              [(by_pod(f"gpu_utilization_ratio{{{SEL}}}"), "{{namespace}}/{{pod}} {{container}} GPU {{gpu}}")],
              w=8, max_value=1, thresholds=_thresholds((None, STARVED_RED), (0.4, "green")), line=True,
              extra={"repeat": "pod", "repeatDirection": "h", "maxPerRow": 3},
              description="One panel per selected pod: utilisation of each GPU its containers hold "
                          "(gpu_pod_info joined on instance and gpu)."),
        panel("timeseries", "GPU memory used by pod", "bytes",
              [(f"sum by (namespace, pod) ({by_pod(f'gpu_memory_used_bytes{{{SEL}}}')})", "{{namespace}}/{{pod}}")],
              w=12, description="Memory of the GPUs each pod holds; a shared GPU counts in full for every pod "
                                "holding it (gpu_process_memory_used_bytes splits it by process)."),
        panel("table", "Which pod holds each GPU", "none",
              [(f"gpu_pod_info{{{POD}}}", "")], w=12,
              extra={"options": {"showHeader": True},
                     "transformations": [{"id": "organize", "options": {"excludeByName": {
                         "Time": True, "Value": True, "__name__": True, "job": True}}}]},
              description="gpu_pod_info: one row per (GPU or MIG device, container holding it)."),
    ]),
    ("Memory, power, temperature", [
        panel("timeseries", "GPU memory used vs total", "bytes",
              [(f"gpu_memory_used_bytes{{{SEL}}}", "{{instance}} GPU {{gpu}} used"),
               (f"gpu_memory_total_bytes{{{SEL}}}", "{{instance}} GPU {{gpu}} total"),
               (f"0.95 * gpu_memory_total_bytes{{{SEL}}}", "{{instance}} GPU {{gpu}} 95 % (OOM risk)")], w=6),
        panel("timeseries", "Power", "watt",
              [(f"gpu_power_watts{{{SEL}}}", "{{instance}} GPU {{gpu}}"),
               (f"gpu_power_limit_watts{{{SEL}}}", "{{instance}} GPU {{gpu}} limit")], w=6),
        panel("timeseries", "Temperature", "celsius",
              [(f"gpu_temperature_celsius{{{SEL}}}", "{{instance}} GPU {{gpu}}")], w=6,
              thresholds=_thresholds((None, "green"), (85, "red")), line=True),
        panel("timeseries", "Energy per interval", "joule",
              [(f"increase(gpu_energy_joules_total{{{SEL}}}[$__rate_interval])", "{{instance}} GPU {{gpu}}")], w=6),
    ]),
    ("RTF (needs the TTS service to export tts_real_time_factor, see docs/metrics.md)", [
        panel("timeseries", "Real-time factor p50 / p95", "none",
              [(f"histogram_quantile(0.5, sum by (le, instance) (rate(tts_real_time_factor_bucket{{{HOST}}}"
                f"[$__rate_interval])))", "{{instance}} p50"),
               (f"histogram_quantile(0.95, sum by (le, instance) (rate(tts_real_time_factor_bucket{{{HOST}}}"
                f"[$__rate_interval])))", "{{instance}} p95")],
              w=12, thresholds=_thresholds((None, "green"), (1, "red")), line=True,
              description="Synthesis time / audio duration. Above 1 the service is slower than real time."),
        panel("timeseries", "GPU utilisation beside RTF", "percentunit",
              [(fraction_below("0.4", "gpu_sampled_utilization_ratio"), "{{instance}} GPU {{gpu}} time <= 40 %"),
               (f"gpu_utilization_ratio{{{SEL}}}", "{{instance}} GPU {{gpu}} utilisation")],
              w=12, max_value=1),
    ]),
]


def variables() -> list[dict]:
    def query(name: str, label: str, q: str) -> dict:
        return {"name": name, "label": label, "type": "query", "datasource": DS, "query": {"query": q, "refId": name},
                "definition": q, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
                "current": {"text": "All", "value": "$__all"}, "sort": 1}

    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "refresh": 1},
        query("instance", "Node", "label_values(exporter_build_info, instance)"),
        query("gpu", "GPU", 'label_values(gpu_info{instance=~"$instance"}, gpu)'),
        query("namespace", "Namespace", 'label_values(gpu_pod_info{instance=~"$instance"}, namespace)'),
        query("pod", "Pod", 'label_values(gpu_pod_info{instance=~"$instance", namespace=~"$namespace"}, pod)'),
    ]


def build() -> dict:
    panels: list[dict] = []
    next_id, y = 1, 0
    for title, row_panels in ROWS:
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        next_id, y, x, row_h = next_id + 1, y + 1, 0, 0
        for p in row_panels:
            p = dict(p)
            if p["type"] == "heatmap":  # bucket series rendered as a heatmap, not as lines
                for t in p["targets"]:
                    t["format"] = "heatmap"
            if p["type"] == "table":  # one row per series, its labels as columns
                for t in p["targets"]:
                    t["format"], t["instant"] = "table", True
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                x, y, row_h = 0, y + row_h, 0
            p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
            p["id"] = next_id
            next_id += 1
            x += w
            row_h = max(row_h, h)
            panels.append(p)
        y += row_h
    return {
        "uid": "gpu-telemetry-rtf",
        "title": "GPU telemetry: RTF jitter",
        "description": "Is TTS real-time-factor jitter the GPU falling into a utilisation hole? gpu-telemetry-exporter.",
        "tags": ["gpu", "nvidia", "tts", "gpu-telemetry-exporter"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "timezone": "",
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
