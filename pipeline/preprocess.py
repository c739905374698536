"""DALI data feeding: WebDataset shards → decoded, resized, cropped, normalized NCHW batches.

One stage, two devices. ``device="gpu"`` decodes with nvJPEG / the hardware JPEG decoder
(``fn.decoders.image(device="mixed")``) and resizes, crops and normalizes on the GPU; ``device="cpu"``
runs the same graph on CPU threads with a CPU-only pipeline (``device_id=None``). Shards follow the
conventions of :mod:`pipeline.webdataset` (one image of ``IMAGE_EXTS`` + a ``.cls`` label per
sample, see docs/ingestion.md) and must be local paths (local disk, NFS, /dev/shm:
``Storage.local_path``).

    spec = PreprocessSpec(resize_shorter=32, crop=28)
    train = WebDatasetLoader(paths, batch_size=256, spec=spec, training=True,
                             shard_id=rank, num_shards=world, device="gpu", device_id=local_rank)
    for epoch in range(start_epoch, epochs):
        for images, labels in train.epoch(epoch):   # images NCHW float32/16, labels int64 [B]
            ...
        print(train.stats)                           # images/s and time the consumer waited

Determinism: every random choice of an epoch (shard order, the shuffle buffer, crop positions,
flips) is a pure function of ``(seed, epoch, shard_id)``: each call to :meth:`WebDatasetLoader.epoch`
builds a fresh DALI pipeline seeded from that triple, so ``epoch(3)`` gives the same batches
whether or not epochs 0-2 ran in this process (a resumed run sees exactly the data of an
uninterrupted one). The shard *order* depends on ``(seed, epoch)`` only, the same on every rank, so
the ranks' contiguous slices of the concatenated shards stay disjoint and cover the data.

What the per-epoch pipeline costs, and how it is hidden: building one is milliseconds on CPU, but a
fresh pipeline starts with an empty prefetch queue, and DALI's stock PyTorch iterator keeps
``prefetch`` runs in flight past the end of an epoch (work a discarded pipeline throws away and
waits for). So the loader drives the pipeline itself through DALI's scheduled API
(``schedule_run``/``share_outputs``/``release_outputs``, zero-copy DLPack into torch, as the stock
iterator does with the dynamic executor): exactly ``len(loader)`` runs per epoch, nothing decoded
past the end; and, for training (``lookahead``), once the last run of epoch ``e`` is scheduled the
pipeline of epoch ``e + 1`` is built and starts prefetching, overlapping this epoch's tail. It is
used if the next call is ``epoch(e + 1)`` and dropped otherwise; it is seeded the same either way.

Shards are indexed once, when a loader is constructed (DALI's index format, written to a private
temporary directory or to ``index_dir`` as a cache). Indexing reads every tar header and every
``.cls`` payload and checks what DALI would otherwise fail on at run time, with an error naming the
shard: missing/unreadable file, corrupt or truncated tar, a sample without its image or label, a
label that is not a non-negative ASCII integer.

DALI is imported lazily: ``import pipeline.preprocess`` works without it; using a loader without
it raises :class:`DaliNotInstalled`, which says what to install.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tarfile
import tempfile
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from pipeline.storage import write_file_atomic
from pipeline.webdataset import (
    IMAGE_EXTS,
    LABEL_EXT,
    MAX_LABEL_DIGITS,
    WebDatasetError,
    group_samples,
    image_ext,
    parse_label,
    sample_problem,
)

if TYPE_CHECKING:  # torch is imported lazily too: loading the code location stays cheap
    import torch

DALI_INSTALL_HINT = (
    "pip install nvidia-dali-cuda130==2.4.0  (the CUDA 13 wheel; it also runs CPU-only with "
    "device='cpu'; the pinned version is in pyproject.toml)"
)
_READER = "reader"


class PreprocessError(RuntimeError):
    """Base class for preprocessing failures."""


class DaliNotInstalled(PreprocessError, ImportError):
    """NVIDIA DALI is not importable."""


class ShardError(PreprocessError):
    """A shard is missing, unreadable or malformed. ``shard`` is its path."""

    def __init__(self, shard: str | os.PathLike, message: str):
        self.shard = str(shard)
        super().__init__(f"shard {self.shard}: {message}")


def _dali():
    """``(dali, fn, types, Pipeline)``, or a clear error saying what to install."""
    try:
        import nvidia.dali as dali
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as e:
        raise DaliNotInstalled(f"NVIDIA DALI is required for preprocessing but is not installed ({e}): {DALI_INSTALL_HINT}") from e
    return dali, fn, types, Pipeline


# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSpec:
    resize_shorter: int = 32  # resize so the shorter side is this many pixels
    crop: int = 28  # output is crop x crop
    channels: int = 1  # 1 = grayscale decode, 3 = RGB
    mean: tuple[float, ...] = (0.5,)  # on the 0..1 scale, one per channel
    std: tuple[float, ...] = (0.5,)
    random_crop: bool = True  # training only; evaluation always center-crops
    random_flip: bool = False  # training only (off by default: flipped digits are not digits)
    half: bool = False  # output float16 instead of float32

    def __post_init__(self) -> None:
        # lists from JSON/run config become tuples, so specs stay hashable and comparable
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.channels not in (1, 3):
            raise ValueError(f"PreprocessSpec.channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if not (isinstance(self.crop, int) and isinstance(self.resize_shorter, int)) or self.crop < 1:
            raise ValueError(f"PreprocessSpec: crop and resize_shorter must be positive ints, got {self.crop}, {self.resize_shorter}")
        if self.crop > self.resize_shorter:
            raise ValueError(f"PreprocessSpec: crop {self.crop} is larger than resize_shorter {self.resize_shorter}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"PreprocessSpec: need one mean and one std per channel ({self.channels}), "
                f"got mean={self.mean} std={self.std}"
            )
        if any(not s > 0 for s in self.std):
            raise ValueError(f"PreprocessSpec: std must be > 0, got {self.std}")

    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> "PreprocessSpec":
        """The same spec normalizing with ``mean``/``std`` (e.g. from :func:`normalization_stats`)."""
        return PreprocessSpec(**{**asdict(self), "mean": tuple(mean), "std": tuple(std)})


# ---------------------------------------------------------------------------------------------
# Shard indexing (DALI's v1.2 index format) and validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    path: str
    index_path: str
    samples: int


def _index_cache_name(path: str, st: os.stat_result) -> str:
    h = hashlib.sha1(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()).hexdigest()[:20]
    return f"{Path(path).stem}-{h}.idx"


def index_shard(path: str | os.PathLike, index_dir: str | os.PathLike) -> ShardIndex:
    """Validate one shard and write its DALI index under ``index_dir`` (reused when the shard's
    path, size, mtime and inode are unchanged). Raises :class:`ShardError` naming the shard."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardError(path, "not found") from None
    except OSError as e:
        raise ShardError(path, f"cannot stat: {e.strerror or e}") from e
    if not os.path.isfile(path):
        raise ShardError(path, "not a regular file")
    idx_path = os.path.join(os.fspath(index_dir), _index_cache_name(path, st))
    if os.path.exists(idx_path):
        with open(idx_path) as f:
            head = f.readline().split()
        if len(head) == 2 and head[0] == "v1.2" and head[1].isdigit():
            return ShardIndex(path, idx_path, int(head[1]))

    lines: list[str] = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ShardError(path, f"cannot open: {e.strerror or e}") from e
    try:
        with os.fdopen(os.dup(fd), "rb") as fobj, tarfile.open(fileobj=fobj, mode="r:") as tar:

            def members() -> Iterator[tuple[str, tuple[int, int, str]]]:
                """``(name, (offset, size, name))`` of the regular members, in archive order."""
                while True:
                    try:
                        m = tar.next()
                    except (tarfile.TarError, EOFError, UnicodeError) as e:
                        raise ShardError(path, f"corrupt tar archive near byte {tar.offset}: {e}") from e
                    if m is None:
                        return
                    if not m.isreg():
                        continue
                    if m.offset_data + m.size > st.st_size:
                        raise ShardError(
                            path, f"truncated: member {m.name!r} needs bytes up to {m.offset_data + m.size}, file has {st.st_size}"
                        )
                    yield m.name, (m.offset_data, m.size, m.name)

            for key, fields in group_samples(members()):
                problem = sample_problem(fields)
                if problem:
                    raise ShardError(path, f"sample {key!r} has {problem} (members: {', '.join(n for *_, n in fields.values())})")
                off, size, _ = fields[LABEL_EXT]
                raw = os.pread(fd, size, off) if size <= 64 else b"x"
                if parse_label(raw) is None:
                    raise ShardError(path, f"sample {key!r}: label {raw[:32]!r} is not a non-negative integer")
                lines.append(" ".join(f"{e} {o} {s} {n}" for e, (o, s, n) in fields.items()))
            end = tar.offset
    except WebDatasetError as e:
        raise ShardError(path, str(e)) from None
    except tarfile.ReadError as e:
        raise ShardError(path, f"not a readable tar archive: {e}") from e
    except OSError as e:
        raise ShardError(path, f"read failed: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if lines and (end + 512 > st.st_size or any(_tail(path, end))):
        raise ShardError(
            path, f"corrupt or truncated: no valid tar header or end-of-archive marker at byte {end} of {st.st_size}"
        )

    os.makedirs(index_dir, exist_ok=True)
    index = "".join([f"v1.2 {len(lines)}\n", *(line + "\n" for line in lines)])
    write_file_atomic(idx_path, index, durable=False)  # a cache, rebuilt when missing
    return ShardIndex(path, idx_path, len(lines))


def _tail(path: str, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(512)


def _read_index(index_path: str) -> list[dict[str, tuple[int, int, str]]]:
    """Per sample: {lower-case ext: (offset, size, member name)}."""
    out = []
    with open(index_path) as f:
        f.readline()
        for line in f:
            t = line.split()
            out.append({t[i].lower(): (int(t[i + 1]), int(t[i + 2]), t[i + 3]) for i in range(0, len(t), 4)})
    return out


def _shard_range(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The contiguous sample range DALI's readers give ``shard_id`` (same integer formula)."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


def _derive_seed(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# Labels: padded ASCII bytes → int64
# ---------------------------------------------------------------------------------------------

_POW10 = None


def parse_labels(raw: "torch.Tensor") -> "torch.Tensor":
    """[B, L] uint8 ASCII (zero padded, e.g. ``b"123\\n\\0"``) → [B] int64. Vectorized: one pass of a
    few element-wise ops over B x L bytes, negligible next to a batch of images."""
    import torch

    global _POW10
    if _POW10 is None:
        _POW10 = torch.tensor([10**k for k in range(MAX_LABEL_DIGITS + 1)], dtype=torch.int64)
    d = raw.to(torch.int64) - 48
    is_digit = (d >= 0) & (d <= 9)
    n_digits = is_digit.sum(1)
    if bool(((n_digits == 0) | (n_digits > MAX_LABEL_DIGITS)).any()):
        bad = int(torch.nonzero((n_digits == 0) | (n_digits > MAX_LABEL_DIGITS))[0, 0]) if raw.shape[0] else 0
        raise PreprocessError(f"label {bytes(raw[bad].tolist())!r} is not a non-negative integer")
    right = is_digit.flip(1).cumsum(1).flip(1) - is_digit.to(torch.int64)  # digits strictly to the right
    return (torch.where(is_digit, d, 0) * _POW10[right.clamp_(max=MAX_LABEL_DIGITS)]).sum(1)


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


class WebDatasetLoader:
    """Batches of one rank's share of WebDataset shards through a DALI pipeline.

    ``epoch(e)`` yields ``(images, labels)``: images NCHW float32 (float16 with ``spec.half``),
    normalized with ``spec.mean``/``spec.std``; labels int64 [B]. On ``device="gpu"`` both live on
    ``cuda:device_id`` (default: the current CUDA device), else on CPU.

    Sharding: the shards' samples, concatenated, are split into ``num_shards`` contiguous ranges
    (DALI's reader sharding); rank ``shard_id`` reads one. Training (``training=True``): shard order
    permuted per epoch (same permutation on every rank), samples shuffled through a buffer of
    ``shuffle_buffer`` samples, random crop / flip per ``spec``; ``drop_last`` defaults to True and
    every rank then yields the same number of batches (``(total // num_shards) // batch_size``),
    which DDP needs. Evaluation: stored order, center crop, ``drop_last`` defaults to False and the
    last batch is partial, so every sample of this rank's range is seen exactly once (ranks may then
    differ by one batch).

    ``stats`` (reset by each ``epoch()`` call, updated per batch): ``images``, ``batches``,
    ``seconds`` (wall time since the call, consumer time included), ``stall_seconds`` (time the
    consumer waited on the loader, pipeline build included), ``images_per_s``, ``build_seconds`` and
    ``prebuilt`` (the pipeline was started during the previous epoch: its build is not in this
    epoch's stall), ``batch_seconds`` (per batch, the time the consumer waited for it: the epoch's
    stall without the pipeline build; :func:`pipeline.metrics.summary` turns it into P50/P95/P99).

    Beyond the trainer's API: ``shuffle_buffer`` (DALI ``initial_fill``), ``index_dir`` (cache shard
    indexes there instead of a private temporary directory), ``lookahead`` (default: ``training``).
    """

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        spec: PreprocessSpec,
        training: bool,
        shard_id: int = 0,
        num_shards: int = 1,
        device: str = "cpu",
        device_id: int | None = None,
        num_threads: int = 2,
        seed: int = 0,
        prefetch: int = 2,
        drop_last: bool | None = None,
        shuffle_buffer: int = 1024,
        index_dir: str | os.PathLike | None = None,
        lookahead: bool | None = None,
    ):
        if isinstance(shards, (str, os.PathLike)):
            shards = [shards]
        if not shards:
            raise PreprocessError("WebDatasetLoader: no shards given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id} num_shards={num_shards}")
        device = "gpu" if device == "cuda" else device
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if prefetch < 1 or num_threads < 1:
            raise ValueError(f"prefetch and num_threads must be >= 1, got {prefetch}, {num_threads}")
        if not isinstance(spec, PreprocessSpec):
            raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
        _dali()  # fail now, with the install hint, rather than at the first epoch
        if device == "gpu":
            import torch

            if not torch.cuda.is_available():
                raise PreprocessError("device='gpu' but torch sees no CUDA device: use device='cpu'")
            if device_id is None:
                device_id = torch.cuda.current_device()
        else:
            device_id = None  # CPU-only DALI pipeline

        self.batch_size = batch_size
        self.spec = spec
        self.training = training
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.device = device
        self.device_id = device_id
        self.num_threads = num_threads
        self.seed = seed
        self.prefetch = prefetch
        self.drop_last = training if drop_last is None else drop_last
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.lookahead = training if lookahead is None else lookahead
        self._lookahead: tuple | None = None
        self._closed = False

        if index_dir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="forgeline-wds-index-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
            index_dir = self._tmpdir
        else:
            self._finalizer = None
        t = time.perf_counter()
        self.shards: list[ShardIndex] = [index_shard(p, index_dir) for p in shards]
        self.index_seconds = time.perf_counter() - t
        self.total_samples = sum(s.samples for s in self.shards)
        if self.total_samples == 0:
            raise PreprocessError(f"no samples in {len(self.shards)} shard(s): {', '.join(s.path for s in self.shards[:5])}")
        lo, hi = _shard_range(self.total_samples, shard_id, num_shards)
        self._share = hi - lo
        if self.drop_last:
            # equal on every rank (the smallest share), so DDP ranks run the same number of steps
            self._batches = (self.total_samples // num_shards) // batch_size
        else:
            self._batches = math.ceil(self._share / batch_size)
        self.stats: dict = {}
        self._reset_stats(-1)

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        return self._batches

    @property
    def samples(self) -> int:
        return self._batches * self.batch_size if self.drop_last else self._share

    def close(self) -> None:
        """Drop a pre-started pipeline and remove the private index directory (both also happen
        when the loader is garbage collected)."""
        self._closed = True
        self._drop_lookahead()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "WebDatasetLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"WebDatasetLoader({len(self.shards)} shards, {self.total_samples} samples, rank {self.shard_id}/"
            f"{self.num_shards}: {self.samples} samples in {len(self)} batches of {self.batch_size}, "
            f"{'training' if self.training else 'eval'}, device={self.device})"
        )

    def shard_order(self, epoch: int) -> list[ShardIndex]:
        """The order shards are read in ``epoch``: stored order for evaluation, a permutation
        that depends on ``(seed, epoch)`` only (identical on every rank) for training."""
        if not self.training or len(self.shards) == 1:
            return list(self.shards)
        perm = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5EED]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def epoch(self, epoch: int) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """One pass over this rank's share; the same ``epoch`` always gives the same batches."""
        import torch

        if self._closed:
            raise PreprocessError(f"{self!r} is closed")
        self._reset_stats(epoch)
        stats = self.stats
        t_start = time.perf_counter()
        if self._batches == 0:
            return
        order = self.shard_order(epoch)
        key = self._pipeline_key(order, epoch)
        runs = self._batches
        last = self._share - (runs - 1) * self.batch_size if not self.drop_last else self.batch_size
        target = torch.device("cuda", self.device_id) if self.device == "gpu" else None
        consumed = 0
        pipe = None
        ahead_started = False
        try:
            t0 = time.perf_counter()
            pipe, scheduled, build_s = self._take_lookahead(key)
            stats["prebuilt"] = pipe is not None
            if pipe is None:
                pipe, scheduled, build_s = self._start(order, key, runs)
            stats["build_seconds"] = build_s
            stall = time.perf_counter() - t0
            for i in range(runs):
                t0 = time.perf_counter()
                try:
                    images, raw = pipe.share_outputs()
                    pipe.release_outputs()  # dynamic executor: the buffers stay valid while torch holds them
                    if scheduled < runs:  # exactly `runs` runs: nothing is decoded past the epoch's end
                        pipe.schedule_run()
                        scheduled += 1
                except RuntimeError as e:
                    raise self._explain(e, order, consumed) from e
                if self.lookahead and scheduled == runs and not ahead_started:
                    ahead_started = True  # every run of this epoch is scheduled: start the next one,
                    self._start_lookahead(epoch + 1)  # so its first batches overlap this epoch's tail
                images, labels = _to_torch(images, target), parse_labels(_to_torch(raw, None))
                if i == runs - 1 and last < images.shape[0]:  # the padded tail of the final batch
                    images, labels = images[:last], labels[:last]
                if target is not None:
                    labels = labels.to(target, non_blocking=True)
                waited = time.perf_counter() - t0
                stall += waited
                stats["batch_seconds"].append(waited)
                consumed += images.shape[0]
                now = time.perf_counter()
                stats.update(
                    images=consumed,
                    batches=i + 1,
                    seconds=now - t_start,
                    stall_seconds=stall,
                    images_per_s=consumed / max(now - t_start, 1e-9),
                )
                yield images, labels
            stats["seconds"] = time.perf_counter() - t_start
            stats["images_per_s"] = consumed / max(stats["seconds"], 1e-9)
        finally:
            del pipe  # release the pipeline (threads, pinned and device memory) now

    # ------------------------------------------------------------------ internals
    def _reset_stats(self, epoch: int) -> None:
        self.stats.clear()
        self.stats.update(
            epoch=epoch, images=0, batches=0, seconds=0.0, stall_seconds=0.0, images_per_s=0.0,
            build_seconds=0.0, prebuilt=False, batch_seconds=[],
        )

    def _pipeline_key(self, order: list[ShardIndex], epoch: int) -> tuple:
        """What determines an epoch's pipeline. Evaluation pipelines do not depend on the epoch."""
        if not self.training:
            return ("eval",)
        return (tuple(s.path for s in order), _derive_seed(self.seed, epoch, self.shard_id))

    def _start(self, order: list[ShardIndex], key: tuple, runs: int):
        """Build a pipeline and schedule its first ``min(prefetch, runs)`` runs."""
        t = time.perf_counter()
        seed = key[1] if self.training else _derive_seed(self.seed, 0, self.shard_id)
        pipe = self._build(order, seed, min(self.prefetch, runs))
        try:
            pipe.build()
            pipe.schedule_run()  # the first call fills the prefetch queue
        except RuntimeError as e:
            raise self._explain(e, order, 0) from e
        return pipe, min(self.prefetch, runs), time.perf_counter() - t

    def _start_lookahead(self, epoch: int) -> None:
        """Build and start the next epoch's pipeline in a background thread, so it is built and
        prefetching while the consumer works through this epoch's last batches (what a persistent
        pipeline gets for free). DALI's graph definition context is thread-local."""
        self._drop_lookahead()
        order = self.shard_order(epoch)
        key = self._pipeline_key(order, epoch)
        box: dict = {}

        def start() -> None:
            try:
                box["started"] = self._start(order, key, self._batches)
            except BaseException as e:  # noqa: BLE001 - the next epoch() rebuilds and reports it
                box["error"] = e

        thread = threading.Thread(target=start, name=f"forgeline-dali-epoch-{epoch}", daemon=True)
        thread.start()
        self._lookahead = (key, thread, box)

    def _take_lookahead(self, key: tuple):
        ahead, self._lookahead = self._lookahead, None
        if ahead is not None:
            ahead_key, thread, box = ahead
            thread.join()
            if ahead_key == key and "started" in box:
                return box["started"]
        return None, 0, 0.0  # none, a failed start, or another epoch's: dropped, built again

    def _drop_lookahead(self) -> None:
        ahead, self._lookahead = self._lookahead, None
        if ahead is not None:
            ahead[1].join()

    def _build(self, order: list[ShardIndex], seed: int, prefetch: int):
        _, fn, types, Pipeline = _dali()
        spec, training = self.spec, self.training
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=seed,
            prefetch_queue_depth=prefetch,
            exec_dynamic=True,  # outputs stay valid after release_outputs (zero-copy to torch)
        )
        with pipe:
            encoded, raw_label = fn.readers.webdataset(
                paths=[s.path for s in order if s.samples],
                index_paths=[s.index_path for s in order if s.samples],
                ext=[";".join(IMAGE_EXTS), LABEL_EXT],
                case_sensitive_extensions=False,
                missing_component_behavior="error",
                shard_id=self.shard_id,
                num_shards=self.num_shards,
                random_shuffle=training,
                initial_fill=self.shuffle_buffer,
                pad_last_batch=True,
                stick_to_shard=True,
                name=_READER,
            )
            images = fn.decoders.image(
                encoded,
                device="mixed" if self.device == "gpu" else "cpu",
                output_type=types.GRAY if spec.channels == 1 else types.RGB,
            )
            images = fn.resize(images, resize_shorter=float(spec.resize_shorter), antialias=True)
            if training and spec.random_crop:
                pos_x, pos_y = fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0])
            else:
                pos_x = pos_y = 0.5
            mirror = fn.random.coin_flip(probability=0.5) if training and spec.random_flip else 0
            images = fn.crop_mirror_normalize(
                images,
                crop=(spec.crop, spec.crop),
                crop_pos_x=pos_x,
                crop_pos_y=pos_y,
                mirror=mirror,
                mean=[m * 255.0 for m in spec.mean],
                std=[s * 255.0 for s in spec.std],
                dtype=types.FLOAT16 if spec.half else types.FLOAT,
                output_layout="CHW",
            )
            pipe.set_outputs(images, fn.pad(raw_label, fill_value=0))
        return pipe

    def _explain(self, err: Exception, order: list[ShardIndex], consumed: int) -> PreprocessError:
        """Turn a DALI run-time failure into an error that names the shard (and sample) at fault.
        The failing sample lies in a bounded window of this rank's range: what was consumed plus
        what can be in flight (prefetch queue, reader look-ahead, shuffle buffer). Those samples
        are re-decoded with Pillow to pin the culprit."""
        text = str(err)
        at = text.rfind("encountered:")  # DALI: "<op and traceback> encountered: <the error>"
        core = text[at + len("encountered:") :] if at >= 0 else text
        dali_msg = " ".join(l.strip() for l in core.splitlines() if l.strip() and "no longer valid" not in l)[:500]
        lo, hi = _shard_range(self.total_samples, self.shard_id, self.num_shards)
        ahead = (self.prefetch + 4) * self.batch_size + (self.shuffle_buffer if self.training else 0)
        w_lo = lo if self.training else lo + consumed
        w_hi = min(hi, lo + consumed + ahead)
        suspects, base = [], 0
        for s in order:
            a, b = max(w_lo, base), min(w_hi, base + s.samples)
            if a < b:
                suspects.append((s, a - base, b - base))
            base += s.samples
        for s, a, b in suspects:
            bad = _first_undecodable(s, a, b)
            if bad:
                name, why = bad
                return ShardError(s.path, f"sample {name}: {why} (DALI: {dali_msg})")
        if len(suspects) == 1:
            return ShardError(suspects[0][0].path, f"DALI failed reading this shard: {dali_msg}")
        names = ", ".join(s.path for s, _, _ in suspects[:8]) + (f" and {len(suspects) - 8} more" if len(suspects) > 8 else "")
        return PreprocessError(f"DALI pipeline failed in one of shards {names}: {dali_msg}")


