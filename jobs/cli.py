"""``forgeline``: list and launch the jobs on the embedded instance, generate data, run the demo.

    forgeline jobs                                   list jobs and their assets
    forgeline launch lifecycle --partition B [-c run_config.yaml]
    forgeline gen digits --batch B [--shifted] [--image-size 32]
    forgeline gen synthetic --batch B --size 2GB
    forgeline load digits/latest --device cuda:0 [--json]   fast load, per-stage throughput
    forgeline report [--asset NAME] [--json]         latest timings, throughput, latencies, checks per asset
    forgeline withdraw B [--shard NAME] --reason T   take a published batch/shard out of training (recorded)
    forgeline demo                                   data → lifecycle → summary
    forgeline ui                                     Dagster UI on the same instance
    forgeline serve [--models a,b] [--port 8000]     model server (KServe/Triton v2 HTTP); `serve status`

The instance is ``$DAGSTER_HOME`` (default: ``.forgeline/dagster_home`` in the project, SQLite), the
same one ``make ui`` opens, so runs launched here show up in the UI.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import settings

console = Console()

_DAGSTER_YAML = """\
# Embedded defaults: SQLite run/event/schedule storage under this folder.
telemetry:
  enabled: false
# GPU steps (assets with pool="gpu") run one at a time per instance unless raised here.
concurrency:
  pools:
    default_limit: 1
"""


def ensure_instance_home() -> Path:
    """Point DAGSTER_HOME at the project-local instance unless the user chose one."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.home() / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(_DAGSTER_YAML)
    return home


def parse_size(text: str) -> int:
    """An argparse type for sizes ('2GB', '512MiB', '1000'): :func:`pipeline.settings.parse_size`."""
    try:
        return settings.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _defs():
    from jobs.definitions import build_defs

    return build_defs()  # read the environment now, not at import


# ---------------------------------------------------------------------------------------------
# Running a job with a live view of its steps
# ---------------------------------------------------------------------------------------------


def run_job(job_name: str, *, partition: str | None = None, run_config: dict | None = None, quiet: bool = False,
            tags: dict | None = None):
    """Execute ``job_name`` on the embedded instance, showing step progress. Returns the result.

    A partition that does not exist yet is added first (dynamic partitions), so
    ``forgeline launch ingest --partition new-batch`` is all a user needs.
    """
    import dagster as dg

    ensure_instance_home()
    defs = _defs()
    job = defs.resolve_job_def(job_name)
    instance = dg.DagsterInstance.get()
    if partition is not None:
        pdef = job.partitions_def
        if pdef is None:
            raise SystemExit(f"job {job_name!r} is not partitioned; drop --partition")
        if isinstance(pdef, dg.DynamicPartitionsDefinition) and not instance.has_dynamic_partition(pdef.name, partition):
            if pdef.name == "batches":  # only a valid name of a batch that has landed completely
                from jobs.withdraw_cli import check_new_partition

                check_new_partition(defs.resources["storage"].client(), partition)
            instance.add_dynamic_partitions(pdef.name, [partition])
    elif job.partitions_def is not None:
        raise SystemExit(f"job {job_name!r} is partitioned: pass --partition (see `forgeline batches`)")

    # The progress view replaces Dagster's DEBUG console log; the UI keeps the full event log.
    run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}, **(run_config or {})}
    steps = sorted(job.graph.node_names())
    run_id = str(uuid.uuid4())
    box: dict = {}

    def target():
        try:
            box["result"] = job.execute_in_process(
                run_config=run_config, instance=instance, partition_key=partition, run_id=run_id, raise_on_error=False,
                tags=tags,
            )
        except BaseException as e:  # surfaced below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t0 = time.perf_counter()
    t.start()
    state = {s: "waiting" for s in steps}
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        task = progress.add_task(f"{job_name}" + (f" [{partition}]" if partition else ""), total=len(steps))
        cursor = 0
        while True:
            alive = t.is_alive()
            records = instance.all_logs(run_id)
            for rec in records[cursor:]:
                ev = rec.dagster_event
                if ev is None or ev.step_key is None:
                    continue
                step = ev.step_key
                kind = ev.event_type_value
                if kind == "STEP_START":
                    state[step] = "running"
                    progress.console.log(f"[cyan]▶ {step}")
                elif kind == "STEP_SUCCESS":
                    state[step] = "ok"
                    progress.console.log(f"[green]✔ {step}[/] ({ev.event_specific_data.duration_ms / 1000:.2f}s)")
                elif kind == "STEP_FAILURE":
                    state[step] = "failed"
                    err = ev.event_specific_data.error
                    progress.console.log(f"[red]✘ {step}: {err.message.strip() if err else 'failed'}")
                elif kind == "ASSET_CHECK_EVALUATION":
                    d = ev.event_specific_data
                    mark = "[green]pass" if d.passed else f"[yellow]{d.severity.value.lower()}"
                    progress.console.log(f"  check {d.asset_key.to_user_string()}:{d.check_name} {mark}")
            cursor = len(records)
            progress.update(task, completed=sum(v in ("ok", "failed") for v in state.values()))
            if not alive:
                break
            time.sleep(0.2)
    if "error" in box:
        raise box["error"]
    result = box["result"]
    secs = time.perf_counter() - t0
    status = "[green]SUCCESS" if result.success else "[red]FAILURE"
    if not quiet:
        console.print(f"{status}[/] run {run_id} ({secs:.1f}s) — view it with `make ui`")
    return result


