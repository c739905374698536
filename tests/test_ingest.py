"""Ingestion engine on real digits data: good batches publish; every kind of bad shard is quarantined
with its reason while good shards publish; bad tables publish nothing and name file + column."""

import io
import json
import tarfile

import numpy as np
import polars as pl
import pytest

from pipeline import datagen
from pipeline.ingest import IngestError, ingest_shards, ingest_table, read_shard_manifest
from pipeline.storage import LocalStorage

BATCH = "b1"


@pytest.fixture(scope="module")
def digits():
    return datagen.load_digits()


@pytest.fixture
def landed(tmp_path, digits):
    store = LocalStorage(tmp_path / "store")
    datagen.write_batch(store, f"incoming/{BATCH}", digits, samples_per_shard=300)
    return store


def _tar(members) -> bytes:
    """members: (TarInfo-like kwargs, payload) pairs → tar bytes (with end-of-archive marker)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for kw, payload in members:
            info = tarfile.TarInfo(kw.pop("name"))
            for k, v in kw.items():
                setattr(info, k, v)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _png(digits, i=0) -> bytes:
    return datagen.encode_image(digits.images[i])


def _sample(stem, png, label=b"3\n"):
    return [({"name": f"{stem}.png"}, png), ({"name": f"{stem}.cls"}, label)]


def _bad_shards(digits, good_bytes: bytes) -> dict[str, tuple[bytes, str]]:
    png = _png(digits)
    cut = good_bytes[: len(good_bytes) // 3]
    boundary = _tar(_sample("a", png))[:-1024 * 9]  # drop end-of-archive blocks and record padding
    return {
        "garbage": (b"this is not a tar file" * 50, "corrupt or truncated tar"),
        "truncated": (cut, "truncated"),
        "cut_at_boundary": (boundary, "truncated tar: no end-of-archive marker"),
        "absolute": (_tar([({"name": "/etc/000001.png"}, png)]), "absolute path"),
        "dotdot": (_tar([({"name": "../000001.png"}, png)]), "escapes the archive"),
        "symlink": (_tar([({"name": "000001.png", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, None)]),
                    "links are not allowed"),
        "hardlink": (_tar([({"name": "000001.png", "type": tarfile.LNKTYPE, "linkname": "x"}, None)]),
                     "links are not allowed"),
        "device": (_tar([({"name": "000001.png", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, None)]),
                   "device"),
        "fifo": (_tar([({"name": "000001.png", "type": tarfile.FIFOTYPE}, None)]), "device/fifo"),
        "mixed_labels": (_tar(_sample("a", png) + [({"name": "b.png"}, png)]),
                         "sample 'b' has no .cls label but sample 'a' has: a shard is labeled or unlabeled as a whole"),
        "no_image": (_tar([({"name": "000001.cls"}, b"1\n")]), "no image member"),
        "bad_image": (_tar(_sample("000001", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)), "not a decodable image"),
        "label_range": (_tar(_sample("000001", png, b"12\n")), "outside [0, 10)"),
        "label_text": (_tar(_sample("000001", png, b"seven\n")), "not an integer"),
        # a's label after b: a reads as unlabeled, b as labeled (a mix), then a again (not contiguous)
        "split_sample": (_tar(_sample("a", png)[:1] + _sample("b", png) + _sample("a", png)[1:]),
                         "labeled or unlabeled as a whole"),
        "non_contiguous": (_tar(_sample("a", png) + _sample("b", png) + [({"name": "a.json"}, b"{}")]),
                           "not contiguous"),
        "empty": (_tar([]), "no samples"),
    }


def test_good_batch_publishes_everything(landed, digits):
    result = ingest_shards(landed, BATCH)
    assert not result.quarantined
    assert result.samples == len(digits) == 1797
    assert result.classes == {c: int((digits.labels == c).sum()) for c in range(10)}
    manifest = read_shard_manifest(landed, BATCH)
    assert manifest["samples"] == 1797
    for entry in manifest["shards"]:
        assert landed.checksum(entry["key"]) == entry["sha256"]
        assert landed.stat(entry["key"]).size == entry["bytes"]
        # the published shard is byte-identical to its landed source
        src = entry["key"].replace("raw/shards/b1/", "incoming/b1/shards/")
        assert landed.checksum(src) == entry["sha256"]


def test_each_bad_shard_is_quarantined_with_its_reason(landed, digits):
    good_src = "incoming/b1/shards/train-000000.tar"
    bad = _bad_shards(digits, landed.read(good_src))
    for name, (payload, _) in bad.items():
        landed.write_atomic(f"incoming/{BATCH}/shards/zz-{name}.tar", payload)
    sources_before = {o.key: landed.checksum(o.key) for o in landed.list("incoming")}

    result = ingest_shards(landed, BATCH)

    assert result.samples == 1797  # every good shard still published
    reasons = {r.source.rsplit("zz-", 1)[1][:-4]: r.reason for r in result.quarantined}
    assert set(reasons) == set(bad)
    for name, (payload, expected) in bad.items():
        assert expected in reasons[name], (name, reasons[name])
        qkey = f"quarantine/shards/{BATCH}/zz-{name}.tar"
        assert landed.read(qkey) == payload  # quarantined copy is the exact bad file
        note = json.loads(landed.read(qkey + ".reason.json"))
        assert expected in note["reason"] and note["source"].endswith(f"zz-{name}.tar")
        assert not landed.exists(f"raw/shards/{BATCH}/zz-{name}.tar")
    manifest = read_shard_manifest(landed, BATCH)
    assert len(manifest["quarantined"]) == len(bad)
    assert {o.key: landed.checksum(o.key) for o in landed.list("incoming")} == sources_before  # source untouched
    assert not landed.stale_temporaries()


def test_unlabeled_shard_publishes_as_unlabeled(tmp_path, digits):
    store = LocalStorage(tmp_path / "store")
    store.write_atomic("incoming/u/shards/traffic.tar", _tar([({"name": f"{i:06d}.png"}, _png(digits, i)) for i in range(3)]))
    result = ingest_shards(store, "u")
    assert not result.quarantined and result.samples == 3 and result.unlabeled == 3 and result.classes == {}
    manifest = read_shard_manifest(store, "u")
    assert manifest["unlabeled"] == 3 and manifest["shards"][0]["labeled"] is False


def test_reingest_never_overwrites_published_shards(landed, digits):
    ingest_shards(landed, BATCH)
    key = f"raw/shards/{BATCH}/train-000000.tar"
    published_sha = landed.checksum(key)
    # the landed source changes to other (valid) content: the published version must not move
    other = datagen.Digits(digits.images[:5], digits.labels[:5], np.full(5, "train"), digits.ids[:5])
    datagen.write_shards(landed, "tmp", other)
    landed.copy("tmp/train-000000.tar", f"incoming/{BATCH}/shards/train-000000.tar")

    result = ingest_shards(landed, BATCH)

    assert landed.checksum(key) == published_sha
    assert [r.source for r in result.quarantined] == [f"incoming/{BATCH}/shards/train-000000.tar"]
    assert "conflicts with published shard" in result.quarantined[0].reason
    manifest = read_shard_manifest(landed, BATCH)
    assert any(e["key"] == key and e["sha256"] == published_sha for e in manifest["shards"])
    assert manifest["samples"] == 1797


def test_no_shards_is_a_clear_error(tmp_path):
    store = LocalStorage(tmp_path)
    with pytest.raises(IngestError, match="incoming/nothing: no .tar shards"):
        ingest_shards(store, "nothing")


# --- tables --------------------------------------------------------------------------------------


def _write_frame(store, df: pl.DataFrame, key=f"incoming/{BATCH}/table.parquet"):
    buf = io.BytesIO()
    df.write_parquet(buf)
    store.write_atomic(key, buf.getvalue())


def test_good_table_publishes_with_stats(landed, digits):
    result = ingest_table(landed, BATCH)
    assert result.rows == 1797
    assert result.splits == {"test": 269, "train": 1259, "val": 269}
    assert sum(result.labels.values()) == 1797
    rep = result.files[0]
    assert rep.columns["label"]["min"] == 0 and rep.columns["label"]["max"] == 9
    assert rep.columns["px_36"]["mean"] == pytest.approx(digits.images.reshape(-1, 64)[:, 36].mean())
    published = pl.read_parquet(landed.local_path(result.published[0]))
    assert published.equals(datagen.table_frame(digits))


def _mutations(df: pl.DataFrame):
    return {
        "missing": (df.drop("px_10"), "column 'px_10' is missing"),
        "dtype": (df.with_columns(pl.col("px_03").cast(pl.Float64)), "column 'px_03' has dtype Float64, expected UInt8"),
        "nulls": (df.with_columns(pl.when(pl.col("id") == 5).then(None).otherwise(pl.col("label")).alias("label")),
                  "column 'label' has 1 null value(s)"),
        "range": (df.with_columns(pl.when(pl.col("id") == 7).then(200).otherwise(pl.col("px_20")).cast(pl.UInt8).alias("px_20")),
                  "column 'px_20' has values in [0, 200], allowed [0, 16]"),
        "label_range": (df.with_columns(pl.lit(11, pl.Int64).alias("label")), "column 'label' has values in [11, 11]"),
        "duplicates": (df.with_columns(pl.when(pl.col("id") == 3).then(2).otherwise(pl.col("id")).alias("id")),
                       "column 'id' has 1 duplicate id(s), e.g. [2]"),
        "split": (df.with_columns(pl.lit("holdout").alias("split")), "column 'split' has values ['holdout']"),
        "bytes": (None, "not a readable Parquet file"),
        "truncated": (None, "not a readable Parquet file"),
        "no_rows": (df.head(0), "the batch's tables hold no rows"),
    }


TABLE_CASES = ["missing", "dtype", "nulls", "range", "label_range", "duplicates", "split", "bytes", "truncated",
               "no_rows"]


@pytest.mark.parametrize("case", TABLE_CASES)
def test_bad_table_names_file_and_column_and_publishes_nothing(landed, digits, case):
    ingest_table(landed, BATCH)  # an earlier good version is published
    published_before = {o.key: landed.checksum(o.key) for o in landed.list("raw/table")}
    cases = _mutations(datagen.table_frame(digits))
    assert sorted(cases) == sorted(TABLE_CASES)
    frame, expected = cases[case]
    key = f"incoming/{BATCH}/table.parquet"
    if case == "bytes":
        landed.write_atomic(key, b"PAR1 not really parquet")
    elif case == "truncated":
        good = landed.read(key)
        landed.write_atomic(key, good[: len(good) // 2])
    else:
        _write_frame(landed, frame, key)

    with pytest.raises(IngestError) as err:
        ingest_table(landed, BATCH)

    assert landed.uri(key) in str(err.value)
    assert expected in str(err.value)
    assert {o.key: landed.checksum(o.key) for o in landed.list("raw/table")} == published_before
    assert not landed.stale_temporaries()


def test_a_published_table_does_not_change_when_its_batch_is_landed_again(landed, digits):
    """Re-landing a batch with other rows under the same name: its shards are refused as conflicts
    (published shards never change), and so is its table; it once replaced the published table, so
    table and shards came from two landings."""
    first = ingest_table(landed, BATCH)
    published = {o.key: landed.checksum(o.key) for o in landed.list("raw/table")}
    assert ingest_table(landed, BATCH).rows == first.rows  # the same bytes again: fine
    df = datagen.table_frame(digits)
    _write_frame(landed, df.with_columns(pl.when(pl.col("id") == 3).then(pl.lit("test")).otherwise(pl.col("split"))
                                         .alias("split")))
    with pytest.raises(IngestError, match=r"table\.parquet: conflicts with published table .*a published batch "
                                          r"does not change; land changed data as a new batch"):
        ingest_table(landed, BATCH)
    assert {o.key: landed.checksum(o.key) for o in landed.list("raw/table")} == published


def test_one_bad_table_blocks_the_whole_batch(landed, digits):
    df = datagen.table_frame(digits)
    _write_frame(landed, df.drop("split"), f"incoming/{BATCH}/zz-part2.parquet")
    with pytest.raises(IngestError, match="zz-part2.parquet: column 'split' is missing"):
        ingest_table(landed, BATCH)
    assert landed.list("raw/table") == []


def test_shifted_batch_is_valid_but_different(tmp_path, digits):
    store = LocalStorage(tmp_path)
    shifted = datagen.shift(digits)
    assert shifted.images.max() <= datagen.PIXEL_MAX and shifted.images.mean() > digits.images.mean() + 1.5
    assert (shifted.labels == digits.labels).all()
    datagen.write_batch(store, "incoming/shifted", shifted, samples_per_shard=500)
    assert ingest_shards(store, "shifted").samples == 1797
    assert ingest_table(store, "shifted").rows == 1797


# --------------------------------------------------------------------------- the tar reader
# pipeline.ingest._ShardReader parses shards instead of tarfile: it must read every archive it
# accepts exactly as tarfile (and so the DALI loader's index) does, and refuse what tarfile's stream
# mode let through.

import hashlib  # noqa: E402
import struct  # noqa: E402

from pipeline.ingest import ShardInvalid, _ShardReader, validate_shard  # noqa: E402


def _archive(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    """members: (name, payload or None for a directory, extra TarInfo fields)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload, *extra in members:
            info = tarfile.TarInfo(name)
            for k, v in (extra[0] if extra else {}).items():
                setattr(info, k, v)
            if payload is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _read(data: bytes) -> list[tuple[str, bytes]]:
    reader = _ShardReader(io.BytesIO(data))
    out = list(reader.members(lambda name: True))
    assert reader.nbytes == len(data) and reader.sha256 == hashlib.sha256(data).hexdigest()
    return out


