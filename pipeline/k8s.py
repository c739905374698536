"""Kubernetes manifests for forgeline's own workloads, and a runner for the multi-node training Job.

Everything here returns plain manifest dicts (camelCase, as ``kubectl apply`` and the API take them)
and never imports dagster; :func:`run_indexed_job` imports the ``kubernetes`` client when called.

* :func:`torchrun_job`: multi-node training as an **Indexed Job** (``completionMode: Indexed``,
  ``parallelism = completions = nnodes``) plus a **headless Service** whose name is the pods'
  ``subdomain``, so node 0 answers at ``<job>-0.<service>`` (Kubernetes names indexed pods'
  hostnames ``<job>-<index>``). Each pod runs ``python -m pipeline.train node`` with its node rank
  from the completion index; node 0 hosts the c10d rendezvous store. ``backoffLimit: 0``: a failed
  node fails the run (a restarted node cannot rejoin a static rendezvous), and
  ``activeDeadlineSeconds`` is the run timeout.
* :func:`pytorchjob`: the same run as a Kubeflow ``PyTorchJob`` (only where the training operator is
  installed; the operator supplies the master address and ranks).
* :func:`prewarm_daemonset`: keeps the latest published version(s) in ``/dev/shm/forgeline`` on every
  serving node (``python -m pipeline.k8s prewarm``).
* :func:`run_indexed_job`: creates the Service and the Job, waits, raises :class:`NodeJobFailed`
  naming the failed node (index, pod, reason, exit code, last log lines), and deletes both after.

``python -m pipeline.k8s prewarm --model M ...`` is the DaemonSet's loop; ``python -m pipeline.k8s
daemonset --image IMG --model M ...`` prints its manifest (deploy/k8s/shm-prewarm-daemonset.yaml).

Pod requirements come in the shape of :func:`pipeline.gpus.k8s_requirements` (``container_config`` /
``pod_spec_config`` with snake_case keys, as dagster-k8s takes them), so the Dagster step pods and
these pods get GPUs, ``/dev/shm``, node placement and model-store access from the same settings.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "NodeJobFailed",
    "camel",
    "current_image",
    "current_namespace",
    "json_env",
    "job_name",
    "merge",
    "model_store_access",
    "model_store_access_from_env",
    "parse_quantity",
    "prewarm_daemonset",
    "pytorchjob",
    "run_indexed_job",
    "storage_from_environ",
    "torchrun_job",
]

UID = 10001  # the image's non-root user (deploy/Dockerfile)
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_LABEL = "forgeline.dev/train-job"
DEFAULT_TIER_PATH = "/dev/shm/forgeline"


class NodeJobFailed(RuntimeError):
    """The multi-node training Job failed or timed out; the message names the node(s) and why."""


# ---------------------------------------------------------------------------------------------
# Small helpers: environment, quantities, names, merging, key case
# ---------------------------------------------------------------------------------------------


def json_env(name: str, kind: type, default: Any, env: Mapping[str, str] | None = None) -> Any:
    """The JSON value of environment variable ``name`` (``default`` when unset or empty), which must
    be a ``kind`` (dict or list); anything else raises ``ValueError`` naming the variable."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON ({e.msg} at character {e.pos}): {raw!r}") from None
    if not isinstance(value, kind):
        want = "a JSON object" if kind is dict else "a JSON list" if kind is list else kind.__name__
        raise ValueError(f"{name} must be {want}, got {type(value).__name__}: {raw!r}")
    return value


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$")
_FACTOR = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def parse_quantity(q: str | int) -> int:
    """A Kubernetes memory quantity in bytes: ``"16Gi"`` → 17179869184, ``"500M"``, ``1024``."""
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise ValueError(f"not a Kubernetes memory quantity: {q!r} (use e.g. 16Gi, 512Mi)")
    return int(float(m.group(1)) * _FACTOR[m.group(2)])


