"""Ingestion throughput and memory: forgeline's shard ingestion vs a plain sequential read of the
same files, at two volumes, each measurement in a fresh process.

    .venv/bin/python bench/ingest.py                    # 100 MB and 2 GB (generated once, reused)
    .venv/bin/python bench/ingest.py --sizes 100MB 500MB --workers 2 --json out.json

Peak RSS is the child process's own ``ru_maxrss``. Before every measurement the files' pages are
dropped from the page cache (``posix_fadvise(DONTNEED)``), so both the plain read and ingestion
read from the device. Ingestion also writes the published copy (fsynced), the plain read does not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.settings import parse_size  # noqa: E402
from pipeline import datagen  # noqa: E402
from pipeline.storage import LocalStorage  # noqa: E402


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_plain_read(root: str, batch: str) -> dict:
    files = sorted((Path(root) / "incoming" / batch).rglob("*.tar"))
    drop_cache(files)
    t = time.perf_counter()
    n = 0
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    secs = time.perf_counter() - t
    return {"bytes": n, "seconds": secs, "peak_rss_mb": peak_rss_mb()}


def child_ingest(root: str, batch: str, workers: int) -> dict:
    from pipeline.ingest import ingest_shards

    store = LocalStorage(root)
    store.delete_prefix(f"raw/shards/{batch}")
    drop_cache([store.local_path(o.key) for o in store.list(f"incoming/{batch}")])
    t = time.perf_counter()
    r = ingest_shards(store, batch, workers=workers)
    secs = time.perf_counter() - t
    assert not r.quarantined, r.quarantined
    return {"bytes": r.bytes, "samples": r.samples, "seconds": secs, "peak_rss_mb": peak_rss_mb()}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["100MB", "2GB"])
    ap.add_argument("--root", default=str(ROOT / ".forgeline" / "bench" / "ingest"))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, root, batch, *rest = args.child
        res = child_plain_read(root, batch) if kind == "read" else child_ingest(root, batch, int(rest[0]))
        print(json.dumps(res))
        return 0

    console = Console()
    store = LocalStorage(args.root, fsync=False)
    rows = []
    for size_text in args.sizes:
        size = parse_size(size_text)
        batch = f"synthetic-{size_text.lower()}"
        if not store.exists(f"incoming/{batch}/{datagen.READY_MARKER}"):
            with console.status(f"generating {size_text} of shards"):
                datagen.write_synthetic_shards(store, f"incoming/{batch}/shards", size)
                store.write_atomic(f"incoming/{batch}/{datagen.READY_MARKER}", b"{}")
        best = {}
        for kind in ("read", "ingest"):
            runs = [run_child(kind, args.root, batch, str(args.workers)) for _ in range(args.repeat)]
            best[kind] = min(runs, key=lambda r: r["seconds"])
        rd, ig = best["read"], best["ingest"]
        rows.append({
            "size": size_text,
            "bytes": ig["bytes"],
            "samples": ig["samples"],
            "plain_read_mb_s": rd["bytes"] / 1e6 / rd["seconds"],
            "ingest_mb_s": ig["bytes"] / 1e6 / ig["seconds"],
            "ingest_samples_s": ig["samples"] / ig["seconds"],
            "ingest_seconds": ig["seconds"],
            "ingest_peak_rss_mb": ig["peak_rss_mb"],
            "plain_read_peak_rss_mb": rd["peak_rss_mb"],
        })
    table = Table(title=f"ingestion ({os.cpu_count()} CPUs, workers={args.workers}, best of {args.repeat})")
    for col in ("size", "samples", "plain read MB/s", "ingest MB/s", "ingest samples/s", "ingest peak RSS MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["size"], f"{r['samples']:,}", f"{r['plain_read_mb_s']:.0f}", f"{r['ingest_mb_s']:.0f}",
                      f"{r['ingest_samples_s']:,.0f}", f"{r['ingest_peak_rss_mb']:.0f}")
    console.print(table)
    if len(rows) >= 2:
        ratio = rows[-1]["ingest_peak_rss_mb"] / rows[0]["ingest_peak_rss_mb"]
        console.print(f"peak RSS {rows[-1]['size']} / {rows[0]['size']}: {ratio:.2f}x (target ≤ 1.20x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
