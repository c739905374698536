"""The staged copy pipeline: executes a read plan with many requests in flight and copies each
part into its destination (owned CPU tensors, or one device allocation per shard).

Three ways a part travels, chosen per load by :class:`StagedCopy`:

* ``direct`` (CPU, local files): one ``preadv`` scatters the part straight into the tensors;
* through the ring (CUDA, or ``method="ring"``): read into a slot of a bounded staging ring
  (pinned for CUDA), then copied by the copier (async on CUDA streams); a slot is rewritten only
  after its previous copy's event completed;
* remote parts to CPU tensors: read in place when the part is one tensor's bytes, else into a
  buffer and scattered.

Parts are handed over in plan order (:func:`pump`), which is what makes in-order sha256 of remote
shards and ring slot recycling safe.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import torch

from pipeline.loading.header import LoadError
from pipeline.loading.plan import Copy, Part, plan_parts, ring_slot, shard_layout
from pipeline.loading.sources import Source
from pipeline.metrics import Latencies

MiB = 1 << 20


class HostCopier:
    """Copies from a staging slot (or a fetched buffer) into destination memory. This one is
    synchronous (CPU destinations); :class:`CudaCopier` issues async copies on CUDA streams."""

    streams = 0
    device = torch.device("cpu")

    def copy_part(self, i: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        for dst, src in pairs:
            dst.copy_(src)
        return None

    def wait_host(self, event: Any) -> None:
        pass

    def consumer_wait(self, events: Sequence[Any]) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


class CudaCopier(HostCopier):
    def __init__(self, device: torch.device, n_streams: int):
        self.device = device
        self.streams = n_streams
        self._streams = [torch.cuda.Stream(device=device) for _ in range(n_streams)]

    def copy_part(self, i: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        s = self._streams[i % len(self._streams)]
        with torch.cuda.stream(s):  # the current stream is per thread
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)  # pinned source: cudaMemcpyAsync
            ev = torch.cuda.Event()
            ev.record(s)
        return ev

    def wait_host(self, event: Any) -> None:
        if event is not None:
            event.synchronize()  # releases the GIL

    def consumer_wait(self, events: Sequence[Any]) -> None:
        cur = torch.cuda.current_stream(self.device)
        for ev in events:
            if ev is not None:
                cur.wait_event(ev)

    def finish(self) -> None:
        cur = torch.cuda.current_stream(self.device)
        for s in self._streams:
            cur.wait_stream(s)
        torch.cuda.synchronize(self.device)

    def abort(self) -> None:
        try:
            torch.cuda.synchronize(self.device)  # no copy may still target memory about to be freed
        except Exception:  # pragma: no cover - a broken context: nothing more to do
            pass


def pump(parts: Sequence[Any], work: Callable[[int, Any], Any], on_done: Callable[[int, Any], None],
         *, threads: int, window: int, ahead: int | None = None) -> None:
    """Run ``work(i, part)`` on ``threads`` threads, at most ``window`` parts at once and none more
    than ``ahead`` (default ``window``) parts past the oldest one not yet handed on;
    ``on_done(i, result)`` is called in the calling thread in part order. A part that finishes
    frees its place at once, so one slow request does not idle the others (with ``ahead`` larger
    than ``window``). On any error the remaining parts are cancelled, running ones awaited, and the
    error re-raised."""
    if not parts:
        return
    window = max(1, window)
    ahead = max(window, ahead or window)
    threads = max(1, min(threads, window, len(parts)))
    running: dict[Future, int] = {}
    finished: dict[int, Any] = {}
    head = nxt = 0
    pool = ThreadPoolExecutor(threads, thread_name_prefix="forgeline-load")
    try:
        while head < len(parts):
            while nxt < len(parts) and len(running) < window and nxt - head < ahead:
                running[pool.submit(work, nxt, parts[nxt])] = nxt
                nxt += 1
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                finished[running.pop(f)] = f.result()
            while head in finished:
                on_done(head, finished.pop(head))
                head += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Span:
    """Thread-safe wall-clock span: earliest start to latest end of many intervals."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self._lock = threading.Lock()

    def add(self, t0: float, t1: float) -> None:
        with self._lock:
            self.lo = min(self.lo, t0)
            self.hi = max(self.hi, t1)

    @property
    def seconds(self) -> float:
        return max(0.0, self.hi - self.lo) if self.hi >= self.lo else 0.0


