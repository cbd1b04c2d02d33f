#!/usr/bin/env python3
"""Exporter cost and scrape latency, side by side with node_exporter, on this machine.

    .venv/bin/python bench/run.py            # full run (~10 min); prints, writes nothing
    .venv/bin/python bench/run.py --write    # the same, and refreshes the committed bench/results.json
    .venv/bin/python bench/run.py --quick    # shorter windows, for a smoke run
    .venv/bin/python bench/run.py --stand-in-only   # only the real-binding sampler CPU below (~1 min)
    .venv/bin/python bench/run.py --peers-only      # only the side-by-side below (~3 min)

A run prints its figures and writes nothing unless told to: the committed bench/results.json is the
record docs/performance.md quotes, so only `--write` replaces it; `--stand-in-only --write` and
`--peers-only --write` replace only their own sections (the rest of the file is kept as committed).
`--out PATH` writes this run's figures to PATH instead; `--quick` figures are never written to the record.

Everything runs on 127.0.0.1. The exporter runs with simulated GPUs (--fake-gpus N): each fake NVML
call costs what the fake's Python costs (~1 us, measured by bench/micro.py), in the range of a ctypes
call into libnvidia-ml for the cheap queries; no real GPU figures are recorded yet (tests/fixtures).
The sampler's CPU is also measured through the real pynvml (ctypes) against the C stand-in for
libnvidia-ml.so.1 (testkit/nvml_stub), 8 GPUs with GPM and 18 NVLink links against the same GPUs without
either, so the GPM + NVLink share of the whole exporter shows.

Peers: on the same stand-in and the same 8 GPUs, in the same run, this exporter (200 ms and 1 s),
nvitop-exporter 1.7.2 (1 s, its default; it refuses under 250 ms) and node_exporter, one after another:
idle CPU, RSS, scrape p50/p99 back to back and paced, and every ratio. nvitop-exporter is installed into
its own venv (--bench-venv, default .bench-venv, gitignored) on first use; without it (no network) that
row is skipped. The stand-in lacks some calls nvitop makes (fan, power limit, encoder...): they answer
FunctionNotFound there and nvitop exports NaN, so its figures are if anything on the cheap side.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.gpm_reader import STAND_IN  # noqa: E402  (the GPM and NVLink answers the reader bench uses)
from testkit.nvml_stub import NvmlStub, build  # noqa: E402
from testkit.processes import compile_bytecode, exposition_size, free_port, stop_process  # noqa: E402  (shared with the tests)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def wait_http(port: int, path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}{path}")


class Target:
    def __init__(self, name: str, argv: list[str], port: int, ready_path: str = "/metrics",
                 env: dict[str, str] | None = None) -> None:
        self.name, self.port = name, port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        wait_http(port, ready_path)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def rss_bytes(self) -> int:
        return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * PAGE

    def stop(self) -> None:
        stop_process(self.proc)


def exporter(gpus: int, interval: str = "200ms", stand_in: NvmlStub | None = None) -> Target:
    """The exporter on `gpus` fake GPUs, or on the stand-in's GPUs (real pynvml) when given one."""
    port = free_port()
    nvml = ["--fake-gpus", str(gpus)] if stand_in is None else []
    return Target(f"exporter {gpus} GPU", [sys.executable, "-m", "exporter", *nvml,
                                           "--sample.interval", interval, "--web.listen-address",
                                           f"127.0.0.1:{port}", "--log.level", "error"], port,
                  env=stand_in.env() if stand_in is not None else None)


