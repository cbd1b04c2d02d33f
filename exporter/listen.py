"""--web.listen-address: [host]:port, parsed without importing the server (the health check uses it)."""
from __future__ import annotations


class ListenAddressError(ValueError):
    pass


def parse_listen_address(value: str) -> tuple[str, int]:
    """':9445', '127.0.0.1:9445', '[::1]:9445', 'localhost:9445' -> (host, port); '' host = all."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ListenAddressError(f"invalid --web.listen-address {value!r}: want [host]:port, e.g. :9445")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ListenAddressError(f"invalid --web.listen-address {value!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenAddressError(f"invalid --web.listen-address {value!r}: put IPv6 hosts in brackets")
    return host, port
