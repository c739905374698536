"""The model server's HTTP side (pipeline.serving.app / protocol) driven by the official
``tritonclient.http`` client and by raw HTTP for the requests a client library would never send.

The server is real (uvicorn on 127.0.0.1, a free port); the registry behind it is ``FakeRegistry``
below, which implements the serving core's interface (pipeline.serving.registry.ModelRegistry,
whose error classes it raises) with tiny numpy "models", so these tests pin the HTTP contract on their own. The SIGTERM test runs
the server in a subprocess (``python tests/test_serving_http.py PORT``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the subprocess runs this file as a script
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# A registry with ModelRegistry's interface and numpy models
# ---------------------------------------------------------------------------------------------


from pipeline.serving.metrics import ServingMetrics  # noqa: E402 (after the sys.path line above)
from pipeline.serving.registry import InvalidInput, ModelNotFound, Unavailable  # noqa: E402
from tests.serving_server import ThreadServer  # noqa: E402


def _double(x):
    return {"y": (x["x"] * 2).astype(np.float32), "idx": np.argmax(x["x"], axis=-1).astype(np.int64)}


class FakeRegistry:
    """Models: ``double`` (x FP32 [-1,4] -> y = 2x, idx = argmax), ``echo`` (outputs = inputs,
    any numeric dtype), ``slow`` (echo after ``slow_s``), ``busy`` (always 503), ``broken``
    (raises a plain exception), ``nan`` (returns NaN)."""

    VERSION = "v1"

    def __init__(self, slow_s: float = 0.5):
        self.slow_s = slow_s
        self.metrics = ServingMetrics()
        self.loaded = {"double", "echo", "slow", "busy", "broken", "nan"}
        self.known = set(self.loaded) | {"cold"}
        self.started = self.stopped = False
        self.inflight = 0

    async def start(self):
        self.started = True

    async def stop(self, drain_timeout_s=30.0):
        self.stopped = True

    def live(self):
        return True

    def ready(self):
        return self.started and not self.stopped

    def index(self):
        return [{"name": n, "version": self.VERSION, "state": "READY" if n in self.loaded else "UNAVAILABLE",
                 "reason": "" if n in self.loaded else "unloaded"} for n in sorted(self.known)]

    def _check(self, name, version):
        if name not in self.known:
            raise ModelNotFound(f"unknown model {name!r}")
        if version not in (None, self.VERSION):
            raise ModelNotFound(f"model {name!r} has no version {version!r}")

    async def load(self, name):
        self._check(name, None)
        self.loaded.add(name)

    async def unload(self, name):
        self._check(name, None)
        self.loaded.discard(name)

    def model_ready(self, name, version=None):
        return name in self.known and version in (None, self.VERSION) and name in self.loaded

    def metadata(self, name, version=None):
        self._check(name, version)
        tensor = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        return {"name": name, "versions": [self.VERSION], "platform": "pytorch",
                "inputs": tensor, "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                                              {"name": "idx", "datatype": "INT64", "shape": [-1]}],
                "parameters": {}}

    async def infer(self, name, version, inputs):
        self._check(name, version)
        if name not in self.loaded:
            raise Unavailable(f"model {name!r} is not loaded", retry_after_s=2.5)
        t0 = time.perf_counter()
        if name == "busy":
            raise Unavailable("queue full", retry_after_s=0.2)
        if name == "broken":
            raise RuntimeError("the model fell over\nsecond line")
        if any(a.dtype == object for a in inputs.values()):
            raise InvalidInput("BYTES inputs are not supported")
        if name == "double":
            if set(inputs) != {"x"} or inputs["x"].dtype != np.float32 or inputs["x"].ndim != 2:
                raise InvalidInput("double takes x: FP32 [-1, 4]")
            out = _double(inputs)
        elif name == "nan":
            out = {"y": np.array([np.nan], dtype=np.float32)}
        else:
            if name == "slow":
                self.inflight += 1
                try:
                    await asyncio.sleep(self.slow_s)
                finally:
                    self.inflight -= 1
            out = {f"{k}_out": v for k, v in inputs.items()}
        self.metrics.observe_request(name, self.VERSION, time.perf_counter() - t0)
        return out


# ---------------------------------------------------------------------------------------------
# Server fixtures
# ---------------------------------------------------------------------------------------------

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def registry():
    return FakeRegistry(slow_s=0.3)


@pytest.fixture(scope="module")
def server(registry):
    with ThreadServer(registry, max_body_bytes=MAX_BODY, drain_timeout_s=5) as s:
        yield s


@pytest.fixture
def client(server):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(server.url, connection_timeout=10, network_timeout=10)
    yield c
    c.close()


def raw(server, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, headers, body) of one plain HTTP request."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _input(name, arr, binary=True):
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    return httpclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype)).set_data_from_numpy(
        arr, binary_data=binary)


# ---------------------------------------------------------------------------------------------
# tritonclient against the server
# ---------------------------------------------------------------------------------------------


def test_health_and_metadata(client, registry):
    assert registry.started
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "forgeline" and {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    m = client.get_model_metadata("double")
    assert m["name"] == "double" and m["versions"] == ["v1"] and m["inputs"][0]["shape"] == [-1, 4]
    assert client.get_model_metadata("double", "v1")["name"] == "double"
    assert client.is_model_ready("double") and client.is_model_ready("double", "v1")
    assert not client.is_model_ready("double", "v9") and not client.is_model_ready("nope")
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404" and "nope" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("double", "v9")
    assert e.value.status() == "404"


def test_infer_binary_default(client):
    x = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32)
    res = client.infer("double", [_input("x", x)], request_id="r1")
    np.testing.assert_array_equal(res.as_numpy("y"), x * 2)
    np.testing.assert_array_equal(res.as_numpy("idx"), x.argmax(-1))
    r = res.get_response()
    assert r["model_name"] == "double" and r["model_version"] == "v1" and r["id"] == "r1"
    assert all("binary_data_size" in o["parameters"] for o in r["outputs"])
    # by version too
    res = client.infer("double", [_input("x", x)], model_version="v1")
    np.testing.assert_array_equal(res.as_numpy("y"), x * 2)


def test_infer_json_and_mixed_outputs(client, server):
    import tritonclient.http as httpclient

    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3.5
    outs = [httpclient.InferRequestedOutput("y", binary_data=False)]
    res = client.infer("double", [_input("x", x, binary=False)], outputs=outs)
    r = res.get_response()
    assert [o["name"] for o in r["outputs"]] == ["y"] and r["outputs"][0]["data"] == (x * 2).ravel().tolist()
    np.testing.assert_array_equal(res.as_numpy("y"), x * 2)
    # one output binary, one JSON, JSON input
    outs = [httpclient.InferRequestedOutput("idx", binary_data=False), httpclient.InferRequestedOutput("y")]
    res = client.infer("double", [_input("x", x, binary=False)], outputs=outs)
    np.testing.assert_array_equal(res.as_numpy("y"), x * 2)
    np.testing.assert_array_equal(res.as_numpy("idx"), [3, 3])
    assert "data" in res.get_output("idx") and "binary_data_size" in res.get_output("y")["parameters"]
    # JSON integers past int64 for an FP32 input are numbers like any other (numpy would keep them as objects)
    st, _, out = raw(server, "POST", "/v2/models/double/infer",
                     json.dumps({"inputs": [{**_X, "data": [1, 2, 3, 2**70]}], "outputs": [{"name": "y",
                                 "parameters": {"binary_data": False}}]}))
    assert st == 200 and json.loads(out)["outputs"][0]["data"] == [2.0, 4.0, 6.0, float(np.float32(2**71))], out


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_numeric_datatype_round_trips(client, binary):
    rng = np.random.default_rng(1)
    arrays = {"b": rng.integers(0, 2, (2, 3)).astype(bool)}
    for dt in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"):
        info = np.iinfo(dt)
        a = rng.integers(0, 100, (2, 3)).astype(dt)
        a[0, 0], a[1, 2] = info.min, info.max  # the extremes survive JSON and bytes
        arrays[dt] = a
    for dt in ("float16", "float32", "float64"):
        arrays[dt] = rng.standard_normal((2, 3)).astype(dt)
    res = client.infer("echo", [_input(k, v, binary) for k, v in arrays.items()])
    for k, v in arrays.items():
        got = res.as_numpy(f"{k}_out")
        assert got.dtype == v.dtype and got.shape == v.shape, k
        np.testing.assert_array_equal(got, v)


def test_empty_and_scalar_shapes(client):
    x = np.zeros((0, 4), dtype=np.float32)
    res = client.infer("echo", [_input("x", x)])
    assert res.as_numpy("x_out").shape == (0, 4)
    res = client.infer("echo", [_input("x", x, binary=False)])
    assert res.as_numpy("x_out").shape == (0, 4)


def test_bytes_rejected_cleanly(client, server):
    from tritonclient.utils import InferenceServerException

    s = np.array([b"abc", b"de"], dtype=object)
    for binary in (True, False):
        with pytest.raises(InferenceServerException) as e:
            client.infer("echo", [_input("s", s, binary)])
        assert e.value.status() == "400" and "BYTES" in e.value.message()
    assert client.is_server_live()


def test_repository_index_load_unload(client):
    from tritonclient.utils import InferenceServerException

    index = client.get_model_repository_index()
    assert {r["name"]: r["state"] for r in index}["cold"] == "UNAVAILABLE"
    assert {r["name"] for r in index} >= {"double", "cold"}
    assert all(set(r) >= {"name", "version", "state", "reason"} for r in index)
    client.load_model("cold")
    assert client.is_model_ready("cold")
    client.unload_model("cold")
    assert not client.is_model_ready("cold")
    with pytest.raises(InferenceServerException) as e:
        client.infer("cold", [_input("x", np.zeros((1, 4), np.float32))])
    assert e.value.status() == "503"
    with pytest.raises(InferenceServerException) as e:
        client.load_model("nope")
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        client.load_model("cold", config='{"backend": "x"}')
    assert e.value.status() == "400"


def test_ready_only_index(server):
    status, _, body = raw(server, "POST", "/v2/repository/index", json.dumps({"ready": True}))
    assert status == 200
    rows = json.loads(body)
    assert rows and all(r["state"] == "READY" for r in rows) and "cold" not in {r["name"] for r in rows}


def test_concurrent_clients(server):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(server.url, concurrency=8)
    try:
        xs = [np.full((1, 4), i, dtype=np.float32) for i in range(32)]
        pending = [c.async_infer("double", [_input("x", x)]) for x in xs]
        for x, p in zip(xs, pending):
            np.testing.assert_array_equal(p.get_result().as_numpy("y"), x * 2)
    finally:
        c.close()


def test_request_compression(client):
    x = np.ones((2, 4), dtype=np.float32)
    for algo in ("gzip", "deflate"):
        res = client.infer("double", [_input("x", x)], request_compression_algorithm=algo,
                           response_compression_algorithm=algo)
        np.testing.assert_array_equal(res.as_numpy("y"), x * 2)


def test_metrics_endpoint(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.infer("double", [_input("x", np.ones((1, 4), np.float32))])
    status, headers, body = raw(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    # the HTTP side's own counters see what never reaches the registry (400s from the codec too)
    raw(server, "POST", "/v2/models/double/infer", b"{bad")
    _, _, body = raw(server, "GET", "/metrics")
    http = {(s.labels["endpoint"], s.labels["code"]): s.value
            for f in text_string_to_metric_families(body.decode()) if f.name == "forgeline_http_requests"
            for s in f.samples if s.name.endswith("_total")}
    assert http[("infer", "200")] >= 1 and http[("infer", "400")] >= 1 and http[("metrics", "200")] >= 1
    if "forgeline_serving_requests" in families:  # the core's ServingMetrics
        samples = [s for s in families["forgeline_serving_requests"].samples if s.labels.get("model") == "double"]
        assert sum(s.value for s in samples if s.name.endswith("_total")) >= 1


# ---------------------------------------------------------------------------------------------
# Bad requests: each answered with the right status and a one-line error; the server lives on
# ---------------------------------------------------------------------------------------------

_X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}


def _binary_body(header: dict, payload: bytes) -> tuple[bytes, dict]:
    h = json.dumps(header).encode()
    return h + payload, {"Inference-Header-Content-Length": str(len(h))}


BAD = {
    "malformed JSON": (b'{"inputs": [', {}, 400, "not valid JSON"),
    "not an object": (b"[1, 2]", {}, 400, "JSON object"),
    "no inputs": (b"{}", {}, 400, "inputs"),
    "empty inputs": (b'{"inputs": []}', {}, 400, "inputs"),
    "input without name": (json.dumps({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}), {}, 400, "name"),
    "no datatype": (json.dumps({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}), {}, 400, "datatype"),
    "unknown datatype": (json.dumps({"inputs": [{**_X, "datatype": "FP8"}]}), {}, 400, "unknown datatype"),
    "BF16": (json.dumps({"inputs": [{**_X, "datatype": "BF16"}]}), {}, 400, "BF16"),
    "no shape": (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}), {}, 400, "shape"),
    "bad shape": (json.dumps({"inputs": [{**_X, "shape": [1, "4"]}]}), {}, 400, "shape"),
    "negative dim": (json.dumps({"inputs": [{**_X, "shape": [-1, 4]}]}), {}, 400, "negative"),
    "no data": (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}), {}, 400, "data"),
    "shape x data mismatch": (json.dumps({"inputs": [{**_X, "shape": [2, 4]}]}), {}, 400, "needs 8 elements"),
    "ragged data": (json.dumps({"inputs": [{**_X, "data": [[1, 2], [3]]}]}), {}, 400, "ragged"),
    "strings for FP32": (json.dumps({"inputs": [{**_X, "data": ["a", "b", "c", "d"]}]}), {}, 400, "numbers"),
    "floats for INT32": (json.dumps({"inputs": [{**_X, "datatype": "INT32", "data": [1.5, 2, 3, 4]}]}), {}, 400,
                         "integers"),
    "INT8 out of range": (json.dumps({"inputs": [{**_X, "datatype": "INT8", "data": [1, 2, 3, 300]}]}), {}, 400,
                          "out of range"),
    "FP32 out of range": (json.dumps({"inputs": [{**_X, "data": [1, 2, 3, 1e39]}]}), {}, 400,
                          "value 1e+39 out of range for FP32"),
    "FP16 out of range": (json.dumps({"inputs": [{**_X, "datatype": "FP16", "data": [1, 2, 3, 70000]}]}), {}, 400,
                          "value 70000 out of range for FP16"),
    "NaN in the data": (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, NaN]}]}',
                        {}, 400, "NaN is not a JSON value"),
    "Infinity in the data": (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", '
                             b'"data": [1, 2, 3, -Infinity]}]}', {}, 400, "-Infinity is not a JSON value"),
    "1e400 in the data": (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 1e400]}]}',
                          {}, 400, "value inf out of range for a number"),
    "nested too deep": (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": '
                        + b"[" * 200_000 + b"]" * 200_000 + b"}]}", {}, 400, "JSON nested too deep"),
    "numbers for BOOL": (json.dumps({"inputs": [{**_X, "datatype": "BOOL", "data": [1, 0, 1, 0]}]}), {}, 400, "BOOL"),
    "duplicate input": (json.dumps({"inputs": [_X, _X]}), {}, 400, "twice"),
    "bad binary_data_output": (json.dumps({"inputs": [_X], "parameters": {"binary_data_output": "yes"}}), {}, 400,
                               "binary_data_output"),
    "unknown output": (json.dumps({"inputs": [_X], "outputs": [{"name": "zzz"}]}), {}, 400, "unknown output"),
    "shared memory": (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                              "parameters": {"shared_memory_region": "r"}}]}), {}, 400,
                      "shared-memory"),
    "binary size without header": (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                           "parameters": {"binary_data_size": 16}}]}), {}, 400,
                                   "Inference-Header-Content-Length"),
    "binary size != shape x dtype": (*_binary_body({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                                 "parameters": {"binary_data_size": 12}}]},
                                                   b"\0" * 12), 400, "16 bytes"),
    "binary past the end": (*_binary_body({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                       "parameters": {"binary_data_size": 16}}]}, b"\0" * 8),
                            400, "past the end"),
    "binary bytes left over": (*_binary_body({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                          "parameters": {"binary_data_size": 16}}]}, b"\0" * 20),
                               400, "add up to 16"),
    "negative binary size": (*_binary_body({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                        "parameters": {"binary_data_size": -4}}]}, b""), 400,
                             "non-negative"),
    "header length past body": (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400, "999"),
    "header length not a number": (b'{"inputs": []}', {"Inference-Header-Content-Length": "ten"}, 400, "integer"),
    "bad gzip": (b"not gzip", {"Content-Encoding": "gzip"}, 400, "gzip"),
    "unknown encoding": (b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_request(server, case):
    body, headers, status, words = BAD[case]
    st, hdrs, out = raw(server, "POST", "/v2/models/double/infer", body, {"Content-Type": "application/json",
                                                                          **headers})
    assert st == status, (st, out)
    err = json.loads(out)["error"]
    assert words in err and "\n" not in err, err
    assert raw(server, "GET", "/v2/health/live")[0] == 200


def test_a_refused_request_keeps_none_of_its_decoded_data_alive():
    """The error of a refused request carries no frame of the decoding: those frames hold the
    decoded JSON (a 60 MB body: ~0.75 GB of Python numbers), and the asyncio traceback cycle it
    sat in kept them until a full collection (the server grew by that with every such request)."""
    import traceback

    from pipeline.serving import protocol

    body = json.dumps({"inputs": [{"name": "x", "shape": [8, 4], "datatype": "FP32", "data": [[0.5] * 4] * 4}]})
    with pytest.raises(protocol.ProtocolError, match="needs 32 elements") as info:
        protocol.decode_request(body.encode())
    err = info.value
    assert err.__context__ is None and err.__cause__ is None and err.status == 400
    assert [f.f_code.co_name for f, _ in traceback.walk_tb(err.__traceback__)][-1] == "decode_request"  # no deeper


def test_an_idle_connection_outlives_uvicorns_five_seconds(server):
    """A client (or load balancer) that reuses a connection after 6 idle seconds is answered:
    uvicorn's default 5 s keep-alive closed it, and a request sent just then was lost."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().read() is not None
        sock = conn.sock
        time.sleep(6)
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().status == 200 and conn.sock is sock  # the same connection
    finally:
        conn.close()


