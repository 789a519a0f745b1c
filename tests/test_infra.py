"""infra/: Kubernetes manifests, DeepSpeed configs and Dockerfiles, checked without a cluster.

The kustomizations are rendered by a small renderer below that implements exactly the kustomize
features they use (resources, namespace, secretGenerator with fixed names, JSON6902 `patches`)
and refuses anything else; where `kubectl` is installed its output is compared with
`kubectl kustomize`. Every rendered object is validated against the Kubernetes JSON schemas of a
pinned version (kubernetes-validate, bundled schemas, offline, strict: unknown fields fail).
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DEEPSPEED = INFRA / "deepspeed"
DOCKER = INFRA / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}

K8S_VERSION = "1.30.0"
NAMESPACE = "flam"
OVERLAYS = ("local", "cluster")
GPU_NODE_LABEL = ("flam.ai/pool", "gpu")
GPU_TAINT = "nvidia.com/gpu=present:NoSchedule"
SECRET_KEYS = {
    "flam-s3-credentials": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "flam-postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD"},
    "flam-mlflow": {"MLFLOW_TRACKING_URI"},
}
CLUSTER_SCOPED = {
    "Namespace",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# --------------------------------------------------------------------------- kustomize renderer


class RenderError(Exception):
    pass


SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "generatorOptions",
    "secretGenerator",
    "patches",
}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as kustomize reads them: blank lines and `#` comments skipped, the value
    taken verbatim after the first `=`."""
    data: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise RenderError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        if key in data:
            raise RenderError(f"{path}:{number}: duplicate key {key}")
        data[key] = value
    return data


def _secret(generator: dict[str, Any], folder: Path) -> dict[str, Any]:
    unknown = set(generator) - {"name", "behavior", "envs", "literals", "type"}
    if unknown:
        raise RenderError(f"{folder}: secretGenerator fields not supported here: {sorted(unknown)}")
    data: dict[str, str] = {}
    for env in generator.get("envs", []):
        path = (folder / env).resolve()
        if folder.resolve() not in path.parents:
            raise RenderError(f"{folder}: {env} is outside the kustomization root (kustomize refuses it)")
        if not path.is_file():
            raise RenderError(f"{folder}: secretGenerator {generator['name']}: no such env file {env}")
        data.update(read_env_file(path))
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": generator["name"]},
        "type": generator.get("type", "Opaque"),
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """RFC 6902 add / remove / replace / test, in place."""
    for op in operations:
        tokens = [_unescape(t) for t in op["path"].split("/")[1:]]
        parent: Any = document
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        kind = op["op"]
        if isinstance(parent, list):
            if kind == "add":
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
                continue
            index = int(last)
            if not 0 <= index < len(parent):
                raise RenderError(f"patch path {op['path']}: index out of range")
        elif kind != "add" and last not in parent:
            raise RenderError(f"patch path {op['path']}: no such member")
        if kind in ("add", "replace"):
            parent[int(last) if isinstance(parent, list) else last] = op["value"]
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind == "test":
            if parent[int(last) if isinstance(parent, list) else last] != op["value"]:
                raise RenderError(f"patch test failed at {op['path']}")
        else:
            raise RenderError(f"patch op {kind!r} not supported here")


