"""Read planning (pure, no I/O): which byte ranges to request, and where each request's bytes go.

:func:`plan_reads` merges adjacent tensors into requests of at most ``chunk_bytes`` and splits
large ones; :func:`shard_layout` decides the destination memory of a shard (a buffer per tensor,
or one buffer per shard on a device); :func:`plan_parts` combines both into the :class:`Part` list
the staged pipeline executes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.loading.header import TensorInfo

MiB = 1 << 20
DEVICE_ALIGN = 256  # alignment of tensors in a packed device layout (cudaMalloc gives 256+)
_MAX_PIECES = 500  # tensors per read request: preadv takes at most IOV_MAX (1024) buffers

Piece = tuple[str, int, int, int]  # (tensor name, offset in the read, offset in the tensor, bytes)
Read = tuple[int, int, list[Piece]]  # (file offset, length, pieces)
Copy = tuple[int, int, int, int]  # (destination buffer, offset in it, offset in the read, bytes)
Layout = tuple[str, dict[str, tuple[int, int]], list[int], int]  # see shard_layout


def plan_reads(
    entries: Sequence[Any],
    chunk_bytes: int,
    *,
    max_gap: int = 1 * MiB,
    max_pieces: int = _MAX_PIECES,
    cover: tuple[int, int] | None = None,
    whole_from: int | None = None,
) -> list[Read]:
    """Plan the read requests for ``entries`` (objects with ``name``/``start``/``end`` or
    ``(name, start, end)`` tuples, absolute offsets, non-overlapping).

    Tensors separated by at most ``max_gap`` bytes are read in one request (the gap bytes come
    along); requests are at most ``chunk_bytes`` long, so large tensors are split over several and
    small ones share one; a request never carries more than ``max_pieces`` pieces. Each request is
    ``(offset, length, [(tensor, src_off, dst_off, n)])``: ``n`` bytes at ``src_off`` in the request
    belong at ``dst_off`` in the tensor. ``cover=(lo, hi)`` instead reads every byte of
    ``[lo, hi)`` (gaps and header included, e.g. to hash the file on the way). ``whole_from``:
    a tensor of at least that many bytes shares no request with another tensor, so each of its
    requests can land straight in its memory (a network read has no scatter list).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    items = []
    for e in entries:
        name, start, end = (e.name, e.start, e.end) if hasattr(e, "start") else e
        if end > start:
            items.append((start, end, name))
    items.sort()
    segs = _segments(items, max_gap, cover)
    reads: list[Read] = []
    cur_off = cur_len = 0
    pieces: list[Piece] = []
    active = False

    def flush() -> None:
        nonlocal active, pieces
        if active and cur_len > 0 and (pieces or cover is not None):
            reads.append((cur_off, cur_len, pieces))
        active, pieces = False, []

    for seg in segs:
        if seg is None:
            flush()
            continue
        pos, n, name, tstart = seg
        alone = whole_from is not None and name is not None and n >= whole_from and cover is None
        if name is None and not active and cover is None:
            continue  # never start a request with gap bytes
        if name is not None and (len(pieces) >= max_pieces or alone):
            flush()
        while n > 0:
            if not active:
                cur_off, cur_len, active = pos, 0, True
            room = chunk_bytes - cur_len
            if room <= 0:
                flush()
                if name is None and cover is None:
                    break
                continue
            take = min(room, n)
            if name is not None:
                pieces.append((name, cur_len, pos - tstart, take))
            cur_len += take
            pos += take
            n -= take
        if alone:
            flush()
    flush()
    return reads


