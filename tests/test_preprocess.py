"""The DALI feeding stage on real shards (written by ``pipeline.datagen`` into tmp_path), on CPU.

References are computed with Pillow + numpy from the very bytes in the shards. Tolerances:

* no resize (32x32 images, ``resize_shorter=32``): DALI and the reference agree to float32 rounding
  (measured ≤ 2e-5 of a gray level); we allow 1e-4 in normalized units, which is ~1/80 of one gray
  level (one level = 1/255/std = 0.0078 at std 0.5), so a wrong crop offset, channel order, mean or
  std — each at least one level off somewhere — cannot pass.
* with a resize (40x50 → 32x40, an exact 0.8 scale): DALI's linear + antialias filter is the same
  triangle filter as Pillow's BILINEAR downscale, but both round their uint8 result independently,
  so pixels may differ by one gray level (measured: max exactly 1, mean 0.18). We allow 1 level + eps
  per pixel and a mean under 0.35 levels. (At a non-exact scale DALI keeps the exact ratio and
  Pillow the rounded output size, so their sampling grids differ: not compared.)
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.datagen import encode_image, load_digits, write_tar
from pipeline.storage import LocalStorage

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")

from pipeline.preprocess import (  # noqa: E402
    DaliNotInstalled,
    PreprocessError,
    PreprocessSpec,
    ShardError,
    WebDatasetLoader,
    normalization_stats,
    parse_labels,
)

REPO = Path(__file__).resolve().parent.parent
N_IDS = 500  # samples in the id shards: label == id, 0..499 (multi-digit labels)
SPLIT = (200, 200, 100)  # uneven shards
RGB_MEAN, RGB_STD = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
GRAY = PreprocessSpec()  # resize_shorter 32, crop 28, mean/std 0.5


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shard sets under one LocalStorage:
    ids: 500 digits as 32x32 grayscale PNGs in 3 uneven shards, label = sample id (0..499);
    rgb: 48 smooth noisy 40x50 RGB PNGs (exercise the resize and the channel order)."""
    store = LocalStorage(tmp_path_factory.mktemp("preprocess"), fsync=False)
    digits = load_digits()
    pngs = [encode_image(digits.images[i % len(digits)], 32, "png") for i in range(N_IDS)]
    ids_paths, start = [], 0
    for k, n in enumerate(SPLIT):
        key = f"raw/shards/ids/train-{k:06d}.tar"
        write_tar(store, key, ((f"{i:06d}", "png", pngs[i], i) for i in range(start, start + n)))
        ids_paths.append(str(store.local_path(key)))
        start += n

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:50]
    rgb_imgs, rgb_samples = [], []
    for i in range(48):
        base = np.stack([np.sin(xx / 5 + i) * 100 + 128, np.cos(yy / 7 + i) * 100 + 128, (xx + yy) * 2.5], -1)
        arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
        rgb_imgs.append(arr)
        rgb_samples.append((f"{i:06d}", "png", buf.getvalue(), 1000 + i))
    write_tar(store, "raw/shards/rgb/train-000000.tar", rgb_samples)
    return {
        "store": store,
        "ids": ids_paths,
        "ids_ref": np.stack([_decode(p) for p in pngs]),  # (500, 32, 32) uint8
        "rgb": [str(store.local_path("raw/shards/rgb/train-000000.tar"))],
        "rgb_ref": np.stack(rgb_imgs),  # (48, 40, 50, 3) uint8
    }


def _all(loader: WebDatasetLoader, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader.epoch(epoch))
    return torch.cat(xs), torch.cat(ys)


def _center(ref: np.ndarray, crop: int = 28) -> np.ndarray:
    h, w = ref.shape[1:3]
    oy, ox = round((h - crop) * 0.5), round((w - crop) * 0.5)
    return ref[:, oy : oy + crop, ox : ox + crop]


# --------------------------------------------------------------------------- values


