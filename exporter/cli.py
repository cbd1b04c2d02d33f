"""Command line: node_exporter-style flags, each also settable from a GPU_EXPORTER_* variable.

The flags are one table (FLAGS): name, default, help, and the validator that turns the text into the
value main() uses (it may read the values of the rows above it). Adding a flag is one row and its
Config field. The fakes (exporter.fake.*) are imported only when a --fake-* flag asks for them.
"""
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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry
from prometheus_client.metrics_core import Metric

from exporter import __version__
from exporter.pipeline import collectors as registry
from exporter.pipeline.collector import SnapshotCollector
from exporter.durations import parse_duration
from exporter.environment import ENV_PREFIX, env_name
from exporter.flagparser import FlagParser, close_match
from exporter.diagnosis.live import new_history
from exporter.pipeline.sampler import Sampler
from exporter.web.httpd import Limits
from exporter.web.listen import ListenAddressError, parse_listen_address
from exporter.web.server import ServerCollector, bind, make_server
from exporter.sources.cgroup import CgroupSource, locate
from exporter.sources.kubelet import DEFAULT_SOCKET, PodResourcesPoller
from exporter.sources.nvml import NvmlSource
from exporter.sources.nvml.specs import GPU_SCALARS, NVLINK_PER_LINK_SCALARS
from exporter.sources.processes import ProcessAttributor
from exporter.sources.kernfile import read_once
from exporter.sources.procfs import ProcfsSource

if TYPE_CHECKING:  # loaded only with --web.config.file: TLS, auth, YAML and bcrypt cost a default run nothing
    from exporter.web.config import WebConfigWatcher

log = logging.getLogger("exporter")

MIN_INTERVAL_S = 0.010
MAX_FAKE_GPUS = 64
FIRST_TICK_WAIT_S = 5.0  # serve once the first snapshot is out, or after this at the latest
# --history.window / --sample.interval: rows the live view keeps (docs/live-view.md: 0.55 KB each at 8 GPUs,
# 2.2 KB at 64): 18 000 is 1 h at 200 ms, 10 MB / 40 MB; a week at 10 ms would take the node's memory.
MAX_HISTORY_ROWS = 18_000
# Served by the exporter itself; the telemetry path must not shadow one of them.
RESERVED_PATHS = ("/", "/healthz", "/api/v1/samples", "/api/v1/diagnosis")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")


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
    collectors: frozenset[str]  # the switchable collectors that are on (pipeline/collectors.py)
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


@dataclass(frozen=True)
class _Setting:
    """A flag's value and where it came from, so an error can name what the user actually wrote."""
    flag: str
    value: str
    env: str | None  # the variable it came from; None: the command line or the default

    def __str__(self) -> str:
        return f"{self.env}={self.value!r} ({self.flag})" if self.env else f"{self.flag} {self.value!r}"


Values = Mapping[str, Any]  # flag name -> validated value, for the rows above the one being checked


def _text(s: _Setting, v: Values) -> str:
    return s.value


@dataclass(frozen=True)
class Flag:
    """One row of the flag table. `check` turns the setting into the value (ValueError: a one-line error
    naming the setting); it may read the values of the rows above it. `field`: the Config field it fills
    (None: folded into another, as the collector switches are into Config.collectors). A `switch` is
    --x / --no-x with default "on" or "off". A callable `help` is only called for --help (it may import)."""
    name: str
    default: str
    help: str | Callable[[], str]
    check: Callable[[_Setting, Values], Any] = _text
    field: str | None = None
    switch: bool = False


_ENV_TRUE, _ENV_FALSE = ("true", "1", "yes"), ("false", "0", "no")


# ---- validators: a setting's text -> its value, or ValueError naming the setting ------------------------
def _duration(setting: _Setting) -> float:
    try:
        return parse_duration(setting.value)
    except ValueError as exc:
        raise ValueError(f"{setting}: {exc}") from None


