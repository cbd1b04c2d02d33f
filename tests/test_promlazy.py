"""prometheus_client is registered without running its __init__ (exporter/promlazy.py): a default run does
not import its HTTP servers, urllib.request or email; whoever asks for the whole package still gets it; and
the exporter's own Content-Type choice is prometheus_client's choose_encoder()'s."""
from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings, strategies as st

from tests.conftest import REPO

UNUSED = ("prometheus_client.exposition", "prometheus_client.metrics", "http.server", "urllib.request",
          "wsgiref", "email")


def test_a_default_start_imports_no_http_server_of_prometheus_client(procfs):
    code = ("import sys; from exporter.cli import parse_config; "
            f"parse_config(['--path.procfs', {str(procfs.root)!r}]); import exporter.web.server; "
            "print(' '.join(sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "prometheus_client.registry" in loaded
    assert not {m for m in loaded for u in UNUSED if m == u or m.startswith(u + ".")}, sorted(loaded)


def test_the_whole_package_loads_on_first_use_of_a_name_only_init_defines():
    code = ("import exporter.cli, threading, sys; assert 'prometheus_client.exposition' not in sys.modules; "
            "from prometheus_client import CollectorRegistry, Counter, generate_latest; "
            "import prometheus_client; r = CollectorRegistry(); Counter('c', 'h', registry=r).inc(); "
            "print(generate_latest(r).decode().count('c_total 1.0'), prometheus_client.REGISTRY is not None, "
            "prometheus_client.exposition.__name__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True", "prometheus_client.exposition"]


_PART = st.sampled_from(["application/openmetrics-text", "text/plain", "*/*", "text/html", " text/plain ",
                         "version=1.0.0", "version=0.0.1", "version=0.0.4", "version=2.0.0", "version=abc",
                         "version=1.a", "version=", "version=1.0.0.\xb2", "escaping=allow-utf-8",
                         "escaping=underscores", "escaping=dots", "escaping=values", "escaping=bogus",
                         "q=0.5", "charset=utf-8", "=", ""])
_ACCEPT = st.lists(st.lists(_PART, min_size=1, max_size=5).map(";".join), max_size=4).map(",".join)


def _outcome(choose, accept: str) -> str:
    try:
        return choose(accept)
    except Exception as exc:
        return f"raised {type(exc).__name__}"


@settings(max_examples=400, deadline=None)
@given(accept=_ACCEPT | st.text(max_size=40))
def test_the_content_type_is_the_one_prometheus_client_chooses(accept):
    from prometheus_client.exposition import choose_encoder

    from exporter.web.server import _choose_content_type

    assert _outcome(_choose_content_type, accept) == _outcome(lambda a: choose_encoder(a)[1], accept)


def test_prometheus_scrape_accept_headers():
    from exporter.web.server import _negotiate

    # What Prometheus 2 and 3 send by default (scrape_protocols), and a plain client.
    assert _negotiate("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                      "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1") == \
        "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
    assert _negotiate("text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,*/*;q=0.2").startswith(
        "text/plain; version=1.0.0")
    assert _negotiate("") == "text/plain; version=0.0.4; charset=utf-8"
