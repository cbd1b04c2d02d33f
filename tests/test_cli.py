from __future__ import annotations

import ctypes.util
import signal
import socket
import subprocess
import sys
import time

import pytest

from exporter.cli import env_name, parse_duration
from tests.conftest import REPO, http_get


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=20,
                          cwd=REPO, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,needle", [
    (["--sample.interval=-1s"], "invalid duration"),
    (["--sample.interval", "5ms"], "below the 10ms minimum"),
    (["--sample.interval", "fast"], "invalid duration"),
    (["--web.listen-address", "nonsense"], "--web.listen-address"),
    (["--web.listen-address", ":99999"], "port out of range"),
    (["--path.procfs", "/nonexistent/proc"], "--path.procfs"),
    (["--fake-gpus", "-2"], "must not be negative"),
    (["--fake-gpus", "two"], "not an integer"),
    (["--log.level", "loud"], "--log.level"),
    (["--web.telemetry-path", "metrics"], "--web.telemetry-path"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--web.max-connections", "0"], "--web.max-connections must be at least 1"),
    (["--web.config.file", "/nonexistent/web.yml"], "cannot read /nonexistent/web.yml"),
    (["--fake-churn", "1s"], "--fake-churn needs --fake-gpus"),
    (["--kubernetes.pod-resources-socket", "", "--kubernetes.pod-labels"], "--kubernetes.pod-labels needs"),
])
def test_bad_flags_exit_2_with_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_value_from_environment_is_reported_too():
    r = run_cli(env={"GPU_EXPORTER_SAMPLE_INTERVAL": "1ms"})
    assert r.returncode == 2 and "below the 10ms minimum" in r.stderr


def test_port_in_use_exits_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("--fake-gpus", "1", "--web.listen-address", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot listen on" in r.stderr
    assert "Traceback" not in r.stderr


def test_helpers():
    assert env_name("--web.listen-address") == "GPU_EXPORTER_WEB_LISTEN_ADDRESS"
    assert parse_duration("200ms") == pytest.approx(0.2)
    assert parse_duration("1m") == 60 and parse_duration("0.5") == 0.5


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_within_a_second(exporter_proc, sig):
    p = exporter_proc("--fake-gpus", "2")
    assert http_get(p.url + "/metrics")[0] == 200
    started = time.monotonic()
    p.proc.send_signal(sig)
    assert p.proc.wait(5) == 0
    assert time.monotonic() - started < 1.0
    assert "Traceback" not in p.log()


@pytest.mark.e2e
def test_settings_from_environment(exporter_proc):
    p = exporter_proc(env={"GPU_EXPORTER_FAKE_GPUS": "3", "GPU_EXPORTER_WEB_TELEMETRY_PATH": "/m",
                           "GPU_EXPORTER_SAMPLE_INTERVAL": "100ms", "GPU_EXPORTER_NODE_NAME": "gpu-node-7"})
    p.wait_for_sample("/m")
    status, _, body = http_get(p.url + "/m")
    assert status == 200 and b'node="gpu-node-7"' in body
    assert body.count(b"gpu_up{") == 3 and b"exporter_sample_interval_seconds 0.1" in body


@pytest.mark.e2e
def test_without_gpu_it_serves_host_metrics_and_says_so(exporter_proc):
    """Real pynvml, no --fake-gpus: on a machine without the NVIDIA driver (CI) NVML is absent."""
    p = exporter_proc("--sample.interval", "100ms")
    deadline = time.monotonic() + 10
    body = b""
    while b"host_cpu_utilization_ratio " not in body and time.monotonic() < deadline:
        time.sleep(0.1)
        body = http_get(p.url + "/metrics")[2]
    assert b"host_cpu_utilization_ratio " in body and b"host_memory_total_bytes " in body
    assert http_get(p.url + "/healthz")[0] == 200
    if ctypes.util.find_library("nvidia-ml") is None:
        assert b"exporter_nvml_up 0.0" in body
        assert b'nvml="absent"' in body
        assert "no NVIDIA GPU found" in p.log()
        assert p.log().count("no NVIDIA GPU found") == 1  # said once, not at every retry
    else:  # a machine with the driver: the same command finds the GPUs
        assert b"exporter_nvml_up 1.0" in body


@pytest.mark.e2e
def test_http_endpoints(exporter_proc):
    p = exporter_proc("--fake-gpus", "1")
    p.wait_for_sample()
    status, headers, body = http_get(p.url + "/")
    assert status == 200 and b'href="/metrics"' in body and b'href="/healthz"' in body
    assert http_get(p.url + "/nope")[0] == 404
    status, headers, body = http_get(p.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    import gzip

    assert b"gpu_up{" in gzip.decompress(body)
    status, headers, body = http_get(p.url + "/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    status, _, body = http_get(p.url + "/healthz")
    assert status == 200 and b"sampler ok" in body


def test_healthcheck_does_not_import_the_exporter():
    """The container's health check runs every few seconds: it must not load the sampler, NVML, the
    collector or prometheus_client."""
    code = ("import sys, exporter.healthcheck; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('exporter', 'prometheus_client', 'pynvml')))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "exporter.healthcheck" in loaded
    assert not loaded & {"exporter.cli", "exporter.sampler", "exporter.collector", "exporter.server",
                         "exporter.sources", "prometheus_client", "pynvml"}, sorted(loaded)
