"""The Kubernetes and KServe manifests, checked offline: API schemas, KServe's models, linters, policies."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import kserve.models
import kubernetes.client.models
import kubernetes_validate
import pytest
import yaml

from app.config import PARSERS, SERVER_PARSERS, Settings, load_settings
from tests.helpers import REPO_ROOT, dockerfile_instructions

DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
KSERVE = DEPLOY / "kserve"
# The oldest Kubernetes these manifests promise to work on, and the newest schemas kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CHECKOV = "checkov==3.3.30"
# checkov policies that do not fit manifests meant to be adapted: kubectl -n or kustomize's `namespace:` picks the
# namespace (CKV_K8S_21), and the digest of an image users build themselves cannot be written here (CKV_K8S_43).
CHECKOV_SKIPS = ("CKV_K8S_21", "CKV_K8S_43")
YAMLLINT = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"
SETTINGS_VARS = {name.upper() for name in (*PARSERS, *SERVER_PARSERS)}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(path: Path) -> dict:
    (doc,) = documents(path)
    return doc


def kubernetes_manifests() -> list[Path]:
    return sorted(path for path in DEPLOY.glob("*.yaml") if path.name != "kustomization.yaml")


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def deployment() -> dict:
    return manifest(DEPLOY / "deployment.yaml")


def runtime() -> dict:
    return manifest(KSERVE / "serving-runtime.yaml")


def inference_service() -> dict:
    return manifest(KSERVE / "inference-service.yaml")


# Schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", kubernetes_manifests(), ids=lambda path: path.name)
def test_manifests_match_the_kubernetes_api_schemas(path, version):
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field, when invalid


def test_kserve_runtime_pod_matches_the_kubernetes_pod_schema():
    spec = runtime()["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
           "spec": {"containers": spec["containers"], "volumes": spec["volumes"]}}  # fmt: skip
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def _model_type(name: str):
    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name)


PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def strict_build(data, type_name: str, path: str = ""):
    """`data` as KServe's (and the Kubernetes client's) model classes, refusing unknown fields and wrong types.

    Their constructors check required fields and enumerations; their own deserializers ignore unknown keys,
    which would let a misspelt field (silently dropped by the API server's pruning) through.
    """
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        assert isinstance(data, list), f"{path}: expected a list, got {data!r}"
        return [strict_build(item, match[1], f"{path}[{i}]") for i, item in enumerate(data)]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        assert isinstance(data, dict), f"{path}: expected a mapping, got {data!r}"
        return {key: strict_build(value, match[1] or match[2], f"{path}.{key}") for key, value in data.items()}
    if type_name in PRIMITIVES:
        ok = isinstance(data, PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(data, bool))
        assert ok or type_name == "object", f"{path}: expected {type_name}, got {data!r}"
        return data
    klass = _model_type(type_name)
    assert isinstance(data, dict), f"{path}: expected a {type_name} mapping, got {data!r}"
    attributes = {key: attr for attr, key in klass.attribute_map.items()}
    unknown = sorted(set(data) - set(attributes))
    assert not unknown, f"{path}: {type_name} has no field {unknown}; it has {sorted(attributes)}"
    values = {attributes[key]: strict_build(value, klass.openapi_types[attributes[key]], f"{path}.{key}")
              for key, value in data.items()}  # fmt: skip
    return klass(**values)


@pytest.mark.parametrize(
    ("path", "model"),
    [("serving-runtime.yaml", "V1alpha1ServingRuntime"), ("inference-service.yaml", "V1beta1InferenceService")],
)
def test_kserve_manifests_match_kserves_own_models(path, model):
    doc = manifest(KSERVE / path)
    assert f"{doc['apiVersion']}/{doc['kind']}".endswith(model.removeprefix("V1alpha1").removeprefix("V1beta1"))
    built = strict_build(doc, model)
    assert built.to_dict()["spec"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda doc: doc["spec"]["predictor"]["model"].update(protocolversion="v2"),
            "has no field ['protocolversion']",
        ),
        (lambda doc: doc["spec"]["predictor"].update(minReplicas="2"), "expected int"),
        (lambda doc: doc["spec"]["predictor"].update(containers=[{"image": "x"}]), "validation error for V1Container"),
    ],
)
def test_the_kserve_check_catches_mistakes(mutate, message):
    doc = copy.deepcopy(inference_service())
    mutate(doc)
    with pytest.raises((AssertionError, ValueError), match=re.escape(message)):
        strict_build(doc, "V1beta1InferenceService")


def test_kustomization_applies_the_plain_kubernetes_set():
    kustomization = manifest(DEPLOY / "kustomization.yaml")
    listed = set(kustomization["resources"])
    alternatives = {"hpa-queue-depth.yaml", "prometheus-adapter-rules.yaml"}  # applied by hand instead, see README
    assert listed == {path.name for path in kubernetes_manifests()} - alternatives
    assert {doc["kind"] for name in listed for doc in documents(DEPLOY / name)} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim",
    }  # fmt: skip


def strategic_merge(base, patch):
    """kustomize's strategic merge for what the GPU patch uses: mappings merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{key: strategic_merge(base[key], value) if key in base else value
                           for key, value in patch.items()}}  # fmt: skip
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in base + patch):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return patch


