#!/usr/bin/env python3
"""What hostile clients cost the exporter (issue #13): memory, /healthz and scrape latency, auth timing.

    .venv/bin/python bench/hostile.py            # ~10 minutes, refreshes its sections of bench/hostile-results.json
    .venv/bin/python bench/hostile.py kubelet    # one scenario (or several) by name: prints, writes nothing
    .venv/bin/python bench/hostile.py kubelet announces_4gb behaving   # some of its actors only

Six scenarios, each against a fresh exporter on 127.0.0.1 (simulated GPUs):
- tls: HTTPS, 8 GPUs, default --web.max-connections (512): 300 TLS connections that finish the
  handshake and go idle, then 1 500 TCP connections that send nothing. Peak and settled RSS, /healthz and
  /metrics latency while they are open, RSS 15 s after they close.
- auth: basic auth at bcrypt cost 5 (htpasswd -nB, its default): median answer time for a known user with a
  wrong password against an unknown user; then 16 clients guessing while five valid users log in for
  the first time (not cached): their statuses and latency.
- samples: 64 GPUs, 40 ms ticks, 1 minute of history (1 500 rows, as 5 minutes at 200 ms): 40 clients
  asking /api/v1/samples?window=1m back to back for 10 s. Peak RSS growth, /healthz latency meanwhile.
- guessers (issue #22.3, `bench/hostile.py guessers`, ~1 minute): bcrypt cost 10; 64 keep-alive
  connections each sending a new invented user name and a wrong password, from 127.0.0.2 alone, from
  127.0.0.2..9 and from 127.0.0.2..33; meanwhile 6 first logins (each a user not yet cached) from
  127.0.0.1: their statuses and latency.
- kubelet (issue #22): the exporter (8 GPUs, 200 ms ticks) in a cgroup with the DaemonSet's limits (128 MiB,
  250m; run as root, cgroup v1 or v2; skipped with the reason printed where none can be made), beside
  each hostile kubelet actor in turn (KUBELET_ACTORS: one function each) for 20 s while a valid scraper
  scrapes every 200 ms: peak RSS, OOM kills, tick lateness p99, the scraper's p99 and status codes.
- daemonset (issue #22, `bench/hostile.py daemonset`, ~90 s): everything at once, as the issue's done-when
  asks. The exporter (8 GPUs, 200 ms ticks, basic auth at bcrypt cost 10 and a rate_limit, the pod-resources
  socket at a hostile kubelet) in the DaemonSet's 128 MiB / 250m cgroup, while a kubelet announces 4 GB on
  every List and then (half-way) answers a well-formed 100 000-pod List; 32 guessers inventing user names on
  keep-alive connections from 127.0.0.2..9; an unauthenticated flood from 127.0.0.10..17; malformed
  requests whose clients vanish; and a valid scraper (a first login, then a scrape every 200 ms) from
  127.0.0.1. Then `gpu-telemetry-exporter diagnose` once against each hostile fake Prometheus answer.
  Prints RSS peak, OOM kills, tick lateness p99, the scraper's first-login latency, p99 and statuses, the
  machine's load average.

Results: a run with no arguments, or with `--write`, updates the sections it ran in hostile-results.json and
keeps the others as committed; a run naming scenarios without `--write` prints and writes nothing.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import bcrypt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from exporter.fake.nvml import fake_uuid  # noqa: E402
from testkit.processes import REPO, ExporterProcess, stop_process  # noqa: E402
from testkit.loadgen import (basic_auth, guessers, metric_values, open_silent, open_tls_idle,  # noqa: E402
                             percentile, repeaters, rss_bytes, timed_get, tls_client_context)

MB = 1024 * 1024


def make_cert(d: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(d / "s.key"), "-out",
                    str(d / "s.crt")], check=True, capture_output=True)


def latencies(url: str, n: int, pause: float, **kw) -> tuple[list[object], list[float]]:
    statuses, times = [], []
    for _ in range(n):
        s, t = timed_get(url, **kw)
        statuses.append(s)
        times.append(t)
        time.sleep(pause)
    return statuses, times


def summary(statuses: list[object], times: list[float]) -> dict:
    return {"n": len(times), "ok": statuses.count(200), "p50_ms": round(percentile(times, 0.5) * 1000, 1),
            "max_ms": round(max(times) * 1000, 1)}


def tls_scenario(d: Path) -> dict:
    (d / "tls.yml").write_text(f"tls_server_config: {{cert_file: {d}/s.crt, key_file: {d}/s.key}}\n")
    e = ExporterProcess("--fake-gpus", "8", "--web.config.file", str(d / "tls.yml"))
    ctx = tls_client_context()
    try:
        url = f"https://127.0.0.1:{e.port}"
        time.sleep(2)
        base = rss_bytes(e.proc.pid)
        idle = open_tls_idle(e.port, 300)
        silent = open_silent(e.port, 1500)
        time.sleep(2)
        health = latencies(url + "/healthz", 10, 0.2, context=ctx)
        scrape = latencies(url + "/metrics", 10, 0.2, context=ctx)
        loaded = rss_bytes(e.proc.pid)
        for s in idle + silent:
            s.close()
        time.sleep(15)
        return {"rss_before_mb": base / MB, "rss_under_load_mb": loaded / MB,
                "rss_peak_mb": rss_bytes(e.proc.pid, "VmHWM") / MB, "rss_after_mb": rss_bytes(e.proc.pid) / MB,
                "healthz": summary(*health), "metrics": summary(*scrape)}
    finally:
        stop_process(e.proc)


def auth_scenario(d: Path) -> dict:
    users = {"prometheus": "right"} | {f"first{i}": f"pw{i}" for i in range(5)}
    lines = [f"  {u}: {bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}" for u, p in users.items()]
    (d / "auth.yml").write_text("basic_auth_users:\n" + "\n".join(lines) + "\n")
    e = ExporterProcess("--fake-gpus", "1", "--web.config.file", str(d / "auth.yml"))
    try:
        url = e.url + "/metrics"
        time.sleep(1)
        known = [timed_get(url, headers=basic_auth("prometheus", f"wrong{i}"))[1] for i in range(15)]
        unknown = [timed_get(url, headers=basic_auth(f"nobody{i}", "wrong"))[1] for i in range(15)]
        first_logins = []
        with guessers(url, 16) as guess:
            time.sleep(2)
            for i in range(5):
                first_logins.append(timed_get(url, headers=basic_auth(f"first{i}", f"pw{i}")))
                time.sleep(0.5)
        return {"known_user_wrong_password_ms": round(statistics.median(known) * 1000, 1),
                "unknown_user_ms": round(statistics.median(unknown) * 1000, 1),
                "first_logins_under_16_guessers": summary([s for s, _ in first_logins], [t for _, t in first_logins]),
                "first_login_statuses": [s for s, _ in first_logins], "guesses": len(guess.statuses)}
    finally:
        stop_process(e.proc)


def guessers_scenario(d: Path) -> dict:
    from testkit.crowds import KeepAliveCrowd, basic, get_request, guess, timed_request

    users = {f"first{i}": f"pw{i}" for i in range(6)}
    lines = [f"  {u}: {bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=10)).decode()}" for u, p in users.items()]
    (d / "guess.yml").write_text("basic_auth_users:\n" + "\n".join(lines) + "\n")
    results = {}
    for label, addresses, per_address in (("1_address_x64", 1, 64), ("8_addresses_x8", 8, 8),
                                          ("32_addresses_x2", 32, 2)):
        e = ExporterProcess("--fake-gpus", "1", "--web.config.file", str(d / "guess.yml"))
        try:
            time.sleep(1)
            logins = []
            with KeepAliveCrowd(e.port, guess, tuple(f"127.0.0.{2 + i}" for i in range(addresses)),
                                per_address) as crowd:
                time.sleep(2)
                for user, password in users.items():
                    logins.append(timed_request(e.port, get_request(authorization=basic(user, password))))
                    time.sleep(0.5)
            results[label] = {"first_login_statuses": [s for s, _ in logins],
                              "first_login_ms": [round(t * 1000) for _, t in logins],
                              "guesses": {str(k): v for k, v in crowd.statuses.items()}}
        finally:
            stop_process(e.proc)
        print("  guessers", label, json.dumps(results[label]), flush=True)
    return results


def samples_scenario() -> dict:
    e = ExporterProcess("--fake-gpus", "64", "--sample.interval", "40ms", "--history.window", "1m")
    try:
        e.wait_for_sample()
        time.sleep(61)  # a full window of history
        base = rss_bytes(e.proc.pid)
        peak_before = rss_bytes(e.proc.pid, "VmHWM")
        with repeaters(e.url + "/api/v1/samples?window=1m", 40) as crowd:
            health = latencies(e.url + "/healthz", 40, 0.25, timeout=30)
        statuses = crowd.statuses
        time.sleep(5)
        return {"rss_before_mb": base / MB, "rss_peak_mb": rss_bytes(e.proc.pid, "VmHWM") / MB,
                "peak_growth_mb": (rss_bytes(e.proc.pid, "VmHWM") - max(base, peak_before)) / MB,
                "rss_after_mb": rss_bytes(e.proc.pid) / MB, "requests": len(statuses),
                "ok": statuses.count(200), "busy_503": statuses.count(503), "healthz": summary(*health)}
    finally:
        stop_process(e.proc)


# ---- kubelet: hostile actors at the pod-resources socket, the exporter under the DaemonSet's limits --------
class LimitCgroup:
    """A child cgroup with a memory and a CPU limit (v2, or v1's memory and cpu hierarchies). `prefix` is a
    command line that moves itself into it and execs the rest. Raises OSError where none can be made."""

    def __init__(self, name: str, memory: int, cpu_millis: int) -> None:
        root = Path("/sys/fs/cgroup")
        period = 100_000
        if (root / "cgroup.controllers").exists():  # v2
            self.dirs = [root / name]
            self.dirs[0].mkdir()
            (root / "cgroup.subtree_control").write_text("+memory +cpu")
            (self.dirs[0] / "memory.max").write_text(str(memory))
            (self.dirs[0] / "memory.swap.max").write_text("0")
            (self.dirs[0] / "cpu.max").write_text(f"{period * cpu_millis // 1000} {period}")
            self.peak_file, self.oom_file = self.dirs[0] / "memory.peak", self.dirs[0] / "memory.events"
        else:  # v1
            mem, cpu = root / "memory" / name, root / "cpu" / name
            self.dirs = []
            for d in (mem, cpu):
                d.mkdir()
                self.dirs.append(d)
            (mem / "memory.limit_in_bytes").write_text(str(memory))
            try:
                (mem / "memory.memsw.limit_in_bytes").write_text(str(memory))  # no swapping around the limit
            except OSError:
                pass
            (cpu / "cpu.cfs_period_us").write_text(str(period))
            (cpu / "cpu.cfs_quota_us").write_text(str(period * cpu_millis // 1000))
            self.peak_file, self.oom_file = mem / "memory.max_usage_in_bytes", mem / "memory.oom_control"
        procs = " ".join(f"{d}/cgroup.procs" for d in self.dirs)
        self.prefix = ("sh", "-c", f'for f in {procs}; do echo $$ > "$f" || exit 97; done; exec "$@"', "sh")

    def peak_bytes(self) -> int:
        return int(self.peak_file.read_text().split()[0]) if self.peak_file.exists() else -1

    def oom_kills(self) -> int:
        for line in self.oom_file.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def cpu_stats(self) -> dict:
        """CFS throttling over the cgroup's life: periods, throttled periods, time throttled, CPU used."""
        cpu = self.dirs[-1]
        stat = dict(line.split() for line in (cpu / "cpu.stat").read_text().splitlines())
        throttled_ms = int(stat["throttled_usec"]) / 1000 if "throttled_usec" in stat else int(stat["throttled_time"]) / 1e6
        return {"periods": int(stat["nr_periods"]), "throttled_periods": int(stat["nr_throttled"]),
                "throttled_ms": round(throttled_ms)}

    def remove(self) -> None:
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                pass


def start_kubelet(*args: str) -> subprocess.Popen:
    """tests/fake_kubelet.py as its own process (so its memory is not the exporter's)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_kubelet.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"serving"
    return proc


def allocations_kubelet(sock: Path, allocations: dict) -> subprocess.Popen:
    state = sock.with_suffix(".json")
    state.write_text(json.dumps(allocations))
    return start_kubelet("--socket", str(sock), "--state", str(state))


# One function per hostile actor: (socket path) -> the process at it.
def announces_4gb(sock: Path) -> subprocess.Popen:
    return start_kubelet("--socket", str(sock), "--announce", "4000000000")


def announces_100mb(sock: Path) -> subprocess.Popen:
    return start_kubelet("--socket", str(sock), "--announce", str(100 << 20))


def pods_100000_on_gpu0(sock: Path) -> subprocess.Popen:
    return allocations_kubelet(sock, {f"tts/synth-{i:06d}/model": {"nvidia.com/gpu": [fake_uuid(0)]}
                                      for i in range(100_000)})


def pods_10000_on_gpu0(sock: Path) -> subprocess.Popen:  # fits the reply cap: cut by the per-device bound
    return allocations_kubelet(sock, {f"tts/synth-{i:05d}/model": {"nvidia.com/gpu": [fake_uuid(0)]}
                                      for i in range(10_000)})


def tiny_ids_at_the_cap(sock: Path) -> subprocess.Popen:  # the most entries a reply under the cap can hold
    return allocations_kubelet(sock, {"tts/synth-0/model": {"nvidia.com/gpu": [f"GPU-{i:x}" for i in range(190_000)]}})


def bogus_ids_60000(sock: Path) -> subprocess.Popen:
    return allocations_kubelet(sock, {"tts/synth-0/model": {"nvidia.com/gpu": [f"GPU-bogus-{i:05d}"
                                                                               for i in range(60_000)]}})


def names_10000_chars(sock: Path) -> subprocess.Popen:
    return allocations_kubelet(sock, {f"tts/{'p' * 10_000}{g}/model": {"nvidia.com/gpu": [fake_uuid(g)]}
                                      for g in range(8)})


def behaving(sock: Path) -> subprocess.Popen:  # the baseline: a real node's List
    return allocations_kubelet(sock, {f"tts/synth-{g}/model": {"nvidia.com/gpu": [fake_uuid(g)]} for g in range(8)})


KUBELET_ACTORS: dict[str, Callable[[Path], subprocess.Popen]] = {
    f.__name__: f for f in (behaving, announces_4gb, announces_100mb, pods_100000_on_gpu0, pods_10000_on_gpu0,
                            bogus_ids_60000, tiny_ids_at_the_cap, names_10000_chars)}


def lateness_p99(before: dict, after: dict) -> float | None:
    """Upper bound of the bucket holding the 99th percentile of tick lateness between two scrapes."""
    def delta(le: str) -> float:
        key = ("exporter_sample_lateness_seconds_bucket", (("le", le),))
        return after.get(key, 0) - before.get(key, 0)
    les = sorted({dict(k[1])["le"] for k in after if k[0] == "exporter_sample_lateness_seconds_bucket"},
                 key=float)
    total = delta("+Inf")
    return next((float(le) for le in les if total and delta(le) >= 0.99 * total), None)


def values_or_none(url: str) -> dict:
    """The exporter's samples, or {} where it does not answer (OOM-killed, or too slow for 10 s)."""
    try:
        return metric_values(url)
    except Exception:  # noqa: BLE001 (a dead or drowning exporter is a result here, not a bench failure)
        return {}


def kubelet_actor_run(d: Path, name: str, actor: Callable[[Path], subprocess.Popen], seconds: float) -> dict:
    sock = d / f"{name}.sock"
    kubelet = actor(sock)
    cg = None
    e = None
    try:
        cg = LimitCgroup(f"gte-bench-{os.getpid()}-{name}", 128 << 20, 250)
        e = ExporterProcess("--fake-gpus", "8", "--kubernetes.pod-resources-socket", str(sock), prefix=cg.prefix)
        e.wait_for_sample(timeout=30)
        time.sleep(6)  # the first poll and the next
        before = values_or_none(e.url)
        statuses, times = [], []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s, t = timed_get(e.url + "/metrics", timeout=5)
            statuses.append(s)
            times.append(t)
            time.sleep(0.2)
        after = values_or_none(e.url) if e.proc.poll() is None else {}
        return {"alive": e.proc.poll() is None, "oom_kills": cg.oom_kills(),
                "rss_peak_mb": round(rss_bytes(e.proc.pid, "VmHWM") / MB, 1) if e.proc.poll() is None else None,
                "cgroup_peak_mb": round(cg.peak_bytes() / MB, 1),
                "tick_lateness_p99_ms": (lambda v: None if v is None else v * 1000)(lateness_p99(before, after)),
                "scrape_p99_ms": round(percentile(times, 0.99) * 1000, 1),
                "statuses": {str(k): statuses.count(k) for k in set(statuses)},
                "pod_resources_up": after.get(("exporter_pod_resources_up", ())),
                "left_out": after.get(("exporter_pod_resources_left_out", ())),
                "gpu_pod_info": sum(1 for k in after if k[0] == "gpu_pod_info"),
                "gpu_up": sum(1 for k in after if k[0] == "gpu_up")}
    finally:
        if e is not None:
            e.stop()
        stop_process(kubelet)
        if cg is not None:
            cg.remove()


def kubelet_scenario(d: Path, seconds: float = 20.0) -> dict:
    try:
        LimitCgroup(f"gte-bench-{os.getpid()}-probe", 128 << 20, 250).remove()
    except OSError as exc:
        print(f"kubelet: skipped, no cgroup with the DaemonSet's limits can be made here: {exc}", flush=True)
        return {"skipped": str(exc)}
    out = {}
    chosen = [a for a in sys.argv[1:] if a in KUBELET_ACTORS] or list(KUBELET_ACTORS)  # `kubelet behaving ...`
    for name in chosen:
        out[name] = kubelet_actor_run(d, name, KUBELET_ACTORS[name], seconds)
        print(" ", name, json.dumps(out[name]), flush=True)
    return out


# ---- daemonset: all of issue #22's hostile neighbours at once, under the DaemonSet's limits ----------------
def authed_values(url: str, headers: dict) -> dict:
    """The exporter's samples read with credentials, or {} where it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    from testkit.processes import http_get
    try:
        status, _, body = http_get(url + "/metrics", timeout=10, headers=headers)
    except Exception:  # noqa: BLE001 (a dead exporter is a result here)
        return {}
    if status != 200:
        return {}
    return {(m.name, tuple(sorted(m.labels.items()))): m.value
            for f in text_string_to_metric_families(body.decode()) for m in f.samples}


def lateness_share(before: dict, after: dict, le: str) -> float | None:
    key = ("exporter_sample_lateness_seconds_bucket", (("le", le),))
    inf = ("exporter_sample_lateness_seconds_bucket", (("le", "+Inf"),))
    total = after.get(inf, 0) - before.get(inf, 0)
    return round((after.get(key, 0) - before.get(key, 0)) / total, 4) if total else None


class BadRequests:
    """A thread sending malformed requests and vanishing (half with a reset), back to back."""

    def __init__(self, port: int) -> None:
        import threading

        from testkit.crowds import BAD_REQUESTS, send_and_vanish
        self.sent = 0
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.is_set():
                send_and_vanish(port, BAD_REQUESTS[self.sent % len(BAD_REQUESTS)], reset=self.sent % 2 == 0)
                self.sent += 1
                time.sleep(0.01)
        self._thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> BadRequests:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def hostile_diagnose() -> dict:
    """`gpu-telemetry-exporter diagnose` once against each hostile answer of tests' FakePrometheus: exit
    status and whether stderr held a traceback."""
    from tests.test_untrusted_input import AT, FakePrometheus, set_value

    many = [{"metric": {"gpu": str(i)}, "values": [[AT, "1"]]} for i in range(80_000)]
    cases = {"inf_memory_ratio": {"gpu_memory_used_ratio": set_value("+Inf")},
             "nan_clock_events": {"gpu_clock_event_seconds_total": set_value("NaN")},
             "escape_in_gpu_label": {"gpu_info": set_value("1", {"gpu": "\x1b[31m0"})},
             "nan_le_label": {"exporter_sample_lateness_seconds_bucket": set_value("+Inf", {"le": "NaN"})},
             "80000_series": {"gpu_memory_used_ratio": lambda result: many}}
    fake = FakePrometheus()
    out = {}
    try:
        for name, override in cases.items():
            fake.override = override
            r = subprocess.run([sys.executable, "-m", "exporter", "diagnose", "--prometheus", fake.url,
                                "--instance", "x:1", "--at", str(AT), "--json"], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
            out[name] = {"exit": r.returncode, "traceback": "Traceback" in r.stderr + r.stdout,
                         "stderr_lines": r.stderr.count("\n")}
        fake.override = {"": lambda result: {"not": "a list"}}  # a malformed answer to every query
        r = subprocess.run([sys.executable, "-m", "exporter", "diagnose", "--prometheus", fake.url, "--instance",
                            "x:1", "--at", str(AT), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
        out["malformed_result"] = {"exit": r.returncode, "traceback": "Traceback" in r.stderr + r.stdout,
                                   "stderr_lines": r.stderr.count("\n")}
    finally:
        fake.close()
    return out


def daemonset_scenario(d: Path, seconds: float = 60.0) -> dict:
    """`daemonset without=flood,guessers,bad,kubelet` leaves those actors out (to tell whose cost is whose);
    `every=1` scrapes every second instead of 200 ms; `rate=1s` sets rate_limit's interval (default 100ms)."""
    import contextlib

    from testkit.crowds import KeepAliveCrowd, get_request, guess

    without = {w for a in sys.argv[1:] if a.startswith("without=") for w in a[8:].split(",")}
    options = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    every, rate = float(options.get("every", "0.2")), options.get("rate", "100ms")

    try:
        cg = LimitCgroup(f"gte-bench-{os.getpid()}-daemonset", 128 << 20, 250)
    except OSError as exc:
        print(f"daemonset: skipped, no cgroup with the DaemonSet's limits can be made here: {exc}", flush=True)
        return {"skipped": str(exc)}
    load_before = os.getloadavg()
    users = {"prometheus": "scrape-pw", "bench": "bench-pw"}  # bench: the bench's own reads of the metrics
    lines = [f"  {u}: {bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=10)).decode()}" for u, p in users.items()]
    (d / "daemonset.yml").write_text(f"rate_limit: {{interval: {rate}, burst: 10}}\nbasic_auth_users:\n"
                                     + "\n".join(lines) + "\n")
    sock = d / "daemonset.sock"
    many_pods = d / "daemonset-100000.json"
    many_pods.write_text(json.dumps({f"tts/synth-{i:06d}/model": {"nvidia.com/gpu": [fake_uuid(0)]}
                                     for i in range(100_000)}))
    kubelet = announces_4gb(sock) if "kubelet" not in without else behaving(sock)
    e = None
    bench_auth, scraper_auth = basic_auth("bench", "bench-pw"), basic_auth("prometheus", "scrape-pw")
    try:
        e = ExporterProcess("--fake-gpus", "8", "--sample.interval", "200ms", "--web.config.file",
                            str(d / "daemonset.yml"), "--kubernetes.pod-resources-socket", str(sock), prefix=cg.prefix)
        deadline = time.monotonic() + 30
        while True:
            before = authed_values(e.url, bench_auth)
            if any(k[0] == "gpu_up" for k in before):
                break
            assert time.monotonic() < deadline and e.proc.poll() is None, e.log()[-2000:]
            time.sleep(0.2)
        statuses: list[object] = []
        times: list[float] = []
        guessing = KeepAliveCrowd(e.port, guess, tuple(f"127.0.0.{i}" for i in range(2, 10)), 4)
        flood = KeepAliveCrowd(e.port, get_request, tuple(f"127.0.0.{i}" for i in range(10, 18)), 4)
        bad = BadRequests(e.port)
        with contextlib.ExitStack() as actors:
            for name, actor in (("guessers", guessing), ("flood", flood), ("bad", bad)):
                if name not in without:
                    actors.enter_context(actor)
            time.sleep(2)  # the crowds at full pace before the scraper's first login
            first_login = timed_get(e.url + "/metrics", headers=scraper_auth, timeout=15)
            start = time.monotonic()
            switched = False
            while (now := time.monotonic()) < start + seconds:
                if not switched and now >= start + seconds / 2 and "kubelet" not in without:  # the kubelet now answers 100 000 pods
                    stop_process(kubelet)
                    kubelet = start_kubelet("--socket", str(sock), "--state", str(many_pods))
                    switched = True
                s, t = timed_get(e.url + "/metrics", headers=scraper_auth, timeout=10)
                statuses.append(s)
                times.append(t)
                time.sleep(max(0.0, every - t))
            crowds = {"guesses": dict(guessing.statuses), "flood": dict(flood.statuses), "bad_requests": bad.sent}
        alive = e.proc.poll() is None
        cpu = cg.cpu_stats()
        if alive:  # user + system time of the exporter
            fields = Path(f"/proc/{e.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu["cpu_s"] = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
        after = authed_values(e.url, bench_auth) if alive else {}
        log = e.log()
        p99 = lateness_p99(before, after)
        out = {"load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()],
               "without": sorted(without), "scrape_every_s": every, "rate_limit_interval": rate, "alive": alive, "oom_kills": cg.oom_kills(), "cpu": cpu,
               "rss_peak_mb": round(rss_bytes(e.proc.pid, "VmHWM") / MB, 1) if alive else None,
               "cgroup_peak_mb": round(cg.peak_bytes() / MB, 1),
               "ticks": (after.get(("exporter_sample_lateness_seconds_count", ()), 0)
                         - before.get(("exporter_sample_lateness_seconds_count", ()), 0)),
               "tick_lateness_p99_ms": None if p99 is None else p99 * 1000,
               "ticks_within_10ms": lateness_share(before, after, "0.01"),
               "ticks_within_20ms": lateness_share(before, after, "0.02"),
               "ticks_within_50ms": lateness_share(before, after, "0.05"),
               "first_login_status": first_login[0], "first_login_ms": round(first_login[1] * 1000, 1),
               "scrapes": len(times), "scrape_p50_ms": round(percentile(times, 0.5) * 1000, 1),
               "scrape_p99_ms": round(percentile(times, 0.99) * 1000, 1),
               "scrape_max_ms": round(max(times) * 1000, 1),
               "statuses": {str(k): statuses.count(k) for k in set(statuses)},
               "pod_resources_up": after.get(("exporter_pod_resources_up", ())),
               "gpu_up": sum(1 for k in after if k[0] == "gpu_up"),
               "log_list_refused": log.count("List refused"),
               "log_errors": log.count(" ERROR "), "log_tracebacks": log.count("Traceback"),
               **crowds}
    finally:
        if e is not None:
            e.stop()
        stop_process(kubelet)
        cg.remove()
    if without:
        return out
    out["diagnose"] = hostile_diagnose()
    out["diagnose_tracebacks"] = sum(c["traceback"] for c in out["diagnose"].values())
    out["done_when"] = {  # issue #22's criteria
        "rss_peak_under_128mb": out["alive"] and out["oom_kills"] == 0 and out["rss_peak_mb"] < 128,
        "tick_lateness_p99_within_20ms": out["tick_lateness_p99_ms"] is not None and out["tick_lateness_p99_ms"] <= 20,
        "first_login_and_every_scrape_200": out["first_login_status"] == 200 and set(out["statuses"]) == {"200"},
        "diagnose_no_traceback": out["diagnose_tracebacks"] == 0 and out["log_tracebacks"] == 0}
    return out


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_cert(d)
        for name, run in (("tls", lambda: tls_scenario(d)), ("auth", lambda: auth_scenario(d)),
                          ("samples", samples_scenario), ("guessers", lambda: guessers_scenario(d)),
                          ("kubelet", lambda: kubelet_scenario(d)), ("daemonset", lambda: daemonset_scenario(d))):
            named = [a for a in sys.argv[1:] if not a.startswith("--") and "=" not in a]
            if named and name not in named:
                continue
            key = " ".join([name] + [a for a in sys.argv[1:] if "=" in a]) if name == "daemonset" else name
            results[key] = run()
            print(key, json.dumps(results[key], default=str), flush=True)
    out = HERE / "hostile-results.json"
    if len(sys.argv) == 1 or "--write" in sys.argv[1:]:  # refresh the sections run, keep the others
        committed = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps(committed | results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
