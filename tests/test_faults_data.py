"""Faults a user meets in the first hour, data side: hostile or broken images, same-named shards in
two folders, symlinked landings, bad batch names, and withdrawing data that got through.

Every case names the file or member and its problem in one line; a bad shard never stops the good
ones and nothing published is lost or half-written."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import datagen, dataset
from pipeline.ingest import (
    BadBatchName,
    IngestError,
    check_batch_name,
    ingest_shards,
    ingest_table,
    read_shard_manifest,
    withdraw,
    withdrawals,
)
from pipeline.storage import LocalStorage
from pipeline.webdataset import IMAGE_EXTS, IMAGE_FORMATS

B = "b1"
RNG = np.random.default_rng(0)


@pytest.fixture
def store(tmp_path):
    return LocalStorage(tmp_path / "store", fsync=False)


def _img(fmt="png", size=48) -> bytes:
    """A noisy gray image (so a cut lands inside the compressed body)."""
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(
        buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header(w: int, h: int, body: bytes = b"") -> bytes:
    """PNG signature + a valid IHDR for w x h gray, then ``body`` (chunks or garbage)."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + body


def _shard(store, key, images: list[tuple[str, bytes]]) -> None:
    datagen.write_tar(store, key, ((f"{i:06d}", ext, data, i % 10) for i, (ext, data) in enumerate(images)))


def _good(store, key=f"incoming/{B}/shards/train-000000.tar", n=3):
    _shard(store, key, [("png", _img()) for _ in range(n)])


def _ready(store, batch=B):
    store.write_atomic(f"incoming/{batch}/{datagen.READY_MARKER}", b"{}")


# ---------------------------------------------------------------------------------------------
# 1. Hostile and broken images: decoded in full at ingest, the shard quarantined naming the member
# ---------------------------------------------------------------------------------------------