def _tarfile_read(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _header_block(data: bytes, name: str) -> int:
    """Offset of the (first) header block that holds ``name``."""
    return data.index(name.encode()) // 512 * 512


def _rechecksum(b: bytearray, at: int) -> None:
    b[at + 148:at + 156] = b" " * 8
    b[at + 148:at + 156] = b"%06o\0 " % sum(b[at:at + 512])


LONG = "a" * 70 + "/" + "b" * 70 + "/0001.png"  # over 100 characters: ustar prefix, GNU long name or pax path


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_names_members_as_tarfile_does(fmt):
    members = [("d", None), ("d/0000.png", b"x" * 700), ("0000.cls", b"3\n"), (LONG, b"y" * 513),
               ("._hidden", b""), ("v1.2/0002.seg.png", b"z")]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(("c" * 120 + ".png", b"long basename"))  # ustar cannot store it
    if fmt == tarfile.PAX_FORMAT:
        members.append(("émoji-✓/0003.png", b"utf-8 name"))
    data = _archive(members, fmt)
    assert _read(data) == _tarfile_read(data) == [(n, p) for n, p, *_ in members if p is not None]


def test_reader_accepts_a_signed_checksum_and_a_git_archive_global_header():
    data = bytearray(_archive([("0000.png", b"x"), ("ü.png", b"y")], tarfile.GNU_FORMAT))
    at = _header_block(data, "ü")
    b = data[at:at + 512]
    signed = 256 + sum(struct.unpack("148b8x356b", bytes(b)))
    data[at + 148:at + 156] = b"%06o\0 " % signed  # some old tars sum signed bytes; tarfile accepts both
    assert signed != 256 + sum(b[:148]) + sum(b[156:])
    assert _read(bytes(data)) == _tarfile_read(bytes(data))
    buf = io.BytesIO()  # what `git archive` writes: a global pax header with the commit id first
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "b16925d"}) as tar:
        info = tarfile.TarInfo("0000.png")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    assert _read(buf.getvalue()) == _tarfile_read(buf.getvalue()) == [("0000.png", b"x")]


