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

from exporter.web.httpd import Request
from exporter.web.config import BasicAuth, WebConfigError, WebConfigWatcher, parse_web_config
from tests.conftest import REPO, ExporterProcess, http_get, read_until_closed, stop_process

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
    assert watcher.poll() is False and watcher.auth.enabled  # issue #22.4: auth is never reloaded away


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
        targets = json.loads(http_get(f"{prom.url}/api/v1/targets")[2])["data"]["activeTargets"]
        errors = {t["labels"]["job"]: t["lastError"] for t in targets}
        assert errors["gpu"] == "" and "401" in errors["intruder"], errors
    finally:
        prom.stop()


# -- issue #13: web config hardening

@pytest.mark.parametrize("config, message", [
    ("http_server_config: {headers: {Strict-Transport-Security: \u201cmax-age=1\u201d}}", "plain ASCII"),
    ("http_server_config: {headers: {X-Frame-Options: \"a\\tb\\x01\"}}", "plain ASCII"),
    ("tls_server_config: {cert_file: [a.crt], key_file: a.key}", "cert_file: want a string"),
    ("tls_server_config: {cert_file: a.crt, key_file: {7: 7}}", "key_file: want a string"),  # 7 alone: "7", as in Go
    ("tls_server_config: {cert_file: a.crt, key_file: a.key, client_auth_type: [x]}", "client_auth_type"),
    ("tls_server_config: {cert_file: a.crt, key_file: a.key, min_version: 1.2}", "min_version"),
    ("tls_server_config: {cert_file: a.crt, key_file: a.key, client_auth_type: {a: b}}", "client_auth_type"),
    ("http_server_config: {headers: {1: b}}", "1 can not be configured"),
    ("basic_auth_users: {7: x}", "not a user name"),
    ("basic_auth_users: {prometheus: [x]}", "not a bcrypt hash"),
    ("basic_auth_users: {prometheus: \"$2y$10$" + "a" * 53 + "\\n\"}", "not a bcrypt hash"),  # trailing newline
    ("basic_auth_users: {prometheus: \"$2y$31$" + "a" * 53 + "\"}", "bcrypt cost 31"),
    ("basic_auth_users: {prometheus: \"$2y$03$" + "a" * 53 + "\"}", "bcrypt cost 3"),
    ("http_server_config: [1, 2]", "want a mapping"),
])
def test_wrong_types_and_bad_values_are_one_line_errors(config, message, tmp_path):
    with pytest.raises(WebConfigError, match=message) as err:
        parse_web_config(config, tmp_path)
    assert "\n" not in str(err.value)


def test_non_utf8_and_typographic_quote_configs_exit_2_with_one_line(tmp_path):
    (tmp_path / "latin1.yml").write_bytes(b"http_server_config:\n  headers:\n    X-Frame-Options: \xe9t\xe9\n")
    (tmp_path / "quotes.yml").write_text("http_server_config:\n  headers:\n    X-Frame-Options: \u201cDENY\u201d\n")
    for name in ("latin1.yml", "quotes.yml"):
        r = subprocess.run([sys.executable, "-m", "exporter", "--web.config.file", str(tmp_path / name)],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "not UTF-8" in subprocess.run(
        [sys.executable, "-m", "exporter", "--web.config.file", str(tmp_path / "latin1.yml")], cwd=REPO,
        capture_output=True, text=True, timeout=30).stderr


def test_a_bad_reload_logs_one_error_and_keeps_serving(tmp_path, caplog):
    path = tmp_path / "web.yml"
    path.write_text("http_server_config: {headers: {X-Frame-Options: deny}}\n")
    watcher = WebConfigWatcher(path)
    for bad in (b"http_server_config: {headers: {X-Frame-Options: \xff}}\n",
                "http_server_config: {headers: {X-Frame-Options: \u201cDENY\u201d}}\n".encode(),
                b"tls_server_config: {cert_file: [1], key_file: 2}\n"):
        caplog.clear()
        path.write_bytes(bad)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        with caplog.at_level("ERROR", logger="exporter.web.config"):
            assert watcher.poll() is False
            assert watcher.poll() is False  # unchanged: not logged again
        assert len(caplog.records) == 1 and "not reloaded" in caplog.records[0].getMessage()
        assert caplog.records[0].exc_info is None  # one line, no traceback
        assert watcher.headers() == (("X-Frame-Options", "deny"),)


def test_dummy_hash_for_unknown_users_costs_what_the_configured_ones_cost():
    """Defect 3: a fixed cost-10 dummy beside cost-5 users told which user names exist."""
    for cost in (4, 6):
        auth = BasicAuth({"a": bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)),
                          "b": bcrypt.hashpw(b"y", bcrypt.gensalt(rounds=cost))})
        assert auth._dummy.split(b"$")[2] == b"%02d" % cost
    assert BasicAuth({"a": bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4))}).user(request_with(basic("a", "x"))) == "a"


