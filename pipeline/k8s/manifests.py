"""Kubernetes manifests for forgeline's own workloads, as plain dicts (camelCase, as ``kubectl
apply`` and the API take them): the multi-node training run as an Indexed Job + headless Service
(:func:`torchrun_job`) or a Kubeflow ``PyTorchJob`` (:func:`pytorchjob`), the /dev/shm pre-warm
DaemonSet (:func:`prewarm_daemonset`), and the model-store access every pod needs.

Pod requirements come in the shape of :func:`pipeline.gpus.k8s_requirements` (``container_config`` /
``pod_spec_config`` with snake_case keys, as dagster-k8s takes them), so the Dagster step pods and
these pods get GPUs, ``/dev/shm``, node placement and model-store access from the same settings.
The design (why an Indexed Job, why a hostPath tier) is in docs/scaling.md and deploy/README.md.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from typing import Any

from pipeline import settings
from pipeline.settings import DEFAULT_SHM_ROOT, gib, parse_size

UID = 10001  # the image's non-root user (deploy/Dockerfile)
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_LABEL = "forgeline.dev/train-job"


# ---------------------------------------------------------------------------------------------
# Names, merging, key case
# ---------------------------------------------------------------------------------------------


def job_name(prefix: str, ident: str) -> str:
    """A DNS-1123 name ≤ 40 characters, so ``<name>-<index>`` hostnames and pod names stay < 63."""
    tail = re.sub(r"[^a-z0-9]", "", ident.lower())[:12]
    name = f"{prefix}-{tail}".strip("-")[:40].rstrip("-")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise ValueError(f"cannot make a Kubernetes name from {prefix!r} and {ident!r}")
    return name


def merge(*configs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Deep-merge dagster-k8s style configs left to right, as dagster-k8s's DEEP merge does: dicts
    merge key by key, lists are concatenated without repeating equal items, scalars are replaced."""
    out: dict[str, Any] = {}
    for cfg in configs:
        for k, v in (cfg or {}).items():
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
                out[k] = merge(out[k], v)
            elif isinstance(v, list) and isinstance(out.get(k), list):
                out[k] = out[k] + [x for x in v if x not in out[k]]
            else:
                out[k] = json.loads(json.dumps(v))  # a copy: callers may mutate the result
    return out


# Keys whose values are maps of user-chosen keys (label names, resource names): never re-cased.
_OPAQUE = {"node_selector", "nodeSelector", "limits", "requests", "labels", "annotations", "match_labels",
           "matchLabels", "selector", "data", "string_data", "stringData"}


def camel(obj: Any) -> Any:
    """snake_case keys (the Kubernetes Python client's, dagster-k8s's) → camelCase (manifests)."""
    if isinstance(obj, list):
        return [camel(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        key = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), k)
        out[key] = dict(v) if k in _OPAQUE and isinstance(v, dict) else camel(v)
    return out


# ---------------------------------------------------------------------------------------------
# Model-store access (S3 credentials from a Secret, or a shared NFS/Ceph volume)
# ---------------------------------------------------------------------------------------------


def model_store_access(*, s3_secret: str | None = None, pvc: str | None = None,
                       mount_path: str | None = None) -> dict[str, Any]:
    """What every pod that reads or writes the model store needs, dagster-k8s shaped: the S3 Secret
    (``FORGELINE_S3_*``, ``AWS_*`` keys) as ``env_from``, and/or a ReadWriteMany PVC mounted at
    ``mount_path`` (which must equal ``FORGELINE_STORAGE_ROOT``)."""
    container: dict[str, Any] = {}
    pod: dict[str, Any] = {}
    if s3_secret:
        container["env_from"] = [{"secret_ref": {"name": s3_secret}}]
    if pvc:
        if not mount_path:
            raise ValueError("a model-store PVC needs a mount path (FORGELINE_STORAGE_ROOT)")
        container["volume_mounts"] = [{"name": "model-store", "mount_path": mount_path}]
        pod["volumes"] = [{"name": "model-store", "persistent_volume_claim": {"claim_name": pvc}}]
    return {"container_config": container, "pod_spec_config": pod}


def model_store_access_from_env(env: settings.Env = None) -> dict[str, Any]:
    """:func:`model_store_access` from ``FORGELINE_K8S_S3_SECRET``, ``FORGELINE_K8S_MODEL_STORE_PVC``
    (mounted at ``FORGELINE_STORAGE_ROOT``)."""
    root = settings.storage_root(env)
    return model_store_access(s3_secret=settings.k8s_s3_secret(env), pvc=settings.k8s_model_store_pvc(env),
                              mount_path=str(root) if root else None)


