"""The WebDataset conventions (pipeline.webdataset) and the agreement they buy: what ingestion
publishes, the DALI loader indexes and decodes and the drift checks read, sample for sample; what
the loader cannot read, ingestion quarantines."""

from __future__ import annotations

import io
import re
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import datagen, drift, ingest
from pipeline.storage import LocalStorage
from pipeline.webdataset import (
    IMAGE_EXTS,
    WebDatasetError,
    format_label,
    group_samples,
    member_name,
    parse_label,
    read_samples,
    sample_problem,
    split_key,
)

# --------------------------------------------------------------------------- the rules


def test_key_is_everything_up_to_the_first_dot_of_the_basename():
    assert split_key("000001.png") == ("000001", "png")
    assert split_key("000001.seg.png") == ("000001", "seg.png")  # a multi-part extension, one sample
    assert split_key("a.b/c.d/000001.JPG") == ("a.b/c.d/000001", "jpg")  # dots in directories are kept
    assert split_key("._000001.png") is None  # hidden (macOS AppleDouble): no sample
    assert split_key("dir/.hidden.png") is None
    for bad in ("README", "000001.", "dir/noext"):
        with pytest.raises(WebDatasetError, match="no '<key>.<ext>' name"):
            split_key(bad)
    with pytest.raises(WebDatasetError, match="whitespace"):
        split_key("my image.png")


def test_member_names_round_trip():
    assert member_name("d/000001", "png") == "d/000001.png"
    with pytest.raises(WebDatasetError, match="would not read back"):
        member_name("v1.000001", "png")  # the key would be "v1"
    with pytest.raises(WebDatasetError, match="would not read back"):
        member_name("000001", "PNG")


def test_labels():
    assert parse_label(format_label(7)) == 7
    for raw, value in ((b"123\n", 123), (b" 42 ", 42), (b"3\0\0", 3), (b"999999999999999999", 10**18 - 1)):
        assert parse_label(raw) == value
    for raw in (b"", b"\n", b"-1", b"+3", b"seven", b"3.0", b"1" * 19):
        assert parse_label(raw) is None, raw


def test_grouping():
    members = [("a.png", 1), ("a.cls", 2), ("._a.png", 0), ("b.seg.png", 3), ("b.png", 4), ("b.cls", 5)]
    assert list(group_samples(members)) == [("a", {"png": 1, "cls": 2}), ("b", {"seg.png": 3, "png": 4, "cls": 5})]
    with pytest.raises(WebDatasetError, match="sample 'a': members are not contiguous"):
        list(group_samples([("a.png", 1), ("b.png", 2), ("a.cls", 3)]))
    with pytest.raises(WebDatasetError, match="duplicate field .png"):
        list(group_samples([("a.png", 1), ("a.PNG", 2)]))
    assert sample_problem(["png", "cls", "json"]) is None
    assert sample_problem(["seg.png", "cls"]).startswith("no image member")
    assert sample_problem(["gif", "cls"]).startswith("no image member")
    assert sample_problem(["png", "jpg", "cls"]) == "2 image members (.png, .jpg)"
    assert sample_problem(["png"]) == "no .cls label"


# --------------------------------------------------------------------------- agreement


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits():
    return datagen.load_digits()