def gib(n_bytes: int) -> str:
    """Bytes as a whole-GiB quantity, rounded up."""
    return f"{max(1, math.ceil(n_bytes / 2**30))}Gi"


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


def current_namespace() -> str:
    """The namespace this pod runs in (service-account mount), else ``FORGELINE_K8S_NAMESPACE``,
    else ``default``."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if os.environ.get("FORGELINE_K8S_NAMESPACE"):
        return os.environ["FORGELINE_K8S_NAMESPACE"]
    try:
        return path.read_text().strip() or "default"
    except OSError:
        return "default"


def current_image() -> str:
    """The user-code image (``FORGELINE_IMAGE``, else the Dagster chart's ``DAGSTER_CURRENT_IMAGE``)."""
    image = os.environ.get("FORGELINE_IMAGE") or os.environ.get("DAGSTER_CURRENT_IMAGE")
    if not image:
        raise ValueError("no image for the training nodes: set TrainingConfig.node_image, or FORGELINE_IMAGE "
                         "in the code location's environment (deploy/helm/values.yaml)")
    return image


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


def model_store_access_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """:func:`model_store_access` from ``FORGELINE_K8S_S3_SECRET``, ``FORGELINE_K8S_MODEL_STORE_PVC``
    (mounted at ``FORGELINE_STORAGE_ROOT``)."""
    env = os.environ if env is None else env
    pvc = env.get("FORGELINE_K8S_MODEL_STORE_PVC") or None
    if pvc and not env.get("FORGELINE_STORAGE_ROOT"):
        raise ValueError(f"FORGELINE_K8S_MODEL_STORE_PVC={pvc!r} needs FORGELINE_STORAGE_ROOT: the path the "
                         "volume is mounted at, which is also the storage root every pod uses")
    return model_store_access(s3_secret=env.get("FORGELINE_K8S_S3_SECRET") or None, pvc=pvc,
                              mount_path=env.get("FORGELINE_STORAGE_ROOT") or None)


def storage_from_environ(env: Mapping[str, str] | None = None):
    """The engine storage the code location would use (same variables as
    ``resources.storage.storage_from_env``), for processes outside Dagster such as the DaemonSet."""
    from pipeline.storage import LocalStorage

    env = os.environ if env is None else env
    if env.get("FORGELINE_S3_BUCKET"):
        from pipeline.s3 import S3Storage

        return S3Storage(env["FORGELINE_S3_BUCKET"], env.get("FORGELINE_S3_PREFIX", ""),
                         endpoint_url=env.get("FORGELINE_S3_ENDPOINT_URL") or None,
                         region_name=env.get("AWS_REGION") or None)  # credentials: boto3's chain (AWS_* env)
    root = env.get("FORGELINE_STORAGE_ROOT")
    if not root:
        raise ValueError("no model store: set FORGELINE_S3_BUCKET (S3) or FORGELINE_STORAGE_ROOT (shared volume)")
    return LocalStorage(root)


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
    host_path: str = DEFAULT_TIER_PATH,
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
    memory = gib(capacity_bytes + parse_quantity(headroom))
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
        "env": [{"name": "FORGELINE_SHM_ROOT", "value": DEFAULT_TIER_PATH},
                {"name": "FORGELINE_SHM_CAPACITY_BYTES", "value": str(capacity_bytes)}],
        "resources": {"requests": {"cpu": "250m", "memory": memory}, "limits": {"memory": memory}},
        "volumeMounts": [{"name": "shm-tier", "mountPath": DEFAULT_TIER_PATH},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "readinessProbe": {"exec": {"command": ["test", "-e", "/tmp/prewarmed"]}, "periodSeconds": 10},
        "securityContext": {**_container_security(), "readOnlyRootFilesystem": True},
    }
    init = {
        "name": "tier-owner",
        "image": image,
        "command": ["chown", f"{UID}:{UID}", DEFAULT_TIER_PATH],
        "volumeMounts": [{"name": "shm-tier", "mountPath": DEFAULT_TIER_PATH}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}},
    }
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "enableServiceLinks": False,
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