def test_body_over_limit_is_413(server, client):
    big = json.dumps({"inputs": [{"name": "x", "shape": [MAX_BODY], "datatype": "UINT8",
                                  "data": [1] * MAX_BODY}]})
    st, _, out = raw(server, "POST", "/v2/models/double/infer", big)
    assert st == 413 and "limit" in json.loads(out)["error"]
    # chunked (no Content-Length): counted while reading
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v2/models/double/infer", body=iter([b"x" * 65536] * 20), encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413
    conn.close()
    # a gzip bomb: small on the wire, over the limit inflated
    import gzip

    bomb = gzip.compress(b" " * (MAX_BODY + 10))
    st, _, out = raw(server, "POST", "/v2/models/double/infer", bomb, {"Content-Encoding": "gzip"})
    assert st == 413
    # tritonclient sees the status too
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        client.infer("double", [_input("x", np.zeros((MAX_BODY // 16, 4), np.float32))])
    assert e.value.status() == "413"
    assert client.is_server_live()


def test_model_errors(server, client):
    from tritonclient.utils import InferenceServerException

    x = np.ones((1, 4), np.float32)
    cases = [("nope", None, "404"), ("double", "v9", "404"), ("double", "x", None), ("broken", None, "500"),
             ("busy", None, "503")]
    for name, version, status in cases:
        if status is None:
            continue
        with pytest.raises(InferenceServerException) as e:
            client.infer(name, [_input("x", x)], model_version=version or "")
        assert e.value.status() == status, (name, e.value)
        assert "\n" not in e.value.message()
    # wrong input for the model: the registry's InvalidInput
    with pytest.raises(InferenceServerException) as e:
        client.infer("double", [_input("x", np.ones((1, 4), np.float64))])
    assert e.value.status() == "400"
    # 503 carries Retry-After (rounded up to whole seconds, at least 1)
    st, headers, out = raw(server, "POST", "/v2/models/busy/infer", json.dumps({"inputs": [_X]}))
    assert st == 503 and headers["retry-after"] == "1" and json.loads(out)["error"] == "queue full"
    st, headers, _ = raw(server, "POST", "/v2/models/cold/infer", json.dumps({"inputs": [_X]}))
    assert st == 503 and headers["retry-after"] == "3"
    # NaN cannot go as JSON: a clean 500, binary works
    st, _, out = raw(server, "POST", "/v2/models/nan/infer", json.dumps({"inputs": [_X]}))
    assert st == 500 and "NaN" in json.loads(out)["error"]
    assert np.isnan(client.infer("nan", [_input("x", x)]).as_numpy("y")).all()
    assert client.is_server_live() and client.is_server_ready()


def test_routes_and_methods(server):
    st, _, out = raw(server, "GET", "/v2/nothing/here")
    assert st == 404 and "no route" in json.loads(out)["error"]
    st, _, out = raw(server, "GET", "/v2/models/double/infer")
    assert st == 405 and json.loads(out)["error"]
    st, _, out = raw(server, "POST", "/v2/repository/index", b"{bad")
    assert st == 400
    st, _, out = raw(server, "POST", "/v2/repository/index", json.dumps({"ready": "yes"}))
    assert st == 400


def test_client_gone_mid_body(server, caplog):
    # declares 4096 bytes, sends 100, hangs up: the server shrugs and answers the next request
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v2/models/double/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n" + b"{" * 100)
    time.sleep(0.2)
    assert raw(server, "GET", "/v2/health/ready")[0] == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR" and r.name == "forgeline.serving"]


def test_registry_that_cannot_start():
    from pipeline.serving.app import serve

    class Broken(FakeRegistry):
        async def start(self):
            raise RuntimeError("no storage")

    assert serve(Broken(), "127.0.0.1", _free_port(), log_level="critical") == 3
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve(FakeRegistry(), "127.0.0.1", taken.getsockname()[1], log_level="critical") == 3


# ---------------------------------------------------------------------------------------------
# SIGTERM: requests in flight complete, the process exits 0
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests():
    import gevent
    import tritonclient.http as httpclient

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=4)
        deadline = time.monotonic() + 30
        while True:
            try:
                if c.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        xs = [np.full((1, 4), i, np.float32) for i in range(4)]
        t0 = time.monotonic()
        pending = [c.async_infer("slow", [_input("x", x)]) for x in xs]
        gevent.sleep(0.4)  # (tritonclient is gevent-based) all four are inside the model, which takes 1.5 s
        proc.send_signal(signal.SIGTERM)
        results = [p.get_result(timeout=20) for p in pending]
        assert time.monotonic() - t0 >= 1.5
        for x, r in zip(xs, results):
            np.testing.assert_array_equal(r.as_numpy("x_out"), x)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "SIGTERM: draining" in out and "drained: stop called with 0 in flight" in out, out
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



# ---------------------------------------------------------------------------------------------
# forgeline serve status / flags
# ---------------------------------------------------------------------------------------------


def test_histogram_quantile():
    from pipeline.metrics import histogram_quantile

    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(1.0, 0), (float("inf"), 0)]) is None
    # 10 in (0, 1], 10 in (1, 2]: the median is the bucket edge, P75 halfway into the second
    b = [(1.0, 10), (2.0, 20), (float("inf"), 20)]
    assert histogram_quantile(0.5, b) == pytest.approx(1.0)
    assert histogram_quantile(0.75, b) == pytest.approx(1.5)
    assert histogram_quantile(0.25, b) == pytest.approx(0.5)
    # beyond the last finite bound: that bound
    assert histogram_quantile(0.99, [(1.0, 1), (float("inf"), 10)]) == 1.0


def test_serve_status_from_metrics(server, client, capsys):
    from jobs.cli import main

    for _ in range(5):
        client.infer("double", [_input("x", np.ones((1, 4), np.float32))])
    assert main(["serve", "status", "--url", f"http://{server.url}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    if "double" not in out["models"]:
        pytest.skip("the serving core's metrics module is not there")
    d = out["models"]["double"]
    assert d["requests"] >= 5 and d["versions"] == ["v1"]
    assert 0 < d["p50_ms"] <= d["p95_ms"] <= d["p99_ms"] < 1000
    assert main(["serve", "status", "--url", server.url]) == 0  # the table
    assert "double" in capsys.readouterr().out


def test_serve_status_summarizes_every_metric():
    from prometheus_client import generate_latest

    from pipeline.metrics import served_summary

    m = ServingMetrics()
    for i in range(100):
        m.observe_request("a", "v1" if i < 50 else "v2", 0.004)  # all in the (2 ms, 5 ms] bucket
    m.observe_request("a", "v2", 0.0, result="unavailable")
    m.queue_wait_seconds.labels("a").observe(0.0015)
    m.loads.labels("a", "ok").inc(2)
    m.swaps.labels("a", "ok").inc()
    m.swaps.labels("a", "failed").inc()
    m.evictions.labels(**{n: "b" if n == "model" else "lru" for n in m.evictions._labelnames}).inc()
    m.resident_bytes.labels("a").set(3 * 2**20)
    m.track_versions(lambda: [("a", "v2", "serving"), ("a", "v1", "previous")])
    m.alias_reads.labels("a", "ok").inc(3)
    m.alias_reads.labels("a", "failed").inc(2)
    m.alias_read_time.labels("a").set(1234.5)
    s = served_summary(generate_latest(m.registry).decode())
    a = s["a"]
    assert a["versions"] == ["v1", "v2"] and a["requests"] == 101
    assert a["requests_by_result"] == {"ok": 100, "unavailable": 1}
    assert 2 < a["p50_ms"] < a["p99_ms"] <= 5
    assert 1 < a["queue_wait_p50_ms"] <= 2 and a["queue_wait_mean_ms"] == pytest.approx(1.5)
    assert a["resident_bytes"] == 3 * 2**20 and a["loads"] == {"ok": 2} and a["swaps"] == {"failed": 1, "ok": 1}
    assert s["b"]["evictions"] == 1 and s["b"]["evictions_by_reason"] == {"lru": 1} and s["b"]["p50_ms"] is None
    assert (a["serving"], a["previous"], a["alias_reads_failed"], a["alias_read_at"]) == ("v2", "v1", 2, 1234.5)
    assert (s["b"]["serving"], s["b"]["alias_reads_failed"], s["b"]["alias_read_at"]) == (None, 0, None)


@pytest.mark.parametrize("argv, words", [
    (["serve", "--budget", "lots"], "not a size"),
    (["serve", "--port", "70000"], "not a port"),
    (["serve", "--max-batch-size", "0"], "must be positive"),
    (["serve", "--max-queue-delay-ms", "-1"], "zero or more"),
    (["serve", "--models", ","], "at least one model"),
    (["serve", "--models", "digits/v1"], "not a version path"),
    (["serve", "--bogus"], "unrecognized arguments"),
    (["serve", "status", "--bogus"], "unrecognized arguments"),
    (["serve", "statsu"], "invalid choice"),
    (["serve", "--device", "tpu"], "'tpu' is not a device: use cpu, cuda or cuda:N"),
    (["serve", "--compile", "--compile-mode", "bogus"], "'bogus' is not a torch.compile mode: use default, "),
])
def test_serve_bad_flags_one_line(argv, words, capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command, what", [("serve", "model server"), ("ui", "Dagster UI")])
def test_a_taken_port_is_one_line_before_anything_starts(command, what, capsys, monkeypatch, tmp_path):
    """``dagster dev`` keeps running without its UI when the port is taken, and a model server set
    up its registry first: both say it in one line and start nothing."""
    import socket

    from jobs import cli

    monkeypatch.setenv("FORGELINE_HOME", str(tmp_path))
    monkeypatch.setattr(cli.os, "execv", lambda *a: pytest.fail("dagster dev was started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main([command, "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is already in use (another {what}?)" in err and err.count("\n") == 1, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a host without CUDA is the case tested")
def test_serve_on_a_cuda_device_this_host_lacks_starts_nothing(capsys, monkeypatch, tmp_path):
    """`--device cuda` without a GPU: one line before anything starts (the server ran on, answered
    503 to every request, and each failed load dropped the model's good /dev/shm copy)."""
    from jobs import cli

    monkeypatch.setenv("FORGELINE_HOME", str(tmp_path))
    monkeypatch.setattr("jobs.serve_cli.build_registry", lambda args: pytest.fail("the registry was built"))
    assert cli.main(["serve", "--port", str(_free_port()), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is available here" in err and err.count("\n") == 1, err


def test_serve_status_unreachable(capsys):
    from jobs.cli import main

    assert main(["serve", "status", "--url", f"127.0.0.1:{_free_port()}", "--timeout-s", "2"]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and err.count("\n") == 1



class _ReportingRegistry(FakeRegistry):
    async def stop(self, drain_timeout_s=30.0):
        print(f"drained: stop called with {self.inflight} in flight", flush=True)
        await super().stop(drain_timeout_s)


if __name__ == "__main__":  # the SIGTERM test's server process
    from pipeline.serving.app import serve

    sys.exit(serve(_ReportingRegistry(slow_s=1.5), "127.0.0.1", int(sys.argv[1]), drain_timeout_s=20))


# ---------------------------------------------------------------------------------------------
# The real serving core behind the HTTP side: tiny published DigitsCNN versions
# ---------------------------------------------------------------------------------------------

SHAPE = (1, 28, 28)


def _publish(store, name: str, version: str, seed: int):
    import torch

    from pipeline import export
    from pipeline.models import DigitsCNN

    torch.manual_seed(seed)
    m = DigitsCNN(width=4).eval()
    golden = export.golden_outputs(m, export.golden_input(SHAPE))
    export.export(export.from_module(m, architecture="digits_cnn", model_kwargs={"width": 4}), store, name, version,
                  golden=golden)
    return m


def _eager(m, x):
    import torch

    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    pytest.importorskip("pipeline.serving.registry")
    from pipeline import promotion
    from pipeline.storage import LocalStorage

    root = tmp_path_factory.mktemp("serving-store")
    store = LocalStorage(root / "store")
    mods = {"v1": _publish(store, "digits", "v1", 1), "v2": _publish(store, "digits", "v2", 2),
            "t1": _publish(store, "tiny", "t1", 3)}
    promotion.promote(store, "digits", "v1")
    return root, store, mods


def _wait(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_real_registry_end_to_end(published, capsys):
    """tritonclient → HTTP → ModelRegistry → published versions: load, infer (binary and JSON) equal
    to eager, a promotion hot-swaps over HTTP, rollback, unload/load, bad shapes, metrics."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from jobs.cli import main
    from pipeline import promotion
    from pipeline.serving.registry import ModelRegistry, ServeConfig

    _, store, mods = published
    reg = ModelRegistry(store, ServeConfig(poll_s=0.05, max_queue_delay_ms=1.0, load_timeout_s=60))
    with ThreadServer(reg, drain_timeout_s=5) as s:
        c = httpclient.InferenceServerClient(s.url, network_timeout=60)
        assert c.is_server_live() and c.is_server_ready()
        index = {r["name"]: r for r in c.get_model_repository_index()}
        assert set(index) == {"digits", "tiny"} and index["digits"]["state"] == "UNAVAILABLE"
        assert not c.is_model_ready("digits")
        meta = c.get_model_metadata("digits")  # read from the manifest without loading
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]

        c.load_model("digits")
        assert c.is_model_ready("digits") and c.is_model_ready("digits", "v1")
        assert {r["name"]: r["state"] for r in c.get_model_repository_index()}["digits"] == "READY"
        x = np.random.default_rng(0).standard_normal((5, *SHAPE), dtype=np.float32)
        res = c.infer("digits", [_input("input", x)])
        assert res.get_response()["model_version"] == "v1"
        np.testing.assert_allclose(res.as_numpy("output"), _eager(mods["v1"], x), atol=1e-5)
        res = c.infer("digits", [_input("input", x[:2], binary=False)],
                      outputs=[httpclient.InferRequestedOutput("output", binary_data=False)])
        np.testing.assert_allclose(res.as_numpy("output"), _eager(mods["v1"], x[:2]), atol=1e-5)
        # a model never promoted serves its newest version, loaded on its first request
        np.testing.assert_allclose(c.infer("tiny", [_input("input", x)]).as_numpy("output"),
                                   _eager(mods["t1"], x), atol=1e-5)

        # hot swap under load: promote v2 while 4 requests at a time keep coming; none fails, each
        # answer is exactly one version's, and v2 takes over
        import gevent

        want = {v: _eager(mods[v], x) for v in ("v1", "v2")}
        pool = httpclient.InferenceServerClient(s.url, concurrency=4, network_timeout=60)
        promotion.promote(store, "digits", "v2")
        seen, deadline = [], time.monotonic() + 30
        while not seen or seen[-1] != "v2":
            assert time.monotonic() < deadline, seen
            for p in [pool.async_infer("digits", [_input("input", x)]) for _ in range(4)]:
                r = p.get_result(timeout=60)
                v = r.get_response()["model_version"]
                matches = [k for k, y in want.items() if np.allclose(r.as_numpy("output"), y, atol=1e-5)]
                assert matches, v
                seen.append(matches[0])
            gevent.sleep(0.01)
        pool.close()
        res = c.infer("digits", [_input("input", x)])
        assert res.get_response()["model_version"] == "v2"
        np.testing.assert_allclose(res.as_numpy("output"), _eager(mods["v2"], x), atol=1e-5)
        # the previous version stays addressable by version
        res = c.infer("digits", [_input("input", x)], model_version="v1")
        np.testing.assert_allclose(res.as_numpy("output"), _eager(mods["v1"], x), atol=1e-5)
        promotion.rollback(store, "digits")
        _wait(lambda: c.infer("digits", [_input("input", x)]).get_response()["model_version"] == "v1")

        # the registry's own input checks arrive as 400 with its message
        for bad, words in [(x[:, :, :14], "has shape"), (x.astype(np.float64), "FP64")]:
            with pytest.raises(InferenceServerException) as e:
                c.infer("digits", [_input("input", bad)])
            assert e.value.status() == "400" and words in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            c.infer("digits", [_input("images", x)])
        assert e.value.status() == "400"
        with pytest.raises(InferenceServerException) as e:
            c.infer("digits", [_input("input", x)], model_version="v9")
        assert e.value.status() == "404"
        with pytest.raises(InferenceServerException) as e:
            c.infer("nope", [_input("input", x)])
        assert e.value.status() == "404"

        c.unload_model("digits")
        assert not c.is_model_ready("digits")
        with pytest.raises(InferenceServerException) as e:
            c.infer("digits", [_input("input", x)])
        assert e.value.status() == "503"
        c.load_model("digits")
        np.testing.assert_allclose(c.infer("digits", [_input("input", x)]).as_numpy("output"),
                                   _eager(mods["v1"], x), atol=1e-5)

        capsys.readouterr()
        assert main(["serve", "status", "--url", s.url, "--json"]) == 0
        d = json.loads(capsys.readouterr().out)["models"]["digits"]
        assert d["requests_by_result"]["ok"] >= 8 and d["p50_ms"] and d["resident_bytes"] > 0
        assert d["loads"].get("ok", 0) >= 2 and d["swaps"].get("ok", 0) >= 2
        assert d["serving"] == "v1" and d["alias_reads_failed"] == 0 and d["alias_read_at"] > 0
        c.close()
    assert not reg.live()  # the lifespan stopped it


def test_forgeline_serve_cli(published, tmp_path):
    """``forgeline serve`` as users run it: storage and shm tier from the environment, the listed
    model preloaded, answers equal to eager, SIGTERM → exit 0."""
    import tritonclient.http as httpclient

    from pipeline import promotion

    root, store, mods = published
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FORGELINE_HOME": str(tmp_path / "home"),
           "FORGELINE_STORAGE_ROOT": str(root / "store"), "FORGELINE_SHM_ROOT": str(tmp_path / "shm")}
    env.pop("FORGELINE_S3_BUCKET", None)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main())", "serve",
                             "--models", "digits", "--port", str(port), "--max-queue-delay-ms", "1",
                             "--poll-s", "0.2", "--log-level", "warning"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)

        def ready():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return c.is_model_ready("digits")
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        _wait(ready, timeout=90)  # preloaded (--models) without any request
        version = promotion.production(store, "digits")["version"]
        x = np.random.default_rng(1).standard_normal((3, *SHAPE), dtype=np.float32)
        res = c.infer("digits", [_input("input", x)])
        assert res.get_response()["model_version"] == version
        np.testing.assert_allclose(res.as_numpy("output"), _eager(mods[version], x), atol=1e-5)
        assert [r["name"] for r in c.get_model_repository_index()] == ["digits"]  # --models limits it
        c.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"http://127.0.0.1:{port}/v2" in out and str(root / "store") in out
        assert "exiting while" not in out  # idle worker threads end with the interpreter: no watchdog
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_forgeline_serve_stops_past_a_storage_read_that_never_returns(published, tmp_path):
    """A read that never returns (a hung NFS mount; here a FIFO in place of the manifest) holds a
    load and the request waiting on it. SIGTERM: the drain's time runs out, the request gets a 503
    it can retry (not uvicorn's plain-text 500 and a traceback), and the process exits, naming the
    blocked thread; it once stayed up for good, past any signal but SIGKILL."""
    import http.client
    import shutil
    import threading

    from pipeline import export, promotion

    root, store, _ = published
    shutil.copytree(root / "store", tmp_path / "store")
    version = promotion.production(store, "digits")["version"]
    manifest = tmp_path / "store" / export.version_prefix("digits", version) / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)  # opening it for reading waits for a writer that never comes
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FORGELINE_HOME": str(tmp_path / "home"),
           "FORGELINE_STORAGE_ROOT": str(tmp_path / "store")}
    env.pop("FORGELINE_S3_BUCKET", None)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main())", "serve",
                             "--models", "digits", "--no-shm", "--port", str(port), "--drain-timeout-s", "1",
                             "--poll-s", "600", "--log-level", "warning"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answer: dict = {}

    def infer():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32",
                                       "data": [0.0] * 784}]})
        conn.request("POST", "/v2/models/digits/infer", body=body)
        r = conn.getresponse()
        answer.update(status=r.status, type=r.getheader("content-type"), body=r.read())

    try:
        def live():
            assert proc.poll() is None, proc.stdout.read()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v2/health/live")
                return conn.getresponse().status == 200
            except OSError:
                return False

        _wait(live, timeout=90)
        client = threading.Thread(target=infer)
        client.start()
        time.sleep(1.0)  # the request waits on the load that waits on the read
        assert not answer
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        client.join(10)
        assert proc.returncode == 0, out
        assert answer["status"] == 503 and answer["type"] == "application/json", answer
        assert "shut down before this request finished" in json.loads(answer["body"])["error"]
        assert "forgeline serve: exiting while 1 thread(s) are still blocked" in out, out
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("flags", [[], ["--compile"]])
def test_forgeline_serve_setup_does_not_import_dagster(tmp_path, flags):
    """A serving cold start pays for every import: the store, the tier and the compile cache come
    from the engine's settings, never through Dagster (seconds of imports)."""
    code = (
        "import argparse, sys\n"
        "from jobs.serve_cli import add_parser, build_registry\n"
        "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='cmd'); add_parser(sub)\n"
        f"args = p.parse_args(['serve', '--models', 'digits', *{flags!r}])\n"
        "registry, store = build_registry(args)\n"
        "print(type(registry.cache).__name__, 'dagster' in sys.modules)\n"
    )
    env = {**os.environ, "FORGELINE_HOME": str(tmp_path), "FORGELINE_STORAGE_ROOT": str(tmp_path / "store")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cache, dagster_loaded = out.stdout.split()
    assert dagster_loaded == "False"
    assert cache == ("LocalDirCache" if flags else "NoneType")