def _to_torch(tl, device: "torch.device | None") -> "torch.Tensor":
    """A dense DALI batch as a torch tensor without a copy (DLPack; DALI's stream is synchronized
    with torch's current one), as DALI's own PyTorch iterator does with the dynamic executor."""
    import torch

    t = tl.as_tensor()
    if device is None:
        return torch.from_dlpack(t)
    with torch.cuda.device(device):
        return torch.from_dlpack(t)


def _first_undecodable(shard: ShardIndex, start: int, stop: int) -> tuple[str, str] | None:
    from io import BytesIO

    from PIL import Image

    samples = _read_index(shard.index_path)[start:stop]
    with open(shard.path, "rb") as f:
        for comp in samples:
            (off, size, name) = comp[image_ext(comp)]
            f.seek(off)
            try:
                with Image.open(BytesIO(f.read(size))) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001 - any decode failure is the answer
                why = "not a recognizable image" if type(e).__name__ == "UnidentifiedImageError" else f"{type(e).__name__}: {e}"
                return name, f"image cannot be decoded ({why})"
    return None


# ---------------------------------------------------------------------------------------------
# Normalization statistics
# ---------------------------------------------------------------------------------------------


def normalization_stats(
    shards: list[str],
    *,
    spec: PreprocessSpec,
    sample_limit: int | None = None,
    num_threads: int = 2,
    batch_size: int = 256,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) on the 0..1 scale of the images as the loader sees them before
    cropping: same decode (``spec.channels``) and shorter-side resize, no augmentation, CPU.
    Uses the first ``sample_limit`` samples in stored order (all when None). Per-image channel
    means and mean squares are reduced inside DALI and combined in float64, pixel-weighted."""
    _, fn, types, Pipeline = _dali()
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    if not shards:
        raise PreprocessError("normalization_stats: no shards given")
    with tempfile.TemporaryDirectory(prefix="forgeline-wds-index-") as tmp:
        index = [s for s in (index_shard(p, tmp) for p in shards) if s.samples]
        total = sum(s.samples for s in index)
        if sample_limit is not None:
            total = min(total, max(0, int(sample_limit)))
        if total == 0:
            raise PreprocessError(f"normalization_stats: no samples in shards {', '.join(map(str, shards[:5]))}")
        bs = min(batch_size, total)
        pipe = Pipeline(batch_size=bs, num_threads=num_threads, device_id=None, seed=0, prefetch_queue_depth=2)
        with pipe:
            encoded = fn.readers.webdataset(
                paths=[s.path for s in index],
                index_paths=[s.index_path for s in index],
                ext=[";".join(IMAGE_EXTS)],
                case_sensitive_extensions=False,
                pad_last_batch=True,
                name=_READER,
            )
            img = fn.decoders.image(encoded, device="cpu", output_type=types.GRAY if spec.channels == 1 else types.RGB)
            img = fn.resize(img, resize_shorter=float(spec.resize_shorter), antialias=True)
            x = fn.cast(img, dtype=types.FLOAT) * (1.0 / 255.0)
            pipe.set_outputs(
                fn.reductions.mean(x, axes=[0, 1]), fn.reductions.mean_square(x, axes=[0, 1]), img.shape()
            )
        s1 = np.zeros(spec.channels)
        s2 = np.zeros(spec.channels)
        n = 0.0
        done = 0
        try:
            while done < total:
                try:
                    mean, msq, shape = (np.asarray(o.as_array(), dtype=np.float64) for o in pipe.run())
                except RuntimeError as e:
                    names = ", ".join(s.path for s in index[:8])
                    raise PreprocessError(f"normalization_stats: DALI failed in one of shards {names}: {e}") from e
                take = min(bs, total - done)
                px = (shape[:take, 0] * shape[:take, 1])[:, None]
                s1 += (mean[:take] * px).sum(0)
                s2 += (msq[:take] * px).sum(0)
                n += float(px.sum())
                done += take
        finally:
            del pipe
    m = s1 / n
    var = np.maximum(s2 / n - m * m, 0.0)
    return tuple(float(v) for v in m), tuple(float(v) for v in np.sqrt(var))


__all__ = [
    "DALI_INSTALL_HINT",
    "DaliNotInstalled",
    "PreprocessError",
    "PreprocessSpec",
    "ShardError",
    "ShardIndex",
    "WebDatasetLoader",
    "index_shard",
    "normalization_stats",
    "parse_labels",
]
