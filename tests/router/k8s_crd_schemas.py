"""JSON schemas of the two custom resources the manifests use, written from their documented APIs.

They cover the fields deploy/k8s sets and reject unknown ones (strict), like the CRDs' structural schemas:
LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) and KEDA's ScaledObject (keda.sh/v1alpha1). The pod templates
inside a LeaderWorkerSet are checked against Kubernetes' own PodTemplateSpec schema by the test.
"""

from __future__ import annotations

_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
_TEMPLATE = {"type": "object"}  # a PodTemplateSpec: validated separately against the core schema

LEADER_WORKER_SET = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"}, "kind": {"const": "LeaderWorkerSet"},
        "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["leaderWorkerTemplate"],
                 "properties": {
                     "replicas": {"type": "integer", "minimum": 0},
                     "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                     "rolloutStrategy": {"type": "object"},
                     "networkConfig": {"type": "object"},
                     "leaderWorkerTemplate": {
                         "type": "object", "additionalProperties": False, "required": ["workerTemplate"],
                         "properties": {
                             "size": {"type": "integer", "minimum": 1},
                             "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None", "Default"]},
                             "leaderTemplate": _TEMPLATE, "workerTemplate": _TEMPLATE,
                             "subGroupPolicy": {"type": "object"}}}}},
    },
}

SCALED_OBJECT = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
                 "properties": {
                     "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                        "properties": {"apiVersion": {"type": "string"},
                                                       "kind": {"type": "string"}, "name": {"type": "string"},
                                                       "envSourceContainerName": {"type": "string"}}},
                     "minReplicaCount": {"type": "integer", "minimum": 0},
                     "maxReplicaCount": {"type": "integer", "minimum": 1},
                     "idleReplicaCount": {"type": "integer", "minimum": 0},
                     "pollingInterval": {"type": "integer", "minimum": 1},
                     "cooldownPeriod": {"type": "integer", "minimum": 0},
                     "advanced": {"type": "object"}, "fallback": {"type": "object"},
                     "triggers": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                         "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                        "useCachedMetrics": {"type": "boolean"},
                                        "authenticationRef": {"type": "object"},
                                        "metadata": {"type": "object",
                                                     "additionalProperties": {"type": "string"}}}}}}},
    },
}

CRD_SCHEMAS = {"LeaderWorkerSet": LEADER_WORKER_SET, "ScaledObject": SCALED_OBJECT}
