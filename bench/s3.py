"""S3 transfers side by side on one real S3 server: Ceph's RADOS Gateway on loopback.

    .venv/bin/python bench/s3.py                     # 1 GB checkpoint (4 shards), best of 3
    .venv/bin/python bench/s3.py --size-gb 4 --repeat 5 --json out.json

Starts its own one-node Ceph cluster (tests/rgw.py: monitor, memstore OSD, radosgw with the beast
frontend, all on 127.0.0.1; Debian's ceph packages from ``make system-deps``), uploads a
Llama-3-shaped bf16 checkpoint (bench/loaders.py) and measures, on that same endpoint:

* raw GET   boto3 alone: parallel 8 MiB ranged GETs over every shard (``--concurrency`` at a
            time), bytes read and dropped: the ceiling for anything that reads from this server;
* raw GET kept  the same, every body kept in memory until the round ends (freed after the
            clock), as a plain boto3 loader holds a checkpoint: what landing the bytes in memory
            never touched before costs (page faults and zeroing), which the loader pays too and
            the dropping row does not; a reference, not a target;
* loader    forgeline's loader, S3 → CPU tensors (``pipeline.loading.load``), fresh process,
            not counting the construction of its S3Storage (a boto3 client, ~0.1 s in a fresh
            process), as the raw GET row's client is built before its clock: compared with raw GET;
* loader+client  the same load, the S3Storage's construction counted: compared with Run:ai,
            whose streamer builds its S3 client inside its load;
* runai     Run:ai's model streamer, S3 → CPU tensors, fresh process (when installed:
            ``pip install -e ".[bench]"``);
* prewarm   S3 → /dev/shm: ``ShmTier.prewarm`` of the checkpoint published as a version (manifest
            with every shard's sha256 and crc32, as export writes it; shards server-side copies of
            the loader's objects): parallel ranged GETs into the tmpfs files, the crc32 of every
            landed file verified, atomic publish;
* prewarm-sha256  the same from a manifest without crc32 (as exports before it wrote them),
            which the tier checks by sha256: what the crc32 saves;
* raw PUT   boto3 alone: multipart uploads of every shard, 8 MiB parts, ``--concurrency`` parts
            at a time, from memory;
* upload    forgeline's ``S3Storage.write_atomic`` of every shard from a local file (the path of
            export, ingestion publish and the compile cache: sha256, CRC32 per part, concurrent
            parts, atomic completion).

Each row's best GB/s is compared with the reference row's best (the verdict on the target), and
beside it the median over the rounds of the two rows' ratio within each round (they run a moment
apart, so on a machine whose speed drifts this is the steadier comparison). Beside them: the
median over the rounds of the CPU seconds per GB its client
process spent (every thread, user + system; for the loaders, the child's, over its timed span)
and that the whole machine spent meanwhile (client, radosgw and OSD: ``/proc/stat``).

``--split-cores``: the Ceph daemons run on the first half of the CPUs and this process (with
every loader child) on the other half, as a storage server and its client do on separate hosts;
without it both sides share every core, and on a small machine each row then also measures how
much CPU the server has left (the rows that do more client work lose most).

``--tail EVERY MS``: every EVERY-th ranged GET is held MS milliseconds before it is sent, in the
raw GET, loader and pre-warm rows alike (Run:ai's C++ client cannot be reached, so its row and the
PUT rows are left out): the slow tail of a real object store's requests, which loopback lacks, and
which costs a reader that waits on its oldest request more than one that keeps the others going.

``--warmup`` rounds (default 1) run every row first and are not counted: on a machine just started
(a VM whose host backs its memory on first touch), the first rounds of every row measured up to 2x
slower than later ones, the rows that land bytes in new memory most.

The reading rows (raw GETs, loaders, pre-warms) run in another order each round, rotated by one,
so that none always runs first or right after the same row: on a small machine a row's rate depends
on what ran just before it (the raw GET measured 0.80-0.91 GB/s leading full rounds and 0.72-0.76
with only the pre-warm beside it, server on its own core). The writing rows follow them.

Deleted data is garbage-collected (``radosgw-admin gc process --include-all``) between rounds, so
the memstore OSD never holds more than the checkpoint plus one round of uploads. Targets: loader
≥ 90% of raw GET, loader+client ≥ 1.5x Run:ai; prewarm ≥ 80% of raw GET; upload ≥ 80% of raw PUT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rgw import RGWCluster  # noqa: E402  (one place starts the cluster: tests and bench)

MiB = 1 << 20
BUCKET = "bench"


def raw_get(client, keys: dict[str, int], part: int, workers: int, keep: list | None = None) -> int:
    """Every byte of every key in ``part``-sized ranged GETs, ``workers`` at a time; bytes read.
    Each body is dropped once read, unless ``keep`` is given: then every body is appended to it
    (held in memory, as a plain boto3 loader holds a checkpoint)."""
    jobs = [(k, at, min(part, size - at)) for k, size in keys.items() for at in range(0, size, part)]

    def get(job) -> int:
        k, at, n = job
        data = client.get_object(Bucket=BUCKET, Key=k, Range=f"bytes={at}-{at + n - 1}")["Body"].read()
        if keep is not None:
            keep.append(data)
        return len(data)

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(get, jobs))


def raw_put(client, blobs: dict[str, bytes], part: int, workers: int) -> int:
    """Multipart upload of every blob, ``part``-sized parts, ``workers`` parts at a time."""
    with ThreadPoolExecutor(workers) as pool:
        for key, data in blobs.items():
            uid = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
            view = memoryview(data)

            def put(i: int, uid=uid, key=key, view=view) -> dict:
                body = view[i * part : (i + 1) * part]
                r = client.upload_part(Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=i + 1, Body=bytes(body))
                return {"PartNumber": i + 1, "ETag": r["ETag"]}

            parts = list(pool.map(put, range(-(-len(data) // part))))
            client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=uid, MultipartUpload={"Parts": parts})
    return sum(len(d) for d in blobs.values())


def child_load(loader: str, files: list[Path], prefix: str, endpoint: str, env: dict, timeout: float,
               tail: tuple[int, float] | None = None) -> dict:
    """One load by bench/loaders.py in a fresh process (imports before the clock, tensors touched)."""
    spec = json.dumps({"loader": loader, "files": [str(f) for f in files],
                       "s3": {"bucket": BUCKET, "prefix": prefix, "endpoint": endpoint, "tail": tail}})
    try:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "loaders.py"), "--device", "cpu", "--child", spec],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


ROWS = ("raw GET (boto3)", "raw GET (boto3), bytes kept", "loader S3 → CPU", "loader+client S3 → CPU",
        "runai S3 → CPU", "prewarm S3 → shm", "prewarm S3 → shm, sha256-checked", "raw PUT (boto3 multipart)",
        "upload (write_atomic)")


def _row_order(name: str) -> int:
    """Where a row is printed: always in this order, whichever ran first in a round."""
    return ROWS.index(name) if name in ROWS else len(ROWS)


def main() -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from bench.loaders import add_tail, available, cpu_since, machine_cpu, make_checkpoint
    from pipeline.export import FORMAT, version_prefix
    from pipeline.shm_tier import ShmTier
    from pipeline.storage.s3 import S3Storage

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best of each row is reported")
    ap.add_argument("--warmup", type=int, default=1,
                    help="rounds of every row run first and not counted (a machine's first touches)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (raw and forgeline alike)")
    ap.add_argument("--part-mib", type=int, default=8)
    ap.add_argument("--root", default=str(ROOT / ".forgeline" / "bench" / "loaders"))
    ap.add_argument("--child-timeout", type=float, default=600)
    ap.add_argument("--only", nargs="+", choices=["raw-get", "raw-get-kept", "loader", "runai", "prewarm",
                                                    "prewarm-sha256", "raw-put", "upload"])
    ap.add_argument("--split-cores", action="store_true",
                    help="server on the first half of the CPUs, client on the other half")
    ap.add_argument("--tail", nargs=2, type=float, metavar=("EVERY", "MS"),
                    help="hold every EVERY-th ranged GET for MS milliseconds before it is sent (a real "
                         "store's slow tail) in the raw GET, loader and pre-warm rows; the Run:ai and "
                         "PUT rows, which it cannot reach or does not concern, are left out")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.repeat < 1 or a.warmup < 0:
        ap.error("--repeat must be at least 1 and --warmup at least 0")
    tail = None
    if a.tail:
        if a.tail[0] < 1 or a.tail[0] != int(a.tail[0]) or a.tail[1] < 0:
            ap.error("--tail takes a whole number of requests (at least 1) and milliseconds (at least 0)")
        tail = (int(a.tail[0]), a.tail[1])
    part = a.part_mib * MiB
    server_cpus = None
    if a.split_cores:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--split-cores needs at least 2 CPUs")
        server_cpus, client_cpus = set(cpus[: len(cpus) // 2]), set(cpus[len(cpus) // 2 :])
        os.sched_setaffinity(0, client_cpus)  # loader children inherit it

    disk = Path(a.root) / f"llama-{a.size_gb:g}gb"
    files = sorted(disk.glob("*.safetensors")) or make_checkpoint(disk, a.size_gb)
    size = sum(f.stat().st_size for f in files)
    # The checkpoint, one round of uploads and slack, in the OSD's RAM.
    rgw = RGWCluster(memstore_bytes=int(2.5 * size) + (1 << 30), rgw_threads=max(64, 4 * a.concurrency),
                     cpus=server_cpus)
    rgw.start()
    rows: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}  # per row and round: the client's CPU seconds per GB
    box: dict[str, list[float]] = {}  # the machine's (client, radosgw, OSD; all cores)
    errors: dict[str, str] = {}
    try:
        print(f"radosgw up in {rgw.started_in:.1f} s at {rgw.endpoint}", flush=True)
        env = {**os.environ, **rgw.env(), "AWS_ENDPOINT_URL": rgw.endpoint, "AWS_EC2_METADATA_DISABLED": "true",
               "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "AWS_REGION": rgw.region}
        client = rgw.client(max_pool_connections=max(10, a.concurrency))
        client.create_bucket(Bucket=BUCKET)
        store = S3Storage(BUCKET, "", endpoint_url=rgw.endpoint, region_name=rgw.region, part_size=part,
                          multipart_threshold=part, concurrency=a.concurrency,
                          max_pool_connections=max(32, 2 * a.concurrency), **rgw.credentials)
        infos = {}
        for f in files:  # the checkpoint, uploaded by forgeline (sha256 in its metadata)
            with open(f, "rb") as fh:
                infos[f.name] = store.write_atomic(f"ckpt/{f.name}", fh)
        keys = {f"ckpt/{f.name}": f.stat().st_size for f in files}
        # The same shards as published versions for the pre-warm: CopyObject, which RGW serves
        # by sharing the data (no second copy in the OSD's RAM), and a manifest: v1 as export
        # writes it, v0 as exports wrote it before crc32 was recorded.
        for version, fields in (("v1", ("sha256", "crc32")), ("v0", ("sha256",))):
            published = version_prefix("bench", version)
            for f in files:
                store.copy(f"ckpt/{f.name}", f"{published}/{f.name}")
            manifest = {"format": FORMAT, "model": "bench", "version": version,
                        "shards": [{"file": f.name, "bytes": f.stat().st_size,
                                    **{k: getattr(infos[f.name], k) for k in fields}} for f in files]}
            store.write_atomic(f"{published}/manifest.json", json.dumps(manifest).encode())
        blobs = {f"raw/{f.name}": f.read_bytes() for f in files}
        want = set(a.only or ["raw-get", "raw-get-kept", "loader", "runai", "prewarm", "prewarm-sha256",
                              "raw-put", "upload"])
        if tail:
            want -= {"runai", "raw-put", "upload"}
            add_tail(client, *tail)
            add_tail(store.client, *tail)  # after the uploads above: only the pre-warm's GETs wait
        peers = available("cpu", True)
        if "runai" in want and "runai" not in peers:
            errors["runai"] = "not installed (pip install -e '.[bench]')"
            want.discard("runai")
        shm_root = Path(tempfile.mkdtemp(prefix="forgeline-bench-s3-", dir="/dev/shm"))

        def timed(name: str, fn) -> None:
            t, c, b = time.perf_counter(), os.times(), machine_cpu()
            n = fn()
            rows.setdefault(name, []).append(n / (time.perf_counter() - t) / 1e9)
            cpu.setdefault(name, []).append(cpu_since(c) / n * 1e9)
            box.setdefault(name, []).append((machine_cpu() - b) / n * 1e9)

        def raw_get_row() -> None:
            timed("raw GET (boto3)", lambda: raw_get(client, keys, part, a.concurrency))

        def raw_get_kept_row() -> None:
            kept: list[bytes] = []
            timed("raw GET (boto3), bytes kept", lambda: raw_get(client, keys, part, a.concurrency, kept))
            # freed as the function returns, after the clock, as the loader's tensors are

        def child_row(loader: str, name: str) -> None:
            res = child_load(loader, files, "ckpt", rgw.endpoint, env, a.child_timeout, tail)
            if "gbps" not in res:
                errors[name] = res["error"]
                return
            per_gb = res["bytes"] / 1e9
            if "setup_seconds" in res:  # forgeline: with and without its client
                rows.setdefault(f"{name} S3 → CPU", []).append(res["bytes"] / (res["seconds"] - res["setup_seconds"]) / 1e9)
                cpu.setdefault(f"{name} S3 → CPU", []).append((res["cpu_seconds"] - res["setup_cpu_seconds"]) / per_gb)
                box.setdefault(f"{name} S3 → CPU", []).append(
                    (res["machine_cpu_seconds"] - res["setup_cpu_seconds"]) / per_gb)
                name = f"{name}+client"
            rows.setdefault(f"{name} S3 → CPU", []).append(res["gbps"])
            cpu.setdefault(f"{name} S3 → CPU", []).append(res["cpu_seconds"] / per_gb)
            box.setdefault(f"{name} S3 → CPU", []).append(res["machine_cpu_seconds"] / per_gb)

        def prewarm_row(version: str, row: str, r: int) -> None:
            tier = ShmTier(shm_root / f"r{r}")
            timed(row, lambda: tier.prewarm(store, "bench", version).bytes)
            subprocess.run(["rm", "-rf", str(shm_root / f"r{r}")], check=False)

        reads = [fn for name, fn in (
            ("raw-get", lambda r: raw_get_row()), ("raw-get-kept", lambda r: raw_get_kept_row()),
            ("loader", lambda r: child_row("forgeline", "loader")), ("runai", lambda r: child_row("runai", "runai")),
            ("prewarm", lambda r: prewarm_row("v1", "prewarm S3 → shm", r)),
            ("prewarm-sha256", lambda r: prewarm_row("v0", "prewarm S3 → shm, sha256-checked", r)),
        ) if name in want]
        for r in range(a.warmup + a.repeat):
            if r == a.warmup:  # the warm-up rounds are not counted
                rows.clear(), cpu.clear(), box.clear()
            # Each round starts the reading rows one further along, so that no row always runs
            # first or right after another (a row's rate here depends on what ran just before it).
            first = r % len(reads) if reads else 0
            for fn in reads[first:] + reads[:first]:
                fn(r)
            if "raw-put" in want:
                timed("raw PUT (boto3 multipart)", lambda: raw_put(client, blobs, part, a.concurrency))
            if "upload" in want:
                def upload() -> int:
                    n = 0
                    for f in files:
                        with open(f, "rb") as fh:
                            n += store.write_atomic(f"up/{f.name}", fh).size
                    return n

                timed("upload (write_atomic)", upload)
            for o in store.list("raw") + store.list("up"):  # free the round's uploads from the OSD's RAM
                store.delete(o.key)
            rgw.gc()
            label = f"warm-up {r + 1}/{a.warmup}" if r < a.warmup else f"round {r - a.warmup + 1}/{a.repeat}"
            print(f"{label}: " + ", ".join(f"{k} {rows[k][-1]:.2f}" for k in sorted(rows, key=_row_order)), flush=True)
        subprocess.run(["rm", "-rf", str(shm_root)], check=False)
    finally:
        rgw.stop()

    get_row, put_row, kept_row = "raw GET (boto3)", "raw PUT (boto3 multipart)", "raw GET (boto3), bytes kept"
    best = {k: max(rows[k]) for k in sorted(rows, key=_row_order)}
    targets = {  # row: [(reference row, target factor or None, its name in the table)]
        kept_row: [(get_row, None, "raw GET")],
        "loader S3 → CPU": [(get_row, 0.9, "raw GET"), (kept_row, None, "raw GET kept")],
        "loader+client S3 → CPU": [(get_row, None, "raw GET"), ("runai S3 → CPU", 1.5, "Run:ai")],
        "runai S3 → CPU": [(get_row, None, "raw GET")],
        "prewarm S3 → shm": [(get_row, 0.8, "raw GET")],
        "prewarm S3 → shm, sha256-checked": [(get_row, None, "raw GET")],
        "upload (write_atomic)": [(put_row, 0.8, "raw PUT")],
    }
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, {platform.platform()}"
    table = Table(title=f"S3 on Ceph RGW (loopback, memstore): {size / 1e9:.2f} GB, {len(files)} shards, "
                        f"{a.part_mib} MiB parts, {a.concurrency} in flight; best of {a.repeat} after {a.warmup} "
                        f"warm-up; {date.today()}"
                        + (f"; server on CPUs {sorted(server_cpus)}, client on the rest" if server_cpus else "")
                        + (f"; every {tail[0]}th ranged GET held {tail[1]:g} ms" if tail else ""))
    for col in ("row", "GB/s", "vs", "target", "client CPU s/GB", "machine CPU s/GB"):
        table.add_column(col, justify="left" if col == "row" else "right")
    report = []
    for name, v in best.items():
        cpu_med = statistics.median(cpu[name]) if cpu.get(name) else None
        box_med = statistics.median(box[name]) if box.get(name) else None
        vs, tgt = [], []
        for ref_row, factor, what in targets.get(name, []):
            ref = best.get(ref_row)
            if ref:
                # best against best (the verdict), and the median of the rounds' own ratios (the
                # two rows a moment apart in one VM state: steadier when the machine drifts)
                same = len(rows[name]) == len(rows[ref_row])  # a row that failed a round is not paired
                paired = statistics.median(x / y for x, y in zip(rows[name], rows[ref_row])) if same else None
                vs.append(f"{v / ref:.3f}x {what}"  # 3 places: 0.899x is not 0.9x
                          + (f" (per round {paired:.2f}x)" if paired is not None else ""))
                if factor:
                    ok = v >= factor * ref
                    tgt.append(f"≥{factor:g}x {what}: {'met' if ok else 'NOT met'}")
            elif factor:
                tgt.append(f"≥{factor:g}x {what}: no {what} row")
        table.add_row(name, f"{v:.2f}", ", ".join(vs), ", ".join(tgt),
                      "" if cpu_med is None else f"{cpu_med:.2f}", "" if box_med is None else f"{box_med:.2f}")
        report.append({"row": name, "gbps": v, "all": rows[name], "vs": vs, "targets": tgt,
                       "client_cpu_s_per_gb": cpu.get(name), "machine_cpu_s_per_gb": box.get(name)})
    for name, err in errors.items():
        table.add_row(name, "", "", escape(err))  # '.[bench]' is text, not rich markup
    Console(width=200).print(table)
    print(f"machine: {machine}")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": str(date.today()), "machine": machine, "bytes": size,
                                            "concurrency": a.concurrency, "part_mib": a.part_mib, "warmup": a.warmup,
                                            "server_cpus": sorted(server_cpus) if server_cpus else None,
                                            "tail": tail, "rows": report, "errors": errors}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
