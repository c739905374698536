"""The /dev/shm tier, for real: versions published with ``pipeline.export`` (local disk and S3) are
pre-warmed into a tier directory and compared byte for byte; the budget, LRU eviction and pins, a
full filesystem, corrupt sources, copies that fail or are killed midway, and two processes racing
(``multiprocessing`` with spawn, released together by a barrier) are exercised.

The tier lives on the real tmpfs (``/dev/shm/forgeline-test-*``) when this host has a writable
/dev/shm, else under pytest's ``tmp_path`` (the code is the same; only the RAM backing differs);
it is removed after each test.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from pipeline import export as ex
from pipeline.loading import LoadReport, load
from pipeline.shm_tier import PrewarmReport, ShmTier, VersionPinned, resolve_source
from pipeline.storage import IntegrityError, LocalStorage, Storage, StorageError, StorageFull, copy_between, join

MODEL = "digits"
SHARD_LIMIT = 100_000  # 4 tensors of 80 kB -> 4 shards per version


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(20_000, generator=g) for i in range(4)}


def publish(store: Storage, version: str, seed: int = 0) -> dict:
    return ex.export(state(seed), store, MODEL, version, max_shard_bytes=SHARD_LIMIT)


def files_of(store: Storage, model: str, version: str) -> dict[str, bytes]:
    prefix = ex.version_prefix(model, version)
    return {o.key[len(prefix) + 1:]: store.read(o.key) for o in store.list(prefix)}


def version_dirs(tier: ShmTier) -> list[str]:
    base = tier.root / "models"
    return sorted(f"{m.name}/{v.name}" for m in base.iterdir() for v in m.iterdir()) if base.is_dir() else []


@pytest.fixture
def tier_root(tmp_path) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = shm / f"forgeline-test-{uuid.uuid4().hex[:12]}"  # the real tmpfs
    else:  # no writable /dev/shm on this host: same code on an ordinary directory
        root = tmp_path / "shm"
    yield root
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Storage wrappers that misbehave on purpose (module level: picklable for spawned children)
# ---------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, owner: "Wrapped", key: str, f):
        self.owner, self.key, self.f, self.count = owner, key, f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(65536 if n is None or n < 0 or n > 65536 else n) if n != 0 else b""
        if n is None or n < 0:  # read() to the end
            while more := self.f.read(65536):
                data += more
        self.count += len(data)
        self.owner.on_read(self.key, self.count)
        return data

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Wrapped(Storage):
    """Delegates to ``inner``; ``on_read(key, bytes_so_far)`` is called after every read."""

    def __init__(self, inner: Storage):
        self.inner = inner

    def on_read(self, key: str, count: int) -> None:
        pass

    def open_read(self, key):
        return _Reader(self, key, self.inner.open_read(key))

    def read_range(self, key, start, length):
        return self.inner.read_range(key, start, length)

    def open_write(self, key, **kw):
        return self.inner.open_write(key, **kw)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def stat(self, key):
        return self.inner.stat(key)

    def delete(self, key):
        self.inner.delete(key)

    def uri(self, key=""):
        return self.inner.uri(key)


class FailsMidway(Wrapped):
    """Raises (a dropped connection, say) once ``after`` bytes of ``key`` have been read."""

    def __init__(self, inner, key: str, after: int):
        super().__init__(inner)
        self.key, self.after = key, after

    def on_read(self, key, count):
        if key == self.key and count > self.after:
            raise StorageError(f"{self.uri(key)}: connection reset (simulated) after {count} bytes")


class StallsMidway(Wrapped):
    """Once ``after`` bytes of ``key`` were read: drop ``marker`` and hang (to be killed)."""

    def __init__(self, inner, key: str, after: int, marker: str):
        super().__init__(inner)
        self.key, self.after, self.marker = key, after, marker

    def on_read(self, key, count):
        if key == self.key and count > self.after:
            Path(self.marker).touch()
            time.sleep(120)


class Slow(Wrapped):
    def on_read(self, key, count):
        time.sleep(0.05)


def _prewarm_child(tier_root: str, store: Storage, version: str, barrier, results) -> None:
    tier = ShmTier(tier_root)
    if barrier is not None:
        barrier.wait(timeout=60)
    try:
        report = tier.prewarm(store, MODEL, version)
        results.put(("ok", report.hit, report.bytes))
    except BaseException as e:  # reported to the parent, which fails the test
        results.put(("error", repr(e), 0))


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_prewarm_miss_then_hit_identical_bytes(local_storage, tier_root):
    publish(local_storage, "v1", seed=1)
    m2 = publish(local_storage, "v2", seed=2)
    tier = ShmTier(tier_root)
    assert not tier.complete(MODEL, "v2")

    first = tier.prewarm(local_storage, MODEL)  # "latest"
    assert isinstance(first, PrewarmReport)
    assert (first.model, first.version, first.hit) == (MODEL, "v2", False)
    src = files_of(local_storage, MODEL, "v2")
    assert first.bytes == first.version_bytes == sum(map(len, src.values()))
    assert first.seconds > 0 and first.gbps > 0 and first.evicted == []
    assert files_of(tier.storage(), MODEL, "v2") == src  # every byte, manifest included
    assert len([f for f in src if f.endswith(".safetensors")]) == len(m2["shards"]) == 4
    assert len(first.file_seconds) == 4 + 1 and min(first.file_seconds) > 0  # every shard and the index
    assert ex.verify(tier.storage(), MODEL, "v2") == []  # readers work on the tier unchanged
    assert ex.list_versions(LocalStorage(tier_root), MODEL) == ["v2"]
    got = ex.load_state_dict(tier.storage(), MODEL, "v2")
    assert all(torch.equal(got[k], v) for k, v in state(2).items())
    assert tier.complete(MODEL, "v2")

    again = tier.prewarm(local_storage, MODEL, "v2")
    assert again.hit and again.bytes == 0 and again.version_bytes == first.version_bytes and again.file_seconds == []
    assert tier.complete(MODEL, "v2") and not tier.complete(MODEL, "v1")
    assert tier.resolve(MODEL) == tier.resolve(MODEL, "v2") == tier_root.resolve() / "models" / MODEL / "v2"
    assert tier.resolve(MODEL, "v1") is None
    # a newer version with a shard missing is not latest: the pre-warm passes over it to v2 (a hit)
    m3 = publish(local_storage, "v3", seed=3)
    local_storage.delete(join(ex.version_prefix(MODEL, "v3"), m3["shards"][0]["file"]))
    third = tier.prewarm(local_storage, MODEL)
    assert (third.version, third.hit) == ("v2", True) and not tier.complete(MODEL, "v3")
    [entry] = tier.list()
    assert (entry.model, entry.version, entry.bytes, entry.pinned) == (MODEL, "v2", first.version_bytes, False)
    assert tier.used_bytes() == first.version_bytes
    assert not list(tier.root.rglob("*.tmp-*"))


def test_prewarm_from_s3(s3_storage, tier_root):
    publish(s3_storage, "s1", seed=3)
    tier = ShmTier(tier_root)
    report = tier.prewarm(s3_storage, MODEL, "s1")
    assert not report.hit and report.bytes > 0
    assert files_of(tier.storage(), MODEL, "s1") == files_of(s3_storage, MODEL, "s1")
    assert ex.verify(tier.storage(), MODEL, "s1") == []
    assert tier.prewarm(s3_storage, MODEL, "s1").hit


def test_prewarm_from_s3_of_small_files_asks_for_each_once_and_for_all_at_once(s3_storage, tier_root, s3_requests):
    """A version of many small files (one piece each) pre-warmed by its production alias: the alias
    and the manifest (read once: the copy is what resolving the alias checked), then one GET per
    file, none stat-ed (each GET answers its size and ETag; resolving the alias stats nothing),
    all of them in flight together (more files than the store's ``concurrency``)."""
    from pipeline import promotion

    torch.manual_seed(3)
    manifest = ex.export({f"t{i}": torch.randn(64) for i in range(12)}, s3_storage, MODEL, "s1", max_shard_bytes=300)
    promotion.promote(s3_storage, MODEL, "s1")
    listed = [f.file for f in ex.manifest_files(manifest)]
    assert len(listed) > s3_storage.concurrency  # 12 shards and the index
    req = s3_requests(s3_storage.client)
    assert not ShmTier(tier_root).prewarm(s3_storage, MODEL, "production").hit
    firsts, heads, gets, peak = req.of("header"), req.of("HEAD"), req.of("GET"), dict(req.peak)
    assert files_of(ShmTier(tier_root).storage(), MODEL, "s1") == files_of(s3_storage, MODEL, "s1")
    assert firsts[:2] == [f"{MODEL}/production", "s1/manifest.json"] and "s1/manifest.json" not in firsts[2:]
    assert sorted(firsts[2:]) == sorted(f"s1/{f}" for f in listed)
    assert not heads and not gets
    assert peak["header"] == len(listed), peak
    req.calls.clear()  # the new_model_version sensor's question: the alias and the manifest, no stats
    assert promotion.resolve_manifest(s3_storage, MODEL, promotion.ALIAS, files=False)[0] == "s1"
    assert req.of("header") == [f"{MODEL}/production", "s1/manifest.json"] and not req.of("HEAD")
    req.calls.clear()  # a pre-warm of latest that the tier holds whole: the listing and the manifests
    assert ShmTier(tier_root).prewarm(s3_storage, MODEL, "latest").hit
    assert req.of("LIST") and req.of("header") == ["s1/manifest.json"] and not req.of("HEAD")


def test_budget_evicts_lru_unpinned(local_storage, tier_root):
    for i, v in enumerate("abcde"):
        publish(local_storage, v, seed=i)
    probe = ShmTier(tier_root)
    size = probe.prewarm(local_storage, MODEL, "a").version_bytes
    probe.evict(MODEL, "a")
    tier = ShmTier(tier_root, capacity_bytes=3 * size + size // 2)  # room for three versions

    assert [tier.prewarm(local_storage, MODEL, v).evicted for v in "abc"] == [[], [], []]
    assert tier.resolve(MODEL, "a") is not None  # a is now the most recently used: b is the LRU
    d = tier.prewarm(local_storage, MODEL, "d")
    assert not d.hit and d.evicted == [f"{MODEL}/b"]
    assert [e.version for e in tier.list()] == ["c", "a", "d"]  # LRU first

    tier.pin(MODEL, "c")  # c is the LRU now, but pinned: a goes instead
    e = tier.prewarm(local_storage, MODEL, "e")
    assert e.evicted == [f"{MODEL}/a"]
    assert {(x.version, x.pinned) for x in tier.list()} == {("c", True), ("d", False), ("e", False)}
    assert tier.used_bytes() <= tier.capacity_bytes
    assert all(ex.verify(tier.storage(), MODEL, v) == [] for v in "cde")

    with pytest.raises(VersionPinned, match="pinned"):
        tier.evict(MODEL, "c")
    assert tier.complete(MODEL, "c")
    assert tier.evict(MODEL, "c", force=True) and not tier.complete(MODEL, "c") and not tier.pinned(MODEL, "c")

    # prewarm(pin=True) protects the new version: with every other one pinned too, nothing fits
    tier.prewarm(local_storage, MODEL, "b", pin=True)
    tier.pin(MODEL, "d"), tier.pin(MODEL, "e")
    before = sorted((x.version, x.bytes) for x in tier.list())
    with pytest.raises(StorageFull, match=r"needs \d+ bytes; the budget is \d+ bytes .*pinned.*nothing was evicted"):
        tier.prewarm(local_storage, MODEL, "a")
    assert sorted((x.version, x.bytes) for x in tier.list()) == before


def test_version_bigger_than_budget_or_full_shm(local_storage, tier_root):
    publish(local_storage, "small", seed=0)
    big = ex.export({"w": torch.randn(200_000)}, local_storage, MODEL, "big", max_shard_bytes=SHARD_LIMIT)
    tier = ShmTier(tier_root, capacity_bytes=500_000)
    tier.prewarm(local_storage, MODEL, "small")
    before = (tier.list(), version_dirs(tier), tier.used_bytes())

    with pytest.raises(StorageFull, match=r"digits/big needs \d+ bytes, more than the whole budget of 500000"):
        tier.prewarm(local_storage, MODEL, "big")
    assert (tier.list(), version_dirs(tier), tier.used_bytes()) == before
    assert big["bytes"] > 500_000

    # the filesystem itself is (reported) full: clear error, nothing evicted or written
    roomy = ShmTier(tier_root)
    roomy._fs_free = lambda: 4096
    with pytest.raises(StorageFull, match=r"has 4096 bytes free .*/dev/shm is full.*nothing was evicted"):
        roomy.prewarm(local_storage, MODEL, "big")
    assert (tier.list(), version_dirs(tier), tier.used_bytes()) == before


def test_enospc_mid_copy_leaves_tier_consistent(local_storage, tier_root, monkeypatch):
    publish(local_storage, "keep", seed=0)
    manifest = publish(local_storage, "v", seed=1)
    tier = ShmTier(tier_root)
    tier.prewarm(local_storage, MODEL, "keep")
    second = manifest["shards"][1]["file"]
    real_open_write = tier.store.open_write

    def open_write(key, **kw):  # the kernel refuses the second shard's bytes: tmpfs is full
        w = real_open_write(key, **kw)
        if key.endswith(second):
            def write(data):
                w.abort()
                raise StorageFull(f"{tier.store.uri(key)}: no space left on device ({os.strerror(errno.ENOSPC)})")
            w.write = write
        return w

    monkeypatch.setattr(tier.store, "open_write", open_write)
    with pytest.raises(StorageFull, match=r"filled up after \d+ of \d+ bytes.*no space left.*partial copy was removed"):
        tier.prewarm(local_storage, MODEL, "v")
    assert version_dirs(tier) == [f"{MODEL}/keep"] and not tier.complete(MODEL, "v")
    assert [e.version for e in tier.list()] == ["keep"] and ex.verify(tier.storage(), MODEL, "keep") == []
    assert not list(tier.root.rglob("*.tmp-*")) and not [p for p in (tier.meta / "reserve").rglob("*") if p.is_file()]

    monkeypatch.undo()
    assert not tier.prewarm(local_storage, MODEL, "v").hit
    assert ex.verify(tier.storage(), MODEL, "v") == []


def test_corrupt_source_shard_is_rejected(local_storage, tier_root):
    manifest = publish(local_storage, "v", seed=0)
    bad = manifest["shards"][2]["file"]
    path = local_storage.local_path(join(ex.version_prefix(MODEL, "v"), bad))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    path.write_bytes(bytes(data))
    tier = ShmTier(tier_root)
    with pytest.raises(IntegrityError, match=rf"{bad}: sha256 [0-9a-f]+ != expected {manifest['shards'][2]['sha256']}"):
        tier.prewarm(local_storage, MODEL, "v")
    assert version_dirs(tier) == [] and not tier.complete(MODEL, "v") and tier.used_bytes() == 0
    assert tier.list() == [] and not list(tier.root.rglob("*.tmp-*"))


def test_failure_mid_copy_then_retry(local_storage, tier_root):
    manifest = publish(local_storage, "v", seed=0)
    key = join(ex.version_prefix(MODEL, "v"), manifest["shards"][2]["file"])
    tier = ShmTier(tier_root)
    with pytest.raises(StorageError, match="connection reset"):
        tier.prewarm(FailsMidway(local_storage, key, after=1000), MODEL, "v")
    assert version_dirs(tier) == [] and tier.list() == [] and tier.used_bytes() == 0
    report = tier.prewarm(local_storage, MODEL, "v")
    assert not report.hit and ex.verify(tier.storage(), MODEL, "v") == []


def test_killed_mid_copy_then_next_prewarm_succeeds(local_storage, tier_root, tmp_path):
    manifest = publish(local_storage, "v", seed=0)
    key = join(ex.version_prefix(MODEL, "v"), manifest["shards"][2]["file"])
    marker = tmp_path / "stalled"
    tier = ShmTier(tier_root, capacity_bytes=10_000_000)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_prewarm_child,
                        args=(str(tier_root), StallsMidway(local_storage, key, 1000, str(marker)), "v", None, results))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.is_alive() and time.monotonic() < deadline, "child never reached the middle of the copy"
            time.sleep(0.02)
        child.kill()  # SIGKILL in the middle of the third shard: no cleanup runs
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == -9
    vdir = tier_root.resolve() / "models" / MODEL / "v"
    assert vdir.is_dir() and any(p.name.startswith(".") for p in vdir.iterdir())  # the partial copy
    assert not tier.complete(MODEL, "v") and tier.list() == [] and tier.resolve(MODEL, "v") is None
    assert (tier.meta / "reserve" / MODEL / "v").exists()  # its reservation, now stale

    report = tier.prewarm(local_storage, MODEL, "v")  # the dead copier's lock was released by the kernel
    assert not report.hit and files_of(tier.storage(), MODEL, "v") == files_of(local_storage, MODEL, "v")
    assert not list(tier.root.rglob("*.tmp-*")) and not (tier.meta / "reserve" / MODEL / "v").exists()


def test_two_processes_racing_copy_once(local_storage, tier_root):
    publish(local_storage, "v", seed=0)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    slow = Slow(local_storage)  # ~0.5 s of copying, so the second one arrives while it runs
    procs = [ctx.Process(target=_prewarm_child, args=(str(tier_root), slow, "v", barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
    assert sorted(o[1] for o in outcomes) == [False, True]  # exactly one copied, the other hit
    assert sorted(o[2] for o in outcomes)[0] == 0
    tier = ShmTier(tier_root)
    assert files_of(tier.storage(), MODEL, "v") == files_of(local_storage, MODEL, "v")
    assert [e.version for e in tier.list()] == ["v"] and not list(tier.root.rglob("*.tmp-*"))


def test_resolve_source_prefers_shm_then_local_then_remote(local_storage, tier_root, tmp_path):
    remote = local_storage
    publish(remote, "v1", seed=0)
    publish(remote, "v2", seed=1)
    cache = LocalStorage(tmp_path / "cache")
    tier = ShmTier(tier_root)

    def where(version="v2", **kw):
        args = {"tier": tier, "local_cache": cache, "remote": remote, **kw}
        source, w = resolve_source(MODEL, version, **args)
        root = {"shm": tier.root, "local": cache.root, "remote": remote.root}[w]
        assert all(s.path.startswith(str(root)) for s in source.shards)  # read where it says
        got = load(source)
        assert all(torch.equal(got[k], v) for k, v in state(0 if version == "v1" else 1).items())
        return w

    assert where() == "remote"
    prefix = ex.version_prefix(MODEL, "v2")
    for o in remote.list(prefix):
        copy_between(remote, o.key, cache, o.key)
    assert where() == where("latest") == "local"
    assert where("v1") == "remote"
    tier.prewarm(remote, MODEL, "v2")
    assert where() == where("latest") == "shm"
    assert where(tier=None) == "local"
    assert where(local_cache=None) == "shm"
    tier.evict(MODEL, "v2")
    assert where() == "local"
    cache.delete(join(prefix, ex.read_manifest(remote, MODEL, "v2")["shards"][0]["file"]))  # incomplete cache
    assert where() == "remote"


def test_resolve_source_follows_the_production_alias(local_storage, tier_root):
    from pipeline import promotion

    remote = local_storage
    publish(remote, "v1", seed=0)
    publish(remote, "v2", seed=1)
    tier = ShmTier(tier_root)
    with pytest.raises(ex.VersionNotFound, match="no production version"):
        resolve_source(MODEL, "production", tier=tier, local_cache=None, remote=remote)
    promotion.promote(remote, MODEL, "v1")
    tier.prewarm(remote, MODEL, "v2")  # the newest is warm, production is not
    for warm in (False, True):
        if warm:
            tier.prewarm(remote, MODEL, "production")
        source, where = resolve_source(MODEL, "production", tier=tier, local_cache=None, remote=remote)
        assert where == ("shm" if warm else "remote") and source.display == f"{MODEL}/production (v1)"
        assert all(s.path.startswith(str(tier.root if warm else remote.root)) for s in source.shards)
        got = load(source)
        assert all(torch.equal(got[k], v) for k, v in state(0).items())


@pytest.mark.parametrize("ref", ["latest", "production"])
def test_resolve_source_from_s3_asks_as_a_load_does(s3_storage, tier_root, s3_requests, ref):
    """What ``forgeline load <model>/<ref>`` resolves from S3 is resolved once: the reference's
    requests (the LIST and each manifest for ``latest``, the alias and the manifest for
    ``production``), then the shard's first GET, each asked once. With the version in the tier,
    no byte of it comes from S3."""
    from pipeline import promotion

    for i, v in enumerate(["v1", "v2"]):
        ex.export({"w": torch.full((3,), float(i))}, s3_storage, MODEL, v)
    promotion.promote(s3_storage, MODEL, "v2")
    tier = ShmTier(tier_root)
    for warm in (False, True):
        if warm:
            tier.prewarm(s3_storage, MODEL, "v2")
        req = s3_requests(s3_storage.client)
        source, where = resolve_source(MODEL, ref, tier=tier, local_cache=None, remote=s3_storage)
        assert where == ("shm" if warm else "remote")
        rep = LoadReport()
        assert load(source, report=rep)["w"].tolist() == [1, 1, 1]
        # the report counts the resolving (two rounds of 20 ms at least) in the header and the total
        assert 0.04 <= source.seconds <= rep.seconds_header <= rep.seconds_total
        reads = req.of("header")
        if ref == "latest":
            assert req.of("LIST") and len(req.of("LIST")) == 1
            assert sorted(k for k in reads if k.endswith("manifest.json"))[:2] == ["v1/manifest.json",
                                                                                   "v2/manifest.json"]
        else:
            assert not req.of("LIST") and reads[:2] == [f"{MODEL}/production", "v2/manifest.json"]
        shard_reads = [k for k in reads + req.of("GET") if k.endswith(".safetensors")]
        assert shard_reads == ([] if warm else ["v2/model.safetensors"])
        assert len(reads) == len(set(reads))  # a tier copy's rejection: from the manifest read to choose it


# Pre-warm from S3 (the real radosgw): parallel ranged reads straight into the tier's files -------


def big_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(3_000_000, generator=g) for i in range(3)}  # 12 MB each


def publish_big(store: Storage, version: str, seed: int = 0) -> dict:
    return ex.export(big_state(seed), store, MODEL, version, max_shard_bytes=13_000_000)  # 3 shards


def reads_of(monkeypatch, store, on_call=None) -> list[tuple[str, int, int, str | None]]:
    """Record the tier's ranged reads (``store.read_to_file`` calls) as ``(key, start, length,
    version)``; ``on_call(n, key)`` runs before the n-th call (from 1)."""
    real, calls = store.read_to_file, []

    def read_to_file(key, start, length, fd, offset, *, version=None):
        assert offset == start  # each piece lands at its own offset of the tier file
        calls.append((key, start, length, version))
        if on_call is not None:
            on_call(len(calls), key)
        return real(key, start, length, fd, offset, version=version)

    monkeypatch.setattr(store, "read_to_file", read_to_file)
    return calls


def no_leftovers(tier: ShmTier) -> bool:
    return (version_dirs(tier) == [] and tier.list() == [] and not list(tier.root.rglob("*.tmp-*"))
            and not [p for p in (tier.meta / "reserve").rglob("*") if p.is_file()])


def test_prewarm_from_s3_lands_every_shard_in_parallel_pinned_pieces(s3_storage_factory, tier_root, monkeypatch):
    store = s3_storage_factory(concurrency=4, get_size=6 * 2**20)  # each 12 MB shard: at least 2 reads
    manifest = publish_big(store, "b1", seed=1)
    prefix = ex.version_prefix(MODEL, "b1")
    versions = {s["file"]: store.stat(join(prefix, s["file"])).version for s in manifest["shards"]}
    calls = reads_of(monkeypatch, store)
    tier = ShmTier(tier_root)
    report = tier.prewarm(store, MODEL, "b1")
    assert not report.hit and len(report.file_seconds) == len(manifest["shards"]) + 1  # shards, index
    assert files_of(tier.storage(), MODEL, "b1") == files_of(store, MODEL, "b1")
    assert ex.verify(tier.storage(), MODEL, "b1") == []  # every sha256 recomputed from the tier's bytes
    for s in manifest["shards"]:
        mine = sorted(c for c in calls if c[0] == join(prefix, s["file"]))
        ends = [start + n for _, start, n, _ in mine]
        assert [c[1] for c in mine] == [0, *ends[:-1]] and ends[-1] == s["bytes"]  # every byte, once
        assert len(mine) >= 2 and max(n for _, _, n, _ in mine) <= store.get_size  # no GET above get_size
        assert {c[3] for c in mine} == {versions[s["file"]]}  # pinned to the version stat saw
    assert not list(tier.root.rglob("*.tmp-*"))
    got = ex.load_state_dict(tier.storage(), MODEL, "b1")
    assert all(torch.equal(got[k], v) for k, v in big_state(1).items())


def test_prewarm_a_slow_piece_does_not_hold_back_the_pieces_after_it(s3_storage_factory, tier_root, monkeypatch):
    """A file's first piece stalls (a slow request, as object stores have at their tail) until
    pieces of the same file past the requests in flight have landed: a file queues another window
    of pieces past its oldest, so the stall costs one request's place, not the file's progress."""
    store = s3_storage_factory(concurrency=2, get_size=2**20)  # 1 MiB pieces, 2 in flight
    manifest = publish_big(store, "b1", seed=1)
    victim = join(ex.version_prefix(MODEL, "b1"), manifest["shards"][0]["file"])
    later_landed, waited = threading.Event(), []
    real = store.read_to_file

    def read_to_file(key, start, length, fd, offset, *, version=None):
        if key == victim and start == 0:
            waited.append(later_landed.wait(10))  # False: nothing past it landed meanwhile
        n = real(key, start, length, fd, offset, version=version)
        if key == victim and start >= 2 * 2**20:  # past the 2 pieces a file had in flight before
            later_landed.set()
        return n

    monkeypatch.setattr(store, "read_to_file", read_to_file)
    tier = ShmTier(tier_root)
    assert not tier.prewarm(store, MODEL, "b1").hit
    assert waited == [True]
    assert ex.verify(tier.storage(), MODEL, "b1") == []  # checked in order all the same


def test_prewarm_from_s3_object_replaced_mid_read_fails_and_leaves_nothing(s3_storage_factory, tier_root, monkeypatch):
    store = s3_storage_factory(concurrency=2)
    manifest = publish_big(store, "b1", seed=1)
    victim = join(ex.version_prefix(MODEL, "b1"), manifest["shards"][1]["file"])
    other = payload_like(store, victim)

    def replace_once(n, key):  # the victim's second piece is about to be read: replace the object
        if key == victim and sum(c[0] == victim for c in calls) == 2:
            store.write_atomic(victim, other)

    calls = reads_of(monkeypatch, store, replace_once)
    tier = ShmTier(tier_root)
    with pytest.raises(IntegrityError, match=r"object changed during read.*not mixing bytes of two versions"):
        tier.prewarm(store, MODEL, "b1")
    assert no_leftovers(tier)


def payload_like(store: Storage, key: str) -> bytes:
    """Other bytes of the same size as ``key``: only the version (and the sha256) can tell."""
    data = bytearray(store.read(key))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def test_prewarm_from_s3_corrupt_shard_is_rejected(s3_storage_factory, tier_root):
    store = s3_storage_factory(concurrency=4)
    manifest = publish_big(store, "b1", seed=1)
    bad = manifest["shards"][2]
    key = join(ex.version_prefix(MODEL, "b1"), bad["file"])
    store.write_atomic(key, payload_like(store, key))  # same size, different bytes
    tier = ShmTier(tier_root)
    with pytest.raises(IntegrityError, match=rf"{bad['file']}: crc32 [0-9a-f]{{8}} != expected {bad['crc32']}"):
        tier.prewarm(store, MODEL, "b1")
    assert no_leftovers(tier)


def test_prewarm_from_s3_manifest_without_crc32_is_checked_by_sha256(s3_storage_factory, tier_root):
    """A version exported before manifests recorded crc32: the tier checks its copy by sha256."""
    store = s3_storage_factory(concurrency=4)
    manifest = publish_big(store, "b1", seed=1)
    for entry in [*manifest["shards"], manifest["index"]]:
        del entry["crc32"]
    prefix = ex.version_prefix(MODEL, "b1")
    store.write_atomic(join(prefix, ex.MANIFEST_NAME), json.dumps(manifest).encode())
    tier = ShmTier(tier_root)
    assert not tier.prewarm(store, MODEL, "b1").hit and ex.verify(tier.storage(), MODEL, "b1") == []
    assert tier.evict(MODEL, "b1")
    bad = manifest["shards"][1]
    key = join(prefix, bad["file"])
    store.write_atomic(key, payload_like(store, key))
    with pytest.raises(IntegrityError, match=rf"{bad['file']}: sha256 [0-9a-f]{{64}} != expected {bad['sha256']}"):
        tier.prewarm(store, MODEL, "b1")
    assert no_leftovers(tier)


def file_writes(monkeypatch, before=None, after=None) -> dict[str, int]:
    """Wrap the two ways bytes land in a tier file, ``os.pwrite`` and the file side of
    ``os.splice`` (the call with ``offset_dst``): ``before(fd, offset)`` runs before each write
    (and may raise), ``after(fd, offset, n)`` after it. Returns the count of writes each way."""
    real_pwrite, real_splice, counts = os.pwrite, os.splice, {"pwrite": 0, "splice": 0}

    def write(way, fd, offset, do):
        if before is not None:
            before(fd, offset)
        n = do()
        counts[way] += 1
        if after is not None:
            after(fd, offset, n)
        return n

    def pwrite(fd, data, offset):
        return write("pwrite", fd, offset, lambda: real_pwrite(fd, data, offset))

    def splice(src, dst, count, offset_src=None, offset_dst=None, flags=0):
        if offset_dst is None:  # socket -> pipe
            return real_splice(src, dst, count, offset_src=offset_src, flags=flags)
        return write("splice", dst, offset_dst,
                     lambda: real_splice(src, dst, count, offset_src=offset_src, offset_dst=offset_dst, flags=flags))

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "splice", splice)
    return counts


def test_prewarm_from_s3_checks_the_landed_bytes(s3_storage_factory, tier_root, monkeypatch):
    """The crc32 is taken from the tier file, not from what was received: a byte that changes on
    its way into tmpfs fails the copy. Over plain HTTP the bytes are spliced from the socket into
    the file, never passing through the process."""
    store = s3_storage_factory(concurrency=4)
    manifest = publish_big(store, "b1", seed=1)
    tier = ShmTier(tier_root)
    real_pwrite = os.pwrite

    def flip_fifth(fd, offset, n):  # the 5th write lands with one bit flipped
        if counts["pwrite"] + counts["splice"] == 5 and n:
            real_pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0x01]), offset)

    counts = file_writes(monkeypatch, after=flip_fifth)
    files = "|".join(re.escape(f.file) for f in ex.manifest_files(manifest))
    with pytest.raises(IntegrityError, match=rf"({files}): crc32 [0-9a-f]{{8}} != expected [0-9a-f]{{8}}.*corrupt"):
        tier.prewarm(store, MODEL, "b1")
    assert no_leftovers(tier)
    monkeypatch.undo()
    counts = file_writes(monkeypatch)
    assert not tier.prewarm(store, MODEL, "b1").hit and ex.verify(tier.storage(), MODEL, "b1") == []
    # spliced: a pwrite only for what http.client read with each response's headers (< 8 KiB)
    assert counts["splice"] > counts["pwrite"] > 0