# ---------------------------------------------------------------------------------------------
# Pod pieces
# ---------------------------------------------------------------------------------------------


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _apply(container: dict, pod: dict, requirements: Mapping[str, Any]) -> None:
    """Put dagster-k8s shaped ``requirements`` (snake_case) into a camelCase container and pod spec."""
    c, p = camel(dict(requirements.get("container_config") or {})), camel(dict(requirements.get("pod_spec_config") or {}))
    for target, extra in ((container, c), (pod, p)):
        for k, v in extra.items():
            if isinstance(v, list):
                target[k] = target.get(k, []) + [x for x in v if x not in target.get(k, [])]
            elif isinstance(v, dict) and isinstance(target.get(k), dict):
                target[k] = merge(target[k], v)
            else:
                target[k] = v


def _meta(name: str, namespace: str | None, labels: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _node_args(*, storage_spec: Mapping[str, Any], job_key: str, nnodes: int, rdzv_id: str,
               run_timeout_s: float, nproc_per_node: int | None) -> list[str]:
    args = ["--storage", json.dumps(dict(storage_spec), sort_keys=True, separators=(",", ":")),
            "--job-key", job_key, "--nnodes", str(nnodes), "--rdzv-id", rdzv_id,
            "--run-timeout-s", f"{run_timeout_s:g}"]
    if nproc_per_node is not None:
        args += ["--nproc-per-node", str(nproc_per_node)]
    return args


# ---------------------------------------------------------------------------------------------
# Multi-node training: Indexed Job + headless Service
# ---------------------------------------------------------------------------------------------


def torchrun_job(
    *,
    name: str,
    image: str,
    nnodes: int,
    job_key: str,
    storage_spec: Mapping[str, Any],
    requirements: Mapping[str, Any],
    run_timeout_s: float,
    rdzv_port: int = 29500,
    nproc_per_node: int | None = None,
    env: Mapping[str, str] | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    labels: Mapping[str, str] | None = None,
    ttl_seconds_after_finished: int = 3600,
) -> list[dict[str, Any]]:
    """``[Service, Job]`` for one multi-node run of the job that ``train.prepare_node_job`` wrote at
    ``job_key``. ``requirements`` is dagster-k8s shaped (GPU limits, /dev/shm, node selector,
    tolerations, model-store access: see :func:`merge`). ``nproc_per_node=None`` lets each node use
    all its visible GPUs (one CPU rank without). Storage credentials reach the pods only through
    ``requirements`` (Secret ``env_from``), never in the spec."""
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {nnodes}")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 50:
        raise ValueError(f"{name!r} is not a usable Job name (DNS-1123 label, at most 50 characters)")
    labels = {"app.kubernetes.io/name": "forgeline", "app.kubernetes.io/component": "train-node",
              **(labels or {}), JOB_LABEL: name}
    endpoint = f"{name}-0.{name}:{rdzv_port}"  # <hostname>.<subdomain>: node 0's pod, via the Service
    container: dict[str, Any] = {
        "name": "node",
        "image": image,
        "command": ["python", "-m", "pipeline.train", "node"],
        # $(FORGELINE_NODE_RANK) is expanded by the kubelet from the env entry below.
        "args": ["--node-rank", "$(FORGELINE_NODE_RANK)", "--rdzv-endpoint", endpoint,
                 *_node_args(storage_spec=storage_spec, job_key=job_key, nnodes=nnodes, rdzv_id=name,
                             run_timeout_s=run_timeout_s, nproc_per_node=nproc_per_node)],
        "env": [{"name": "FORGELINE_NODE_RANK",
                 "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
                *({"name": k, "value": str(v)} for k, v in (env or {}).items())],
        "ports": [{"name": "rdzv", "containerPort": rdzv_port, "protocol": "TCP"}],
        "securityContext": _container_security(),
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": name,  # must equal the headless Service's name for <job>-0.<svc> to resolve
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "containers": [container],
    }
    if service_account:
        pod["serviceAccountName"] = service_account
    _apply(container, pod, requirements)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: name},
            # Node 0 must resolve while the others start, before any readiness could be reported.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": rdzv_port, "targetPort": rdzv_port, "protocol": "TCP"}],
        },
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "completionMode": "Indexed",
            "completions": nnodes,
            "parallelism": nnodes,
            "backoffLimit": 0,
            "activeDeadlineSeconds": max(1, math.ceil(run_timeout_s)),
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    return [service, job]


