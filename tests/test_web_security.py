"""--web.config.file: TLS, mutual TLS and basic auth against the exporter as a user runs it, with
certificates made by openssl in the test and Python's real TLS client."""
from __future__ import annotations

import base64
import json
import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

from exporter.httpd import Request
from exporter.webconfig import BasicAuth, WebConfigError, WebConfigWatcher, parse_web_config
from tests.conftest import REPO, ExporterProcess, read_until_closed, stop_process

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret-scrape"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)


def make_cert(d: Path, ca: str, name: str, ext: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


def make_pki(d: Path) -> Path:
    """Two CAs; server certificates for 127.0.0.1; a client of "ca" and a stranger of "other-ca"."""
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_cert(d, "ca", "server2", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_cert(d, "ca", "client", "extendedKeyUsage=clientAuth\n")
    make_cert(d, "other-ca", "stranger", "extendedKeyUsage=clientAuth\n")
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def htpasswd_hash(password: str) -> str:
    """What `htpasswd -nBC 10` writes ($2y$); cost 4 keeps the test quick, the format is the same."""
    return "$2y$" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()[4:]


def client_context(pki: Path, cert: str | None = None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(pki / f"{cert}.crt", pki / f"{cert}.key")
    if maximum:
        ctx.maximum_version = maximum
    return ctx


def get(port: int, path: str, ctx: ssl.SSLContext, auth: tuple[str, str] | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.headers), r.read()
    finally:
        conn.close()


def start(tmp_path: Path, config: str) -> ExporterProcess:
    path = tmp_path / "web.yml"
    path.write_text(config)
    exporter = ExporterProcess("--fake-gpus", "1", "--sample.interval", "100ms", "--web.config.file", str(path))
    return exporter


@pytest.fixture
def tls_auth_exporter(pki, tmp_path):
    exporter = start(tmp_path, f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
http_server_config:
  headers:
    Strict-Transport-Security: max-age=31536000
basic_auth_users:
  prometheus: {htpasswd_hash(PASSWORD)}
""")
    yield exporter
    stop_process(exporter.proc)


def test_tls_with_basic_auth(pki, tls_auth_exporter):
    port = tls_auth_exporter.port
    ctx = client_context(pki)
    status, headers, body = get(port, "/metrics", ctx, ("prometheus", PASSWORD))
    assert status == 200 and b"exporter_build_info" in body
    assert headers["Strict-Transport-Security"] == "max-age=31536000"
    for auth in (None, ("prometheus", "wrong"), ("nobody", PASSWORD)):
        status, headers, body = get(port, "/metrics", ctx, auth)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), auth
        assert b"gpu_" not in body
    for path in ("/", "/api/v1/samples?window=1s"):  # the live view and its data are protected too
        assert get(port, path, ctx)[0] == 401
        assert get(port, path, ctx, ("prometheus", PASSWORD))[0] == 200
    assert get(port, "/healthz", ctx)[0] in (200, 503)  # probes carry no credentials
    # verified once with bcrypt, then from the cache: many scrapes stay fast and keep working
    for _ in range(20):
        assert get(port, "/metrics", ctx, ("prometheus", PASSWORD))[0] == 200
    log = tls_auth_exporter.log()
    assert PASSWORD not in log and "$2y$" not in log  # nothing secret logged
    assert "https://" in log


def test_plain_http_to_a_tls_port_gets_no_metrics(tls_auth_exporter):
    with socket.create_connection(("127.0.0.1", tls_auth_exporter.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_until_closed(s)
    assert b"gpu_" not in data and not data.startswith(b"HTTP/1.1 200")


def test_healthcheck_module_speaks_tls(pki, tls_auth_exporter):
    env = {**os.environ, "GPU_EXPORTER_WEB_LISTEN_ADDRESS": f"127.0.0.1:{tls_auth_exporter.port}",
           "GPU_EXPORTER_WEB_CONFIG_FILE": str(Path(tls_auth_exporter.proc.args[-1]))}
    deadline = time.monotonic() + 10
    while True:
        rc = subprocess.run([sys.executable, "-m", "exporter.healthcheck"], env=env, cwd=REPO,
                            capture_output=True).returncode
        if rc == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rc == 0


def mtls_config(pki: Path, auth_type: str) -> str:
    return f"""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: {auth_type}
  client_ca_file: ca.crt
  min_version: TLS13
"""


def refused(fn) -> bool:
    try:
        fn()
    except (ssl.SSLError, ConnectionError):
        return True
    return False


def test_mutual_tls_required(pki):
    (pki / "mtls.yml").write_text(mtls_config(pki, "RequireAndVerifyClientCert"))  # paths relative to the file
    exporter = ExporterProcess("--fake-gpus", "1", "--web.config.file", str(pki / "mtls.yml"))
    try:
        port = exporter.port
        assert get(port, "/metrics", client_context(pki, "client"))[0] == 200
        assert refused(lambda: get(port, "/metrics", client_context(pki)))  # no client certificate
        assert refused(lambda: get(port, "/metrics", client_context(pki, "stranger")))  # another CA's
        assert refused(lambda: get(port, "/metrics", client_context(pki, "client", ssl.TLSVersion.TLSv1_2)))
        assert get(port, "/metrics", client_context(pki, "client"))[0] == 200  # still serving after all that
    finally:
        stop_process(exporter.proc)


def test_client_certificate_optional(pki):
    (pki / "optional.yml").write_text(mtls_config(pki, "VerifyClientCertIfGiven"))
    exporter = ExporterProcess("--fake-gpus", "1", "--web.config.file", str(pki / "optional.yml"))
    try:
        assert get(exporter.port, "/metrics", client_context(pki))[0] == 200
        assert get(exporter.port, "/metrics", client_context(pki, "client"))[0] == 200
        assert refused(lambda: get(exporter.port, "/metrics", client_context(pki, "stranger")))
    finally:
        stop_process(exporter.proc)


def served_certificate(port: int, pki: Path) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return s.getpeercert(binary_form=True)


def test_rotated_certificate_and_password_are_picked_up_without_restart(pki, tmp_path):
    for name in ("crt", "key"):
        (tmp_path / f"live.{name}").write_bytes((pki / f"server.{name}").read_bytes())
    config = tmp_path / "web.yml"
    users = f"basic_auth_users:\n  prometheus: {htpasswd_hash(PASSWORD)}\n"
    config.write_text(f"tls_server_config:\n  cert_file: live.crt\n  key_file: live.key\n{users}")
    exporter = ExporterProcess("--fake-gpus", "1", "--web.config.file", str(config))
    try:
        first = served_certificate(exporter.port, pki)
        # a broken update (key of another certificate) is refused, the running one kept
        (tmp_path / "live.crt").write_bytes((pki / "server2.crt").read_bytes())
        time.sleep(2.5)
        assert served_certificate(exporter.port, pki) == first
        (tmp_path / "live.key").write_bytes((pki / "server2.key").read_bytes())
        deadline = time.monotonic() + 10
        while served_certificate(exporter.port, pki) == first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert served_certificate(exporter.port, pki) != first
        assert "not reloaded" in exporter.log()

        config.write_text(config.read_text().replace(users, f"basic_auth_users:\n  prometheus: {htpasswd_hash('new')}\n"))
        ctx = client_context(pki)
        deadline = time.monotonic() + 10
        while get(exporter.port, "/metrics", ctx, ("prometheus", PASSWORD))[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert get(exporter.port, "/metrics", ctx, ("prometheus", PASSWORD))[0] == 401  # old cached one dropped
        assert get(exporter.port, "/metrics", ctx, ("prometheus", "new"))[0] == 200
    finally:
        stop_process(exporter.proc)


@pytest.mark.parametrize("config, message", [
    ("tls_server_config: {cert_file: a.crt}", "missing one of key or key_file"),
    ("tls_server_config: {cert_file: a.crt, key_file: a.key, client_auth_type: RequestClientCert}",
     "cannot request a certificate without verifying"),
    ("tls_server_config: {cert_file: a.crt, key_file: a.key, client_ca_file: ca.crt}",
     "client CA's have been configured without a Client Auth Policy"),
    ("tls_server_config: {cert_file: a.crt, key_file: a.key, min_version: TLS14}", "unknown TLS version: TLS14"),
    ("tls_server_config: {cert_file: a.crt, key_file: a.key, min_version: TLS13, max_version: TLS12}",
     "max_version is below min_version"),
    ("basic_auth_users: {prometheus: hunter2}", "not a bcrypt hash"),
    ("basic_auth_user: {}", "unknown key 'basic_auth_user'"),
    ("http_server_config: {headers: {Set-Cookie: x}}", "'Set-Cookie' can not be configured"),
    ("tls_server_config: [", "not valid YAML"),
    ("- a list", "want a mapping"),
])
def test_bad_web_configs_are_one_line_errors(config, message, tmp_path):
    with pytest.raises(WebConfigError, match=message):
        parse_web_config(config, tmp_path)


def test_bad_web_config_file_exits_2_with_one_line(tmp_path, pki):
    cases = {
        "missing.yml": None,
        "bad-cert.yml": f"tls_server_config: {{cert_file: {pki}/ca.crt, key_file: {pki}/server.key}}",
        "no-cert.yml": f"tls_server_config: {{cert_file: {tmp_path}/nope.crt, key_file: {pki}/server.key}}",
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        r = subprocess.run([sys.executable, "-m", "exporter", "--web.config.file", str(tmp_path / name)],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--web.config.file" in lines[0] and "Traceback" not in r.stderr, r.stderr


def request_with(header: str | None) -> Request:
    return Request("GET", "/metrics", "/metrics", "", "HTTP/1.1", {"authorization": header} if header else {}, "-")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_runs_bcrypt_once_then_uses_the_cache(mocker):
    auth = BasicAuth({"prometheus": bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))})
    spy = mocker.spy(bcrypt, "checkpw")
    good = request_with(basic("prometheus", "pw"))
    assert auth.check_cached(good) is None  # not verified yet: needs bcrypt
    assert auth.check(good) is True and spy.call_count == 1
    assert auth.check_cached(good) is True and spy.call_count == 1  # cached: no bcrypt
    assert auth.check_cached(request_with(basic("prometheus", "pw2"))) is None  # another password is not cached
    assert auth.check(request_with(basic("prometheus", "pw2"))) is False
    assert auth.check(request_with(basic("nobody", "pw"))) is False
    assert spy.call_count == 3  # the unknown user cost a bcrypt check too (no user-name timing oracle)
    for header in (None, "Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
        assert auth.check_cached(request_with(header)) is False


def test_watcher_keeps_serving_the_old_config_when_the_new_one_is_broken(tmp_path):
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users: {{prometheus: '{htpasswd_hash('pw')}'}}\n")
    watcher = WebConfigWatcher(path)
    assert watcher.poll() is False  # nothing changed
    path.write_text("basic_auth_users: {prometheus: plain}\n")
    assert watcher.poll() is False and watcher.auth.users  # broken: previous users kept
    path.write_text("basic_auth_users: {}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert watcher.poll() is True and not watcher.auth.enabled


def test_real_prometheus_scrapes_over_tls_with_basic_auth(pki, tls_auth_exporter, tmp_path):
    """Prometheus's own Go TLS client and basic auth against ours: up == 1 and data, and a job with the
    wrong password is down with a 401."""
    from tests.conftest import PrometheusServer

    (tmp_path / "password").write_text(PASSWORD)
    (tmp_path / "wrong").write_text("wrong")
    target = [f"127.0.0.1:{tls_auth_exporter.port}"]
    tls = ["scheme: https", "tls_config:", f"  ca_file: {pki}/ca.crt"]
    prom = PrometheusServer(tmp_path / "prom", {"gpu": target, "intruder": target}, job_settings={
        "gpu": tls + ["basic_auth:", "  username: prometheus", f"  password_file: {tmp_path}/password"],
        "intruder": tls + ["basic_auth:", "  username: prometheus", f"  password_file: {tmp_path}/wrong"],
    })
    try:
        prom.wait_for('up{job="gpu"} == 1', timeout=30)
        assert prom.wait_for('gpu_up{job="gpu",gpu="0"}', timeout=15)
        assert prom.wait_for('up{job="intruder"} == 0', timeout=15)
        assert not prom.query('gpu_up{job="intruder"}')
        targets = json.loads(http_get_plain(f"{prom.url}/api/v1/targets"))["data"]["activeTargets"]
        errors = {t["labels"]["job"]: t["lastError"] for t in targets}
        assert errors["gpu"] == "" and "401" in errors["intruder"], errors
    finally:
        prom.stop()


def http_get_plain(url: str) -> bytes:
    from tests.conftest import http_get

    return http_get(url)[2]
