"""Running the multi-node training Job: :func:`train_on_nodes` writes the node job to storage,
starts ``nnodes`` torchrun pods as an Indexed Job (:func:`pipeline.k8s.manifests.torchrun_job`)
and reads rank 0's result back; :func:`run_indexed_job` creates, watches and deletes the Job and its
Service, and raises :class:`NodeJobFailed` naming the failed node (index, pod, reason, exit code,
last log lines). The ``kubernetes`` client is imported only when a run starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline import settings
from pipeline.k8s.manifests import COMPLETION_INDEX_ANNOTATION, JOB_LABEL, job_name, torchrun_job

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class NodeJobFailed(RuntimeError):
    """The multi-node training Job failed or timed out; the message names the node(s) and why."""


def current_namespace() -> str:
    """``FORGELINE_K8S_NAMESPACE``, else the namespace this pod runs in (service-account mount),
    else ``default``."""
    namespace = settings.k8s_namespace()
    if namespace:
        return namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def current_image() -> str:
    """The user-code image (``FORGELINE_IMAGE``, else the Dagster chart's ``DAGSTER_CURRENT_IMAGE``)."""
    image = settings.image()
    if not image:
        raise ValueError("no image for the training nodes: set TrainingConfig.node_image, or FORGELINE_IMAGE "
                         "in the code location's environment (deploy/helm/values.yaml)")
    return image


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
