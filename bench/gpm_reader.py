#!/usr/bin/env python3
"""Cost of the GPM + NVLink reader (exporter/sources/gpm.py) per tick for N GPUs, through the real pynvml.

    .venv/bin/python bench/gpm_reader.py [--gpus 8] [--interval 0.2] [--ticks 50] [--real]

By default pynvml calls the C stand-in for libnvidia-ml.so.1 (testkit/nvml_stub, built with gcc into a
temporary directory), once with GPM (NVLink from GPM's totals) and once without (NVLink from 18 links'
field counters); --real uses this machine's driver instead. Prints wall and CPU time per tick and the
share of one core at the interval; asserts nothing. The stand-in's own C time is included, so the
figures are an upper bound for the Python side of a real driver's answers.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exporter.sources.gpm import GpmReader  # noqa: E402

STAND_IN = {"gpm.1": 20, "gpm.2": 42.5, "gpm.3": 30, "gpm.5": 17.5, "gpm.10": 60, "gpm.60": 900, "gpm.61": 800,
            "nvlink_links": 18, "nvlink_tx_kib_s": 1e6, "nvlink_rx_kib_s": 1e6}


def run(nvml, gpus: int, interval: float, ticks: int) -> tuple[float, float, float, str | None]:
    """(wall s, CPU s per tick, share of a core, NVLink source) over `ticks` ticks at `interval`."""
    nvml.nvmlInit()
    readers = [GpmReader(nvml, nvml.nvmlDeviceGetHandleByIndex(i), i) for i in range(min(gpus, nvml.nvmlDeviceGetCount()))]
    try:
        for r in readers:  # probes, the first sample of each pair
            r.read()
        time.sleep(interval)
        busy = 0.0
        reading = None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(ticks):
            t = time.perf_counter()
            for r in readers:
                reading = r.read()
            busy += time.perf_counter() - t
            time.sleep(max(0.0, interval - (time.perf_counter() - t)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        for r in readers:
            r.close()
        nvml.nvmlShutdown()
    return busy / ticks, cpu / ticks, cpu / wall, reading.nvlink_source if reading else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--ticks", type=int, default=50)
    ap.add_argument("--real", action="store_true", help="this machine's NVIDIA driver instead of the stand-in")
    a = ap.parse_args()
    if a.gpus < 1 or a.ticks < 1 or a.interval < 0.1:
        print("gpm_reader: --gpus >= 1, --ticks >= 1 and --interval >= 0.1 please", file=sys.stderr)
        return 2
    import pynvml

    cases: list[tuple[str, dict | None]] = [("real driver", None)] if a.real else [
        ("stand-in, GPM (NVLink from GPM)", {"gpus": a.gpus, **STAND_IN}),
        ("stand-in, no GPM (NVLink from 18 links' fields)", {"gpus": a.gpus, **STAND_IN, "gpm_supported": 0})]
    with tempfile.TemporaryDirectory() as tmp:
        stub = None
        if not a.real:
            from testkit.nvml_stub import NvmlStub, build

            stub = NvmlStub(build(Path(tmp)), Path(tmp) / "stand-in.conf")
            stub.bind()
        print(f"{a.gpus} GPUs, one tick every {a.interval * 1000:.0f} ms, {a.ticks} ticks")
        for label, config in cases:
            if stub is not None and config is not None:
                stub.configure(config)
            try:
                wall, cpu, share, source = run(pynvml, a.gpus, a.interval, a.ticks)
            except pynvml.NVMLError as exc:
                print(f"gpm_reader: NVML unavailable: {exc} ({type(exc).__name__})", file=sys.stderr)
                return 1
            print(f"{label:48s} wall {wall * 1e3:6.2f} ms  CPU {cpu * 1e3:6.2f} ms per tick  "
                  f"{share * 100:5.2f} % of a core  (NVLink: {source})")
        if stub is not None:
            stub.unbind()
    return 0


if __name__ == "__main__":
    sys.exit(main())
