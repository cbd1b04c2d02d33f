"""Why did the real-time factor jitter: the troubleshooting checklist as pure functions over a window.

Input is a `Window` of aligned samples (built from the full-resolution history ring by
exporter.diagnosis.live, or from Prometheus by exporter.diagnosis.prometheus); output is a ranked list of
`Finding`s, each with its evidence and remedy. "Nothing abnormal" is a finding too. Every threshold is
in `Thresholds`; docs/diagnosis.md describes each rule.

Ranking: a finding's score is its severity's weight (critical 4, warning 3, info 1) plus a magnitude in
[0, 1) (mostly the share of the window the condition held), so severity orders first and, within one
severity, the larger effect. "Nothing abnormal" (weight 2) is given when no warning or critical fired
and no GPU was mostly idle, so it ranks above the informational notes that may come with it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

MIB = 1024 * 1024
Series = Sequence["float | None"]

# nvml.h clock event reasons that mean "clocks held down by heat or power" (not idle, not app settings).
THROTTLE_REASONS = ("sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                    "hw_power_brake_slowdown")
SEVERITY_WEIGHT = {"critical": 4.0, "warning": 3.0, "ok": 2.0, "info": 1.0}


@dataclass(frozen=True)
class Thresholds:
    starved_utilization: float = 0.40  # GPU utilisation at or below this is "starved" (the checklist's 40 %)
    starved_share: float = 0.20  # look for a cause when this share of the GPU's samples is starved
    host_cpu_busy: float = 0.90  # host CPU above this is busy (the histogram's le="0.9" bucket is not)
    cfs_throttled: float = 0.20  # a sample with this share of CFS periods throttled is throttled
    cause_share: float = 0.50  # a cause must be present in this share of the starved samples
    underused_share: float = 0.50  # starved this often with no CPU-side cause: an informational note
    shm_min_bytes: int = 256 * MIB  # /dev/shm smaller than this (Docker's default is 64 MB)
    shm_used: float = 0.90  # or fuller than this
    memory_near_oom: float = 0.95  # GPU memory used ratio: critical at or above
    memory_high: float = 0.90  # warning at or above
    pcie_saturated: float = 0.90  # PCIe throughput above this share of the link is saturated
    pcie_share: float = 0.05  # in at least this share of the samples
    throttled_share: float = 0.20  # thermal/power clock events active this share of the window
    down_share: float = 0.05  # GPU down (failing or stuck calls) this share of the window
    sampler_late_intervals: float = 1.5  # a gap between ticks longer than this many intervals is late
    sampler_late_share: float = 0.05  # info at this share of late or skipped ticks
    sampler_late_warning: float = 0.50  # warning at this share
    tensor_bound: float = 0.80  # mean GPM tensor-pipe activity at or above: tensor-bound
    dram_bound: float = 0.80  # mean GPM DRAM activity at or above: memory-bandwidth-bound
    short_window_s: float = 10.0  # fewer seconds of samples than this: say the shares are still rough
    partial_window: float = 0.9  # samples covering less than this share of the window asked: say so


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class GpuWindow:
    gpu: str
    name: str = ""
    mig: bool = False  # utilisation is not supported under MIG
    utilization: Series = ()  # ratios, aligned on Window.t; None: no value
    memory_used_ratio: Series = ()
    pcie_tx: Series = ()  # share of the link
    pcie_rx: Series = ()
    clock_events: dict[str, float] = field(default_factory=dict)  # reason -> share of the window active
    health: Series = ()  # 0 up, 1 down (failing/stuck calls), 2 lost
    xid_events: int = 0  # XID events in the window
    xid_codes: tuple[int, ...] = ()  # the codes among them (or seen, where the source cannot tell)
    # Per sample or step: the share of the GPU's utilisation samples at or below the starved threshold, and
    # per direction the share of PCIe samples above the saturated one, where a histogram gives them (the
    # Prometheus path); None: derived from utilization / pcie_* (each sample then counts 0 or 1).
    starved_share: Series | None = None
    # Per sample or step: how many utilisation samples its starved share stands for (the live history: the
    # driver samples taken in that tick), so the window's share is theirs, as the histogram counts it;
    # None: every sample or step weighs the same.
    utilization_samples: Series | None = None
    pcie_saturated_share: dict[str, Series] | None = None
    # GPM activity ratios (another source may fill them); None: not measured, and the rules stay silent
    sm_active: Series | None = None
    tensor_active: Series | None = None
    dram_active: Series | None = None


@dataclass(frozen=True)
class Window:
    seconds: float  # the span the samples cover (see covered_span), which every share is over
    interval_s: float  # expected spacing of the samples
    host_cpu: Series = ()  # aligned on the GPUs' series
    cgroup_throttled: Series = ()  # share of CFS periods throttled per sample; () without a cgroup
    host_busy_share: Series | None = None  # per step, share of host CPU samples busy (histogram); None: from host_cpu
    gpus: tuple[GpuWindow, ...] = ()
    shm_path: str | None = None
    shm_size_bytes: int | None = None
    shm_used_bytes: int | None = None
    sampler_late_share: float | None = None  # share of ticks late or skipped
    nvml_message: str = ""  # why no GPU is there, when none is
    requested_s: float | None = None  # the window asked for; None: the same as `seconds`
    data_from: float | None = None  # unix time of the first sample in the window, where known


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # critical | warning | info | ok
    score: float
    title: str
    evidence: str
    remedy: str
    gpu: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"] = round(self.score, 3)
        return d


def _pct(x: float) -> str:
    return f"{x * 100:.0f} %"


def _duration(seconds: float) -> str:
    if seconds >= 120 or (seconds >= 60 and round(seconds) % 60 == 0):
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min" + (f" {rest} s" if rest else "")
    return f"{seconds:.1f} s" if seconds < 10 else f"{round(seconds)} s"


def covered_span(times: Sequence[float], interval: float, limit: float) -> float:
    """Seconds of a window its samples stand for, at most `limit`: each sample its own interval, and a
    gap between two samples as long as it is, unless it is a hole (over 2 intervals: a failed scrape,
    a stopped exporter), which counts for nothing. One rule for the live history and Prometheus."""
    if not times:
        return 0.0
    span = interval + sum(b - a if 0 <= b - a <= 2 * interval else interval for a, b in zip(times, times[1:]))
    return round(min(span, limit), 3)


RATIO_MAX = 10.0  # every series is a ratio, a share or a 0/1/2 state: a value outside [0, this] is no value


def _ok(v: float | None) -> bool:
    """Whether a value counts: None, NaN, ±Inf and values no ratio takes are no value (a rule never
    reports an infinite or absurd peak, whatever a source or Prometheus said)."""
    return v is not None and math.isfinite(v) and 0.0 <= v <= RATIO_MAX


def _values(series: Series | None) -> list[float]:
    return [v for v in series or () if v is not None and _ok(v)]


def _mean(series: Series | None) -> float | None:
    vals = _values(series)
    return sum(vals) / len(vals) if vals else None


def _share(series: Series | None, predicate) -> float | None:
    vals = _values(series)
    return sum(1 for v in vals if predicate(v)) / len(vals) if vals else None


def _finding(rule: str, severity: str, magnitude: float, title: str, evidence: str, remedy: str,
             gpu: str | None = None) -> Finding:
    return Finding(rule, severity, SEVERITY_WEIGHT[severity] + min(max(magnitude, 0.0), 0.999), title, evidence,
                   remedy, gpu)


# ---- rules: each returns the findings for one GPU or for the host -------------------------------------
def _flags(series: Series, limit: float) -> list[float | None]:
    """Per sample: 1.0 at or above limit, 0.0 below, None without a value."""
    return [None if v is None else float(v >= limit) for v in series]


def starved_samples(g: GpuWindow, th: Thresholds = DEFAULT_THRESHOLDS) -> tuple[list[tuple[int, float]], float]:
    """([(i, starved samples at sample or step i)], all utilisation samples of the window).

    Each sample (or step) i holds n_i utilisation samples (1 unless `utilization_samples` says: the
    driver samples of a live tick) of which a share s_i was starved (0 or 1 for a polled value; a share
    from a histogram), so the window's starved share sum(n s) / sum(n) is the histogram's own ratio."""
    starved = g.starved_share if g.starved_share is not None else \
        [None if v is None else float(v <= th.starved_utilization) for v in g.utilization]
    counts = g.utilization_samples

    def count(i: int) -> float:
        n = counts[i] if counts is not None and i < len(counts) else 1.0
        return n if n is not None and math.isfinite(n) and 0 <= n <= 1e9 else 0.0

    samples = [(i, count(i), min(v, 1.0)) for i, v in enumerate(starved) if v is not None and _ok(v)]
    return [(i, n * v) for i, n, v in samples], sum(n for _, n, _ in samples)


def starvation(w: Window, g: GpuWindow, th: Thresholds) -> list[Finding]:
    """GPU at or below 40 % while the CPU side is busy or throttled.

    The starved share is over the utilisation samples (starved_samples); a cause's share is
    sum(n s cause) / sum(n s), cause 0/1 per tick or a share per step."""
    if g.mig:
        return []
    weights, total = starved_samples(g, th)
    if not total:
        return []
    share = sum(v for _, v in weights) / total
    if share < th.starved_share:
        return []
    head = f"GPU {g.gpu} at or below {_pct(th.starved_utilization)} for {_pct(share)} of the last {_duration(w.seconds)}"

    def during(cause: Series) -> float | None:
        seen: list[tuple[float, float]] = []
        for i, v in weights:
            c = cause[i] if i < len(cause) else None
            if v > 0 and c is not None and _ok(c):
                seen.append((v, min(c, 1.0)))
        starved = sum(v for v, _ in seen)
        return sum(v * c for v, c in seen) / starved if starved else None

    out = []
    # Busy: above the line, as the host CPU histogram counts it (a sample of exactly 90 % is in its
    # le="0.9" bucket), so the live history and Prometheus count the same ticks.
    busy = during(w.host_busy_share if w.host_busy_share is not None else
                  [None if v is None else float(v > th.host_cpu_busy) for v in w.host_cpu])
    if busy is not None and busy >= th.cause_share:
        out.append(_finding(
            "cpu_starvation", "warning", share * busy, f"GPU {g.gpu} starved by the CPU side (host CPU busy)",
            f"{head}; host CPU ≥ {_pct(th.host_cpu_busy)} during {_pct(busy)} of those samples → CPU-side starvation",
            "Feed the GPU faster: more data-loading workers (e.g. DataLoader num_workers 4 → 8, prefetch_factor), "
            "move pre/post-processing off the request path, or give the service more CPU cores; then check "
            "/dev/shm (workers share tensors through it).", g.gpu))
    throttled = during(_flags(w.cgroup_throttled, th.cfs_throttled))
    if throttled is not None and throttled >= th.cause_share:
        out.append(_finding(
            "cpu_quota_throttled", "warning", share * throttled,
            f"GPU {g.gpu} starved by the CPU side (container CFS-throttled)",
            f"{head}; the container was throttled in ≥ {_pct(th.cfs_throttled)} of its CFS periods during "
            f"{_pct(throttled)} of those samples → its CPU quota starves the GPU",
            "Raise the container's CPU limit (Kubernetes resources.limits.cpu, docker --cpus) or drop the limit and "
            "keep the request; fewer data-loading workers than the quota allows cores.", g.gpu))
    if not out and share >= th.underused_share:
        out.append(_finding(
            "gpu_underused", "info", share, f"GPU {g.gpu} mostly idle, with no CPU-side cause seen",
            f"{head}; host CPU and CPU quota were not the cause",
            "Likely too few requests or a serial pipeline: batch requests or run more streams per GPU; "
            "if RTF is fine, nothing to do.", g.gpu))
    return out


def memory(w: Window, g: GpuWindow, th: Thresholds) -> list[Finding]:
    vals = _values(g.memory_used_ratio)
    if not vals:
        return []
    peak = max(vals)
    if peak < th.memory_high:
        return []
    near = _share(vals, lambda v: v >= th.memory_near_oom) or 0.0
    severity = "critical" if peak >= th.memory_near_oom else "warning"
    return [_finding(
        "near_oom", severity, max(near, 0.5 * peak), f"GPU {g.gpu} memory near OOM",
        f"GPU {g.gpu} memory used peaked at {peak * 100:.1f} % (≥ {_pct(th.memory_near_oom)} for {_pct(near)} "
        f"of the last {_duration(w.seconds)})",
        "Lower the peak: fewer diffusion steps (n_steps 8 → 4 costs little RTF), a smaller batch or shorter "
        "chunks; check for a growing cache (KV/feature) between requests.", g.gpu)]


def pcie(w: Window, g: GpuWindow, th: Thresholds) -> list[Finding]:
    best = None
    for direction, series in (("rx", g.pcie_rx), ("tx", g.pcie_tx)):
        if g.pcie_saturated_share is not None:
            share = _mean(g.pcie_saturated_share.get(direction))
        else:
            share = _share(series, lambda v: v > th.pcie_saturated)
        if share is not None and share >= th.pcie_share and (best is None or share > best[1]):
            best = (direction, share, max(_values(series), default=None))
    if best is None:
        return []
    direction, share, peak = best
    return [_finding(
        "pcie_saturated", "warning", share, f"GPU {g.gpu} PCIe {direction} saturated",
        f"GPU {g.gpu} PCIe {direction} above {_pct(th.pcie_saturated)} of the link for {_pct(share)} of the last "
        f"{_duration(w.seconds)}" + (f" (peak {_pct(peak)})" if peak is not None else ""),
        "Move less over the bus per request: keep the wav/feature cache in RAM (a RAM disk) or on the GPU, use "
        "pinned memory and send features, not raw audio; check the link runs at its full generation and width.",
        g.gpu)]


def clocks(w: Window, g: GpuWindow, th: Thresholds) -> list[Finding]:
    active = {r: s for r, s in g.clock_events.items() if r in THROTTLE_REASONS and s > 0}
    if not active:
        return []
    share = max(active.values())
    if share < th.throttled_share:
        return []
    reasons = ", ".join(f"{r} {_pct(s)}" for r, s in sorted(active.items(), key=lambda kv: -kv[1]))
    thermal = any("thermal" in r or r == "hw_slowdown" for r in active)
    return [_finding(
        "clocks_throttled", "warning", share, f"GPU {g.gpu} clocks throttled ({'thermal' if thermal else 'power'})",
        f"GPU {g.gpu} clocks held down for {_pct(share)} of the last {_duration(w.seconds)}: {reasons}",
        "Thermal: check airflow, fan and inlet temperature (nvidia-smi -q -d TEMPERATURE,PERFORMANCE). Power: "
        "check the enforced power limit (nvidia-smi -q -d POWER) and the node's power budget.", g.gpu)]


def device_health(w: Window, g: GpuWindow, th: Thresholds) -> list[Finding]:
    out = []
    lost = _share(g.health, lambda v: v >= 2)
    down = _share(g.health, lambda v: v >= 1)
    if lost:
        out.append(_finding(
            "gpu_lost", "critical", lost, f"GPU {g.gpu} lost",
            f"GPU {g.gpu} was lost (fell off the bus or needs a reset) for {_pct(lost)} of the last "
            f"{_duration(w.seconds)}", "Drain the node and reset the GPU (nvidia-smi -r) or reboot; check dmesg "
            "for NVRM/XID lines and the board's seating and power.", g.gpu))
    elif down is not None and down >= th.down_share:
        out.append(_finding(
            "gpu_down", "warning", down, f"GPU {g.gpu} not answering",
            f"GPU {g.gpu} down (failing or stuck NVML calls) for {_pct(down)} of the last {_duration(w.seconds)}",
            "See exporter_errors_total and the exporter's log for the failing call; a hung call often precedes "
            "a lost GPU.", g.gpu))
    if g.xid_events > 0:
        codes = ", ".join(str(c) for c in g.xid_codes) or "?"
        out.append(_finding(
            "xid_errors", "critical", min(g.xid_events / 10, 1.0), f"GPU {g.gpu} reported XID errors",
            f"GPU {g.gpu}: {g.xid_events} XID event(s) in the last {_duration(w.seconds)} (XID {codes})",
            "Look the code up in NVIDIA's XID catalogue: 13/31/43 are usually the application (bad kernel, "
            "page fault), 48/63/64/74/79/94/95 the board or driver (drain, reset, RMA if repeated).", g.gpu))
    return out


def gpm(w: Window, g: GpuWindow, th: Thresholds) -> list[Finding]:
    """Tensor- or DRAM-bound, from GPM activity ratios; silent where they are not measured."""
    out = []
    for rule, series, limit, what, remedy in (
        ("tensor_bound", g.tensor_active, th.tensor_bound, "tensor pipes",
         "Compute-bound: fewer diffusion steps, a smaller or distilled model, lower precision (FP8/INT8)."),
        ("dram_bound", g.dram_active, th.dram_bound, "DRAM bandwidth",
         "Memory-bandwidth-bound: larger batches to reuse weights, quantised weights, fused kernels."),
    ):
        mean = _mean(series)
        if mean is not None and mean >= limit:
            sm = _mean(g.sm_active)
            out.append(_finding(
                rule, "info", mean, f"GPU {g.gpu} {what} saturated",
                f"GPU {g.gpu} {what} active {_pct(mean)} of the time on average over the last {_duration(w.seconds)}"
                + (f" (SM active {_pct(sm)})" if sm is not None else ""), remedy, g.gpu))
    return out


def host_findings(w: Window, th: Thresholds) -> list[Finding]:
    out = []
    if w.shm_size_bytes is not None:
        used = (w.shm_used_bytes or 0) / w.shm_size_bytes if w.shm_size_bytes else 1.0
        if used >= th.shm_used or w.shm_size_bytes < th.shm_min_bytes:
            out.append(_finding(
                "shm_too_small", "critical" if used >= th.shm_used else "warning", max(used, 0.5),
                f"{w.shm_path or '/dev/shm'} too small",
                f"{w.shm_path or '/dev/shm'} is {w.shm_size_bytes / MIB:.0f} MiB, {_pct(used)} used (want at least "
                f"{th.shm_min_bytes / MIB:.0f} MiB, under {_pct(th.shm_used)} used)",
                "Give the container more shared memory: docker run --shm-size=2g, or in Kubernetes an emptyDir with "
                "medium: Memory mounted at /dev/shm. With 64 MB, DataLoader workers die with \"Bus error\" or crawl.",
            ))
    late = w.sampler_late_share
    if late is not None and late >= th.sampler_late_share:
        out.append(_finding(
            "sampler_late", "warning" if late >= th.sampler_late_warning else "info", late,
            "The exporter's own sampler ran late",
            f"{_pct(late)} of the exporter's ticks in the last {_duration(w.seconds)} were late by more than "
            f"{th.sampler_late_intervals:g} intervals or skipped",
            "The host is overloaded (or the exporter is starved of CPU): the figures above have gaps; give the "
            "exporter a CPU request, or a longer --sample.interval.",
        ))
    return out


GPU_RULES = (device_health, memory, starvation, pcie, clocks, gpm)


def diagnose(w: Window, th: Thresholds = DEFAULT_THRESHOLDS) -> list[Finding]:
    """Every finding for the window, best first; never empty."""
    found = host_findings(w, th)
    for g in w.gpus:
        for rule in GPU_RULES:
            found.extend(rule(w, g, th))
        if g.mig:
            found.append(_finding(
                "mig_no_utilization", "info", 0.0, f"GPU {g.gpu} in MIG mode",
                f"GPU {g.gpu}: utilisation not supported under MIG, so starvation cannot be judged there",
                "Judge MIG instances by RTF and their memory (gpu_mig_memory_used_bytes).", g.gpu))
    if not w.gpus:
        found.append(_finding(
            "no_gpu", "warning", 0.0, "No GPU found",
            f"No GPU was sampled in the last {_duration(w.seconds)}" + (f": {w.nvml_message}" if w.nvml_message else ""),
            "Check that the NVIDIA driver is loaded and the exporter sees the devices (runtimeClass nvidia, "
            "NVIDIA_VISIBLE_DEVICES=all)."))
    asked = w.requested_s if w.requested_s is not None else w.seconds
    if 0 < w.seconds < th.short_window_s:
        found.append(_finding(
            "short_window", "info", 0.0, "Little history yet",
            f"Only {_duration(w.seconds)} of samples so far: shares over so short a window are rough",
            f"Wait for at least {_duration(th.short_window_s)} of samples (the exporter just started)."))
    elif w.seconds < th.partial_window * asked:
        found.append(_finding(
            "partial_window", "info", 0.0, "Data for part of the window only",
            f"{coverage(w)}: every share, peak and mean is over the samples there, not the whole window",
            "Normal right after the exporter or Prometheus started; otherwise look for failed scrapes or "
            "exporter restarts (up == 0) in the window."))
    # A GPU mostly idle is no alarm, but not "utilisation within thresholds" either: no all-clear over it.
    if not any(f.severity in ("critical", "warning") or f.rule == "gpu_underused" for f in found):
        found.append(_finding(
            "nothing_abnormal", "ok", 0.0, "Nothing abnormal",
            f"No rule fired over the last {_duration(w.seconds)} of {len(w.gpus)} GPU(s): utilisation, memory, "
            "PCIe, clocks, device health, /dev/shm, CPU and the sampler all within thresholds",
            "If RTF still jittered, look inside the TTS service (request mix, text length, model warm-up)."))
    return sorted(found, key=lambda f: -f.score)


def coverage(w: Window) -> str:
    """'3 min 12 s of data in the 5 min asked': what every report says it covers."""
    asked = w.requested_s if w.requested_s is not None else w.seconds
    return f"{_duration(w.seconds)} of data in the {_duration(asked)} asked"


def report(w: Window, findings: list[Finding]) -> dict:
    """The JSON document both /api/v1/diagnosis and `diagnose --json` give: `window_seconds` is the span
    the samples cover, `requested_seconds` the one asked."""
    return {"window_seconds": w.seconds, "requested_seconds": w.requested_s if w.requested_s is not None
            else w.seconds, "coverage": coverage(w), "interval_seconds": w.interval_s,
            "gpus": [g.gpu for g in w.gpus], "findings": [f.to_dict() for f in findings]}


def render_text(findings: list[Finding]) -> str:
    lines = []
    for i, f in enumerate(findings, 1):
        lines.append(f"{i}. [{f.severity}] {f.title}\n   evidence: {f.evidence}\n   remedy: {f.remedy}")
    return "\n".join(lines) + "\n"
