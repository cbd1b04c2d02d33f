"""exporter-toolkit parity of --web.config.file (issue #19).

Our own config files, one per case the reference's web/testdata covers (and the verdict its Go tests
assert), plus the cases where we refuse with a stated reason; then the behaviour against the exporter
process over TLS on 127.0.0.1: client certificates with and without an allowed SAN, system roots, inline
PEM, the cipher and curve actually negotiated, 429 after the burst, headers served, and the answers to
the wrong protocol on either port."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from exporter.web import yamltext
from exporter.web import tlsconfig
from exporter.web.httpd import Request
from exporter.web.ratelimit import RateLimit, TokenBucket, parse_rate_limit
from exporter.web.config import WebConfigError, WebConfigWatcher, parse_web_config
from exporter.web.headers import parse_headers
from tests.conftest import REPO, ExporterProcess, ManualClock, read_until_closed
from tests.test_web_security import client_context, get, htpasswd_hash, make_cert, make_pki, openssl, refused

CLIENT = "extendedKeyUsage=clientAuth\n"
SPIFFE = "spiffe://cluster.local/ns/monitoring/sa/prometheus"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = make_pki(tmp_path_factory.mktemp("parity-pki"))
    make_cert(d, "ca", "by-dns", f"subjectAltName=DNS:scraper.example.net\n{CLIENT}")
    make_cert(d, "ca", "by-email", f"subjectAltName=email:ops@example.net\n{CLIENT}")
    make_cert(d, "ca", "by-uri", f"subjectAltName=URI:{SPIFFE}\n{CLIENT}")
    make_cert(d, "ca", "by-ipv6", f"subjectAltName=IP:::1\n{CLIENT}")
    make_cert(d, "ca", "intruder", f"subjectAltName=DNS:intruder.example.net,email:x@example.net\n{CLIENT}")
    openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:x", "-out", "encrypted.key", cwd=d)
    return d


def indented(path: Path) -> str:
    """A PEM file as a YAML block scalar under a key at two spaces."""
    return "|\n" + "".join(f"    {line}\n" for line in path.read_text().splitlines())


TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


def watcher(pki: Path, name: str, text: str) -> WebConfigWatcher:
    """What the exporter does with the file at start: parse it and build the TLS context."""
    path = pki / f"{name}.yml"
    path.write_text(text)
    return WebConfigWatcher(path)


# --- verdicts: accepted ---------------------------------------------------------------------------

def test_empty_file_and_tls_section_without_certificate_serve_plain_http(pki):
    assert watcher(pki, "empty", "").ssl_context is None
    w = watcher(pki, "versions-only", "tls_server_config:\n  min_version: TLS13\n  curve_preferences: [X25519]\n")
    assert w.ssl_context is None and w.config.tls is None
    assert any("TLS is off" in note for note in w.notes())


@pytest.mark.parametrize("auth_type, mode", [("VerifyClientCertIfGiven", ssl.CERT_OPTIONAL),
                                             ("RequireAndVerifyClientCert", ssl.CERT_REQUIRED)])
def test_verify_without_a_ca_uses_the_system_roots(pki, auth_type, mode):
    w = watcher(pki, f"roots-{auth_type}", TLS + f"  client_auth_type: {auth_type}\n")
    assert w.ssl_context.verify_mode == mode
    assert any("system's CA roots" in note for note in w.notes())


def test_inline_certificate_key_and_client_ca(pki, mocker):
    memory_files = mocker.spy(os, "memfd_create")
    before = set(pki.iterdir())
    w = watcher(pki, "inline", "tls_server_config:\n"
                f"  cert: {indented(pki / 'server.crt')}  key: {indented(pki / 'server.key')}"
                f"  client_ca: {indented(pki / 'ca.crt')}  client_auth_type: VerifyClientCertIfGiven\n")
    assert memory_files.call_count == 2  # certificate and key went through memory, not disk
    assert set(pki.iterdir()) - before == {pki / "inline.yml"}
    assert w.config.tls.files() == []  # nothing on disk to watch: the YAML itself is
    assert len(w.ssl_context.get_ca_certs()) == 1
    assert "BEGIN" not in repr(w.config.tls)  # the key is not shown in reprs (logs, tracebacks)
    mixed = watcher(pki, "inline-key",
                    f"tls_server_config:\n  cert_file: server.crt\n  key: {indented(pki / 'server.key')}")
    assert mixed.config.tls.files() == [pki / "server.crt"]


ALL_GO_CIPHERS = list(tlsconfig.CIPHER_SUITES)


def test_cipher_suites_map_to_openssl_names(pki):
    w = watcher(pki, "all-ciphers", TLS + f"  cipher_suites: [{', '.join(ALL_GO_CIPHERS)}]\n")
    offered = {c["name"] for c in w.ssl_context.get_ciphers() if c["protocol"] != "TLSv1.3"}
    assert offered == {n for n in tlsconfig.CIPHER_SUITES.values() if n}  # all ten, nothing else for TLS 1.2
    some = watcher(pki, "some-ciphers", TLS + "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, "
                   "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384]\n  min_version: TLS12\n  max_version: TLS12\n")
    assert [c["name"] for c in some.ssl_context.get_ciphers() if c["protocol"] == "TLSv1.2"] == \
        ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384"]
    # only TLS 1.3 names: nothing left for TLS 1.2, as in Go, so the floor is TLS 1.3
    only13 = watcher(pki, "tls13-ciphers", TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n")
    assert only13.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert some.ssl_context.options & ssl.OP_CIPHER_SERVER_PREFERENCE  # Go's default: true
    no_order = watcher(pki, "no-order", TLS + "  prefer_server_cipher_suites: false\n")
    assert not no_order.ssl_context.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_curves_one_exactly_several_with_a_note(pki):
    assert watcher(pki, "one-curve", TLS + "  curve_preferences: [CurveP521]\n").notes() == ()
    w = watcher(pki, "all-curves", TLS + "  curve_preferences: [CurveP256, CurveP384, CurveP521, X25519]\n")
    assert w.config.tls.curve == "prime256v1"
    (note,) = w.notes()
    assert "only CurveP256" in note and "CurveP384, CurveP521, X25519" in note


def test_http2_key_is_accepted_and_no_http2_cipher_is_required(pki):
    # exporter-toolkit refuses a cipher list without HTTP/2's required suite while http2 is on; we serve
    # HTTP/1.1 only, so there is nothing to require
    text = TLS + "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384]\n  max_version: TLS12\n"
    watcher(pki, "http2-off", text + "http_server_config:\n  http2: false\n")
    watcher(pki, "http2-on", text)


def test_header_values_are_taken_as_written(pki):
    w = watcher(pki, "headers", """http_server_config:
  headers:
    X-Frame-Options: deny
    Strict-Transport-Security: max-age=31536000; includeSubDomains
    X-Content-Type-Options: nosniff
    X-XSS-Protection: 1
    Content-Security-Policy: "default-src 'self' *.example.net"
