#!/usr/bin/env python3
"""A stand-in TTS service that exports the RTF histogram the dashboard's RTF row reads.

    python tests/fake_tts.py --port 9999

It records `tts_real_time_factor` exactly as docs/metrics.md tells a TTS service to: synthesis wall time
divided by the duration of the audio produced, observed once per request into a prometheus_client
Histogram. Here a "request" is simulated every 100 ms with an RTF between 0.2 and 0.7.
"""
from __future__ import annotations

import argparse
import math
import time

from prometheus_client import CollectorRegistry, Histogram, start_http_server

RTF_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 5.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=600.0, help="exit after this long (bounded by design)")
    ap.add_argument("--spike-after", type=float, default=None,
                    help="from this many seconds on, every request's RTF is --spike-rtf (a jitter to diagnose)")
    ap.add_argument("--spike-rtf", type=float, default=1.2)
    a = ap.parse_args()
    registry = CollectorRegistry()
    rtf = Histogram("tts_real_time_factor", "Synthesis time / audio duration, per request.",
                    buckets=RTF_BUCKETS, registry=registry)
    start_http_server(a.port, addr="127.0.0.1", registry=registry)
    started = time.monotonic()
    while time.monotonic() - started < a.seconds:
        t = time.monotonic() - started
        spiking = a.spike_after is not None and t >= a.spike_after
        rtf.observe(a.spike_rtf if spiking else 0.45 + 0.25 * math.sin(t / 5.0))
        time.sleep(0.1)


if __name__ == "__main__":
    main()
