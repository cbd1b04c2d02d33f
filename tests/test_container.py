"""The sidecar for real: the repository's Dockerfile built by podman, and the README's sidecar lines run
against a stand-in TTS container (Docker's default 64 MB /dev/shm, two CPU-bound processes under
--cpus 0.1). The README's lines are read from its "Sidecar beside ChatTTS" block and changed only where
this machine differs from a user's (see `adapt`). Where podman cannot run, the test fails with one line.

Figures (build, start-to-first-scrape, SIGTERM stop) are printed: `pytest -s -m container`.
"""
from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Iterator

import bcrypt
import pytest

from testkit import nvml_stub
from testkit.container import (EngineError, Podman, base_image, pip_build_args, readme_commands, readme_snippet,
                               replace_once)
from testkit.processes import REPO, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.container]
README = REPO / "README.md"
PREFIX = f"gte-test-{os.getpid()}"
TAG = f"localhost/{PREFIX}:latest"
TTS, EXPORTER = f"{PREFIX}-chattts", f"{PREFIX}-exporter"
# Two DataLoader-like workers that want two cores, under a tenth of a core: most CFS periods are throttled
# even on a busy machine, where the container's cgroup as a whole gets only a small share of the CPUs
# (under --cpus 0.5 it was throttled in ~5 % of periods with a load average of 8 on 2 cores).
BURN = "import os; os.fork(); exec('while True: pass')"
CPUS = "0.1"
DIAGNOSIS = {"shm_too_small", "cpu_quota_throttled"}


