#!/usr/bin/env python3
"""Where the tick's time and the process's memory go, on the C stand-in through the real pynvml.

    .venv/bin/python bench/profile.py                       # calls/tick, imports, profile at 8 and 64 GPUs
    .venv/bin/python bench/profile.py --out bench/profile.md --flame /tmp/tick   # + a table file, SVGs
    .venv/bin/python bench/profile.py --rss-scrapes 20000   # + RSS after that many scrapes (8 GPUs)
    .venv/bin/python bench/profile.py --only calls          # the deterministic figures only (seconds)

Figures, all with the default collectors (GPM and 18 NVLink links answered, as on an H100 SXM):
- NVML calls per GPU per tick, counted by the stand-in itself (what pynvml really asked, two-call buffers
  included), over 100 reads on a 200 ms schedule, so the 1 s and 5 s cadences weigh in as they do live;
- a py-spy profile of a running exporter (`python -m exporter`, 200 ms, no scrapes): the top 20 functions
  by own time and by time including callees, as shares of the on-CPU samples (py-spy is installed into
  .venv on first use; it is a bench tool, not a dependency);
- `python -X importtime -c "import exporter.cli"`: total and the largest imports; tracemalloc after it;
- optionally the exporter's RSS after N plain scrapes (no web config, no kubelet socket).

CPU shares measured on a busy machine are noisy; the call counts and import sizes are not. Nothing
committed is overwritten unless --out names it.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.gpm_reader import STAND_IN  # noqa: E402  (GPM and NVLink answered, as on H100 SXM)
from testkit.nvml_stub import NvmlStub, build  # noqa: E402
from testkit.processes import compile_bytecode, free_port, stop_process  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
BACKGROUND_CALLS = ("nvmlEventSetWait_v2",)  # the XID watcher's blocking wait: its own thread, not the tick


def calls_per_tick(stub: NvmlStub, gpus: int, reads: int = 100) -> dict[str, float]:
    """NVML calls per GPU per read, by C function, over `reads` reads on a 200 ms schedule (real time:
    GPM needs >= 100 ms between its samples, and the 1 s and 5 s cadences weigh in as they do live)."""
    from exporter.pipeline import collectors as registry
    from exporter.sources.nvml import NvmlSource
    from exporter.sources.nvml.specs import GPU_SCALARS, NVLINK_PER_LINK_SCALARS

    stub.configure({"gpus": gpus, **STAND_IN})
    nv = stub.bind()
    src = NvmlSource(nv, "real", **registry.nvml_options(registry.DEFAULT, GPU_SCALARS + NVLINK_PER_LINK_SCALARS))

    def ticks(n: int) -> None:
        start = time.monotonic()
        for k in range(n):
            time.sleep(max(0.0, start + 0.2 * k - time.monotonic()))
            src.poll(time.monotonic())
            for r in src.gpus:
                r.read()

    try:
        src.poll(time.monotonic())
        ticks(6)  # start-up: opens, probes, the first GPM sample pair, the fields decided
        stub.reset_calls()
        ticks(reads)
        counts = stub.calls()
    finally:
        src.close()
        stub.unbind()
    return {k: v / (reads * gpus) for k, v in sorted(counts.items()) if k not in BACKGROUND_CALLS}


def start_exporter(stub: NvmlStub, gpus: int, interval: str = "200ms") -> tuple[subprocess.Popen, int]:
    stub.configure({"gpus": gpus, **STAND_IN})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "--sample.interval", interval,
                             "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "error"],
                            cwd=REPO, env={**os.environ, **stub.env()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    import http.client

    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/metrics")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError("the exporter did not answer")


def py_spy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(exe)


def _frame(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)': one row per function, not per line."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    return f"{m.group(1)} ({Path(m.group(2)).name})" if m else frame


def profile(stub: NvmlStub, gpus: int, seconds: float, rate: int, flame: str | None, all_threads: bool) -> dict:
    """py-spy on a running exporter: top functions by self and total. By default only samples holding the
    GIL (--gil): the Python the tick costs. Without it py-spy also counts threads waiting for the GIL or
    sleeping in C (the XID watcher's nvmlEventSetWait) as busy, which swamps a process at 1 % of a core."""
    gil = [] if all_threads else ["--gil"]
    proc, _ = start_exporter(stub, gpus)
    try:
        time.sleep(3)  # past start-up
        with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
            subprocess.run([py_spy(), "record", "--pid", str(proc.pid), "-r", str(rate), "-d", str(int(seconds)),
                            "-f", "raw", "-o", raw.name, "--nonblocking", *gil], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lines = Path(raw.name).read_text().splitlines()
        if flame:
            subprocess.run([py_spy(), "record", "--pid", str(proc.pid), "-r", str(rate), "-d", str(int(seconds)),
                            "-o", f"{flame}-{gpus}gpu.svg", "--nonblocking", *gil], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        stop_process(proc)
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
        files[frames[-1].rsplit("(", 1)[-1].rstrip(")")] += n
    return {"gpus": gpus, "seconds": seconds, "rate": rate, "samples": samples, "gil": not all_threads,
            "own": own.most_common(20), "total": total.most_common(20), "files": files.most_common(12)}


def import_costs() -> dict:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import exporter.cli"], cwd=REPO,
                       capture_output=True, text=True, check=True)
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((m.group(4), int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2))
    top = [r for r in rows if r[3] == 0]
    code = ("import sys, tracemalloc, resource; tracemalloc.start(); import exporter.cli; "
            "print(tracemalloc.get_traced_memory()[0], len(sys.modules), "
            "' '.join(m for m in ('yaml', 'bcrypt', 'grpclib', 'google.protobuf', 'exporter.web.config', "
            "'exporter.fake.nvml', 'exporter.fake.scenarios', 'exporter.fake.smi', 'exporter.diagnosis', "
            "'exporter.web.liveview', 'prometheus_client.exposition', 'http.server', 'urllib.request', "
            "'email', 'asyncio', 'ssl') if m in sys.modules))")
    t = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    traced, modules, *loaded = t.stdout.split()
    return {"total_ms": sum(r[2] for r in top) / 1e3, "largest_self": sorted(rows, key=lambda r: -r[1])[:12],
            "tracemalloc_bytes": int(traced), "modules": int(modules), "loaded_of_interest": loaded}


def rss_after_scrapes(stub: NvmlStub, gpus: int, scrapes: int) -> dict:
    import http.client

    proc, port = start_exporter(stub, gpus)
    try:
        time.sleep(2)

        def rss() -> int:
            return int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1]) * PAGE

        start = rss()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(scrapes):
            conn.request("GET", "/metrics")
            conn.getresponse().read()
        conn.close()
        return {"gpus": gpus, "scrapes": scrapes, "rss_start_bytes": start, "rss_after_bytes": rss()}
    finally:
        stop_process(proc)


