"""deploy/k8s: every manifest parses, and what must agree with the CLI does (flags, ports, probes, ranks)."""

from __future__ import annotations

import math
import pathlib
import shlex
from urllib.parse import urlparse

import pytest
import yaml

from meshserve.cli import build_parser
from meshserve.router.config import RouterConfig
from meshserve.router.metrics import RouterMetrics
from meshserve.router.pool import ReplicaPool

K8S = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# What LWS injects, to see the flags a worker of group index 1 really gets.
LWS_ENV = {"LWS_LEADER_ADDRESS": "meshserve-lws-0.meshserve-lws.default", "LWS_WORKER_INDEX": "1"}


def load_all() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            if doc.get("kind") == "Kustomization":
                docs[("Kustomization", path.name)] = doc
                continue
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path.name
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in docs, f"{key} defined twice"
            docs[key] = doc
    return docs


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    return load_all()


def argv_of(container: dict, env: dict[str, str] | None = None) -> list[str]:
    """The container's meshserve argv (after the program name), with env references filled in."""
    cmd = list(container.get("command", [])) + list(container.get("args", []))
    if cmd[:2] == ["/bin/sh", "-c"]:
        script = cmd[2]
        for k, v in (env or {}).items():
            script = script.replace("${" + k + "}", v)
        assert "${" not in script, f"unfilled variable in {script!r}"
        cmd = shlex.split(script)
        assert cmd[0] == "exec"
        cmd = cmd[1:]
    assert cmd[0] == "meshserve"
    return [str(a) for a in cmd[1:]]


def parse(container: dict, env: dict[str, str] | None = None):
    return build_parser().parse_args(argv_of(container, env))  # unknown flags fail here


def port_of(container: dict, name: str = "http") -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def probe_port(container: dict, probe: str) -> int:
    port = container[probe]["httpGet"]["port"]
    return port_of(container, port) if isinstance(port, str) else port


def check_engine_probes(container: dict, ns) -> None:
    assert port_of(container) == ns.port
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe"):
        assert probe_port(container, probe) == ns.port


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def test_every_manifest_parses_and_kustomization_lists_existing_files(docs):
    kinds = {k for k, _ in docs}
    assert {"Deployment", "Service", "LeaderWorkerSet", "ScaledObject", "HorizontalPodAutoscaler"} <= kinds
    kustomization = docs[("Kustomization", "kustomization.yaml")]
    for res in kustomization["resources"]:
        assert (K8S / res).is_file()


