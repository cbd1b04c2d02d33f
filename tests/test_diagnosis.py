"""The diagnosis engine: each rule on hand-made windows, and each scenario from the live history ring
(fake GPUs driven by --fake-scenario's classes, host CPU and cgroup from files the test writes)."""
from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.diagnosis.rules import MIB, GpuWindow, Thresholds, Window, diagnose, render_text, report
from exporter.diagnosis.live import _late_share, window_from_history
from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from exporter.fake.scenarios import SCENARIOS, ScenarioNvml
from exporter.diagnosis.live import new_history
from exporter.pipeline.history import SampleHistory
from exporter.sources.cgroup import CgroupSource
from tests.conftest import ManualClock, make_sampler
from tests.test_cgroup_processes import v2_tree

N = 100


def window(**kw) -> Window:
    gpu = kw.pop("gpu", {})
    base = dict(utilization=[0.8] * N, memory_used_ratio=[0.3] * N, pcie_tx=[0.05] * N, pcie_rx=[0.2] * N,
                health=[0.0] * N)
    return Window(**{"seconds": 300.0, "interval_s": 0.2, "host_cpu": [0.3] * N, "cgroup_throttled": [0.0] * N,
                     "gpus": (GpuWindow("0", "H100", **{**base, **gpu}),), "shm_path": "/dev/shm",
                     "shm_size_bytes": 2048 * MIB, "shm_used_bytes": 10 * MIB, "sampler_late_share": 0.0, **kw})


def rules(w: Window) -> list[str]:
    return [f.rule for f in diagnose(w)]


STARVED = [0.2] * 60 + [0.9] * 40


def test_healthy_window_is_nothing_abnormal():
    found = diagnose(window())
    assert [f.rule for f in found] == ["nothing_abnormal"] and found[0].severity == "ok"


@pytest.mark.parametrize("kw,first", [
    (dict(gpu={"utilization": STARVED}, host_cpu=[0.97] * 70 + [0.2] * 30), "cpu_starvation"),
    (dict(gpu={"utilization": STARVED}, cgroup_throttled=[0.6] * 100), "cpu_quota_throttled"),
    (dict(shm_size_bytes=64 * MIB), "shm_too_small"),
    (dict(gpu={"memory_used_ratio": [0.5] * 90 + [0.97] * 10}), "near_oom"),
    (dict(gpu={"pcie_rx": [0.95] * 30 + [0.2] * 70}), "pcie_saturated"),
    (dict(gpu={"clock_events": {"sw_thermal_slowdown": 0.4, "gpu_idle": 0.9}}), "clocks_throttled"),
    (dict(gpu={"xid_events": 2, "xid_codes": (79,)}), "xid_errors"),
    (dict(gpu={"health": [0.0] * 80 + [2.0] * 20, "utilization": [0.8] * 80 + [None] * 20}), "gpu_lost"),
    (dict(gpu={"health": [0.0] * 80 + [1.0] * 20}), "gpu_down"),
    (dict(sampler_late_share=0.6), "sampler_late"),
    (dict(gpus=()), "no_gpu"),
])
def test_each_rule_ranks_first_on_its_condition(kw, first):
    found = diagnose(window(**kw))
    assert found[0].rule == first, render_text(found)
    assert found[0].evidence and found[0].remedy
    assert "nothing_abnormal" not in [f.rule for f in found]


def test_starvation_evidence_reads_as_the_checklist_does():
    w = window(gpu={"utilization": STARVED}, host_cpu=[0.97] * 50 + [0.2] * 50)
    f = diagnose(w)[0]
    # 60 starved samples, 50 of them with the host busy
    assert f.evidence == ("GPU 0 at or below 40 % for 60 % of the last 5 min; host CPU ≥ 90 % during 83 % of "
                          "those samples → CPU-side starvation")
    assert "num_workers 4 → 8" in f.remedy