def test_gpu_overlay_gives_each_pod_one_gpu():
    overlay = manifest(DEPLOY / "gpu" / "kustomization.yaml")
    assert overlay["resources"] == [".."]
    (patch,) = [DEPLOY / "gpu" / item["path"] for item in overlay["patches"]]
    patched = strategic_merge(deployment(), manifest(patch))
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)
    container = patched["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["DEVICE"] == "cuda" and env["PRECISION"] == "fp16" and env["WEB_CONCURRENCY"] == "1"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert int(env["TORCH_THREADS"]) == int(container["resources"]["requests"]["cpu"])
    load_settings(env)  # the service accepts these settings (whether CUDA is there is checked at start-up)


# Linters


def test_yamllint_passes():
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-d", YAMLLINT, str(DEPLOY)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _checkov() -> Path:
    """checkov in a venv of its own (its pinned dependencies would fight the project's); installed once."""
    venv = REPO_ROOT / ".venv" / "tools" / "checkov"
    marker = venv / f".installed-{CHECKOV}"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        install = subprocess.run(
            [venv / "bin" / "pip", "install", "--quiet", CHECKOV], capture_output=True, text=True, timeout=1500
        )
        assert install.returncode == 0, install.stdout + install.stderr
        marker.touch()
    return venv / "bin" / "checkov"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_checkov_kubernetes_policies_pass():
    # gpu/ holds a partial patch, not a resource; the patched Deployment is checked by the GPU overlay test.
    command = [_checkov(), "--directory", str(DEPLOY), "--framework", "kubernetes", "--skip-download", "--quiet",
               "--compact", "--output", "json", "--skip-check", ",".join(CHECKOV_SKIPS),
               "--skip-path", "gpu/"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in report["results"]["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["passed"] >= 50 and report["summary"]["resource_count"] >= 6


# Policies, checked explicitly


def pod_specs() -> dict[str, tuple[dict, dict]]:
    """(pod-level spec, the serving container) of the Deployment and of KServe's runtime + InferenceService."""
    pod = deployment()["spec"]["template"]["spec"]
    predictor = inference_service()["spec"]["predictor"]
    return {
        "deployment": (pod, pod["containers"][0]),
        "kserve": ({**runtime()["spec"], **predictor}, runtime()["spec"]["containers"][0]),
    }


def probe_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


@pytest.mark.parametrize("kind", ["deployment", "kserve"])
def test_probes_hit_the_right_routes_on_the_serving_port(kind, client):
    _, container = pod_specs()[kind]
    env = env_of(container)
    routes = {
        "startupProbe": {"/readyz", "/v2/health/ready"},
        "readinessProbe": {"/readyz", "/v2/health/ready"},
        "livenessProbe": {"/livez", "/v2/health/live"},
    }
    for probe, paths in routes.items():
        action = container[probe]["httpGet"]
        assert action["path"] in paths, (probe, action["path"])
        assert probe_port(container, action["port"]) == int(env["PORT"]) == container["ports"][0]["containerPort"]
        assert client.get(action["path"]).status_code == 200  # a real route of the app
    # Warm-up gets its own allowance; the readiness probe then reacts within seconds.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert container["readinessProbe"]["failureThreshold"] * container["readinessProbe"]["periodSeconds"] <= 15


@pytest.mark.parametrize("kind", ["deployment", "kserve"])
def test_pods_run_non_root_on_a_read_only_root_filesystem(kind):
    pod, container = pod_specs()[kind]
    (user,) = [rest for key, rest in dockerfile_instructions("runtime") if key == "USER"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # What the service writes (metrics files, temp files, gunicorn heartbeats) goes to an emptyDir at /tmp.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = env_of(container)
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/") and env["TMPDIR"] == "/tmp"


@pytest.mark.parametrize("kind", ["deployment", "kserve"])
def test_resources_and_settings_fit_one_worker_per_pod(kind):
    _, container = pod_specs()[kind]
    resources, env = container["resources"], env_of(container)
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS: no CPU or memory overcommit
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert env["WEB_CONCURRENCY"] == "1"
    # torch would size its threads by the node's cores, not the pod's share of them.
    assert int(env["TORCH_THREADS"]) == int(resources["requests"]["cpu"])
    assert set(env) - SETTINGS_VARS <= {"TMPDIR", "PROMETHEUS_MULTIPROC_DIR"}, "variables nothing reads"
    assert env["MODEL_NAME"] == Settings().model_name


def test_deployment_mounts_the_bundle_read_only_and_drains_before_it_stops():
    pod = deployment()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    (models,) = [m for m in container["volumeMounts"] if env["MODEL_PATH"].startswith(m["mountPath"] + "/")]
    assert models["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == models["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": manifest(DEPLOY / "model-pvc.yaml")["metadata"]["name"],
                                               "readOnly": True}  # fmt: skip
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + int(env["GRACEFUL_TIMEOUT"])
    assert deployment()["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_hpa_pdb_and_network_policy_select_the_deployment():
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifest(DEPLOY / "service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in deployment()["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    assert manifest(DEPLOY / "pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = manifest(DEPLOY / "networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= port_names
    for name in ("hpa.yaml", "hpa-queue-depth.yaml"):
        hpa = manifest(DEPLOY / name)["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pet-classifier"}
        # A drain takes one pod (PDB) and the HPA keeps at least two: some pod always serves.
        assert hpa["minReplicas"] >= 2 > manifest(DEPLOY / "pdb.yaml")["spec"]["maxUnavailable"]


def test_queue_depth_autoscaling_uses_the_metric_the_app_exports(client):
    (metric,) = [m["pods"]["metric"]["name"] for m in manifest(DEPLOY / "hpa-queue-depth.yaml")["spec"]["metrics"]
                 if m["type"] == "Pods"]  # fmt: skip
    exported = client.get("/metrics").get_data(as_text=True)
    assert re.search(rf"^# TYPE {metric} gauge$", exported, re.MULTILINE)
    rules = yaml.safe_load(manifest(DEPLOY / "prometheus-adapter-rules.yaml")["data"]["config.yaml"])["rules"]
    assert [rule["name"]["as"] for rule in rules] == [metric]
    assert rules[0]["seriesQuery"].startswith(f"{metric}{{")
    template = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert template["prometheus.io/scrape"] == "true" and template["prometheus.io/path"] == "/metrics"


def test_kserve_uses_this_image_as_a_v2_runtime():
    isvc, serving_runtime = inference_service(), runtime()
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and serving_runtime["spec"]["protocolVersions"] == ["v2"]
    assert model["runtime"] == serving_runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in serving_runtime["spec"]["supportedModelFormats"]}
    container = serving_runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container" and container["image"] == deployment()["spec"]["template"][
        "spec"]["containers"][0]["image"]  # fmt: skip
    env = env_of(container)
    assert env["PORT"] == "8080"  # KServe's data-plane port
    assert env["MODEL_PATH"].startswith("/mnt/models/")  # where KServe puts the storageUri's content
    assert env["MODEL_NAME"] == isvc["metadata"]["name"]  # clients call /v2/models/<InferenceService name>/infer
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
