"""TLS for one server connection as plain data in, plain data out (ssl.SSLObject over memory BIOs).

Why not asyncio's TLS transport (create_server(ssl=...) or loop.start_tls): its protocol allocates a
256 KiB read buffer per connection before the handshake starts, so idle or handshaking clients cost
~0.3 MB each, and it drops what the application writes once the client half-closes, so `printf ... |
openssl s_client` never gets its answer. Here the connection is a plain TCP connection, admitted and
timed like any other (the handshake runs under the header deadline and counts against the connection
cap), and TLS costs only what OpenSSL holds for the session: Python enables SSL_MODE_RELEASE_BUFFERS, so
an idle session keeps no record buffers.
"""
from __future__ import annotations

import ssl

_READ_CHUNK = 16 * 1024  # one TLS record's worth of plaintext per read() call


class TlsSession:
    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshaken = False
        self.peer_closed = False  # the client sent close_notify: no more data will come

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the network; returns the plaintext they completed. Raises ssl.SSLError when
        the client speaks bad TLS (or fails certificate verification)."""
        self._in.write(data)
        if not self.handshaken:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.handshaken = True
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def peercert(self) -> dict | None:
        """The client's verified certificate (decoded), None without one."""
        return self._ssl.getpeercert() or None

    def send(self, data: bytes) -> None:
        """Encrypt application data; take the bytes to send with `outgoing()`."""
        view = memoryview(data)
        while view:
            view = view[self._ssl.write(view):]

    def close(self) -> None:
        """Queue our close_notify (best effort: the connection is going away either way)."""
        try:
            self._ssl.unwrap()
        except ssl.SSLError:
            pass

    def outgoing(self) -> bytes:
        return self._out.read()