def prewarm_loop(models: list[str], *, every_s: float, pin: bool = False, ready_file: str | None = None,
                 rounds: int | None = None, store=None, tier=None, log: Callable[[str], None] = print) -> None:
    """What the DaemonSet runs: pre-warm the latest version of each model, then check again every
    ``every_s`` seconds (``rounds`` bounds it for tests). A failed round is logged and retried; the
    tier's copies are atomic, so being killed mid-copy leaves nothing half-visible."""
    from pipeline.shm_tier import ShmTier

    store = store if store is not None else storage_from_environ()
    if tier is None:
        cap = os.environ.get("FORGELINE_SHM_CAPACITY_BYTES")
        tier = ShmTier(os.environ.get("FORGELINE_SHM_ROOT", DEFAULT_TIER_PATH), capacity_bytes=int(cap) if cap else None)
    done = 0
    while rounds is None or done < rounds:
        warm = True
        for model in models:
            try:
                version = tier.needs_prewarm(store, model)
                if version is not None:
                    r = tier.prewarm(store, model, version, pin=pin)
                    log(f"[forgeline] prewarmed {model}/{r.version}: {r.bytes} bytes in {r.seconds:.2f}s"
                        + (f", evicted {r.evicted}" if r.evicted else ""))
                elif tier.resolve(model) is None:
                    warm = False
                    log(f"[forgeline] {model}: no published version yet")
            except Exception as e:  # keep serving what is warm; the next round retries
                warm = False
                log(f"[forgeline] prewarm of {model} failed: {type(e).__name__}: {e}")
        if ready_file and warm:
            Path(ready_file).touch()
        done += 1
        if rounds is None or done < rounds:
            time.sleep(every_s)


# ---------------------------------------------------------------------------------------------
# Running the node Job
# ---------------------------------------------------------------------------------------------


def _load_client():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api(), client.BatchV1Api()


def _is_404(err: Exception) -> bool:
    return getattr(err, "status", None) == 404


def _pod_problem(pod) -> str | None:
    """Why a pod failed or is stuck, from its status (None when it looks fine)."""
    st = pod.status
    for cs in (st.container_statuses or []) if st else []:
        term = cs.state.terminated if cs.state else None
        if term is not None and term.exit_code:
            return f"{term.reason or 'Error'}, exit code {term.exit_code}" + (f": {term.message.strip()}" if term.message else "")
        wait = cs.state.waiting if cs.state else None
        if wait is not None and wait.reason not in (None, "ContainerCreating", "PodInitializing"):
            return f"{wait.reason}" + (f": {wait.message}" if wait.message else "")
    if st and st.phase == "Failed":
        return f"{st.reason or 'Failed'}" + (f": {st.message}" if st.message else "")
    for cond in (st.conditions or []) if st else []:
        if cond.type == "PodScheduled" and cond.status == "False":
            return f"not scheduled ({cond.reason}): {cond.message}"
    return None


def _describe(core, namespace: str, name: str, *, failed_only: bool, log_lines: int = 20) -> str:
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={name}").items
    except Exception as e:  # the error we are about to raise matters more than this detail
        return f"(pods could not be listed: {e})"
    parts = []
    for pod in sorted(pods, key=lambda p: int((p.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION, 0))):
        index = (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION, "?")
        problem = _pod_problem(pod)
        if problem is None and failed_only:
            continue
        part = f"node {index} (pod {pod.metadata.name}): {problem or (pod.status.phase if pod.status else 'unknown')}"
        if problem and failed_only:
            try:
                tail = core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=log_lines)
                if tail and tail.strip():
                    part += "\n    last log lines:\n    " + "\n    ".join(tail.strip().splitlines())
            except Exception:
                pass  # a pod that never started has no log
        parts.append(part)
    return "; ".join(parts) if parts else "no pod reported a failure"