def _non_negative_int(setting: _Setting) -> int:
    try:
        n = int(setting.value)
    except (TypeError, ValueError):
        raise ValueError(f"{setting}: not an integer") from None
    if n < 0:
        raise ValueError(f"{setting}: must not be negative")
    return n


def _switch_value(setting: _Setting) -> bool:
    """--x / --no-x ("on"/"off" here), or the variable, strictly true/false/1/0/yes/no."""
    raw = setting.value.strip().lower()
    if raw in _ENV_TRUE or (raw == "on" and setting.env is None):
        return True
    if raw in _ENV_FALSE or (raw == "off" and setting.env is None):
        return False
    raise ValueError(f"{setting}: want one of {', '.join(_ENV_TRUE + _ENV_FALSE)}")


def _check_listen(s: _Setting, v: Values) -> str:
    try:
        parse_listen_address(s.value)
    except ListenAddressError as exc:
        raise ValueError(f"{s}: {exc}") from None
    return s.value


def _check_interval(s: _Setting, v: Values) -> float:
    interval = _duration(s)
    if interval < MIN_INTERVAL_S:
        raise ValueError(f"{s}: below the 10ms minimum")
    return interval


def _check_telemetry_path(s: _Setting, v: Values) -> str:
    path = s.value
    if not path.startswith("/") or len(path) > 256 or any(c.isspace() or not c.isprintable() or c in "?#"
                                                          for c in path):
        raise ValueError(f"{s}: want a path starting with / without spaces, ? or #, e.g. /metrics")
    if "%" in path:  # requests are matched after decoding: /met%72ics would only answer at /met%2572ics
        raise ValueError(f"{s}: no percent-encoding; write the path as it reads decoded, e.g. /métriques")
    if path in RESERVED_PATHS:
        raise ValueError(f"{s}: taken by the exporter ({', '.join(RESERVED_PATHS)})")
    return path


def _check_count(s: _Setting, v: Values) -> int:
    return _non_negative_int(s)


def _check_max_connections(s: _Setting, v: Values) -> int:
    n = _non_negative_int(s)
    if n < 1:
        raise ValueError(f"{s}: must be at least 1")
    return n


def _check_web_config(s: _Setting, v: Values) -> str:
    if s.value:
        _web_config(s.value, str(s))  # a bad file is a flag error, before anything starts
    return s.value


def _check_fake_gpus(s: _Setting, v: Values) -> int:
    n = _non_negative_int(s)
    if n > MAX_FAKE_GPUS:
        raise ValueError(f"{s}: at most {MAX_FAKE_GPUS} simulated GPUs")
    return n


def _check_fake_mig(s: _Setting, v: Values) -> tuple[str, ...]:
    profiles = tuple(p for p in s.value.split(",") if p)
    if not profiles:
        return ()
    if not v["--fake-gpus"]:
        raise ValueError(f"{s}: needs --fake-gpus")
    if len(profiles) > 7:
        raise ValueError(f"{s}: at most 7 instances")
    from exporter.fake.nvml import check_mig_layout  # the fakes load only when asked for

    try:
        check_mig_layout(profiles)
    except ValueError as exc:
        raise ValueError(f"{s}: {exc}") from None
    return profiles


def _check_fake_churn(s: _Setting, v: Values) -> float:
    churn = _duration(s)
    if churn and not v["--fake-gpus"]:
        raise ValueError(f"{s}: needs --fake-gpus")
    return churn


def _check_fake_scenario(s: _Setting, v: Values) -> str:
    if not s.value:
        return ""
    from exporter.fake.scenarios import SCENARIOS  # the fakes load only when asked for

    if s.value not in SCENARIOS:
        match = close_match(s.value, list(SCENARIOS))
        raise ValueError(f"{s}: unknown scenario" + (f" (did you mean {match}?)" if match else "")
                         + "; valid: " + ", ".join(SCENARIOS))
    if not v["--fake-gpus"]:
        raise ValueError(f"{s}: needs --fake-gpus")
    return s.value


