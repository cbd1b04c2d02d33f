"""Each scenario, end to end: real exporter processes (fake GPUs driven by --fake-scenario; host CPU,
CPU quota and /dev/shm from files and a tmpfs the test makes) → /api/v1/diagnosis of each process, and a
real Prometheus scraping them all → `gpu-telemetry-exporter diagnose` names the same finding first, and
says when the fake TTS service's RTF crossed 0.7 and which finding coincides."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import REPO, ExporterProcess, FakeProcfs, PrometheusServer, free_port, http_get, stop_process
from tests.test_cgroup_processes import v2_tree

pytestmark = pytest.mark.e2e
SHM_MIB = 64  # Docker's default /dev/shm
WINDOW = "20s"


def small_shm(mountpoint: Path) -> tuple[tuple[str, ...], str]:
    """(command prefix, --path.shm) for a 64 MiB shared-memory mount: the machine's own /dev/shm where it
    is that small (Docker's default, where namespaces are often not allowed), else a tmpfs of that size in
    the exporter's own mount namespace (a user namespace makes that work unprivileged)."""
    st = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    if st and st.f_blocks * st.f_frsize <= SHM_MIB * 1024 * 1024:
        return (), "/dev/shm"
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to give the exporter a small tmpfs as /dev/shm"
    script = f'mount -t tmpfs -o size={SHM_MIB}m tmpfs "$0" && exec "$@"'
    return (unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mountpoint)), str(mountpoint)


