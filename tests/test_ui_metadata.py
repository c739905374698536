"""What the Dagster UI shows for training and drift: curves as inline SVG charts (Markdown
metadata with a data URI: Dagster's Markdown renderer allows ``data:`` image sources), per-epoch
latency as floats, the most drifted columns as a Markdown table, and the drift report as a link
a browser opens, served by ``forgeline serve`` at ``GET /reports/{path}`` from storage (under
the drift reports prefix only)."""

from __future__ import annotations

import base64
import re
import urllib.request
import xml.etree.ElementTree as ET

import dagster as dg
import pytest

from pipeline import drift
from pipeline.storage import LocalStorage
from tests.serving_server import ThreadServer

SVG = "{http://www.w3.org/2000/svg}"


def _svgs(markdown: str) -> list[ET.Element]:
    return [ET.fromstring(base64.b64decode(b)) for b in re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)",
                                                                  markdown)]


def test_training_curves_are_two_charts_one_line_per_series():
    from assets.train import training_curves

    hist = [{"train_loss": 2.0 / (e + 1), "val_loss": 2.1 / (e + 1), "val_acc": 0.5 + e / 40, "seconds": 1.0}
            for e in range(15)]
    md = training_curves(hist)
    assert md.count("![") == 2 and "loss per epoch" in md and "accuracy per epoch" in md
    loss, acc = _svgs(md)
    assert len(loss.findall(f"{SVG}polyline")) == 2 and len(acc.findall(f"{SVG}polyline")) == 1
    assert len(loss.findall(f"{SVG}circle")) == 30
    assert len(_svgs(training_curves([{"train_loss": 1.0, "seconds": 1.0}]))) == 1  # no accuracy recorded


def _result(scores: dict, methods: dict, drifted: list[str], key: str) -> drift.DriftResult:
    return drift.DriftResult(view="table", share=len(drifted) / len(scores), drifted=drifted, scores=scores,
                             methods=methods, rows_reference=100, rows_current=50, verdict="warn", report_key=key,
                             reference={"model": "digits", "version": "v1"})


def test_most_drifted_columns_table_ranks_pvalues_and_distances_by_distance_past_threshold():
    from assets.drift import most_drifted_table

    ks, ws = "K-S p_value (threshold 0.05)", "Wasserstein distance (normed) (threshold 0.1)"
    scores = {"a": 0.04, "b": 0.0001, "c": 0.5, "d": 0.12, "e": 0.9, "f": 0.05, "g|x": 0.3}
    methods = {"a": ks, "b": ks, "c": ws, "d": ws, "e": ks, "f": ws, "g|x": ks}
    md = most_drifted_table(_result(scores, methods, ["a", "b", "c", "d"], "k"))
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines()[2:7]]
    # b: 0.05/0.0001 = 500x, c: 0.5/0.1 = 5x, a: 1.25x, d: 1.2x; then undrifted: f 0.5x, g|x 0.17x, e 0.06x
    assert rows == ["b", "c", "a", "d", "f"]
    assert "2 more column(s)" in md and md.splitlines()[0].startswith("| column | drifted |")


def test_drift_check_metadata_links_the_report_over_http_when_reports_url_is_set(monkeypatch, tmp_path):
    from assets import drift as drift_assets

    store = LocalStorage(tmp_path / "store")
    key = drift.report_key("table", "digits-0002", {"model": "digits", "version": "v1"})
    r = _result({"a": 0.001, "b": 0.9}, {"a": "K-S p_value (threshold 0.05)", "b": "K-S p_value (threshold 0.05)"},
                ["a"], key)
    monkeypatch.delenv("FORGELINE_REPORTS_URL", raising=False)
    md = drift_assets._result(store, r).metadata
    assert isinstance(md["report"], dg.PathMetadataValue) and md["report"].value == store.uri(key)
    assert "| a | yes |" in md["most_drifted"].value
    monkeypatch.setenv("FORGELINE_REPORTS_URL", "http://serving.forgeline:8000/")
    link = drift_assets._result(store, r).metadata["report"]
    assert isinstance(link, dg.UrlMetadataValue)
    assert link.value == "http://serving.forgeline:8000/reports/digits-0002/table-vs-digits-v1.html"


# ---------------------------------------------------------------------------------------------
# GET /reports/{path} on the model server
# ---------------------------------------------------------------------------------------------


class _Registry:
    """The least of the serving core's interface the app needs here, over a real store."""

    def __init__(self, store):
        self.store = store

    async def start(self):
        pass

    async def stop(self, drain_timeout_s=30.0):
        pass

    def live(self):
        return True

    def ready(self):
        return True


@pytest.fixture
def reports(tmp_path):
    store = LocalStorage(tmp_path / "store")
    key = drift.report_key("table", "digits-0002", {"model": "digits", "version": "v1"})
    store.write_atomic(key, b"<html><body>drift report</body></html>")
    store.write_atomic("models/digits/v1/secret.html", b"SECRET-WEIGHTS")
    (tmp_path / "outside.html").write_bytes(b"outside the store")
    return store, key


class _Server(ThreadServer):
    """The real app (pipeline.serving.app.make_server) on 127.0.0.1 in a thread."""

    def __init__(self, registry):
        super().__init__(registry, drain_timeout_s=1)

    def get(self, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
        """One request with ``path`` sent exactly as written (no client-side normalization)."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


def test_reports_route_serves_drift_reports_and_nothing_else(reports):
    from pipeline.serving.app import REPORTS_PREFIX

    assert REPORTS_PREFIX == drift.REPORT_PREFIX
    store, key = reports
    with _Server(_Registry(store)) as srv:
        status, headers, body = srv.get("/reports/digits-0002/table-vs-digits-v1.html")
        assert status == 200 and body == b"<html><body>drift report</body></html>"
        assert headers["content-type"].startswith("text/html") and headers["x-content-type-options"] == "nosniff"
        for bad in ("/reports/../models/digits/v1/secret.html", "/reports/%2e%2e/models/digits/v1/secret.html",
                    "/reports/..%2fmodels/digits/v1/secret.html", "/reports/digits-0002/../../../outside.html",
                    "/reports/digits-0002/..%2f..%2f..%2foutside.html", "/reports/%2fetc/passwd.html",
                    "/reports/digits-0002%5c..%5csecret.html", "/reports/.hidden.html", "/reports//x.html",
                    "/reports/digits-0002/table-vs-digits-v1.py", "/reports/digits-0002/missing.html", "/reports/",
                    "/reports/digits-0002/table-vs-digits-v1.html%00.html"):
            status, _, body = srv.get(bad)
            assert status == 404, (bad, status, body)
            assert b"SECRET-WEIGHTS" not in body and b"outside the store" not in body
        assert srv.get("/reports/digits-0002/table-vs-digits-v1.html", "POST")[0] == 405
        assert b'endpoint="report"' in srv.get("/metrics")[2]
    with _Server(type("NoStore", (_Registry,), {"store": None})(None)) as srv:
        assert srv.get("/reports/digits-0002/table-vs-digits-v1.html")[0] == 404


def test_the_link_in_the_metadata_opens_the_report_from_a_running_server(monkeypatch, reports):
    from assets import drift as drift_assets

    store, key = reports
    with _Server(_Registry(store)) as srv:
        monkeypatch.setenv("FORGELINE_REPORTS_URL", f"127.0.0.1:{srv.port}")
        link = drift_assets.report_link(store, key)
        with urllib.request.urlopen(link.value, timeout=10) as r:
            assert r.read() == store.read(key)