def test_histogram_shares_weigh_each_step():
    """From Prometheus a step holds a share of starved samples; a cause counts by the starved weight it meets."""
    w = window(gpu={"utilization": [0.9] * N, "starved_share": [0.6] * 50 + [0.0] * 50},
               host_cpu=[0.1] * N, host_busy_share=[1.0] * 50 + [0.0] * 50)
    f = diagnose(w)[0]
    assert f.rule == "cpu_starvation"  # the gauges alone (0.9 utilisation, 0.1 CPU) would say nothing
    assert "for 30 % of the last 5 min; host CPU ≥ 90 % during 100 % of those samples" in f.evidence
    w = replace(w, host_busy_share=[0.0] * 50 + [1.0] * 50)  # busy only while the GPU was not starved
    assert "cpu_starvation" not in rules(w)


def test_pcie_share_from_histograms_without_gauges():
    f = diagnose(window(gpu={"pcie_rx": [], "pcie_saturated_share": {"rx": [0.3] * N, "tx": [0.0] * N}}))[0]
    assert f.rule == "pcie_saturated" and f.evidence.endswith("for 30 % of the last 5 min")


def test_starved_gpu_without_cpu_cause_is_only_a_note():
    found = diagnose(window(gpu={"utilization": STARVED}))
    assert [f.rule for f in found] == ["gpu_underused"]  # no "Nothing abnormal" over a GPU idle 60 % of the time
    assert found[0].severity == "info"


def test_starvation_needs_the_cause_during_the_starved_samples():
    # host busy only while the GPU was busy: not the CPU side's fault
    assert "cpu_starvation" not in rules(window(gpu={"utilization": STARVED}, host_cpu=[0.2] * 60 + [0.97] * 40))


def test_mig_gpu_gets_a_note_not_a_starvation():
    found = diagnose(window(gpu={"utilization": [None] * N, "mig": True}, host_cpu=[0.99] * N))
    assert [f.rule for f in found] == ["nothing_abnormal", "mig_no_utilization"]
    assert "utilisation not supported under MIG" in found[1].evidence


def test_gpm_rules_are_silent_without_gpm_and_fire_with_it():
    assert rules(window()) == ["nothing_abnormal"]
    found = rules(window(gpu={"tensor_active": [0.9] * N, "sm_active": [0.95] * N, "dram_active": [0.3] * N}))
    assert found == ["nothing_abnormal", "tensor_bound"]
    assert "dram_bound" in rules(window(gpu={"dram_active": [0.85] * N}))


def test_a_short_window_says_so():
    found = diagnose(window(seconds=2.4))
    assert [f.rule for f in found] == ["nothing_abnormal", "short_window"]
    assert found[1].evidence.startswith("Only 2.4 s of samples so far")


def test_severity_orders_before_magnitude():
    w = window(gpu={"pcie_rx": [0.95] * 90 + [0.2] * 10, "memory_used_ratio": [0.5] * 99 + [0.96]})
    assert rules(w)[:2] == ["near_oom", "pcie_saturated"]  # critical for one sample beats 90 % saturated


def test_thresholds_are_the_single_knob():
    w = window(gpu={"pcie_rx": [0.85] * N})
    assert "pcie_saturated" not in rules(w)
    assert diagnose(w, Thresholds(pcie_saturated=0.8))[0].rule == "pcie_saturated"


def test_report_is_json_ready():
    import json

    doc = report(window(), diagnose(window()))
    assert json.loads(json.dumps(doc))["findings"][0]["rule"] == "nothing_abnormal"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 1.2)), max_size=50),
       st.lists(st.one_of(st.none(), st.floats(0, 1)), max_size=50),
       st.lists(st.one_of(st.none(), st.floats(0, 1.5)), max_size=50))
def test_any_window_gives_a_ranked_nonempty_report(util, cpu, pcie):
    w = window(gpu={"utilization": util, "pcie_rx": pcie, "memory_used_ratio": util}, host_cpu=cpu,
               cgroup_throttled=cpu)
    found = diagnose(w)
    assert found and [f.score for f in found] == sorted((f.score for f in found), reverse=True)


def test_sampler_lateness_from_row_times():
    assert _late_share([0.0, 0.2, 0.4, 0.6], 0.2, 1.5) == 0.0
    assert _late_share([0.0, 0.2, 0.8, 1.0], 0.2, 1.5) == pytest.approx(2 / 5)  # 2 of 5 slots skipped
    assert _late_share([0.0], 0.2, 1.5) is None


