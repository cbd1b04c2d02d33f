"""Command line: node_exporter-style flags, each also settable from a GPU_EXPORTER_* variable."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector

from exporter import __version__
from exporter.collector import SnapshotCollector
from exporter.durations import parse_duration
from exporter.environment import ENV_PREFIX, env_name
from exporter.history import SampleHistory
from exporter.sampler import Sampler
from exporter.httpd import Limits
from exporter.listen import ListenAddressError, parse_listen_address
from exporter.pods import PodCollector
from exporter.server import ServerCollector, bind, make_server
from exporter.sources.cgroup import CgroupSource
from exporter.sources.kubelet import DEFAULT_SOCKET, PodResourcesPoller
from exporter.sources.nvml import NvmlSource
from exporter.sources.processes import ProcessAttributor
from exporter.sources.procfs import ProcfsSource
from exporter.webconfig import WebConfigError, WebConfigWatcher

log = logging.getLogger("exporter")

MIN_INTERVAL_S = 0.010


@dataclass(frozen=True, kw_only=True)
class Config:
    """The parsed, validated flags: plain values only (main() builds the live objects from them)."""

    listen_address: str
    telemetry_path: str
    sample_interval: float
    procfs: str
    fake_gpus: int
    log_level: str
    max_requests: int
    node_name: str
    processes: bool
    cgroupfs: str
    cgroup_path: str
    shm_path: str
    history_window: float
    fake_mig: tuple[str, ...]
    fake_churn: float
    max_connections: int
    web_config_file: str  # "": plain HTTP
    pod_resources_socket: str = DEFAULT_SOCKET
    pod_labels: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser() -> _Parser:
    p = _Parser(
        prog="gpu-telemetry-exporter",
        description="Prometheus exporter sampling NVIDIA GPUs (NVML) and host CPU (procfs) several times a second. "
        f"Every flag can also be set from the environment variable named in brackets ({ENV_PREFIX}...).",
    )

    def flag(name: str, default: Any, help_text: str, **kw: Any) -> None:
        env = env_name(name)
        p.add_argument(name, default=os.environ.get(env, default), help=f"{help_text} [{env}] (default: {default})",
                       **kw)

    flag("--web.listen-address", ":9445", "address to listen on, [host]:port")
    flag("--web.telemetry-path", "/metrics", "path under which to expose metrics")
    flag("--web.max-requests", "40", "maximum concurrent scrape requests; 503 beyond it; 0 = no limit")
    flag("--web.max-connections", "512", "maximum open client connections; at the limit the oldest idle or "
                                         "slow one is closed for a new one")
    flag("--web.config.file", "", "exporter-toolkit web config (YAML) for TLS and basic auth; empty: plain HTTP")
    flag("--sample.interval", "200ms", "sampling interval (>= 10ms)")
    flag("--path.procfs", "/proc", "procfs mount point (the host's /proc when run in a container)")
    flag("--fake-gpus", "0", "serve N simulated GPUs instead of real NVML (demos, tests)")
    flag("--fake-mig", "", "with --fake-gpus: put simulated GPU 0 in MIG mode with these instances, "
                           "e.g. 3g.40gb,2g.20gb,1g.10gb,1g.10gb")
    flag("--fake-churn", "0", "with --fake-gpus: a new batch process (new PID) every other DURATION on each "
                              "GPU, for label-churn soak tests; 0: the default 10 s schedule with fixed PIDs")
    flag("--log.level", "info", "log level: debug, info, warn, error")
    flag("--node.name", "", "node name for the `node` label of gpu_info (Kubernetes: from the downward API)")
    flag("--path.cgroupfs", "/sys/fs/cgroup", "cgroup filesystem mount point")
    flag("--cgroup.path", "", "cgroup to report CPU throttling and memory for, relative to --path.cgroupfs "
                             "(default: the exporter's own)")
    flag("--path.shm", "/dev/shm", "shared-memory mount to report (empty: off)")
    flag("--history.window", "5m", "how much full-resolution history the live view at / keeps (0: off)")
    env = env_name("--collector.processes")
    p.add_argument("--collector.processes", action=argparse.BooleanOptionalAction,
                   default=os.environ.get(env, "true").lower() not in ("0", "false", "no", "off"),
                   help=f"per-process GPU memory and utilisation with container/pod labels [{env}] (default: on)")
    flag("--kubernetes.pod-resources-socket", DEFAULT_SOCKET,
         "kubelet pod-resources socket for gpu_pod_info (which pod holds each GPU); polled every 5 s while it "
         "exists; empty: off")
    env = env_name("--kubernetes.pod-labels")
    p.add_argument("--kubernetes.pod-labels", action=argparse.BooleanOptionalAction,
                   default=os.environ.get(env, "false").lower() in ("1", "true", "yes", "on"),
                   help="also stamp namespace/pod/container on every per-GPU series of a GPU one container "
                        f"holds (dcgm-exporter style; series change on every reschedule) [{env}] (default: off)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = _build_parser()
    a = vars(parser.parse_args(argv))
    try:
        interval = parse_duration(a["sample.interval"])
        if interval < MIN_INTERVAL_S:
            raise ValueError(f"--sample.interval {a['sample.interval']!r} is below the 10ms minimum")
        parse_listen_address(a["web.listen_address"])
        path = a["web.telemetry_path"]
        if not path.startswith("/") or path in ("/", "/healthz"):
            raise ValueError(f"--web.telemetry-path {path!r} must start with / and not be / or /healthz")
        fake = _non_negative_int("--fake-gpus", a["fake_gpus"])
        max_requests = _non_negative_int("--web.max-requests", a["web.max_requests"])
        max_connections = _non_negative_int("--web.max-connections", a["web.max_connections"])
        if max_connections < 1:
            raise ValueError("--web.max-connections must be at least 1")
        level = str(a["log.level"]).lower()
        if level not in ("debug", "info", "warn", "warning", "error"):
            raise ValueError(f"--log.level {level!r}: want debug, info, warn or error")
        fake_mig = tuple(p for p in a["fake_mig"].split(",") if p)
        if fake_mig and not fake:
            raise ValueError("--fake-mig needs --fake-gpus")
        bad = [p for p in fake_mig if not re.fullmatch(r"[1-7]g\.\d+gb", p)]
        if bad or len(fake_mig) > 7:
            raise ValueError(f"--fake-mig {a['fake_mig']!r}: want up to 7 profiles like 3g.40gb,1g.10gb")
        fake_churn = parse_duration(a["fake_churn"])
        if fake_churn and not fake:
            raise ValueError("--fake-churn needs --fake-gpus")
        if a["kubernetes.pod_labels"] and not a["kubernetes.pod_resources_socket"]:
            raise ValueError("--kubernetes.pod-labels needs --kubernetes.pod-resources-socket")
        history = parse_duration(a["history.window"])
        if history and history < interval:
            raise ValueError(f"--history.window {a['history.window']!r} is shorter than --sample.interval")
        procfs = a["path.procfs"]
        stat = Path(procfs) / "stat"
        try:
            with open(stat, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ValueError(f"--path.procfs {procfs!r}: cannot read {stat}: {exc.strerror or exc}") from None
        if a["web.config.file"]:
            _web_config(a["web.config.file"])  # a bad file is a flag error, before anything starts
    except (ValueError, ListenAddressError) as exc:
        parser.error(str(exc))
    return Config(listen_address=a["web.listen_address"], telemetry_path=path, sample_interval=interval,
                  procfs=procfs, fake_gpus=fake, log_level=level, max_requests=max_requests,
                  node_name=a["node.name"], processes=a["collector.processes"], cgroupfs=a["path.cgroupfs"],
                  cgroup_path=a["cgroup.path"], shm_path=a["path.shm"], history_window=history, fake_mig=fake_mig,
                  fake_churn=fake_churn, max_connections=max_connections, web_config_file=a["web.config.file"],
                  pod_resources_socket=a["kubernetes.pod_resources_socket"], pod_labels=a["kubernetes.pod_labels"])


def _web_config(path: str) -> WebConfigWatcher:
    try:
        return WebConfigWatcher(path)
    except WebConfigError as exc:
        raise ValueError(f"--web.config.file {path!r}: {exc}") from None


def _non_negative_int(flag: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} {value!r} is not an integer") from None
    if n < 0:
        raise ValueError(f"{flag} {value!r} must not be negative")
    return n


def _nvml_module(cfg: Config) -> tuple[Any, str]:
    if cfg.fake_gpus:
        from exporter.fake_nvml import FakeGpuSpec, FakeNvml

        # GPU 1 reports XID 31 (an application's GPU memory page fault) after 5 s, then every minute.
        churn: dict[str, Any] = {"batch_period_s": cfg.fake_churn, "batch_new_pid": True} if cfg.fake_churn else {}
        specs = [FakeGpuSpec(mig_profiles=cfg.fake_mig if i == 0 else (),
                             xid_schedule=(5.0, 60.0, 31) if i == 1 else None, **churn)
                 for i in range(cfg.fake_gpus)]
        return FakeNvml(specs=specs), "fake"
    try:
        import pynvml
    except ImportError:
        return None, "absent"
    return pynvml, "real"


def _handle_other_signals(web_config: WebConfigWatcher | None) -> None:
    """SIGHUP reloads the web config (what Prometheus users send); SIGUSR1/2 would otherwise end the process."""
    def hangup(*_: object) -> None:
        if web_config is None:
            log.info("SIGHUP: no --web.config.file to reload")
        else:
            log.info("SIGHUP: reloading %s", web_config.path)
            web_config.request_reload()

    signal.signal(signal.SIGHUP, hangup)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _: log.info("%s ignored", signal.Signals(signum).name))


def _cgroup_source(cfg: Config) -> CgroupSource | None:
    try:
        cgroup = CgroupSource(cfg.cgroupfs, cfg.cgroup_path)
    except OSError as exc:
        log.warning("cgroup metrics off: %s", exc)
        return None
    return cgroup if cgroup.available else None


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    # A thread waiting for the GIL gets it after the switch interval (5 ms by default): while a scrape
    # renders, the sampler would start its tick up to 5 ms late. 1 ms keeps ticks on time.
    sys.setswitchinterval(0.001)
    logging.basicConfig(
        level={"warn": "WARNING"}.get(cfg.log_level, cfg.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        web_config = _web_config(cfg.web_config_file) if cfg.web_config_file else None
    except ValueError as exc:  # changed since the flags were checked
        print(f"gpu-telemetry-exporter: error: {exc}", file=sys.stderr)
        return 2
    try:  # bind first: a taken port is a one-line error before anything else is set up or logged
        sock = bind(cfg.listen_address)
    except OSError as exc:
        print(f"gpu-telemetry-exporter: error: cannot listen on {cfg.listen_address}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    history = SampleHistory(cfg.history_window, cfg.sample_interval) if cfg.history_window else None
    pods = PodResourcesPoller(cfg.pod_resources_socket) if cfg.pod_resources_socket else None
    sampler = Sampler(NvmlSource(*_nvml_module(cfg), collect_processes=cfg.processes), ProcfsSource(cfg.procfs),
                      interval=cfg.sample_interval, cgroup=_cgroup_source(cfg), shm_path=cfg.shm_path or None,
                      attributor=ProcessAttributor(cfg.procfs) if cfg.processes else None, history=history,
                      pods=pods.latest_reading if pods else None)
    registry = CollectorRegistry(auto_describe=False)
    server = make_server(sock, registry, sampler.health, cfg.telemetry_path, history=history,
                         generation=lambda: sampler.snapshot, web_config=web_config,
                         limits=Limits(max_requests=cfg.max_requests, max_connections=cfg.max_connections))
    snapshot_collector = SnapshotCollector(lambda: sampler.snapshot, node_name=cfg.node_name)
    registry.register(PodCollector(snapshot_collector, lambda: sampler.snapshot, cfg.pod_labels) if pods
                      else snapshot_collector)
    ProcessCollector(registry=registry)  # process_*: the exporter's own CPU and memory cost
    registry.register(ServerCollector(server))

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _handle_other_signals(web_config)

    # Start-up objects (modules, registries) never die: keep them out of the collector's generations so a
    # full collection under scrape load scans less and pauses the sampler less.
    gc.freeze()
    sampler.start()
    if pods:
        pods.start()
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    backend = f"{cfg.fake_gpus} simulated GPUs" if cfg.fake_gpus else "NVML through nvidia-ml-py"
    scheme = "https" if web_config and web_config.ssl_context else "http"
    auth = " with basic auth" if web_config and web_config.auth.enabled else ""
    log.info("gpu-telemetry-exporter %s listening on %s://%s:%d%s%s (sampling every %gs; GPUs: %s)",
             __version__, scheme, shown, port, cfg.telemetry_path, auth, cfg.sample_interval, backend)
    if auth and scheme == "http":
        log.warning("basic auth without TLS: passwords cross the network in clear text")
    for note in web_config.notes() if web_config else ():
        log.warning("web config: %s", note)
    # A signal the kernel hands to another thread only runs its Python handler when the main thread
    # wakes up: wake it every half second rather than block for good.
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    server.shutdown()
    server.server_close()
    sampler.stop()
    if pods:
        pods.stop()
    return 0
