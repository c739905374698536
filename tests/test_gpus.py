"""GPU pool: discovery, per-device leases across processes, CPU fallback, sampling, k8s config.

Runs on CPU: locking is tested with injected fake devices (the lock files and flocks are real),
NVML code paths with a fake ``pynvml`` module. The ``gpu``-marked test needs a CUDA device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import dagster as dg
import pytest

from pipeline import gpus
from pipeline.gpus import Device, GpuPoolBusy, InvalidGpuRequest, UtilizationSampler, acquire, discover
from resources import GpuPoolResource

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3
FAKE = [Device(i, f"GPU-fake-{i:04d}-aaaa", "Fake H100", 80 * GiB, (9, 0)) for i in range(4)]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# --------------------------------------------------------------------------- discovery


@pytest.mark.skipif(_cuda(), reason="this host has a CUDA GPU")
def test_discover_finds_nothing_without_gpu_and_does_not_raise():
    assert discover() == []


def test_discover_survives_broken_nvml(monkeypatch):
    broken = types.ModuleType("pynvml")

    def init():
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    monkeypatch.setattr(gpus, "_discover_torch", lambda: [])
    assert discover() == []


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: devices from FAKE, scripted utilization and memory."""

    def __init__(self, devices=FAKE, util=(40, 90), used=(GiB, 3 * GiB)):
        super().__init__("pynvml")
        self.devices, self.util, self.used = list(devices), util, used
        self.inits = 0
        self.calls = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.inits -= 1

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.devices[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return next(d for d in self.devices if d.uuid == uuid)

    def nvmlDeviceGetUUID(self, h):
        return h.uuid.encode()  # old pynvml returns bytes

    def nvmlDeviceGetName(self, h):
        return h.name

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h.compute_capability

    def nvmlDeviceGetMemoryInfo(self, h):
        self.calls += 1
        used = self.used[self.calls % len(self.used)]
        return types.SimpleNamespace(total=h.memory_total, used=used, free=h.memory_total - used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=self.util[self.calls % len(self.util)], memory=0)


def test_discover_via_nvml_and_cuda_visible_devices(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert discover() == FAKE
    assert fake.inits == 0  # every init paired with a shutdown

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert [d.index for d in discover()] == [2, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-0003,fake-0001")  # UUID prefixes
    assert [d.index for d in discover()] == [3, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7,2")  # CUDA stops at the first invalid entry
    assert [d.index for d in discover()] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert discover() == []


# --------------------------------------------------------------------------- leases


def test_cpu_lease_without_gpu(tmp_path):
    lease = acquire(devices=[], cpu_ranks=3, lock_dir=tmp_path)
    assert (lease.world_size, lease.backend, lease.device_type) == (3, "gloo", "cpu")
    assert lease.env()["CUDA_VISIBLE_DEVICES"] == ""
    assert lease.devices == [] and list(tmp_path.iterdir()) == []  # nothing to lock
    with lease:
        pass
    lease.release()  # idempotent
    if not _cuda():
        auto = acquire(2, cpu_ranks=4, lock_dir=tmp_path)  # discovery finds nothing here
        assert (auto.world_size, auto.backend) == (4, "gloo")


def test_leases_in_one_process_are_disjoint(tmp_path):
    a = acquire(2, devices=FAKE, lock_dir=tmp_path, label="a")
    b = acquire(2, devices=FAKE, lock_dir=tmp_path, label="b")
    assert {d.uuid for d in a.devices}.isdisjoint(d.uuid for d in b.devices)
    assert (a.world_size, a.backend, a.device_type) == (2, "nccl", "cuda")
    assert a.env()["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0000-aaaa,GPU-fake-0001-aaaa"
    assert (tmp_path / "gpu-GPU-fake-0000-aaaa.lock").exists()

    with pytest.raises(GpuPoolBusy) as exc:
        acquire(1, devices=FAKE, lock_dir=tmp_path)
    assert f"pid {os.getpid()}" in str(exc.value) and "(a)" in str(exc.value)
    assert set(exc.value.holders) == {d.uuid for d in FAKE}

    a.release()
    a.release()  # idempotent
    with acquire(2, devices=FAKE, lock_dir=tmp_path) as c:
        assert [d.index for d in c.devices] == [0, 1]
    assert c.released
    b.release()


def test_count_none_takes_every_free_allowed_device(tmp_path):
    with acquire(1, devices=FAKE, allowed=[1, 2, 3], lock_dir=tmp_path) as first:
        assert [d.index for d in first.devices] == [1]
        with acquire(devices=FAKE, allowed=[1, 2, 3], lock_dir=tmp_path) as rest:
            assert [d.index for d in rest.devices] == [2, 3] and rest.world_size == 2
            with pytest.raises(GpuPoolBusy, match="wanted any of 3 allowed"):
                acquire(devices=FAKE, allowed=[1, 2, 3], lock_dir=tmp_path)


def test_impossible_requests_fail_clearly(tmp_path):
    with pytest.raises(InvalidGpuRequest, match=r"asked for 3 GPU\(s\) but only 2 allowed"):
        acquire(3, devices=FAKE, allowed=[0, 1], lock_dir=tmp_path, timeout_s=30)
    with pytest.raises(InvalidGpuRequest, match=r"\[7\] do not exist"):
        acquire(1, devices=FAKE, allowed=[0, 7], lock_dir=tmp_path)
    with pytest.raises(InvalidGpuRequest, match="count must be >= 1"):
        acquire(0, devices=FAKE, lock_dir=tmp_path)


def test_waits_for_a_device_to_free_up_then_times_out(tmp_path):
    held = acquire(1, devices=FAKE[:1], lock_dir=tmp_path)
    threading.Timer(0.4, held.release).start()
    t0 = time.monotonic()
    with acquire(1, devices=FAKE[:1], lock_dir=tmp_path, timeout_s=5, poll_s=0.05) as lease:
        waited = time.monotonic() - t0
        assert 0.3 < waited < 3 and lease.devices == FAKE[:1]
        t0 = time.monotonic()
        with pytest.raises(GpuPoolBusy, match="waiting 0.5s"):
            acquire(1, devices=FAKE[:1], lock_dir=tmp_path, timeout_s=0.5, poll_s=0.05)
        assert 0.45 < time.monotonic() - t0 < 3


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pipeline.gpus import Device, acquire
    devices = [Device(i, f"GPU-fake-{i:04d}-aaaa", "Fake H100", 1, (9, 0)) for i in range(2)]
    lease = acquire(1, devices=devices, lock_dir=sys.argv[1], label="run-in-child")
    print("held", lease.devices[0].index, flush=True)
    sys.stdin.readline()  # hold until the test says so (or kills us)
    """
)


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_lease_in_another_process_blocks_the_device_until_it_ends(tmp_path, ending):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().split() == ["held", "0"]
        devices = [Device(0, "GPU-fake-0000-aaaa", "Fake H100", 1, (9, 0))]
        with pytest.raises(GpuPoolBusy) as exc:
            acquire(1, devices=devices, lock_dir=tmp_path, timeout_s=0.2, poll_s=0.05)
        msg = str(exc.value)
        assert f"pid {child.pid}" in msg and "run-in-child" in msg and "GPU 0 (GPU-fake-0000-aaaa)" in msg
        assert exc.value.holders["GPU-fake-0000-aaaa"]["pid"] == child.pid
        with acquire(1, devices=FAKE[:2], lock_dir=tmp_path) as other:  # the other device is free
            assert other.devices == [FAKE[1]]

        if ending == "sigkill":
            child.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the flock
        else:
            child.stdin.write("\n")
            child.stdin.flush()
        child.wait(timeout=10)
        with acquire(1, devices=devices, lock_dir=tmp_path) as lease:  # no stale lock
            assert lease.devices == devices
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --------------------------------------------------------------------------- sampling


def test_sampler_on_cpu_reports_cpu_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    assert UtilizationSampler().summary() == {}
    with UtilizationSampler(interval_s=0.05, devices=FAKE[:1]) as s:
        sum(i * i for i in range(200_000))
        time.sleep(0.15)
    summary = s.summary()
    assert 0 <= summary["cpu_util_mean"] <= 100 and summary["cpu_samples"] >= 2
    assert not [k for k in summary if k.startswith("gpu")]
    assert s.stop() == summary  # idempotent


def test_sampler_reads_nvml(monkeypatch):
    fake = FakeNvml(util=(40, 90), used=(GiB, 3 * GiB))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with UtilizationSampler(interval_s=0.05, devices=FAKE[:2]) as s:
        time.sleep(0.2)
    summary = s.summary()
    assert summary["gpu_util_max"] == 90 and 40 <= summary["gpu_util_mean"] <= 90
    assert summary["gpu_mem_used_max_bytes"] == 3 * GiB
    assert summary["gpu_samples"] >= 4 and "cpu_util_mean" in summary
    assert fake.inits == 0


# --------------------------------------------------------------------------- kubernetes


def test_k8s_requirements():
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]
    cfg = gpus.k8s_requirements(
        4, node_selector={"nvidia.com/gpu.product": "H100"}, tolerations=tol, shm_size="32Gi"
    )
    assert cfg["container_config"]["resources"] == {
        "limits": {"nvidia.com/gpu": "4"},
        "requests": {"nvidia.com/gpu": "4"},
    }
    assert cfg["container_config"]["volume_mounts"] == [{"name": "dshm", "mount_path": "/dev/shm"}]
    pod = cfg["pod_spec_config"]
    assert pod["node_selector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "toleration_seconds": 60}
    ]
    assert pod["volumes"] == [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "32Gi"}}]

    bare = gpus.k8s_requirements(0, resource_name="amd.com/gpu")
    assert bare == {"container_config": {}, "pod_spec_config": {}}
    assert "volumes" not in gpus.k8s_requirements(1)["pod_spec_config"]


# --------------------------------------------------------------------------- resource


def test_resource_in_build_resources(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGELINE_HOME", str(tmp_path / "home"))
    resource = GpuPoolResource(
        cpu_ranks=3,
        k8s_node_selector={"pool": "gpu"},
        k8s_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    monkeypatch.setattr(gpus, "discover", lambda: [])
    with dg.build_resources({"gpu_pool": resource}) as res:
        pool = res.gpu_pool
        assert pool.lock_path() == tmp_path / "home" / "locks"
        assert pool.devices() == [] and pool.pool == "gpu" and pool.pool_limit() == 1
        with pool.lease("run-1") as lease, pool.sampler(lease, interval_s=0.05) as sampler:
            assert (lease.world_size, lease.backend, lease.env()["CUDA_VISIBLE_DEVICES"]) == (3, "gloo", "")
            time.sleep(0.1)
        assert "cpu_util_mean" in sampler.summary()
        cfg = pool.k8s_config(2)
        assert cfg["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
        assert cfg["pod_spec_config"]["node_selector"] == {"pool": "gpu"}
        assert cfg["pod_spec_config"]["tolerations"][0]["effect"] == "NoSchedule"
        assert cfg["pod_spec_config"]["volumes"][0]["empty_dir"]["size_limit"] == "16Gi"


def test_resource_leases_allowed_devices(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "discover", lambda: list(FAKE))
    resource = GpuPoolResource(device_ids=[1, 2, 3], gpus_per_run=1, lock_dir=str(tmp_path), lease_timeout_s=0)
    with dg.build_resources({"gpu_pool": resource}) as res:
        pool = res.gpu_pool
        assert [d.index for d in pool.devices()] == [1, 2, 3] and pool.pool_limit() == 3
        leases = [pool.lease(f"run-{i}") for i in range(3)]
        assert sorted(d.index for lease in leases for d in lease.devices) == [1, 2, 3]
        with pytest.raises(GpuPoolBusy, match="run-0"):
            pool.lease("run-4")
        for lease in leases:
            lease.release()
        assert pool.k8s_config()["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}


@dg.asset(pool="gpu")
def trained(context, gpu_pool: GpuPoolResource) -> dg.MaterializeResult:
    with gpu_pool.lease(context.run.run_id) as lease, gpu_pool.sampler(lease) as sampler:
        pass
    return dg.MaterializeResult(metadata={**lease.metadata(), **sampler.summary()})


def test_gpu_asset_in_a_concurrency_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "discover", lambda: [])
    assert trained.op.pool == "gpu"
    result = dg.materialize([trained], resources={"gpu_pool": GpuPoolResource(lock_dir=str(tmp_path))})
    assert result.success
    md = result.asset_materializations_for_node("trained")[0].metadata
    assert md["backend"].value == "gloo" and md["world_size"].value == 2
    assert "cpu_util_mean" in md


# --------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_real_gpus(tmp_path):
    import torch

    found = discover()
    assert len(found) == torch.cuda.device_count() >= 1
    assert all(d.uuid.startswith(("GPU-", "MIG-")) and d.memory_total > 0 for d in found)
    with acquire(1, lock_dir=tmp_path) as lease:
        assert lease.backend == "nccl" and lease.env()["CUDA_VISIBLE_DEVICES"] == lease.devices[0].uuid
        with UtilizationSampler(interval_s=0.05, devices=lease.devices) as s:
            x = torch.randn(4096, 4096, device="cuda")
            for _ in range(20):
                x = x @ x
                x = x / x.norm()
            torch.cuda.synchronize()
            time.sleep(0.2)
    summary = s.summary()
    assert {"gpu_util_mean", "gpu_util_max", "gpu_mem_used_max_bytes", "cpu_util_mean"} <= summary.keys()
    assert summary["gpu_mem_used_max_bytes"] > 0