def test_single_node_tensor_parallel_deployment(docs):
    dep = docs[("Deployment", "meshserve-engine")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ns = parse(c)
    assert ns.command == "serve" and ns.host == "0.0.0.0"
    check_engine_probes(c, ns)
    assert gpus(c) == ns.tensor_parallel_size * ns.pipeline_parallel_size > 1
    assert pod["terminationGracePeriodSeconds"] > ns.drain_timeout  # SIGTERM drain fits in the grace period
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    svc = docs[("Service", "meshserve-engine")]
    assert svc["spec"]["clusterIP"] == "None"  # headless: one address per ready pod, for --discover
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["port"] == ns.port


def test_multinode_leader_worker_set_ranks_and_rendezvous(docs):
    lws = docs[("LeaderWorkerSet", "meshserve-lws")]["spec"]["leaderWorkerTemplate"]
    (leader,) = lws["leaderTemplate"]["spec"]["containers"]
    (worker,) = lws["workerTemplate"]["spec"]["containers"]
    lead, work = parse(leader, LWS_ENV), parse(worker, LWS_ENV)
    assert lead.nnodes == work.nnodes == lws["size"]
    assert lead.node_rank == 0  # the leader is rank 0 and serves HTTP
    assert "--node-rank ${LWS_WORKER_INDEX}" in worker["args"][0] and work.node_rank == 1
    assert "--master-addr ${LWS_LEADER_ADDRESS}" in worker["args"][0]
    assert lead.master_addr == work.master_addr == LWS_ENV["LWS_LEADER_ADDRESS"]
    assert lead.master_port == work.master_port == port_of(leader, "rendezvous")
    for name in ("model", "model_tag", "tensor_parallel_size", "pipeline_parallel_size", "max_model_len",
                 "served_model_name", "port"):
        assert getattr(lead, name) == getattr(work, name), name  # one engine: the same flags on every node
    world = lead.tensor_parallel_size * lead.pipeline_parallel_size
    assert gpus(leader) == gpus(worker) == world // lead.nnodes  # TP inside a node, PP across nodes
    check_engine_probes(leader, lead)
    assert "readinessProbe" not in worker  # workers serve no HTTP
    svc = docs[("Service", "meshserve-lws-leaders")]
    assert svc["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert svc["spec"]["ports"][0]["targetPort"] == lead.port


def test_router_deployment_and_service_agree_with_the_engines(docs):
    dep = docs[("Deployment", "meshserve-router")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ns = parse(c)
    assert ns.command == "router"
    from meshserve.router.cli import router_config_from

    config = router_config_from(ns)  # validates too
    assert port_of(c) == ns.port
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ns.port)
    engine_ns = parse(docs[("Deployment", "meshserve-engine")]["spec"]["template"]["spec"]["containers"][0])
    (target,) = config.discover
    host, port = target.rsplit(":", 1)
    assert ("Service", host) in docs and int(port) == engine_ns.port
    fallback_dep = docs[("Deployment", "meshserve-fallback")]
    fallback_ns = parse(fallback_dep["spec"]["template"]["spec"]["containers"][0])
    (fb,) = config.fallbacks
    url = urlparse(fb)
    assert ("Service", url.hostname) in docs and url.port == fallback_ns.port
    # the fallback answers to the primary's model name, so requests need no rewrite
    assert engine_ns.served_model_name[0] in fallback_ns.served_model_name and config.fallback_model is None
    svc = docs[("Service", "meshserve")]
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", ns.port)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > ns.drain_timeout


def test_autoscaling_rules_use_the_routers_queue_depth_and_target(docs):
    router_ns = parse(docs[("Deployment", "meshserve-router")]["spec"]["template"]["spec"]["containers"][0])
    target = router_ns.target_queue_per_replica
    exported = RouterMetrics(ReplicaPool(RouterConfig(backends=["http://a:1"]))).render().decode()
    assert "meshserve:router_queue_depth " in exported
    so = docs[("ScaledObject", "meshserve-engine")]["spec"]
    assert so["scaleTargetRef"]["name"] == "meshserve-engine" and ("Deployment", "meshserve-engine") in docs
    (trigger,) = so["triggers"]
    assert "meshserve:router_queue_depth" in trigger["metadata"]["query"]
    assert int(trigger["metadata"]["threshold"]) == target
    hpa = docs[("HorizontalPodAutoscaler", "meshserve-engine")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "meshserve-engine"
    (metric,) = hpa["metrics"]
    assert int(metric["external"]["target"]["averageValue"]) == target
    # KEDA's ceil(queue / threshold) is the router's own desired-replica gauge
    pool = ReplicaPool(RouterConfig(backends=["http://a:1", "http://b:1"], target_queue_per_replica=target))
    pool.primaries[0].outstanding, pool.primaries[1].outstanding = 20, 21
    assert pool.desired_replicas() == math.ceil(41 / target)


def test_manifests_pass_strict_schemas_offline(docs):
    """Core objects against Kubernetes' own schemas (kubernetes-validate, strict: no unknown fields); the
    custom resources against schemas of their documented APIs, their pod templates against the core one."""
    import jsonschema
    import kubernetes_validate

    from tests.router.k8s_crd_schemas import CRD_SCHEMAS

    checked = set()
    for (kind, name), doc in docs.items():
        if kind == "Kustomization":
            continue
        if kind in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[kind])
            if kind == "LeaderWorkerSet":
                tpl = doc["spec"]["leaderWorkerTemplate"]
                for key in ("leaderTemplate", "workerTemplate"):
                    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-{key}"},
                           "template": tpl[key]}
                    kubernetes_validate.validate(pod, "1.30", strict=True)
        else:
            kubernetes_validate.validate(doc, "1.30", strict=True)
        checked.add(kind)
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "LeaderWorkerSet", "ScaledObject"} <= checked


def test_every_engine_has_a_startup_probe_and_what_it_mounts_is_defined(docs):
    for (kind, name), doc in docs.items():
        if kind not in ("Deployment", "LeaderWorkerSet"):
            continue
        if kind == "Deployment":
            specs = [doc["spec"]["template"]["spec"]]
        else:
            tpl = doc["spec"]["leaderWorkerTemplate"]
            specs = [tpl["leaderTemplate"]["spec"], tpl["workerTemplate"]["spec"]]
        for spec in specs:
            for c in spec["containers"]:
                loads_a_model = argv_of(c, LWS_ENV)[:1] == ["serve"]
                if loads_a_model and "livenessProbe" in c:
                    assert "startupProbe" in c, (name, "a slow model load must not trip the liveness probe")
            for vol in spec.get("volumes", []):
                claim = vol.get("persistentVolumeClaim", {}).get("claimName")
                assert claim is None or ("PersistentVolumeClaim", claim) in docs, claim
            for c in spec["containers"]:
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    assert ref is None or ("Secret", ref["name"]) in docs, ref