# ---- scenarios through the sampler and the history ring -------------------------------------------
def live_history(tmp_path, procfs, scenario: str, host_busy: bool = False, quota_throttled: bool = False,
                 ticks: int = 200, interval: float = 0.1) -> SampleHistory:
    clock = ManualClock()
    wall = ManualClock(1_700_000_000.0)
    history = new_history(60.0, interval, wall_clock=wall)
    root = tmp_path / "cgroup"
    v2_tree(root, "/tts", 0, 0, 0, 0)
    s = make_sampler(ScenarioNvml(scenario, 2, clock=clock), procfs.root, interval=interval, clock=clock,
                     history=history, cgroup=CgroupSource(root, path="/tts"), shm_path=str(tmp_path))
    for k in range(1, ticks + 1):
        procfs.advance(busy=[19, 19] if host_busy else [2, 2], idle=[1, 1] if host_busy else [18, 18])
        v2_tree(root, "/tts", k * 90_000, k * 10, k * 6 if quota_throttled else 0, k * 30_000 if quota_throttled else 0)
        s.tick()
        clock.advance(interval)
        wall.advance(interval)
    return history


@pytest.mark.parametrize("scenario,host_busy,quota,first", [
    ("healthy", False, False, "nothing_abnormal"),
    ("starved", True, False, "cpu_starvation"),
    ("starved", False, True, "cpu_quota_throttled"),
    ("pcie-saturated", False, False, "pcie_saturated"),
    ("throttled", False, False, "clocks_throttled"),
    ("near-oom", False, False, "near_oom"),
])
def test_scenario_from_the_live_history(tmp_path, procfs, scenario, host_busy, quota, first):
    history = live_history(tmp_path, procfs, scenario, host_busy, quota)
    found = diagnose(window_from_history(history, 60.0))
    assert found[0].rule == first, render_text(found)
    assert {f.gpu for f in found if f.rule == first} == ({None} if first == "nothing_abnormal" else {"0", "1"})


def test_shm_too_small_from_the_live_window(tmp_path, procfs):
    w = window_from_history(live_history(tmp_path, procfs, "healthy", ticks=20), 60.0)
    assert w.shm_size_bytes and w.shm_size_bytes > 256 * MIB  # a real statvfs of tmp_path
    assert diagnose(replace(w, shm_size_bytes=64 * MIB, shm_used_bytes=0))[0].rule == "shm_too_small"


def diagnosis_app(history: SampleHistory | None):
    """The server's app (no socket); `ask(query)` -> (status, JSON document) of GET /api/v1/diagnosis."""
    from prometheus_client import CollectorRegistry

    from exporter.web.httpd import Request
    from exporter.web.server import ExporterApp

    app = ExporterApp(CollectorRegistry(), lambda: (True, "ok"), "/metrics", history, None)

    def ask(query: str) -> tuple[int, dict]:
        r = app.handle(Request("GET", "/api/v1/diagnosis?" + query, "/api/v1/diagnosis", query, "HTTP/1.1", {}, "-"))
        return r.status, json.loads(r.body)

    return ask


def diagnosis_endpoint(history: SampleHistory | None, query: str) -> tuple[int, dict]:
    return diagnosis_app(history)(query)


def test_endpoint_caps_the_window_to_the_history(tmp_path, procfs):
    history = live_history(tmp_path, procfs, "healthy", ticks=20)
    code, doc = diagnosis_endpoint(history, "window=1h")
    assert code == 200 and doc["requested_seconds"] == 3600.0 and doc["history_seconds"] == 60.0
    assert doc["window_seconds"] == pytest.approx(2.0)  # 20 ticks of 0.1 s kept so far
    assert doc["coverage"] == "2.0 s of data in the 60 min asked"
    assert [f["rule"] for f in doc["findings"]] == ["nothing_abnormal", "short_window"] and doc["gpus"] == ["0", "1"]
    assert diagnosis_endpoint(history, "window=soon")[0] == 400
    assert diagnosis_endpoint(history, "window=0s")[0] == 400
    assert diagnosis_endpoint(None, "")[0] == 404


