"""Real GPUs we do not have: nvidia-smi -q -x dumps recorded on users' machines (tests/fixtures/nvidia-smi),
replayed through the whole exporter twice each: on the real pynvml loaded with the C stand-in configured from
the dump (testkit/smi_dump.py), and through --fake-gpus-from (the Python fake). Each series nvidia-smi also
shows carries nvidia-smi's number; each N/A costs its series only (no 0, no error count, one log line)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from exporter.fake.smi import MAX_DUMP_BYTES, NotADump, parse_dump, read_dump
from testkit.processes import REPO, ExporterProcess, http_get
from testkit.smi_dump import (EXPORTER_FLAGS, JITTER, absent_series, expected_series, gpus_table, stub_config)

DUMP_DIR = REPO / "tests" / "fixtures" / "nvidia-smi"
DUMPS = sorted(DUMP_DIR.glob("*.xml"))
GIB, MIB = 2**30, 2**20


def samples(body: bytes) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples]


def find(got: list[tuple[str, dict[str, str], float]], name: str, labels: tuple[tuple[str, str], ...]) -> list[float]:
    return [v for n, lab, v in got if n == name and all(lab.get(k) == want for k, want in labels)]


def mismatches(got: list[tuple[str, dict[str, str], float]], want: dict, dump_name: str, jitter: bool) -> list[str]:
    out = []
    for (name, labels), value in want.items():
        served = find(got, name, labels)
        rel, absolute = JITTER.get(name, (0.0, 0.0)) if jitter else (0.0, 0.0)
        rel = 0.01 if name == "gpu_pcie_throughput_bytes_per_second" else rel  # a rate of a counter
        if len(served) != 1 or not math.isclose(served[0], value, rel_tol=rel + 1e-9, abs_tol=absolute + 1e-9):
            out.append(f"{dump_name}: {name}{dict(labels)} = {served}, nvidia-smi shows {value}")
    return out


def scrape_until_right(exporter: ExporterProcess, want: dict, dump_name: str, jitter: bool,
                       timeout: float = 20.0) -> list[tuple[str, dict[str, str], float]]:
    """Scrape until every series carries nvidia-smi's number (PCIe's fallback thread reports after 1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        got = samples(http_get(exporter.url + "/metrics")[2])
        wrong = mismatches(got, want, dump_name, jitter)
        if not wrong:
            return got
        assert time.monotonic() < deadline, "\n".join(wrong) + "\n" + exporter.log()
        time.sleep(0.2)


def log_of(exporter: ExporterProcess) -> str:
    return exporter.log()


def check_exporter(exporter: ExporterProcess, dump_path: Path, mode: str) -> None:
    jitter = mode == "fake"
    dump = read_dump(dump_path)
    want = expected_series(dump)
    try:
        scrape_until_right(exporter, want, dump_path.name, jitter)
        time.sleep(1.0)  # ten more ticks: N/A must not grow an error count or repeat its log line
        got = scrape_until_right(exporter, want, dump_path.name, jitter)
        for name, labels in absent_series(dump):
            assert not find(got, name, labels), f"{dump_path.name}: N/A but served: {name}{dict(labels)}"
        # An N/A is an answer, not a failure: no error count at all, let alone one that grows per tick.
        assert not [(lab, v) for n, lab, v in got if n == "exporter_errors_total" and v], log_of(exporter)
        assert find(got, "exporter_build_info", (("nvml", mode),))
        status, _, _ = http_get(exporter.url + "/healthz")
        assert status == 200
        log = exporter.log()
        assert "Traceback" not in log and "ERROR" not in log
        # The only warning allowed is the sampler's deadline on a loaded CI machine, which is not about N/A.
        assert not [line for line in log.splitlines() if "WARNING" in line and "stuck in read" not in line], log
        lines = re.findall(r"GPU \d+: (\S+) not supported", log)
        assert len(lines) == len(set(lines)), f"a NotSupported call logged more than once:\n{log}"
        if any(g.mig for g in dump.gpus):
            _, _, body = http_get(exporter.url + "/api/v1/diagnosis")
            assert b'"mig_no_utilization"' in body
    finally:
        assert exporter.stop() in (0, -15)