def materialization_table(result) -> Table:
    """What a run produced and where: one row per materialized asset."""
    table = Table(title="Produced")
    for col in ("asset", "partition", "where", "highlights"):
        table.add_column(col, overflow="fold")
    for ev in result.get_asset_materialization_events():
        import dagster as dg

        mat = ev.event_specific_data.materialization
        paths = [v.value for v in mat.metadata.values() if isinstance(v, dg.PathMetadataValue)]
        where = paths[0] if paths else ""
        md = {k: v.value for k, v in mat.metadata.items()}
        highlights = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in md.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        table.add_row(mat.asset_key.to_user_string(), mat.partition or "", str(where), highlights)
    return table


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_jobs(args) -> int:
    defs = _defs()
    table = Table(title="forgeline jobs")
    for col in ("job", "partitioned by", "assets", "description"):
        table.add_column(col, overflow="fold")
    for job in sorted(defs.resolve_all_job_defs(), key=lambda j: j.name):
        if job.name.startswith("__"):
            continue
        pdef = job.partitions_def
        table.add_row(
            job.name,
            getattr(pdef, "name", None) or ("yes" if pdef else "—"),
            ", ".join(sorted(job.graph.node_names())),
            job.description or "",
        )
    console.print(table)
    return 0


def cmd_batches(args) -> int:
    import dagster as dg

    ensure_instance_home()
    keys = dg.DagsterInstance.get().get_dynamic_partitions("batches")
    from jobs.withdraw_cli import show_batches  # withdrawn batches/shards are marked

    show_batches(console, keys)
    return 0


def cmd_launch(args) -> int:
    run_config = None
    if args.config:
        import yaml

        run_config = {}
        for path in args.config:
            run_config.update(yaml.safe_load(Path(path).read_text()) or {})
    result = run_job(args.job, partition=args.partition, run_config=run_config)
    console.print(materialization_table(result))
    return 0 if result.success else 1


def _storage():
    from resources.storage import open_storage

    return open_storage()