def _check_fake_gpus_from(s: _Setting, v: Values) -> str:
    if s.value:
        if v["--fake-gpus"]:
            raise ValueError(f"{s}: not with --fake-gpus")
        _smi_dump(s.value, str(s))
    return s.value


def _smi_dump(path: str, subject: str) -> Any:
    from exporter.fake.smi import NotADump, read_dump  # the fakes load only when asked for

    try:
        return read_dump(path)
    except (OSError, NotADump) as exc:
        raise ValueError(f"{subject}: {getattr(exc, 'strerror', None) or exc}") from None


def _scenario_help() -> str:
    from exporter.fake.scenarios import scenario_help

    return f"with --fake-gpus: drive every simulated GPU into one condition for the diagnosis ({scenario_help()})"


def _check_log_level(s: _Setting, v: Values) -> str:
    level = s.value.lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"{s}: want debug, info, warn or error")
    return level


def _check_procfs(s: _Setting, v: Values) -> str:
    stat = Path(s.value) / "stat"
    try:
        read_once(stat)  # a FIFO or device here would block start-up: refused, not opened blocking
    except (OSError, ValueError) as exc:
        raise ValueError(f"{s}: cannot read {stat}: {getattr(exc, 'strerror', None) or exc}") from None
    return s.value


def _check_cgroup_path(s: _Setting, v: Values) -> str:
    if s.value:
        try:
            locate(v["--path.cgroupfs"], s.value)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{s}: {exc}") from None
    return s.value


def _check_history(s: _Setting, v: Values) -> float:
    history, interval = _duration(s), v["--sample.interval"]
    if history and history < interval:
        raise ValueError(f"{s}: shorter than --sample.interval")
    if history / interval > MAX_HISTORY_ROWS:
        raise ValueError(f"{s}: keeps {history / interval:.0f} samples at --sample.interval {interval:g}s; "
                         f"at most {MAX_HISTORY_ROWS} (e.g. 1h at 200ms)")
    return history


def _check_switch(s: _Setting, v: Values) -> bool:
    return _switch_value(s)


def _check_pod_labels(s: _Setting, v: Values) -> bool:
    on = _switch_value(s)
    if on and not v["--kubernetes.pod-resources-socket"]:
        raise ValueError("--kubernetes.pod-labels needs --kubernetes.pod-resources-socket")
    return on


def _check_collector(s: _Setting, v: Values) -> bool:
    """A collector's switch; not given, its default unless --collector.disable-defaults (above it) is on."""
    if s.env is None and s.value == "default":
        collector = registry.BY_NAME[s.flag.removeprefix("--collector.")]
        return False if v["--collector.disable-defaults"] else collector.default
    return _switch_value(s)