def test_eval_batches_match_pil_reference_shapes_dtypes_values(data):
    loader = WebDatasetLoader(data["ids"], batch_size=64, spec=GRAY, training=False)
    assert (len(loader), loader.samples) == (8, N_IDS)  # 7 full batches + 52
    batches = list(loader.epoch(0))
    assert [b[0].shape[0] for b in batches] == [64] * 7 + [52]
    x, y = batches[0]
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (64,) and y.dtype == torch.int64
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert y.tolist() == list(range(N_IDS))  # eval keeps stored order; multi-digit labels parsed
    ref = (_center(data["ids_ref"]).astype(np.float64) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(x[:, 0].numpy(), ref[y.numpy()], rtol=0, atol=1e-4)


def test_rgb_resize_crop_normalize_matches_pil_within_one_level(data):
    spec = PreprocessSpec(resize_shorter=32, crop=28, channels=3, mean=RGB_MEAN, std=RGB_STD)
    x, y = _all(WebDatasetLoader(data["rgb"], batch_size=16, spec=spec, training=False))
    assert x.shape == (48, 3, 28, 28) and y.tolist() == list(range(1000, 1048))
    resized = np.stack([np.asarray(Image.fromarray(a).resize((40, 32), Image.BILINEAR)) for a in data["rgb_ref"]])
    ref = ((_center(resized) / 255.0 - np.array(RGB_MEAN)) / np.array(RGB_STD)).transpose(0, 3, 1, 2)
    levels = np.abs(x.numpy() - ref) * np.array(RGB_STD)[None, :, None, None] * 255  # in gray levels
    assert levels.max() <= 1.0 + 1e-3, levels.max()
    assert levels.mean() < 0.35, levels.mean()


def test_half_outputs_float16_close_to_float32(data):
    spec16 = PreprocessSpec(half=True)
    x16, y16 = _all(WebDatasetLoader(data["ids"][:1], batch_size=50, spec=spec16, training=False))
    x32, y32 = _all(WebDatasetLoader(data["ids"][:1], batch_size=50, spec=GRAY, training=False))
    assert x16.dtype == torch.float16 and y16.dtype == torch.int64 and torch.equal(y16, y32)
    # values in [-1, 1]: float16 spacing is ≤ 2^-11, so rounding is ≤ 4.9e-4
    torch.testing.assert_close(x16.float(), x32, rtol=0, atol=1e-3)


def test_parse_labels_multi_digit_and_whitespace():
    rows = [b"7\n", b"123\n", b" 42 ", b"0", b"999999\r\n"]
    width = max(map(len, rows))
    raw = torch.tensor([list(r.ljust(width, b"\0")) for r in rows], dtype=torch.uint8)
    assert parse_labels(raw).tolist() == [7, 123, 42, 0, 999999]
    with pytest.raises(PreprocessError, match="not a non-negative integer"):
        parse_labels(torch.tensor([list(b"\n\0\0")], dtype=torch.uint8))


# --------------------------------------------------------------------------- sharding and order


def test_every_sample_exactly_once_across_two_eval_ranks(data):
    seen = []
    for rank in (0, 1):
        loader = WebDatasetLoader(data["ids"], batch_size=64, spec=GRAY, training=False, shard_id=rank, num_shards=2)
        _, y = _all(loader)
        assert len(y) == loader.samples == 250 and len(loader) == 4
        seen.append(y.tolist())
    assert sorted(seen[0] + seen[1]) == list(range(N_IDS))
    assert seen[0] == list(range(250))  # contiguous ranges, crossing shard boundaries (200 | 200 | 100)


def test_training_epochs_reproducible_distinct_and_rank_disjoint(data):
    def make(rank=0, seed=7):
        return WebDatasetLoader(
            data["ids"], batch_size=32, spec=GRAY, training=True, shard_id=rank, num_shards=2, seed=seed
        )

    a = make()
    assert a.drop_last and len(a) == 7 and a.samples == 224
    e2 = list(a.epoch(2))
    assert len(e2) == 7 and all(x.shape == (32, 1, 28, 28) for x, _ in e2)
    again = list(a.epoch(2))  # the same epoch again, after other epochs would have run
    resumed = list(make().epoch(2))  # a new loader, as in a run resumed from a checkpoint
    for (x1, y1), (x2, y2), (x3, y3) in zip(e2, again, resumed):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
        assert torch.equal(y1, y3) and torch.equal(x1, x3)
    y2_all = torch.cat([y for _, y in e2])
    y3_all = torch.cat([y for _, y in a.epoch(3)])
    assert y2_all.tolist() != y3_all.tolist()  # reshuffled
    assert torch.cat([y for _, y in make(seed=8).epoch(2)]).tolist() != y2_all.tolist()
    assert len(set(y2_all.tolist())) == 224  # no duplicates within a rank

    other = make(rank=1)
    assert len(other) == len(a)  # DDP: every rank runs the same number of steps
    y_other = torch.cat([y for _, y in other.epoch(2)])
    assert not set(y_other.tolist()) & set(y2_all.tolist())  # ranks disjoint within an epoch


def test_prestarted_next_epoch_gives_the_same_batches_as_a_fresh_pipeline(data):
    def make(lookahead):
        return WebDatasetLoader(data["ids"], batch_size=64, spec=GRAY, training=True, seed=11, lookahead=lookahead)

    seq = make(True)
    for e in range(3):
        batches = list(seq.epoch(e))
        assert seq.stats["prebuilt"] == (e > 0)  # epochs 1 and 2 were started during the previous one
    fresh = list(make(False).epoch(2))
    assert len(batches) == len(fresh) == 7
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches, fresh))
    list(seq.epoch(0))  # out of sequence: the pre-started epoch-3 pipeline is dropped, no error
    assert not seq.stats["prebuilt"]
    seq.close()


