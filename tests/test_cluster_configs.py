"""Static checks of cluster/, all offline: the cluster-launcher YAMLs against Ray's own autoscaler
schema, the KubeRay manifests against the KubeRay CRD schemas (strict about unknown fields), the
runtime env, and the Grafana dashboard. Each validator is also shown a broken copy that must fail."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = Path(__file__).resolve().parent / "data" / "kuberay"

# The custom resource every WorldModelServer actor requests; only GPU node types advertise it.
WORLD_SERVER_RESOURCE = "world_server"

# Every custom metric the code reports through ray.util.metrics (Ray exports them as ray_<name>).
CUSTOM_METRICS = [
    "genie_sima_pretrain_samples_per_s",
    "genie_sima_pretrain_loss",
    "genie_sima_world_env_steps_per_s",
    "genie_sima_world_batch_fill",
    "genie_sima_world_queue_latency_ms",
    "genie_sima_replay_size",
    "genie_sima_replay_adds_per_s",
    "genie_sima_replay_samples_per_s",
    "genie_sima_train_env_steps_per_s",
    "genie_sima_train_imagined_success",
]


def load_yaml(path: Path):
    # The C loader when PyYAML has it: the CRD files are ~0.5 MB each.
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# ---------------------------------------------------------------------------------------------------
# Cluster launcher (ray up)
# ---------------------------------------------------------------------------------------------------

def launcher_config_as_ray_up_sees_it(raw: dict) -> dict:
    """The offline part of what `ray up` does to a config before it touches the cloud.

    `ray up` runs ray.autoscaler._private.commands._bootstrap_config, which does, in order:
      1. util.prepare_config: merge ray/autoscaler/<provider>/defaults.yaml under ours (a top-level
         key we set replaces the default's whole value), prepend setup_commands to
         head_/worker_setup_commands, check the docker section, fill per-type min/max_workers.
         For aws and gcp this reads only local files.
      2. provider_cls.fillout_available_node_types_resources: for AWS it asks EC2 for instance types
         (a network call) to fill CPU/GPU/memory; our node types declare `resources` explicitly, so
         nothing is left for it to add. For GCP it only adds TPU resources (we have no TPU types), and
         importing the GCP provider needs googleapiclient, which is not installed here.
      3. util.validate_config: jsonschema against ray/autoscaler/ray-schema.json, then the cross checks
         (head_node_type among the types, sum of min_workers <= max_workers, ...).
      4. provider_cls.bootstrap_config: IAM roles, VPCs, key pairs: cloud calls.
    So the offline path is 1 then 3, skipping the two provider steps.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_config_validates_against_ray_schema(name, provider):
    raw = load_yaml(CLUSTER / name)
    assert raw["provider"]["type"] == provider
    cfg = launcher_config_as_ray_up_sees_it(raw)

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    # The head takes no Ray tasks or actors (CPU 0) and has no GPU.
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert head["max_workers"] == 0

    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) >= 1}
    cpu_types = {k: v for k, v in types.items() if k != cfg["head_node_type"] and k not in gpu_types}
    assert gpu_types and cpu_types, "need a GPU worker type and a CPU worker type"
    for node_type in types.values():
        # World servers may only land where there is a GPU: one per GPU node.
        world = node_type["resources"].get(WORLD_SERVER_RESOURCE, 0)
        assert world == (1 if node_type in gpu_types.values() else 0)
    for name_, node_type in list(gpu_types.items()) + list(cpu_types.items()):
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name_
        assert node_type["max_workers"] > node_type["min_workers"], f"{name_} cannot autoscale"

    # genie-sima gets installed on every node (setup_commands are merged into both lists).
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("genie_sima" in c or "genie-sima" in c for c in cfg[key]), key
    # Token auth stays on: every node starts Ray in token mode and gets the token file.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in cfg[key]), key
    assert any(remote.endswith(".ray/auth_token") for remote in cfg["file_mounts"])


