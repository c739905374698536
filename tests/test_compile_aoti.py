"""AOTInductor packages, the serving compile path (pipeline.compile_cache.aot_compile_with_cache and
load_version(compile=True)): keyed by the program, weights bound at load, so a fresh process serving
version 2 runs the package version 1 stored, with version 2's weights; corrupt, unloadable or
mismatched entries are misses that still serve; a model torch.export cannot capture falls back to
torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import compile_cache as cc
from pipeline import export
from pipeline.compile_cache import LocalDirCache, aot_cache_key, aot_compile_with_cache
from pipeline.models import DigitsCNN
from pipeline.serving.loader import load_version
from pipeline.storage import LocalStorage

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (1, 28, 28)
WIDTH = 16  # wide enough for the int8 variant to quantize layers
MAX = 12  # > the golden batch (8)


def digits(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = DigitsCNN(width=WIDTH)
    with torch.no_grad():  # BatchNorm statistics that differ per version
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32)


def eager(m: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


class Head(nn.Module):
    """Tensors small enough (a bias of 4, a scale of 4) that Inductor inlines them into the code
    by default: the package must still read them from the module it is bound to."""

    def __init__(self, seed: int, hidden: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(16, hidden)
        self.register_buffer("scale", torch.rand(hidden) + 0.5)

    def forward(self, x):
        return torch.relu(self.fc(x)) * self.scale + self.fc.bias


def _close(a, b) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


def test_key_names_the_program_not_the_weights():
    x = torch.randn(4, *SHAPE)
    key, comp = aot_cache_key(digits(1), x, max_batch_size=MAX)
    assert aot_cache_key(digits(2), x, max_batch_size=MAX)[0] == key  # another version, same program
    assert comp["artifact"] == "aoti-package-v1" and comp["batch_range"] == [1, MAX]
    assert comp["input_shapes"] == [["batch", 1, 28, 28]]
    others = {
        aot_cache_key(DigitsCNN(width=8).eval(), x, max_batch_size=MAX)[0],  # architecture
        aot_cache_key(Head(1), torch.randn(4, 16), max_batch_size=MAX)[0],
        aot_cache_key(digits(1), x, max_batch_size=MAX + 1)[0],  # batch range
        aot_cache_key(digits(1), x, max_batch_size=MAX, mode="max-autotune")[0],
        aot_cache_key(digits(1).double(), x.double(), max_batch_size=MAX)[0],  # dtype
        aot_cache_key(digits(1), torch.randn(4, 1, 32, 32), max_batch_size=MAX)[0],  # input shape
        aot_cache_key(digits(1), x, max_batch_size=MAX, dynamic_dims=[2, 3])[0],
        cc._auto_key(digits(1), (x,), "default", True)[0],  # the mega-cache entry of the same program
    }
    assert key not in others and len(others) == 8
    with pytest.raises(ValueError, match="dynamic_dims"):
        aot_cache_key(digits(1), x, max_batch_size=MAX, dynamic_dims=[0])


# ---------------------------------------------------------------------------------------------
# the entry of version 1 serves version 2, in a fresh process, through the serving loader
# ---------------------------------------------------------------------------------------------

_SERVE_V2 = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from pipeline.compile_cache import LocalDirCache
from pipeline.serving.loader import load_version
from pipeline.storage import LocalStorage
loaded = load_version(LocalStorage(sys.argv[2]), "digits", "v2", compile=True, cache=LocalDirCache(sys.argv[3]),
                      max_batch_size=int(sys.argv[4]))
for n in (1, int(sys.argv[4])):
    np.save(f"{sys.argv[5]}/out{n}.npy", loaded.run(np.load(f"{sys.argv[5]}/x{n}.npy")))
print("RESULT " + json.dumps({"compile": loaded.compile, "golden": loaded.golden,
                              "dynamo_imported": "torch._dynamo" in sys.modules}))
"""


