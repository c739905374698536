"""GPU pool: which devices a run may use, leased so that two runs on one host never share a GPU.

* :func:`discover` lists CUDA devices through NVML (``pynvml`` from nvidia-ml-py) or, failing that,
  ``torch.cuda``; on a machine without a driver it returns ``[]`` and never raises.
* :func:`acquire` leases devices to a run. Each device has one lock file,
  ``<lock_dir>/gpu-<uuid>.lock``, held with ``flock(LOCK_EX)`` for the life of the lease. The kernel
  drops the lock when the holder's process ends, however it ends (exit, exception, SIGKILL, OOM
  kill), so there are no stale locks to clean up. The holder writes its pid, host, time and label
  into the file so that :class:`GpuPoolBusy` can say who holds what. Every run that should respect
  the pool must use the same ``lock_dir`` on a *local* filesystem (flock on NFS is emulated and
  not reliable across hosts — and leasing is per host anyway).
* Without any GPU, :func:`acquire` returns a CPU lease: ``world_size = cpu_ranks``, backend
  ``gloo``, ``CUDA_VISIBLE_DEVICES=""`` for the launched workers.
* :class:`UtilizationSampler` samples NVML utilization and memory (and host CPU via psutil) in a
  background thread while a step runs; :meth:`UtilizationSampler.summary` is step metadata.
* :func:`k8s_requirements` is what a Kubernetes pod needs for the same work, in the shape of the
  ``dagster-k8s/config`` tag.

Usage::

    with acquire(2, lock_dir="/var/tmp/forgeline/locks", timeout_s=600, label=run_id) as lease:
        with UtilizationSampler(devices=lease.devices) as sampler:
            subprocess.run(["torchrun", f"--nproc-per-node={lease.world_size}", ...],
                           env={**os.environ, **lease.env()}, check=True)
        metadata = {**lease.metadata(), **sampler.summary()}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import locks

__all__ = [
    "Device",
    "GpuError",
    "GpuPoolBusy",
    "InvalidGpuRequest",
    "Lease",
    "UtilizationSampler",
    "acquire",
    "discover",
    "k8s_requirements",
    "lock_path",
]


class GpuError(Exception):
    """Base class for GPU pool failures. Messages always name the devices involved."""


class InvalidGpuRequest(GpuError, ValueError):
    """The request can never be satisfied (more devices than allowed, unknown device ids...)."""


class GpuPoolBusy(GpuError, TimeoutError):
    """Not enough free devices within the timeout. ``holders`` maps each busy device's uuid to
    what its lock file says about the holder (pid, host, time, label), as far as it is known."""

    def __init__(self, message: str, holders: dict[str, dict[str, Any]] | None = None):
        super().__init__(message)
        self.holders = holders or {}


@dataclass(frozen=True)
class Device:
    """One CUDA device. ``index`` is NVML's (physical, PCI bus order) index when discovered through
    NVML, torch's logical index otherwise; ``uuid`` is the stable identity (``GPU-…``) that locks
    and ``CUDA_VISIBLE_DEVICES`` use."""

    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    compute_capability: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def _nvml():
    """The initialized ``pynvml`` module, or None when nvidia-ml-py or the driver is missing.
    Every successful call must be paired with ``nvmlShutdown()`` (NVML reference-counts init)."""
    try:
        import pynvml
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _discover_nvml() -> list[Device] | None:
    nv = _nvml()
    if nv is None:
        return None
    try:
        found = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            try:
                cc: tuple[int, int] | None = tuple(nv.nvmlDeviceGetCudaComputeCapability(h))  # type: ignore[assignment]
            except Exception:
                cc = None
            found.append(
                Device(
                    index=i,
                    uuid=_text(nv.nvmlDeviceGetUUID(h)),
                    name=_text(nv.nvmlDeviceGetName(h)),
                    memory_total=int(nv.nvmlDeviceGetMemoryInfo(h).total),
                    compute_capability=cc,
                )
            )
        return found
    except Exception:
        return None  # a half-working driver: let torch (or nothing) answer instead
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def _discover_torch() -> list[Device]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        found = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            raw_uuid = str(getattr(p, "uuid", "") or "")
            uuid = raw_uuid if raw_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{raw_uuid}" if raw_uuid else f"cuda-{i}"
            found.append(Device(i, uuid, str(p.name), int(p.total_memory), (int(p.major), int(p.minor))))
        return found
    except Exception:
        return []


def _filter_visible(found: list[Device], visible: str) -> list[Device]:
    """Apply ``CUDA_VISIBLE_DEVICES`` to physically enumerated devices, as the CUDA runtime does:
    entries are indices or (prefixes of) UUIDs, in the order given; the first entry that names no
    device ends the list."""
    out: list[Device] = []
    for token in (t.strip() for t in visible.split(",")):
        if not token:
            break
        if re.fullmatch(r"-?\d+", token):
            match = [d for d in found if d.index == int(token)]
        else:
            key = token if token.startswith(("GPU-", "MIG-")) else f"GPU-{token}"
            match = [d for d in found if d.uuid.startswith(key)]
        if len(match) != 1:
            break
        if match[0] not in out:
            out.append(match[0])
    return out


def discover() -> list[Device]:
    """The CUDA devices this process may use: NVML if nvidia-ml-py and a driver are present, else
    ``torch.cuda``, else ``[]``. Honors ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs). Never raises."""
    try:
        found = _discover_nvml()
        if found is None:
            return _discover_torch()  # the CUDA runtime applies CUDA_VISIBLE_DEVICES itself
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return found if visible is None else _filter_visible(found, visible)
    except Exception:
        return []


# ---------------------------------------------------------------------------------------------
# Leasing
# ---------------------------------------------------------------------------------------------


def lock_path(lock_dir: str | Path, device: Device) -> Path:
    """The lock file of ``device`` under ``lock_dir``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", device.uuid)
    return Path(lock_dir) / f"gpu-{safe}.lock"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_holder(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "an unknown process"  # locked but its holder has not written its details yet
    text = f"pid {info['pid']} on {info.get('host', '?')}"
    if info.get("since"):
        text += f" since {info['since']}"
    if info.get("label"):
        text += f" ({info['label']})"
    return text


def _try_lock(path: Path, label: str) -> int | None:
    """An fd holding an exclusive flock on ``path`` (holder details written), or None if busy."""
    try:
        fd = locks.acquire(path, blocking=False)
    except OSError as err:
        raise GpuError(f"cannot lock GPU lock file {path}: {err.strerror or err}") from err
    if fd is None:
        return None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "label": label,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _unlock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # the next reader must not mistake us for the holder
    except OSError:
        pass
    locks.release(fd)


class Lease:
    """Devices leased to one run, held until :meth:`release` (or the end of a ``with`` block, or
    the end of the process). A lease with no devices is a CPU lease of ``world_size`` gloo ranks.

    Lock files stay in place after release; only the flock matters. A forked child inherits the
    locks until it exits; processes started with ``subprocess`` do not.
    """

    def __init__(self, devices: Sequence[Device], *, cpu_ranks: int = 2, label: str = "", _fds: Sequence[int] = ()):
        self.devices: list[Device] = list(devices)
        self.label = label
        self.world_size: int = len(self.devices) if self.devices else int(cpu_ranks)
        self._fds: list[int] = list(_fds)
        self._lock = threading.Lock()

    @property
    def device_type(self) -> str:
        return "cuda" if self.devices else "cpu"

    @property
    def backend(self) -> str:
        """torch.distributed backend for this lease's ranks."""
        return "nccl" if self.devices else "gloo"

    @property
    def cuda_visible_devices(self) -> str:
        """``CUDA_VISIBLE_DEVICES`` for the launched workers: device UUIDs (unambiguous whatever
        ``CUDA_DEVICE_ORDER`` is), indices for devices without one, ``""`` for a CPU lease."""
        return ",".join(d.uuid if d.uuid.startswith(("GPU-", "MIG-")) else str(d.index) for d in self.devices)

    @property
    def released(self) -> bool:
        return not self._fds

    def env(self) -> dict[str, str]:
        """Environment variables a launched process (torchrun and its workers) needs. A CPU lease
        sets ``CUDA_VISIBLE_DEVICES=""`` so workers can never touch a GPU."""
        env = {"CUDA_VISIBLE_DEVICES": self.cuda_visible_devices}
        if self.devices:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices mean what nvidia-smi/NVML says
        return env

    def metadata(self) -> dict[str, Any]:
        """A JSON-safe description of the lease, for run/step metadata."""
        return {
            "device_type": self.device_type,
            "backend": self.backend,
            "world_size": self.world_size,
            "devices": ", ".join(f"{d.index}:{d.name}" for d in self.devices) or "cpu",
            "cuda_visible_devices": self.cuda_visible_devices,
        }

    def release(self) -> None:
        """Give the devices back. Idempotent."""
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            try:
                _unlock(fd)
            except OSError:
                pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        what = ",".join(str(d.index) for d in self.devices) or f"cpu x{self.world_size}"
        state = " released" if self.devices and self.released else ""
        return f"<Lease {what} backend={self.backend}{state}>"


def _lock_some(candidates: list[Device], want: int | None, lock_dir: Path, label: str) -> tuple[list[Device], list[int]]:
    """Lock free devices in order: ``want`` of them (all-or-nothing) or, with ``want=None``, every
    free one. Never holds a partial set while waiting, so two waiting runs cannot deadlock."""
    got: list[Device] = []
    fds: list[int] = []
    try:
        for d in candidates:
            if want is not None and len(got) == want:
                break
            fd = _try_lock(lock_path(lock_dir, d), label)
            if fd is not None:
                got.append(d)
                fds.append(fd)
    except BaseException:
        for fd in fds:
            _unlock(fd)
        raise
    if (want is not None and len(got) < want) or not got:
        for fd in fds:
            _unlock(fd)
        return [], []
    return got, fds


def acquire(
    count: int | None = None,
    *,
    devices: list[Device] | None = None,
    allowed: list[int] | None = None,
    cpu_ranks: int = 2,
    lock_dir: str | Path,
    timeout_s: float = 0,
    poll_s: float = 0.5,
    label: str = "",
) -> Lease:
    """Lease ``count`` devices (``None``: every free allowed device, at least one).

    ``devices`` replaces :func:`discover` (tests inject fake devices); ``allowed`` restricts the
    pool to these device indices. Waits up to ``timeout_s`` for enough devices to be free, then
    raises :class:`GpuPoolBusy` naming the busy devices and their holders. Without any device
    (nothing discovered, or ``devices=[]``) returns a CPU lease of ``cpu_ranks`` ranks, unlocked.
    ``label`` (a run id, a step name) is recorded in the lock files for diagnostics.
    """
    if cpu_ranks < 1:
        raise InvalidGpuRequest(f"cpu_ranks must be >= 1, got {cpu_ranks}")
    pool = discover() if devices is None else list(devices)
    if not pool:
        return Lease([], cpu_ranks=cpu_ranks, label=label)

    if allowed is not None:
        known = {d.index for d in pool}
        unknown = sorted(set(allowed) - known)
        if unknown:
            raise InvalidGpuRequest(
                f"allowed GPU indices {unknown} do not exist; devices here: {sorted(known)}"
            )
        pool = [d for d in pool if d.index in set(allowed)]
        if not pool:
            raise InvalidGpuRequest("allowed=[] leaves no GPU to lease")
    if count is not None:
        if count < 1:
            raise InvalidGpuRequest(f"count must be >= 1 (or None for all free GPUs), got {count}")
        if count > len(pool):
            raise InvalidGpuRequest(
                f"asked for {count} GPU(s) but only {len(pool)} allowed: "
                + ", ".join(f"{d.index} ({d.uuid})" for d in pool)
            )

    lock_dir = Path(lock_dir)
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GpuError(f"cannot create GPU lock directory {lock_dir}: {err.strerror or err}") from err

    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        got, fds = _lock_some(pool, count, lock_dir, label)
        if got:
            return Lease(got, cpu_ranks=cpu_ranks, label=label, _fds=fds)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(max(poll_s, 0.01), remaining))

    holders: dict[str, dict[str, Any]] = {}
    free: list[Device] = []
    for d in pool:  # who holds what, as the lock files say (a device may free up meanwhile)
        path = lock_path(lock_dir, d)
        fd = _try_lock(path, label)
        if fd is None:
            holders[d.uuid] = _read_holder(path)
        else:
            _unlock(fd)
            free.append(d)
    busy = "; ".join(
        f"GPU {d.index} ({d.uuid}) held by {_describe_holder(holders[d.uuid])}" for d in pool if d.uuid in holders
    )
    wanted = f"{count}" if count is not None else "any"
    raise GpuPoolBusy(
        f"GPU pool busy: wanted {wanted} of {len(pool)} allowed GPU(s), {len(free)} free after "
        f"waiting {timeout_s:g}s (locks in {lock_dir}): {busy or 'no holder found'}",
        holders,
    )