def cmd_gen(args) -> int:
    from pipeline import datagen
    from pipeline.storage import join

    store = _storage()
    prefix = join("incoming", args.batch)
    if store.exists(join(prefix, datagen.READY_MARKER)) and not args.force:
        console.print(f"batch {args.batch!r} already landed at {store.uri(prefix)} (use --force to rewrite)")
        return 0
    if args.kind == "digits":
        data = datagen.load_digits(seed=args.seed)
        if args.shifted:
            data = datagen.shift(data, seed=args.seed + 1)
        with console.status(f"writing digits batch {args.batch!r}"):
            summary = datagen.write_batch(
                store, prefix, data, samples_per_shard=args.samples_per_shard, image_size=args.image_size, fmt=args.format
            )
        console.print(
            f"wrote {summary['samples']} samples in {len(summary['shards'])} shards + table "
            f"({summary['bytes'] / 1e6:.1f} MB) to {store.uri(prefix)}"
        )
    else:
        with Progress(TextColumn("synthetic shards"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} B"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("gen", total=args.size)
            shards = datagen.write_synthetic_shards(
                store, join(prefix, "shards"), args.size, image_size=args.image_size or 224,
                samples_per_shard=args.samples_per_shard, seed=args.seed,
                progress=lambda n: progress.update(task, completed=min(n, args.size)),
            )
        store.write_atomic(join(prefix, datagen.READY_MARKER), b'{"synthetic": true}')
        console.print(f"wrote {len(shards)} shards ({sum(s.size for s in shards) / 1e6:.1f} MB) to {store.uri(prefix)}")
    return 0


def cmd_demo(args) -> int:
    from pipeline import datagen
    from pipeline.storage import join

    home = ensure_instance_home()
    store = _storage()
    console.rule("[bold]forgeline demo: the whole lifecycle on the embedded defaults")
    console.print(f"instance: {home}   storage: {store.uri()}")
    prefix = join("incoming", args.batch)
    if not store.exists(join(prefix, datagen.READY_MARKER)):
        with console.status("generating the digits batch (scikit-learn's bundled data)"):
            datagen.write_batch(store, prefix, datagen.load_digits(), image_size=32)
    result = run_job("lifecycle", partition=args.batch)
    console.print(materialization_table(result))
    if result.success and args.drift_batch:
        ok = _demo_drift(store, args.drift_batch, retrain=args.retrain)
    else:
        ok = result.success
    console.print(f"storage: {store.uri()}   UI: `make ui` (instance {home})")
    return 0 if ok else 1


def _demo_drift(store, batch: str, *, retrain: bool) -> bool:
    """The loop closing: a drifted batch lands and is ingested, its drift checks fail at ERROR, and
    the `drift_retrain` sensor — evaluated here rather than by the daemon — asks for a retrain."""
    import dagster as dg

    from pipeline import datagen
    from pipeline.storage import join

    console.rule(f"[bold]a drifted batch lands: {batch} (brighter, rotated, noisier digits)")
    prefix = join("incoming", batch)
    if not store.exists(join(prefix, datagen.READY_MARKER)):
        datagen.write_batch(store, prefix, datagen.shift(datagen.load_digits()), image_size=32)
    ingest = run_job("ingest", partition=batch)
    console.print(check_table(ingest))
    if not ingest.success:
        return False
    defs = _defs()
    sensor = defs.get_sensor_def("drift_retrain")
    with dg.build_sensor_context(instance=dg.DagsterInstance.get(),
                                 resources={"storage": defs.resources["storage"]}) as ctx:
        out = sensor(ctx)
    requests = getattr(out, "run_requests", None) or []
    if not requests:
        console.print(f"drift_retrain: {out.skip_reason.skip_message if out.skip_reason else 'nothing to do'}")
        return True
    req = requests[0]
    console.print(f"drift_retrain requests [bold]train_and_package[/] ({req.tags.get('forgeline/drift')})")
    if not retrain:
        return True
    run = run_job("train_and_package", tags=req.tags)
    console.print(materialization_table(run))
    return run.success


def check_table(result) -> Table:
    """Every asset check a run evaluated: verdict, severity and the drift headline when present."""
    table = Table(title="Checks")
    for col in ("check", "partition", "result", "detail"):
        table.add_column(col, overflow="fold")
    for e in result.get_asset_check_evaluations():
        md = {k: v.value for k, v in e.metadata.items()}
        verdict = "[green]passed" if e.passed else f"[red]failed ({e.severity.value})"
        detail = e.description or ""
        if "report" in md:
            detail += f"\nreport: {md['report']}"
        table.add_row(f"{e.asset_key.to_user_string()}:{e.check_name}", e.partition or "", verdict, detail)
    return table


def _is_published(source: str) -> bool:
    """``<model>/<version>`` (or ``<model>/latest``) rather than a path or URI."""
    return "://" not in source and source.count("/") == 1 and not Path(source).exists()


def cmd_load(args) -> int:
    """Load a model and report per-stage throughput; published versions come from the shm tier
    when it holds them, else from the storage."""
    import json

    from pipeline import loading, metrics

    options = {"dtype": getattr(__import__("torch"), args.dtype) if args.dtype else None,
               "verify": args.verify, "owned": args.owned}
    where = "path"
    if _is_published(args.source):
        from pipeline.shm_tier import resolve_source
        from resources.storage import open_storage, shm_from_env

        model, version = args.source.split("/")
        tier = None if args.no_shm else shm_from_env().tier()
        options["storage"], where = resolve_source(model, version, tier=tier, local_cache=None, remote=open_storage())
    with Progress(TextColumn(f"loading {args.source}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, disable=args.json, transient=True) as progress:
        task = progress.add_task("load", total=None)
        tensors, rep = loading.load_with_report(
            args.source, args.device, progress=lambda done, total: progress.update(task, completed=done, total=total),
            **options)
    out = {"tensors": rep.tensors, "bytes": rep.bytes, "seconds": rep.seconds_total, "gbps": rep.gbps,
           "read_seconds": rep.seconds_read, "copy_seconds": rep.seconds_copy, "source_kind": rep.source_kind,
           "path": rep.path, "from": where, "device": rep.device,
           **metrics.summary(rep.chunk_seconds, "chunk_latency")}
    if args.json:
        print(json.dumps(out))
    else:
        console.print(f"[green]loaded[/] ({where}) {rep.summary()}")
    del tensors
    return 0


def _metric_rank(key: str) -> int:
    """Sort order of numeric metadata: wall time, throughput, latency percentiles, other timings,
    utilization, then the rest."""
    if key == "seconds":
        return 0
    if key.endswith("_per_s") or key == "gbps":
        return 1
    if "_latency_" in key:
        return 2
    if key.endswith(("_seconds", "_s")):
        return 3
    if key.startswith(("gpu_", "cpu_")):
        return 4
    return 5


def latest_report(instance, defs, asset: str | None = None) -> dict:
    """Per asset key (lineage order), its latest materialization — time, partition, run id, numeric
    metadata (timings first) — and the latest evaluation of each of its checks."""
    import dagster as dg

    graph = defs.resolve_asset_graph()
    order = {k: i for i, k in enumerate(graph.toposorted_asset_keys)}
    keys = set(instance.get_asset_keys()) | set(order)
    if asset is not None:
        keys &= {dg.AssetKey.from_user_string(asset)}
    checks: dict = {}
    for ck in graph.asset_check_keys:
        checks.setdefault(ck.asset_key, []).append(ck)
    out = {}
    latest = instance.get_latest_materialization_events(list(keys))
    for key in sorted(keys, key=lambda k: (order.get(k, len(order)), k.to_user_string())):
        entry = latest.get(key)
        if entry is None:
            continue
        mat = entry.asset_materialization
        numbers = {k: v.value for k, v in mat.metadata.items()
                   if isinstance(v, (dg.FloatMetadataValue, dg.IntMetadataValue)) and v.value is not None}
        row = {
            "materialized": datetime.fromtimestamp(entry.timestamp, timezone.utc).isoformat(timespec="seconds"),
            "partition": mat.partition,
            "run_id": entry.run_id,
            "metrics": {k: numbers[k] for k in sorted(numbers, key=_metric_rank)},
            "checks": [],
        }
        for ck in sorted(checks.get(key, []), key=lambda c: c.name):
            rec = instance.get_latest_asset_check_evaluation_record(ck)
            ev = rec.evaluation if rec is not None else None
            if ev is None:
                continue
            row["checks"].append({"name": ck.name, "passed": ev.passed, "severity": ev.severity.value,
                                  "partition": rec.partition, "run_id": rec.run_id})
        out[key.to_user_string()] = row
    return out


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_report(args) -> int:
    """The latest numbers per asset on the instance: timings, throughput, latency percentiles,
    utilization, the other numeric metadata, and the latest check results."""
    import json

    import dagster as dg

    home = ensure_instance_home()
    report = latest_report(dg.DagsterInstance.get(), _defs(), args.asset)
    if args.json:
        print(json.dumps({"instance": str(home), "assets": report}))
    elif not report:
        what = f"asset {args.asset!r} has" if args.asset else "no asset has"
        console.print(f"{what} been materialized on the instance {home} yet: run `forgeline demo`, or "
                      "`forgeline launch <job>`")
    else:
        table = Table(title=f"Latest materializations ({home})")
        for col in ("asset", "materialized", "partition", "run", "timing / throughput / latency", "other numbers",
                    "checks"):
            table.add_column(col, overflow="fold")
        for name, row in report.items():
            m = row["metrics"]
            timing = "\n".join(f"{k}={_fmt(v)}" for k, v in m.items() if _metric_rank(k) < 5)
            other = "\n".join(f"{k}={_fmt(v)}" for k, v in m.items() if _metric_rank(k) == 5)
            checks = "\n".join(
                f"{c['name']}: " + ("[green]pass[/]" if c["passed"] else
                                    f"[{'yellow' if c['severity'] == 'WARN' else 'red'}]fail ({c['severity']})[/]")
                for c in row["checks"])
            table.add_row(name, row["materialized"], row["partition"] or "", row["run_id"][:8], timing, other, checks)
        console.print(table)
    return 0 if report or not args.asset else 1


def cmd_ui(args) -> int:
    ensure_instance_home()
    dagster = Path(sys.executable).with_name("dagster")
    argv = [str(dagster), "dev", "-w", str(settings.PROJECT_ROOT / "workspace.yaml"), "-h", args.host, "-p", str(args.port)]
    console.print(f"Dagster UI on http://{args.host}:{args.port} (instance {os.environ['DAGSTER_HOME']})")
    os.chdir(settings.PROJECT_ROOT)
    os.execv(argv[0], argv)


def build_parser() -> argparse.ArgumentParser:
    from jobs.withdraw_cli import batch_name, optional_batch_name  # batch names checked before anything is written

    p = argparse.ArgumentParser(prog="forgeline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("jobs", help="list jobs").set_defaults(fn=cmd_jobs)
    sub.add_parser("batches", help="list ingested batches (partitions)").set_defaults(fn=cmd_batches)

    s = sub.add_parser("launch", help="run a job on the embedded instance with a progress view")
    s.add_argument("job")
    s.add_argument("--partition", "-p", help="batch to run (added if new)")
    s.add_argument("--config", "-c", action="append", help="run config YAML (repeatable, merged)")
    s.set_defaults(fn=cmd_launch)

    s = sub.add_parser("gen", help="land a batch of generated data under incoming/<batch>/")
    s.add_argument("kind", choices=["digits", "synthetic"])
    s.add_argument("--batch", required=True, type=batch_name)
    s.add_argument("--shifted", action="store_true", help="digits with brightness/rotation/noise drift")
    s.add_argument("--image-size", type=int, default=None, help="upscale images to N x N pixels")
    s.add_argument("--format", choices=["png", "jpg"], default="png")
    s.add_argument("--samples-per-shard", type=int, default=256)
    s.add_argument("--size", type=parse_size, default=parse_size("1GB"), help="synthetic: total shard bytes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="rewrite a batch that already landed")
    s.set_defaults(fn=cmd_gen)

    s = sub.add_parser("load", help="load a model (file, folder, index, s3://..., or <model>/<version>) and time it")
    s.add_argument("source")
    s.add_argument("--device", "-d", default="cpu", help="cpu or cuda[:N]")
    s.add_argument("--dtype", help="cast floating tensors on the device, e.g. bfloat16")
    s.add_argument("--verify", action="store_true", help="check sha256 against the manifest")
    s.add_argument("--owned", action="store_true", help="copy into owned memory (CPU) instead of mapping")
    s.add_argument("--no-shm", action="store_true", help="ignore the /dev/shm tier")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_load)

    s = sub.add_parser("report", help="latest materialization per asset: timings, throughput, latency, checks")
    s.add_argument("--asset", "-a", help="only this asset key (e.g. trained_model)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("ui", help="open the Dagster UI (dagster dev) on the embedded instance")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=3000)
    s.set_defaults(fn=cmd_ui)

    from jobs.serve_cli import add_parser as add_serve_parser  # forgeline serve [status]

    add_serve_parser(sub)

    from jobs.withdraw_cli import add_parser as add_withdraw_parser  # forgeline withdraw

    add_withdraw_parser(sub)

    s = sub.add_parser("demo", help="generate data and run the lifecycle job end to end")
    s.add_argument("--batch", default="digits-0001", type=batch_name)
    s.add_argument("--drift-batch", default="digits-shifted", type=optional_batch_name,
                   help="then land this drifted batch and ingest it ('' to skip)")
    s.add_argument("--no-retrain", dest="retrain", action="store_false",
                   help="do not run the retrain the drift sensor requests")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
