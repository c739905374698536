"""The executor, chosen by ``FORGELINE_EXECUTOR``: Dagster's default (multiprocess; unset or
``default``), or ``k8s``: dagster-k8s's ``k8s_job_executor``, every step its own Kubernetes Job.

The pod settings live in the *executor's* config (``step_k8s_config`` for every step,
``per_step_k8s_config`` per op), not in job or op tags, because backfill and automation runs do not
inherit job tags: whatever launched a run, each step gets

* every step: CPU/memory defaults (``FORGELINE_K8S_STEP_RESOURCES``), the non-root security
  context, and model-store access (:func:`pipeline.k8s.model_store_access_from_env`: the S3 Secret
  as ``env_from``, or the NFS/Ceph PVC);
* each GPU step (every op whose asset declares ``pool=<gpu pool>``, read from the definitions, so a
  new GPU asset is covered without touching this file): :meth:`GpuPoolResource.k8s_config`
  (``nvidia.com/gpu`` limits, node selector, tolerations, memory-backed ``/dev/shm``) plus
  ``FORGELINE_K8S_GPU_STEP_RESOURCES``;
* each step that uses the ``shm`` resource (``shm_prewarm``): the node's ``/dev/shm/forgeline`` tier
  as a hostPath on a serving node, and memory for the tier's budget (tmpfs pages count against the
  writer's memory limit). No GPU.
"""

import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import dagster as dg

from pipeline import gpus as gpu_engine
from pipeline import k8s
from resources.gpu import GpuPoolResource

EXECUTOR_ENV = "FORGELINE_EXECUTOR"
SHM_RESOURCE_KEY = "shm"

DEFAULT_STEP_RESOURCES = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
# The GPU step's memory limit must hold /dev/shm (FORGELINE_K8S_SHM_SIZE, 16Gi by default) on top of
# the process: emptyDir medium Memory is charged to the container.
DEFAULT_GPU_STEP_RESOURCES = {"requests": {"cpu": "8", "memory": "48Gi"}, "limits": {"memory": "96Gi"}}


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


def _resources(name: str, default: dict, env: Mapping[str, str]) -> dict:
    res = k8s.json_env(name, dict, default, env)
    unknown = set(res) - {"requests", "limits"}
    if unknown:
        raise ValueError(f"{name} takes 'requests' and 'limits', not {sorted(unknown)}: {res!r}")
    return res


def k8s_executor_config(gpu_pool: GpuPoolResource, assets: Iterable[Any],
                        env: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """The ``k8s_job_executor`` config for these assets (dagster-k8s snake_case keys)."""
    env = os.environ if env is None else env
    assets = list(assets)
    if not (env.get("FORGELINE_S3_BUCKET") or env.get("FORGELINE_K8S_MODEL_STORE_PVC")):
        raise ValueError(
            f"{EXECUTOR_ENV}=k8s runs every step in its own pod, so they need a shared model store: set "
            "FORGELINE_S3_BUCKET (and FORGELINE_K8S_S3_SECRET, the Secret with its credentials) or "
            "FORGELINE_K8S_MODEL_STORE_PVC with FORGELINE_STORAGE_ROOT (see deploy/README.md)")
    access = k8s.model_store_access_from_env(env)
    every_step = k8s.merge(
        {"container_config": {"resources": _resources("FORGELINE_K8S_STEP_RESOURCES", DEFAULT_STEP_RESOURCES, env),
                              "security_context": {"allow_privilege_escalation": False}},
         "pod_spec_config": {"security_context": {"run_as_non_root": True, "run_as_user": k8s.UID,
                                                  "run_as_group": k8s.UID, "fs_group": k8s.UID}}},
        access,
    )

    gpu_res = _resources("FORGELINE_K8S_GPU_STEP_RESOURCES", DEFAULT_GPU_STEP_RESOURCES, env)
    limit, shm = (gpu_res.get("limits") or {}).get("memory"), gpu_pool.k8s_shm_size
    if limit and shm and k8s.parse_quantity(limit) <= k8s.parse_quantity(shm):
        raise ValueError(f"FORGELINE_K8S_GPU_STEP_RESOURCES limits.memory={limit} must exceed the /dev/shm size "
                         f"{shm} (FORGELINE_K8S_SHM_SIZE): a memory-backed /dev/shm counts against the limit")
    gpu_step = k8s.merge({"container_config": {"resources": gpu_res}}, gpu_pool.k8s_config())

    per_step = {op: gpu_step for op in gpu_steps(assets, gpu_pool.pool)}

    tier_root = env.get("FORGELINE_SHM_ROOT") or k8s.DEFAULT_TIER_PATH
    selector = k8s.json_env("FORGELINE_K8S_SERVING_NODE_SELECTOR", dict, gpu_pool.k8s_node_selector, env)
    placement = gpu_engine.k8s_requirements(0, node_selector=selector, tolerations=gpu_pool.k8s_tolerations)
    cap = env.get("FORGELINE_SHM_CAPACITY_BYTES")
    tier_step = k8s.merge(placement, {
        "container_config": {"volume_mounts": [{"name": "shm-tier", "mount_path": tier_root}]},
        # type Directory: the prewarm DaemonSet creates it (owned by the image's user) on every serving
        # node; a node without it fails the mount clearly instead of getting a root-owned directory.
        "pod_spec_config": {"volumes": [{"name": "shm-tier", "host_path": {
            "path": env.get("FORGELINE_K8S_SHM_TIER_HOST_PATH") or k8s.DEFAULT_TIER_PATH, "type": "Directory"}}]},
    })
    if cap:
        memory = k8s.gib(int(cap) + 2 * 2**30)
        tier_step = k8s.merge(tier_step, {"container_config": {"resources": {
            "requests": {"memory": memory}, "limits": {"memory": memory}}}})
    for op in shm_steps(assets, gpu_pool.pool):
        per_step[op] = tier_step

    return {"step_k8s_config": every_step, "per_step_k8s_config": per_step}


def executor_from_env(gpu_pool: GpuPoolResource, assets: Iterable[Any],
                      env: Optional[Mapping[str, str]] = None) -> Optional[dg.ExecutorDefinition]:
    """``None`` (Dagster's default executor) unless ``FORGELINE_EXECUTOR=k8s``."""
    env = os.environ if env is None else env
    kind = (env.get(EXECUTOR_ENV) or "default").strip().lower()
    if kind == "default":
        return None
    if kind != "k8s":
        raise ValueError(f"{EXECUTOR_ENV}={env.get(EXECUTOR_ENV)!r}: use 'k8s' or leave it unset (Dagster's default)")
    from dagster_k8s import k8s_job_executor  # the k8s extra: only needed where it is used

    return k8s_job_executor.configured(k8s_executor_config(gpu_pool, assets, env), name="forgeline_k8s")