class Writers:
    """Advances the fake /proc/stat and cgroup cpu.stat counters every 50 ms until stopped."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.jobs: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 0
        while not self.stop.wait(0.05):
            k += 1
            for job in self.jobs:
                job(k)


class Scenarios:
    EXPECTED = {  # name -> (--fake-scenario, host condition, first finding)
        "healthy": ("healthy", None, "nothing_abnormal"),
        "cpu-starved": ("starved", "host-busy", "cpu_starvation"),
        "cpu-quota": ("starved", "quota", "cpu_quota_throttled"),
        "pcie": ("pcie-saturated", None, "pcie_saturated"),
        "throttled": ("throttled", None, "clocks_throttled"),
        "near-oom": ("near-oom", None, "near_oom"),
        "shm": ("healthy", "small-shm", "shm_too_small"),
    }

    def __init__(self, tmp: Path) -> None:
        self.writers = Writers()
        self.exporters: dict[str, ExporterProcess] = {}
        self.tts: subprocess.Popen | None = None
        self.prom: PrometheusServer | None = None
        try:
            self._start(tmp)
        except BaseException:
            self.close()
            raise

    def _start(self, tmp: Path) -> None:
        for name, (scenario, host, _) in self.EXPECTED.items():
            d = tmp / name
            procfs = FakeProcfs(d / "proc")
            (d / "cgroup").mkdir()
            (d / "shm").mkdir()
            args = ["--fake-gpus", "1", "--fake-scenario", scenario, "--sample.interval", "100ms",
                    "--no-collector.processes", "--path.procfs", str(procfs.root),
                    "--path.cgroupfs", str(d / "cgroup"), "--path.shm", str(d / "shm")]
            busy = host == "host-busy"
            self.writers.jobs.append(lambda k, p=procfs, busy=busy: p.advance(
                busy=[5, 5] if busy else [1, 1], idle=[0, 0] if busy else [4, 4]))
            if host == "quota":
                v2_tree(d / "cgroup", "/tts", 0, 0, 0, 0)
                args += ["--cgroup.path", "/tts"]
                self.writers.jobs.append(lambda k, root=d / "cgroup": v2_tree(
                    root, "/tts", k * 40_000, k * 5, k * 4, k * 30_000))
            prefix: tuple[str, ...] = ()
            if host == "small-shm":
                prefix, args[-1] = small_shm(d / "shm")
            self.exporters[name] = ExporterProcess(*args, prefix=prefix)
        self.writers.thread.start()
        tts_port = free_port()
        self.tts = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_tts.py"), "--port", str(tts_port),
                                     "--seconds", "300", "--spike-after", "12"], cwd=REPO)
        self.prom = PrometheusServer(tmp / "prom", {
            "gpu": [f"127.0.0.1:{p.port}" for p in self.exporters.values()], "tts": [f"127.0.0.1:{tts_port}"]})
        self.prom.wait_for('up{job="gpu"} == 1', timeout=60, min_results=len(self.exporters))
        self.prom.wait_for(f'count_over_time(gpu_up[1m]) >= 22', timeout=90, min_results=len(self.exporters))

    def close(self) -> None:
        self.writers.stop.set()
        if self.prom:
            self.prom.stop()
        if self.tts:
            stop_process(self.tts)
        for p in self.exporters.values():
            p.stop()


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> Iterator[Scenarios]:
    s = Scenarios(tmp_path_factory.mktemp("diag"))
    yield s
    s.close()


def diagnose_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "diagnose", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def summary(findings: list[dict]) -> str:
    return "; ".join(f"{f['rule']} {f['score']}: {f['evidence']}" for f in findings)


@pytest.mark.parametrize("name", Scenarios.EXPECTED)
def test_scenario_named_by_the_live_endpoint(scenarios, name):
    p = scenarios.exporters[name]
    status, headers, body = http_get(p.url + f"/api/v1/diagnosis?window={WINDOW}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["findings"][0]["rule"] == Scenarios.EXPECTED[name][2], summary(doc["findings"])


@pytest.mark.parametrize("name", Scenarios.EXPECTED)
def test_scenario_named_by_diagnose_from_prometheus(scenarios, name):
    instance = f"127.0.0.1:{scenarios.exporters[name].port}"
    r = diagnose_cli("--prometheus", scenarios.prom.url, "--instance", instance, "--window", WINDOW,
                     "--rtf-selector", '{job="tts"}', "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["instance"] == instance and doc["gpus"] == ["0"]
    assert doc["findings"][0]["rule"] == Scenarios.EXPECTED[name][2], summary(doc["findings"])


def test_prometheus_window_reads_the_sample_histograms(scenarios):
    """Starved, busy and saturated shares come from the sample histograms (every tick), not only gauges."""
    import time

    from exporter.diagnosis.prometheus import Prometheus, PromWindow

    now = time.time()
    starved = PromWindow(Prometheus(scenarios.prom.url), f"127.0.0.1:{scenarios.exporters['cpu-starved'].port}")
    w = starved.build(now - 15, now)
    shares = [v for v in w.gpus[0].starved_share if v is not None]
    busy = [v for v in w.host_busy_share if v is not None]
    assert len(shares) >= 8 and 0.6 < sum(shares) / len(shares) <= 1.0, shares  # the scenario: 85 % starved
    assert len(busy) >= 8 and min(busy) > 0.9, busy  # the fake /proc/stat: 100 % busy
    pcie = PromWindow(Prometheus(scenarios.prom.url), f"127.0.0.1:{scenarios.exporters['pcie'].port}").build(now - 15, now)
    rx = [v for v in pcie.gpus[0].pcie_saturated_share["rx"] if v is not None]
    assert len(rx) >= 8 and 0.5 < sum(rx) / len(rx) < 1.0, rx  # busy 90 % of the time at 97 % of the link


def test_diagnose_from_to_in_rfc3339(scenarios):
    import time
    from datetime import datetime, timezone

    instance = f"127.0.0.1:{scenarios.exporters['near-oom'].port}"
    now = time.time()
    start, end = (datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for t in (now - 20, now))
    r = diagnose_cli("--prometheus", scenarios.prom.url, "--instance", instance, "--from", start, "--to", end,
                     "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["start"], doc["end"]) == (start, end) and doc["findings"][0]["rule"] == "near_oom"


def test_diagnose_says_when_rtf_crossed_and_what_coincides(scenarios):
    instance = f"127.0.0.1:{scenarios.exporters['cpu-starved'].port}"
    r = diagnose_cli("--prometheus", scenarios.prom.url, "--instance", instance, "--window", "1m",
                     "--rtf-selector", '{job="tts"}')
    assert r.returncode == 0, r.stderr
    assert "RTF: p95 crossed 0.7 at " in r.stdout, r.stdout
    assert "coinciding finding: GPU 0 starved by the CPU side (host CPU busy) (cpu_starvation)" in r.stdout
    assert r.stdout.startswith(f"Diagnosis of {instance} from ")


def test_diagnose_needs_an_instance_when_several(scenarios):
    r = diagnose_cli("--prometheus", scenarios.prom.url, "--window", WINDOW)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "several exporter instances; pick one with --instance" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--prometheus", "ftp://prom"], "invalid --prometheus URL"),
    (["--prometheus", "http://127.0.0.1:1"], "cannot reach Prometheus at http://127.0.0.1:1"),
    (["--prometheus", "http://prom:99999"], "bad port"),
    (["--prometheus", "http://127.0.0.1:1", "--at", "yesterday"], "invalid time 'yesterday'"),
    (["--prometheus", "http://127.0.0.1:1", "--from", "now-5m"], "--from and --to go together"),
    (["--prometheus", "http://127.0.0.1:1", "--from", "now", "--to", "now-5m"], "empty window"),
    (["--prometheus", "http://127.0.0.1:1", "--at", "now", "--from", "now-1m", "--to", "now"], "either --at"),
    (["--prometheus", "http://127.0.0.1:1", "--window", "fast"], "--window: invalid duration"),
    (["--prometheus", "http://127.0.0.1:1", "--rtf-selector", "job=tts"], "invalid --rtf-selector"),
    (["--prometheus", "http://127.0.0.1:1", "--bogus"], "unrecognized arguments"),
    # found by the review: tracebacks before these were errors
    (["--prometheus", "http://[::1"], "invalid --prometheus URL"),
    (["--prometheus", "http://a b:9090"], "invalid --prometheus URL"),
    (["--prometheus", "http://user:secret@127.0.0.1:1"], "credentials in the URL are not supported"),
    (["--prometheus", "http://127.0.0.1:1", "--at", "999999999999"], "out of range"),
    (["--prometheus", "http://127.0.0.1:1", "--at", "0001-01-01T00:01:00Z"], "out of range"),
    (["--prometheus", "http://127.0.0.1:1", "--at", "now-290y"], "out of range"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = diagnose_cli(*args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_a_server_that_is_not_prometheus(exporter_proc):
    p = exporter_proc("--fake-gpus", "1")  # answers /api/v1/query with 404
    r = diagnose_cli("--prometheus", p.url)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "answered 404" in r.stderr, r.stderr


class JunkPrometheus:
    """An HTTP server on 127.0.0.1 that answers every API call with a fixed body (bounded: a daemon thread
    serving until closed)."""

    def __init__(self, body: bytes) -> None:
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("body", [
    b"not json",
    b'{"status": "success"}',
    b'{"status": "success", "data": {"result": {"a": 1}}}',
    b'{"status": "success", "data": {"result": [{"metric": {}, "value": [1, "x"]}]}}',
    b'{"status": "success", "data": {"result": [{"metric": {"instance": 7}, "value": [1, "1"]}]}}',
    b'{"status": "error", "error": "parse error at char 3"}',
    # found by the review: tracebacks before these were errors
    b"[" * 100_000,  # RecursionError in the JSON decoder
    b'{"status": "success", "data": {"result": [{"metric": {"instance": "x"}, "value": [1e999, "1"], '
    b'"values": [[1e999, "1"], [1, "1"], [2, "1"]]}]}}',  # an infinite timestamp
    b'{"status": "success", "data": {"result": [{"metric": {"instance": "x"}, "value": [NaN, "1"], '
    b'"values": [[NaN, "1"], [1, "1"], [2, "1"]]}]}}',
    # issue #22: a timestamp no date can show was "year out of range" (a traceback)
    b'{"status": "success", "data": {"result": [{"metric": {"instance": "x"}, "value": [1e15, "+Inf"], '
    b'"values": [[1e15, "+Inf"], [1, "1"], [2, "1"]]}]}}',
])
def test_an_answer_that_is_not_prometheus_is_one_line(body):
    junk = JunkPrometheus(body)
    try:
        r = diagnose_cli("--prometheus", junk.url, "--instance", "x:1")
    finally:
        junk.close()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "did not answer like a Prometheus server" in r.stderr or "parse error at char 3" in r.stderr


def test_label_values_that_are_not_numbers_are_skipped_not_a_traceback():
    """xid and le labels are read as numbers: a server's "abc" there is left out of the report."""
    junk = JunkPrometheus(b'{"status": "success", "data": {"result": [{"metric": {"instance": "x", "gpu": "0", '
                          b'"xid": "abc", "le": "zz"}, "value": [1, "1"], "values": [[1, "1"], [2, "1"]]}]}}')
    try:
        r = diagnose_cli("--prometheus", junk.url, "--instance", "x:1", "--at", "100", "--window", "99s", "--json")
    finally:
        junk.close()
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "xid_errors" not in r.stdout and json.loads(r.stdout)["gpus"] == ["0"]