def _matches(target: dict[str, Any], obj: dict[str, Any]) -> bool:
    unknown = set(target) - {"kind", "name", "namespace", "group", "version"}
    if unknown:
        raise RenderError(f"patch target fields not supported here: {sorted(unknown)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    meta = obj["metadata"]
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", meta["name"]) == meta["name"]
        and target.get("namespace", meta.get("namespace")) == meta.get("namespace")
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def render(folder: Path) -> list[dict[str, Any]]:
    """Render the kustomization in `folder` (what `kubectl kustomize folder` prints)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{folder}: kustomization fields not supported by this renderer: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
        else:
            raise RenderError(f"{folder}: resource {entry} does not exist")

    generators = kustomization.get("secretGenerator", [])
    if generators and not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise RenderError(f"{folder}: generated names with a hash suffix are not supported here")
    namespace = kustomization.get("namespace")
    for generator in generators:
        secret = _secret(generator, folder)
        if namespace:
            secret["metadata"]["namespace"] = namespace
        behavior = generator.get("behavior", "create")
        same = [
            i
            for i, obj in enumerate(objects)
            if obj["kind"] == "Secret"
            and obj["metadata"]["name"] == secret["metadata"]["name"]
            and obj["metadata"].get("namespace") == secret["metadata"].get("namespace")
        ]
        if behavior == "create":
            if same:
                raise RenderError(f"{folder}: Secret {generator['name']} already exists")
            objects.append(secret)
        elif behavior in ("replace", "merge"):
            if not same:
                raise RenderError(f"{folder}: Secret {generator['name']} to {behavior} not found")
            if behavior == "merge":
                secret["data"] = {**objects[same[0]].get("data", {}), **secret["data"]}
            objects[same[0]] = secret
        else:
            raise RenderError(f"{folder}: unknown secretGenerator behavior {behavior!r}")

    for patch in kustomization.get("patches", []):
        if set(patch) - {"target", "patch", "path"}:
            raise RenderError(f"{folder}: patch fields not supported here: {sorted(patch)}")
        text = patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text()
        operations = yaml.safe_load(text)
        if not isinstance(operations, list) or "target" not in patch:
            raise RenderError(f"{folder}: only JSON6902 patches (a list of ops with a target) are supported")
        hits = [obj for obj in objects if _matches(patch["target"], obj)]
        if not hits:
            raise RenderError(f"{folder}: patch target {patch['target']} matches nothing")
        for obj in hits:
            _json_patch(obj, operations)

    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def cluster_copy(tmp: Path) -> Path:
    """infra/k8s copied with the cluster overlay's env files made from the examples, with
    non-placeholder values, as an operator prepares them."""
    target = tmp / "k8s"
    shutil.copytree(K8S, target)
    for example in sorted((target / "base" / "secrets").glob("*.env.example")):
        text = example.read_text().replace("placeholder", "real")
        (target / "overlays" / "cluster" / "secrets" / example.name.removesuffix(".example")).write_text(text)
    return target


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    copied = cluster_copy(tmp_path_factory.mktemp("infra"))
    return {
        "base": render(K8S / "base"),
        "local": render(K8S / "overlays" / "local"),
        "cluster": render(copied / "overlays" / "cluster"),
    }


def by_id(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    index = {}
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        assert key not in index, f"duplicate object {key}"
        index[key] = obj
    return index


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


def secret_data(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in find(objects, "Secret", name)["data"].items()}


def env_value(objects: list[dict[str, Any]], container: dict[str, Any], name: str) -> str:
    """The value an env variable of `container` gets, following secretKeyRef / configMapKeyRef."""
    entry = next((e for e in container.get("env", []) if e["name"] == name), None)
    assert entry is not None, f"{container['name']}: no env {name}"
    if "value" in entry:
        return entry["value"]
    ref = entry["valueFrom"]
    if "secretKeyRef" in ref:
        return secret_data(objects, ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
    data = find(objects, "ConfigMap", ref["configMapKeyRef"]["name"])["data"]
    return data[ref["configMapKeyRef"]["key"]]


def is_allowed_host_header(allowed: list[str], host: str) -> bool:
    """MLflow's Host-header rule (mlflow.server.security_utils.is_allowed_host_header, restated
    here because importing mlflow.server costs tens of seconds)."""
    return "*" in allowed or any(
        fnmatch.fnmatch(host, pattern) if "*" in pattern else host == pattern for pattern in allowed
    )


# --------------------------------------------------------------------------- renderer and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(overlay, tmp_path, rendered):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer is not cross-checked")
    root = K8S if overlay == "local" else cluster_copy(tmp_path)
    folder = root / "overlays" / overlay
    proc = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    expected = [doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None]
    assert by_id(rendered[overlay]) == by_id(expected)


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_every_object_validates_against_the_kubernetes_schema(overlay, rendered):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Secret", "ConfigMap", "Service", "Deployment", "StatefulSet"} <= kinds
    assert {"PersistentVolumeClaim", "Job"} <= kinds
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")


@pytest.mark.parametrize(
    ("mutation", "what"),
    [
        (lambda d: d["spec"].__setitem__("replicas", "2"), "string replicas"),
        (lambda d: pod_spec(d)["containers"][0].__setitem__("resource", {}), "misspelt field"),
        (lambda d: pod_spec(d).pop("containers"), "no containers"),
        (lambda d: pod_spec(d)["containers"][0]["ports"][0].update(containerPort="5000"), "string port"),
    ],
)
def test_a_broken_manifest_fails_validation(mutation, what, rendered):
    deployment = copy.deepcopy(find(rendered["local"], "Deployment", "mlflow"))
    kubernetes_validate.validate(copy.deepcopy(deployment), K8S_VERSION, strict=True)
    mutation(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_renderer_rejects_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(RenderError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\nsecretGenerator:\n  - name: s\n    literals: [a=b]\n"
    )
    with pytest.raises(RenderError, match="hash suffix"):
        render(tmp_path)


def test_cluster_overlay_needs_the_real_env_files(tmp_path):
    copied = cluster_copy(tmp_path)
    for env in (copied / "overlays" / "cluster" / "secrets").glob("*.env"):
        env.unlink()
    with pytest.raises(RenderError, match=r"no such env file secrets/s3\.env"):
        render(copied / "overlays" / "cluster")


# --------------------------------------------------------------------------- cross-references


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_in_the_flam_namespace(overlay, rendered):
    for obj in rendered[overlay]:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_layout(overlay, rendered):
    for name, keys in SECRET_KEYS.items():
        data = secret_data(rendered[overlay], name)
        assert keys <= set(data), f"{name}: missing {keys - set(data)}"
        assert all(data.values()), f"{name}: empty value"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_and_config_references_resolve(overlay, rendered):
    objects = rendered[overlay]
    secrets = {o["metadata"]["name"]: set(o.get("data", {})) for o in objects if o["kind"] == "Secret"}
    config_maps = {o["metadata"]["name"]: set(o.get("data", {})) for o in objects if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    checked = 0
    for obj in (o for o in objects if o["kind"] in WORKLOADS):
        for container in containers(obj):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                    assert key in secrets.get(name, set()), f"{obj['kind']}: Secret {name}/{key} missing"
                    checked += 1
                if "configMapKeyRef" in ref:
                    name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
                    assert key in config_maps.get(name, set()), f"ConfigMap {name}/{key} missing"
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
        templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for volume in pod_spec(obj).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
        mounts = {m["name"] for c in containers(obj) for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in pod_spec(obj).get("volumes", [])} | templates
    assert checked >= 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_named_ports(overlay, rendered):
    objects = rendered[overlay]
    workloads = [o for o in objects if o["kind"] in WORKLOADS - {"Job"}]
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{workload['metadata']['name']}: selector misses template"
        if workload["kind"] == "StatefulSet":
            find(objects, "Service", workload["spec"]["serviceName"])
    for service in (o for o in objects if o["kind"] == "Service"):
        selected = [
            w
            for w in workloads
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        port_names = {p.get("name") for c in containers(selected[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            where = f"Service {service['metadata']['name']}"
            assert not isinstance(target, str) or target in port_names, f"{where}: no port {target}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_have_resources_probes_and_pinned_images(overlay, rendered):
    for obj in (o for o in rendered[overlay] if o["kind"] in WORKLOADS):
        for container in containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: {part}"
            image = container["image"]
            assert re.search(r":[\w.-]+$", image.rsplit("/", 1)[-1]), f"{where}: untagged image {image}"
            assert not image.endswith(":latest"), f"{where}: {image}"
            if obj["kind"] == "Job":
                continue
            port_names = {p.get("name") for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in container, f"{where}: no {probe}"
                port = container[probe].get("httpGet", {}).get("port")
                assert not isinstance(port, str) or port in port_names, f"{where}: probe port {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server(overlay, rendered):
    objects = rendered[overlay]
    deployment = find(objects, "Deployment", "mlflow")
    container = pod_spec(deployment)["containers"][0]
    command = container.get("command", []) + container.get("args", [])
    assert command[:2] == ["mlflow", "server"]
    options = dict(zip(command[2::2], command[3::2], strict=False))
    assert options["--host"] == "0.0.0.0"
    assert options["--artifacts-destination"] == "s3://mlflow/"
    env_names = [e["name"] for e in container["env"]]
    # Kubernetes leaves $(VAR) as it is unless VAR is defined earlier in env.
    for text in command:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text):
            assert var in env_names, f"$({var}) is not defined in the container env"
    backend = urlparse(
        re.sub(r"\$\((\w+)\)", lambda m: env_value(objects, container, m[1]), options["--backend-store-uri"])
    )
    assert backend.scheme == "postgresql" and backend.path == "/mlflow"
    postgres = find(objects, "Service", backend.hostname)
    assert backend.port in {p["port"] for p in postgres["spec"]["ports"]}
    assert backend.username == secret_data(objects, "flam-postgres")["POSTGRES_USER"]
    postgres_env = pod_spec(find(objects, "StatefulSet", "postgres"))["containers"][0]
    assert env_value(objects, postgres_env, "POSTGRES_DB") == "mlflow"

    # Artifacts: the S3 endpoint is named and is the MinIO Service; job execution stays off.
    assert "MLFLOW_S3_ENDPOINT_URL" in env_names
    endpoint = urlparse(env_value(objects, container, "MLFLOW_S3_ENDPOINT_URL"))
    service, namespace = endpoint.hostname.split(".")[:2]
    minio = find(objects, "Service", service)
    assert namespace == minio["metadata"]["namespace"]
    assert endpoint.port in {p["port"] for p in minio["spec"]["ports"]}
    assert env_value(objects, container, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env_value(objects, container, name) == secret_data(objects, "flam-s3-credentials")[name]
    assert container["image"].startswith("ghcr.io/mlflow/mlflow:v3.17.2")

    # Pipeline tasks reach the server at MLFLOW_TRACKING_URI: its Service exists and the server
    # accepts that Host header.
    tracking = urlparse(secret_data(objects, "flam-mlflow")["MLFLOW_TRACKING_URI"])
    service, namespace = tracking.hostname.split(".")[:2]
    assert find(objects, "Service", service)["metadata"]["namespace"] == namespace
    allowed = env_value(objects, container, "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    assert is_allowed_host_header(allowed, tracking.netloc)
    assert is_allowed_host_header(allowed, "localhost:5000")  # kubectl port-forward
    assert not is_allowed_host_header(allowed, "evil.example.com")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_buckets_and_credentials(overlay, rendered):
    objects = rendered[overlay]
    minio = pod_spec(find(objects, "Deployment", "minio"))["containers"][0]
    credentials = secret_data(objects, "flam-s3-credentials")
    assert env_value(objects, minio, "MINIO_ROOT_USER") == credentials["AWS_ACCESS_KEY_ID"]
    assert env_value(objects, minio, "MINIO_ROOT_PASSWORD") == credentials["AWS_SECRET_ACCESS_KEY"]
    assert len(credentials["AWS_ACCESS_KEY_ID"]) >= 3 and len(credentials["AWS_SECRET_ACCESS_KEY"]) >= 8
    job = find(objects, "Job", "minio-buckets")
    script = "\n".join(pod_spec(job)["containers"][0].get("args", []))
    assert re.search(r"for bucket in mlflow flam-data;", script)
    assert "mc mb --ignore-existing" in script
    endpoint = urlparse(credentials["AWS_ENDPOINT_URL"])
    assert endpoint.hostname.split(".")[0] == "minio" and endpoint.port == 9000


def test_overlay_patches_are_applied(rendered):
    def workers(objects):
        args = pod_spec(find(objects, "Deployment", "mlflow"))["containers"][0]["args"]
        return args[args.index("--workers") + 1]

    def storage(objects, kind, name):
        obj = find(objects, kind, name)
        spec = obj["spec"]["volumeClaimTemplates"][0]["spec"] if kind == "StatefulSet" else obj["spec"]
        return spec["resources"]["requests"]["storage"]

    assert workers(rendered["base"]) == "2" and workers(rendered["local"]) == "1"
    assert find(rendered["cluster"], "Deployment", "mlflow")["spec"]["replicas"] == 2
    assert storage(rendered["local"], "PersistentVolumeClaim", "minio-data") == "10Gi"
    assert storage(rendered["cluster"], "PersistentVolumeClaim", "minio-data") == "500Gi"
    assert storage(rendered["local"], "StatefulSet", "postgres") == "2Gi"
    assert storage(rendered["cluster"], "StatefulSet", "postgres") == "50Gi"


def test_secret_examples_are_placeholders_and_real_files_stay_private(rendered):
    examples = sorted((K8S / "base" / "secrets").glob("*.env.example"))
    assert [p.name for p in examples] == ["mlflow.env.example", "postgres.env.example", "s3.env.example"]
    for example in examples:
        assert "placeholder" in example.read_text().lower() or example.name == "mlflow.env.example"
    # The cluster overlay replaced the generated Secrets with the operator's files.
    for name in ("flam-s3-credentials", "flam-postgres"):
        assert secret_data(rendered["cluster"], name) != secret_data(rendered["local"], name)
    assert "real" in secret_data(rendered["cluster"], "flam-postgres")["POSTGRES_PASSWORD"]
    ignore = (K8S / "overlays" / "cluster" / "secrets" / ".gitignore").read_text().split()
    assert "*.env" in ignore


def test_gpu_node_pool_contract(rendered):
    data = find(rendered["base"], "ConfigMap", "flam-gpu-node-pool")["data"]
    assert (data["node-label-key"], data["node-label-value"]) == GPU_NODE_LABEL
    assert f"{data['taint-key']}={data['taint-value']}:{data['taint-effect']}" == GPU_TAINT
    assert data["gpu-resource"] == "nvidia.com/gpu"
    doc = (K8S / "gpu-node-pool.md").read_text()
    assert "flam.ai/pool: gpu" in doc and GPU_TAINT in doc
    assert "kubectl label nodes NODE_NAME flam.ai/pool=gpu" in doc
    assert f"kubectl taint nodes NODE_NAME {GPU_TAINT}" in doc
    assert "gcloud container node-pools create" in doc and "--node-labels flam.ai/pool=gpu" in doc
    assert "eksctl" in doc and "key=nvidia.com/gpu,value=present,effect=NO_SCHEDULE" in doc


# --------------------------------------------------------------------------- DeepSpeed configs


def _load_ds(name: str) -> dict[str, Any]:
    return json.loads((DEEPSPEED / name).read_text())


def _values(tree: Any):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _values(value)
    else:
        yield tree


@pytest.mark.parametrize(
    ("name", "stage", "micro_batch", "bf16"),
    [("zero2.json", 2, 64, True), ("zero3.json", 3, 64, True), ("zero2-cpu.json", 2, 8, False)],
)
def test_deepspeed_config_keys(name, stage, micro_batch, bf16):
    config = _load_ds(name)
    assert not {"optimizer", "scheduler", "fp16"} & set(config)
    assert "auto" not in set(map(str, _values(config)))
    assert config["train_micro_batch_size_per_gpu"] == micro_batch
    assert config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": bf16}
    assert config["steps_per_print"] == 100 and config["wall_clock_breakdown"] is False
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == 5e7
    if stage == 2:
        assert zero["allgather_bucket_size"] == 5e7
    else:
        assert "stage3_param_persistence_threshold" in zero
        assert "stage3_prefetch_bucket_size" in zero


def test_deepspeed_cpu_config_differs_only_in_batch_and_bf16():
    gpu, cpu = _load_ds("zero2.json"), _load_ds("zero2-cpu.json")
    for config in (gpu, cpu):
        config.pop("train_micro_batch_size_per_gpu")
        config.pop("bf16")
    assert gpu == cpu


@pytest.mark.parametrize(("name", "stage"), [("zero2.json", 2), ("zero3.json", 3), ("zero2-cpu.json", 2)])
def test_deepspeed_loads_the_configs(name, stage, monkeypatch):
    """DeepSpeed's own parser (strict: unknown keys fail) accepts each file, as the training loop
    completes it; without a process group it assumes world size 1."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config_module = pytest.importorskip("deepspeed.runtime.config")
    from flam_core.config import load_params
    from flam_core.train import deepspeed_config

    path = DEEPSPEED / name
    loaded = config_module.DeepSpeedConfig(str(path))
    assert loaded.zero_optimization_stage == stage
    assert loaded.train_batch_size == _load_ds(name)["train_micro_batch_size_per_gpu"]
    params = load_params(ROOT / "params.yaml")
    completed = config_module.DeepSpeedConfig(deepspeed_config(params, path))
    assert completed.zero_optimization_stage == stage
    assert completed.train_micro_batch_size_per_gpu == params.loader.batch_size
    with pytest.raises(Exception, match="reduce_bucket_sise"):
        broken = _load_ds(name)
        broken["zero_optimization"]["reduce_bucket_sise"] = 1
        config_module.DeepSpeedConfig(broken)


