"""What tests/ and bench/ share: the exporter, Prometheus and the fake TTS service as real processes on
127.0.0.1, and small HTTP helpers. Not shipped (not in the wheel's packages)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within timeout; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def exposition_size(body: bytes) -> tuple[int, int]:
    """(samples, bytes) of a text exposition: every line that is not a comment is one sample."""
    return sum(1 for line in body.decode().splitlines() if line and not line.startswith("#")), len(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset or the socket's timeout also ends it)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class ExporterProcess:
    """The exporter as a user runs it: `python -m exporter ...` in its own process."""

    def __init__(self, *args: str, env: dict | None = None, prefix: tuple[str, ...] = ()) -> None:
        """prefix: a command that runs the exporter's command line (e.g. unshare with a small tmpfs)."""
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"exporter-{os.getpid()}-{time.time_ns()}.log"
        self._stderr = open(self.stderr_path, "w+")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "exporter", "--web.listen-address", "127.0.0.1:0", *args],
            stdout=subprocess.DEVNULL, stderr=self._stderr, cwd=REPO, env={**os.environ, **(env or {})})
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.stderr_path.read_text()

    def wait_for_sample(self, path: str = "/metrics", needle: bytes = b"gpu_up{", timeout: float = 10.0) -> bytes:
        """Poll until `needle` is served: the port is open before the sampler's first tick is done."""
        deadline = time.monotonic() + timeout
        body = b""
        while needle not in body and time.monotonic() < deadline:
            body = http_get(self.url + path)[2]
            time.sleep(0.05)
        return body

    def _wait_for_port(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on https?://127\.0\.0\.1:(\d+)/", self.log())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"exporter did not start: {self.log()}")

    def stop(self) -> int:
        code = stop_process(self.proc)
        self._stderr.close()
        return code


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: run the suite with `bash tests/run.sh`, which installs it")
    return path


class PrometheusServer:
    """Debian's prometheus on 127.0.0.1, scraping the given targets every second."""

    def __init__(self, workdir: Path, jobs: dict[str, list[str]], rule_files: list[Path] | None = None,
                 job_settings: dict[str, list[str]] | None = None) -> None:
        """job_settings: extra YAML lines per job (scheme, tls_config, basic_auth, ...), unindented."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s"]
        if rule_files:
            config.append("rule_files:")
            config += [f"  - {p}" for p in rule_files]
        config.append("scrape_configs:")
        for job, targets in jobs.items():
            config += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {targets!r}"]
            config += [f"    {line}" for line in (job_settings or {}).get(job, [])]
        (workdir / "prometheus.yml").write_text("\n".join(config) + "\n")
        self._log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [find_tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.workdir = workdir

    def query(self, expr: str) -> list[dict]:
        status, _, body = http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {status} {body[:300]!r}")
        return data["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 30.0, min_results: int = 1) -> list[dict]:
        """Poll until `expr` returns at least min_results series (bounded by timeout)."""
        deadline = time.monotonic() + timeout
        last: list[dict] = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited: " + (self.workdir / "prometheus.log").read_text()[-2000:])
            try:
                last = self.query(expr)
            except (OSError, AssertionError):
                last = []
            if len(last) >= min_results:
                return last
            time.sleep(0.5)
        raise AssertionError(f"{expr!r} returned {len(last)} series after {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        self._log.close()


# Which container the stand-in kubelet of the stack says holds each fake GPU.
STACK_PODS = {0: ("tts", "synth-0", "model"), 1: ("tts", "synth-1", "model")}


def start_fake_kubelet(socket_path: Path, allocations: dict) -> subprocess.Popen:
    """tests/fake_kubelet.py as its own process, serving `allocations` (re-read from a file on each List)."""
    state = socket_path.with_suffix(".json")
    state.write_text(json.dumps(allocations))
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_kubelet.py"), "--socket", str(socket_path),
                             "--state", str(state)], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"serving":
        stop_process(proc)
        raise RuntimeError("the fake kubelet did not start")
    return proc


class Stack:
    """The exporter (2 fake GPUs, 100 ms; `--fake-scenario xids`: the plain simulator plus XID 31 on each GPU
    after 5 s), a stand-in kubelet saying which pod holds each GPU, the fake TTS service and a real
    Prometheus scraping both."""

    def __init__(self, workdir: Path) -> None:
        from exporter.fake.nvml import fake_uuid

        workdir.mkdir(parents=True, exist_ok=True)
        socket_path = workdir / "kubelet.sock"
        self.kubelet = start_fake_kubelet(socket_path, {"/".join(ref): {"nvidia.com/gpu": [fake_uuid(gpu)]}
                                                        for gpu, ref in STACK_PODS.items()})
        self.exporter = ExporterProcess("--fake-gpus", "2", "--fake-scenario", "xids", "--sample.interval", "100ms",
                                        "--kubernetes.pod-resources-socket", str(socket_path))
        self.tts_port = free_port()
        self.tts = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_tts.py"), "--port",
                                     str(self.tts_port), "--seconds", "900"], cwd=REPO)
        self.prom = PrometheusServer(workdir, {"gpu": [f"127.0.0.1:{self.exporter.port}"],
                                               "tts": [f"127.0.0.1:{self.tts_port}"]})

    def wait_ready(self, seconds_of_data: int = 14) -> None:
        self.prom.wait_for('up{job="gpu"} == 1', timeout=30)
        self.prom.wait_for('up{job="tts"} == 1', timeout=30)
        # Enough scrapes for rate() windows of 10 s to sit inside the data.
        self.prom.wait_for(f'count_over_time(gpu_up{{gpu="0"}}[1m]) >= {seconds_of_data}', timeout=60)

    def stop(self) -> None:
        self.prom.stop()
        stop_process(self.tts)
        self.exporter.stop()
        stop_process(self.kubelet)


def compile_bytecode() -> None:
    """Write the exporter's byte-code before a bench measures it. A process that compiles its sources at
    start grows its heap by ~10 MB that the figures would count (PYTHONDONTWRITEBYTECODE, a read-only
    checkout); the image and a wheel install ship compiled byte-code, so that is what is measured."""
    import compileall

    compileall.compile_dir(str(REPO / "exporter"), quiet=1)
