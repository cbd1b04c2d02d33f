"""The web config's `tls_server_config` as exporter-toolkit reads it, turned into a Python SSLContext.

Parity with exporter-toolkit (prometheus/exporter-toolkit web/tls_config.go), and where Python's `ssl`
module falls short, what we do instead:

- TLS is on when any of cert_file/cert, key_file/key, client_ca_file/client_ca or client_auth_type is
  set; a section with only versions, ciphers or curves leaves it off, as there.
- `cert`, `key`, `client_ca` (PEM in the YAML): loaded through memfd files, never written to disk (the
  image's root filesystem is read-only, and a key should not land on one anyway).
- Verify* client auth without a CA: the system's roots (Go uses them too).
- `cipher_suites`: Go's names (the ones `tls.CipherSuites()` lists) mapped to OpenSSL's; they govern TLS
  1.2 and below. TLS 1.3 names are accepted and, as in Go, change nothing: TLS 1.3 suites are not
  configurable. A list with only TLS 1.3 names leaves TLS 1.2 no suite, so it raises min_version to TLS13.
- `curve_preferences`: Python's ssl sets exactly one curve (`set_ecdh_curve`; there is no call for a
  list). One curve is honoured exactly; with several, the first is used and `notes()` says which were left
  out, for a line at start-up.
- `client_allowed_sans`: checked on the verified peer certificate once the handshake is done
  (`allowed_peer`); the server closes connections whose certificate names none of them.
- `RequestClientCert` / `RequireAnyClientCert`: Python's ssl cannot ask for a certificate without
  verifying it, so these are refused with that reason.

Section parsers raise ValueError with a one-line message; config.py turns it into WebConfigError.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SECTION = "tls_server_config"

TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
# accepted by exporter-toolkit ("RequireClientCert" is its old name for RequireAnyClientCert)
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

# Go's tls.CipherSuites() (the suites Go calls secure; others are "unknown cipher" there too) -> OpenSSL.
# None: a TLS 1.3 suite, which neither Go nor OpenSSL's cipher list lets a server choose.
CIPHER_SUITES: dict[str, str | None] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
MAX_PEM_BYTES = 1024 * 1024  # a CA bundle is ~200 KB; a wrong path (a log, /dev/zero) must not eat memory
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}

_KEYS = {"cert_file", "key_file", "cert", "key", "client_ca_file", "client_ca", "client_auth_type",
         "cipher_suites", "curve_preferences", "min_version", "max_version", "prefer_server_cipher_suites",
         "client_allowed_sans"}
# any of these set turns TLS on (exporter-toolkit's TLSConfig.IsEnabled)
_TURNS_TLS_ON = ("cert_file", "cert", "key_file", "key", "client_ca_file", "client_ca", "client_auth_type")
# the SAN kinds Go compares (DNSNames, EmailAddresses, IPAddresses, URIs), as Python's getpeercert names them
_SAN_KINDS = ("DNS", "email", "IP Address", "URI")


@dataclass(frozen=True)
class Pem:
    """A certificate, key or CA bundle: a file (re-read on every reload) or PEM text from the YAML."""

    path: Path | None = None
    text: str | None = field(default=None, repr=False)  # repr=False: an inline key is a secret

    def read(self, what: str) -> bytes:
        if self.path is None:
            return (self.text or "").encode()
        # Here, not at the top: the container health check imports this module, and must load no sources.
        from exporter.sources.kernfile import read_regular

        try:
            data = read_regular(self.path, MAX_PEM_BYTES)
        except OSError as exc:
            raise ValueError(f"{SECTION}: cannot read {what} {self.path}: {exc.strerror or exc}") from None
        if len(data) > MAX_PEM_BYTES:
            raise ValueError(f"{SECTION}: {what} {self.path} is larger than {MAX_PEM_BYTES} bytes")
        return data

    def describe(self, what: str) -> str:
        return f"{what} {self.path}" if self.path is not None else f"inline {what.removesuffix('_file')}"


@dataclass(frozen=True)
class TlsSettings:
    cert: Pem
    key: Pem
    verify_mode: ssl.VerifyMode
    client_ca: Pem | None  # None with a Verify* mode: the system's roots
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion | None
    ciphers: str | None = None  # OpenSSL cipher list for TLS <= 1.2; None: OpenSSL's defaults
    curve: str | None = None  # OpenSSL curve name; None: OpenSSL's defaults
    curves_left_out: tuple[str, ...] = ()
    prefer_server_ciphers: bool = True
    allowed_sans: frozenset[str] | None = None  # None: no SAN check

    def files(self) -> list[Path]:
        """Files whose change means a reload."""
        return [p.path for p in (self.cert, self.key, self.client_ca) if p is not None and p.path is not None]

    def notes(self) -> list[str]:
        """One line each for what is configured but only partly honoured, to log at start-up."""
        notes = []
        if self.curves_left_out:
            chosen = next(name for name, ossl in CURVES.items() if ossl == self.curve)
            notes.append(f"{SECTION}.curve_preferences: Python's ssl module offers one curve, so only {chosen} "
                         f"is used; not offered: {', '.join(self.curves_left_out)}")
        if self.verify_mode != ssl.CERT_NONE and self.client_ca is None:
            notes.append(f"{SECTION}: no client_ca_file or client_ca: client certificates are verified "
                         "against the system's CA roots")
        return notes


def _text(doc: dict, key: str) -> str:
    """A string setting; YAML scalars of other types are taken as written, as Go's yaml does (`0x10`, `yes`)."""
    from exporter.web import yamltext  # here: the container health check imports this module without PyYAML's cost

    value = doc.get(key)
    if isinstance(value, (dict, list)):
        raise ValueError(f"{SECTION}.{key}: want a string, got a {type(value).__name__}")
    return yamltext.text(doc, key) or ""


