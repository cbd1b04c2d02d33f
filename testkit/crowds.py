"""Hostile crowds on keep-alive connections from several loopback addresses (issue #22): password
guessers inventing user names, unauthenticated floods, clients that send a bad request and vanish.

One asyncio loop on a thread drives every connection, so 64-512 clients cost the test one thread, not
hundreds. Linux routes all of 127.0.0.0/8 to loopback: binding the client side to 127.0.0.2..9 makes
each a distinct client address for the server, as guessers from several hosts are.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import secrets
import socket
import struct
import threading
import time
from typing import Callable

GUESSING_ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 10))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get_request(path: str = "/metrics", authorization: str | None = None) -> bytes:
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()


def guess() -> bytes:
    """A new invented user name and a wrong password, every time."""
    return get_request(authorization=basic(f"guess-{secrets.token_hex(6)}", secrets.token_hex(8)))


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server closes after it)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() == "close"


class KeepAliveCrowd:
    """`per_address` clients from each of `addresses`, each sending `make_request()` back to back on a
    keep-alive connection (a new one when the server closes it) until the block ends. `statuses` counts
    the answers; 'reset' the connections lost."""

    def __init__(self, port: int, make_request: Callable[[], bytes], addresses: tuple[str, ...] = GUESSING_ADDRESSES,
                 per_address: int = 8) -> None:
        self.port = port
        self.make_request = make_request
        self.clients = [a for a in addresses for _ in range(per_address)]
        self.statuses: collections.Counter = collections.Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: list[asyncio.Future] = []

    async def _client(self, address: str) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(address, 0))
            except OSError:
                self.statuses["refused"] += 1
                await asyncio.sleep(0.05)
                continue
            try:
                while True:
                    writer.write(self.make_request())
                    status, close = await _read_response(reader)
                    self.statuses[status] += 1
                    if close:
                        break
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.statuses["reset"] += 1
            finally:
                writer.close()

    def __enter__(self) -> KeepAliveCrowd:
        self._thread.start()
        for address in self.clients:
            self._tasks.append(asyncio.run_coroutine_threadsafe(self._client(address), self._loop))  # type: ignore[arg-type]
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        time.sleep(0.2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def timed_request(port: int, request: bytes, source: str = "127.0.0.1", timeout: float = 15.0) -> tuple[object, float]:
    """(status or the error's name, seconds) for one request on a new connection from `source`."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
            s.sendall(request)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return "closed", time.monotonic() - t0
                data += chunk
        return int(data.split()[1]), time.monotonic() - t0
    except OSError as exc:
        return type(exc).__name__, time.monotonic() - t0


BAD_REQUESTS = (
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",  # head too large: 431
    b"GET /metrics HTTP/1.1\r\n" + b"X-H: 1\r\n" * 150 + b"\r\n",  # too many header fields
    b"\x00\x01garbage\r\n\r\n",
    b"GET metrics HTTP/1.1\r\n\r\n",  # malformed target
    b"GET / HTTP/2.0\r\n\r\n",
    b"POST /metrics HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000,
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
)


def send_and_vanish(port: int, request: bytes, reset: bool) -> None:
    """Send a bad request and go away at once: with reset, an RST (SO_LINGER 0), else a FIN."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(request)
    except OSError:
        pass