def node_exporter() -> Target | None:
    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if binary is None:
        return None
    port = free_port()
    return Target("node_exporter", [binary, f"--web.listen-address=127.0.0.1:{port}"], port)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# What Prometheus 2.x sends: OpenMetrics preferred, the text format as fallback.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def scrape_series(port: int, n: int, gzip_ok: bool, pace_s: float = 0.0) -> dict:
    """n sequential scrapes over one keep-alive connection, with Prometheus's Accept header; pace_s
    apart when given. The exporter renders once per snapshot and format: back-to-back scrapes mostly
    reuse a rendered page, scrapes paced wider than the sample interval (as Prometheus's are) never do."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Accept": PROMETHEUS_ACCEPT}
    if gzip_ok:
        headers["Accept-Encoding"] = "gzip"
    times, size, body = [], 0, b""
    for _ in range(n):
        if pace_s:
            time.sleep(pace_s)
        t = time.perf_counter()
        conn.request("GET", "/metrics", headers=headers)
        r = conn.getresponse()
        body = r.read()
        times.append(time.perf_counter() - t)
        size = len(body)
        if r.getheader("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    conn.close()
    samples = exposition_size(body)[0]
    return {"median_ms": statistics.median(times) * 1e3, "p99_ms": percentile(times, 99) * 1e3,
            "bytes": size, "samples": samples, "scrapes": n, "pace_s": pace_s}


def metric(port: int, name: str) -> dict[str, float]:
    text = get(port).decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def lateness(port: int, window: float, load: bool) -> dict:
    """Tick lateness from the exporter's own histogram over a window, optionally under scrape load."""
    stop = threading.Event()

    def hammer() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            conn.request("GET", "/metrics")
            conn.getresponse().read()

    before = metric(port, "exporter_sample_lateness_seconds_bucket")
    threads = [threading.Thread(target=hammer) for _ in range(2 if load else 0)]
    for t in threads:
        t.start()
    time.sleep(window)
    stop.set()
    for t in threads:
        t.join()
    after = metric(port, "exporter_sample_lateness_seconds_bucket")
    buckets = []
    for key, value in after.items():
        le = re.search(r'le="([^"]+)"', key).group(1)
        buckets.append((float(le), value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1]

    def quantile(q: float) -> float:
        # histogram_quantile's linear interpolation inside the bucket
        rank, lo, prev = q * total, 0.0, 0.0
        for le, count in buckets:
            if count >= rank:
                if le == float("inf"):
                    return lo
                return lo + (le - lo) * ((rank - prev) / (count - prev) if count > prev else 0)
            lo, prev = le, count
        return lo

    nonempty = [le for (le, c), (_, p) in zip(buckets, [(0, 0.0)] + buckets[:-1]) if c > p]
    return {"ticks": total, "p50_ms": quantile(0.5) * 1e3, "p99_ms": quantile(0.99) * 1e3,
            "max_bucket_ms": (nonempty[-1] * 1e3) if nonempty else 0.0, "under_scrape_load": load}


def series_budget(window: float) -> dict:
    """Plain-text scrapes (no Accept header, as the budget counts them) of the exporter with 8 GPUs at
    its default collectors and of node_exporter, in the same run: the exporter's largest over `window`
    (the fake's batch job adds a process per GPU every other 10 s)."""
    t, ne = exporter(8), node_exporter()
    try:
        end, worst = time.monotonic() + window, (0, 0)
        while time.monotonic() < end:
            worst = max(worst, exposition_size(get(t.port)), key=lambda x: x[1])
            time.sleep(0.5)
        node = exposition_size(get(ne.port)) if ne else None
    finally:
        t.stop()
        if ne:
            ne.stop()
    return {"exporter_8gpu": {"samples": worst[0], "bytes": worst[1]},
            "node_exporter": {"samples": node[0], "bytes": node[1]} if node else None, "max_samples": 600}


def get(port: int) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read()
    conn.close()
    return body


def sampler_cpu(gpus: int, interval: str, window: float, stand_in: NvmlStub | None = None) -> float:
    t = exporter(gpus, interval, stand_in)
    try:
        time.sleep(2)
        c0, w0 = t.cpu_seconds(), time.monotonic()
        time.sleep(window)
        return (t.cpu_seconds() - c0) / (time.monotonic() - w0)
    finally:
        t.stop()


def stand_in_cpu(results: dict, window: float, gpus: int = 8) -> None:
    """Whole-exporter CPU at 200 ms through the real pynvml on the C stand-in: GPM and NVLink present
    (as on H100 SXM) and absent (both probed once, then not called)."""
    print(f"# sampler CPU while idle, real pynvml on the C stand-in, {gpus} GPUs at 200 ms, {window:g} s windows")
    with tempfile.TemporaryDirectory() as tmp:
        stub = NvmlStub(build(Path(tmp)), Path(tmp) / "nvml-stub.conf")
        for label, config in (("GPM + 18 NVLink links", STAND_IN),
                              ("no GPM, no NVLink", {"gpm_supported": 0, "nvlink_links": 0})):
            stub.configure({"gpus": gpus, **config})
            share = sampler_cpu(gpus, "200ms", window, stub)
            results["stand_in_sampler_cpu"].append({"gpus": gpus, "interval": "200ms", "case": label,
                                                    "core_share": share})
            print(f"{gpus} GPU @ 200ms, {label:22}: {share * 100:5.2f} % of one core")


NVITOP = "nvitop-exporter==1.7.2"


def bench_venv_exporter(venv: Path) -> Path | None:
    """nvitop-exporter in its own venv (created on first use); None if it cannot be installed."""
    exe = venv / "bin" / "nvitop-exporter"
    if exe.exists():
        return exe
    print(f"# installing {NVITOP} into {venv} (once)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", NVITOP, "nvitop==1.7.2"], check=True,
                       timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"# {NVITOP} could not be installed ({exc}): its row is skipped")
        return None
    return exe if exe.exists() else None


