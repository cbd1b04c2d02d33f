"""Command line: node_exporter-style flags, each also settable from a GPU_EXPORTER_* variable."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector

from exporter import __version__
from exporter import collectors as registry
from exporter.collector import SnapshotCollector
from exporter.durations import parse_duration
from exporter.environment import ENV_PREFIX, env_name
from exporter.history import SampleHistory
from exporter.sampler import Sampler
from exporter.httpd import Limits
from exporter.listen import ListenAddressError, parse_listen_address
from exporter.pods import PodCollector
from exporter.server import ServerCollector, bind, make_server
from exporter.sources.cgroup import CgroupSource, locate
from exporter.sources.kubelet import DEFAULT_SOCKET, PodResourcesPoller
from exporter.sources.nvml import NvmlSource
from exporter.sources.nvml.specs import GPU_SCALARS, NVLINK_PER_LINK_SCALARS
from exporter.sources.processes import ProcessAttributor
from exporter.sources.kernfile import read_once
from exporter.sources.procfs import ProcfsSource

if TYPE_CHECKING:  # loaded only with --web.config.file: TLS, auth, YAML and bcrypt cost a default run nothing
    from exporter.webconfig import WebConfigWatcher

log = logging.getLogger("exporter")

MIN_INTERVAL_S = 0.010
MAX_FAKE_GPUS = 64
# --history.window / --sample.interval: rows the live view keeps (docs/live-view.md: 0.55 KB each at 8 GPUs,
# 2.2 KB at 64): 18 000 is 1 h at 200 ms, 10 MB / 40 MB; a week at 10 ms would take the node's memory.
MAX_HISTORY_ROWS = 18_000
# Served by the exporter itself; the telemetry path must not shadow one of them.
RESERVED_PATHS = ("/", "/healthz", "/api/v1/samples", "/api/v1/diagnosis")


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
    collectors: frozenset[str]  # the switchable collectors that are on (collectors.py)
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
    fake_scenario: str = ""
    fake_gpus_from: str = ""  # an nvidia-smi -q -x dump to serve as simulated GPUs


_SCENARIO_HELP = "<scenarios>"  # filled in when help is shown: the fakes load only when asked for


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        from exporter.fake_scenarios import scenario_help

        for action in self._actions:
            if action.help and _SCENARIO_HELP in action.help:
                action.help = action.help.replace(_SCENARIO_HELP, scenario_help().replace("%", "%%"))
        return super().format_help()


@dataclass(frozen=True)
class _Setting:
    """A flag's value and where it came from, so an error can name what the user actually wrote."""
    flag: str
    value: str
    env: str | None  # the variable it came from; None: the command line or the default

    def __str__(self) -> str:
        return f"{self.env}={self.value!r} ({self.flag})" if self.env else f"{self.flag} {self.value!r}"