# The table, in --help order; a validator may read the values of the rows above its own.
FLAGS: tuple[Flag, ...] = (
    Flag("--web.listen-address", ":9445", "address to listen on, [host]:port", _check_listen, "listen_address"),
    Flag("--web.telemetry-path", "/metrics", "path under which to expose metrics", _check_telemetry_path,
         "telemetry_path"),
    Flag("--web.max-requests", "40", "maximum concurrent scrape requests; 503 beyond it; 0 = no limit",
         _check_count, "max_requests"),
    Flag("--web.max-connections", "512", "maximum open client connections; at the limit the oldest idle or "
         "slow one is closed for a new one", _check_max_connections, "max_connections"),
    Flag("--web.config.file", "", "exporter-toolkit web config (YAML) for TLS and basic auth; empty: plain HTTP",
         _check_web_config, "web_config_file"),
    Flag("--sample.interval", "200ms", "sampling interval (>= 10ms), e.g. 200ms, 0.5s, 1m30s", _check_interval,
         "sample_interval"),
    Flag("--path.procfs", "/proc", "procfs mount point (the host's /proc when run in a container)", _check_procfs,
         "procfs"),
    Flag("--fake-gpus", "0", f"serve N simulated GPUs instead of real NVML (demos, tests; at most {MAX_FAKE_GPUS})",
         _check_fake_gpus, "fake_gpus"),
    Flag("--fake-mig", "", "with --fake-gpus: put simulated GPU 0 (an H100 80GB) in MIG mode with these "
         "instances, e.g. 3g.40gb,2g.20gb,1g.10gb,1g.10gb", _check_fake_mig, "fake_mig"),
    Flag("--fake-churn", "0", "with --fake-gpus: a new batch process (new PID) every other DURATION on each GPU, "
         "for label-churn soak tests; 0: the default 10 s schedule with fixed PIDs", _check_fake_churn, "fake_churn"),
    Flag("--fake-scenario", "", _scenario_help, _check_fake_scenario, "fake_scenario"),
    Flag("--fake-gpus-from", "", "serve the GPUs of this `nvidia-smi -q -x` dump as simulated GPUs (values as "
         "recorded, N/A as NotSupported): preview a node's series before deploying", _check_fake_gpus_from,
         "fake_gpus_from"),
    Flag("--log.level", "info", "log level: debug, info, warn, error", _check_log_level, "log_level"),
    Flag("--node.name", "", "node name for the `node` label of gpu_info (Kubernetes: from the downward API)",
         field="node_name"),
    Flag("--path.cgroupfs", "/sys/fs/cgroup", "cgroup filesystem mount point", field="cgroupfs"),
    Flag("--cgroup.path", "", "cgroup to report CPU throttling and memory for, relative to --path.cgroupfs "
         "(default: the exporter's own); must exist at start-up", _check_cgroup_path, "cgroup_path"),
    Flag("--path.shm", "/dev/shm", "shared-memory mount to report (empty: off)", field="shm_path"),
    Flag("--history.window", "5m", "how much full-resolution history the live view at / keeps (0: off)",
         _check_history, "history_window"),
    Flag("--collector.disable-defaults", "off", "turn off every collector not switched on by its own flag "
         "(as node_exporter's flag of that name)", _check_switch, switch=True),
    *(Flag(f"--collector.{c.name}", "on" if c.default else "off", f"collector: {c.help}", _check_collector,
           switch=True) for c in registry.COLLECTORS),
    Flag("--kubernetes.pod-resources-socket", DEFAULT_SOCKET,
         "kubelet pod-resources socket for gpu_pod_info (which pod holds each GPU); polled every 5 s while it "
         "exists; empty: off", field="pod_resources_socket"),
    Flag("--kubernetes.pod-labels", "off", "also stamp namespace/pod/container on every per-GPU series of a GPU "
         "one container holds (dcgm-exporter style; series change on every reschedule)", _check_pod_labels,
         "pod_labels", switch=True),
)
_BY_NAME = {f.name: f for f in FLAGS}