def test_a_server_that_trickles_its_answer_is_given_up_on_at_the_timeout():
    """urllib's timeout is per socket read: a byte every 0.2 s kept diagnose waiting for as long as the
    server liked. The whole exchange has one deadline."""
    import http.server

    from exporter.diagnosis.prometheus import DiagnoseError, Prometheus

    stop = threading.Event()

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                if stop.wait(0.2):
                    return
                self.wfile.write(b" ")
                self.wfile.flush()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(DiagnoseError, match="did not answer within 1s"):
            Prometheus(f"http://127.0.0.1:{server.server_address[1]}", query_timeout_s=1.0).instant("up", 0.0)
        with pytest.raises(DiagnoseError, match="no report within --timeout 1s"):
            Prometheus(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=1.0).instant("up", 0.0)
        assert time.monotonic() - t0 < 6
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


# ---- histories of a controlled shape, through a real Prometheus (issue #25 items 1 and 2) ----------
# Written with exact timestamps by `promtool tsdb create-blocks-from openmetrics` (Prometheus' backfill),
# then queried by a real Prometheus: seconds, not minutes of real-time scraping, and exact.
S = 15.0  # the backfilled scrape interval
WINDOW_S = 300.0


class Backfill:
    """Series of exact samples, written as one OpenMetrics file grouped by family."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, dict[str, list[tuple[float, float]]]]] = {}

    def add(self, family: str, kind: str, sample: str, labels: dict[str, str], t: float, v: float) -> None:
        key = sample + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
        self.families.setdefault(family, (kind, {}))[1].setdefault(key, []).append((t, v))

    def scrape(self, instance: str, t: float, up: bool = True, util: float | None = None,
               host: float | None = None, clock: float | None = None, pcie_rx: float | None = None) -> None:
        """One scrape of an exporter with one GPU: `clock` the sw_thermal_slowdown counter's value."""
        lab = {"instance": instance, "job": "gpu"}
        self.add("up", "gauge", "up", lab, t, 1.0 if up else 0.0)
        if not up:
            return
        gpu = {**lab, "gpu": "0"}
        self.add("gpu_up", "gauge", "gpu_up", gpu, t, 1.0)
        self.add("exporter_sample_interval_seconds", "gauge", "exporter_sample_interval_seconds", lab, t, 0.2)
        for family, labels, value in (("gpu_utilization_ratio", gpu, util), ("host_cpu_utilization_ratio", lab, host),
                                      ("gpu_pcie_utilization_ratio", {**gpu, "direction": "rx"}, pcie_rx)):
            if value is not None:
                self.add(family, "gauge", family, labels, t, value)
        if clock is not None:
            self.add("gpu_clock_event_seconds", "counter", "gpu_clock_event_seconds_total",
                     {**gpu, "reason": "sw_thermal_slowdown"}, t, clock)

    def write(self, path: Path) -> None:
        lines = []
        for family, (kind, series) in self.families.items():
            lines.append(f"# TYPE {family} {kind}")
            for key, samples in series.items():
                lines += [f"{key} {v!r} {t:.3f}" for t, v in sorted(samples)]
        path.write_text("\n".join(lines) + "\n# EOF\n")