def _bad_images() -> dict[str, tuple[str, bytes, str]]:
    png, jpg = _img("png"), _img("jpg")
    idat = _chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + _chunk(b"IEND", b"")  # a real body would follow
    return {
        "bomb_2x": ("png", _png_header(20000, 20000, idat), "decompression bomb"),  # Pillow's error
        "bomb_1x": ("png", _png_header(10000, 10000, idat), "decompression bomb"),  # Pillow only warns
        "truncated_png": ("png", png[: len(png) // 2], "not a decodable image"),
        "truncated_jpeg": ("jpg", jpg[: len(jpg) // 2], "not a decodable image"),
        "png_header_garbage": ("png", _png_header(48, 48, os.urandom(300)), "not a decodable image"),
        "png_short_idat": ("png", _png_header(48, 48, idat), "not a decodable image"),  # 10 of 48x49 bytes
        "jpeg_header_garbage": ("jpg", jpg[:200] + os.urandom(400), "not a decodable image"),
        "zero_bytes": ("png", b"", "empty image (0 bytes)"),
        "text_as_png": ("png", b"hello, not an image\n", "not a decodable image"),
        "jpeg_as_png": ("png", jpg, "holds a JPEG image, not PNG"),
        "png_as_jpg": ("jpg", png, "holds a PNG image, not JPEG"),
        "gif_as_png": ("png", _gif(), "holds a GIF image"),
    }


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns; ingest refuses
def test_each_broken_image_quarantines_its_shard_naming_the_member(store):
    _good(store)
    bad = _bad_images()
    for name, (ext, data, _) in bad.items():  # the bad image is the 2nd sample: a good one before it
        _shard(store, f"incoming/{B}/shards/zz-{name}.tar", [("png", _img()), (ext, data)])

    result = ingest_shards(store, B, workers=2)  # never raises: the step stands

    assert [r.key for r in result.published] == [f"raw/shards/{B}/train-000000.tar"]
    reasons = {r.source.rsplit("zz-", 1)[1][:-4]: r.reason for r in result.quarantined}
    assert set(reasons) == set(bad)
    for name, (ext, _, expected) in bad.items():
        assert expected in reasons[name], (name, reasons[name])
        assert f"member '000001.{ext}'" in reasons[name]  # names the member
        assert "\n" not in reasons[name]
        assert store.exists(f"quarantine/shards/{B}/zz-{name}.tar.reason.json")
        assert not store.exists(f"raw/shards/{B}/zz-{name}.tar")
    assert [e["key"] for e in read_shard_manifest(store, B)["shards"]] == [f"raw/shards/{B}/train-000000.tar"]
    assert not store.stale_temporaries()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns; ingest refuses
def test_bomb_limit_is_pillows_current_limit(store, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)  # whoever lowers it is obeyed
    _shard(store, f"incoming/{B}/shards/small.tar", [("png", _img(size=32))])
    _shard(store, f"incoming/{B}/shards/big.tar", [("png", _img(size=48))])
    result = ingest_shards(store, B)
    assert [r.key for r in result.published] == [f"raw/shards/{B}/small.tar"]
    assert "48x48 image (2304 pixels) exceeds the 1600-pixel limit" in result.quarantined[0].reason


def test_every_image_format_must_match_its_extension():
    assert set(IMAGE_FORMATS) == set(IMAGE_EXTS)


# ---------------------------------------------------------------------------------------------
# 2. Same-named files in two folders: both accounted for, the manifest matches the bytes
# ---------------------------------------------------------------------------------------------

def test_same_named_shards_in_two_folders_publish_under_distinct_keys(store):
    _good(store, f"incoming/{B}/shards/a/x.tar", n=2)
    _good(store, f"incoming/{B}/shards/b/x.tar", n=5)
    _good(store, f"incoming/{B}/shards/x.tar", n=1)
    _good(store, f"incoming/{B}/x.tar", n=1)  # outside shards/: rejected, named

    result = ingest_shards(store, B)

    assert sorted(r.key for r in result.published) == [f"raw/shards/{B}/{k}" for k in ("a/x.tar", "b/x.tar", "x.tar")]
    assert [(r.source, r.reason.split(":")[0]) for r in result.quarantined] == [(f"incoming/{B}/x.tar", "not under shards/")]
    manifest = read_shard_manifest(store, B)
    for e in manifest["shards"]:  # exactly the bytes that were published
        assert store.checksum(e["key"]) == e["sha256"] and store.stat(e["key"]).size == e["bytes"]
        src = e["key"].replace(f"raw/shards/{B}/", f"incoming/{B}/shards/")
        assert store.checksum(src) == e["sha256"]
    assert manifest["samples"] == 8
    assert sorted(dataset.collect(store)["splits"]["train"], key=lambda e: e["key"]) == sorted(
        ({k: e[k] for k in ("key", "sha256", "bytes", "samples")} for e in manifest["shards"]), key=lambda e: e["key"])


def test_a_file_under_shards_not_named_tar_is_refused_with_its_reason_not_passed_over(store):
    """A shard named x.TAR, a compressed x.tgz, notes left beside the shards: each is named among
    the refused with why, where they were once left out without a word."""
    _good(store, f"incoming/{B}/shards/train-000000.tar")
    _good(store, f"incoming/{B}/shards/UPPER.TAR")
    store.write_atomic(f"incoming/{B}/shards/x.tgz", b"\x1f\x8b" + b"z" * 100)
    store.write_atomic(f"incoming/{B}/shards/notes/readme.txt", b"hello")
    result = ingest_shards(store, B)
    assert [r.key for r in result.published] == [f"raw/shards/{B}/train-000000.tar"]
    refused = {r.source: r.reason for r in result.quarantined}
    assert sorted(refused) == [f"incoming/{B}/shards/{k}" for k in ("UPPER.TAR", "notes/readme.txt", "x.tgz")]
    assert all("shards are uncompressed tar files named *.tar" in why for why in refused.values())
    assert store.exists(f"quarantine/shards/{B}/UPPER.TAR.reason.json")  # the note, where a user looks

    store.delete(f"incoming/{B}/shards/train-000000.tar")  # nothing but strays: the error names them
    with pytest.raises(IngestError, match=r"no \.tar shards to ingest \(under shards/: UPPER\.TAR, "):
        ingest_shards(store, B)


def test_same_named_good_and_bad_shard_each_keep_their_own_key(store):
    _good(store, f"incoming/{B}/shards/a/x.tar")
    store.write_atomic(f"incoming/{B}/shards/b/x.tar", b"not a tar" * 100)
    result = ingest_shards(store, B)
    assert [r.key for r in result.published] == [f"raw/shards/{B}/a/x.tar"]
    assert store.read(f"quarantine/shards/{B}/b/x.tar") == b"not a tar" * 100
    assert not store.exists(f"quarantine/shards/{B}/a/x.tar")


def test_same_named_tables_in_two_folders_are_two_files(store):
    data = datagen.load_digits()
    datagen.write_table(store, f"incoming/{B}/a/t.parquet", data)
    datagen.write_table(store, f"incoming/{B}/b/t.parquet", datagen.shift(data))
    result = ingest_table(store, B)
    assert result.published == [f"raw/table/{B}/a/t.parquet", f"raw/table/{B}/b/t.parquet"]
    for f, rep in zip(result.published, result.files):
        assert store.checksum(f) == rep.sha256


# ---------------------------------------------------------------------------------------------
# 3. Symbolic links are rejected, not followed; bad batch names are refused before any write
# ---------------------------------------------------------------------------------------------

def test_symlinked_shard_is_rejected_not_followed(store, tmp_path):
    _good(store)
    _good(store, "elsewhere/secret.tar")
    os.symlink(store.local_path("elsewhere/secret.tar"), store.local_path(f"incoming/{B}/shards/linked.tar"))
    os.symlink(tmp_path / "missing.tar", store.local_path(f"incoming/{B}/shards/dangling.tar"))
    os.makedirs(store.local_path("elsewhere/dir"))
    _good(store, "elsewhere/dir/inner.tar")
    os.symlink(store.local_path("elsewhere/dir"), store.local_path(f"incoming/{B}/shards/sub"))

    result = ingest_shards(store, B)

    assert [r.key for r in result.published] == [f"raw/shards/{B}/train-000000.tar"]
    reasons = {r.source: r.reason for r in result.quarantined}
    assert set(reasons) == {f"incoming/{B}/shards/{n}" for n in ("linked.tar", "dangling.tar", "sub")}
    assert all(r.startswith("symbolic link (-> ") and "not followed" in r for r in reasons.values())
    assert not store.exists(f"quarantine/shards/{B}/linked.tar")  # the target was never copied
    assert store.exists(f"quarantine/shards/{B}/linked.tar.reason.json")
    assert len(read_shard_manifest(store, B)["quarantined"]) == 3


def test_symlinked_parquet_or_batch_folder_stops_the_table(store):
    data = datagen.load_digits()
    datagen.write_table(store, "elsewhere/t.parquet", data)
    datagen.write_table(store, f"incoming/{B}/table.parquet", data)
    os.symlink(store.local_path("elsewhere/t.parquet"), store.local_path(f"incoming/{B}/more.parquet"))
    with pytest.raises(IngestError, match=r"incoming/b1/more.parquet: this file is a symbolic link \(-> "):
        ingest_table(store, B)
    assert store.list("raw/table") == []

    os.makedirs(store.local_path("incoming"), exist_ok=True)
    os.symlink(store.local_path(f"incoming/{B}"), store.local_path("incoming/b2"))
    with pytest.raises(IngestError, match="incoming/b2: the batch folder is a symbolic link"):
        ingest_table(store, "b2")
    with pytest.raises(IngestError, match="incoming/b2: the batch folder is a symbolic link"):
        ingest_shards(store, "b2")
    assert store.list("raw") == []


BAD_NAMES = ["", ".", "..", "a/b", "../x", "-rf", " lead", "trail ", "tab\tin", "a\\b", ".hidden",
             "x" * 129, "ümlaut", "a:b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_batch_name_is_refused_before_anything_is_written(store, name):
    _good(store)
    before = {o.key for o in store.list()}
    with pytest.raises(BadBatchName) as e:
        check_batch_name(name)
    assert "\n" not in str(e.value) and str(e.value).startswith("batch name ")
    for call in (lambda: ingest_shards(store, name), lambda: ingest_table(store, name),
                 lambda: withdraw(store, name, reason="r")):
        with pytest.raises(BadBatchName):
            call()
    assert {o.key for o in store.list()} == before


def test_good_batch_names_pass():
    for name in ("b1", "digits-0001", "2024.06.01_night", "A", "x" * 128):
        assert check_batch_name(name) == name


def test_sensor_and_schedule_skip_ready_folders_with_bad_names(tmp_path):
    from jobs.ingest import landed_batches
    from resources.storage import LocalStorageResource

    res = LocalStorageResource(root=str(tmp_path / "store"))
    store = res.client()
    for name in ("good-1", "-x", " sp"):
        os.makedirs(store.local_path(f"incoming/{name}"))
        store.local_path(f"incoming/{name}/_READY").write_bytes(b"{}")
    ready, refused = landed_batches(res)
    assert ready == ["good-1"] and set(refused) == {"-x", " sp"}


def _cli_fails(cli, capsys, argv, pattern) -> None:
    """``forgeline <argv>`` fails with ``pattern`` in its one-line message (an argparse error, a
    SystemExit message or a line on stderr)."""
    try:
        rc, said = cli.main(argv), ""
    except SystemExit as e:
        rc, said = e.code, str(e.code)
    out = capsys.readouterr()
    said += out.err + out.out
    assert rc not in (0, None) and re.search(pattern, said), (rc, said)


def test_cli_refuses_bad_names_and_unready_partitions(tmp_path, monkeypatch, capsys):
    import dagster as dg

    from jobs import cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    _cli_fails(cli, capsys, ["gen", "digits", "--batch", "../up"], r"argument --batch: batch name '../up': a path")
    _cli_fails(cli, capsys, ["demo", "--batch", " x"], r"argument --batch: batch name ' x': whitespace")
    assert not (tmp_path / "store" / "incoming").exists()
    _cli_fails(cli, capsys, ["launch", "ingest", "--partition", "nope"],
               r"--partition 'nope': batch 'nope': .*incoming/nope does not exist")
    store = LocalStorage(tmp_path / "store")
    _good(store, "incoming/half/shards/train-000000.tar")  # landing, no _READY yet
    _cli_fails(cli, capsys, ["launch", "ingest", "--partition", "half"], "has not finished landing")
    _cli_fails(cli, capsys, ["launch", "ingest", "--partition", "a/b"], "batch name 'a/b'")
    _cli_fails(cli, capsys, ["withdraw", "..", "--reason", "x"], r"argument batch: batch name '..'")
    assert dg.DagsterInstance.get().get_dynamic_partitions("batches") == []


def _disk_fills_after(monkeypatch, n_bytes: int) -> None:
    """Local writes fail as a full disk does (ENOSPC from the file's write) once ``n_bytes`` are written."""
    import errno

    from pipeline.storage import local

    left = {"bytes": n_bytes}
    real_init = local._LocalWriter.__init__

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            left["bytes"] -= len(data)
            if left["bytes"] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self._f = Full(self._f)

    monkeypatch.setattr(local._LocalWriter, "__init__", init)


def test_gen_on_a_full_disk_is_one_line_and_leaves_no_half_batch(tmp_path, monkeypatch, capsys):
    from jobs import cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    store = LocalStorage(tmp_path / "store")
    _disk_fills_after(monkeypatch, 200_000)
    _cli_fails(cli, capsys, ["gen", "digits", "--batch", "b1"], r"^forgeline: \S+/incoming/b1/\S+: no space left on "
                                                               r"device$")
    assert store.list("incoming") == []  # what it wrote is removed: the space comes back, no unready half batch
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


def test_a_batch_rewritten_is_not_ready_until_whole_again(store, monkeypatch):
    datagen.write_batch(store, f"incoming/{B}", datagen.load_digits(), samples_per_shard=600)
    marker = f"incoming/{B}/{datagen.READY_MARKER}"
    seen = []
    real = datagen.write_tar

    def write_tar(st, key, samples):
        seen.append(st.exists(marker))  # as each shard is rewritten
        return real(st, key, samples)

    monkeypatch.setattr(datagen, "write_tar", write_tar)
    datagen.write_batch(store, f"incoming/{B}", datagen.load_digits(), samples_per_shard=600)
    assert seen and not any(seen) and store.exists(marker)
    monkeypatch.setattr(datagen, "write_table", lambda *a, **k: 1 / 0)  # a rewrite that fails: nothing is left
    with pytest.raises(ZeroDivisionError):
        datagen.write_batch(store, f"incoming/{B}", datagen.load_digits(), samples_per_shard=600)
    assert store.list(f"incoming/{B}") == []


# ---------------------------------------------------------------------------------------------
# 4. Withdrawal: recorded, and the next training data leaves it out
# ---------------------------------------------------------------------------------------------

def _two_batches(store):
    for b in ("b1", "b2"):
        _good(store, f"incoming/{b}/shards/train-000000.tar", n=2)
        _good(store, f"incoming/{b}/shards/train-000001.tar", n=3)
        _good(store, f"incoming/{b}/shards/val-000000.tar", n=1)
        ingest_shards(store, b)


def test_withdrawn_shard_is_not_in_the_next_training_data(store):
    _two_batches(store)
    before = dataset.collect(store)
    assert before["samples"]["train"] == 10 and before["withdrawn"] == []

    rec = withdraw(store, "b1", "train-000001.tar", reason="mislabelled 7s", by="alice")

    after = dataset.collect(store)
    keys = [e["key"] for e in after["splits"]["train"]]
    assert "raw/shards/b1/train-000001.tar" not in keys and len(keys) == 3
    assert after["samples"]["train"] == 7 and after["version"] != before["version"]
    assert after["withdrawn"] == ["raw/shards/b1/train-000001.tar"]
    assert store.exists("raw/shards/b1/train-000001.tar")  # nothing published is deleted
    saved = json.loads(store.read(rec["record"]))
    assert rec["record"].startswith("withdrawn/b1/")
    assert saved["shard"] == "raw/shards/b1/train-000001.tar" and saved["reason"] == "mislabelled 7s"
    assert saved["by"] == "alice" and saved["time"].endswith("Z")
    assert saved["shards"][0]["sha256"] == store.checksum("raw/shards/b1/train-000001.tar")


def test_withdrawn_batch_is_left_out_whole(store):
    _two_batches(store)
    withdraw(store, "b2", reason="camera fault")
    after = dataset.collect(store)
    assert after["batches"] == ["b1"] and after["withdrawn"] == ["b2"]
    assert all(e["key"].startswith("raw/shards/b1/") for es in after["splits"].values() for e in es)
    withdraw(store, "b1", reason="also bad")
    with pytest.raises(ValueError, match="no published training shards"):
        dataset.collect(store)
    assert [r["batch"] for r in withdrawals(store)] == ["b2", "b1"]


def test_withdraw_refuses_unknown_shard_batch_or_empty_reason(store):
    _two_batches(store)
    with pytest.raises(IngestError, match="batch 'b1' has no published shard\\(s\\) named 'nope.tar'"):
        withdraw(store, "b1", "nope.tar", reason="x")
    with pytest.raises(IngestError, match="batch 'b9' has no published shard manifest"):
        withdraw(store, "b9", reason="x")
    with pytest.raises(IngestError, match="needs a reason"):
        withdraw(store, "b1", reason="  ")
    assert withdrawals(store) == []


def test_cli_withdraw_and_batches(tmp_path, monkeypatch, capsys):
    from jobs import cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    _two_batches(LocalStorage(tmp_path / "store"))
    assert cli.main(["withdraw", "b1", "--shard", "train-000001.tar", "--reason", "blurry", "--by", "bob"]) == 0
    assert "withdrew shard raw/shards/b1/train-000001.tar, 3 samples" in capsys.readouterr().out
    assert cli.main(["withdraw", "b2", "--shard", "zz.tar", "--reason", "x"]) == 1
    assert "not withdrawn: batch 'b2' has no published shard" in capsys.readouterr().out
    assert cli.main(["batches"]) == 0
    out = capsys.readouterr().out
    assert "1 shard(s) withdrawn" in out and "blurry" in out and "bob" in out


def test_gen_after_a_killed_gen_or_with_force_writes_the_batch_whole(tmp_path, monkeypatch, capsys):
    from jobs import cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    store = LocalStorage(tmp_path / "store")
    # what a `forgeline gen` killed mid-way leaves: shards of its own, a temporary, no ready marker
    shards = tmp_path / "store" / "incoming" / "b1" / "shards"
    shards.mkdir(parents=True)
    (shards / "train-000042.tar").write_bytes(b"from the killed run")
    (shards / ".train-000043.tar.tmp-0123456789ab").write_bytes(b"half")
    def written() -> set[str]:  # what this run says it wrote: its shards, its table and the marker
        summary = json.loads(store.read("incoming/b1/_READY"))
        return {*summary["shards"], summary["table"], "incoming/b1/_READY"}

    assert cli.main(["gen", "digits", "--batch", "b1", "--samples-per-shard", "500"]) == 0
    assert {o.key for o in store.list("incoming/b1")} == written()  # the killed run's shard is gone
    assert store.stale_temporaries("incoming/b1") == [] and len(written()) > 6
    # a rewrite in fewer shards keeps none of the earlier batch's extra ones
    assert cli.main(["gen", "digits", "--batch", "b1", "--samples-per-shard", "2000", "--force"]) == 0
    assert {o.key for o in store.list("incoming/b1")} == written() and len(written()) < 7
    capsys.readouterr()
