"""A fast renderer for the Prometheus text format and OpenMetrics 1.0.

prometheus_client's encoders re-validate and re-escape every label of every sample on every scrape
(~3.7 us a sample). Here a label set's rendered string is cached across scrapes: the same
(gpu, uuid, ...) sets come back every scrape, so each is formatted once. The output parses to the same
families and samples as prometheus_client's encoders (tests/test_exposition.py). Every metric name here
is a legacy (ASCII) name, so the name-escaping schemes of newer formats change nothing.
"""
from __future__ import annotations

import math
from typing import Iterable

from prometheus_client.metrics_core import Metric

_RENDERS_PER_GENERATION = 64  # label sets unused for 64-128 renders are forgotten


def _escape_value(v: str) -> str:
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def _format_value(v: float) -> str:
    v = float(v)
    if math.isfinite(v):
        return repr(v)
    if math.isnan(v):
        return "NaN"
    return "+Inf" if v > 0 else "-Inf"


class TextRenderer:
    """Label strings are cached in two generations: every _RENDERS_PER_GENERATION renders the current one
    becomes the old one and the old one is dropped; a hit in the old one moves back. Label sets of exited
    processes (new PIDs all the time) are thus forgotten, and the cache stays the size of what is served."""

    def __init__(self) -> None:
        self._labels: dict[tuple[tuple[str, str], ...], str] = {}
        self._old: dict[tuple[tuple[str, str], ...], str] = {}
        self._renders = 0

    def _label_string(self, labels: dict[str, str]) -> str:
        key = tuple(labels.items())
        text = self._labels.get(key)
        if text is None:
            text = self._old.pop(key, None)
            if text is None:
                text = "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(labels.items())) + "}"
            self._labels[key] = text
        return text

    def cached_label_sets(self) -> int:
        return len(self._labels) + len(self._old)

    def render(self, metrics: Iterable[Metric], openmetrics: bool = False) -> bytes:
        self._renders += 1
        if self._renders % _RENDERS_PER_GENERATION == 0:
            self._old, self._labels = self._labels, {}
        out: list[str] = []
        append = out.append
        label_string = self._label_string
        for metric in metrics:
            mtype = metric.type
            if mtype not in ("counter", "gauge", "histogram"):
                mtype = "unknown" if openmetrics else "untyped"
            # The text format names a counter family with its _total suffix; OpenMetrics without it.
            name = metric.name + "_total" if mtype == "counter" and not openmetrics else metric.name
            doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            if openmetrics:
                doc = doc.replace('"', r'\"')
            append(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
            skip = () if openmetrics else (metric.name + "_created", metric.name + "_gsum", metric.name + "_gcount")
            for s in metric.samples:
                if s.name in skip:  # OpenMetrics-only samples; none of our families has them
                    continue
                labels = label_string(s.labels) if s.labels else ""
                append(f"{s.name}{labels} {_format_value(s.value)}\n")
        if openmetrics:
            append("# EOF\n")
        # Label values from the host (process names, argv) arrive as lone surrogates where their bytes were
        # not UTF-8: replaced, or every scrape would fail on one tenant's process name.
        return "".join(out).encode("utf-8", "replace")