def _shard_of(n=4) -> bytes:
    return _archive([(f"{i:06d}.{ext}", payload) for i in range(n) for ext, payload in (("png", b"p" * 600), ("cls", b"1\n"))],
                    tarfile.USTAR_FORMAT)


def _refused(data: bytes, pattern: str) -> str:
    with pytest.raises(ShardInvalid) as e:
        _read(data)
    assert pytest.importorskip("re").search(pattern, str(e.value)), str(e.value)
    return str(e.value)


def test_a_corrupt_header_inside_the_archive_is_refused():
    """tarfile's stream mode ended the archive at a bad header: the shard published with the
    members before it only (the DALI loader refused the file)."""
    data = bytearray(_shard_of())
    at = _header_block(data, "000002.png")
    data[at + 148] ^= 1
    _refused(bytes(data), rf"corrupt or truncated tar: bad header checksum at byte {at}$")
    data = bytearray(_shard_of())
    data[at + 124:at + 136] = b"0000000012x\0"  # size: not octal, checksum made right
    _rechecksum(data, at)
    _refused(bytes(data), rf"invalid size field b'0000000012x\\x00' in the header at byte {at}")


def test_only_zeros_may_follow_the_end_of_archive_marker():
    data = _shard_of()
    assert _read(data)
    _refused(data + b"\1" + bytes(511), r"data after the end-of-archive marker at byte \d+ \(a non-zero byte at %d\)" % len(data))
    _refused(data + bytes(100), rf"truncated tar: no end-of-archive marker after {len(data) + 100} bytes")
    end = len(data.rstrip(b"\0")) // 512 * 512 + 512  # just after the last member's data
    _refused(data[:end + 512], rf"no end-of-archive marker after {end + 512} bytes")  # one zero block of two
    assert _read(data[:end + 1024])  # two zero blocks, without the record padding: complete
    _refused(data[:end] + b"x" * 512 + bytes(1024), rf"invalid checksum field b'xxxxxxxx' in the header at byte {end}")
    _refused(b"", r"corrupt or truncated tar: empty file")


