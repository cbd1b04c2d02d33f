"""Found by using the exporter as an outsider would (review branch): inputs from the network, a file or a
flag that made it answer 500, log a traceback per request, hang or crash. Each test feeds the input that
did it, on 127.0.0.1 with bounded waits."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry

from exporter.web.httpd import Request
from exporter.web.server import ExporterApp, make_server
from tests.conftest import REPO, read_until_closed
from tests.test_web_security import make_ca

# Accept headers that made /metrics answer 500 (prometheus_client's parser raised on a version that is not
# numbers) or drop the connection (the client's version echoed into our Content-Type was not ASCII).
HOSTILE_ACCEPT = ["application/openmetrics-text; version=abc", "application/openmetrics-text; version=1.a",
                  "application/openmetrics-text; version=1.0.0.\xb2", "application/openmetrics-text; version=1.0.0.\t"]


def metrics_app() -> ExporterApp:
    return ExporterApp(CollectorRegistry(), lambda: (True, "ok"), "/metrics", None, None)


def get_metrics(app: ExporterApp, accept: str):
    return app.handle(Request("GET", "/metrics", "/metrics", "", "HTTP/1.1", {"accept": accept}, "-"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(HOSTILE_ACCEPT),
                 st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=120).map(
                     lambda t: "application/openmetrics-text; version=" + t)))
def test_any_accept_header_gets_a_page_with_a_content_type_that_can_be_sent(accept):
    response = get_metrics(metrics_app(), accept)
    assert response.status == 200
    assert response.content_type.isascii() and response.content_type.isprintable()
    assert response.content_type.startswith(("text/plain; version=0.0.4", "application/openmetrics-text; version="))


def test_hostile_accept_headers_through_the_server(caplog):
    server = make_server("127.0.0.1:0", CollectorRegistry(), lambda: (True, "ok\n"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for accept in HOSTILE_ACCEPT:
            with socket.create_connection(server.server_address[:2], timeout=5) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAccept: "
                             + accept.encode("latin-1") + b"\r\n\r\n")
                assert read_until_closed(sock).startswith(b"HTTP/1.1 200 "), accept
        assert "Traceback" not in caplog.text and "error answering" not in caplog.text
    finally:
        server.shutdown()
        server.server_close()


def run_exporter(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The exporter's command line; a hang shows as TimeoutExpired, not as a stuck test run."""
    return subprocess.run([sys.executable, "-m", "exporter", "--web.listen-address", "127.0.0.1:0", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
@pytest.mark.parametrize("fifo_as", ["config", "cert_file", "key_file", "client_ca_file"])
def test_a_fifo_as_the_web_config_or_one_of_its_files_is_refused_not_waited_on(tmp_path, fifo_as):
    """open() of a FIFO blocks until a writer comes: start-up hung for good (and a reload would hang the
    reload thread). Like --path.procfs, such a path is an error."""
    os.mkfifo(tmp_path / "fifo")
    make_ca(tmp_path, "s")  # a real certificate and key, so that only the FIFO can be what is wrong
    files = {"cert_file": "s.crt", "key_file": "s.key", "client_ca_file": "s.crt", fifo_as: "fifo"}
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config: {cert_file: %(cert_file)s, key_file: %(key_file)s, client_ca_file: "
                      "%(client_ca_file)s, client_auth_type: RequireAndVerifyClientCert}\n" % files)
    r = run_exporter("--web.config.file", str(tmp_path / "fifo" if fifo_as == "config" else config))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "not a regular file" in r.stderr, r.stderr


@pytest.mark.e2e
def test_the_container_health_check_ignores_proxy_variables_and_says_bad_addresses_in_one_line(exporter_proc):
    """A pod or container with HTTP_PROXY set (common behind a corporate proxy) sent the health check's
    request for 127.0.0.1 to the proxy: unhealthy, restarted, while the exporter was fine."""
    e = exporter_proc("--fake-gpus", "1")
    e.wait_for_sample()
    base = {**os.environ, "GPU_EXPORTER_WEB_LISTEN_ADDRESS": f"127.0.0.1:{e.port}"}
    for proxy in ({}, {"http_proxy": "http://127.0.0.1:1", "HTTP_PROXY": "http://127.0.0.1:1", "no_proxy": ""}):
        r = subprocess.run([sys.executable, "-m", "exporter.healthcheck"], env={**base, **proxy}, cwd=REPO,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (proxy, r.stderr)
    r = subprocess.run([sys.executable, "-m", "exporter.healthcheck"], cwd=REPO, capture_output=True, text=True,
                       env={**base, "GPU_EXPORTER_WEB_LISTEN_ADDRESS": "nonsense"}, timeout=30)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


# ---- `diagnose` and a hostile Prometheus (issue #22 item 5) ----------------------------------------
# Every number in a Prometheus answer is untrusted: ±Inf, NaN, huge, timestamps no date can show, labels
# that are not ids. Each gave a traceback, a false critical finding or unbounded memory.
import json  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import re  # noqa: E402

NON_FINITE = re.compile(r"\b(inf|nan)\b", re.IGNORECASE)
AT = 1_800_000_000.0  # --at: the end of every window asked of the fake
SCRAPE = 15.0


class FakePrometheus:
    """Answers /api/v1/query and /api/v1/query_range on 127.0.0.1 like a Prometheus that scraped one
    exporter ("x:1", one GPU) every 15 s with plain values; `override` (a query substring -> a function
    of the plain result) makes one query's answer hostile. `delay_s` slows every answer; `raw_body`
    answers every query with fixed bytes; `redirect` answers 302 to that URL + /prom + the path (and
    /prom/... is answered as ...)."""

    def __init__(self) -> None:
        self.override: dict = {}
        self.delay_s = 0.0
        self.raw_body: bytes | None = None
        self.redirect: str | None = None
        self.asked: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                fake.asked.append(params.get("query", ""))
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                if fake.redirect and not self.path.startswith("/prom/"):
                    self.send_response(302)
                    self.send_header("Location", fake.redirect + "/prom" + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = url.path.removeprefix("/prom")
                body = fake.raw_body if fake.raw_body is not None else fake.answer(path, params)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, params: dict) -> bytes:
        query = params.get("query", "")
        labels = {"instance": "x:1", "gpu": "0", "le": "+Inf", "reason": "sw_thermal_slowdown", "xid": "79",
                  "name": "H100", "path": "/dev/shm"}
        if path == "/api/v1/query_range":
            start, end, step = (float(params[k]) for k in ("start", "end", "step"))
            n = int((end - start) / step) + 1
            result = [{"metric": dict(labels), "values": [[start + i * step, "0.5"] for i in range(n)]}]
        elif query.startswith("up{"):
            result = [{"metric": {"instance": "x:1"}, "values": [[AT - 300 + i * SCRAPE, "1"] for i in range(21)]}]
        elif "gpu_mig" in query:
            result = []
        else:
            result = [{"metric": dict(labels), "value": [float(params["time"]), "0"]}]
        for needle, change in self.override.items():
            if needle in query:
                result = change(result)
        return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}}).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_prom():
    fake = FakePrometheus()
    yield fake
    fake.close()


