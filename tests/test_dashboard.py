"""The Grafana dashboard: structure, and every panel query run against a real Prometheus with data."""
from __future__ import annotations

import importlib.util
import json
import re
import urllib.parse

import pytest
import yaml

from tests.conftest import REPO, http_get

DASHBOARD = REPO / "grafana" / "dashboards" / "gpu-telemetry.json"
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}
# What Grafana puts in place of the variables, with "All" selected (allValue ".*").
SUBSTITUTE = {"instance": ".*", "gpu": ".*", "namespace": ".*", "pod": ".*", "__rate_interval": "10s"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_json_is_built_from_the_builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", REPO / "grafana" / "build_dashboard.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert DASHBOARD.read_text() == builder.render(), "run python3 grafana/build_dashboard.py"


def test_structure(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41  # Grafana 10.x / 11.x
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "gpu", "namespace", "pod"} <= variables
    for p in data_panels(dashboard):
        assert p["title"], p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"] and "legendFormat" in t
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    text = json.dumps(dashboard)
    used = set(re.findall(r"\$\{?(\w+)", text))
    assert used <= variables | GRAFANA_BUILTINS, used - variables - GRAFANA_BUILTINS


def test_units_and_thresholds_follow_the_checklist(dashboard):
    by_title = {p["title"]: p for p in data_panels(dashboard)}
    assert by_title["GPU utilisation"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    steps = lambda t: [s["value"] for s in by_title[t]["fieldConfig"]["defaults"]["thresholds"]["steps"]]  # noqa
    assert 0.4 in steps("GPU utilisation")
    assert 0.9 in steps("PCIe % of link max") and 0.9 in steps("PCIe utilisation")
    assert 0.95 in steps("GPU memory used")
    units = {p["fieldConfig"]["defaults"]["unit"] for p in data_panels(dashboard)}
    assert {"percentunit", "Bps", "watt", "celsius", "bytes"} <= units
    assert any(p["type"] == "heatmap" for p in data_panels(dashboard))
    assert any(p["type"] == "state-timeline" for p in data_panels(dashboard))


def expand(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: SUBSTITUTE[m.group(1)], expr)


@pytest.mark.e2e
def test_every_panel_query_returns_data(stack, dashboard):
    failures = []
    for p in data_panels(dashboard):
        for t in p["targets"]:
            expr = expand(t["expr"])
            try:
                result = stack.prom.query(expr)
            except AssertionError as e:  # a parse or evaluation error
                failures.append(f"{p['title']}: {e}")
                continue
            if not result:
                failures.append(f"{p['title']}: {expr} returned nothing")
    assert not failures, "\n".join(failures)


@pytest.mark.e2e
def test_gpu_panels_titled_by_pod_repeat_over_the_pod_variable(stack, dashboard):
    (repeated,) = [p for p in data_panels(dashboard) if p.get("repeat")]
    assert repeated["repeat"] == "pod" and "$pod" in repeated["title"]
    # What Grafana runs for the panel of one pod: that pod's GPU, with its namespace and pod labels.
    expr = re.sub(r"\$\{?(\w+)\}?", lambda m: {"pod": "synth-1"}.get(m.group(1), SUBSTITUTE[m.group(1)]),
                  repeated["targets"][0]["expr"])
    result = stack.prom.query(expr)
    assert [(r["metric"]["gpu"], r["metric"]["namespace"], r["metric"]["pod"]) for r in result] == [
        ("1", "tts", "synth-1")]


@pytest.mark.e2e
def test_variable_queries_return_values(stack, dashboard):
    for v in dashboard["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
        assert m, v["query"]
        selector, label = expand(m.group(1)), m.group(2)
        url = f"{stack.prom.url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector})
        status, _, body = http_get(url)
        assert status == 200 and json.loads(body)["data"], (v["name"], body[:200])


@pytest.mark.e2e
def test_rtf_panel_tracks_the_tts_histogram(stack):
    p50 = stack.prom.query("histogram_quantile(0.5, sum by (le) (rate(tts_real_time_factor_bucket[10s])))")
    assert 0.1 < float(p50[0]["value"][1]) < 1.0


def test_provisioning_points_at_the_dashboard():
    prov = REPO / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((prov / "dashboards" / "gpu-telemetry.yml").read_text())
    assert dash["providers"][0]["type"] == "file" and dash["providers"][0]["options"]["path"]


def test_configmap_for_the_grafana_sidecar_holds_the_dashboard():
    cm = yaml.safe_load((REPO / "deploy" / "grafana" / "dashboard-configmap.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = cm["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD.read_text())
    import kubernetes_validate

    kubernetes_validate.validate(cm, "1.37.0", strict=True)
