"""The diagnosis from the exporter's own full-resolution history: GET /api/v1/diagnosis?window=5m."""
from __future__ import annotations

import json

from exporter.diagnosis.rules import (
    DEFAULT_THRESHOLDS,
    THROTTLE_REASONS,
    GpuWindow,
    Thresholds,
    Window,
    covered_span,
    diagnose,
    report,
)
from exporter.pipeline.history import Marks, SampleHistory
from exporter.sources.nvml.readings import CLOCK_EVENT_REASONS

# The live view marks what the checklist calls starved and held down (pipeline/history.py's below_40_fraction and
# clocks strip): one definition, the diagnosis'.
LIVE_MARKS = Marks(DEFAULT_THRESHOLDS.starved_utilization, frozenset(THROTTLE_REASONS))


def new_history(window_s: float, interval_s: float, **kwargs) -> SampleHistory:
    """The full-resolution history the live view and /api/v1/diagnosis read, marked by the checklist."""
    return SampleHistory(window_s, interval_s, LIVE_MARKS, **kwargs)


def _reason_shares(bits: list[float | None]) -> dict[str, float]:
    """clock event bitmask per tick -> share of the ticks each reason was active."""
    seen = [int(b) for b in bits if b is not None]
    if not seen:
        return {}
    return {name: sum(1 for b in seen if b & bit) / len(seen) for bit, name in CLOCK_EVENT_REASONS}


def _measured(series: list[float | None]) -> list[float | None] | None:
    """None for a series with no value at all (not measured: the GPM rules stay silent)."""
    return series if any(v is not None for v in series) else None


def _driver_samples(samples: list[float | None], starved: list[float | None]
                    ) -> tuple[list[float | None] | None, list[float | None] | None]:
    """Per tick, (the share of the driver's utilisation samples at or below the starved line, how many
    there were): every driver sample counts, as in gpu_sampled_utilization_ratio, not the one value polled
    per tick (which aliases with a load periodic near the tick). (None, None) where no tick has them (no
    sample buffer: MIG, old boards): the rule then reads the polled values."""
    if not any(n for n in samples):
        return None, None
    share = [b / n if n and b is not None else None for n, b in zip(samples, starved)]
    return share, [n if s is not None else None for n, s in zip(samples, share)]


def _increase(counts: list[float]) -> int:
    """A counter's increase over the rows, a drop read as a reset (counted from 0), as Prometheus'
    increase() reads it: the same gaps rule live and from Prometheus."""
    return int(sum(b - a if b >= a else b for a, b in zip(counts, counts[1:])))


def _late_share(t: list[float], interval: float, late_intervals: float) -> float | None:
    """Share of scheduled ticks that came late (gap over late_intervals) or were skipped, from row times."""
    if len(t) < 2:
        return None
    late = scheduled = 0
    for a, b in zip(t, t[1:]):
        slots = max(1, round((b - a) / interval))
        scheduled += slots
        if b - a > late_intervals * interval:
            late += slots - 1 if slots > 1 else 1
    return late / scheduled


def window_from_history(history: SampleHistory, window_s: float, th: Thresholds = DEFAULT_THRESHOLDS,
                        requested_s: float | None = None) -> Window:
    """The window's rows as the diagnosis reads them: every share is over the rows there (a late or
    skipped tick is no row; the history starts empty at each exporter start)."""
    cols = history.columns(window_s)
    snap = cols.latest
    xids_now: dict[str, list[int]] = {}
    for (index, code), _ in snap.xid_errors if snap else ():
        xids_now.setdefault(str(index), []).append(code)
    gpus = []
    for gpu, s in cols.gpus.items():
        xids = [v for v in s["xid_errors"] if v is not None]
        starved, counts = _driver_samples(s["utilization_samples"], s["utilization_starved"])
        gpus.append(GpuWindow(
            gpu=gpu, name=cols.names.get(gpu, ("", ""))[1], mig=gpu in cols.mig,
            utilization=s["utilization"], memory_used_ratio=s["memory_used_ratio"],
            pcie_tx=s["pcie_tx_utilization"], pcie_rx=s["pcie_rx_utilization"],
            clock_events=_reason_shares(s["clock_event_reasons"]), health=s["health"],
            xid_events=_increase(xids), xid_codes=tuple(sorted(xids_now.get(gpu, ()))),
            sm_active=_measured(s["sm_active"]), tensor_active=_measured(s["tensor_active"]),
            dram_active=_measured(s["dram_active"]), starved_share=starved, utilization_samples=counts,
        ))
    shm = snap.shm if snap else None
    return Window(
        seconds=covered_span(cols.t, history.interval_s, window_s), interval_s=history.interval_s,
        requested_s=window_s if requested_s is None else requested_s, data_from=cols.t[0] if cols.t else None, host_cpu=cols.host["host_cpu_utilization"],
        cgroup_throttled=cols.host["cgroup_cpu_throttled_ratio"], gpus=tuple(gpus),
        shm_path=shm.path if shm else None, shm_size_bytes=shm.size_bytes if shm else None,
        shm_used_bytes=shm.used_bytes if shm else None,
        sampler_late_share=_late_share(cols.t, history.interval_s, th.sampler_late_intervals),
        nvml_message="" if gpus or snap is None else snap.nvml.message)


def diagnosis_json(history: SampleHistory, window_s: float, requested_s: float | None = None) -> bytes:
    """The body of GET /api/v1/diagnosis for a window already checked by the server and capped to the
    history kept (`requested_s`: the window asked before the cap); window_seconds is what the samples
    cover (less while the history fills)."""
    w = window_from_history(history, window_s, requested_s=requested_s)
    doc = report(w, diagnose(w))
    doc.update(history_seconds=history.window_s)
    return json.dumps(doc, separators=(",", ":")).encode()
