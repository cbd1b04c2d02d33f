#!/usr/bin/env python3
"""History ring and diagnosis cost: memory of 5 minutes at 200 ms, append per tick, one /api/v1/samples
query of 60 s, and one /api/v1/diagnosis of 5 min, for 8 and 64 simulated GPUs.

    .venv/bin/python bench/diagnosis.py [--gpus 8,64]

Each figure is the median of several runs; the snapshot is one real sampler tick over the fake NVML,
appended 1 500 times with a wall clock stepped by the interval (the ring stores values, not references).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.diagnosis.rules import diagnose  # noqa: E402
from exporter.diagnosis.live import window_from_history  # noqa: E402
from exporter.fake.nvml import FakeNvml  # noqa: E402
from exporter.diagnosis.live import new_history  # noqa: E402
from exporter.pipeline.sampler import Sampler  # noqa: E402
from exporter.sources.nvml import NvmlSource  # noqa: E402
from exporter.sources.procfs import ProcfsSource  # noqa: E402

INTERVAL, WINDOW = 0.2, 300.0


def median_ms(fn, runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def bench(gpus: int) -> dict:
    with tempfile.TemporaryDirectory() as shm:
        sampler = Sampler(NvmlSource(FakeNvml(gpus, pcie_throughput_latency_s=0), "fake"), ProcfsSource("/proc"),
                          interval=INTERVAL, shm_path=shm)
        sampler.tick()
        snap = sampler.tick()
        sampler.stop()
    wall = [1_700_000_000.0]
    history = new_history(WINDOW, INTERVAL, wall_clock=lambda: wall[0])
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rows = round(WINDOW / INTERVAL)  # what the ring keeps
    for _ in range(rows):
        history.append(snap)
        wall[0] += INTERVAL
    memory = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()

    def append_many() -> None:
        for _ in range(100):
            history.append(snap)
            wall[0] += INTERVAL

    return {
        "gpus": gpus, "rows": rows, "memory_mb": memory / 1e6,
        "append_us": median_ms(append_many) * 10,  # 100 appends per run: ms -> us per append
        "query_60s_ms": median_ms(lambda: history.query(60.0)),
        "diagnosis_5m_ms": median_ms(lambda: diagnose(window_from_history(history, WINDOW)), runs=5),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", default="8,64", help="comma-separated GPU counts")
    gpu_counts = [int(n) for n in ap.parse_args().gpus.split(",")]
    print("| GPUs | rows (5 min at 200 ms) | memory | append per tick | one `window=60s` query | one 5 min diagnosis |")
    print("|---|---|---|---|---|---|")
    for gpus in gpu_counts:
        r = bench(gpus)
        print(f"| {r['gpus']} | {r['rows']:,} | {r['memory_mb']:.2f} MB | {r['append_us']:.0f} µs | "
              f"{r['query_60s_ms']:.1f} ms | {r['diagnosis_5m_ms']:.0f} ms |".replace(",", " "))


if __name__ == "__main__":
    main()