def diagnose_main(url: str, *args: str) -> tuple[int, str, str]:
    """`diagnose` in this process (as `python -m exporter diagnose` runs it): (exit status, stdout, stderr)."""
    import contextlib
    import io

    from exporter.diagnosis.prometheus import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--prometheus", url, "--instance", "x:1", "--at", str(AT), "--json", *args])
    return code, out.getvalue(), err.getvalue()


def set_value(value: str, labels: dict | None = None):
    """An override: every sample of the query's answer becomes `value` (and its labels `labels`)."""
    def change(result: list) -> list:
        for r in result:
            r["metric"].update(labels or {})
            for sample in r.get("values", []) + ([r["value"]] if "value" in r else []):
                sample[1] = value
        return result
    return change


def test_a_plain_fake_gives_a_report(fake_prom):
    fake_prom.override = {}
    code, out, err = diagnose_main(fake_prom.url)
    doc = json.loads(out)
    assert code == 0 and err == "" and doc["gpus"] == ["0"], err
    assert doc["window_seconds"] == doc["requested_seconds"] == 300.0


@pytest.mark.parametrize("needle,value,labels,absent", [
    # found by the review: each was a traceback (OverflowError, ValueError) or a false finding
    ("max_over_time(host_shm_size_bytes", "+Inf", None, "shm_too_small"),
    ("max_over_time(host_shm_used_bytes", "1e300", None, None),
    ("increase(gpu_xid_errors_total", "+Inf", None, "xid_errors"),
    ("increase(gpu_xid_errors_total", "NaN", None, "xid_errors"),
    ("gpu_memory_used_ratio", "+Inf", None, "near_oom"),
    ("gpu_memory_used_ratio", "-Inf", None, "near_oom"),
    ("gpu_memory_used_ratio", "1e308", None, "near_oom"),
    ("gpu_utilization_ratio", "NaN", {"gpu": "²"}, None),  # isdigit() is not int()
    ("gpu_info", "1", {"gpu": "\x1b[31m0"}, None),  # a terminal escape in a label
    ("gpu_clock_event_seconds_total", "NaN", None, "clocks_throttled"),  # min(1.0, nan) was 1.0: 100 %
    ("gpu_clock_event_seconds_total", "+Inf", None, None),
    ("exporter_sample_lateness_seconds_bucket", "+Inf", {"le": "NaN"}, None),
    ("exporter_sample_interval_seconds", "-Inf", None, None),
    ("tts_real_time_factor", "+Inf", None, None),
])
def test_hostile_numbers_give_a_correct_report_or_one_line(fake_prom, needle, value, labels, absent):
    fake_prom.override = {needle: set_value(value, labels)}
    code, out, err = diagnose_main(fake_prom.url)
    assert code in (0, 2) and "Traceback" not in err and err.count("\n") == (code == 2), err
    assert "internal error" not in err, err  # each case is handled, not caught by main's last resort
    if code == 0:
        doc = json.loads(out)
        assert not NON_FINITE.search(json.dumps(doc["findings"])), doc["findings"]
        assert absent is None or absent not in [f["rule"] for f in doc["findings"]], doc["findings"]
        assert all(g.isprintable() for g in doc["gpus"])