def _segments(items: list[tuple[int, int, str]], max_gap: int,
              cover: tuple[int, int] | None) -> list[tuple[int, int, str | None, int] | None]:
    """The byte stream to read, as segments ``(pos, n, name or None for gap bytes, tensor start)``;
    None separates runs that are not read together."""
    segs: list[tuple[int, int, str | None, int] | None] = []
    if cover is not None:
        pos = cover[0]
        for start, end, name in items:
            if start < pos or end > cover[1]:
                raise ValueError(f"tensor {name!r} [{start}, {end}) is outside cover {cover} or overlaps")
            if start > pos:
                segs.append((pos, start - pos, None, 0))
            segs.append((start, end - start, name, start))
            pos = end
        if cover[1] > pos:
            segs.append((pos, cover[1] - pos, None, 0))
        return segs
    prev_end = None
    for start, end, name in items:
        if prev_end is not None:
            if start < prev_end:
                raise ValueError(f"tensor {name!r} overlaps the previous one")
            if start - prev_end > max_gap:
                segs.append(None)
            elif start > prev_end:
                segs.append((prev_end, start - prev_end, None, 0))
        segs.append((start, end - start, name, start))
        prev_end = end
    return segs


def ring_slot(part_index: int, n_slots: int) -> int:
    """The staging slot of a part: ``i % n``. The pipeline submits part ``i`` only after part
    ``i - n`` (the slot's previous user) has been handed over, so a slot is never written while
    its bytes are still wanted (the copy out of it is awaited through its event first)."""
    return part_index % n_slots


def shard_layout(entries: Sequence[TensorInfo], per_tensor: bool) -> Layout:
    """Destination layout of one shard: ``(kind, {name: (buffer, offset)}, buffer sizes, lo)``.

    ``per-tensor``: a buffer per tensor (CPU). ``bulk``: one buffer mirroring the file's data
    section from ``lo`` (every tensor aligned, little slack), so a read is copied in one piece.
    ``packed``: one buffer, tensors at 256-byte aligned offsets (misaligned files)."""
    live = [e for e in entries if e.nbytes]
    if per_tensor:
        return "per-tensor", {e.name: (i, 0) for i, e in enumerate(live)}, [e.nbytes for e in live], 0
    if not live:
        return "bulk", {}, [], 0
    lo, hi = min(e.start for e in live), max(e.end for e in live)
    used = sum(e.nbytes for e in live)
    if all((e.start - lo) % e.itemsize == 0 for e in live) and hi - lo - used <= max(MiB, used // 100):
        return "bulk", {e.name: (0, e.start - lo) for e in live}, [hi - lo], lo
    place, off = {}, 0
    for e in live:
        place[e.name] = (0, off)
        off += -(-e.nbytes // DEVICE_ALIGN) * DEVICE_ALIGN
    return "packed", place, [off], 0


@dataclass
class Part:
    """One read request of the plan and where its bytes go."""

    shard: int
    offset: int
    length: int
    copies: list[Copy]
    tensor_bytes: int  # bytes of tensors in this read (progress)


def _part_copies(read: Read, layout: Layout) -> list[Copy]:
    off, length, pieces = read
    kind, place, sizes, lo = layout
    if kind == "bulk" and sizes:
        a, b = max(off, lo), min(off + length, lo + sizes[0])
        return [(0, a - lo, a - off, b - a)] if b > a else []
    return [(place[name][0], place[name][1] + dst, src, n) for name, src, dst, n in pieces]


def plan_parts(shards: Sequence[Any], layouts: Sequence[Layout], chunk: int,
               cover_whole: set[int], whole_from: int | None = None) -> tuple[list[Part], list[int]]:
    """Every shard's reads as Parts (shards in ``cover_whole`` are read byte for byte, to be
    hashed on the way; ``whole_from`` as in :func:`plan_reads`); returns ``(parts, number of
    parts per shard)``."""
    parts: list[Part] = []
    per_shard: list[int] = []
    for si, s in enumerate(shards):
        cover = (0, s.size or 0) if si in cover_whole else None
        reads = plan_reads(s.entries, chunk, cover=cover, whole_from=whole_from)
        for r in reads:
            parts.append(Part(si, r[0], r[1], _part_copies(r, layouts[si]), sum(pc[3] for pc in r[2])))
        per_shard.append(len(reads))
    return parts, per_shard


__all__ = ["DEVICE_ALIGN", "Part", "plan_parts", "plan_reads", "ring_slot", "shard_layout"]