def u8(t: torch.Tensor) -> np.ndarray:
    """A writable numpy uint8 view of a contiguous CPU tensor's bytes."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def _preadv_into(fd: int, bufs: list, off: int, display: str) -> None:
    """Fill ``bufs`` (writable buffers) from the file at ``off``; short reads continue."""
    views = [memoryview(b).cast("B") for b in bufs]
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        n = os.preadv(fd, views, off + done)
        if n <= 0:
            raise LoadError(display, f"file ended at offset {off + done} while reading (truncated during load?)")
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _iovecs(copies: list[Copy], length: int, dst: list[np.ndarray], scratch: np.ndarray) -> list:
    """Buffers for one preadv that scatters a read straight into the destinations; holes (gap
    bytes) go to ``scratch``."""
    out, pos = [], 0
    for b, d, s, n in sorted(copies, key=lambda c: c[2]):
        while s > pos:
            k = min(s - pos, len(scratch))
            out.append(scratch[:k])
            pos += k
        out.append(dst[b][d : d + n])
        pos = s + n
    while length > pos:
        k = min(length - pos, len(scratch))
        out.append(scratch[:k])
        pos += k
    return out


class StagedCopy:
    """One load of ``src`` onto ``device`` through the planned parts (see the module docstring).

    ``threads``/``chunk``: parallel requests and their size; ``staging``: bytes of the staging
    ring (``staging // chunk`` slots, which also bounds the parts in flight); ``hash_remote``:
    ``{shard index: sha256}`` of remote shards to hash on the way; ``direct``: local reads land
    straight in the destination (CPU only); ``per_tensor``: a buffer per tensor (CPU) instead of
    one per shard; ``cast``: floating-point dtype to convert each shard to once it has arrived.
    After :meth:`run`: ``read_span``, ``copy_span``, ``chunk_seconds``, ``verified``,
    ``copier.streams`` and ``staging_bytes`` describe what it did.
    """

    def __init__(self, src: Source, device: torch.device, *, threads: int, chunk: int, staging: int,
                 hash_remote: dict[int, str], direct: bool, per_tensor: bool, n_streams: int,
                 progress: Callable[[int, int], None] | None, cast: torch.dtype | None):
        self.src, self.shards, self.device = src, src.shards, device
        self.cuda = device.type == "cuda"
        self.threads, self.chunk = threads, chunk
        self.hash_remote, self.direct, self.progress, self.cast = hash_remote, direct, progress, cast
        self.slot_remote = self.cuda or not per_tensor  # remote parts go through the ring
        self.use_ring = not direct and (self.slot_remote or any(s.path is not None for s in self.shards))
        self.layouts = [shard_layout(s.entries, per_tensor) for s in self.shards]
        # Remote parts for CPU tensors are received in place when a part is one tensor's bytes:
        # so every tensor but the smallest gets requests of its own.
        in_place = not self.slot_remote and any(s.path is None for s in self.shards)
        self.parts, self.shard_parts = plan_parts(self.shards, self.layouts, chunk, set(hash_remote),
                                                  whole_from=MiB if in_place else None)
        self.n_slots = max(1, staging // chunk)
        self.window = max(2 * threads, 4) if direct else self.n_slots
        # Parts may finish out of order: up to another window of them wait for their turn (in
        # place, or in their own buffer when their shard is hashed in order), so one slow request
        # does not idle the rest. Ring slots are reused in part order: none may run ahead there.
        self.ahead = self.window if self.use_ring else 2 * self.window
        self.total = sum(e.nbytes for s in self.shards for e in s.entries)
        self.staging_bytes = self.n_slots * chunk if self.use_ring else (0 if direct else self.window * chunk)
        # Destination and staging memory, files, per-shard progress: set up by run().
        if self.cuda:
            self._check_device_memory()  # before anything is allocated
        self.copier = CudaCopier(device, n_streams) if self.cuda else HostCopier()
        self.out: dict[str, torch.Tensor] = {}
        self.bufs: list[list[torch.Tensor]] = []
        self.dst_np: list[list[np.ndarray]] | None = None
        self.ring: torch.Tensor | None = None
        self.ring_np: np.ndarray | None = None
        self.fds: dict[int, int] = {}
        self.slot_events: list[Any] = [None] * self.n_slots
        self.part_events: list[list[Any]] = [[] for _ in self.shards]
        self.hashers = {si: hashlib.sha256() for si in hash_remote}
        self.left = list(self.shard_parts)
        self.done_bytes = 0
        self._scratch = threading.local()
        # What it did.
        self.read_span, self.copy_span = Span(), Span()
        self.chunk_seconds = Latencies()
        self.verified = 0

    def run(self) -> dict[str, torch.Tensor]:
        """Load every tensor; on failure everything allocated is released before the error
        propagates."""
        copier = self.copier
        try:
            self._allocate()
            self._open_files()
            for si, n in enumerate(self.shard_parts):
                if n == 0:
                    self._finish_shard(si)
            pump(self.parts, self._work, self._on_done, threads=self.threads, window=self.window, ahead=self.ahead)
            copier.finish()
            now = time.perf_counter()
            self.copy_span.add(self.copy_span.lo if self.copy_span.lo != math.inf else now, now)
        except BaseException as exc:
            # Drop every reference to the destination memory, including those held by the frames
            # of the traceback (a worker's views of a device buffer), before the error propagates.
            copier.abort()
            self.out.clear()
            self.bufs.clear()
            self.dst_np = None
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds = {}
            self.ring = self.ring_np = None
        return self.out

    # Setup ---------------------------------------------------------------------------------
    def _check_device_memory(self) -> None:
        need = sum(sum(layout[2]) for layout in self.layouts)
        free, _total = torch.cuda.mem_get_info(self.device)
        reusable = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if need > free + reusable:
            raise LoadError(self.src.display, f"needs {need / 1e9:.2f} GB on {self.device}, "
                                              f"{(free + reusable) / 1e9:.2f} GB free")

    def _allocate(self) -> None:
        """The destination buffers and the tensors viewing them; the staging ring."""
        for s, (_kind, place, sizes, _lo) in zip(self.shards, self.layouts):
            sb = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
            self.bufs.append(sb)
            for e in s.entries:
                if e.nbytes == 0:
                    self.out[e.name] = torch.empty(e.shape, dtype=e.dtype, device=self.device)
                    continue
                b, off = place[e.name]
                self.out[e.name] = sb[b][off : off + e.nbytes].view(e.dtype).view(e.shape)
        self.dst_np = [[u8(b) for b in sb] for sb in self.bufs] if not self.cuda else None
        if self.use_ring:
            self.ring = torch.empty(self.n_slots * self.chunk, dtype=torch.uint8, pin_memory=self.cuda)
            self.ring_np = u8(self.ring)

    def _open_files(self) -> None:
        for si, s in enumerate(self.shards):
            if s.path is not None:
                self.fds[si] = os.open(s.path, os.O_RDONLY)
                if s.kind == "local" and (s.cached or 0) < 0.5 and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self.fds[si], 0, 0, os.POSIX_FADV_SEQUENTIAL)

    # Worker threads ------------------------------------------------------------------------
    def _work(self, i: int, p: Part) -> Any:
        """Read part ``i`` and start its copy; returns what :meth:`_on_done` needs."""
        if self.direct:
            self._read_direct(p)
            return None
        slot = ring_slot(i, self.n_slots)
        if self.use_ring:
            self.copier.wait_host(self.slot_events[slot])  # the slot's previous copy has left it
        s = self.shards[p.shard]
        if s.path is None and not self.slot_remote:
            keep = self._fetch_to_tensors(p)
            return (keep if p.shard in self.hashers else None), slot, None  # kept only to be hashed
        sv = self.ring_np[slot * self.chunk : slot * self.chunk + p.length]  # type: ignore[index]
        t0 = time.perf_counter()
        if s.path is not None:
            _preadv_into(self.fds[p.shard], [sv], p.offset, s.display)
        else:
            s.read_into(p.offset, sv)  # network pieces land in the (pinned) slot
        t1 = self._timed_read(t0)
        base = self.ring[slot * self.chunk : slot * self.chunk + p.length]  # type: ignore[index]
        pairs = [(self.bufs[p.shard][b][d : d + n], base[so : so + n]) for b, d, so, n in p.copies]
        ev = self.copier.copy_part(i, pairs)
        self.slot_events[slot] = ev
        self.copy_span.add(t1, time.perf_counter())
        return None, slot, ev

    def _read_direct(self, p: Part) -> None:
        """One preadv scattering the part into the destination tensors (gap bytes to scratch)."""
        scratch = getattr(self._scratch, "buf", None)
        if scratch is None:
            scratch = self._scratch.buf = np.empty(min(self.chunk, 4 * MiB), np.uint8)
        assert self.dst_np is not None
        iov = _iovecs(p.copies, p.length, self.dst_np[p.shard], scratch)
        t0 = time.perf_counter()
        _preadv_into(self.fds[p.shard], iov, p.offset, self.shards[p.shard].display)
        self._timed_read(t0)

    def _fetch_to_tensors(self, p: Part) -> np.ndarray:
        """A remote part for CPU tensors: a part that is one tensor's bytes (large tensors span
        several parts) is read straight into the tensor; others into a buffer, then scattered
        (numpy copies: no GIL). Returns the part's bytes (for hashing)."""
        assert self.dst_np is not None
        dst = self.dst_np[p.shard]
        in_place = len(p.copies) == 1 and p.copies[0][2] == 0 and p.copies[0][3] == p.length
        if in_place:
            b, d, _, n = p.copies[0]
            keep = dst[b][d : d + n]
        else:
            keep = np.empty(p.length, np.uint8)
        t0 = time.perf_counter()
        self.shards[p.shard].read_into(p.offset, keep)
        t1 = self._timed_read(t0)
        if not in_place:
            for b, d, so, n in p.copies:
                dst[b][d : d + n] = keep[so : so + n]
        self.copy_span.add(t1, time.perf_counter())
        return keep

    def _timed_read(self, t0: float) -> float:
        t1 = time.perf_counter()
        self.read_span.add(t0, t1)
        self.chunk_seconds.add(t1 - t0)
        return t1

    # Calling thread, in part order ---------------------------------------------------------
    def _on_done(self, i: int, res: Any) -> None:
        p = self.parts[i]
        if res is not None:
            keep, slot, ev = res
            self.part_events[p.shard].append(ev)
            if p.shard in self.hashers:
                data = keep if keep is not None else \
                    self.ring_np[slot * self.chunk : slot * self.chunk + p.length]  # type: ignore[index]
                self.hashers[p.shard].update(data)
        self.done_bytes += p.tensor_bytes
        self.left[p.shard] -= 1
        if self.left[p.shard] == 0:
            self._finish_shard(p.shard)
        if self.progress is not None:
            self.progress(min(self.done_bytes, self.total), self.total)

    def _finish_shard(self, si: int) -> None:
        """A shard has fully arrived: check its hash, cast it."""
        s = self.shards[si]
        if si in self.hashers:
            got = self.hashers[si].hexdigest()
            if got != self.hash_remote[si]:
                raise s.mismatch(got, self.hash_remote[si])
            self.verified += 1
        convert = [e for e in s.entries if e.dtype.is_floating_point and e.dtype != self.cast and e.nbytes]
        if self.cast is not None and convert:
            self._cast_shard(si, convert)
        self.part_events[si] = []

    def _cast_shard(self, si: int, convert: list) -> None:
        s, out, layout_kind = self.shards[si], self.out, self.layouts[si][0]
        self.copier.consumer_wait(self.part_events[si])  # the cast kernels run after the copies
        for e in convert:
            out[e.name] = out[e.name].to(self.cast)
        shard_bytes = sum(e.nbytes for e in s.entries)
        if layout_kind == "per-tensor" or 2 * sum(e.nbytes for e in convert) >= shard_bytes:
            # Release the raw shard buffer: what still views it (integer buffers, tensors already
            # in ``cast``) gets its own copy. Otherwise (mostly unconverted) the buffer stays and
            # the converted tensors' raw bytes are the only slack.
            if layout_kind != "per-tensor":
                done = {e.name for e in convert}
                for e in s.entries:
                    if e.name not in done and e.nbytes:
                        out[e.name] = out[e.name].clone()
            self.bufs[si] = []
            if self.dst_np is not None:
                self.dst_np[si] = []


__all__ = ["CudaCopier", "HostCopier", "StagedCopy", "pump"]