def test_training_without_random_crop_or_flip_is_center_crop(data):
    x_eval, y_eval = _all(WebDatasetLoader(data["ids"], batch_size=50, spec=GRAY, training=False))
    fixed = PreprocessSpec(random_crop=False, random_flip=False)
    x, y = _all(WebDatasetLoader(data["ids"], batch_size=50, spec=fixed, training=True, seed=3), epoch=1)
    assert len(y) == N_IDS and y.tolist() != y_eval.tolist()  # shuffled order...
    assert torch.equal(x, x_eval[y])  # ...but every image exactly the evaluation (center) crop


def test_training_random_crop_and_flip(data):
    ref = (data["ids_ref"].astype(np.float32) / 255 - 0.5) / 0.5
    spec = PreprocessSpec(random_crop=True, random_flip=False)
    x, y = _all(WebDatasetLoader(data["ids"], batch_size=50, spec=spec, training=True, seed=3))
    offsets = []
    for img, i in zip(x[:, 0].numpy(), y.tolist()):
        hits = [(oy, ox) for oy in range(5) for ox in range(5) if np.allclose(img, ref[i, oy : oy + 28, ox : ox + 28], atol=1e-4)]
        assert hits, f"sample {i} is no 28x28 crop of its 32x32 image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 5  # crop positions actually vary

    flip = PreprocessSpec(random_crop=False, random_flip=True)
    x_eval, _ = _all(WebDatasetLoader(data["ids"], batch_size=50, spec=GRAY, training=False))
    xf, yf = _all(WebDatasetLoader(data["ids"], batch_size=50, spec=flip, training=True, seed=3))
    same = torch.tensor([torch.equal(a, x_eval[i]) for a, i in zip(xf, yf.tolist())])
    mirrored = torch.tensor([torch.equal(a, x_eval[i].flip(-1)) for a, i in zip(xf, yf.tolist())])
    assert bool((same | mirrored).all())
    assert 0.3 < mirrored.float().mean() < 0.7


# --------------------------------------------------------------------------- stats


def test_stats_are_filled(data):
    loader = WebDatasetLoader(data["ids"], batch_size=64, spec=GRAY, training=True, seed=1)
    n = 0
    for x, _ in loader.epoch(0):
        n += x.shape[0]
        assert loader.stats["images"] == n  # live while iterating
    s = loader.stats
    assert s["epoch"] == 0 and s["images"] == loader.samples == 448 and s["batches"] == len(loader) == 7
    assert 0 < s["stall_seconds"] <= s["seconds"] and s["images_per_s"] > 0
    assert s["images_per_s"] == pytest.approx(s["images"] / s["seconds"])
    assert 0 < s["build_seconds"] <= s["stall_seconds"]
    assert len(s["batch_seconds"]) == 7 and all(b > 0 for b in s["batch_seconds"])
    assert sum(s["batch_seconds"]) <= s["stall_seconds"]


def test_normalization_stats_match_numpy(data):
    ref = data["ids_ref"].astype(np.float64) / 255
    mean, std = normalization_stats(data["ids"], spec=GRAY)
    assert mean == pytest.approx((ref.mean(),), rel=1e-5) and std == pytest.approx((ref.std(),), rel=1e-5)
    mean, std = normalization_stats(data["ids"], spec=GRAY, sample_limit=100)  # the first 100 stored
    assert mean == pytest.approx((ref[:100].mean(),), rel=1e-5) and std == pytest.approx((ref[:100].std(),), rel=1e-5)

    spec = PreprocessSpec(resize_shorter=32, crop=28, channels=3, mean=RGB_MEAN, std=RGB_STD)
    resized = np.stack([np.asarray(Image.fromarray(a).resize((40, 32), Image.BILINEAR)) for a in data["rgb_ref"]]) / 255
    mean, std = normalization_stats(data["rgb"], spec=spec)
    np.testing.assert_allclose(mean, resized.mean((0, 1, 2)), atol=1e-3)  # ≤ 1 level per pixel, unbiased
    np.testing.assert_allclose(std, resized.std((0, 1, 2)), atol=1e-3)
    assert spec.with_stats(mean, std).mean == mean


# --------------------------------------------------------------------------- errors


def _samples(n, start=0):
    digits = load_digits()
    return [(f"{i:06d}", "png", encode_image(digits.images[i], 32), i % 10) for i in range(start, start + n)]


