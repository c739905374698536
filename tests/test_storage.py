"""The storage contract, checked on every backend (local directory and S3 on a real moto server),
plus the behaviour specific to each: temp files and free space locally, version pinning,
multipart and retries on S3."""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import os
import re
import sys
import time
import zlib
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError, ResponseStreamingError

from pipeline.storage import (
    CorruptObject,
    IntegrityError,
    LocalStorage,
    ObjectChanged,
    ObjectNotFound,
    ShmStorage,
    StorageError,
    StorageFull,
    copy_between,
    in_parallel,
    make_dir,
    ranged_read_size,
    write_file_atomic,
)
from pipeline.keys import TMP_MARK
from pipeline.storage.s3 import MIN_PART_SIZE, S3Storage

MiB = 1024 * 1024


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic, non-repeating-looking bytes (distinct per seed)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:n])


BIG = payload(12 * MiB + 12345)  # three parts at the tests' 5 MiB part size


@pytest.fixture(params=["local", "s3"])
def store(request):
    return request.getfixturevalue(f"{request.param}_storage")


def is_s3(store) -> bool:
    return isinstance(store, S3Storage)


# Shared contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"hello", payload(100_000)], ids=["empty", "small", "100k"])
def test_round_trip(store, data):
    info = store.write_atomic("a/b/obj.bin", data)
    assert info.key == "a/b/obj.bin"
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.crc32 == f"{zlib.crc32(data):08x}"  # recorded by the writer, for later copies
    assert store.read("a/b/obj.bin") == data
    assert store.stat("a/b/obj.bin").size == len(data)


