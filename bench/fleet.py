#!/usr/bin/env python3
"""A fleet of exporters on one real Prometheus: head series, ingestion and Prometheus memory per node.

    .venv/bin/python bench/fleet.py                      # 20 exporters x 8 fake GPUs, 15 s scrapes, 6 min
    .venv/bin/python bench/fleet.py --exporters 4 --minutes 1 --scrape-interval 5s   # smoke run

Each simulated node is one exporter process with --fake-gpus 8 on 127.0.0.1. A 2-core machine cannot run
20 exporters at the 200 ms default beside Prometheus, so they sample at --sample.interval (default 1 s):
the scrape (what Prometheus ingests) is the same size at any sample interval, only the exporters' own CPU
differs. Beside the fleet's Prometheus runs a second, idle one (scraping only itself) so that its memory
can be subtracted: what remains is what the fleet's series cost. Writes bench/fleet-results.json; the
extrapolation to 1 000 and 10 000 nodes is in docs/scale.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Target, exporter, free_port, wait_http  # noqa: E402  (the same process helpers as bench/run.py)


APPENDED = "rate(prometheus_tsdb_head_samples_appended_total[1m])"


class Prometheus(Target):
    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str) -> None:
        port = free_port()
        workdir.mkdir(parents=True)
        lines = ["global:", f"  scrape_interval: {scrape_interval}", f"  scrape_timeout: {scrape_interval}",
                 "scrape_configs:",
                 "  - job_name: prometheus", "    scrape_interval: 5s", "    static_configs:",
                 f"      - targets: ['127.0.0.1:{port}']"]
        if targets:
            lines += ["  - job_name: gpu-telemetry-exporter", "    static_configs:", f"      - targets: {targets!r}"]
        (workdir / "prometheus.yml").write_text("\n".join(lines) + "\n")
        binary = shutil.which("prometheus")
        if binary is None:
            raise SystemExit("fleet.py: Debian's prometheus is not installed (bash tests/run.sh installs it)")
        super().__init__("prometheus", [binary, f"--config.file={workdir / 'prometheus.yml'}",
                                        f"--storage.tsdb.path={workdir / 'data'}",
                                        f"--web.listen-address=127.0.0.1:{port}"], port, ready_path="/-/ready")

    def query(self, expr: str) -> float:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            result = json.load(r)["data"]["result"]
        return float(result[0]["value"][1]) if result else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exporters", type=int, default=20)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--sample-interval", default="1s")
    ap.add_argument("--scrape-interval", default="15s")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--out", default=str(HERE / "fleet-results.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-"))
    nodes: list[Target] = []
    proms: list[Prometheus] = []
    try:
        for _ in range(args.exporters):
            nodes.append(exporter(args.gpus, args.sample_interval))
        targets = [f"127.0.0.1:{n.port}" for n in nodes]
        fleet = Prometheus(work / "fleet", targets, args.scrape_interval)
        idle = Prometheus(work / "idle", [], args.scrape_interval)
        proms += [fleet, idle]
        cpu0 = [n.cpu_seconds() for n in nodes]
        started = time.monotonic()
        end = started + args.minutes * 60
        job = 'job="gpu-telemetry-exporter"'
        while time.monotonic() < end:
            time.sleep(min(15.0, max(0.0, end - time.monotonic())))
            print(f"  {time.monotonic() - started:5.0f} s: head series "
                  f"{fleet.query('prometheus_tsdb_head_series'):.0f}, up "
                  f"{fleet.query(f'sum(up{{{job}}})'):.0f}/{len(nodes)}", flush=True)
        elapsed = time.monotonic() - started
        head_series = fleet.query("prometheus_tsdb_head_series")
        idle_series = idle.query("prometheus_tsdb_head_series")
        fleet_rss, idle_rss = fleet.rss_bytes(), idle.rss_bytes()
        result = {
            "exporters": len(nodes), "gpus_per_exporter": args.gpus, "sample_interval": args.sample_interval,
            "scrape_interval": args.scrape_interval, "seconds": round(elapsed),
            "samples_per_scrape": fleet.query(f"avg(scrape_samples_scraped{{{job}}})"),
            "scrape_duration_seconds_avg": fleet.query(f"avg(scrape_duration_seconds{{{job}}})"),
            "head_series": head_series,
            "head_series_idle_prometheus": idle_series,
            "samples_appended_per_second": fleet.query(APPENDED),
            "samples_appended_per_second_idle_prometheus": idle.query(APPENDED),
            "prometheus_rss_bytes": fleet_rss,
            "idle_prometheus_rss_bytes": idle_rss,
            "prometheus_go_heap_inuse_bytes": fleet.query('go_memstats_heap_inuse_bytes{job="prometheus"}'),
            "exporter_cpu_share_of_core_avg": sum(n.cpu_seconds() - c for n, c in zip(nodes, cpu0))
            / len(nodes) / elapsed,
            "exporter_rss_bytes_avg": sum(n.rss_bytes() for n in nodes) / len(nodes),
        }
        per_node = {
            "head_series_per_node": (head_series - idle_series) / len(nodes),
            "samples_per_second_per_node": (result["samples_appended_per_second"]
                                            - result["samples_appended_per_second_idle_prometheus"]) / len(nodes),
            "prometheus_rss_bytes_per_node": (fleet_rss - idle_rss) / len(nodes),
        }
        per_node["prometheus_rss_bytes_per_series"] = (per_node["prometheus_rss_bytes_per_node"]
                                                       / per_node["head_series_per_node"])
        result["per_node"] = per_node
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        for t in proms + nodes:
            t.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
