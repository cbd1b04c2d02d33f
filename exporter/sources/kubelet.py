"""Which container holds which GPU: the kubelet's pod-resources API (v1 PodResourcesLister/List).

Read on its own thread, every `period` seconds with a `timeout`, never on the sampler's tick: the tick
only picks up `latest`, one immutable reading. A hung, absent or garbage-speaking kubelet costs the pod
information and nothing else, and is logged once per change of state.

The gRPC client (grpclib) and the message classes (protobuf) are imported only once the socket exists,
so an exporter off Kubernetes does not pay their memory (docs/performance.md has the figures).
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import os
import struct
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from exporter.transitions import TransitionLog

log = logging.getLogger("exporter.kubelet")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST_METHOD = "/v1.PodResourcesLister/List"
# Bounds on what the kubelet (or whatever listens at the socket) can cost; docs/operations.md says why
# each number and how to raise it. A reply over MAX_RESPONSE_BYTES is refused from its 5-byte gRPC length
# prefix, before any of it is buffered; at most WINDOW_BYTES of it arrive before that (HTTP/2 flow control).
MAX_RESPONSE_BYTES = 1 << 20  # a node of 250 pods, each with GPUs, CPUs and NICs, answers in < 250 KiB
WINDOW_BYTES = 1 << 20  # HTTP/2 receive window, connection and stream (grpclib's default is 4 MiB)
MAX_DEVICE_ID_CHARS = 256
MAX_NAME_CHARS = 253  # a Kubernetes object name (DNS subdomain); namespace and container names are <= 63
MAX_DEVICES = 256  # GPUs and MIG devices of one node: 16 GPUs x 7 MIG instances is 128
MAX_HOLDERS_PER_DEVICE = 128  # containers sharing one device (MPS allows 48 clients; time-slicing replicas)
MAX_SERIES = 1024  # gpu_pod_info series of the node, all devices together
# Reading a reply at the cap costs up to ~90 ms of CPU: done in slices of SLICE_ENTRIES pods and device IDs
# (0.5-4 ms each) with SLICE_PAUSE between, so it stays under the DaemonSet's 250m and does not take the
# CPU quota a scrape needs (all at once it would throttle the whole cgroup for ~0.3 s).
SLICE_ENTRIES = 1024
# HTTP/2 frames (h2 events) one List may cost: a reply at the cap is 128 DATA frames of 16 KiB (the
# kubelet's size) and a few others. A peer flooding PINGs or SETTINGS (or sending its reply a byte a frame) kept the poll
# thread at 100% CPU for the whole timeout, 2.3-2.9 s a poll: over the DaemonSet's 250m on its own.
MAX_FRAMES = 4096
SLICE_PAUSE = 0.015
GPU_RESOURCE_PREFIX = "nvidia.com/"  # nvidia.com/gpu, nvidia.com/gpu.shared, nvidia.com/mig-<profile>
NVML_UUID_PREFIXES = ("GPU-", "MIG-")  # what NVML's UUIDs start with: other IDs can never match a device
_KEY = "kubelet pod-resources"
_CUT_KEY = "kubelet pod-resources bounds"


@dataclass(frozen=True, slots=True, order=True)
class ContainerRef:
    namespace: str
    pod: str
    container: str


Holders = tuple[tuple[str, tuple[ContainerRef, ...]], ...]


@dataclass(frozen=True, slots=True)
class Cuts:
    """Container-device entries of one List left out by the bounds above, by bound."""

    names: int = 0  # a namespace, pod or container name over MAX_NAME_CHARS
    device_ids: int = 0  # an NVML-looking device ID over MAX_DEVICE_ID_CHARS
    devices: int = 0  # devices past MAX_DEVICES (the lowest UUIDs are kept)
    holders: int = 0  # containers past MAX_HOLDERS_PER_DEVICE on one device (the lowest are kept)
    series: int = 0  # entries past MAX_SERIES in all

    @property
    def total(self) -> int:
        return self.names + self.device_ids + self.devices + self.holders + self.series

    def describe(self) -> str | None:
        """A stable one-line summary (bounds, not counts, so the log shows each change once), or None."""
        hit = [text for n, text in ((self.names, f"names over {MAX_NAME_CHARS} characters"),
                                    (self.device_ids, f"device IDs over {MAX_DEVICE_ID_CHARS} characters"),
                                    (self.devices, f"more than {MAX_DEVICES} devices"),
                                    (self.holders, f"more than {MAX_HOLDERS_PER_DEVICE} containers on a device"),
                                    (self.series, f"more than {MAX_SERIES} series")) if n]
        return "left out of gpu_pod_info: " + ", ".join(hit) if hit else None


@dataclass(frozen=True, slots=True)
class PodResources:
    """The last List of the kubelet: device UUID (GPU-... or MIG-...) -> containers holding it."""

    up: bool  # False: the socket is there but the last List failed (then `holders` is empty)
    holders: Holders = ()  # sorted by UUID
    problem: str = ""  # why not up
    cut: int = 0  # entries of the List left out by the bounds (exporter_pod_resources_left_out)
    # Built once per poll, not per scrape: every scrape looks devices up in it.
    index: Mapping[str, tuple[ContainerRef, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", dict(self.holders))

    def by_device(self) -> Mapping[str, tuple[ContainerRef, ...]]:
        return self.index


def device_uuid(device_id: str) -> str:
    """GPU-abc::1 (a time-slicing replica) -> GPU-abc; a MIG or plain GPU UUID stays as it is."""
    return device_id.partition("::")[0]


class _Lowest:
    """The `limit` lowest distinct keys offered, kept sorted: what is kept does not depend on the order the
    kubelet lists pods in (a Go map's, which changes between calls), so a cut does not churn series."""

    __slots__ = ("keys", "limit", "cut")

    def __init__(self, limit: int) -> None:
        self.keys: list[Any] = []
        self.limit = limit
        self.cut = 0

    def offer(self, key: Any) -> tuple[bool, Any]:
        """(kept, the key pushed out to make room or None)."""
        keys = self.keys
        full = len(keys) >= self.limit
        if full and key > keys[-1]:
            self.cut += 1
            return False, None
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return True, None
        keys.insert(i, key)
        if full:
            self.cut += 1
            return True, keys.pop()
        return True, None


_TOO_LONG = ("", "", "")  # marks a container whose names are over MAX_NAME_CHARS (compared by identity)


def read_reply(response: Any) -> tuple[Holders, Cuts]:
    """Plain, bounded data from a ListPodResourcesResponse: the NVIDIA devices each container holds, and
    what the bounds left out.

    Linear in the response (times log of the bounds); a container holding several replicas of one GPU
    counts once. Device IDs that cannot be an NVML UUID (another plugin's under nvidia.com/, PCI addresses
    of NICs) are not GPUs and are skipped without counting.
    """
    out: list[tuple[Holders, Cuts]] = []
    for _ in _reading(response, out):
        pass
    return out[0]


async def read_reply_paced(response: Any, pause: float = SLICE_PAUSE) -> tuple[Holders, Cuts]:
    """read_reply, pausing `pause` seconds after each slice of SLICE_ENTRIES."""
    out: list[tuple[Holders, Cuts]] = []
    for _ in _reading(response, out):
        await asyncio.sleep(pause)
    return out[0]


def _reading(response: Any, out: list[tuple[Holders, Cuts]]) -> Iterator[None]:
    """read_reply's work, yielding after every SLICE_ENTRIES entries read (pods, containers, device groups,
    device IDs); appends the result to out."""
    steps = SLICE_ENTRIES
    devices = _Lowest(MAX_DEVICES)
    found: dict[str, _Lowest] = {}
    names = device_ids = devices_cut = 0
    for pod in response.pod_resources:
        steps -= 1
        if steps <= 0:
            yield
            steps = SLICE_ENTRIES
        for container in pod.containers:  # empty containers and device groups cost CPU too: they count
            steps -= 1
            if steps <= 0:
                yield
                steps = SLICE_ENTRIES
            key: tuple[str, str, str] | None = None
            for group in container.devices:
                steps -= 1
                if steps <= 0:
                    yield
                    steps = SLICE_ENTRIES
                if not group.resource_name.startswith(GPU_RESOURCE_PREFIX):
                    continue
                for device_id in group.device_ids:  # the hot loop: up to ~200 000 IDs in a reply at the cap
                    steps -= 1
                    if steps <= 0:
                        yield
                        steps = SLICE_ENTRIES
                    if not device_id.startswith(NVML_UUID_PREFIXES):
                        continue
                    if len(device_id) > MAX_DEVICE_ID_CHARS:
                        device_ids += 1
                        continue
                    if key is None:
                        key = (pod.namespace, pod.name, container.name)
                        if max(map(len, key)) > MAX_NAME_CHARS:
                            key = _TOO_LONG
                    if key is _TOO_LONG:
                        names += 1
                        continue
                    uuid = device_id.partition("::")[0]  # device_uuid, inlined
                    holders = found.get(uuid)
                    if holders is None:
                        kept, evicted = devices.offer(uuid)
                        if not kept:
                            devices_cut += 1
                            continue
                        if evicted is not None:
                            gone = found.pop(evicted)
                            devices_cut += len(gone.keys) + gone.cut
                        holders = found[uuid] = _Lowest(MAX_HOLDERS_PER_DEVICE)
                    holders.offer(key)
    out_holders: list[tuple[str, tuple[ContainerRef, ...]]] = []
    room = MAX_SERIES
    per_device = series = 0
    for uuid in devices.keys:
        holders = found[uuid]
        per_device += holders.cut
        keys = holders.keys[:room]
        series += len(holders.keys) - len(keys)
        room -= len(keys)
        if keys:
            out_holders.append((uuid, tuple(ContainerRef(*k) for k in keys)))
    cuts = Cuts(names=names, device_ids=device_ids, devices=devices_cut, holders=per_device,
                series=series)
    out.append((tuple(out_holders), cuts))


def holders_from(response: Any) -> Holders:
    """read_reply without the account of what was cut."""
    return read_reply(response)[0]


class ReplyTooLarge(Exception):
    """The kubelet announced a reply over MAX_RESPONSE_BYTES: refused before any of it is buffered."""

    def __init__(self, length: int) -> None:
        super().__init__(f"reply over the {MAX_RESPONSE_BYTES}-byte limit")
        self.length = length


class BadReply(Exception):
    """No gRPC message where one was due, or a compressed one (never asked for)."""


async def read_message(h2_stream: Any, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """One length-prefixed gRPC message from grpclib's HTTP/2 stream, its length checked before its bytes
    are read. (grpclib's own recv_message reads the whole announced length, then hands it to the codec.)
    grpclib acknowledges DATA only as it is read, so until then the peer can push at most the window."""
    prefix = await h2_stream.recv_data(5)
    if len(prefix) != 5:
        raise BadReply("no message in the reply")
    compressed, length = struct.unpack(">?I", prefix)
    if compressed:
        raise BadReply("compressed reply")
    if length > limit:
        raise ReplyTooLarge(length)
    return bytes(await h2_stream.recv_data(length))


class PodResourcesClient:
    """One List call on a unix socket; the connection is kept between calls and dropped after a failure."""

    def __init__(self, socket_path: str) -> None:
        from grpclib.client import Channel, UnaryUnaryMethod
        from grpclib.config import Configuration

        from exporter.sources import podresources_v1_pb2

        pb: Any = podresources_v1_pb2  # message classes are built at import time: nothing for mypy to see
        self._pb = pb
        config = Configuration(http2_connection_window_size=WINDOW_BYTES, http2_stream_window_size=WINDOW_BYTES)
        self._channel = Channel(path=socket_path, config=config)
        self.frames_left = MAX_FRAMES
        factory = self._channel._protocol_factory  # grpclib's (0.4): the connection's H2Protocol

        def counted() -> Any:
            protocol = factory()
            made = protocol.connection_made

            def connection_made(transport: Any) -> None:
                made(transport)
                feed = protocol.connection.feed

                def counted_feed(data: bytes) -> Any:
                    events = feed(data)  # h2 parses what one read brought (at most 256 KiB)
                    self.frames_left -= len(events)
                    if self.frames_left < 0:  # the List fails as the connection goes
                        transport.close()
                        return []
                    return events

                protocol.connection.feed = counted_feed  # type: ignore[method-assign]

            protocol.connection_made = connection_made  # type: ignore[method-assign]
            return protocol

        self._channel._protocol_factory = counted  # type: ignore[method-assign]
        self._list = UnaryUnaryMethod(self._channel, LIST_METHOD, pb.ListPodResourcesRequest,
                                      pb.ListPodResourcesResponse)

    async def list(self, timeout: float) -> tuple[Holders, Cuts]:
        # wait_for bounds the whole call, connecting included, whatever the peer sends or withholds.
        data = await asyncio.wait_for(self._call(timeout), timeout)
        response = self._pb.ListPodResourcesResponse.FromString(data)
        del data  # the bytes and the decoded message are both ~ the reply's size: hold one at a time
        return await read_reply_paced(response)

    async def _call(self, timeout: float) -> bytes:
        """grpclib's unary call (UnaryUnaryMethod.__call__) with read_message in place of its recv_message.
        `_stream` and `_wrapper` are grpclib's (0.4): the HTTP/2 stream, and what turns a lost connection or
        the deadline into grpclib's errors; tests/test_pod_resources.py fails if they change."""
        self.frames_left = MAX_FRAMES
        async with self._list.open(timeout=timeout) as stream:
            await stream.send_message(self._pb.ListPodResourcesRequest(), end=True)
            await stream.recv_initial_metadata()
            with stream._wrapper:
                data = await read_message(stream._stream)
        return data  # leaving the block checked the trailers: the grpc-status was OK

    def close(self) -> None:
        self._channel.close()


def _describe(exc: BaseException, timeout: float) -> str:
    """A stable one-line reason (no addresses or counters in it), so the log shows each change once."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"List timed out after {timeout:g}s"
    if isinstance(exc, (ReplyTooLarge, BadReply)):
        return f"List refused: {exc}"
    if isinstance(exc, PermissionError):  # the kubelet makes the socket root-only
        return "permission denied: the socket is root-only (deploy/overlays/pod-resources runs as UID 0)"
    status = getattr(exc, "status", None)  # grpclib's GRPCError
    if status is not None:
        return f"List failed: {getattr(status, 'name', status)}"
    return f"List failed: {type(exc).__name__}"


def _forget(exc: BaseException) -> None:
    """Clears the locals of the frames an exception's traceback holds (a refused or undecodable reply's
    bytes among them): otherwise they live until the cycle collector meets the traceback."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


def _quiet_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What the poller's loop reports by itself: grpclib raising inside the connection on what a peer sent
    (an HTTP/2 frame type it has no handler for) is a failed List, logged once as its transition; asyncio
    would log a traceback at ERROR on every poll. A debug line, without the traceback or the bytes."""
    exc = context.get("exception")
    log.debug("pod-resources connection: %s%s", context.get("message", ""),
              f" ({type(exc).__name__})" if exc is not None else "")


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
        self._loop.set_exception_handler(_quiet_loop_error)
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
            holders, cuts = await self._client.list(self.timeout)
        except Exception as exc:  # whatever the kubelet (or a stranger on the socket) does, only pod info is lost
            return self._failed(exc)
        self._transitions.set(_KEY, None)
        self._transitions.set(_CUT_KEY, cuts.describe())
        return PodResources(up=True, holders=holders, cut=cuts.total)

    def _failed(self, exc: BaseException) -> PodResources:
        problem = _describe(exc, self.timeout)
        _forget(exc)
        self._drop_client()
        detail = f"{exc.length} bytes announced" if isinstance(exc, ReplyTooLarge) else ""
        self._transitions.set(_KEY, f"{self.socket_path}: {problem}", detail)
        return PodResources(up=False, problem=problem)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._socket_id = None

