"""Chunked safetensors export and publishing, for real: files written by ``pipeline.export`` are
read back with the ``safetensors`` library itself, published versions are verified byte for byte,
failures leave nothing visible, and exporting a checkpoint streams (peak memory is measured in a
subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from torch import nn

from pipeline import export as ex
from pipeline import models
from pipeline.storage import LocalStorage, join
from pipeline.train import checkpoints

ROOT = Path(__file__).resolve().parent.parent
KW = {"width": 8}  # a small DigitsCNN: ~13k parameters in 25 tensors


def trained_cnn(seed: int = 0) -> nn.Module:
    """A DigitsCNN whose weights and BatchNorm statistics are not the init values."""
    torch.manual_seed(seed)
    m = models.build_model("digits_cnn", **KW)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m.train()
        m(torch.randn(16, 1, 28, 28))  # moves running_mean/var and num_batches_tracked
    return m.eval()


def batch() -> torch.Tensor:
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_bit_exact(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert bits(g) == bits(w), k


def version_files(store, model: str, version: str) -> list[str]:
    prefix = ex.version_prefix(model, version)
    return [o.key[len(prefix) + 1 :] for o in store.list(prefix)]


def save_ckpt(store, prefix: str, module: nn.Module) -> str:
    state = {"format": checkpoints.CHECKPOINT_FORMAT, "epoch": 3, "model": module.state_dict(),
             "optimizer": {"state": {}, "param_groups": []}, "history": "[]"}
    return checkpoints.save_checkpoint(store, prefix, state, keep=2)


def all_dtypes_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 4
    out = {}
    for dt in ex._ST_CODES:
        name = str(dt).removeprefix("torch.")
        if dt == torch.bool:
            out[name] = base > 0
        elif dt.is_complex:
            out[name] = torch.complex(base, -base).to(dt)
        elif dt.is_floating_point:
            out[name] = base.to(dt)
        else:
            out[name] = (base * 7).to(torch.int64).abs().to(dt)
    out["nan_and_neg_zero"] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40])
    out["scalar_0d"] = torch.tensor(2.5, dtype=torch.float64)
    out["scalar_0d_int"] = torch.tensor(7, dtype=torch.int64)
    out["empty"] = torch.empty(0, 4)
    out["empty_bf16"] = torch.empty(3, 0, dtype=torch.bfloat16)
    out["non_contiguous"] = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()
    out["odd_bytes"] = torch.arange(3, dtype=torch.uint8)  # 3 bytes: later tensors stay aligned anyway
    return out


# ---------------------------------------------------------------------------------------------
# The file format
# ---------------------------------------------------------------------------------------------


def test_every_dtype_round_trips_through_safetensors(tmp_path):
    state = all_dtypes_state()
    entries = [ex.entry_for(n, t) for n, t in state.items()]
    meta = {"format": "pt", "note": "héllo"}
    path = tmp_path / "all.safetensors"
    with open(path, "wb") as f:
        n = ex.write_safetensors(f, entries, state.__getitem__, metadata=meta)
    data = path.read_bytes()
    assert n == len(data) == ex.safetensors_size(entries, meta)
    hlen = int.from_bytes(data[:8], "little")
    assert hlen % 8 == 0 and data[8] == ord("{")
    header = json.loads(data[8 : 8 + hlen])
    for name, info in header.items():  # every tensor starts aligned to its element size
        if name != "__metadata__":
            assert info["data_offsets"][0] % state[name].element_size() == 0, name
    for loaded in (load_file(path), st_load(data)):
        assert_bit_exact(loaded, state)
    with safe_open(path, "pt") as f:
        assert f.metadata() == meta
        assert set(f.keys()) == set(state)
        assert bits(f.get_tensor("bfloat16")) == bits(state["bfloat16"])
        assert f.get_slice("float32")[1:2].tolist() == state["float32"][1:2].tolist()


def test_header_rejects_bad_input():
    e = ex.TensorEntry("a", torch.float32, (2,), 8)
    with pytest.raises(ex.ExportError, match="duplicated"):
        ex.encode_header([e, e])
    with pytest.raises(ex.ExportError, match="str to str"):
        ex.encode_header([e], {"k": 1})
    with pytest.raises(ex.ExportError, match="bytes do not match"):
        ex.encode_header([ex.TensorEntry("a", torch.float32, (2,), 9)])


def test_plan_shards_greedy_never_splits():
    mib = 1 << 20
    entries = [(f"t{i}", torch.float32, (n // 4,), n) for i, n in enumerate([3 * mib, 3 * mib, 1 * mib, 9 * mib, 2 * mib, 2 * mib])]
    plan = ex.plan_shards(entries, 8 * mib)
    assert plan == [["t0", "t1", "t2"], ["t3"], ["t4", "t5"]]  # t3 > limit: a shard of its own
    assert [n for shard in plan for n in shard] == [e[0] for e in entries]  # order kept, each once
    assert ex.plan_shards(entries, 1 << 40) == [[e[0] for e in entries]]
    assert ex.plan_shards(entries[:2], 1) == [["t0"], ["t1"]]
    with pytest.raises(ValueError):
        ex.plan_shards(entries, 0)
    assert ex.shard_file_names(1) == ["model.safetensors"]
    assert ex.shard_file_names(3)[1] == "model-00002-of-00003.safetensors"


# ---------------------------------------------------------------------------------------------
# Export and publish
# ---------------------------------------------------------------------------------------------


def check_published(store, model, manifest, want: dict, max_shard_bytes: int) -> None:
    """Shards load bit-exact with safetensors, sizes within the limit, index consistent."""
    version = manifest["version"]
    prefix = ex.version_prefix(model, version)
    raw_index = store.read(join(prefix, ex.INDEX_NAME))
    assert manifest["index"] == {"file": ex.INDEX_NAME, "bytes": len(raw_index), "sha256": hashlib.sha256(raw_index).hexdigest(),
                                 "crc32": f"{zlib.crc32(raw_index):08x}"}
    index = json.loads(raw_index)
    assert list(index["weight_map"]) == list(want)  # every tensor, exactly once
    assert index["metadata"]["total_size"] == manifest["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    loaded = {}
    for s in manifest["shards"]:
        data = store.read(join(prefix, s["file"]))
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
        assert s["crc32"] == f"{zlib.crc32(data):08x}"
        shard = st_load(data)
        assert list(shard) == s["tensors"] or set(shard) == set(s["tensors"])
        assert all(index["weight_map"][n] == s["file"] for n in shard)
        assert not set(shard) & set(loaded)  # no tensor split or repeated across shards
        if len(shard) > 1:
            assert s["bytes"] <= max_shard_bytes, s["file"]
        loaded.update(shard)
    assert_bit_exact(loaded, want)
    assert_bit_exact(ex.load_state_dict(store, model, version), want)
    assert manifest["tensors"] == len(want)
    assert version_files(store, model, version) == sorted([s["file"] for s in manifest["shards"]] + [ex.INDEX_NAME, ex.MANIFEST_NAME])


def test_round_trip_from_live_module(local_storage):
    m = trained_cnn()
    seen = []
    manifest = ex.export(ex.from_module(m, architecture="digits_cnn", model_kwargs=KW), local_storage, "digits",
                         max_shard_bytes=8 * 1024, run_id="run-1", data_version="b1+b2",
                         metadata={"val_acc": 0.97}, progress=lambda d, t: seen.append((d, t)))
    assert len(manifest["shards"]) > 2
    assert all(s["seconds"] > 0 for s in manifest["shards"])  # time to write each shard
    check_published(local_storage, "digits", manifest, m.state_dict(), 8 * 1024)
    assert manifest["format"] == ex.FORMAT and manifest["model"] == "digits"
    assert manifest["config"] == {"architecture": "digits_cnn", "kwargs": KW, "dtype": "float32"}
    assert (manifest["run_id"], manifest["data_version"], manifest["metadata"]) == ("run-1", "b1+b2", {"val_acc": 0.97})
    assert manifest["dtypes"] == {"float32": 22, "int64": 4}
    assert seen[-1] == (manifest["total_size"],) * 2 and len(seen) == manifest["tensors"]
    assert ex.read_manifest(local_storage, "digits", manifest["version"]) == manifest
    # HF compatibility: every shard opens with safe_open and carries the __metadata__
    path = local_storage.local_path(join(ex.version_prefix("digits", manifest["version"]), manifest["shards"][0]["file"]))
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "forgeline.model": "digits", "forgeline.version": manifest["version"],
                                "forgeline.run_id": "run-1", "forgeline.data_version": "b1+b2"}
    # the asset check: bit-exact tensors and the same outputs as the trained model
    assert ex.check_version(local_storage, "digits", manifest["version"], m, batch()) == []
    rebuilt = ex.build_from_version(local_storage, "digits", manifest["version"])
    with torch.no_grad():
        assert torch.equal(rebuilt(batch()), m(batch()))


def test_round_trip_from_meta_and_checkpoint(local_storage):
    m = trained_cnn(seed=3)
    key = save_ckpt(local_storage, "ckpt/run-3", m)
    src = ex.from_checkpoint(local_storage, key, model_name="digits_cnn", model_kwargs=KW,
                             expected_sha256=checkpoints.latest_checkpoint(local_storage, "ckpt/run-3")["sha256"])
    assert [e.name for e in src.entries] == list(m.state_dict())  # metadata first, in module order
    assert all(t.device.type == "cpu" for _, t in src)
    manifest = ex.export(src, local_storage, "digits", "v1", max_shard_bytes=16 * 1024, run_id="run-3")
    check_published(local_storage, "digits", manifest, m.state_dict(), 16 * 1024)
    assert manifest["source"] == {"source": "checkpoint", "checkpoint": local_storage.uri(key), "checkpoint_format": checkpoints.CHECKPOINT_FORMAT,
                                  "checkpoint_epoch": 3, "checkpoint_sha256": src.info["checkpoint_sha256"]}
    assert ex.check_version(local_storage, "digits", "v1", m, batch()) == []
    # the source stays usable after export released its pages: they come back from the file
    assert_bit_exact(dict(src), m.state_dict())


def test_export_cast_to_bf16_keeps_integer_buffers(local_storage):
    m = trained_cnn()
    key = save_ckpt(local_storage, "ckpt/bf16", m)
    src = ex.from_checkpoint(local_storage, key, model_name="digits_cnn", model_kwargs=KW, dtype=torch.bfloat16)
    manifest = ex.export(src, local_storage, "digits", "bf16")
    assert [s["file"] for s in manifest["shards"]] == ["model.safetensors"]
    assert manifest["config"]["dtype"] == "bfloat16" and manifest["dtypes"] == {"bfloat16": 22, "int64": 4}
    loaded = ex.load_state_dict(local_storage, "digits", "bf16")
    for k, t in m.state_dict().items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert bits(loaded[k]) == bits(want) and loaded[k].dtype == want.dtype, k
    problems = ex.check_version(local_storage, "digits", "bf16", m)  # tensors compared after the same cast
    assert problems == []


def test_versions_are_immutable(local_storage):
    m = trained_cnn()
    first = ex.export(ex.from_module(m, architecture="digits_cnn", model_kwargs=KW), local_storage, "digits", "v1")
    before = {o.key: local_storage.checksum(o.key) for o in local_storage.list("models")}
    with pytest.raises(ex.VersionExists, match="immutable"):
        ex.export(ex.from_module(trained_cnn(seed=9)), local_storage, "digits", "v1")
    assert {o.key: local_storage.checksum(o.key) for o in local_storage.list("models")} == before
    assert ex.read_manifest(local_storage, "digits", "v1") == first
    auto = ex.export(ex.from_module(m), local_storage, "digits")
    assert auto["version"] != "v1" and len(auto["version"]) == len("20260101T000000Z-abcdef")
    with pytest.raises(ValueError, match="invalid version"):
        ex.export(ex.from_module(m), local_storage, "digits", "a/b")


class FailingSource(ex.TensorSource):
    """Raises when asked for its ``fail_at``-th tensor, like a read error mid-export."""

    def __init__(self, state, fail_at: int):
        super().__init__(state)
        self.fail_at, self.calls = fail_at, 0

    def tensor(self, name):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError("disk went away")
        return super().tensor(name)


def test_failed_export_publishes_nothing(local_storage):
    state = {f"w{i}": torch.full((256,), float(i)) for i in range(8)}  # 1 KiB each
    src = FailingSource(state, fail_at=6)
    with pytest.raises(OSError, match="disk went away"):
        ex.export(src, local_storage, "digits", "broken", max_shard_bytes=2048 + 512)
    assert src.calls == 6  # two shards were complete when it failed
    assert ex.list_versions(local_storage, "digits") == []
    assert local_storage.list("models") == [] and local_storage.stale_temporaries() == []
    with pytest.raises(ex.VersionNotFound):
        ex.read_manifest(local_storage, "digits", "broken")
    # leftovers of a crash (no cleanup ran) do not block or leak into a later export of that version
    local_storage.write_atomic(join(ex.version_prefix("digits", "broken"), "model-00009-of-00009.safetensors"), b"junk")
    assert ex.list_versions(local_storage, "digits") == []
    manifest = ex.export(ex.TensorSource(state), local_storage, "digits", "broken", max_shard_bytes=2048 + 512)
    assert version_files(local_storage, "digits", "broken") == sorted(
        [s["file"] for s in manifest["shards"]] + [ex.INDEX_NAME, ex.MANIFEST_NAME])


def test_corrupt_or_missing_shard_is_named(local_storage):
    m = trained_cnn()
    manifest = ex.export(ex.from_module(m, architecture="digits_cnn", model_kwargs=KW), local_storage, "digits", "v1",
                         max_shard_bytes=16 * 1024)
    assert ex.verify(local_storage, "digits", "v1") == []
    bad = manifest["shards"][1]["file"]
    path = local_storage.local_path(join(ex.version_prefix("digits", "v1"), bad))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a tensor: safetensors still loads it
    path.write_bytes(bytes(data))
    problems = ex.verify(local_storage, "digits", "v1")
    assert len(problems) == 1 and bad in problems[0] and "sha256 mismatch" in problems[0]
    with pytest.raises(ex.VerificationFailed, match=bad):
        ex.load_state_dict(local_storage, "digits", "v1")
    check = ex.check_version(local_storage, "digits", "v1", m, batch())
    assert len(check) == 1 and bad in check[0]
    # without verification the loader returns the corrupted weights; the check compares tensors too
    assert ex.load_state_dict(local_storage, "digits", "v1", verify=False)
    other = manifest["shards"][0]["file"]
    local_storage.delete(join(ex.version_prefix("digits", "v1"), other))
    problems = ex.verify(local_storage, "digits", "v1")
    assert problems[0].startswith(f"shard {other}: missing") and bad in problems[1]


def test_verify_checks_the_recorded_crc32_and_reads_manifests_without_it(local_storage):
    ex.export(ex.from_module(trained_cnn(), architecture="digits_cnn", model_kwargs=KW), local_storage, "digits", "v1",
              max_shard_bytes=16 * 1024)
    key = join(ex.version_prefix("digits", "v1"), ex.MANIFEST_NAME)
    manifest = json.loads(local_storage.read(key))
    first, second = manifest["shards"][:2]
    first["crc32"] = f"{int(first['crc32'], 16) ^ 1:08x}"  # the bytes still match the sha256
    del second["crc32"]  # as manifests written before crc32 was recorded
    local_storage.write_atomic(key, json.dumps(manifest).encode())
    [problem] = ex.verify(local_storage, "digits", "v1")
    assert problem.startswith(f"shard {first['file']}: crc32 mismatch") and first["crc32"] in problem
    listed = ex.manifest_files(manifest)
    assert listed[1] == (second["file"], second["bytes"], second["sha256"], None)
    assert listed[-1].file == ex.INDEX_NAME and listed[-1].crc32 == manifest["index"]["crc32"]


def test_check_fails_when_weights_differ(local_storage):
    m = trained_cnn()
    ex.export(ex.from_module(m, architecture="digits_cnn", model_kwargs=KW), local_storage, "digits", "v1")
    other = trained_cnn(seed=5)
    problems = ex.check_version(local_storage, "digits", "v1", other, batch())
    assert problems and all("differs from the trained model" in p for p in problems)


def test_a_diverged_model_is_named_and_its_version_rejected(local_storage, monkeypatch):
    """Weights gone NaN (a learning rate far too high): the export check says the training diverged
    (NaN is never equal to NaN: it said the outputs 'differ'), and the failed gate is recorded in
    the manifest, so the version is neither latest nor promotable (it was both)."""
    from pipeline import package, promotion

    m = trained_cnn()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    key = save_ckpt(local_storage, "ckpt/nan", m)
    sha = checkpoints.latest_checkpoint(local_storage, "ckpt/nan")["sha256"]
    monkeypatch.setattr(package, "fixed_batch", lambda shards, spec: batch())  # no data needed to see NaN
    result = package.export_trained(local_storage, "digits", checkpoint=key, checkpoint_sha256=sha,
                                    architecture="digits_cnn", model_kwargs=KW, check_shards=[],
                                    spec={"crop": 28, "mean": [0.25], "std": [0.35]})
    [problem] = result["problems"]
    assert problem.startswith("the trained model's outputs on the check batch are not finite") and "diverged" in problem
    version = result["manifest"]["version"]
    assert "loads_back_bit_exact" in result["manifest"]["rejected"]["reason"]
    assert ex.latest_version(local_storage, "digits") is None
    with pytest.raises(promotion.PromotionError, match="rejected"):
        promotion.promote(local_storage, "digits", version)

    # a sound model: the passed check is in its manifest too, so a promotion by hand records it
    good = save_ckpt(local_storage, "ckpt/good", trained_cnn())
    sha = checkpoints.latest_checkpoint(local_storage, "ckpt/good")["sha256"]
    ok = package.export_trained(local_storage, "digits", checkpoint=good, checkpoint_sha256=sha,
                                architecture="digits_cnn", model_kwargs=KW, check_shards=[],
                                spec={"crop": 28, "mean": [0.25], "std": [0.35]})
    assert ok["problems"] == [] and "rejected" not in ok["manifest"]
    assert ok["manifest"]["gates"]["loads_back_bit_exact"] == {"passed": True, "value": 0, "limit": 0,
                                                               "unit": "problems", "problems": []}
    record = promotion.promote(local_storage, "digits", ok["manifest"]["version"])
    assert record["gates"]["loads_back_bit_exact"]["passed"]


def test_checkpoint_that_does_not_match_the_architecture(local_storage):
    key = save_ckpt(local_storage, "ckpt/a", trained_cnn())
    with pytest.raises(ex.CheckpointMismatch, match=r"'features\.0\.0\.weight' has shape \[8, 1, 3, 3\] in the checkpoint, \[16, 1, 3, 3\]"):
        ex.from_checkpoint(local_storage, key, model_name="digits_cnn", model_kwargs={"width": 16})
    sd = trained_cnn().state_dict()
    sd.pop("head.3.bias")
    sd["extra"] = torch.zeros(1)
    local_storage.write_atomic("ckpt/b.pt", _torch_bytes({"model": sd}))
    with pytest.raises(ex.CheckpointMismatch, match=r"'head\.3\.bias' is missing .* \(2 mismatches in all\)"):
        ex.from_checkpoint(local_storage, "ckpt/b.pt", model_name="digits_cnn", model_kwargs=KW)
    sd = trained_cnn().state_dict()
    sd["head.3.bias"] = sd["head.3.bias"].double()
    local_storage.write_atomic("ckpt/c.pt", _torch_bytes({"model": sd}))
    with pytest.raises(ex.CheckpointMismatch, match=r"'head\.3\.bias' is torch\.float64 in the checkpoint"):
        ex.from_checkpoint(local_storage, "ckpt/c.pt", model_name="digits_cnn", model_kwargs=KW)
    with pytest.raises(ex.CheckpointMismatch, match="sha256"):
        ex.from_checkpoint(local_storage, key, model_name="digits_cnn", model_kwargs=KW, expected_sha256="0" * 64)
    with pytest.raises(ex.CheckpointMismatch, match="no state dict under 'weights'"):
        ex.from_checkpoint(local_storage, key, model_name="digits_cnn", model_kwargs=KW, state_key="weights")
    with pytest.raises(FileNotFoundError):
        ex.from_checkpoint(local_storage, "ckpt/none.pt", model_name="digits_cnn")


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_meta_module_cannot_be_exported_live(local_storage):
    with torch.device("meta"):
        m = models.build_model("digits_cnn", **KW)
    with pytest.raises(ex.ExportError, match="meta device"):
        ex.from_module(m)


def test_list_and_latest_versions(local_storage):
    m = trained_cnn()
    assert ex.list_versions(local_storage, "digits") == [] and ex.latest_version(local_storage, "digits") is None
    ex.export(ex.from_module(m), local_storage, "digits", "b")
    ex.export(ex.from_module(m), local_storage, "digits", "a")  # created later, sorts first
    ex.export(ex.from_module(m), local_storage, "digits-v2", "z")  # another model, not listed
    local_storage.write_atomic(join(ex.version_prefix("digits", "c"), "model.safetensors"), b"partial")
    assert ex.list_versions(local_storage, "digits") == ["a", "b"]
    assert ex.latest_version(local_storage, "digits") == "a"
    ex.record_gates(local_storage, "digits", "a", {"gate": {"passed": False, "value": 1, "limit": 0}})
    assert ex.latest_version(local_storage, "digits") == "b"  # a rejected version is never latest
    assert ex.version_problem(local_storage, "digits", "a") == "digits/a is rejected: failed gate(s): gate"
    ex.record_gates(local_storage, "digits", "a", {"gate": {"passed": True, "value": 0, "limit": 0}})
    assert ex.latest_version(local_storage, "digits") == "a"  # a passing re-evaluation clears it


def test_golden_outputs_are_published_verified_and_read_back(local_storage):
    m = trained_cnn()
    golden = ex.golden_outputs(m, ex.golden_input((1, 28, 28)))
    assert golden["input"].shape == (8, 1, 28, 28) and golden["input"].dtype == golden["output"].dtype == torch.float32
    assert torch.equal(golden["input"], ex.golden_input((1, 28, 28)))  # fixed and seeded
    manifest = ex.export(ex.from_module(m, architecture="digits_cnn", model_kwargs=KW), local_storage, "digits", "v1",
                         golden=golden)
    prefix = ex.version_prefix("digits", "v1")
    key = join(prefix, "golden.safetensors")
    data = local_storage.read(key)
    assert manifest["golden"] == {"file": "golden.safetensors", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                  "crc32": f"{zlib.crc32(data):08x}"}
    with safe_open(str(local_storage.local_path(key)), "pt") as f:
        assert set(f.keys()) == {"input", "output"}
    got = ex.read_golden(local_storage, "digits", "v1")
    assert torch.equal(got["output"], ex.build_from_version(local_storage, "digits", "v1")(got["input"]).detach())
    assert ex.verify(local_storage, "digits", "v1") == [] and ex.version_problem(local_storage, "digits", "v1") is None

    local_storage.write_atomic(key, data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    [problem] = ex.verify(local_storage, "digits", "v1")
    assert problem.startswith("golden golden.safetensors: sha256 mismatch")
    with pytest.raises(ex.VerificationFailed, match="golden"):
        ex.read_golden(local_storage, "digits", "v1")
    local_storage.delete(key)
    assert "golden.safetensors is missing" in ex.version_problem(local_storage, "digits", "v1")
    assert ex.latest_version(local_storage, "digits") is None
    with pytest.raises(ex.ExportError, match="float32"):
        ex.export(ex.from_module(m), local_storage, "digits", "v2", golden={"input": golden["input"].double(),
                                                                          "output": golden["output"]})


def test_find_version_by_source(local_storage):
    m = trained_cnn()
    src = {"checkpoint_sha256": "abc", "dtype": None}
    assert ex.find_version(local_storage, "digits", src) is None
    ex.export(ex.from_module(m), local_storage, "digits", "v1", metadata={"source": {"checkpoint_sha256": "old"}})
    ex.export(ex.from_module(m), local_storage, "digits", "v2", metadata={"source": src})
    ex.export(ex.from_module(m), local_storage, "digits", "v3")  # no source recorded: never matched
    assert ex.find_version(local_storage, "digits", src) == "v2"
    assert ex.find_version(local_storage, "digits", {**src, "dtype": "bfloat16"}) is None


def test_quantized_version_is_reused_not_republished(local_storage):
    from pipeline import package

    ex.export(ex.from_module(trained_cnn(), architecture="digits_cnn", model_kwargs=KW), local_storage, "digits", "v1")
    first = package.publish_quantized(local_storage, "digits", "v1", "int8")
    files = {o.key: local_storage.checksum(o.key) for o in local_storage.list("models/digits-int8")}
    again = package.publish_quantized(local_storage, "digits", "v1", "int8")
    assert not first["reused"] and again["reused"]
    assert again["manifest"] == first["manifest"] and again["ratio"] == first["ratio"]
    assert again["skipped"] == first["skipped"]
    assert {o.key: local_storage.checksum(o.key) for o in local_storage.list("models/digits-int8")} == files
    package.publish_quantized(local_storage, "digits", "v1", "int4", group_size=16)
    with pytest.raises(ex.VersionExists, match="immutable"):
        package.publish_quantized(local_storage, "digits", "v1", "int4", group_size=32)
    shard = next(o.key for o in local_storage.list("models/digits-int8") if o.key.endswith(".safetensors"))
    local_storage.write_atomic(shard, local_storage.read(shard)[:-1] + b"\0")
    with pytest.raises(ex.VerificationFailed):
        package.publish_quantized(local_storage, "digits", "v1", "int8")


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------


class Blob(nn.Module):
    """Flat parameters only (a stand-in for a big model); registered as an architecture in tests."""

    def __init__(self, n: int = 4, numel: int = 1024):
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.empty(numel)) for _ in range(n))

    def forward(self, x):
        return x * sum(p.sum() for p in self.w)


def test_s3_round_trip_and_manifest_last(s3_storage, monkeypatch, tmp_path):
    monkeypatch.setitem(models.REGISTRY, "blob", Blob)
    g = torch.Generator().manual_seed(0)
    m = Blob(n=3, numel=(3 << 20) // 4)  # 3 MiB each; a 6 MiB shard goes up as a multipart upload
    with torch.no_grad():
        for p in m.w:
            p.copy_(torch.randn(p.shape, generator=g))
    key = save_ckpt(s3_storage, "ckpt/blob", m)
    src = ex.from_checkpoint(s3_storage, key, model_name="blob", model_kwargs={"n": 3, "numel": (3 << 20) // 4}, tmp_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the streamed copy is unlinked once mapped
    manifest = ex.export(src, s3_storage, "blob", "v1", max_shard_bytes=7 << 20, run_id="r", data_version="d")
    assert [len(s["tensors"]) for s in manifest["shards"]] == [2, 1]
    check_published(s3_storage, "blob", manifest, m.state_dict(), 7 << 20)
    assert ex.verify(s3_storage, "blob", "v1") == []
    assert ex.check_version(s3_storage, "blob", "v1", m, torch.ones(2)) == []
    # the manifest is the version: without it the files are not a version
    s3_storage.delete(join(ex.version_prefix("blob", "v1"), ex.MANIFEST_NAME))
    assert ex.list_versions(s3_storage, "blob") == []
    with pytest.raises(ex.VersionNotFound):
        ex.load_state_dict(s3_storage, "blob", "v1")
    # a failed export on S3 leaves nothing behind either
    with pytest.raises(OSError):
        ex.export(FailingSource(m.state_dict(), fail_at=3), s3_storage, "blob", "v2", max_shard_bytes=4 << 20)
    assert s3_storage.list(ex.version_prefix("blob", "v2")) == []


def test_s3_corrupt_shard_is_named(s3_storage):
    m = trained_cnn()
    manifest = ex.export(ex.from_module(m, architecture="digits_cnn", model_kwargs=KW), s3_storage, "digits", "v1",
                         max_shard_bytes=16 * 1024)
    bad = manifest["shards"][-1]["file"]
    key = join(ex.version_prefix("digits", "v1"), bad)
    data = bytearray(s3_storage.read(key))
    data[-1] ^= 0xFF
    s3_storage.write_atomic(key, bytes(data))  # same size, new (self-consistent) stored sha256
    problems = ex.verify(s3_storage, "digits", "v1")
    assert len(problems) == 1 and bad in problems[0] and "sha256 mismatch" in problems[0]
    with pytest.raises(ex.VerificationFailed, match=bad):
        ex.build_from_version(s3_storage, "digits", "v1")


# ---------------------------------------------------------------------------------------------
# Memory: exporting streams
# ---------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch import nn
    from pipeline import export as ex, models
    from pipeline.storage import LocalStorage

    def status():  # MiB; VmHWM is this process's peak RSS (ru_maxrss would include the parent's
        out = {}   # peak: with vfork+exec the child starts with the forking process's high water)
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
        return out

    class Blob(nn.Module):
        def __init__(self, n, numel):
            super().__init__()
            self.w = nn.ParameterList(nn.Parameter(torch.empty(numel)) for _ in range(n))

    models.REGISTRY["blob"] = Blob
    root, n, numel, shard, release = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    store = LocalStorage(root, fsync=False)
    torch.zeros(1).sum()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current RSS
    except OSError:
        pass  # the peak so far is the imports', about the current RSS
    base = status()
    src = ex.from_checkpoint(store, "ckpt.pt", model_name="blob", model_kwargs={"n": n, "numel": numel})
    if not release:
        src.release = lambda name: None  # keep the mapped pages: what the page release saves
    manifest = ex.export(src, store, "blob", "v" + sys.argv[5], max_shard_bytes=shard)
    end = status()
    print(json.dumps({"base": max(base["VmRSS"], base["VmHWM"]), "peak": end["VmHWM"], "end_anon": end["RssAnon"],
                      "end_file": end["RssFile"], "base_anon": base["RssAnon"], "base_file": base["RssFile"],
                      "shards": len(manifest["shards"]), "total": manifest["total_size"]}))
""")