""")
    assert dict(w.headers()) == {"X-Frame-Options": "deny", "X-XSS-Protection": "1",
                                 "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
                                 "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'self' *.example.net"}
    assert parse_headers(yamltext.load("X-XSS-Protection: 0x10\nX-Frame-Options: sameorigin")) == \
        (("X-XSS-Protection", "0x10"), ("X-Frame-Options", "sameorigin"))  # not 16


def test_rate_limit_settings(pki):
    assert watcher(pki, "rl-off", "rate_limit:\n  interval: 0\n  burst: 0\n").config.rate_limit is None
    assert watcher(pki, "rl-1s", "rate_limit:\n  interval: 1s\n  burst: 0\n").config.rate_limit == RateLimit(1.0, 0)
    assert parse_rate_limit({"interval": "100ms", "burst": 5}) == RateLimit(0.1, 5)


def test_users_and_client_allowed_sans(pki):
    watcher(pki, "users", TLS + f"basic_auth_users:\n  alice: {htpasswd_hash('a')}\n  bob: {htpasswd_hash('b')}\n")
    w = watcher(pki, "sans", TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
                "  client_allowed_sans: [one, scraper.example.net]\n")
    assert w.config.tls.allowed_sans == {"one", "scraper.example.net"}


# --- verdicts: refused, each with its reason ----------------------------------------------------------

UNVERIFIED = "cannot request a certificate without verifying"
REFUSED = [
    ("junk", "hWkNKCp3fvIx3jKnsaBI\nTuEjdwNS8A2vYdFbiKqr\n", "want a mapping"),
    ("junk-key", "tls_server_config:\n  cert_filse: server.crt\n", "unknown key 'cert_filse'"),
    ("cert-path-empty", 'tls_server_config:\n  cert_file: ""\n  key_file: server.key\n',
     "missing one of cert or cert_file"),
    ("cert-empty", 'tls_server_config:\n  cert: ""\n  key_file: server.key\n', "missing one of cert or cert_file"),
    ("key-path-empty", 'tls_server_config:\n  cert_file: server.crt\n  key_file: ""\n',
     "missing one of key or key_file"),
    ("key-empty", 'tls_server_config:\n  cert_file: server.crt\n  key: ""\n', "missing one of key or key_file"),
    ("both-empty", 'tls_server_config:\n  cert_file: ""\n  key_file: ""\n  client_auth_type: x\n',
     "missing one of cert or cert_file"),
    ("cert-missing", "tls_server_config:\n  cert_file: somefile\n  key_file: server.key\n",
     r"cannot read cert_file \S*/somefile: No such file"),
    ("cert-path-as-written", "tls_server_config:\n  cert_file: 0x10\n  key_file: server.key\n",  # not "16"
     r"cannot read cert_file \S*/0x10: No such file"),
    ("key-missing", "tls_server_config:\n  cert_file: server.crt\n  key_file: somefile\n",
     r"cannot read key_file \S*/somefile: No such file"),
    ("ca-without-policy", TLS + "  client_ca_file: /dev/null\n",
     "client CA's have been configured without a Client Auth"),
    ("ca-missing", TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: somefile\n",
     r"cannot read client_ca_file \S*/somefile"),
    ("ca-empty", TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: /dev/null\n",
     "cannot load client_ca_file /dev/null"),
    ("bad-password", TLS + "basic_auth_users:\n  john: doe\n", "not a bcrypt hash"),
    ("invented-cipher", TLS + "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048]\n",
     "unknown cipher: TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048"),
    ("insecure-cipher", TLS + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
     "unknown cipher: TLS_RSA_WITH_RC4_128_SHA"),
    ("invented-curve", TLS + "  curve_preferences: [CurveP257]\n", "unknown curve: CurveP257"),
    ("wrong-version", TLS + "  min_version: TLS111\n", "unknown TLS version: TLS111"),
    ("content-type-options", "http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n",
     "invalid value for X-Content-Type-Options"),
    ("frame-options", "http_server_config:\n  headers:\n    X-Frame-Options: foo\n",
     "invalid value for X-Frame-Options"),
    ("frame-options-case", "http_server_config:\n  headers:\n    X-Frame-Options: DENY\n",
     "invalid value for X-Frame-Options"),
    ("extra-header", "http_server_config:\n  headers:\n    Content-Type: foo\n",
     "'Content-Type' can not be configured"),
    ("require-any", TLS + "  client_auth_type: RequireAnyClientCert\n", UNVERIFIED),
    ("request", TLS + "  client_auth_type: RequestClientCert\n", UNVERIFIED),
    ("require-old-name", TLS + "  client_auth_type: RequireClientCert\n", UNVERIFIED),
    ("invalid-auth", TLS + "  client_auth_type: Sometimes\n", "invalid ClientAuth: Sometimes"),
    ("cert-twice", TLS + "  cert: x\n", "both cert_file and cert are set"),
    ("sans-without-verify", TLS + "  client_allowed_sans: [a]\n", "client_allowed_sans needs client_auth_type"),
    ("sans-empty", TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_allowed_sans: []\n",
     "client_allowed_sans is empty"),
    ("tls13-names-tls12-max", TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n  max_version: TLS12\n",
     "only TLS 1.3 suites"),
    ("rate-interval", "rate_limit:\n  interval: fast\n", "rate_limit.interval"),
    ("rate-interval-number", "rate_limit:\n  interval: 5\n", "rate_limit.interval: want a duration with a unit"),
    ("rate-burst", "rate_limit:\n  interval: 1s\n  burst: -1\n", "rate_limit.burst"),
    ("rate-key", "rate_limit:\n  every: 1s\n", "rate_limit: unknown key 'every'"),
    ("encrypted-key", "tls_server_config:\n  cert_file: server.crt\n  key_file: encrypted.key\n", "encrypted"),
    ("endless-cert", "tls_server_config:\n  cert_file: /dev/zero\n  key_file: server.key\n",
     "cannot read cert_file /dev/zero: not a regular file"),
    ("mismatched-pair", "tls_server_config:\n  cert_file: ca.crt\n  key_file: server.key\n",
     "cannot load cert_file .*ca.crt with key_file"),
    ("bcrypt-cost-18", f"basic_auth_users:\n  bob: $2y$18${'a' * 53}\n", "bcrypt cost 18"),  # see docs: refused here
]


@pytest.mark.parametrize("name, text, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_reason(pki, name, text, message):
    with pytest.raises(WebConfigError, match=message) as info:
        watcher(pki, name, text)
    assert "\n" not in str(info.value)


@pytest.mark.e2e
def test_refused_config_exits_2_with_one_line(pki):
    for name, text, needle in [
        ("exit-any", TLS + "  client_auth_type: RequireAnyClientCert\n", UNVERIFIED),
        ("exit-missing", "tls_server_config:\n  cert_file: gone.crt\n  key_file: server.key\n",
         f"cannot read cert_file {pki}/gone.crt"),
        ("exit-cipher", TLS + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
         "unknown cipher: TLS_RSA_WITH_RC4_128_SHA"),
        ("exit-frame", "http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "invalid value for X-Frame"),
    ]:
        (pki / f"{name}.yml").write_text(text)
        r = subprocess.run([sys.executable, "-m", "exporter", "--web.config.file", str(pki / f"{name}.yml")],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- units ------------------------------------------------------------------------------------------

def test_token_bucket_like_go_rate_limiter():
    clock = ManualClock()
    bucket = TokenBucket(RateLimit(interval_s=2.0, burst=3), clock)
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]  # starts full
    clock.advance(1.9)
    assert not bucket.allow()
    clock.advance(0.1)
    assert bucket.allow() and not bucket.allow()  # one token per interval
    clock.advance(100)
    assert sum(bucket.allow() for _ in range(10)) == 3  # never more than the burst
    never = TokenBucket(RateLimit(interval_s=1.0, burst=0), clock)
    clock.advance(10)
    assert not never.allow()  # burst 0: nothing at all, as rate.NewLimiter(_, 0)


def test_peer_sans_as_go_writes_them():
    cert = {"subjectAltName": (("DNS", "a.example"), ("email", "ops@example.net"), ("URI", SPIFFE),
                               ("IP Address", "0:0:0:0:0:0:0:1\n"), ("IP Address", "10.0.0.1"),
                               ("othername", "<unsupported>"), ("DirName", "x"))}
    assert tlsconfig.peer_sans(cert) == {"a.example", "ops@example.net", SPIFFE, "::1", "10.0.0.1"}
    tls = tlsconfig.parse_tls_server_config({"cert_file": "a", "key_file": "b", "client_allowed_sans": ["::1"],
                                             "client_auth_type": "VerifyClientCertIfGiven"}, Path("/"))
    assert tlsconfig.allowed_peer(tls, cert)
    assert not tlsconfig.allowed_peer(tls, {"subjectAltName": (("DNS", "::1x"),)})
    assert not tlsconfig.allowed_peer(tls, None)  # no certificate, no SAN


KEYS = ["tls_server_config", "http_server_config", "rate_limit", "basic_auth_users", "headers", "cert_file",
        "key_file", "cert", "key", "client_ca", "client_auth_type", "cipher_suites", "curve_preferences",
        "min_version", "max_version", "prefer_server_cipher_suites", "client_allowed_sans", "interval", "burst",
        "X-Frame-Options", "X-XSS-Protection", "http2", "TLS13", "X25519", "RequireAnyClientCert", "1s"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20), st.floats(allow_nan=False),
                    st.sampled_from(KEYS), st.text(max_size=40))
DOCS = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                    max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(DOCS)
def test_fuzzed_configs_are_accepted_or_one_line_errors(doc):
    try:
        parse_web_config(yaml.safe_dump(doc), Path("/nonexistent"))
    except WebConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_yaml_text_is_accepted_or_one_line_errors(text):
    try:
        parse_web_config(text, Path("/nonexistent"))
    except WebConfigError as exc:
        assert "\n" not in str(exc)


# --- the real process over TLS on 127.0.0.1 -----------------------------------------------------------

def start(pki: Path, name: str, text: str, env: dict | None = None) -> ExporterProcess:
    (pki / f"{name}.yml").write_text(text)
    return ExporterProcess("--fake-gpus", "1", "--web.config.file", str(pki / f"{name}.yml"), env=env)


@pytest.mark.e2e
def test_client_allowed_sans_over_tls(pki):
    exporter = start(pki, "live-sans", TLS + "  client_auth_type: RequireAndVerifyClientCert\n"
                     "  client_ca_file: ca.crt\n"
                     f"  client_allowed_sans: [scraper.example.net, ops@example.net, '{SPIFFE}', '::1']\n")
    try:
        for cert in ("by-dns", "by-email", "by-uri", "by-ipv6"):
            assert get(exporter.port, "/metrics", client_context(pki, cert))[0] == 200, cert
        for cert in ("intruder", "client"):  # the right CA, but no allowed SAN (or none at all)
            assert refused(lambda: get(exporter.port, "/metrics", client_context(pki, cert))), cert  # closed unanswered
        assert refused(lambda: get(exporter.port, "/metrics", client_context(pki, "stranger")))
        assert get(exporter.port, "/metrics", client_context(pki, "by-dns"))[0] == 200  # still serving
        wanted, metrics = 'exporter_http_connections_closed_total{reason="client_san"} 2.0', ""
        deadline = time.monotonic() + 10
        while wanted not in metrics and time.monotonic() < deadline:  # rendered once per sample: poll
            metrics = get(exporter.port, "/metrics", client_context(pki, "by-dns"))[2].decode()
            time.sleep(0.1)
        assert wanted in metrics
    finally:
        exporter.stop()


@pytest.mark.e2e
def test_verify_without_ca_trusts_the_system_roots_over_tls(pki):
    # OpenSSL's system roots are what SSL_CERT_FILE names: here our test CA plays the system's
    exporter = start(pki, "live-roots", TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
                     env={"SSL_CERT_FILE": str(pki / "ca.crt")})
    try:
        assert get(exporter.port, "/metrics", client_context(pki, "client"))[0] == 200
        assert refused(lambda: get(exporter.port, "/metrics", client_context(pki, "stranger")))
        assert refused(lambda: get(exporter.port, "/metrics", client_context(pki)))
        assert "verified against the system's CA roots" in exporter.log()
    finally:
        exporter.stop()


@pytest.mark.e2e
def test_inline_pem_over_tls(pki):
    exporter = start(pki, "live-inline", "tls_server_config:\n"
                     f"  cert: {indented(pki / 'server.crt')}  key: {indented(pki / 'server.key')}"
                     f"  client_ca: {indented(pki / 'ca.crt')}  client_auth_type: VerifyClientCertIfGiven\n")
    try:
        with socket.create_connection(("127.0.0.1", exporter.port), timeout=5) as raw:
            with client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                served = s.getpeercert(binary_form=True)
        assert served == ssl.PEM_cert_to_DER_cert((pki / "server.crt").read_text())
        assert get(exporter.port, "/metrics", client_context(pki, "client"))[0] == 200
        assert get(exporter.port, "/metrics", client_context(pki))[0] == 200  # optional certificate
        assert refused(lambda: get(exporter.port, "/metrics", client_context(pki, "stranger")))
    finally:
        exporter.stop()


def negotiated(port: int, pki: Path, ciphers: str) -> str:
    ctx = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            cipher = s.cipher()
            assert cipher is not None  # the handshake is done
            return cipher[0]


@pytest.mark.e2e
@pytest.mark.parametrize("prefer, expected", [("true", "ECDHE-ECDSA-AES256-GCM-SHA384"),
                                              ("false", "ECDHE-ECDSA-AES128-GCM-SHA256")])
def test_cipher_actually_negotiated(pki, prefer, expected):
    # our certificates are ECDSA: the ECDSA twins of the reference's RSA suites
    exporter = start(pki, f"live-ciphers-{prefer}", TLS + "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,"
                     " TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n  max_version: TLS12\n"
                     f"  prefer_server_cipher_suites: {prefer}\n")
    try:  # the client prefers AES128; the server's list puts AES256 first
        assert negotiated(exporter.port, pki, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384") == expected
        assert negotiated(exporter.port, pki, "ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
        assert refused(lambda: negotiated(exporter.port, pki, "ECDHE-ECDSA-AES128-SHA"))  # not listed: no handshake
    finally:
        exporter.stop()


@pytest.mark.e2e
def test_curve_preferences_over_tls(pki):
    exporter = start(pki, "live-curves", TLS + "  min_version: TLS13\n  curve_preferences: [CurveP521, CurveP384]\n")

    def with_curve(curve: str) -> int:
        ctx = client_context(pki)
        ctx.set_ecdh_curve(curve)
        return get(exporter.port, "/metrics", ctx)[0]
    try:
        assert with_curve("secp521r1") == 200
        assert refused(lambda: with_curve("prime256v1"))  # not listed
        assert refused(lambda: with_curve("secp384r1"))  # listed second: Python's ssl offers only the first
        assert "only CurveP521 is used; not offered: CurveP384" in exporter.log()
    finally:
        exporter.stop()


@pytest.mark.e2e
def test_rate_limit_answers_429_after_the_burst_and_headers_are_served(pki):
    exporter = start(pki, "live-rate", TLS + "rate_limit:\n  interval: 1h\n  burst: 3\n"
                     "http_server_config:\n  headers:\n    X-XSS-Protection: 1\n    X-Frame-Options: deny\n")
    try:
        ctx = client_context(pki)
        answers = [get(exporter.port, "/metrics", ctx) for _ in range(5)]
        assert [a[0] for a in answers] == [200, 200, 200, 429, 429]
        assert answers[0][1]["X-XSS-Protection"] == "1" and answers[0][1]["X-Frame-Options"] == "deny"
        assert answers[3][2] == b"Too Many Requests\n"
        assert get(exporter.port, "/healthz", ctx)[0] in (200, 503)  # probes are neither counted nor refused
    finally:
        exporter.stop()


@pytest.mark.e2e
def test_wrong_protocol_on_either_port_is_answered_at_once(pki):
    tls = start(pki, "live-proto-tls", TLS)
    plain = start(pki, "live-proto-plain", "tls_server_config:\n  min_version: TLS13\n")  # TLS stays off
    try:
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", tls.port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_until_closed(s)
        assert answer == b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
        assert "TLS is off" in plain.log() and "listening on http://" in plain.log()
        with socket.create_connection(("127.0.0.1", plain.port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError):  # an answer that is not TLS, well before the 10 s head deadline
                client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1")
        assert time.monotonic() - began < 5
        assert get(tls.port, "/metrics", client_context(pki))[0] == 200
    finally:
        tls.stop()
        plain.stop()


def test_rate_limit_reload_takes_effect(pki, tmp_path):
    """A changed rate_limit applies without a restart (the bucket is replaced, not the process)."""
    path = tmp_path / "web.yml"
    path.write_text("rate_limit: {interval: 1h, burst: 1}\n")
    w = WebConfigWatcher(path)
    req = Request("GET", "/metrics", "/metrics", "", "HTTP/1.1", {}, "-")
    assert w.allow_request(req) and not w.allow_request(req)
    assert w.allow_request(Request("GET", "/healthz", "/healthz", "", "HTTP/1.1", {}, "-"))
    path.write_text("rate_limit: {interval: 1h, burst: 5}\n")
    w.request_reload()
    assert w.poll() and w.allow_request(req)


def test_rate_limit_is_per_client_address_and_per_verified_user(tmp_path):
    """Issue #22.7 (where we differ from exporter-toolkit, ratelimit.py): a flood spends only its own
    address's bucket; a verified user has its own, which no anonymous request can spend."""
    path = tmp_path / "web.yml"
    path.write_text("rate_limit: {interval: 1h, burst: 3}\n")
    w = WebConfigWatcher(path)

    def req(peer: str) -> Request:
        return Request("GET", "/metrics", "/metrics", "", "HTTP/1.1", {}, peer)
    for peer in (f"127.0.0.{i}" for i in range(2, 10)):
        assert [w.allow_request(req(peer)) for _ in range(1000)].count(True) == 3
    assert [w.allow_request(req("127.0.0.1")) for _ in range(4)] == [True, True, True, False]
    # the scraper verified (cached credentials): its own bucket, whatever its address spent
    assert [w.allow_request(req("127.0.0.1"), "prometheus") for _ in range(4)] == [True, True, True, False]
    assert not w.allow_request(req("127.0.0.2"), None)