def test_member_data_cut_short_is_refused():
    data = _shard_of()
    at = _header_block(data, "000003.png")
    _refused(data[:at + 512 + 100], r"truncated tar: member '000003.png' has 100 of 600 bytes")
    _refused(data[:at + 512 + 600], r"no end-of-archive marker")  # the member's padding is missing


def test_pax_and_gnu_headers_must_be_well_formed():
    data = _archive([(LONG, b"x")], tarfile.PAX_FORMAT)
    assert data[156:157] == b"x"
    body = data[512:1024]
    record = body[:body.index(b"\n") + 1]
    bad = bytearray(data)
    bad[512:512 + len(record)] = record.replace(record.split(b" ")[0], b"%d" % (len(record) + 1), 1)[:len(record)]
    _refused(bytes(bad), r"corrupt tar: invalid pax header record at byte 512")
    _refused(data[:1024] + bytes(10240), r"the header at byte 0 is not followed by a member")
    gnu = _archive([(LONG, b"x")], tarfile.GNU_FORMAT)
    assert gnu[156:157] == b"L"
    _refused(gnu[:1024] + bytes(1024), r"the header at byte 0 is not followed by a member")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "x.png"}) as tar:
        info = tarfile.TarInfo("0000.png")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    _refused(buf.getvalue(), r"a global pax header at byte 0 sets 'path' for every member \(unsupported\)")