def test_a_window_shorter_than_one_sample_is_refused_not_diagnosed_as_no_gpu(tmp_path, procfs):
    """?window=1ns (or anything under --sample.interval) holds no sample: it answered 200 with a false
    "No GPU found" warning."""
    history = live_history(tmp_path, procfs, "healthy", ticks=20)  # 0.1 s interval
    for query in ("window=1ns", "window=50ms", "window=0.09s"):
        code, doc = diagnosis_endpoint(history, query)
        assert code == 400 and "sample interval" in doc["error"], (query, doc)
    code, doc = diagnosis_endpoint(history, "window=100ms")
    assert code == 200 and "no_gpu" not in [f["rule"] for f in doc["findings"]]


def test_every_scenario_has_a_description():
    assert all(s.description for s in SCENARIOS.values())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_time_takes_any_text_without_crashing(text):
    from exporter.diagnosis.prometheus import DiagnoseError, parse_time

    try:
        assert isinstance(parse_time(text, 1_800_000_000.0), float)
    except DiagnoseError as exc:
        assert "\n" not in str(exc)


def test_parse_time_forms():
    from exporter.diagnosis.prometheus import parse_time

    now = 1_800_000_000.0
    assert parse_time("now", now) == now and parse_time("now-10m", now) == now - 600
    assert parse_time("1795543931.5", now) == 1795543931.5
    assert parse_time("2026-11-25T14:30:00Z", now) == parse_time("2026-11-25T14:30:00+00:00", now) == 1795617000.0


