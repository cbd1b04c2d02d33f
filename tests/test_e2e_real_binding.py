"""End to end through the real binding: the exporter process without --fake-gpus, so its pynvml loads the C
stand-in for libnvidia-ml.so.1 (LD_LIBRARY_PATH), scraped by a real Prometheus."""
from __future__ import annotations

import pytest

from tests.conftest import ExporterProcess, PrometheusServer

pytestmark = pytest.mark.e2e


def by_gpu(result: list[dict]) -> dict[str, float]:
    return {r["metric"].get("gpu", ""): float(r["value"][1]) for r in result}


def test_real_pynvml_on_the_stand_in_reaches_prometheus_and_a_lost_gpu_costs_only_itself(nvml_stub, tmp_path):
    config = {"gpus": 2, "util.0": 37, "util.1": 64, "power_mw.1": 312500, "temp.1": 55, "xid": "1:48",
              "sample_period_s": 0.05}
    nvml_stub.configure(config)
    exporter = ExporterProcess("--sample.interval", "100ms", env=nvml_stub.env())
    prom = PrometheusServer(tmp_path / "prom", {"gpu": [f"127.0.0.1:{exporter.port}"]})
    try:
        prom.wait_for('up{job="gpu"} == 1', timeout=30)
        assert prom.wait_for('exporter_build_info{nvml="real"}')
        up = prom.wait_for("gpu_up == 1", min_results=2)
        assert by_gpu(up) == {"0": 1.0, "1": 1.0}
        assert by_gpu(prom.query("gpu_utilization_ratio")) == {"0": 0.37, "1": 0.64}
        assert by_gpu(prom.query("gpu_power_watts"))["1"] == 312.5
        assert by_gpu(prom.query("gpu_temperature_celsius"))["1"] == 55
        assert {r["metric"]["name"] for r in prom.query("gpu_info")} == {"NVIDIA H100 80GB HBM3"}
        xid = prom.wait_for('gpu_xid_errors_total{gpu="1",xid="48"}', timeout=20)
        assert float(xid[0]["value"][1]) == 1
        # Driver samples (one per 50 ms, all at util=37 on GPU 0) land in the sampled histogram.
        rate = prom.wait_for('rate(gpu_sampled_utilization_ratio_count{gpu="0"}[5s]) > 10', timeout=30)
        assert 10 < float(rate[0]["value"][1]) <= 21

        # GPU 1 falls off the bus: it goes down, GPU 0 and the server keep going.
        nvml_stub.configure({**config, "lost_gpu": 1, "util.0": 81})
        prom.wait_for('gpu_up{gpu="1"} == 0', timeout=20)
        prom.wait_for('gpu_utilization_ratio{gpu="0"} == 0.81', timeout=20)
        assert by_gpu(prom.query("gpu_up")) == {"0": 1.0, "1": 0.0}
        assert exporter.proc.poll() is None
        assert "Traceback" not in exporter.log()
    finally:
        prom.stop()
        exporter.stop()
