"""`--web.config.file`: TLS and basic auth in the exporter-toolkit format Prometheus users already keep.

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
      client_ca_file: ca.crt
      min_version: TLS12             # TLS10..TLS13; default TLS12
      max_version: TLS13
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt, e.g. `htpasswd -nBC 10 prometheus`

Unknown keys and settings Python's TLS stack cannot honour (cipher_suites, RequestClientCert, ...) are
errors, not silently ignored, and so is a min_version this system's OpenSSL refuses to speak. The file
and the files it names are re-read when they change (checked every second) or on SIGHUP: certificates
rotated by cert-manager or a Secret update are served to new connections without a restart. A reload
builds a whole new SSL context and swaps it in (a removed client CA is no longer trusted); it runs on a
background thread, never on the server's loop. A broken update is logged once and the previous
configuration kept.

Basic auth: bcrypt is slow on purpose (~50-100 ms at cost 10), too slow for every scrape, so the last
password verified for each user is remembered as an HMAC under a per-process random key and compared in
constant time; bcrypt runs only when it differs. Unknown users cost one bcrypt check against a dummy hash
of the highest configured cost, so timing does not reveal which user names exist. Costs above
MAX_BCRYPT_COST are refused: one check at cost 31 would run for days. /healthz is exempt: kubelet probes carry no credentials, and it
reveals only whether the sampler is on schedule.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.httpd import Request, Response

log = logging.getLogger("exporter.webconfig")

_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
# exporter-toolkit settings with no faithful equivalent in Python's ssl module
_UNSUPPORTED = {"cipher_suites", "curve_preferences", "prefer_server_cipher_suites", "cert", "key", "client_ca",
                "client_allowed_sans"}
_ALLOWED_HEADERS = {"Strict-Transport-Security", "X-Frame-Options", "X-Content-Type-Options",
                    "X-XSS-Protection", "Content-Security-Policy"}
_BCRYPT = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")  # used with fullmatch: no trailing newline
MIN_BCRYPT_COST, MAX_BCRYPT_COST = 4, 14  # 14: about a second per check on one core
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")  # visible ASCII: what every HTTP client reads alike
MAX_FILE_BYTES = 1024 * 1024
_EXEMPT_PATHS = frozenset({"/healthz"})


class WebConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path
    key_file: Path
    verify_mode: ssl.VerifyMode
    client_ca_file: Path | None
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion | None


@dataclass(frozen=True)
class WebConfig:
    tls: TlsSettings | None
    users: dict[str, bytes]
    headers: tuple[tuple[str, str], ...]


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: want a mapping, got {type(value).__name__}")
    return value


def _string(doc: dict, key: str, where: str, default: str | None = None) -> str | None:
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"{where}.{key}: want a non-empty string, got {type(value).__name__} {value!r:.40}")
    return value


def _check_keys(doc: dict, allowed: set[str], where: str) -> None:
    for key in doc:
        if key in _UNSUPPORTED:
            raise WebConfigError(f"{where}.{key} is not supported by this exporter (Python's TLS stack); remove it")
        if key not in allowed:
            raise WebConfigError(f"{where}: unknown key {key!r}")


def parse_web_config(text: str, base_dir: Path) -> WebConfig:
    import yaml  # only needed with --web.config.file

    try:
        doc = _mapping(yaml.safe_load(text), "web config")
    except yaml.YAMLError as exc:
        raise WebConfigError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return _parse(doc, base_dir)
    except WebConfigError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:  # a value of a shape no check above foresaw
        raise WebConfigError(f"unexpected value: {exc}") from None


def _parse(doc: dict, base_dir: Path) -> WebConfig:
    _check_keys(doc, {"tls_server_config", "basic_auth_users", "http_server_config"}, "web config")

    tls = None
    tls_doc = _mapping(doc.get("tls_server_config"), "tls_server_config")
    if tls_doc:
        _check_keys(tls_doc, {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
                              "max_version"}, "tls_server_config")
        cert_file, key_file = (_string(tls_doc, key, "tls_server_config") for key in ("cert_file", "key_file"))
        if cert_file is None or key_file is None:
            raise WebConfigError(f"tls_server_config.{'cert_file' if cert_file is None else 'key_file'} is required")
        auth_type = _string(tls_doc, "client_auth_type", "tls_server_config", "NoClientCert")
        if auth_type not in _CLIENT_AUTH:
            hint = " (Python's TLS stack cannot request a certificate without verifying it)" \
                if auth_type in ("RequestClientCert", "RequireAnyClientCert") else ""
            raise WebConfigError(f"tls_server_config.client_auth_type {auth_type!r}: want one of "
                                 f"{', '.join(_CLIENT_AUTH)}{hint}")
        ca = _string(tls_doc, "client_ca_file", "tls_server_config")
        if _CLIENT_AUTH[auth_type] != ssl.CERT_NONE and not ca:
            raise WebConfigError(f"tls_server_config.client_ca_file is required with client_auth_type {auth_type}")
        if ca and _CLIENT_AUTH[auth_type] == ssl.CERT_NONE:
            raise WebConfigError("tls_server_config.client_ca_file is set but client_auth_type is NoClientCert: "
                                 "set VerifyClientCertIfGiven or RequireAndVerifyClientCert")
        versions = []
        for key, default in (("min_version", "TLS12"), ("max_version", None)):
            v = _string(tls_doc, key, "tls_server_config", default)
            if v is not None and v not in _TLS_VERSIONS:
                raise WebConfigError(f"tls_server_config.{key} {v!r}: want one of {', '.join(_TLS_VERSIONS)}")
            versions.append(_TLS_VERSIONS[v] if v else None)
        minimum = versions[0] or ssl.TLSVersion.TLSv1_2  # an explicit null means the default
        if versions[1] is not None and versions[1] < minimum:
            raise WebConfigError("tls_server_config.max_version is below min_version")
        tls = TlsSettings(base_dir / cert_file, base_dir / key_file, _CLIENT_AUTH[auth_type],
                          base_dir / ca if ca else None, minimum, versions[1])

    users: dict[str, bytes] = {}
    for user, hashed in _mapping(doc.get("basic_auth_users"), "basic_auth_users").items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"basic_auth_users: {user!r:.40} is not a user name")
        m = _BCRYPT.fullmatch(hashed) if isinstance(hashed, str) else None
        if m is None:
            raise WebConfigError(f"basic_auth_users.{user}: not a bcrypt hash (make one with htpasswd -nBC 10 {user})")
        if not MIN_BCRYPT_COST <= int(m.group(1)) <= MAX_BCRYPT_COST:
            raise WebConfigError(f"basic_auth_users.{user}: bcrypt cost {int(m.group(1))}: want "
                                 f"{MIN_BCRYPT_COST}..{MAX_BCRYPT_COST} (each check at cost N takes 2^N rounds)")
        users[user] = hashed.encode()

    http_doc = _mapping(doc.get("http_server_config"), "http_server_config")
    _check_keys(http_doc, {"headers", "http2"}, "http_server_config")
    headers = []
    for name, value in _mapping(http_doc.get("headers"), "http_server_config.headers").items():
        if name not in _ALLOWED_HEADERS:
            raise WebConfigError(f"http_server_config.headers: {name!r} is not one of {', '.join(sorted(_ALLOWED_HEADERS))}")
        if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            raise WebConfigError(f"http_server_config.headers.{name}: want one line of plain ASCII (no "
                                 f"typographic quotes or control characters), got {value!r:.60}")
        headers.append((name, value))
    return WebConfig(tls, users, tuple(headers))


def load_web_config(path: str | Path) -> WebConfig:
    from exporter.sources.kernfile import open_regular  # here: the health check imports this module, not sources

    path = Path(path)
    try:  # open_regular: a FIFO here would block start-up (or the reload thread) until a writer came
        with os.fdopen(open_regular(path), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise WebConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise WebConfigError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebConfigError(f"{path} is not UTF-8 (byte {exc.start})") from None
    return parse_web_config(text, path.parent)


def build_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A new server context from the settings: built whole on every (re)load and swapped in, never a
    live one changed. The one place to add TLS settings (cipher suites, inline PEM, ...)."""
    from exporter.sources.kernfile import check_regular  # here: the health check imports this module, not sources

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.min_version
    ctx.maximum_version = tls.max_version or ssl.TLSVersion.MAXIMUM_SUPPORTED
    for file in (tls.cert_file, tls.key_file, tls.client_ca_file):
        try:  # OpenSSL opens these itself, blocking: a FIFO would hang start-up or the reload thread
            if file is not None:
                check_regular(file)
        except FileNotFoundError:
            raise WebConfigError(f"tls_server_config: cannot read {file}") from None
        except OSError as exc:
            raise WebConfigError(f"tls_server_config: cannot read {file}: {exc.strerror}") from None
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except FileNotFoundError as exc:
        raise WebConfigError(f"tls_server_config: cannot read {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise WebConfigError(f"tls_server_config: cannot load {tls.cert_file} with {tls.key_file}: "
                             f"{getattr(exc, 'reason', None) or exc}") from None
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise WebConfigError(f"tls_server_config: cannot load client_ca_file {tls.client_ca_file}: "
                                 f"{getattr(exc, 'reason', None) or exc.strerror or exc}") from None
    ctx.verify_mode = tls.verify_mode
    if tls.min_version < ssl.TLSVersion.TLSv1_2 and not _speaks(tls, tls.min_version):
        name = next(k for k, v in _TLS_VERSIONS.items() if v == tls.min_version)
        raise WebConfigError(f"tls_server_config.min_version {name}: this system's OpenSSL "
                             f"({ssl.OPENSSL_VERSION}) refuses that version at its security level; use TLS12")
    return ctx


