"""deploy/: every file valid against its official schema, and consistent with the settings and the production deployment.

Kubernetes manifests are checked against the Kubernetes JSON schemas that `kubernetes-validate`
bundles (strict: an unknown field fails), compose.yaml against the compose-spec schema that
`check-jsonschema` vendors. Both work offline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from api.auth import exempt_paths
from settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = KUBERNETES_DIR / "kustomization.yaml"
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"

# The oldest cluster version the manifests are for, and the newest whose schemas are bundled.
KUBERNETES_VERSIONS = ("1.30", "1.37")

# The production deployment: the service on port 8003; memory limit 14G, 4 CPUs; reservation 12G, 2 CPUs.
SPEC_PORT = 8003
GIB = 2**30
SPEC_LIMITS = {"memory": 14 * GIB, "cpu": 4.0}
SPEC_RESERVATIONS = {"memory": 12 * GIB, "cpu": 2.0}
SPEC_VARIABLES = (
    "DEVICE_TYPE",
    "CPU_THREADS",
    "GPU_MEMORY_FRACTION",
    "MAX_WORKERS",
    "MAX_PROCESSES",
    "MAX_GENERATION_TIME",
    "MAX_NEW_TOKENS",
    "GENERATION_TEMPERATURE",
    "MAX_MEMORY_USAGE",
    "MIN_MEMORY_GB",
)
SETTING_NAMES = {name.upper() for name in Settings.model_fields}

API = "ai-model"
# The Secret the API keys come from (created by hand, see README "API keys and CORS"), and its key.
API_KEYS_SECRET = {"name": "ai-model-api-keys", "key": "API_KEYS"}
SECRET_VARIABLES = {"API_KEYS"}
README = ROOT / "README.md"
METRIC = "bentoml_service_request_in_progress"
# Seconds beyond the preStop pause and MAX_GENERATION_TIME that a stopping pod is given.
DRAIN_MARGIN_S = 10


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES_DIR.glob("*.yaml") if path != KUSTOMIZATION)


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, document) for path in manifest_files() for document in load_documents(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} in deploy/kubernetes, found {len(found)}"
    return found[0]


def pod_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_containers(deployment) if c["name"] == name]
    return found


def kubernetes_env_items() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(find("Deployment", API), API)["env"]}


def kubernetes_environment() -> dict[str, str]:
    """The variables set to a value; the secret ones come from a Secret instead."""
    return {name: item["value"] for name, item in kubernetes_env_items().items() if "value" in item}


def compose() -> dict[str, Any]:
    (document,) = load_documents(COMPOSE_FILE)
    return document


def compose_environment() -> dict[str, str]:
    return compose()["services"][API]["environment"]


def resolve_port(port: int | str, api_container: dict[str, Any]) -> int:
    """A port number, or the number of the container port with that name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in api_container["ports"] if p.get("name") == port]
    return number


def kubernetes_bytes(quantity: str) -> float:
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "": 1}
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return float(number) * suffixes[suffix]


def kubernetes_cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def docker_bytes(size: str) -> float:
    """Docker's units are binary: 14G (or 14g, 14gb) is 14 GiB."""
    number, unit = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)b?", size.lower()).groups()
    return float(number) * 1024 ** " kmgt".index(unit or " ")


