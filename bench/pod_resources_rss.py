#!/usr/bin/env python3
"""RSS of the exporter (8 simulated GPUs) with the kubelet pod-resources feature off and on.

    .venv/bin/python bench/pod_resources_rss.py     # ~2 min; prints a table, writes bench/pod-resources-rss.json

Runs, each a fresh exporter process, each measured after `--scrapes` scrapes and at least 3 kubelet polls:
- off:               --kubernetes.pod-resources-socket ""
- absent:            the flag set, no socket there (no gRPC library imported: the default off Kubernetes)
- on (grpclib):      a stand-in kubelet (tests/fake_kubelet.py, grpcio) holding all 8 GPUs; the shipped client
- on (grpcio):       the same, with the exporter's client swapped for a grpcio one (only here, to compare)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from exporter.fake.nvml import fake_uuid  # noqa: E402
from testkit.processes import free_port, http_get, start_fake_kubelet, stop_process  # noqa: E402

GPUS = 8


class GrpcioClient:
    """The exporter's PodResourcesClient with grpcio underneath (for the comparison only)."""

    def __init__(self, socket_path: str) -> None:
        import grpc

        from exporter.sources import kubelet
        from exporter.sources import podresources_v1_pb2 as pb

        self._pb, self._holders = pb, kubelet.read_reply
        self._channel = grpc.insecure_channel(f"unix:{socket_path}", options=[
            ("grpc.max_receive_message_length", kubelet.MAX_RESPONSE_BYTES)])
        self._list = self._channel.unary_unary(kubelet.LIST_METHOD,
                                               request_serializer=pb.ListPodResourcesRequest.SerializeToString,
                                               response_deserializer=pb.ListPodResourcesResponse.FromString)

    async def list(self, timeout: float):
        call = lambda: self._list(self._pb.ListPodResourcesRequest(), timeout=timeout)  # noqa: E731
        return self._holders(await asyncio.get_running_loop().run_in_executor(None, call))

    def close(self) -> None:
        self._channel.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(name: str, socket_flag: str, grpcio: bool, scrapes: int) -> dict:
    import subprocess

    port = free_port()
    args = ["--fake-gpus", str(GPUS), "--web.listen-address", f"127.0.0.1:{port}",
            "--kubernetes.pod-resources-socket", socket_flag]
    if grpcio:
        argv = [sys.executable, __file__, "--as-exporter-with-grpcio", *args]
    else:
        argv = [sys.executable, "-m", "exporter", *args]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        body = b""
        while b"gpu_up{" not in body and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                body = http_get(f"http://127.0.0.1:{port}/metrics")[2]
            except OSError:
                pass
        on = bool(socket_flag) and Path(socket_flag).exists()
        if on:  # three polls (5 s apart) with the pods attributed
            time.sleep(11)
            body = http_get(f"http://127.0.0.1:{port}/metrics")[2]
            assert b"exporter_pod_resources_up 1.0" in body and body.count(b"\ngpu_pod_info{") == GPUS, name
        for _ in range(scrapes):
            http_get(f"http://127.0.0.1:{port}/metrics")
        return {"run": name, "rss_mb": round(rss_kib(proc.pid) * 1024 / 1e6, 1)}
    finally:
        stop_process(proc)


def main() -> None:
    if sys.argv[1:2] == ["--as-exporter-with-grpcio"]:
        from exporter import cli
        from exporter.sources import kubelet

        kubelet.PodResourcesClient = GrpcioClient
        sys.exit(cli.main(sys.argv[2:]))
    p = argparse.ArgumentParser()
    p.add_argument("--scrapes", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=2, help="runs of each kind; the table shows each")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rss-", dir="/tmp") as d:
        sock = Path(d) / "kubelet.sock"
        kubelet = start_fake_kubelet(sock, {f"tts/synth-{i}/model": {"nvidia.com/gpu": [fake_uuid(i)]}
                                            for i in range(GPUS)})
        try:
            results = []
            for _ in range(a.repeat):
                for name, flag, grpcio in (("off", "", False), ("absent", str(Path(d) / "none.sock"), False),
                                           ("on (grpclib)", str(sock), False), ("on (grpcio)", str(sock), True)):
                    results.append(measure(name, flag, grpcio, a.scrapes))
                    print(f"{results[-1]['run']:>14}: {results[-1]['rss_mb']:.1f} MB", flush=True)
        finally:
            stop_process(kubelet)
    (HERE / "pod-resources-rss.json").write_text(json.dumps({"gpus": GPUS, "scrapes": a.scrapes,
                                                             "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
