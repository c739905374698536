"""The deployment for real, as far as one machine allows.

* Against a Kubernetes API emulator on 127.0.0.1 (always runs, no containers): dagster-k8s's own
  ``K8sRunLauncher`` launches a run and its ``k8s_job_executor`` (forgeline's config) launches, health-
  checks and terminates every step of ``lifecycle`` over HTTP with the official client. Every Job
  they POST must validate strictly against the Kubernetes schema and carry the GPU, /dev/shm and
  shm-tier settings.
* In the built image (``make test-deploy`` sets ``FORGELINE_TEST_IMAGE``; skipped otherwise): the
  code server answers a gRPC health check, ``forgeline serve`` answers ``/v2/health/ready``, and a
  step pod rendered from the executor config runs to completion under ``podman kube play``.

kmock (PyPI) was considered for the emulator: it is a real aiohttp Kubernetes mock, but it installs a
pytest plugin that imports pytest-asyncio at start-up (for the whole suite), and dagster-k8s's client
is synchronous; the few endpoints dagster-k8s calls are emulated here instead.
"""

import base64
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import dagster as dg
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.35.0"
NAMESPACE = "forgeline"
IMAGE = os.environ.get("FORGELINE_TEST_IMAGE", "")
GPU_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def validate(manifest: dict) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def deployed_env() -> dict[str, str]:
    """The code location's environment as the Helm values and the S3 Secret template give it."""
    secret = yaml.safe_load((DEPLOY / "k8s" / "s3-secret.yaml").read_text())
    env = dict(secret["stringData"])
    env["FORGELINE_S3_BUCKET"] = "models"
    (dep,) = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())["dagster-user-deployments"]["deployments"]
    env.update(dep["env"])
    return env


# ---------------------------------------------------------------------------------------------
# A Kubernetes API emulator: the batch/v1 Job and v1 Pod endpoints dagster-k8s uses
# ---------------------------------------------------------------------------------------------


