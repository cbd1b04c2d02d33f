#!/usr/bin/env python3
"""Write deploy/base/prometheusrule.yaml from deploy/rules/gpu-telemetry.rules.yml (the one source of truth).

Prometheus Operator users get the PrometheusRule; everyone else loads the plain rules file.
Run: python3 deploy/sync_rules.py   (needs PyYAML)
"""
from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules" / "gpu-telemetry.rules.yml"
TARGET = HERE / "base" / "prometheusrule.yaml"


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "gpu-telemetry-exporter"},
        "spec": {"groups": groups},
    }
    header = "# Generated from deploy/rules/gpu-telemetry.rules.yml by deploy/sync_rules.py: edit that file.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