def test_params_point_at_an_existing_deepspeed_config():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert (ROOT / params["train"]["deepspeed_config"]).is_file()


# --------------------------------------------------------------------------- Dockerfiles


def parse_dockerfile(path: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==(\S+)", line):
            pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line of .dockerignore, with Docker's matching rules: patterns are
    relative to the context root, `*` and `?` stay within one path segment, `**` spans any number
    of segments, `!` re-includes, and the last matching line wins."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        regex, i = "", 0
        while i < len(pattern):
            char = pattern[i]
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
                continue
            if pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
                continue
            regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            i += 1
        patterns.append((not negate, re.compile(f"^{regex}$")))
    return patterns


def dockerignored(relpath: str) -> bool:
    """Whether the build context leaves out `relpath` (a file or folder, or one of its parents)."""
    parts = relpath.split("/")
    excluded = False
    for exclude, regex in dockerignore_patterns():
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = exclude
    return excluded


def run_commands(parser: DockerfileParser) -> list[list[str]]:
    """Every simple command of every RUN, as argv lists (split at &&, ||, ; and |), with the
    ARG defaults substituted."""
    defaults = {}
    for item in parser.structure:
        if item["instruction"] == "ARG" and "=" in item["value"]:
            name, _, value = item["value"].partition("=")
            defaults[name.strip()] = value.strip()
    commands = []
    for item in parser.structure:
        if item["instruction"] != "RUN":
            continue
        text = re.sub(r"--mount=\S+", "", item["value"])
        text = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m[1], m[0]), text)
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in {"&&", "||", ";", "|", "&"}:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


