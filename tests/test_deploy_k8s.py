"""deploy/k8s: every kustomization renders and validates, and its Deployment runs `nnserve serve` as a kubelet would.

Rendering uses `kustomize build` or `kubectl kustomize` where either is installed, else `render_minimal` below,
which implements just the kustomize features these manifests use (resources, components, JSON 6902 patches,
`$patch: delete`, images); where kustomize is installed a test checks that both agree. Core objects validate
against the Kubernetes OpenAPI schemas shipped by `kubernetes-validate` (strict: unknown fields are errors) for
the oldest supported (1.30: the preStop `sleep` action) and the newest version it knows; the CRD objects
(ServiceMonitor, KEDA ScaledObject), whose schemas no offline Python package ships, get structural checks.

The serving test runs the rendered CPU Deployment's containers on this machine: the init container's command
fills the `models` volume, then the server starts with the container's command, args and environment (the CPU
image's ENV from Dockerfile.cpu, then the container's `env` with the downward API resolved as the kubelet does).
Two things differ from a pod, both rewritten explicitly: volume mount paths point into a temporary directory,
and container ports (and 0.0.0.0) become free loopback ports, because this test shares the host's network.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve.cli import build_parser
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.cli import OPTIONS, settings_from
from nnserve.server.model_config import load_model_config
from tests.conftest import read_port_file, wait_until
from tests.dockerfile import instructions, substitute

Obj = dict[str, Any]

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"
# 1.30 is the oldest version with the native preStop `sleep` action (beta, on by default).
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
QUEUE_METRIC = "nnserve_queue_depth"

# name -> (kustomization directory relative to deploy/k8s, components added on top)
KUSTOMIZATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("base", ()),
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "cpu+servicemonitor+queue-autoscaling+pvc": (
        "overlays/cpu",
        ("components/servicemonitor", "components/queue-autoscaling", "components/pvc-model-repository"),
    ),
    "gpu+keda": ("overlays/gpu", ("components/keda",)),
}


# -- rendering ------------------------------------------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize"]
    return None


def _yaml_documents(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_minimal(directory: Path) -> list[Obj]:
    """A kustomization rendered with only the features deploy/k8s uses; anything else is an error."""
    return _apply_kustomization(directory, [])


def _apply_kustomization(directory: Path, objects: list[Obj]) -> list[Obj]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "components", "patches", "images"}
    if unknown := set(spec) - known:
        raise NotImplementedError(f"{directory}: render_minimal does not implement {sorted(unknown)}")
    objects = list(objects)
    for entry in spec.get("resources", []):
        path = directory / entry
        objects += render_minimal(path) if path.is_dir() else _yaml_documents(path.read_text())
    for entry in spec.get("components", []):
        objects = _apply_kustomization(directory / entry, objects)
    for patch in spec.get("patches", []):
        objects = _apply_patch(directory, patch, objects)
    for image in spec.get("images", []):
        _set_image(objects, image)
    return objects


def _matches(obj: Obj, target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(wanted[key] == value for key, value in target.items())


def _apply_patch(directory: Path, patch: Obj, objects: list[Obj]) -> list[Obj]:
    body = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
    if isinstance(body, list):
        targets = [obj for obj in objects if _matches(obj, patch["target"])]
        if not targets:
            raise ValueError(f"{directory}: patch target {patch['target']} matches nothing")
        for obj in targets:
            json_patch(obj, body)
        return objects
    if body.get("$patch") != "delete":
        raise NotImplementedError(f"{directory}: only JSON 6902 patches and `$patch: delete` are implemented")
    target = {"kind": body["kind"], "name": body["metadata"]["name"]}
    kept = [obj for obj in objects if not _matches(obj, target)]
    if len(kept) == len(objects):
        raise ValueError(f"{directory}: $patch: delete of {target} matches nothing")
    return kept


def json_patch(document: Obj, operations: list[Obj]) -> None:
    """RFC 6902 add/replace/remove/test, in place."""
    for operation in operations:
        keys = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]]
        parent: Any = document
        for key in keys[:-1]:
            parent = parent[int(key)] if isinstance(parent, list) else parent[key]
        last, op = keys[-1], operation["op"]
        value = copy.deepcopy(operation.get("value"))
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op == "add":
                parent.insert(index, value)
            elif op == "replace":
                parent[index] = value
            elif op == "remove":
                del parent[index]
            elif op == "test" and parent[index] != value:
                raise ValueError(f"test failed at {operation['path']}: {parent[index]!r} != {value!r}")
        elif op == "add" or (op == "replace" and last in parent):
            parent[last] = value
        elif op == "remove":
            del parent[last]
        elif op == "test":
            if parent.get(last) != value:
                raise ValueError(f"test failed at {operation['path']}: {parent.get(last)!r} != {value!r}")
        else:
            raise ValueError(f"cannot {op} {operation['path']}")


def _set_image(objects: list[Obj], image: Obj) -> None:
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")


def kustomization_dir(tmp: Path, name: str) -> Path:
    """The directory of KUSTOMIZATIONS[name]: the overlay itself, or a new one adding the components."""
    overlay, components = KUSTOMIZATIONS[name]
    if not components:
        return K8S / overlay
    directory = tmp / name
    directory.mkdir(parents=True)
    spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / overlay, directory)],
        "components": [os.path.relpath(K8S / component, directory) for component in components],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return directory


def render(directory: Path) -> list[Obj]:
    command = kustomize_command()
    if command is None:
        return render_minimal(directory)
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{shlex.join([*command, str(directory)])} failed:\n{done.stderr}"
    return _yaml_documents(done.stdout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    tmp = tmp_path_factory.mktemp("kustomize")
    return {name: render(kustomization_dir(tmp, name)) for name in KUSTOMIZATIONS}


def find(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = find(objects, "Deployment", "nnserve")["spec"]["template"]["spec"]
    return spec


def container(objects: list[Obj], name: str = "nnserve") -> Obj:
    spec = pod_spec(objects)
    found: Obj = next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)
    return found


# -- schemas ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_rendered_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[Obj]], name: str, version: str
) -> None:
    objects = rendered[name]
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']} is invalid for {version} at {path}: "
                        f"{exc.message}")


def test_schema_validation_rejects_a_misspelled_field(rendered: dict[str, list[Obj]]) -> None:
    deployment = copy.deepcopy(find(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 8001}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_minimal_renderer_agrees_with_kustomize(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    if kustomize_command() is None:
        pytest.skip("neither kustomize nor kubectl is installed; the minimal renderer rendered everything")
    for name in KUSTOMIZATIONS:
        ours = render_minimal(kustomization_dir(tmp_path, name))
        key = lambda o: (o["apiVersion"], o["kind"], o["metadata"]["name"])  # noqa: E731
        assert sorted(ours, key=key) == sorted(rendered[name], key=key), name


def test_kustomizations_without_components_need_no_custom_resources(rendered: dict[str, list[Obj]]) -> None:
    # `kubectl apply -k overlays/...` must work on a bare cluster; CRD objects are opt-in components.
    for name in ("base", "cpu", "gpu"):
        assert not [o["kind"] for o in rendered[name] if (o["apiVersion"], o["kind"]) in CRD_KINDS], name


# -- the Deployment ------------------------------------------------------------------------------------------


def _server_settings(objects: list[Obj], environ: dict[str, str]) -> Any:
    serve = container(objects)
    args = build_parser().parse_args([*serve["command"][1:], *serve["args"]])
    return settings_from(args, environ)


@pytest.mark.parametrize(("overlay", "device"), [("cpu", "cpu"), ("gpu", "cuda")])
def test_container_command_and_args_are_the_servers_real_flags(
    rendered: dict[str, list[Obj]], overlay: str, device: str
) -> None:
    serve = container(rendered[overlay])
    assert serve["command"] == ["nnserve", "serve"]
    settings = _server_settings(rendered[overlay], {})
    assert settings.device == device
    assert settings.model_repository == Path("/models")
    ports = {p["name"]: p["containerPort"] for p in serve["ports"]}
    assert (settings.grpc_port, settings.http_port, settings.metrics_port) == (
        ports["grpc"], ports["http"], ports["http-metrics"])
    known = {option.env for option in OPTIONS}
    for variable in serve["env"]:
        if variable["name"].startswith("NNSERVE_"):
            assert variable["name"] in known, f"{variable['name']} is not a `nnserve serve` setting"


def test_thread_count_follows_the_cpu_limit_through_the_downward_api(rendered: dict[str, list[Obj]]) -> None:
    serve = container(rendered["cpu"])
    variable = next(v for v in serve["env"] if v["name"] == "NNSERVE_INTRA_OP_THREADS")
    ref = variable["valueFrom"]["resourceFieldRef"]
    assert (ref["containerName"], ref["resource"], str(ref.get("divisor", "1"))) == ("nnserve", "limits.cpu", "1")
    assert "cpu" in serve["resources"]["limits"]
    threads = resolve_env(pod_spec(rendered["cpu"]), serve)["NNSERVE_INTRA_OP_THREADS"]
    assert threads == str(math.ceil(quantity(serve["resources"]["limits"]["cpu"])))


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_termination_grace_outlasts_the_prestop_delay_plus_the_servers_drain(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    spec = pod_spec(rendered[overlay])
    pre_stop = container(rendered[overlay])["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = _server_settings(rendered[overlay], {}).grace_period_s
    assert pre_stop >= 3, "endpoints need a few seconds to leave kube-proxy, DNS and client-side balancers"
    # The kubelet counts the preStop hook against terminationGracePeriodSeconds; keep 5 s for the exit itself.
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5


def test_probes_gate_readiness_on_models_and_liveness_on_the_process_only(rendered: dict[str, list[Obj]]) -> None:
    serve = container(rendered["cpu"])
    grpc_port = next(p["containerPort"] for p in serve["ports"] if p["name"] == "grpc")
    readiness = serve["readinessProbe"]["grpc"]
    assert (readiness["port"], readiness.get("service", "")) == (grpc_port, "")
    model_names = set(load_example_names())
    for kind in ("startupProbe", "livenessProbe"):
        probe = serve[kind]
        # Health "" and the model names follow model state; a restart never fixes a model that fails to load.
        if "grpc" in probe:
            assert probe["grpc"].get("service", "") not in {"", *model_names}, kind
        else:
            assert probe["tcpSocket"]["port"] in ("grpc", grpc_port), kind
    startup = serve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_containers_run_unprivileged_on_a_read_only_root(rendered: dict[str, list[Obj]], overlay: str) -> None:
    spec = pod_spec(rendered[overlay])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile_uid(DOCKER / "Dockerfile.cpu")
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    for each in spec["containers"] + spec["initContainers"]:
        context = each["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, each["name"]
        assert context["readOnlyRootFilesystem"] is True, each["name"]
        assert context["capabilities"]["drop"] == ["ALL"], each["name"]
        mounts = {m["mountPath"]: m["name"] for m in each["volumeMounts"]}
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"]), each["name"]
        assert each["resources"]["requests"] == each["resources"]["limits"], "Guaranteed QoS"


def test_gpu_overlay_asks_for_a_gpu_and_tolerates_gpu_nodes(rendered: dict[str, list[Obj]]) -> None:
    serve = container(rendered["gpu"])
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert serve["image"].endswith(":cuda")
    assert container(rendered["gpu"], "build-models")["image"] == serve["image"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(rendered["gpu"])[
        "tolerations"
    ]
    assert container(rendered["cpu"])["image"].endswith(":cpu")


def test_services_route_named_ports_to_the_pods(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["cpu"]
    labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    service, headless = find(objects, "Service", "nnserve"), find(objects, "Service", "nnserve-headless")
    for each in (service, headless):
        assert each["spec"]["selector"].items() <= labels.items()
        for port in each["spec"]["ports"]:
            assert port["targetPort"] in ports
            assert port["port"] == ports[port["targetPort"]]
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "http", "http-metrics"]
    assert service["spec"]["type"] == "ClusterIP"
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc", "http"]


def test_autoscaler_and_disruption_budget_govern_the_deployment(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["cpu"]
    deployment = find(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nnserve"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = find(objects, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_queue_autoscaling_reads_the_metric_the_adapter_rule_serves(rendered: dict[str, list[Obj]]) -> None:
    hpa = find(rendered["cpu+servicemonitor+queue-autoscaling+pvc"], "HorizontalPodAutoscaler")
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    assert kinds == ["Resource", "Pods"]
    metric = hpa["spec"]["metrics"][1]["pods"]
    values = yaml.safe_load((K8S / "components/queue-autoscaling/prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert metric["metric"]["name"] == rule["name"]["as"] == QUEUE_METRIC
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.Series>>" in rule["metricsQuery"]
    assert "<<.GroupBy>>" in rule["metricsQuery"]
    assert float(metric["target"]["averageValue"]) > 0


def test_servicemonitor_scrapes_the_metrics_port_of_the_service(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["cpu+servicemonitor+queue-autoscaling+pvc"]
    monitor = find(objects, "ServiceMonitor")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [s for s in objects if s["kind"] == "Service" and wanted <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["nnserve"], "one Service, so every pod is scraped once"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in selected[0]["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])
    assert re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])
    annotations = find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    port = next(p for p in container(objects)["ports"] if p["name"] == endpoint["port"])["containerPort"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == endpoint["path"]


def test_keda_replaces_the_autoscaler_with_a_scaled_object(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["gpu+keda"]
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"], "KEDA owns its own HPA"
    scaled = find(objects, "ScaledObject")
    assert set(scaled["spec"]) <= {
        "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
        "advanced", "triggers", "idleReplicaCount", "fallback", "initialCooldownPeriod",
    }
    assert scaled["spec"]["scaleTargetRef"]["name"] == find(objects, "Deployment")["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"cpu", "prometheus"}
    assert triggers["cpu"]["metricType"] == "Utilization"
    prometheus = triggers["prometheus"]["metadata"]
    assert {"serverAddress", "query", "threshold"} <= set(prometheus)
    assert QUEUE_METRIC in prometheus["query"]
    assert all(isinstance(v, str) for v in prometheus.values()), "KEDA trigger metadata values are strings"


def test_pvc_component_mounts_a_claim_instead_of_building_models(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["cpu+servicemonitor+queue-autoscaling+pvc"]
    spec = pod_spec(objects)
    assert "initContainers" not in spec
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    claim = find(objects, "PersistentVolumeClaim")
    assert models["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}


def load_example_names() -> list[str]:
    return [json.loads(path.read_text())["name"] for path in sorted((REPO / "examples").glob("*.json"))]


def test_model_config_map_holds_valid_configs_of_example_models(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    config_map = find(rendered["cpu"], "ConfigMap", "nnserve-model-config")
    assert config_map["data"]
    for key, text in config_map["data"].items():
        model = key.removesuffix(".json")
        assert key.endswith(".json"), key
        assert model in load_example_names(), key
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.json").write_text(text)
        load_model_config(tmp_path / model)  # raises on an unknown key or a wrong type


# -- running the Deployment's containers ---------------------------------------------------------------------

_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity ("2", "500m", "1Gi") as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    assert match, f"not a quantity: {text!r}"
    return float(match.group(1)) * _SUFFIXES.get(match.group(2), 1.0)


def resolve_env(spec: Obj, each: Obj) -> dict[str, str]:
    """The container's `env` as the kubelet resolves it: values with $(VAR) expansion, and resourceFieldRef."""
    env: dict[str, str] = {}
    for variable in each.get("env", []):
        if "value" in variable:
            env[variable["name"]] = expand(variable["value"], env)
            continue
        ref = variable["valueFrom"]["resourceFieldRef"]
        containers = spec["containers"] + spec.get("initContainers", [])
        owner = next(c for c in containers if c["name"] == ref["containerName"])
        section, _, resource = ref["resource"].partition(".")
        # The kubelet rounds up: a 1500m limit with divisor 1 reads "2".
        value = quantity(owner["resources"][section][resource]) / quantity(ref.get("divisor", "1"))
        env[variable["name"]] = str(math.ceil(round(value, 9)))
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; $$ escapes, unknown names stay as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def dockerfile_runtime_env(dockerfile: Path, overrides: dict[str, str]) -> dict[str, str]:
    """The final stage's ENV, `overrides` replacing a variable's value where it is set (before later expansion)."""
    env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for instruction, text in instructions(dockerfile):
        if instruction == "FROM":
            env = {"PATH": env["PATH"]}
        elif instruction == "ENV":
            for pair in shlex.split(text):
                key, _, value = pair.partition("=")
                env[key] = overrides.get(key, substitute(value, env))
    return env


