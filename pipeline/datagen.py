"""Data that needs no download: scikit-learn's bundled digits (1,797 real 8x8 handwritten digits)
written as WebDataset shards and as a Parquet table, a "shifted" variant for drift tests, and larger
synthetic volumes for benchmarks.

Layout written for one batch under ``prefix`` (normally ``incoming/<batch>``)::

    <prefix>/shards/{train,val,test}-NNNNNN.tar    NNNNNN.png (or another image format) + NNNNNN.cls
    <prefix>/table.parquet                         id, px_00..px_63 (0..16), label, split
    <prefix>/_READY                                written last: the batch is complete

Shard members are named and labels written by the conventions of :mod:`pipeline.webdataset`.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline.storage import LocalStorage, ObjectInfo, Storage, join
from pipeline.webdataset import IMAGE_EXTS, LABEL_EXT, format_label, member_name

NUM_CLASSES = 10
PIXEL_MAX = 16  # digits pixels are integers 0..16
SPLITS = ("train", "val", "test")
READY_MARKER = "_READY"
# Pillow's encoder per image extension (every one of IMAGE_EXTS) and its options
_PIL_FORMATS = {
    "bmp": ("BMP", {}),
    "j2k": ("JPEG2000", {"no_jp2": True}),
    "jp2": ("JPEG2000", {}),
    "jpeg": ("JPEG", {"quality": 90}),
    "jpg": ("JPEG", {"quality": 90}),
    "pbm": ("PPM", {}),  # Netpbm: Pillow writes the variant the image mode needs (P5 for gray)
    "pgm": ("PPM", {}),
    "png": ("PNG", {"compress_level": 1}),
    "pnm": ("PPM", {}),
    "ppm": ("PPM", {}),
    "tif": ("TIFF", {}),
    "tiff": ("TIFF", {}),
    "webp": ("WEBP", {"lossless": True}),
}


@dataclass(frozen=True)
class Digits:
    """Images (N, 8, 8) uint8 in 0..16, labels (N,) int64, splits (N,) str, ids (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Digits:
    """The digits data with a deterministic, stratified train/val/test split."""
    from sklearn.datasets import load_digits as _sk_load

    d = _sk_load()
    images = d.images.astype(np.uint8)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    splits = np.empty(len(labels), dtype=object)
    for c in range(NUM_CLASSES):  # stratify so every split sees every class
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        splits[idx[:n_test]] = "test"
        splits[idx[n_test : n_test + n_val]] = "val"
        splits[idx[n_test + n_val :]] = "train"
    return Digits(images, labels, splits.astype(str), np.arange(len(labels), dtype=np.int64))


def shift(
    data: Digits,
    *,
    brightness: float = 3.0,
    rotation_deg: float = 15.0,
    noise_std: float = 1.5,
    seed: int = 1,
    id_offset: int = 100_000,
) -> Digits:
    """A drifted copy: brighter, rotated by up to ``rotation_deg`` and noisier (same labels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty_like(data.images)
    angles = rng.uniform(-rotation_deg, rotation_deg, len(data))
    for i, img in enumerate(data.images):
        rot = Image.fromarray(img.astype(np.float32), mode="F").rotate(angles[i], Image.BILINEAR)
        x = np.asarray(rot) + brightness + rng.normal(0.0, noise_std, img.shape)
        out[i] = np.clip(np.rint(x), 0, PIXEL_MAX).astype(np.uint8)
    return Digits(out, data.labels.copy(), data.splits.copy(), data.ids + id_offset)


def encode_image(img: np.ndarray, image_size: int | None = None, fmt: str = "png") -> bytes:
    """8-bit grayscale image of a 0..16 digit in format ``fmt`` (one of ``IMAGE_EXTS``), optionally
    upscaled (real decode work downstream)."""
    from PIL import Image

    if fmt not in _PIL_FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}: use one of {', '.join(IMAGE_EXTS)}")
    im = Image.fromarray((img.astype(np.float32) * (255.0 / PIXEL_MAX)).round().astype(np.uint8), mode="L")
    if image_size and image_size != im.width:
        im = im.resize((image_size, image_size), Image.BICUBIC)
    buf = io.BytesIO()
    pil_format, options = _PIL_FORMATS[fmt]
    im.save(buf, format=pil_format, **options)
    return buf.getvalue()


def write_tar(store: Storage, key: str, samples: Iterable[tuple[str, str, bytes, int]]) -> ObjectInfo:
    """Write one WebDataset shard from ``(key, image_ext, image_bytes, label)`` tuples, atomically.
    Stream mode ("w|") writes sequentially into the atomic writer: nothing is held in memory."""
    now = int(time.time())
    with store.open_write(key) as w:
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, ext, image, label in samples:
                for name, payload in ((member_name(key, ext), image), (member_name(key, LABEL_EXT), format_label(label))):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(payload), now, 0o644
                    tar.addfile(info, io.BytesIO(payload))
    assert w.info is not None
    return w.info


def write_shards(
    store: Storage,
    prefix: str,
    data: Digits,
    *,
    samples_per_shard: int = 256,
    image_size: int | None = None,
    fmt: str = "png",
) -> list[ObjectInfo]:
    """Write ``data`` as WebDataset shards ``<prefix>/<split>-NNNNNN.tar``, one split per shard."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    written = []
    for split in SPLITS:
        idx = np.flatnonzero(data.splits == split)
        for shard_no, start in enumerate(range(0, len(idx), samples_per_shard)):
            samples = (
                (f"{data.ids[i]:06d}", fmt, encode_image(data.images[i], image_size, fmt), int(data.labels[i]))
                for i in idx[start : start + samples_per_shard]
            )
            written.append(write_tar(store, join(prefix, f"{split}-{shard_no:06d}.tar"), samples))
    return written


def table_frame(data: Digits):
    """The Parquet layout of ``data`` as a polars DataFrame."""
    import polars as pl

    flat = data.images.reshape(len(data), -1)
    cols = {"id": pl.Series("id", data.ids, dtype=pl.Int64)}
    for j in range(flat.shape[1]):
        cols[f"px_{j:02d}"] = pl.Series(f"px_{j:02d}", flat[:, j], dtype=pl.UInt8)
    cols["label"] = pl.Series("label", data.labels, dtype=pl.Int64)
    cols["split"] = pl.Series("split", data.splits, dtype=pl.String)
    return pl.DataFrame(cols)


def write_table(store: Storage, key: str, data: Digits) -> ObjectInfo:
    buf = io.BytesIO()
    table_frame(data).write_parquet(buf, compression="zstd", statistics=True)
    return store.write_atomic(key, buf.getvalue())


def write_batch(
    store: Storage,
    prefix: str,
    data: Digits,
    *,
    samples_per_shard: int = 256,
    image_size: int | None = None,
    fmt: str = "png",
) -> dict:
    """Write one complete landing batch (shards + table) and mark it ready last (see :func:`landing`)."""
    with landing(store, prefix):
        shards = write_shards(
            store, join(prefix, "shards"), data, samples_per_shard=samples_per_shard, image_size=image_size, fmt=fmt
        )
        table = write_table(store, join(prefix, "table.parquet"), data)
    return _mark_ready(store, prefix, shards, table, len(data))


def write_synthetic_batch(store: Storage, prefix: str, total_bytes: int, *, image_size: int = 224,
                          samples_per_shard: int = 512, seed: int = 0,
                          progress: Callable[[int], None] | None = None) -> dict:
    """A landing batch of benchmark volume (:func:`write_synthetic_shards`) with its table (each
    sample's source digit and label), so it ingests as any batch does; marked ready last."""
    with landing(store, prefix):
        drawn: list[int] = []
        shards = write_synthetic_shards(store, join(prefix, "shards"), total_bytes, image_size=image_size,
                                        samples_per_shard=samples_per_shard, seed=seed, progress=progress, drawn=drawn)
        digits, rows = load_digits(), np.asarray(drawn, dtype=np.int64)
        samples = Digits(digits.images[rows], digits.labels[rows], np.full(len(rows), "train"),
                         np.arange(len(rows), dtype=np.int64))  # ids as the shards name them
        table = write_table(store, join(prefix, "table.parquet"), samples)
    return _mark_ready(store, prefix, shards, table, len(drawn), synthetic=True)


def _mark_ready(store: Storage, prefix: str, shards: list[ObjectInfo], table: ObjectInfo, samples: int,
                **extra) -> dict:
    summary = {"samples": samples, "shards": [s.key for s in shards], "table": table.key,
               "bytes": sum(s.size for s in shards) + table.size, **extra}
    store.write_atomic(join(prefix, READY_MARKER), json.dumps(summary, indent=1).encode())
    return summary


@contextlib.contextmanager
def landing(store: Storage, prefix: str) -> Iterator[None]:
    """The writing of a landing batch under ``prefix``; the caller marks it ready after the block.
    The batch is written whole: what was there goes first, the ready marker before anything else
    (so no sensor ingests old and new files mixed), whether an earlier batch being rewritten or
    what a killed writer left (unready; a smaller rewrite kept its extra shards). A write that
    fails (a full disk, an interrupt) removes what it wrote: a landing folder is either whole and
    ready or absent, never half there, and a full disk gets its space back."""
    marker = join(prefix, READY_MARKER)
    if store.exists(marker):
        store.delete(marker)
    _clear(store, prefix)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            _clear(store, prefix)
        raise


def _clear(store: Storage, prefix: str) -> None:
    """Every object under ``prefix``, and in a local store the temporaries of writers that died."""
    store.delete_prefix(prefix)
    if isinstance(store, LocalStorage):
        for tmp in store.stale_temporaries(prefix):
            tmp.unlink(missing_ok=True)


def write_synthetic_shards(
    store: Storage,
    prefix: str,
    total_bytes: int,
    *,
    image_size: int = 224,
    samples_per_shard: int = 512,
    seed: int = 0,
    pool_size: int = 512,
    progress: Callable[[int], None] | None = None,
    drawn: list[int] | None = None,
) -> list[ObjectInfo]:
    """Benchmark volume: upscaled digits plus per-pixel noise (so PNG cannot compress them away)
    until ``total_bytes`` of shards exist. Images are drawn from a pool of ``pool_size`` distinct
    encodings so generating GBs runs at disk speed. ``progress(bytes_so_far)`` after each shard;
    ``drawn`` gets the index in :func:`load_digits` of each sample's digit, in sample order."""
    from PIL import Image

    base = load_digits()
    rng = np.random.default_rng(seed)
    pool, source = [], []
    for _ in range(pool_size):
        i = int(rng.integers(0, len(base)))
        source.append(i)
        up = Image.open(io.BytesIO(encode_image(base.images[i], image_size)))
        arr = np.asarray(up, dtype=np.int16) + rng.integers(-8, 9, (image_size, image_size))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
        pool.append((buf.getvalue(), int(base.labels[i])))

    written: list[ObjectInfo] = []
    total = 0
    while total < total_bytes:
        first = len(written) * samples_per_shard
        picks = rng.integers(0, pool_size, samples_per_shard)
        samples = ((f"{first + k:08d}", "png", *pool[p]) for k, p in enumerate(picks))
        written.append(write_tar(store, join(prefix, f"train-{len(written):06d}.tar"), samples))
        total += written[-1].size
        if drawn is not None:
            drawn.extend(source[p] for p in picks)
        if progress:
            progress(total)
    return written
