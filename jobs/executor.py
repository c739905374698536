"""The executor, chosen by ``FORGELINE_EXECUTOR``: Dagster's default (multiprocess; unset or
``default``), or ``k8s``: dagster-k8s's ``k8s_job_executor``, every step its own Kubernetes Job.

The pod settings live in the *executor's* config (``step_k8s_config`` for every step,
``per_step_k8s_config`` per op), not in job or op tags, because backfill and automation runs do not
inherit job tags: whatever launched a run, each step gets

* every step: CPU/memory defaults (``FORGELINE_K8S_STEP_RESOURCES``), the non-root security
  context, and model-store access (:func:`pipeline.k8s.manifests.model_store_access_from_env`: the
  S3 Secret as ``env_from``, or the NFS/Ceph PVC);
* each GPU step (every op whose asset declares ``pool=`` the GPU pool, ``FORGELINE_GPU_POOL``, read
  from the definitions, so a new GPU asset is covered without touching this file): :meth:`GpuPoolResource.k8s_config`
  (``nvidia.com/gpu`` limits, node selector, tolerations, memory-backed ``/dev/shm``) plus
  ``FORGELINE_K8S_GPU_STEP_RESOURCES``;
* each step that uses the ``shm`` resource (``shm_prewarm``): the node's ``/dev/shm/forgeline`` tier
  as a hostPath on a serving node, and memory for the tier's budget (tmpfs pages count against the
  writer's memory limit). No GPU.
"""

from collections.abc import Iterable
from typing import Any, Optional

import dagster as dg

from pipeline import gpus as gpu_engine
from pipeline import settings
from pipeline.k8s.manifests import UID, merge, model_store_access_from_env
from resources.gpu import GpuPoolResource

SHM_RESOURCE_KEY = "shm"

DEFAULT_STEP_RESOURCES = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
# The GPU step's memory limit must hold /dev/shm (FORGELINE_K8S_SHM_SIZE, 16Gi by default) on top of
# the process: emptyDir medium Memory is charged to the container.
DEFAULT_GPU_STEP_RESOURCES = {"requests": {"cpu": "8", "memory": "48Gi"}, "limits": {"memory": "96Gi"}}
TIER_HEADROOM_BYTES = 2 * 2**30  # the tier step's own memory on top of the tier budget


def _ops(assets: Iterable[Any]) -> list[tuple[str, Optional[str], set]]:
    """(op name, pool, required resource keys) of every op-backed asset definition."""
    out = []
    for a in assets:
        node = getattr(a, "node_def", None)
        if isinstance(node, dg.OpDefinition):
            out.append((node.name, getattr(node, "pool", None), set(a.required_resource_keys)))
    return out


def gpu_steps(assets: Iterable[Any], pool: str) -> list[str]:
    """Ops whose assets declare the GPU concurrency pool."""
    return sorted({name for name, p, _ in _ops(assets) if p == pool})


def shm_steps(assets: Iterable[Any], pool: str) -> list[str]:
    """Ops that use the /dev/shm tier resource and are not GPU steps."""
    return sorted({name for name, p, keys in _ops(assets) if SHM_RESOURCE_KEY in keys and p != pool})


def k8s_executor_config(gpu_pool: GpuPoolResource, assets: Iterable[Any], env: settings.Env = None) -> dict[str, Any]:
    """The ``k8s_job_executor`` config for these assets (dagster-k8s snake_case keys); GPU steps
    are the ops in ``gpu_pool.pool`` (``FORGELINE_GPU_POOL``)."""
    assets = list(assets)
    if not (settings.storage(env).bucket or settings.k8s_model_store_pvc(env)):
        raise settings.SettingError(
            "FORGELINE_EXECUTOR=k8s runs every step in its own pod, so they need a shared model store: set "
            "FORGELINE_S3_BUCKET (and FORGELINE_K8S_S3_SECRET, the Secret with its credentials) or "
            "FORGELINE_K8S_MODEL_STORE_PVC with FORGELINE_STORAGE_ROOT (see deploy/README.md)")
    every_step = merge(
        {"container_config": {"resources": settings.k8s_resources("FORGELINE_K8S_STEP_RESOURCES",
                                                                  DEFAULT_STEP_RESOURCES, env),
                              "security_context": {"allow_privilege_escalation": False}},
         "pod_spec_config": {"security_context": {"run_as_non_root": True, "run_as_user": UID,
                                                  "run_as_group": UID, "fs_group": UID}}},
        model_store_access_from_env(env),
    )

    gpu_res = settings.k8s_resources("FORGELINE_K8S_GPU_STEP_RESOURCES", DEFAULT_GPU_STEP_RESOURCES, env)
    limit, shm = (gpu_res.get("limits") or {}).get("memory"), gpu_pool.k8s_shm_size
    if limit and shm and settings.parse_size(limit) <= settings.parse_size(shm):
        raise settings.SettingError(
            f"FORGELINE_K8S_GPU_STEP_RESOURCES limits.memory={limit} must exceed the /dev/shm size "
            f"{shm} (FORGELINE_K8S_SHM_SIZE): a memory-backed /dev/shm counts against the limit")
    gpu_step = merge({"container_config": {"resources": gpu_res}}, gpu_pool.k8s_config())

    per_step = {op: gpu_step for op in gpu_steps(assets, gpu_pool.pool)}

    selector = settings.k8s_serving_node_selector(gpu_pool.k8s_node_selector, env)
    placement = gpu_engine.k8s_requirements(0, node_selector=selector, tolerations=gpu_pool.k8s_tolerations)
    tier_step = merge(placement, {
        "container_config": {"volume_mounts": [{"name": "shm-tier", "mount_path": settings.shm_root(env)}]},
        # type Directory: the prewarm DaemonSet creates it (owned by the image's user) on every serving
        # node; a node without it fails the mount clearly instead of getting a root-owned directory.
        "pod_spec_config": {"volumes": [{"name": "shm-tier", "host_path": {
            "path": settings.k8s_shm_tier_host_path(env), "type": "Directory"}}]},
    })
    capacity = settings.shm_capacity_bytes(env)
    if capacity:
        memory = settings.gib(capacity + TIER_HEADROOM_BYTES)
        tier_step = merge(tier_step, {"container_config": {"resources": {
            "requests": {"memory": memory}, "limits": {"memory": memory}}}})
    for op in shm_steps(assets, gpu_pool.pool):
        per_step[op] = tier_step

    return {"step_k8s_config": every_step, "per_step_k8s_config": per_step}


def executor_from_env(gpu_pool: GpuPoolResource, assets: Iterable[Any],
                      env: settings.Env = None) -> Optional[dg.ExecutorDefinition]:
    """``None`` (Dagster's default executor) unless ``FORGELINE_EXECUTOR=k8s``."""
    if settings.executor(env) == "default":
        return None
    from dagster_k8s import k8s_job_executor  # the k8s extra: only needed where it is used

    return k8s_job_executor.configured(k8s_executor_config(gpu_pool, assets, env), name="forgeline_k8s")