def _build_parser(full_help: bool = False) -> FlagParser:
    """The argparse view of FLAGS. A flag's parsed value is None unless given: the environment and then
    the default are applied by _setting, so a bad value can be reported under the name it was given."""
    p = FlagParser(
        prog="gpu-telemetry-exporter",
        description="Prometheus exporter sampling NVIDIA GPUs (NVML) and host CPU (procfs) several times a second. "
        f"Every flag can also be set from the environment variable named in brackets ({ENV_PREFIX}...). "
        "`gpu-telemetry-exporter diagnose --help`: why the RTF jittered in a past window, from Prometheus.",
    )
    for f in FLAGS:
        about = f.help if isinstance(f.help, str) else f.help() if full_help else ""
        about = f"{about} [{env_name(f.name)}] (default: {f.default})".replace("%", "%%")
        if f.switch:
            p.add_argument(f.name, action=argparse.BooleanOptionalAction, dest=f.name, default=None, help=about)
        else:
            p.add_argument(f.name, dest=f.name, default=None, help=about,
                           metavar=f.name.lstrip("-").replace("-", "_").upper())
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _attach_dash_values(argv: Sequence[str]) -> list[str]:
    """`--sample.interval -1s`: argparse takes '-1s' for an option and says only "expected one argument".
    Hand such a value to its flag (as --sample.interval=-1s) so the value's own check says what is wrong."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        flag = _BY_NAME.get(argv[i])
        if flag is not None and not flag.switch and value.startswith("-") and not value.startswith("--"):
            out.append(f"{argv[i]}={value}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _setting(f: Flag, given: Any) -> _Setting:
    """The command line, else the flag's environment variable, else the default ("default" for a collector,
    whose default depends on --collector.disable-defaults)."""
    if given is not None:
        return _Setting(f.name, ("on" if given else "off") if f.switch else given, None)
    env = env_name(f.name)
    if env in os.environ:
        return _Setting(f.name, os.environ[env], env)
    return _Setting(f.name, "default" if f.check is _check_collector else f.default, None)


def parse_config(argv: Sequence[str] | None = None) -> Config:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(full_help=any(a in ("-h", "--help") for a in argv))
    given = vars(parser.parse_args(_attach_dash_values(argv)))
    values: dict[str, Any] = {}
    try:
        for f in FLAGS:
            values[f.name] = f.check(_setting(f, given[f.name]), values)
    except ValueError as exc:
        parser.error(str(exc))
    collectors = frozenset(c.name for c in registry.COLLECTORS if values[f"--collector.{c.name}"])
    return Config(collectors=collectors, **{f.field: values[f.name] for f in FLAGS if f.field})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per GPU_EXPORTER_* variable that names no flag (a typo would otherwise go unnoticed)."""
    known = [env_name(f.name) for f in FLAGS]
    out = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            match = close_match(name, known)
            out.append(f"{name[:100]} names no flag and is ignored" + (f"; did you mean {match}?" if match else ""))
    return out


def _web_config(path: str, subject: str) -> WebConfigWatcher:
    from exporter.web.config import WebConfigError, WebConfigWatcher

    """The watcher for a web config file; ValueError naming `subject` (the flag or variable) if it is bad."""
    try:
        return WebConfigWatcher(path)
    except WebConfigError as exc:
        raise ValueError(f"{subject}: {exc}") from None


def _host_source(cfg: Config) -> Any:
    """The host CPU as read from procfs, or simulated busy where a --fake-scenario asks for it."""
    if cfg.fake_scenario:
        from exporter.fake.scenarios import host_source

        return host_source(cfg.fake_scenario, cfg.procfs)
    return ProcfsSource(cfg.procfs)


def _nvml_module(cfg: Config) -> tuple[Any, str]:
    if cfg.fake_gpus_from:
        from exporter.fake.smi import SmiNvml

        return SmiNvml(_smi_dump(cfg.fake_gpus_from, cfg.fake_gpus_from)), "fake"
    if cfg.fake_scenario:
        from exporter.fake.scenarios import ScenarioNvml

        return ScenarioNvml(cfg.fake_scenario, cfg.fake_gpus), "fake"
    if cfg.fake_gpus:
        from exporter.fake.nvml import FakeGpuSpec, FakeNvml

        # Nothing alarming unless asked: XIDs come only with --fake-scenario xids.
        churn: dict[str, Any] = {"batch_period_s": cfg.fake_churn, "batch_new_pid": True} if cfg.fake_churn else {}
        specs = [FakeGpuSpec(mig_profiles=cfg.fake_mig if i == 0 else (), **churn) for i in range(cfg.fake_gpus)]
        return FakeNvml(specs=specs), "fake"
    try:
        import pynvml
    except ImportError:
        return None, "absent"
    return pynvml, "real"


def _subset(only: frozenset[str], snapshot: SnapshotCollector,
            others: Iterable[Any]) -> Callable[[], Iterable[Metric]]:
    """A collect[] scrape's families: the selected groups of the snapshot collector, and the exporter's own
    process_* and exporter_http_* families (node_exporter keeps its own metrics in a filtered scrape)."""
    def families() -> Iterable[Metric]:
        yield from snapshot.collect(only)
        for other in others:
            yield from other.collect()
    return families


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


M_ARENA_MAX = -8  # glibc's mallopt() parameter (malloc.h)
MALLOC_ARENAS = 2


