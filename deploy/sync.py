#!/usr/bin/env python3
"""Write the generated manifests from their one source of truth:

- deploy/base/prometheusrule.yaml      from deploy/rules/gpu-telemetry.rules.yml (alerts)
- deploy/base/prometheusrule-recording.yaml  from deploy/rules/gpu-telemetry.recording.yml (fleet rules)
- deploy/grafana/dashboard-configmap.yaml  from grafana/dashboards/gpu-telemetry.json

Run: python3 deploy/sync.py   (needs PyYAML). Tests fail when a generated file is out of date.
"""
from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules" / "gpu-telemetry.rules.yml"
RECORDING = HERE / "rules" / "gpu-telemetry.recording.yml"
DASHBOARD = HERE.parent / "grafana" / "dashboards" / "gpu-telemetry.json"
TARGETS = {
    HERE / "base" / "prometheusrule.yaml": "rules",
    HERE / "base" / "prometheusrule-recording.yaml": "recording",
    HERE / "grafana" / "dashboard-configmap.yaml": "dashboard",
}


def _yaml(doc: dict, source: Path) -> str:
    header = f"# Generated from {source.relative_to(HERE.parent)} by deploy/sync.py: edit that file.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def render(kind: str) -> str:
    if kind in ("rules", "recording"):
        source, name = (RULES, "gpu-telemetry-exporter") if kind == "rules" else (RECORDING, "gpu-telemetry-fleet")
        return _yaml({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": name},
            "spec": {"groups": yaml.safe_load(source.read_text())["groups"]},
        }, source)
    # The Grafana sidecar (kube-prometheus-stack, grafana chart) loads ConfigMaps with this label.
    return _yaml({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "gpu-telemetry-dashboard", "labels": {"grafana_dashboard": "1"}},
        "data": {DASHBOARD.name: DASHBOARD.read_text()},
    }, DASHBOARD)


if __name__ == "__main__":
    for target, kind in TARGETS.items():
        target.write_text(render(kind))
        print(f"wrote {target}")
