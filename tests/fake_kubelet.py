"""A stand-in kubelet for tests: a real grpcio server serving v1.PodResourcesLister/List on a unix socket.

In the test process:   FakeKubelet(path).set({...}); ...; .stop()
As a process (so a test can SIGKILL it, or an exporter under test can outlive pytest's threads):
    python tests/fake_kubelet.py --socket PATH --state FILE.json   (the state file is re-read on each List)

Allocations are {"namespace/pod/container": {"nvidia.com/gpu": ["GPU-...", ...]}}.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from exporter.sources import podresources_v1_pb2 as pb

Allocations = dict[str, dict[str, list[str]]]


def response(allocations: Allocations) -> pb.ListPodResourcesResponse:
    pods: dict[tuple[str, str], pb.PodResources] = {}
    for key, resources in allocations.items():
        namespace, pod, container = key.split("/")
        entry = pods.setdefault((namespace, pod), pb.PodResources(name=pod, namespace=namespace))
        c = entry.containers.add(name=container, cpu_ids=[2, 3])
        c.memory.add(memory_type="memory", size=1 << 30)
        for resource_name, ids in resources.items():
            d = c.devices.add(resource_name=resource_name, device_ids=ids)
            d.topology.nodes.add(ID=0)
    return pb.ListPodResourcesResponse(pod_resources=list(pods.values()))


class FakeKubelet:
    def __init__(self, path: str | Path, allocations: Allocations | None = None,
                 state_file: Path | None = None) -> None:
        self.path = str(path)
        self.allocations: Allocations = allocations or {}
        self.state_file = state_file
        self.delay = 0.0  # seconds each List waits before answering (a hung kubelet)
        self.calls = 0
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler("v1.PodResourcesLister", {
            "List": grpc.unary_unary_rpc_method_handler(
                self._list, request_deserializer=pb.ListPodResourcesRequest.FromString,
                response_serializer=pb.ListPodResourcesResponse.SerializeToString)})
        self._server.add_generic_rpc_handlers((handler,))
        if self._server.add_insecure_port(f"unix:{self.path}") == 0:
            raise RuntimeError(f"cannot listen on {self.path}")
        self._server.start()

    def set(self, allocations: Allocations) -> None:
        self.allocations = allocations

    def _list(self, request: pb.ListPodResourcesRequest, context: grpc.ServicerContext) -> pb.ListPodResourcesResponse:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.state_file is not None:
            self.allocations = json.loads(self.state_file.read_text())
        return response(self.allocations)

    def stop(self) -> None:
        self._server.stop(grace=None)


class GarbageServer:
    """Accepts on a unix socket and answers whatever arrives with bytes that are not HTTP/2."""

    def __init__(self, path: str | Path, reply: bytes = b"HTTP/1.1 200 OK\r\n\r\n\xff\x00garbage" * 4) -> None:
        self.path = str(path)
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._reply = reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(65536)
                    conn.sendall(self._reply)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        os.unlink(self.path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--state", required=True, type=Path)
    a = p.parse_args()
    kubelet = FakeKubelet(a.socket, state_file=a.state)
    print("serving", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    kubelet.stop()


if __name__ == "__main__":
    main()