@pytest.mark.e2e
@pytest.mark.parametrize("dump_path", DUMPS, ids=[p.stem for p in DUMPS])
def test_dump_through_the_real_pynvml_on_the_stand_in(dump_path, nvml_stub):
    nvml_stub.configure(stub_config(read_dump(dump_path)))
    exporter = ExporterProcess("--sample.interval", "100ms", *EXPORTER_FLAGS, env=nvml_stub.env())
    check_exporter(exporter, dump_path, "real")


@pytest.mark.e2e
@pytest.mark.parametrize("dump_path", DUMPS, ids=[p.stem for p in DUMPS])
def test_dump_through_fake_gpus_from(dump_path):
    exporter = ExporterProcess("--sample.interval", "100ms", *EXPORTER_FLAGS, "--fake-gpus-from", str(dump_path))
    check_exporter(exporter, dump_path, "fake")


# ---- the parser: spot checks against the dumps' own text, schemas v10-v13 ------------------------------
def test_values_are_nvidia_smis_numbers_in_nvml_units():
    a100 = read_dump(DUMP_DIR / "a100-sxm4-v12.xml")
    assert (a100.driver, a100.schema) == ("535.54.03", "v12")
    (g,) = a100.gpus
    assert g.values["mem_total"] == 81920 * MIB and g.values["mem_used"] == 50 * MIB
    assert g.values["power_mw"] == 67030 and g.values["limit_mw"] == 500000 and g.values["temp"] == 27
    assert g.values["pcie_tx_kbps"] == 4000 and (g.values["pcie_gen"], g.values["pcie_width"]) == (4, 16)
    assert "util" not in g.values and "fan" not in g.values  # N/A under MIG, and a fanless SXM board
    assert [(m.gpu_instance_id, m.memory_total, m.memory_used) for m in g.mig or ()] == \
        [(gi, 19968 * MIB, 12 * MIB) for gi in (3, 4, 5, 6)]
    a10g = read_dump(DUMP_DIR / "a10g.xml")  # v11: enforced_power_limit, clocks_throttle_reasons
    assert a10g.schema == "v11" and a10g.gpus[0].values["limit_mw"] == 300000
    assert a10g.gpus[0].values["reasons"] == 0x1  # gpu_idle Active
    ada = read_dump(DUMP_DIR / "rtx-4000-sff-ada-v13.xml")  # v13: average_power_draw beside the instant one
    assert ada.schema == "v13" and ada.gpus[0].values["power_mw"] == 8810 and ada.gpus[0].values["fan"] == 30
    assert [(p.pid, p.kind, p.used) for p in ada.gpus[0].processes or ()][:3] == \
        [(1842, "G", 410 * MIB), (3190, "G", 451 * MIB), (4937, "C", 160 * MIB)]
    old = read_dump(DUMP_DIR / "gtx-1070-ti.xml")  # v10, trimmed: no power, no max link, no processes
    assert old.schema == "v10" and "power_mw" not in old.gpus[0].values and old.gpus[0].processes is None
    assert "nvmlDeviceGetMemoryInfo_v2" in old.gpus[0].unsupported()  # no <reserved>: a pre-R510 driver


