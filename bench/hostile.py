#!/usr/bin/env python3
"""What hostile clients cost the exporter (issue #13): memory, /healthz and scrape latency, auth timing.

    .venv/bin/python bench/hostile.py            # ~3 minutes, writes bench/hostile-results.json
    .venv/bin/python bench/hostile.py kubelet    # one scenario (or several) by name: prints, writes nothing
    .venv/bin/python bench/hostile.py kubelet announces_4gb behaving   # some of its actors only

Five scenarios, each against a fresh exporter on 127.0.0.1 (simulated GPUs):
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


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_cert(d)
        for name, run in (("tls", lambda: tls_scenario(d)), ("auth", lambda: auth_scenario(d)),
                          ("samples", samples_scenario), ("guessers", lambda: guessers_scenario(d)),
                          ("kubelet", lambda: kubelet_scenario(d))):
            if len(sys.argv) > 1 and name not in sys.argv[1:]:
                continue
            results[name] = run()
            print(name, json.dumps(results[name], default=str), flush=True)
    out = HERE / "hostile-results.json"
    if len(sys.argv) == 1:
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
