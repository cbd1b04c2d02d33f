"""Faults that must stay contained: an all-NotSupported GPU is up with no values, and problems are logged
once per transition, not once per tick. (The request cap is tested in test_httpd.py.)"""
from __future__ import annotations

import logging
import threading
import time

import pynvml
from prometheus_client import CollectorRegistry

from exporter.fake.nvml import FakeNvml, fake_call_names
from exporter.web.server import make_server
from tests.conftest import ALL_COLLECTORS, families, http_get, make_sampler


def test_gpu_with_every_call_not_supported_is_up_with_no_values(procfs):
    fake = FakeNvml(2)
    identity = {"nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount",
                "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetPciInfo"}
    for call in set(fake_call_names()) - identity:  # every optional (data) call
        fake.inject(call, gpu=1, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = make_sampler(fake, procfs.root)
    for _ in range(3):
        s.tick()
    fams = families(s)
    assert {x.labels["gpu"]: x.value for x in fams["gpu_up"].samples} == {"0": 1, "1": 1}
    for name in ("gpu_utilization_ratio", "gpu_power_watts", "gpu_temperature_celsius", "gpu_clock_hertz",
                 "gpu_pcie_throughput_bytes_per_second", "gpu_process_memory_used_bytes"):
        assert {x.labels["gpu"] for x in fams[name].samples} <= {"0"}, name
    assert dict(s.snapshot.stats.errors) == {}
    calls_after_probe = sum(fake.calls.values())
    s.tick()
    gpu0_calls_per_tick = sum(fake.calls.values()) - calls_after_probe
    assert gpu0_calls_per_tick < 20  # GPU 1 is not asked again: only GPU 0's reads remain


def test_problems_are_logged_once_per_transition(procfs, caplog):
    fake = FakeNvml(1)
    s = make_sampler(fake, procfs.root)
    s.tick()
    fake.inject("nvmlDeviceGetTemperature", gpu=0, error=pynvml.NVML_ERROR_UNKNOWN)
    with caplog.at_level(logging.INFO, logger="exporter"):
        for _ in range(5):
            s.tick()
        fake.clear_faults(0)
        for _ in range(3):
            s.tick()
    messages = [r.getMessage() for r in caplog.records if r.name == "exporter.pipeline.sampler"]
    assert messages == ["GPU 0: failing calls: nvmlDeviceGetTemperature", "GPU 0: recovered"]
    assert dict(s.snapshot.stats.errors)[("nvml", "nvmlDeviceGetTemperature")] == 5  # counted every tick


def test_a_lost_gpu_is_logged_once_for_the_whole_outage(procfs, caplog):
    fake = FakeNvml(1)
    s = make_sampler(fake, procfs.root)
    s.tick()
    fake.lose_gpu(0)
    with caplog.at_level(logging.INFO, logger="exporter"):
        for _ in range(6):  # the failing read, then ticks inside the re-open back-off
            s.tick()
    lost = [r.getMessage() for r in caplog.records if r.name == "exporter.pipeline.sampler"]
    assert len(lost) == 1 and lost[0].startswith("GPU 0: lost"), lost


def test_no_permission_is_counted_and_logged_once_and_not_asked_again(procfs, caplog):
    fake = FakeNvml(2)
    fake.inject("nvmlDeviceGetComputeRunningProcesses", gpu=0, error=pynvml.NVML_ERROR_NO_PERMISSION)
    fake.inject("nvmlDeviceGetTotalEnergyConsumption", gpu=0, error=pynvml.NVML_ERROR_NO_PERMISSION)
    s = make_sampler(fake, procfs.root)
    with caplog.at_level(logging.INFO, logger="exporter"):
        s.tick()
        asked = fake.calls["nvmlDeviceGetTotalEnergyConsumption"]
        for _ in range(5):
            s.tick()
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == asked + 5  # GPU 1 only, every tick
    errors = dict(s.snapshot.stats.errors)
    assert errors[("nvml", "nvmlDeviceGetTotalEnergyConsumption")] == 1
    assert errors[("nvml", "nvmlDeviceGetComputeRunningProcesses")] == 1
    denied = [r for r in caplog.records if "no permission" in r.getMessage()]
    assert len(denied) == 2 and all(r.levelno == logging.WARNING for r in denied)
    fams = families(s)
    assert {x.labels["gpu"]: x.value for x in fams["gpu_up"].samples} == {"0": 1, "1": 1}
    assert {x.labels["gpu"] for x in fams["gpu_energy_joules"].samples} == {"1"}
    assert {x.labels["gpu"] for x in fams["gpu_power_watts"].samples} == {"0", "1"}  # the rest of GPU 0 stays


def test_a_5s_hang_seen_through_http_while_everything_else_keeps_serving(procfs):
    """The issue's case end to end in one process: real sampler thread, real HTTP server, one NVML call
    of GPU 1 hanging for 5 s."""
    from exporter.pipeline.collector import SnapshotCollector
    from prometheus_client.parser import text_string_to_metric_families

    fake = FakeNvml(2)
    s = make_sampler(fake, procfs.root, interval=0.1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: s.snapshot, collectors=ALL_COLLECTORS))
    server = make_server("127.0.0.1:0", registry, s.health, generation=lambda: s.snapshot)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    s.start()

    def scrape() -> dict:
        body = http_get(url + "/metrics")[2].decode()
        return {(x.name, x.labels.get("gpu")): x.value for f in text_string_to_metric_families(body) for x in f.samples}

    try:
        deadline = time.monotonic() + 5
        while ("gpu_up", "1") not in scrape() and time.monotonic() < deadline:
            time.sleep(0.05)
        fake.inject("nvmlDeviceGetTemperature", gpu=1, latency_s=5.0, times=1)
        hung_at = time.monotonic()
        deadline = hung_at + 3
        while scrape().get(("gpu_up", "1")) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = scrape()
        status, _, health = http_get(url + "/healthz")
        assert status == 200 and b"gpu 1: stuck in nvmlDeviceGetTemperature" in health
        for _ in range(20):  # 2 s, still inside the hang; the host's CPU keeps moving
            procfs.advance([5, 5], [5, 5])
            time.sleep(0.1)
        during = scrape()
        assert time.monotonic() - hung_at < 5
        assert during[("gpu_up", "1")] == 0 and during[("gpu_up", "0")] == 1
        assert during[("exporter_samples_total", None)] - before[("exporter_samples_total", None)] >= 10  # ~20 due
        assert during[("gpu_energy_joules_total", "0")] > before[("gpu_energy_joules_total", "0")]  # GPU 0 fresh
        host = ("host_sampled_cpu_utilization_ratio_count", None)
        assert during[host] - before[host] >= 10  # the host is sampled on schedule too
        deadline = time.monotonic() + 10
        while scrape().get(("gpu_up", "1")) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scrape()[("gpu_up", "1")] == 1  # back once the call returned
        assert b"stuck" not in http_get(url + "/healthz")[2]
    finally:
        s.stop()
        server.shutdown()
        server.server_close()


