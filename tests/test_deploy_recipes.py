"""The deployment recipes (scripts/k8s, scripts/compose) hang together: fast, nothing is deployed.

Every YAML file parses; Services select Deployments' pods and name their ports; each role's sub300.toml
loads with the real configuration loader, and its ports are the containers' and Services'; the media
nodes reach the model Service; the grace period outlasts the drain; the HPA scales the media Deployment on
the metric that the Prometheus adapter derives from series that /metrics really exports (read from
agent/metrics.py's registry); the compose file's ports agree with its dispatcher list and nginx node list,
and its files exist.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml  # the test extra (PyYAML)

from sub300.agent.admission import Admission
from sub300.agent.config import load_config
from sub300.agent.metrics import MetricsObserver
from sub300.drain import CLOSE_TIMEOUT_S

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
K8S, COMPOSE = SCRIPTS / "k8s", SCRIPTS / "compose"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> list[dict]:
    return [d for path in sorted(K8S.glob("*.yaml")) if path.name != "prometheus-adapter-values.yaml"
            for d in _docs(path)]


def _of_kind(kind: str) -> list[dict]:
    return [d for d in _k8s() if d["kind"] == kind]


def _toml(config_map: dict, environ: dict | None = None):
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(config_map["data"]["sub300.toml"])
        f.flush()
        return load_config(f.name, environ=environ or {})


def _exported_metrics() -> set[str]:
    """The series names /metrics exports once the process's admission is watched (as `sub300 serve` does)."""
    observer = MetricsObserver(300.0)
    observer.watch(Admission.per_transport("sip", 1))
    return {metric.name for metric in observer.registry.collect()}


def test_every_yaml_parses_and_every_kubernetes_object_is_named():
    paths = sorted(K8S.glob("*.yaml")) + sorted(COMPOSE.glob("*.yml"))
    assert len(paths) >= 6
    for path in paths:
        assert _docs(path), path
    for doc in _k8s():
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


