"""`python -m exporter.healthcheck`: exit 0 when the local exporter's /healthz answers 200.

For the container HEALTHCHECK, which cannot rely on curl being in the image. Follows the exporter's own
environment: the listen address and, with a web config that turns TLS on, HTTPS (the certificate is
not verified: this only talks to the exporter beside it; /healthz needs no basic-auth credentials).
With client_auth_type RequireAndVerifyClientCert the handshake needs a client certificate this check
does not have: use a TCP check there (docs/operations.md).
"""
from __future__ import annotations

import os
import ssl
import sys
import urllib.request

from exporter.environment import env_name
from exporter.web.listen import ListenAddressError, parse_listen_address
from exporter.web.config import WebConfigError, load_web_config


def main() -> int:
    try:
        listen = os.environ.get(env_name("--web.listen-address"), ":9445")
        host, port = parse_listen_address(listen)
    except ListenAddressError as exc:
        print(f"healthcheck: {env_name('--web.listen-address')}={listen!r}: {exc}", file=sys.stderr)
        return 1
    if host in ("", "::", "0.0.0.0"):
        host = "127.0.0.1"
    context = None
    config_file = os.environ.get(env_name("--web.config.file"), "")
    if config_file:
        try:
            tls = load_web_config(config_file).tls
        except WebConfigError as exc:
            print(f"healthcheck: {config_file}: {exc}", file=sys.stderr)
            return 1
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    scheme = "https" if context else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    # No proxy: the exporter is beside us, and HTTP_PROXY in a pod's environment would send this elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=2) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
