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
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import settings

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class UserError(Exception):
    """A mistake the user can fix (unknown job, bad config, ...): one line, no traceback."""


class RunCanceled(Exception):
    """The run was canceled from this CLI (Ctrl-C, SIGTERM)."""


# Run monitoring (needs the daemon: `make ui` / `dagster dev` / `dagster-daemon run`): a run stuck
# starting, or a canceling run whose process is gone, is failed / marked canceled; slots still
# held by a run that ended are freed; a run past max_runtime_seconds (e.g. its run worker was
# SIGKILLed or its machine lost: the default run launcher cannot health-check its workers) is
# failed. Runs executed in-process by `forgeline launch` are also checked by the CLI itself before
# each launch (a run STARTED whose process is gone is failed and its slots freed).
_RUN_MONITORING_YAML = """\
# Stale runs (a run worker killed hard, a lost machine) must not hold pool slots forever.
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_runtime_seconds: 43200
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 30
"""

_DAGSTER_YAML = """\
# Embedded defaults: SQLite run/event/schedule storage under this folder.
telemetry:
  enabled: false
# GPU steps (assets with pool="gpu") run one at a time per instance unless raised here.
concurrency:
  pools:
    default_limit: 1
""" + _RUN_MONITORING_YAML


def ensure_instance_home() -> Path:
    """Point DAGSTER_HOME at the project-local instance unless the user chose one; write its
    dagster.yaml if missing, and add run monitoring to an existing one that lacks it."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.home() / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(_DAGSTER_YAML)
    else:
        _add_run_monitoring(cfg)
    return home


def _add_run_monitoring(cfg: Path) -> None:
    """An instance made before run monitoring was shipped: append the block (the user's other
    settings and comments stay as they are) and say so in one line; if the file cannot be
    written, say how to add it."""
    import yaml

    text = cfg.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{cfg} is not valid YAML ({_first_line(e)}): fix it or remove it to get the defaults") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{cfg} must be a YAML mapping of instance settings: fix it or remove it to get the defaults")
    if data and "run_monitoring" in data:
        return
    try:
        with cfg.open("a") as f:
            f.write(("\n" if text and not text.endswith("\n") else "") + _RUN_MONITORING_YAML)
    except OSError:
        err_console.print(f"forgeline: {cfg} has no run_monitoring: add `run_monitoring: {{enabled: true, "
                          "max_runtime_seconds: 43200}}` so a killed run cannot hold pool slots forever")
        return
    err_console.print(f"forgeline: added run_monitoring to {cfg} (stale runs are failed and their pool slots freed)")


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


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

# Who executes a run this CLI launched: stale-run detection compares them with the living processes.
TAG_PID = "forgeline/launcher_pid"
TAG_HOST = "forgeline/launcher_host"
TAG_STARTED = "forgeline/launcher_started"  # the process's start time: a reused pid is not the same process


def _process_tags() -> dict:
    import psutil

    return {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname(),
            TAG_STARTED: f"{psutil.Process().create_time():.2f}"}


def _launcher_alive(tags) -> bool | None:
    """Whether the process that executes a run is alive; None when this host cannot tell (a run
    launched by the daemon, the UI, or on another machine)."""
    import psutil

    if tags.get(TAG_HOST) != socket.gethostname() or TAG_PID not in tags:
        return None
    try:
        proc = psutil.Process(int(tags[TAG_PID]))
        started = proc.create_time()
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return True
    try:
        return abs(started - float(tags.get(TAG_STARTED, started))) < 1.0
    except ValueError:
        return True


def reap_stale_runs(instance) -> list[str]:
    """Fail the runs a process of this CLI on this host executed and that are still in progress
    although the process is gone (SIGKILL, OOM kill, a crash), and free the pool slots they, or any
    run that already ended, still hold. Returns one line per run fixed."""
    import dagster as dg

    notes = []
    in_progress = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                   dg.DagsterRunStatus.CANCELING]
    storage = instance.event_log_storage
    for rec in instance.get_run_records(filters=dg.RunsFilter(statuses=in_progress,
                                                               tags={TAG_HOST: socket.gethostname()})):
        run = rec.dagster_run
        if _launcher_alive(run.tags) is not False:
            continue
        why = (f"the process that executed it (pid {run.tags.get(TAG_PID)}) is gone (killed or crashed); "
               "marked by forgeline before the next launch")
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message=f"Canceled: {why}")
            verdict = "canceled"
        else:
            instance.report_run_failed(run, message=f"Failed: {why}")
            verdict = "failed"
        storage.free_concurrency_slots_for_run(run.run_id)
        notes.append(f"run {run.run_id[:8]} ({_run_label(run)}) was {run.status.value} but its process is gone: "
                     f"marked {verdict}, its pool slots freed")
    if storage.supports_global_concurrency_limits:
        ended = set()
        for key in storage.get_concurrency_keys():
            for slot in storage.get_concurrency_info(key).claimed_slots:
                run = instance.get_run_by_id(slot.run_id)
                if slot.run_id not in ended and (run is None or run.is_finished):
                    ended.add(slot.run_id)
                    storage.free_concurrency_slots_for_run(slot.run_id)
                    notes.append(f"freed the {key!r} pool slot still held by run {slot.run_id[:8]}, which "
                                 + ("no longer exists" if run is None else f"ended {run.status.value}"))
    return notes


def _run_label(run) -> str:
    part = run.tags.get("dagster/partition")
    return run.job_name + (f" [{part}]" if part else "")


def _resolve_job(defs, job_name: str):
    names = sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__"))
    if job_name not in names:
        raise UserError(f"unknown job {job_name!r}; jobs: {', '.join(names)} (see `forgeline jobs`)")
    return defs.resolve_job_def(job_name)


def validate_run_config(job, run_config: dict) -> dict:
    """Check ``run_config`` against the job's schema and every step's ``dg.Config`` class (types,
    enumerations, ranges) before anything runs; a mistake raises :class:`UserError` naming the
    step and the field. Returns the config Dagster resolved (defaults filled in)."""
    import dagster as dg
    from pydantic import ValidationError

    try:
        resolved = dg.validate_run_config(job, run_config)
    except dg.DagsterInvalidConfigError as e:
        msgs = [err.message.replace("root:ops:", "").replace(":config:", ".") for err in e.errors]
        raise UserError("invalid run config: " + "; ".join(" ".join(m.split()) for m in msgs)) from None
    for name, node_cfg in (resolved.get("ops") or {}).items():
        node = job.graph.node_dict.get(name)
        compute_fn = getattr(getattr(node, "definition", None), "compute_fn", None)
        has_config = getattr(compute_fn, "has_config_arg", None)
        if compute_fn is None or has_config is None or not has_config():
            continue
        cls = compute_fn.get_config_arg().annotation
        if not (isinstance(cls, type) and issubclass(cls, dg.Config)):
            continue
        values = (node_cfg or {}).get("config") or {}
        try:
            cls(**cls._get_non_default_public_field_values_cls(values))  # as Dagster builds it for the step
        except ValidationError as e:
            msgs = [f"{name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')} "
                    f"(got {err.get('input')!r})"
                    for err in e.errors()]
            raise UserError("invalid run config: " + "; ".join(msgs)) from None
    return resolved


def root_cause(error) -> str:
    """The user's exception inside Dagster's wrappers: the first error of the ``cause`` chain that
    is not Dagster's own (e.g. the IngestError naming the file and column), as ``Type: message``."""
    chain, e = [], error
    while e is not None:
        chain.append(e)
        e = e.cause
    ours = [e for e in chain if not (e.cls_name or "").startswith("Dagster")]
    pick = ours[0] if ours else chain[-1]
    msg = (pick.message or "").strip()
    if pick.cls_name:  # "pkg.mod.IngestError: text" -> "IngestError: text"
        head, sep, rest = msg.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == pick.cls_name:
            msg = rest
        msg = f"{pick.cls_name}: {msg}"
    return msg