class KubeEmulator:
    """Stores Jobs the client creates (as the API server would: uid, creationTimestamp, 409 on a
    duplicate, 404 Status on a missing one), serves them back with the status a test sets, lists
    pods by label selector, deletes. Unknown paths answer 404 and are recorded."""

    JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?(/status)?$")
    PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?$")

    def __init__(self):
        self.jobs: dict[tuple[str, str], dict] = {}
        self.created: list[dict] = []  # every Job body as POSTed, in order
        self.deleted: list[str] = []  # Jobs and pods, in order
        self.pods_seen: set[str] = set()
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        emu = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(*emu.post(urlparse(self.path).path, body))

            def do_GET(self):
                u = urlparse(self.path)
                self._send(*emu.get(u.path, parse_qs(u.query)))

            def do_DELETE(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                self._send(*emu.delete(urlparse(self.path).path))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def status(code: int, reason: str, message: str) -> tuple[int, dict]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                      "reason": reason, "message": message}

    def post(self, path, body):
        m = self.JOBS.match(path)
        if not m or m.group(2):
            self.unknown.append(f"POST {path}")
            return self.status(404, "NotFound", path)
        ns, name = m.group(1), body["metadata"]["name"]
        with self.lock:
            self.created.append(json.loads(json.dumps(body)))
            if (ns, name) in self.jobs:
                return self.status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            body["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion="1",
                                    creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            body["status"] = {"active": 1, "startTime": body["metadata"]["creationTimestamp"]}
            self.jobs[(ns, name)] = body
        return 201, body

    def get(self, path, query):
        if m := self.JOBS.match(path):
            ns, name = m.group(1), m.group(2)
            with self.lock:
                if name is None:
                    return 200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {},
                                 "items": [j for (n, _), j in self.jobs.items() if n == ns]}
                job = self.jobs.get((ns, name))
            return (200, job) if job else self.status(404, "NotFound", f'jobs.batch "{name}" not found')
        if m := self.PODS.match(path):
            ns, name = m.group(1), m.group(2)
            selector = dict(kv.split("=", 1) for kv in (query.get("labelSelector") or [""])[0].split(",") if "=" in kv)
            with self.lock:
                pods = [self.pod_of(j) for (n, _), j in self.jobs.items() if n == ns]
            if name is not None:
                (pod,) = [p for p in pods if p["metadata"]["name"] == name] or [None]
                return (200, pod) if pod else self.status(404, "NotFound", f'pods "{name}" not found')
            pods = [p for p in pods if all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]
            with self.lock:
                self.pods_seen.update(p["metadata"]["name"] for p in pods)
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods}
        self.unknown.append(f"GET {path}")
        return self.status(404, "NotFound", path)

    def delete(self, path):
        if (m := self.PODS.match(path)) and m.group(2):
            # Pods exist while their Job does; dagster-k8s deletes a step's pods after its Job.
            with self.lock:
                known = m.group(2) in self.pods_seen
                self.pods_seen.discard(m.group(2))
            if not known:
                return self.status(404, "NotFound", f'pods "{m.group(2)}" not found')
            self.deleted.append(m.group(2))
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": m.group(2)}}
        m = self.JOBS.match(path)
        if not m or not m.group(2):
            self.unknown.append(f"DELETE {path}")
            return self.status(404, "NotFound", path)
        with self.lock:
            job = self.jobs.pop((m.group(1), m.group(2)), None)
        if not job:
            return self.status(404, "NotFound", f'jobs.batch "{m.group(2)}" not found')
        self.deleted.append(m.group(2))
        return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": m.group(2)}}

    @staticmethod
    def pod_of(job: dict) -> dict:
        t = job["spec"]["template"]
        labels = {**(t.get("metadata") or {}).get("labels", {}), "job-name": job["metadata"]["name"]}
        phase = "Succeeded" if job["status"].get("succeeded") else "Failed" if job["status"].get("failed") else "Running"
        return {"kind": "Pod", "apiVersion": "v1", "spec": t["spec"], "status": {"phase": phase},
                "metadata": {"name": job["metadata"]["name"] + "-abcde", "namespace": job["metadata"]["namespace"],
                             "labels": labels, "uid": str(uuid.uuid4())}}

    def finish(self, name: str, ok: bool = True) -> None:
        """What the Job controller would write once the pod exits."""
        with self.lock:
            (job,) = [j for (_, n), j in self.jobs.items() if n == name]
            job["status"] = {"active": 0, "succeeded" if ok else "failed": 1}

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": NAMESPACE}}],
        }))
        return path

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def check_step_job(job: dict, op: str, gpu: set, tier: set) -> None:
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    limits = c["resources"].get("limits", {})
    assert {"secretRef": {"name": "forgeline-s3"}} in c["envFrom"], op
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001, op
    if op in gpu:
        assert limits["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1", op
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"], op
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], op
        assert pod["nodeSelector"] == GPU_SELECTOR and GPU_TOLERATION in pod["tolerations"], op
    else:
        assert "nvidia.com/gpu" not in limits and not any(v["name"] == "dshm" for v in pod.get("volumes") or []), op
    if op in tier:
        (vol,) = [v for v in pod["volumes"] if v["name"] == "shm-tier"]
        assert vol["hostPath"] == {"path": "/dev/shm/forgeline", "type": "Directory"}, op
        assert {"name": "shm-tier", "mountPath": "/dev/shm/forgeline"} in c["volumeMounts"], op