def test_min_version_tls10_is_refused_or_really_spoken(pki):
    """`min_version: TLS10` must not claim what this OpenSSL refuses: either it is an error at load, or a
    TLS 1.0 client really gets through."""
    from exporter.web.config import build_tls_context, load_web_config

    (pki / "tls10.yml").write_text("tls_server_config: {cert_file: server.crt, key_file: server.key, "
                                   "min_version: TLS10}\n")
    try:
        server_ctx = build_tls_context(load_web_config(pki / "tls10.yml").tls)
    except WebConfigError as exc:
        assert "refuses" in str(exc) and "TLS12" in str(exc)
        return
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c, s = client.wrap_bio(c_in, c_out), server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (c, s):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert c.version() == "TLSv1"


def test_reload_drops_a_removed_client_ca(pki, tmp_path):
    """Defect 8: the live SSL context was changed in place, and load_verify_locations only ever adds."""
    bundle = tmp_path / "clients.crt"
    bundle.write_bytes((pki / "ca.crt").read_bytes() + (pki / "other-ca.crt").read_bytes())
    config = tmp_path / "mtls.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                      f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {bundle}\n")
    exporter = ExporterProcess("--fake-gpus", "1", "--web.config.file", str(config))
    try:
        port = exporter.port
        assert get(port, "/metrics", client_context(pki, "stranger"))[0] == 200  # other-ca is trusted
        bundle.write_bytes((pki / "ca.crt").read_bytes())  # other-ca removed
        deadline = time.monotonic() + 10
        while not refused(lambda: get(port, "/metrics", client_context(pki, "stranger"))) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert refused(lambda: get(port, "/metrics", client_context(pki, "stranger")))
        assert get(port, "/metrics", client_context(pki, "client"))[0] == 200
    finally:
        stop_process(exporter.proc)


def test_sighup_reloads_and_sigusr_signals_do_not_kill(tmp_path):
    """Defect 9: SIGHUP, SIGUSR1 and SIGUSR2 ended the process silently."""
    import signal

    path = tmp_path / "web.yml"
    path.write_text("http_server_config: {headers: {X-Frame-Options: deny}}\n")
    exporter = ExporterProcess("--fake-gpus", "1", "--web.config.file", str(path))
    try:
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            exporter.proc.send_signal(sig)
        deadline = time.monotonic() + 10
        while "reloaded" not in exporter.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert exporter.proc.poll() is None
        log = exporter.log()
        assert "SIGUSR1 ignored" in log and "SIGUSR2 ignored" in log and "web config" in log and "reloaded" in log
        status, _, _ = http_get(f"http://127.0.0.1:{exporter.port}/healthz")
        assert status in (200, 503)
    finally:
        stop_process(exporter.proc)


# -- issue #22.4: reloads fail closed

def full_config(pki: Path, users: dict[str, str], auth_type: str = "RequireAndVerifyClientCert",
                sans: str = "") -> str:
    return (f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
            f"  client_auth_type: {auth_type}\n  client_ca_file: {pki}/ca.crt\n{sans}"
            "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
            "rate_limit: {interval: 1s, burst: 10}\n"
            "basic_auth_users:\n" + "".join(f"  {u}: '{h}'\n" for u, h in users.items()))


def reload(watcher: WebConfigWatcher, text: str) -> bool:
    watcher.path.write_text(text)
    watcher.request_reload()
    return watcher.poll()


def protected(watcher: WebConfigWatcher) -> bool:
    return (watcher.auth.enabled and watcher.ssl_context is not None
            and watcher.ssl_context.verify_mode == ssl.CERT_REQUIRED)


