"""The Kubernetes manifests (docker/k8s): every kustomization builds, every object validates offline against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail), the KServe objects against a structural
schema (tests/docker/kserve.schema.json) plus the Kubernetes schemas of their containers and volumes, and the
pieces agree with each other, with the image and with the real server's routes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "docker" / "k8s"
POD_DEFAULTS = K8S / "components" / "pod-defaults" / "pod.yaml"
TARGETS = ["overlays/cpu", "overlays/gpu", "kserve/custom", "kserve/runtime"]
# The oldest Kubernetes the manifests promise (autoscaling/v2 and policy/v1 are GA from 1.23), and the newest
# schema kubernetes-validate ships.
VERSIONS = ["1.27.0", "1.37.0"]
IMAGE_UID = 10001  # the Dockerfiles' `USER 10001:10001`


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to build the kustomizations (kubectl kustomize); install it")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory}:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = {target: kustomize(K8S / target) for target in TARGETS}
    # The models-pvc component on top of the CPU overlay, as its comment tells users to add it.
    overlay = tmp_path_factory.mktemp("with-models")
    rel = os.path.relpath(K8S, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}/overlays/cpu\ncomponents:\n  - {rel}/components/models-pvc\n"
    )
    out["overlays/cpu + components/models-pvc"] = kustomize(overlay)
    return out


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate.utils as utils
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed: add it to requirements/dev.txt (pip install kubernetes-validate)"
        )
    return utils


def validate_definition(value: Any, definition: str, version: str) -> None:
    """Validate `value` against one Kubernetes definition (io.k8s.api.core.v1.Container, ...), strictly."""
    import jsonschema
    import referencing

    utils = kubernetes_validate()
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    defs = utils.schema_contents(f"{schema_dir}/_definitions.json", version)
    resource = referencing.Resource.from_contents(defs)
    registry = resource @ referencing.Registry()
    schema = {"$ref": f"{defs['$id']}#/$defs/{definition}"} if "$id" in defs else {"$ref": f"#/$defs/{definition}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(value)


def server_stop_seconds(env: dict[str, Any]) -> float:
    """Longest the server takes from SIGTERM to exit: drain delay plus graceful shutdown (30 s if not configurable)."""
    from service.settings import Settings

    fields = Settings.model_fields
    total = 0.0
    for name, fallback in (("drain_delay_s", 0.0), ("shutdown_grace_s", 30.0)):
        value = env.get(f"VITSERVE_{name.upper()}")
        total += float(value) if value is not None else (fields[name].default if name in fields else fallback)
    return total


def find(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def security_of(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The security context the container runs with: the pod's, overridden field by field by the container's."""
    return {**pod.get("securityContext", {}), **container.get("securityContext", {})}


