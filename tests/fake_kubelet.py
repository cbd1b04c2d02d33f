"""A stand-in kubelet for tests: a real grpcio server serving v1.PodResourcesLister/List on a unix socket.

In the test process:   FakeKubelet(path).set({...}); ...; .stop()
As a process (so a test can SIGKILL it, or an exporter under test can outlive pytest's threads):
    python tests/fake_kubelet.py --socket PATH --state FILE.json   (the state file is re-read on each List)
    python tests/fake_kubelet.py --socket PATH --announce BYTES    (HostileKubelet: a huge reply of zeros)

Allocations are {"namespace/pod/container": {"nvidia.com/gpu": ["GPU-...", ...]}}.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
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


class FloodServer:
    """Answers with the HTTP/2 server preface, then the same frame (a PING, by default) for as long as the
    client reads: each is valid HTTP/2 that costs the client CPU to parse and answer."""

    PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"

    def __init__(self, path: str | Path, frame: bytes = PING) -> None:
        self.path = str(path)
        self._blob = frame * (65536 // len(frame))
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._flood, args=(conn,), daemon=True).start()

    def _flood(self, conn: socket.socket) -> None:
        threading.Thread(target=self._drain, args=(conn,), daemon=True).start()
        with conn:
            try:
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS, empty
                while not self._stop.is_set():
                    conn.sendall(self._blob)
            except OSError:
                pass

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        os.unlink(self.path)


class HostileKubelet:
    """A gRPC server (HTTP/2 from the h2 library, as grpclib's) that answers each List with a message whose
    5-byte prefix announces `announce` bytes, then streams zeros as fast as flow control lets it, for as long
    as the client reads (a 4 GB reply never ends). With `announce` None it behaves: `allocations` answered
    as a real kubelet would, grpc-status 0 in the trailers.
    """

    CHUNK = bytes(16384)

    def __init__(self, path: str | Path, announce: int | None, allocations: Allocations | None = None) -> None:
        self.path = str(path)
        self.announce = announce
        self.allocations: Allocations = allocations or {}
        self.calls = 0
        self.sent = 0  # bytes of message (prefix included) sent, all calls together
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events

        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        conn.settimeout(0.5)
        replies: dict[int, tuple[memoryview, int]] = {}  # stream -> (what is left of a finite body, zeros left)
        try:
            conn.sendall(h2c.data_to_send())
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    data = None
                if data == b"":
                    return
                for event in h2c.receive_data(data) if data else ():
                    if isinstance(event, h2.events.RequestReceived):
                        self.calls += 1
                        h2c.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                        if self.announce is None:
                            body = response(self.allocations).SerializeToString()
                            replies[event.stream_id] = (memoryview(struct.pack(">?I", False, len(body)) + body), 0)
                        else:
                            announce = min(self.announce, 0xFFFFFFFF)  # the most 4 bytes can say
                            replies[event.stream_id] = (memoryview(struct.pack(">?I", False, announce)), announce)
                    elif isinstance(event, h2.events.StreamReset):
                        replies.pop(event.stream_id, None)
                    elif isinstance(event, h2.events.DataReceived):
                        h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                for stream_id, (head, zeros) in list(replies.items()):
                    replies[stream_id] = self._push(h2c, stream_id, head, zeros)
                    if not replies[stream_id][0] and not replies[stream_id][1]:
                        del replies[stream_id]
                        h2c.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
                conn.sendall(h2c.data_to_send())
        except (OSError, Exception):  # the client hung up or reset: this connection is over
            return
        finally:
            conn.close()

    def _push(self, h2c, stream_id: int, head: memoryview, zeros: int) -> tuple[memoryview, int]:
        """Sends what the flow-control windows allow (at most 1 MiB a round); returns what is left."""
        budget = min(h2c.local_flow_control_window(stream_id), 1 << 20)
        frame = h2c.max_outbound_frame_size
        while budget > 0 and (head or zeros):
            if head:
                n = min(len(head), budget, frame)
                h2c.send_data(stream_id, head[:n].tobytes())
                head = head[n:]
            else:
                n = min(zeros, budget, frame, len(self.CHUNK))
                h2c.send_data(stream_id, self.CHUNK[:n] if n < len(self.CHUNK) else self.CHUNK)
                zeros -= n
            budget -= n
            self.sent += n
        return head, zeros

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        os.unlink(self.path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--state", type=Path)
    p.add_argument("--announce", type=int, help="serve HostileKubelet: each reply announces BYTES of zeros")
    a = p.parse_args()
    if a.announce is not None:
        kubelet: FakeKubelet | HostileKubelet = HostileKubelet(a.socket, a.announce)
    else:
        kubelet = FakeKubelet(a.socket, state_file=a.state)
    print("serving", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    kubelet.stop()
    if isinstance(kubelet, HostileKubelet):
        print("sent", kubelet.sent, flush=True)  # for tests that run it in its own process


if __name__ == "__main__":
    main()
