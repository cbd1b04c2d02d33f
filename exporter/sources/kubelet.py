"""Which container holds which GPU: the kubelet's pod-resources API (v1 PodResourcesLister/List).

Read on its own thread, every `period` seconds with a `timeout`, never on the sampler's tick: the tick
only picks up `latest`, one immutable reading. A hung, absent or garbage-speaking kubelet costs the pod
information and nothing else, and is logged once per change of state.

The gRPC client (grpclib) and the message classes (protobuf) are imported only once the socket exists,
so an exporter off Kubernetes does not pay their memory (docs/performance.md has the figures).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from exporter.transitions import TransitionLog

log = logging.getLogger("exporter.kubelet")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST_METHOD = "/v1.PodResourcesLister/List"
MAX_RESPONSE_BYTES = 16 << 20  # a node with 250 pods answers in tens of KB
MAX_DEVICE_ID_CHARS = 256
GPU_RESOURCE_PREFIX = "nvidia.com/"  # nvidia.com/gpu, nvidia.com/gpu.shared, nvidia.com/mig-<profile>
_KEY = "kubelet pod-resources"


@dataclass(frozen=True, slots=True, order=True)
class ContainerRef:
    namespace: str
    pod: str
    container: str


@dataclass(frozen=True, slots=True)
class PodResources:
    """The last List of the kubelet: device UUID (GPU-... or MIG-...) -> containers holding it."""

    up: bool  # False: the socket is there but the last List failed (then `holders` is empty)
    holders: tuple[tuple[str, tuple[ContainerRef, ...]], ...] = ()  # sorted by UUID
    problem: str = ""  # why not up

    def by_device(self) -> dict[str, tuple[ContainerRef, ...]]:
        return dict(self.holders)


def device_uuid(device_id: str) -> str:
    """GPU-abc::1 (a time-slicing replica) -> GPU-abc; a MIG or plain GPU UUID stays as it is."""
    return device_id.partition("::")[0]


def holders_from(response: Any) -> tuple[tuple[str, tuple[ContainerRef, ...]], ...]:
    """Plain data from a ListPodResourcesResponse: the NVIDIA devices each container holds.

    Linear in the response; a container holding several replicas of one GPU counts once.
    """
    found: dict[str, set[ContainerRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            ref = ContainerRef(pod.namespace, pod.name, container.name)
            for devices in container.devices:
                if not devices.resource_name.startswith(GPU_RESOURCE_PREFIX):
                    continue
                for device_id in devices.device_ids:
                    uuid = device_uuid(device_id) if len(device_id) <= MAX_DEVICE_ID_CHARS else ""
                    if uuid:
                        found.setdefault(uuid, set()).add(ref)
    return tuple((uuid, tuple(sorted(refs))) for uuid, refs in sorted(found.items()))


def _bounded_codec() -> Any:
    from google.protobuf.message import DecodeError
    from grpclib.encoding.proto import ProtoCodec

    class BoundedProtoCodec(ProtoCodec):
        def decode(self, data: bytes, message_type: Any) -> Any:
            if len(data) > MAX_RESPONSE_BYTES:
                raise DecodeError(f"response of {len(data)} bytes is over the {MAX_RESPONSE_BYTES} limit")
            return super().decode(data, message_type)

    return BoundedProtoCodec()


class PodResourcesClient:
    """One List call on a unix socket; the connection is kept between calls and dropped after a failure."""

    def __init__(self, socket_path: str) -> None:
        from grpclib.client import Channel, UnaryUnaryMethod

        from exporter.sources import podresources_v1_pb2

        pb: Any = podresources_v1_pb2  # message classes are built at import time: nothing for mypy to see
        self._pb = pb
        self._channel = Channel(path=socket_path, codec=_bounded_codec())
        self._list = UnaryUnaryMethod(self._channel, LIST_METHOD, pb.ListPodResourcesRequest,
                                      pb.ListPodResourcesResponse)

    async def list(self, timeout: float) -> tuple[tuple[str, tuple[ContainerRef, ...]], ...]:
        # wait_for bounds the whole call, connecting included, whatever the peer sends or withholds.
        response = await asyncio.wait_for(self._list(self._pb.ListPodResourcesRequest(), timeout=timeout),
                                          timeout)
        return holders_from(response)

    def close(self) -> None:
        self._channel.close()


def _describe(exc: BaseException, timeout: float) -> str:
    """A stable one-line reason (no addresses or counters in it), so the log shows each change once."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"List timed out after {timeout:g}s"
    if isinstance(exc, PermissionError):  # the kubelet makes the socket root-only
        return "permission denied: the socket is root-only (deploy/overlays/pod-resources runs as UID 0)"
    status = getattr(exc, "status", None)  # grpclib's GRPCError
    if status is not None:
        return f"List failed: {getattr(status, 'name', status)}"
    return f"List failed: {type(exc).__name__}"


