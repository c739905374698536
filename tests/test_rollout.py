"""The rollout (pipeline.rollout, assets/rollout.py) against real model servers: ``pipeline.serving``'s
ModelRegistry over a LocalStorage with tiny published DigitsCNN versions, behind the real HTTP app
(uvicorn on 127.0.0.1, free ports), one thread per server. A promotion moves the alias; the servers
find it themselves (poll_s), and the rollout sees them answer with the new version, or names the
one that did not (a server that never re-reads the alias, an address nobody listens on)."""

from __future__ import annotations

import socket
import time
import urllib.request
import xml.etree.ElementTree as ET

import dagster as dg
import numpy as np
import pytest

from pipeline import export, metrics, promotion, rollout, settings
from pipeline.storage import LocalStorage
from tests.serving_server import ThreadServer

SHAPE = (1, 28, 28)


def publish(store, version: str, seed: int, name: str = "digits") -> None:
    import torch

    from pipeline.models import DigitsCNN

    torch.manual_seed(seed)
    m = DigitsCNN(width=4).eval()
    golden = export.golden_outputs(m, export.golden_input(SHAPE))
    export.export(export.from_module(m, architecture="digits_cnn", model_kwargs={"width": 4}), store, name,
                  version, golden=golden)


class Server(ThreadServer):
    """A real ``forgeline serve`` app (ModelRegistry + pipeline.serving.app) in a thread."""

    def __init__(self, store, poll_s: float):
        from pipeline.serving import ModelRegistry, ServeConfig

        super().__init__(ModelRegistry(store, ServeConfig(models=["digits"], poll_s=poll_s, max_queue_delay_ms=0.5)),
                         start_timeout_s=20, drain_timeout_s=2)
        self.url = f"http://{self.url}"

    def infer(self, n: int = 3) -> None:
        x = np.zeros((1, *SHAPE), dtype=np.float32)
        body = ('{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":%s}]}'
                % x.ravel().tolist()).encode()
        for _ in range(n):
            req = urllib.request.Request(f"{self.url}/v2/models/digits/infer", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200


def closed_port_url() -> str:
    with socket.socket() as s:  # bound, never listening, then closed: connection refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = LocalStorage(tmp_path_factory.mktemp("rollout") / "store")
    publish(store, "v1", 1)
    publish(store, "v2", 2)
    promotion.promote(store, "digits", "v1")
    return store


@pytest.fixture(scope="module")
def servers(store):
    """Two servers that follow the alias quickly and one that never re-reads it (lagging)."""
    with Server(store, 0.05) as a, Server(store, 0.05) as b, Server(store, 3600) as lagging:
        rollout.wait_for_version([a.url, b.url, lagging.url], "digits", "v1", timeout_s=30, poll_s=0.05)
        yield a, b, lagging


def test_probe_reads_version_since_requests_and_p99(servers):
    a, _, _ = servers
    a.infer(4)
    s = rollout.probe(a.url, "digits")
    assert s.ok and s.version == "v1" and s.production == "v1" and s.state == "READY"
    assert s.since and s.since.endswith("+00:00")  # the UTC time v1 took traffic
    assert s.requests >= 4 and 0 < s.p50_ms <= s.p99_ms
    # the numbers come from the server's /metrics, parsed as `forgeline serve status` parses them
    text = urllib.request.urlopen(f"{a.url}/metrics", timeout=10).read().decode()
    row = metrics.served_summary(text)["digits"]
    assert row["requests"] >= s.requests and row["requests_by_result"].get("ok", 0) >= 4


def test_probe_of_an_unreachable_server_or_unknown_model_is_a_state_not_an_exception(servers):
    down = closed_port_url()
    s = rollout.probe(down, "digits", timeout_s=2)
    assert not s.ok and "cannot read /v2/models/digits" in s.error and "refused" in s.error.lower()
    s = rollout.probe(servers[0].url, "nope", timeout_s=2)
    assert not s.ok and "HTTP 404" in s.error and "nope" in s.error


def test_rollout_fails_naming_the_lagging_and_the_unreachable_server_then_succeeds(store, servers):
    a, b, lagging = servers
    down = closed_port_url()
    promotion.promote(store, "digits", "v2")
    try:
        with pytest.raises(rollout.RolloutError) as e:
            rollout.wait_for_version([a.url, lagging.url, down], "digits", "v2", timeout_s=3, poll_s=0.05,
                                     request_timeout_s=1)
        msg = str(e.value)
        assert f"{lagging.url}: serves digits/v1" in msg and f"{down}: cannot read" in msg
        assert a.url not in msg and "2 of 3 server(s) did not serve digits/v2 within 3s" in msg
        assert [s.url for s in e.value.ready] == [a.url] and e.value.ready[0].version == "v2"
        # the two servers that follow the alias: both ready, each with its time to ready
        t0 = time.monotonic()
        res = rollout.wait_for_version([a.url, b.url], "digits", "v2", timeout_s=20, poll_s=0.05)
        assert set(res.seconds) == {a.url, b.url} and all(0 <= s <= time.monotonic() - t0 for s in res.seconds.values())
        assert all(s.version == "v2" and s.since for s in res.ready)
    finally:
        promotion.promote(store, "digits", "v1")


def test_a_rollout_interrupted_stops_at_once_not_at_its_deadline(tmp_path):
    """Ctrl-C (or a terminate) while the rollout waits on a server that accepts and never answers:
    the process ends at once; it used to wait out the rollout's whole timeout (minutes)."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as hole:  # accepts (the kernel's backlog) and never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen()
        code = (f"from pipeline.rollout import wait_for_version\n"
                f"print('waiting', flush=True)\n"
                f"wait_for_version(['http://127.0.0.1:{hole.getsockname()[1]}'], 'digits', 'v2', timeout_s=120, "
                f"poll_s=0.2, request_timeout_s=3)\n")
        repo = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "waiting"
            time.sleep(1.0)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            assert time.monotonic() - t0 < 5, "the interrupted rollout waited on"
            assert proc.returncode != 0 and "KeyboardInterrupt" in err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_no_servers_is_an_immediate_pass():
    res = rollout.wait_for_version([], "digits", "v9", timeout_s=1)
    assert res.ready == [] and res.seconds == {}
    assert rollout.survey([], "digits") == []


# ---------------------------------------------------------------------------------------------
# The assets
# ---------------------------------------------------------------------------------------------


def _ctx():
    return dg.build_asset_context(instance=dg.DagsterInstance.ephemeral())


def _assets():
    from assets import rollout as rollout_assets

    return rollout_assets


def test_model_rollout_asset_no_servers_passes_with_a_note(monkeypatch):
    ra = _assets()
    monkeypatch.delenv("FORGELINE_SERVE_URLS", raising=False)
    out = ra.model_rollout(_ctx(), ra.RolloutConfig(), {"model": "digits", "version": "v2"})
    assert out.value == {"model": "digits", "version": "v2", "servers": {}}
    assert out.metadata["servers"].value == 0 and "no servers configured" in out.metadata["note"].value


def test_model_rollout_asset_records_time_to_ready_and_fails_naming_the_server(monkeypatch, servers):
    ra = _assets()
    a, b, lagging = servers
    monkeypatch.setenv("FORGELINE_SERVE_URLS", f"{a.url},{b.url}")
    out = ra.model_rollout(_ctx(), ra.RolloutConfig(timeout_s=20, poll_s=0.05),
                           {"model": "digits", "version": "v1"})
    label = a.url.removeprefix("http://")
    assert isinstance(out.metadata[f"time_to_ready_s/{label}"].value, float)
    assert "| server |" in out.metadata["table"].value and label in out.metadata["table"].value
    monkeypatch.setenv("FORGELINE_SERVE_URLS", f"{a.url},{lagging.url}")
    with pytest.raises(dg.Failure) as e:  # nobody serves v2 while production is v1
        ra.model_rollout(_ctx(), ra.RolloutConfig(timeout_s=1, poll_s=0.05),
                         {"model": "digits", "version": "v2"})
    assert lagging.url in e.value.description and a.url in e.value.description
    assert e.value.metadata["not_ready"].value == [a.url, lagging.url]


def test_rollout_config_ranges_are_validated():
    ra = _assets()
    for bad in ({"timeout_s": 0}, {"timeout_s": 7200}, {"poll_s": 0}, {"request_timeout_s": 120}):
        with pytest.raises(Exception, match="timeout_s|poll_s"):
            ra.RolloutConfig(**bad)


def test_served_models_records_each_server_and_warns_when_one_is_off(monkeypatch, store, servers):
    from resources.storage import LocalStorageResource

    ra = _assets()
    a, _, _ = servers
    down = closed_port_url()
    a.infer(2)
    monkeypatch.setenv("FORGELINE_SERVE_URLS", f"{a.url},{down}")
    resource = LocalStorageResource(root=str(store.root))
    mat, check = list(ra.served_models(_ctx(), ra.ServedModelsConfig(request_timeout_s=2),
                                       resource))
    md, label = mat.metadata, a.url.removeprefix("http://")
    assert md["servers"] == 2 and md["reachable"] == 1 and md["production"] == "v1"
    assert md[f"version/{label}"] == "v1" and md[f"requests/{label}"] >= 2 and md[f"p99_ms/{label}"] > 0
    assert isinstance(md["p99_ms_max"], float)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN and "cannot read" in check.description
    monkeypatch.setenv("FORGELINE_SERVE_URLS", a.url)
    _, check = list(ra.served_models(_ctx(), ra.ServedModelsConfig(), resource))
    assert check.passed and check.description == "every server serves production"
    monkeypatch.delenv("FORGELINE_SERVE_URLS")  # none: the pass says that nothing was checked
    _, check = list(ra.served_models(_ctx(), ra.ServedModelsConfig(), resource))
    assert check.passed and check.description.startswith("no servers configured (FORGELINE_SERVE_URLS)")


def test_a_server_that_cannot_read_the_alias_is_named_by_probe_and_served_models(monkeypatch, tmp_path):
    """It keeps serving production, but would miss the next promotion: the probe says so, and the
    served_models check warns naming it, though the version it serves is right."""
    from resources.storage import LocalStorageResource

    ra = _assets()
    store = LocalStorage(tmp_path / "store")
    publish(store, "v1", 1)
    promotion.promote(store, "digits", "v1")
    alias = export.version_prefix("digits", "production")
    good = store.read(alias)
    with Server(store, 0.05) as s:
        rollout.wait_for_version([s.url], "digits", "v1", timeout_s=30, poll_s=0.05)
        assert rollout.probe(s.url, "digits").alias_error is None
        store.write_atomic(alias, good[: len(good) // 2])  # damaged outside forgeline
        deadline = time.monotonic() + 10
        while (state := rollout.probe(s.url, "digits")).alias_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.version == "v1" and store.uri(alias) in state.alias_error
        assert "cannot read the production alias" in state.describe()
        monkeypatch.setenv("FORGELINE_SERVE_URLS", s.url)
        # the Dagster side reads production from a store of its own whose alias is fine
        healthy = LocalStorage(tmp_path / "healthy")
        publish(healthy, "v1", 1)
        promotion.promote(healthy, "digits", "v1")
        mat, check = list(ra.served_models(_ctx(), ra.ServedModelsConfig(),
                                           LocalStorageResource(root=str(healthy.root))))
        assert mat.metadata["alias_unreadable"] == 1 and mat.metadata["production"] == "v1"
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert "cannot read the production alias" in check.description


# ---------------------------------------------------------------------------------------------
# Settings and charts
# ---------------------------------------------------------------------------------------------


def test_serve_urls_setting():
    assert settings.serve_urls({}) == [] and settings.serve_urls({"FORGELINE_SERVE_URLS": " , "}) == []
    assert settings.serve_urls({"FORGELINE_SERVE_URLS": "a:8000, https://b/ ,a:8000"}) == ["http://a:8000", "https://b"]
    for bad in ("ftp://x", "http://", "a:99999", "http://a/?x=1"):
        with pytest.raises(settings.SettingError, match="FORGELINE_SERVE_URLS"):
            settings.serve_urls({"FORGELINE_SERVE_URLS": bad})
    assert settings.reports_url({}) is None
    assert settings.reports_url({"FORGELINE_REPORTS_URL": "serving.forgeline:8000/"}) == "http://serving.forgeline:8000"


def test_line_chart_is_svg_with_one_line_per_series_and_gaps():
    svg = metrics.line_chart_svg({"train_loss": [2.3, 1.1, None, 0.2], "val_loss": [2.0, 1.0, 0.6, 0.4]},
                                 title="loss <per epoch>")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 2  # train_loss's gap leaves one run of 2 points (+ a lone point), val_loss one of 4
    assert len(root.findall(f"{ns}circle")) == 7
    assert "loss &lt;per epoch&gt;" in svg
    assert ET.fromstring(metrics.line_chart_svg({}, title="empty")) is not None
    md = metrics.svg_markdown(svg, "loss")
    assert md.startswith("![loss](data:image/svg+xml;base64,")


def test_dns_url_expands_to_every_address_and_an_unresolvable_one_is_named(servers):
    a = servers[0]
    port = a.url.rsplit(":", 1)[1]
    assert settings.serve_urls({"FORGELINE_SERVE_URLS": f"dns+http://localhost:{port}"}) == [f"dns+http://localhost:{port}"]
    urls, unresolved = rollout.expand([f"dns+http://localhost:{port}", "http://10.0.0.1:1"])
    assert f"http://127.0.0.1:{port}" in urls and urls[-1] == "http://10.0.0.1:1" and not unresolved
    res = rollout.wait_for_version([u for u in urls if u.startswith("http://127.")], "digits", "v1", timeout_s=10,
                                   poll_s=0.05)
    assert res.seconds
    bad = "dns+http://no-such-host.invalid:8000"
    urls, unresolved = rollout.expand([bad])
    assert urls == [bad] and "does not resolve" in unresolved[bad]
    with pytest.raises(rollout.RolloutError, match="no-such-host.invalid"):
        rollout.wait_for_version(urls, "digits", "v1", timeout_s=0.2, poll_s=0.05)
