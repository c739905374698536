"""Compile artifact caching: keys, framing, the three backends against real servers (moto S3, Debian's
redis-server), failure paths that must fall back to a cold compile, and an end-to-end cold → warm
run in two fresh processes with separate empty Inductor cache dirs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _free_port, stop_server
import torch
from torch import nn

from pipeline.compile_cache import (
    EntryError,
    LocalDirCache,
    RedisCache,
    StorageCache,
    architecture,
    cache_key,
    compile_with_cache,
    frame,
    pack_bundle,
    unframe,
    unpack_bundle,
)
from pipeline.models import DigitsCNN

ROOT = Path(__file__).resolve().parent.parent


def _key(**over):
    kw = dict(architecture="ab" * 32, input_shapes=[(8, 1, 28, 28)], dtype="float32", mode="default", device="cpu")
    kw.update(over)
    return cache_key(**kw)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server (Debian's) on a free loopback port, no persistence; stopped after."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.geteuid() != 0:
            pytest.fail("redis-server is not installed and this is not root: run `sudo apt-get install redis-server` "
                        "(or `make system-deps`)")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True)
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("apt-get install redis-server did not provide a redis-server binary")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(log), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}:\n{log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        stop_server(proc)


@pytest.fixture
def fresh_dynamo():
    """Forget what Dynamo compiled in this process, so every test's compile really compiles."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval(), torch.randn(4, 16)


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.fc = nn.Linear(16, hidden)
        self.register_buffer("scale", torch.ones(hidden))

    def forward(self, x):
        return torch.relu(self.fc(x)) * self.scale


class _BlockGelu(_Block):  # same parameters, another forward
    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x)) * self.scale


def test_architecture_ignores_weight_values_and_sees_the_program():
    torch.manual_seed(0)
    a = _Block().eval()
    torch.manual_seed(1)
    b = _Block().eval()
    digest, summary = architecture(a)
    assert architecture(b)[0] == digest  # other weights, same program
    assert summary["model_class"].endswith("._Block") and summary["tensors"] == 3
    with torch.device("meta"):  # built on meta, then materialized with b's weights
        m = _Block().eval()
    assert architecture(m)[0] == digest
    m.load_state_dict(b.state_dict(), assign=True)
    assert architecture(m)[0] == digest

    others = {
        architecture(_Block(hidden=12).eval())[0],  # a shape
        architecture(_Block().eval().double())[0],  # dtypes
        architecture(_Block())[0],  # train mode
        architecture(_BlockGelu().eval())[0],  # class / forward
        architecture(nn.Sequential(_Block()).eval())[0],  # module tree / names
        architecture(_Block().eval().requires_grad_(False))[0],
    }
    assert digest not in others and len(others) == 6
    # settings outside the tensors are the program too: a conv's stride, an activation's slope,
    # a constant tensor attribute (inlined by export), a function kept as an attribute
    def seq(stride=1, slope=0.01):
        return nn.Sequential(nn.Conv2d(1, 4, 3, stride=stride), nn.LeakyReLU(slope), nn.Flatten()).eval()

    base = architecture(seq())[0]
    assert architecture(seq())[0] == base
    assert len({base, architecture(seq(stride=2))[0], architecture(seq(slope=5.0))[0]}) == 3
    c1, c2 = _Block().eval(), _Block().eval()
    c1.scale, c2.scale = torch.tensor([1.0]), torch.tensor([2.0])
    c1.act, c2.act = torch.relu, torch.tanh
    c3 = _Block().eval()
    c3.scale, c3.act = torch.tensor([1.0]), torch.relu
    assert architecture(c1)[0] != architecture(c2)[0] and architecture(c1)[0] == architecture(c3)[0]
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    untied_digest = architecture(tied)[0]
    tied[1].weight = tied[0].weight
    assert architecture(tied)[0] != untied_digest
    # stable across processes (no id() / hash-seed dependence)
    code = ("import sys; sys.path.insert(0, %r); sys.path.insert(0, %r); import torch; "
            "from test_compile_cache import _Block; from pipeline.compile_cache import architecture; "
            "print(architecture(_Block().eval())[0])" % (str(ROOT), str(ROOT / "tests")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "7"})
    assert out.stdout.strip().splitlines()[-1] == digest