class PodResourcesPoller:
    """Polls List every `period` seconds on its own thread and keeps the latest reading.

    `latest` is None while the feature is off or the socket is absent; a PodResources otherwise.
    """

    def __init__(self, socket_path: str, period: float = 5.0, timeout: float = 2.0) -> None:
        self.socket_path = socket_path
        self.period = period
        self.timeout = timeout
        self.latest: PodResources | None = None
        self.polls = 0  # completed polls, for tests and benchmarks to wait on
        self._client: PodResourcesClient | None = None
        self._socket_id: tuple[int, int] | None = None
        self._seen = False  # the socket existed at some poll
        self._transitions = TransitionLog(log)
        self._loop = asyncio.new_event_loop()  # one loop for the poller's life: the connection is bound to it
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def latest_reading(self) -> PodResources | None:
        """What the sampler calls each tick: the last published reading, never waiting on the kubelet."""
        return self.latest

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="pod-resources", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Ends the polling thread, cancelling a List in flight (a hung kubelet must not hold up shutdown)."""
        self._stopping = True
        if self._thread is not None:
            task = self._task
            if task is not None:
                self._loop.call_soon_threadsafe(task.cancel)
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # a daemon thread: it goes with the process
        else:
            self._drop_client()
        self._loop.close()

    def _thread_main(self) -> None:
        try:
            self._loop.run_until_complete(self._run())
        except asyncio.CancelledError:
            pass

    def poll_now(self) -> PodResources | None:
        """One poll on the calling thread (tests, benchmarks); only while the polling thread is not started."""
        assert self._thread is None
        return self._loop.run_until_complete(self.poll())

    async def _run(self) -> None:
        self._task = asyncio.current_task()
        if self._stopping:  # stopped before the loop started
            return
        try:
            while not self._stopping:
                try:
                    await self.poll()
                except Exception:  # a bug here must cost the pod labels, not the thread
                    log.exception("pod-resources poll failed")
                    self.latest = None
                await asyncio.sleep(self.period)
        finally:
            self._drop_client()

    async def poll(self) -> PodResources | None:
        """One read; publishes and returns the new `latest`."""
        self.latest = await self._read()
        self.polls += 1
        return self.latest

    async def _read(self) -> PodResources | None:
        try:
            st = os.stat(self.socket_path)
        except FileNotFoundError:
            self._drop_client()
            if self._seen:
                self._transitions.set(_KEY, f"{self.socket_path} is gone: no pod labels until it is back")
            elif not self.polls:  # off Kubernetes this is normal: said once, quietly
                log.info("%s not found: pod labels start when it appears", self.socket_path)
            return None
        except OSError as exc:  # there, but not for us (a directory we may not search)
            return self._failed(exc)
        self._seen = True
        if (st.st_dev, st.st_ino) != self._socket_id:  # a new socket: the kubelet restarted
            self._drop_client()
            self._socket_id = (st.st_dev, st.st_ino)
        try:
            if self._client is None:
                self._client = PodResourcesClient(self.socket_path)
            holders = await self._client.list(self.timeout)
        except Exception as exc:  # whatever the kubelet (or a stranger on the socket) does, only pod info is lost
            return self._failed(exc)
        self._transitions.set(_KEY, None)
        return PodResources(up=True, holders=holders)

    def _failed(self, exc: BaseException) -> PodResources:
        problem = _describe(exc, self.timeout)
        self._drop_client()
        self._transitions.set(_KEY, f"{self.socket_path}: {problem}")
        return PodResources(up=False, problem=problem)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._socket_id = None