@pytest.mark.parametrize("data, why", [
    (b"", "not XML"),
    (b"hello", "not XML"),
    (b"<html><body/></html>", "not <nvidia_smi_log>"),
    (b"<nvidia_smi_log><driver_version>1</driver_version></nvidia_smi_log>", "no <gpu>"),
    (b'<?xml version="1.0"?><!DOCTYPE nvidia_smi_log [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
     b"<nvidia_smi_log><gpu>&b;</gpu></nvidia_smi_log>", "entity"),
    (b'<!DOCTYPE nvidia_smi_log SYSTEM "http://evil.example/x.dtd"><nvidia_smi_log><gpu/></nvidia_smi_log>', "DTD"),
    (b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><nvidia_smi_log><gpu>&e;</gpu></nvidia_smi_log>', "DTD"),
    (b"<nvidia_smi_log>" + b"<gpu/>" * 17 + b"</nvidia_smi_log>", "at most 16"),
    (b" " * (MAX_DUMP_BYTES + 1), "larger than"),
])
def test_what_is_not_a_dump_is_refused_in_one_line(data, why):
    with pytest.raises(NotADump, match=why) as info:
        parse_dump(data)
    assert "\n" not in str(info.value)


def test_converter_and_flag_refuse_a_non_dump_with_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_bytes(b'<!DOCTYPE a [<!ENTITY a "x">]><nvidia_smi_log/>')
    for cmd in ([sys.executable, "-m", "testkit.smi_dump", str(bad)],
                [sys.executable, "-m", "exporter", "--fake-gpus-from", str(bad)],
                [sys.executable, "-m", "exporter", "--fake-gpus-from", str(tmp_path / "absent.xml")]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "exporter"], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "GPU_EXPORTER_FAKE_GPUS_FROM": str(bad)})
    assert r.returncode == 2 and "GPU_EXPORTER_FAKE_GPUS_FROM" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_converter_writes_the_stand_ins_configuration_and_the_fakes_fixture(tmp_path):
    out = tmp_path / "a100.cfg"
    r = subprocess.run([sys.executable, "-m", "testkit.smi_dump", str(DUMP_DIR / "a100-sxm4-v12.xml"),
                        "--out", str(out)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    config = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert config["mig.0"] == "3,4,5,6" and config["mem_total.gi3.0"] == str(19968 * MIB)
    assert config["fail.nvmlDeviceGetUtilizationRates.0"] == "3" and config["power_mw.0"] == "67030"
    r = subprocess.run([sys.executable, "-m", "testkit.smi_dump", str(DUMP_DIR / "gtx-1660-ti.xml"), "--format",
                        "fake"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and '"nvmlDeviceGetTotalEccErrors"' in r.stdout


def test_docs_table_matches_the_dumps():
    table = gpus_table({p.name: read_dump(p) for p in DUMPS})
    assert table in (REPO / "docs" / "gpus.md").read_text(), \
        "docs/gpus.md is stale: python -m testkit.smi_dump --format table tests/fixtures/nvidia-smi/*.xml"


def test_fixtures_readme_names_every_dump():
    readme = (DUMP_DIR / "README.md").read_text()
    assert "MIT" in readme and "Permission is hereby granted" in readme
    assert all(p.name in readme for p in DUMPS)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_are_refused_cleanly(data):
    try:
        parse_dump(data)
    except NotADump as exc:
        assert "\n" not in str(exc)


_A10G = (DUMP_DIR / "a10g.xml").read_bytes()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_A10G) - 1), st.integers(0, 200), st.binary(max_size=40))
def test_a_damaged_dump_parses_or_is_refused_cleanly(at, cut, insert):
    try:
        dump = parse_dump(_A10G[:at] + insert + _A10G[at + cut:])
    except NotADump:
        return
    for gpu in dump.gpus:
        assert all(isinstance(v, int) for v in gpu.values.values())
        stub_config(dump)  # and the stand-in's configuration is written from whatever was read


def test_stand_in_answers_the_keys_a_dump_needs(nvml_stub):
    """The stand-in's additions for dumps, through the real pynvml: one clock N/A, fan, P-state, graphics
    processes, remapped rows, a MIG device's own memory, the recorded bus id."""
    nvml_stub.configure({"gpus": 1, "sm_mhz.0": "na", "mem_mhz": 405, "fan.0": 46, "pstate": 8,
                         "gprocs": f"835:{550 * MIB},99:{2**64 - 1}", "remap_corr": 2, "remap_pending": 1,
                         "mig": "3", "mem_total.gi3": 19968 * MIB, "mem_used.gi3": 12 * MIB, "mem_reserved.gi3": 0,
                         "bus_id": "00000000:0A:00.0", "uuid": "GPU-513536b6-7d19-9063-b049-1e69664bb298"})
    nv = nvml_stub.bind()
    nv.nvmlInit()
    try:
        h = nv.nvmlDeviceGetHandleByIndex(0)
        with pytest.raises(nv.NVMLError_NotSupported):
            nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)
        assert nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM) == 405
        assert nv.nvmlDeviceGetFanSpeed_v2(h, 0) == 46 and nv.nvmlDeviceGetPerformanceState(h) == 8
        assert [(p.pid, p.usedGpuMemory) for p in nv.nvmlDeviceGetGraphicsRunningProcesses(h)] == \
            [(835, 550 * MIB), (99, None)]  # N/A memory as pynvml reports NVML_VALUE_NOT_AVAILABLE
        assert tuple(nv.nvmlDeviceGetRemappedRows(h)) == (2, 0, 1, 0)
        assert nv.nvmlDeviceGetPciInfo(h).busId == "00000000:0A:00.0"
        assert nv.nvmlDeviceGetUUID(h) == "GPU-513536b6-7d19-9063-b049-1e69664bb298"
        mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, 0)
        mem = nv.nvmlDeviceGetMemoryInfo(mig)
        assert (mem.total, mem.used) == (19968 * MIB, 12 * MIB)
        nvml_stub.configure({"gpus": 1})  # unconfigured: a fanless board, as before the fan call existed
        with pytest.raises(nv.NVMLError_NotSupported):
            nv.nvmlDeviceGetFanSpeed_v2(h, 0)
    finally:
        nv.nvmlShutdown()


