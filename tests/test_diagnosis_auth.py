"""`diagnose` against a protected Prometheus: basic auth, a bearer token, TLS with a private CA (a fake
Prometheus on 127.0.0.1 that answers as test_untrusted_input's does, once the request is authorised).
Credentials are read from bounded files (or one environment variable), sent only to the --prometheus
origin, and never printed; a bad file is one line and exit 2."""
from __future__ import annotations

import base64
import json
import os
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from exporter.diagnosis.prometheus import PASSWORD_ENV, Access
from tests.test_untrusted_input import FakePrometheus, diagnose_main
from tests.test_web_security import make_ca, make_cert

PASSWORD = "s3cret-Pa55word"
TOKEN = "eyJhbGciOi.token-value"


class ProtectedPrometheus:
    """Answers like FakePrometheus when the request carries `authorization` (else 401); over TLS with
    `tls` (a server context). `seen`: the Authorization header of every request (None: absent).
    `redirect`: answer 302 to that URL + /prom + path; /prom/... is answered as ...)."""

    def __init__(self, authorization: str | None, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[str | None] = []
        self.redirect: str | None = None
        fake = self
        plain = SimpleNamespace(override={})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                got = self.headers.get("Authorization")
                fake.seen.append(got)
                if authorization is not None and got != authorization:
                    return self._send(401, b'{"status":"error","error":"Unauthorized"}')
                if fake.redirect and not self.path.startswith("/prom/"):
                    self.send_response(302)
                    self.send_header("Location", fake.redirect + "/prom" + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                return self._send(200, FakePrometheus.answer(plain, url.path.removeprefix("/prom"), params))  # type: ignore[arg-type]

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # type: ignore[method-assign]  # a refused handshake
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def secrets(tmp_path) -> Path:
    (tmp_path / "password").write_text(PASSWORD + "\n")
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    return tmp_path


def run(url: str, *args: str) -> tuple[int, str, str]:
    code, out, err = diagnose_main(url, *args)
    assert PASSWORD not in out + err and TOKEN not in out + err  # never printed, whatever happened
    return code, out, err


def test_basic_auth_with_a_password_file(secrets):
    prom = ProtectedPrometheus(basic("sre", PASSWORD))
    try:
        code, out, err = run(prom.url, "--prometheus.basic-auth-user", "sre",
                             "--prometheus.basic-auth-password-file", str(secrets / "password"))
    finally:
        prom.close()
    assert code == 0 and json.loads(out)["gpus"] == ["0"], err
    assert len(prom.seen) > 10 and set(prom.seen) == {basic("sre", PASSWORD)}  # every query, trimmed password


def test_basic_auth_password_from_the_environment(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    prom = ProtectedPrometheus(basic("sre", PASSWORD))
    try:
        code, out, err = run(prom.url, "--prometheus.basic-auth-user", "sre")
    finally:
        prom.close()
    assert code == 0, err


def test_bearer_token_file(secrets, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "stray")  # read only with --prometheus.basic-auth-user
    prom = ProtectedPrometheus(f"Bearer {TOKEN}")
    try:
        code, out, err = run(prom.url, "--prometheus.bearer-token-file", str(secrets / "token"))
    finally:
        prom.close()
    assert code == 0 and json.loads(out)["gpus"] == ["0"], err


@pytest.mark.parametrize("args", [(), ("--prometheus.basic-auth-user", "sre")])
def test_no_or_wrong_credentials_are_one_line_with_a_hint(secrets, tmp_path, args):
    prom = ProtectedPrometheus(basic("sre", PASSWORD))
    (tmp_path / "wrong").write_text("not-it")
    extra = ("--prometheus.basic-auth-password-file", str(tmp_path / "wrong")) if args else ()
    try:
        code, _, err = run(prom.url, *args, *extra)
    finally:
        prom.close()
    assert code == 2 and err.count("\n") == 1 and "answered 401" in err and "--prometheus.bearer-token-file" in err
    assert "not-it" not in err


def test_credentials_never_go_across_a_refused_redirect(secrets):
    prom = ProtectedPrometheus(f"Bearer {TOKEN}")
    other = ProtectedPrometheus(None)
    prom.redirect = other.url
    try:
        code, _, err = run(prom.url, "--prometheus.bearer-token-file", str(secrets / "token"))
    finally:
        prom.close()
        other.close()
    assert code == 2 and "refused" in err and err.count("\n") == 1, err
    assert other.seen == []  # not even asked, so no header sent


def test_credentials_follow_a_redirect_within_the_same_server(secrets):
    prom = ProtectedPrometheus(f"Bearer {TOKEN}")
    prom.redirect = prom.url  # Prometheus behind a path prefix
    try:
        code, _, err = run(prom.url, "--prometheus.bearer-token-file", str(secrets / "token"))
    finally:
        prom.close()
    assert code == 0, err


def test_authorization_is_added_only_for_the_prometheus_origin():
    """The handler itself, should a redirect elsewhere ever be followed: no header to another origin."""
    import urllib.request

    from exporter.diagnosis.prometheus import _Authorize

    h = _Authorize("http://127.0.0.1:9090", "Bearer x")
    same = h.http_request(urllib.request.Request("http://127.0.0.1:9090/prom/api/v1/query"))
    other = urllib.request.Request("http://127.0.0.1:9091/api/v1/query", headers={"Authorization": "Bearer x"})
    assert same.get_header("Authorization") == "Bearer x"
    assert h.http_request(other).get_header("Authorization") is None
    assert "Bearer" not in repr(Access("Bearer x", None))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prom-pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    return d


def tls_server(pki: Path, authorization: str | None) -> ProtectedPrometheus:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    return ProtectedPrometheus(authorization, tls=ctx)


def test_tls_with_a_private_ca_and_basic_auth(pki, secrets):
    prom = tls_server(pki, basic("sre", PASSWORD))
    try:
        code, out, err = run(prom.url, "--prometheus.ca-file", str(pki / "ca.crt"), "--prometheus.basic-auth-user",
                             "sre", "--prometheus.basic-auth-password-file", str(secrets / "password"))
    finally:
        prom.close()
    assert code == 0 and json.loads(out)["gpus"] == ["0"], err


@pytest.mark.parametrize("ca", [None, "other-ca.crt"])
def test_tls_fails_closed_without_the_right_ca(pki, secrets, ca):
    prom = tls_server(pki, basic("sre", PASSWORD))
    try:
        code, _, err = run(prom.url, *(("--prometheus.ca-file", str(pki / ca)) if ca else ()),
                           "--prometheus.basic-auth-user", "sre",
                           "--prometheus.basic-auth-password-file", str(secrets / "password"))
    finally:
        prom.close()
    assert code == 2 and err.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in err, err
    assert prom.seen == []  # the password never went to a server it could not verify


def bad_file(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / kind
    if kind == "missing":
        return p
    if kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "huge":
        p.write_bytes(b"x" * 1_100_000)
    elif kind == "empty":
        p.write_text(" \n")
    elif kind == "binary":
        p.write_bytes(b"\xff\xfe" + PASSWORD.encode())
    elif kind == "two-lines":
        p.write_text(PASSWORD + "\nX-Injected: 1\n")
    return p


KINDS = ["missing", "directory", "fifo", "huge", "empty", "binary", "two-lines"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flag", ["--prometheus.basic-auth-password-file", "--prometheus.bearer-token-file",
                                  "--prometheus.ca-file"])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path, flag, kind):
    args = ["--prometheus.basic-auth-user", "sre"] if "password" in flag else []
    url = "https://127.0.0.1:1" if "ca-file" in flag else "http://127.0.0.1:1"
    code, out, err = run(url, *args, flag, str(bad_file(tmp_path, kind)))
    assert code == 2 and out == "" and err.count("\n") == 1 and flag in err, err
    assert "Traceback" not in err and "X-Injected" not in err


@pytest.mark.parametrize("args,says", [
    (["--prometheus.basic-auth-user", "sre"], PASSWORD_ENV),  # a user needs a password, not on the command line
    (["--prometheus.basic-auth-password", PASSWORD], "unrecognized"),  # no such flag
    (["--prometheus.basic-auth-user", "a:b", "--prometheus.bearer-token-file", "/dev/null"], "colon"),
])
def test_flag_misuse_is_one_line(monkeypatch, capsys, args, says):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    from exporter.diagnosis.prometheus import main

    try:
        code = main(["--prometheus", "http://127.0.0.1:1", *args])
    except SystemExit as exc:  # the flag parser's own one line
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert PASSWORD not in err


def test_basic_auth_and_a_token_together_are_refused(secrets):
    code, _, err = run("http://127.0.0.1:1", "--prometheus.basic-auth-user", "sre", "--prometheus.basic-auth-password-file",
                       str(secrets / "password"), "--prometheus.bearer-token-file", str(secrets / "token"))
    assert code == 2 and "not both" in err


def test_a_ca_file_needs_an_https_url(pki):
    code, _, err = run("http://127.0.0.1:1", "--prometheus.ca-file", str(pki / "ca.crt"))
    assert code == 2 and "https://" in err and err.count("\n") == 1