def test_run_launcher_and_step_executor_against_a_kubernetes_api(tmp_path, monkeypatch):
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
    from dagster._core.execution.context_creation_job import create_context_free_log_manager
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.executor.step_delegating import StepHandlerContext
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.test_utils import instance_for_test
    from dagster._config import process_config
    from dagster._grpc.types import ExecuteStepArgs
    from dagster_k8s import K8sRunLauncher, k8s_job_executor

    from jobs.definitions import defs
    from jobs.executor import gpu_steps, k8s_executor_config, shm_steps
    from resources.gpu import gpu_pool_from_env

    env = deployed_env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HOSTNAME", raising=False)  # not in a pod: no owner references to look up
    image = "registry.example/forgeline:test"

    with KubeEmulator() as kube, instance_for_test(overrides={"run_launcher": {
        "module": "dagster_k8s", "class": "K8sRunLauncher", "config": {
            "load_incluster_config": False, "kubeconfig_file": str(kube.kubeconfig(tmp_path / "kubeconfig")),
            "service_account_name": "dagster", "instance_config_map": "dagster-instance",
            "postgres_password_secret": "dagster-postgresql-secret", "dagster_home": "/opt/dagster/dagster_home",
            "job_namespace": NAMESPACE, "job_image": image}}}) as instance:
        assert isinstance(instance.run_launcher, K8sRunLauncher)
        recon_job = ReconstructableRepository.for_module("jobs.definitions", "defs", str(ROOT)) \
            .get_reconstructable_job("lifecycle")
        job_def = recon_job.get_definition()
        plan = create_execution_plan(recon_job)
        run = instance.create_run_for_job(job_def=job_def, execution_plan=plan,
                                          job_code_origin=recon_job.get_python_origin())

        # The run launcher: one run-worker Job.
        instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
        (run_job,) = kube.created
        validate(run_job)
        (c,) = run_job["spec"]["template"]["spec"]["containers"]
        assert c["image"] == image and c["args"][:3] == ["dagster", "api", "execute_run"]
        assert run_job["metadata"]["labels"]["dagster/run-id"] == run.run_id
        run = instance.get_run_by_id(run.run_id)
        assert instance.run_launcher.check_run_worker_health(run).status.value == "RUNNING"
        kube.finish(run_job["metadata"]["name"])
        assert instance.run_launcher.check_run_worker_health(run).status.value == "SUCCESS"

        # The executor, configured as the code location configures it, launches every step.
        pool = gpu_pool_from_env(env)
        cfg = process_config(k8s_job_executor.config_schema.config_type, k8s_executor_config(pool, defs.assets, env))
        assert cfg.success, cfg.errors
        executor = k8s_job_executor.executor_creation_fn(InitExecutorContext(
            job=recon_job, executor_def=k8s_job_executor, executor_config=cfg.value, instance=instance))
        handler = executor._step_handler
        plan_ctx = PlanOrchestrationContext(
            plan_data=PlanData(job=recon_job, dagster_run=run, instance=instance, execution_plan=plan,
                               raise_on_error=True),
            log_manager=create_context_free_log_manager(instance, run), executor=executor, output_capture=None)

        gpu, tier = set(gpu_steps(defs.assets, pool.pool)), set(shm_steps(defs.assets, pool.pool))
        steps = {s.key: s for s in plan.steps}
        assert gpu | tier <= {s.op_name for s in plan.steps}
        names = {}
        for key, step in steps.items():
            ctx = StepHandlerContext(instance=instance, plan_context=plan_ctx, steps=[step], dagster_run=run,
                                     execute_step_args=ExecuteStepArgs(
                                         job_origin=recon_job.get_python_origin(), run_id=run.run_id,
                                         step_keys_to_execute=[key], instance_ref=instance.get_ref()))
            events = list(handler.launch_step(ctx))
            assert events and events[0].event_type_value == "STEP_WORKER_STARTING", key
            job = kube.created[-1]
            validate(job)
            assert job["metadata"]["labels"]["dagster/op"] == key
            (c,) = job["spec"]["template"]["spec"]["containers"]
            assert c["image"] == image and c["args"][:3] == ["dagster", "api", "execute_step"], key
            check_step_job(job, step.op_name, gpu, tier)
            names[key] = (job["metadata"]["name"], ctx)
        assert len(kube.created) == 1 + len(steps)

        # Health: running, then one step's Job fails and the executor notices; terminate deletes.
        (first, (name, ctx)) = next(iter(names.items()))
        assert handler.check_step_health(ctx).is_healthy
        kube.finish(name, ok=False)
        health = handler.check_step_health(ctx)
        assert not health.is_healthy and name in health.unhealthy_reason
        list(handler.terminate_step(ctx))
        assert kube.deleted[0] == name and all(n.startswith(name) for n in kube.deleted)
        assert not handler.check_step_health(ctx).is_healthy  # gone: "could not be found"
        assert kube.unknown == [], kube.unknown