def seconds(duration: str) -> float:
    """A compose duration such as 60s, 1m30s or 1h."""
    parts = re.findall(r"([0-9.]+)(h|ms|m|s|us)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"not a duration: {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(number) * scale[unit] for number, unit in parts)


# Schemas.


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = load_documents(KUSTOMIZATION)[0]

    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [path.name for path in manifest_files()]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "file, manifest",
    [pytest.param(file, doc, id=f"{file}:{doc['kind']}/{doc['metadata']['name']}") for file, doc in manifests()],
)
def test_kubernetes_manifest_is_valid(file: str, manifest: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        problem = f"at {'.'.join(map(str, error.path)) or 'the top'}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        problem = error.message
    else:
        return
    # Failed outside the except clauses, so that the report is the message and not the schema twice over.
    what = f"{file}: {manifest['kind']} {manifest['metadata']['name']!r} against Kubernetes {version}"
    pytest.fail(f"{what}: {problem}", pytrace=False)


def test_compose_file_is_valid() -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.Draft202012Validator(schema)

    errors = [f"at {'.'.join(map(str, e.path)) or 'the top'}: {e.message}" for e in validator.iter_errors(compose())]

    assert not errors, "deploy/compose.yaml breaks the compose specification:\n" + "\n".join(errors)


# Environment.


@pytest.mark.parametrize("source", ["kubernetes", "compose"])
def test_every_variable_is_a_setting(source: str) -> None:
    if source == "kubernetes":
        containers = [c for _, doc in manifests() if doc["kind"] == "Deployment" for c in pod_containers(doc)]
        names = {item["name"] for c in containers for item in c.get("env", [])}
    else:
        names = {name for service in compose()["services"].values() for name in service.get("environment", {})}

    unknown = names - SETTING_NAMES

    assert not unknown, f"{source} sets variables that settings.py does not read: {sorted(unknown)}"


def test_compose_and_kubernetes_carry_the_same_environment() -> None:
    secret_free = {name: value for name, value in compose_environment().items() if name not in SECRET_VARIABLES}

    assert secret_free == kubernetes_environment()
    assert set(kubernetes_env_items()) - set(kubernetes_environment()) == SECRET_VARIABLES


def test_the_api_keys_come_from_a_required_secret() -> None:
    reference = kubernetes_env_items()["API_KEYS"]["valueFrom"]["secretKeyRef"]
    create = f"kubectl create secret generic {API_KEYS_SECRET['name']} --from-literal={API_KEYS_SECRET['key']}="

    # Without the Secret the pod must not start, rather than serve with no key.
    assert reference == {**API_KEYS_SECRET, "optional": False}
    # How to create it, in the manifest and the README; no placeholder Secret is applied over the real one.
    assert create in (KUBERNETES_DIR / "ai-model.yaml").read_text() and create in README.read_text()
    assert not [doc for _, doc in manifests() if doc["kind"] == "Secret"]


def test_compose_passes_the_api_keys_from_the_environment_and_refuses_to_start_without() -> None:
    assert compose_environment()["API_KEYS"].startswith("${API_KEYS:?")


def test_the_probes_and_the_scraped_metrics_need_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubelets and annotation-driven Prometheus scrapes send no Authorization header."""
    monkeypatch.setenv("METRICS_REQUIRE_API_KEY", kubernetes_environment()["METRICS_REQUIRE_API_KEY"])
    api = container(find("Deployment", API), API)
    annotations = find("Deployment", API)["spec"]["template"]["metadata"]["annotations"]
    open_paths = exempt_paths(Settings().metrics_require_api_key)

    assert {api[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")} <= open_paths
    assert annotations["prometheus.io/path"] in open_paths
    assert urlparse(compose()["services"][API]["healthcheck"]["test"][-1]).path in open_paths


def test_the_environment_passes_start_up_validation_and_keeps_the_specification_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    environment = kubernetes_environment()
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    configured = Settings()

    assert set(SPEC_VARIABLES) <= set(environment)
    for name in SPEC_VARIABLES:
        field = name.lower()
        assert getattr(configured, field) == Settings.model_fields[field].default, name
    # The image's own default host, 127.0.0.1, is unreachable from outside the container.
    assert configured.host == "0.0.0.0"
    assert configured.port == SPEC_PORT


def test_redis_url_names_the_redis_service() -> None:
    url = urlparse(kubernetes_environment()["REDIS_URL"])
    service = find("Service", url.hostname)

    assert url.scheme == "redis"
    assert url.port in [port["port"] for port in service["spec"]["ports"]]
    assert url.hostname in compose()["services"]
    assert API in compose()["services"] and "redis" in compose()["services"][API]["depends_on"]


# The API container: ports, probes, resources, shutdown.


def test_one_port_everywhere() -> None:
    deployment = find("Deployment", API)
    api = container(deployment, API)
    (container_port,) = [port["containerPort"] for port in api["ports"]]
    (service_port,) = find("Service", API)["spec"]["ports"]
    probes = [api[probe]["httpGet"]["port"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]

    assert container_port == SPEC_PORT
    assert int(kubernetes_environment()["PORT"]) == container_port
    assert service_port["port"] == SPEC_PORT
    assert resolve_port(service_port["targetPort"], api) == container_port
    assert [resolve_port(port, api) for port in probes] == [container_port] * 3
    assert int(annotations["prometheus.io/port"]) == container_port


def test_compose_publishes_the_same_port() -> None:
    service = compose()["services"][API]

    assert service["ports"] == [f"{SPEC_PORT}:{SPEC_PORT}"]
    assert int(service["environment"]["PORT"]) == SPEC_PORT
    assert f"127.0.0.1:{SPEC_PORT}/readyz" in " ".join(service["healthcheck"]["test"])


def test_probes_use_bentomls_routes() -> None:
    api = container(find("Deployment", API), API)

    assert api["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    # The startup probe gives the model load minutes, not seconds.
    assert api["startupProbe"]["periodSeconds"] * api["startupProbe"]["failureThreshold"] >= 300


def test_prometheus_scrapes_the_metrics_route() -> None:
    annotations = find("Deployment", API)["spec"]["template"]["metadata"]["annotations"]

    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_kubernetes_resources_are_the_specifications() -> None:
    resources = container(find("Deployment", API), API)["resources"]

    assert kubernetes_bytes(resources["limits"]["memory"]) == SPEC_LIMITS["memory"]
    assert kubernetes_cpus(resources["limits"]["cpu"]) == SPEC_LIMITS["cpu"]
    assert kubernetes_bytes(resources["requests"]["memory"]) == SPEC_RESERVATIONS["memory"]
    assert kubernetes_cpus(resources["requests"]["cpu"]) == SPEC_RESERVATIONS["cpu"]


def test_compose_resources_are_the_specifications() -> None:
    resources = compose()["services"][API]["deploy"]["resources"]

    assert docker_bytes(resources["limits"]["memory"]) == SPEC_LIMITS["memory"]
    assert float(resources["limits"]["cpus"]) == SPEC_LIMITS["cpu"]
    assert docker_bytes(resources["reservations"]["memory"]) == SPEC_RESERVATIONS["memory"]
    assert float(resources["reservations"]["cpus"]) == SPEC_RESERVATIONS["cpu"]


def test_a_stopping_pod_has_time_to_finish_its_generations() -> None:
    pod = find("Deployment", API)["spec"]["template"]["spec"]
    pre_stop = container(find("Deployment", API), API)["lifecycle"]["preStop"]["exec"]["command"]
    generation_s = float(kubernetes_environment()["MAX_GENERATION_TIME"])

    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + generation_s + DRAIN_MARGIN_S


def test_a_stopping_compose_container_has_time_to_finish_its_generations() -> None:
    service = compose()["services"][API]
    generation_s = float(service["environment"]["MAX_GENERATION_TIME"])

    assert seconds(service["stop_grace_period"]) >= generation_s + DRAIN_MARGIN_S


# Scaling.


def test_the_service_selects_the_api_pods() -> None:
    deployment = find("Deployment", API)
    selector = find("Service", API)["spec"]["selector"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert selector.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_autoscaler_owns_the_replica_count() -> None:
    autoscaler = find("HorizontalPodAutoscaler", API)
    (metric,) = autoscaler["spec"]["metrics"]

    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": API}
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 < autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]
    # A `replicas` field would be reset by every `kubectl apply`, undoing the autoscaler.
    assert "replicas" not in find("Deployment", API)["spec"]