def test_prewarm_from_s3_tmpfs_full_mid_copy(s3_storage_factory, tier_root, monkeypatch):
    store = s3_storage_factory(concurrency=4)
    publish_big(store, "b1", seed=1)
    tier = ShmTier(tier_root)
    written: list[int] = []

    def full_after_20mb(fd, offset):  # the kernel refuses bytes once 20 MB are in: tmpfs is full
        if sum(written) > 20_000_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    file_writes(monkeypatch, before=full_after_20mb, after=lambda fd, offset, n: written.append(n))
    with pytest.raises(StorageFull, match=r"filled up after.*no space left on device.*partial copy was removed"):
        tier.prewarm(store, MODEL, "b1")
    assert no_leftovers(tier)
    monkeypatch.undo()
    assert not tier.prewarm(store, MODEL, "b1").hit and ex.verify(tier.storage(), MODEL, "b1") == []


def test_a_reader_without_a_usable_tier_warns_once_and_reads_the_store(tmp_path):
    """A load or a server can always read the store: a tier root that cannot be used (a file in
    the way, its own folder unwritable) is one warning naming it, not a failed load."""
    from pipeline.shm_tier import reader_tier

    (tmp_path / "a-file").write_text("x")
    said = []
    assert reader_tier(tmp_path / "a-file" / "tier", warn=said.append) is None
    assert len(said) == 1 and "shm tier " + str(tmp_path / "a-file" / "tier") in said[0]
    assert "part of the path is a file" in said[0] and "FORGELINE_SHM_ROOT" in said[0]
    root = tmp_path / "tier"
    root.mkdir()
    (root / ".tier").write_text("not a folder")  # as a read-only root fails its metadata folder
    assert reader_tier(root, warn=said.append) is None and "exists and is not a directory" in said[1]
    ok = tmp_path / "good"
    assert reader_tier(ok, capacity_bytes=10, warn=said.append).capacity_bytes == 10 and len(said) == 2


def test_what_one_request_prewarmed_is_not_evicted_for_the_rest_of_it(local_storage, tier_root):
    """A pre-warm of a version and its variants (``keep``) must not evict the first to make room
    for the next: with room for one, the second fails and the first stays, where it used to be
    evicted and the run reported success."""
    for i, v in enumerate("ab"):
        publish(local_storage, v, seed=i)
    probe = ShmTier(tier_root)
    size = probe.prewarm(local_storage, MODEL, "a").version_bytes
    probe.evict(MODEL, "a")
    tier = ShmTier(tier_root, capacity_bytes=size + size // 2)  # room for one
    keep = [(MODEL, "a"), (MODEL, "b")]
    tier.prewarm(local_storage, MODEL, "a", keep=keep)
    with pytest.raises(StorageFull, match=r"0 evictable \(\d+ pinned or pre-warmed with it, 0 in use"):
        tier.prewarm(local_storage, MODEL, "b", keep=keep)
    assert [e.version for e in tier.list()] == ["a"] and tier.complete(MODEL, "a")
    assert tier.prewarm(local_storage, MODEL, "b").evicted == [f"{MODEL}/a"]  # without keep: LRU as before