def _export_peak(tmp_path, n, numel, shard, release=True) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), str(n), str(numel), str(shard), "1" if release else "0"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss semantics and madvise are Linux's")
def test_export_from_checkpoint_streams(tmp_path):
    n, numel, shard = 50, 1 << 20, 32 << 20  # 50 tensors of 4 MiB = 200 MiB, 32 MiB shards
    g = torch.Generator().manual_seed(0)
    state = {f"w.{i}": torch.rand(numel, generator=g) for i in range(n)}
    torch.save({"model": state}, tmp_path / "ckpt.pt")
    want = {k: hashlib.sha256(bits(v)).hexdigest() for k, v in state.items()}
    del state
    size = n * numel * 4
    r = _export_peak(tmp_path, n, numel, shard)
    growth = r["peak"] - r["base"]
    plain = _export_peak(tmp_path, n, numel, shard, release=False)
    plain_growth = plain["peak"] - plain["base"]
    print(f"\nexport of {size >> 20} MiB in {r['shards']} shards of <= {shard >> 20} MiB: peak RSS growth "
          f"{growth / 2**20:.1f} MiB ({growth / size:.2f}x the model); without releasing mapped pages "
          f"{plain_growth / 2**20:.1f} MiB ({plain_growth / size:.2f}x, of it file-backed at the end: "
          f"{(plain['end_file'] - plain['base_file']) / 2**20:.1f} MiB)")
    assert r["shards"] == 8 and r["total"] == size
    # Near one shard plus slack, far from the 2x of materialize-then-serialize. Without the page
    # release the mapped checkpoint stays resident (clean, file-backed pages), but is never copied.
    assert growth < shard + 48 * 2**20, growth
    assert plain_growth < 1.5 * size, plain_growth
    store = LocalStorage(tmp_path, fsync=False)
    for version in ("v1", "v0"):
        assert ex.verify(store, "blob", version) == []
    loaded = ex.load_state_dict(store, "blob", "v1", verify=False)
    assert {k: hashlib.sha256(bits(v)).hexdigest() for k, v in loaded.items()} == want
