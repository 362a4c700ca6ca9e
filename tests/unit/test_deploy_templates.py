"""deploy/kubernetes: the work pool's base job template and the KubeRay RayCluster, checked
offline against the schemas Prefect and Kubernetes use (docs/scale.md, "Kubernetes").

- The job template against the Kubernetes worker's own default template (Prefect ships it
  in its worker metadata), Prefect's server-side check, and JSON Schema.
- The rendered Job and every Ray pod template against Kubernetes' OpenAPI schemas
  (kubernetes-validate, strict: an unknown or misplaced field fails).
- The RayCluster's own fields against a minimal schema written here from KubeRay's
  RayClusterSpec (ray.io/v1); no package carries KubeRay's CRD offline.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from flows.cli import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]
JOB_TEMPLATE = REPO / "deploy" / "kubernetes" / "base-job-template.json"
RAY_CLUSTER = REPO / "deploy" / "kubernetes" / "raycluster.yaml"
KUBERNETES_VERSION = "1.31"  # an old enough API to hold on any maintained cluster
GPU = "nvidia.com/gpu"
RAY_CLIENT_PORT = 10001

# Written from KubeRay's RayClusterSpec, HeadGroupSpec and WorkerGroupSpec (ray.io/v1):
# the fields rlaif may set, nothing else; pod templates are checked by Kubernetes' schema.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
REPLICAS = {"type": "integer", "minimum": 0}
RAY_CLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headGroupSpec"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "headServiceAnnotations": STRING_MAP,
                "suspend": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["template", "rayStartParams"],
                    "properties": {
                        "rayStartParams": STRING_MAP,
                        "template": {"type": "object"},
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "enableIngress": {"type": "boolean"},
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["groupName", "template", "rayStartParams"],
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": REPLICAS,
                            "minReplicas": REPLICAS,
                            "maxReplicas": REPLICAS,
                            "idleTimeoutSeconds": REPLICAS,
                            "numOfHosts": {"type": "integer", "minimum": 1},
                            "rayStartParams": STRING_MAP,
                            "template": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}


def _kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate (Kubernetes' OpenAPI schemas, offline) is not installed",
    )


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads(JOB_TEMPLATE.read_text())


@pytest.fixture(scope="module")
def ray_cluster() -> dict[str, Any]:
    return yaml.safe_load(RAY_CLUSTER.read_text())


@pytest.fixture(scope="module")
def worker_default() -> dict[str, Any]:
    """The Kubernetes worker's default base job template, as Prefect itself ships it."""
    import prefect.server.api

    views = Path(prefect.server.api.__file__).parent / "collections_data" / "views"
    metadata = json.loads((views / "aggregate-worker-metadata.json").read_text())
    return metadata["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


def _defaults(template: dict[str, Any]) -> dict[str, Any]:
    properties = template["variables"]["properties"]
    return {k: v["default"] for k, v in properties.items() if v.get("default") is not None}


def _render(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """The Job a Kubernetes worker submits for a flow run with these job variables."""
    from prefect.utilities.templating import apply_values

    values = {**_defaults(template), "name": "rlaif-loop-run", **job_variables}
    config = apply_values(copy.deepcopy(template["job_configuration"]), values)
    manifest = config["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    # What prefect-kubernetes' job configuration does next (prepare_for_flow_run): its
    # own env (Prefect's settings and the `env` variable) goes first, args are split.
    env = {"PREFECT_API_URL": "http://prefect-server:4200/api", **config.get("env", {})}
    kept = [e for e in container.get("env", []) if e["name"] not in env]
    container["env"] = [{"name": k, "value": v} for k, v in env.items()] + kept
    container["args"] = shlex.split(container.get("args", "prefect flow-run execute"))
    return manifest


def _pod_templates(ray_cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = ray_cluster["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


# --- the work pool's base job template ---------------------------------------------------


def test_template_keeps_the_kubernetes_worker_shape(template, worker_default):
    """Every key the worker reads is there, and every variable a deployment may set on a
    default Kubernetes pool means the same here."""
    assert set(worker_default["job_configuration"]) <= set(template["job_configuration"])
    ours, theirs = template["variables"]["properties"], worker_default["variables"]["properties"]
    assert set(theirs) <= set(ours)
    for name, schema in theirs.items():
        assert ours[name].get("type") == schema.get("type"), name
    for name, block in worker_default["variables"]["definitions"].items():
        ours_block = template["variables"]["definitions"][name]
        for key in ("required", "block_type_slug"):
            assert ours_block[key] == block[key], (name, key)
        types = {field: schema["type"] for field, schema in block["properties"].items()}
        assert {f: s["type"] for f, s in ours_block["properties"].items()} == types, name
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert manifest["spec"]["template"]["spec"]["containers"][0]["args"] == "{{ command }}"


def test_prefect_server_accepts_the_template(template):
    """The check `prefect work-pool create --base-job-template` gets from the server: every
    placeholder is a declared variable (an undeclared one is refused)."""
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="rlaif-k8s", type="kubernetes", base_job_template=template)
    assert pool.base_job_template == template
    broken = copy.deepcopy(template)
    broken["job_configuration"]["job_manifest"]["spec"]["suspend"] = "{{ not_declared }}"
    with pytest.raises(ValueError, match="not_declared"):
        WorkPoolCreate(name="rlaif-k8s", type="kubernetes", base_job_template=broken)


def test_variables_are_a_json_schema_that_its_defaults_and_rlaif_deploy_satisfy(template):
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    jsonschema.validate(_defaults(template), variables)
    # What `rlaif deploy --pool` sets as job variables, run from inside the image.
    jsonschema.validate({"env": dict(OFFLINE_ENV), "working_dir": "/opt/rlaif"}, variables)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"ray_address": "http://head:8265"}, variables)


def test_rendered_job_is_a_valid_kubernetes_job(template):
    kubernetes_validate = _kubernetes_validate()
    job = _render(template, {"env": dict(OFFLINE_ENV), "working_dir": "/opt/rlaif"})
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    misplaced = copy.deepcopy(job)
    misplaced["spec"]["template"]["spec"]["parallelism"] = 1  # a Job field in the pod spec
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misplaced, KUBERNETES_VERSION, strict=True)


def test_driver_runs_on_a_cpu_node_and_reaches_the_ray_head(template, ray_cluster):
    job = _render(template, {"env": dict(OFFLINE_ENV)})
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert _gpus(container) == 0
    assert (
        pod["nodeSelector"]
        == ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]["nodeSelector"]
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"  # the deployment's env and the template's, both
    head_ports = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert RAY_CLIENT_PORT in [p["containerPort"] for p in head_ports["ports"]]
    head_service = f"{ray_cluster['metadata']['name']}-head-svc"  # KubeRay's naming
    assert env["RAY_ADDRESS"] == f"ray://{head_service}:{RAY_CLIENT_PORT}"
    assert container["args"] == ["prefect", "flow-run", "execute"]


# --- the KubeRay RayCluster ---------------------------------------------------------------


def test_ray_cluster_fields_follow_kuberay(ray_cluster):
    jsonschema.validate(ray_cluster, RAY_CLUSTER_SCHEMA)
    for group in ray_cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_ray_pod_templates_are_valid_kubernetes(ray_cluster):
    kubernetes_validate = _kubernetes_validate()
    for name, pod_template in _pod_templates(ray_cluster).items():
        resource = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": pod_template,
        }
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_head_on_cpu_engines_and_trainers_on_gpus(ray_cluster):
    head, *workers = _pod_templates(ray_cluster).values()
    assert ray_cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert all(_gpus(c) == 0 for c in head["spec"]["containers"])
    assert "tolerations" not in head["spec"]
    assert workers
    for worker in workers:
        (container,) = worker["spec"]["containers"]
        assert _gpus(container) >= 1
        assert container["resources"]["requests"][GPU] == container["resources"]["limits"][GPU]
        assert worker["spec"]["nodeSelector"]
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in worker["spec"][
            "tolerations"
        ]