# ---- source faults: each source read isolated (issue #13, defect 5) ---------------------------------
def _cgroup_tree(root, rel: str = "tts") -> None:
    """A cgroup v2 directory whose accounting files are all valid."""
    d = root / rel
    d.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (d / "cpu.stat").write_text("usage_usec 2000000\nnr_periods 100\nnr_throttled 25\nthrottled_usec 400000\n")
    (d / "cpu.max").write_text("150000 100000\n")
    (d / "memory.current").write_text("1048576\n")
    (d / "memory.max").write_text("4294967296\n")


def _sampler_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "exporter.pipeline.sampler"]


def test_malformed_cgroup_files_cost_their_own_series_and_one_log_line(procfs, tmp_path, caplog):
    from exporter.sources.cgroup import CgroupSource

    root = tmp_path / "cgroup"
    _cgroup_tree(root)
    (root / "tts" / "cpu.max").write_text("100000 0\n")  # period 0
    (root / "tts" / "cpu.stat").write_bytes(b"usage_usec lots\n\x00\x01")
    (root / "tts" / "memory.current").write_bytes(b"\xff\xfe1048576\n")  # not UTF-8
    s = make_sampler(FakeNvml(1), procfs.root, cgroup=CgroupSource(root, path="/tts"))
    with caplog.at_level(logging.INFO, logger="exporter"):
        for _ in range(5):
            procfs.advance([5, 5], [5, 5])
            s.tick()
        assert s.snapshot.sequence == 5  # every tick published
        fams = families(s)
        assert fams["host_cpu_utilization_ratio"].samples and fams["gpu_up"].samples[0].value == 1
        assert [x.value for x in fams["cgroup_memory_limit_bytes"].samples] == [4294967296]  # the good file
        assert "cgroup_cpu_limit_cores" not in fams and "cgroup_memory_usage_bytes" not in fams
        errors = dict(s.snapshot.stats.errors)
        assert {k: v for k, v in errors.items() if k[0] == "cgroup"} == {
            ("cgroup", "cpu.stat"): 5, ("cgroup", "cpu.max"): 5, ("cgroup", "memory.current"): 5}
        assert sorted(_sampler_messages(caplog)) == [f"cgroup {n}: cannot read or parse {n}"
                                                     for n in ("cpu.max", "cpu.stat", "memory.current")]
        _cgroup_tree(tmp_path / "fixed")  # the files become valid again
        for name in ("cpu.max", "cpu.stat", "memory.current"):
            (root / "tts" / name).write_bytes((tmp_path / "fixed" / "tts" / name).read_bytes())
        s.tick()
        s.tick()
    assert families(s)["cgroup_cpu_limit_cores"].samples[0].value == 1.5
    messages = _sampler_messages(caplog)
    assert len(messages) == 6 and sorted(messages[3:]) == [f"cgroup {n}: recovered"
                                                            for n in ("cpu.max", "cpu.stat", "memory.current")]