def test_missing_and_corrupt_shards_are_named(data, tmp_path):
    store = LocalStorage(tmp_path, fsync=False)
    good = data["ids"][0]
    missing = str(tmp_path / "nope-000001.tar")
    with pytest.raises(ShardError, match="nope-000001.tar: not found"):
        WebDatasetLoader([good, missing], batch_size=8, spec=GRAY, training=False)

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00not a tar\xff" * 300)
    with pytest.raises(ShardError, match="garbage.tar") as e:
        WebDatasetLoader([good, str(garbage)], batch_size=8, spec=GRAY, training=False)
    assert e.value.shard == str(garbage)

    write_tar(store, "cut.tar", _samples(20))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(cut.read_bytes()[:9000])  # cut inside a member
    with pytest.raises(ShardError, match=r"cut\.tar: (truncated|corrupt)"):
        WebDatasetLoader([str(cut)], batch_size=8, spec=GRAY, training=False)

    buf = io.BytesIO()  # a sample without its label
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in (("000000.png", _samples(1)[0][2]), ("000000.cls", b"1\n"), ("000001.png", _samples(1)[0][2])):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "nolabel.tar").write_bytes(buf.getvalue())
    with pytest.raises(ShardError, match=r"nolabel\.tar: sample '000001' has no \.cls label"):
        WebDatasetLoader([str(tmp_path / "nolabel.tar")], batch_size=8, spec=GRAY, training=False)

    write_tar(store, "badlabel.tar", [(*s[:3], "seven") for s in _samples(3)])
    with pytest.raises(ShardError, match=r"badlabel\.tar: sample '000000': label b'seven\\n'"):
        WebDatasetLoader([str(tmp_path / "badlabel.tar")], batch_size=8, spec=GRAY, training=False)


def test_undecodable_image_error_names_shard_and_sample(data, tmp_path):
    store = LocalStorage(tmp_path, fsync=False)
    samples = _samples(100)
    samples[40] = ("000040", "png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, 4)
    write_tar(store, "broken-000007.tar", samples)
    loader = WebDatasetLoader(
        [data["ids"][0], str(tmp_path / "broken-000007.tar")], batch_size=16, spec=GRAY, training=False
    )
    with pytest.raises(ShardError, match=r"broken-000007\.tar: sample 000040\.png: image cannot be decoded"):
        for _ in loader.epoch(0):
            pass


def test_spec_validation():
    assert PreprocessSpec(mean=[0.5], std=[0.25]).mean == (0.5,)  # lists from run config
    with pytest.raises(ValueError, match="crop 40 is larger"):
        PreprocessSpec(resize_shorter=32, crop=40)
    with pytest.raises(ValueError, match="one mean and one std per channel"):
        PreprocessSpec(channels=3)
    with pytest.raises(ValueError, match="channels"):
        PreprocessSpec(channels=2, mean=(0.5,) * 2, std=(0.5,) * 2)


def test_import_works_without_dali_and_errors_say_how_to_install(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "nvidia.dali" or name.startswith("nvidia.dali."):
                    raise ImportError(f"No module named {name!r} (blocked)")
        sys.meta_path.insert(0, Block())
        import pipeline.preprocess as pp
        spec = pp.PreprocessSpec()
        try:
            pp.WebDatasetLoader(["x.tar"], batch_size=1, spec=spec, training=False)
        except pp.DaliNotInstalled as e:
            assert isinstance(e, ImportError)
            print("ERR", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install nvidia-dali-cuda130==" in out.stdout
    assert DaliNotInstalled.__mro__  # exported


# --------------------------------------------------------------------------- GPU


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_mixed_decode_matches_cpu_path(tmp_path):
    """nvJPEG / hardware JPEG decode + GPU resize vs libjpeg-turbo + CPU resize on the same JPEGs.
    Decoders differ in IDCT rounding, so a few gray levels apart at worst, under one on average."""
    store = LocalStorage(tmp_path, fsync=False)
    digits = load_digits()
    for fmt in ("png", "jpg"):
        write_tar(store, f"{fmt}.tar", [(f"{i:06d}", fmt, encode_image(digits.images[i], 40, fmt), i) for i in range(256)])
        shards = [str(tmp_path / f"{fmt}.tar")]
        gpu = WebDatasetLoader(shards, batch_size=64, spec=GRAY, training=False, device="gpu", device_id=0)
        cpu = WebDatasetLoader(shards, batch_size=64, spec=GRAY, training=False)
        xg, yg = _all(gpu)
        xc, yc = _all(cpu)
        assert xg.device == torch.device("cuda", 0) and yg.device == torch.device("cuda", 0)
        assert xg.dtype == torch.float32 and yg.tolist() == yc.tolist() == list(range(256))
        levels = (xg.cpu() - xc).abs() * 0.5 * 255
        worst, avg = (1.0 + 1e-3, 0.35) if fmt == "png" else (8.0, 1.0)
        assert levels.max() <= worst and levels.mean() < avg, (fmt, levels.max(), levels.mean())

        train = WebDatasetLoader(shards, batch_size=64, spec=GRAY, training=True, device="gpu", device_id=0, seed=5)
        a, b = list(train.epoch(1)), list(train.epoch(1))
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