def test_a_truncated_config_at_any_cut_never_turns_auth_or_tls_off(pki, tmp_path, caplog):
    """What a non-atomic rewrite leaves half-way: the file cut after every line and inside lines, and
    empty. Each cut is either refused or keeps basic auth, TLS and required client certificates."""
    hashes = {u: htpasswd_hash(u) for u in ("prometheus", "grafana")}
    text = full_config(pki, hashes)
    (tmp_path / "web.yml").write_text(text)
    watcher = WebConfigWatcher(tmp_path / "web.yml")
    line_ends = [i + 1 for i, c in enumerate(text) if c == "\n"]
    cuts = sorted({0, *line_ends, *range(1, len(text), 13)})
    refusals = 0
    with caplog.at_level("WARNING", logger="exporter.web.config"):
        for cut in cuts:
            if not reload(watcher, text[:cut]):
                refusals += 1
                assert watcher.status()[0] is False
            assert protected(watcher), f"cut at {cut}: {text[:cut]!r}"
            assert reload(watcher, text) and protected(watcher) and watcher.status()[0] is True
    assert refusals > len(cuts) // 2  # most cuts lose a section: refused, not merely survived
    assert not [r for r in caplog.records if "$2" in r.getMessage()]  # never a hash in the log
    key_only = [r for r in caplog.records if "basic auth off" in r.getMessage()]
    assert key_only and all(r.levelname == "WARNING" for r in key_only)


@pytest.mark.parametrize("replacement, why", [
    ("", "basic auth off"),
    ("basic_auth_users:\n", "basic auth off"),
    ("basic_auth_users: {}\n", "basic auth off"),
    ("users-but-no-tls", "TLS off"),
    ("tls-without-client-certs", "client certificates no longer required"),
    ("tls_server_config: {}\n", "TLS off"),
])
def test_a_reload_that_removes_protection_is_refused_and_the_old_config_serves(pki, tmp_path, caplog,
                                                                                replacement, why):
    users = {"prometheus": htpasswd_hash("pw")}
    (tmp_path / "web.yml").write_text(full_config(pki, users))
    watcher = WebConfigWatcher(tmp_path / "web.yml")
    context = watcher.ssl_context
    if replacement == "users-but-no-tls":
        replacement = "basic_auth_users:\n" + "".join(f"  {u}: '{h}'\n" for u, h in users.items())
    elif replacement == "tls-without-client-certs":
        replacement = full_config(pki, users, auth_type="NoClientCert").replace(f"  client_ca_file: {pki}/ca.crt\n", "")
    with caplog.at_level("WARNING", logger="exporter.web.config"):
        assert reload(watcher, replacement) is False
    assert watcher.ssl_context is context and protected(watcher) and watcher.status()[0] is False
    lines = [r for r in caplog.records if "not reloaded" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING" and why in lines[0].getMessage()
    assert "restart" in lines[0].getMessage()
    assert reload(watcher, full_config(pki, users)) and watcher.status()[0] is True


def test_changes_to_who_may_read_are_warnings_naming_them(pki, tmp_path, caplog):
    a, b = htpasswd_hash("a"), htpasswd_hash("b")
    (tmp_path / "web.yml").write_text(full_config(pki, {"prometheus": a, "grafana": a}))
    watcher = WebConfigWatcher(tmp_path / "web.yml")
    with caplog.at_level("INFO", logger="exporter.web.config"):
        assert reload(watcher, full_config(pki, {"prometheus": b, "alice": a},
                                           sans="  client_allowed_sans: [client]\n"))
        assert reload(watcher, full_config(pki, {"prometheus": b, "alice": a}, auth_type="RequireAndVerifyClientCert",
                                           sans="  client_allowed_sans: [client]\n").replace("deny", "sameorigin"))
    first, second = caplog.records[-2], caplog.records[-1]
    assert first.levelname == "WARNING"
    message = first.getMessage()
    for part in ("users added: alice", "users removed: grafana", "passwords changed: prometheus",
                 "client_allowed_sans any -> client"):
        assert part in message, message
    assert "$2" not in message
    assert second.levelname == "INFO"  # only a header changed: not about who may read


def test_a_truncated_config_keeps_a_real_exporter_closed_and_says_so_in_its_metrics(tmp_path):
    """The issue's case end to end: `basic_auth_users:` alone, then an empty file, picked up by the
    file watcher: unauthenticated /metrics stays 401, the WARNING is logged, the self metric says 0."""
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  prometheus: '{htpasswd_hash(PASSWORD)}'\n")
    exporter = ExporterProcess("--fake-gpus", "1", "--web.config.file", str(path))
    auth = {"Authorization": "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()}
    try:
        assert http_get(exporter.url + "/metrics")[0] == 401
        assert b"exporter_web_config_last_reload_successful 1.0" in http_get(exporter.url + "/metrics", headers=auth)[2]
        for text in ("basic_auth_users:\n", ""):
            path.write_text(text)
            deadline = time.monotonic() + 10
            while text and "basic auth off" not in exporter.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.5)  # the watcher checks every second
            assert http_get(exporter.url + "/metrics")[0] == 401
            body = http_get(exporter.url + "/metrics", headers=auth)[2]
            assert b"exporter_web_config_last_reload_successful 0.0" in body
        assert "WARNING exporter.web.config: web config" in exporter.log()
        assert "ERROR" not in exporter.log()
        docs = (REPO / "docs" / "metrics.md").read_text()
        for name in ("exporter_web_config_last_reload_successful",
                     "exporter_web_config_last_reload_success_timestamp_seconds"):
            assert f"# TYPE {name} gauge" in body.decode() and f"| `{name}` | gauge |" in docs, name
    finally:
        stop_process(exporter.proc)


def test_an_unknown_user_is_refused_without_bcrypt_after_about_a_check(mocker):
    """Issue #22.3: invented names do not queue for bcrypt (which let them lock out a first login); the
    server waits refusal_delay instead, as long as a check at the dearest configured cost."""
    auth = BasicAuth({"a": bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)),
                      "b": bcrypt.hashpw(b"y", bcrypt.gensalt(rounds=8))})
    spy = mocker.spy(bcrypt, "checkpw")
    assert auth.refusal_delay(request_with(basic("a", "wrong"))) is None  # a real name: a real check
    delay = auth.refusal_delay(request_with(basic("guess-1234", "pw")))
    assert delay is not None and delay > 0 and spy.call_count == 0
    for _ in range(20):  # it follows what checks at cost 8 take here, not those at cost 4
        auth.check(request_with(basic("b", "wrong")))
    began = time.monotonic()
    bcrypt.checkpw(b"wrong", auth.users["b"])
    one_check = time.monotonic() - began
    assert 0.2 * one_check < auth.refusal_delay(request_with(basic("nobody", ""))) < 5 * one_check