# ---------------------------------------------------------------------------------------------
# Utilization sampling
# ---------------------------------------------------------------------------------------------


class UtilizationSampler:
    """Samples GPU utilization and memory (NVML) of ``devices`` and host CPU utilization (psutil)
    every ``interval_s`` in a daemon thread, from :meth:`start` to :meth:`stop` — plus one sample
    at each end, so even a short step gets numbers.

    ``devices=None`` samples every discovered device, ``[]`` none (a CPU lease). Without NVML or
    psutil the corresponding keys are simply missing from :meth:`summary`; nothing raises.
    """

    def __init__(self, interval_s: float = 0.5, devices: Iterable[Device] | None = None):
        self.interval_s = max(0.01, float(interval_s))
        self.devices = None if devices is None else list(devices)
        self._gpu_util: list[float] = []
        self._gpu_mem: list[int] = []
        self._cpu_util: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nv = None
        self._handles: list[Any] = []
        self._psutil = None
        self._t0 = self._t1 = 0.0

    def start(self) -> "UtilizationSampler":
        if self._thread is not None:
            return self
        self._open_nvml()
        try:
            import psutil

            psutil.cpu_percent(interval=None)  # prime: the first call has nothing to compare with
            self._psutil = psutil
        except Exception:
            self._psutil = None
        self._t0 = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="forgeline-gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """Stop sampling (idempotent) and return :meth:`summary`."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample(cpu=True)  # covers the tail since the last tick
            self._t1 = time.monotonic()
            self._close_nvml()
        return self.summary()

    def __enter__(self) -> "UtilizationSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._gpu_util:
            out["gpu_util_mean"] = sum(self._gpu_util) / len(self._gpu_util)
            out["gpu_util_max"] = float(max(self._gpu_util))
            out["gpu_samples"] = float(len(self._gpu_util))
        if self._gpu_mem:
            out["gpu_mem_used_max_bytes"] = float(max(self._gpu_mem))
        if self._cpu_util:
            out["cpu_util_mean"] = sum(self._cpu_util) / len(self._cpu_util)
            out["cpu_util_max"] = float(max(self._cpu_util))
            out["cpu_samples"] = float(len(self._cpu_util))
        if out and self._t1 > self._t0:
            out["sampled_s"] = self._t1 - self._t0
        return out

    # internals -----------------------------------------------------------------------------
    def _open_nvml(self) -> None:
        if self.devices == []:
            return
        nv = _nvml()
        if nv is None:
            return
        handles = []
        try:
            if self.devices is None:
                handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
            else:
                for d in self.devices:
                    try:
                        handles.append(nv.nvmlDeviceGetHandleByUUID(d.uuid))
                    except Exception:
                        handles.append(nv.nvmlDeviceGetHandleByIndex(d.index))
        except Exception:
            handles = []
        if not handles:
            try:
                nv.nvmlShutdown()
            except Exception:
                pass
            return
        self._nv, self._handles = nv, handles

    def _close_nvml(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:
                pass
            self._nv, self._handles = None, []

    def _sample(self, cpu: bool) -> None:
        nv = self._nv
        for h in self._handles if nv is not None else ():
            try:
                self._gpu_util.append(float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
                self._gpu_mem.append(int(nv.nvmlDeviceGetMemoryInfo(h).used))
            except Exception:
                pass  # a device lost mid-run: keep what we have
        if cpu and self._psutil is not None:
            try:
                self._cpu_util.append(float(self._psutil.cpu_percent(interval=None)))
            except Exception:
                pass

    def _run(self) -> None:
        self._sample(cpu=False)  # GPU state at start; CPU needs an interval to mean anything
        while not self._stop.wait(self.interval_s):
            self._sample(cpu=True)


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def k8s_requirements(
    gpus: int,
    *,
    resource_name: str = "nvidia.com/gpu",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    shm_size: str | None = None,
) -> dict[str, Any]:
    """What a pod needs to run ``gpus``-GPU work, as the value of the ``dagster-k8s/config`` tag
    (snake_case keys, as the Kubernetes Python client models that dagster-k8s builds expect).

    Extended resources cannot be overcommitted, so the GPU request equals the limit. ``shm_size``
    mounts a memory-backed emptyDir on ``/dev/shm`` (NCCL and DataLoader workers need more than
    the container runtime's 64 MiB default); it counts against the container's memory limit.
    Toleration keys may be given in camelCase (``tolerationSeconds``); they are converted.
    """
    if gpus < 0:
        raise InvalidGpuRequest(f"gpus must be >= 0, got {gpus}")
    container: dict[str, Any] = {}
    pod: dict[str, Any] = {}
    if gpus > 0:
        container["resources"] = {"limits": {resource_name: str(gpus)}, "requests": {resource_name: str(gpus)}}
    if shm_size is not None:
        container["volume_mounts"] = [{"name": "dshm", "mount_path": "/dev/shm"}]
        pod["volumes"] = [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": shm_size}}]
    if node_selector:
        pod["node_selector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [{_snake(k): v for k, v in t.items()} for t in tolerations]
    return {"container_config": container, "pod_spec_config": pod}