def test_services_select_deployments_and_their_ports():
    deployments = _of_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"sub300-media", "sub300-model"}
    for deployment in deployments:
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    for service in _of_kind("Service"):
        selector = service["spec"]["selector"].items()
        (target,) = [d for d in deployments if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        ports = [p for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
        for port in service["spec"]["ports"]:
            (match,) = [p for p in ports if port["targetPort"] in (p["name"], p["containerPort"])]
            assert match["protocol"] == port["protocol"], (service["metadata"]["name"], port)


def test_the_ingress_routes_to_the_media_service_and_not_the_per_node_routes():
    (ingress,) = _of_kind("Ingress")
    services = {s["metadata"]["name"]: {p["name"] for p in s["spec"]["ports"]} for s in _of_kind("Service")}
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["port"]["name"] in services[backend["name"]], path
    routed = {p["path"] for p in paths}
    assert "/offer" in routed and not routed & {"/metrics", "/readyz", "/livez", "/healthz"}
    assert "http_503" in ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-next-upstream"]


def _container(name: str) -> dict:
    (deployment,) = [d for d in _of_kind("Deployment") if d["metadata"]["name"] == name]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def _config_of(deployment: dict, environ: dict | None = None):
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    (config_map,) = [c for c in _of_kind("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    return _toml(config_map, environ)


@pytest.mark.parametrize(("name", "role"), [("sub300-media", "media"), ("sub300-model", "model")])
def test_each_role_config_loads_and_agrees_with_its_deployment(name, role):
    deployment, container = _container(name)
    config = _config_of(deployment, {"SUB300_SIP_PUBLIC_ADDRESS": "10.1.2.3"})
    assert config.server.role == role
    ports = {(p["name"], p["protocol"]): p["containerPort"] for p in container["ports"]}
    assert ports[("http", "TCP")] == config.server.port
    if config.sip.enabled:
        assert ports[("sip-udp", "UDP")] == ports[("sip-tcp", "TCP")] == config.sip.port
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["config"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SUB300_CONFIG"] == f"{mount}/sub300.toml"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    # SIGTERM drains; the pod must not be killed before the drain and a closer are through (no preStop needed)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.server.drain_timeout_s + CLOSE_TIMEOUT_S
    assert "lifecycle" not in container


def test_media_nodes_reach_the_model_service_and_the_model_has_a_gpu():
    deployment, _ = _container("sub300-media")
    config = _config_of(deployment)
    (service,) = [s for s in _of_kind("Service") if s["metadata"]["name"] == "sub300-model"]
    model_port = service["spec"]["ports"][0]["port"]
    for stage in (config.stt, config.llm, config.tts):
        assert stage.engine == "openai"
        url = urlsplit(stage.base_url)
        assert (url.hostname, url.port) == ("sub300-model", model_port), stage.base_url
    _, model = _container("sub300-model")
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_hpa_scales_media_on_a_metric_derived_from_what_metrics_exports():
    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sub300-media"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (adapter,) = _docs(K8S / "prometheus-adapter-values.yaml")
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    exported = _exported_metrics()
    assert "sub300_capacity_remaining_calls" in exported
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert series == "sub300_capacity_remaining_calls" and re.fullmatch(rule["name"]["matches"], series)
    used = set(re.findall(r"\b(sub300_\w+)\{", rule["metricsQuery"]))
    assert used and used <= exported, used - exported


# ------------------------------------------------------------------ compose
def _nodes_conf(path: Path) -> dict:
    """scripts/nginx/sub300-nodes.conf's layout: {name: address}, checked for agreement between its blocks."""
    text = path.read_text()
    pool = re.search(r"upstream sub300_nodes \{(.*?)\}", text, re.S).group(1)
    pool_addresses = re.findall(r"server (\S+?)[ ;]", pool)
    pinned = dict(re.findall(r"upstream sub300_(\w+) \{ server (\S+?);", text))
    answered = {name: addr.replace("\\", "") for addr, name in
                re.findall(r'"~\(\^\|, \)(\S+)\$"\s+(\w+);', text)}
    by_name = dict(re.findall(r"^\s+(\w+)\s+sub300_(\w+);", text, re.M))
    assert by_name.pop("default") == "nodes", text   # an unknown pin: any node
    assert sorted(pinned.values()) == sorted(pool_addresses), text
    assert answered == pinned, (answered, pinned)
    assert {k: k for k in pinned} == by_name, by_name
    return pinned


def test_the_example_nginx_node_list_is_consistent():
    assert len(_nodes_conf(SCRIPTS / "nginx" / "sub300-nodes.conf")) == 2


def _compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def _environment(service: dict) -> dict[str, str]:
    fill = {"POSTGRES_PASSWORD": "pw", "SUB300_TOKEN_SECRET": "secret"}
    return {k: re.sub(r"\$\{(\w+)(:\?)?\}", lambda m: fill[m.group(1)], str(v))
            for k, v in service["environment"].items()}


def test_compose_ports_agree_with_kamailio_nginx_and_the_model():
    services = _compose()["services"]
    configs = {name: load_config(None, environ=_environment(s)) for name, s in services.items()
               if s.get("image") == "sub300:latest"}
    model = configs.pop("model")
    assert model.server.role == "model" and {c.server.role for c in configs.values()} == {"media"}
    assert len(configs) >= 2
    http = sorted(f"{c.server.host}:{c.server.port}" for c in configs.values())
    assert sorted(_nodes_conf(COMPOSE / "nginx-nodes.conf").values()) == http
    dispatcher = [line.split()[1] for line in (COMPOSE / "dispatcher.list").read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
    assert sorted(dispatcher) == sorted(f"sip:{c.sip.host}:{c.sip.port}" for c in configs.values() if c.sip.enabled)
    ranges = sorted((c.sip.rtp_port_min, c.sip.rtp_port_max) for c in configs.values())
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False)), ranges   # no shared RTP port
    for config in configs.values():
        for stage in (config.stt, config.llm, config.tts):
            url = urlsplit(stage.base_url)
            assert stage.engine == "openai" and (url.hostname, url.port) == (model.server.host, model.server.port)
    ports = [c.server.port for c in [model, *configs.values()]] + [c.sip.port for c in configs.values()]
    assert len(ports) == len(set(ports)), ports   # one host network: every listener its own port
    for name in [*configs, "model"]:
        grace = int(services[name]["stop_grace_period"].rstrip("s"))
        drain = (configs.get(name) or model).server.drain_timeout_s
        assert grace > drain + CLOSE_TIMEOUT_S, name


def test_compose_mounts_files_that_exist():
    for service in _compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).resolve().is_file(), source
    kamailio = _compose()["services"]["kamailio"]
    mounted = {v.split(":")[1] for v in kamailio["volumes"]}
    for target in ("/etc/kamailio/sub300.cfg", "/etc/kamailio/sub300.list"):
        assert target in mounted and any(target in arg for arg in kamailio["command"]), target