def run_failure(instance, run_id: str) -> str:
    """One line saying why a run failed: the first failed step's root cause, else the run's."""
    first = None
    for rec in instance.all_logs(run_id):
        ev = rec.dagster_event
        err = getattr(ev.event_specific_data, "error", None) if ev is not None else None
        if err is None:
            continue
        where = f"step {ev.step_key}" if ev.step_key else "run"
        line = f"{where}: {_first_line(root_cause(err))}"
        if ev.event_type_value == "STEP_FAILURE":
            return line
        first = first or line
    return first or "see `make ui` for its event log"


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a `kill`, a CI timeout) stops a launch the way Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _raise_in_thread(thread: threading.Thread, exc: type[BaseException]) -> None:
    import ctypes

    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


def cancel_run(instance, run_id: str, thread: threading.Thread, *, grace_s: float = 60.0) -> None:
    """Cancel a run executing in ``thread``: mark it CANCELING, interrupt its step (the training
    launcher then stops torchrun's process group), wait for Dagster to record CANCELED, and free
    its pool slots. A run that does not stop within ``grace_s`` is marked CANCELED anyway."""
    from dagster._core.errors import DagsterExecutionInterruptedError

    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_canceling(run, message="Canceling: interrupted in `forgeline launch` (Ctrl-C / SIGTERM)")
    deadline = time.monotonic() + grace_s
    try:
        _raise_in_thread(thread, DagsterExecutionInterruptedError)
        thread.join(min(20.0, grace_s))
        if thread.is_alive():  # it was in native code, or the exception landed where it was swallowed
            _raise_in_thread(thread, DagsterExecutionInterruptedError)
            thread.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        pass
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_canceled(run, message="Canceled from `forgeline launch` (the run did not stop in time)")
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def _pool_holders(instance, pool: str, run_id: str) -> str:
    try:
        info = instance.event_log_storage.get_concurrency_info(pool)
    except Exception:  # noqa: BLE001 - the view must not fail the run
        return ""
    holders = []
    for slot in info.claimed_slots:
        if slot.run_id == run_id:
            continue
        run = instance.get_run_by_id(slot.run_id)
        who = f"run {slot.run_id[:8]}"
        if run is not None:
            pid = run.tags.get(TAG_PID)
            who += f" ({_run_label(run)}, {run.status.value}" + (f", pid {pid}" if pid else "") + ")"
        holders.append(f"{who} step {slot.step_key}")
    limit = f" (limit {info.limit})" if info.limit is not None else ""
    return f"{limit}, held by " + "; ".join(holders) if holders else limit