VALUE_OPTIONS = {
    "--python",
    "-p",
    "-d",
    "--dest",
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-b",
    "--build-constraints",
    "--target",
    "--prefix",
    "-i",
    "--index-url",
    "--extra-index-url",
    "--from",
}
REQUIREMENT = re.compile(r"^([A-Za-z0-9._-]+)(\[[^\]]*\])?==([0-9][A-Za-z0-9.+!-]*)$")


def python_requirements(command: list[str]) -> list[str] | None:
    """The requirement arguments of a `pip install|download`, `uv pip install` or `uvx --from`
    command (leading VAR=value assignments allowed); None for other commands."""
    found: list[str] = []
    is_python_install = False
    for i, token in enumerate(command):
        if token in ("uvx", "run") and "--from" in command[i:]:
            is_python_install = True
            found.append(command[command.index("--from", i) + 1])
        if token == "pip" and command[i + 1 : i + 2] in (["install"], ["download"]):
            is_python_install, skip = True, False
            for arg in command[i + 2 :]:
                if skip:
                    skip = False
                elif arg in VALUE_OPTIONS:
                    skip = True
                elif not arg.startswith("-"):
                    found.append(arg)
            break
    return found if is_python_install else None


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_copies_existing_files_that_the_context_keeps(flavor):
    parser = parse_dockerfile(DOCKERFILES[flavor])
    sources = []
    for item in parser.structure:
        if item["instruction"] in ("COPY", "ADD"):
            args = item["value"].split()
            if any(a.startswith("--from=") for a in args):
                continue
            sources.extend(a for a in args[:-1] if not a.startswith("--"))
    for source in sources:
        assert (ROOT / source).exists(), f"{flavor}: COPY {source}: no such file in the repository"
        assert not dockerignored(source), f"{flavor}: COPY {source} is excluded by .dockerignore"
    for needed in ("requirements.lock", "scripts/install-debian.sh", "scripts/convert_yamnet.py"):
        assert needed in sources, f"{flavor}: does not copy {needed}"
    assert {"pyproject.toml", "flam_core", "infra/deepspeed", "params.yaml"} <= set(sources)