def test_sparse_members_and_directories_with_data_are_refused():
    data = bytearray(_shard_of(1))
    data[156:157] = b"S"
    _rechecksum(data, 0)
    _refused(bytes(data), r"member '000000.png': unsupported member type b'S'")
    data = _archive([("0000.png", b"x", {"pax_headers": {"GNU.sparse.size": "1"}})], tarfile.PAX_FORMAT)
    _refused(data, r"a sparse member .*unsupported member type")
    data = bytearray(_archive([("d", None), ("0000.png", b"x" * 512)], tarfile.USTAR_FORMAT))
    data[124:136] = b"%011o\0" % 512  # the directory claims the next 512 bytes
    _rechecksum(data, 0)
    _refused(bytes(data), r"member 'd': a directory with 512 bytes of data")


def test_validate_shard_hashes_and_counts_every_byte_carried_or_not(digits):
    png = _png(digits)
    data = _archive([("0.png", png), ("0.cls", b"3\n"), ("0.json", b"{}" * 5000), ("._0.png", b"apple")],
                    tarfile.GNU_FORMAT) + bytes(4096)  # padded past a record: zeros are fine
    sink = io.BytesIO()
    samples, classes, sha, n = validate_shard(io.BytesIO(data), sink=sink)
    assert (samples, dict(classes), sha, n) == (1, {3: 1}, hashlib.sha256(data).hexdigest(), len(data))
    assert sink.getvalue() == data


