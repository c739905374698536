"""``forgeline``: list and launch the jobs on the embedded instance, generate data, run the demo.

    forgeline jobs                                   list jobs and their assets
    forgeline launch lifecycle --partition B [-c run_config.yaml]
    forgeline gen digits --batch B [--shifted] [--image-size 32]
    forgeline gen synthetic --batch B --size 2GB
    forgeline load digits/latest --device cuda:0 [--json]   fast load, per-stage throughput
    forgeline load digits/production                 the promoted version (shm tier first); a rejected
                                                     version only by id with --allow-rejected
    forgeline models [digits] [--json]               versions: production, previous, rejected, gates
    forgeline promote digits VERSION [--reason T]    move the production alias; `forgeline rollback digits`
    forgeline report [--asset NAME] [--json]         latest timings, throughput, latencies, checks per asset
    forgeline withdraw B [--shard NAME] --reason T   take a published batch/shard out of training (recorded)
    forgeline demo                                   lifecycle, then the loop live through a server
    forgeline ui                                     Dagster UI on the same instance
    forgeline serve [--models a,b] [--port 8000]     model server (KServe/Triton v2 HTTP); `serve status`

The instance is ``$DAGSTER_HOME`` (default: ``.forgeline/dagster_home`` in the project, SQLite), the
same one ``make ui`` opens, so runs launched here show up in the UI.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobs import argtypes
from jobs.runs import (
    RunCanceled,
    UserError,
    check_port,
    console,
    ensure_instance_home,
    err_console,
    first_line,
    instance_home,
    load_defs,
    materialization_table,
    open_store,
    report_failure,
    run_job,
)
from pipeline import settings


def cmd_jobs(args) -> int:
    defs = load_defs()
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


def load_run_config(items: list[str]) -> dict:
    """``--config`` values, merged in order: each a YAML/JSON file, or an inline JSON/YAML mapping."""
    import yaml

    out: dict = {}
    for item in items:
        path = Path(item)
        if path.is_file():
            text, where = path.read_text(), str(path)
        elif item.lstrip().startswith("{"):
            text, where = item, "the inline --config"
        else:
            raise UserError(f"--config {item!r}: no such file (pass a YAML/JSON file or an inline JSON object)")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{where} is not valid YAML/JSON: {' '.join(str(e).split())}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise UserError(f"{where} must be a mapping such as {{\"ops\": {{\"trained_model\": {{\"config\": "
                            f"{{\"epochs\": 5}}}}}}}}, not a {type(data).__name__}")
        _merge(out, data)
    return out


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def cmd_launch(args) -> int:
    run_config = load_run_config(args.config) if args.config else None
    result = run_job(args.job, partition=args.partition, run_config=run_config)
    console.print(materialization_table(result))
    return 0 if result.success else report_failure(result)


def cmd_gen(args) -> int:
    from pipeline import datagen
    from pipeline.storage import join

    store = open_store()
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
            summary = datagen.write_synthetic_batch(
                store, prefix, args.size, image_size=args.image_size or 224, samples_per_shard=args.samples_per_shard,
                seed=args.seed, progress=lambda n: progress.update(task, completed=min(n, args.size)),
            )
        console.print(f"wrote {summary['samples']} samples in {len(summary['shards'])} shards + table "
                      f"({summary['bytes'] / 1e6:.1f} MB) to {store.uri(prefix)}")
    return 0


def _is_published(source: str) -> bool:
    """``<model>/<version>`` (or ``<model>/latest``) rather than a path or URI."""
    return "://" not in source and source.count("/") == 1 and not Path(source).exists()


# `forgeline load --dtype`: the cast targets, with their common short names.
LOAD_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32",
               "float64": "float64", "fp64": "float64", "double": "float64"}


def load_dtype(text: str) -> str:
    """An argparse type for ``--dtype``: the canonical torch dtype name."""
    name = LOAD_DTYPES.get(text.strip().lower().removeprefix("torch."))
    if name is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype to cast to: use one of "
                                         f"{', '.join(sorted(set(LOAD_DTYPES.values())))} "
                                         f"(or {', '.join(k for k in LOAD_DTYPES if k not in LOAD_DTYPES.values())})")
    return name


def cmd_load(args) -> int:
    """Load a model and report per-stage throughput; published versions come from the shm tier
    when it holds them, else from the storage."""
    import json

    from pipeline import loading, metrics
    from pipeline.storage import StorageError

    argtypes.check_device(args.device)
    options = {"dtype": getattr(__import__("torch"), args.dtype) if args.dtype else None,
               "verify": args.verify, "owned": args.owned, "allow_rejected": args.allow_rejected}
    source, where = args.source, "path"
    if _is_published(args.source.rstrip("/")):  # resolved once, where its bytes are read: shm tier, else storage
        from pipeline.shm_tier import reader_tier, resolve_source

        args.source = source = args.source.rstrip("/")  # digits/v1/ as digits/v1
        model, version = source.split("/")
        tier = None if args.no_shm else reader_tier(settings.shm_root(), capacity_bytes=settings.shm_capacity_bytes(),
                                                    warn=lambda m: err_console.print(f"forgeline: {m}"))
        source, where = resolve_source(model, version, tier=tier, local_cache=None, remote=open_store(),
                                       allow_rejected=args.allow_rejected)
    elif "://" not in args.source and not Path(args.source).exists():
        raise UserError(f"{args.source}: no such file or directory (a published version is <model>/<version>, "
                        "<model>/latest or <model>/production; a remote file or folder s3://<bucket>/<key>)")
    def load(source):
        with Progress(TextColumn(f"loading {args.source}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), console=console, disable=args.json or not console.is_terminal,
                      transient=True) as progress:
            task = progress.add_task("load", total=None)
            return loading.load_with_report(
                source, args.device, progress=lambda done, total: progress.update(task, completed=done, total=total),
                **options)

    try:
        tensors, rep = load(source)
    except (loading.LoadError, StorageError) as e:
        if where != "shm":
            raise
        # the tier is a copy: a damaged one is dropped and the store's read instead, as the server does
        why = " ".join(str(e).split())
        err_console.print(f"forgeline: the shm tier copy of {model}/{version} is not used ({why}); "
                          "dropped it, loading from the store", markup=False)
        held = tier.version_holding(model, source.shards[0].path or "")
        if held is not None:
            tier.evict(model, held, force=True)
        source, where = resolve_source(model, version, tier=None, local_cache=None, remote=open_store(),
                                       allow_rejected=args.allow_rejected)
        tensors, rep = load(source)
    out = {"tensors": rep.tensors, "bytes": rep.bytes, "seconds": rep.seconds_total, "gbps": rep.gbps,
           "read_seconds": rep.seconds_read, "copy_seconds": rep.seconds_copy, "source_kind": rep.source_kind,
           "path": rep.path, "from": where, "device": rep.device,
           **metrics.summary(rep.chunk_seconds, "chunk_latency")}
    if args.json:
        print(json.dumps(out))
    else:
        origin = {"shm": "from the shm tier", "local": "from the local cache", "remote": "from the store"}.get(where)
        console.print(f"[green]loaded[/] {args.source}{f' ({origin})' if origin else ''}: {rep.summary()}")
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
        wanted = dg.AssetKey.from_user_string(asset)
        if wanted not in keys:
            names = ", ".join(k.to_user_string() for k in graph.toposorted_asset_keys)
            raise UserError(f"unknown asset {asset!r}; assets: {names}")
        keys = {wanted}
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
    report = latest_report(dg.DagsterInstance.get(), load_defs(), args.asset)
    if args.json:
        print(json.dumps({"instance": str(home), "assets": report}))
    elif not report:
        what = f"asset {args.asset!r} has not" if args.asset else "no asset has"
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
    check_port(args.host, args.port, "Dagster UI")
    ensure_instance_home()
    dagster = Path(sys.executable).with_name("dagster")
    argv = [str(dagster), "dev", "-w", str(settings.PROJECT_ROOT / "workspace.yaml"), "-h", args.host, "-p", str(args.port)]
    console.print(f"Dagster UI on http://{args.host}:{args.port} (instance {os.environ['DAGSTER_HOME']})")
    os.chdir(settings.PROJECT_ROOT)
    os.execv(argv[0], argv)


class _OneLineParser(argparse.ArgumentParser):
    """A misused command: one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from jobs.withdraw_cli import batch_name  # batch names checked before anything is written

    p = _OneLineParser(prog="forgeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="full Python tracebacks on errors (or FORGELINE_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_OneLineParser)
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
    s.add_argument("--image-size", type=argtypes.positive(int), default=None, help="upscale images to N x N pixels")
    s.add_argument("--format", choices=["png", "jpg"], default="png")
    s.add_argument("--samples-per-shard", type=argtypes.positive(int), default=256)
    s.add_argument("--size", type=argtypes.size, default=10**9, help="synthetic: total shard bytes (default 1GB)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="rewrite a batch that already landed")
    s.set_defaults(fn=cmd_gen)

    s = sub.add_parser("load", help="load a model (file, folder, index, s3://..., or <model>/<version>) and time it")
    s.add_argument("source")
    s.add_argument("--device", "-d", default="cpu", type=argtypes.device, help="cpu, cuda or cuda:N")
    s.add_argument("--dtype", type=load_dtype, metavar="{float16,bfloat16,float32,float64}",
                   help="cast floating tensors on the device (also fp16, bf16, fp32, fp64, half, float, double)")
    s.add_argument("--verify", action="store_true", help="check sha256 against the manifest")
    s.add_argument("--owned", action="store_true", help="copy into owned memory (CPU) instead of mapping")
    s.add_argument("--no-shm", action="store_true", help="ignore the /dev/shm tier")
    s.add_argument("--allow-rejected", action="store_true",
                   help="load a version a gate rejected (by its version id only; production/latest never name one)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_load)

    s = sub.add_parser("report", help="latest materialization per asset: timings, throughput, latency, checks")
    s.add_argument("--asset", "-a", help="only this asset key (e.g. trained_model)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("ui", help="open the Dagster UI (dagster dev) on the embedded instance")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=argtypes.port, default=3000)
    s.set_defaults(fn=cmd_ui)

    from jobs.serve_cli import add_parser as add_serve_parser  # forgeline serve [status]

    add_serve_parser(sub)

    from jobs.withdraw_cli import add_parser as add_withdraw_parser  # forgeline withdraw

    add_withdraw_parser(sub)

    from jobs.models_cli import add_parser as add_models_parser  # forgeline models / promote / rollback

    add_models_parser(sub)

    from jobs.demo import add_parser as add_demo_parser  # forgeline demo (the lifecycle, then the loop live)

    add_demo_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error, a failed run or an interrupted one ends in one line on
    stderr and a non-zero status; ``--debug`` (anywhere on the line) or ``FORGELINE_DEBUG=1``
    shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
    try:
        debug = debug or settings.debug()
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except RunCanceled as e:
        err_console.print(f"forgeline: run {str(e)[:8]} canceled: its processes are stopped and its pool slots freed",
                          markup=False)
        return 130
    except KeyboardInterrupt:
        err_console.print("forgeline: interrupted", markup=False)
        return 130
    except SystemExit as e:
        if not isinstance(e.code, str) or debug:
            raise  # argparse's own exits (one line already), or a status
        err_console.print(f"forgeline: {' '.join(e.code.split())}", markup=False)
        return 1
    except Exception as e:  # noqa: BLE001 - every error a user meets is one line
        if debug:
            raise
        err_console.print(f"forgeline: {_error_line(e)}", markup=False)
        return 1


def _error_line(e: BaseException) -> str:
    """A user-facing line for an error: its own message for the ones forgeline raises, its type and
    the hint to --debug for the others (a bug, or a library's error that reached the top)."""
    import dagster as dg
    from pydantic import ValidationError

    # forgeline's own errors (UserError, SettingError, StorageError, ...) name the file or setting and the problem
    if type(e).__module__.partition(".")[0] in ("pipeline", "jobs", "resources", "assets") and str(e).strip():
        return " ".join(str(e).split())
    if isinstance(e, dg.DagsterInvalidConfigError):
        # each error's first sentence: Dagster appends the whole expected schema ("Expected: {...}")
        said = "; ".join(" ".join(err.message.partition(' Expected: "')[0].split()) for err in e.errors)
        if "instance config" in first_line(e):  # the instance's dagster.yaml, not a run's config
            return f"{Path(os.environ.get('DAGSTER_HOME', '.')) / 'dagster.yaml'}: invalid instance config: {said}"
        return "invalid config: " + said
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"no such file or directory: {e.filename}"
    if type(e).__name__ == "OperationalError" and type(e).__module__.partition(".")[0] in ("sqlalchemy", "sqlite3"):
        return _instance_db_error(e)
    return f"{type(e).__name__}: {first_line(e)} (run with --debug for the traceback)"


def _instance_db_error(e: BaseException) -> str:
    """The embedded instance's SQLite failed ("disk I/O error", "database or disk is full", "unable
    to open database file"): name the folder and the room left on its disk, the usual cause."""
    import shutil

    home = instance_home()
    said = first_line(getattr(e, "orig", None) or e).removeprefix("(sqlite3.OperationalError) ")
    try:
        free = shutil.disk_usage(home).free
        room = (f"{free / 2**20:.1f} MiB" if free < 2**30 else f"{free / 2**30:.1f} GiB") + " free on its disk"
    except OSError as err:
        room = f"its disk cannot be read: {err.strerror or err}"
    return f"the Dagster instance in DAGSTER_HOME {home}: SQLite failed ({said}); {room}"


if __name__ == "__main__":
    sys.exit(main())