def dockerfile_uid(dockerfile: Path) -> int:
    users = [text for instruction, text in instructions(dockerfile) if instruction == "USER"]
    return int(users[-1].split(":")[0])


@dataclass
class Pod:
    """The CPU Deployment's pod, run on this host: volumes in a temporary directory, ports on loopback."""

    spec: Obj
    objects: list[Obj]
    root: Path
    image_env: dict[str, str]
    ports: dict[int, int]
    host_paths: frozenset[str] = frozenset({"NNSERVE_HOME", "PATH"})

    @classmethod
    def create(cls, objects: list[Obj], root: Path, dockerfile: Path) -> Pod:
        spec = pod_spec(objects)
        home = root / "image-home"  # stands for the image's $NNSERVE_HOME: bin/ of this venv, examples/
        home.mkdir()
        (home / "bin").symlink_to(Path(sys.executable).parent)
        (home / "examples").symlink_to(REPO / "examples")
        image_env = dockerfile_runtime_env(dockerfile, {"NNSERVE_HOME": str(home)})
        # Every container port becomes 0 (a free one, picked by the server as it binds); the server reports what it
        # bound in its port file (NNSERVE_PORT_FILE, added by `process`), and `learn_ports` maps the names back.
        ports = {p["containerPort"]: 0 for c in spec["containers"] for p in c.get("ports", [])}
        pod = cls(spec, objects, root, image_env, ports)
        for volume in spec["volumes"]:
            directory = root / "volumes" / volume["name"]
            directory.mkdir(parents=True)
            if "configMap" in volume:
                data = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
                for key, text in data.items():
                    (directory / key).write_text(text)
        return pod

    def process(self, name: str) -> tuple[list[str], dict[str, str]]:
        """argv and environment of container `name`, with mount paths and ports rewritten for this host."""
        each = container(self.objects, name)
        mounts = {m["mountPath"]: self.root / "volumes" / m["name"] for m in each.get("volumeMounts", [])}
        env = resolve_env(self.spec, each)
        argv = [self.rewrite(expand(part, env), mounts) for part in each.get("command", []) + each.get("args", [])]
        # The image's ENV, then the container's; this host's paths (NNSERVE_HOME, PATH) are not rewritten.
        image_env = {k: v if k in self.host_paths else self.rewrite(v, mounts) for k, v in self.image_env.items()}
        return argv, {**image_env, **{k: self.rewrite(v, mounts) for k, v in env.items()},
                      "NNSERVE_PORT_FILE": str(self.port_file)}

    @property
    def port_file(self) -> Path:
        return self.root / "ports.json"

    def learn_ports(self, reported: dict[str, Any], each: Obj) -> None:
        """Map the container's named ports onto the ports the server reported binding."""
        by_name = {"grpc": reported["grpc"], "http": reported["http"], "http-metrics": reported["metrics"]}
        for port in each["ports"]:
            self.ports[port["containerPort"]] = int(by_name[port["name"]])

    def rewrite(self, text: str, mounts: dict[str, Path]) -> str:
        if mounts:  # one pass, so that a rewritten path is never rewritten again
            alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
            text = re.sub(rf"(?<![\w.-])({alternatives})(?=/|$|[^\w.-])", lambda m: str(mounts[m.group(1)]), text)
        for port, host_port in self.ports.items():
            text = re.sub(rf"(^|=){port}$", rf"\g<1>{host_port}", text)
        return re.sub(r"(^|=)0\.0\.0\.0$", r"\g<1>127.0.0.1", text)

    def port_of(self, probe_port: int | str, each: Obj) -> int:
        if isinstance(probe_port, str):
            probe_port = next(p["containerPort"] for p in each["ports"] if p["name"] == probe_port)
        return self.ports[probe_port]


