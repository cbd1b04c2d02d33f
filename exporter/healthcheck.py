"""`python -m exporter.healthcheck`: exit 0 when the local exporter's /healthz answers 200.

For the container HEALTHCHECK, which cannot rely on curl being in the image.
"""
from __future__ import annotations

import os
import sys
import urllib.request

from exporter.cli import env_name
from exporter.server import parse_listen_address


def main() -> int:
    host, port = parse_listen_address(os.environ.get(env_name("--web.listen-address"), ":9445"))
    if host in ("", "::", "0.0.0.0"):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
