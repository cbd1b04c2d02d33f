#!/usr/bin/env python3
"""What a connect costs the exporter at its connection cap (the admission policy, exporter/web/admission.py).

    .venv/bin/python bench/admission.py [--connects 3000]    # ~10 s; prints, writes nothing

Two figures. flood: an HTTP server (exporter/web/httpd.py, --web.max-connections 512, its reserve of 16) in
a child process, filled with silent connections, then `--connects` more silent ones in bursts of 200,
0.3 s apart, so each newcomer evicts one past its grace: the server process's CPU time per connect.
ranking: the policy alone choosing a victim among 512 fake connections (all past their grace; all
within it, where none qualifies and the newcomer waits): microseconds per newcomer.
"""
from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import time
import timeit
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.web.admission import Admission, ConnState  # noqa: E402
from exporter.web.httpd import HttpServer, Limits, Request, Response  # noqa: E402
from exporter.web.server import bind  # noqa: E402

CAP = 512


class _App:
    def inline(self, request: Request) -> Response | None:
        return Response(200, b"ok\n")

    def handle(self, request: Request) -> Response:
        return Response(200, b"ok\n")


def _serve(addresses: multiprocessing.Queue) -> None:
    server = HttpServer(bind("127.0.0.1:0"), _App(), Limits(max_connections=CAP))
    addresses.put(server.server_address[:2])
    server.serve_forever()


def flood(connects: int) -> float:
    """Server CPU milliseconds per silent connect at the cap."""
    addresses: multiprocessing.Queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=_serve, args=(addresses,), daemon=True)
    child.start()
    try:
        address = addresses.get(timeout=10)
        proc = psutil.Process(child.pid)
        held = [socket.create_connection(address) for _ in range(CAP + Limits().reserve_connections)]
        time.sleep(0.5)  # past their grace
        before = sum(proc.cpu_times()[:2])
        for i in range(connects):
            held.append(socket.create_connection(address))
            if i % 200 == 199:
                time.sleep(0.3)
        time.sleep(1.0)  # the last probations end
        spent = sum(proc.cpu_times()[:2]) - before
        for s in held:
            s.close()
        return spent / connects * 1000
    finally:
        child.terminate()
        child.join(5)


@dataclass(eq=False)
class _Fake:
    since: float
    state: ConnState = ConnState.IDLE
    fresh: bool = True
    closed: bool = False
    stalled: bool = False
    sending: bytes | None = None

    def unread(self) -> bool:
        return False


def ranking(past_grace: bool, number: int = 2000) -> float:
    """Microseconds for the policy to rank 512 silent connections for a silent newcomer."""
    now = 1000.0
    policy: Admission[_Fake] = Admission(Limits(max_connections=CAP), clock=lambda: now)
    start = now - 1.0 if past_grace else now
    for i in range(CAP):
        policy.placed[_Fake(since=start + i * 1e-6)] = None
    return timeit.timeit(lambda: policy._evictable(policy.placed, spoken=False), number=number) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=3000)
    args = parser.parse_args()
    if args.connects < 1:
        parser.error("--connects must be at least 1")
    print(f"flood    {args.connects} silent connects at --web.max-connections {CAP}: "
          f"{flood(args.connects):.3f} ms server CPU per connect")
    print(f"ranking  {CAP} silent past their grace: {ranking(True):.0f} us per newcomer; "
          f"within it: {ranking(False):.0f} us")


if __name__ == "__main__":
    main()
