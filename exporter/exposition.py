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

_MAX_CACHED_LABEL_SETS = 50_000  # a bound for label churn; cleared when exceeded


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
    def __init__(self) -> None:
        self._labels: dict[tuple[tuple[str, str], ...], str] = {}

    def _label_string(self, labels: dict[str, str]) -> str:
        key = tuple(labels.items())
        text = self._labels.get(key)
        if text is None:
            if len(self._labels) >= _MAX_CACHED_LABEL_SETS:
                self._labels.clear()
            text = "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(labels.items())) + "}"
            self._labels[key] = text
        return text

    def render(self, metrics: Iterable[Metric], openmetrics: bool = False) -> bytes:
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
        return "".join(out).encode()
