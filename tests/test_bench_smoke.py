"""Smoke run of bench/micro.py: it must run and print its figures (timings are reported, never asserted)."""
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
