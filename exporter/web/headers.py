"""The web config's `http_server_config.headers`: the response headers a user may add, as in
exporter-toolkit (web/handler.go): only these names, and for two of them only these exact values."""
from __future__ import annotations

import re

from exporter.web import yamltext

WHERE = "http_server_config.headers"

# name -> allowed values (exact, case-sensitive, as exporter-toolkit compares); () = any one-line value
ALLOWED: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_MAX_VALUE = 4096
_VALUE = re.compile(r"[\t\x20-\x7e]*")  # visible ASCII: what every HTTP client reads alike


def parse_headers(doc: dict) -> tuple[tuple[str, str], ...]:
    """The headers mapping (from yamltext.load: values as written) -> (name, value) pairs. Raises
    ValueError with a one-line message."""
    headers = []
    for name in doc:
        if name not in ALLOWED:
            raise ValueError(f"{WHERE}: HTTP header {name!r} can not be configured "
                             f"(want one of {', '.join(ALLOWED)})")
        value = yamltext.text(doc, name)
        if value is None:
            raise ValueError(f"{WHERE}.{name}: want a string value")
        if len(value) > _MAX_VALUE or not _VALUE.fullmatch(value):
            raise ValueError(f"{WHERE}.{name}: want one line of plain ASCII (no typographic quotes or "
                             f"control characters, at most {_MAX_VALUE}), got {value!r:.60}")
        allowed = ALLOWED[name]
        if allowed and value not in allowed:
            raise ValueError(f"{WHERE}: invalid value for {name}. Expected one of: "
                             f"{', '.join(repr(v) for v in allowed)}, but got: {value!r}")
        headers.append((name, value))
    return tuple(headers)
