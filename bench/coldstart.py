"""Cold start against a real S3 server: how long a load waits before its first byte of weights.

    .venv/bin/python bench/coldstart.py                       # 32 shards, 8 versions, 20 ms RTT
    .venv/bin/python bench/coldstart.py --shards 64 --rtt-ms 30 --json out.json

On loopback a request takes about a millisecond; to a real object store it takes a round trip of
tens (S3 in-region: ~10-30 ms to the first byte of a small object). So the time a load spends on
requests that wait for each other (the manifest, the completeness check, the shard headers) is
invisible here and dominant there. This bench starts its own Ceph RADOS Gateway (tests/rgw.py),
publishes ``--versions`` versions of a ``--shards``-shard model (small tensors: the weights' bytes
are not what is measured), promotes the newest, and delays every request by ``--rtt-ms`` in the
client (botocore's ``before-send`` event), as a round trip to a real store would.

For ``<model>/<newest version>``, ``<model>/latest`` and ``<model>/production`` it reports,
median of ``--repeat`` loads in fresh S3Storage objects (new connections):

* header s    ``LoadReport.seconds_header``: from the call to every shard's header parsed
              (resolving the reference, the manifest, the completeness check, the headers); a
              load cannot wait fewer than two round trips (a manifest, then the shards);
* header s, no delay  the same without the added delay: what the requests cost in CPU here
              (botocore spends ~1.5 ms of client CPU on each); the difference is the time spent
              waiting on round trips;
* requests    how many the load sent, weights included (one GET per 4 KiB shard), by HTTP method
              (a LIST is a GET).

and for ``forgeline load <model>/latest`` and ``<model>/production`` (``shm_tier.resolve_source``,
then the load: the CLI's path, with a shm tier that holds another version) the same figures; then
the same for a pre-warm of ``<model>/production`` into an empty shm tier (``ShmTier.prewarm``:
resolve, manifest, every file landed and checked, the manifest written last), and for a server's
load of a published DigitsCNN (``serving.loader.load_version``: manifest, golden outputs, weights,
the golden check; what a hot swap to a version not in the tier waits for; each load a version the
process has not loaded before): their seconds, with and
without the delay, and their requests.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rgw import RGWCluster  # noqa: E402  (one place starts the cluster: tests and bench)

BUCKET = "bench"


def main() -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from pipeline import export, promotion
    from pipeline.loading import LoadReport, load
    from pipeline.models import build_model
    from pipeline.serving.loader import load_version, release
    from pipeline.shm_tier import ShmTier, resolve_source
    from pipeline.storage.s3 import S3Storage

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--versions", type=int, default=8)
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="added to every request, in the client")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.shards < 1 or a.versions < 1 or a.rtt_ms <= 0:
        ap.error("--shards and --versions must be at least 1 and --rtt-ms positive")

    rgw, tier_root = RGWCluster(memstore_bytes=1 << 30).start(), None
    try:
        print(f"radosgw up in {rgw.started_in:.1f} s at {rgw.endpoint}", flush=True)
        rgw.client().create_bucket(Bucket=BUCKET)

        def storage() -> S3Storage:
            return S3Storage(BUCKET, "", endpoint_url=rgw.endpoint, region_name=rgw.region, **rgw.credentials)

        store = storage()
        # one 4 KiB tensor per shard: the shard limit puts each in its own file
        state = {f"layers.{i}.weight": torch.full((1024,), float(i)) for i in range(a.shards)}
        versions = [f"v{i:02d}" for i in range(1, a.versions + 1)]
        for v in versions:
            manifest = export.export(state, store, "cold", v, max_shard_bytes=4096)
        assert len(manifest["shards"]) == a.shards, len(manifest["shards"])
        promotion.promote(store, "cold", versions[-1])
        served = [f"v{i:02d}" for i in range(1, 2 * a.repeat + 1)]  # one per server load: none seen before
        for i, v in enumerate(served):
            torch.manual_seed(i)
            m = build_model("digits_cnn", width=16).eval()
            export.export(export.from_module(m, architecture="digits_cnn", model_kwargs={"width": 16}), store,
                          "served", v, golden=export.golden_outputs(m, export.golden_input((1, 28, 28))))

        last = f"layers.{a.shards - 1}.weight"
        shm_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None

        def delayed_storage(delay: float) -> tuple[S3Storage, Counter]:
            """A fresh S3Storage whose every request waits ``delay`` s first, and its requests by
            method (counted as they are sent). The previous one's client, cyclic garbage, is
            collected here, not in the timed call."""
            s, seen = storage(), Counter()

            def delayed(request, **_):
                seen[request.method] += 1
                time.sleep(delay)

            s.client.meta.events.register("before-send.s3", delayed)
            gc.collect()
            return s, seen

        def timed_load(ref: str, delay: float) -> tuple[float, float, Counter]:
            """(header s, total s, requests by method) of one load in a fresh S3Storage."""
            s, seen = delayed_storage(delay)
            rep = LoadReport()
            t = time.perf_counter()
            got = load(ref, storage=s, report=rep)
            total = time.perf_counter() - t
            assert torch.equal(got[last], state[last])
            return rep.seconds_header, total, seen

        def timed_cli(ref: str, delay: float) -> tuple[float, float, Counter]:
            """The same, as ``forgeline load <ref>`` does it: where to read from (a shm tier that
            holds an older version, so the answer is the storage), then the load."""
            s, seen = delayed_storage(delay)
            rep = LoadReport()
            t = time.perf_counter()
            source, where = resolve_source(*ref.split("/"), tier=tier, local_cache=None, remote=s)
            got = load(source, report=rep)  # its header seconds count the resolve (Source.seconds)
            total = time.perf_counter() - t
            assert where == "remote" and torch.equal(got[last], state[last])
            return rep.seconds_header, total, seen

        tier_root = tempfile.mkdtemp(prefix="forgeline-coldstart-", dir=shm_dir)
        tier = ShmTier(tier_root)
        tier.prewarm(store, "cold", versions[0])
        results = {}
        loads = [(ref, ref, timed_load) for ref in (f"cold/{versions[-1]}", "cold/latest", "cold/production")]
        loads += [(f"forgeline load {ref}", ref, timed_cli) for ref in ("cold/latest", "cold/production")]
        for row, ref, timed in loads:
            runs = [timed(ref, a.rtt_ms / 1000) for _ in range(a.repeat)]
            floor = [timed(ref, 0.0)[0] for _ in range(a.repeat)]
            results[row] = {"header_s": statistics.median(r[0] for r in runs),
                            "total_s": statistics.median(r[1] for r in runs),
                            "header_s_no_delay": statistics.median(floor), "requests": dict(runs[-1][2])}

        def timed_prewarm(delay: float) -> tuple[float, Counter]:
            """(seconds, requests by method) of one pre-warm of the production version into an
            empty shm tier, in a fresh S3Storage."""
            s, seen = delayed_storage(delay)
            root = tempfile.mkdtemp(prefix="forgeline-coldstart-", dir=shm_dir)
            try:
                t = time.perf_counter()
                ShmTier(root).prewarm(s, "cold", "production")
                return time.perf_counter() - t, seen
            finally:
                shutil.rmtree(root, ignore_errors=True)

        def timed_serve(delay: float) -> tuple[float, Counter]:
            """(seconds, requests by method) of one server load of a version of ``served`` this
            process has not loaded (its golden outputs not kept yet), in a fresh S3Storage."""
            s, seen = delayed_storage(delay)
            t = time.perf_counter()
            loaded = load_version(s, "served", served.pop())
            seconds = time.perf_counter() - t
            assert loaded.golden["checked"]
            release(loaded)
            return seconds, seen

        for row, timed in (("prewarm cold/production", timed_prewarm), ("server load served/<new>", timed_serve)):
            runs = [timed(a.rtt_ms / 1000) for _ in range(a.repeat)]
            floor = [timed(0.0)[0] for _ in range(a.repeat)]
            results[row] = {"header_s": None, "total_s": statistics.median(r[0] for r in runs),
                            "header_s_no_delay": None, "total_s_no_delay": statistics.median(floor),
                            "requests": dict(runs[-1][1])}
    finally:
        rgw.stop()
        if tier_root:
            shutil.rmtree(tier_root, ignore_errors=True)

    table = Table(title=f"cold start: {a.shards} shards, {a.versions} versions, {a.rtt_ms:g} ms per request "
                        f"(median of {a.repeat})")
    for col in ("load", "header s", "header s, no delay", "total s", "total s, no delay", "requests"):
        table.add_column(col, justify="left" if col in ("load", "requests") else "right")

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for ref, r in results.items():
        table.add_row(ref, cell(r["header_s"]), cell(r["header_s_no_delay"]), cell(r["total_s"]),
                      cell(r.get("total_s_no_delay")), ", ".join(f"{k} {n}" for k, n in sorted(r["requests"].items())))
    Console(width=160).print(table)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "shards": a.shards, "versions": a.versions, "rtt_ms": a.rtt_ms, "repeat": a.repeat,
            "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