def train_on_nodes(
    store: Any,
    *,
    dataset: dict,
    spec: dict,
    config: Any,
    checkpoint_prefix: str,
    run_id: str,
    nnodes: int,
    requirements: Mapping[str, Any],
    device_type: str,
    run_timeout_s: float,
    image: str | None = None,
    namespace: str | None = None,
    rdzv_port: int = 29500,
    on_line: Callable[[str], None] | None = None,
) -> Any:
    """One multi-node training run on the cluster: the node job spec goes to storage
    (:func:`pipeline.train.prepare_node_job`), ``nnodes`` torchrun pods run it as an Indexed Job
    (:func:`torchrun_job`, :func:`run_indexed_job`), and global rank 0's result comes back from
    storage as a :class:`pipeline.train.TrainResult`. The caller only orchestrates; the pods hold the GPUs."""
    from pipeline import train

    job_key = train.prepare_node_job(
        storage=store, dataset=dataset, spec=spec, config=config, checkpoint_prefix=checkpoint_prefix,
        device_type=device_type, job_key=f"jobs/train/{PurePosixPath(checkpoint_prefix).name}/{run_id}.json")
    manifests = torchrun_job(
        name=job_name("forgeline-train", run_id), image=image or current_image(), nnodes=nnodes, job_key=job_key,
        storage_spec=store.spec()[0], run_timeout_s=run_timeout_s, requirements=requirements,
        rdzv_port=rdzv_port, labels={"dagster/run-id": run_id})
    # Past the Job's own deadline (activeDeadlineSeconds = run_timeout_s), so its reason is reported.
    run_indexed_job(manifests, namespace or current_namespace(), timeout_s=run_timeout_s + 120, poll=5.0,
                    on_line=on_line)
    return train.read_node_result(store, job_key)