def _is_header(block: bytes) -> bool:
    try:
        return block.strip(b"\0") != b"" and tarfile.nti(block[148:156]) in tarfile.calc_chksums(block)
    except tarfile.HeaderError:
        return False


def test_fuzz_whatever_the_reader_accepts_tarfile_reads_the_same():
    """Flipped, cut and re-checksummed variants of small archives in each format: an accepted one is
    read by tarfile as the same members and bytes; the reader never fails other than ShardInvalid."""
    rng = np.random.default_rng(5)
    seeds = [_archive([("a/0.png", b"p" * 40), ("0.cls", b"1\n"), (LONG, b"q" * 600)], fmt)
             for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)]
    accepted = refused = 0
    for seed in seeds:
        headers = [i for i in range(0, len(seed), 512) if _is_header(seed[i:i + 512])]
        for i in range(700):
            b = bytearray(seed)
            if i % 3 == 2:
                b = b[: int(rng.integers(0, len(b)))]
            else:
                for _ in range(int(rng.integers(1, 3))):
                    at = int(rng.choice(headers)) + int(rng.integers(0, 512)) if i % 3 == 1 else int(rng.integers(0, len(b)))
                    b[at] ^= 1 << int(rng.integers(0, 8))
                if i % 3 == 1:  # headers' checksums made right: the fields behind them must be checked
                    for h in headers:
                        _rechecksum(b, h)
            try:
                got = _read(bytes(b))
            except ShardInvalid:
                refused += 1
                continue
            accepted += 1
            assert got == _tarfile_read(bytes(b)), bytes(b)
    assert refused > 1000 and accepted > 100


@pytest.mark.parametrize("chunk", [1, 511, 512, 513, 1000, 4096])
def test_reader_reads_the_same_whatever_the_chunk_size(monkeypatch, chunk):
    """Members and headers straddling the reader's chunks: the same members, hash and verdicts as
    with whole-archive chunks, for good, cut, corrupt and padded archives."""
    from pipeline import ingest

    good = _archive([("a/0.png", b"p" * 1500), ("0.cls", b"1\n"), (LONG, b"q" * 600), ("0.json", b"j" * 3000)],
                    tarfile.GNU_FORMAT)
    end = len(good.rstrip(b"\0")) // 512 * 512 + 512
    cases = [good, good + bytes(1536), good[:700], good[:end - 100], good[:end + 512],
             good[:end] + b"\0" * 700 + b"\1" + bytes(1347), good[:2000] + b"x" * 512 + good[2512:]]

    def outcome(data):
        try:
            return _read(data)
        except ShardInvalid as e:
            return str(e)

    expected = [outcome(d) for d in cases]
    assert isinstance(expected[0], list) and all(isinstance(x, str) for x in expected[2:])
    monkeypatch.setattr(ingest, "CHUNK", chunk)
    assert [outcome(d) for d in cases] == expected


def test_a_synthetic_batch_lands_whole_with_its_table_and_ingests(tmp_path):
    store = LocalStorage(tmp_path / "store")
    summary = datagen.write_synthetic_batch(store, "incoming/big", 400_000, image_size=48, samples_per_shard=64)
    assert json.loads(store.read("incoming/big/_READY")) == summary and summary["synthetic"] is True
    table = pl.read_parquet(store.local_path(summary["table"]))
    assert table.height == summary["samples"] == 64 * len(summary["shards"])
    # each row is its sample: the same id and label as the shard member
    with tarfile.open(store.local_path(summary["shards"][-1])) as tar:
        labels = {m.name.split(".")[0]: int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
    rows = dict(zip(table["id"].to_list(), table["label"].to_list()))
    assert labels and all(rows[int(k)] == v for k, v in labels.items())
    shards, tab = ingest_shards(store, "big"), ingest_table(store, "big")
    assert not shards.quarantined and shards.samples == tab.rows == summary["samples"]
