"""WebDataset conventions, in one place: how shard members are named and grouped into samples,
which image extensions a sample may carry, how a label is written and parsed.

``pipeline.datagen`` writes shards with these rules, ``pipeline.ingest`` validates landed shards
against them, ``pipeline.preprocess`` indexes shards for DALI by them and ``pipeline.drift`` reads
published shards by them, so what ingestion publishes is what the loader and the drift checks read.
The choices (first-dot keys, the image formats, hidden members) are explained in docs/ingestion.md.
"""

from __future__ import annotations

import io
import tarfile
from typing import BinaryIO, Iterable, Iterator, Sequence, TypeVar

# Exactly the formats the preprocess path decodes: DALI's fn.decoders.image (CPU and "mixed"
# devices) and Pillow (its error diagnosis, the drift features) both read every one of these.
IMAGE_EXTS = ("bmp", "j2k", "jp2", "jpeg", "jpg", "pbm", "pgm", "png", "pnm", "ppm", "tif", "tiff", "webp")
# The format Pillow must find in an image member's bytes for its extension (``Image.format``): a
# ``.png`` that holds a JPEG is refused, so an image is what its name says to every reader.
IMAGE_FORMATS = {
    "bmp": ("BMP",),
    "j2k": ("JPEG2000",),
    "jp2": ("JPEG2000",),
    "jpeg": ("JPEG", "MPO"),  # MPO: a JPEG with extra pictures (phone cameras); decoders read the first
    "jpg": ("JPEG", "MPO"),
    "pbm": ("PPM",),  # Pillow names every Netpbm variant PPM
    "pgm": ("PPM",),
    "png": ("PNG",),
    "pnm": ("PPM",),
    "ppm": ("PPM",),
    "tif": ("TIFF",),
    "tiff": ("TIFF",),
    "webp": ("WEBP",),
}
LABEL_EXT = "cls"  # ASCII decimal class index, e.g. b"7\n"
MAX_LABEL_DIGITS = 18  # fits int64
_LABEL_PAD = b" \t\r\n\0"  # around a label: whitespace, and the NUL padding of DALI's label batches

T = TypeVar("T")


