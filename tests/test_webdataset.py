"""The WebDataset conventions (pipeline.webdataset) and the agreement they buy: what ingestion
publishes, the DALI loader indexes and decodes and the drift checks read, sample for sample; what
the loader cannot read, ingestion quarantines."""

from __future__ import annotations

import io
import tarfile

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