def run_job(job_name: str, *, partition: str | None = None, run_config: dict | None = None, quiet: bool = False,
            tags: dict | None = None):
    """Execute ``job_name`` on the embedded instance, showing step progress. Returns the result.

    The run config is validated first (nothing runs on a mistake). Runs an earlier process of
    this CLI left in progress when it was killed are failed and their pool slots freed. A
    partition that does not exist yet is added first (dynamic partitions), so ``forgeline launch
    ingest --partition new-batch`` is all a user needs. Ctrl-C
    or SIGTERM cancels the run (:class:`RunCanceled`).
    """
    import dagster as dg

    ensure_instance_home()
    defs = _defs()
    job = _resolve_job(defs, job_name)
    instance = dg.DagsterInstance.get()
    if partition is not None and job.partitions_def is None:
        raise UserError(f"job {job_name!r} is not partitioned; drop --partition")
    if partition is None and job.partitions_def is not None:
        raise UserError(f"job {job_name!r} is partitioned: pass --partition (see `forgeline batches`)")
    # The progress view replaces Dagster's console log (failures included: the view prints their
    # root cause); the UI keeps the full event log.
    run_config = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}, **(run_config or {})}
    validate_run_config(job, run_config)
    for note in reap_stale_runs(instance):
        err_console.print(f"forgeline: {note}")
    if partition is not None:
        pdef = job.partitions_def
        if isinstance(pdef, dg.DynamicPartitionsDefinition):
            if not instance.has_dynamic_partition(pdef.name, partition):
                if pdef.name == "batches":  # only a valid name of a batch that has landed completely
                    from jobs.withdraw_cli import check_new_partition

                    check_new_partition(defs.resources["storage"].client(), partition)
                instance.add_dynamic_partitions(pdef.name, [partition])
        elif partition not in pdef.get_partition_keys(dynamic_partitions_store=instance):
            raise UserError(f"unknown partition {partition!r} of job {job_name!r}")

    steps = sorted(job.graph.node_names())
    run_id = str(uuid.uuid4())
    box: dict = {}

    def target():
        try:
            box["result"] = job.execute_in_process(
                run_config=run_config, instance=instance, partition_key=partition, run_id=run_id, raise_on_error=False,
                tags={**(tags or {}), **_process_tags()},
            )
        except BaseException as e:  # surfaced below
            box["error"] = e

    t = threading.Thread(target=target, name=f"forgeline-run-{run_id[:8]}", daemon=True)
    t0 = time.perf_counter()
    with _terminate_as_interrupt():
        try:
            t.start()
            _watch(instance, job_name, partition, run_id, steps, t, quiet)
        except KeyboardInterrupt:
            cancel_run(instance, run_id, t)
            raise RunCanceled(run_id) from None
    if "error" in box:
        raise box["error"]
    result = box["result"]
    secs = time.perf_counter() - t0
    status = "[green]SUCCESS" if result.success else "[red]FAILURE"
    if not quiet:
        console.print(f"{status}[/] run {run_id} ({secs:.1f}s) — view it with `make ui`")
    return result


