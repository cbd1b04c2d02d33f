"""--web.listen-address: [host]:port, parsed without importing the server (the health check uses it)."""
from __future__ import annotations


class ListenAddressError(ValueError):
    """What is wrong with the address; the caller names the flag or variable it came from."""


def parse_listen_address(value: str) -> tuple[str, int]:
    """':9445', '127.0.0.1:9445', '[::1]:9445', 'localhost:9445' -> (host, port); '' host = all."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ListenAddressError("want [host]:port, e.g. :9445")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ListenAddressError("port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenAddressError("put IPv6 hosts in brackets")
    return host, port