class WebDatasetError(ValueError):
    """A shard breaks the conventions; the message names the member or the sample."""


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of the tar member ``name``, WebDataset's rule: the key is the path up to
    the first dot of the basename, the extension everything after it, lower-cased
    (``"d/0001.seg.png"`` → ``("d/0001", "seg.png")``). None for a hidden member (basename starting
    with a dot, e.g. macOS ``._*`` files): it belongs to no sample and every reader skips it.
    Raises :class:`WebDatasetError` for a name without ``<key>.<ext>`` or with whitespace (the DALI
    index format is space-separated)."""
    parent, _, base = name.rpartition("/")
    if base.startswith("."):
        return None
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        raise WebDatasetError(f"member {name!r}: no '<key>.<ext>' name")
    if any(c.isspace() for c in name):
        raise WebDatasetError(f"member {name!r}: whitespace in the name (unsupported by the DALI index)")
    return (f"{parent}/{stem}" if parent else stem), ext.lower()


def member_name(key: str, ext: str) -> str:
    """The member name of field ``ext`` of sample ``key``; raises :class:`WebDatasetError` if it would
    not split back into ``(key, ext)`` (a dot in the key's basename, an upper-case extension)."""
    name = f"{key}.{ext}"
    if split_key(name) != (key, ext):
        raise WebDatasetError(f"member {name!r} would not read back as key {key!r}, extension {ext!r}")
    return name


def format_label(label: int | str) -> bytes:
    """The payload of a ``.cls`` member."""
    return f"{label}\n".encode("ascii")


def parse_label(raw: bytes) -> int | None:
    """The class index in a ``.cls`` payload (ASCII digits, surrounding whitespace or NUL padding
    allowed), or None when it is not a non-negative integer of at most ``MAX_LABEL_DIGITS`` digits."""
    text = raw.strip(_LABEL_PAD)
    if not text or len(text) > MAX_LABEL_DIGITS or not text.isdigit():
        return None
    return int(text)


def image_ext(exts: Iterable[str]) -> str | None:
    """The extension of a sample's image field (the first of ``exts`` in ``IMAGE_EXTS``), or None."""
    return next((e for e in exts if e in IMAGE_EXTS), None)


def sample_problem(exts: Iterable[str]) -> str | None:
    """Why a sample with fields ``exts`` is not a training sample (it needs exactly one image in
    ``IMAGE_EXTS`` and one ``.cls`` label; other fields are carried), or None."""
    exts = list(exts)
    images = [e for e in exts if e in IMAGE_EXTS]
    if not images:
        return f"no image member (one of .{', .'.join(IMAGE_EXTS)})"
    if len(images) > 1:
        return f"{len(images)} image members (.{', .'.join(images)})"
    if LABEL_EXT not in exts:
        return f"no .{LABEL_EXT} label"
    return None


def group_samples(members: Iterable[tuple[str, T]]) -> Iterator[tuple[str, dict[str, T]]]:
    """Group ``(member name, payload)`` pairs, in archive order, into ``(key, {ext: payload})``
    samples. A sample's members are contiguous; hidden members are skipped. Raises
    :class:`WebDatasetError` for a key seen again after another one or a field seen twice."""
    seen: set[str] = set()
    key: str | None = None
    fields: dict[str, T] = {}
    for name, payload in members:
        split = split_key(name)
        if split is None:
            continue
        k, ext = split
        if k != key:
            if key is not None:
                yield key, fields
            if k in seen:
                raise WebDatasetError(f"sample {k!r}: members are not contiguous (key seen twice)")
            seen.add(k)
            key, fields = k, {}
        if ext in fields:
            raise WebDatasetError(f"member {name!r}: duplicate field .{ext} for sample {k!r}")
        fields[ext] = payload
    if key is not None:
        yield key, fields


def image_problem(name: str, ext: str, data: bytes, limit: int | None) -> str | None:
    """Why the image member ``name`` (field ``ext``, payload ``data``) is not one a reader decodes,
    or None. The image is decoded fully, as training will: a header that parses is not enough (a
    truncated or garbled body fails only at decode time). Refused: no data, an unknown format, a
    format other than the extension's (:data:`IMAGE_FORMATS`), more than ``limit`` pixels (a
    decompression bomb: refused from the header, before any pixel is allocated; None: no limit),
    and whatever the decoder raises. Pillow is imported here, so a process that only groups samples
    never loads it."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return f"member {name!r}: empty image (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if limit and w * h > limit:  # Pillow only warns between 1x and 2x its limit: an error here
                return (f"member {name!r}: {w}x{h} image ({w * h} pixels) exceeds the {limit}-pixel limit "
                        "(decompression bomb)")
            if im.format not in IMAGE_FORMATS[ext]:
                return (f"member {name!r}: holds a {im.format} image, not {' or '.join(IMAGE_FORMATS[ext])} "
                        f"as .{ext} says")
            im.load()  # the full decode: every pixel, as the loader will
    except Image.DecompressionBombError as e:  # over 2x the limit: Pillow refuses in open()
        return f"member {name!r}: decompression bomb ({e})"
    except UnidentifiedImageError:  # its message only names the BytesIO
        return (f"member {name!r}: not a decodable image (no image format recognises its "
                f"{len(data)} bytes, starting {data[:8]!r})")
    except Exception as e:  # noqa: BLE001 — any decoder failure (OSError, SyntaxError, ValueError,
        # struct.error, EOFError, IndexError, ...) means training cannot read it
        return f"member {name!r}: not a decodable image ({type(e).__name__}: {e})"
    if w <= 0 or h <= 0:
        return f"member {name!r}: empty image {w}x{h}"
    return None


def check_images(images: Sequence[tuple[str, str, bytes]], limit: int | None) -> tuple[int, str] | None:
    """``(index, problem)`` of the first of ``images`` (``(name, ext, data)`` each) that
    :func:`image_problem` refuses, or None when all decode. Pillow's own bomb limit
    (``Image.MAX_IMAGE_PIXELS``) is set to ``limit`` first: this is what a worker process of
    :func:`pipeline.ingest.ingest_shards` runs, and the limit is the one the calling process has."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS != limit:
        Image.MAX_IMAGE_PIXELS = limit
    for i, (name, ext, data) in enumerate(images):
        problem = image_problem(name, ext, data, limit)
        if problem:
            return i, problem
    return None


def serve_image_checks() -> None:
    """The loop of an image-decoding worker process (:class:`pipeline.ingest` starts them): reads
    length-prefixed pickles ``(images, limit)`` from stdin, answers each with a length-prefixed
    pickle ``(True, check_images(images, limit))`` (or ``(False, repr(error))``) on stdout, and
    exits at end of input (its parent closed the pipe or died)."""
    import pickle
    import struct
    import sys

    import PIL.Image  # noqa: F401 — started before the first batch, not during it

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the answer pipe
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        payload = inp.read(n)
        if len(payload) < n:
            return
        try:
            answer = (True, check_images(*pickle.loads(payload)))
        except Exception as e:  # noqa: BLE001 — reported to the parent, which fails the shard
            answer = (False, f"{type(e).__name__}: {e}")
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(struct.pack("<Q", len(data)) + data)
        out.flush()


def read_samples(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a tar read sequentially from ``stream``: ``(key, {ext: bytes})`` in stored
    order (regular members only). Raises :class:`WebDatasetError` as :func:`group_samples`."""

    def members() -> Iterator[tuple[str, bytes]]:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                if m.isfile():
                    yield m.name, tar.extractfile(m).read()  # type: ignore[union-attr]

    return group_samples(members())


__all__ = [
    "IMAGE_EXTS",
    "IMAGE_FORMATS",
    "LABEL_EXT",
    "MAX_LABEL_DIGITS",
    "WebDatasetError",
    "check_images",
    "format_label",
    "group_samples",
    "image_ext",
    "image_problem",
    "member_name",
    "parse_label",
    "read_samples",
    "sample_problem",
    "serve_image_checks",
    "split_key",
]