def run_indexed_job(
    manifests: list[Mapping[str, Any]],
    namespace: str,
    timeout_s: float,
    poll: float = 5.0,
    *,
    core_api=None,
    batch_api=None,
    on_line: Callable[[str], None] | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Create the Service(s) and the Indexed Job from :func:`torchrun_job`, wait until the Job
    completes, and delete them (``keep=True`` leaves them for debugging; ``ttlSecondsAfterFinished``
    still cleans up eventually). Raises :class:`NodeJobFailed` naming each failed node (completion
    index, pod, reason and exit code, its last log lines) when the Job fails, and the pods' states
    when ``timeout_s`` passes first. ``core_api``/``batch_api`` replace the in-cluster (or
    kubeconfig) clients. Returns ``{"job", "namespace", "seconds", "succeeded"}``."""
    say = on_line or (lambda line: None)
    jobs = [m for m in manifests if m.get("kind") == "Job"]
    services = [m for m in manifests if m.get("kind") == "Service"]
    if len(jobs) != 1 or len(services) + len(jobs) != len(manifests):
        raise ValueError("run_indexed_job takes one Job and its Service(s), as torchrun_job returns them")
    job = jobs[0]
    name, completions = job["metadata"]["name"], int(job["spec"].get("completions", 1))
    if core_api is None or batch_api is None:
        core, batch = _load_client()
        core_api, batch_api = core_api or core, batch_api or batch
    t0 = time.monotonic()
    created: list[tuple[str, str]] = []
    try:
        for svc in services:
            core_api.create_namespaced_service(namespace, dict(svc))
            created.append(("Service", svc["metadata"]["name"]))
        batch_api.create_namespaced_job(namespace, dict(job))
        created.append(("Job", name))
        say(f"[forgeline] started Job {namespace}/{name}: {completions} node(s)")
        last = None
        while True:
            status = batch_api.read_namespaced_job_status(name, namespace).status
            conditions = {c.type: c for c in (status.conditions or []) if c.status == "True"}
            succeeded = int(status.succeeded or 0)
            if "Complete" in conditions or succeeded >= completions:
                seconds = time.monotonic() - t0
                say(f"[forgeline] Job {name} complete: {succeeded}/{completions} node(s) in {seconds:.0f}s")
                return {"job": name, "namespace": namespace, "seconds": seconds, "succeeded": succeeded}
            failed = conditions.get("Failed")
            if failed is not None or int(status.failed or 0) > 0:
                why = f"{failed.reason}: {failed.message}" if failed is not None else f"{status.failed} pod(s) failed"
                raise NodeJobFailed(f"training Job {namespace}/{name} failed ({why}): "
                                    + _describe(core_api, namespace, name, failed_only=True))
            if time.monotonic() - t0 > timeout_s:
                raise NodeJobFailed(f"training Job {namespace}/{name} did not finish within {timeout_s:g}s "
                                    f"({succeeded}/{completions} node(s) done): "
                                    + _describe(core_api, namespace, name, failed_only=False))
            now = (int(status.active or 0), succeeded)
            if now != last:
                say(f"[forgeline] Job {name}: {now[0]} active, {now[1]}/{completions} done")
                last = now
            time.sleep(poll)
    finally:
        if not keep:
            for kind, obj in reversed(created):
                try:
                    if kind == "Job":  # Background: the pods go with the Job
                        batch_api.delete_namespaced_job(obj, namespace, propagation_policy="Background")
                    else:
                        core_api.delete_namespaced_service(obj, namespace)
                except Exception as e:
                    if not _is_404(e):
                        say(f"[forgeline] could not delete {kind} {namespace}/{obj}: {e}")


# ---------------------------------------------------------------------------------------------
# CLI: python -m pipeline.k8s prewarm ... (the DaemonSet's entry point)
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.k8s")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prewarm", help="keep the latest version of each model in the node's /dev/shm tier")
    p.add_argument("--model", action="append", required=True, help="model name (repeat for several)")
    p.add_argument("--every", type=float, default=60.0, help="seconds between checks for a new version")
    p.add_argument("--pin", action="store_true", help="protect pre-warmed versions from LRU eviction")
    p.add_argument("--ready-file", help="touched once every model has a version in the tier (readiness)")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    d = sub.add_parser("daemonset", help="print the pre-warm DaemonSet manifest (YAML) for kubectl apply")
    d.add_argument("--image", required=True)
    d.add_argument("--model", action="append", required=True)
    d.add_argument("--capacity", default="64Gi", help="tier budget per node (FORGELINE_SHM_CAPACITY_BYTES)")
    d.add_argument("--namespace")
    d.add_argument("--node-selector", default="{}", help="JSON object: the serving nodes' labels")
    d.add_argument("--tolerations", default="[]", help="JSON list of tolerations")
    d.add_argument("--s3-secret", help="Secret with FORGELINE_S3_* and AWS_* keys")
    d.add_argument("--pvc", help="model-store PVC (with --storage-root)")
    d.add_argument("--storage-root", help="where the PVC is mounted (FORGELINE_STORAGE_ROOT)")
    d.add_argument("--every", type=int, default=60)
    args = ap.parse_args(argv)
    if args.cmd == "daemonset":
        import yaml

        env = {"--node-selector": args.node_selector, "--tolerations": args.tolerations}
        manifest = prewarm_daemonset(
            image=args.image, models=args.model, capacity_bytes=parse_quantity(args.capacity),
            namespace=args.namespace, every_s=args.every,
            node_selector=json_env("--node-selector", dict, {}, env), tolerations=json_env("--tolerations", list, [], env),
            access=model_store_access(s3_secret=args.s3_secret, pvc=args.pvc, mount_path=args.storage_root))
        print(yaml.safe_dump(manifest, sort_keys=False), end="")
        return 0
    prewarm_loop(args.model, every_s=args.every, pin=args.pin, ready_file=args.ready_file,
                 rounds=1 if args.once else None, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