# ---------------------------------------------------------------------------------------------
# The built image, run with podman (make test-deploy)
# ---------------------------------------------------------------------------------------------

needs_image = pytest.mark.skipif(not IMAGE, reason="no image: `make test-deploy` builds one and sets FORGELINE_TEST_IMAGE")


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ...: rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def container():
    """Starts containers (host network, as podman is configured here) and removes them after."""
    names = []

    def start(*args: str, env: dict | None = None) -> str:
        name = f"forgeline-test-{uuid.uuid4().hex[:8]}"
        names.append(name)
        envs = [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
        podman("run", "-d", "--name", name, *envs, IMAGE, *args)
        return name

    yield start
    for name in names:
        podman("rm", "-f", "-t", "0", name, check=False)


def wait_for(what: str, probe, name: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        state = podman("inspect", "-f", "{{.State.Status}}", name, check=False).stdout.strip()
        if state in ("exited", "stopped"):
            break
        time.sleep(2)
    logs = podman("logs", name, check=False)
    raise AssertionError(f"{what} did not come up in {timeout_s:.0f}s\n{logs.stdout[-4000:]}\n{logs.stderr[-4000:]}")


@needs_image
def test_code_server_answers_grpc_health_check(container):
    """The image's own CMD (the code server) with the environment the Helm values give it; the
    port is moved off 3030 because containers share the host's network here."""
    cmd = json.loads(podman("image", "inspect", "--format", "{{json .Config.Cmd}}", IMAGE).stdout)
    assert cmd[:3] == ["dagster", "api", "grpc"] and "jobs.definitions" in cmd, cmd
    port = free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    name = container(*cmd, env=deployed_env())

    def healthy() -> bool:
        out = podman("exec", name, "dagster", "api", "grpc-health-check", "--host", "127.0.0.1", "--port", str(port),
                     check=False, timeout=60)
        return out.returncode == 0

    wait_for("the code server", healthy, name)
    user = podman("exec", name, "id", "-u").stdout.strip()
    assert user == "10001"


@needs_image
def test_model_server_is_ready(container):
    port = free_port()
    name = container("forgeline", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-shm")

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for("forgeline serve", ready, name)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2", timeout=5) as r:
        assert "name" in json.loads(r.read())


# What the step pod runs instead of `dagster api execute_step` (which needs the run in a shared
# instance and the model store): it loads the code location with the step's own environment, as
# execute_step does first, and reports what the pod spec gave it.
STEP_PROBE = r"""
import json, os
import jobs.definitions
mounts = {l.split()[1]: l.split() for l in open("/proc/mounts")}
st = os.statvfs("/dev/shm")
tier = os.environ.get("FORGELINE_SHM_ROOT") or "/dev/shm/forgeline"
out = {"uid": os.getuid(), "gid": os.getgid(), "shm_fs": mounts.get("/dev/shm", ["", "", ""])[2],
       "shm_bytes": st.f_blocks * st.f_frsize, "step": os.environ.get("DAGSTER_RUN_STEP_KEY"),
       "s3_env": "AWS_ACCESS_KEY_ID" in os.environ, "tier_mounted": tier in mounts}
if out["tier_mounted"]:
    p = os.path.join(tier, ".probe"); open(p, "w").write("x"); os.remove(p); out["tier_writable"] = True
print("PROBE " + json.dumps(out))
"""


@needs_image
def test_step_pods_run_under_kube_play(tmp_path):
    """Step pods as dagster-k8s renders them from forgeline's executor config (a GPU step and the
    shm-tier step), each Job's pod template turned into a Pod and run with `podman kube play`. Local
    substitutions only: the image, the command (STEP_PROBE), the tier's host directory (a temporary
    one), and podman drops what it cannot schedule on (GPU limits, node selector, tolerations)."""
    from test_deploy import dagster_k8s_step_job  # the Job dagster-k8s's K8sStepHandler creates

    from jobs.definitions import defs
    from jobs.executor import k8s_executor_config
    from resources.gpu import gpu_pool_from_env

    tier_dir = tmp_path / "tier"
    tier_dir.mkdir()
    os.chown(tier_dir, 10001, 10001)
    env = {**deployed_env(), "FORGELINE_K8S_SHM_TIER_HOST_PATH": str(tier_dir)}
    cfg = k8s_executor_config(gpu_pool_from_env(env), defs.assets, env)
    secret = yaml.safe_load((DEPLOY / "k8s" / "s3-secret.yaml").read_text())
    # The chart's Postgres password Secret, which dagster-k8s gives every step as DAGSTER_PG_PASSWORD.
    pg_secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dagster-postgresql-secret"},
                 "stringData": {"postgresql-password": "test"}}
    instance_cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dagster-instance"},
                   "data": {"dagster.yaml": "telemetry:\n  enabled: false\n"}}
    (tmp_path / "configmap.yaml").write_text(yaml.safe_dump(instance_cm))
    for op, gpu in (("preprocessed", True), ("shm_prewarm", False)):
        job = dagster_k8s_step_job(cfg, op)
        name = f"forgeline-step-{op.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": job["spec"]["template"]["metadata"]["labels"]},
               "spec": json.loads(json.dumps(job["spec"]["template"]["spec"]))}
        validate(pod)
        (c,) = pod["spec"]["containers"]
        # podman 4.3's kube parser breaks on a multi-line string: the probe goes in base64.
        probe = base64.b64encode(STEP_PROBE.encode()).decode()
        c.update(image=IMAGE, imagePullPolicy="Never", args=[],
                 command=["python", "-c", f"import base64; exec(base64.b64decode('{probe}'))"])
        manifest = tmp_path / f"{op}.yaml"
        # podman 4.3's kube play cannot read Secrets back for envFrom/secretKeyRef (it stores a
        # Secret's text and fails to decode it): the Secrets' values go in as plain env instead.
        secrets = {s["metadata"]["name"]: s["stringData"] for s in (secret, pg_secret)}
        env = [e for e in c.get("env", []) if "valueFrom" not in e or "secretKeyRef" not in e["valueFrom"]]
        env += [{"name": e["name"], "value": secrets[e["valueFrom"]["secretKeyRef"]["name"]][e["valueFrom"]["secretKeyRef"]["key"]]}
                for e in c.get("env", []) if "secretKeyRef" in (e.get("valueFrom") or {})]
        for ref in c.pop("envFrom", []):
            env += [{"name": k, "value": v} for k, v in secrets[ref["secretRef"]["name"]].items()]
        c["env"] = env
        manifest.write_text(yaml.safe_dump(pod))
        try:
            podman("kube", "play", "--network", "host", "--configmap", str(tmp_path / "configmap.yaml"), str(manifest))
            ctr = f"{name}-{c['name']}"
            rc = podman("wait", ctr, timeout=300).stdout.strip()
            logs = podman("logs", ctr, check=False)
            assert rc == "0", f"step pod {op} exited {rc}\n{logs.stdout[-4000:]}\n{logs.stderr[-4000:]}"
            (line,) = [ln for ln in logs.stdout.splitlines() if ln.startswith("PROBE ")]
            got = json.loads(line[6:])
            assert got["uid"] == got["gid"] == 10001 and got["step"] == op and got["s3_env"], got
            if gpu:
                # The pod's dshm volume is mounted over /dev/shm (not the runtime's 64 MiB default).
                # podman 4.3 backs every emptyDir with a disk volume, medium: Memory included, so the
                # tmpfs and its 16Gi sizeLimit are only checked in the manifests here (test_deploy).
                assert got["shm_bytes"] > 64 * 2**20, got
            else:
                assert got["tier_mounted"] and got["tier_writable"], got
        finally:
            podman("kube", "down", str(manifest), check=False)
