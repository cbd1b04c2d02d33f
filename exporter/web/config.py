"""`--web.config.file`: TLS, basic auth, headers and a rate limit in the exporter-toolkit format Prometheus
users already keep for node_exporter; the same file works here (docs/operations.md has the key-by-key table).

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file; or inline PEM in cert:/key:
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
      client_ca_file: ca.crt         # or client_ca: PEM; neither: the system's roots
      client_allowed_sans: [scraper.example.net]
      min_version: TLS12             # TLS10..TLS13; default TLS12
      cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]   # Go's names; TLS 1.2 and below
      curve_preferences: [X25519]
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}
    rate_limit: {interval: 1s, burst: 10}
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt, e.g. `htpasswd -nBC 10 prometheus`

Each section's rules live beside it: tlsconfig.py, headers.py, ratelimit.py. Unknown keys are errors,
and so are settings Python's TLS stack cannot honour (RequestClientCert, RequireAnyClientCert) and a
min_version this system's OpenSSL refuses to speak; what is honoured only in part (several curves) is a
line in the log at start-up (`notes`). The file and the files it names are re-read when they change
(checked every second) or on SIGHUP: certificates rotated by cert-manager or a Secret update are served
to new connections without a restart. A reload builds a whole new SSL context and swaps it in (a removed
client CA is no longer trusted); it runs on a background thread, never on the server's loop. A broken
update is logged once and the previous configuration kept.

Reloads fail closed: one that would turn off basic auth, TLS or required client certificates that are on
now is refused with a WARNING and the old configuration keeps serving (an empty file, or `basic_auth_users:`
alone, is what a non-atomic rewrite leaves half-way). Turning them off takes a restart with the new file.
Every reload that changes who may read (users, passwords, client CA, client_auth_type, allowed SANs) is a
WARNING naming what changed, never a hash. `status()` feeds exporter_web_config_last_reload_successful.

Basic auth: bcrypt is slow on purpose (~50-100 ms at cost 10), too slow for every scrape, so the last
password verified for each user is remembered as an HMAC under a per-process random key and compared in
constant time; bcrypt runs only when it differs. Unknown users cost one bcrypt check against a dummy hash
of the highest configured cost, so timing does not reveal which user names exist. Costs above
MAX_BCRYPT_COST are refused: one check at cost 31 would run for days. /healthz is exempt (from the rate
limit too): kubelet probes carry no credentials, and it reveals only whether the sampler is on schedule.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exporter.web import tlsconfig
from exporter.web.httpd import Request, Response
from exporter.web.ratelimit import KeyedBuckets, RateLimit, parse_rate_limit
from exporter.web.tlsconfig import TlsSettings
from exporter.web.headers import parse_headers

log = logging.getLogger("exporter.web.config")

_EXEMPT_PATHS = frozenset({"/healthz"})  # neither authenticated nor rate-limited
_BCRYPT = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")  # used with fullmatch: no trailing newline
MIN_BCRYPT_COST, MAX_BCRYPT_COST = 4, 14  # 14: about a second per check on one core
MAX_FILE_BYTES = 1024 * 1024
_GOOD_PEERS = 256  # client addresses remembered for having logged in (their first logins rank first)
_BUCKETS = 4096  # rate_limit buckets kept (per verified user and per client address), least recent dropped


class WebConfigError(ValueError):
    pass


@dataclass(frozen=True)
class WebConfig:
    tls: TlsSettings | None
    users: dict[str, bytes]
    headers: tuple[tuple[str, str], ...]
    rate_limit: RateLimit | None = None
    notes: tuple[str, ...] = ()  # settings only partly honoured: one line each for the log at start-up


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: want a mapping, got {type(value).__name__}")
    return value


def _check_keys(doc: dict, allowed: set[str], where: str) -> None:
    for key in doc:
        if key not in allowed:
            raise WebConfigError(f"{where}: unknown key {key!r}")


def parse_web_config(text: str, base_dir: Path) -> WebConfig:
    import yaml  # only needed with --web.config.file

    from exporter.web import yamltext

    try:
        doc = _mapping(yamltext.load(text), "web config")
    except yaml.YAMLError as exc:
        raise WebConfigError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return _parse(doc, base_dir)
    except WebConfigError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:  # the sections' own one-line errors, and any
        raise WebConfigError(str(exc) if isinstance(exc, ValueError) else f"unexpected value: {exc}") from None


def _parse(doc: dict, base_dir: Path) -> WebConfig:
    _check_keys(doc, {"tls_server_config", "basic_auth_users", "http_server_config", "rate_limit"}, "web config")
    notes = []
    tls_doc = _mapping(doc.get(tlsconfig.SECTION), tlsconfig.SECTION)
    tls = tlsconfig.parse_tls_server_config(tls_doc, base_dir)
    if tls is not None:
        notes += tls.notes()
    elif tls_doc:
        notes.append(f"{tlsconfig.SECTION} names no certificate, key, client CA or client_auth_type, so TLS is "
                     "off and this exporter serves plain HTTP (as exporter-toolkit does)")

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
    _check_keys(http_doc, {"headers", "http2"}, "http_server_config")  # http2: we serve HTTP/1.1 only
    headers = parse_headers(_mapping(http_doc.get("headers"), "http_server_config.headers"))
    rate_limit = parse_rate_limit(_mapping(doc.get("rate_limit"), "rate_limit"))
    return WebConfig(tls, users, headers, rate_limit, tuple(notes))


def load_web_config(path: str | Path) -> WebConfig:
    from exporter.sources.kernfile import read_regular  # here: the health check imports this module, not sources

    path = Path(path)
    try:
        data = read_regular(path, MAX_FILE_BYTES)
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
    live one changed (tlsconfig.py holds what each setting does)."""
    try:
        return tlsconfig.new_tls_context(tls)
    except ValueError as exc:
        raise WebConfigError(str(exc)) from None


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
            began = time.monotonic()
            self._dummy = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=cost))
            self._check_s = time.monotonic() - began  # what a check at that cost takes here
        with self._lock:
            self.users = dict(users)
            self._verified: dict[str, bytes] = {}  # user -> HMAC of the last password bcrypt accepted
            if not hasattr(self, "_good_peers"):  # kept across reloads: a rotated password logs in first
                self._good_peers: OrderedDict[str, None] = OrderedDict()

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

    def refusal_delay(self, request: Request) -> float | None:
        """For a user name that is not configured: how long to wait before refusing it without running
        bcrypt (a recent check's duration at the dearest cost, so timing does not tell the name is
        unknown); None when a real check is needed. Invented names thus cost no CPU and never wait in
        the check queue, whatever number of them and of addresses a guesser uses."""
        if self.user(request) in self.users:
            return None
        return self._check_s

    def rank(self, request: Request) -> int:
        """The password-check queue's order (fairqueue.py): 0 a configured user name from an address that
        has logged in before, 1 a configured user name, 2 anything else (not queued: refusal_delay)."""
        if self.user(request) not in self.users:
            return 2
        with self._lock:
            return 0 if request.peer in self._good_peers else 1

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
        began = time.monotonic()
        try:
            ok = self._bcrypt.checkpw(password, hashed or self._dummy) and hashed is not None
        except ValueError:  # a password bcrypt refuses (over 72 bytes in bcrypt >= 5), at once: a check it
            # accepts, its answer ignored, so this costs what a wrong password costs (else a fast 401 tells
            # the name exists, and the instant checks pull refusal_delay toward 0)
            with contextlib.suppress(ValueError):
                self._bcrypt.checkpw(password[:72], hashed or self._dummy)
            ok = False
        if hashed is not None and hashed[4:6] == self._dummy[4:6]:  # a check at the dummy's cost
            self._check_s = 0.8 * self._check_s + 0.2 * (time.monotonic() - began)
        if ok:
            with self._lock:
                if self.users.get(user) == hashed:
                    self._verified[user] = self._mac(user, password)
                self._good_peers[request.peer] = None
                self._good_peers.move_to_end(request.peer)
                if len(self._good_peers) > _GOOD_PEERS:
                    self._good_peers.popitem(last=False)
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
        self._buckets = KeyedBuckets(self.config.rate_limit, _BUCKETS) if self.config.rate_limit else None
        self._ca = _client_ca_digest(self.config.tls)
        self._last_ok, self._last_ok_time = True, time.time()
        self._signature = self._stat()
        self._failed: str | None = None
        self._forced = threading.Event()

    def _files(self) -> list[Path]:
        tls = self.config.tls
        files = [self.path]
        return files + (tls.files() if tls is not None else [])

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

    def notes(self) -> tuple[str, ...]:
        return self.config.notes

    def allow_peer(self, peercert: Callable[[], dict | None]) -> bool:
        """After a TLS handshake: whether the client's certificate names an allowed SAN (if that is set);
        the certificate is decoded only then."""
        tls = self.config.tls
        return tls is None or tls.allowed_sans is None or tlsconfig.allowed_peer(tls, peercert())

    def allow_request(self, request: Request, user: str | None = None) -> bool:
        """rate_limit: False when the request is over the budget (429). A verified user (its credentials
        already checked) spends its own bucket, anyone else its client address's (ratelimit.py says why)."""
        buckets = self._buckets
        if buckets is None or request.path in _EXEMPT_PATHS:
            return True
        return buckets.allow(("user", user) if user is not None else ("peer", request.peer))

    def status(self) -> tuple[bool, float]:
        """(whether the last reload took effect, Unix time of the last one that did or of the start)."""
        return self._last_ok, self._last_ok_time

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
            refusal = _weakens(self.config, new)
            if refusal is None and new.tls is not None and self.ssl_context is None:
                refusal = "turning TLS on needs a restart"
            context = build_tls_context(new.tls) if new.tls is not None and refusal is None else None
            ca = _client_ca_digest(new.tls)
        except WebConfigError as exc:
            self._refuse(str(exc), forced, logging.ERROR)
            return False
        if refusal is not None:
            self._refuse(refusal + "; restart the exporter to do that on purpose", forced, logging.WARNING)
            return False
        self._failed = None
        changes = _access_changes(self.config, new, self._ca != ca)
        if new.users != self.config.users:
            self.auth.set_users(new.users)
        if new.rate_limit != self.config.rate_limit:
            self._buckets = KeyedBuckets(new.rate_limit, _BUCKETS) if new.rate_limit else None
        for note in set(new.notes) - set(self.config.notes):
            log.warning("%s", note)
        files = self._files()
        self.ssl_context = context
        self.config = new
        self._ca = ca
        # The signature from before the read, so a rewrite landing while it was read is read again; a
        # new file the new config names (another certificate) is stat'ed now.
        self._signature = signature if self._files() == files else (signature[0], *self._stat()[1:])
        self._last_ok, self._last_ok_time = True, time.time()
        if changes:
            log.warning("web config %s reloaded; who may read changed: %s", self.path, "; ".join(changes))
        else:
            log.info("web config %s reloaded", self.path)
        return True

    def _refuse(self, why: str, forced: bool, level: int) -> None:
        """One line per distinct refusal (again on SIGHUP); the previous configuration keeps serving."""
        self._last_ok = False
        if why != self._failed or forced:
            log.log(level, "web config %s not reloaded, keeping the previous one: %s", self.path, why)
            self._failed = why


