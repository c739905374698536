"""GPU pool resource: the devices a run may use, leased per run (see :mod:`pipeline.gpus`).

Two layers keep GPU steps from oversubscribing a host:

* **Dagster concurrency pool** ``pool`` (``FORGELINE_GPU_POOL``, default ``"gpu"``): GPU assets declare
  ``@dg.asset(pool=gpu_pool.pool)`` and the instance limits how many such steps run at once
  (``dagster instance concurrency set gpu <pool_limit()>``, or ``concurrency: pools:`` in
  ``dagster.yaml``) — steps wait in the queue instead of failing.
* **Per-device locks** held by :meth:`GpuPoolResource.lease` for the step's lifetime, so runs that
  share the host but not the instance (or a pool limit set too high) still never share a GPU.

On a machine without a GPU, ``lease()`` returns a CPU lease of ``cpu_ranks`` gloo ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from pipeline import gpus as engine
from pipeline import settings
from pipeline.gpus import Device, Lease, UtilizationSampler


class GpuPoolResource(dg.ConfigurableResource):
    """The devices a run may use on this host, how to lease them, and what Kubernetes must request."""

    device_ids: Optional[list[int]] = Field(
        default=None, description="GPU indices (NVML / nvidia-smi numbering) runs may use; None = all."
    )
    gpus_per_run: Optional[int] = Field(
        default=None, description="GPUs leased per run; None = every free allowed GPU (at least one)."
    )
    cpu_ranks: int = Field(default=2, description="Number of gloo ranks when the host has no GPU.")
    lock_dir: Optional[str] = Field(
        default=None,
        description="Directory of per-GPU lock files shared by every run on the host (local disk); "
        "None = $FORGELINE_HOME/locks.",
    )
    lease_timeout_s: float = Field(default=600, description="Seconds to wait for enough free GPUs.")
    pool: str = Field(default_factory=settings.gpu_pool,
                      description="Dagster concurrency pool that GPU assets declare ($FORGELINE_GPU_POOL, else 'gpu').")
    k8s_gpu_resource: str = Field(default="nvidia.com/gpu", description="Kubernetes extended resource for a GPU.")
    k8s_node_selector: dict[str, str] = Field(default={}, description="Node selector for GPU pods.")
    k8s_tolerations: list[dict[str, Any]] = Field(
        default=[], description="Tolerations for GPU pods (e.g. the nvidia.com/gpu NoSchedule taint)."
    )
    k8s_shm_size: Optional[str] = Field(
        default="16Gi", description="Size of the memory-backed /dev/shm for GPU pods; None = runtime default."
    )

    _discovered: Optional[list[Device]] = PrivateAttr(default=None)

    def lock_path(self) -> Path:
        """The lock directory in effect."""
        return Path(self.lock_dir) if self.lock_dir else settings.home() / "locks"

    def _all_devices(self) -> list[Device]:
        if self._discovered is None:
            self._discovered = engine.discover()
        return list(self._discovered)

    def devices(self) -> list[Device]:
        """The allowed devices on this host (discovered once, cached); ``[]`` without a GPU.
        Indices in ``device_ids`` that do not exist are ignored here; :meth:`lease` rejects them."""
        found = self._all_devices()
        if self.device_ids is None:
            return found
        return [d for d in found if d.index in set(self.device_ids)]

    def lease(self, label: str = "") -> Lease:
        """Lease ``gpus_per_run`` allowed devices (a CPU lease without GPUs), waiting up to
        ``lease_timeout_s`` (then :class:`pipeline.gpus.GpuPoolBusy`). Use it as a context
        manager so the devices go back when the step ends::

            with gpu_pool.lease(context.run.run_id) as lease, gpu_pool.sampler(lease) as sampler:
                ...
            context.add_output_metadata({**lease.metadata(), **sampler.summary()})
        """
        return engine.acquire(
            self.gpus_per_run,
            devices=self._all_devices(),
            allowed=self.device_ids,
            cpu_ranks=self.cpu_ranks,
            lock_dir=self.lock_path(),
            timeout_s=self.lease_timeout_s,
            label=label,
        )

    def sampler(self, lease: Lease, interval_s: float = 0.5) -> UtilizationSampler:
        """A utilization sampler over the lease's devices (host CPU only for a CPU lease)."""
        return UtilizationSampler(interval_s=interval_s, devices=lease.devices)

    def pool_limit(self) -> int:
        """How many GPU steps this host can run at once: the value to give the ``pool`` limit."""
        n = len(self.devices())
        if n == 0 or not self.gpus_per_run:
            return 1  # CPU host, or every run takes all free GPUs
        return max(1, n // self.gpus_per_run)

    def k8s_config(self, gpus: Optional[int] = None) -> dict[str, Any]:
        """The ``dagster-k8s/config`` tag value for a GPU step: ``gpus`` GPUs (default
        ``gpus_per_run``, else 1; 0 for a CPU pod), node selector, tolerations, /dev/shm emptyDir."""
        return engine.k8s_requirements(
            gpus if gpus is not None else (self.gpus_per_run or 1),
            resource_name=self.k8s_gpu_resource,
            node_selector=self.k8s_node_selector,
            tolerations=self.k8s_tolerations,
            shm_size=self.k8s_shm_size,
        )


def gpu_pool_from_env(env: settings.Env = None) -> GpuPoolResource:
    """The GPU pool with its settings from the environment (the executor reads them at definitions
    load, so run config cannot change them): ``FORGELINE_GPU_POOL``, ``FORGELINE_GPUS_PER_RUN``,
    ``FORGELINE_K8S_GPU_NODE_SELECTOR`` (JSON object), ``FORGELINE_K8S_GPU_TOLERATIONS`` (JSON list),
    ``FORGELINE_K8S_SHM_SIZE`` (e.g. ``32Gi``; ``none`` = the runtime's default /dev/shm) and
    ``FORGELINE_K8S_GPU_RESOURCE``. Malformed values raise ``ValueError`` naming the variable."""
    kw: dict[str, Any] = {"pool": settings.gpu_pool(env), "gpus_per_run": settings.gpus_per_run(env)}
    selector = settings.k8s_gpu_node_selector(env)
    if selector is not None:
        kw["k8s_node_selector"] = selector
    tolerations = settings.k8s_gpu_tolerations(env)
    if tolerations is not None:
        kw["k8s_tolerations"] = tolerations
    shm = settings.k8s_shm_size(env)
    if shm is not None:
        kw["k8s_shm_size"] = None if shm == "none" else shm
    resource = settings.k8s_gpu_resource(env)
    if resource is not None:
        kw["k8s_gpu_resource"] = resource
    return GpuPoolResource(**kw)