def workloads(built: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) of every container that runs the image, in every target. A ServingRuntime's
    pod is its InferenceService's predictor (grace period, pod security) with the runtime's containers and volumes."""
    found = []
    for target, docs in built.items():
        for doc in docs:
            if doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]["spec"]
            elif doc["kind"] == "InferenceService" and "containers" in doc["spec"]["predictor"]:
                pod = doc["spec"]["predictor"]
            elif doc["kind"] == "ServingRuntime":
                served = next(d for d in docs if d["kind"] == "InferenceService")["spec"]["predictor"]
                pod = {**served, **doc["spec"]}
            else:
                continue
            found += [(f"{target}: {doc['kind']}", pod, container) for container in pod["containers"]]
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_core_object_validates_against_the_kubernetes_schema(built, version: str) -> None:
    utils = kubernetes_validate()
    checked = 0
    for target, docs in built.items():
        for doc in docs:
            if doc["apiVersion"].startswith("serving.kserve.io/"):
                continue
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as e:
                pytest.fail(f"{target}: {doc['kind']} {doc['metadata']['name']} is invalid for {version}: {e}")
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("version", VERSIONS)
def test_kserve_objects_have_kserve_structure_and_valid_pod_parts(built, version: str) -> None:
    import jsonschema

    schema = json.loads((Path(__file__).parent / "kserve.schema.json").read_text())
    kserve = [d for t in ("kserve/custom", "kserve/runtime") for d in built[t]]
    assert {d["kind"] for d in kserve} == {"InferenceService", "ServingRuntime"}
    for doc in kserve:
        jsonschema.Draft202012Validator(schema).validate(doc)
        spec = doc["spec"]["predictor"] if doc["kind"] == "InferenceService" else doc["spec"]
        for container in spec.get("containers", []):
            validate_definition(container, "io.k8s.api.core.v1.Container", version)
        for volume in spec.get("volumes", []):
            validate_definition(volume, "io.k8s.api.core.v1.Volume", version)
        if "securityContext" in spec:
            validate_definition(spec["securityContext"], "io.k8s.api.core.v1.PodSecurityContext", version)


def test_a_typo_is_caught(built) -> None:
    """The validators are strict: a misspelt field fails, in core objects and in KServe's."""
    import jsonschema

    utils = kubernetes_validate()
    deployment = json.loads(json.dumps(find(built["overlays/cpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(utils.ValidationError):
        utils.validate(deployment, VERSIONS[-1], strict=True)
    isvc = json.loads(json.dumps(find(built["kserve/custom"], "InferenceService")))
    isvc["spec"]["predictor"]["minReplica"] = 1
    schema = json.loads((Path(__file__).parent / "kserve.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(isvc)


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_deployment_service_hpa_and_pdb_agree(built, target: str) -> None:
    docs = built[target]
    deployment, service = find(docs, "Deployment"), find(docs, "Service")
    hpa, pdb = find(docs, "HorizontalPodAutoscaler"), find(docs, "PodDisruptionBudget")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2, "one pod must stay while the PDB lets another go"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert container["resources"]["requests"]["cpu"], "the HPA's utilisation is a share of the CPU request"


def test_overlays_pick_the_provider_and_the_image(built) -> None:
    cpu = find(built["overlays/cpu"], "Deployment")["spec"]["template"]["spec"]
    gpu = find(built["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]
    (cpu_c,), (gpu_c,) = cpu["containers"], gpu["containers"]
    assert env_of(cpu_c)["VITSERVE_PROVIDER"] == "cpu"
    assert env_of(gpu_c)["VITSERVE_PROVIDER"] == "cuda"
    assert "nvidia.com/gpu" not in cpu_c["resources"].get("limits", {})
    assert int(gpu_c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert cpu_c["image"].split(":")[0].endswith("vitserve")
    assert gpu_c["image"].split(":")[0].endswith("vitserve-cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu.get("tolerations", []))
    # the GPU overlay keeps everything else of the base
    assert gpu_c["securityContext"] == cpu_c["securityContext"]
    assert gpu_c["readinessProbe"] == cpu_c["readinessProbe"]


def test_models_component_mounts_a_claim_where_the_server_looks(built) -> None:
    docs = built["overlays/cpu + components/models-pvc"]
    claim = find(docs, "PersistentVolumeClaim")
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env_of(container)["VITSERVE_MODEL_DIR"])
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_kserve_speaks_v2_on_port_8000(built) -> None:
    isvc = find(built["kserve/custom"], "InferenceService")
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert [p["containerPort"] for p in container["ports"]] == [8000]

    runtime = find(built["kserve/runtime"], "ServingRuntime")
    served = find(built["kserve/runtime"], "InferenceService")["spec"]["predictor"]["model"]
    assert "v2" in runtime["spec"]["protocolVersions"]
    assert served["protocolVersion"] == "v2"
    assert served["runtime"] == runtime["metadata"]["name"]
    assert served["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (container,) = runtime["spec"]["containers"]
    assert env_of(container)["VITSERVE_MODEL_DIR"] == "/mnt/models"  # where KServe's storage initializer writes


def test_every_workload_runs_non_root_read_only_and_stops_gracefully(built) -> None:
    checked = set()
    for where, pod, container in workloads(built):
        security = security_of(pod, container)
        assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID, where
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"] and security["seccompProfile"]["type"] == "RuntimeDefault"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: a read-only root needs a writable /tmp"

        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0].endswith("sleep"), where
        # preStop, then the server's drain and graceful shutdown (what it allows in-flight requests), must fit in
        # the grace period before the kubelet's SIGKILL
        budget = int(sleep[1]) + server_stop_seconds(env_of(container))
        assert pod["terminationGracePeriodSeconds"] >= budget, where
        checked.add(where.split(": ")[1])
    assert checked == {"Deployment", "InferenceService", "ServingRuntime"}


def test_every_workload_takes_the_pod_defaults_and_sizes_threads_by_its_cpu_limit(built) -> None:
    """components/pod-defaults is the one home of the probes, security context, preStop and thread count: every
    workload gets them, and no other manifest restates them."""
    (defaults,) = yaml.safe_load(POD_DEFAULTS.read_text())["spec"]["containers"]
    for where, _, container in workloads(built):
        assert env_of(container)["VITSERVE_THREADS"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}
        assert container["securityContext"] == defaults["securityContext"], where
        assert container["lifecycle"] == defaults["lifecycle"], where
        assert container["readinessProbe"] == defaults["readinessProbe"], where
        assert container["livenessProbe"] == defaults["livenessProbe"], where
        if "overlays/gpu" not in where:  # the GPU overlay allows CUDA initialisation more time
            assert container["startupProbe"] == defaults["startupProbe"], where
        ports = {p["containerPort"] for p in container["ports"]}
        assert {
            probe["httpGet"]["port"] for probe in (container["readinessProbe"], container["livenessProbe"])
        } <= ports
    restated = re.compile(
        r"^\s*(readinessProbe|livenessProbe|preStop|securityContext|runAsUser|emptyDir|- name: VITSERVE_THREADS)\b",
        re.M,
    )
    for manifest in K8S.rglob("*.yaml"):
        if manifest.parent != POD_DEFAULTS.parent:
            found = restated.findall(manifest.read_text())
            assert not found, f"{manifest.relative_to(ROOT)} restates {found}: it belongs in components/pod-defaults"


def probe_paths(built: dict[str, list[dict[str, Any]]]) -> set[str]:
    text = json.dumps(built)
    return set(re.findall(r'"path": "(/[^"]*)"', text))


def test_every_probe_path_answers_200_on_the_real_server(built, client) -> None:
    paths = probe_paths(built)
    assert {"/healthz", "/readyz"} <= paths
    for path in sorted(paths - {"/metrics"}):
        assert client.get(path).status_code == 200, path
    assert client.get("/metrics").status_code == 200  # the scrape annotation's path
