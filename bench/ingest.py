"""Ingestion throughput and memory: forgeline's shard ingestion vs a plain sequential read of the
same files, at each volume and each number of image-checking worker processes, each measurement in
a fresh process; the plain read runs in the same rounds, so every ratio compares like with like.

    .venv/bin/python bench/ingest.py                    # 100 MB and 2 GB (generated once, reused)
    .venv/bin/python bench/ingest.py --sizes 100MB --workers 0 1 2 --repeat 5 --json out.json
    # side by side with another commit's ingestion (a `git archive` of it), same rounds:
    git archive HEAD~3 pipeline | tar -x -C /tmp/before
    .venv/bin/python bench/ingest.py --sizes 100MB --workers 0 2 --baseline-src /tmp/before --baseline-workers 4

``--workers``: 0 checks images in the ingesting process, N in N worker processes (the rounds run
every case once each, in turn, ``--repeat`` times; min and median are reported). Peak RSS is the
ingesting process's own ``ru_maxrss``, and, separately, the largest of its worker processes'. "CPU
s/GB" is the CPU time of the ingesting process and its workers per GB: on a shared machine, where
the wall-clock rates depend on what else runs, it is the comparison that holds. Before
every measurement the files' pages are dropped from the page cache (``posix_fadvise(DONTNEED)``),
so both the plain read and ingestion read from the device. Ingestion also writes the published copy
(fsynced and re-read for verification by LocalStorage), the plain read does not.
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
    t, cpu = time.perf_counter(), cpu_seconds()
    n = 0
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    secs = time.perf_counter() - t
    return {"bytes": n, "seconds": secs, "cpu_seconds": cpu_seconds() - cpu, "peak_rss_mb": peak_rss_mb()}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def workers_stats() -> tuple[float, float]:
    """``(largest VmHWM MB, CPU seconds in all)`` of this process's children (the image-checking
    workers, still running: RUSAGE_CHILDREN would not count them)."""
    me, peak, ticks = str(os.getpid()), 0, 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
            peak = max(peak, int(fields["VmHWM"].split()[0]))
            utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # fields 14, 15 of proc(5)
            ticks += int(utime) + int(stime)
    return peak / 1024, ticks / os.sysconf("SC_CLK_TCK")


def child_ingest(root: str, batch: str, workers: int, src: str | None = None) -> dict:
    if src:  # another tree's ingestion (the baseline), with this tree's storage for the set-up
        sys.path.insert(0, src)
        for m in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
            del sys.modules[m]
    from pipeline.ingest import ingest_shards
    from pipeline.storage import LocalStorage

    store = LocalStorage(root)
    store.delete_prefix(f"raw/shards/{batch}")
    drop_cache([store.local_path(o.key) for o in store.list(f"incoming/{batch}")])
    t, cpu = time.perf_counter(), cpu_seconds()
    r = ingest_shards(store, batch, workers=workers)
    secs, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    assert not r.quarantined, r.quarantined
    workers_rss, workers_cpu = workers_stats()
    return {"bytes": r.bytes, "samples": r.samples, "seconds": secs, "cpu_seconds": cpu + workers_cpu,
            "peak_rss_mb": peak_rss_mb(), "workers_peak_rss_mb": workers_rss}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["100MB", "2GB"])
    ap.add_argument("--root", default=str(ROOT / ".forgeline" / "bench" / "ingest"))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, os.cpu_count() or 1],
                    help="image-checking worker processes, one case each (0: in the ingesting process)")
    ap.add_argument("--baseline-src", help="also measure the ingestion of this source tree (another commit)")
    ap.add_argument("--baseline-workers", type=int, default=4, help="its `workers` argument")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; min and median are reported")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, root, batch, *rest = args.child
        res = child_plain_read(root, batch) if kind == "read" else child_ingest(root, batch, int(rest[0]), *rest[1:])
        print(json.dumps(res))
        return 0

    console = Console()
    store = LocalStorage(args.root, fsync=False)
    cases = [("plain read", ["read"])]
    if args.baseline_src:
        cases.append((f"baseline, workers={args.baseline_workers}",
                      ["ingest", str(args.baseline_workers), str(Path(args.baseline_src).resolve())]))
    cases += [(f"workers={w}", ["ingest", str(w)]) for w in args.workers]
    rows = []
    for size_text in args.sizes:
        size = parse_size(size_text)
        batch = f"synthetic-{size_text.lower()}"
        if not store.exists(f"incoming/{batch}/{datagen.READY_MARKER}"):
            with console.status(f"generating {size_text} of shards"):
                datagen.write_synthetic_shards(store, f"incoming/{batch}/shards", size)
                store.write_atomic(f"incoming/{batch}/{datagen.READY_MARKER}", b"{}")
        runs: dict[str, list[dict]] = {name: [] for name, _ in cases}
        for _ in range(args.repeat):
            for name, (kind, *rest) in cases:
                runs[name].append(run_child(kind, args.root, batch, *rest))
        read_med = statistics.median(r["bytes"] / 1e6 / r["seconds"] for r in runs["plain read"])
        for name, rs in runs.items():
            mbs = [r["bytes"] / 1e6 / r["seconds"] for r in rs]
            rows.append({
                "size": size_text, "case": name, "bytes": rs[0]["bytes"], "samples": rs[0].get("samples"),
                "mb_s_max": max(mbs), "mb_s_median": statistics.median(mbs), "mb_s_all": mbs,
                "vs_plain_read": statistics.median(mbs) / read_med,
                # CPU (this process and its workers) per GB: what the work costs, however busy the machine
                "cpu_s_per_gb_median": statistics.median(r["cpu_seconds"] / r["bytes"] * 1e9 for r in rs),
                "samples_s_median": statistics.median(r["samples"] / r["seconds"] for r in rs) if "samples" in rs[0] else None,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                "workers_peak_rss_mb": max(r.get("workers_peak_rss_mb", 0) for r in rs),
            })
    table = Table(title=f"ingestion ({os.cpu_count()} CPUs; {args.repeat} rounds: best / median)")
    for col in ("size", "case", "MB/s best", "MB/s median", "vs plain read", "CPU s/GB", "samples/s", "peak RSS MB",
                "worker RSS MB"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        table.add_row(r["size"], r["case"], f"{r['mb_s_max']:.0f}", f"{r['mb_s_median']:.0f}", f"{r['vs_plain_read']:.1%}",
                      f"{r['cpu_s_per_gb_median']:.2f}",
                      f"{r['samples_s_median']:,.0f}" if r["samples_s_median"] else "", f"{r['peak_rss_mb']:.0f}",
                      f"{r['workers_peak_rss_mb']:.0f}" if r["workers_peak_rss_mb"] else "")
    console.print(table)
    for w in args.workers:
        mine = [r for r in rows if r["case"] == f"workers={w}"]
        if len(mine) >= 2:
            ratio = mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"]
            console.print(f"workers={w}: peak RSS {mine[-1]['size']} / {mine[0]['size']}: {ratio:.2f}x (target ≤ 1.20x)")
    if args.baseline_src:
        for size_text in args.sizes:
            base = next(r for r in rows if r["size"] == size_text and r["case"].startswith("baseline"))
            for r in rows:
                if r["size"] == size_text and r["case"].startswith("workers="):
                    console.print(f"{size_text} {r['case']}: {r['mb_s_median'] / base['mb_s_median']:.2f}x the baseline "
                                  f"(median), {r['mb_s_max'] / base['mb_s_max']:.2f}x (best); "
                                  f"{base['cpu_s_per_gb_median'] / r['cpu_s_per_gb_median']:.2f}x less CPU per byte")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