@pytest.mark.parametrize("source", ["bytes", "memoryview", "file", "read-only"])
def test_write_atomic_from_memory_and_files(store, tmp_path, source):
    """Bytes, a memoryview (of another item size), a file (read into one reused buffer) and an
    object with only ``read`` all publish the same object."""
    want = BIG[: len(BIG) // 4 * 4]
    path = tmp_path / "src"
    path.write_bytes(want)

    class ReadOnly:
        def __init__(self, f):
            self.read = f.read

    with open(path, "rb") as f:
        data = {"bytes": want, "memoryview": memoryview(want).cast("I"), "file": f, "read-only": ReadOnly(f)}[source]
        info = store.write_atomic("w.bin", data)
    assert info.size == len(want) and info.sha256 == hashlib.sha256(want).hexdigest()
    assert store.read("w.bin") == want


def test_streaming_writer_and_reader(store):
    with store.open_write("s.bin") as w:
        for i in range(0, len(BIG), 3 * MiB + 1):
            w.write(BIG[i : i + 3 * MiB + 1])
    assert w.info.size == len(BIG)
    assert w.info.sha256 == hashlib.sha256(BIG).hexdigest() and w.info.crc32 == f"{zlib.crc32(BIG):08x}"
    # odd read sizes cross every window/part boundary
    with store.open_read("s.bin") as f:
        got = []
        while chunk := f.read(MiB + 7):
            got.append(chunk)
    assert b"".join(got) == BIG


def test_read_range(store):
    data = payload(1000)
    store.write_atomic("r.bin", data)
    assert store.read_range("r.bin", 0, 1000) == data
    assert store.read_range("r.bin", 10, 4) == data[10:14]
    assert store.read_range("r.bin", 999, 1) == data[999:]
    assert store.read_range("r.bin", 500, 0) == b""
    with pytest.raises(IntegrityError, match="past end"):
        store.read_range("r.bin", 990, 20)
    with pytest.raises(IntegrityError, match="past end"):
        store.read_range("r.bin", 1000, 1)
    with pytest.raises(ValueError):
        store.read_range("r.bin", -1, 1)


def test_read_head(store, monkeypatch):
    """The first bytes with the object's size and version; on S3 in one request (a ranged GET,
    no HEAD), and the version is the one later reads pin to."""
    data = payload(1000)
    store.write_atomic("r.bin", data)
    store.write_atomic("empty.bin", b"")
    calls = []
    if is_s3(store):
        for name in ("get_object", "head_object"):
            _count_calls(monkeypatch, store.client, name, lambda n, kw, real, name=name: calls.append(name) or real(**kw))
    head, info = store.read_head("r.bin", 64)
    assert head == data[:64] and info.size == 1000 and info.key == "r.bin"
    assert info.version == store.stat("r.bin").version
    if is_s3(store):
        assert calls[:1] == ["get_object"] and calls.count("head_object") == 1  # the stat just above
        assert store.read_range("r.bin", 900, 100, version=info.version) == data[900:]
    assert store.read_head("r.bin", 5000) == (data, info)  # shorter than asked: all of it
    head, info = store.read_head("empty.bin", 64)
    assert head == b"" and info.size == 0
    with pytest.raises(ObjectNotFound):
        store.read_head("missing.bin", 64)


def test_read_range_across_parts_of_multipart_object(store):
    store.write_atomic("big.bin", BIG)
    start = 2 * MIN_PART_SIZE - 100  # spans the boundary between parts 2 and 3
    assert store.read_range("big.bin", start, 300) == BIG[start : start + 300]
    start = MIN_PART_SIZE + 5
    assert store.read_range("big.bin", start, 2 * MiB) == BIG[start : start + 2 * MiB]


def test_list_prefix_sorted(store):
    for key in ["b/2", "a/2", "a/1", "a/sub/3", "ab/4", "c"]:
        store.write_atomic(key, key.encode())
    assert [o.key for o in store.list()] == ["a/1", "a/2", "a/sub/3", "ab/4", "b/2", "c"]
    assert [(o.key, o.size) for o in store.list("a")] == [("a/1", 3), ("a/2", 3), ("a/sub/3", 7)]
    assert [o.key for o in store.list("a/")] == ["a/1", "a/2", "a/sub/3"]
    assert [o.key for o in store.list("a/sub")] == ["a/sub/3"]
    assert [o.key for o in store.list("c")] == ["c"]
    assert store.list("nothing/here") == []


def test_exists_delete(store):
    assert not store.exists("x/y")
    store.write_atomic("x/y", b"1")
    assert store.exists("x/y")
    store.delete("x/y")
    assert not store.exists("x/y")
    store.delete("x/y")  # deleting a missing object is not an error
    for key in ["p/1", "p/2", "q"]:
        store.write_atomic(key, b"z")
    assert store.delete_prefix("p") == 2
    assert [o.key for o in store.list()] == ["q"]


def test_checksum_matches_hashlib(store):
    store.write_atomic("c.bin", BIG)
    assert store.checksum("c.bin") == hashlib.sha256(BIG).hexdigest()


@pytest.mark.parametrize("size", [1000, len(BIG)], ids=["single-put", "multipart"])
def test_wrong_sha256_keeps_previous_object(store, size):
    old, new = payload(500, seed=1), payload(size, seed=2)
    store.write_atomic("k", old)
    with pytest.raises(IntegrityError, match="sha256"):
        store.write_atomic("k", new, expected_sha256=hashlib.sha256(b"something else").hexdigest())
    assert store.read("k") == old
    with pytest.raises(IntegrityError):
        store.write_atomic("fresh", new, expected_sha256="0" * 64)
    assert not store.exists("fresh")
    assert [o.key for o in store.list()] == ["k"]


def test_wrong_expected_size_publishes_nothing(store):
    with pytest.raises(IntegrityError, match="expected 11"):
        with store.open_write("k", expected_size=11) as w:
            w.write(b"0123456789")
    assert not store.exists("k")


@pytest.mark.parametrize("size", [1000, len(BIG)], ids=["single-put", "multipart"])
def test_exception_mid_stream_leaves_nothing(store, size):
    store.write_atomic("keep", b"old")
    data = payload(size)
    with pytest.raises(RuntimeError, match="producer died"):
        with store.open_write("keep") as w:
            w.write(data)
            raise RuntimeError("producer died")
    with pytest.raises(RuntimeError):
        with store.open_write("new") as w:
            w.write(data)
            raise RuntimeError("producer died")
    assert store.read("keep") == b"old"
    assert [o.key for o in store.list()] == ["keep"]


def test_a_write_after_a_failed_write_raises_the_failure_and_nothing_is_published(store, monkeypatch):
    """A file object wrapping the writer (tarfile in stream mode) flushes its buffer while the first
    error unwinds: that write raises the first error again, so the error that reaches the user is
    the cause (a full disk), not 'write after abort'."""
    store.write_atomic("keep", b"old")
    w = store.open_write("keep")
    w.write(b"a" * 1000)
    failure = StorageFull("disk full (injected)")

    def fail(data):
        raise failure

    monkeypatch.setattr(w, "_write", fail)
    with pytest.raises(StorageFull) as first:
        w.write(b"b" * 1000)
    with pytest.raises(StorageFull) as again:
        w.write(b"c" * 10)
    assert first.value is again.value is failure and w.closed
    with pytest.raises(StorageError, match="already committed or aborted"):
        w.commit()
    assert store.read("keep") == b"old" and [o.key for o in store.list()] == ["keep"]


def test_multipart_round_trip_bit_exact(store):
    info = store.write_atomic("mp/big.bin", BIG)
    digest = hashlib.sha256(BIG).hexdigest()
    assert info.sha256 == digest
    assert store.read("mp/big.bin") == BIG
    st = store.stat("mp/big.bin")
    assert st.size == len(BIG)
    if is_s3(store):
        assert st.sha256 == digest  # recorded at write time, readable without the bytes


def test_copy(store):
    store.write_atomic("src/a", BIG)
    store.write_atomic("src/small", b"tiny")
    info = store.copy("src/a", "dst/a")
    assert info.key == "dst/a" and info.size == len(BIG)
    assert store.read("dst/a") == BIG
    assert store.copy("src/small", "dst/small").size == 4
    assert store.read("dst/small") == b"tiny"
    assert store.read("src/a") == BIG  # source untouched
    if is_s3(store):
        assert info.sha256 == store.stat("dst/a").sha256 == hashlib.sha256(BIG).hexdigest()
        assert store.stat("dst/small").sha256 == hashlib.sha256(b"tiny").hexdigest()


@pytest.mark.parametrize("data,problem", [
    (b'{"version": "v2", "at', r"not valid JSON \(Unterminated string.*\): the alias is corrupt or truncated"),
    (b"", r"not valid JSON \(Expecting value.*\): the alias is corrupt or truncated"),
    (b"\xff\xfe\x00{", r"not valid JSON .*: the alias is corrupt or truncated"),
    (b"[1, 2]", r"the alias is a JSON list, not an object"),
    (b'"v2"', r"the alias is a JSON str, not an object"),
    (b"[" * 100_000, r"not valid JSON .*: the alias is corrupt or truncated"),  # too deep to parse
], ids=["truncated", "empty", "not-utf8", "list", "string", "deep"])
def test_read_record_names_the_object_and_the_problem(store, data, problem):
    store.write_atomic("m/alias", data)
    with pytest.raises(CorruptObject, match=re.escape(store.uri("m/alias")) + ": " + problem):
        store.read_record("m/alias", "alias")
    store.write_atomic("m/alias", b'{"version": "v2"}')
    assert store.read_record("m/alias", "alias") == {"version": "v2"}
    assert issubclass(CorruptObject, StorageError) and issubclass(CorruptObject, ValueError)


@pytest.mark.parametrize("fail_fast", [False, True])
def test_in_parallel_results_in_order_first_failure_raised(fail_fast):
    """Results in item order; the first failure in item order is raised after the calls started
    have ended; ``fail_fast`` (one bulk transfer's pieces) starts no item after a failure."""
    import threading
    import time

    started, lock = [], threading.Lock()

    def fn(i: int) -> int:
        with lock:
            started.append(i)
        if i in (3, 5):
            time.sleep(0.05 if i == 5 else 0.0)
            raise OSError(f"item {i}")
        time.sleep(0.01)
        return i * i

    assert in_parallel(lambda i: i * i, list(range(10)), "t", 4) == [i * i for i in range(10)]
    with pytest.raises(OSError, match="item 3"):
        in_parallel(fn, list(range(40)), "t", 2, fail_fast=fail_fast)
    assert (len(started) < 10) if fail_fast else (sorted(started) == list(range(40)))


def test_missing_object_names_uri(store):
    key = "no/such/object"
    where = re.escape(store.uri(key))
    for call in (
        lambda: store.open_read(key),
        lambda: store.read(key),
        lambda: store.read_range(key, 0, 10),
        lambda: store.read_range(key, 0, 0),
        lambda: store.stat(key),
        lambda: store.checksum(key),
        lambda: store.copy(key, "elsewhere"),
    ):
        with pytest.raises(ObjectNotFound, match=where):
            call()
    assert not store.exists("elsewhere")


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../b", "a//b", "./a", "", "a\\b", "d/.f.tmp-123"])
def test_invalid_keys_rejected(store, key):
    for call in (
        lambda: store.open_write(key),
        lambda: store.write_atomic(key, b"x"),
        lambda: store.open_read(key),
        lambda: store.read_range(key, 0, 1),
        lambda: store.stat(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(ValueError, match="invalid storage key"):
            call()


# Local only -----------------------------------------------------------------------------------


def _hidden_files(root) -> list[str]:
    return [n for _, _, names in os.walk(root) for n in names if n.startswith(".")]


def test_local_no_temp_files_after_success_or_failure(local_storage):
    local_storage.write_atomic("a/ok", BIG)
    with pytest.raises(IntegrityError):
        local_storage.write_atomic("a/bad", b"data", expected_sha256="0" * 64)
    with pytest.raises(RuntimeError):
        with local_storage.open_write("a/died") as w:
            w.write(b"partial")
            raise RuntimeError("boom")
    assert local_storage.stale_temporaries() == []
    assert _hidden_files(local_storage.root) == []
    assert [o.key for o in local_storage.list()] == ["a/ok"]


def _disk_full_in_temporaries(monkeypatch) -> None:
    """``os.write`` to a storage temporary (TMP_MARK in its name) writes half, then fails as a full disk does."""
    real = os.write

    def where(fd) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    def write(fd, data):
        if TMP_MARK in where(fd):
            if len(data) > 1:
                return real(fd, memoryview(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_write_file_atomic_publishes_whole_or_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "d" / "state.json"
    path.parent.mkdir()
    write_file_atomic(path, '{"v": 1}')
    assert path.read_text() == '{"v": 1}'
    write_file_atomic(path, b"x" * 100_000, durable=False)  # replaces it
    assert path.read_bytes() == b"x" * 100_000

    with monkeypatch.context() as m:
        _disk_full_in_temporaries(m)
        with pytest.raises(StorageFull, match=rf"^{re.escape(str(path))}: no space left on device$"):
            write_file_atomic(path, b"y" * 100_000)
    assert path.read_bytes() == b"x" * 100_000  # the old file, whole
    assert _hidden_files(tmp_path) == []  # and no temporary

    with pytest.raises(ObjectNotFound, match=re.escape(str(tmp_path / "missing" / "f"))):
        write_file_atomic(tmp_path / "missing" / "f", "x")  # its folder is not made: the caller says where


def test_make_dir_says_what_is_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    assert make_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert make_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"  # already there: fine
    with pytest.raises(StorageError, match=rf"^the root {re.escape(str(tmp_path / 'file'))}: exists and is not a dir"):
        make_dir(tmp_path / "file", "the root")
    with pytest.raises(StorageError, match=rf"^{re.escape(str(tmp_path / 'file' / 'x'))}: part of the path is a file"):
        make_dir(tmp_path / "file" / "x")
    with pytest.raises(StorageError, match=r"^/proc/forgeline-test/x: cannot create it \(No such file or directory\)$"):
        make_dir("/proc/forgeline-test/x")  # procfs takes no new directories
    with pytest.raises(StorageError, match="exists and is not a directory"):
        LocalStorage(tmp_path / "file")


def test_write_file_atomic_permissions(tmp_path):
    old = os.umask(0o077)
    try:
        write_file_atomic(tmp_path / "private", "x")  # as open() would: 0o666 less the umask
        write_file_atomic(tmp_path / "kernel.so", b"\x7fELF", mode=0o755)  # exactly as asked
    finally:
        os.umask(old)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "kernel.so").stat().st_mode & 0o777 == 0o755


def _age(path, seconds: float = 120) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_killed_writers_temporary_is_removed_when_its_folder_is_next_written(tmp_path):
    import signal
    import subprocess

    root = tmp_path / "store"
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from pipeline.storage import LocalStorage\n"
        f"w = LocalStorage({str(root)!r}).open_write('b/shard-1.tar')\n"
        "w.write(b'x' * 100_000); w._f.flush(); print('writing', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert child.stdout.readline().strip() == "writing"
    store = LocalStorage(root)
    [live] = store.stale_temporaries("b")
    _age(live)
    store.write_atomic("b/shard-0.tar", b"a")  # its writer is at work (it holds the lock): kept
    assert live.exists()
    child.send_signal(signal.SIGKILL)  # kill -9: no handler runs, the temporary stays
    child.wait()
    assert store.stale_temporaries("b") == [live]
    LocalStorage(root).write_atomic("b/shard-2.tar", b"c")  # the next writer of the folder removes it
    assert store.stale_temporaries("b") == []
    assert [o.key for o in store.list("b")] == ["b/shard-0.tar", "b/shard-2.tar"]


def test_temporaries_of_writers_at_work_are_never_taken(tmp_path):
    root = tmp_path / "store"
    store = LocalStorage(root)
    here = store.open_write("b/mine")  # this process's own, at work (the live set, whatever the locks)
    here.write(b"1")
    elsewhere = root / "b" / f".other{TMP_MARK}000000000000"  # another process's, at work: locked
    elsewhere.write_bytes(b"2")
    held = os.open(elsewhere, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    young = root / "b" / f".young{TMP_MARK}000000000000"  # just created: its writer may not hold the lock yet
    young.write_bytes(b"3")
    dead = root / "b" / f".dead{TMP_MARK}000000000000"
    dead.write_bytes(b"4")
    for p in (here._tmp, elsewhere, dead):
        _age(p)
    try:
        assert store.remove_dead_temporaries(root / "b") == 1
        assert not dead.exists() and elsewhere.exists() and young.exists()
        assert here.commit().size == 1 and store.read("b/mine") == b"1"
    finally:
        os.close(held)


def test_local_storage_full_for_huge_expected_size(local_storage):
    with pytest.raises(StorageFull, match="needs"):
        local_storage.open_write("huge", expected_size=1 << 60)
    assert local_storage.stale_temporaries() == []


def test_shm_capacity_budget(tmp_path):
    shm = ShmStorage(tmp_path / "shm", capacity_bytes=100)
    shm.write_atomic("a", b"x" * 60)
    with pytest.raises(StorageFull, match="shm budget 100"):
        shm.write_atomic("b", b"y" * 50)
    assert not shm.exists("b")
    shm.write_atomic("b", b"y" * 40)  # exactly fills the budget
    assert shm.used_bytes() == 100


# S3 only --------------------------------------------------------------------------------------


def test_s3_keys_live_under_prefix(s3_storage):
    s3_storage.write_atomic("a/b", b"1")
    s3_storage.client.put_object(Bucket=s3_storage.bucket, Key="data2/not-ours", Body=b"x")
    s3_storage.client.put_object(Bucket=s3_storage.bucket, Key="other", Body=b"x")
    raw = s3_storage.client.list_objects_v2(Bucket=s3_storage.bucket)["Contents"]
    assert sorted(o["Key"] for o in raw) == ["data/a/b", "data2/not-ours", "other"]
    assert [o.key for o in s3_storage.list()] == ["a/b"]
    assert s3_storage.uri("a/b") == f"s3://{s3_storage.bucket}/data/a/b"
    assert repr(s3_storage) == f"S3Storage('s3://{s3_storage.bucket}/data')"


def test_s3_multipart_really_uses_parts(s3_storage):
    digest = hashlib.sha256(BIG).hexdigest()
    # sha256 declared up front: metadata is set when the upload starts, no copy afterwards
    s3_storage.write_atomic("declared", BIG, expected_sha256=digest)
    assert s3_storage.stat("declared").version.endswith('-3"')  # S3's ETag of a 3-part upload
    # sha256 unknown until the end (streamed): set afterwards by a server-side copy
    with s3_storage.open_write("streamed") as w:
        w.write(BIG)
    for key in ("declared", "streamed"):
        assert s3_storage.stat(key).sha256 == digest
        assert s3_storage.read(key) == BIG
    uploads = s3_storage.client.list_multipart_uploads(Bucket=s3_storage.bucket)
    assert uploads.get("Uploads", []) == []


def test_s3_parts_carry_their_crc32(s3_storage, monkeypatch):
    """Every part is sent with its CRC-32 (computed by forgeline, so botocore does not), which S3
    checks on arrival: it must be the checksum of exactly that part's bytes."""
    real, sent = s3_storage.client.upload_part, []

    def upload_part(**kw):
        sent.append((kw["PartNumber"], kw["ChecksumCRC32"], base64.b64encode(zlib.crc32(kw["Body"]).to_bytes(4, "big")).decode()))
        return real(**kw)

    monkeypatch.setattr(s3_storage.client, "upload_part", upload_part)
    s3_storage.write_atomic("parts", BIG)
    assert sorted(p for p, _, _ in sent) == [1, 2, 3] and all(got == want for _, got, want in sent)
    assert s3_storage.read("parts") == BIG


def test_s3_failed_multipart_is_aborted(s3_storage):
    with pytest.raises(RuntimeError):
        with s3_storage.open_write("x") as w:
            w.write(BIG)  # two parts already uploaded
            raise RuntimeError("boom")
    with pytest.raises(IntegrityError):
        s3_storage.write_atomic("y", BIG, expected_sha256="0" * 64)  # fails after the last part
    uploads = s3_storage.client.list_multipart_uploads(Bucket=s3_storage.bucket)
    assert uploads.get("Uploads", []) == []


def test_s3_a_killed_writers_upload_is_aborted_when_its_key_is_uploaded_again(s3_storage):
    store, c = s3_storage, s3_storage.client

    def abandoned(key: str) -> str:  # what a writer killed mid-upload leaves: a part up, never completed
        uid = c.create_multipart_upload(Bucket=store.bucket, Key=store._full(key))["UploadId"]
        c.upload_part(Bucket=store.bucket, Key=store._full(key), UploadId=uid, PartNumber=1, Body=b"x" * MIN_PART_SIZE)
        return uid

    def open_uploads() -> dict[str, str]:
        return {u["UploadId"]: u["Key"] for u in c.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])}

    dead, other = abandoned("shard.tar"), abandoned("shard.tar.2")
    store.write_atomic("shard.tar", BIG)  # begun a moment ago: may be a live writer's, kept
    assert set(open_uploads()) == {dead, other}
    store.STALE_UPLOAD_S = 0  # as if a day had passed
    store.write_atomic("shard.tar", BIG)
    assert open_uploads() == {other: store._full("shard.tar.2")}  # only that key's: not another with its prefix
    assert store.read("shard.tar") == BIG
    store.client.abort_multipart_upload(Bucket=store.bucket, Key=store._full("shard.tar.2"), UploadId=other)


def test_s3_object_replaced_during_read(s3_storage):
    s3_storage.write_atomic("v", BIG)
    with s3_storage.open_read("v") as f:
        assert f.read(100) == BIG[:100]  # first 5 MiB window fetched, ETag pinned
        s3_storage.write_atomic("v", payload(len(BIG), seed=9))
        with pytest.raises(IntegrityError, match=rf"s3://{s3_storage.bucket}/data/v: object changed during read"):
            f.read()


def test_s3_object_deleted_during_read(s3_storage):
    s3_storage.write_atomic("v", BIG)
    with s3_storage.open_read("v") as f:
        f.read(MIN_PART_SIZE)
        s3_storage.delete("v")
        with pytest.raises(IntegrityError, match="changed during read"):
            f.read(1)


def test_s3_unchanged_object_reads_across_windows(s3_storage):
    s3_storage.write_atomic("v", BIG)
    with s3_storage.open_read("v") as f:
        assert f.read(MIN_PART_SIZE + 1) == BIG[: MIN_PART_SIZE + 1]
        assert f.tell() == MIN_PART_SIZE + 1
        assert f.read() == BIG[MIN_PART_SIZE + 1 :]
        assert f.read(10) == b""


def test_ranged_reads_into_a_buffer_pinned_to_a_version(store):
    data = payload(100_000)
    store.write_atomic("r", data)
    info = store.stat("r")
    out = bytearray(1000)
    store.read_into("r", 500, out, version=info.version)
    assert bytes(out) == data[500:1500]
    assert store.read_range("r", 10, 5, version=info.version) == data[10:15]
    with pytest.raises(IntegrityError, match="past end"):
        store.read_into("r", len(data) - 10, bytearray(20))
    if info.version is not None:  # a versioned backend (S3): a replaced object is never mixed in
        store.write_atomic("r", payload(100_000, seed=1))
        with pytest.raises(ObjectChanged):
            store.read_into("r", 0, bytearray(10), version=info.version)


def test_ranged_reads_into_a_file_pinned_to_a_version(store, tmp_path):
    """``read_to_file`` writes exactly the range at the offset asked, leaving the rest of the file
    as it was; the same range and version errors as ``read_into``."""
    data = payload(100_000)
    store.write_atomic("r", data)
    info = store.stat("r")
    path = tmp_path / "dst"
    path.write_bytes(b"\xee" * 3000)
    fd = os.open(path, os.O_RDWR)
    try:
        store.read_to_file("r", 500, 1000, fd, 1000, version=info.version)
        store.read_to_file("r", 0, 0, fd, 0)
        assert path.read_bytes() == b"\xee" * 1000 + data[500:1500] + b"\xee" * 1000
        with pytest.raises(IntegrityError, match="past end"):
            store.read_to_file("r", len(data) - 10, 20, fd, 0)
        if info.version is not None:  # S3: a replaced object is never mixed in
            store.write_atomic("r", payload(100_000, seed=1))
            with pytest.raises(ObjectChanged):
                store.read_to_file("r", 0, 10, fd, 0, version=info.version)
    finally:
        os.close(fd)


def _spliced(monkeypatch, fail_errno: dict[str, int] | None = None) -> dict[str, int]:
    """Count ``os.splice`` calls by side (``socket``: into the pipe; ``file``: out of it, with an
    offset); ``fail_errno`` makes one side refuse every splice with that errno."""
    real, counts = os.splice, {"socket": 0, "file": 0}

    def splice(src, dst, count, offset_src=None, offset_dst=None, flags=0):
        side = "socket" if offset_dst is None else "file"
        counts[side] += 1
        if fail_errno and side in fail_errno:
            raise OSError(fail_errno[side], os.strerror(fail_errno[side]))
        return real(src, dst, count, offset_src=offset_src, offset_dst=offset_dst, flags=flags)

    monkeypatch.setattr(os, "splice", splice)
    return counts


def test_s3_bodies_are_spliced_into_files_on_reused_connections(s3_storage_factory, monkeypatch, tmp_path, in_flight):
    """Over plain HTTP a GET's body goes from the socket into the file by splice(2), never
    through this process's memory (botocore's ``read`` is never called), in parallel pieces
    pinned to one version; each connection goes back to the pool afterwards."""
    import urllib3
    from botocore.response import StreamingBody

    store = s3_storage_factory(concurrency=4)
    store.write_atomic("big", BIGGER)
    info = store.stat("big")

    def no_read(self, amt=None):
        raise AssertionError("StreamingBody.read: the body was copied through bytes objects")

    monkeypatch.setattr(StreamingBody, "read", no_read)
    seen = in_flight(store.client, "get_object")
    connects = []
    real_connect = urllib3.connection.HTTPConnection.connect
    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect",
                        lambda self: (connects.append(1), real_connect(self))[1])
    counts = _spliced(monkeypatch)
    path = tmp_path / "dst"
    with open(path, "wb") as f:
        f.truncate(len(BIGGER))
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(3):
            store.read_to_file("big", 0, len(BIGGER), fd, 0, version=info.version)
    finally:
        os.close(fd)
    assert path.read_bytes() == BIGGER
    assert counts["socket"] > 0 and counts["file"] > 0
    assert 2 <= seen["max"] <= 4 and all(c["IfMatch"] == info.version for c in seen["calls"])
    assert len(connects) <= 4  # later reads reuse the connections of the first


@pytest.mark.parametrize("side", ["socket", "file"])
def test_s3_read_to_file_where_splice_is_refused(s3_storage, monkeypatch, tmp_path, side):
    """A socket or a file that takes no splice (EINVAL: e.g. a filesystem without splice_write)
    gets the same bytes the plain way: received into a buffer and written with pwrite."""
    s3_storage.write_atomic("r", BIG)
    counts = _spliced(monkeypatch, {side: errno.EINVAL})
    path = tmp_path / "dst"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        s3_storage.read_to_file("r", 0, len(BIG), fd, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == BIG and counts[side] >= 1


def test_ranged_read_size_fills_the_requests_in_flight_up_to_the_largest_get(local_storage, s3_storage_factory):
    MB = 2**20
    store = s3_storage_factory(get_size=32 * MB)
    assert ranged_read_size(store, 870 * MB, 16) == 32 * MB  # big: the largest GET
    assert ranged_read_size(store, 160 * MB, 16) == 10 * MB  # every one of 16 in flight has one
    assert ranged_read_size(store, 20 * MB, 16) == 8 * MB  # small: never below 8 MiB
    assert ranged_read_size(s3_storage_factory(get_size=2 * MB), 870 * MB, 16) == 2 * MB
    assert ranged_read_size(local_storage, 870 * MB, 16) == 8 * MB  # a store without get_size
    with pytest.raises(ValueError, match="get_size"):
        s3_storage_factory(create=False, get_size=1000)


def _count_calls(monkeypatch, client, name, fail):
    """Wrap ``client.<name>``; ``fail(call_number, kwargs)`` may raise or return a replacement
    response factory. Returns the list of kwargs of every call."""
    real = getattr(client, name)
    calls = []

    def wrapper(**kw):
        calls.append(kw)
        return fail(len(calls), kw, real)

    monkeypatch.setattr(client, name, wrapper)
    return calls


def test_s3_get_retried_after_connection_error(s3_storage, monkeypatch):
    data = payload(1000)
    s3_storage.write_atomic("r", data)

    def fail_first(n, kw, real):
        if n == 1:
            raise EndpointConnectionError(endpoint_url="http://unreachable")
        return real(**kw)

    calls = _count_calls(monkeypatch, s3_storage.client, "get_object", fail_first)
    assert s3_storage.read_range("r", 100, 50) == data[100:150]
    assert len(calls) == 2


class _BreakingBody:
    """A response body that delivers ``good`` bytes and then loses the connection."""

    def __init__(self, body, good: int):
        self._body, self._left = body, good

    def read(self, n=-1):
        if self._left <= 0:
            raise ResponseStreamingError(error="connection reset by peer")
        chunk = self._body.read(min(n, self._left))
        self._left -= len(chunk)
        return chunk

    def close(self):
        self._body.close()


def test_s3_read_resumes_mid_body_pinned_to_etag(s3_storage, monkeypatch):
    s3_storage.write_atomic("r", BIG)
    etag = s3_storage.stat("r").version

    def break_first(n, kw, real):
        resp = real(**kw)
        if n == 1:
            resp["Body"] = _BreakingBody(resp["Body"], good=1_500_000)
        return resp

    calls = _count_calls(monkeypatch, s3_storage.client, "get_object", break_first)
    assert s3_storage.read_range("r", 10, 3 * MiB) == BIG[10 : 10 + 3 * MiB]
    assert len(calls) == 2
    assert calls[1]["Range"] == f"bytes={10 + 1_500_000}-{10 + 3 * MiB - 1}"
    assert calls[1]["IfMatch"] == etag


def test_s3_error_after_last_byte_needs_no_resume(s3_storage, monkeypatch):
    data = payload(1000)
    s3_storage.write_atomic("r", data)

    def break_after_body(n, kw, real):
        resp = real(**kw)
        resp["Body"] = _BreakingBody(resp["Body"], good=1000)
        return resp

    calls = _count_calls(monkeypatch, s3_storage.client, "get_object", break_after_body)
    assert s3_storage.read_range("r", 0, 1000) == data
    assert len(calls) == 1


def test_s3_gives_up_after_max_attempts(s3_storage_factory, monkeypatch):
    store = s3_storage_factory(max_attempts=3)
    store.write_atomic("r", b"abc")

    def always_fail(n, kw, real):
        raise EndpointConnectionError(endpoint_url="http://unreachable")

    calls = _count_calls(monkeypatch, store.client, "get_object", always_fail)
    with pytest.raises(StorageError, match=re.escape(store.uri("r"))):
        store.read_range("r", 0, 3)
    assert len(calls) == 3


def test_s3_upload_part_retried(s3_storage, monkeypatch):
    failed = []

    def fail_part_2_once(n, kw, real):
        if kw["PartNumber"] == 2 and not failed:
            failed.append(n)
            raise EndpointConnectionError(endpoint_url="http://unreachable")
        return real(**kw)

    calls = _count_calls(monkeypatch, s3_storage.client, "upload_part", fail_part_2_once)
    s3_storage.write_atomic("up", BIG)
    assert sorted(c["PartNumber"] for c in calls) == [1, 2, 2, 3]  # parts go up concurrently
    assert s3_storage.read("up") == BIG


def test_s3_size_mismatch_after_publish_is_deleted(s3_storage, monkeypatch):
    def lie_about_size(n, kw, real):
        resp = real(**kw)
        resp["ContentLength"] += 1
        return resp

    _count_calls(monkeypatch, s3_storage.client, "head_object", lie_about_size)
    with pytest.raises(IntegrityError, match=r"published 6 bytes, wrote 5"):
        s3_storage.write_atomic("k", b"hello")
    monkeypatch.undo()
    assert not s3_storage.exists("k")


def test_s3_missing_bucket(s3_storage_factory):
    store = s3_storage_factory(create=False)
    for call in (store.list, lambda: store.read_range("k", 0, 1), lambda: store.write_atomic("k", b"x")):
        with pytest.raises(StorageError, match=rf"bucket '{store.bucket}' does not exist") as e:
            call()
        assert not isinstance(e.value, ObjectNotFound)


def test_s3_part_size_below_minimum_rejected(s3_storage_factory):
    with pytest.raises(ValueError, match="minimum part size"):
        s3_storage_factory(part_size=MIN_PART_SIZE - 1)


@pytest.mark.parametrize("url, words", [("localhost:9000", "has no scheme"), ("ftp://x", "not an http(s) URL"),
                                        ("http://", "not an http(s) URL"), ("http://h:port", "not a URL")])
def test_s3_endpoint_that_is_not_a_url_is_refused_naming_it(url, words):
    with pytest.raises(ValueError, match=f"^endpoint_url: .*{re.escape(words)}"):
        S3Storage("b", endpoint_url=url)


@pytest.mark.parametrize("bucket", ["s3://b/p", "b/p", "my bucket", ""])
def test_s3_bucket_that_is_not_a_name_is_refused_naming_it(bucket):
    with pytest.raises(ValueError, match=f"^bucket: {re.escape(repr(bucket))} is not a bucket name"):
        S3Storage(bucket)


def test_copy_between_s3_and_local(local_storage, s3_storage):
    s3_storage.write_atomic("shard", BIG)
    sha = s3_storage.stat("shard").sha256
    info = copy_between(s3_storage, "shard", local_storage, "cache/shard", expected_sha256=sha)
    assert info.sha256 == hashlib.sha256(BIG).hexdigest()
    assert local_storage.local_path("cache/shard").read_bytes() == BIG


def test_s3_get_into_fills_the_buffer_in_place_across_a_resume(s3_storage, monkeypatch):
    import numpy as np

    s3_storage.write_atomic("r", BIG)
    etag = s3_storage.stat("r").version

    def break_first(n, kw, real):
        resp = real(**kw)
        if n == 1:
            resp["Body"] = _BreakingBody(resp["Body"], good=1_000_003)
        return resp

    calls = _count_calls(monkeypatch, s3_storage.client, "get_object", break_first)
    out = np.zeros(2 * MiB, np.uint8)
    got, seen, size = s3_storage.get_into("r", 5, out)
    assert (got, seen, size) == (2 * MiB, etag, len(BIG))
    assert out.tobytes() == BIG[5 : 5 + 2 * MiB]
    assert calls[1]["Range"] == f"bytes={5 + 1_000_003}-{5 + 2 * MiB - 1}" and calls[1]["IfMatch"] == etag
    tail = bytearray(100)  # past the end: only what exists, and says so
    assert s3_storage.get_into("r", len(BIG) - 10, tail)[0] == 10 and bytes(tail[:10]) == BIG[-10:]


def test_s3_a_server_that_ignores_range_is_named_not_a_key_error(s3_storage, monkeypatch):
    """A server (or a proxy before it) that ignores Range answers 200 with the whole object. A
    GET that asked for the whole object from byte 0 gets just that and is fine; any other range
    fails in one line naming the object and the cause, and nothing is written to the caller."""
    from pipeline.storage import StorageError

    s3_storage.write_atomic("r", BIG)
    s3_storage.write_atomic("small", b"0123456789")
    real_get = s3_storage.client.get_object

    def ignoring_range(**kw):
        kw.pop("Range", None)
        return real_get(**kw)

    monkeypatch.setattr(s3_storage.client, "get_object", ignoring_range)
    head, info = s3_storage.read_head("small", 1 << 16)  # asked for more than there is: all of it
    assert (head, info.size) == (b"0123456789", 10)
    out = bytearray(b"x" * 100)
    for call in (lambda: s3_storage.get_into("r", 4096, out), lambda: s3_storage.read_range("r", 10, 20),
                 lambda: s3_storage.read_head("r", 100)):
        with pytest.raises(StorageError, match=r"s3://.*/r: .*ignored the Range header") as e:
            call()
        assert "\n" not in str(e.value)
    assert out == bytearray(b"x" * 100)

    def shifted(**kw):  # a proxy that answers a range other than the one asked
        first, _, last = kw["Range"].removeprefix("bytes=").partition("-")
        return real_get(**{**kw, "Range": f"bytes={int(first) + 1}-{last}"})

    monkeypatch.setattr(s3_storage.client, "get_object", shifted)
    with pytest.raises(StorageError, match=r"answered another range than asked \(Content-Range: bytes 4097-"):
        s3_storage.get_into("r", 4096, out)
    assert out == bytearray(b"x" * 100)


# Parallel transfers (S3): read-ahead, split ranged reads, concurrent part uploads ---------------


BIGGER = payload(8 * MIN_PART_SIZE + 777, seed=5)  # nine windows/parts at the tests' part size


def test_s3_streaming_read_fetches_ahead_in_parallel_pinned_to_one_etag(s3_storage_factory, in_flight):
    store = s3_storage_factory(concurrency=4)
    store.write_atomic("big", BIGGER)
    etag = store.stat("big").version
    seen = in_flight(store.client, "get_object")
    with store.open_read("big") as f:
        assert f.read(10) == BIGGER[:10] and len(seen["calls"]) == 1  # a peek costs one GET
        got = bytearray(10) + f.read()
        got[:10] = BIGGER[:10]
    assert bytes(got) == BIGGER
    assert 2 <= seen["max"] <= 4  # parallel, and never more than `concurrency` windows in memory
    assert len(seen["calls"]) == 9 and all(c.get("IfMatch") == etag for c in seen["calls"][1:])


def test_s3_streaming_read_reuses_its_window_buffers(s3_storage_factory, monkeypatch, tmp_path):
    """Windows land in buffers reused once their bytes are taken, and whatever sizes the caller
    reads in, no byte of a reused buffer reaches it twice or late."""
    store = s3_storage_factory(concurrency=3)
    store.write_atomic("big", BIGGER)
    real, buffers = store.get_into, []

    def get_into(key, start, out, etag=None):
        buffers.append(memoryview(out).obj)  # held here: distinct buffers never share an id
        return real(key, start, out, etag)

    monkeypatch.setattr(store, "get_into", get_into)
    for sizes in ([MiB + 7], [3 * MIN_PART_SIZE + 5, 11], [len(BIGGER)]):
        buffers.clear()
        got = bytearray()
        with store.open_read("big") as f:
            i = 0
            while chunk := f.read(sizes[i % len(sizes)]):
                got += chunk
                i += 1
        assert bytes(got) == BIGGER, sizes
        assert len(buffers) == 8 and len({id(b) for b in buffers}) <= 3 + 1  # 8 windows after the first
    def assembled(self, view):
        raise AssertionError(f"a read of {len(view)} bytes was assembled from windows")

    # reads of whole windows are sliced from the window (one copy), never assembled in a buffer
    monkeypatch.setattr(type(f), "_fill", assembled)
    with store.open_read("big") as f:
        assert b"".join(iter(lambda: f.read(store.part_size), b"")) == BIGGER
    monkeypatch.undo()
    with store.open_read("big") as f:  # readinto into the caller's buffer (write_atomic, copy)
        out = bytearray(len(BIGGER))
        view, at = memoryview(out), 0
        while n := f.readinto(view[at : at + 3 * MiB]):
            at += n
    assert out == BIGGER


def test_s3_whole_read_is_one_get_then_parallel_pieces_pinned_to_its_etag(s3_storage_factory, monkeypatch, in_flight):
    """``read`` of an object past one ``get_size``: the first GET (from byte 0) answers its size and
    ETag, the rest comes in parallel ranged GETs with ``If-Match`` on that ETag; a small object is one
    GET; an object replaced between the first GET and the rest is ``ObjectChanged``, never a mix."""
    store = s3_storage_factory(concurrency=4)
    store.write_atomic("big", BIGGER)
    store.write_atomic("small", b"tiny")
    store.write_atomic("empty", b"")
    etag = store.stat("big").version
    seen = in_flight(store.client, "get_object")
    assert store.read("big") == BIGGER
    first, rest = seen["calls"][0], seen["calls"][1:]
    assert first["Range"].startswith("bytes=0-") and "IfMatch" not in first
    assert len(rest) == -(-len(BIGGER) // store.get_size) - 1 and all(c.get("IfMatch") == etag for c in rest)
    assert seen["max"] >= 2
    seen["calls"].clear()
    assert store.read("small") == b"tiny" and len(seen["calls"]) == 1
    assert store.read("empty") == b""
    real = store.read_into

    def replaced_meanwhile(*a, **kw):
        store.write_atomic("big", payload(len(BIGGER), seed=9))
        return real(*a, **kw)

    monkeypatch.setattr(store, "read_into", replaced_meanwhile)
    with pytest.raises(ObjectChanged):
        store.read("big")


def test_s3_read_ahead_never_mixes_versions(s3_storage_factory):
    store = s3_storage_factory(concurrency=4)
    store.write_atomic("v", BIGGER)
    with store.open_read("v") as f:
        f.read(MIN_PART_SIZE + 1)  # read-ahead started: windows of the first version in flight
        store.write_atomic("v", payload(len(BIGGER), seed=9))
        with pytest.raises(ObjectChanged, match="object changed during read"):
            f.read()


def test_s3_long_ranged_read_is_split_in_parallel_gets(s3_storage_factory, in_flight):
    import numpy as np

    store = s3_storage_factory(concurrency=4)
    store.write_atomic("big", BIGGER)
    info = store.stat("big")
    seen = in_flight(store.client, "get_object")
    out = np.zeros(len(BIGGER) - 1000, np.uint8)
    store.read_into("big", 1000, out, version=info.version)
    assert out.tobytes() == BIGGER[1000:]
    assert 2 <= seen["max"] <= 4 and all(c["IfMatch"] == info.version for c in seen["calls"])
    assert store.read_range("big", 3, 2 * MIN_PART_SIZE) == BIGGER[3 : 3 + 2 * MIN_PART_SIZE]
    with pytest.raises(IntegrityError, match="past end"):  # a short object fails before the rest is fetched
        store.read_into("big", 10, bytearray(len(BIGGER)))
    store.write_atomic("big", payload(len(BIGGER), seed=9))
    with pytest.raises(ObjectChanged):
        store.read_into("big", 0, bytearray(3 * MIN_PART_SIZE), version=info.version)


def test_s3_parts_upload_concurrently_with_bounded_memory(s3_storage_factory, in_flight):
    store = s3_storage_factory(concurrency=3)
    seen = in_flight(store.client, "upload_part")
    digest = hashlib.sha256(BIGGER).hexdigest()
    info = store.write_atomic("up", BIGGER)
    assert info.sha256 == digest and store.stat("up").sha256 == digest
    assert 2 <= seen["max"] <= 3  # at most `concurrency` parts held in flight
    assert sorted(c["PartNumber"] for c in seen["calls"]) == list(range(1, 10))
    # the part buffers are reused once their part is up: 9 parts, at most 3 + 1 buffers and the
    # short last part (the calls hold every Body, so two distinct buffers never share an id)
    assert len({id(c["Body"]) for c in seen["calls"]}) <= 3 + 1 + 1
    assert store.stat("up").version.endswith('-9"') and store.read("up") == BIGGER
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_s3_failed_concurrent_upload_publishes_nothing(s3_storage_factory, monkeypatch):
    store = s3_storage_factory(concurrency=3, max_attempts=1)
    store.write_atomic("up", b"old")

    def fail_part_5(n, kw, real):
        if kw["PartNumber"] == 5:
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "InternalError", "Message": "part 5 lost"}}, "UploadPart")
        return real(**kw)

    _count_calls(monkeypatch, store.client, "upload_part", fail_part_5)
    with pytest.raises(StorageError, match="UploadPart 5 failed"):
        store.write_atomic("up", BIGGER)
    assert store.read("up") == b"old"
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_s3_bodies_are_received_in_place_on_reused_connections(s3_storage_factory, monkeypatch):
    """A GET's body goes from the socket straight into the caller's buffer (botocore's copying
    ``read`` is never called), and each connection goes back to the pool for the next request."""
    import urllib3
    from botocore.response import StreamingBody

    store = s3_storage_factory(concurrency=1)
    store.write_atomic("r", BIG)

    def no_read(self, amt=None):
        raise AssertionError("StreamingBody.read: the body was copied through bytes objects")

    monkeypatch.setattr(StreamingBody, "read", no_read)
    connects = []
    real_connect = urllib3.connection.HTTPConnection.connect
    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect",
                        lambda self: (connects.append(1), real_connect(self))[1])
    out = bytearray(len(BIG))
    store.read_into("r", 0, out)  # three ranged GETs, one after the other
    assert bytes(out) == BIG
    assert store.read_range("r", 7, 1000) == BIG[7:1007]
    with store.open_read("r") as f:
        assert f.read() == BIG
    assert len(connects) <= 1  # every GET (and the HEAD-less reads) on one kept-alive connection
