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

from exporter.httpd import Request
from exporter.server import ExporterApp, make_server
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