def _loaded(store, batch):
    """(images [N, 32, 32] uint8 as the loader decodes them, labels) of a published batch."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from pipeline.preprocess import PreprocessSpec, WebDatasetLoader

    paths = [str(store.local_path(e["key"])) for e in ingest.read_shard_manifest(store, batch)["shards"]]
    spec = PreprocessSpec(resize_shorter=32, crop=32, mean=(0.0,), std=(1 / 255,))  # identity: 0..255
    with WebDatasetLoader(sorted(paths), batch_size=16, spec=spec, training=False) as loader:
        xs, ys = zip(*loader.epoch(0))
    return np.rint(np.concatenate([x[:, 0].numpy() for x in xs])).astype(np.uint8), np.concatenate(ys)


@pytest.mark.parametrize("fmt", IMAGE_EXTS)
def test_every_accepted_format_is_published_loaded_and_read_by_drift(tmp_path, digits, fmt):
    store = LocalStorage(tmp_path, fsync=False)
    idx = np.arange(24)
    data = datagen.Digits(digits.images[idx], digits.labels[idx], np.full(24, "train"), digits.ids[idx])
    datagen.write_batch(store, "incoming/b", data, samples_per_shard=10, image_size=32, fmt=fmt)

    result = ingest.ingest_shards(store, "b")
    assert not result.quarantined and result.samples == 24

    ref = np.stack([np.asarray(Image.open(io.BytesIO(datagen.encode_image(img, 32, fmt))).convert("L"))
                    for img in data.images])  # WebP stores gray as RGB
    images, labels = _loaded(store, "b")
    assert labels.tolist() == data.labels.tolist()
    assert np.abs(images.astype(int) - ref).max() <= 1  # DALI decodes what Pillow decodes

    feats = drift.batch_image_features(store, "b", cache=None)
    assert feats["label"].to_list() == data.labels.tolist()
    np.testing.assert_allclose(feats["brightness"].to_numpy(), ref.reshape(24, -1).mean(1) / 255, atol=1e-6)


def test_keys_with_several_dots_and_hidden_members_read_the_same_everywhere(tmp_path, digits):
    """``0.seg.png`` is a field of sample ``0`` (not its image), a dot in a directory is part of the
    key, a hidden member belongs to no sample: ingestion, the loader and drift agree on 2 samples."""
    store = LocalStorage(tmp_path, fsync=False)
    png = [datagen.encode_image(digits.images[i], 32) for i in range(2)]
    white = datagen.encode_image(np.full((8, 8), datagen.PIXEL_MAX, np.uint8), 32)
    store.write_atomic("incoming/b/shards/train-000000.tar", _tar([
        ("000000.png", png[0]), ("000000.seg.png", white), ("000000.cls", b"3\n"),
        ("._000001.png", b"AppleDouble metadata"),
        ("v1.2/000001.png", png[1]), ("v1.2/000001.cls", b"4\0\0"),
    ]))

    result = ingest.ingest_shards(store, "b")
    assert not result.quarantined and result.samples == 2 and result.classes == {3: 1, 4: 1}

    ref = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in png])
    images, labels = _loaded(store, "b")
    assert labels.tolist() == [3, 4] and np.array_equal(images, ref)

    feats = drift.batch_image_features(store, "b", cache=None)
    assert feats["label"].to_list() == [3, 4]
    np.testing.assert_allclose(feats["brightness"].to_numpy(), ref.reshape(2, -1).mean(1) / 255, atol=1e-6)
    with store.open_read("raw/shards/b/train-000000.tar") as f:
        assert [k for k, _ in read_samples(f)] == ["000000", "v1.2/000001"]


def test_what_the_loader_cannot_read_is_quarantined(tmp_path, digits):
    store = LocalStorage(tmp_path, fsync=False)
    png = datagen.encode_image(digits.images[0], 32)
    gif = io.BytesIO()
    Image.open(io.BytesIO(png)).save(gif, format="GIF")
    bad = {
        "gif": ([("000000.gif", gif.getvalue()), ("000000.cls", b"1\n")], "no image member"),
        "multi_dot": ([("000000.v2.png", png), ("000000.cls", b"1\n")], "no image member"),
        "two_images": ([("000000.png", png), ("000000.jpg", png), ("000000.cls", b"1\n")], "2 image members"),
        "whitespace": ([("sample 0.png", png), ("sample 0.cls", b"1\n")], "whitespace"),
        "no_ext": ([("000000", png)], "no '<key>.<ext>' name"),
        "signed_label": ([("000000.png", png), ("000000.cls", b"+1\n")], "not an integer"),
    }
    for name, (members, _) in bad.items():
        store.write_atomic(f"incoming/b/shards/{name}.tar", _tar(members))
    store.write_atomic("incoming/b/shards/upper.tar", _tar([("000000.PNG", png), ("000000.CLS", b"1\n")]))

    result = ingest.ingest_shards(store, "b")
    reasons = {r.source.rsplit("/", 1)[1][:-4]: r.reason for r in result.quarantined}
    assert set(reasons) == set(bad)
    for name, (_, expected) in bad.items():
        assert expected in reasons[name], (name, reasons[name])
    assert [r.source for r in result.published] == ["incoming/b/shards/upper.tar"]  # case-insensitive exts

    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from pipeline.preprocess import PreprocessSpec, ShardError, WebDatasetLoader

    for name in bad:  # the loader refuses the very same shards, naming them
        with pytest.raises(ShardError, match=f"{name}.tar"):
            WebDatasetLoader([str(store.local_path(f"incoming/b/shards/{name}.tar"))], batch_size=1,
                             spec=PreprocessSpec(), training=False)
    upper = WebDatasetLoader([str(store.local_path("raw/shards/b/upper.tar"))], batch_size=1, spec=PreprocessSpec(),
                             training=False)
    assert upper.total_samples == 1 and [int(y) for _, y in upper.epoch(0)] == [1]


# --------------------------------------------------------------------------- the PNG check
# pipeline.webdataset.png_problem checks a PNG without Pillow's decode. Each case below is made
# with Pillow (or by hand where Pillow cannot write it) plus one edit, every other chunk's CRC
# recomputed, so the case breaks exactly one rule.

from PIL import PngImagePlugin  # noqa: E402

from pipeline.webdataset import PNG_SIGNATURE, image_problem, png_problem  # noqa: E402

_RNG = np.random.default_rng(7)
LIMIT = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS


def _encode(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _noise(mode="L", size=(37, 23)) -> Image.Image:
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    arr = _RNG.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode=mode)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(png):
        n, kind = struct.unpack_from(">I4s", png, pos)
        out.append((kind, png[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(chunks) -> bytes:
    """A PNG of ``(kind, data)`` chunks, every CRC right."""
    return PNG_SIGNATURE + b"".join(_chunk(k, d) for k, d in chunks)


def _ihdr(w, h, depth=8, ctype=0, interlace=0, compression=0, filtering=0) -> tuple[bytes, bytes]:
    return b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, compression, filtering, interlace)


def _raw(png: bytes) -> bytes:
    """The inflated IDAT data (filter bytes and scanlines) of ``png``."""
    return zlib.decompress(b"".join(d for k, d in _chunks(png) if k == b"IDAT"))


def _with_raw(png: bytes, raw: bytes, zdata: bytes | None = None) -> bytes:
    """``png`` with its image data replaced by ``raw`` (compressed) or by ``zdata`` as is."""
    zdata = zlib.compress(raw) if zdata is None else zdata
    out, done = [], False
    for k, d in _chunks(png):
        if k == b"IDAT":
            if not done:
                out.append((b"IDAT", zdata))
                done = True
        else:
            out.append((k, d))
    return _png(out)


def _pillow_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def _problem(data: bytes, limit=LIMIT) -> str | None:
    return image_problem("x.png", "png", data, limit)


def _adam7(arr: np.ndarray) -> bytes:
    """Raw (filter type 0) interlaced data of an 8-bit gray image, pass by pass."""
    out = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            out += b"".join(b"\0" + row.tobytes() for row in sub)
    return out


def _good_pngs() -> dict[str, bytes]:
    """Well-formed PNGs of every kind the check must accept (all decode in Pillow)."""
    pal = _noise("RGB").convert("P", palette=Image.ADAPTIVE, colors=16)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "forgeline test")
    gray16 = Image.fromarray(_RNG.integers(0, 65536, (23, 37), dtype=np.uint16))
    assert gray16.mode == "I;16"
    rgba16 = _RNG.integers(0, 65536, (5, 7, 4), dtype=np.uint16).astype(">u2")
    out = {
        "gray8": _encode(_noise("L")),
        "gray8_compress9": _encode(_noise("L"), compress_level=9),
        "gray16": _encode(gray16),
        "gray1": _encode(_noise("L").convert("1")),
        "gray_alpha": _encode(_noise("LA")),
        "rgb": _encode(_noise("RGB")),
        "rgba": _encode(_noise("RGBA")),
        "palette": _encode(pal),
        "palette_4bit": _encode(pal, bits=4),
        "with_text_and_dpi": _encode(_noise("L"), pnginfo=info, dpi=(72, 72)),
        "rgba16_by_hand": _png([_ihdr(7, 5, 16, 6), (b"IDAT", zlib.compress(
            b"".join(b"\0" + row.tobytes() for row in rgba16.reshape(5, -1)))), (b"IEND", b"")]),
        # image data split over several IDAT chunks
        "split_idat": _png([_ihdr(37, 23), *((b"IDAT", z[i:i + 100]) for z in [zlib.compress(_raw(_encode(_noise("L"))))]
                                             for i in range(0, len(z), 100)), (b"IEND", b"")]),
    }
    for w, h in ((13, 9), (3, 5), (1, 1)):  # Pillow cannot write interlaced PNGs: by hand (some passes empty)
        arr = _RNG.integers(0, 256, (h, w), dtype=np.uint8)
        out[f"interlaced_{w}x{h}"] = _png([_ihdr(w, h, interlace=1), (b"IDAT", zlib.compress(_adam7(arr))), (b"IEND", b"")])
        with Image.open(io.BytesIO(out[f"interlaced_{w}x{h}"])) as im:
            assert np.array_equal(np.asarray(im), arr)  # the hand-made file is what it should be
    return out


@pytest.fixture(scope="module")
def good_pngs():
    return _good_pngs()


def test_well_formed_pngs_of_every_kind_are_accepted_without_pillow(good_pngs):
    for name, data in good_pngs.items():
        assert _pillow_decodes(data), name
        assert png_problem(data, LIMIT) == (None, True), name
        assert _problem(data) is None, name


@pytest.fixture(scope="module")
def gray() -> bytes:
    return _encode(_noise("L"))


def _refused(data: bytes, pattern: str) -> str:
    problem = _problem(data)
    assert problem is not None and re.search(pattern, problem), problem
    assert problem.startswith("member 'x.png': ")
    return problem


def test_bad_crc_in_the_image_data_is_refused(gray):
    pos = gray.index(b"IDAT") + 4 + 50  # a byte of the compressed data, CRC left as it was
    bad = gray[:pos] + bytes([gray[pos] ^ 0x01]) + gray[pos + 1:]
    _refused(bad, r"not a decodable image \(PNG: bad CRC in chunk IDAT at byte 33")


def test_image_data_cut_short_with_consistent_crcs_is_refused(gray):
    z = zlib.compress(_raw(gray))
    _refused(_with_raw(gray, b"", zdata=z[: len(z) // 2]), r"image data cut: the zlib stream ends early")
    _refused(_with_raw(gray, b"", zdata=z[:-4]), r"the zlib stream ends early")  # only its adler-32 missing


def test_corrupt_zlib_stream_with_consistent_crcs_is_refused(gray):
    z = bytearray(zlib.compress(_raw(gray), 0))  # stored blocks: a flipped byte is a flipped pixel
    z[200] ^= 0xFF
    data = _with_raw(gray, b"", zdata=bytes(z))
    _refused(data, r"corrupt image data \(Error -6 Incorrect checksum found\)")  # adler-32 of the pixels
    z = bytearray(zlib.compress(_raw(gray)))
    z[2] |= 0b110  # the first deflate block's type: 3 is reserved
    _refused(_with_raw(gray, b"", zdata=bytes(z)), r"corrupt image data \(Error -1 Invalid deflate block found")


def test_png_check_refuses_exactly_what_zlib_refuses(gray):
    """The check inflates with ISA-L for speed; its verdict must stay zlib's. Image data streams
    with consistent CRCs, corrupted every way (a flipped bit, a random byte, a run of garbage, cut
    short, bytes appended): each is refused by the check exactly when zlib, inflating it the same
    bounded way, fails, ends early, inflates to another size or leaves bytes after the stream."""
    import random

    rng = random.Random(0)
    raw = _raw(gray)
    z = zlib.compress(raw)

    def zlib_verdict(zdata: bytes) -> bool:  # the check's steps, done by zlib
        d = zlib.decompressobj()
        try:
            out = d.decompress(zdata, len(raw) + 1)
        except zlib.error:
            return False
        return d.eof and len(out) == len(raw) and not d.unused_data and _problem(_with_raw(gray, out)) is None

    refused = 0
    for trial in range(2000):
        b = bytearray(z)
        p = rng.randrange(len(b))
        kind = trial % 5
        if kind == 0:
            b[p] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[p] = rng.randrange(256)
        elif kind == 2:
            b[p:p + 16] = bytes(rng.randrange(256) for _ in range(16))
        elif kind == 3:
            b = b[:p]
        else:
            b += bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 4)))
        ours = _problem(_with_raw(gray, b"", zdata=bytes(b))) is None
        assert ours == zlib_verdict(bytes(b)), (trial, kind, p)
        refused += not ours
    assert refused > 1500  # nearly all of them are refused (a few corruptions leave a valid stream)


def test_wrong_inflated_size_is_refused(gray):
    raw = _raw(gray)
    _refused(_with_raw(gray, raw[:-1]), r"inflates to \d+ bytes, a 37x23 image needs 874")
    _refused(_with_raw(gray, raw + b"\0" * 38), r"inflates to more than the 874 bytes")
    _refused(_with_raw(gray, b"", zdata=zlib.compress(raw) + b"\0"), r"1 bytes after the zlib stream")


def test_bad_filter_byte_is_refused(gray):
    raw = bytearray(_raw(gray))
    raw[3 * 38] = 5  # scanline 3 (38 bytes each: filter byte + 37 pixels)
    _refused(_with_raw(gray, bytes(raw)), r"scanline 3 has filter type 5 \(0..4 exist\)")
    assert not _pillow_decodes(_with_raw(gray, bytes(raw)))


def test_missing_iend_and_data_after_it_are_refused(gray):
    chunks = _chunks(gray)
    assert chunks[-1] == (b"IEND", b"")
    _refused(_png(chunks[:-1]), r"cut at byte \d+: no IEND chunk")
    _refused(gray + b"\0", r"1 bytes after the IEND chunk")
    _refused(gray + _chunk(b"tEXt", b"a\0b"), r"\d+ bytes after the IEND chunk")
    _refused(gray[:-3], r"cut at byte 939: no IEND chunk")
    _refused(gray[:-13], r"chunk IDAT at byte 33 needs 885 bytes, 884 left \(truncated\)")


def test_bomb_dimensions_are_refused_before_inflating(gray, monkeypatch):
    from pipeline import webdataset

    def no_inflate(*a, **kw):
        raise AssertionError("inflated a decompression bomb")

    monkeypatch.setattr(webdataset._zlib, "decompressobj", no_inflate)
    bomb = _png([_ihdr(100_000, 100_000), (b"IDAT", zlib.compress(bytes(10 << 20))), (b"IEND", b"")])
    _refused(bomb, r"100000x100000 image \(10000000000 pixels\) exceeds the 89478485-pixel limit \(decompression bomb\)")
    assert _problem(_png([_ihdr(50, 50), *_chunks(gray)[1:]]), limit=49 * 49).endswith(
        "50x50 image (2500 pixels) exceeds the 2401-pixel limit (decompression bomb)")


def test_header_rules(gray):
    rest = _chunks(gray)[1:]
    cases = {
        "size 0": ([_ihdr(0, 23), *rest], r"empty image 0x23"),
        "16-bit palette": ([_ihdr(37, 23, 16, 3), *rest], r"bit depth 16 with colour type 3 is not a PNG format"),
        "colour type 5": ([_ihdr(37, 23, 8, 5), *rest], r"bit depth 8 with colour type 5"),
        "compression 1": ([_ihdr(37, 23, compression=1), *rest], r"unknown compression/filter/interlace method 1/0/0"),
        "filter 1": ([_ihdr(37, 23, filtering=1), *rest], r"method 0/1/0"),
        "interlace 2": ([_ihdr(37, 23, interlace=2), *rest], r"method 0/0/2"),
        "short IHDR": ([(b"IHDR", _ihdr(37, 23)[1][:12]), *rest], r"first chunk is IHDR \(12 bytes\), not a 13-byte IHDR"),
        "IHDR not first": ([(b"tEXt", b"a\0b"), _ihdr(37, 23), *rest], r"first chunk is tEXt"),
        "two IHDR": ([_ihdr(37, 23), _ihdr(37, 23), *rest], r"a second IHDR chunk"),
        # interlaced data must be the 7 passes' rows: plain rows inflate to the wrong size
        "interlace flag on plain rows": ([_ihdr(37, 23, interlace=1), *rest], r"a 37x23 image needs \d+"),
    }
    for name, (chunks, pattern) in cases.items():
        _refused(_png(chunks), pattern)


def test_chunk_rules(gray):
    ihdr, idat, iend = _chunks(gray)
    assert (ihdr[0], idat[0], iend[0]) == (b"IHDR", b"IDAT", b"IEND")
    half = len(idat[1]) // 2
    cases = {
        "bad chunk type": ([ihdr, (b"tE1t", b""), idat, iend], r"invalid chunk type b'tE1t'"),
        "unknown critical chunk": ([ihdr, (b"ABCD", b""), idat, iend], r"unknown critical chunk ABCD"),
        "no IDAT": ([ihdr, iend], r"no IDAT chunk"),
        "IDAT not consecutive": ([ihdr, (b"IDAT", idat[1][:half]), (b"tEXt", b"a\0b"), (b"IDAT", idat[1][half:]), iend],
                                 r"IDAT chunks not consecutive"),
        "PLTE in gray": ([ihdr, (b"PLTE", bytes(6)), idat, iend], r"invalid PLTE chunk \(6 bytes\) for colour type 0"),
        # ancillary chunks Pillow parses, too short for its parser (it raises): refused here too
        "short pHYs": ([ihdr, (b"pHYs", bytes(8)), idat, iend], r"truncated pHYs chunk \(8 bytes\)"),
        "short gAMA after the data": ([ihdr, idat, (b"gAMA", bytes(3)), iend], r"truncated gAMA chunk"),
        "short tRNS": ([ihdr, (b"tRNS", bytes(1)), idat, iend], r"truncated tRNS chunk"),
    }
    for name, (chunks, pattern) in cases.items():
        _refused(_png(chunks), pattern)
    for chunks in ([ihdr, (b"pHYs", bytes(9)), idat, iend], [ihdr, idat, (b"tEXt", b"k\0v"), iend]):
        assert _problem(_png(chunks)) is None  # the same chunks, well-formed


def test_palette_rules():
    pal = _encode(_noise("RGB").convert("P", palette=Image.ADAPTIVE, colors=16), bits=4)
    chunks = _chunks(pal)
    assert [k for k, _ in chunks][:2] == [b"IHDR", b"PLTE"] and chunks[0][1][8:10] == b"\x04\x03"
    plte = chunks[1][1]
    _refused(_png([c for c in chunks if c[0] != b"PLTE"]), r"palette image without a PLTE chunk before its data")
    _refused(_png([chunks[0], (b"PLTE", plte[:-1]), *chunks[2:]]), r"invalid PLTE chunk \(47 bytes\)")
    _refused(_png([chunks[0], (b"PLTE", plte * 2), *chunks[2:]]), r"invalid PLTE chunk \(96 bytes\)")  # 32 > 2^4
    _refused(_png([chunks[0], chunks[1], chunks[1], *chunks[2:]]), r"repeated or after the image data")


def test_chunks_the_check_does_not_parse_go_through_pillow_too(gray):
    ihdr, idat, iend = _chunks(gray)
    icc = b"name\0\0" + zlib.compress(b"not really a profile")
    ok = _png([ihdr, (b"iCCP", icc), idat, iend])
    assert png_problem(ok, LIMIT) == (None, False) and _problem(ok) is None
    bad = _png([ihdr, (b"iCCP", b"name\0\1" + icc[6:]), idat, iend])  # compression method 1: Pillow refuses
    assert png_problem(bad, LIMIT) == (None, False)
    assert not _pillow_decodes(bad)
    _refused(bad, r"not a decodable image \(")
    private = _png([ihdr, (b"prVt", b"\1\2"), idat, iend])
    assert png_problem(private, LIMIT) == (None, False) and _problem(private) is None


def _mutants(data: bytes, rng, n: int):
    """``n`` variants of ``data``: byte flips (CRCs left, or made right again), cuts, inserted bytes."""
    chunk_spans = []
    pos = 8
    while pos < len(data):
        length = struct.unpack_from(">I", data, pos)[0]
        chunk_spans.append((pos, pos + 12 + length))
        pos += 12 + length
    for i in range(n):
        b = bytearray(data)
        kind = i % 4
        if kind == 3:
            yield bytes(b[: int(rng.integers(0, len(b)))])
            continue
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(8, len(b)))
            if kind == 2:
                b[at:at] = bytes([int(rng.integers(0, 256))])
            else:
                b[at] ^= 1 << int(rng.integers(0, 8)) if rng.random() < 0.7 else int(rng.integers(1, 256))
        if kind == 1:  # make every CRC right again: the flip has to be caught by the rules behind it
            for start, end in chunk_spans:
                if end <= len(b):
                    b[end - 4:end] = struct.pack(">I", zlib.crc32(bytes(b[start + 4:end - 4])))
        yield bytes(b)


def test_fuzz_never_accepts_what_pillow_cannot_decode():
    """Thousands of flipped, cut and garbled variants of a few real PNGs: each one the check accepts,
    Pillow decodes in full (and the check never raises)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("k", "v" * 20)
    seeds = [_encode(_noise("L", (24, 16))), _encode(_noise("RGBA", (9, 7)), pnginfo=info, dpi=(96, 96)),
             _encode(_noise("RGB", (8, 8)).convert("P", palette=Image.ADAPTIVE, colors=8), bits=4),
             _png([_ihdr(11, 6, interlace=1), (b"IDAT", zlib.compress(_adam7(_RNG.integers(0, 256, (6, 11), np.uint8)))),
                   (b"IEND", b"")])]
    rng = np.random.default_rng(17)
    accepted = refused = 0
    for seed in seeds:
        for data in _mutants(seed, rng, 750):
            if data == seed:
                continue
            if _problem(data) is None:
                accepted += 1
                assert _pillow_decodes(data), data
            else:
                refused += 1
    assert refused > 2500 and accepted > 0  # some flips land in ancillary data or pixel values and stay valid
