"""The deployment files agree with the package's real entry points, config keys and metrics.

No Docker engine or cluster runs here: every compose file, manifest, dashboard and rule file is
parsed and checked against the contract (DESIGN.md, the README, pyproject.toml); the Kubernetes
manifests against the Kubernetes API schemas (kubernetes-validate, offline, strict) and the compose
file against the Compose Specification's schema (check-jsonschema's vendored copy).
The phase-2 test runs the same PromQL against a live Prometheus scraping a real router; the image
itself is built and run by .ci/image.sh.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from router.config import settings_from_mapping
from router.logschema import Arm
from router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "champion-challenger.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

JOB = "champion-challenger-router"
PORT = 8000
ENV_CONTRACT = {
    "MLFLOW_TRACKING_URI",
    "ROUTER_CONFIG",
    "ROUTER_PREDICTION_LOG_URL",
    "ROUTER_ADMIN_TOKEN",
}
ROUTER_CMD = [
    "python",
    "-m",
    "router",
    "--config",
    "/app/config.yaml",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
]
ROUTER_FLAGS = {"--config", "--host", "--port", "--workers"}  # `python -m router` (DESIGN.md)

# Metrics the router exports, with their labels (DESIGN.md + the README's metrics table).
COUNTERS = {
    "router_requests": {"arm", "model_version", "status"},
    "router_predicted_class": {"arm", "model_version", "class"},
    "router_fallback": {"reason"},
    "router_covariate_scorings": {"result"},
    "router_feedback": {"arm", "model_version"},
    "router_feedback_correct": {"arm", "model_version"},
    "router_feedback_abs_error": {"arm", "model_version"},
    "router_feedback_squared_error": {"arm", "model_version"},
    "router_feedback_log_loss": {"arm", "model_version"},
    "router_feedback_brier": {"arm", "model_version"},
    "router_feedback_outcome": {"arm", "model_version"},
    "router_feedback_judged": {"arm", "model_version", "metric"},
    "router_feedback_busy": set(),
    "router_output_unread": {"arm", "model_version", "reason"},
    "router_prediction_log_dropped": set(),
    "router_model_reloads": {"arm", "result"},
}
HISTOGRAMS = {
    "router_predict_latency_seconds": {"arm", "model_version"},
    "router_request_latency_seconds": {"route"},
    "router_prediction_value": {"arm", "model_version"},
    "router_batch_rows": {"model_version"},
}
GAUGES = {
    "router_model_info": {"arm", "model_name", "model_version", "run_id"},
    "router_arm_weight": {"arm"},
    "router_ready": set(),
    "router_prediction_log_pending": set(),
    "router_prediction_log_healthy": set(),
    "router_challenger_circuit_open": set(),
    "router_split_epoch": set(),
    "router_split_changed_timestamp_seconds": set(),
    "router_ramp_stage": set(),
    "router_ramp_stages": set(),
    "router_ramp_stage_min_seconds": set(),
}
TARGET_LABELS = {"job", "instance"}


def _exported() -> dict[str, set[str]]:
    """Sample name -> label names (target labels included) of every series the router exports."""
    names: dict[str, set[str]] = {}
    for name, labels in COUNTERS.items():
        names[f"{name}_total"] = labels | TARGET_LABELS
    for name, labels in HISTOGRAMS.items():
        names[f"{name}_bucket"] = labels | TARGET_LABELS | {"le"}
        names[f"{name}_sum"] = labels | TARGET_LABELS
        names[f"{name}_count"] = labels | TARGET_LABELS
    for name, labels in GAUGES.items():
        names[name] = labels | TARGET_LABELS
    names["up"] = set(TARGET_LABELS)  # Prometheus' own per-target series
    return names


EXPORTED = _exported()


# --- helpers ---------------------------------------------------------------------------------
def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _manifests() -> dict[str, Any]:
    """kind -> the one manifest of that kind under deploy/k8s."""
    found: dict[str, Any] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_docs(path):
            if "kind" in doc and doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
                assert doc["kind"] not in found, f"two {doc['kind']} manifests"
                found[doc["kind"]] = doc
    return found


def _dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression of the dashboard: panels and annotations."""
    dashboard = _dashboard()
    exprs = [
        (f"panel {p['id']} {p['title']!r}", t["expr"])
        for p in _panels(dashboard)
        for t in p.get("targets", [])
    ]
    exprs += [
        (f"annotation {a['name']!r}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Every ``metric{...}`` in ``expr``: (metric, {label: (operator, value)})."""
    return [
        (name, {m[0]: (m[1], m[2]) for m in _MATCHER.findall(body)})
        for name, body in _SELECTOR.findall(expr)
    ]


def _metric_names(expr: str) -> set[str]:
    """Metric names in ``expr``: identifiers followed by a selector or a range, plus router_*."""
    bare = _STRING.sub('""', expr)
    names = {m for m in re.findall(r"\b(router_[a-zA-Z0-9_]+)\b", bare)}
    names |= {name for name, _ in _selectors(expr)}
    return names


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [
        line
        for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _gh_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


# --- the metrics contract --------------------------------------------------------------------
def test_contract_metric_list_matches_router_metrics() -> None:
    """The list the checks below use is what router.metrics really registers."""
    registry = CollectorRegistry()
    RouterMetrics(registry)
    families = {family.name: family.type for family in registry.collect()}
    expected = (
        {name: "counter" for name in COUNTERS}
        | {name: "histogram" for name in HISTOGRAMS}
        | {name: "gauge" for name in GAUGES}
    )
    assert families == expected


@pytest.mark.parametrize(("where", "expr"), _dashboard_exprs())
def test_dashboard_queries_use_exported_metrics_and_labels(where: str, expr: str) -> None:
    names = _metric_names(expr)
    assert names, f"{where}: no metric in {expr}"
    unknown = names - set(EXPORTED)
    assert not unknown, f"{where}: not exported by the router: {sorted(unknown)}"
    for name, matchers in _selectors(expr):
        assert set(matchers) <= EXPORTED[name], f"{where}: {name} has no label {set(matchers)}"
        # Every query follows the dashboard's job/instance variables.
        assert matchers.get("job") == ("=~", "$job"), f'{where}: {name} misses job=~"$job"'
        assert matchers.get("instance") == ("=~", "$instance"), f"{where}: {name} misses instance"
    for window in re.findall(r"\[([^\]]+)\]", _STRING.sub('""', expr)):
        assert window in {"$__rate_interval", "$__range", "2m"}, f"{where}: window [{window}]"


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda r: r["alert"])
def test_alert_rules_use_exported_metrics_and_the_scrape_job(rule: dict[str, Any]) -> None:
    expr = rule["expr"]
    unknown = _metric_names(expr) - set(EXPORTED)
    assert not unknown, f"{rule['alert']}: not exported by the router: {sorted(unknown)}"
    for name, matchers in _selectors(expr):
        assert set(matchers) <= EXPORTED[name], f"{rule['alert']}: {name} {set(matchers)}"
        assert matchers.get("job") == ("=", JOB), f"{rule['alert']}: {name} misses job={JOB}"
    assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert {"summary", "description", "runbook_url"} <= set(annotations)
    assert "{{ $labels." in annotations["summary"] + annotations["description"]


def test_alerts_cover_the_issue_and_runbooks_exist() -> None:
    alerts = {rule["alert"]: rule for rule in _alert_rules()}
    assert set(alerts) == {
        "RouterDown",
        "NoChampionReady",
        "ChallengerErrorRateAboveChampion",
        "FallbackSpike",
        "ChallengerCircuitOpen",
        "PredictLatencySLOBreach",
        "TrafficShareDrift",
        "PredictionLogBacklog",
        "PredictionLogFailing",
        "PredictionLogDrops",
        "ModelReloadFailures",
        "RampStageStuck",
    }
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    anchors = {_gh_anchor(h) for h in re.findall(r"^#+ (.+)$", doc, flags=re.MULTILINE)}
    for name, rule in alerts.items():
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "docs/deploy.md", name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no section #{anchor}"


def test_alert_unit_tests_cover_every_alert_firing_and_not_firing() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text(encoding="utf-8"))
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert fired == alerts
    assert quiet == alerts


# --- dashboard -------------------------------------------------------------------------------
def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "champion-challenger"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance", "model"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    assert "label_values(router_model_info" in variables["model"]["definition"]
    assert "model_name)" in variables["model"]["definition"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
    titles = " | ".join(p["title"] for p in _panels(dashboard)).lower()
    for topic in (
        "request rate",
        "share",
        "latency",
        "error",
        "fallback",
        "distribution",
        "class",
        "versions",
        "accuracy",
        "absolute",
        "feedback",
        "backlog",
        "drops",
        "reloads",
        "split over time",
    ):
        assert topic in titles, topic
    annotation_exprs = " ".join(a.get("expr", "") for a in dashboard["annotations"]["list"])
    assert "router_model_info" in annotation_exprs
    assert "router_arm_weight" in annotation_exprs  # split changes, like alias moves


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text(encoding="utf-8")
    )
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text(encoding="utf-8")
    )
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    grafana = _compose()["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# --- Prometheus config -----------------------------------------------------------------------
def test_prometheus_scrapes_the_router_job() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job["scrape_interval"] == "15s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    compose = _compose()["services"]
    assert sd["names"] == ["router"] and "router" in compose
    assert sd["port"] == PORT


# --- docker compose --------------------------------------------------------------------------
def test_compose_router_matches_the_cli_and_env_contract() -> None:
    services = _compose()["services"]
    router = services["router"]
    assert router["command"] == ROUTER_CMD
    assert router["deploy"]["replicas"] == 2
    assert router["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    env = router["environment"]
    assert set(env) >= ENV_CONTRACT
    assert env["ROUTER_PREDICTION_LOG_URL"].startswith("postgresql+psycopg://")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["ROUTER_CONFIG"] == "/app/config.yaml"
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["ROUTER_ADMIN_TOKEN"].startswith("${ROUTER_ADMIN_TOKEN:?"), "secret from env only"
    assert "./config.compose.yaml:/app/config.yaml:ro" in router["volumes"]
    assert any(str(p).endswith(f":{PORT}") for p in router["ports"])
    assert {"postgres", "mlflow"} <= set(router["depends_on"])


def test_compose_stack_services() -> None:
    services = _compose()["services"]
    assert {"postgres", "mlflow", "router", "prometheus", "grafana", "evaluate"} <= set(services)
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    mlflow = services["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"]
    flags = {
        arg: (value if not value.startswith("--") else "")
        for arg, value in zip(mlflow[2:], [*mlflow[3:], ""], strict=True)
        if arg.startswith("--")
    }
    assert "--serve-artifacts" in mlflow
    assert flags["--backend-store-uri"].startswith("postgresql+psycopg://")
    assert flags["--artifacts-destination"] == "/mlartifacts"
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "5000"
    assert "mlflow:5000" in flags["--allowed-hosts"].split(",")

    evaluate = services["evaluate"]
    assert evaluate["profiles"] == ["evaluate"]
    assert evaluate["command"][0] == "evaluate_and_promote"
    assert set(evaluate["command"][1:]) <= {"--config", "/app/config.yaml", "--dry-run"}

    prometheus = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]


def test_mlflow_server_accepts_the_compose_flags() -> None:
    """The flags exist in the installed MLflow (its --help lists them)."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    if mlflow is None:
        pytest.skip("the mlflow CLI is not installed next to this Python")
    help_text = subprocess.run(
        [mlflow, "server", "--help"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    command = _compose()["services"]["mlflow"]["command"]
    for flag in (arg for arg in command if arg.startswith("--")):
        assert flag in help_text, flag


@pytest.mark.parametrize("config", ["deploy/config.compose.yaml", "config.yaml"])
def test_config_files_validate(config: str) -> None:
    raw = yaml.safe_load((ROOT / config).read_text(encoding="utf-8"))
    settings = settings_from_mapping(raw, {})
    if config.startswith("deploy/"):
        assert settings.server.host == "0.0.0.0" and settings.server.port == PORT


def test_k8s_configmap_config_validates() -> None:
    configmap = _manifests()["ConfigMap"]
    settings = settings_from_mapping(yaml.safe_load(configmap["data"]["config.yaml"]), {})
    assert settings.server.port == PORT and settings.server.workers == 1


# --- console scripts -------------------------------------------------------------------------
def test_console_scripts_exist() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    scripts = pyproject["project"]["scripts"]
    assert {"evaluate_and_promote", "rollback"} <= set(scripts)
    evaluate = _compose()["services"]["evaluate"]["command"][0]
    cron = _manifests()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = cron["containers"]
    assert evaluate in scripts
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert re.search(
        r"^evaluate_and_promote --config /etc/router/config.yaml$",
        container["command"][2],
        re.MULTILINE,
    )


# --- Kubernetes ------------------------------------------------------------------------------
def test_k8s_deployment_matches_the_contract() -> None:
    manifests = _manifests()
    deployment = manifests["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 45  # uvicorn's 30 s + the log flush
    (container,) = spec["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "router"]
    assert set(command[3::2]) <= ROUTER_FLAGS
    args = dict(zip(command[3::2], command[4::2], strict=True))
    assert args["--port"] == str(PORT) and args["--host"] == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["OMP_NUM_THREADS"]["value"] == "1"
    assert env["ROUTER_CONFIG"]["value"] == args["--config"]
    for secret_var in ("ROUTER_ADMIN_TOKEN", "ROUTER_PREDICTION_LOG_URL"):
        ref = env[secret_var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == manifests["Secret"]["metadata"]["name"]
        assert ref["key"] in manifests["Secret"]["stringData"]
    assert set(env) <= ENV_CONTRACT | {"OMP_NUM_THREADS", "HOME"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert args["--config"] == f"{mounts['config']}/config.yaml"
    assert volumes["config"]["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    assert "requests" in container["resources"] and "limits" in container["resources"]


def test_k8s_service_monitor_hpa_cronjob() -> None:
    manifests = _manifests()
    deployment, service = manifests["Deployment"], manifests["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["metadata"]["name"] == JOB  # the Operator's job label: what alerts.yml selects
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == "http"

    monitor = manifests["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service_labels = service["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"

    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2

    cron = manifests["CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["schedule"] == "0 * * * *"


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (kustomize build check)")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "CronJob", "ConfigMap"} <= kinds
    for doc in docs:  # what `kubectl apply -k` would send, labels added by kustomize included
        kubernetes_validate.validate(doc, K8S_OLDEST, strict=True)


# The oldest Kubernetes the manifests must suit (autoscaling/v2 and batch/v1 CronJob are GA long
# before it) and the newest whose schemas kubernetes-validate ships.
K8S_OLDEST = "1.29.0"
K8S_VERSIONS = [K8S_OLDEST, kubernetes_validate.latest_version()]
CRDS = {"ServiceMonitor"}  # the Prometheus Operator's: no schema offline (docs/deploy.md)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_api_schemas(version: str) -> None:
    """Strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict` would."""
    checked: set[str] = set()
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_docs(path):
            if doc["kind"] == "Kustomization" or doc["kind"] in CRDS:
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked.add(doc["kind"])
    assert set(_manifests()) - checked == CRDS


def test_k8s_schema_check_rejects_a_misspelt_field() -> None:
    deployment = _manifests()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, K8S_OLDEST, strict=True)


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with its vendored Compose Specification schema (no network)."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run(
        [*command, str(path)], capture_output=True, text=True, check=False, timeout=120
    )


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    result = _check_compose(DEPLOY / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = _compose()
    broken["services"]["router"]["stop_grace_periodd"] = "45s"
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken), encoding="utf-8")
    result = _check_compose(tmp_path / "docker-compose.yml")
    assert result.returncode == 1 and "stop_grace_periodd" in result.stdout + result.stderr


# --- Dockerfile ------------------------------------------------------------------------------
def _image_smoke() -> Any:
    """.ci/image_smoke.py as a module (it lives outside the packages: CI runs it as a script)."""
    spec = importlib.util.spec_from_file_location("image_smoke", ROOT / ".ci" / "image_smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_smoke_test_agrees_with_the_image_and_the_config() -> None:
    """The CI smoke test's config, user and grace period are the project's: a renamed config key
    or a changed USER fails here, in `make test`, not only in the image build after it."""
    smoke = _image_smoke()
    settings = settings_from_mapping(yaml.safe_load(smoke.CONFIG), {})
    assert settings.server.port == PORT and settings.routing.challenger_weight == 0.5
    user = [rest for keyword, rest in _dockerfile() if keyword == "USER"][-1]
    assert user == f"{smoke.UID}:{smoke.UID}"
    assert _compose()["services"]["router"]["stop_grace_period"] == f"{smoke.GRACE_S}s"
    assert set(smoke.VERSIONS) == {Arm.CHAMPION, Arm.CHALLENGER}  # the script is stdlib-only


def test_dockerfile_matches_the_contract() -> None:
    instructions = _dockerfile()
    by_kind: dict[str, list[str]] = {}
    for keyword, rest in instructions:
        by_kind.setdefault(keyword, []).append(rest)
    # The base is a build argument (CI builds on a local Debian base); python:3.11-slim elsewhere.
    assert by_kind["ARG"] == ["BASE_IMAGE=python:3.11-slim"]
    assert by_kind["FROM"] == ["${BASE_IMAGE}"]
    # Layer order: the dependencies install from pyproject.toml alone, before the source arrives.
    order = [f"{keyword} {rest}" for keyword, rest in instructions]
    deps = next(i for i, line in enumerate(order) if "-r /tmp/deps/requirements.txt" in line)
    source = next(i for i, line in enumerate(order) if line.startswith("COPY router "))
    assert all(not line.startswith("COPY") or "pyproject.toml" in line for line in order[:deps])
    assert deps < source
    assert "--no-deps" in next(line for line in order[source:] if "pip install" in line)
    assert json.loads(by_kind["CMD"][-1]) == ROUTER_CMD
    assert by_kind["EXPOSE"] == [str(PORT)]
    user = by_kind["USER"][-1].split(":")[0]
    assert user not in {"root", "0"}
    healthcheck = by_kind["HEALTHCHECK"][-1]
    assert "urllib.request" in healthcheck and f"127.0.0.1:{PORT}/healthz" in healthcheck
    assert "curl" not in healthcheck
    assert any("OMP_NUM_THREADS=1" in env for env in by_kind["ENV"])
    assert any(re.search(r"\bpip install\b", run) for run in by_kind["RUN"])
    assert any(copy.endswith("/app/config.yaml") for copy in by_kind["COPY"])
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for needed in ("!pyproject.toml", "!router/", "!experiments/", "!config.yaml"):
        assert needed in ignore