def test_a_source_that_raises_costs_only_its_own_series(procfs, tmp_path, caplog, mocker):
    """A bug (any exception) in one source's read: the tick goes on, the others publish, counted and
    logged once while it lasts, once when it clears."""
    from exporter.sources.cgroup import CgroupSource
    from exporter.sources.processes import ProcessAttributor

    root = tmp_path / "cgroup"
    _cgroup_tree(root)
    fake = FakeNvml(1)
    s = make_sampler(fake, procfs.root, cgroup=CgroupSource(root, path="/tts"), shm_path=str(tmp_path),
                     attributor=ProcessAttributor(procfs.root))
    s.tick()
    broken = {name: mocker.patch.object(obj, attr, side_effect=RuntimeError(f"bug in {name}"))
              for name, obj, attr in (("procfs", s.procfs, "read"), ("cgroup", s.cgroup, "read"),
                                      ("processes", s.attributor, "lookup"), ("nvml", s.nvml, "poll"))}
    mocker.patch("exporter.pipeline.sampler.read_shm", side_effect=OSError(5, "Input/output error"))
    with caplog.at_level(logging.INFO, logger="exporter"):
        for _ in range(4):
            s.tick()
        snap = s.snapshot
        assert snap.sequence == 5 and snap.host is None and snap.cgroup is None and snap.shm is None
        assert families(s)["gpu_up"].samples[0].value == 1  # the GPUs are still read
        errors = dict(snap.stats.errors)
        for name in broken:
            assert errors[(name, "internal:RuntimeError")] == 4
        assert errors[("shm", "internal:OSError")] == 4
        messages = _sampler_messages(caplog)
        assert len(messages) == 5, messages  # one per source, not one per tick
        assert "procfs internal:RuntimeError: read failed (bug in procfs)" in messages
        for patch in broken.values():
            patch.side_effect = None
            patch.return_value = None
        mocker.stopall()
        s.tick()
    assert s.snapshot.host is not None and s.snapshot.cgroup is not None and s.snapshot.shm is not None
    assert len([m for m in _sampler_messages(caplog) if m.endswith("recovered")]) == 5


def test_malformed_cgroup_dir_against_the_real_process(exporter_proc, tmp_path):
    """The issue's case end to end: the process keeps publishing, /healthz 200, CPU metrics present, the
    bad files counted and logged once each, no traceback."""
    root = tmp_path / "cgroup"
    _cgroup_tree(root)
    (root / "tts" / "cpu.max").write_text("max-ish 100000\n")  # not an integer
    (root / "tts" / "memory.current").write_bytes(b"\x80\x81\n")  # not UTF-8
    p = exporter_proc("--fake-gpus", "1", "--sample.interval", "50ms", "--path.cgroupfs", str(root),
                      "--cgroup.path", "/tts")
    body = p.wait_for_sample(needle=b"host_cpu_utilization_ratio ")
    assert b"host_cpu_utilization_ratio " in body
    deadline = time.monotonic() + 10
    while b'exporter_samples_total' not in body or _sample(body, b"exporter_samples_total") < 20:
        assert time.monotonic() < deadline, body[-2000:]
        time.sleep(0.1)
        body = http_get(p.url + "/metrics")[2]
    status, _, health = http_get(p.url + "/healthz")
    assert status == 200 and b"cgroup: cannot read cpu.max, memory.current" in health
    assert b'exporter_errors_total{call="cpu.max",source="cgroup"}' in body
    assert b'cgroup_cpu_throttled_periods_total{cgroup="/tts"} 25.0' in body  # the good files still report
    assert b"cgroup_cpu_limit_cores{" not in body
    log = p.log()
    assert log.count("cgroup cpu.max: cannot read or parse cpu.max") == 1
    assert log.count("cgroup memory.current: cannot read or parse memory.current") == 1
    assert "Traceback" not in log


def _sample(body: bytes, name: bytes) -> float:
    line = next(x for x in body.splitlines() if x.startswith(name + b" "))
    return float(line.split()[1])
