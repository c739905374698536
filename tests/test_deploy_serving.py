"""deploy/k8s/serving.yaml, the serving tier, checked without a cluster: every object validates
against the Kubernetes API schema (strict, as tests/test_deploy.py does), and the pieces agree with
each other and with the code: the server's own CLI accepts the container's arguments, the probes
hit the protocol's health routes on the served port, the pods sit next to the pre-warm
DaemonSet's tier, a drain always finishes before SIGKILL, and the rollout's URL finds every pod."""

import argparse
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline import rollout, settings
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.35.0"  # as tests/test_deploy.py: strict, fields the API does not know are errors
SERVING = DEPLOY / "k8s" / "serving.yaml"


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    out = {}
    for doc in yaml.safe_load_all(SERVING.read_text()):
        if doc:
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def deployment(docs) -> dict:
    return docs[("Deployment", "forgeline-serving")]


@pytest.fixture(scope="module")
def pod(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (c,) = pod["containers"]
    return c


@pytest.fixture(scope="module")
def daemonset() -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / "shm-prewarm-daemonset.yaml").read_text())


def serve_args(container: dict) -> argparse.Namespace:
    """The container's arguments parsed by `forgeline serve`'s own parser."""
    from jobs import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers(dest="cmd"))
    assert container["command"] == ["forgeline", "serve"]
    return parser.parse_args(["serve", *container["args"]])


def test_every_object_validates_strictly(docs):
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {k for k, _ in docs} == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                    "NetworkPolicy"}
    assert all(d["metadata"]["namespace"] == "forgeline" for d in docs.values())


def test_runs_forgeline_serve_with_probes_on_the_protocol_health_routes(container):
    args = serve_args(container)
    assert args.host == "0.0.0.0" and args.device == "cuda" and args.models == ["digits"]
    (port,) = container["ports"]
    assert port["containerPort"] == args.port and port["name"] == "http"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # the first load may take minutes: liveness only counts once the startup probe passed
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_a_drain_always_finishes_before_sigkill(pod, container):
    args = serve_args(container)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + args.drain_timeout_s


def test_gpu_resources_and_non_root(pod, container):
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
    assert res["requests"]["cpu"] and res["requests"]["memory"] == res["limits"]["memory"]
    sec, csec = pod["securityContext"], container["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == 10001 and sec["seccompProfile"]["type"] == "RuntimeDefault"
    assert csec["readOnlyRootFilesystem"] is True and csec["allowPrivilegeEscalation"] is False
    assert csec["capabilities"]["drop"] == ["ALL"] and "add" not in csec["capabilities"]
    assert pod["automountServiceAccountToken"] is False
    # a read-only root: every path the server writes is a volume (FORGELINE_HOME is /var/lib/forgeline in the image)
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/var/lib/forgeline"}


def test_shares_the_prewarm_daemonsets_shm_tier_on_the_same_nodes(pod, container, daemonset):
    ds_pod = daemonset["spec"]["template"]["spec"]
    (ds_tier,) = [v for v in ds_pod["volumes"] if v["name"] == "shm-tier"]
    (tier,) = [v for v in pod["volumes"] if v["name"] == "shm-tier"]
    assert tier["hostPath"]["path"] == ds_tier["hostPath"]["path"]  # the same node directory
    assert tier["hostPath"]["type"] == "Directory"  # made and chowned by the DaemonSet, never by kubelet as root
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "shm-tier"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (ds_c,) = ds_pod["containers"]
    ds_env = {e["name"]: e["value"] for e in ds_c["env"]}
    assert mount["mountPath"] == env["FORGELINE_SHM_ROOT"] == ds_env["FORGELINE_SHM_ROOT"]
    assert not mount.get("readOnly")  # loading refreshes the tier's recency stamps
    # the same uid/gid as the tier's owner, and scheduled where the DaemonSet runs
    assert pod["securityContext"]["runAsGroup"] == ds_pod["securityContext"]["runAsGroup"]
    assert pod["nodeSelector"] == ds_pod["nodeSelector"] and pod["tolerations"] == ds_pod["tolerations"]
    assert container["envFrom"] == ds_c["envFrom"]  # the same model store


def test_services_pdb_hpa_and_network_policy_select_the_serving_pods(docs, deployment, container):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    port = container["ports"][0]["containerPort"]
    for name in ("forgeline-serving", "forgeline-serving-pods"):
        svc = docs[("Service", name)]["spec"]
        assert svc["selector"] == labels and svc["ports"][0]["targetPort"] == "http"
    headless = docs[("Service", "forgeline-serving-pods")]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    pdb = docs[("PodDisruptionBudget", "forgeline-serving")]["spec"]
    hpa = docs[("HorizontalPodAutoscaler", "forgeline-serving")]["spec"]
    assert pdb["selector"]["matchLabels"] == labels
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "forgeline-serving"}
    assert hpa["minReplicas"] > pdb["maxUnavailable"]  # a drain never takes the last server
    assert hpa["maxReplicas"] >= hpa["minReplicas"] >= 2
    netpol = docs[("NetworkPolicy", "forgeline-serving")]["spec"]
    assert netpol["podSelector"]["matchLabels"] == labels
    assert netpol["ingress"] == [{"ports": [{"protocol": "TCP", "port": port}]}]


def test_the_rollout_url_for_the_headless_service_is_a_valid_setting(docs, container):
    port = container["ports"][0]["containerPort"]
    url = f"dns+http://forgeline-serving-pods.forgeline.svc:{port}"
    assert url in SERVING.read_text()  # what the header and deploy/README.md tell operators to set
    assert settings.serve_urls({"FORGELINE_SERVE_URLS": url}) == [url]
    assert rollout.DNS_SCHEMES[0] == url.split("://")[0]
