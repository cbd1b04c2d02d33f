"""Smoke runs of bench/micro.py and bench/diagnosis.py: they must run and print their figures (timings are
reported, never asserted)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e  # starts real processes


def test_micro_benchmark_prints_figures():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "micro.py"), "--iterations", "20"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    for label in ("tick", "collect+render text", "collect+render openmetrics", "fake NVML call"):
        assert re.search(rf"^{re.escape(label)}\s+.*\d+\.\d+ (us|ms)", r.stdout, re.M), (label, r.stdout)


def test_gpm_reader_benchmark_prints_figures():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpm_reader.py"), "--ticks", "3", "--gpus", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    for source in ("gpm", "fields"):  # both NVLink paths ran and report a cost
        assert re.search(rf"CPU\s+\d+\.\d+ ms per tick\s+\d+\.\d+ % of a core\s+\(NVLink: {source}\)", r.stdout), r.stdout


def test_diagnosis_benchmark_prints_figures():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "diagnosis.py"), "--gpus", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert re.search(r"^\| 2 \| 1 500 \| \d+\.\d+ MB \| \d+ µs \| \d+\.\d+ ms \| \d+ ms \|$", r.stdout, re.M), r.stdout


def test_whole_exporter_cpu_on_the_stand_in_prints_figures(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--stand-in-only", "--quick", "--out",
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    for case in ("GPM \\+ 18 NVLink links", "no GPM, no NVLink"):  # both ran and report a share of a core
        assert re.search(rf"8 GPU @ 200ms, {case}\s*:\s+\d+\.\d+ % of one core", r.stdout), r.stdout
    assert out.exists()


def test_profile_bench_counts_nvml_calls_per_gpu_per_tick():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "profile.py"), "--only", "calls", "--gpus", "2",
                        "--reads", "10"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    total = re.search(r"NVML calls per GPU per tick, 2 GPUs, default collectors: (\d+\.\d+)", r.stdout)
    assert total and 5 < float(total.group(1)) < 30, r.stdout
    rows = dict(re.findall(r"^\| (nvml\w+) \| (\d+\.\d+) \|$", r.stdout, re.M))
    # One batch per GPU per tick (a GPM pair that fails on a stalled machine reads NVLink fields that tick).
    assert 1.0 <= float(rows["nvmlDeviceGetFieldValues"]) < 1.5
    assert "nvmlDeviceGetPowerUsage" not in rows  # answered by its field on the stand-in
    assert "nvmlEventSetWait_v2" not in rows  # the XID watcher's wait is not the tick's