def pytorchjob(
    *,
    name: str,
    image: str,
    nnodes: int,
    job_key: str,
    storage_spec: Mapping[str, Any],
    requirements: Mapping[str, Any],
    run_timeout_s: float,
    rdzv_port: int = 29500,
    nproc_per_node: int | None = None,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The same run as a Kubeflow ``PyTorchJob`` (``kubeflow.org/v1``): one Master and ``nnodes - 1``
    Workers. The operator creates the Services and sets ``MASTER_ADDR``/``MASTER_PORT`` (from the
    ``pytorchjob-port`` container port) and the replica rank (``RANK``; ``PET_NODE_RANK`` when
    the elastic variables are set), which a shell turns into the node CLI's arguments."""
    labels = {"app.kubernetes.io/name": "forgeline", "app.kubernetes.io/component": "train-node",
              **(labels or {}), JOB_LABEL: name}
    args = _node_args(storage_spec=storage_spec, job_key=job_key, nnodes=nnodes, rdzv_id=name,
                      run_timeout_s=run_timeout_s, nproc_per_node=nproc_per_node)
    script = ("exec python -m pipeline.train node --node-rank \"${PET_NODE_RANK:-$RANK}\" "
              "--rdzv-endpoint \"$MASTER_ADDR:$MASTER_PORT\" " + " ".join(shlex.quote(a) for a in args))

    def replica(count: int) -> dict[str, Any]:
        container = {"name": "pytorch", "image": image, "command": ["/bin/sh", "-c", script],
                     "ports": [{"name": "pytorchjob-port", "containerPort": rdzv_port, "protocol": "TCP"}],
                     "securityContext": _container_security()}
        pod = {"restartPolicy": "Never", "enableServiceLinks": False, "securityContext": _pod_security(),
               "containers": [container]}
        _apply(container, pod, requirements)
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}

    specs = {"Master": replica(1)}
    if nnodes > 1:
        specs["Worker"] = replica(nnodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "runPolicy": {"backoffLimit": 0, "activeDeadlineSeconds": max(1, math.ceil(run_timeout_s)),
                          "cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 3600},
            "pytorchReplicaSpecs": specs,
        },
    }


# ---------------------------------------------------------------------------------------------
# /dev/shm pre-warm DaemonSet
# ---------------------------------------------------------------------------------------------


def prewarm_daemonset(
    *,
    image: str,
    models: list[str],
    capacity_bytes: int,
    name: str = "forgeline-shm-prewarm",
    namespace: str | None = None,
    host_path: str = DEFAULT_SHM_ROOT,
    every_s: int = 60,
    pin: bool = False,
    node_selector: Mapping[str, str] | None = None,
    tolerations: list[Mapping[str, Any]] | None = None,
    access: Mapping[str, Any] | None = None,
    headroom: str = "1Gi",
) -> dict[str, Any]:
    """A DaemonSet that keeps the latest published version of each of ``models`` in the node's
    ``/dev/shm/forgeline`` tier, checking every ``every_s`` seconds.

    The tier is a **hostPath** on the node's own tmpfs (``/dev/shm``), not a memory emptyDir: an
    emptyDir lives and dies with this pod and no other pod can mount it, whereas the point is that
    serving pods on the node (which mount the same hostPath) find the weights in RAM, and that the
    tier survives this pod's restarts and rolling updates. The price: hostPath needs a namespace
    that allows it (Pod Security ``privileged``), and tmpfs pages are charged to the memory cgroup
    of the pod that wrote them, so this pod's memory request and limit cover ``capacity_bytes`` (the
    tier's budget, ``FORGELINE_SHM_CAPACITY_BYTES``) plus ``headroom``; the scheduler then accounts
    for the tier on every node. An init container (the only root part, with CAP_CHOWN alone) hands
    the directory to the image's user.
    """
    if not models:
        raise ValueError("prewarm_daemonset needs at least one model name")
    labels = {"app.kubernetes.io/name": "forgeline", "app.kubernetes.io/component": "shm-prewarm"}
    memory = gib(capacity_bytes + parse_size(headroom))
    args = ["prewarm", "--every", str(every_s), "--ready-file", "/tmp/prewarmed"]
    for m in models:
        args += ["--model", m]
    if pin:
        args.append("--pin")
    container: dict[str, Any] = {
        "name": "prewarm",
        "image": image,
        "command": ["python", "-m", "pipeline.k8s"],
        "args": args,
        "env": [{"name": "FORGELINE_SHM_ROOT", "value": DEFAULT_SHM_ROOT},
                {"name": "FORGELINE_SHM_CAPACITY_BYTES", "value": str(capacity_bytes)}],
        "resources": {"requests": {"cpu": "250m", "memory": memory}, "limits": {"memory": memory}},
        "volumeMounts": [{"name": "shm-tier", "mountPath": DEFAULT_SHM_ROOT},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "readinessProbe": {"exec": {"command": ["test", "-e", "/tmp/prewarmed"]}, "periodSeconds": 10},
        "securityContext": {**_container_security(), "readOnlyRootFilesystem": True},
    }
    init = {
        "name": "tier-owner",
        "image": image,
        "command": ["chown", f"{UID}:{UID}", DEFAULT_SHM_ROOT],
        "volumeMounts": [{"name": "shm-tier", "mountPath": DEFAULT_SHM_ROOT}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}},
    }
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # it never calls the Kubernetes API
        "terminationGracePeriodSeconds": 30,
        "initContainers": [init],
        "containers": [container],
        "volumes": [{"name": "shm-tier", "hostPath": {"path": host_path, "type": "DirectoryOrCreate"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [camel(dict(t)) for t in tolerations]
    _apply(container, pod, access or {})
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "selector": {"matchLabels": dict(labels)},
            # The tier is on the node, not in the pod: replacing pods loses nothing, so roll quickly.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%"}},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
        },
    }