def test_old_drivers_refuse_the_batched_fields_so_their_boards_take_the_calls():
    configs = {p.name: stub_config(read_dump(p)) for p in DUMPS}
    by_driver = {name: read_dump(p).driver for name, p in zip(configs, DUMPS)}
    for name, config in configs.items():
        major = int(by_driver[name].split(".")[0] or 0)  # no driver version in the dump: the oldest shape
        refused = set(config.get("field_na", "").split(",")) - {""}
        assert refused == ({"83", "94", "185"} if major < 450 else {"185"} if major < 535 else set()), name
    assert any("field_na" in c for c in configs.values()) and any("field_na" not in c for c in configs.values())


def _one_gpu(inner: bytes, driver: bytes = b"535.1") -> bytes:
    return (b"<nvidia_smi_log><driver_version>" + driver + b'</driver_version><gpu id="00000000:01:00.0">'
            + inner + b"</gpu></nvidia_smi_log>")


def test_entities_in_another_encoding_are_refused_before_any_expansion():
    """The byte check for `<!ENTITY` missed a UTF-16 dump (expat reads it): a 3.6 MB one expanded to
    240 MB of text, 527 MiB RSS where the DaemonSet has 128 MiB."""
    doc = ('<?xml version="1.0" encoding="UTF-16"?>\n<!DOCTYPE nvidia_smi_log [<!ENTITY a "' + "x" * 400
           + '">]><nvidia_smi_log><gpu id="x"><product_name>' + "&a;" * 20_000 + "</product_name></gpu>"
           "</nvidia_smi_log>")
    with pytest.raises(NotADump, match="entity") as info:
        parse_dump(doc.encode("utf-16"))
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("inner, why", [
    (b"<a>" * 100_000 + b"</a>" * 100_000, "deep"),  # 580 000 levels fit in 4 MB: 186 MiB RSS
    (b"<a/>" * 1_000_000, "elements"),  # 1 000 000 empty ones fit: 115 MiB RSS and 2.7 s of find()
])
def test_a_dump_deeper_or_more_numerous_than_any_real_one_is_refused(inner, why):
    with pytest.raises(NotADump, match=why) as info:
        parse_dump(_one_gpu(inner))
    assert "\n" not in str(info.value)


def test_odd_numbers_are_absent_values_never_a_traceback_or_a_quadratic_match():
    """A 400-digit value overflowed float -> round() (OverflowError); a 5000-digit driver version
    int() (ValueError); "1" + 32 000 spaces + "!" took 10.9 s in the number regex (quadratic)."""
    dump = parse_dump(_one_gpu(b"<temperature><gpu_temp>" + b"9" * 400 + b" C</gpu_temp></temperature>"
                               b"<fan_speed>1" + b" " * 50_000 + b"!</fan_speed>", driver=b"1" * 5000))
    assert "temp" not in dump.gpus[0].values and "fan" not in dump.gpus[0].values
    assert dump.driver.startswith("111")


def test_a_fifo_given_as_a_dump_is_one_line_not_a_hang(tmp_path):
    """read_dump used open(): a FIFO (or a device that blocks) held start-up forever."""
    fifo = tmp_path / "dump.xml"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "exporter", "--fake-gpus-from", str(fifo)], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a regular file" in r.stderr, r.stderr