@pytest.mark.parametrize("args", [["--fake-scenario", "healthy"], ["--fake-gpus", "1", "--fake-scenario", "meltdown"]])
def test_bad_fake_scenario_is_one_line(args, capsys):
    from exporter.cli import parse_config

    with pytest.raises(SystemExit) as exc:
        parse_config(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--fake-scenario" in err


def test_gpm_ratios_flow_from_a_reading_into_the_tensor_rule(tmp_path, procfs):
    """A reading carrying GPM activity (the gpm collector's spec rows) reaches the diagnosis through the
    history ring; a GPU without GPM leaves the GPM rules silent."""
    from exporter.pipeline.history import GPM_FIELDS
    from exporter.sources.nvml.specs import DRAM_ACTIVE, SM_ACTIVE, TENSOR_ACTIVE

    clock, wall = ManualClock(), ManualClock(1_700_000_000.0)
    history = new_history(10.0, 0.1, wall_clock=wall)
    s = make_sampler(ScenarioNvml("healthy", 1, clock=clock), procfs.root, interval=0.1, clock=clock)
    for _ in range(10):
        procfs.advance(busy=[2, 2], idle=[18, 18])
        snap = s.tick()
        g = snap.gpus[0]
        busy_tensors = replace(g.reading, scalars={**g.reading.scalars, SM_ACTIVE: 0.95, TENSOR_ACTIVE: 0.9,
                                                   DRAM_ACTIVE: 0.2})
        history.append(replace(snap, gpus=(replace(g, reading=busy_tensors),)))
        clock.advance(0.1)
        wall.advance(0.1)
    w = window_from_history(history, 10.0)
    assert [w.gpus[0].tensor_active[-1], w.gpus[0].dram_active[-1]] == [0.9, 0.2] and len(GPM_FIELDS) == 3
    assert [f.rule for f in diagnose(w)] == ["nothing_abnormal", "tensor_bound", "short_window"]
    plain = new_history(10.0, 0.1, wall_clock=wall)
    s = make_sampler(FakeNvml(specs=[FakeGpuSpec(gpm_supported=False)], clock=clock), procfs.root, interval=0.1,
                     clock=clock, history=plain)
    for _ in range(5):
        s.tick()
        clock.advance(0.1)
        wall.advance(0.1)
    assert window_from_history(plain, 10.0).gpus[0].tensor_active is None  # silent without GPM


@pytest.mark.parametrize("argv", [["--help"], ["diagnose", "--help"]])
def test_help_prints_and_exits_0(argv, capsys):
    from exporter.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "usage: gpu-telemetry-exporter" in out
    assert ("--fake-scenario" in out and "diagnose --help" in out) if argv == ["--help"] else "--prometheus" in out


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_query_string_gets_a_status_not_an_exception(query):
    history = new_history(10.0, 0.1)
    code, doc = diagnosis_endpoint(history, query)
    assert (code, bool(doc.get("findings"))) in ((200, True), (400, False)) and ("error" in doc) == (code == 400)


def test_diagnoses_run_one_at_a_time_and_are_shared(mocker, tmp_path, procfs):
    """A long diagnosis costs seconds of CPU: concurrent askers of one window share one, others get 503."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    history = live_history(tmp_path, procfs, "healthy", ticks=20)
    release = threading.Event()
    calls = []

    def slow(h: SampleHistory, window_s: float, asked: float) -> bytes:
        calls.append(window_s)
        release.wait(5)
        return b'{"findings": []}'

    mocker.patch("exporter.web.server.diagnosis_json", side_effect=slow)
    with ThreadPoolExecutor(6) as pool:
        ask = diagnosis_app(history)
        same = [pool.submit(ask, "window=30s") for _ in range(4)]
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        other = pool.submit(ask, "window=20s").result(timeout=5)
        release.set()
        assert [f.result(timeout=5)[0] for f in same] == [200] * 4
    assert other[0] == 503 and calls == [30.0]


def test_rtf_crossing_says_whether_the_rtf_was_scraped_at_all():
    """`diagnose` is definite: "not scraped" (no points) and "stayed at or below 0.7" (with its peak) apart."""
    from exporter.diagnosis.prometheus import rtf_crossing

    class Prom:
        def __init__(self, values):
            self.values = values

        def range(self, expr, start, end, step):
            return [{"values": self.values}] if self.values else []

    assert rtf_crossing(Prom([]), "", 0.0, 10.0, 1.0, "4s") is None
    assert rtf_crossing(Prom([[1, "NaN"]]), "", 0.0, 10.0, 1.0, "4s") is None
    assert rtf_crossing(Prom([[1, "0.3"], [2, "0.5"]]), "", 0.0, 10.0, 1.0, "4s") == 0.5
    assert rtf_crossing(Prom([[1, "0.3"], [2, "0.9"]]), "", 0.0, 10.0, 1.0, "4s") == (2.0, 0.9, False)
# ---- what a report covers (issue #25 item 1): the same rule live and from Prometheus ---------------
def test_covered_span_counts_samples_not_holes():
    from exporter.diagnosis.rules import covered_span

    assert covered_span([], 15, 300) == 0.0
    assert covered_span([0, 15, 30, 45, 60], 15, 300) == 75.0  # each sample stands for its interval
    assert covered_span([0, 15, 30, 120, 135], 15, 300) == 75.0  # a 90 s hole counts for nothing
    assert covered_span([0, 16, 31], 15, 300) == 46.0  # late scrapes count as they are
    assert covered_span([k * 15.0 for k in range(100)], 15, 300) == 300.0  # at most the window


def test_the_live_window_covers_its_rows_across_a_hole(tmp_path, procfs):
    """Throttled ticks, then the sampler stalled 30 s, then more: the clock share is over the rows, the
    report says what it covers, and 'partial_window' says it is short of the asked minute."""
    clock, wall = ManualClock(), ManualClock(1_700_000_000.0)
    history = new_history(60.0, 0.1, wall_clock=wall)
    s = make_sampler(ScenarioNvml("throttled", 1, clock=clock), procfs.root, interval=0.1, clock=clock,
                     history=history)
    for k in range(200):
        if k == 100:
            wall.advance(30.0)  # the hole: no tick for 30 s
        procfs.advance(busy=[2, 2], idle=[18, 18])
        s.tick()
        clock.advance(0.1)
        wall.advance(0.1)
    w = window_from_history(history, 60.0)
    assert w.seconds == pytest.approx(20.0, abs=0.2) and w.requested_s == 60.0
    found = {f.rule: f for f in diagnose(w)}
    assert found["clocks_throttled"].evidence.startswith("GPU 0 clocks held down for 90 % of the last 20 s")
    assert found["partial_window"].evidence.startswith("20 s of data in the 1 min asked")
    doc = report(w, diagnose(w))
    assert (doc["window_seconds"], doc["requested_seconds"]) == (w.seconds, 60.0)


def test_a_full_window_has_no_partial_note(tmp_path, procfs):
    history = live_history(tmp_path, procfs, "healthy", ticks=200)  # 20 s of 0.1 s ticks
    assert rules(window_from_history(history, 20.0)) == ["nothing_abnormal"]
    assert "partial_window" in rules(window_from_history(history, 60.0))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2)), max_size=30))
def test_non_finite_values_never_become_a_finding(values):
    """±Inf or NaN in any series is no value: never 'memory used peaked at inf %'."""
    w = window(gpu={"memory_used_ratio": values, "utilization": values, "pcie_rx": values,
                    "starved_share": values}, host_cpu=values, host_busy_share=values)
    text = render_text(diagnose(w)).lower()
    assert not re.search(r"\b(inf|nan)\b|[0-9]{5,} %", text), text


def test_a_counter_reset_in_the_live_history_is_read_as_prometheus_reads_it():
    from exporter.diagnosis.live import _increase

    assert _increase([]) == _increase([3.0]) == 0
    assert _increase([1.0, 1.0, 3.0]) == 2
    assert _increase([5.0, 6.0, 0.0, 2.0]) == 3  # the source restarted its count: 1 + 2, not -3


# ---- the live share counts every driver sample, as the histogram does -----------------------------
def test_live_starved_share_is_the_histograms_not_one_value_per_tick(tmp_path, procfs):
    """The simulator's 2 s duty cycle is a whole number of 200 ms ticks: one polled value per tick sees
    only 10 phases of it (0.8 or 0.9 of them starved, by the GPU's phase), while the driver's 1/6 s
    samples see the real 5/6. The live share must be the histogram's over the same ticks."""
    from exporter.diagnosis.rules import starved_samples
    from tests.conftest import fraction_at_or_below

    clock, wall, interval = ManualClock(), ManualClock(1_700_000_000.0), 0.2
    history = new_history(30.0, interval, wall_clock=wall)
    s = make_sampler(ScenarioNvml("starved", 2, clock=clock), procfs.root, interval=interval, clock=clock,
                     history=history)
    hists = []
    for _ in range(250):
        procfs.advance(busy=[19, 19], idle=[1, 1])
        hists.append((wall(), s.tick().gpus))
        clock.advance(interval)
        wall.advance(interval)
    w = window_from_history(history, 30.0)
    cols = history.columns(30.0)
    before = next(i for i, (t, _) in enumerate(hists) if t == cols.t[0]) - 1  # the tick before the window
    polled_off, shares = 0.0, {}
    for n, g in enumerate(w.gpus):
        old, new = hists[before][1][n].utilization_hist, hists[-1][1][n].utilization_hist
        below = new.cumulative[new.bounds.index(0.4)] - old.cumulative[old.bounds.index(0.4)]
        hist_share = shares[g.gpu] = below / (new.count - old.count)
        weights, total = starved_samples(g)
        live = sum(v for _, v in weights) / total
        assert abs(live - hist_share) <= 0.01, (g.gpu, live, hist_share)
        assert abs(fraction_at_or_below(new, 0.4) - hist_share) < 0.02  # the window is typical of the run
        polled = [v for v in g.utilization if v is not None]
        polled_off = max(polled_off, abs(sum(v <= 0.4 for v in polled) / len(polled) - hist_share))
        served = json.loads(history.query_json(30.0))["gpus"][n]["below_40_fraction"]
        assert abs(served - hist_share) <= 0.01  # the live page's figure too
    assert polled_off > 0.03  # the aliasing this guards against is really there
    # The evidence states the histogram's share, and the host-busy share over those same samples.
    found = [f for f in diagnose(w) if f.rule == "cpu_starvation"]
    assert len(found) == 2
    for f in found:
        assert (f"GPU {f.gpu} at or below 40 % for {shares[f.gpu or ''] * 100:.0f} % of the last 30 s; host CPU "
                "≥ 90 % during 100 % of those samples") in f.evidence
