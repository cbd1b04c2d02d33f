"""Deployment artefacts: kustomize renders, objects validate against real Kubernetes schemas offline,
CRD objects carry what Prometheus Operator needs, alert rules pass promtool, the Dockerfile keeps its
invariants. (No Docker engine or cluster here: see docs/operations.md for what is not exercised.)"""
from __future__ import annotations

import json
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO, find_tool

DEPLOY = REPO / "deploy"
K8S_VERSIONS = ["1.32.0", "1.37.0"]


def kustomize(path: str) -> list[dict]:
    out = subprocess.run([find_tool("kubectl"), "kustomize", str(DEPLOY / path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def base() -> dict[str, dict]:
    """The rendered objects by kind; the two PrometheusRules (alerts, fleet recording rules) by kind/name."""
    return {d["kind"] + (f"/{d['metadata']['name']}" if d["kind"] == "PrometheusRule" else ""): d
            for d in kustomize("base")}


def test_base_renders_the_whole_install(base):
    assert set(base) == {"Namespace", "ServiceAccount", "DaemonSet", "Service", "ServiceMonitor",
                         "PrometheusRule/gpu-telemetry-exporter", "PrometheusRule/gpu-telemetry-fleet"}
    for kind, doc in base.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "gpu-telemetry", kind


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_strictly(base, version):
    for kind, doc in base.items():
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # CRDs: checked field by field below
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_typo(base):
    broken = yaml.safe_load(yaml.safe_dump(base["DaemonSet"]))
    broken["spec"]["template"]["spec"]["hostPid"] = True  # wrong case: must be hostPID
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_daemonset_shape(base):
    ds = base["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65534
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes) == {"proc", "pod-resources"}
    mount = mounts["proc"]
    assert mount["readOnly"] and mount["mountPropagation"] == "HostToContainer"
    assert f"--path.procfs={mount['mountPath']}" in c["args"]
    assert volumes["proc"]["hostPath"]["path"] == "/proc"
    # The kubelet's pod-resources directory (not the socket: it is recreated on a kubelet restart), read-only,
    # and the flag points into it.
    kubelet = mounts["pod-resources"]
    assert kubelet["readOnly"] and kubelet["mountPath"] == "/var/lib/kubelet/pod-resources"
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert volumes["pod-resources"]["hostPath"].get("type", "") in ("", "Directory")
    (flag,) = [a for a in c["args"] if a.startswith("--kubernetes.pod-resources-socket=")]
    assert flag.split("=", 1)[1] == kubelet["mountPath"] + "/kubelet.sock"
    # The pod's own 64 MB /dev/shm is not the TTS pod's: measuring it would raise ShmTooSmall everywhere.
    assert "--no-collector.shm" in c["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz" and c[probe]["httpGet"]["port"] == "metrics"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9445}
    env = {e["name"]: e for e in c["env"]}
    assert env["GPU_EXPORTER_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] not in ("100%", None)
    assert c["image"].endswith(":0.1.0")  # the kustomize images entry applied


def test_service_and_servicemonitor_select_the_pods(base):
    pod_labels = base["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    svc = base["Service"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"metrics": 9445}
    sm = base["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics" and ep["interval"] == "15s"
    assert ep["honorLabels"] is True  # gpu_pod_info's namespace/pod are the workload's, not the exporter's
    assert re.fullmatch(r"\d+s", ep["scrapeTimeout"]) and int(ep["scrapeTimeout"][:-1]) < 15


def test_prometheusrule_is_the_rules_file(base):
    rule = base["PrometheusRule/gpu-telemetry-exporter"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    plain = yaml.safe_load((DEPLOY / "rules" / "gpu-telemetry.rules.yml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]
    recording = yaml.safe_load((DEPLOY / "rules" / "gpu-telemetry.recording.yml").read_text())
    assert base["PrometheusRule/gpu-telemetry-fleet"]["spec"]["groups"] == recording["groups"]
    assert all("record" in r for g in recording["groups"] for r in g["rules"])
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(r)
            assert {"summary", "description", "runbook_url"} <= set(r["annotations"])
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync", DEPLOY / "sync.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    for target, kind in sync.TARGETS.items():
        assert target.read_text() == sync.render(kind), f"{target} is stale: run python3 deploy/sync.py"


def test_pod_resources_overlay_runs_as_uid_0_without_capabilities():
    docs = {d["kind"]: d for d in kustomize("overlays/pod-resources")}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False  # the kubelet's socket is root-only
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"] and sc["readOnlyRootFilesystem"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(docs["DaemonSet"], version, strict=True)


def test_runtimeclass_overlay():
    docs = {d["kind"]: d for d in kustomize("overlays/nvidia-runtimeclass")}
    assert docs["DaemonSet"]["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    kubernetes_validate.validate(docs["DaemonSet"], K8S_VERSIONS[-1], strict=True)


def test_tls_overlay_serves_https_from_the_certificate_secret(tmp_path):
    import base64

    from exporter.web.config import parse_web_config

    docs = kustomize("overlays/tls")
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com"):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    by_kind = {d["kind"]: d for d in docs if d["kind"] != "Secret"}
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    pod = by_kind["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all(m["readOnly"] for m in mounts.values())
    # the config file the exporter is told to read is in the mounted web-config Secret
    config_path = env["GPU_EXPORTER_WEB_CONFIG_FILE"]
    assert config_path.startswith(mounts["web-config"]["mountPath"] + "/")
    assert volumes["web-config"]["secret"]["secretName"] == secret["metadata"]["name"]
    config_text = base64.b64decode(secret["data"][config_path.rsplit("/", 1)[1]]).decode()
    tls = parse_web_config(config_text, tmp_path).tls
    # ...and it points at the certificate Secret's keys, where cert-manager's Certificate writes them
    certificate = yaml.safe_load((DEPLOY / "overlays/tls/certificate.yaml").read_text())
    assert volumes["tls"]["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert str(tls.cert.path) == mounts["tls"]["mountPath"] + "/tls.crt"
    assert str(tls.key.path) == mounts["tls"]["mountPath"] + "/tls.key"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS" and c[probe]["httpGet"]["path"] == "/healthz"
    (endpoint,) = by_kind["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == certificate["spec"]["secretName"]
    assert endpoint["tlsConfig"]["serverName"] in certificate["spec"]["dnsNames"]
    service = by_kind["Service"]["metadata"]
    assert endpoint["tlsConfig"]["serverName"] == f"{service['name']}.{service['namespace']}.svc"
    assert "server auth" in certificate["spec"]["usages"]


@pytest.mark.parametrize("name", ["gpu-telemetry.rules", "gpu-telemetry.recording"])
def test_promtool_checks_and_unit_tests_the_rule_files(name):
    promtool = find_tool("promtool")
    rules = DEPLOY / "rules"
    check = subprocess.run([promtool, "check", "rules", f"{name}.yml"], cwd=rules, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", f"{name}.test.yml"], cwd=rules,
                          capture_output=True, text=True, timeout=120)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_every_alert_and_recording_rule_has_a_unit_test():
    rules = DEPLOY / "rules"
    alerts = {r["alert"] for g in yaml.safe_load((rules / "gpu-telemetry.rules.yml").read_text())["groups"]
              for r in g["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", (rules / "gpu-telemetry.rules.test.yml").read_text()))
    assert alerts == tested
    records = {r["record"] for g in yaml.safe_load((rules / "gpu-telemetry.recording.yml").read_text())["groups"]
               for r in g["rules"]}
    recording_tests = (rules / "gpu-telemetry.recording.test.yml").read_text()
    assert {r for r in records if f"expr: {r}" in recording_tests} == records


def test_every_alert_has_a_runbook_section():
    ops = (REPO / "docs" / "operations.md").read_text()
    for group in yaml.safe_load((DEPLOY / "rules" / "gpu-telemetry.rules.yml").read_text())["groups"]:
        for r in group["rules"]:
            assert f"### {r['alert']}" in ops, r["alert"]
            assert r["annotations"]["runbook_url"].endswith("#" + r["alert"].lower())


def test_compose_file_follows_the_compose_spec():
    schema = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    validator = jsonschema.Draft7Validator(schema)  # the schema's own "$schema" is draft-07
    assert [e.message for e in validator.iter_errors(compose)] == []
    typo = {**compose, "services": {**compose["services"], "tts": {**compose["services"]["tts"], "shm_sise": "2g"}}}
    assert any("shm_sise" in e.message for e in validator.iter_errors(typo)), "the schema rejects unknown keys"


def test_compose_sidecar():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())["services"]
    exp = compose["gpu-telemetry-exporter"]
    assert exp["pid"] == "service:tts" and exp["read_only"] is True and "9445:9445" in exp["ports"]
    # the README's `docker run` sidecar (tests/test_container.py runs it), option for option
    assert exp["ipc"] == "service:tts" and compose["tts"]["ipc"] == "shareable" and exp["cap_drop"] == ["ALL"]
    assert exp["security_opt"] == ["no-new-privileges:true"]
    assert compose["tts"]["shm_size"]
    # Grafana gets the provisioning and dashboards folders that exist in this repo.
    for volume in compose["grafana"]["volumes"] + compose["prometheus"]["volumes"]:
        source = volume.split(":")[0]
        assert (DEPLOY / "compose" / source).resolve().exists(), volume
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["job_name"] == "gpu-telemetry-exporter"  # what the alert rules expect


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's stages, each a list of its lines; FROM lines with the global ARGs' defaults put in
    (what `docker build` with no --build-arg uses)."""
    lines = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text()).splitlines()
    stages: list[list[str]] = []
    args: dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not stages and line.upper().startswith("ARG "):
            name, _, default = line[4:].partition("=")
            args[name.strip()] = default.strip()
            continue
        if line.upper().startswith("FROM "):
            line = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line)
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_invariants():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build a wheel, then a runtime image"
    for stage in stages:
        image = stage[0].split()[1]
        assert ":" in image and not image.endswith(":latest"), image
    final = "\n".join(stages[-1])
    user = re.search(r"^USER (\S+)", final, re.M).group(1)
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    assert re.search(r"^HEALTHCHECK .*exporter\.healthcheck", final, re.M) and "curl" not in final
    assert re.search(r"NVIDIA_VISIBLE_DEVICES=all", final) and re.search(r"NVIDIA_DRIVER_CAPABILITIES=utility", final)
    assert re.search(r"^EXPOSE 9445$", final, re.M)
    assert re.search(r'^ENTRYPOINT \["gpu-telemetry-exporter"\]', final, re.M)
    assert not re.search(r"gcc|build-essential|apt-get install", final), "no compilers in the final image"
    assert "COPY --from=" in final
