"""What a drift check costs per batch: image-feature extraction (decode + polars features) and the
Evidently comparison for the table (65 columns) and the image features, and writing the table's HTML
report, at a few batch sizes.

    .venv/bin/python bench/drift.py                         # 1,797 and 17,970 rows at 32 px; 1,797 at 224 px
    .venv/bin/python bench/drift.py --rows 1797 --image-size 64 --repeat 3

Rows beyond the 1,797 real digits are the digits repeated (ids offset); the "current" side is the
shifted copy, so every comparison really finds drift. Times are the best of ``--repeat`` runs in
this process, after one warm-up comparison (Evidently's import and first report cost ~5 s once per
process, which a long-running code server pays once).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline import datagen, drift, ingest  # noqa: E402
from pipeline.storage import LocalStorage  # noqa: E402


def tiled(rows: int, seed: int = 0) -> datagen.Digits:
    d = datagen.load_digits(seed=seed)
    idx = np.arange(rows) % len(d)
    ids = np.arange(rows, dtype=np.int64) + seed * 10_000_000
    return datagen.Digits(d.images[idx], d.labels[idx], d.splits[idx], ids)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(rows: int, image_size: int, repeat: int) -> dict:
    store = LocalStorage(tempfile.mkdtemp(prefix="forgeline-bench-drift-"), fsync=False)
    ref_data = tiled(rows)
    for batch, data in (("ref", ref_data), ("cur", datagen.shift(ref_data))):
        datagen.write_batch(store, f"incoming/{batch}", data, image_size=image_size, samples_per_shard=1024)
        ingest.ingest_shards(store, batch)
        ingest.ingest_table(store, batch)
    policy = drift.DriftPolicy(max_rows=max(rows, 10))
    feats = best(lambda: drift.batch_image_features(store, "ref", max_images=rows, cache=None), repeat)
    f_ref = drift.batch_image_features(store, "ref", max_images=rows, cache=None)
    f_cur = drift.batch_image_features(store, "cur", max_images=rows, cache=None)
    t_ref, t_cur = drift.table_rows(store, ["ref"]), drift.table_rows(store, ["cur"])
    image_cmp = best(lambda: drift.compare(f_ref, f_cur, view="image", policy=policy), repeat)
    table_cmp = best(lambda: drift.compare(t_ref, t_cur, view="table", policy=policy), repeat)
    res, snap = drift.compare(t_ref, t_cur, view="table", policy=policy)
    report = best(lambda: drift.write_report(store, "reports/bench.html", snap), repeat)
    return {"report_s": report, "report_mb": store.stat("reports/bench.html").size / 1e6,
            "rows": rows, "image_size": image_size, "features_s": feats, "images_per_s": rows / feats,
            "image_compare_s": image_cmp, "table_compare_s": table_cmp, "table_columns": res.columns,
            "table_share": res.share}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", help="batch sizes (rows = images)")
    ap.add_argument("--image-size", type=int, default=None, help="image side in pixels for --rows")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cases = [(r, args.image_size or 32) for r in args.rows] if args.rows else [(1797, 32), (17970, 32), (1797, 224)]
    # warm-up: Evidently's import and first report are a one-off per process
    w = drift.image_features([np.zeros((4, 4, 1), np.uint8)] * 20, list(range(10)) * 2)
    drift.compare(w, w, view="warmup")
    results = [measure(r, s, args.repeat) for r, s in cases]
    table = Table(title="drift check cost per batch (best of %d)" % args.repeat)
    for col in ("rows", "px", "features s", "images/s", "image compare s", "table compare s (cols)",
                "table HTML report s (MB)", "table drift share"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(f"{r['rows']:,}", str(r["image_size"]), f"{r['features_s']:.2f}", f"{r['images_per_s']:,.0f}",
                      f"{r['image_compare_s']:.2f}", f"{r['table_compare_s']:.2f} ({r['table_columns']})",
                      f"{r['report_s']:.2f} ({r['report_mb']:.1f})",
                      f"{r['table_share']:.2f}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