def _weakens(old: WebConfig, new: WebConfig) -> str | None:
    """Why `new` may not replace `old` by a reload (it removes protection that is on), or None."""
    reasons = []
    if old.users and not new.users:
        reasons.append("basic auth off (basic_auth_users is empty or missing)")
    if old.tls is not None and new.tls is None:
        reasons.append("TLS off (tls_server_config names no certificate)")
    elif old.tls is not None and new.tls is not None and old.tls.verify_mode == ssl.CERT_REQUIRED \
            and new.tls.verify_mode != ssl.CERT_REQUIRED:
        reasons.append("client certificates no longer required (client_auth_type)")
    return "it would turn " + " and ".join(reasons) if reasons else None


def _client_ca_digest(tls: TlsSettings | None) -> bytes | None:
    """A digest of the client CA bundle in force (to tell a changed one in the log); None without one."""
    if tls is None or tls.client_ca is None:
        return None
    try:
        return hashlib.sha256(tls.client_ca.read("client_ca_file")).digest()
    except ValueError as exc:
        raise WebConfigError(str(exc)) from None


_CLIENT_AUTH = {mode: name for name, mode in tlsconfig.CLIENT_AUTH.items()}


def _access_changes(old: WebConfig, new: WebConfig, ca_changed: bool) -> list[str]:
    """What a reload changes about who may read, by name only (never a hash or a key)."""
    changes = []
    added, removed = sorted(set(new.users) - set(old.users)), sorted(set(old.users) - set(new.users))
    changed = sorted(u for u in set(old.users) & set(new.users) if old.users[u] != new.users[u])
    for what, names in (("users added", added), ("users removed", removed), ("passwords changed", changed)):
        if names:
            changes.append(f"{what}: {', '.join(names)}")
    if old.tls is not None and new.tls is not None:
        if old.tls.verify_mode != new.tls.verify_mode:
            changes.append(f"client_auth_type {_CLIENT_AUTH[old.tls.verify_mode]} -> "
                           f"{_CLIENT_AUTH[new.tls.verify_mode]}")
        if ca_changed:
            changes.append("client CA changed")
        if old.tls.allowed_sans != new.tls.allowed_sans:
            def sans(s: frozenset[str] | None) -> str:
                return "any" if s is None else ", ".join(sorted(s)) or "none"
            changes.append(f"client_allowed_sans {sans(old.tls.allowed_sans)} -> {sans(new.tls.allowed_sans)}")
    return changes