def report(res: dict) -> str:
    out = []
    for gpus, calls in res.get("calls", {}).items():
        out.append(f"## NVML calls per GPU per tick, {gpus} GPUs, default collectors: {sum(calls.values()):.2f}\n")
        out.append("| C function | per GPU per tick |\n|---|---:|")
        out += [f"| {k} | {v:.2f} |" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])]
        out.append("")
    for p in res.get("profiles", []):
        out.append(f"## py-spy, {p['gpus']} GPUs at 200 ms, {p['seconds']:g} s at {p['rate']} Hz: "
                   f"{p['samples']} samples{' holding the GIL' if p['gil'] else ', every thread not idle'}\n")
        out.append("| own time | function | | incl. callees | function |\n|---:|---|---|---:|---|")
        for (fo, no), (ft, nt) in zip(p["own"], p["total"]):
            out.append(f"| {100 * no / p['samples']:.1f} % | {fo} | | {100 * nt / p['samples']:.1f} % | {ft} |")
        out.append("\nOwn time by file: " + ", ".join(f"{f} {100 * n / p['samples']:.0f} %" for f, n in p["files"]))
        out.append("")
    if "imports" in res:
        i = res["imports"]
        out.append(f"## import exporter.cli: {i['total_ms']:.0f} ms, {i['modules']} modules, "
                   f"{i['tracemalloc_bytes'] / 1e6:.2f} MB traced\n")
        out.append("Loaded of interest: " + (", ".join(i["loaded_of_interest"]) or "none") + "\n")
        out.append("| module | self ms | cumulative ms |\n|---|---:|---:|")
        out += [f"| {m} | {s / 1e3:.1f} | {c / 1e3:.1f} |" for m, s, c, _ in i["largest_self"]]
        out.append("")
    if "rss" in res:
        r = res["rss"]
        out.append(f"## RSS, {r['gpus']} GPUs: {r['rss_start_bytes'] / 1e6:.1f} MB at start, "
                   f"{r['rss_after_bytes'] / 1e6:.1f} MB after {r['scrapes']} scrapes\n")
    return "\n".join(out)


def main() -> int:
    compile_bytecode()  # measured as installed: byte-code compiled, not compiled at start
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--reads", type=int, default=100, help="reads per GPU counted for the calls per tick")
    ap.add_argument("--seconds", type=float, default=30.0, help="py-spy window per GPU count")
    ap.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    ap.add_argument("--only", choices=("calls", "imports", "profile"), help="one part only")
    ap.add_argument("--flame", metavar="PREFIX", help="also write PREFIX-<N>gpu.svg flame graphs")
    ap.add_argument("--all-threads", action="store_true", help="profile without py-spy's --gil filter")
    ap.add_argument("--rss-scrapes", type=int, default=0, help="also RSS after this many scrapes, 8 GPUs")
    ap.add_argument("--out", help="write the tables (markdown) here as well")
    args = ap.parse_args()
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        stub = NvmlStub(build(Path(tmp)), Path(tmp) / "nvml-stub.conf")
        if args.only in (None, "calls"):
            res["calls"] = {n: calls_per_tick(stub, n, args.reads) for n in args.gpus}
        if args.only in (None, "imports"):
            res["imports"] = import_costs()
        if args.only in (None, "profile"):
            res["profiles"] = [profile(stub, n, args.seconds, args.rate, args.flame, args.all_threads) for n in args.gpus]
        if args.rss_scrapes:
            res["rss"] = rss_after_scrapes(stub, 8, args.rss_scrapes)
    text = report(res)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