class Sidecar:
    """What the README's lines made, as the test sees it."""

    def __init__(self, podman: Podman, base: str, work: Path) -> None:
        self.podman, self.base, self.work = podman, base, work
        self.stub_dir = work / "nvml"
        self.port = 0
        self.figures: dict[str, float] = {}

    def adapt(self, command: str, web_args: str = "") -> str:
        """One README command, for this machine: podman for docker; names of our own; the NVML stand-in
        for --gpus (no GPU here, as the NVIDIA runtime would inject libnvidia-ml.so.1); the TTS stand-in with
        a 64 MB /dev/shm and a tenth of a core; the port on 127.0.0.1 only."""
        c = re.sub(r"\bdocker (build|run|inspect)\b", r"podman \1", command)
        c = replace_once(c, "gpu-telemetry-exporter:0.1.0", TAG) if "gpu-telemetry-exporter:0.1.0" in c else c
        if c.startswith("podman build "):
            # docker format keeps HEALTHCHECK; no layer cache: the one image made is the one tagged, so
            # cleaning up removes exactly what this test made, even beside another run
            return replace_once(c, "podman build ", "podman build --format docker --layers=false --network host "
                                "--pull=never "
                                f"--build-arg PYTHON_IMAGE={self.base} " + " ".join(pip_build_args(self.work)) + " ")
        if "--name chattts " in c:
            c = replace_once(c, "--gpus all --shm-size=2g --ipc=shareable your-registry/chattts-server:latest",
                             f"--shm-size=64m --ipc=shareable --cpus {CPUS} {self.base} python3 -c \"{BURN}\"")
        elif "--name gpu-telemetry " in c:
            c = replace_once(c, "--name gpu-telemetry --gpus all ",
                             f"--name {EXPORTER} -v {self.stub_dir}:/nvml:ro -e LD_LIBRARY_PATH=/nvml "
                             "-e NVML_STUB_CONFIG=/nvml/nvml.conf ")
            c = replace_once(c, "-p 9445:9445", f"-p 127.0.0.1:{self.port}:9445")
            if web_args:
                c = replace_once(c, "--read-only ", f"--read-only {web_args} ")
        return re.sub(r"\bchattts\b", TTS, c)

    def metrics(self, scheme: str = "http", auth: str = "") -> bytes:
        ctx = ssl._create_unverified_context() if scheme == "https" else None
        req = urllib.request.Request(f"{scheme}://127.0.0.1:{self.port}/metrics",
                                     headers={"Authorization": auth} if auth else {})
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            assert r.status == 200
            return r.read()

    def wait_for_metrics(self, scheme: str = "http", auth: str = "", timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.metrics(scheme, auth)
            except (OSError, urllib.error.URLError):
                state = self.podman("inspect", "-f", "{{.State.Status}}", EXPORTER).stdout.strip()
                if state != "running" or time.monotonic() > deadline:
                    logs = self.podman("logs", EXPORTER, check=False)
                    pytest.fail(f"exporter container {state}, no /metrics: {(logs.stdout + logs.stderr)[-2000:]}")
                time.sleep(0.1)

    def diagnosis(self, scheme: str, auth: str, timeout: float = 60) -> set[str]:
        ctx = ssl._create_unverified_context() if scheme == "https" else None
        url = f"{scheme}://127.0.0.1:{self.port}/api/v1/diagnosis"
        deadline = time.monotonic() + timeout
        rules: set[str] = set()
        while time.monotonic() < deadline and not DIAGNOSIS <= rules:
            time.sleep(1)
            req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                rules = {f["rule"] for f in json.load(r)["findings"]}
        return rules


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[tuple[Podman, str]]:
    podman = Podman(tmp_path_factory.mktemp("podman"))
    why = ""
    try:
        podman.check_usable()
        base, spent = base_image(podman)
    except (EngineError, OSError, subprocess.TimeoutExpired) as exc:
        why = str(exc)
    if why:  # fails, never skips: CI has what tests/run.sh installs
        pytest.fail(f"podman cannot run here: {why}", pytrace=False)
    for step, seconds in spent.items():
        print(f"base image: {step} {seconds:.1f} s")
    dangling = podman.dangling_images()
    yield podman, base
    # The exporter first: a container removed while another shares its PID namespace may survive.
    for name in (EXPORTER, TTS):
        podman("rm", "--force", "--time", "0", name, check=False)
    podman("rmi", "--force", TAG, check=False)
    left = podman("ps", "-a", "--filter", f"name={PREFIX}", "--format", "{{.Names}}").stdout.split()
    assert not left, f"containers left behind: {left}"
    assert podman("image", "exists", TAG, check=False).returncode == 1, f"{TAG} left behind"
    assert not podman.dangling_images() - dangling, "untagged images left behind"


def stop_with_sigterm(podman: Podman, name: str) -> tuple[int, float]:
    """(exit code, seconds from SIGTERM to the process's exit, by the engine's own FinishedAt)."""
    sent = time.time()
    podman("kill", "--signal", "TERM", name)
    podman("wait", name, timeout=30)
    state = podman("inspect", "-f", "{{.State.ExitCode}} {{.State.FinishedAt.UnixNano}}", name).stdout.split()
    return int(state[0]), int(state[1]) / 1e9 - sent


def check_running_sidecar(podman: Podman, s: Sidecar, body: bytes, scheme: str, auth: str) -> None:
    shm = podman("exec", TTS, "python3", "-c",
                 "import os; v = os.statvfs('/dev/shm'); print(v.f_frsize * v.f_blocks)").stdout.strip()
    m = re.search(rb'^host_shm_size_bytes\{path="/dev/shm"\} (\S+)$', body, re.M)
    assert m and float(m.group(1)) == int(shm) <= 64 * 1024 * 1024, (m and m.group(0), shm)
    limit = re.search(rb"^cgroup_cpu_limit_cores\{[^}]*\} (\S+)$", body, re.M)
    assert limit and float(limit.group(1)) == float(CPUS), "the TTS container's --cpus"
    assert re.search(rb'^gpu_up\{gpu="0"[^}]*\} 1', body, re.M), "the NVML stand-in through the image's pynvml"

    rules = s.diagnosis(scheme, auth)
    assert DIAGNOSIS <= rules, rules

    health = podman("healthcheck", "run", EXPORTER, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    assert podman("inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", EXPORTER).stdout.strip() == "true"
    write = podman("exec", EXPORTER, "python", "-c", "open('/probe', 'w')", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    pid = podman("inspect", "-f", "{{.State.Pid}}", EXPORTER).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids and set(uids.group(1).split()) == {"65534"}, status  # real, effective, saved and fs UID; rootful podman maps them 1:1
    assert re.search(r"^CapEff:\s+0+$", status, re.M), "no capabilities"
    logs = podman("logs", EXPORTER)
    assert "Traceback" not in logs.stdout + logs.stderr, (logs.stdout + logs.stderr)[-3000:]

    code, seconds = stop_with_sigterm(podman, EXPORTER)
    s.figures["sigterm_stop_s"] = seconds
    assert code == 0, f"exit code {code} after SIGTERM"
    assert seconds < 1.0, f"SIGTERM took {seconds:.2f} s"


def run_sidecar(podman: Podman, s: Sidecar, commands: list[str], web_args: str = "") -> float:
    """The README's lines after the build (TTS container, its cgroup, the exporter); seconds from the
    exporter's `run` to its first answered scrape are measured by the caller."""
    s.port = free_port()
    if podman("container", "exists", TTS, check=False).returncode != 0:
        podman.bash(s.adapt(commands[1]), cwd=REPO)
    started = time.monotonic()
    podman.bash("\n".join(s.adapt(c, web_args) for c in commands[2:]), cwd=REPO)
    return started


def test_readme_sidecar_in_podman(engine, tmp_path):
    podman, base = engine
    commands = readme_commands(README)
    assert [c.split()[:2] for c in commands] == [["docker", "build"], ["docker", "run"],
                                                 ["TTS_CGROUP=$(awk", "-F:"], ["docker", "run"]], commands
    s = Sidecar(podman, base, tmp_path)
    s.stub_dir.mkdir()
    lib = nvml_stub.build(s.stub_dir)
    (s.stub_dir / "nvml.conf").write_text("gpus=1\nutil=20\n")  # GPU starved: at or below 40 %
    for p in (s.stub_dir, lib, s.stub_dir / "nvml.conf"):  # read by UID 65534 in the container
        p.chmod(0o755 if p.is_dir() else 0o644)

    t0 = time.monotonic()
    podman.bash(s.adapt(commands[0]), timeout=600, cwd=REPO)
    s.figures["build_s"] = time.monotonic() - t0
    history = podman("image", "inspect", "-f", "{{.Size}}", TAG).stdout.strip()
    s.figures["image_mb"] = int(history) / 1e6
    s.figures["base_mb"] = int(podman("image", "inspect", "-f", "{{.Size}}", base).stdout.strip()) / 1e6
    healthcheck = podman("image", "inspect", "-f", "{{json .Config.Healthcheck}}", TAG).stdout
    assert "exporter.healthcheck" in healthcheck, "docker format keeps HEALTHCHECK"

    started = run_sidecar(podman, s, commands)
    body = s.wait_for_metrics()
    s.figures["first_scrape_s"] = time.monotonic() - started
    check_running_sidecar(podman, s, body, "http", "")
    plain_stop = s.figures["sigterm_stop_s"]
    podman("rm", "--force", EXPORTER)

    # HTTPS and basic auth, with the README's web config arguments.
    web = tmp_path / "web"
    web.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(web / "s.key"), "-out",
                    str(web / "s.crt")], check=True, capture_output=True)
    hashed = bcrypt.hashpw(b"scrape-pw", bcrypt.gensalt(rounds=6)).decode()
    (web / "web.yml").write_text("tls_server_config: {cert_file: s.crt, key_file: s.key}\n"
                                 f"basic_auth_users:\n  prometheus: {hashed}\n")
    for p in [web, *web.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    snippet = readme_snippet(README, "-e GPU_EXPORTER_WEB_CONFIG_FILE=")
    web_args = replace_once(snippet, "-v /etc/gpu-exporter:", f"-v {web}:")
    run_sidecar(podman, s, commands, web_args)
    auth = "Basic " + b64encode(b"prometheus:scrape-pw").decode()
    body = s.wait_for_metrics("https", auth)
    with pytest.raises(urllib.error.HTTPError) as refused:
        s.metrics("https")
    assert refused.value.code == 401
    with pytest.raises(OSError):
        s.metrics("http")  # plain HTTP is not served
    check_running_sidecar(podman, s, body, "https", auth)
    print(" ".join(f"{k}={v:.2f}" for k, v in s.figures.items()), f"plain_sigterm_stop_s={plain_stop:.2f}")
