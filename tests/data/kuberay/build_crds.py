"""Rebuild ray.io_rayclusters.yaml and ray.io_rayjobs.yaml in this folder (see README.md for why).

The upstream CRD files could not be fetched here, so this script writes equivalent ones the way
controller-gen builds them: the ray.io fields are transcribed by hand from KubeRay's Go API types
(RAY_TYPES below), and every embedded Kubernetes type (PodTemplateSpec, Service, EnvVar, ...) is
inlined from Kubernetes' own JSON schemas, then rewritten into the CRD (OpenAPI v3 structural) dialect.

    pip download --no-deps kubernetes-validate==1.37.0 && unzip kubernetes_validate-1.37.0-*.whl \
        'kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict/_definitions.json'
    python tests/data/kuberay/build_crds.py \
        kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict/_definitions.json

Not imported by the tests; they only read the YAML it writes.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# The quantity grammar Kubernetes CRDs carry for resource.Quantity fields.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
    r"|(\.[0-9]+))))?$"
)
K8S = "io.k8s.api.core.v1."
META = "io.k8s.apimachinery.pkg.apis.meta.v1."

# Keywords that carry validation meaning and survive into the CRD dialect; everything else from the
# Kubernetes JSON schemas (descriptions, patch strategies, GVK tags, additionalProperties: false) is
# dropped, as controller-gen does with `crd:maxDescLen=0` (KubeRay's setting).
KEEP = {"type", "format", "enum", "required", "items", "properties", "additionalProperties", "default",
        "minimum", "maximum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
        "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type"}


class K8sTypes:
    """Kubernetes definitions (JSON Schema 2020-12, `<name>` -> schema) rewritten as CRD schemas."""

    def __init__(self, definitions: dict):
        self.defs = definitions

    def embedded_meta(self) -> dict:
        # controller-gen with generateEmbeddedObjectMeta=true keeps only these ObjectMeta fields in
        # embedded templates (pod templates, the head Service).
        return {"type": "object", "properties": {
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            "finalizers": {"type": "array", "items": {"type": "string"}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "name": {"type": "string"},
            "namespace": {"type": "string"},
        }}

    def ref(self, name: str) -> dict:
        special = {
            "io.k8s.apimachinery.pkg.api.resource.Quantity": {
                "anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": QUANTITY_PATTERN,
                "x-kubernetes-int-or-string": True},
            "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {
                "anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            META + "Time": {"type": "string", "format": "date-time"},
            META + "MicroTime": {"type": "string", "format": "date-time"},
            META + "ObjectMeta": self.embedded_meta(),
        }
        if name in special:
            return copy.deepcopy(special[name])
        return self.convert(self.defs[name])

    def convert(self, s: dict) -> dict:
        if "$ref" in s:
            return self.ref(s["$ref"].split("/")[-1])
        if "oneOf" in s or "anyOf" in s or "allOf" in s:
            raise ValueError(f"unexpected combinator in a Kubernetes type: {sorted(s)}")
        out = {}
        for key, value in s.items():
            if key not in KEEP:
                continue
            if key == "type":
                # ["string", "null"] -> "string": CRD schemas are not nullable unless they say so.
                types = [t for t in (value if isinstance(value, list) else [value]) if t != "null"]
                if len(types) != 1:
                    raise ValueError(f"cannot express type {value!r}")
                out["type"] = types[0]
            elif key == "properties":
                out["properties"] = {k: self.convert(v) for k, v in sorted(value.items())}
            elif key in ("items", "additionalProperties"):
                if isinstance(value, dict):
                    out[key] = self.convert(value)
            else:
                out[key] = copy.deepcopy(value)
        if "properties" in out:
            out.setdefault("type", "object")
        return out


def i32(**extra) -> dict:
    return {"type": "integer", "format": "int32", **extra}


def string_map() -> dict:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    out = {"type": "object", "properties": dict(sorted(properties.items()))}
    if required:
        out["required"] = sorted(required)
    out.update(extra)
    return out


def ray_types(k8s: K8sTypes) -> dict[str, dict]:
    """ray.io/v1 RayCluster and RayJob, transcribed from KubeRay's Go types (commits in README.md).

    Go -> schema as controller-gen maps it: *int32/int32 -> integer/int32, float32 -> number,
    map[string]string -> object of strings, a field without `omitempty` and without `+optional` ->
    required, `+kubebuilder:default` -> default, `+kubebuilder:validation:Enum` -> enum,
    `+kubebuilder:validation:XValidation` -> x-kubernetes-validations (CEL: not checked by jsonschema).
    """
    pod_template = obj({"metadata": k8s.embedded_meta(), "spec": k8s.ref(K8S + "PodSpec")})
    service = obj({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                   "metadata": k8s.embedded_meta(), "spec": k8s.ref(K8S + "ServiceSpec"),
                   "status": k8s.ref(K8S + "ServiceStatus")})
    quantity = k8s.ref("io.k8s.apimachinery.pkg.api.resource.Quantity")
    time = {"type": "string", "format": "date-time"}
    managed_by = {"type": "string", "x-kubernetes-validations": [
        {"message": "the managedBy field is immutable", "rule": "self == oldSelf"},
        {"message": "the managedBy field value must be either 'ray.io/kuberay-operator' or "
                    "'kueue.x-k8s.io/multikueue'",
         "rule": "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']"}]}

    redis_credential = obj({"value": {"type": "string"}, "valueFrom": k8s.ref(K8S + "EnvVarSource")})
    autoscaler_options = obj({
        "env": {"type": "array", "items": k8s.ref(K8S + "EnvVar")},
        "envFrom": {"type": "array", "items": k8s.ref(K8S + "EnvFromSource")},
        "idleTimeoutSeconds": i32(),
        "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"},
        "resources": k8s.ref(K8S + "ResourceRequirements"),
        "securityContext": k8s.ref(K8S + "SecurityContext"),
        "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
        "volumeMounts": {"type": "array", "items": k8s.ref(K8S + "VolumeMount")},
    })
    head_group = obj({
        "enableIngress": {"type": "boolean"},
        "headService": service,
        "rayStartParams": string_map(),
        "serviceType": {"type": "string"},
        "template": pod_template,
    }, required=["rayStartParams", "template"])
    worker_group = obj({
        "groupName": {"type": "string"},
        "idleTimeoutSeconds": i32(),
        "maxReplicas": i32(default=2147483647),
        "minReplicas": i32(default=0),
        "numOfHosts": i32(default=1),
        "rayStartParams": string_map(),
        "replicas": i32(default=0),
        "scaleStrategy": obj({"workersToDelete": {"type": "array", "items": {"type": "string"}}}),
        "suspend": {"type": "boolean"},
        "template": pod_template,
    }, required=["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"])
    cluster_spec = obj({
        "autoscalerOptions": autoscaler_options,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": obj({
            "externalStorageNamespace": {"type": "string"},
            "redisAddress": {"type": "string"},
            "redisPassword": redis_credential,
            "redisUsername": redis_credential,
        }, required=["redisAddress"]),
        "headGroupSpec": head_group,
        "headServiceAnnotations": string_map(),
        "managedBy": managed_by,
        "rayVersion": {"type": "string"},
        "suspend": {"type": "boolean"},
        "workerGroupSpecs": {"type": "array", "items": worker_group},
    }, required=["headGroupSpec"])
    cluster_status = obj({
        "availableWorkerReplicas": i32(),
        "conditions": {"type": "array", "items": k8s.ref(META + "Condition"),
                       "x-kubernetes-list-map-keys": ["type"], "x-kubernetes-list-type": "map"},
        "desiredCPU": quantity, "desiredGPU": quantity, "desiredMemory": quantity, "desiredTPU": quantity,
        "desiredWorkerReplicas": i32(),
        "endpoints": string_map(),
        "head": obj({"podIP": {"type": "string"}, "podName": {"type": "string"},
                     "serviceIP": {"type": "string"}, "serviceName": {"type": "string"}}),
        "lastUpdateTime": {**time, "nullable": True},
        "maxWorkerReplicas": i32(),
        "minWorkerReplicas": i32(),
        "observedGeneration": {"type": "integer", "format": "int64"},
        "readyWorkerReplicas": i32(),
        "reason": {"type": "string"},
        "state": {"type": "string"},
        "stateTransitionTimes": {"type": "object", "additionalProperties": time},
    })
    top = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
    raycluster = obj({**top, "spec": cluster_spec, "status": cluster_status})

    job_spec = obj({
        "activeDeadlineSeconds": i32(),
        "backoffLimit": i32(default=0),
        "clusterSelector": string_map(),
        "deletionPolicy": {"type": "string", "x-kubernetes-validations": [
            {"message": "the deletionPolicy field value must be either 'DeleteCluster', 'DeleteWorkers', "
                        "'DeleteSelf', or 'DeleteNone'",
             "rule": "self in ['DeleteCluster', 'DeleteWorkers', 'DeleteSelf', 'DeleteNone']"}]},
        "entrypoint": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "jobId": {"type": "string"},
        "managedBy": managed_by,
        "metadata": string_map(),
        "rayClusterSpec": cluster_spec,
        "runtimeEnvYAML": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "submissionMode": {"type": "string", "default": "K8sJobMode"},
        "submitterConfig": obj({"backoffLimit": i32()}),
        "submitterPodTemplate": pod_template,
        "suspend": {"type": "boolean"},
        "ttlSecondsAfterFinished": i32(default=0),
    })
    job_status = obj({
        "dashboardURL": {"type": "string"},
        "endTime": time,
        "failed": i32(default=0),
        "jobDeploymentStatus": {"type": "string"},
        "jobId": {"type": "string"},
        "jobStatus": {"type": "string"},
        "message": {"type": "string"},
        "observedGeneration": {"type": "integer", "format": "int64"},
        "rayClusterName": {"type": "string"},
        "rayClusterStatus": cluster_status,
        "reason": {"type": "string"},
        "startTime": time,
        "succeeded": i32(default=0),
    })
    rayjob = obj({**top, "spec": job_spec, "status": job_status})
    return {"RayCluster": raycluster, "RayJob": rayjob}


PRINTER_COLUMNS = {
    "RayCluster": [
        {"jsonPath": ".status.desiredWorkerReplicas", "name": "desired workers", "type": "integer"},
        {"jsonPath": ".status.availableWorkerReplicas", "name": "available workers", "type": "integer"},
        {"jsonPath": ".status.desiredCPU", "name": "cpus", "type": "string"},
        {"jsonPath": ".status.desiredMemory", "name": "memory", "type": "string"},
        {"jsonPath": ".status.desiredGPU", "name": "gpus", "type": "string"},
        {"jsonPath": ".status.desiredTPU", "name": "tpus", "priority": 1, "type": "string"},
        {"jsonPath": ".status.state", "name": "status", "type": "string"},
        {"jsonPath": ".metadata.creationTimestamp", "name": "age", "type": "date"},
        {"jsonPath": ".status.head.podIP", "name": "head pod IP", "priority": 1, "type": "string"},
        {"jsonPath": ".status.head.serviceIP", "name": "head service IP", "priority": 1, "type": "string"},
    ],
    "RayJob": [
        {"jsonPath": ".status.jobStatus", "name": "job status", "type": "string"},
        {"jsonPath": ".status.jobDeploymentStatus", "name": "deployment status", "type": "string"},
        {"jsonPath": ".status.rayClusterName", "name": "ray cluster name", "type": "string"},
        {"jsonPath": ".status.startTime", "name": "start time", "type": "string"},
        {"jsonPath": ".status.endTime", "name": "end time", "type": "string"},
        {"jsonPath": ".metadata.creationTimestamp", "name": "age", "type": "date"},
    ],
}

HEADER = """\
# RECONSTRUCTED KubeRay CRD (ray.io/v1 {kind}), not the upstream file: see README.md in this folder.
# Written by build_crds.py from KubeRay's Go API types + Kubernetes {k8s} JSON schemas.
"""


def crd(kind: str, schema: dict) -> dict:
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.ray.io"},
        "spec": {
            "group": "ray.io",
            "names": {"categories": ["all"], "kind": kind, "listKind": kind + "List",
                      "plural": plural, "singular": kind.lower()},
            "scope": "Namespaced",
            "versions": [{
                "additionalPrinterColumns": PRINTER_COLUMNS[kind],
                "name": "v1",
                "schema": {"openAPIV3Schema": schema},
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
            }],
        },
    }


def main(definitions_path: str) -> None:
    doc = json.loads(Path(definitions_path).read_text())
    k8s = K8sTypes(doc["$defs"])
    k8s_version = Path(definitions_path).parent.name
    for kind, schema in ray_types(k8s).items():
        out = HERE / f"ray.io_{kind.lower()}s.yaml"
        # The JSON round trip breaks shared sub-objects apart, so the YAML has no anchors or aliases.
        plain = json.loads(json.dumps(crd(kind, schema)))
        text = HEADER.format(kind=kind, k8s=k8s_version) + yaml.safe_dump(plain, sort_keys=False, width=120)
        out.write_text(text)
        print(f"wrote {out} ({len(text) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(sys.argv[1])