def _fewer_malloc_arenas() -> None:
    """At most MALLOC_ARENAS glibc malloc arenas, unless MALLOC_ARENA_MAX says otherwise. glibc gives a
    thread that finds the arenas busy one of its own (up to 8 per core), and each keeps its freed pages;
    our threads allocate under the GIL, so more arenas buy no speed here. 8 GPUs on the stand-in: 0.3 to
    0.7 MB less RSS after 20 000 scrapes (three pairs). Before any thread starts; nothing off glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes  # (pynvml loads it anyway)

    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): its allocator, as it is
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["diagnose"]:
        from exporter.diagnosis.prometheus import main as diagnose_main

        return diagnose_main(argv[1:])
    cfg = parse_config(argv)
    # A thread waiting for the GIL gets it after the switch interval (5 ms by default): while a scrape
    # renders, the sampler would start its tick up to 5 ms late. 1 ms keeps ticks on time.
    sys.setswitchinterval(0.001)
    _fewer_malloc_arenas()
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
    for warning in unknown_variables(os.environ):
        log.warning("%s", warning)
    history = new_history(cfg.history_window, cfg.sample_interval) if cfg.history_window else None
    on = cfg.collectors
    need = registry.needs(on)  # which sources to build: what the enabled collectors need (pipeline/collectors.py)
    pods = (PodResourcesPoller(cfg.pod_resources_socket)
            if cfg.pod_resources_socket and "kubelet" in need else None)
    specs = GPU_SCALARS + NVLINK_PER_LINK_SCALARS  # each row read and rendered only if its collector is on
    sampler = Sampler(NvmlSource(*_nvml_module(cfg), specs=registry.rows_enabled(on, specs),
                                 reads=registry.nvml_reads(on)),
                      _host_source(cfg), interval=cfg.sample_interval,
                      cgroup=_cgroup_source(cfg) if "host.cgroup" in need else None,
                      shm_path=(cfg.shm_path or None) if "host.shm" in need else None,
                      attributor=ProcessAttributor(cfg.procfs) if "host.processes" in need else None,
                      history=history, pods=pods.latest_reading if pods else None)
    snapshot_collector = SnapshotCollector(lambda: sampler.snapshot, node_name=cfg.node_name, specs=specs,
                                           collectors=on, pod_labels=cfg.pod_labels)
    process_collector = ProcessCollector(registry=None)  # process_*: the exporter's own CPU and memory cost
    collector_registry = CollectorRegistry(auto_describe=False)
    server = make_server(sock, collector_registry, sampler.health, cfg.telemetry_path, history=history,
                         generation=lambda: sampler.snapshot, web_config=web_config,
                         limits=Limits(max_requests=cfg.max_requests, max_connections=cfg.max_connections),
                         select=lambda names: _subset(registry.select(names, on), snapshot_collector,
                                                      (process_collector, server_collector)))
    server_collector = ServerCollector(server)
    for c in (snapshot_collector, process_collector, server_collector):
        collector_registry.register(c)

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
    # The socket is bound: connections wait in its backlog while the first tick runs (bounded, in case
    # NVML's initialisation hangs; /healthz then says no tick yet).
    sampler.wait_first_tick(FIRST_TICK_WAIT_S)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    backend = (f"{cfg.fake_gpus} simulated GPU{'s' if cfg.fake_gpus != 1 else ''}" if cfg.fake_gpus
               else "NVML through nvidia-ml-py")
    if cfg.fake_gpus_from:
        backend = f"simulated from the nvidia-smi dump {cfg.fake_gpus_from}"
    scheme = "https" if web_config and web_config.ssl_context else "http"
    auth = " with basic auth" if web_config and web_config.auth.enabled else ""
    base = f"{scheme}://{shown}:{port}"
    log.info("gpu-telemetry-exporter %s listening on %s/ (live view; metrics at %s%s)%s (sampling every %gs; "
             "GPUs: %s)", __version__, base, base, cfg.telemetry_path, auth, cfg.sample_interval, backend)
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