def test_a_config_replaced_while_a_reload_reads_it_is_read_again(tmp_path, monkeypatch):
    """The watcher stat'ed the files again after loading: a rewrite landing while it loaded (YAML, TLS,
    the dummy bcrypt hash) was taken as already read, so removing a leaked user's password never took
    effect until the next change or SIGHUP."""
    import exporter.web.config as webconfig

    path = tmp_path / "web.yml"
    a, b = htpasswd_hash("a"), htpasswd_hash("b")
    path.write_text(f"basic_auth_users: {{prometheus: '{a}', leaked: '{a}'}}\n")
    watcher = WebConfigWatcher(path)
    real_load = webconfig.load_web_config

    def load_then_rewrite(p):
        config = real_load(p)
        path.write_text(f"basic_auth_users: {{prometheus: '{b}'}}\n")  # the admin's second write, mid-reload
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        return config

    path.write_text(f"basic_auth_users: {{prometheus: '{b}', leaked: '{a}'}}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    monkeypatch.setattr(webconfig, "load_web_config", load_then_rewrite)
    assert watcher.poll() is True and "leaked" in watcher.auth.users
    monkeypatch.setattr(webconfig, "load_web_config", real_load)
    assert watcher.poll() is True and set(watcher.auth.users) == {"prometheus"}


def test_an_over_long_password_costs_a_bcrypt_check_like_any_wrong_one(mocker):
    """bcrypt >= 5 refuses a password over 72 bytes at once: a configured user answered in 0.8 ms, an
    unknown one in ~60 ms (a user-name oracle), and each instant refusal pulled the unknown names'
    delay toward 0 (6.1 ms after ten). A refused length now costs a real check, whose answer is ignored."""
    long_pw = "p" * 72
    hashed = bcrypt.hashpw(long_pw.encode(), bcrypt.gensalt(rounds=4))
    auth = BasicAuth({"prometheus": hashed})
    spy = mocker.spy(bcrypt, "checkpw")
    assert auth.check(request_with(basic("prometheus", long_pw + "junk"))) is False  # never truncated to a yes
    completed = [c for c in spy.call_args_list if len(c.args[0]) <= 72]
    assert completed and completed[-1].args[1] == hashed
    assert auth.check(request_with(basic("prometheus", long_pw))) is True