def test_one_image_one_ray_one_store(template, ray_cluster):
    """Ray Client needs the driver's Ray and Python on the cluster too; trained models must
    land on the claim the driver reads."""
    (ray_pin,) = re.findall(r'"ray\[train\]==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert ray_cluster["spec"]["rayVersion"] == ray_pin
    variables = template["variables"]["properties"]
    templates = _pod_templates(ray_cluster).values()
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert images == {variables["image"]["default"]}
    for worker in list(templates)[1:]:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in worker["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {"store": variables["store_claim"]["default"]}
        mounts = {
            m["name"]: m["mountPath"] for m in worker["spec"]["containers"][0]["volumeMounts"]
        }
        assert mounts["store"] == variables["store_mount_path"]["default"]


# --- docs/scale.md ----------------------------------------------------------------------


def test_scale_docs_config_examples_are_valid_configs(monkeypatch: pytest.MonkeyPatch):
    """The YAML in docs/scale.md loads; its hub models are checked as tests/unit/test_config.py
    checks the shipped configs' (the session's HF_HUB_OFFLINE=1 would refuse them)."""
    from flows.config import LoopConfig, ModelConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    sections = {"policy": ModelConfig, "judge_model": ModelConfig, "loop": LoopConfig}
    text = (REPO / "docs" / "scale.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    checked = [sections[key].model_validate(value) for b in blocks for key, value in b.items()]
    assert {type(c) for c in checked} == {ModelConfig, LoopConfig}