def test_version_2_in_a_fresh_process_runs_the_package_of_version_1(tmp_path):
    store, cache_dir = LocalStorage(tmp_path / "store"), tmp_path / "cc"
    versions = {}
    for v, seed in (("v1", 1), ("v2", 2)):
        m = versions[v] = digits(seed)
        export.export(export.from_module(m, architecture="digits_cnn", model_kwargs={"width": WIDTH}), store,
                      "digits", v, golden=export.golden_outputs(m, export.golden_input(SHAPE)))

    v1 = load_version(store, "digits", "v1", compile=True, cache=LocalDirCache(cache_dir), max_batch_size=MAX)
    c1 = v1.compile
    assert c1["kind"] == "aoti" and not c1["hit"] and c1["miss_reason"] == "no entry" and c1["warnings"] == [], c1
    assert {"export", "compile"} <= set(c1["step_seconds"]) and c1["bytes"] > 0
    assert v1.golden["checked"]  # through the package
    assert [p.name for p in cache_dir.iterdir()] == [f"{c1['key']}.flcc"]

    # the int8 variant of v1 is dequantized on load: same architecture, so the same package serves it
    from pipeline import package

    package.publish_quantized(store, "digits", "v1", "int8")
    q = load_version(store, "digits-int8", "v1", compile=True, cache=LocalDirCache(cache_dir), max_batch_size=MAX)
    assert q.compile["hit"] and q.compile["key"] == c1["key"] and q.golden["checked"], q.compile
    reference = package.load_quantized_module(store, "digits-int8", "v1")
    np.testing.assert_allclose(q.run(rows(5)), eager(reference, rows(5)), rtol=1e-5, atol=1e-5)

    work = tmp_path / "io"
    work.mkdir()
    for n in (1, MAX):
        np.save(work / f"x{n}.npy", rows(n, seed=n))
    inductor = tmp_path / "inductor-v2"
    inductor.mkdir()
    script = tmp_path / "serve_v2.py"
    script.write_text(_SERVE_V2)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    proc = subprocess.run([sys.executable, str(script), str(ROOT), str(tmp_path / "store"), str(cache_dir), str(MAX),
                           str(work)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    c2 = res["compile"]
    assert c2["kind"] == "aoti" and c2["hit"] and c2["key"] == c1["key"] and c2["warnings"] == [], c2
    assert set(c2["step_seconds"]) <= {"fetch", "load"} and c2["bytes"] == c1["bytes"]
    assert not res["dynamo_imported"], "a package hit must not trace (Dynamo was imported)"
    assert res["golden"]["checked"]
    for n in (1, MAX):  # batch 1 and the largest batch from the one package
        x, got = np.load(work / f"x{n}.npy"), np.load(work / f"out{n}.npy")
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, eager(versions["v2"], x), rtol=1e-4, atol=1e-5)
        assert not np.allclose(got, eager(versions["v1"], x), rtol=1e-3, atol=1e-3), "served v1's weights"

    # the server's model metadata says how the serving version was compiled
    import asyncio

    from pipeline.serving import ModelRegistry, ServeConfig

    async def serve_v2():
        reg = ModelRegistry(store, ServeConfig(models=["digits"], compile=True, max_batch_size=MAX, poll_s=0.05),
                            cache=LocalDirCache(cache_dir))
        await reg.start()
        try:
            while not reg.model_ready("digits"):
                await asyncio.sleep(0.02)
            out = await reg.infer("digits", None, {"input": rows(3)})
            np.testing.assert_allclose(out["output"], eager(versions["v2"], rows(3)), rtol=1e-4, atol=1e-5)
            return reg.metadata("digits")["parameters"]
        finally:
            await reg.stop()

    p = asyncio.run(asyncio.wait_for(serve_v2(), 120))
    assert p["serving"] == "v2" and p["compile"]["kind"] == "aoti" and p["compile"]["hit"], p["compile"]
    assert p["compile"]["key"] == c1["key"] and p["compile"]["seconds"] > 0 and "load" in p["compile"]["step_seconds"]


# ---------------------------------------------------------------------------------------------
# entries that do not load are misses; the package checks its inputs; store failures are warnings
# ---------------------------------------------------------------------------------------------


class _NoStore(LocalDirCache):
    def _put_raw(self, key, data):
        raise OSError("read-only cache")


def test_bad_entries_are_misses_that_still_serve(tmp_path):
    cache = LocalDirCache(tmp_path / "cc")
    x = torch.randn(3, 16)
    v1, v2 = Head(1).eval(), Head(2).eval()
    with torch.inference_mode():
        _, first = aot_compile_with_cache(v1, x, cache, max_batch_size=6)
        assert first.kind == "aoti" and first.saved and not first.hit and first.warnings == [], first
        entry = tmp_path / "cc" / f"{first.key}.flcc"
        good = entry.read_bytes()

        fn, hit = aot_compile_with_cache(v2, x, cache, max_batch_size=6)
        assert hit.hit and not hit.saved and hit.key == first.key and hit.warnings == [], hit
        assert hit.seconds_compile_first_call == 0 and hit.seconds_export == 0 and hit.seconds_load > 0
        assert hit.artifact_bytes == first.artifact_bytes == len(cache.get(first.key))
        for n in (1, 6):  # the small tensors come from v2, not from v1's build
            xn = torch.randn(n, 16)
            assert _close(fn(xn), v2(xn)) and not _close(fn(xn), v1(xn))
        for bad in (torch.randn(7, 16), torch.randn(2, 15), torch.randn(2, 16).double(), torch.randn(16)):
            with pytest.raises(ValueError, match="AOTInductor package takes"):
                fn(bad)

        # a flipped byte: a miss that says why, compiled again, stored again
        data = bytearray(good)
        data[-200] ^= 0xFF
        entry.write_bytes(bytes(data))
        fn, r = aot_compile_with_cache(v2, x, cache, max_batch_size=6)
        assert not r.hit and r.saved and "sha256 mismatch" in r.miss_reason, r
        assert any("sha256 mismatch" in w for w in r.warnings) and _close(fn(x), v2(x))
        assert cache.get(first.key, components=r.components) is not None  # healed

        # a well-framed entry whose package will not load; and a store that fails: both warnings
        cache.put(first.key, cc._pack_aoti(b"not a zip archive", {"constants": {}}), components=r.components)
        fn, r = aot_compile_with_cache(v2, x, _NoStore(tmp_path / "cc"), max_batch_size=6)
        assert not r.hit and not r.saved and r.miss_reason.startswith("unusable entry"), r
        assert any("not stored" in w and "read-only cache" in w for w in r.warnings), r.warnings
        assert _close(fn(x), v2(x))

        # a package built for other shapes than the module's (here: a key given for another module)
        entry.write_bytes(good)
        wide = Head(3, hidden=5).eval()
        fn, r = aot_compile_with_cache(wide, x, cache, max_batch_size=6, key=(first.key, r.components))
        assert not r.hit and r.saved, r
        assert "package constants do not match the module: " in r.miss_reason and "[5," in r.miss_reason, r.miss_reason
        assert "\n" not in r.miss_reason and _close(fn(x), wide(x))

        # a package of another program with the very same tensors (here: tanh for relu) is a miss:
        # its answers are checked against the module's before it is used or stored
        entry.write_bytes(good)
        other = _HeadTanh(2).eval()
        fn, r = aot_compile_with_cache(other, x, cache, max_batch_size=6, key=(first.key, r.components))
        assert not r.hit and r.saved and "outputs differ from the module's" in r.miss_reason, r.miss_reason
        assert _close(fn(x), other(x))


class _HeadTanh(Head):
    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale + self.fc.bias


def test_a_program_that_answers_another_batch_size_is_never_used():
    """Inductor can fix a package to one batch size (seen at max batch 16 for the digits CNN): it
    then returns that many rows whatever it is given. Such a program is refused."""
    m = Head(1).eval()
    x = torch.randn(2, 16)

    def fixed(inp):
        return m(torch.zeros(4, 16))

    with pytest.raises(ValueError, match=r"outputs \[4, 4\] for a batch of 1; the module gives \[1, 4\]"):
        cc._answers_like(fixed, m, x, 4)
    with pytest.raises(ValueError, match="3 output rows for a batch of 6"):
        cc._answers_like(lambda inp: m(inp)[:3] if len(inp) > 1 else m(inp), m, x, 6)
    cc._answers_like(m, m, x, 6)


# ---------------------------------------------------------------------------------------------
# what torch.export cannot capture falls back to torch.compile
# ---------------------------------------------------------------------------------------------


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return torch.relu(self.fc(x))
        return -self.fc(x)


def test_export_failure_falls_back_to_torch_compile(tmp_path):
    torch._dynamo.reset()
    cache = LocalDirCache(tmp_path / "cc")
    m = _Branchy().eval()
    x = torch.randn(4, 16).abs()
    with torch.inference_mode():
        fn, r = aot_compile_with_cache(m, x, cache, max_batch_size=4)
        assert r.kind == "torch.compile" and "torch.export failed" in r.fallback_reason, r
        assert any("no AOTInductor package" in w for w in r.warnings), r.warnings
        assert r.saved and "artifact" not in r.components  # a mega-cache entry, under its own key
        for xs in (x, -x, x[:1].clone()):
            assert _close(fn(xs), m(xs))
    torch._dynamo.reset()