def _watch(instance, job_name, partition, run_id, steps, t, quiet) -> None:
    state = {s: "waiting" for s in steps}
    blocked: dict[str, str] = {}
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
                    blocked.pop(step, None)
                    progress.console.log(f"[cyan]▶ {step}")
                elif kind == "STEP_SUCCESS":
                    state[step] = "ok"
                    progress.console.log(f"[green]✔ {step}[/] ({ev.event_specific_data.duration_ms / 1000:.2f}s)")
                elif kind == "STEP_FAILURE":
                    state[step] = "failed"
                    err = ev.event_specific_data.error
                    progress.console.log(f"[red]✘ {step}: {escape(root_cause(err)) if err else 'failed'}", highlight=False)
                elif kind == "ENGINE_EVENT" and "pool" in (getattr(ev.event_specific_data, "metadata", None) or {}):
                    pool = ev.event_specific_data.metadata["pool"].value
                    held = _pool_holders(instance, pool, run_id)
                    if blocked.get(step) != held:  # say it once, and again when the holder changes
                        blocked[step] = held
                        progress.console.log(f"[yellow]⏸ {step} is waiting for pool {pool!r}{escape(held)}", highlight=False)
                elif kind == "ASSET_CHECK_EVALUATION":
                    d = ev.event_specific_data
                    mark = "[green]pass" if d.passed else f"[yellow]{d.severity.value.lower()}"
                    progress.console.log(f"  check {d.asset_key.to_user_string()}:{d.check_name} {mark}")
            cursor = len(records)
            progress.update(task, completed=sum(v in ("ok", "failed") for v in state.values()))
            if not alive:
                break
            time.sleep(0.2)


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
    return 0 if result.success else _report_failure(result)


def _report_failure(result) -> int:
    """The one line a failed run leaves on stderr: its root cause. Returns the exit status."""
    import dagster as dg

    err_console.print(f"forgeline: run {result.run_id[:8]} failed: "
                      f"{run_failure(dg.DagsterInstance.get(), result.run_id)}", markup=False)
    return 1


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


def load_device(text: str) -> str:
    """An argparse type for ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (availability is checked
    by the command, where torch is imported)."""
    import re

    t = text.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", t):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return t


def _check_cuda_device(device: str) -> None:
    """A CUDA ``device`` this host does not have is a one-line :class:`UserError`."""
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                        f"torch.cuda.is_available() is False); use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise UserError(f"--device {device}: this host has {count} CUDA device{'s' if count > 1 else ''} "
                        f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")


def cmd_load(args) -> int:
    """Load a model and report per-stage throughput; published versions come from the shm tier
    when it holds them, else from the storage."""
    import json

    from pipeline import loading, metrics

    _check_cuda_device(args.device)
    options = {"dtype": getattr(__import__("torch"), args.dtype) if args.dtype else None,
               "verify": args.verify, "owned": args.owned, "allow_rejected": args.allow_rejected}
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
    s.add_argument("--image-size", type=int, default=None, help="upscale images to N x N pixels")
    s.add_argument("--format", choices=["png", "jpg"], default="png")
    s.add_argument("--samples-per-shard", type=int, default=256)
    s.add_argument("--size", type=parse_size, default=parse_size("1GB"), help="synthetic: total shard bytes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="rewrite a batch that already landed")
    s.set_defaults(fn=cmd_gen)

    s = sub.add_parser("load", help="load a model (file, folder, index, s3://..., or <model>/<version>) and time it")
    s.add_argument("source")
    s.add_argument("--device", "-d", default="cpu", type=load_device, help="cpu, cuda or cuda:N")
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
    s.add_argument("--port", type=int, default=3000)
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
    """A user-facing line for an error: its own message for the ones we raise, its type too otherwise."""
    import dagster as dg
    from pydantic import ValidationError

    if isinstance(e, (UserError, settings.SettingError)):
        return " ".join(str(e).split())
    if isinstance(e, dg.DagsterInvalidConfigError):
        return "invalid config: " + "; ".join(" ".join(err.message.split()) for err in e.errors)
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"no such file or directory: {e.filename}"
    return f"{type(e).__name__}: {_first_line(e)} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
