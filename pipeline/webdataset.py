"""WebDataset conventions, in one place: how shard members are named and grouped into samples,
which image extensions a sample may carry, how a label is written and parsed.

``pipeline.datagen`` writes shards with these rules, ``pipeline.ingest`` validates landed shards
against them, ``pipeline.preprocess`` indexes shards for DALI by them and ``pipeline.drift`` reads
published shards by them, so what ingestion publishes is what the loader and the drift checks read.
The choices (first-dot keys, the image formats, hidden members) are explained in docs/ingestion.md.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
from typing import BinaryIO, Iterable, Iterator, Sequence, TypeVar

# ISA-L's CRC-32 and inflate: zlib's results (same CRCs; the same verdict as zlib on 60,000
# corrupted PNG data streams and every bit of their zlib header and adler-32, with the same
# bytes out when valid) at ~5x and ~1.9x zlib's speed here; inflating is most of ingestion's CPU
from isal import isal_zlib as _zlib

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
_SPACE = re.compile(r"\s")  # str.isspace's characters: the DALI index is space-separated


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
    if _SPACE.search(name):
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


# ---------------------------------------------------------------------------------------------
# PNG: checked by walking its chunks and inflating its pixel data (ISA-L), not by Pillow's decode
# ---------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHUNK = struct.Struct(">I4s")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # per colour type
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # PNG spec 11.2.2
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
# Ancillary chunks whose content Pillow parses, with the fewest bytes its parser accepts (it raises
# on shorter ones, even after the pixel data): refused here too, so what passes, Pillow loads.
_PNG_MIN_LENGTH = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}
# Ancillary chunks this checker vouches for: Pillow ignores them or parses them as checked here.
# Any other ancillary chunk (iCCP, zTXt, iTXt, APNG frames, private ones) sends the image through
# Pillow's full decode as well, after these checks.
_PNG_KNOWN = frozenset({b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tEXt", b"tIME", b"bKGD", b"sBIT",
                        b"hIST", b"sPLT", b"eXIf"})
PNG_TEXT_MAX = 1 << 20  # more tEXt than this goes through Pillow too (it caps text memory)
PNG_INFLATE_MAX = 64 << 20  # more pixel bytes than this are decoded by Pillow, not inflated here
_FILTER_TYPES = bytes(range(5))  # a scanline's filter byte: None, Sub, Up, Average, Paeth


def _png_rows(width: int, height: int, bits: int, interlaced: bool) -> list[tuple[int, int]]:
    """``(rows, bytes per row incl. its filter byte)`` of each (non-empty) pass of the inflated data."""
    if not interlaced:
        return [(height, 1 + (width * bits + 7) // 8)]
    out = []
    for x0, y0, dx, dy in _ADAM7:
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:  # an empty pass has no scanlines, not even filter bytes
            out.append((h, 1 + (w * bits + 7) // 8))
    return out


def png_problem(data, limit: int | None) -> tuple[str | None, bool]:
    """``(problem, complete)`` for PNG bytes ``data`` (they start with :data:`PNG_SIGNATURE`).

    ``problem`` (None: none found) says why it does not decode; ``complete`` is False when the image
    carries what this check does not parse (see :data:`_PNG_KNOWN`, :data:`PNG_INFLATE_MAX`), so
    passing it is not enough: the caller must also decode it with Pillow. Checked, in one pass and
    stricter than Pillow's decode (which skips the pixel data's CRCs and accepts a file without IEND
    or with bytes after it): every chunk complete, its type four ASCII letters and its CRC-32
    right; IHDR first, 13 bytes, with a
    size > 0 and within ``limit`` pixels (a decompression bomb is refused here, before anything is
    inflated; None: no limit), a valid bit depth for its colour type, compression and filter method
    0, interlace 0 or 1; a PLTE (1..2^depth entries) before the data of a palette image and none in a
    grayscale one; no unknown critical chunk; the IDAT chunks consecutive; an IEND with nothing
    after it; the IDAT data one zlib stream (adler-32 checked) that inflates to exactly the bytes the
    header implies (every Adam7 pass, for interlaced images), each scanline's filter type 0..4.
    Inflating is bounded (``max_length``): the data cannot allocate more than the image needs."""
    n = len(data)
    if data[:8] != PNG_SIGNATURE:
        return "not a decodable image (no PNG signature)", True
    view = memoryview(data)
    pos, header, palette, text, complete = 8, None, 0, 0, True
    idat: list = []
    idat_ended = False  # a chunk other than IDAT came after the IDATs

    def bad(what: str) -> tuple[str, bool]:
        return f"not a decodable image (PNG: {what})", True

    while True:
        if pos + 12 > n:
            return bad(f"cut at byte {n}: no IEND chunk")
        length, kind = _PNG_CHUNK.unpack_from(data, pos)
        end = pos + 12 + length
        if not kind.isalpha():  # bytes.isalpha: ASCII letters only
            return bad(f"invalid chunk type {kind!r} at byte {pos}")
        if length > 0x7FFFFFFF or end > n:
            left = max(0, n - pos - 12)
            return bad(f"chunk {kind.decode()} at byte {pos} needs {length} bytes, {left} left (truncated)")
        if _zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return bad(f"bad CRC in chunk {kind.decode()} at byte {pos} (corrupt)")
        if header is None:
            if kind != b"IHDR" or length != 13:
                return bad(f"first chunk is {kind.decode()} ({length} bytes), not a 13-byte IHDR")
            width, height, depth, ctype, compression, filtering, interlace = struct.unpack_from(
                ">IIBBBBB", data, pos + 8)
            if width == 0 or height == 0:
                return f"empty image {width}x{height}", True
            if width > 0x7FFFFFFF or height > 0x7FFFFFFF:
                return bad(f"{width}x{height} is larger than PNG allows")
            if limit and width * height > limit:
                return (f"{width}x{height} image ({width * height} pixels) exceeds the {limit}-pixel limit "
                        "(decompression bomb)"), True
            if depth not in _PNG_DEPTHS.get(ctype, ()):
                return bad(f"bit depth {depth} with colour type {ctype} is not a PNG format")
            if compression or filtering or interlace > 1:
                return bad(f"unknown compression/filter/interlace method {compression}/{filtering}/{interlace}")
            header = True
        elif kind == b"IDAT":
            if idat_ended:
                return bad(f"IDAT chunks not consecutive (another at byte {pos})")
            if ctype == 3 and not palette:
                return bad("palette image without a PLTE chunk before its data")
            idat.append(view[pos + 8:end - 4])
        elif kind == b"IEND":
            if end != n:
                return bad(f"{n - end} bytes after the IEND chunk")
            break
        else:
            idat_ended = bool(idat)
            if kind == b"IHDR":
                return bad(f"a second IHDR chunk at byte {pos}")
            if kind == b"PLTE":
                entries, most = length // 3, 1 << depth if ctype == 3 else 256
                if palette or idat or ctype in (0, 4) or length % 3 or not 0 < entries <= most:
                    return bad(f"invalid PLTE chunk ({length} bytes) for colour type {ctype}, bit depth {depth}"
                               + (", repeated or after the image data" if palette or idat else ""))
                palette = entries
            elif not kind[0] & 0x20:  # upper-case first letter: critical, decoders must refuse it
                return bad(f"unknown critical chunk {kind.decode()}")
            elif length < _PNG_MIN_LENGTH.get(kind, 0) or (
                    kind == b"tRNS" and ctype in (0, 2) and length < (2 if ctype == 0 else 6)):
                return bad(f"truncated {kind.decode()} chunk ({length} bytes)")
            elif kind == b"tEXt":
                text += length
            elif kind not in _PNG_KNOWN:
                complete = False
        pos = end
    if not idat:
        return bad("no IDAT chunk (no image data)")
    bits = depth * _PNG_CHANNELS[ctype]
    passes = _png_rows(width, height, bits, bool(interlace))
    expected = sum(rows * stride for rows, stride in passes)
    if expected > PNG_INFLATE_MAX or text > PNG_TEXT_MAX:
        return None, False
    z = _zlib.decompressobj()
    try:
        raw = z.decompress(idat[0] if len(idat) == 1 else b"".join(idat), expected + 1)
    except _zlib.error as e:
        return bad(f"corrupt image data ({e})")
    if len(raw) > expected:
        return bad(f"image data inflates to more than the {expected} bytes of a {width}x{height} image")
    if not z.eof:
        return bad(f"image data cut: the zlib stream ends early, after {len(raw)} of {expected} bytes")
    if len(raw) < expected:
        return bad(f"image data inflates to {len(raw)} bytes, a {width}x{height} image needs {expected}")
    if z.unused_data:
        return bad(f"{len(z.unused_data)} bytes after the zlib stream of the image data")
    start = 0
    for rows, stride in passes:
        filters = raw[start:start + rows * stride:stride]
        if filters.translate(None, _FILTER_TYPES):
            row = next(i for i, f in enumerate(filters) if f > 4)
            return bad(f"scanline {row}{' of an interlace pass' if len(passes) > 1 else ''} has filter type "
                       f"{filters[row]} (0..4 exist)")
        start += rows * stride
    return None, complete


def image_problem(name: str, ext: str, data: bytes, limit: int | None) -> str | None:
    """Why the image member ``name`` (field ``ext``, payload ``data``) is not one a reader decodes,
    or None. The whole image is checked, as training will decode it: a header that parses is not
    enough (a truncated or garbled body must fail here). A PNG is checked by :func:`png_problem`
    (every chunk's CRC, the inflated pixel data's exact size and filter bytes: stricter than Pillow's
    decode, about half its CPU), and also decoded by Pillow only when it carries chunks that check does
    not parse; every other format is decoded fully by Pillow. Refused: no data, an unknown format, a
    format other than the extension's (:data:`IMAGE_FORMATS`), more than ``limit`` pixels (a
    decompression bomb: refused from the header, before any pixel is allocated; None: no limit),
    and whatever the checks or the decoder find. Pillow is imported only when needed, so a process
    that only groups samples never loads it."""
    if not data:
        return f"member {name!r}: empty image (0 bytes)"
    if ext == "png" and data[:8] == PNG_SIGNATURE:
        problem, complete = png_problem(data, limit)
        if problem:
            return f"member {name!r}: {problem}"
        if complete:
            return None
    return _pillow_problem(name, ext, data, limit)


def _pillow_problem(name: str, ext: str, data: bytes, limit: int | None) -> str | None:
    """:func:`image_problem` by Pillow: open, check size and format, decode every pixel."""
    from PIL import Image, UnidentifiedImageError

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
    "PNG_SIGNATURE",
    "WebDatasetError",
    "check_images",
    "format_label",
    "group_samples",
    "image_ext",
    "image_problem",
    "member_name",
    "parse_label",
    "png_problem",
    "read_samples",
    "sample_problem",
    "serve_image_checks",
    "split_key",
]
