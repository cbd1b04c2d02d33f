#!/usr/bin/env python3
"""Render the dashboard's key panels to a PNG from real Prometheus data (no Grafana needed).

    .venv/bin/pip install matplotlib
    .venv/bin/python bench/render_panels.py --seconds 150 --out docs/img/dashboard-jitter.png

Starts the exporter (2 fake GPUs, 100 ms), the fake TTS service and Debian's prometheus on 127.0.0.1
(the same stack as the end-to-end tests), lets them run, then runs each chosen panel's queries from
grafana/dashboards/gpu-telemetry.json through query_range and plots them with the panel's thresholds.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testkit.processes import Stack, http_get  # noqa: E402  (one implementation of the test stack)

PANELS = ["GPU utilisation", "Time at or below 40 % utilisation", "Host CPU per core", "PCIe % of link max",
          "Real-time factor p50 / p95"]
SUBSTITUTE = {"$instance": ".*", "$gpu": ".*", "$__rate_interval": "10s"}


def query_range(url: str, expr: str, start: float, end: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    status, _, body = http_get(f"{url}/api/v1/query_range?{q}", timeout=30)
    data = json.loads(body)
    if status != 200 or data.get("status") != "success":
        raise RuntimeError(f"{expr}: {body[:200]!r}")
    return data["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    for k, v in labels.items():
        fmt = fmt.replace("{{" + k + "}}", v)
    return fmt.replace("127.0.0.1:", ":")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--out", default=str(REPO / "docs" / "img" / "dashboard-jitter.png"))
    a = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        print("render_panels.py: error: needs matplotlib (.venv/bin/pip install matplotlib)", file=sys.stderr)
        return 2

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads((REPO / "grafana" / "dashboards" / "gpu-telemetry.json").read_text())
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.wait_ready()
            start = time.time()
            time.sleep(a.seconds)
            end = time.time()
            fig, axes = plt.subplots(len(PANELS), 1, figsize=(11, 2.6 * len(PANELS)), sharex=True)
            for ax, title in zip(axes, PANELS):
                p = panels[title]
                for t in p["targets"]:
                    expr = t["expr"]
                    for k, v in SUBSTITUTE.items():
                        expr = expr.replace(k, v)
                    for series in query_range(stack.prom.url, expr, start, end):
                        xs = [float(ts) - start for ts, _ in series["values"]]
                        ys = [float(v) for _, v in series["values"]]
                        ax.plot(xs, ys, linewidth=1.0, label=legend(t["legendFormat"], series["metric"]))
                for step in p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", []):
                    if step["value"] is not None:
                        ax.axhline(step["value"], color="red", linestyle="--", linewidth=0.8)
                ax.set_title(title, loc="left", fontsize=10)
                if p["fieldConfig"]["defaults"]["unit"] == "percentunit":
                    ax.set_ylim(0, 1.05)
                ax.legend(fontsize=7, loc="upper right", ncol=2)
                ax.grid(alpha=0.3)
            axes[-1].set_xlabel("seconds (Prometheus scrapes every 1 s; the exporter samples every 100 ms)")
            fig.suptitle("gpu-telemetry-exporter: dashboard panels from a real Prometheus (2 simulated GPUs)")
            fig.tight_layout()
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(a.out, dpi=90)
            print(f"wrote {a.out}")
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
