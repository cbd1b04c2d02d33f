"""The image's install path without a Docker engine: build the wheel as the Dockerfile does, install it
into a fresh venv, and run the installed console script and container health check."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, http_get

pytestmark = pytest.mark.e2e  # starts real processes


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp / "wheels"),
                    str(REPO)], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp / "wheels").glob("gpu_telemetry_exporter-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=120)
    subprocess.run([str(tmp / "venv" / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    return tmp / "venv"


def test_installed_console_script_serves_fake_gpus(installed, tmp_path):
    log = tmp_path / "stderr"
    env = {**os.environ, "GPU_EXPORTER_WEB_LISTEN_ADDRESS": "127.0.0.1:0", "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log, "w") as err:
        # Run from an empty directory so the checkout's package cannot shadow the installed one.
        proc = subprocess.Popen([str(installed / "bin" / "gpu-telemetry-exporter"), "--fake-gpus", "2"],
                                stderr=err, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 20
        port = None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", log.read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.1)
        assert port, log.read_text()
        status, _, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and body.count(b"gpu_up{") == 2
        check = subprocess.run([str(installed / "bin" / "python"), "-m", "exporter.healthcheck"], cwd=tmp_path,
                               env={**env, "GPU_EXPORTER_WEB_LISTEN_ADDRESS": f":{port}"}, timeout=10)
        assert check.returncode == 0
        where = subprocess.run([str(installed / "bin" / "python"), "-c", "import exporter; print(exporter.__file__)"],
                               cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        assert str(installed) in where  # the wheel's copy ran, not the source tree
    finally:
        proc.terminate()
        assert proc.wait(5) == 0


def test_healthcheck_fails_when_nothing_listens(installed, tmp_path):
    from tests.conftest import free_port

    check = subprocess.run([str(installed / "bin" / "python"), "-m", "exporter.healthcheck"], cwd=tmp_path,
                           env={**os.environ, "GPU_EXPORTER_WEB_LISTEN_ADDRESS": f"127.0.0.1:{free_port()}"},
                           capture_output=True, text=True, timeout=10)
    assert check.returncode == 1 and "healthcheck:" in check.stderr
