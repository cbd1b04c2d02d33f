"""Found by using the exporter as an outsider would (review branch): inputs from the network, a file or a
flag that made it answer 500, log a traceback per request, hang or crash. Each test feeds the input that
did it, on 127.0.0.1 with bounded waits."""
from __future__ import annotations

import socket
import threading

from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry

from exporter.httpd import Request
from exporter.server import ExporterApp, make_server
from tests.conftest import read_until_closed

# Accept headers that made /metrics answer 500 (prometheus_client's parser raised on a version that is not
# numbers) or drop the connection (the client's version echoed into our Content-Type was not ASCII).
HOSTILE_ACCEPT = ["application/openmetrics-text; version=abc", "application/openmetrics-text; version=1.a",
                  "application/openmetrics-text; version=1.0.0.\xb2", "application/openmetrics-text;version=2.0.0"]


def metrics_app() -> ExporterApp:
    return ExporterApp(CollectorRegistry(), lambda: (True, "ok"), "/metrics", None, None)


def get_metrics(app: ExporterApp, accept: str):
    return app.handle(Request("GET", "/metrics", "/metrics", "", "HTTP/1.1", {"accept": accept}, "-"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(HOSTILE_ACCEPT),
                 st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=120).map(
                     lambda t: "application/openmetrics-text; version=" + t)))
def test_any_accept_header_gets_a_page_in_a_format_we_write(accept):
    response = get_metrics(metrics_app(), accept)
    assert response.status == 200
    assert response.content_type.isascii() and (
        response.content_type == "text/plain; version=0.0.4; charset=utf-8"
        or response.content_type.startswith("application/openmetrics-text; version=1.0.0; charset=utf-8"))


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