def _speaks(tls: TlsSettings, version: ssl.TLSVersion) -> bool:
    """Whether a handshake at exactly `version` succeeds with this certificate (in memory, no network):
    setting minimum_version is accepted even where OpenSSL's security level then refuses the version."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls.cert_file, tls.key_file)
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


class BasicAuth:
    def __init__(self, users: dict[str, bytes]) -> None:
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self.set_users(users)

    def set_users(self, users: dict[str, bytes]) -> None:
        """Slow (one bcrypt hash at the configured cost): call it off the event loop."""
        if users:
            import bcrypt  # only needed when basic_auth_users is configured

            self._bcrypt = bcrypt
            # checked against for unknown users, so they cost what the dearest known one costs
            cost = max(int(h.split(b"$")[2]) for h in users.values())
            self._dummy = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=cost))
        with self._lock:
            self.users = dict(users)
            self._verified: dict[str, bytes] = {}  # user -> HMAC of the last password bcrypt accepted

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def exempt(self, request: Request) -> bool:
        return not self.users or request.path in _EXEMPT_PATHS

    @staticmethod
    def _credentials(request: Request) -> tuple[str, bytes] | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return None
        if not sep:
            return None
        return user.decode("utf-8", "replace"), password

    def user(self, request: Request) -> str:
        creds = self._credentials(request)
        return creds[0] if creds else ""

    def _mac(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._key, user.encode() + b"\0" + password, hashlib.sha256).digest()

    def check_cached(self, request: Request) -> bool | None:
        creds = self._credentials(request)
        if creds is None:
            return False
        user, password = creds
        with self._lock:
            known = self._verified.get(user)
        if known is not None and hmac.compare_digest(known, self._mac(user, password)):
            return True
        return None

    def check(self, request: Request) -> bool:
        creds = self._credentials(request)
        if creds is None:
            return False
        user, password = creds
        with self._lock:
            hashed = self.users.get(user)
        try:
            ok = self._bcrypt.checkpw(password, hashed or self._dummy) and hashed is not None
        except ValueError:  # a password bcrypt refuses (e.g. over 72 bytes in bcrypt >= 5)
            ok = False
        if ok:
            with self._lock:
                if self.users.get(user) == hashed:
                    self._verified[user] = self._mac(user, password)
        return ok

    def challenge(self) -> Response:
        return Response(401, b"unauthorized\n", headers=(("WWW-Authenticate", 'Basic realm="gpu-telemetry-exporter"'),))


class WebConfigWatcher:
    """Holds the live configuration and re-reads the files when their stat signature changes or a reload
    is asked for (SIGHUP). `poll` blocks (YAML, certificates, bcrypt): the server runs it off its loop;
    what the loop reads (`tls_context`, `headers`) is swapped by single assignments."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = load_web_config(self.path)
        self.ssl_context = build_tls_context(self.config.tls) if self.config.tls else None
        self.auth = BasicAuth(self.config.users)
        self._signature = self._stat()
        self._failed: str | None = None
        self._forced = threading.Event()

    def _files(self) -> list[Path]:
        tls = self.config.tls
        files = [self.path]
        if tls is not None:
            files += [tls.cert_file, tls.key_file] + ([tls.client_ca_file] if tls.client_ca_file else [])
        return files

    def _stat(self) -> tuple:
        sig: list[tuple[int, int, int] | None] = []
        for f in self._files():
            try:
                st = os.stat(f)
                sig.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append(None)
        return tuple(sig)

    def tls_context(self) -> ssl.SSLContext | None:
        return self.ssl_context

    def headers(self) -> tuple[tuple[str, str], ...]:
        return self.config.headers

    def request_reload(self) -> None:
        """Reload at the next poll even if no file changed (safe from a signal handler)."""
        self._forced.set()

    def poll(self) -> bool:
        """Reload when a file changed or a reload was asked for; True when a new configuration took effect."""
        signature = self._stat()
        forced = self._forced.is_set()
        self._forced.clear()
        if signature == self._signature and not forced:
            return False
        self._signature = signature
        try:
            new = load_web_config(self.path)
            if (new.tls is None) != (self.ssl_context is None):
                raise WebConfigError("turning TLS on or off needs a restart")
            context = build_tls_context(new.tls) if new.tls is not None else None
        except WebConfigError as exc:
            if str(exc) != self._failed or forced:
                log.error("web config %s not reloaded, keeping the previous one: %s", self.path, exc)
                self._failed = str(exc)
            return False
        self._failed = None
        if new.users != self.config.users:
            self.auth.set_users(new.users)
        self.ssl_context = context
        self.config = new
        self._signature = self._stat()
        log.info("web config %s reloaded", self.path)
        return True