def test_unmaterialized_meta_model_is_refused():
    with torch.device("meta"):
        m = _Block().eval()
    with pytest.raises(ValueError, match="meta device"):
        compile_with_cache(m, (torch.randn(4, 16),), None)


def test_cache_key_stable_and_sensitive():
    key, comp = _key()
    assert key == _key()[0] and len(key) == 64 and int(key, 16) >= 0
    assert comp["torch"] == torch.__version__ and comp["device_type"] == "cpu"
    assert comp["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert comp["python"].endswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert "triton" in comp and comp["input_shapes"] == [[8, 1, 28, 28]]
    others = {
        _key(input_shapes=[(16, 1, 28, 28)])[0],
        _key(mode="max-autotune")[0],
        _key(architecture="cd" * 32)[0],
        _key(dtype="bfloat16")[0],
        _key(dynamic=True)[0],
        _key(extra={"training": True})[0],
    }
    assert key not in others and len(others) == 6
    # stable across processes (no dict-order, id() or hash-seed dependence)
    code = ("import sys; sys.path.insert(0, %r); from pipeline.compile_cache import cache_key; "
            "print(cache_key(architecture='ab'*32, input_shapes=[(8,1,28,28)], dtype='float32', mode='default', "
            "device='cpu')[0])" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == key


# ---------------------------------------------------------------------------------------------
# framing
# ---------------------------------------------------------------------------------------------


def test_framing_detects_corruption_and_mismatch(tmp_path):
    cache = LocalDirCache(tmp_path / "cc")
    key, comp = _key()
    payload = os.urandom(4096)
    cache.put(key, payload, components=comp)
    assert cache.last_error is None
    assert cache.get(key, components=comp) == payload and cache.last_miss_reason is None

    path = tmp_path / "cc" / f"{key}.flcc"
    good = path.read_bytes()
    for pos in (len(good) - 10, 70):  # in the payload; in the components JSON
        bad = bytearray(good)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        assert cache.get(key, components=comp) is None
        assert "sha256" in cache.last_miss_reason
    path.write_bytes(good[:-1])
    assert cache.get(key) is None and "corrupt" in cache.last_miss_reason
    path.write_bytes(good[:10])
    assert cache.get(key) is None and "truncated" in cache.last_miss_reason
    path.write_bytes(b"X" + good[1:])
    assert cache.get(key) is None and "magic" in cache.last_miss_reason
    bad = bytearray(good)
    bad[9] += 1  # format version
    path.write_bytes(bytes(bad))
    assert cache.get(key) is None and "format version" in cache.last_miss_reason

    # an entry written by another torch, filed under this key: a miss that says why
    old = dict(comp, torch="2.12.0")
    cache.put(key, payload, components=old)
    assert cache.get(key, components=comp) is None
    assert "torch: entry '2.12.0' != expected" in cache.last_miss_reason
    # an entry copied under another key
    other, _ = _key(mode="reduce-overhead")
    (tmp_path / "cc" / f"{other}.flcc").write_bytes(good)
    assert cache.get(other) is None and "written for key" in cache.last_miss_reason
    assert cache.get("0" * 64) is None and cache.last_miss_reason == "no entry"

    with pytest.raises(EntryError):
        unframe(frame(key, comp, payload)[:-3], key)
    mega, files = unpack_bundle(pack_bundle(b"mega", {"ab/cabc.so": b"\x7fELF", "ab/cabc.cpp": b"int x;"}))
    assert mega == b"mega" and files == {"ab/cabc.so": b"\x7fELF", "ab/cabc.cpp": b"int x;"}
    with pytest.raises(EntryError, match="bad kernel path"):
        unpack_bundle(pack_bundle(b"m", {"../../etc/x.so": b"x"}))


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3", "redis"])
def test_backend_round_trip(backend, tmp_path, request):
    if backend == "local":
        cache = LocalDirCache(tmp_path / "cc")
    elif backend == "s3":
        cache = StorageCache(request.getfixturevalue("s3_storage"))
    else:
        cache = RedisCache(request.getfixturevalue("redis_url"), ttl_s=600)
    key, comp = _key()
    assert cache.get(key, components=comp) is None and cache.last_miss_reason == "no entry"
    assert cache.last_error is None
    payload = os.urandom(6 * 1024 * 1024) + b"end"  # > S3 multipart threshold in the test fixture
    cache.put(key, payload, components=comp)
    assert cache.last_error is None, cache.last_error
    assert cache.get(key, components=comp) == payload
    cache.put(key, b"v2", components=comp)  # overwrite
    assert cache.get(key, components=comp) == b"v2"
    if backend == "redis":
        assert 0 < cache.client.ttl(cache.prefix + key) <= 600
        assert "@" not in cache.describe() and cache.describe().startswith("redis://127.0.0.1:")
    if backend == "s3":
        assert cache.describe().startswith("s3://")
    with pytest.raises(ValueError):
        cache.get("../escape")


def test_unreachable_redis_is_a_warning_not_a_crash(fresh_dynamo):
    cache = RedisCache(f"redis://127.0.0.1:{_free_port()}/0", socket_timeout_s=0.5)  # nothing listens there
    key, comp = _key()
    t0 = time.monotonic()
    assert cache.get(key, components=comp) is None
    assert "backend error" in cache.last_miss_reason and "Connection" in cache.last_error
    cache.put(key, b"x", components=comp)
    assert "put failed" in cache.last_error
    assert time.monotonic() - t0 < 10

    model, x = _tiny()
    with torch.no_grad():
        compiled, report = compile_with_cache(model, (x,), cache)
        torch.testing.assert_close(compiled(x), model(x))
    assert not report.hit and not report.saved
    assert any("backend error" in w for w in report.warnings), report.warnings
    assert any("not stored" in w for w in report.warnings), report.warnings
    json.dumps(report.to_metadata())


def test_corrupt_or_wrong_version_entry_falls_back_to_cold_compile(tmp_path, fresh_dynamo):
    cache = LocalDirCache(tmp_path / "cc")
    model, x = _tiny()
    with torch.no_grad():
        eager = model(x)
        _, first = compile_with_cache(model, (x,), cache)
    assert first.saved and not first.hit and first.miss_reason == "no entry" and first.warnings == []
    entry = tmp_path / "cc" / f"{first.key}.flcc"

    # flip one byte of the stored entry: cold compile, warning, and the entry is rewritten
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF
    entry.write_bytes(bytes(data))
    torch._dynamo.reset()
    with torch.no_grad():
        compiled, report = compile_with_cache(model, (x,), cache)
        torch.testing.assert_close(compiled(x), eager)
    assert not report.hit and report.saved
    assert any("sha256 mismatch" in w for w in report.warnings), report.warnings
    assert f"(entry {report.key} in {cache.describe()})" in report.miss_reason  # where to find it
    assert cache.get(report.key, components=report.components) is not None  # healed

    # an entry from another torch version under the same key
    cache.put(first.key, b"whatever", components=dict(first.components, torch="2.12.0"))
    torch._dynamo.reset()
    with torch.no_grad():
        compiled, report = compile_with_cache(model, (x,), cache)
        torch.testing.assert_close(compiled(x), eager)
    assert not report.hit and any("torch: entry '2.12.0'" in w for w in report.warnings), report.warnings

    # a well-framed entry whose artifacts torch cannot read
    cache.put(first.key, pack_bundle(b"not mega-cache bytes"), components=first.components)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled, report = compile_with_cache(model, (x,), cache)
        torch.testing.assert_close(compiled(x), eager)
    assert not report.hit and any("not loaded" in w for w in report.warnings), report.warnings


# ---------------------------------------------------------------------------------------------
# end to end: cold in one fresh process, warm in another, separate empty Inductor cache dirs
# ---------------------------------------------------------------------------------------------

_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from pipeline.compile_cache import LocalDirCache, compile_with_cache
from pipeline.models import DigitsCNN
torch.manual_seed(0)
if sys.argv[3] == "digits":
    model, x = DigitsCNN().eval(), torch.randn(8, 1, 28, 28)
else:
    model, x = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval(), torch.randn(4, 16)
with torch.no_grad():
    eager = model(x)
    compiled, report = compile_with_cache(model, (x,), LocalDirCache(sys.argv[2]))
    out = compiled(x)
meta = report.to_metadata()
meta["allclose"] = bool(torch.allclose(out, eager, rtol=1e-4, atol=1e-5))
print("REPORT " + json.dumps(meta))
"""


def _run_worker(tmp_path: Path, inductor_dir: Path, cache_dir: Path, model: str = "digits") -> dict:
    assert not inductor_dir.exists()
    inductor_dir.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    env.pop("TRITON_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, str(script), str(ROOT), str(cache_dir), model], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def test_end_to_end_cold_then_warm_in_fresh_processes(tmp_path):
    store = tmp_path / "artifacts"
    cold = _run_worker(tmp_path, tmp_path / "inductor-cold", store)
    assert not cold["hit"] and cold["saved"] and cold["miss_reason"] == "no entry", cold
    assert cold["warnings"] == [] and cold["allclose"]
    assert cold["artifacts"].get("inductor", 0) >= 1 and cold["artifacts"].get("aot_autograd", 0) >= 1
    assert cold["kernel_files"] > 0  # the C++ kernels the mega-cache leaves out on CPU
    assert cold["inductor_cache"]["fxgraph_miss"] >= 1

    warm = _run_worker(tmp_path, tmp_path / "inductor-warm", store)  # different, empty Inductor dir
    assert warm["key"] == cold["key"]
    assert warm["hit"] and not warm["saved"] and warm["warnings"] == [], warm
    assert warm["allclose"]
    assert warm["artifact_bytes"] == cold["artifact_bytes"]
    # Inductor and AOTAutograd really served everything from the loaded artifacts
    assert warm["inductor_cache"]["fxgraph_hit"] >= 1 and warm["inductor_cache"]["fxgraph_miss"] == 0
    assert warm["inductor_cache"]["aotautograd_hit"] >= 1 and warm["inductor_cache"]["aotautograd_miss"] == 0
    print(f"cold compile+first call {cold['seconds_compile_first_call']:.1f}s, "
          f"warm {warm['seconds_compile_first_call']:.1f}s (+{warm['seconds_load']:.2f}s load)")


def test_bundled_kernel_that_will_not_load_falls_back_to_cold(tmp_path):
    """A CPU kernel binary in the entry that this machine cannot load (here: garbage bytes under the
    right name) must not fail the compile: the warm process compiles again, cold, with a warning."""
    store = tmp_path / "artifacts"
    cold = _run_worker(tmp_path, tmp_path / "inductor-cold", store, model="tiny")
    assert cold["saved"] and cold["kernel_files"] > 0, cold
    cache = LocalDirCache(store)
    mega, files = unpack_bundle(cache.get(cold["key"], components=cold["components"]))
    sos = [p for p in files if p.endswith(".main.so")]
    assert sos, sorted(files)
    cache.put(cold["key"], pack_bundle(mega, {**files, **{p: b"not an ELF file" for p in sos}}),
              components=cold["components"])

    warm = _run_worker(tmp_path, tmp_path / "inductor-warm", store, model="tiny")
    assert warm["allclose"], warm
    assert not warm["hit"] and any("compiled again cold" in w for w in warm["warnings"]), warm


# ---------------------------------------------------------------------------------------------
# model versions: the key names the program, not the weights
# ---------------------------------------------------------------------------------------------

_VERSIONS_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from torch import nn
from pipeline.compile_cache import LocalDirCache, compile_with_cache


class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, hidden), nn.Linear(hidden, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def weights(seed, hidden=8):
    torch.manual_seed(seed)
    return Net(hidden).state_dict()


x = torch.randn(4, 16, generator=torch.Generator().manual_seed(123))
for step in json.loads(sys.argv[2]):
    hidden, batch = step.get("hidden", 8), step.get("batch", 4)
    with torch.device("meta"):  # as a model server loads a version: skeleton on meta, then the weights
        model = Net(hidden)
    model.load_state_dict(weights(step["seed"], hidden), assign=True)
    model.eval()
    xs = x.repeat(batch // 4 + 1, 1)[:batch]
    with torch.no_grad():
        compiled, report = compile_with_cache(model, (xs,), LocalDirCache(step["store"]))
        out = compiled(xs)
        other = Net(hidden).eval()
        other.load_state_dict(weights(step.get("other_seed", 0), hidden))
        meta = report.to_metadata()
        meta["equals_eager"] = bool(torch.allclose(out, model(xs), rtol=1e-5, atol=1e-6))
        meta["equals_other_weights"] = bool(torch.allclose(out, other(xs), rtol=1e-3, atol=1e-3))
    print("REPORT " + json.dumps(meta), flush=True)
"""


def _run_versions(tmp_path: Path, name: str, steps: list[dict]) -> list[dict]:
    """Run ``steps`` (compiles of model versions) in one fresh process with its own empty Inductor dir."""
    inductor_dir = tmp_path / f"inductor-{name}"
    inductor_dir.mkdir()
    script = tmp_path / "versions_worker.py"
    script.write_text(_VERSIONS_WORKER)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    env.pop("TRITON_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, str(script), str(ROOT), json.dumps(steps)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(ln[len("REPORT "):]) for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]


@pytest.fixture(scope="module")
def version_1_then_2(tmp_path_factory):
    """One fresh process: version 1 (weights A, seed 1) compiled into an empty cache ``first``, then
    version 2 (weights B, seed 2) into another empty cache ``second``."""
    tmp = tmp_path_factory.mktemp("versions")
    first, second = str(tmp / "first"), str(tmp / "second")
    v1, v2 = _run_versions(tmp, "v1-v2", [{"seed": 1, "store": first}, {"seed": 2, "store": second}])
    return tmp, first, second, v1, v2


def test_version_2_hits_the_entry_of_version_1_in_a_fresh_process(version_1_then_2):
    """Version 1 (weights A) compiled and stored by one fresh process; version 2 (same architecture,
    weights B, loaded on meta then assigned) in another fresh process with another empty Inductor dir
    hits it, compiles nothing cold, and computes with weights B."""
    tmp, first, _, v1, _ = version_1_then_2
    assert not v1["hit"] and v1["saved"] and v1["miss_reason"] == "no entry" and v1["warnings"] == [], v1
    assert v1["equals_eager"] and v1["inductor_cache"]["fxgraph_miss"] >= 1
    assert "model_hash" not in v1["components"] and v1["components"]["architecture"]

    (v2,) = _run_versions(tmp, "v2", [{"seed": 2, "other_seed": 1, "store": first}])
    assert v2["key"] == v1["key"]
    assert v2["hit"] and not v2["saved"] and v2["warnings"] == [], v2
    assert v2["inductor_cache"]["fxgraph_hit"] >= 1 and v2["inductor_cache"]["fxgraph_miss"] == 0
    assert v2["inductor_cache"]["aotautograd_miss"] == 0
    assert v2["inductor_cache"]["fxgraph_miss"] < v1["inductor_cache"]["fxgraph_miss"]
    assert v2["equals_eager"], "version 2 must compute with its own weights (B)"
    assert not v2["equals_other_weights"], "version 2 computed with version 1's weights (A)"


def test_second_version_in_the_same_process_still_stores_a_usable_entry(version_1_then_2):
    """Version 1 then version 2 in one process: Dynamo reuses version 1's code for version 2, so
    nothing reaches Inductor; the entry stored for version 2 (into another, empty cache) must still be
    complete: a fresh process hits it without compiling anything cold."""
    tmp, _, second, v1, v2 = version_1_then_2
    assert v2["key"] == v1["key"]
    assert not v2["hit"] and v2["saved"] and v2["warnings"] == [], v2
    assert v2["inductor_cache"]["fxgraph_miss"] == 0 and v2["equals_eager"]
    assert v2["artifact_bytes"] == v1["artifact_bytes"] and v2["kernel_files"] == v1["kernel_files"] > 0

    (v3,) = _run_versions(tmp, "v3", [{"seed": 3, "other_seed": 2, "store": second}])
    assert v3["hit"] and v3["warnings"] == [], v3
    assert v3["inductor_cache"]["fxgraph_miss"] == 0 and v3["inductor_cache"]["fxgraph_hit"] >= 1
    assert v3["equals_eager"] and not v3["equals_other_weights"]


def test_other_input_shape_or_architecture_misses(tmp_path, fresh_dynamo):
    cache = LocalDirCache(tmp_path / "cc")
    model, x = _tiny()
    with torch.no_grad():
        _, stored = compile_with_cache(model, (x,), cache)
        assert stored.saved
        torch.manual_seed(5)
        retrained = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval()
        torch._dynamo.reset()
        compiled, same = compile_with_cache(retrained, (x,), cache)
        assert same.hit and same.key == stored.key
        torch.testing.assert_close(compiled(x), retrained(x))
        # a hit that compiles nothing cold says nothing
        assert not any("cold" in w for w in same.warnings), same.warnings

        for other_model, other_x in ((model, torch.randn(6, 16)),  # input shape
                                     (nn.Sequential(nn.Linear(16, 12), nn.ReLU()).eval(), x),  # layer size
                                     (nn.Sequential(nn.Linear(16, 8), nn.GELU()).eval(), x)):  # module class
            torch._dynamo.reset()
            _, r = compile_with_cache(other_model, (other_x,), cache)
            assert not r.hit and r.miss_reason == "no entry" and r.key != stored.key, r
            assert r.warnings == [], r.warnings


def test_entry_that_leaves_graphs_cold_is_replaced(tmp_path, fresh_dynamo, monkeypatch):
    """A hit whose artifacts do not cover the program (here: model ``b`` compiled under ``a``'s key)
    says how many graphs still compiled cold and stores this compile's artifacts in its place; the
    next compile under that key, with an empty Inductor dir, compiles nothing cold and says nothing."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-1"))
    cache = LocalDirCache(tmp_path / "cc")
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    a, b = nn.Sequential(nn.Linear(16, 8), nn.Tanh()).eval(), nn.Sequential(nn.Linear(16, 8), nn.Sigmoid()).eval()
    with torch.no_grad():
        _, ra = compile_with_cache(a, (x,), cache)
        assert ra.saved
        torch._dynamo.reset()
        compiled, rb = compile_with_cache(b, (x,), cache, key=(ra.key, ra.components))
        torch.testing.assert_close(compiled(x), b(x))
        assert rb.hit and rb.saved and rb.inductor_cache["fxgraph_miss"] >= 1, rb
        assert any(f"{rb.inductor_cache['fxgraph_miss']} graph(s) cold in Inductor" in w for w in rb.warnings)
        assert not any(" 0 graph(s)" in w for w in rb.warnings), rb.warnings

        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-2"))
        torch._dynamo.reset()
        compiled, again = compile_with_cache(b, (x,), cache, key=(ra.key, ra.components))
        torch.testing.assert_close(compiled(x), b(x))
    assert again.hit and not again.saved and again.warnings == [], again
    assert again.inductor_cache["fxgraph_miss"] == 0 and again.inductor_cache["fxgraph_hit"] >= 1


def test_configured_cache_outside_a_run_matches_the_resources(tmp_path):
    """`forgeline serve` opens the compile cache without Dagster (pipeline.compile_cache.configured);
    the resources a run uses build the same cache from the same settings."""
    import dagster as dg

    from pipeline import compile_cache
    from pipeline.settings import SettingError
    from pipeline.storage import LocalStorage
    from resources.cache import compile_cache_from_env
    from resources.storage import LocalStorageResource

    home = tmp_path / "home"
    store_root = tmp_path / "store"
    cases = {"local": {}, "storage": {"FORGELINE_COMPILE_CACHE": "storage"},
             "redis": {"FORGELINE_COMPILE_CACHE": "redis", "FORGELINE_COMPILE_CACHE_URL": "redis://127.0.0.1:1/0"}}
    for kind, extra in cases.items():
        env = {"FORGELINE_HOME": str(home), "FORGELINE_STORAGE_ROOT": str(store_root), **extra}
        ours = compile_cache.configured(env=env)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            resource = LocalStorageResource(root=str(store_root))
            with dg.build_resources({"storage": resource, "compile_cache": compile_cache_from_env(resource)}) as res:
                theirs = res.compile_cache.cache()
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        assert type(ours) is type(theirs) and ours.describe() == theirs.describe(), (kind, ours, theirs)
    assert str(home / "compile-cache") in compile_cache.configured(env={"FORGELINE_HOME": str(home)}).describe()
    # the storage kind uses the store it is given (the server's own)
    given = LocalStorage(tmp_path / "other")
    assert compile_cache.configured(given, env={"FORGELINE_COMPILE_CACHE": "storage"}).storage is given
    with pytest.raises(SettingError, match="FORGELINE_COMPILE_CACHE_URL"):
        compile_cache.configured(env={"FORGELINE_COMPILE_CACHE": "redis"})