def peers(results: dict, window: float, scrapes: int, paced: int, venv: Path, gpus: int = 8) -> None:
    """This exporter, nvitop-exporter and node_exporter on the same stand-in GPUs, one after another."""
    print(f"# peers on the C stand-in, {gpus} GPUs (GPM + 18 NVLink links): idle CPU over {window:g} s, RSS, "
          f"{scrapes} back-to-back and {paced} paced (250 ms) plain scrapes")
    nvitop = bench_venv_exporter(venv)
    rows = results["peers"] = []
    with tempfile.TemporaryDirectory() as tmp:
        stub = NvmlStub(build(Path(tmp)), Path(tmp) / "nvml-stub.conf")
        stub.configure({"gpus": gpus, **STAND_IN})

        def nvitop_target() -> Target | None:
            if nvitop is None:
                return None
            port = free_port()
            return Target("nvitop-exporter 1.7.2 @ 1s", [str(nvitop), "--bind-address", "127.0.0.1", "--port",
                                                         str(port), "--interval", "1"], port, env=stub.env())

        def ours(interval: str) -> Target:
            t = exporter(gpus, interval, stub)
            t.name = f"exporter @ {interval}"
            return t

        for make in (lambda: ours("200ms"), lambda: ours("1s"), nvitop_target, node_exporter):
            t = make()
            if t is None:
                continue
            try:
                time.sleep(3)  # past start-up and the first samples
                c0, w0 = t.cpu_seconds(), time.monotonic()
                time.sleep(window)
                share = (t.cpu_seconds() - c0) / (time.monotonic() - w0)
                b2b = scrape_series(t.port, scrapes, False)
                slow = scrape_series(t.port, paced, False, 0.25)
                row = {"target": t.name, "core_share": share, "rss_bytes": t.rss_bytes(), "samples": b2b["samples"],
                       "p50_ms": b2b["median_ms"], "p99_ms": b2b["p99_ms"], "paced_p50_ms": slow["median_ms"],
                       "paced_p99_ms": slow["p99_ms"]}
            finally:
                t.stop()
            rows.append(row)
            print(f"{row['target']:28} CPU {share * 100:5.2f} %  RSS {row['rss_bytes'] / 1e6:5.1f} MB  "
                  f"{row['samples']:5} samples  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                  f"paced p99 {row['paced_p99_ms']:6.2f} ms")
    by = {r["target"]: r for r in rows}
    ratios = results["peer_ratios"] = {}
    for a in by:
        for b in by:
            if a != b and a.startswith("exporter"):
                ra, rb = by[a], by[b]
                key = f"{a} / {b}"
                ratios[key] = {"cpu": ra["core_share"] / rb["core_share"] if rb["core_share"] else None,
                               "rss": ra["rss_bytes"] / rb["rss_bytes"], "p99": ra["p99_ms"] / rb["p99_ms"],
                               "paced_p99": ra["paced_p99_ms"] / rb["paced_p99_ms"]}
                r = ratios[key]
                cpu = f"{r['cpu']:.2f}" if r["cpu"] is not None else "n/a"
                print(f"  {key:58} CPU {cpu:>6}  RSS {r['rss']:.2f}  p99 {r['p99']:.2f}  paced p99 "
                      f"{r['paced_p99']:.2f}")


def main() -> int:
    compile_bytecode()  # measured as installed: byte-code compiled, not compiled at start
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short windows and fewer scrapes (smoke run)")
    ap.add_argument("--stand-in-only", action="store_true",
                    help="only the sampler CPU through the real pynvml on the C stand-in (GPM + NVLink on and off)")
    ap.add_argument("--peers-only", action="store_true",
                    help="only this exporter beside nvitop-exporter and node_exporter on the stand-in")
    ap.add_argument("--bench-venv", default=str(REPO / ".bench-venv"), help="where nvitop-exporter is installed")
    ap.add_argument("--write", action="store_true", help="refresh the committed bench/results.json")
    ap.add_argument("--out", help="write the results here (bench/results.json only with --write)")
    args = ap.parse_args()
    if args.write and args.quick:
        print("run.py: error: --quick figures are a smoke run; they are never written (drop --write)", file=sys.stderr)
        return 2
    if args.write and not args.out:
        args.out = str(HERE / "results.json")
    scrapes = 100 if args.quick else 500
    paced = 20 if args.quick else 120  # 250 ms apart: each one sees a new 200 ms snapshot
    window = 3.0 if args.quick else 10.0
    memory_scrapes = 1000 if args.quick else 10_000
    gpu_counts = (1, 8, 64)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "quick": args.quick, "scrape": [], "sampler_cpu": [], "lateness": [], "memory": {},
                     "stand_in_sampler_cpu": []}
    if args.peers_only:
        peers(results, window, scrapes, paced, Path(args.bench_venv))
        return write(results, args.out, ("peers", "peer_ratios"))
    stand_in_cpu(results, window)
    if args.stand_in_only:
        return write(results, args.out, ("stand_in_sampler_cpu",))

    print(f"# scrape latency: {scrapes} back-to-back scrapes, then {paced} paced 250 ms apart (each a fresh "
          "snapshot, as Prometheus sees it), keep-alive, Prometheus's Accept header")
    targets = [lambda n=n: exporter(n) for n in gpu_counts] + [node_exporter]
    for make in targets:
        t = make()
        if t is None:
            print("node_exporter not installed (apt-get install prometheus-node-exporter): skipped")
            continue
        try:
            time.sleep(1.5)
            for pace, n in ((0.0, scrapes), (0.25, paced)):
                for gz in (False, True):
                    row = {"target": t.name, "gzip": gz, **scrape_series(t.port, n, gz, pace)}
                    results["scrape"].append(row)
                    print(f"{t.name:18} {'paced' if pace else 'b2b':5} gzip={gz!s:5} median {row['median_ms']:6.2f} ms"
                          f"  p99 {row['p99_ms']:6.2f} ms  {row['samples']:5} samples  {row['bytes']:7} bytes")
        finally:
            t.stop()

    print("# series budget: one plain-text scrape, 8 GPUs at the default collectors beside node_exporter")
    budget = results["budget"] = series_budget(12.0 if args.quick else 25.0)
    ours, node = budget["exporter_8gpu"], budget["node_exporter"]
    print(f"exporter 8 GPU      {ours['samples']:5} samples (budget 600)  {ours['bytes']:7} bytes")
    if node:
        print(f"node_exporter       {node['samples']:5} samples                {node['bytes']:7} bytes"
              f"  -> exporter/node_exporter bytes {ours['bytes'] / node['bytes']:.2f}")

    print(f"# sampler CPU while idle (no scrapes), {window:g} s windows")
    for interval in ("200ms", "50ms"):
        for n in gpu_counts:
            share = sampler_cpu(n, interval, window)
            results["sampler_cpu"].append({"gpus": n, "interval": interval, "core_share": share})
            print(f"{n:3} GPU @ {interval:5}: {share * 100:5.2f} % of one core")

    print("# tick lateness at 200 ms with 8 GPUs")
    t = exporter(8)
    try:
        time.sleep(1)
        for load in (False, True):
            row = lateness(t.port, 2 * window, load)
            results["lateness"].append(row)
            print(f"scrape load={load!s:5}: p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
                  f"max bucket <= {row['max_bucket_ms']:.2f} ms  ({row['ticks']:.0f} ticks)")
    finally:
        t.stop()

    print(f"# memory with 8 GPUs: RSS after start, after {memory_scrapes} scrapes, after {memory_scrapes} more")
    t = exporter(8)
    try:
        time.sleep(2)
        rss0 = t.rss_bytes()
        scrape_series(t.port, memory_scrapes, False)
        rss1 = t.rss_bytes()
        scrape_series(t.port, memory_scrapes, False)  # warm-up over: what is left is growth
        rss2 = t.rss_bytes()
    finally:
        t.stop()
    results["memory"] = {"rss_start_bytes": rss0, "rss_after_bytes": rss1, "rss_after_twice_bytes": rss2,
                         "scrapes": memory_scrapes}
    print(f"RSS {rss0 / 1e6:.1f} MB -> {rss1 / 1e6:.1f} MB (+{(rss1 - rss0) / 1e6:.2f} MB) "
          f"-> {rss2 / 1e6:.1f} MB (+{(rss2 - rss1) / 1e6:.2f} MB)")

    for pace, key in ((0.0, "p99_ratio_8gpu_vs_node_exporter"), (0.25, "p99_ratio_8gpu_vs_node_exporter_paced")):
        ne = [r for r in results["scrape"] if r["target"] == "node_exporter" and not r["gzip"] and r["pace_s"] == pace]
        ex8 = [r for r in results["scrape"] if r["target"] == "exporter 8 GPU" and not r["gzip"] and r["pace_s"] == pace]
        if ne and ex8:
            results[key] = ex8[0]["p99_ms"] / ne[0]["p99_ms"]
            print(f"# exporter (8 GPU) p99 / node_exporter p99, {'paced' if pace else 'back to back'} = {results[key]:.2f}")
    peers(results, window, scrapes, paced, Path(args.bench_venv))
    return write(results, args.out)


def write(results: dict, out: str | None, sections: tuple[str, ...] = ()) -> int:
    """Write `results` to `out`; with `sections`, replace only those in the file there and keep the rest."""
    if out is None:
        print("not written: --write refreshes bench/results.json, --out PATH writes elsewhere")
        return 0
    path = Path(out)
    if sections and path.exists():
        try:
            kept = json.loads(path.read_text())
        except ValueError as exc:
            print(f"run.py: error: {out}: not JSON ({exc}); nothing written", file=sys.stderr)
            return 2
        kept.update({k: results[k] for k in sections if k in results})
        results = kept
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}" + (f" ({', '.join(sections)} only)" if sections else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