def _unknown_top_level_field(cfg):
    cfg["max_worker"] = 4  # typo of max_workers


def _fractional_custom_resource(cfg):
    gpu = next(v for v in cfg["available_node_types"].values() if v["resources"].get("GPU"))
    gpu["resources"][WORLD_SERVER_RESOURCE] = 0.5  # launcher resources must be integers


def _unknown_node_type_field(cfg):
    cfg["available_node_types"][cfg["head_node_type"]]["resource"] = {"CPU": 0}


def _min_workers_wrong_type(cfg):
    next(iter(cfg["available_node_types"].values()))["min_workers"] = "two"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
@pytest.mark.parametrize("breakage, message", [
    (_unknown_top_level_field, "'max_worker' was unexpected"),
    (_fractional_custom_resource, "0.5 is not of type 'integer'"),
    (_unknown_node_type_field, "'resource' was unexpected"),
    (_min_workers_wrong_type, "'two' is not of type 'integer'"),
])
def test_broken_launcher_config_fails(name, breakage, message):
    raw = load_yaml(CLUSTER / name)
    breakage(raw)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        launcher_config_as_ray_up_sees_it(raw)


# ---------------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------------

def strict(schema):
    """Copy of a CRD schema that rejects unknown fields.

    Kubernetes prunes fields a structural schema does not list instead of rejecting them, so CRDs never
    say `additionalProperties: false`; we add it to every object schema that lists `properties`, unless
    it opts out with `x-kubernetes-preserve-unknown-fields` or already constrains additionalProperties.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out):
        out["additionalProperties"] = False
    return out


# The top-level ObjectMeta is `type: object` in a CRD (the API server checks it itself); hold our
# manifests to the fields they may set there.
MANIFEST_METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crd = load_yaml(CRD_DIR / f"ray.io_{kind.lower()}s.yaml")
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = MANIFEST_METADATA
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    # OpenAPI v3 schemas are close to draft 4; draft 7 reads all keywords CRDs use and ignores x-*.
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def world_server_resources(group: dict) -> dict:
    # KubeRay passes rayStartParams.resources to `ray start --resources`; the value is a JSON object
    # inside a quoted string ('"{\"world_server\": 1}"'), as KubeRay's own examples write it.
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def check_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values()
           if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                  for c in g["template"]["spec"]["containers"])]
    assert len(gpu) == 1, "exactly one GPU worker group"
    assert world_server_resources(gpu[0]) == {WORLD_SERVER_RESOURCE: 1}
    for g in groups.values():
        if g is not gpu[0]:
            assert WORLD_SERVER_RESOURCE not in world_server_resources(g)
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] > g["minReplicas"]
    # Token auth on: every Ray container and the autoscaler read the token from the same Secret.
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in groups.values()]
    for env in [c["env"] for c in containers] + [spec["autoscalerOptions"]["env"]]:
        names = {e["name"]: e for e in env}
        assert names["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in names["RAY_AUTH_TOKEN"]["valueFrom"]


def test_raycluster_matches_kuberay_crd():
    manifest = load_yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    crd_validator("RayCluster").validate(manifest)
    check_cluster_spec(manifest["spec"])


@pytest.mark.parametrize("file, command", [("rayjob.yaml", "train"), ("rayjob-pretrain.yaml", "pretrain")])
def test_rayjob_matches_kuberay_crd(file, command):
    from pipelines.cli import build_parser

    manifest = load_yaml(CLUSTER / "kuberay" / file)
    crd_validator("RayJob").validate(manifest)
    spec = manifest["spec"]
    check_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env_from_yaml(yaml.safe_load(spec["runtimeEnvYAML"]))
    # The entrypoint is a real genie-sima command line: our own parser accepts it.
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "genie-sima" and argv[1] == command
    build_parser().parse_args(argv[1:])


def _set(path):
    def breakage(manifest, value):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return breakage


UNKNOWN, WRONG_TYPE = "Additional properties are not allowed", "is not of type"


@pytest.mark.parametrize("kind, file, path, value, message", [
    # unknown fields (typos Kubernetes would silently prune)
    ("RayCluster", "raycluster.yaml", ("spec", "enableInTreeAutoscalling"), True, UNKNOWN),
    ("RayCluster", "raycluster.yaml", ("spec", "workerGroupSpecs", 0, "minReplica"), 0, UNKNOWN),
    ("RayCluster", "raycluster.yaml",
     ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resource"), {}, UNKNOWN),
    ("RayJob", "rayjob.yaml", ("spec", "shutdownAfterJobFinish"), True, UNKNOWN),
    ("RayJob", "rayjob.yaml", ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "volume"), [], UNKNOWN),
    ("RayJob", "rayjob.yaml", ("metadata", "lables"), {}, UNKNOWN),
    # wrong types
    ("RayCluster", "raycluster.yaml", ("spec", "workerGroupSpecs", 0, "maxReplicas"), "8", WRONG_TYPE),
    ("RayCluster", "raycluster.yaml", ("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, WRONG_TYPE),
    ("RayJob", "rayjob.yaml", ("spec", "ttlSecondsAfterFinished"), "600", WRONG_TYPE),
    ("RayJob", "rayjob.yaml", ("spec", "runtimeEnvYAML"), {"pip": []}, WRONG_TYPE),
])
def test_broken_kuberay_manifest_fails(kind, file, path, value, message):
    manifest = load_yaml(CLUSTER / "kuberay" / file)
    validator = crd_validator(kind)
    validator.validate(manifest)
    _set(path)(manifest, value)
    errors = list(validator.iter_errors(manifest))
    assert errors, f"{'.'.join(map(str, path))} = {value!r} passed the schema"
    # The error is about the field we broke, not something else the change happened to upset.
    error = jsonschema.exceptions.best_match(errors)
    assert message in error.message and list(error.absolute_path)[:len(path) - 1] == list(path[:-1]), error


def test_strict_leaves_preserve_unknown_fields_open():
    schema = strict({"type": "object", "properties": {
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "closed": {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
    }})
    jsonschema.Draft7Validator(schema).validate({"open": {"b": 1}, "map": {"k": "v"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate({"closed": {"a": {"b": 1}}})


# ---------------------------------------------------------------------------------------------------
# Runtime env and dashboard
# ---------------------------------------------------------------------------------------------------

def runtime_env_from_yaml(raw: dict):
    """A Ray RuntimeEnv from a runtime-env YAML mapping, rejecting fields Ray does not know.

    RuntimeEnv checks the type of every field it knows but passes unknown ones through to runtime-env
    plugins (where a typo such as `workingdir` is silently ignored), so unknown keys are checked here.
    """
    from ray.runtime_env import RuntimeEnv

    unknown = set(raw) - set(RuntimeEnv.known_fields)
    if unknown:
        raise ValueError(f"unknown runtime_env fields: {sorted(unknown)}")
    return RuntimeEnv(**raw)


def test_runtime_env_parses_as_ray_runtime_env():
    env = runtime_env_from_yaml(load_yaml(CLUSTER / "runtime_env.yaml"))
    assert env["working_dir"] == "."
    for local_state in ("runs/", ".venv/", ".git/"):
        assert local_state in env["excludes"]
    assert env["env_vars"]["WANDB_MODE"] == "offline"


@pytest.mark.parametrize("override, error", [
    ({"workingdir": "."}, ValueError),                    # unknown field
    ({"env_vars": {"OMP_NUM_THREADS": 4}}, TypeError),    # env var values must be strings
    ({"excludes": "runs/"}, TypeError),                   # a list, not a string
])
def test_broken_runtime_env_fails(override, error):
    raw = load_yaml(CLUSTER / "runtime_env.yaml")
    with pytest.raises(error):
        runtime_env_from_yaml({**raw, **override})


def _all_panels(panels):
    for p in panels:
        yield p
        yield from _all_panels(p.get("panels", []))


def metrics_without_a_panel(dash: dict) -> list[str]:
    panels = [p for p in _all_panels(dash["panels"]) if p["type"] != "row"]
    # Whole-name match: ray_x_bucket (a histogram series) does not count as a panel for ray_x.
    return [m for m in CUSTOM_METRICS
            if not any(re.search(rf"\bray_{m}\b", t["expr"]) for p in panels for t in p["targets"])]


def test_grafana_dashboard_has_a_panel_per_custom_metric():
    dash = json.loads((CLUSTER / "grafana" / "genie_sima.json").read_text())
    assert metrics_without_a_panel(dash) == []
    every = list(_all_panels(dash["panels"]))
    assert len({p["id"] for p in every}) == len(every), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in every:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])


def test_grafana_check_catches_a_missing_panel():
    dash = json.loads((CLUSTER / "grafana" / "genie_sima.json").read_text())
    dash["panels"] = [p for p in dash["panels"]
                      if not any("ray_genie_sima_replay_size" in t["expr"] for t in p.get("targets", []))]
    assert metrics_without_a_panel(dash) == ["genie_sima_replay_size"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_clusters_bind_the_dashboard_to_loopback(name):
    # Reached from a laptop through `ray dashboard cluster/<name>` (SSH forwarding), never exposed.
    text = (Path(__file__).resolve().parent.parent / "cluster" / name).read_text()
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_clusters_share_storage_with_one_group_not_everyone(name):
    # The shared disk holds checkpoints that runs resume from: writable by the containers' group only.
    raw = load_yaml(CLUSTER / name)
    setup = " ".join(raw["initialization_commands"])
    assert "chmod 777" not in setup and "a+w" not in setup and "o+w" not in setup
    assert "chgrp genie-shared /mnt/shared" in setup and "chmod 2770 /mnt/shared" in setup
    assert "groupadd -f -g 1100 genie-shared" in setup
    assert "--group-add=1100" in raw["docker"]["run_options"]


def test_launcher_clusters_limit_ssh_to_one_configurable_range():
    import ipaddress

    aws = load_yaml(CLUSTER / "aws.yaml")
    rules = aws["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in rules] == [(22, 22, "tcp")], rules
    ranges = [ipaddress.ip_network(r["CidrIp"]) for r in rules[0]["IpRanges"]]
    assert ranges and all(n.prefixlen > 0 for n in ranges), ranges  # not the whole internet
    launcher_config_as_ray_up_sees_it(aws)  # the group is part of Ray's schema, not an ignored key

    gcp_text = (CLUSTER / "gcp.yaml").read_text()
    gcp = load_yaml(CLUSTER / "gcp.yaml")
    for name, node_type in gcp["available_node_types"].items():  # every node on the dedicated VPC
        assert [i["network"] for i in node_type["node_config"]["networkInterfaces"]] == [
            "global/networks/genie-sima"], name
    ssh_rule = next(line for line in gcp_text.splitlines() if "firewall-rules create genie-sima-ssh" in line)
    assert "--network=genie-sima" in ssh_rule and "--allow=tcp:22" in ssh_rule, ssh_rule
    cidr = ipaddress.ip_network(ssh_rule.split("--source-ranges=")[1].split()[0])
    assert cidr.prefixlen > 0, ssh_rule


def test_kuberay_head_accepts_only_its_own_cluster_and_the_namespaces_job_api():
    cluster = load_yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    policy = load_yaml(CLUSTER / "kuberay" / "networkpolicy.yaml")
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    spec = policy["spec"]
    name = cluster["metadata"]["name"]
    assert spec["podSelector"]["matchLabels"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    assert spec["policyTypes"] == ["Ingress"]
    own, job_api = spec["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": name}}}]}
    assert job_api["from"] == [{"podSelector": {}}] and job_api["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert "ipBlock" not in str(spec) and "namespaceSelector" not in str(spec)  # nothing from outside the namespace