@pytest.mark.parametrize("stamp", [1e15, -1.0, 1e308])
def test_a_timestamp_no_date_can_show_is_one_line(fake_prom, stamp):
    """An RTF sample at t=1e15 was "year out of range" (a traceback)."""
    def change(result: list) -> list:
        for r in result:
            r["values"][0][0] = stamp
            r["values"][0][1] = "9"
        return result
    fake_prom.override = {"tts_real_time_factor": change}
    code, out, err = diagnose_main(fake_prom.url)
    assert code == 2 and err.count("\n") == 1 and "did not answer like a Prometheus server" in err, err


def test_eighty_thousand_series_are_refused_before_parsing_naming_the_query(fake_prom):
    """80 000 series under the 32 MiB byte cap took 1.83 GB and 29 s: series and samples are counted in
    the bytes before json.loads builds an object per sample."""
    import tracemalloc

    many = [{"metric": {"gpu": str(i)}, "values": [[AT, "1"]]} for i in range(80_000)]
    fake_prom.override = {"gpu_memory_used_ratio": lambda result: many}
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        code, _, err = diagnose_main(fake_prom.url)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and "more than 512 series for last_over_time(gpu_memory_used_ratio" in err, err
    assert peak < 200 * 1024 * 1024 and time.monotonic() - t0 < 20, (peak, err)


def test_too_many_samples_are_refused(fake_prom):
    points = [[AT - 1 + i * 1e-6, "1"] for i in range(250_000)]
    fake_prom.override = {"gpu_utilization_ratio": lambda result: [{"metric": {"gpu": "0"}, "values": points}]}
    code, _, err = diagnose_main(fake_prom.url)
    assert code == 2 and "more than 200000 samples for last_over_time(gpu_utilization_ratio" in err, err


def test_one_deadline_for_the_whole_run(fake_prom):
    """52 queries at 15 s each had no overall limit (~12 min worst case): --timeout bounds the run."""
    fake_prom.override, fake_prom.delay_s = {}, 0.3
    try:
        t0 = time.monotonic()
        code, _, err = diagnose_main(fake_prom.url, "--timeout", "1s")
        took = time.monotonic() - t0
    finally:
        fake_prom.delay_s = 0.0
    assert code == 2 and "no report within --timeout 1s" in err and err.count("\n") == 1, err
    assert took < 3, took


@pytest.mark.parametrize("timeout", ["0s", "2d", "soon"])
def test_a_bad_timeout_is_one_line(fake_prom, timeout):
    code, _, err = diagnose_main(fake_prom.url, "--timeout", timeout)
    assert code == 2 and "--timeout" in err and err.count("\n") == 1, err


def test_a_redirect_to_another_port_is_refused_and_named(fake_prom):
    """A 302 to another port was followed silently: the report came from a server not asked for."""
    fake_prom.override = {}
    other = FakePrometheus()
    fake_prom.redirect = other.url
    try:
        code, _, err = diagnose_main(fake_prom.url)
    finally:
        fake_prom.redirect = None
        other.close()
    assert code == 2 and f"redirected to {other.url}/prom/api/v1/query" in err and "refused" in err, err
    assert err.count("\n") == 1 and other.asked == []  # not followed