def rtf_histogram(b: Backfill, t0: float, t1: float, jump: float) -> None:
    """tts_real_time_factor: 10 requests a second at RTF 0.3 until `jump`, at 1.5 after."""
    for k in range(int((t1 - t0) / S) + 1):
        t = t0 + k * S
        low, high = 10 * (min(t, jump) - t0), 10 * max(0.0, t - jump)
        for le, n in (("0.5", low), ("0.7", low), ("1.0", low), ("2.0", low + high), ("+Inf", low + high)):
            b.add("tts_real_time_factor", "histogram", "tts_real_time_factor_bucket", {"job": "tts", "le": le}, t, n)
        b.add("tts_real_time_factor", "histogram", "tts_real_time_factor_count", {"job": "tts"}, t, low + high)
        b.add("tts_real_time_factor", "histogram", "tts_real_time_factor_sum", {"job": "tts"}, t, 0.3 * low + 1.5 * high)


CAUSE_OFFSETS = {"c+0": 0.0, "c+2": 2.0, "c+10": 10.0, "c-20": -20.0}


def build_histories(end: float) -> Backfill:
    b = Backfill()
    start = end - WINDOW_S
    ticks = [start + k * S for k in range(int(WINDOW_S / S) + 1)]
    # Prometheus began scraping 60 s before the query's end: throttled 90 % and PCIe rx saturated meanwhile.
    for k, t in enumerate(t for t in ticks if t >= end - 60):
        b.scrape("late:1", t, util=0.9, host=0.3, clock=0.9 * S * k, pcie_rx=0.97)
    # Starved for 2 min, the exporter stopped for 1 min (up == 0), then busy for 2 min; throttled 50 % of
    # the time throughout, its counter restarting from 0 after the hole.
    for t in ticks:
        if t < end - 180:
            b.scrape("hole:1", t, util=0.2, host=0.3, clock=0.5 * (t - start))
        elif t < end - 120:
            b.scrape("hole:1", t, up=False)
        else:
            b.scrape("hole:1", t, util=0.9, host=0.3, clock=0.5 * (t - (end - 120)))
    # An exporter restart: one failed scrape, counters from 0 again; starved before, busy after.
    for t in ticks:
        before = t < end - 150
        b.scrape("restart:1", t, up=t != end - 150, util=0.2 if before else 0.9, host=0.3,
                 clock=0.4 * (t - start) if before else 0.4 * (t - (end - 135)))
    # The RTF crossing at C (the first step whose p95 over 4 scrapes is above 0.7: the jump is 10 s
    # before it); a starved GPU with a busy host from C + d on, and a decoy that ended 60 s before C.
    crossing = end - 120
    rtf_histogram(b, start - 120, end, crossing - 10)
    for name, d in CAUSE_OFFSETS.items():
        for t in ticks:
            cause = t >= crossing + d
            b.scrape(name, t, util=0.2 if cause else 0.9, host=0.97 if cause else 0.3)
    for t in ticks:
        cause = crossing - 90 <= t < crossing - 60
        b.scrape("decoy:1", t, util=0.2 if cause else 0.9, host=0.97 if cause else 0.3)
    # Prometheus just started: two scrapes 15.006 s apart (real scrape jitter), the latest 0.4 s before the end.
    b.scrape("fresh:1", end - 15.406, util=0.9, host=0.3)
    b.scrape("fresh:1", end - 0.4, util=0.2, host=0.97)
    return b


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory) -> Iterator[tuple[PrometheusServer, float]]:
    """A real Prometheus over the backfilled histories, their query end an hour ago (15 s aligned)."""
    from testkit.processes import find_tool

    tmp = tmp_path_factory.mktemp("backfill")
    end = (time.time() - 3600) // S * S
    build_histories(end).write(tmp / "history.om")
    subprocess.run([find_tool("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(tmp / "history.om"),
                    str(tmp / "prom" / "data")], check=True, capture_output=True, timeout=60)
    prom = PrometheusServer(tmp / "prom", {})
    try:
        prom.wait_for(f'up{{instance="late:1"}}[10m] @ {end:.0f}', timeout=30)
        yield prom, end
    finally:
        prom.stop()


def diagnose_doc(prom: PrometheusServer, instance: str, end: float, *extra: str) -> dict:
    from exporter.diagnosis.prometheus import run

    return json.loads(run(["--prometheus", prom.url, "--instance", instance, "--at", f"{end:.0f}", "--window", "5m",
                           "--rtf-selector", '{job="tts"}', "--json", *extra]))


def prom_window(prom: PrometheusServer, instance: str, end: float):
    from exporter.diagnosis.prometheus import Prometheus, PromWindow

    return PromWindow(Prometheus(prom.url), instance).build(end - WINDOW_S, end)


def starved_share(w) -> float:
    vals = [v for v in w.gpus[0].utilization if v is not None]
    return sum(v <= 0.4 for v in vals) / len(vals)


def test_a_history_that_starts_60s_before_the_query_end(backfilled):
    """With a minute of data in a 5 min window, clocks held down 90 % said "Nothing abnormal" (shares
    divided by the whole window) while PCIe said "90 % of the last 5 min", and window_seconds said 300."""
    prom, end = backfilled
    doc = diagnose_doc(prom, "late:1", end)
    rules = {f["rule"]: f for f in doc["findings"]}
    assert doc["requested_seconds"] == 300 and 60 <= doc["window_seconds"] <= 60 + S, doc
    assert doc["data_from"] and doc["coverage"] == f"{doc['window_seconds']:.0f} s of data in the 5 min asked"
    assert "partial_window" in rules and "nothing_abnormal" not in rules, rules
    w = prom_window(prom, "late:1", end)
    assert abs(w.gpus[0].clock_events["sw_thermal_slowdown"] - 0.9) <= S / w.seconds
    assert "for 100 % of the last 75 s" in rules["pcie_saturated"]["evidence"]
    assert "clocks held down for 90 %" in rules["clocks_throttled"]["evidence"]
    from exporter.diagnosis.prometheus import run

    text = run(["--prometheus", prom.url, "--instance", "late:1", "--at", f"{end:.0f}", "--window", "5m"])
    assert "; 75 s of data in the 5 min asked, from " in text.splitlines()[0], text


def test_the_latest_scrape_is_in_the_window(backfilled):
    """Steps counted from the window's start with a 15.006 s scrape interval ended 14.9 s before the end:
    right after Prometheus started, the second scrape was left out, one GPU read 100 % starved from one
    gauge value and the other (starved too) was not named."""
    prom, end = backfilled
    w = prom_window(prom, "fresh:1", end)
    assert [v for v in w.gpus[0].utilization if v is not None] == [0.9, 0.2], w.gpus[0].utilization
    doc = diagnose_doc(prom, "fresh:1", end)
    assert doc["findings"][0]["rule"] == "cpu_starvation", doc["findings"]


def test_no_exporter_scraped_yet_says_what_to_check(tmp_path):
    prom = PrometheusServer(tmp_path / "prom", {})  # nothing to scrape, as before the first scrape
    try:
        prom.wait_for("vector(1)")
        r = diagnose_cli("--prometheus", prom.url)
    finally:
        prom.stop()
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "has Prometheus scraped the exporter yet?" in r.stderr


def test_a_60s_hole_where_the_exporter_stopped(backfilled):
    """The hole is no data, not the last value repeated by Prometheus' 5 min lookback (60 % starved)."""
    prom, end = backfilled
    w = prom_window(prom, "hole:1", end)
    assert abs(w.seconds - 240) <= S and w.requested_s == 300
    assert abs(starved_share(w) - 0.5) <= S / w.seconds, w.gpus[0].utilization
    assert abs(w.gpus[0].clock_events["sw_thermal_slowdown"] - 0.5) <= S / w.seconds
    doc = diagnose_doc(prom, "hole:1", end)
    assert "partial_window" in [f["rule"] for f in doc["findings"]]


def test_a_history_across_an_exporter_restart(backfilled):
    prom, end = backfilled
    w = prom_window(prom, "restart:1", end)
    assert abs(w.seconds - 300) <= S
    assert abs(starved_share(w) - 0.5) <= S / w.seconds
    assert abs(w.gpus[0].clock_events["sw_thermal_slowdown"] - 0.4) <= S / w.seconds  # the reset is no drop


@pytest.mark.parametrize("name", list(CAUSE_OFFSETS))
def test_a_cause_starting_near_the_rtf_crossing_is_named_as_coinciding(backfilled, name):
    """A starvation that begins with the jitter (0, 2, 10 s after the crossing) filled ~15 s of the old
    60 s-before-to-15 s-after lookup: "no finding coincides" while the whole window named it."""
    from exporter.diagnosis.prometheus import iso

    prom, end = backfilled
    doc = diagnose_doc(prom, name, end)
    assert doc["rtf"]["crossed_at"] == iso(end - 120), doc["rtf"]
    assert (doc["rtf"]["coinciding"] or {}).get("rule") == "cpu_starvation", doc["rtf"]
    assert doc["findings"][0]["rule"] == "cpu_starvation"


def test_a_decoy_90s_before_the_crossing_does_not_coincide(backfilled):
    prom, end = backfilled
    doc = diagnose_doc(prom, "decoy:1", end)
    assert doc["rtf"]["crossed_at"] and doc["rtf"]["coinciding"] is None, doc["rtf"]