_VALUE_FLAGS: dict[str, str] = {}  # flag -> default, filled by _build_parser
_ENV_TRUE, _ENV_FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _build_parser() -> _Parser:
    p = _Parser(
        prog="gpu-telemetry-exporter",
        description="Prometheus exporter sampling NVIDIA GPUs (NVML) and host CPU (procfs) several times a second. "
        f"Every flag can also be set from the environment variable named in brackets ({ENV_PREFIX}...). "
        "`gpu-telemetry-exporter diagnose --help`: why the RTF jittered in a past window, from Prometheus.",
    )

    def flag(name: str, default: str, help_text: str) -> None:
        # default None: the environment and then the default are applied after parsing (_settings), so a
        # bad value can be reported under the name it was given.
        _VALUE_FLAGS[name] = default
        p.add_argument(name, default=None, help=f"{help_text} [{env_name(name)}] (default: {default})")

    flag("--web.listen-address", ":9445", "address to listen on, [host]:port")
    flag("--web.telemetry-path", "/metrics", "path under which to expose metrics")
    flag("--web.max-requests", "40", "maximum concurrent scrape requests; 503 beyond it; 0 = no limit")
    flag("--web.max-connections", "512", "maximum open client connections; at the limit the oldest idle or "
                                         "slow one is closed for a new one")
    flag("--web.config.file", "", "exporter-toolkit web config (YAML) for TLS and basic auth; empty: plain HTTP")
    flag("--sample.interval", "200ms", "sampling interval (>= 10ms), e.g. 200ms, 0.5s, 1m30s")
    flag("--path.procfs", "/proc", "procfs mount point (the host's /proc when run in a container)")
    flag("--fake-gpus", "0", f"serve N simulated GPUs instead of real NVML (demos, tests; at most {MAX_FAKE_GPUS})")
    flag("--fake-mig", "", "with --fake-gpus: put simulated GPU 0 (an H100 80GB) in MIG mode with these "
                           "instances, e.g. 3g.40gb,2g.20gb,1g.10gb,1g.10gb")
    flag("--fake-churn", "0", "with --fake-gpus: a new batch process (new PID) every other DURATION on each "
                              "GPU, for label-churn soak tests; 0: the default 10 s schedule with fixed PIDs")
    flag("--fake-scenario", "", "with --fake-gpus: drive every simulated GPU into one condition for the "
                                f"diagnosis ({_SCENARIO_HELP})")
    flag("--fake-gpus-from", "", "serve the GPUs of this `nvidia-smi -q -x` dump as simulated GPUs (values as "
                                 "recorded, N/A as NotSupported): preview a node's series before deploying")
    flag("--log.level", "info", "log level: debug, info, warn, error")
    flag("--node.name", "", "node name for the `node` label of gpu_info (Kubernetes: from the downward API)")
    flag("--path.cgroupfs", "/sys/fs/cgroup", "cgroup filesystem mount point")
    flag("--cgroup.path", "", "cgroup to report CPU throttling and memory for, relative to --path.cgroupfs "
                             "(default: the exporter's own); must exist at start-up")
    flag("--path.shm", "/dev/shm", "shared-memory mount to report (empty: off)")
    flag("--history.window", "5m", "how much full-resolution history the live view at / keeps (0: off)")
    for c in registry.COLLECTORS:  # --[no-]collector.<name>, one per registered collector
        env = env_name(f"--collector.{c.name}")
        p.add_argument(f"--collector.{c.name}", action=argparse.BooleanOptionalAction, dest=f"collector.{c.name}",
                       default=None, help=f"collector: {c.help} [{env}] (default: {'on' if c.default else 'off'})")
    flag("--kubernetes.pod-resources-socket", DEFAULT_SOCKET,
         "kubelet pod-resources socket for gpu_pod_info (which pod holds each GPU); polled every 5 s while it "
         "exists; empty: off")
    env = env_name("--kubernetes.pod-labels")
    p.add_argument("--kubernetes.pod-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="also stamp namespace/pod/container on every per-GPU series of a GPU one container "
                        f"holds (dcgm-exporter style; series change on every reschedule) [{env}] (default: off)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _attach_dash_values(argv: Sequence[str]) -> list[str]:
    """`--sample.interval -1s`: argparse takes '-1s' for an option and says only "expected one argument".
    Hand such a value to its flag (as --sample.interval=-1s) so the value's own check says what is wrong."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in _VALUE_FLAGS and value.startswith("-") and not value.startswith("--"):
            out.append(f"{argv[i]}={value}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _settings(args: dict[str, Any]) -> dict[str, _Setting]:
    """Each value flag's setting: the command line, else its environment variable, else the default."""
    out = {}
    for name, default in _VALUE_FLAGS.items():
        value = args[name.lstrip("-").replace("-", "_")]
        env = env_name(name)
        if value is None and env in os.environ:
            out[name] = _Setting(name, os.environ[env], env)
        else:
            out[name] = _Setting(name, default if value is None else value, None)
    return out


def _switch(flag: str, cli_value: bool | None, default: bool) -> bool:
    """An on/off flag: --x / --no-x, else its variable (strictly true/false/1/0/yes/no), else the default."""
    if cli_value is not None:
        return cli_value
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is None:
        return default
    if raw.strip().lower() in _ENV_TRUE:
        return True
    if raw.strip().lower() in _ENV_FALSE:
        return False
    raise ValueError(f"{env}={raw[:40]!r} ({flag}): want one of {', '.join(_ENV_TRUE + _ENV_FALSE)}")


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = _build_parser()
    a = vars(parser.parse_args(_attach_dash_values(sys.argv[1:] if argv is None else argv)))
    try:
        s = _settings(a)
        collectors = frozenset(c.name for c in registry.COLLECTORS
                               if _switch(f"--collector.{c.name}", a[f"collector.{c.name}"], default=c.default))
        pod_labels = _switch("--kubernetes.pod-labels", a["kubernetes.pod_labels"], default=False)
        interval = _duration(s["--sample.interval"])
        if interval < MIN_INTERVAL_S:
            raise ValueError(f"{s['--sample.interval']}: below the 10ms minimum")
        listen = s["--web.listen-address"]
        try:
            parse_listen_address(listen.value)
        except ListenAddressError as exc:
            raise ValueError(f"{listen}: {exc}") from None
        path = _telemetry_path(s["--web.telemetry-path"])
        fake = _non_negative_int(s["--fake-gpus"])
        if fake > MAX_FAKE_GPUS:
            raise ValueError(f"{s['--fake-gpus']}: at most {MAX_FAKE_GPUS} simulated GPUs")
        max_requests = _non_negative_int(s["--web.max-requests"])
        max_connections = _non_negative_int(s["--web.max-connections"])
        if max_connections < 1:
            raise ValueError(f"{s['--web.max-connections']}: must be at least 1")
        level = s["--log.level"].value.lower()
        if level not in ("debug", "info", "warn", "warning", "error"):
            raise ValueError(f"{s['--log.level']}: want debug, info, warn or error")
        fake_mig = _fake_mig(s["--fake-mig"], fake)
        fake_churn = _duration(s["--fake-churn"])
        if fake_churn and not fake:
            raise ValueError(f"{s['--fake-churn']}: --fake-churn needs --fake-gpus")
        fake_scenario = s["--fake-scenario"]
        if fake_scenario.value:
            from exporter.fake_scenarios import SCENARIOS
        if fake_scenario.value and (not fake or fake_scenario.value not in SCENARIOS):
            raise ValueError(f"{fake_scenario}: needs --fake-gpus and one of " + ", ".join(SCENARIOS))
        fake_from = s["--fake-gpus-from"]
        if fake_from.value:
            if fake:
                raise ValueError(f"{fake_from}: not with --fake-gpus")
            _smi_dump(fake_from.value, str(fake_from))
        pod_socket = s["--kubernetes.pod-resources-socket"].value
        if pod_labels and not pod_socket:
            raise ValueError("--kubernetes.pod-labels needs --kubernetes.pod-resources-socket")
        history = _duration(s["--history.window"])
        if history and history < interval:
            raise ValueError(f"{s['--history.window']}: shorter than --sample.interval")
        if history / interval > MAX_HISTORY_ROWS:
            raise ValueError(f"{s['--history.window']}: keeps {history / interval:.0f} samples at "
                             f"--sample.interval {interval:g}s; at most {MAX_HISTORY_ROWS} (e.g. 1h at 200ms)")
        procfs = s["--path.procfs"].value
        stat = Path(procfs) / "stat"
        try:
            read_once(stat)  # a FIFO or device here would block start-up: refused, not opened blocking
        except (OSError, ValueError) as exc:
            raise ValueError(f"{s['--path.procfs']}: cannot read {stat}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        cgroupfs, cgroup_path = s["--path.cgroupfs"].value, s["--cgroup.path"].value
        if cgroup_path:
            try:
                locate(cgroupfs, cgroup_path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{s['--cgroup.path']}: {exc}") from None
        web_config = s["--web.config.file"]
        if web_config.value:
            _web_config(web_config.value, str(web_config))  # a bad file is a flag error, before anything starts
    except ValueError as exc:
        parser.error(str(exc))
    return Config(listen_address=listen.value, telemetry_path=path, sample_interval=interval, procfs=procfs,
                  fake_gpus=fake, log_level=level, max_requests=max_requests, node_name=s["--node.name"].value,
                  collectors=collectors, cgroupfs=cgroupfs, cgroup_path=cgroup_path, shm_path=s["--path.shm"].value,
                  history_window=history, fake_mig=fake_mig, fake_churn=fake_churn, max_connections=max_connections,
                  web_config_file=web_config.value, pod_resources_socket=pod_socket, pod_labels=pod_labels,
                  fake_scenario=fake_scenario.value, fake_gpus_from=fake_from.value)


def _web_config(path: str, subject: str) -> WebConfigWatcher:
    """The watcher for a web config file; ValueError naming `subject` (the flag or variable) if it is bad."""
    from exporter.webconfig import WebConfigError, WebConfigWatcher

    try:
        return WebConfigWatcher(path)
    except WebConfigError as exc:
        raise ValueError(f"{subject}: {exc}") from None


def _duration(setting: _Setting) -> float:
    try:
        return parse_duration(setting.value)
    except ValueError as exc:
        raise ValueError(f"{setting}: {exc}") from None


def _telemetry_path(setting: _Setting) -> str:
    path = setting.value
    if not path.startswith("/") or len(path) > 256 or any(c.isspace() or not c.isprintable() or c in "?#"
                                                          for c in path):
        raise ValueError(f"{setting}: want a path starting with / without spaces, ? or #, e.g. /metrics")
    if "%" in path:  # requests are matched after decoding: /met%72ics would only answer at /met%2572ics
        raise ValueError(f"{setting}: no percent-encoding; write the path as it reads decoded, e.g. /métriques")
    if path in RESERVED_PATHS:
        raise ValueError(f"{setting}: taken by the exporter ({', '.join(RESERVED_PATHS)})")
    return path


def _fake_mig(setting: _Setting, fake_gpus: int) -> tuple[str, ...]:
    profiles = tuple(p for p in setting.value.split(",") if p)
    if not profiles:
        return ()
    if not fake_gpus:
        raise ValueError(f"{setting}: --fake-mig needs --fake-gpus")
    from exporter.fake_nvml import check_mig_layout

    if len(profiles) > 7:
        raise ValueError(f"{setting}: at most 7 instances")
    try:
        check_mig_layout(profiles)
    except ValueError as exc:
        raise ValueError(f"{setting}: {exc}") from None
    return profiles


def _smi_dump(path: str, subject: str) -> Any:
    from exporter.fake_smi import NotADump, read_dump

    try:
        return read_dump(path)
    except (OSError, NotADump) as exc:
        raise ValueError(f"{subject}: {getattr(exc, 'strerror', None) or exc}") from None


def _non_negative_int(setting: _Setting) -> int:
    try:
        n = int(setting.value)
    except (TypeError, ValueError):
        raise ValueError(f"{setting}: not an integer") from None
    if n < 0:
        raise ValueError(f"{setting}: must not be negative")
    return n


def _nvml_module(cfg: Config) -> tuple[Any, str]:
    if cfg.fake_gpus_from:
        from exporter.fake_smi import SmiNvml

        return SmiNvml(_smi_dump(cfg.fake_gpus_from, cfg.fake_gpus_from)), "fake"
    if cfg.fake_scenario:
        from exporter.fake_scenarios import ScenarioNvml

        return ScenarioNvml(cfg.fake_scenario, cfg.fake_gpus), "fake"
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
    except (OSError, ValueError) as exc:  # e.g. /proc/self/cgroup unreadable, or the cgroup went away
        log.warning("cgroup metrics off: %s", exc)
        return None
    return cgroup if cgroup.available else None


def _raise_open_file_limit() -> None:
    """The soft open-file limit up to the hard one, as every Go program does at start (node_exporter
    included): a 1024 default would otherwise bound the server before --web.max-connections does (512
    places, 16 reserved, and up to as many newcomers on probation)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):  # an infinite hard limit above the kernel's nr_open: keep the default
            pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["diagnose"]:
        from exporter.diagnose_cli import main as diagnose_main

        return diagnose_main(argv[1:])
    cfg = parse_config(argv)
    # A thread waiting for the GIL gets it after the switch interval (5 ms by default): while a scrape
    # renders, the sampler would start its tick up to 5 ms late. 1 ms keeps ticks on time.
    sys.setswitchinterval(0.001)
    _raise_open_file_limit()
    logging.basicConfig(
        level={"warn": "WARNING"}.get(cfg.log_level, cfg.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        web_config = (_web_config(cfg.web_config_file, f"--web.config.file {cfg.web_config_file!r}")
                      if cfg.web_config_file else None)
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
    on = cfg.collectors
    pods = (PodResourcesPoller(cfg.pod_resources_socket)
            if cfg.pod_resources_socket and "pod-info" in on else None)
    specs = GPU_SCALARS + NVLINK_PER_LINK_SCALARS  # each row read and rendered only if its collector is on
    sampler = Sampler(NvmlSource(*_nvml_module(cfg), collectors=on, specs=specs), ProcfsSource(cfg.procfs),
                      interval=cfg.sample_interval, cgroup=_cgroup_source(cfg) if "cgroup" in on else None,
                      shm_path=(cfg.shm_path or None) if "shm" in on else None,
                      attributor=ProcessAttributor(cfg.procfs) if on & {"processes", "mig"} else None,
                      history=history, pods=pods.latest_reading if pods else None)
    registry = CollectorRegistry(auto_describe=False)
    server = make_server(sock, registry, sampler.health, cfg.telemetry_path, history=history,
                         generation=lambda: sampler.snapshot, web_config=web_config,
                         limits=Limits(max_requests=cfg.max_requests, max_connections=cfg.max_connections))
    snapshot_collector = SnapshotCollector(lambda: sampler.snapshot, node_name=cfg.node_name, specs=specs,
                                           collectors=on)
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
    if cfg.fake_gpus_from:
        backend = f"simulated from the nvidia-smi dump {cfg.fake_gpus_from}"
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
