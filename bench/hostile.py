#!/usr/bin/env python3
"""What hostile clients cost the exporter (issue #13): memory, /healthz and scrape latency, auth timing.

    .venv/bin/python bench/hostile.py            # ~3 minutes, writes bench/hostile-results.json

Three scenarios, each against a fresh exporter on 127.0.0.1 (simulated GPUs):
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
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bcrypt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from testkit.processes import ExporterProcess, stop_process  # noqa: E402
from testkit.loadgen import (basic_auth, guessers, open_silent, open_tls_idle, percentile, repeaters,  # noqa: E402
                           rss_bytes, timed_get, tls_client_context)

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


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_cert(d)
        for name, run in (("tls", lambda: tls_scenario(d)), ("auth", lambda: auth_scenario(d)),
                          ("samples", samples_scenario), ("guessers", lambda: guessers_scenario(d))):
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
