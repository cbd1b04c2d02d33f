from __future__ import annotations

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

from exporter.pipeline.collector import SnapshotCollector
from exporter.pipeline.exposition import TextRenderer
from exporter.fake.nvml import FakeGpuSpec, FakeNvml
from tests.conftest import make_sampler


def parsed(text: bytes, parse=text_string_to_metric_families) -> dict:
    """Family -> its samples; process_* values are read live at each collect and render times are measured
    at each, so only their names count."""
    live = ("process_", "exporter_collector_duration_seconds")
    return {(f.name, f.type, f.documentation): sorted(
        (s.name, tuple(sorted(s.labels.items())), None if f.name.startswith(live) else s.value)
        for s in f.samples) for f in parse(text.decode())}


def test_fast_renderer_matches_generate_latest(procfs):
    # A name that needs escaping in a label value, and a full registry as the server has it.
    specs = [FakeGpuSpec(name='Odd "GPU" \\ name\nline'), FakeGpuSpec()]
    s = make_sampler(FakeNvml(specs=specs), procfs.root)
    for _ in range(3):
        s.tick()
        procfs.advance(busy=[10, 20], idle=[90, 80])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: s.snapshot, node_name="n1"))
    ProcessCollector(registry=registry)
    renderer = TextRenderer()
    reference = parsed(generate_latest(registry))
    assert parsed(renderer.render(registry.collect())) == reference
    assert parsed(renderer.render(registry.collect())) == reference  # from the label cache
    assert any("Odd" in str(v) for v in reference.values())
    # OpenMetrics: the strict parser accepts it, and it holds the same families and samples.
    om_reference = parsed(om_exposition.generate_latest(registry), om_parser.text_string_to_metric_families)
    om = renderer.render(registry.collect(), openmetrics=True)
    assert om.endswith(b"# EOF\n")
    assert parsed(om, om_parser.text_string_to_metric_families) == om_reference


def test_label_cache_forgets_label_sets_of_exited_processes():
    from prometheus_client.core import GaugeMetricFamily

    from exporter.pipeline.exposition import TextRenderer

    renderer = TextRenderer()
    for i in range(1000):  # a new PID every render, as with short-lived jobs
        fam = GaugeMetricFamily("gpu_process_memory_used_bytes", "x", labels=["gpu", "pid"])
        fam.add_metric(["0", "1"], 1.0)  # the long-lived server
        fam.add_metric(["0", str(10_000 + i)], 2.0)
        out = renderer.render([fam]).decode()
        assert f'pid="{10_000 + i}"' in out and 'pid="1"' in out
    assert renderer.cached_label_sets() <= 2 * 64 + 1  # not 1001


def test_a_label_value_that_is_not_utf8_does_not_break_the_scrape(procfs):
    """A GPU process named with bytes that are not UTF-8 (any tenant can set its comm with prctl) and a
    --node.name from a non-UTF-8 argv come to Python as lone surrogates: the page must still encode,
    with the bad bytes replaced, not fail every scrape with a 500."""
    from exporter.sources.processes import ProcessAttributor

    procfs.add_process(4000, "tts", "0::/\n")
    stat = procfs.root / "4000" / "stat"
    stat.write_bytes(stat.read_bytes().replace(b"(tts)", b"(tts\xffx)"))
    fake = FakeNvml(1)
    fake.set_processes(0, [(4000, 2**30)])
    s = make_sampler(fake, procfs.root, attributor=ProcessAttributor(procfs.root))
    s.tick()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: s.snapshot, node_name="node\udcff"))
    pages = [TextRenderer().render(registry.collect(), openmetrics=om).decode("utf-8") for om in (False, True)]
    for page in pages:
        assert 'comm="tts?x"' in page and 'node="node?"' in page
    assert "gpu_process_memory_used_bytes" in {f.name for f in text_string_to_metric_families(pages[0])}
    assert "gpu_process_memory_used_bytes" in {f.name for f in om_parser.text_string_to_metric_families(pages[1])}