def _names(doc: dict, key: str) -> list[str] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{SECTION}.{key}: want a list of names")
    return value


def _pem(doc: dict, file_key: str, text_key: str, base_dir: Path) -> Pem | None:
    path, text = _text(doc, file_key), _text(doc, text_key)
    if path and text:
        raise ValueError(f"{SECTION}: both {file_key} and {text_key} are set; keep one")
    if path:
        return Pem(path=base_dir / path)
    return Pem(text=text) if text else None


def parse_tls_server_config(doc: dict, base_dir: Path) -> TlsSettings | None:
    """The section as a mapping (relative paths are relative to base_dir) -> settings, or None when it
    does not turn TLS on. Raises ValueError with a one-line message."""
    for key in doc:
        if key not in _KEYS:
            raise ValueError(f"{SECTION}: unknown key {key!r}")

    def version(key: str, default: str) -> str:
        name = _text(doc, key) or default  # null or absent: the default, as in Go
        if name and name not in TLS_VERSIONS:
            raise ValueError(f"{SECTION}.{key}: unknown TLS version: {name} (want one of {', '.join(TLS_VERSIONS)})")
        return name
    min_version = TLS_VERSIONS[version("min_version", "TLS12")]
    max_name = version("max_version", "")
    max_version = TLS_VERSIONS[max_name] if max_name else None
    if max_version is not None and max_version < min_version:
        raise ValueError(f"{SECTION}.max_version is below min_version")

    ciphers = None
    suites = _names(doc, "cipher_suites")
    if suites:
        for name in suites:
            if name not in CIPHER_SUITES:
                raise ValueError(f"{SECTION}.cipher_suites: unknown cipher: {name}")
        tls12 = [ossl for ossl in (CIPHER_SUITES[name] for name in suites) if ossl]
        if tls12:
            ciphers = ":".join(dict.fromkeys(tls12))
        elif max_version is not None and max_version < ssl.TLSVersion.TLSv1_3:
            raise ValueError(f"{SECTION}.cipher_suites lists only TLS 1.3 suites (not configurable) and "
                             "max_version is below TLS13: no suite is left for any client")
        else:  # no TLS 1.2 suite allowed: Go's handshake fails below TLS 1.3, and so will ours
            min_version = ssl.TLSVersion.TLSv1_3

    curve: str | None = None
    curves_left_out: tuple[str, ...] = ()
    curves = _names(doc, "curve_preferences")
    if curves:
        for name in curves:
            if name not in CURVES:
                raise ValueError(f"{SECTION}.curve_preferences: unknown curve: {name} "
                                 f"(want one of {', '.join(CURVES)})")
        curve = CURVES[curves[0]]
        curves_left_out = tuple(dict.fromkeys(c for c in curves[1:] if c != curves[0]))

    prefer = doc.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise ValueError(f"{SECTION}.prefer_server_cipher_suites: want true or false")

    sans = _names(doc, "client_allowed_sans")
    if not any(_text(doc, key) for key in _TURNS_TLS_ON):
        return None

    cert = _pem(doc, "cert_file", "cert", base_dir)
    if cert is None:
        raise ValueError(f"{SECTION}: missing one of cert or cert_file")
    key = _pem(doc, "key_file", "key", base_dir)
    if key is None:
        raise ValueError(f"{SECTION}: missing one of key or key_file")

    auth_type = _text(doc, "client_auth_type") or "NoClientCert"
    if auth_type in UNVERIFIED_CLIENT_AUTH:
        raise ValueError(f"{SECTION}.client_auth_type {auth_type}: not supported, Python's TLS stack cannot "
                         "request a certificate without verifying it; use VerifyClientCertIfGiven or "
                         "RequireAndVerifyClientCert with client_ca_file")
    if auth_type not in CLIENT_AUTH:
        raise ValueError(f"{SECTION}.client_auth_type: invalid ClientAuth: {auth_type} "
                         f"(want one of {', '.join(CLIENT_AUTH)})")
    verify_mode = CLIENT_AUTH[auth_type]
    client_ca = _pem(doc, "client_ca_file", "client_ca", base_dir)
    if client_ca is not None and verify_mode == ssl.CERT_NONE:
        raise ValueError(f"{SECTION}: client CA's have been configured without a Client Auth Policy "
                         "(set client_auth_type: RequireAndVerifyClientCert or VerifyClientCertIfGiven)")
    if sans is not None:
        if verify_mode == ssl.CERT_NONE:
            raise ValueError(f"{SECTION}.client_allowed_sans needs client_auth_type RequireAndVerifyClientCert "
                             "or VerifyClientCertIfGiven: without a client certificate there is no SAN to check")
        if not sans:
            raise ValueError(f"{SECTION}.client_allowed_sans is empty: no client could connect")

    return TlsSettings(cert, key, verify_mode, client_ca, min_version, max_version, ciphers, curve,
                       curves_left_out, prefer, frozenset(sans) if sans is not None else None)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` that exists only in memory (load_cert_chain wants paths, not text)."""
    fd = os.memfd_create("web-config-pem", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _no_passphrase() -> bytes:
    # without a callback OpenSSL would prompt on the terminal for an encrypted key
    raise ValueError("the private key is encrypted; exporter-toolkit reads only unencrypted keys, and so do we")


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    with _memory_file(cert) as cert_path, _memory_file(key) as key_path:
        ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)


def new_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A fresh server context for the settings; reads the certificate files. Raises ValueError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.min_version
    ctx.maximum_version = tls.max_version or ssl.TLSVersion.MAXIMUM_SUPPORTED
    cert, key = tls.cert.read("cert_file"), tls.key.read("key_file")
    try:
        _load_chain(ctx, cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{SECTION}: cannot load {tls.cert.describe('cert_file')} with "
                         f"{tls.key.describe('key_file')}: {_reason(exc)}") from None
    if tls.verify_mode != ssl.CERT_NONE:
        if tls.client_ca is None:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        else:
            try:
                ctx.load_verify_locations(cadata=tls.client_ca.read("client_ca_file").decode("ascii"))
            except (ssl.SSLError, ValueError) as exc:  # ValueError also covers non-ASCII bytes
                raise ValueError(f"{SECTION}: cannot load {tls.client_ca.describe('client_ca_file')}: "
                                 f"{_reason(exc)}") from None
        ctx.verify_mode = tls.verify_mode
    if tls.ciphers:
        ctx.set_ciphers(tls.ciphers)
    if tls.curve:
        ctx.set_ecdh_curve(tls.curve)
    if not tls.prefer_server_ciphers:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.min_version < ssl.TLSVersion.TLSv1_2 and not _speaks(cert, key, tls.min_version):
        name = next(k for k, v in TLS_VERSIONS.items() if v == tls.min_version)
        raise ValueError(f"{SECTION}.min_version {name}: this system's OpenSSL ({ssl.OPENSSL_VERSION}) refuses "
                         "that version at its security level; use TLS12")
    return ctx


def _speaks(cert: bytes, key: bytes, version: ssl.TLSVersion) -> bool:
    """Whether a handshake at exactly `version` succeeds with this certificate (in memory, no network):
    setting minimum_version is accepted even where OpenSSL's security level then refuses the version."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(server, cert, key)
    server.minimum_version = version
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.minimum_version = client.maximum_version = version
    pipes = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]
    c = client.wrap_bio(pipes[0][0], pipes[0][1])
    s = server.wrap_bio(pipes[1][0], pipes[1][1], server_side=True)
    try:
        for _ in range(10):
            done = 0
            for obj in (c, s):
                try:
                    obj.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            pipes[1][0].write(pipes[0][1].read())
            pipes[0][0].write(pipes[1][1].read())
            if done == 2:
                return True
    except ssl.SSLError:
        return False
    return False


def peer_sans(peercert: dict[str, Any] | None) -> set[str]:
    """The subject alternative names Go compares, written as Go writes them (IPs in canonical form)."""
    names = set()
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind not in _SAN_KINDS:
            continue
        if kind == "IP Address":  # Python spells IPv6 out in full ("0:0:0:0:0:0:0:1"); Go compresses it
            with contextlib.suppress(ValueError):
                value = str(ipaddress.ip_address(value.strip()))
        names.add(value)
    return names


def allowed_peer(tls: TlsSettings, peercert: dict[str, Any] | None) -> bool:
    """After the handshake: may this client stay? Only when its certificate names an allowed SAN (when
    client_allowed_sans is set). A client without a certificate names none."""
    return tls.allowed_sans is None or not peer_sans(peercert).isdisjoint(tls.allowed_sans)