def test_rate_limit_buckets_are_bounded():
    from exporter.web.ratelimit import KeyedBuckets, RateLimit

    buckets = KeyedBuckets(RateLimit(3600.0, 1), keys=100)
    assert all(buckets.allow(i) for i in range(10_000))
    assert len(buckets._buckets) == 100
    assert buckets.allow(9_999) is False  # recent keys keep their state


@pytest.mark.e2e
def test_real_prometheus_with_and_without_an_allowed_san(pki, tmp_path):
    """Prometheus's own Go TLS client presenting client certificates: the one whose certificate names an
    allowed SAN is up with data, the other (same CA) is down."""
    from tests.conftest import PrometheusServer

    exporter = start(pki, "live-prom-sans", TLS + "  client_auth_type: RequireAndVerifyClientCert\n"
                     "  client_ca_file: ca.crt\n  client_allowed_sans: [scraper.example.net]\n")
    target = [f"127.0.0.1:{exporter.port}"]

    def job(cert: str) -> list[str]:
        return ["scheme: https", "tls_config:", f"  ca_file: {pki}/ca.crt", f"  cert_file: {pki}/{cert}.crt",
                f"  key_file: {pki}/{cert}.key"]
    prom = PrometheusServer(tmp_path / "prom", {"allowed": target, "intruder": target},
                            job_settings={"allowed": job("by-dns"), "intruder": job("intruder")})
    try:
        assert prom.wait_for('up{job="allowed"} == 1', timeout=30)
        assert prom.wait_for('gpu_up{job="allowed",gpu="0"}', timeout=15)
        assert prom.wait_for('up{job="intruder"} == 0', timeout=15)
        assert not prom.query('gpu_up{job="intruder"}')
    finally:
        prom.stop()
        exporter.stop()
