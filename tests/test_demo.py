"""The demo's client (jobs/demo.py): fixed rate over a few threads, the v2 binary request, scoring
against its own labels, normalisation per answering version, failures counted (never raised), and
the per-phase table. Against a small stand-in v2 server; the whole demo runs in tests/test_ui_browser.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from jobs.demo import Answer, TrafficClient, phase_table


class _V2(BaseHTTPRequestHandler):
    """Answers ``/v2/models/m/infer`` as ``forgeline serve`` does (JSON outputs, ``model_version``).
    Version "v1" predicts round(sum(x)), "v2" round(sum(x) / 2); ``fail`` answers 500."""

    protocol_version = "HTTP/1.1"
    state = {"version": "v1", "fail": False, "requests": 0}

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802 - http.server's hook
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = int(self.headers["Inference-Header-Content-Length"])
        header = json.loads(body[:n])
        spec = header["inputs"][0]
        x = np.frombuffer(body[n:], dtype="<f4").reshape(spec["shape"])
        self.state["requests"] += 1
        if self.state["fail"]:
            out, code = {"error": "boom"}, 500
        else:
            version = self.state["version"]
            label = int(round(float(x.sum()) / (2 if version == "v2" else 1)))
            logits = np.eye(10, dtype=np.float32)[min(max(label, 0), 9)]
            out, code = {"model_name": "m", "model_version": version,
                         "outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 10],
                                      "data": logits.tolist()}]}, 200
        data = json.dumps(out).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    _V2.state.update(version="v1", fail=False, requests=0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _V2)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _V2.state
    httpd.shutdown()
    httpd.server_close()


def _images():
    labels = np.arange(10)
    xs = np.repeat(labels[:, None, None, None] / 4.0, 4, axis=2).reshape(10, 1, 2, 2).astype(np.float32)
    return {"clean": (xs, labels), "shifted": (xs, (labels + 1) % 10)}  # "shifted": every answer wrong


def _norm(version):
    # v2 was trained with std 0.5: the client must divide by it once v2 answers
    return np.zeros((1, 1, 1), np.float32), np.full((1, 1, 1), 0.5 if version == "v2" else 1.0, np.float32)


def test_client_scores_answers_at_a_fixed_rate_and_follows_the_answering_version(server):
    url, state = server
    client = TrafficClient(url, "m", _images(), _norm, threads=3, rate=40.0)
    client.start("v1")
    time.sleep(1.0)
    client.set_traffic("shifted")
    client.wait_idle("clean")
    idle_at = time.time()
    time.sleep(0.5)
    client.set_traffic("clean")
    client.wait_idle("shifted")
    state["version"] = "v2"
    time.sleep(1.0)
    client.stop()
    answers = client.snapshot()
    assert 80 <= len(answers) <= 115, len(answers)  # 40/s for 2.5 s, no bursts
    assert all(a.error is None for a in answers)
    clean_v1 = [a for a in answers if a.traffic == "clean" and a.version == "v1"]
    assert clean_v1 and all(a.correct for a in clean_v1)
    shifted = [a for a in answers if a.traffic == "shifted"]
    assert shifted and all(a.version == "v1" and not a.correct for a in shifted)
    assert max(a.received for a in clean_v1 if a.sent < shifted[0].sent) <= idle_at  # wait_idle waited for them
    v2 = [a for a in answers if a.version == "v2"]
    # a request sent before the client saw v2 was normalised for v1; once it has, for v2 (std 0.5)
    assert {a.normalised_for for a in v2} <= {"v1", "v2"}
    later = [a for a in v2 if a.normalised_for == "v2"]
    assert len(later) >= len(v2) - 3 and all(a.correct for a in later)


def test_failed_requests_are_counted_and_the_client_keeps_going(server):
    url, state = server
    client = TrafficClient(url, "m", _images(), _norm, threads=2, rate=40.0)
    client.start("v1")
    time.sleep(0.4)
    state["fail"] = True
    time.sleep(0.4)
    state["fail"] = False
    time.sleep(0.4)
    client.stop()
    answers = client.snapshot()
    failed = [a for a in answers if a.error is not None]
    assert failed and all("HTTP 500" in a.error and a.version is None and not a.correct for a in failed)
    assert answers[-1].error is None  # it kept going after the failures


def test_phase_table_splits_by_traffic_and_answering_version():
    from rich.console import Console

    t = 1000.0
    answers = [Answer(t, t + 0.01, "clean", "v1", True), Answer(t + 1, t + 1.02, "clean", "v1", False),
               Answer(t + 2, t + 2.01, "shifted", "v1", False), Answer(t + 3, t + 3.01, "shifted", None, False, "x"),
               Answer(t + 4, t + 4.01, "shifted", "v2", True), Answer(t + 5, t + 5.5, "shifted", None, False, "y")]
    console = Console(width=200, record=True)
    console.print(phase_table(answers, "v1", "v2", swap_at=t + 4.01))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in console.export_text().splitlines() if line.startswith("│")}
    # phase: traffic, version, from, seconds, requests, failed, accuracy, P50, P99
    assert rows["before drift"][4:7] == ["2", "0", "0.500"]
    assert rows["drift"][4:7] == ["2", "1", "0.000"]  # a failure before the swap counts in the drift
    assert rows["after swap"][1] == "v2" and rows["after swap"][4:7] == ["2", "1", "1.000"]