def test_a_redirect_within_the_same_server_is_followed(fake_prom):
    fake_prom.override = {}
    fake_prom.redirect = fake_prom.url  # e.g. Prometheus behind a path prefix
    try:
        code, out, err = diagnose_main(fake_prom.url)
    finally:
        fake_prom.redirect = None
    assert code == 0 and json.loads(out)["gpus"] == ["0"], err


VALUES = st.one_of(st.sampled_from(["+Inf", "-Inf", "NaN", "1e308", "-1e308", "0", "1", "0.95", "1e15", "-0",
                                    "abc", "", "0x10", "1_0"]),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
LABELS = st.dictionaries(st.sampled_from(["gpu", "xid", "le", "reason", "name", "path", "instance"]),
                         st.text(max_size=12), max_size=3)
QUERIES = st.sampled_from(["up{", "gpu_utilization_ratio", "gpu_memory_used_ratio", "gpu_pcie", "gpu_up",
                           "gpu_info", "gpu_mig", "gpu_clock_event", "gpu_xid", "gpu_sampled_utilization",
                           "host_sampled", "host_cpu", "cgroup_cpu", "host_shm_size", "host_shm_used",
                           "exporter_sample_interval", "exporter_nvml_up", "lateness", "overruns",
                           "tts_real_time_factor", "last_over_time(exporter_sample_interval_seconds[", ""])
STAMPS = st.one_of(st.none(), st.sampled_from([1e15, -1.0, 0.0, AT + 1e6]), st.floats(allow_nan=True))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(QUERIES, VALUES, LABELS, STAMPS), min_size=1, max_size=3))
def test_any_hostile_answer_is_a_report_or_one_line_never_a_traceback(fake_prom, changes):
    def change_for(value, labels, stamp):
        def change(result: list) -> list:
            result = set_value(value, labels)(result)
            if stamp is not None:
                for r in result:
                    (r.get("values") or [r["value"]])[0][0] = stamp
            return result
        return change
    fake_prom.override = {q: change_for(v, labels, stamp) for q, v, labels, stamp in changes}
    code, out, err = diagnose_main(fake_prom.url)
    assert code in (0, 2) and "Traceback" not in err and err.count("\n") == (code == 2), err
    assert "internal error" not in err, err  # each case is handled, not caught by main's last resort
    if code == 0:
        text = json.dumps(json.loads(out)["findings"])
        assert not NON_FINITE.search(text), text


@pytest.mark.e2e
def test_the_container_health_check_leaves_no_traceback_in_the_log(exporter_proc, monkeypatch):
    """urllib's Connection: close request, answered and closed at once: the lingering half-close met a
    connection the client had already reset (ENOTCONN) and logged a traceback for ~40 % of health checks,
    i.e. every ~30 s under the image's HEALTHCHECK (seen in tests/test_container.py's podman logs)."""
    from exporter import healthcheck

    e = exporter_proc("--fake-gpus", "1")
    monkeypatch.setenv("GPU_EXPORTER_WEB_LISTEN_ADDRESS", f"127.0.0.1:{e.port}")
    assert [healthcheck.main() for _ in range(40)] == [0] * 40
    time.sleep(0.2)  # the last connection's close is logged after the client has its answer
    assert "Traceback" not in e.log(), e.log()[-3000:]


def test_a_million_labels_on_one_series_are_refused_before_parsing(fake_prom):
    """Series and samples were counted in the bytes, object members not: one series with 1 400 000
    labels (28 MB, under the byte cap) took 312 MB RSS in `diagnose`, more than the pod it may run in."""
    import tracemalloc

    labels = {f"l{i}": "v" for i in range(1_200_000)}
    fake_prom.override = {"gpu_memory_used_ratio": lambda result: [{"metric": labels, "values": [[AT, "1"]]}]}
    tracemalloc.start()
    try:
        code, _, err = diagnose_main(fake_prom.url)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and "labels for last_over_time(gpu_memory_used_ratio" in err and err.count("\n") == 1, err
    assert peak < 100 * 1024 * 1024, peak


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"Content-Length: 2\r\n\r\n{}",
    b"HELLO THERE\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_a_server_that_breaks_http_is_named_not_an_internal_error(answer):
    """http.client's HTTPException (101 headers, a bad status line, a 70 KB header line, a broken chunk)
    is not an OSError: `diagnose` called its server's fault its own ("internal error ...; please report
    it")."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"

    def serve() -> None:
        for _ in range(4):  # bounded: diagnose stops at the first failed query
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        code, _, err = diagnose_main(url)
    finally:
        srv.close()
    assert code == 2 and err.count("\n") == 1 and "internal error" not in err and url in err, err