def test_dockerignore_keeps_sources_and_drops_the_rest():
    for kept in ("flam_core/data/sources.py", "infra/k8s/base/secrets/s3.env.example", "README.md"):
        assert not dockerignored(kept), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "data/sources/manifest.parquet",
        "models/flam/model.pt",
        "reports/eval/metrics.json",
        "mlruns.db",
        "mlruns/0/meta.yaml",
        "flam_core/__pycache__/config.cpython-311.pyc",
        ".dvc/cache/files/md5/00/abc",
        "infra/k8s/overlays/cluster/secrets/s3.env",
    ):
        assert dockerignored(dropped), dropped


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_installs_only_pinned_python_packages(flavor):
    parser = parse_dockerfile(DOCKERFILES[flavor])
    pins = lock_pins()
    commands = run_commands(parser)
    syncs = [c for c in commands if c[:3] == ["uv", "pip", "sync"]]
    assert syncs and all(c[-1] == "requirements.lock" for c in syncs)
    project_installs = 0
    for command in commands:
        requirements = python_requirements(command)
        if requirements is None:
            continue
        assert requirements, f"{flavor}: nothing to install in {command}"
        for requirement in requirements:
            if requirement == ".":
                assert "--no-deps" in command and "-e" not in command and "--editable" not in command
                project_installs += 1
                continue
            match = REQUIREMENT.match(requirement)
            assert match, f"{flavor}: unpinned requirement {requirement!r} in {' '.join(command)}"
            locked = pins.get(match[1].lower().replace("_", "-"))
            assert locked in (None, match[3]), f"{flavor}: {requirement} but requirements.lock has {locked}"
    assert project_installs == 1
    # The uv binary is the version the lock pins.
    uv_images = [image for image in parser.parent_images if image.startswith("ghcr.io/astral-sh/uv:")]
    assert uv_images == [f"ghcr.io/astral-sh/uv:{pins['uv']}"]


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_image_contents(flavor):
    parser = parse_dockerfile(DOCKERFILES[flavor])
    for image in parser.parent_images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{flavor}: base image {image} is not pinned"
    env = parser.envs  # the final stage's environment
    assert env["FLAM_CACHE_DIR"] == "/opt/flam-cache"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin")
    users = [item["value"] for item in parser.structure if item["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{flavor}: the image runs as root"
    commands = run_commands(parser)
    assert ["bash", "/tmp/install-debian.sh", "/opt/flam-cache/debs"] in commands
    apt = [w for c in commands if c[:2] == ["apt-get", "install"] for w in c]
    assert "libsndfile1" in apt and "--no-install-recommends" in apt
    assert any(c[:2] == ["/opt/venv/bin/python", "scripts/convert_yamnet.py"] for c in commands)
    python_images = [i for i in parser.parent_images if i.startswith("python:")]
    assert all(i.startswith("python:3.11.") for i in python_images)


def test_cuda_dockerfile_builds_deepspeed_ops_for_the_locked_cuda():
    parser = parse_dockerfile(DOCKERFILES["cuda"])
    images = parser.parent_images
    devel = [i for i in images if i.startswith("nvidia/cuda:") and "-devel-ubuntu22.04" in i]
    assert devel, images
    cuda_major = devel[0].split(":")[1].split(".")[0]
    # torch's CUDA wheels (requirements.lock) and the toolkit that compiles DeepSpeed ops must
    # share the major version, else DeepSpeed refuses to build.
    assert lock_pins()["nvidia-cuda-runtime"].split(".")[0] == cuda_major
    build = [c for c in run_commands(parser) if "deepspeed==0.19.8" in c]
    assert len(build) == 1
    flags = dict(w.split("=", 1) for w in build[0] if re.match(r"^[A-Z_]+=", w))
    assert flags["DS_BUILD_FUSED_ADAM"] == flags["DS_BUILD_CPU_ADAM"] == "1"
    assert flags["DS_ACCELERATOR"] == "cuda"
    assert {"--no-build-isolation", "--reinstall"} <= set(build[0])
    text = DOCKERFILES["cuda"].read_text()
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text
    assert parser.envs["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    installs = [c for c in run_commands(parser) if c[:3] == ["uv", "python", "install"]]
    assert installs and all(c[3].startswith("3.11.") for c in installs)


def test_makefile_image_targets():
    makefile = (ROOT / "Makefile").read_text()
    assert "IMAGE_REPO ?= ghcr.io/flam-project" in makefile
    assert "IMAGE_TAG ?= $(shell git rev-parse --short HEAD)" in makefile
    for flavor, path in DOCKERFILES.items():
        assert f"-f {path.relative_to(ROOT)} -t $(IMAGE_REPO)/flam:$(IMAGE_TAG)-{flavor} ." in makefile
        assert f"docker push $(IMAGE_REPO)/flam:$(IMAGE_TAG)-{flavor}" in makefile
    assert re.search(r"^\.PHONY:.*\bimages\b.*\bpush-images\b", makefile, re.M)


def test_readme_paths_exist():
    readme = (INFRA / "README.md").read_text()
    paths = set(re.findall(r"\b(?:infra|scripts|pipelines)/[\w./-]*[\w]", readme))
    assert "infra/k8s/overlays/cluster" in paths
    for path in sorted(paths):
        if path.startswith("pipelines/") or path.endswith(".env"):
            continue  # written by other stages / by the operator
        assert (ROOT / path).exists(), f"infra/README.md names {path}, which does not exist"