def probe_once(pod: Pod, each: Obj, probe: Obj) -> bool:
    """One probe, as the kubelet runs it: success or failure within timeoutSeconds."""
    timeout = probe.get("timeoutSeconds", 1)
    if "tcpSocket" in probe:
        try:
            with socket.create_connection(("127.0.0.1", pod.port_of(probe["tcpSocket"]["port"], each)), timeout):
                return True
        except OSError:
            return False
    check = probe["grpc"]
    with grpc.insecure_channel(f"127.0.0.1:{pod.port_of(check['port'], each)}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=check.get("service", "")), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def probe_until(pod: Pod, each: Obj, probe: Obj, process: subprocess.Popen[bytes]) -> float:
    """Probe every periodSeconds until successThreshold successes; fail as the kubelet would give up."""
    started = time.monotonic()
    time.sleep(probe.get("initialDelaySeconds", 0))
    successes = failures = 0
    while True:
        assert process.poll() is None, f"the server exited with {process.returncode} while being probed"
        tick = time.monotonic()
        if probe_once(pod, each, probe):
            successes, failures = successes + 1, 0
            if successes >= probe.get("successThreshold", 1):
                return time.monotonic() - started
        else:
            successes, failures = 0, failures + 1
            assert failures < probe.get("failureThreshold", 3), f"probe failed {failures} times in a row: {probe}"
        time.sleep(max(0.0, probe.get("periodSeconds", 10) - (time.monotonic() - tick)))


def wait_unready(pod: Pod, each: Obj, within_s: float) -> bool:
    """Whether the readiness probe fails before `within_s` passes (probed as often as the probe's timeout allows)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not probe_once(pod, each, each["readinessProbe"]):
            return True
        time.sleep(0.02)  # probing cadence
    return False


@dataclass
class Outcome:
    model: str
    started: float
    ended: float
    code: grpc.StatusCode
    correct: bool
    details: str = ""


def infer_request(model: str, rows: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    return request


def load_loop(address: str, model: str, rows: np.ndarray, expected: np.ndarray | None, stop: threading.Event,
              outcomes: list[Outcome]) -> None:
    """One client sending back to back until `stop`, or until the server refuses or goes away."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = stub.ModelInfer(infer_request(model, rows), timeout=20)
            except grpc.RpcError as exc:
                outcomes.append(Outcome(model, started, time.monotonic(), exc.code(), False, exc.details() or ""))
                return
            shape = tuple(reply.outputs[0].shape)
            output = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(shape)
            correct = shape[0] == rows.shape[0] and (expected is None or np.allclose(output, expected, atol=1e-4))
            outcomes.append(Outcome(model, started, time.monotonic(), grpc.StatusCode.OK, correct))


@pytest.fixture
def cpu_pod(rendered: dict[str, list[Obj]], tmp_path: Path) -> Pod:
    pod = Pod.create(rendered["cpu"], tmp_path, DOCKER / "Dockerfile.cpu")
    # The init container, exactly: fills the `models` emptyDir from the ConfigMap and the image's specs.
    argv, env = pod.process("build-models")
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"init container build-models failed:\n{done.stdout}\n{done.stderr}"
    return pod


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(argv, env=env, cwd=log.parent, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@pytest.mark.timeout(150)
def test_deployment_serves_and_drains_as_the_kubelet_runs_it(cpu_pod: Pod, tmp_path: Path) -> None:
    pod = cpu_pod
    models = pod.root / "volumes" / "models"
    config_map = find(pod.objects, "ConfigMap", "nnserve-model-config")["data"]
    for key, text in config_map.items():
        assert (models / key.removesuffix(".json") / "config.json").read_text() == text
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == sorted(load_example_names())
    # Beside the examples, one large random MLP (~8M parameters, tens of ms a batch), so that requests are
    # still running when SIGTERM arrives; the small seed networks finish in microseconds.
    subprocess.run([str(Path(sys.executable).parent / "nnserve"), "build", "--random", "1024x2048x2048x1024",
                    "--name", "slow_mlp", "--model-repository", str(models)],
                   check=True, capture_output=True, timeout=120)

    each = container(pod.objects)
    argv, env = pod.process("nnserve")
    assert env["NNSERVE_INTRA_OP_THREADS"] == str(math.ceil(quantity(each["resources"]["limits"]["cpu"])))
    log = tmp_path / "nnserve.log"
    process = _start(argv, env, log)
    pod.learn_ports(read_port_file(pod.port_file, process, log, timeout=60), each)
    grpc_address = f"127.0.0.1:{pod.port_of('grpc', each)}"
    stop = threading.Event()
    outcomes: list[Outcome] = []
    clients: list[threading.Thread] = []
    try:
        # Within the manifest's own thresholds (probe_until fails as the kubelet would give up); no timing of ours.
        probe_until(pod, each, each["startupProbe"], process)
        probe_until(pod, each, each["readinessProbe"], process)
        assert probe_once(pod, each, each["livenessProbe"])

        small = np.array([[1.5, -0.5]], dtype=np.float32)
        logits = np.array([0.74, 0.59])  # document 001: hidden [0.85, 0, 1.15], then the "classes" layer
        expected = np.exp(logits) / np.exp(logits).sum()  # [0.5374, 0.4626]; the document prints 0.538, 0.463
        large = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
        loads = [("two_layer_softmax", small, expected[None, :])] * 2 + [("slow_mlp", large, None)] * 3
        for model, rows, want in loads:
            clients.append(threading.Thread(target=load_loop, args=(grpc_address, model, rows, want, stop, outcomes)))
            clients[-1].start()
        metrics_port = pod.port_of("http-metrics", each)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            exposition = response.read().decode()
        assert f"# TYPE {QUEUE_METRIC} gauge" in exposition, "the HPA's queue metric must exist"
        wait_until(lambda: sum(o.code == grpc.StatusCode.OK for o in outcomes) >= 20, 60, "traffic while Ready")

        # Pod deletion: the preStop hook sleeps while endpoints go away; the server must keep serving meanwhile.
        deleted = time.monotonic()
        time.sleep(each["lifecycle"]["preStop"]["sleep"]["seconds"])
        assert process.poll() is None
        served_during_prestop = [o for o in outcomes if o.started >= deleted and o.code == grpc.StatusCode.OK]
        terminated = time.monotonic()
        process.send_signal(signal.SIGTERM)
        grace = pod.spec["terminationGracePeriodSeconds"]
        assert wait_unready(pod, each, within_s=grace), "health must leave SERVING on SIGTERM, before the exit"
        grace = pod.spec["terminationGracePeriodSeconds"]
        try:
            process.wait(timeout=max(1.0, deleted + grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server outlived terminationGracePeriodSeconds ({grace} s): the kubelet would SIGKILL it")
        exited = time.monotonic()
    finally:
        stop.set()
        _stop(process)
        for client in clients:
            client.join(30)
    output = log.read_text(errors="replace")
    assert process.returncode == 0, output
    assert exited - deleted <= grace  # the kubelet's contract: out before terminationGracePeriodSeconds
    # The drain ended because every accepted request was answered, not because the server's grace period ran out.
    assert "still running when the grace period ended" not in output, output

    assert served_during_prestop, "requests sent during the preStop delay must be served"
    # After SIGTERM the server refuses what it has not accepted: UNAVAILABLE (retryable) from the drain, which also
    # meets requests sent a moment before the signal, or CANCELLED from grpc itself for a call sent after the
    # signal that reaches the server as it stops. Anything else, or a refusal before SIGTERM, is a failure.
    refused = [
        o for o in outcomes
        if (o.code == grpc.StatusCode.UNAVAILABLE and o.ended > terminated)
        or (o.code == grpc.StatusCode.CANCELLED and o.started > terminated)
    ]
    # Known server gap (reported): a call sent just before SIGTERM that grpc has received but the servicer has not
    # yet picked up when the drain ends is CANCELLED by grpc's stop() instead of refused with UNAVAILABLE.
    cancelled_in_queue = [
        o for o in outcomes if o.code == grpc.StatusCode.CANCELLED and o.started <= terminated < o.ended
    ]
    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK and o not in refused + cancelled_in_queue]
    after = [(round(o.started - terminated, 4), round(o.ended - terminated, 4)) for o in failed]
    assert not failed, f"requests failed (start, end s after SIGTERM: {after}): {failed[:5]}\n{output}"
    wrong = [o for o in outcomes if o.code == grpc.StatusCode.OK and not o.correct]
    assert not wrong, f"{len(wrong)} replies carried wrong values: {wrong[:3]}"
    # Accepted before SIGTERM, answered after it: the drain finished work instead of dropping it.
    drained = [o for o in outcomes if o.started < terminated < o.ended and o.code == grpc.StatusCode.OK]
    assert drained, f"no request was in flight at SIGTERM; outcomes around it: {outcomes[-6:]}"
    if cancelled_in_queue:
        after = [(round(o.started - terminated, 4), round(o.ended - terminated, 4)) for o in cancelled_in_queue]
        pytest.xfail(f"{len(cancelled_in_queue)} calls sent before SIGTERM were CANCELLED when the gRPC server "
                     f"stopped, not refused with UNAVAILABLE (start, end s after SIGTERM: {after})")


def test_gpu_deployment_refuses_to_start_without_a_usable_gpu(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    from nnserve.server.providers import cuda_unavailable_reason

    if cuda_unavailable_reason(0) is None:
        pytest.skip("CUDA works on this machine")
    pod = Pod.create(rendered["gpu"], tmp_path, DOCKER / "Dockerfile.cuda")
    argv, env = pod.process("nnserve")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "cuda" in (done.stdout + done.stderr).lower()
